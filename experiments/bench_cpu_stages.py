"""Seconds per step of the tiny stages on this CPU: SDPA against eager attention, threads against processes.

    python experiments/bench_cpu_stages.py [STEPS]      # default 100 steps a run

Prints one JSON line per (stage, attention, threads, processes): `s_per_step` is measured from the trainer's own
`metrics.jsonl` clock between its first and last logged steps, so start-up (imports, model, the torchrun launch,
encoding the images once) is not in it; `startup_s` is the rest of the run's wall time. The configs are the demo's
(`anymal.demo.DEMO_RECIPES`, the stage recipes, global batches of 32) on a small world with briefly pretrained tiny
CLIP and LLaMA in a temporary folder (speed does not depend on training). `procs=2` is `anymal.demo.train_procs`: two
one-thread processes under torchrun (DDP over gloo), batches of 16 each. Takes about 5 minutes on 2 cores.
"""
import json, os, shutil, sys, tempfile, time
from pathlib import Path

root = Path(tempfile.mkdtemp())
os.environ["ANYMAL_CACHE"] = str(root / "cache")  # before anymal is imported: nothing of the user's cache is touched
import torch
from anymal.config import tiny, override
from anymal.demo import DEMO_RECIPES, make_world, train_procs
from anymal.pretrain import with_pretrained
from anymal.stages import stage_config

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
cfg = make_world(override(tiny(), [*DEMO_RECIPES["tiny"][0], "data.world_images=400", "data.world_val_images=50",
                                   "pretrain.clip_steps=5", "pretrain.lm_steps=10", "pretrain.lm_scenes=0"]), root / "world")
cfg = with_pretrained(cfg, progress=False)

def per_step(out: Path) -> float:
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    return (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])

init = None
for stage in (1, 2):
    for attn in ("sdpa", "eager"):
        for threads, procs in ((1, 1), (2, 1), (1, 2)):
            out = root / f"stage{stage}-{attn}-{threads}x{procs}"
            c = stage_config(cfg, stage, [f"llm.attn={attn}", f"train.out_dir={out}", f"train.steps={steps}", "train.log_every=10",
                                          "train.eval_every=1000000", "train.save_every=1000000",
                                          *([f"train.init_from={init}"] if stage == 2 else [])])
            torch.set_num_threads(threads)
            t0 = time.time(); train_procs(c, procs, threads=threads, progress=False); wall = time.time() - t0
            s = per_step(out)
            print(json.dumps(dict(stage=stage, attn=attn, threads=threads, procs=procs, global_batch=c.train.batch_size,
                                  s_per_step=round(s, 4), startup_s=round(wall - s * steps, 1))), flush=True)
            init = init or out
shutil.rmtree(root)
