"""Block-causal (semi-autoregressive) attention: bidirectional inside a block, causal across blocks.

Papers: "Next Block Prediction: Video Generation via Semi-Autoregressive Modeling" (2025) and
"Block Diffusion: Interpolating Between Autoregressive and Diffusion Language Models" (2025).  A query sees
its whole block and every earlier block.  With BLOCK a multiple of the tile size every tile is EMPTY or FULL.
"""

import flexcomp as fc

BLOCK = 128


def block_causal(block: int):
    @fc.mask_mod
    def block_causal(b, h, q_idx, kv_idx):
        return q_idx // block >= kv_idx // block

    block_causal.name = f"block_causal_{block}"
    return block_causal


semi_autoregressive = block_causal(BLOCK)

EXAMPLE = {"mask_mod": semi_autoregressive, "q_len": 2048, "heads": 2, "check_q_len": 128}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
