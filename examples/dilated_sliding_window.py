"""Dilated causal sliding window: every DILATION-th key among the last WINDOW * DILATION positions.

Paper: "Longformer: The Long-Document Transformer" (2020), whose dilated windows widen the receptive field
at no extra cost.  Built from the factory's two parts, composed with `causal`.
"""

from causal import causal

import flexcomp as fc

WINDOW = 64  # keys seen per query
DILATION = 4


def dilated_window(window: int, dilation: int):
    @fc.mask_mod
    def dilated_window(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance % dilation == 0) & (distance < window * dilation)

    dilated_window.name = f"dilated_window_{window}x{dilation}"
    return dilated_window


dilated_causal = fc.and_masks(causal, dilated_window(WINDOW, DILATION))

EXAMPLE = {"mask_mod": dilated_causal, "q_len": 2048, "heads": 2, "check_q_len": 128}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
