"""Tree attention for speculative decoding: each candidate token sees the context and its own ancestors.

Paper: "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads" (2024).  The
candidate continuations form a tree (TREE_PATHS, Medusa's "choices"); verifying them takes one forward
pass whose queries are the tree nodes and whose keys are the PREFIX cached tokens followed by the tree.
ANCESTOR[i, j] says tree node j is node i or one of its ancestors.
"""

import torch

import flexcomp as fc

PREFIX = 200  # tokens already in the KV cache
# a path of top-k choices per Medusa head: (0, 1) is the 2nd candidate of head 2 after the 1st of head 1
TREE_PATHS = [(0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0),
              (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0)]  # fmt: skip


def ancestor_table(paths: list[tuple[int, ...]]) -> torch.Tensor:
    """[n, n] bool: ANCESTOR[i, j] when path j is a prefix of path i (a node is its own ancestor)."""
    return torch.tensor([[paths[i][: len(paths[j])] == paths[j] for j in range(len(paths))] for i in range(len(paths))])


ANCESTOR = ancestor_table(TREE_PATHS)
TREE_SIZE = len(TREE_PATHS)


def example(device="cpu") -> dict:
    """The mask with ANCESTOR on `device`: captured tensors live where q, k, v live (moved once)."""
    ancestor = ANCESTOR.to(device)

    @fc.mask_mod
    def tree_attention(b, h, q_idx, kv_idx):
        if kv_idx < PREFIX:
            return True
        return ancestor[q_idx, kv_idx - PREFIX]

    return {
        "mask_mod": tree_attention, "q_len": TREE_SIZE, "kv_len": PREFIX + TREE_SIZE, "heads": 1, "block_size": 16,
        "check_q_len": TREE_SIZE, "check_kv_len": PREFIX + TREE_SIZE,
    }


EXAMPLE = example()  # on the CPU
tree_attention = EXAMPLE["mask_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
