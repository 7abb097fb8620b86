#!/usr/bin/env bash
# The GPU benchmark in one command. Random weights of the real shapes (LLaMA-3-8B in NF4, CLIP ViT-L/14), no download.
#
#   BENCH_LENGTHS=fixed (the default; issue 9, about 8 minutes): the standard QLoRA recipe beside train.mode=small and
#     train.mode=fast, stages 2 and 1, batch 4/8/16 x 1024 tokens, then each lever alone.
#   BENCH_LENGTHS=real (issue 24, about 7 minutes): the real data's sample lengths (measured from `anymal prepare`'s
#     output under data.root when it is there, else the documented stand-in), each recipe padded and then packed:
#     the standard recipe, in stage 1 also without its fp32 upcast, small and fast, and fast packed with
#     llm.attn=varlen; 3 timed runs per row and a check of loss and gradients after 3 optimizer steps against the
#     standard row; then the cost table from these rows (OUT_DIR/cost.md).
#
#   1. Where pip reaches PyPI, in the repo root:   bash tools/fetch_gpu_wheels.sh     (fills .whl/, ~58 MiB, git-ignored)
#   2. On the GPU machine, in the repo root:       [BENCH_LENGTHS=real] bash tools/gpu_bench.sh [OUT_DIR]
#      (with this workplace's device tool: command "ANYMAL_GIT_COMMIT=<commit> BENCH_LENGTHS=real bash
#      tools/gpu_bench.sh $OUT", carry [".whl"], kind nvidia-h100-x1; the device machine gets the working tree without
#      .git, so ANYMAL_GIT_COMMIT names the commit for the JSON lines)
#
# Writes OUT_DIR/bench.jsonl (one JSON line per row, flushed as each finishes), OUT_DIR/table.md, OUT_DIR/stderr.log
# and OUT_DIR/gpu.txt (and OUT_DIR/cost.md); prints the table last. Rows that would start after BENCH_BUDGET seconds
# are skipped, and the whole benchmark is stopped at BENCH_TIMEOUT seconds; the rows done so far are kept either way.
# A dry run of this script on a CPU: BENCH_PRESET=tiny BENCH_BATCHES=4 PYTHON=.venv/bin/python bash tools/gpu_bench.sh /tmp/b
#   (real lengths: BENCH_PRESET=tiny BENCH_LENGTHS=real BENCH_STEPS=1 PYTHON=.venv/bin/python bash tools/gpu_bench.sh /tmp/b)
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
# BENCH_MODES, BENCH_BATCHES and BENCH_EXTRA (default "--levers --profile" for fixed lengths) narrow a rerun to the
# rows it needs; BENCH_STEPS (timed steps per run), BENCH_REPEATS (runs per row) and BENCH_ATTN (real lengths: the
# attention implementations of extra packed fast rows; "varlen" by default, where it can run) shape a real-length run.
if [ "${BENCH_LENGTHS:-fixed}" = real ]; then
  LEN_ARGS=(--lengths real --repeats "${BENCH_REPEATS:-3}" --steps "${BENCH_STEPS:-4}" --check-steps "${BENCH_CHECK:-3}")
  [ -n "${BENCH_BATCHES:-}" ] && LEN_ARGS+=(--batches "$BENCH_BATCHES")
  [ -n "${BENCH_ATTN:-}" ] && LEN_ARGS+=(--attn "$BENCH_ATTN")
  BUDGET=${BENCH_BUDGET:-440}
else
  LEN_ARGS=(--batches "${BENCH_BATCHES:-4,8,16}" --steps "${BENCH_STEPS:-5}" --repeats "${BENCH_REPEATS:-1}"
            --check-steps "${BENCH_CHECK:-0}" ${BENCH_EXTRA---levers --profile})
  BUDGET=${BENCH_BUDGET:-400}
fi
timeout "${BENCH_TIMEOUT:-540}" "$PY" -m anymal.bench --preset "${BENCH_PRESET:-full}" --stage 2,1 --mode "${BENCH_MODES:-small,fast}" \
  --warmup 2 "${LEN_ARGS[@]}" --gpu-mem-gib 79 --budget-s "$BUDGET" \
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
# What a full run costs, from these rows when they are real-length rows on a GPU (else the fixed-length ones, said so).
"$PY" -c "import sys; from anymal.cloud import cost_from_bench; print(cost_from_bench(sys.argv[1]))" "$OUT_DIR/bench.jsonl" \
  2>>"$OUT_DIR/stderr.log" | tee "$OUT_DIR/cost.md"
exit $rc
