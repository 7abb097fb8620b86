#!/usr/bin/env bash
# Issue 9's benchmark on one GPU, in one command (about 8 minutes): the standard QLoRA recipe beside
# train.mode=small and train.mode=fast, stages 2 and 1, batch 4/8/16 x 1024 tokens, then each lever alone.
# Random weights of the real shapes (LLaMA-3-8B in NF4, CLIP ViT-L/14), no download.
#
#   1. Where pip reaches PyPI, in the repo root:   bash tools/fetch_gpu_wheels.sh     (fills .whl/, ~58 MiB, git-ignored)
#   2. On the GPU machine, in the repo root:       bash tools/gpu_bench.sh [OUT_DIR]
#      (with this workplace's device tool: command "bash tools/gpu_bench.sh $OUT", carry [".whl"], kind nvidia-h100-x1)
#
# Writes OUT_DIR/bench.jsonl (one JSON line per row, flushed as each finishes), OUT_DIR/table.md, OUT_DIR/stderr.log
# and OUT_DIR/gpu.txt; prints the table last. Rows that would start after BENCH_BUDGET seconds are skipped, and the
# whole benchmark is stopped at BENCH_TIMEOUT seconds; the rows done so far are kept either way.
# A dry run of this script on a CPU: BENCH_PRESET=tiny BENCH_BATCHES=4 PYTHON=.venv/bin/python bash tools/gpu_bench.sh /tmp/b
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench-out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"

# What the GPU image lacks (see tools/fetch_gpu_wheels.sh), installed only where bitsandbytes is missing (a CPU dry
# run in the project's own environment keeps its packages).
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, transformers, peft, bitsandbytes, open_clip, fastcore; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)" 2>&1 | tee -a "$OUT_DIR/gpu.txt"

# --gpu-mem-gib 79: the fast mode's goal is for one 80 GB card; on a bigger card the process is held to 79 GiB.
# BENCH_MODES, BENCH_BATCHES and BENCH_EXTRA (default "--levers --profile") narrow a rerun to the rows it needs.
timeout "${BENCH_TIMEOUT:-540}" "$PY" -m anymal.bench --preset "${BENCH_PRESET:-full}" --stage 2,1 --mode "${BENCH_MODES:-small,fast}" \
  --batches "${BENCH_BATCHES:-4,8,16}" \
  --steps 5 --warmup 2 ${BENCH_EXTRA---levers --profile} --gpu-mem-gib 79 --budget-s "${BENCH_BUDGET:-400}" \
  --out "$OUT_DIR/bench.jsonl" --table "$OUT_DIR/table.md" 2>"$OUT_DIR/stderr.log" >/dev/null
rc=$?
[ $rc -eq 0 ] || { echo "benchmark exited with $rc; last lines of stderr:"; tail -20 "$OUT_DIR/stderr.log"; }

# The table again from the JSON lines, so a run cut short still shows what it measured.
"$PY" - "$OUT_DIR/bench.jsonl" <<'EOF' | tee "$OUT_DIR/table.md"
import json, sys
from anymal.bench import table
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()] if __import__("os").path.exists(sys.argv[1]) else []
env = next((r for r in recs if r["kind"] == "env"), None)
print(f"command: bash tools/gpu_bench.sh  ({' '.join(env['argv']) if env else '?'})\n")
print(table([r for r in recs if r["kind"] == "row"], env))
EOF
exit $rc
