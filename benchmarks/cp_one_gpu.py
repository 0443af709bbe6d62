"""Context parallelism at real size on one GPU: correctness of every rank, then the overlap to expect on NVLink.

    python benchmarks/cp_one_gpu.py            # GPU: L=32768 bf16, B=1, H=8, D=128, W=2 and 4 ranks
    python benchmarks/cp_one_gpu.py --quick    # CPU, tiny shapes, W=2, the document mask (a test runs it)
    python benchmarks/cp_one_gpu.py --worlds 4 --masks causal,document --length 16384   # a part of it

1. Correctness: W processes, all on cuda:0, joined by gloo (which cannot send device tensors: flexcomp's transfers
   go through host memory there), run flexcomp.context_parallel.flex_attention under both schedules for a causal
   mask, a sliding window and a document mask.  Each rank's output and dQ/dK/dV shard are compared with one float32
   single-process run; the bound is the error of the same single-process call in bf16, times 2, plus a little.
2. Overlap: in one process, each (q chunk, kv chunk) pair's kernel is timed (forward; forward+backward) and
   attributed to the rank and ring step that computes it; the bytes each rank sends at that step are turned into
   time at NVLINK_GBPS.  Printed per step: comm time / compute time (below 1: the transfer hides behind the
   kernels).  The ring's backward recomputes each pair's forward, so its step compute is the forward+backward time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if "--quick" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_decode import timed

import flexcomp as fc
from flexcomp import context_parallel as cp

NVLINK_GBPS = 450  # H200, NVLink 4: ~450 GB/s per direction per GPU (900 GB/s both ways), assumed all usable
WINDOW = 0  # sliding window, tokens (set in _setup)
DOCS = None  # document ids [L] (set in _setup)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def document(b, h, q_idx, kv_idx):
    return (DOCS[q_idx] == DOCS[kv_idx]) & (q_idx >= kv_idx)


MASKS = (causal, sliding_window, document)


def _setup(args) -> None:
    """The masks' captured values, the same in every process: a window of L/8, documents of L/32 to L/4 tokens."""
    global WINDOW, DOCS
    L = args.length
    WINDOW = L // 8
    sizes = torch.randint(L // 32, L // 4, (64,), generator=torch.Generator().manual_seed(0))
    DOCS = torch.repeat_interleave(torch.arange(64), sizes)[:L].to(torch.int32).to(args.device)


def _inputs(args, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (1, args.heads, args.length, args.dim)
    q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))
    return [t.to(args.device, dtype) for t in (q, k, v)], dout.to(args.device, dtype)


def _grads(out, dout, leaves):
    return [out.detach(), *torch.autograd.grad((out.float() * dout.float()).sum(), leaves)]


# ---------------------------------------------------------------- 1. correctness


def _single(args, mask, dtype):
    """[out, dq, dk, dv] of one process, whole sequence."""
    (q, k, v), dout = _inputs(args, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    return _grads(fc.flex_attention(*leaves, mask_mod=mask, backend=args.backend), dout, leaves)


def _rank_errors(rank, world, path, args):
    """This rank's max |error| of out, dq, dk, dv against the float32 run, per mask and schedule."""
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=world)
    try:
        _setup(args)
        rows = []
        for mask in args.masks:
            want = [cp.shard(t.to(args.device)) for t in torch.load(f"{path}/{mask.__name__}.pt")["float32"]]
            (q, k, v), dout = _inputs(args, args.dtype)
            for schedule in cp.SCHEDULES:
                local = [cp.shard(t).requires_grad_() for t in (q, k, v)]
                out = cp.flex_attention(*local, mask_mod=mask, backend=args.backend, schedule=schedule)
                got = _grads(out, cp.shard(dout), local)
                rows.append((mask.__name__, schedule, [(g.float() - w).abs().max().item() for g, w in zip(got, want)]))
        torch.save(rows, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def correctness(args) -> bool:
    names = ("out", "dq", "dk", "dv")
    print(f"| W | mask | schedule | rank | {' | '.join(f'{n} err / bound' for n in names)} | ok |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    all_ok = True
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as path:
            bounds = {}
            for mask in args.masks:
                exact = _single(args, mask, torch.float32)
                low = _single(args, mask, args.dtype)
                bounds[mask.__name__] = [2 * (a.float() - b).abs().max().item() + 1e-3 for a, b in zip(low, exact)]
                torch.save({"float32": [t.cpu() for t in exact]}, f"{path}/{mask.__name__}.pt")
            mp.spawn(_rank_errors, args=(world, path, args), nprocs=world, join=True)
            for rank in range(world):
                for name, schedule, errors in torch.load(f"{path}/rank{rank}.pt"):
                    ok = all(e <= b for e, b in zip(errors, bounds[name]))
                    all_ok &= ok
                    cells = " | ".join(f"{e:.2e} / {b:.2e}" for e, b in zip(errors, bounds[name]))
                    print(f"| {world} | {name} | {schedule} | {rank} | {cells} | {'yes' if ok else 'NO'} |", flush=True)
    return all_ok


# ---------------------------------------------------------------- 2. overlap


def _seconds(fn, reps: int) -> float:
    """Seconds per call: bench_decode's `timed` (CUDA-event medians on a GPU)."""
    return timed(fn, "cuda" if torch.cuda.is_available() else "cpu", reps, 1) / 1e3


def _pair_seconds(args, the_plan, mask, qc, kc) -> tuple[float, float]:
    """(forward, forward+backward) seconds of one pair's kernels."""
    (q, k, v), _ = _inputs(args, args.dtype)
    n = the_plan.chunk_len
    q, k, v = (t[:, :, c * n : (c + 1) * n] for t, c in ((q, qc), (k, kc), (v, kc)))
    pairs = cp._Pairs(the_plan, 0, None, None, mask, cp._captured_values(mask), args.dim**-0.5, False, None,
                      args.backend)  # fmt: skip
    forward = _seconds(lambda: pairs.attend(q, qc, k, v, kc), args.reps)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def both():
        out, _ = pairs.attend(leaves[0], qc, leaves[1], leaves[2], kc)
        torch.autograd.grad(out.float().sum(), leaves)

    return forward, _seconds(both, args.reps)


def overlap(args) -> None:
    ms_per_byte = 1e3 / (NVLINK_GBPS * 1e9)
    print(f"\nOverlap, NVLink at {NVLINK_GBPS} GB/s per direction: per rank and ring step, the bytes it sends while it "
          "computes the step's pairs; comm/compute below 1 hides the transfer.  p2p: every transfer at once, against "
          "the rank's own chunks' pairs (its overlap window).\n")  # fmt: skip
    print(
        "| W | mask | rank | step | MiB fwd | fwd comm / compute ms | ratio | MiB bwd | bwd comm / compute ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for world in args.worlds:
        for mask in args.masks:
            the_plan = cp.plan(mask, args.length, world)
            chunk_bytes = 2 * args.heads * the_plan.chunk_len * args.dim * torch.finfo(args.dtype).bits // 8
            times = {p: _pair_seconds(args, the_plan, mask, *p) for p in sorted(the_plan.needed)}
            for rank in range(world):
                mine = cp.chunks_of(rank, world)
                for step in range(world):
                    pairs = [(qc, kc) for qc in mine for kc, _ in the_plan.ring_held(rank, step) if (qc, kc) in times]
                    kv, sums = the_plan.ring_sends(rank, step)
                    sent = kv * chunk_bytes, (kv + sums) * chunk_bytes
                    cells = [f"{world} | {mask.__name__} | {rank} | {step}"]
                    for j in range(2):  # forward, then backward (its compute: the pairs' forward+backward)
                        comm, compute = sent[j] * ms_per_byte, sum(times[p][j] for p in pairs) * 1e3
                        cells.append(f"{sent[j] / 2**20:.0f} | {comm:.3f} / {compute:.3f} | {_ratio(comm, compute)}")
                    print("| " + " | ".join(cells) + " |", flush=True)
                own = sum(times[(qc, kc)][0] for qc in mine for kc in mine if (qc, kc) in times) * 1e3
                received = sum(the_plan.owner(c) != rank for c in the_plan.kv_chunks_for(rank)) * chunk_bytes
                comm = received * ms_per_byte
                print(f"| {world} | {mask.__name__} | {rank} | p2p | {received / 2**20:.0f} | {comm:.3f} / {own:.3f} | "
                      f"{_ratio(comm, own)} | | | |", flush=True)  # fmt: skip


def _ratio(comm: float, compute: float) -> str:
    return f"{comm / compute:.2f}" if compute else ("-" if not comm else "exposed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes, 2 ranks")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worlds", default="2,4", help="numbers of ranks, comma-separated")
    parser.add_argument("--masks", default=",".join(m.__name__ for m in MASKS), help="comma-separated")
    parser.add_argument("--skip-check", action="store_true", help="only the overlap figure")
    args = parser.parse_args()
    args.heads, args.dim, args.dtype, args.backend, args.device = 8, 128, torch.bfloat16, "auto", "cuda"
    args.worlds = tuple(int(w) for w in args.worlds.split(","))
    args.masks = tuple(m for m in MASKS if m.__name__ in args.masks.split(","))
    if args.quick:
        args.length, args.heads, args.dim, args.reps, args.worlds, args.device = 64, 2, 16, 1, (2,), "cpu"
        args.masks = (document,)  # the mask with a captured tensor: every path, once
    _setup(args)
    ok = args.skip_check or correctness(args)
    overlap(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
