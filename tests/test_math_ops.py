"""The math functions users reach for (tan, erf, log1p, expm1, round, relu, silu, gelu, softplus, sign,
torch.special aliases) against torch in float64: element by element through the IR evaluator and through the
Triton rendering (values, and derivatives from flexcomp.grad), as score_mods and masks of whole attention calls
on the reference backend and the interpreter (forward and backward against tests/naive.py), and their interval
rules (random points of an interval land inside the rule's result).  Also: a fully masked call's zero gradients,
and the refusals that say what to write instead."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from flexcomp.codegen.ops import PRELUDE, render_block
from naive import naive_attention

import flexcomp as fc
from flexcomp.evaluate import OP_TABLE, evaluate
from flexcomp.grad import score_grad
from flexcomp.ir import DType, Node, Op, arg
from flexcomp.reference import tile_map
from flexcomp.sparsity.intervals import Analyzer

tanh = torch.tanh  # a module-level alias, as attention-gym's softcap binds it

# name -> (score_mod body, the same function on float64 tensors written with torch only)
CASES = {
    "tan": (lambda s: torch.tan(s), torch.tan),
    "erf": (lambda s: torch.erf(s), torch.erf),
    "log1p": (lambda s: torch.log1p(s), torch.log1p),
    "expm1": (lambda s: s.expm1(), torch.expm1),
    "round": (lambda s: torch.round(s), torch.round),
    "round_builtin": (lambda s: round(s, 1), lambda x: torch.round(x, decimals=1)),
    "relu": (lambda s: F.relu(s, inplace=False), F.relu),
    "relu6": (lambda s: F.relu6(s), F.relu6),
    "leaky_relu": (lambda s: F.leaky_relu(s, 0.2), lambda x: F.leaky_relu(x, 0.2)),
    "silu": (lambda s: torch.nn.functional.silu(s), F.silu),
    "gelu": (lambda s: F.gelu(s), F.gelu),
    "gelu_tanh": (lambda s: F.gelu(s, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "softplus": (lambda s: F.softplus(s, beta=2.0, threshold=10.0), lambda x: F.softplus(x, 2.0, 10.0)),
    "sign": (lambda s: s * torch.sign(s - 0.5), lambda x: x * torch.sign(x - 0.5)),
    "special": (lambda s: torch.special.expit(s) + torch.special.erfc(s) + torch.special.ndtr(s),
                lambda x: torch.special.expit(x) + torch.special.erfc(x) + torch.special.ndtr(x)),
    "tanh_alias": (lambda s: 4.0 * tanh(s / 4.0) + torch.Tensor.tanh(s), lambda x: 4 * torch.tanh(x / 4) + x.tanh()),
    "ceil_trunc": (lambda s: torch.ceil(s) + s.trunc() + torch.fix(s * 0.5) + math.ceil(s) * 0.5,
                   lambda x: torch.ceil(x) + x.trunc() + torch.fix(x * 0.5) + torch.ceil(x) * 0.5),
    "div_modes": (lambda s: torch.div(s, 0.75, rounding_mode="floor") + torch.div(s, -0.75, rounding_mode="trunc")
                  + s.divide(2.0) + torch.true_divide(s, 4.0) + torch.div(s, 3.0, rounding_mode=None),
                  lambda x: torch.div(x, 0.75, rounding_mode="floor") + torch.div(x, -0.75, rounding_mode="trunc")
                  + x / 2 + x / 4 + x / 3),
    "fmod": (lambda s: torch.fmod(s, 1.5) + s.fmod(-2.5) + math.fmod(s, 0.5),
             lambda x: torch.fmod(x, 1.5) + torch.fmod(x, -2.5) + torch.fmod(x, 0.5)),
    "logaddexp": (lambda s: torch.logaddexp(s, 0.5 * s) + torch.logaddexp2(s, -s) + F.logsigmoid(s),
                  lambda x: torch.logaddexp(x, 0.5 * x) + torch.logaddexp2(x, -x) + F.logsigmoid(x)),
    "nan_to_num": (lambda s: torch.nan_to_num(s, nan=0.5, posinf=7.0, neginf=-7.0) + s.nan_to_num(1.0, 2.0, -2.0),
                   lambda x: torch.nan_to_num(x, 0.5, 7.0, -7.0) + torch.nan_to_num(x, 1.0, 2.0, -2.0)),
    "tests": (lambda s: torch.where(torch.isnan(s) | torch.isinf(s), 0.0, s) + torch.isfinite(s).float()
              + torch.isposinf(s).float() * 2 - torch.isneginf(s).float() + math.isnan(s) * 3.0,
              lambda x: torch.where(x.isnan() | x.isinf(), 0.0, x) + x.isfinite().double() + x.isposinf() * 2.0
              - x.isneginf().double() + x.isnan() * 3.0),
    "square_clamp": (lambda s: torch.square(s) * 0.1 + torch.clamp_min(s, -1.0) + s.clamp_max(2.0),
                     lambda x: x.square() * 0.1 + x.clamp_min(-1.0) + x.clamp_max(2.0)),
    "compare": (lambda s: torch.where(s.ge(0.5) & torch.lt(s, 2.0) | s.eq(-1.0) | torch.greater(s, 50.0), s, -s)
                + torch.ne(s, 0.0).float() + s.less_equal(0.25).type_as(s),
                lambda x: torch.where((x >= 0.5) & (x < 2.0) | (x == -1.0) | (x > 50.0), x, -x) + (x != 0).double()
                + (x <= 0.25).double()),
    "constants": (lambda s: s + torch.zeros_like(s) + torch.ones_like(s) * 2 + torch.tensor(0.5)
                  + torch.full_like(s, -1.25) + torch.scalar_tensor(3) + torch.tensor(True, dtype=torch.float32),
                  lambda x: x + 2.0 + 0.5 - 1.25 + 3 + 1),
}  # fmt: skip

# inputs with edge behaviour: tiny and huge magnitudes, exact halves, a float32 just below 0.5, 2^23 + 1,
# the series/log switch points of log1p and expm1, near tan's poles, the domain edge of log1p, infinities, NaN
EDGES = [0.0, 1e-30, -1e-30, 1e-7, -1e-7, 1e-3, -1e-3, 0.2499, 0.2501, -0.2499, -0.2501, 0.4999, 0.5001, -0.4999,
         -0.5001, 0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 8388609.0, 1.5707963, -1.5707964, 4.712389, 30.0, -30.0,
         88.0, -88.0, 1e4, -1e4, -0.999999, -1.0, -1.5, math.inf, -math.inf, math.nan]  # fmt: skip


def score_mod_of(body):
    return fc.as_mod(lambda score, b, h, q_idx, kv_idx: body(score), "score")


def edge_inputs(randn) -> torch.Tensor:
    return torch.cat([torch.tensor(EDGES), randn(200) * 3, randn(50) * 1e-4, randn(50) * 40])


def expected(f64, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, derivative) of the float64 function at float32 points, rounded to float32 as torch would store them."""
    x = x.double().requires_grad_()
    y = f64(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach().float(), dy.float()


def assert_matches(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, rtol: float = 2e-5) -> None:
    got = got.float()  # a constant derivative (round's 0) evaluates as a float64 literal
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, equal_nan=True,
                               msg=lambda m: f"{m}\nworst input: {x[(got - want).abs().nan_to_num(0).argmax()]}")


# ---------------------------------------------------------------- element by element


@pytest.mark.parametrize("name", CASES)
def test_evaluator_matches_torch(name, randn):
    body, f64 = CASES[name]
    mod = score_mod_of(body)
    x = edge_inputs(randn)
    x = x[x.abs() < 1.55] if name in ("tan",) else x  # past the first pole: covered by the interval test
    want, dwant = expected(f64, x)
    env = {"score": x, "b": torch.tensor(0), "h": torch.tensor(0), "q_idx": torch.tensor(0), "kv_idx": torch.tensor(0)}
    for root in (mod.raw_ir, mod.ir):
        assert_matches(evaluate(root, env).expand_as(x), want, x)
    grad_root = score_grad(mod.ir)
    finite = want.isfinite() & dwant.isfinite()
    assert_matches(evaluate(grad_root, env).expand_as(x)[finite], dwant[finite], x[finite], rtol=1e-4)


def triton_elementwise(root: Node, x: torch.Tensor, tmp_path) -> torch.Tensor:
    """`root` (a function of the ARG score) rendered by codegen's op table into a one-line kernel, run on x."""
    lines, (result,) = render_block([root], {arg("score"): "score"}, "v", (), "buf")
    source = "\n".join(["import triton", "import triton.language as tl", PRELUDE, "@triton.jit",
                        "def apply(x_ptr, out_ptr, N: tl.constexpr):", "    i = tl.arange(0, N)",
                        "    score = tl.load(x_ptr + i)", *lines, f"    tl.store(out_ptr + i, {result} + tl.zeros_like(score))"])
    path = tmp_path / f"elementwise_{abs(hash(root))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    n = 1 << (len(x) - 1).bit_length()
    padded = torch.cat([x, x.new_zeros(n - len(x))])
    out = torch.empty_like(padded)
    module.apply[(1,)](padded, out, n)
    return out[: len(x)]


@pytest.mark.parametrize("name", CASES)
def test_triton_rendering_matches_torch(name, randn, tmp_path):
    body, f64 = CASES[name]
    mod = score_mod_of(body)
    x = edge_inputs(randn)
    x = x[x.abs() < 1.55] if name == "tan" else x
    want, dwant = expected(f64, x)
    assert_matches(triton_elementwise(mod.ir, x, tmp_path), want, x)
    finite = want.isfinite() & dwant.isfinite()
    got = triton_elementwise(score_grad(mod.ir), x, tmp_path)
    assert_matches(got[finite], dwant[finite], x[finite], rtol=1e-4)


# ---------------------------------------------------------------- interval rules


NEW_OPS = [Op.TAN, Op.ERF, Op.LOG1P, Op.EXPM1, Op.ROUND]


@pytest.mark.parametrize("op", NEW_OPS, ids=lambda op: op.value)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 4.0, 100.0])
def test_interval_rule_is_sound(op, magnitude, rng):
    n, points = 400, 64
    ends = (torch.randn(2, n, generator=rng, dtype=torch.float64) * magnitude).float().double()
    lo, hi = ends.min(0).values, ends.max(0).values
    node = Node(op, DType.F32, (arg("score"),))
    analyzer = Analyzer({"score": (lo.view(1, 1, 1, n), hi.view(1, 1, 1, n))}, {})
    rule_lo, rule_hi = (t.reshape(n) for t in analyzer.ival(node))
    t = torch.rand(points, n, generator=rng, dtype=torch.float64)
    inside = (lo + t * (hi - lo)).float().clamp(lo.float(), hi.float())
    values = OP_TABLE[op](inside).double()
    known = ~(rule_lo.isnan() | rule_hi.isnan())  # NaN bounds mean "anything, NaN included"
    assert known.any()
    ok = (values >= rule_lo) & (values <= rule_hi)
    assert ok[:, known].all(), f"{op.value}: {inside[:, known][~ok[:, known]][:4]} escape their interval"


def test_tan_interval_spanning_a_pole_is_unbounded():
    lo, hi = torch.tensor([1.0, -0.5]).double().view(1, 1, 1, 2), torch.tensor([2.0, 0.5]).double().view(1, 1, 1, 2)
    rule_lo, rule_hi = Analyzer({"score": (lo, hi)}, {}).ival(Node(Op.TAN, DType.F32, (arg("score"),)))
    assert rule_lo.flatten()[0] == -math.inf and rule_hi.flatten()[0] == math.inf  # (1, 2) contains pi/2
    assert -0.6 < rule_lo.flatten()[1] < -0.54 and 0.54 < rule_hi.flatten()[1] < 0.6  # tan(0.5) = 0.546


# ---------------------------------------------------------------- whole attention calls


def run_attention(score_mod, block_mask, randn, backend, L=32):
    q, k, v = (randn(1, 2, L, 16, requires_grad=True) for _ in range(3))
    out = fc.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, backend=backend)
    dout = randn(*out.shape)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    return (q, k, v, dout), out, grads


def check_against_naive(inputs, out, grads, score_fn=None, mask_fn=None):
    q, k, v, dout = inputs
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = naive_attention(*ref, score_fn=score_fn, mask_fn=mask_fn)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), ref)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=5e-4, msg=lambda m, n=name: f"d{n}: {m}")
        assert want.abs().max() > 0


SCALES = {"log1p": 0.5, "tan": 0.25, "expm1": 1.0}  # inside the domain / first branch; tan's pole 6 sigma away
# round's, ceil's, trunc's and a rounded division's scores are piecewise constant (no gradient to compare) and a
# float32 score may land on the other side of a step than the float64 one: checked element by element above and as
# masks below
STEPS = ("round", "ceil_trunc", "div_modes")
SMOOTH_CASES = [name for name in CASES if not name.startswith(STEPS)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", SMOOTH_CASES)
def test_score_mod_attention(name, backend, randn):
    body, f64 = CASES[name]
    c = SCALES.get(name, 3.0)  # scores of several units: the functions' interesting range
    positive = name == "log1p"
    mod = fc.as_mod(lambda score, b, h, q_idx, kv_idx: body(score.abs() * c if positive else score * c), "score")
    inputs, out, grads = run_attention(mod, None, randn, backend)
    score_fn = lambda s, b, h, i, j: f64(s.abs() * c if positive else s * c)
    check_against_naive(inputs, out, grads, score_fn=score_fn)


def integer_divisions(score, b, h, q_idx, kv_idx):
    d = q_idx - kv_idx  # both signs, over divisors of both signs: C's and Python's rounding differ exactly there
    return (score + torch.div(d, 3, rounding_mode="trunc") * 0.3 + torch.fmod(d, -5) * 0.2
            + torch.div(d, -4, rounding_mode="floor") * 0.1 + torch.remainder(-d, -3) * 0.05 + d.fmod(4) * 0.01)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_integer_division_modes_in_scores(backend, randn):
    """torch.div's rounding modes and C's fmod on ints of both signs (int64 in torch, int32 in the kernels)."""
    inputs, out, grads = run_attention(fc.score_mod(integer_divisions), None, randn, backend)
    check_against_naive(inputs, out, grads, score_fn=integer_divisions)


# masks written with the new functions: (mask, the same on int64 index tensors in torch)
MASKS = {
    "trunc_div": (lambda b, h, q, kv: torch.div(q - kv, 5, rounding_mode="trunc") == 0,  # |q - kv| < 5
                  lambda b, h, q, kv: torch.div(q - kv, 5, rounding_mode="trunc") == 0),
    "fmod_stride": (lambda b, h, q, kv: (torch.fmod(kv - q, 4) == 0) & torch.le(kv, q),
                    lambda b, h, q, kv: (torch.fmod(kv - q, 4) == 0) & (kv <= q)),
    "bitwise_lanes": (lambda b, h, q, kv: torch.bitwise_and(q, 3).eq(torch.bitwise_and(kv, 3))
                      | torch.logical_xor(q >= 16, kv >= 16),
                      lambda b, h, q, kv: ((q & 3) == (kv & 3)) | ((q >= 16) ^ (kv >= 16))),
    "round_blocks": (lambda b, h, q, kv: torch.round(q / 4.0) >= torch.round(kv / 4.0),
                     lambda b, h, q, kv: torch.round(q / 4.0) >= torch.round(kv / 4.0)),
    "relu_window": (lambda b, h, q, kv: (F.relu(q - kv) <= 8) & (torch.sign(q - kv) >= 0),
                    lambda b, h, q, kv: ((q - kv).clamp(min=0) <= 8) & ((q - kv) >= 0)),
    "erf_band": (lambda b, h, q, kv: torch.erf((q - kv) / 6.0) > -0.5,
                 lambda b, h, q, kv: torch.erf((q - kv) / 6.0) > -0.5),
    "log1p_expm1": (lambda b, h, q, kv: torch.log1p(torch.abs(q - kv) * 1.0) < math.expm1(1.0),
                    lambda b, h, q, kv: torch.log1p((q - kv).abs().double()) < math.expm1(1.0)),
}  # fmt: skip


def dense_tiles(mask_fn, L: int, block: int) -> torch.Tensor:
    idx = torch.arange(L)
    keep = mask_fn(0, 0, idx.view(-1, 1), idx.view(1, -1)).view(L // block, block, L // block, block)
    return torch.where(keep.all(3).all(1), 2, torch.where(keep.any(3).any(1), 1, 0))


@pytest.mark.parametrize("name", MASKS)
def test_mask_tiles_sound_and_exact(name):
    body, torch_fn = MASKS[name]
    mask = fc.as_mod(lambda b, h, q_idx, kv_idx: body(b, h, q_idx, kv_idx), "mask")
    L, block = 128, 16
    want = dense_tiles(torch_fn, L, block)
    exact = tile_map(fc.create_block_mask(mask, 1, 1, L, L, device="cpu", BLOCK_SIZE=block))[0, 0]
    assert torch.equal(exact.long(), want)  # so it visits no more tiles than torch's create_block_mask
    analysed = tile_map(fc.create_block_mask(mask, 1, 1, L, L, device="cpu", BLOCK_SIZE=block, exact=False))[0, 0]
    decided = analysed.long() != 1
    assert torch.equal(analysed.long()[decided], want[decided])  # the interval rules never misclassify a tile


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", MASKS)
def test_mask_attention(name, backend, randn):
    body, torch_fn = MASKS[name]
    mask = fc.as_mod(lambda b, h, q_idx, kv_idx: body(b, h, q_idx, kv_idx), "mask")
    softcap = fc.as_mod(lambda score, b, h, q_idx, kv_idx: F.gelu(score, approximate="tanh"), "score")
    block_mask = fc.create_block_mask(mask, 1, 2, 32, 32, device="cpu", BLOCK_SIZE=16)
    inputs, out, grads = run_attention(softcap, block_mask, randn, backend)
    check_against_naive(inputs, out, grads, score_fn=lambda s, *_: F.gelu(s, approximate="tanh"), mask_fn=torch_fn)


# ---------------------------------------------------------------- a fully masked call


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("how", ["block_mask", "mask_mod"])
def test_fully_masked_call_has_zero_gradients(backend, how, randn):
    causal = fc.as_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "mask")
    neg_causal = fc.as_mod(lambda b, h, q_idx, kv_idx: q_idx < kv_idx, "mask")
    nothing = fc.and_masks(causal, neg_causal)
    bias = randn(2, requires_grad=True)
    score_mod = fc.as_mod(lambda score, b, h, q_idx, kv_idx: score + bias[h], "score")
    q, k, v = (randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    masks = {"block_mask": fc.create_block_mask(nothing, 1, 2, 32, 32, device="cpu")} if how == "block_mask" else {
        "mask_mod": nothing}
    out, lse = fc.flex_attention(q, k, v, score_mod=score_mod, backend=backend, return_lse=True, **masks)
    assert out.requires_grad and torch.equal(out, torch.zeros_like(out)) and (lse == -math.inf).all()
    (out * randn(*out.shape)).sum().backward()
    for t in (q, k, v, bias):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


# ---------------------------------------------------------------- refusals


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x**3

    @staticmethod
    def backward(ctx, g):
        return g


def test_autograd_function_is_refused_with_advice():
    with pytest.raises(fc.UnsupportedConstructError, match="autograd.Function") as info:
        fc.as_mod(lambda score, b, h, q_idx, kv_idx: Cube.apply(score), "score")
    assert "derives" in str(info.value) and "Cube.apply" in str(info.value)


@pytest.mark.parametrize("call, message", [
    (lambda s: F.relu(s, inplace=True), "inplace=True"),
    (lambda s: F.gelu(s, approximate="erf"), "approximate='erf'"),
    (lambda s: F.softplus(s, beta=s), "must be a constant"),
    (lambda s: F.leaky_relu(s, 0.1, False, 3), "takes"),
    (lambda s: torch.round(s, decimals=0.5), "decimals must be an int"),
    (lambda s: torch.div(s, 2.0, rounding_mode="ceil"), "rounding_mode='ceil'"),
    (lambda s: torch.full_like(s), "full_like` takes"),
    (lambda s: s + torch.tensor(s), "in a mod takes a number known"),
    (lambda s: torch.zeros_like(s, requires_grad=True), "requires_grad=True"),
])  # fmt: skip
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(fc.FlexcompError, match=message.replace("(", r"\(")) as info:
        score_mod_of(call).ir  # noqa: B018 (lowering happens on first access)
    assert "test_math_ops.py" in str(info.value)  # file, line and caret of the user's call
