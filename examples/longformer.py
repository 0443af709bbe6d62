"""Longformer global + local attention: a symmetric local window, plus global tokens that see and are seen by all.

Paper: "Longformer: The Long-Document Transformer" (2020).  The first N_GLOBAL tokens (a [CLS] token, the
question in QA) are global; every other token attends within +-RADIUS.  Two masks or-ed together.
"""

import flexcomp as fc

RADIUS = 128
N_GLOBAL = 16


def local_window(radius: int):
    @fc.mask_mod
    def local_window(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= radius

    local_window.name = f"local_window_{radius}"
    return local_window


def global_tokens(n_global: int):
    @fc.mask_mod
    def global_tokens(b, h, q_idx, kv_idx):
        return (q_idx < n_global) | (kv_idx < n_global)

    global_tokens.name = f"global_tokens_{n_global}"
    return global_tokens


longformer = fc.or_masks(local_window(RADIUS), global_tokens(N_GLOBAL))

EXAMPLE = {"mask_mod": longformer, "q_len": 4096, "heads": 2, "check_q_len": 128}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
