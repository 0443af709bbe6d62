"""Per-head masks (DuoAttention): retrieval heads attend to everything, streaming heads to sinks + a recent window.

Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads" (2024).
Which heads are retrieval heads is learned offline; here a captured per-head bool RETRIEVAL_HEAD[h].
Built from the StreamingLLM pieces: causal & (retrieval head | sink | recent).
"""

import torch
from causal import causal
from sliding_window import sliding_window
from streaming_llm import attention_sink

import flexcomp as fc

HEADS = 4
SINKS = 16
WINDOW = 64
RETRIEVAL_HEAD = torch.tensor([True, False, False, True])


def example(device="cpu") -> dict:
    """The mask with RETRIEVAL_HEAD on `device`: captured tensors live where q, k, v live (moved once)."""
    is_retrieval = RETRIEVAL_HEAD.to(device)

    @fc.mask_mod
    def retrieval_head(b, h, q_idx, kv_idx):
        return is_retrieval[h]

    duo = fc.and_masks(causal, fc.or_masks(retrieval_head, attention_sink(SINKS), sliding_window(WINDOW)))
    return {"mask_mod": duo, "q_len": 2048, "heads": HEADS, "check_q_len": 192}


EXAMPLE = example()  # on the CPU
duo = EXAMPLE["mask_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
