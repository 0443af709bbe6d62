"""Causal sliding-window attention: each query sees the WINDOW most recent keys, itself included.

Paper: "Mistral 7B" (2023), after "Longformer: The Long-Document Transformer" (2020).  The window is a
factory parameter; the variant is the window composed with `causal`, not a rewrite of it.
"""

from causal import causal

import flexcomp as fc

WINDOW = 256


def sliding_window(window: int):
    @fc.mask_mod
    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    sliding_window.name = f"sliding_window_{window}"
    return sliding_window


sliding_window_causal = fc.and_masks(causal, sliding_window(WINDOW))

EXAMPLE = {"mask_mod": sliding_window_causal, "q_len": 2048, "heads": 2, "check_q_len": 128}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
