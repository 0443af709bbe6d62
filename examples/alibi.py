"""ALiBi: a per-head linear penalty on query-key distance instead of position embeddings.

Paper: "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation" (2022).
Head h of HEADS gets slope 2^(-8 (h + 1) / HEADS), computed in the mod with exp2 (no table); the bias
(kv_idx - q_idx) * slope is used with the causal mask.
"""

import torch
from causal import causal

import flexcomp as fc

HEADS = 8


def alibi(heads: int):
    @fc.score_mod
    def alibi(score, b, h, q_idx, kv_idx):
        slope = torch.exp2(-8.0 * (h + 1) / heads)
        return score + (kv_idx - q_idx) * slope

    alibi.name = f"alibi_{heads}_heads"
    return alibi


alibi_bias = alibi(HEADS)

EXAMPLE = {"score_mod": alibi_bias, "mask_mod": causal, "q_len": 1024, "heads": HEADS, "check_q_len": 64}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
