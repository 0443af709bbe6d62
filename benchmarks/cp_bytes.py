"""K/V bytes context parallelism sends, against an all-gather, from the sparsity analysis alone (no GPU, no ranks).

    python benchmarks/cp_bytes.py            # 128k tokens on 4 ranks: causal, sliding window, document mask

For each (q chunk, kv chunk) pair of the load-balanced sharding (rank r holds chunks r and 2W-1-r) the analysis of
the mask, shifted by the pair's offsets, says whether anything is unmasked (flexcomp.context_parallel.plan); a rank
receives only the K/V chunks of the pairs it needs.  Bytes: bf16 K and V, 8 kv heads of 128, for each schedule:
p2p sends each needed chunk straight to its users (and its backward returns their dK/dV); the ring passes each chunk
one rank a step, as far as its last user (its backward passes K/V again, dK/dV accumulating on the way).
"""

from __future__ import annotations

import argparse
import time

import torch

from flexcomp import context_parallel as cp

WINDOW = 4096
DOCS = None  # document ids [L], set in main


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def document(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx]


def main() -> None:
    global DOCS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args()
    L, W = args.length, args.ranks
    # documents of 1k-16k tokens, as a packed pretraining batch
    sizes = torch.randint(1024, 16384, (L // 1024,), generator=torch.Generator().manual_seed(0))
    DOCS = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:L].to(torch.int32)
    chunk_bytes = 2 * 8 * (L // (2 * W)) * 128 * 2  # K and V of one chunk
    gib = lambda n: f"{n / 2**30:.2f}"
    print(f"L={L}, {W} ranks, load balanced ({2 * W} chunks of {L // (2 * W)}), bf16 K/V with 8 kv heads of 128")
    print("K/V (and dK/dV) GiB sent by all ranks together, forward / forward+backward; remote K/V chunks a rank holds")
    print("at once (GiB)\n")
    print(
        "| mask | pairs computed | all-gather fwd | p2p fwd | p2p fwd+bwd | ring fwd | ring fwd+bwd | p2p holds |"
        " ring holds | analysis |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mask in (causal, sliding_window, document):
        began = time.perf_counter()
        plan = cp.plan(mask, L, W, load_balance=True)
        seconds = time.perf_counter() - began
        every = plan.bytes_sent(chunk_bytes)[1]
        cells = [gib(every)]
        for schedule in cp.SCHEDULES:
            forward, backward = plan.traffic(schedule, chunk_bytes)
            cells += [gib(forward), gib(forward + backward)]
        cells += [gib(plan.remote_chunks_held(schedule) * chunk_bytes) for schedule in cp.SCHEDULES]
        print(
            f"| {mask.__name__} | {len(plan.needed)} of {plan.n_chunks**2} | {' | '.join(cells)} | {seconds:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
