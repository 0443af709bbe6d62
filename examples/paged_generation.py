"""Continuous batching on a paged KV cache: a tiny random-weight decoder serving requests that join and finish
at different steps, each token checked against recomputing full attention over its whole history.

Papers: "Efficient Memory Management for Large Language Model Serving with PagedAttention" (Kwon et al., 2023,
vLLM) and "Flex Attention: A Programming Model for Generating Optimized Attention Kernels" (Dong et al., 2024).
The logical mask is causal from each request's position; `flexcomp.PagedAttention` converts it to the pages.
"""

from __future__ import annotations

import torch

import flexcomp as fc

VOCAB, DIM, HEADS, LAYERS, PAGE, N_PAGES, SLOTS = 61, 32, 2, 2, 16, 24, 3
# (arrival step, prompt length, new tokens): requests join and finish at different steps
REQUESTS = [(0, 11, 6), (0, 23, 4), (2, 5, 7), (5, 17, 3)]


def chunk_causal(start):
    """Causal over the logical cache for a query chunk whose first token sits at position start[b]."""

    def chunk_causal(b, h, q_idx, kv_idx):
        return q_idx + start[b] >= kv_idx

    return chunk_causal


def example(device="cpu") -> dict:
    """The logical mask (chunk starting at 0: plain causal) for the shared example checks."""
    return {
        "mask_mod": fc.mask_mod(chunk_causal(torch.zeros(1, dtype=torch.int32, device=device))),
        "q_len": 64,
        "heads": 2,
    }


EXAMPLE = example()


class TinyDecoder:
    """Random weights; attention(layer, q, k, v, positions) is supplied by the caller (paged or dense)."""

    def __init__(self, device, seed=0):
        g = torch.Generator().manual_seed(seed)

        def w(*shape):
            return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).to(device)

        self.embed, self.pos, self.unembed = w(VOCAB, DIM), w(256, DIM), w(DIM, VOCAB)
        self.layers = [(w(DIM, 3 * DIM), w(DIM, DIM), w(DIM, 2 * DIM), w(2 * DIM, DIM)) for _ in range(LAYERS)]

    def logits(self, tokens, positions, attend):
        """tokens, positions [B, S] -> logits [B, S, VOCAB]; attend(layer, q, k, v) -> [B, H, S, D]."""
        x = self.embed[tokens] + self.pos[positions]
        for i, (qkv, out, up, down) in enumerate(self.layers):
            B, S, _ = x.shape
            q, k, v = (x @ qkv).view(B, S, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
            x = x + attend(i, q, k, v).transpose(1, 2).reshape(B, S, DIM) @ out
            x = x + torch.relu(x @ up) @ down
        return x @ self.unembed


class PagedServer:
    """One paged K/V cache per layer, shared by all slots; prefill a joining request, decode the others."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.paged = fc.PagedAttention(N_PAGES, PAGE, SLOTS, device=device)
        shape = (1, HEADS, N_PAGES * PAGE, DIM // HEADS)
        self.caches = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(LAYERS)]

    def step(self, slots, tokens, start):
        """Run tokens [B, S] of requests in `slots` whose first token is at position `start` [B]; logits [B, S, V]."""
        B, S = tokens.shape
        positions = start.view(-1, 1) + torch.arange(S, device=self.device)
        for slot, first in zip(slots.tolist(), start.tolist(), strict=True):
            self.paged.reserve(torch.tensor(slot), torch.tensor(first + S))
        kv_len = start + S
        logical = fc.create_block_mask(
            chunk_causal(start.to(torch.int32)), B, None, S, self.max_len(), device=self.device, BLOCK_SIZE=(16, PAGE)
        )
        block_mask = self.paged.convert_logical_block_mask(logical, batch_idx=slots, kv_len=kv_len)

        def attend(layer, q, k, v):
            k_cache, v_cache = self.caches[layer]
            self.paged.assign(slots, positions, k, v, k_cache, v_cache)
            return fc.flex_attention(q, k_cache, v_cache, block_mask=block_mask)

        return self.model.logits(tokens, positions, attend)

    def max_len(self):
        return N_PAGES * PAGE


def dense_logits(model, history):
    """Recompute: the whole history of one request, plain causal attention in float64."""
    tokens = torch.tensor([history], device=model.embed.device)
    positions = torch.arange(len(history), device=tokens.device).view(1, -1)

    def attend(layer, q, k, v):
        n = q.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
        return (s.masked_fill(~causal, -torch.inf).softmax(-1) @ v.double()).to(q.dtype)

    return model.logits(tokens, positions, attend)[0, -1]


def generate(device="cpu") -> int:
    """Serve REQUESTS with continuous batching; returns how many tokens were checked."""
    model, server = TinyDecoder(device), PagedServer(TinyDecoder(device), device)
    g = torch.Generator().manual_seed(1)
    pending = [(t, torch.randint(VOCAB, (n,), generator=g).tolist(), new) for t, n, new in REQUESTS]
    active, checked, step = {}, 0, 0  # slot -> [history, tokens left]
    while pending or active:
        for request in [r for r in pending if r[0] <= step and len(active) < SLOTS]:
            pending.remove(request)
            slot = next(s for s in range(SLOTS) if s not in active)
            prompt = request[1]
            logits = server.step(
                torch.tensor([slot], device=device),
                torch.tensor([prompt], device=device),
                torch.tensor([0], device=device),
            )
            active[slot] = [prompt + [int(logits[0, -1].argmax())], request[2] - 1]
        decoding = sorted(s for s in active if active[s][1] > 0)
        if decoding:
            slots = torch.tensor(decoding, device=device)
            last = torch.tensor([[active[s][0][-1]] for s in decoding], device=device)
            start = torch.tensor([len(active[s][0]) - 1 for s in decoding], device=device)
            logits = server.step(slots, last, start)
            for row, s in enumerate(decoding):
                want = dense_logits(model, active[s][0])
                torch.testing.assert_close(logits[row, -1].double(), want.double(), atol=2e-3, rtol=2e-3)
                active[s][0].append(int(logits[row, -1].argmax()))
                active[s][1] -= 1
                checked += 1
        for s in [s for s in active if active[s][1] == 0]:
            server.paged.erase(torch.tensor(s))
            del active[s]
        step += 1
    return checked


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"ok   paged generation on {device}: {generate(device)} tokens match full recomputation")
