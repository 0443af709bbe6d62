#!/usr/bin/env bash
# Install what flexcomp needs on a fresh machine; run again, it only checks.
# torch: keep the one that imports (a GPU machine's CUDA build included); else CUDA torch from PyPI
# where nvidia-smi works; else torch 2.13.0, which pip takes from the local CPU wheel folder.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
trap 'echo "scripts/setup.sh: FAILED (line $LINENO): $BASH_COMMAND" >&2' ERR

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip_install torch
  else
    pip_install "torch==2.13.0"
  fi
fi

# flexcomp must be installed editable from THIS checkout (CI clones afresh elsewhere), with its extras (hf:
# transformers, for tests/test_transformers.py).
installed_here() {
  (cd / && REPO="$REPO" "$PY" - <<'PY'
import os, flexcomp, flexcomp.codegen, flexcomp.grammar
import lark, sympy, triton, pytest, hypothesis, xdist, matplotlib, transformers  # noqa: F401
repo = os.path.realpath(os.environ["REPO"])
for module, folder in ((flexcomp, "flexcomp"), (flexcomp.codegen, "codegen"), (flexcomp.grammar, "grammar")):
    assert os.path.realpath(module.__file__).startswith(os.path.join(repo, folder)), module.__file__
PY
  ) >/dev/null 2>&1
}
if ! installed_here; then
  pip_install -e "$REPO[test,viz,hf]"
  installed_here || { echo "scripts/setup.sh: flexcomp still does not import from $REPO" >&2; exit 1; }
fi
