"""Stage recipes end to end: the stage-2 guard, a short stage 1 -> stage 2 chain that learns, and `anymal train`."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from anymal.config import tiny, override
from anymal.world import generate_world, iter_world_text
from anymal.tokenizer import train_tokenizer

# a small world and very short pretraining: the point is the plumbing and the direction of the loss
SMALL = ["data.world_images=240", "data.world_val_images=48", "standins.clip_steps=3", "standins.clip_batch=32",
         "standins.lm_steps=80", "standins.lm_batch=16", "standins.lm_block=160", "train.batch_size=16",
         "train.eval_every=10", "train.eval_batches=2", "train.log_every=2", "train.save_every=10"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A small shapes world + tokenizer, and a private pretraining cache for this module."
    root = tmp_path_factory.mktemp("world")
    cfg = override(tiny(), SMALL)
    generate_world(root, cfg)
    train_tokenizer(iter_world_text(root), cfg.llm.vocab_size, root / "tokenizer")
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ANYMAL_CACHE"); os.environ["ANYMAL_CACHE"] = str(cache)
    yield root
    if old is None: os.environ.pop("ANYMAL_CACHE", None)
    else: os.environ["ANYMAL_CACHE"] = old


def _sets(world, out, *extra):
    return [*SMALL, f"data.root={world}", f"train.out_dir={out}", *extra]


def train(cfg, **kw):
    "One stage as `anymal train` runs it: the stand-ins first (one visible step), then the stage."
    from anymal.stages import run_stage
    from anymal.standins import with_standins
    return run_stage(with_standins(cfg, progress=False), **kw)


def _train_losses(run) -> list[float]:
    rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_stage2_refuses_random_resampler(world, tmp_path):
    from anymal.stages import StageError, run_stage, stage_config
    cfg = stage_config(tiny(), 2, _sets(world, tmp_path / "s2", "train.init_from="))
    with pytest.raises(StageError, match="random resampler"): run_stage(cfg, progress=False)
    assert not (tmp_path / "s2").exists()  # refused before writing anything


def test_a_stage_never_trains_the_standins(world, tmp_path):
    "The stage builder only finds the stand-ins; missing ones are an error naming the command that builds them."
    from anymal.stages import run_stage, stage_config
    from anymal.standins import StandinsMissing
    cfg = stage_config(tiny(), 1, _sets(world, tmp_path / "s1", "standins.lm_steps=7"))  # a key nobody has built
    with pytest.raises(StandinsMissing, match="run `anymal standins`"): run_stage(cfg, progress=False)
    assert not (tmp_path / "s1").exists()


def test_stage1_then_stage2_learns(world, tmp_path):
    from anymal.stages import stage_config
    from anymal.checkpoint import read_meta
    s1 = train(stage_config(tiny(), 1, _sets(world, tmp_path / "s1", "train.steps=30", "train.lr=3e-3")), progress=False)
    l1 = _train_losses(tmp_path / "s1")
    # stage 1 trains only the resampler; most caption tokens are predictable from text alone, so the loss moves little
    assert sum(l1[-3:]) < sum(l1[:3]), l1
    s2 = train(stage_config(tiny(), 2, _sets(world, tmp_path / "s2", "train.steps=60", f"train.init_from={tmp_path / 's1'}")),
               progress=False)
    l2 = _train_losses(tmp_path / "s2")
    # LoRA + resampler: the loss drops >5% in 60 steps (first 5 logged steps against the last 5). The LLaMA pretrained
    # on document rows reads well from the start, so the first losses are already low (here: 9% drop in 60 steps)
    assert sum(l2[-5:]) < 0.95 * sum(l2[:5]), l2
    m1, m2 = read_meta(s1), read_meta(s2)
    assert (m1["stage"], m2["stage"]) == (1, 2)
    assert not any("lora_" in k for k in m1["arch"]["tensors"]) and any("lora_" in k for k in m2["arch"]["tensors"])
    # the stages ran on the cached tiny CLIP and LLaMA, not random ones
    assert m2["config"]["vision"]["pretrained"].endswith("clip.safetensors") and m2["config"]["llm"]["path"]


def test_stage2_starts_from_stage1(world, tmp_path):
    "Stage 2 at LR 0 for one step ends with exactly the resampler stage 1 wrote, whatever LoRA rank stage 2 chooses."
    import torch
    from safetensors.torch import load_file
    from anymal.stages import stage_config
    s1 = train(stage_config(tiny(), 1, _sets(world, tmp_path / "s1", "train.steps=3")), progress=False)
    s2 = train(stage_config(tiny(), 2, _sets(world, tmp_path / "s2", "train.steps=1", "train.lr=0", "train.lora_lr=0",
                                             "train.warmup=0", "lora.r=4", f"train.init_from={tmp_path / 's1'}")), progress=False)
    w1, w2 = load_file(str(s1 / "trainable.safetensors")), load_file(str(s2 / "trainable.safetensors"))
    assert w1 and set(w1) < set(w2)
    for k, v in w1.items(): assert torch.equal(w2[k], v), k


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "anymal.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_train_and_resume(world, tmp_path):
    env = dict(os.environ)
    out = tmp_path / "cli1"
    sets = [a for s in _sets(world, out, "train.steps=4") for a in ("--set", s)]
    r = _cli("train", "--preset", "tiny", "--stage", "1", "--no-progress", *sets, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["stage"] == 1 and Path(res["final"], "meta.json").exists()
    # --resume continues the same run to a larger step count
    sets = [a for s in _sets(world, out, "train.steps=6") for a in ("--set", s)]
    r = _cli("train", "--stage", "1", "--resume", "--no-progress", *sets, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if json.loads(l)["split"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 6
    # without --resume an existing run is not overwritten: one line naming the folder and what to do
    r = _cli("train", "--stage", "1", "--no-progress", *sets, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1].startswith(f"anymal train: error: {out} has checkpoints of an earlier run")
    assert "(--resume) to continue it" in r.stderr.splitlines()[-1]


def test_cli_stage2_guard(world, tmp_path):
    sets = [a for s in _sets(world, tmp_path / "x", "train.init_from=") for a in ("--set", s)]
    r = _cli("train", "--stage", "2", "--no-progress", *sets, env=dict(os.environ))
    assert r.returncode == 1 and "random resampler" in r.stderr and "allow_random_resampler" in r.stderr
    assert "Traceback" not in r.stderr  # a user mistake is one line, not a stack
    assert "stand-ins" not in r.stderr  # refused before anything was built or trained


def _error_line(r) -> str:
    "The one line a user error leaves on stderr (after any progress output), with no traceback."
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("anymal train: error: "))
    assert all(l.startswith("  ") for l in lines[i + 1:]), lines[i:]  # only its own indented details follow
    return "\n".join(lines[i:])


def test_cli_bad_record_and_checkpoint_mismatch_are_one_line(world, tmp_path):
    "A malformed LLaVA record (skip_bad=false) and a stage-1 checkpoint of another shape: one error each, no traceback."
    from anymal.stages import stage_config
    src = json.loads((world / "llava" / "llava_instruct_train.json").read_text())
    src[3]["conversations"][1]["from"] = "robot"
    (tmp_path / "bad_train.json").write_text(json.dumps(src))
    sets = [a for s in _sets(world, tmp_path / "bad", "train.steps=2", "train.allow_random_resampler=true",
                             f"data.instruct_json={tmp_path}/bad_{{split}}.json") for a in ("--set", s)]
    err = _error_line(_cli("train", "--stage", "2", "--no-progress", *sets, env=dict(os.environ)))
    assert err.startswith(f"anymal train: error: bad_train.json#3 (id={src[3].get('id')}): turn 1 is not"), err

    s1 = train(stage_config(tiny(), 1, _sets(world, tmp_path / "s1", "train.steps=2")), progress=False)
    sets = [a for s in _sets(world, tmp_path / "s2", "train.steps=2", f"train.init_from={s1}", "resampler.latents=8")
            for a in ("--set", s)]
    err = _error_line(_cli("train", "--stage", "2", "--no-progress", *sets, env=dict(os.environ)))
    assert err.startswith(f"anymal train: error: checkpoint {s1} does not fit this model:\n  "), err
    assert "resampler.latents" in err


TIMING = ("time", "tokens_per_s")  # the only fields of a metrics record that may differ between equal runs


def _records(run) -> list[dict]:
    "Every record of a run's metrics.jsonl, train and val, without its timing fields."
    from anymal.runlog import read_metrics
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]


def test_same_seed_same_run(world, tmp_path):
    """Same `train.seed`: the same metrics.jsonl, every train and val record, in stage 1 and in stage 2 (LoRA): the seed
    is set before the resampler and the adapters are built. Another seed: other losses."""
    from anymal.stages import stage_config
    sets = ["train.steps=4", "train.log_every=1", "train.eval_every=2"]
    def run(stage, name, seed, *extra):
        train(stage_config(tiny(), stage, _sets(world, tmp_path / name, *sets, f"train.seed={seed}", *extra)),
              progress=False)
        return _records(tmp_path / name)
    s1 = [run(1, f"s1-{i}", seed) for i, seed in enumerate((0, 0, 1))]  # seed 1: its own stand-ins too (their key)
    s2 = [run(2, f"s2-{i}", seed, f"train.init_from={tmp_path / f's1-{2 * seed}'}") for i, seed in enumerate((0, 0, 1))]
    for a, b, other in (s1, s2):
        assert [(r["step"], r["split"]) for r in a] == [(s, sp) for s in (1, 2, 3, 4) for sp in
                                                       (("train", "val") if s % 2 == 0 else ("train",))]
        assert a == b
        assert [r["loss"] for r in a] != [r["loss"] for r in other]
    assert set(s2[0][0]["lr_groups"]) == {"bridge", "lora"}


def _train_args(world, out, *extra):
    return ["train", "--preset", "tiny", "--stage", "1", "--no-progress",
            *[a for s in _sets(world, out, *extra) for a in ("--set", s)]]


def _last_step(out) -> int:
    from anymal.runlog import read_metrics
    rows = read_metrics(out, "train")
    return rows[-1]["step"] if rows else 0


def _stop_cli(world, out, extra, after: int, sig, group: bool, *flags):
    "Start `anymal train`, wait until it has logged a step past `after`, send `sig`; its (exit code, stderr, checkpoint)."
    import time
    from anymal.checkpoint import latest_checkpoint
    p = subprocess.Popen([sys.executable, "-m", "anymal.cli", *_train_args(world, out, *extra), *flags],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline and _last_step(out) <= after: time.sleep(0.05)
        if group: os.killpg(p.pid, sig)  # as a terminal's Ctrl-C: the process and its DataLoader workers
        else: p.send_signal(sig)  # as Kubernetes, Modal or `kill PID`: the process alone
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None: p.kill()
    return p.returncode, err, latest_checkpoint(out)


def test_signals_save_and_resume_matches_an_uninterrupted_run(world, tmp_path):
    """Ctrl-C (SIGINT to the process group, DataLoader workers included), then, resumed, SIGTERM to `anymal train`
    alone: each leaves a checkpoint of the step it stopped at, one line, exit code 130 or 143. Resumed after both, the
    run has logged what a run that was never stopped logs."""
    import signal
    from anymal.stages import stage_config
    extra = ["train.steps=40", "train.log_every=1", "train.save_every=100", "train.eval_every=10", "data.num_workers=2"]
    out, done = tmp_path / "stopped", 0
    for sig, group, flags in ((signal.SIGINT, True, []), (signal.SIGTERM, False, ["--resume"])):
        rc, err, ck = _stop_cli(world, out, extra, done + 1, sig, group, *flags)
        assert rc == 128 + sig, err[-3000:]
        step = int(ck.name.split("-")[1])
        assert done + 2 <= step < 40 and not (out / "final").exists(), (done, step)
        assert err.strip().splitlines()[-1] == (f"anymal train: stopped by {signal.Signals(sig).name} at step {step}; "
                                                f"checkpoint {ck}; continue with --resume"), err[-3000:]
        assert "Traceback" not in err
        assert _last_step(out) == step
        done = step
    r = _cli(*_train_args(world, out, *extra), "--resume", env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    train(stage_config(tiny(), 1, _sets(world, tmp_path / "whole", *extra)), progress=False)  # never stopped
    assert _records(out) == _records(tmp_path / "whole")


# ---------------------------------------------------------------- bad images and skipped records (issue 25)
def _reliability_table():
    "tools/reliability_table.py as a module (it is a script, not part of the package)."
    import importlib.util
    spec = importlib.util.spec_from_file_location("reliability_table", Path(__file__).parent.parent / "tools/reliability_table.py")
    rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
    return rt


def _bad_world(world, tmp_path, edit) -> Path:
    "A copy of the world whose stage-1 training shard has its samples changed by `edit(i, {ext: bytes}) -> {ext: bytes}`."
    import shutil
    root = tmp_path / "w"
    shutil.copytree(world, root)
    _reliability_table()._edit_shard(root, edit)
    return root


def _png16(png: bytes) -> bytes:
    "The same picture as a 16-bit grayscale PNG (and the 8-bit grayscale one it scales)."
    import io
    import numpy as np
    from PIL import Image
    g = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    out = io.BytesIO(); Image.fromarray(g.astype(np.uint16) * 257).save(out, "PNG")
    return out.getvalue()


def test_encode_images_decodes_like_the_datasets(world):
    "The feature cache decodes through `load_image`: 16-bit PNGs as their 8-bit copy, bad images named or listed."
    import io, torch
    from PIL import Image
    from anymal.stages import encode_images
    from anymal.tokenizer import BadRecord
    from anymal.vision import clip_preprocess

    class Pixels(torch.nn.Module):  # an "encoder" that returns its input: the features are the pixels
        def __init__(self): super().__init__(); self.one = torch.nn.Parameter(torch.ones(()))
        def forward(self, px): return px * self.one

    png = (world / "images/train/100000.png").read_bytes()
    gray = io.BytesIO(); Image.open(io.BytesIO(png)).convert("L").save(gray, "PNG")
    jpg = io.BytesIO(); Image.open(io.BytesIO(png)).save(jpg, "JPEG")
    src = {"deep": ("deep.png", lambda: _png16(png)), "gray": ("gray.png", lambda: gray.getvalue()),
           "cut.jpg": ("s.tar/cut", lambda: jpg.getvalue()[:400]), "junk": ("s.tar/junk", lambda: b"not an image")}
    tf = clip_preprocess(override(tiny(), SMALL).vision)
    keys, feats, bad = encode_images(Pixels(), src, tf, batch_size=3, skip_bad=True)
    assert keys == ["deep", "gray"] and torch.allclose(feats[0], feats[1], atol=1e-6)  # not a white image
    assert {k: v[0] for k, v in bad.items()} == {"cut.jpg": "corrupt image", "junk": "corrupt image"}
    assert bad["cut.jpg"][1].startswith("s.tar/cut: cannot decode image: OSError: ")  # "Truncated File Read"
    assert "s.tar/junk: cannot decode image: UnidentifiedImageError" in bad["junk"][1]
    with pytest.raises(BadRecord, match="s.tar/cut: cannot decode image: OSError"): encode_images(Pixels(), src, tf)


def test_stage1_feature_cache_with_bad_images(world, tmp_path, capsys):
    "Corrupt shard images with cached features: a one-line error naming them, or left out, counted and reported."
    from anymal.stages import stage_config
    from anymal.data import TooManySkipped
    from anymal.tokenizer import BadRecord
    from anymal.runlog import read_metrics
    edits = {3: lambda png: png[:len(png) // 2], 7: lambda png: b"garbage", 11: _png16}  # truncated, garbage, 16 bits
    root = _bad_world(world, tmp_path, lambda i, m: dict(m, png=edits[i](m["png"])) if i in edits else m)
    sets = lambda out, *x: [*_sets(world, out, "train.steps=2", "data.num_workers=2", *x), f"data.root={root}"]
    strict = stage_config(tiny(), 1, sets(tmp_path / "strict"))
    assert strict.train.cache_features and not strict.data.skip_bad
    with pytest.raises(BadRecord, match=r"^train-00000.tar/000000003: cannot decode image: OSError: image file is "
                                        r"truncated"):
        train(strict, progress=False)
    assert not (tmp_path / "strict").exists()
    train(stage_config(tiny(), 1, sets(tmp_path / "skip", "data.skip_bad=true")), progress=False)
    err = capsys.readouterr().err
    assert "skipped up front: train 2 of 240 records (0.8%): corrupt image 2; first: train-00000.tar/000000003" in err
    end = read_metrics(tmp_path / "skip", "skipped")[-1]
    assert (end["at"], end["train"], end["train_records"], end["train_kinds"]) == ("end", 2, 240, {"corrupt image": 2})
    # the cache entry now lists the bad images: a strict run that finds it names the first record that uses one
    with pytest.raises(BadRecord, match=r"^train-00000.tar/000000003: cannot decode image"):
        train(stage_config(tiny(), 1, sets(tmp_path / "strict2")), progress=False)
    with pytest.raises(TooManySkipped, match=r"train data: skipped 2 of 240 records \(0.8%\): corrupt image 2; first"):
        train(stage_config(tiny(), 1, sets(tmp_path / "few", "data.skip_bad=true", "data.max_skipped=0.005")),
              progress=False)


def test_stage2_feature_cache_with_bad_image(world, tmp_path):
    "Stage 2: a truncated image file, shared by several LLaVA records, takes them all out (or names the file)."
    from anymal.stages import build_stage, stage_config
    from anymal.standins import with_standins
    from anymal.tokenizer import BadRecord
    import json, shutil
    root = tmp_path / "w"
    shutil.copytree(world, root)
    recs = json.loads((root / "llava/llava_instruct_train.json").read_text())
    img = root / "images" / recs[0]["image"]
    img.write_bytes(img.read_bytes()[:150])
    users = [i for i, r in enumerate(recs) if r.get("image") == recs[0]["image"]]
    sets = [*_sets(world, tmp_path / "s2", "train.allow_random_resampler=true", "train.init_from="), f"data.root={root}"]
    with pytest.raises(BadRecord, match=f"^{img}: cannot decode image: OSError"):
        build_stage(with_standins(stage_config(tiny(), 2, sets), progress=False), progress=False)
    ds = build_stage(with_standins(stage_config(tiny(), 2, [*sets, "data.skip_bad=true"]), progress=False),
                     progress=False)[3]
    assert len(ds) == len(recs) - len(users) and [k for k, _ in ds.upfront] == ["corrupt image"] * len(users)
    assert ds.upfront[0][1].startswith(f"llava_instruct_train.json#0 (id={recs[0]['id']}): {img}: cannot decode")


def test_skips_met_in_workers_are_reported(world, tmp_path, capsys):
    "Captions found bad inside 2 DataLoader workers are counted once each, printed at the epoch's end and logged."
    from anymal.stages import stage_config
    from anymal.runlog import read_metrics
    bad = {5, 50, 51, 120, 200, 239}
    root = _bad_world(world, tmp_path, lambda i, m: dict(m, txt=b" ") if i in bad else m)  # empty captions
    cfg = stage_config(tiny(), 1, [*_sets(world, tmp_path / "run", "train.steps=6", "train.batch_size=48",
                                          "data.num_workers=2", "data.skip_bad=true", "train.cache_features=false"),
                                   f"data.root={root}"])
    train(cfg, progress=False)  # 5 batches of 48 an epoch: the whole epoch read, each bad record met at least once
    err = capsys.readouterr().err
    assert "skipped records, epoch 1: train 6 of 240 records (2.5%): malformed 6; first: train-00000.tar/000000" in err
    recs = read_metrics(tmp_path / "run", "skipped")
    assert [(r["at"], r["epoch"], r["train"], r["train_kinds"]) for r in recs] == [
        ("epoch", 1, 6, {"malformed": 6}), ("end", 1.2, 6, {"malformed": 6})]
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [2, 4, 6]  # the loss curve is untouched


def test_reliability_table_script(tmp_path):
    "tools/reliability_table.py (docs/reliability.md) runs, and reads its cells right: one case, its 8 cells."
    rt = _reliability_table()
    old = os.environ.get("ANYMAL_CACHE"); os.environ["ANYMAL_CACHE"] = str(tmp_path / "cache")
    try: rows, _ = rt.table(tmp_path, only=["truncated PNG"], log=lambda s: None)
    finally:
        if old is None: os.environ.pop("ANYMAL_CACHE", None)
        else: os.environ["ANYMAL_CACHE"] = old
    assert len(rows) == 8 and all(r["expected"] for r in rows), rows
    assert all("train-00000.tar/000000003: cannot decode image: OSError" in r["outcome"] for r in rows if not r["skip_bad"])
    assert {r["outcome"] for r in rows if r["skip_bad"]} == {"trains, skipped 1 of 32 train records (corrupt image 1)"}
    assert not rt.expected("trains, nothing skipped", "one record bad", True)  # a bad input that went unnoticed
    assert "| truncated PNG | 1 | true | false | 0 | trains, skipped 1 of 32" in rt.markdown(rows, 1.0)
