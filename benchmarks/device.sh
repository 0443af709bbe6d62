#!/usr/bin/env bash
# Run on the GPU machine (the device tool), from the repository root, with .whl carried:
#   bash benchmarks/device.sh [bench_attention.py arguments...]
# Installs lark (carried as a wheel: that machine has no network) and flexcomp, then
# runs the GPU correctness checks and the benchmark, leaving logs and JSON in $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site
cd /tmp  # import the installed package, not the source folders
OUT=${OUT:-/tmp/out}
REPO=$OLDPWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -f "$REPO/benchmarks/gpu_check.py" ]; then
  python3 "$REPO/benchmarks/gpu_check.py" 2>&1 | tee "$OUT/gpu_check.log"
fi
python3 "$REPO/benchmarks/bench_attention.py" --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
