"""T5 relative-position bias: a learned scalar per (head, log-spaced distance bucket) added to the score.

Paper: "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (2020, T5).
Distances below MAX_EXACT get their own bucket, longer ones share log-spaced buckets up to MAX_DISTANCE.
The bucket of every relative position is precomputed once into a captured int table indexed by
q_idx - kv_idx + OFFSET; the bias table BIAS[h, bucket] is a learnable parameter (gradients reach it).
"""

import math

import torch

import flexcomp as fc

HEADS = 4
NUM_BUCKETS = 32  # split between keys before and after the query (bidirectional, as in the T5 encoder)
MAX_DISTANCE = 128
MAX_LEN = 1024
OFFSET = MAX_LEN - 1  # q_idx - kv_idx + OFFSET is in [0, 2 MAX_LEN - 1)


def t5_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucketing of kv_idx - q_idx (its `_relative_position_bucket`, bidirectional)."""
    half = num_buckets // 2
    side = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return side + torch.where(distance < max_exact, distance, far)


# BUCKET[q - kv + OFFSET] = bucket of the relative position kv - q
BUCKET = t5_buckets(-torch.arange(-OFFSET, MAX_LEN), NUM_BUCKETS, MAX_DISTANCE).to(torch.int32)
BIAS = torch.nn.Parameter(torch.randn(HEADS, NUM_BUCKETS, generator=torch.Generator().manual_seed(5)))


def example(device="cpu") -> dict:
    """The bias with BUCKET and BIAS on `device` (moved once; on the CPU `.to` returns BIAS itself, so its .grad
    fills; on another device gradients flow back through the copy to BIAS)."""
    bucket, bias = BUCKET.to(device), BIAS.to(device)

    @fc.score_mod
    def t5_relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, bucket[q_idx - kv_idx + OFFSET]]

    return {"score_mod": t5_relative_bias, "q_len": MAX_LEN, "heads": HEADS, "check_q_len": 96}


EXAMPLE = example()  # on the CPU
t5_relative_bias = EXAMPLE["score_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
