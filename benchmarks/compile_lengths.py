"""Graphs per sequence length under torch.compile(fullgraph=True) with a block mask (issue 20), on CUDA.

    python benchmarks/compile_lengths.py      # CUDA, inductor: 5 lengths, built inside / passed in, dynamic or not

Prints, for each case, the graphs Dynamo made and the largest difference from the eager call.  The document ids sit
in a buffer of fixed size: a mod specializes on the shapes of the tensors it captures (docs/models.md).
"""

from __future__ import annotations

import torch

import flexcomp as fc

HEAD_DIM = 16
LENGTHS = (24, 40, 56, 72, 88)
DOCS = torch.arange(128) // 10  # document ids, read by same_doc


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 20)


def same_doc(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx]


def graphs_for(mask, made: str, dynamic: bool | None, device: str) -> tuple[int, float]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def attend(q, k, v, block_mask=None):
        if block_mask is None:
            block_mask = fc.create_block_mask(mask, None, None, q.shape[2], k.shape[2], device=device, BLOCK_SIZE=16)
        return fc.flex_attention(q, k, v, block_mask=block_mask)

    compiled = torch.compile(attend, fullgraph=True, dynamic=dynamic)
    worst = 0.0
    for length in LENGTHS:
        q, k, v = (torch.randn(1, 2, length, HEAD_DIM, device=device) for _ in range(3))
        block_mask = fc.create_block_mask(mask, None, None, length, length, device=device, BLOCK_SIZE=16)
        eager = fc.flex_attention(q, k, v, block_mask=block_mask)
        out = compiled(q, k, v, *([block_mask] if made == "passed in" else []))
        worst = max(worst, (out - eager).abs().max().item())
    return torch._dynamo.utils.counters["stats"]["unique_graphs"], worst


def main() -> None:
    global DOCS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    DOCS = DOCS.to(device)
    print(f"{len(LENGTHS)} lengths on {device}: graphs, max |compiled - eager|")
    for mask, places in ((window, ("inside", "passed in")), (same_doc, ("passed in",))):
        for made in places:
            for dynamic in (True, None):
                graphs, worst = graphs_for(mask, made, dynamic, device)
                print(f"{mask.__name__:8s} {made:9s} dynamic={dynamic!s:5s}: {graphs} graphs, {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
