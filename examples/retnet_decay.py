"""Retention-style decay: a per-head gamma^(q - kv) weight on the causal part, as a softmax score bias.

Paper: "Retentive Network: A Successor to Transformer for Large Language Models" (2023).  RetNet's head h
decays with gamma_h = 1 - 2^(-5 - h); multiplying the attention weights by gamma^(q - kv) is adding
(q - kv) * log(gamma) to the score, written with exp2/log.  (RetNet itself drops the softmax; this is the
decay inside softmax attention, as several RetNet-inspired models use it.)
"""

import torch
from causal import causal

import flexcomp as fc

HEADS = 8


@fc.score_mod
def retention_decay(score, b, h, q_idx, kv_idx):
    log_gamma = torch.log(1.0 - torch.exp2(-5.0 - h))
    return score + (q_idx - kv_idx) * log_gamma


EXAMPLE = {"score_mod": retention_decay, "mask_mod": causal, "q_len": 1024, "heads": HEADS, "check_q_len": 96}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
