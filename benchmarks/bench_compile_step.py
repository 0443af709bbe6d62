"""A training step of a small transformer whose attention is flexcomp's: eager against torch.compile(fullgraph=True),
same model, same inputs, same process (issue 20).

    python benchmarks/bench_compile_step.py            # CUDA, bf16: 4 layers, B=8, L=2048, H=8, D=64
    TRITON_INTERPRET=1 python benchmarks/bench_compile_step.py --quick   # tiny, on CPU: a smoke test

Each layer: qkv projection, flex_attention with a causal block mask and a learnable per-head ALiBi slope (a captured
tensor that gets gradients), output projection, an MLP.  Reported: milliseconds per step (forward, backward, SGD),
the compiled step's graph breaks (must be 0) and the largest difference of the two steps' losses.
"""

from __future__ import annotations

import argparse
import time

import torch

import flexcomp as fc

SLOPES = None  # [H] learnable ALiBi slopes, set in main()


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


class Layer(torch.nn.Module):
    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, block_mask) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = fc.flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask)
        x = x + self.out(attended.transpose(1, 2).reshape(B, L, -1))
        return x + self.mlp(self.norm2(x))


class Model(torch.nn.Module):
    def __init__(self, layers: int, heads: int, head_dim: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(heads, head_dim) for _ in range(layers))

    def forward(self, x: torch.Tensor, block_mask) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, block_mask)
        return x


def timed_steps(step, steps: int, device: str) -> float:
    step()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / steps * 1e3


def main() -> None:
    global SLOPES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    layers, B, L, H, D = (1, 1, 32, 2, 16) if args.quick else (4, 8, 2048, 8, 64)
    steps = 1 if args.quick else args.steps
    if args.quick:  # tiny ops on a shared CPU: extra intra-op threads only contend (eager was 50x slower with them)
        torch.set_num_threads(1)
    torch.manual_seed(0)
    SLOPES = torch.linspace(-0.5, -0.01, H, device=device, requires_grad=True)
    model = Model(layers, H, D).to(device, dtype)
    block_mask = fc.create_block_mask(causal, None, None, L, L, device=device)
    x = torch.randn(B, L, H * D, device=device, dtype=dtype)
    params = [*model.parameters(), SLOPES]
    optimizer = torch.optim.SGD(params, lr=1e-4)
    compiled = torch.compile(model, fullgraph=True)
    breaks = torch._dynamo.explain(model)(x, block_mask).graph_break_count
    losses = {}

    def stepper(name, forward):
        def step():
            loss = forward(x, block_mask).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name] = loss.detach()

        return step

    eager_ms = timed_steps(stepper("eager", model), steps, device)
    compiled_ms = timed_steps(stepper("compiled", compiled), steps, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"{name}, torch {torch.__version__}: {layers} layers, B={B} L={L} H={H} D={D} {dtype}, causal + ALiBi")
    print("| step | ms | vs eager |\n|---|---|---|")
    print(f"| eager | {eager_ms:.2f} | 1.00x |\n| torch.compile(fullgraph=True) | {compiled_ms:.2f} | "
          f"{eager_ms / compiled_ms:.2f}x |")  # fmt: skip
    print(f"graph breaks: {breaks}; last losses eager {losses['eager'].item():.5f}, "
          f"compiled {losses['compiled'].item():.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
