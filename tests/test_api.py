"""flexcomp.flex_attention / flexcomp.compile: validation, backend choice, drop-in behaviour, packaging."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import flexcomp as fc

REPO = Path(__file__).resolve().parents[1]
HAS_BLOCKMASK = importlib.util.find_spec("flexcomp.blockmask") is not None
needs_blockmask = pytest.mark.skipif(not HAS_BLOCKMASK, reason="flexcomp.blockmask not written yet")


@fc.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_fn(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + 0.05 * (kv_idx - q_idx)


# torch computes `0.05 * (kv_idx - q_idx)` in float32 even for float64 scores, and so does flexcomp (torch's type
# promotion, node by node): float64 results agree with the oracle's to float64 rounding.
F64_TOL = {"atol": 1e-10, "rtol": 1e-10}


def tensors(randn, B=1, Hq=2, Hkv=2, Lq=9, Lkv=11, D=8, Dv=8, dtype=torch.float32):
    return randn(B, Hq, Lq, D, dtype=dtype), randn(B, Hkv, Lkv, D, dtype=dtype), randn(B, Hkv, Lkv, Dv, dtype=dtype)


# ---------------------------------------------------------------- validation


def bad_inputs(randn):
    q, k, v = tensors(randn)
    bm = torch_create_block_mask(causal_fn, None, None, 9, 11, device="cpu")
    return {  # name: (args, kwargs, error type, text the message must contain)
        "query not a tensor": ((q.tolist(), k, v), {}, TypeError, "query must be a torch.Tensor, got list"),
        "3-D key": ((q, k[0], v), {}, ValueError, "key.ndim=3"),
        "nested query": ((torch.nested.nested_tensor([q[0], q[0, :, :5]], layout=torch.jagged), k, v), {}, ValueError,
                         "query is a nested (jagged) tensor"),
        "integer dtype": ((q.long(), k.long(), v.long()), {}, TypeError, "query.dtype=torch.int64"),
        "dtype mismatch": ((q, k.double(), v), {}, ValueError, "query.dtype=torch.float32 key.dtype=torch.float64"),
        "device mismatch": ((q, k.to("meta"), v), {}, ValueError, "key.device=device(type='meta')"),
        "batch mismatch": ((q, *tensors(randn, B=2)[1:]), {}, ValueError,
                           "same batch size, or non-none block_mask, but got block_mask=None, Bq=1, and Bkv=2"),
        "scale tensor": ((q, k, v), {"scale": torch.ones(2)}, ValueError, "one element, got shape (2,)"),
        "scale text": ((q, k, v), {"scale": "0.1"}, TypeError, "scale must be a number, a one-element tensor"),
        "kernel option": ((q, k, v), {"kernel_options": {"BLOCK_SIZE": 64}}, ValueError,
                          "unknown kernel_options key 'BLOCK_SIZE'; known (each also as fwd_<key> / bwd_<key>): BLOCK_M"),
        "torch BACKEND": ((q, k, v), {"kernel_options": {"BACKEND": "CUDNN"}}, ValueError,
                          "Invalid BACKEND value 'CUDNN'. Must be one of"),
        "lse twice": ((q, k, v), {"return_lse": True, "return_aux": fc.api.AuxRequest(lse=True)}, ValueError,
                      "Cannot specify both return_lse and return_aux"),
        "heads without gqa": ((q, *tensors(randn, Hkv=1)[1:]), {}, ValueError, "q_heads=2 != kv_heads=1"),
        "heads not a multiple": (tensors(randn, Hq=3, Hkv=2), {"enable_gqa": True}, ValueError,
                                 "q_heads=3 is not a multiple of kv_heads=2"),
        "head dim": ((q, tensors(randn, D=4)[1], v), {}, ValueError, "q_head_dim=8 != k_head_dim=4"),
        "value length": ((q, k, tensors(randn, Lkv=12)[2]), {}, ValueError, "kv_len=11 != value length v_len=12"),
        "block mask q_len": (tensors(randn, Lq=10), {"block_mask": bm}, ValueError, "q_len=10 != block_mask_q_len=9"),
        "block mask kv_len": (tensors(randn, Lkv=12), {"block_mask": bm}, ValueError,
                              "kv_len=12 != block_mask_kv_len=11"),
        "block mask batch": (tensors(randn, B=3), {"block_mask": torch_create_block_mask(
            causal_fn, 2, None, 9, 11, device="cpu")}, ValueError, "block_mask_batch=2 is neither 1 nor q_batch=3"),
        "block mask made for a batch of 3": (tensors(randn, B=2), {"block_mask": fc.create_block_mask(
            causal_fn, 3, None, 9, 11, device="cpu")}, ValueError, "block_mask_batch=3 is neither 1 nor q_batch=2"),
        "unknown backend": ((q, k, v), {"backend": "cuda"}, ValueError, "backend='cuda'"),
        "mask as score_mod": ((q, k, v, causal), {}, TypeError, "fn_or_mod.kind='mask' != kind='score'"),
        "score_mod not callable": ((q, k, v, 3.0), {}, TypeError, "score_mod must be a function or a flexcomp Mod"),
        "mask_mod and block_mask": ((q, k, v), {"block_mask": bm, "mask_mod": causal}, ValueError, "not both"),
        "scale not a number": ((q, k, v), {"scale": "0.1"}, TypeError, "scale must be a number"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(lambda *s, **k: torch.zeros(s))))
def test_bad_input_is_named(case, randn):
    args, kwargs, error, text = bad_inputs(randn)[case]
    with pytest.raises(error) as info:
        fc.flex_attention(*args, **kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize("case", ["mask as score_mod", "score_mod not callable"])
def test_wrong_mod_is_a_type_error_and_a_flexcomp_error(case, randn):
    """One check (`as_mod`) for every entry point: a TypeError as torch raises, and a FlexcompError."""
    args, kwargs, _, text = bad_inputs(randn)[case]
    with pytest.raises(fc.ModKindError, match=re.escape(text)) as info:
        fc.flex_attention(*args, **kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, fc.SignatureError)
    with pytest.raises(fc.ModKindError, match=re.escape(text)):
        fc.compile(*args[3:])


def test_triton_on_cpu_without_interpreter_says_how(randn, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fc.BackendError, match="TRITON_INTERPRET=1"):
        fc.flex_attention(*tensors(randn), backend="triton")


# ---------------------------------------------------------------- results


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_plain_functions_match_naive(backend, randn, naive_attention):
    q, k, v = tensors(randn, B=2, Hq=4, Hkv=2, Lq=37, Lkv=45, Dv=16, dtype=torch.float64)
    out, lse = fc.flex_attention(q, k, v, relative_bias, scale=0.2, enable_gqa=True, return_lse=True,
                                 mask_mod=causal_fn, backend=backend)
    want, want_lse = naive_attention(q, k, v, relative_bias, causal_fn, 0.2, True)
    torch.testing.assert_close(out, want, **F64_TOL)
    rows = ~want_lse.isinf()
    assert torch.equal(lse.isinf(), ~rows)
    torch.testing.assert_close(lse[rows], want_lse[rows], **F64_TOL)


def test_returns_only_out_without_return_lse(randn):
    out = fc.flex_attention(*tensors(randn))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 9, 8)


def test_torch_block_mask_is_a_drop_in(randn, torch_flex):
    """torch's own BlockMask (a plain-function mask_mod) works, and the answer is torch's."""
    q, k, v = tensors(randn, Lq=130, Lkv=150)
    bm = torch_create_block_mask(causal_fn, None, None, 130, 150, device="cpu")
    want, want_lse = torch_flex.flex_attention(q, k, v, relative_bias, bm, return_lse=True)
    out, lse = fc.flex_attention(q, k, v, relative_bias, bm, return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_reference_backend_trains(randn, naive_attention):
    q, k, v = (t.requires_grad_() for t in tensors(randn, Lq=20, Lkv=20, dtype=torch.float64))
    fc.flex_attention(q, k, v, relative_bias, mask_mod=causal).square().sum().backward()
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    naive_attention(q2, k2, v2, relative_bias, causal_fn)[0].square().sum().backward()
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got, want, **F64_TOL)


@needs_blockmask
@pytest.mark.parametrize("score_mod, mask_mod", [(None, causal), (relative_bias, None), (relative_bias, causal_fn)])
def test_triton_backend_matches_reference(score_mod, mask_mod, randn):
    q, k, v = tensors(randn, Hq=2, Hkv=1, Lq=40, Lkv=70, Dv=16)
    kw = {"enable_gqa": True, "return_lse": True, "mask_mod": mask_mod}
    out, lse = fc.flex_attention(q, k, v, score_mod, backend="triton", **kw)
    want, want_lse = fc.flex_attention(q, k, v, score_mod, backend="reference", **kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- torch's signature: batch broadcast, aux, scale


def batch_tensors(randn, Bq, Bkv, L=20):
    return randn(Bq, 2, L, 8), randn(Bkv, 2, L, 8), randn(Bkv, 2, L, 8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_key_value_batch_one_broadcasts_with_a_block_mask(backend, randn, naive_attention, torch_flex):
    q, k, v = batch_tensors(randn, 3, 1)
    bm = torch_create_block_mask(causal_fn, 3, None, 20, 20, device="cpu")
    want, want_lse = naive_attention(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), relative_bias, causal_fn)
    out, lse = fc.flex_attention(q, k, v, relative_bias, bm, return_lse=True, backend=backend)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, torch_flex.flex_attention(q, k, v, relative_bias, bm), atol=2e-5, rtol=2e-5)
    out = fc.flex_attention(q, k, v, relative_bias, mask_mod=causal, backend=backend)  # built for q's batch
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_broadcast_key_value_get_summed_gradients(randn, naive_attention):
    q, k, v = (t.double().requires_grad_() for t in batch_tensors(randn, 3, 1, L=12))
    fc.flex_attention(q, k, v, mask_mod=causal).square().sum().backward()
    k2, v2 = (t.detach().requires_grad_() for t in (k, v))
    want, _ = naive_attention(q.detach(), k2.expand(3, -1, -1, -1), v2.expand(3, -1, -1, -1), None, causal_fn)
    want.square().sum().backward()
    assert k.grad.shape == k.shape
    torch.testing.assert_close(k.grad, k2.grad, **F64_TOL)
    torch.testing.assert_close(v.grad, v2.grad, **F64_TOL)


@pytest.mark.parametrize("Bq, Bkv, Bbm", [(4, 1, None), (4, 1, 1), (1, 4, 4), (4, 2, 4), (4, 2, 2)])
def test_batch_mismatches_give_torchs_errors(Bq, Bkv, Bbm, randn, torch_flex):
    q, k, v = batch_tensors(randn, Bq, Bkv, L=8)
    bm = None if Bbm is None else torch_create_block_mask(causal_fn, Bbm, None, 8, 8, device="cpu")
    with pytest.raises((ValueError, RuntimeError)) as torch_error:
        torch_flex.flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(type(torch_error.value)) as ours:
        fc.flex_attention(q, k, v, block_mask=bm)
    assert str(ours.value) == str(torch_error.value)


def test_scale_may_be_a_one_element_tensor(randn):
    q, k, v = tensors(randn)
    want = fc.flex_attention(q, k, v, scale=0.3)
    assert torch.equal(fc.flex_attention(q, k, v, scale=torch.tensor(0.3)), want)
    assert torch.equal(fc.flex_attention(q, k, v, scale=torch.tensor([0.3])), want)


def test_return_aux_lse_and_max_scores(randn, naive_attention, torch_flex):
    q, k, v = tensors(randn, Lq=12, Lkv=12, dtype=torch.float64)
    out, aux = fc.flex_attention(q, k, v, relative_bias, mask_mod=causal, return_aux=fc.api.AuxRequest(True, True))
    assert isinstance(aux, torch_flex.AuxOutput)
    want, want_lse = naive_attention(q, k, v, relative_bias, causal_fn)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / 8**0.5 + 0.05 * (torch.arange(12) - torch.arange(12)[:, None])
    want_max = s.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -torch.inf).amax(-1)
    torch.testing.assert_close(out, want, **F64_TOL)
    torch.testing.assert_close(aux.lse, want_lse, **F64_TOL)
    torch.testing.assert_close(aux.max_scores, want_max, **F64_TOL)
    bm = torch_create_block_mask(causal_fn, None, None, 12, 12, device="cpu")
    _, torch_aux = torch_flex.flex_attention(q, k, v, relative_bias, bm,
                                                     return_aux=torch_flex.AuxRequest(lse=True))
    only_lse = fc.flex_attention(q, k, v, relative_bias, bm, return_aux=torch_flex.AuxRequest(lse=True))[1]
    assert only_lse.max_scores is None and torch_aux.max_scores is None
    torch.testing.assert_close(only_lse.lse, torch_aux.lse, **F64_TOL)
    assert fc.flex_attention(q, k, v, return_aux=fc.api.AuxRequest())[1] == fc.api.AuxOutput(None, None)


@pytest.mark.parametrize("options", [
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
    {"fwd_BLOCK_M": 16, "bwd_BLOCK_M1": 16, "PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": False, "BACKEND": "TRITON"},
])
def test_torchs_kernel_options_are_accepted(options, randn):
    q, k, v = tensors(randn, Lq=40, Lkv=40)
    want = fc.flex_attention(q, k, v, mask_mod=causal, backend="reference")
    out = fc.flex_attention(q, k, v, mask_mod=causal, backend="triton", kernel_options=options)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_kernel_option_given_twice_differently():
    with pytest.raises(ValueError, match="sets num_warps twice"):
        fc.api.normalize_kernel_options({"fwd_num_warps": 4, "bwd_num_warps": 8})
    assert fc.api.normalize_kernel_options({"fwd_BLOCK_M": 64, "bwd_BLOCK_N2": 32}) == {"BLOCK_M": 64, "BLOCK_N2": 32}


# ---------------------------------------------------------------- compile


def test_compiled_variant(randn, naive_attention):
    variant = fc.compile(relative_bias, causal)
    assert variant.score_mod.kind == "score" and variant.mask_mod is causal
    assert "relative_bias" in repr(variant) and "causal" in repr(variant)
    assert "# score_mod relative_bias" in variant.ir and "ge %" in variant.ir
    q, k, v = tensors(randn, Lq=33, Lkv=33, dtype=torch.float64)
    out = variant(q, k, v, backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, relative_bias, causal_fn)[0], **F64_TOL)


def test_compiled_variant_source_is_a_triton_kernel():
    source = fc.compile(relative_bias, causal).source
    assert "@triton.jit" in source and "tl." in source


@needs_blockmask
def test_compiled_variant_block_mask(randn, naive_attention):
    variant = fc.compile(mask_mod=causal)
    bm = variant.block_mask(1, 1, 40, 40, device="cpu")
    q, k, v = tensors(randn, Lq=40, Lkv=40, dtype=torch.float64)
    out = variant(q, k, v, block_mask=bm, backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, None, causal_fn)[0], atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- packaging


def test_public_names():
    for name in fc.__all__:
        assert getattr(fc, name) is not None, name
    assert issubclass(fc.BackendError, fc.FlexcompError)


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2 and commands[1].endswith("pytest -q -n 2 tests")
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert any(line.startswith(commands[1] + " ") or line == commands[1] for line in ci_lines)
    assert "set -euo pipefail" in ci_lines
