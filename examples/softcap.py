"""Tanh logit soft-capping: scores squashed smoothly into (-CAP, CAP).

Paper: "Gemma 2: Improving Open Language Models at a Practical Size" (2024), which caps attention logits
at 50.  A pure score_mod: it changes values, not sparsity (used here with the causal mask).
"""

import torch
from causal import causal

import flexcomp as fc

CAP = 50.0


def tanh_softcap(cap: float):
    @fc.score_mod
    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    tanh_softcap.name = f"tanh_softcap_{cap:g}"
    return tanh_softcap


softcap = tanh_softcap(CAP)

EXAMPLE = {"score_mod": softcap, "mask_mod": causal, "q_len": 1024, "heads": 2}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
