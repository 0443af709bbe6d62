"""MoBA block selection: each query block attends to the key blocks a gate picked for it, causally.

Paper: "MoBA: Mixture of Block Attention for Long-Context LLMs" (2025).  The gate (top-k of query vs.
mean-pooled key block affinity, plus the query's own block) is computed outside the kernel, here from
random affinities, into a captured bool tensor GATE[h, q_block, kv_block]; the mask reads it and is
and-ed with `causal`.  A tile's class follows the gate, so unselected blocks are never visited.
"""

import torch
from causal import causal

import flexcomp as fc

HEADS = 2
SEQ_LEN = 1024
BLOCK = 64
TOP_K = 3


def moba_gate(heads: int, n_blocks: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """[heads, n_blocks, n_blocks] bool: the own block plus the top_k best earlier blocks per query block."""
    affinity = torch.rand(heads, n_blocks, n_blocks, generator=torch.Generator().manual_seed(seed))
    earlier = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril(-1)
    affinity = affinity.masked_fill(~earlier, -1.0)
    top = affinity.topk(min(top_k, n_blocks), dim=-1).indices
    gate = torch.zeros_like(earlier).expand(heads, -1, -1).clone()
    gate.scatter_(-1, top, True)
    return (gate & earlier) | torch.eye(n_blocks, dtype=torch.bool)


GATE = moba_gate(HEADS, SEQ_LEN // BLOCK, TOP_K)


def example(device="cpu") -> dict:
    """The mask with GATE on `device`: captured tensors live where q, k, v live (moved once)."""
    gate = GATE.to(device)

    @fc.mask_mod
    def gate_selected(b, h, q_idx, kv_idx):
        return gate[h, q_idx // BLOCK, kv_idx // BLOCK]

    moba = fc.and_masks(causal, gate_selected)
    return {"mask_mod": moba, "q_len": SEQ_LEN, "heads": HEADS, "block_size": 64, "check_q_len": 256}


EXAMPLE = example()  # on the CPU
moba = EXAMPLE["mask_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
