#!/usr/bin/env bash
# A/B of source trees on the GPU machine (the device tool), in one call, from the repository root, .whl carried:
#   git archive fma | (mkdir -p scratch/fma && tar -x -C scratch/fma)      # here: a branch as a tree
#   bash benchmarks/device_ab.sh . scratch/fma -- benchmarks/alibi_slope_grad.py --json '{tag}.json'
# Each TREE is installed into a folder of its own; the command then runs once per tree, in the order given, from
# /tmp (so the installed package is imported, not source folders), with '{tag}' in its arguments replaced by the
# tree's tag (main for ".", else the folder's name) and its output in $OUT/<tag>.log.  The script path in the
# command is taken from each tree, so a tree's own benchmark runs against its own package.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
REPO=$PWD
trees=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do trees+=("$1"); shift; done
[ $# -gt 1 ] || { echo "usage: device_ab.sh TREE... -- SCRIPT [ARGS...]" >&2; exit 2; }
shift
script=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-lark .whl/*.whl
tag_of() { if [ "$1" = "." ]; then echo main; else basename "$1"; fi; }
for tree in "${trees[@]}"; do
  tag=$(tag_of "$tree")
  (cd "$REPO/$tree" && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
     --upgrade --target "/tmp/site-$tag" . >/dev/null)
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
for tree in "${trees[@]}"; do
  tag=$(tag_of "$tree")
  args=("${@//\{tag\}/$tag}")
  echo "== $tag: $script ${args[*]}"
  (cd /tmp && PYTHONPATH="/tmp/site-$tag:/tmp/site-lark" python3 "$REPO/$tree/$script" "${args[@]}") 2>&1 \
    | tee "$OUT/$tag.log"
done
