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


def test_same_seed_same_run(world, tmp_path):
    "Two stage-1 runs with the same `train.seed` log the same losses: the seed is set before the resampler is built."
    from anymal.stages import stage_config
    for i in (0, 1): train(stage_config(tiny(), 1, _sets(world, tmp_path / f"r{i}", "train.steps=3", "train.log_every=1")),
                          progress=False)
    assert _train_losses(tmp_path / "r0") == _train_losses(tmp_path / "r1")


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
