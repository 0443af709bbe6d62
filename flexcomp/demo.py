"""A tour: compile five attention variants, show their IR and kernels, check the kernels against the reference.

    python -m flexcomp.demo            # CUDA when there is a GPU, else Triton's interpreter on CPU
    python -m flexcomp.demo --source   # print each generated kernel in full

Exits non-zero when a kernel disagrees with the reference (or fails to build).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def variants(heads: int, length: int, device):
    """(name, score_mod, mask_mod) for causal, sliding window, ALiBi, softcap and a document mask."""
    import torch

    import flexcomp as fc

    @fc.mask_mod
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    window = 32

    @fc.mask_mod
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    slopes = torch.exp2(-8.0 * torch.arange(1, heads + 1, dtype=torch.float32, device=device) / heads)

    @fc.score_mod
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    cap = 20.0

    @fc.score_mod
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    doc_ids = torch.repeat_interleave(torch.arange(4, device=device), length // 4)

    @fc.mask_mod
    def document(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    return [
        ("causal", None, causal),
        ("sliding window", None, sliding_window),
        ("alibi + causal", alibi, causal),
        ("tanh softcap", softcap, None),
        ("document", None, document),
    ]


def check(variant, q, k, v):
    """(max |out error|, max |lse error|, seconds) of the Triton kernel against the reference."""
    import torch

    start = time.perf_counter()
    out, lse = variant(q, k, v, return_lse=True, backend="triton")
    seconds = time.perf_counter() - start
    want, want_lse = variant(q, k, v, return_lse=True, backend="reference")
    finite = ~want_lse.isinf()
    same_inf = torch.equal(lse.isinf(), want_lse.isinf())
    lse_err = (lse[finite] - want_lse[finite]).abs().max().item() if same_inf else float("inf")
    return (out.float() - want.float()).abs().max().item(), lse_err, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", action="store_true", help="print each generated kernel in full")
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # kernels on the CPU run under Triton's interpreter, which must be on when Triton is imported; `python -m
        # flexcomp.demo` has imported it with the package, so the demo runs again in a process that has it on
        again = [sys.executable, "-m", "flexcomp.demo", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(again, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False).returncode
    import flexcomp as fc

    device = torch.device("cuda" if cuda else "cpu")
    B, H, L, D = 1, 2, args.length, 32
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device) for _ in range(3))
    rows, failed = [], False
    for name, score, mask in variants(H, L, device):
        variant = fc.compile(score_mod=score, mask_mod=mask)
        print(f"=== {name}: {variant!r}\n{variant.ir}\n")
        try:
            source = variant.source
            lines = source.splitlines()
            shown = lines if args.source else lines[:12] + [f"... ({len(lines)} lines; --source prints them all)"]
            print("\n".join(shown) + "\n")
            out_err, lse_err, seconds = check(variant, q, k, v)
        except Exception as e:  # noqa: BLE001 (the table reports every failure, then the exit code does)
            rows.append((name, "error", "-", "-", str(e).splitlines()[0]))
            failed = True
            continue
        ok = out_err < 2e-2 and lse_err < 2e-2
        failed |= not ok
        rows.append((name, f"{out_err:.1e}", f"{lse_err:.1e}", f"{seconds:.2f}s", "ok" if ok else "MISMATCH"))
    where = "CUDA" if cuda else "CPU, Triton interpreter"
    print(f"Triton kernel vs reference, B={B} H={H} L={L} D={D} float32 ({where}):")
    print(f"{'variant':<16} {'max|dout|':>10} {'max|dlse|':>10} {'time':>8}  status")
    for name, out_err, lse_err, seconds, status in rows:
        print(f"{name:<16} {out_err:>10} {lse_err:>10} {seconds:>8}  {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
