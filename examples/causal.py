"""Causal attention: a query sees itself and the keys before it (decoder self-attention).

Paper: "Attention Is All You Need" (2017).  Tiles above the diagonal are EMPTY, below it FULL, and only
the diagonal tiles are PARTIAL: the kernel's loop bound for a q-tile is its last q index.
"""

import flexcomp as fc


@fc.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


EXAMPLE = {"mask_mod": causal, "q_len": 1024, "heads": 2}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
