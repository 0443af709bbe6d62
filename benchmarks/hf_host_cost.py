"""Host time flexcomp adds to a transformers model, measured on any machine: the kernels are not run.

    python benchmarks/hf_host_cost.py                 # B=2, prompt 64, 20 decode steps
    python benchmarks/hf_host_cost.py --batch 4 --prompt 512 --steps 10

A small random Llama (8 layers, GQA) runs a left-padded prompt and then one-token decode steps through a KV cache,
with attn_implementation "flexcomp" on the Triton backend (the CUDA path's host code; on a CPU under Triton's
interpreter).  After one real step per shape, the kernel launches are replaced by no-ops, so what is timed is the
Python and torch work around them: the mask hook (the block mask a forward builds once) and the eight attention
calls.  Each block-mask method is timed in the same process, alternating, medians of --repeats runs:
"row bounds" (the default for transformers' masks, flexcomp/sparsity/row_bounds.py) against the tile analysis.
On a GPU host the same code runs; this is what a serving loop without CUDA graphs pays per step on top of the GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # on a CPU: the Triton backend's host code, kernels interpreted

import torch
import transformers
from flexcomp.codegen import decode, launch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import flexcomp.integrations.transformers as fct
from flexcomp import blockmask

NAME = "flexcomp_host_cost"
CONFIG = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 8, "num_attention_heads": 16,
          "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 128}  # fmt: skip


class Stopwatch:
    """Seconds spent inside the registered mask hook and attention function, per name."""

    def __init__(self):
        self.spent: dict[str, float] = {"mask": 0.0, "attention": 0.0}
        for registry, name in ((ALL_MASK_ATTENTION_FUNCTIONS, "mask"), (ALL_ATTENTION_FUNCTIONS, "attention")):
            registry[NAME] = self._timed(registry[NAME], name)

    def _timed(self, fn, name):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - start

        return timed


def generate(model, ids, attention_mask, steps: int) -> tuple[float, float]:
    """(prefill ms, ms per decode step) of a prompt and `steps` one-token steps through a fresh KV cache."""
    cache = transformers.DynamicCache(config=model.config)
    start = time.perf_counter()
    model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    prefill = time.perf_counter() - start
    token = ids[:, -1:]
    start = time.perf_counter()
    for _ in range(steps):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(ids.shape[0], 1)], 1)
        model(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return prefill * 1e3, (time.perf_counter() - start) * 1e3 / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # host overhead, not intra-op threading (which other processes disturb)
    torch.manual_seed(0)
    fct.register(NAME, backend="triton")
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG),
                                                          attn_implementation=NAME).eval()  # fmt: skip
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.prompt))
    padding = torch.ones_like(ids)
    padding[0, : args.prompt // 4] = 0  # left padding in the first request
    methods = {"row bounds": blockmask.row_bounds, "tile analysis": lambda ir: None}
    with torch.no_grad():
        generate(model, ids, padding, 2)  # every kernel shape runs once, for real
        launch.PreparedLaunch.__call__ = lambda self, tensors: None
        decode.DecodeLaunch.run = lambda self, tensors: None
        watch = Stopwatch()
        rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                blockmask.row_bounds = method
                for key in watch.spent:
                    watch.spent[key] = 0.0
                prefill, step = generate(model, ids, padding, args.steps)
                calls = args.steps + 1
                rows[name].append((prefill, step, watch.spent["mask"] * 1e3 / calls,
                                   watch.spent["attention"] * 1e3 / (calls * CONFIG["num_hidden_layers"])))
        blockmask.row_bounds = methods["row bounds"]
    print(f"B={args.batch}, prompt {args.prompt}, {args.steps} decode steps, 8 layers; medians of {args.repeats}, ms")
    print("| block mask method | prefill | decode step | mask hook per forward | one attention call |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        medians = [statistics.median(column) for column in zip(*runs)]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
