#!/usr/bin/env bash
# The GPU sweep of docs/tiny-recipe.md ("A GPU sweep"), in one command (about 8.5 minutes on one H200): eight demo
# recipes side by side (LLaMA pretraining on the GPU through experiments/gpu_sweep_run.py, stages on the GPU, evaluation on
# the CPU; they share the card, so their times are not speeds) and three text-lookup probes.
#   1. Where pip reaches PyPI, in the repo root:   bash tools/fetch_gpu_wheels.sh   (fills .whl/, git-ignored)
#   2. On the GPU machine, in the repo root:       bash experiments/gpu_sweep.sh OUT_DIR  (device tool: carry [".whl"])
# Writes OUT_DIR/summary.txt (each run's result lines) and OUT_DIR/runs.tgz (logs, results, metrics); runs still going
# at SWEEP_DEADLINE seconds (default 510) are stopped. A dry run on a CPU: SWEEP_DRY=1 SWEEP_PSTEPS=60 PYTHON=.venv/bin/python bash experiments/gpu_sweep.sh /tmp/sw-out
set -u
cd "$(dirname "$0")/.."
OUTD=${1:-${OUT:-/tmp/sweep-out}}; mkdir -p "$OUTD"
W=${SWEEP_DIR:-/tmp/sw}; rm -rf "$W"; mkdir -p "$W/logs" "$W/runs"
PY=${PYTHON:-python3}
START=$(date +%s); DEADLINE=${SWEEP_DEADLINE:-510}
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import open_clip" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore ANYMAL_CACHE=$W/cache OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUTD/gpu.txt"
nproc --all | tee -a "$OUTD/gpu.txt"
"$PY" -c "import torch, transformers, peft, open_clip; print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$OUTD/gpu.txt"

DRY=()
[ -n "${SWEEP_DRY:-}" ] && DRY=(--set data.world_images=200 --set data.world_val_images=50 --set pretrain.lm_steps=20
  --set pretrain.clip_steps=0 --stage1 train.steps=20 --stage2 train.steps=20 --eval-limit 50)
# the demo's recipe as it was then (before anymal.demo.DEMO_RECIPES), under every run
OLD=(--set vision.patch_size=8 --set pretrain.clip_batch=256 --set pretrain.clip_lr=1e-3 --set pretrain.lm_steps=300 --set pretrain.lm_lr=3e-3)
X17=(--set vision.patch_size=4 --set pretrain.clip_steps=0)
LM=(--set pretrain.lm_steps=3000)
S2=(--stage2 train.steps=5000)
declare -A RUNS
RUNS[D1_x17]="${X17[*]}"
RUNS[D2_preset]=""
RUNS[D3_lm3k]="${X17[*]} ${LM[*]}"
RUNS[D4_lm3k_s2x5]="${X17[*]} ${LM[*]} ${S2[*]}"
RUNS[D5_4layers]="${X17[*]} ${LM[*]} ${S2[*]} --set llm.layers=4"
RUNS[D6_64latents]="${X17[*]} ${LM[*]} ${S2[*]} --set resampler.latents=64"
RUNS[D7_linear8]="--set pretrain.clip_steps=0 --set resampler.kind=linear --set data.max_len=240 ${LM[*]} ${S2[*]}"
RUNS[D10_preset_lm3k_s2x5]="${LM[*]} ${S2[*]}"
RUNS[D8_s1x10k]="${X17[*]} ${LM[*]} ${S2[*]} --stage1 train.steps=10000"

run_demo() {  # NAME ARGS...
  local n=$1; shift
  "$PY" experiments/gpu_sweep_run.py "$W/runs/$n" --no-heldout --eval-limit 1500 --threads 1 "${OLD[@]}" "$@" "${DRY[@]}" >"$W/logs/$n.log" 2>&1
  local rc=$?
  echo "[sweep] $n rc=$rc at $(( $(date +%s) - START )) s" | tee -a "$W/logs/$n.log"
  [ -f "$W/runs/$n/eval/vqa_test_none.json" ] && "$PY" experiments/diagnose/vqa_by_count.py "$W/runs/$n" >>"$W/logs/$n.log" 2>&1
}

# Smoke: the CUDA path end to end on a small world, before the sweep spends the lease.
echo "[sweep] smoke" ; run_demo D0_smoke ${X17[*]} --set data.world_images=200 --set data.world_val_images=50 \
  --set pretrain.lm_steps=20 --stage1 train.steps=20 --stage2 train.steps=20 --eval-limit 50
tail -3 "$W/logs/D0_smoke.log"
grep -q '"vqa_accuracy"' "$W/logs/D0_smoke.log" || { echo "[sweep] smoke failed"; tail -40 "$W/logs/D0_smoke.log"; SMOKE_FAIL=1; }
"$PY" -c "from anymal.demo import make_world; from anymal.config import tiny; make_world(tiny(), '$W/world')" >"$W/logs/world.log" 2>&1

pids=()
if [ -z "${SMOKE_FAIL:-}" ]; then
  for n in "${!RUNS[@]}"; do run_demo "$n" ${RUNS[$n]} & pids+=($!); done
fi
PSTEPS=${SWEEP_PSTEPS:-3000}
for spec in "T1_2L:" "T2_4L:llm.layers=4" "T3_w256:llm.hidden=256 llm.heads=8 llm.kv_heads=4 llm.intermediate=768"; do
  n=${spec%%:*}; o=${spec#*:}
  ( "$PY" experiments/diagnose/lm_text_lookup.py "$W/world" "$PSTEPS" 3e-3 $o >"$W/logs/$n.log" 2>&1; echo "[sweep] $n rc=$? at $(( $(date +%s) - START )) s" >>"$W/logs/$n.log" ) & pids+=($!)
done
while [ $(( $(date +%s) - START )) -lt "$DEADLINE" ]; do
  alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 5
done
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && { pkill -P "$p"; kill "$p"; }; done
sleep 2
echo "[sweep] collected at $(( $(date +%s) - START )) s"
for f in "$W"/logs/*.log; do echo "== $f"; grep -E '^\{"vqa_accuracy|^\{"type|^\{"step|\[sweep\]|all shapes|by attribute|Error|error' "$f" | cut -c1-600 | tail -14; done | tee "$OUTD/summary.txt"
tar czf "$OUTD/runs.tgz" -C "$W" logs $(cd "$W" && ls -d runs/*/results.json runs/*/stage*/metrics.jsonl runs/*/eval 2>/dev/null) 2>/dev/null
ls -la "$OUTD"
