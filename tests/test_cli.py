"The console script and the test harness, as a user runs them."
import json, os, subprocess, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def run(*args, **kw):
    return subprocess.run([str(BIN / "anymal"), *args], capture_output=True, text=True, timeout=300, **kw)

def test_info_full_json_is_valid():
    r = run("info", "--preset", "full", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["config"]["vision"]["width"] == 1024 and d["config"]["llm"]["hidden"] == 4096

def test_info_rejects_typo_with_key_name():
    r = run("info", "--set", "resampler.latnts=8", "--no-model")
    assert r.returncode == 1
    assert "resampler.latnts" in r.stderr and "latents" in r.stderr and "Traceback" not in r.stderr

def test_info_rejects_wrong_type():
    r = run("info", "--set", "train.steps=1.5", "--no-model")
    assert r.returncode == 1 and "train.steps" in r.stderr

def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr

def test_failing_notebook_cell_fails_nbdev_test(tmp_path):
    "The test command relies on nbdev-test failing when any cell raises."
    nb = json.loads((ROOT / "nbs" / "00_config.ipynb").read_text())
    nb["cells"].append({"cell_type": "code", "id": "f00dfeed", "metadata": {}, "execution_count": None,
                        "outputs": [], "source": "assert 1 == 2, 'deliberate failure'"})
    d = tmp_path / "nbs"; d.mkdir()
    (d / "broken.ipynb").write_text(json.dumps(nb))
    r = subprocess.run([str(BIN / "nbdev-test"), str(d)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "broken.ipynb" in (r.stdout + r.stderr)


# ---- issue 25: one error path, checks before anything heavy, quiet imports -------------------------------------------

PROBE = ("import sys; from anymal.cli import main; rc = main(sys.argv[1:]); "
         "print(rc, [m for m in ('torch', 'transformers', 'anymal.stages', 'anymal.evaluate') if m in sys.modules])")


@pytest.mark.parametrize("args, culprit", [
    (["train", "--set", "train.steps=-5"], "train.steps=-5: must be >= 1"),
    (["train", "--stage", "2", "--set", "train.grad_accum=0"], "train.grad_accum=0: must be >= 1"),
    (["train", "--set", "train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    (["train", "--set", "train.stesp=3"], "unknown config key 'train.stesp'; did you mean 'steps'?"),
    (["train", "--set", "train.min_lr_ratio=2"], "train.min_lr_ratio=2.0: must be in [0, 1]"),
    (["demo", "--stage2", "data.max_len=0"], "data.max_len=0: must be >= 1"),
    (["eval", "--checkpoint", "nowhere", "--set", "llm.quant=nf8"], "llm.quant='nf8': choose one of ['nf4', 'none']"),
    (["standins", "--set", "standins.lm_steps=-1"], "standins.lm_steps=-1: must be >= 0 (0: a random LLaMA)"),
    (["train", "--set", "resampler.kind=mlp"], "resampler.latents=16: resampler.kind='mlp' passes one token per patch, "
                                               "256 here ((vision.image_size 64 // vision.patch_size 4)**2); "
                                               "set resampler.latents=256"),
])
def test_config_ranges_are_checked_before_any_heavy_import(args, culprit):
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "1 []", (r.stdout, r.stderr)  # refused, and nothing heavy was imported
    assert r.stderr == f"anymal {args[0]}: error: {culprit}\n"


def test_debug_shows_the_traceback():
    for extra, env in ((["--debug"], {}), ([], {"ANYMAL_DEBUG": "1"})):
        r = run("info", "--no-model", "--set", "train.steps=-5", *extra, env={**os.environ, **env})
        assert r.returncode == 1 and "Traceback" in r.stderr and "ConfigError: train.steps=-5" in r.stderr
    r = run("info", "--no-model", "--set", "train.steps=-5")
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_interruption_is_one_line_with_its_exit_code(monkeypatch, capsys):
    from anymal import cli
    class Stopped(KeyboardInterrupt):
        exit_code = 143
    def command(argv):
        raise Stopped("stopped by SIGTERM at step 7; resume with --resume")
    monkeypatch.setattr(cli, "_resolve", lambda name: command)
    assert cli.main(["info"]) == 143
    assert capsys.readouterr().err == "anymal info: stopped by SIGTERM at step 7; resume with --resume\n"
    monkeypatch.setattr(cli, "_resolve", lambda name: lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "anymal info: interrupted\n"


def test_rule_choices_are_what_the_modules_accept():
    from anymal.config import RULES
    from anymal.llm import _DTYPES
    from anymal.modes import MODES
    assert set(RULES["train.mode"].choices) == set(MODES)
    assert set(RULES["llm.dtype"].choices) == set(_DTYPES)


@pytest.mark.parametrize("args, message", [
    (["chat", "--checkpoint", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be 1 or more, got 0"),
    (["chat", "--checkpoint", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be 1 or more, got -1"),
    (["eval", "--checkpoint", "x", "--limit", "0"], "argument --limit: must be 1 or more, got 0"),
    (["eval", "--checkpoint", "x", "--batch-size", "0"], "argument --batch-size: must be 1 or more, got 0"),
    (["eval", "--checkpoint", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be 1 or more, got 0"),
])
def test_counts_of_zero_are_refused(args, message, capsys):
    from anymal.cli import main
    with pytest.raises(SystemExit) as e: main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_prints_no_bitsandbytes_message():
    "bitsandbytes' 'Failed to load CPU gemm_4bit_forward ...' is dropped: `import anymal` runs quiet_bitsandbytes."
    for args in (["--help"], ["train", "--help"], ["chat", "--help"], ["export", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage: anymal" in r.stdout, r.stderr
        assert r.stderr == "", r.stderr


# A split in the shapes world's layout, written by hand: two images, three questions; and a checkpoint folder with only
# its meta.json (evaluation must refuse bad files before it loads a model, so there need be none).

def _eval_split(tmp_path):
    from PIL import Image
    from anymal.config import tiny, to_dict
    root, ck = tmp_path / "data", tmp_path / "ckpt"
    (root / "vqa").mkdir(parents=True)
    (root / "images" / "test").mkdir(parents=True)
    for i in (1, 2): Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "images" / "test" / f"{i}.png")
    qs = [{"question_id": q, "image_id": i, "question": "what color is it?"} for q, i in ((1, 1), (2, 1), (3, 2))]
    anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what color is the",
             "answer_type": "other", "answers": [{"answer": "red"}] * 10} for q in qs]
    (root / "vqa" / "v2_OpenEnded_shapes_test_questions.json").write_text(json.dumps({"questions": qs}))
    ann_file = root / "vqa" / "v2_shapes_test_annotations.json"
    ann_file.write_text(json.dumps({"annotations": anns}))
    ck.mkdir()
    (ck / "meta.json").write_text(json.dumps({"config": to_dict(tiny()), "step": 0, "stage": 2}))
    return root, ck, ann_file, anns


def test_eval_checks_its_files_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from anymal.cli import main
    from anymal.infer import Assistant
    root, ck, ann_file, anns = _eval_split(tmp_path)
    loads = []
    def load(cls, *a, **kw):
        loads.append(a)
        raise RuntimeError("the model was loaded")
    monkeypatch.setattr(Assistant, "from_checkpoint", classmethod(load))
    args = ["eval", "--checkpoint", str(ck), "--data", str(root), "--control", "none", "shuffled"]
    with pytest.raises(RuntimeError, match="the model was loaded"): main(args)  # good files: on to the model
    assert len(loads) == 1
    capsys.readouterr()
    cases = [
        ({"answers": [{"ans": "red"}]},
         "annotation #1 (question_id 2) 'answers' must be a non-empty list of {\"answer\": string}, got [{'ans': 'red'}]"),
        ({"question_type": None}, "annotation #1 (question_id 2) 'question_type' must be a string, got None"),
        ({"question_id": 9}, "no annotation for question_id 2 (question #1 of"),
    ]
    for change, culprit in cases:
        bad = [dict(a, **change) if i == 1 else a for i, a in enumerate(anns)]
        ann_file.write_text(json.dumps({"annotations": bad}))
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"anymal eval: error: ") and culprit in err and err.count("\n") == 1, err
    (root / "images" / "test" / "2.png").unlink()
    ann_file.write_text(json.dumps({"annotations": anns}))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "question #2 (question_id 3): image 2 not found at" in err and str(root / "images/test/2.png") in err
    assert len(loads) == 1  # none of the bad splits got as far as the model


def test_eval_names_a_file_that_is_not_json(tmp_path):
    root, ck, ann_file, _ = _eval_split(tmp_path)
    ann_file.write_text('{"annotations": [')
    r = run("eval", "--checkpoint", ck, "--data", root)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"anymal eval: error: annotations file {ann_file} is not JSON: ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run("eval", "--checkpoint", ck, "--data", root, "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "DataError" in r.stderr
