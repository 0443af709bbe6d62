"""flexcomp as a transformers attn_implementation on the GPU: correctness checks, then forward time.

    python benchmarks/bench_transformers.py                  # checks + timing table (CUDA)
    python benchmarks/bench_transformers.py --quick          # shorter sequences, fewer repeats
    python benchmarks/bench_transformers.py --json out.json

Checks (tiny random Llama, Mistral with a sliding window shorter than the prompt, Gemma 2 with softcap and sliding
layers; from_config only, no weights are downloaded): logits against transformers' sdpa (eager for Gemma 2, whose
softcap sdpa cannot express), a left-padded batch, and 20 greedy tokens through generate(), token-identical.

Timing: the forward of a small random Llama (bfloat16, GQA) at a few batch x length shapes, with
attn_implementation "flexcomp", "sdpa" and transformers' own "flex_attention" (torch's flex_attention compiled),
median of CUDA-event timings after warm-up.  flexcomp's time includes its block mask, built once per forward and
mask kind (as "flex_attention"'s does); "mask ms" is that build alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import transformers

import flexcomp.integrations.transformers as fct

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
CHECKS = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    "mistral": ("MistralConfig", {"sliding_window": 5}, "sdpa"),
    "gemma2": ("Gemma2Config", {"sliding_window": 4, "attn_logit_softcapping": 20.0, "final_logit_softcapping": None,
                                "head_dim": 16, "query_pre_attn_scalar": 24,
                                "layer_types": ["sliding_attention", "full_attention"]}, "eager"),
}  # fmt: skip
SMALL_LLAMA = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}


def twins(config, implementations, dtype, seed=0):
    """The same random weights under each attn_implementation, on CUDA, in eval mode."""
    torch.manual_seed(seed)
    first, *rest = implementations
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=first)
    models = [model]
    for implementation in rest:
        twin = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
        twin.load_state_dict(model.state_dict())
        models.append(twin)
    return [m.to(device="cuda", dtype=dtype).eval() for m in models]


# ---------------------------------------------------------------- checks


def run_checks(length=12, batch=3, new_tokens=20) -> list[dict]:
    results = []
    for name, (config_class, extra, reference) in CHECKS.items():
        config = getattr(transformers, config_class)(**TINY, **extra)
        ours, theirs = twins(config, ("flexcomp", reference), torch.float32)
        ids = torch.randint(0, TINY["vocab_size"], (batch, length), device="cuda")
        keep = torch.ones(batch, length, dtype=torch.long, device="cuda")
        for row in range(batch):
            keep[row, : 3 * row] = 0
        kept = keep.bool()
        with torch.no_grad():
            full = (ours(ids).logits - theirs(ids).logits).abs().max().item()
            padded = (ours(ids, attention_mask=keep).logits - theirs(ids, attention_mask=keep).logits).abs()[kept]
        tokens = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}  # a random model may emit EOS early
        settings = {"attention_mask": keep, **tokens, "do_sample": False, "pad_token_id": 0}
        same = torch.equal(ours.generate(ids, **settings), theirs.generate(ids, **settings))
        result = {"model": name, "reference": reference, "logits_err": full, "padded_err": padded.max().item(),
                  "generate_identical": same}  # fmt: skip
        result["ok"] = same and full < 1e-3 and result["padded_err"] < 1e-3  # TF32-free fp32: ~1e-6 expected
        print(
            f"check {name:8s} vs {reference:5s}: logits {full:.2e}, padded {result['padded_err']:.2e}, "
            f"generate {'identical' if same else 'DIFFERENT'} -> {'ok' if result['ok'] else 'FAIL'}",
            flush=True,
        )
        results.append(result)
    return results


# ---------------------------------------------------------------- timing


def cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, after three warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mask_ms(batch: int, length: int, keep: torch.Tensor, repeats: int) -> float:
    """flexcomp's mask hook alone: translate, pad, build the block mask (what each forward pays once)."""
    from transformers.masking_utils import causal_mask_function

    def build():
        fct.model_mask(batch, length, length, mask_function=causal_mask_function, attention_mask=keep, device="cuda")

    return cuda_ms(build, repeats)


def run_timing(shapes, repeats: int) -> list[dict]:
    config = transformers.LlamaConfig(**SMALL_LLAMA)
    implementations = ("flexcomp", "sdpa", "flex_attention")
    models = twins(config, implementations, torch.bfloat16)
    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, length), device="cuda")
        keep = torch.ones(batch, length, dtype=torch.long, device="cuda")
        keep[1:, : length // 4] = 0  # left padding on all rows but the first: the masks are not plain causal
        row = {"batch": batch, "length": length}
        with torch.no_grad():
            reference = models[1](ids, attention_mask=keep).logits.float()
            for implementation, model in zip(implementations, models):
                t0 = time.perf_counter()
                out = model(ids, attention_mask=keep).logits.float()  # first call: compiles
                row[f"{implementation}_first_s"] = time.perf_counter() - t0
                row[f"{implementation}_err"] = (out - reference).abs()[keep.bool()].max().item()
                row[f"{implementation}_ms"] = cuda_ms(lambda m=model, x=ids, k=keep: m(x, attention_mask=k), repeats)
            row["flexcomp_mask_ms"] = mask_ms(batch, length, keep.bool(), repeats)
        print(f"B={batch} L={length:5d}: " + ", ".join(f"{i} {row[f'{i}_ms']:.2f} ms (err {row[f'{i}_err']:.1e})"
                                                     for i in implementations)
              + f"; flexcomp mask {row['flexcomp_mask_ms']:.2f} ms", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer repeats")
    parser.add_argument("--json", help="write the checks and timings to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transformers: needs CUDA", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare fp32 logits
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    checks = run_checks()
    shapes = [(2, 512), (4, 1024)] if args.quick else [(2, 512), (4, 1024), (4, 2048), (2, 4096)]
    timings = run_timing(shapes, repeats=5 if args.quick else 20)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checks": checks, "timings": timings}, f, indent=1)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
