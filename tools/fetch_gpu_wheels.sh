#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that tools/gpu_bench.sh installs on a GPU machine whose image has
# Python 3.12, torch, transformers 5.17, peft, accelerate, einops, timm, tokenizers 0.23, but no bitsandbytes,
# open_clip or fastcore, and whose regex may be older than transformers 5.24 asks (it checks at import). Pinned to the versions in pyproject.toml (transformers and peft too, so the GPU runs the code
# the CPU tests run). About 59 MiB; the device tool carries at most 64 MiB with the working tree (~1.5 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl \
  bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
  fastcore==2.2.41 liger-kernel==0.8.5 regex==2026.11.19
ls -la .whl
du -ch .whl/*.whl | tail -1
