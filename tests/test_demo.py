"""`anymal demo`, reduced by --set overrides: the whole pipeline runs from nothing and writes what it promises."""
import json, os, subprocess, sys, time
from pathlib import Path

# a small world, short pretraining and stages: minutes of the full demo become about a minute
REDUCED = ["data.world_images=400", "data.world_val_images=60", "standins.clip_steps=5", "standins.clip_batch=64",
           "standins.lm_steps=60", "standins.lm_batch=16", "standins.lm_block=160", "standins.lm_scenes=400", "train.batch_size=32",
           "train.eval_every=50", "train.eval_batches=2", "train.log_every=5", "train.save_every=40"]
STAGES = ["--stage1", "train.steps=40", "--stage2", "train.steps=120"]


def test_reduced_demo(tmp_path):
    env = dict(os.environ, ANYMAL_CACHE=str(tmp_path / "cache"))  # from nothing: no cached pretraining
    out = tmp_path / "demo"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "anymal.cli", "demo", "--out", str(out), "--no-progress", "--eval-limit", "300",
                        "--curve", "--curve-limit", "100", "--procs", "2", *[a for s in REDUCED for a in ("--set", s)], *STAGES],
                       capture_output=True, text=True, env=env, timeout=600)
    print(f"reduced demo: {time.time() - t0:.0f} s")  # wall time is reported, not asserted: timings belong in benchmarks
    assert r.returncode == 0, r.stderr[-3000:]
    assert "VQA (none)" not in r.stderr and "it/s]" not in r.stderr, r.stderr[-2000:]  # --no-progress: no bars at all
    lines = [json.loads(l) for l in r.stdout.strip().splitlines() if l.startswith("{")]
    line, curve = lines[0], [l["curve"] for l in lines[1:]]
    for k in ("vqa_accuracy", "vqa_accuracy_normalised", "blind_vqa_accuracy", "per_type", "heldout_vqa_accuracy",
              "seconds"): assert k in line, k
    assert set(line["per_type"]) == {"color", "shape", "count", "position", "exists"}
    res = json.loads((out / "results.json").read_text())
    assert res["vqa_accuracy"] == line["vqa_accuracy"] and res["n_questions"] == 300
    # both scorings of the same answers, and the instruction they followed
    metrics = json.loads((out / "eval" / "vqa_test_none_metrics.json").read_text())
    assert (res["vqa_accuracy"], res["vqa_accuracy_normalised"]) == (metrics["overall"], metrics["overall_normalised"])
    assert res["blind_vqa_accuracy_normalised"] is not None and res["vqa_instruction"] == metrics["instruction"]
    # --procs 2: each stage trained under torchrun as 2 processes, the global batch of 32 split 16 + 16
    assert res["found_in_cache"] == {"stage1": False, "stage2": False}, res["found_in_cache"]  # trained by this demo
    assert res["procs"] == 2 and json.loads((out / "stage1" / "launch_config.json").read_text())["train"]["batch_size"] == 16
    for f in ("loss_stage1.png", "loss_stage2.png", "vqa_accuracy.png", "stage1/metrics.jsonl", "stage2/metrics.jsonl",
              "stage2/final/trainable.safetensors", "eval/vqa_test_none.json", "eval/vqa_test_blank.json", "world/world.json"):
        assert (out / f).exists(), f
    rows = [json.loads(l) for l in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {r["split"] for r in rows}
    # the model uses the image: the same model shown a blank image does worse
    assert line["vqa_accuracy"] > line["blind_vqa_accuracy"], line
    # --curve: every stage-2 checkpoint evaluated, placed at the demo time it was written
    assert [c["step"] for c in curve] == [40, 80, 120], curve
    secs = [c["seconds"] for c in curve]
    assert secs == sorted(secs) and res["phase_seconds"]["stage1"] < secs[0] <= secs[-1] <= res["phase_seconds"]["stage2"] + 1, (secs, res["phase_seconds"])
    assert all(0 <= c["vqa_accuracy"] <= 100 for c in curve)
    assert len((out / "curve.jsonl").read_text().splitlines()) == 3 and (out / "accuracy_vs_time.png").stat().st_size > 5000
