"""Where stage 1's wall time goes in the demo: the parent's build (features), torchrun start, steps, the rest.
usage: python stage1_time.py OUT PROCS [STEPS] [extra sets...]"""
import json, os, sys, time
from pathlib import Path
import torch
from anymal.config import tiny, override, stage_config
from anymal.world import ensure_world
from anymal.standins import with_standins
from anymal.stages import build_stage
from anymal.demo import train_procs
out, procs = Path(sys.argv[1]), int(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
extra = sys.argv[4:]
t0 = time.time()
cfg = ensure_world(override(tiny(), ["train.seed=0", "data.world_seed=0"]), out / "world")
cfg = with_standins(cfg, progress=False)
t1 = time.time()
bs = 32 // procs
c = stage_config(cfg, 1, [f"train.out_dir={out / 'stage1'}", f"train.steps={steps}", *extra])
build_stage(override(c, [f"train.batch_size={bs}"]), False)
t2 = time.time()
train_procs(c, procs, progress=False)
t3 = time.time()
rows = [json.loads(l) for l in open(out / "stage1" / "metrics.jsonl")]
tr = [r for r in rows if r["split"] == "train"]
print(json.dumps(dict(procs=procs, steps=steps, extra=extra, setup_s=round(t1 - t0, 1), parent_build_s=round(t2 - t1, 1),
                      train_procs_s=round(t3 - t2, 1), step_time_sum_s=tr[-1]["time"], last_loss=tr[-1]["loss"],
                      load=os.getloadavg())), flush=True)
