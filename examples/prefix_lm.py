"""Prefix-LM attention: bidirectional over a per-sequence prefix, causal after it.

Paper: "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (2020, T5).
The prefix length differs per batch element, so it is a captured tensor PREFIX_LEN[b]; the mask is
`causal` or-ed with "the key is in the prefix".
"""

import torch
from causal import causal

import flexcomp as fc

PREFIX_LEN = torch.tensor([40, 300], dtype=torch.int32)  # one prefix length per batch element


def example(device="cpu") -> dict:
    """The mask with PREFIX_LEN on `device`: captured tensors live where q, k, v live (moved once)."""
    prefix_len = PREFIX_LEN.to(device)

    @fc.mask_mod
    def in_prefix(b, h, q_idx, kv_idx):
        return kv_idx < prefix_len[b]

    return {"mask_mod": fc.or_masks(causal, in_prefix), "q_len": 1024, "batch": 2, "heads": 2}


EXAMPLE = example()  # on the CPU
prefix_lm = EXAMPLE["mask_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
