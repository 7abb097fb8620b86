#!/usr/bin/env bash
# The whole test suite: notebooks clean, anymal/ in sync with nbs/, every notebook executed, pytest.
# Run through `make test` (which installs first). Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export MPLBACKEND=Agg PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}
t0=$SECONDS
step() { printf '\n== %s (%ss)\n' "$1" "$((SECONDS - t0))"; }

step "free disk space"
# A full disk fails a run halfway with errors about something else (a PNG that cannot be written): say so up front.
# The suite needs about 1 GB (tiny worlds, caches, pytest's temporary folders); CI's clone needs ~6 GB more for .venv.
for d in . "${TMPDIR:-/tmp}"; do
  free_kb=$(df -Pk "$d" | awk 'NR==2 {print $4}')
  echo "$d: $((free_kb / 1024)) MiB free"
  if [ "$free_kb" -lt $((2 * 1024 * 1024)) ]; then
    echo "FAIL: less than 2 GiB free under $d: free some space (old clones, runs/, ~/.cache/anymal) and run again"; exit 1
  fi
done

step "notebooks are clean (nbdev-clean changes nothing)"
snap() { git diff --no-ext-diff -- nbs lessons | sha256sum; git ls-files -o --exclude-standard -- nbs lessons | xargs -r sha256sum; }
before=$(snap)
"$BIN/nbdev-clean" >/dev/null
"$BIN/nbdev-clean" --fname lessons >/dev/null
if [ "$before" != "$(snap)" ]; then
  echo "FAIL: nbdev-clean changed notebooks; run 'make clean-nbs' and commit"; git status --short -- nbs lessons; exit 1
fi

step "anymal/ is exactly what nbs/ exports (new or stale modules included)"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp -r nbs pyproject.toml README.md "$tmp"/; mkdir "$tmp/anymal"; cp anymal/__init__.py "$tmp/anymal/"
(cd "$tmp" && "$OLDPWD/$BIN/nbdev-export" >/dev/null)
if ! diff -r -x __pycache__ "$tmp/anymal" anymal; then
  echo "FAIL: anymal/ differs from what nbdev-export writes; run 'make export' and commit (never hand-edit anymal/)"; exit 1
fi

step "library notebooks (nbdev-test nbs)"
# 2 notebooks at a time on 2 cores: one thread each, or they thrash (a tiny matmul goes from 0.01 ms to 20 ms)
OMP_NUM_THREADS=1 "$BIN/nbdev-test" nbs --timing
step "lessons, in order (nbdev-test, executed copies with their plots saved under runs/lessons/)"
if compgen -G "lessons/[!_]*.ipynb" >/dev/null; then
  # run copies, not the sources: --save writes each executed notebook (outputs and figures) back to its copy.
  # One at a time, in reading order, with every core: each lesson builds the course's model where the one before
  # left it (the cache), and trains its part with the threads and processes `anymal demo` would use.
  rm -rf runs/lessons && mkdir -p runs/lessons && cp lessons/[!_]*.ipynb runs/lessons/
  "$BIN/nbdev-test" runs/lessons --timing --save --n-workers 0
else echo "no lessons yet"; fi

step "pytest"
"$BIN/pytest" -q tests   # exit 5 (no tests collected) fails too

if [ "${CI:-}" = "true" ] && [ -n "$(git status --porcelain)" ]; then
  echo "FAIL: the test run left the work tree dirty:"; git status --short; exit 1
fi
step "all green"
