"""Prefix-LM attention: bidirectional over a per-sequence prefix, causal after it.

Paper: "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (2020, T5).
The prefix length differs per batch element, so it is a captured tensor PREFIX_LEN[b]; the mask is
`causal` or-ed with "the key is in the prefix".
"""

import torch
from causal import causal

import flexcomp as fc

PREFIX_LEN = torch.tensor([40, 300], dtype=torch.int32)  # one prefix length per batch element


@fc.mask_mod
def in_prefix(b, h, q_idx, kv_idx):
    return kv_idx < PREFIX_LEN[b]


prefix_lm = fc.or_masks(causal, in_prefix)

EXAMPLE = {"mask_mod": prefix_lm, "q_len": 1024, "batch": 2, "heads": 2}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
