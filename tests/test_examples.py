"""Every example in examples/ against an oracle written here: dense float64 attention that calls the user's functions.

The oracle never touches flexcomp's IR or evaluator: it calls each mod's own Python
function on broadcast int32 index tensors (or element by element, with 0-d tensors,
when the function uses Python control flow such as `if`).  Tile maps from
create_block_mask are checked against the same dense mask, tile by tile.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import flexcomp as fc

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_"))
HAVE_BLOCK_MASKS = importlib.util.find_spec("flexcomp.blockmask") is not None
HAVE_TRITON_BACKEND = hasattr(importlib.import_module("flexcomp.codegen"), "flex_forward")

needs_block_masks = pytest.mark.skipif(not HAVE_BLOCK_MASKS, reason="flexcomp.blockmask has not landed")
triton_backend = pytest.mark.skipif(not HAVE_TRITON_BACKEND, reason="flexcomp.codegen.flex_forward has not landed")


def load_example(name: str):
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))  # examples import one another (`from causal import causal`)
    return importlib.import_module(name)


# ---------------------------------------------------------------- the oracle


def user_function(mod):
    assert mod.fn is not None, f"{mod.name} has no Python function to check against"
    return mod.fn


def call_user_fn(mod, shape: tuple[int, int, int, int], score: torch.Tensor | None = None) -> torch.Tensor:
    fn = user_function(mod)
    b, h, q, kv = (torch.arange(n, dtype=torch.int32).view([-1 if d == i else 1 for d in range(4)])
                   for i, n in enumerate(shape))
    try:
        value = fn(b, h, q, kv) if score is None else fn(score, b, h, q, kv)
        return torch.as_tensor(value).expand(shape).clone()
    except (RuntimeError, TypeError):  # Python control flow on a tensor: go element by element
        return call_elementwise(fn, shape, score)


def call_elementwise(fn, shape, score):
    values = []
    for b, h, q, kv in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
        idx = [torch.tensor(i, dtype=torch.int32) for i in (b, h, q, kv)]
        values.append(torch.as_tensor(fn(*idx) if score is None else fn(score[b, h, q, kv], *idx)))
    return torch.stack(values).view(shape)


def dense_attention(q, k, v, score_mod, mask_mod):
    q, k, v = q.double(), k.double(), v.double()
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if score_mod is not None:
        scores = call_user_fn(score_mod, shape, scores).double()
    if mask_mod is not None:
        scores = scores.masked_fill(~call_user_fn(mask_mod, shape).bool(), -math.inf)
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])  # masked rows: all zero
    return weights @ v, lse


def brute_force_tiles(mask_mod, shape, block: int) -> torch.Tensor:
    B, H, Q, KV = shape
    keep = call_user_fn(mask_mod, shape).bool()
    nq, nkv = -(-Q // block), -(-KV // block)
    any_ = torch.zeros(B, H, nq * block, nkv * block, dtype=torch.bool)
    all_ = torch.ones_like(any_)  # elements past Q or KV do not count against FULL
    any_[..., :Q, :KV] = keep
    all_[..., :Q, :KV] = keep
    any_ = any_.view(B, H, nq, block, nkv, block).any(5).any(3)
    all_ = all_.view(B, H, nq, block, nkv, block).all(5).all(3)
    return torch.where(all_, 2, torch.where(any_, 1, 0))


def tiles_from_torch_fields(block_mask, n_kv_blocks: int) -> torch.Tensor:
    """The tile map as torch's kernels read it: kv_num_blocks/kv_indices (partial), full_* (full)."""
    classes = torch.zeros(*block_mask.kv_num_blocks.shape, n_kv_blocks, dtype=torch.long)
    for num, idx, cls in ((block_mask.kv_num_blocks, block_mask.kv_indices, 1),
                          (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2)):
        if num is None:
            continue
        num, idx = num.expand(classes.shape[:3]), idx.expand(*classes.shape[:3], idx.shape[3])
        for b, h, qb in torch.cartesian_prod(*(torch.arange(n) for n in num.shape)).view(-1, 3).tolist():
            classes[b, h, qb, idx[b, h, qb, : int(num[b, h, qb])].long()] = cls
    return classes


# ---------------------------------------------------------------- running an example


def check_size(example: dict) -> tuple[int, int, int, int]:
    q_len = example.get("check_q_len") or min(example["q_len"], 128)
    kv_len = example.get("check_kv_len") or min(example.get("kv_len") or example["q_len"], 128)
    return example.get("batch", 1), example.get("heads", 2), q_len, kv_len


def run_and_compare(score_mod, mask_mod, shape, rng, backend="reference", dtype=torch.float64, block=32,
                    kernel_options=None, head_dim=16):
    B, H, Q, KV = shape
    q, k, v = (torch.randn(B, H, n, head_dim, generator=rng, dtype=dtype) for n in (Q, KV, KV))
    masking = {}
    if mask_mod is not None and HAVE_BLOCK_MASKS:
        masking["block_mask"] = fc.create_block_mask(mask_mod, B, H, Q, KV, device="cpu", BLOCK_SIZE=block)
    elif mask_mod is not None:
        masking["mask_mod"] = mask_mod
    out, lse = fc.flex_attention(q, k, v, score_mod=score_mod, return_lse=True, backend=backend,
                                 kernel_options=kernel_options, **masking)
    want_out, want_lse = dense_attention(q, k, v, score_mod, mask_mod)
    # float64 inputs: the user's code computes index-only float terms (ALiBi slopes, RetNet's log gamma) in
    # float32, as torch does for an int tensor times a Python float; flexcomp computes them in float64
    tol = 1e-6 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)  # -inf rows must be -inf
    return want_lse


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_matches_dense_float64(name, rng):
    example = load_example(name).EXAMPLE
    want_lse = run_and_compare(example.get("score_mod"), example.get("mask_mod"), check_size(example), rng)
    assert torch.isfinite(want_lse).any(), f"{name}: the check size masks everything; it checks nothing"


def tile_sizes(example: dict) -> list[tuple[int, int, int, int]]:
    """Two shapes: a multiple of the 32-wide block and a ragged one (last tiles partly out of range)."""
    B, H = example.get("batch", 1), example.get("heads", 2)
    q_len, kv_len = min(example["q_len"], 512), min(example.get("kv_len") or example["q_len"], 512)
    return [(B, H, q_len, kv_len), (B, H, max(q_len - 7, 1), max(kv_len - 13, 1))]


@needs_block_masks
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_tile_map_matches_brute_force(name):
    mask_mod = load_example(name).EXAMPLE.get("mask_mod")
    if mask_mod is None:
        pytest.skip(f"{name} has no mask_mod")
    for shape in tile_sizes(load_example(name).EXAMPLE):
        block_mask = fc.create_block_mask(mask_mod, *shape, device="cpu", BLOCK_SIZE=32)
        want = brute_force_tiles(mask_mod, shape, 32)
        got = torch.as_tensor(block_mask.tile_classes()).long().expand_as(want)
        assert torch.equal(got, want), f"{name} at {shape}: tile_classes() differs from brute force"
        assert torch.equal(tiles_from_torch_fields(block_mask, want.shape[3]).expand_as(want), want), f"{name} at {shape}: fields"


# ---------------------------------------------------------------- the factories at other parameters


def factory_variants():
    """Odd, non-power-of-two parameters: floor division and modulo away from tile edges."""
    causal = load_example("causal").causal
    return {
        "softcap_2": (load_example("softcap").tanh_softcap(2.0), causal, 96, 96),
        "window_17": (fc.and_masks(causal, load_example("sliding_window").sliding_window(17)), None, 100, 100),
        "dilated_5x3": (fc.and_masks(causal, load_example("dilated_sliding_window").dilated_window(5, 3)), None, 90, 90),
        "block_causal_24": (load_example("block_causal").block_causal(24), None, 100, 100),
        "chunked_16_left1": (load_example("chunked_asr").chunked_streaming(16, 1), None, 100, 100),
        "swin_w4_s2": (load_example("swin").window_attention(12, 4, 2), None, 144, 144),
        "natten_12x12_k5": (load_example("neighborhood_2d").neighborhood_2d(12, 12, 5), None, 144, 144),
        "sink3_window9": (load_example("streaming_llm").sink_and_window(3, 9), None, 70, 70),
        "alibi_3_heads": (load_example("alibi").alibi(3), causal, 50, 60),
    }


@pytest.mark.parametrize("variant", sorted(factory_variants()))
def test_factory_variant_matches_dense_float64(variant, rng):
    first, second, q_len, kv_len = factory_variants()[variant]
    score_mod, mask_mod = (first, second) if first.kind == "score" else (None, first)
    heads = 3 if variant.startswith("alibi") else 2
    run_and_compare(score_mod, mask_mod, (1, heads, q_len, kv_len), rng)
    if HAVE_BLOCK_MASKS:
        shape = (1, heads, q_len, kv_len)
        got = torch.as_tensor(fc.create_block_mask(mask_mod, *shape, device="cpu", BLOCK_SIZE=16).tile_classes())
        want = brute_force_tiles(mask_mod, shape, 16)
        assert torch.equal(got.long().expand_as(want), want)


def test_softcap_changes_scores():
    """The softcap check is meaningful: at cap 2 the capped and plain attention differ."""
    softcap = load_example("softcap").tanh_softcap(2.0)
    scores = torch.linspace(-6, 6, 13, dtype=torch.float64)
    capped = softcap.fn(scores, 0, 0, 0, 0)
    assert capped.abs().max() < 2.0 and not torch.allclose(capped, scores)


def test_t5_bias_gradient_reaches_the_table(rng):
    t5 = load_example("t5_bias")
    q, k, v = (torch.randn(1, t5.HEADS, 24, 8, generator=rng, dtype=torch.float64) for _ in range(3))
    t5.BIAS.grad = None
    fc.flex_attention(q, k, v, score_mod=t5.t5_relative_bias, backend="reference").sum().backward()
    assert t5.BIAS.grad is not None and t5.BIAS.grad.abs().sum() > 0


# ---------------------------------------------------------------- Triton backend, interpreter-sized


@triton_backend
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_triton_interpreter(name, rng, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    example = load_example(name).EXAMPLE
    B, H, Q, KV = check_size(example)
    shape = (B, H, min(Q, 64), min(KV, 64) if KV != Q else min(Q, 64))
    if name == "medusa_tree":  # its keys are context + tree: keep all of them
        shape = (B, H, Q, KV)
    run_and_compare(example.get("score_mod"), example.get("mask_mod"), shape, rng, backend="triton",
                    dtype=torch.float32, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16})


# ---------------------------------------------------------------- scripts, end to end


@pytest.mark.parametrize("name", ["document_mask", "medusa_tree"])
def test_example_script_runs(name):
    result = subprocess.run([sys.executable, str(EXAMPLES_DIR / f"{name}.py"), "--q-len", "256"],
                            check=False, capture_output=True, text=True, timeout=300, cwd=EXAMPLES_DIR)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "optimized IR" in result.stdout and "ok   backend=auto" in result.stdout


# ---------------------------------------------------------------- devices (issue 24)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_captured_tensors_follow_the_device(name):
    """Built for the meta device, every captured tensor of every example is on meta: none is left on the CPU,
    which on a GPU would stop the call with 'captured tensor ... is on cpu'."""
    module = load_example(name)
    spec = module.example("meta") if hasattr(module, "example") else module.EXAMPLE
    tensors = {f"{mod.name}.{key}": t for mod in (spec.get("score_mod"), spec.get("mask_mod")) if mod is not None
               for key, t in mod.tensors().items()}
    if not hasattr(module, "example"):
        assert not tensors, f"{name} captures {sorted(tensors)}: give it an example(device) builder"
    assert all(t.device.type == "meta" for t in tensors.values()), {k: t.device for k, t in tensors.items()}


def test_gpu_examples_runs_on_cpu(capsys):
    sys.path.insert(0, str(EXAMPLES_DIR.parent / "benchmarks"))
    gpu_examples = importlib.import_module("gpu_examples")
    assert gpu_examples.example_names() == EXAMPLE_NAMES
    assert gpu_examples.run_all("cpu", ["document_mask", "t5_bias"]) == 0
    assert capsys.readouterr().out.count("ok   example") == 2


def test_the_dense_oracle_keeps_a_constant_mask_on_the_device():
    """noop's mask is a Python `True`: the oracle puts it where the inputs are (it failed on CUDA, not on CPU)."""
    sys.path.insert(0, str(EXAMPLES_DIR))
    from _run import evaluate_user_fn

    keep = evaluate_user_fn(fc.noop_mask, 1, 2, 3, 5, device="meta")
    assert keep.device.type == "meta" and keep.shape == (1, 2, 3, 5)
