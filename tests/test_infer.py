"""Inference end to end on a briefly trained tiny checkpoint: batched = one-by-one answers, `anymal chat` one-shot and
interactive through a real subprocess, `anymal eval` writing the official results and metrics files with a control,
and one-line errors for bad images."""
import io, json, os, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from PIL import Image

from anymal.config import override
from anymal.data import Collator, build_dataset
from anymal.metrics import vqa_prompt
from anymal.cli import main
from anymal.infer import Assistant, Chat, chat_main, make_answer_fn
from anymal.model import AnyMAL
from anymal.trainer import fit
from parts import tiny_parts

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def run_cli(*args, stdin: str = "", timeout: int = 120, target: str = "anymal.cli:main") -> subprocess.CompletedProcess:
    "A command's main function (default: the `anymal` console entry point) in a fresh process."
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    mod, fn = target.split(":")
    code = f"import sys; from {mod} import {fn}; sys.exit({fn}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stage-2 checkpoint that can be reloaded: world + tokenizer, a random LLM and CLIP saved to files (as the tiny
    pretraining would), then bridge + LoRA trained for a few dozen steps with the real trainer."""
    n = torch.get_num_threads(); torch.set_num_threads(1)
    t0, root = time.time(), tmp_path_factory.mktemp("infer")
    cfg, tok = tiny_parts(root, ["data.world_images=64", "data.world_val_images=8"])
    cfg = override(cfg, [f"train.out_dir={root / 'run'}", "train.stage=2",
                         f"train.steps={STEPS}", "train.batch_size=8", "train.warmup=2", "train.eval_every=0",
                         "train.save_every=0", "train.log_every=10", "train.lr=3e-3", "train.lora_lr=3e-3"])
    model = AnyMAL.build(cfg, tok, stage=2)
    final = fit(cfg, model, build_dataset(cfg, tok, 2, "train"), collate_fn=Collator(tok.pad_token_id), progress=False)
    asst = Assistant.from_checkpoint(root / "run", device="cpu")  # a run folder resolves to its final/
    w = root / "world"
    qs = json.loads((w / "vqa" / "v2_OpenEnded_shapes_test_questions.json").read_text())["questions"]
    print(f"fixture: {time.time() - t0:.1f} s")
    yield dict(root=root, run=root / "run", final=final, cfg=cfg, asst=asst, world=w, questions=qs,
               image=lambda q: w / "images" / "test" / f"{q['image_id']}.png")
    torch.set_num_threads(n)


def test_checkpoint_loads_from_run_or_checkpoint_folder(trained):
    a = trained["asst"]
    assert trained["final"] == trained["run"] / "final" and a.meta["step"] == STEPS and a.meta["stage"] == 2
    b = Assistant.from_checkpoint(trained["final"], device="cpu")
    assert all(torch.equal(v, b.model.trainable_state_dict()[k]) for k, v in a.model.trainable_state_dict().items())


def test_batched_left_padded_equals_one_by_one(trained):
    a, qs, img = trained["asst"], trained["questions"], trained["image"]
    vp = trained["cfg"].data.vqa_prompt
    images = [[img(q)] for q in qs[:7]] + [[], [img(qs[0]), img(qs[-1])]]  # different lengths; none; two images
    prompts = [vqa_prompt(q["question"], vp) for q in qs[:7]] + ["Describe the image.", "Which image has more shapes?"]
    batched = a.answer_batch(images, prompts, batch_size=4, max_new_tokens=12)
    single = [a.ask(ims, p, max_new_tokens=12) for ims, p in zip(images, prompts)]
    assert batched == single
    assert len({len(a.encode([dict(role="user", content="<image>\n" * len(i) + p)], i, 12)["input_ids"])
                for i, p in zip(images, prompts)}) > 2  # the batch really was padded
    # trained for a few dozen steps, the model already answers VQA prompts with short world words ending in <|eot_id|>
    assert all(0 < len(x.split()) <= 3 for x in batched[:7]), batched
    # and the evaluator adapter is the same path
    assert make_answer_fn(a, batch_size=3, max_new_tokens=12)(images[:7], prompts[:7]) == batched[:7]


def test_multi_turn_chat_keeps_history_and_images(trained):
    a, qs, img = trained["asst"], trained["questions"], trained["image"]
    chat = Chat(a, [img(qs[0])], max_new_tokens=8)
    r1 = chat.send(qs[0]["question"])
    assert r1 == a.ask([img(qs[0])], qs[0]["question"], max_new_tokens=8)
    chat.attach(img(qs[-1]))
    r2 = chat.send(qs[-1]["question"])
    msgs = [dict(role="user", content="<image>\n" + qs[0]["question"]), dict(role="assistant", content=r1),
            dict(role="user", content="<image>\n" + qs[-1]["question"])]
    assert r2 == a.generate([msgs], [[img(qs[0]), img(qs[-1])]], max_new_tokens=8)[0]
    chat.reset()
    assert chat.messages == [] and chat.send(qs[0]["question"]) == r1


def test_chat_one_shot_subprocess(trained):
    q = trained["questions"][0]
    r = run_cli("chat", "--checkpoint", trained["run"], "--image", trained["image"](q), "--prompt", q["question"],
                "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == trained["asst"].ask([trained["image"](q)], q["question"], max_new_tokens=16)
    assert r.stdout.strip() and f"step {STEPS}" in r.stderr
    # --short: the question as VQA asks it, with the short-answer instruction the model was trained with
    r = run_cli("chat", "--checkpoint", trained["run"], "--image", trained["image"](q), "--prompt", q["question"], "--short",
                "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr[-2000:]
    vqa = f"{q['question']}\n{trained['asst'].cfg.data.vqa_prompt}"
    assert r.stdout.strip() == trained["asst"].ask([trained["image"](q)], vqa, max_new_tokens=16)


def test_chat_interactive_stdin(trained):
    qs, img = trained["questions"], trained["image"]
    first = trained["asst"].ask([img(qs[0])], "what color is the circle?", max_new_tokens=16)
    assert first
    script = "what color is the circle?\n/image missing.png\n/bogus\nsay <image> twice\n/reset\nwhat color is the circle?\n/quit\nnever asked\n"
    r = run_cli("chat", "--checkpoint", trained["run"], "--image", img(qs[0]), "--max-new-tokens", "16", stdin=script)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.count(">>> ") == 7  # one prompt per line read, up to /quit
    assert "error: image file 'missing.png' not found" in out and "unknown command /bogus" in out
    assert "error: the prompt contains '<image>'" in out
    assert "(conversation cleared)" in out and "Traceback" not in r.stderr
    lines = [l for l in out.replace(">>> ", "\n").splitlines() if l.strip()]
    answers = [l for l in lines if not l.startswith(("commands:", "error:", "unknown", "("))]
    assert answers == [first, first]  # the same question after /reset gets the same greedy answer


def test_chat_end_of_input_exits_cleanly(trained, monkeypatch, capsys):
    img = trained["image"](trained["questions"][0])
    first = trained["asst"].ask([img], "what color is the circle?", max_new_tokens=16)
    monkeypatch.setattr(sys, "stdin", io.StringIO("what color is the circle?\n"))  # no /quit: input just ends
    assert chat_main(["--checkpoint", str(trained["run"]), "--image", str(img), "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and f">>> {first}\n>>> \n" in out


def test_eval_cli_writes_official_results_and_metrics(trained, tmp_path):
    qs, cfg, a = trained["questions"], trained["cfg"], trained["asst"]
    out = tmp_path / "ev" / "summary.json"
    r = run_cli("--checkpoint", trained["run"], "--control", "none", "blank", "--limit", "12", "--out", out,
                "--batch-size", "5", timeout=180, target="anymal.evaluate:eval_main")
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout
    summary = json.loads(text[:text.index("\n}\n") + 2])  # stdout: the JSON summary, then the table
    assert "| **overall** | 12 |" in text and "| none | blank |" in text
    assert sorted(summary["vqa"]) == ["blank", "none"] and summary["step"] == STEPS and summary["layout"] == "shapes world"
    assert json.loads(out.read_text()) == {k: v for k, v in summary.items() if k != "summary_file"}
    for c in ("none", "blank"):
        results = json.loads((tmp_path / "ev" / f"summary_vqa_{c}.json").read_text())  # the official results format
        assert [x["question_id"] for x in results] == [q["question_id"] for q in qs[:12]]
        assert all(set(x) == {"question_id", "answer"} and isinstance(x["answer"], str) for x in results)
        m = json.loads((tmp_path / "ev" / f"summary_vqa_{c}_metrics.json").read_text())
        assert m["control"] == c and m["counts"]["overall"] == 12 and m["overall"] == summary["vqa"][c]["overall"]
        assert set(m["perQuestionType"]) <= {"color", "shape", "count", "position", "exists"}
    # the answers are the assistant's: with the real image, and with a grey one for the blank control
    q = qs[3]; p = vqa_prompt(q["question"], cfg.data.vqa_prompt)
    im = Image.open(trained["image"](q)).convert("RGB")
    got = {c: json.loads((tmp_path / "ev" / f"summary_vqa_{c}.json").read_text())[3]["answer"] for c in ("none", "blank")}
    assert got["none"] == a.ask([im], p, max_new_tokens=16)
    assert got["blank"] == a.ask([Image.new("RGB", im.size, (128, 128, 128))], p, max_new_tokens=16)


def test_bad_image_is_one_clear_line(trained, tmp_path, capsys):
    r = run_cli("chat", "--checkpoint", trained["run"], "--image", "missing.png", "--prompt", "hi")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == "anymal chat: error: image file 'missing.png' not found"
    assert "Traceback" not in r.stderr
    bad = tmp_path / "broken.png"; bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["chat", "--checkpoint", str(trained["run"]), "--image", str(bad), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"anymal chat: error: '{bad}' is not a readable image")
    assert main(["chat", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 1
    assert "anymal chat: error: no checkpoint at" in capsys.readouterr().err
