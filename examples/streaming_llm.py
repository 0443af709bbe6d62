"""Attention sinks + sliding window (StreamingLLM): the first SINKS tokens stay visible forever.

Paper: "Efficient Streaming Language Models with Attention Sinks" (2024).  The mask is
causal & (sink | recent): an or of two small masks, and-ed with `causal`.
"""

from causal import causal
from sliding_window import sliding_window

import flexcomp as fc

SINKS = 4
WINDOW = 256


def attention_sink(sinks: int):
    @fc.mask_mod
    def attention_sink(b, h, q_idx, kv_idx):
        return kv_idx < sinks

    attention_sink.name = f"attention_sink_{sinks}"
    return attention_sink


def sink_and_window(sinks: int, window: int):
    return fc.and_masks(causal, fc.or_masks(attention_sink(sinks), sliding_window(window)))


streaming = sink_and_window(SINKS, WINDOW)

EXAMPLE = {"mask_mod": streaming, "q_len": 4096, "heads": 2, "check_q_len": 128}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
