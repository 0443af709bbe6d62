"""Chunked attention for streaming speech recognition: a frame sees its own chunk and LEFT_CHUNKS before it.

Paper: "Streaming Transformer ASR with Blockwise Synchronous Beam Search" (2021).  The encoder processes
audio chunk by chunk: no look-ahead beyond the current chunk, and a bounded left context keeps latency
and memory constant.
"""

import flexcomp as fc

CHUNK = 40  # frames per chunk (e.g. 400 ms of 10 ms frames)
LEFT_CHUNKS = 2


def chunked_streaming(chunk: int, left_chunks: int):
    @fc.mask_mod
    def chunked_streaming(b, h, q_idx, kv_idx):
        lag = q_idx // chunk - kv_idx // chunk
        return (lag >= 0) & (lag <= left_chunks)

    chunked_streaming.name = f"chunked_{chunk}_left{left_chunks}"
    return chunked_streaming


streaming_asr = chunked_streaming(CHUNK, LEFT_CHUNKS)

EXAMPLE = {"mask_mod": streaming_asr, "q_len": 1500, "heads": 2, "check_q_len": 128}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
