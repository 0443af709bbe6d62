"""Every example of the gallery on one device, each against its dense float64 check (issue 24).

    python benchmarks/gpu_examples.py                 # on CUDA; exits 1 on any failure
    python benchmarks/gpu_examples.py --device cpu    # the same on the CPU

An example with captured tensors is built by its `example(device)`, so its tensors live where q, k, v live;
one without has a plain `EXAMPLE` dict.  benchmarks/gpu_check.py runs this too, so an example that only works
on the CPU cannot come back unnoticed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
SPEC_KEYS = ("score_mod", "mask_mod", "batch", "heads", "head_dim")


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_"))


def load(name: str):
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))  # examples import one another and _run
    return importlib.import_module(name)


def build_example(name: str, device: str) -> dict:
    """The example's spec with its captured tensors on `device`."""
    module = load(name)
    builder = getattr(module, "example", None)
    return builder(device) if builder is not None else module.EXAMPLE


def check_example(name: str, device: str, backend: str = "auto") -> float:
    """Max abs error of `name` on `device` against the dense float64 oracle of examples/_run.py; raises on mismatch."""
    spec = build_example(name, device)  # also puts examples/ on sys.path
    from _run import check_against_dense

    q_len = spec.get("check_q_len") or min(spec["q_len"], 128)
    kv_len = spec.get("check_kv_len") or min(spec.get("kv_len") or spec["q_len"], 128)
    kwargs = {key: spec[key] for key in SPEC_KEYS if key in spec}
    return check_against_dense(**kwargs, q_len=q_len, kv_len=kv_len, backend=backend, device=device)


def run_all(device: str = "cuda", names: list[str] | None = None) -> int:
    """Check every example on `device`; prints one line each and returns the number of failures."""
    failures = 0
    for name in names or example_names():
        try:
            detail = f"max abs error {check_example(name, device):.2e}"
            ok = True
        except Exception as exc:  # noqa: BLE001 -- a crash is a failed check, reported with the rest
            ok, detail = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} example {name:24s} {device:6s} {detail}", flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("names", nargs="*", help="examples to check (default: all)")
    args = parser.parse_args()
    return 1 if run_all(args.device, args.names) else 0


if __name__ == "__main__":
    sys.exit(main())
