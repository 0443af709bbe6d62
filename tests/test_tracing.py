"""Mods without a source file (built by exec/compile, typed at a REPL, `python -c`) are traced on stand-ins: the
traced IR equals the IR parsed from the same text in a file, they compute what the Python functions compute
(float64 reference, on the reference backend and the Triton interpreter), and what tracing cannot see is refused
with what to write instead."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from naive import assert_close_to_reference

import flexcomp as fc
import flexcomp.mods as fm
from flexcomp.errors import FlexcompTypeError, SignatureError, UndefinedNameError, UnsupportedConstructError
from flexcomp.evaluate import evaluate
from flexcomp.frontend import lower_function

# The same text is imported from a file (parsed) and exec'd from a string (traced).
MODS = """
import functools
import math

import torch

import flexcomp as fc

H, L = 4, 64
W = 8
OFFSET = L - 1
SLOPES = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32))
BIAS = torch.randn(H, 2 * L - 1)
BUCKET = torch.randint(0, 2 * L - 1, (2 * L - 1,))
DOC = torch.randint(0, 3, (L,)).sort().values
PREFIX = torch.tensor([5, 20])
SCALE = torch.tensor(0.75)
CAP = 20.0


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(window):
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return sliding


sliding = sliding_window(W)


def document(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= PREFIX[b]) | (q_idx >= kv_idx)


def constants_first(b, h, q_idx, kv_idx):
    return (2 <= kv_idx) & (W > q_idx - kv_idx) & (q_idx >= kv_idx)  # Python runs `2 <= kv` as `kv >= 2`


def rel(q, k):
    return q - k


def dilated(b, h, q_idx, kv_idx):
    d = rel(q_idx, kv_idx)
    return ~(d < 0) & ((d // 2) % 3 == 0) ^ (h == 1)


CAUSAL = fc.mask_mod(causal)


def causal_even(b, h, q_idx, kv_idx):
    return CAUSAL(b, h, q_idx, kv_idx) & (kv_idx % 2 == 0)


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * abs(q_idx - kv_idx)


softcap = lambda score, b, h, q_idx, kv_idx: torch.tanh(score / CAP) * CAP


def t5(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, BUCKET[q_idx - kv_idx + OFFSET]]


def mixed(score, b, h, q_idx, kv_idx):
    near = torch.clamp(q_idx - kv_idx, min=0, max=7).float()
    capped = torch.minimum(score * SCALE, SCALE * score + 1) + near.sqrt() * 0.5
    return torch.where(q_idx >= kv_idx, capped, score.exp().log() - 2 * h)


def methods(score, b, h, q_idx, kv_idx):
    d = (q_idx - kv_idx).to(torch.float32)
    return (1 - score.sigmoid()) * d.abs() ** 2 * 0.01 + score.clamp(max=2.0) + pow(score, 2)


def masked_score(score, b, h, q_idx, kv_idx):
    return torch.where(kv_idx <= q_idx, score, -math.inf)


def windowed(b, h, q_idx, kv_idx, window):
    return (q_idx - kv_idx).abs() <= window


window5 = functools.partial(windowed, window=5)
"""

MASKS = ["causal", "sliding", "document", "prefix_lm", "constants_first", "dilated", "causal_even", "window5"]
SCORES = ["alibi", "softcap", "t5", "mixed", "methods", "masked_score"]
FOLDED = {"masked_score"}  # Python folds `-math.inf` while tracing; the parser's NEG(inf) folds in `optimize`


def load_parsed(tmp_dir) -> types.ModuleType:
    path = tmp_dir / "parsed_mods.py"
    path.write_text(MODS)
    spec = importlib.util.spec_from_file_location("parsed_mods", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exec_traced() -> dict:
    namespace: dict = {}
    exec(compile(MODS, "<no source>", "exec"), namespace)  # noqa: S102 (a mod without a source file is the point)
    return namespace


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> types.ModuleType:
    return load_parsed(tmp_path_factory.mktemp("mods"))


@pytest.fixture(scope="module")
def traced() -> dict:
    return exec_traced()


def mod_of(value, kind: str) -> fm.Mod:
    return fm.score_mod(value) if kind == "score" else fm.mask_mod(value)


def unwrap(fn):
    return fn.func if isinstance(fn, functools.partial) else fn


# ---------------------------------------------------------------- the traced IR is the parsed IR


@pytest.mark.parametrize("name, kind", [(n, "mask") for n in MASKS] + [(n, "score") for n in SCORES])
def test_traced_ir_equals_parsed_ir(name, kind, parsed, traced):
    with pytest.raises(OSError):
        inspect.getsource(unwrap(traced[name]))  # no source: this one is traced
    from_file, from_trace = mod_of(getattr(parsed, name), kind), mod_of(traced[name], kind)
    assert from_trace.ir == from_file.ir, f"{name}\nparsed:\n{from_file.ir}\ntraced:\n{from_trace.ir}"
    if name not in FOLDED:
        assert from_trace.raw_ir == from_file.raw_ir, f"{name}\nparsed:\n{from_file.raw_ir}\ntraced:\n{from_trace.raw_ir}"
    assert from_trace.buffers == from_file.buffers
    assert from_trace.key == from_file.key  # the same kernels
    assert from_trace.loc.file == "<no source>"
    assert from_trace.loc.line == unwrap(traced[name]).__code__.co_firstlineno


def test_a_lambda_made_by_eval_is_traced(rng):
    made_by_eval = eval("lambda b, h, q, kv: q >= kv")  # as at a plain REPL: no file to read the lambda from
    mod = fm.mask_mod(made_by_eval)
    assert str(mod.ir) == str(fm.mask_mod(lambda b, h, q, kv: q >= kv).ir)
    q, kv = torch.randint(-9, 9, (2, 100), generator=rng)
    assert torch.equal(evaluate(mod.ir, {"q_idx": q, "kv_idx": kv}, {}), q >= kv)


# ---------------------------------------------------------------- traced mods compute what the functions compute


def attention_case(traced, randn, score: str | None, mask: str | None):
    B, H, L, D = 2, traced["H"], traced["L"], 16
    q, k, v = randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D)
    score_fn = traced[score] if score else None
    mask_fn = traced[mask] if mask else None
    block_mask = fc.create_block_mask(mask_fn, B, H, L, L, device="cpu", BLOCK_SIZE=32) if mask_fn else None
    return (q, k, v), score_fn, mask_fn, block_mask


@pytest.mark.parametrize("score, mask", [(None, m) for m in MASKS] + [(s, None) for s in SCORES]
                         + [("t5", "document"), ("mixed", "prefix_lm")])  # fmt: skip
def test_reference_backend_matches_float64(score, mask, traced, randn, naive_attention):
    (q, k, v), score_fn, mask_fn, block_mask = attention_case(traced, randn, score, mask)
    want, want_lse = naive_attention(q, k, v, score_fn, mask_fn)  # the Python functions themselves, in float64
    out, lse = fc.flex_attention(q, k, v, score_fn, block_mask, return_lse=True, backend="reference")
    assert_close_to_reference(out, lse, want, want_lse)


@pytest.mark.parametrize("score, mask", [("t5", "sliding"), ("mixed", "dilated"), ("masked_score", "window5")])
def test_triton_interpreter_matches_float64(score, mask, traced, randn, naive_attention):
    (q, k, v), score_fn, mask_fn, block_mask = attention_case(traced, randn, score, mask)
    want, want_lse = naive_attention(q, k, v, score_fn, mask_fn)
    out, lse = fc.flex_attention(q, k, v, score_fn, block_mask, return_lse=True, backend="triton")
    assert_close_to_reference(out, lse, want, want_lse)


def test_gradients_reach_a_traced_mods_captured_tensor(randn, naive_attention):
    bias = randn(2, 32, requires_grad=True)
    fn = exec_mod("def biased(score, b, h, q, kv):\n    return score + BIAS[h, kv] * (q >= kv)\n", BIAS=bias)
    q, k, v = (randn(1, 2, 32, 8) for _ in range(3))
    fc.flex_attention(q, k, v, score_mod=fn, backend="reference").square().sum().backward()
    got, bias.grad = bias.grad, None
    assert got.abs().sum() > 0
    naive_attention(q, k, v, fn)[0].square().sum().backward()
    torch.testing.assert_close(got.double(), bias.grad.double(), atol=1e-5, rtol=1e-5)


def test_a_tensor_bound_by_functools_partial_is_a_buffer(randn, rng):
    table = randn(4)
    fn = exec_mod("def s(score, b, h, q, kv, table):\n    return score + table[h]\n")
    mod = fm.score_mod(functools.partial(fn, table=table))
    assert [(s.name, s.shape) for s in mod.buffers] == [("table", (4,))] and mod.tensors()["table"] is table
    h = torch.randint(0, 4, (50,), dtype=torch.int32, generator=rng)
    score = torch.randn(50, generator=rng)
    assert torch.equal(evaluate(mod.ir, {"score": score, "h": h}, mod.tensors()), score + table[h])


def test_a_rebound_tensor_of_another_shape_is_traced_again(traced, randn):
    namespace = exec_traced()
    mod = fm.score_mod(namespace["alibi"])
    assert mod.buffers[0].shape == (4,)
    namespace["SLOPES"] = randn(6)
    variant = mod.specialized()
    assert variant.buffers[0].shape == (6,) and variant.loc.file == "<no source>"


def test_traced_mods_guard_the_scalars_they_read(traced):
    guards = {(g.name, g.where()): g.value for g in lower_function(traced["sliding"], "mask").guards}
    assert guards[("window", "closure variable")] == traced["W"]
    guards = {(g.name, g.where()): g for g in lower_function(traced["t5"], "score").guards}
    assert guards[("OFFSET", "global")].value == traced["L"] - 1
    assert ("BIAS", "global") not in guards  # tensors are read live, not guarded
    guards = {g.name for g in lower_function(traced["window5"], "mask").guards}
    assert "window" not in guards  # a partial's bound value cannot be rebound


def test_traced_activations_take_torchs_keywords(rng):
    traced = fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n"
                                   "    return torch.nn.functional.gelu(score, approximate='tanh') + torch.sign(score)\n"))
    score = torch.randn(100, generator=rng)
    want = torch.nn.functional.gelu(score, approximate="tanh") + torch.sign(score)
    torch.testing.assert_close(evaluate(traced.ir, {"score": score}, {}), want)


def test_traced_compositions_take_torchs_signatures(rng):
    """Two-input functions with keyword parameters, C's remainder and constructors, traced as parsed."""
    traced = fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n"
                                   "    d = torch.div(q - kv, -3, rounding_mode='trunc') + torch.fmod(q - kv, 4)\n"
                                   "    return torch.logaddexp(score, torch.zeros_like(score)) + d\n"))
    score = torch.randn(100, generator=rng)
    q, kv = (torch.randint(0, 50, (100,), dtype=torch.int32, generator=rng) for _ in range(2))
    d = torch.div(q - kv, -3, rounding_mode="trunc") + torch.fmod(q - kv, 4)
    got = evaluate(traced.ir, {"score": score, "q_idx": q, "kv_idx": kv}, {})
    torch.testing.assert_close(got, torch.logaddexp(score, torch.zeros_like(score)) + d)


def test_a_rebound_scalar_of_a_traced_mod_is_seen_at_the_next_call(rng):
    namespace = {"torch": torch, "W": 4}
    exec(compile("def m(b, h, q, kv):\n    return (q >= kv) & (q - kv < W)\n", "<repl>", "exec"), namespace)  # noqa: S102
    mod = fm.mask_mod(namespace["m"])
    q = torch.randint(0, 64, (200,), dtype=torch.int32, generator=rng)
    kv = torch.randint(0, 64, (200,), dtype=torch.int32, generator=rng)
    for window in (4, 17):
        namespace["W"] = window
        live = mod.specialized()
        assert torch.equal(evaluate(live.ir, {"q_idx": q, "kv_idx": kv}, live.tensors()), (q >= kv) & (q - kv < window))


PYTHON_C = """
import torch, flexcomp as fc
BIAS = torch.randn(2, 48)
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
bias = lambda score, b, h, q_idx, kv_idx: score + BIAS[h, kv_idx]
q, k, v = (torch.randn(1, 2, 48, 8, dtype=torch.float64) for _ in range(3))
out = fc.flex_attention(q, k, v, score_mod=bias, block_mask=fc.create_block_mask(causal, 1, 2, 48, 48, device="cpu"))
s = q @ k.transpose(-1, -2) / 8 ** 0.5 + BIAS[None, :, None, :].double()
s = s.masked_fill(torch.ones(48, 48, dtype=torch.bool).tril().logical_not(), float("-inf"))
print("max_err", (out - s.softmax(-1) @ v).abs().max().item())
try:
    fc.mask_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx if h else False)
except fc.FlexcompError as e:
    print(e)
"""


def test_python_dash_c_def_and_lambda():
    run = subprocess.run([sys.executable, "-c", PYTHON_C], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    max_err = float(run.stdout.split("max_err ")[1].split()[0])
    assert max_err < 1e-5, run.stdout
    assert 'File "<string>", line 13' in run.stdout and "torch.where(cond, a, b)" in run.stdout, run.stdout


REPL_SESSION = """
import torch, flexcomp as fc
BIAS = torch.randn(2, 40, dtype=torch.float64)
def window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 5

bm = fc.create_block_mask(window, 1, 2, 40, 40, device="cpu", BLOCK_SIZE=16)
q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
out = fc.flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s * BIAS[h, q_idx], block_mask=bm)
i = torch.arange(40)
s = (q @ k.transpose(-1, -2) / 8 ** 0.5) * BIAS[None, :, :, None]
s = s.masked_fill((i[:, None] - i[None, :]).abs() > 5, float("-inf"))
print("max_err", (out - s.softmax(-1) @ v).abs().max().item(), bm.mask_mod.loc.file)
"""


def test_plain_repl_def_and_lambda():
    run = subprocess.run([sys.executable, "-i"], input=REPL_SESSION, check=False, capture_output=True, text=True,
                         timeout=120)  # `-i` with a piped stdin: the interactive loop, statement by statement
    assert "Traceback" not in run.stderr, run.stderr
    max_err, file = run.stdout.split("max_err ")[1].split()[:2]
    assert float(max_err) < 1e-5 and file == "<stdin>", run.stdout


# ---------------------------------------------------------------- what tracing cannot see is refused


def exec_mod(text: str, **globals_):
    """The last function that `text` defines, built by exec: it has no source file."""
    namespace = {"torch": torch, **globals_}
    exec(compile(textwrap.dedent(text), "<typed at a REPL>", "exec"), namespace)  # noqa: S102
    return [v for v in namespace.values() if isinstance(v, types.FunctionType)][-1]


REFUSALS = [
    ("if", "def m(b, h, q, kv):\n    if q > kv:\n        return True\n    return False\n", 2, "Python `if`",
     "torch.where"),
    ("and", "def m(b, h, q, kv):\n    return q >= kv and kv >= 0\n", 2, "`and`/`or`/`not`", "& | ~"),
    ("not", "m = lambda b, h, q, kv: not (q < kv)\n", 1, "`and`/`or`/`not`", "& | ~"),
    ("chain", "def m(b, h, q, kv):\n    return 0 <= q - kv < 4\n", 2, "chained comparison", "(a < b) & (b < c)"),
    ("ifexp", "m = lambda b, h, q, kv: q >= kv if h == 0 else q <= kv\n", 1, "x if c else y", "torch.where"),
    ("min", "def m(b, h, q, kv):\n    return min(q, kv) > 2\n", 2, "`min()`/`max()`", "torch.minimum"),
    ("int", "def m(b, h, q, kv):\n    return int(q) > kv\n", 2, "`int()`", "x.int()"),
    ("loop", "def m(b, h, q, kv):\n    for i in range(q):\n        kv = kv + i\n    return kv > 0\n", 2,
     "loop bound", "must not depend"),
    ("math", "import math\ndef m(b, h, q, kv):\n    return math.exp(q) > kv\n", 3, "`math.` function", "torch.exp"),
]  # fmt: skip


@pytest.mark.parametrize("case, text, line, words, hint", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_tracing_cannot_see_says_what_to_write(case, text, line, words, hint):
    fn = exec_mod(text)
    with pytest.raises(UnsupportedConstructError) as info:
        fm.mask_mod(fn)
    err = info.value
    assert words in err.message and hint in err.hint, str(err)
    assert repr(fn.__name__) in err.message and "traced" in err.message
    assert (err.loc.file, err.loc.line, err.loc.function) == ("<typed at a REPL>", line, fn.__name__), str(err)
    assert "def" not in err.hint  # nothing recommends what fails without a source file
    assert "Traceback" not in str(err)


def test_unsupported_torch_function_and_attribute():
    with pytest.raises(UnsupportedConstructError, match=r"`torch.lgamma` is not supported in a mod \(tracing 's'\)"):
        fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return torch.lgamma(score)\n"))
    with pytest.raises(UnsupportedConstructError, match=r"attribute `.shape` of a traced f32 value") as info:
        fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return score * score.shape[0]\n"))
    assert info.value.loc.line == 2


def test_chained_indexing_is_one_load():
    table = torch.randn(4, 8)
    chained = fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return score + TABLE[h][kv % 8]\n", TABLE=table))
    joined = fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return score + TABLE[h, kv % 8]\n", TABLE=table))
    assert chained.raw_ir == joined.raw_ir and chained.buffers == joined.buffers


def test_captured_tensor_errors():
    table = torch.randn(4, 8)
    with pytest.raises(FlexcompTypeError, match=r"'TABLE' has 2 dims \(shape \(4, 8\)\) but is indexed with 1"):
        fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return score + TABLE[h]\n", TABLE=table))
    with pytest.raises(FlexcompTypeError, match=r"index into 'TABLE' must be an int, got f32") as info:
        fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return TABLE[h, score]\n", TABLE=table))
    assert "x.int()" in info.value.hint and "int(...)" not in info.value.hint
    with pytest.raises(UnsupportedConstructError, match="not one of its globals, closure variables"):
        fm.mask_mod(exec_mod("def m(b, h, q, kv):\n    return torch.arange(10)[q] > kv\n"))
    with pytest.raises(UnsupportedConstructError, match="computed from captured tensors alone"):
        fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return score + TABLE[0, 0] * 2\n", TABLE=table))
    with pytest.raises(UnsupportedConstructError, match="indexing captured tensor 'TABLE' with slice"):
        fm.score_mod(exec_mod("def s(score, b, h, q, kv):\n    return score + TABLE[h, :]\n", TABLE=table))


def test_signature_and_python_errors_point_at_the_line():
    with pytest.raises(SignatureError, match=r"a mask_mod takes 4 parameters .*'m' takes 3"):
        fm.mask_mod(exec_mod("def m(b, q, kv):\n    return q >= kv\n"))
    with pytest.raises(UnsupportedConstructError, match="a mod takes plain parameters"):
        fm.mask_mod(exec_mod("def m(b, h, q, kv=0):\n    return q >= kv\n"))
    with pytest.raises(UndefinedNameError, match="'NOWHERE' is not defined") as info:
        fm.mask_mod(exec_mod("def m(b, h, q, kv):\n    x = q\n    return x >= NOWHERE\n"))
    assert info.value.loc.line == 3
    with pytest.raises(UnsupportedConstructError, match=r"tracing 'm' failed: ZeroDivisionError") as info:
        fm.mask_mod(exec_mod("def m(b, h, q, kv):\n    return q >= kv + 1 // 0\n"))
    assert info.value.loc.line == 2
    with pytest.raises(FlexcompTypeError, match="a mask_mod must return a bool, this returns i32"):
        fm.mask_mod(exec_mod("def m(b, h, q, kv):\n    return q - kv\n"))


# ---------------------------------------------------------------- mixing parsed and traced code


@fc.mask_mod
def banded(b, h, q_idx, kv_idx):
    if q_idx < kv_idx:  # a Python `if`: fine in a parsed mod, and a traced mod calling it inlines its IR
        return False
    return q_idx - kv_idx < 6


def calls_banded(b, h, q_idx, kv_idx):
    return banded(b, h, q_idx, kv_idx) | (kv_idx == 0)


def test_a_traced_mod_calling_a_parsed_mod_inlines_its_ir():
    traced = fm.mask_mod(exec_mod("def calls_banded(b, h, q_idx, kv_idx):\n"
                                  "    return banded(b, h, q_idx, kv_idx) | (kv_idx == 0)\n", banded=banded))
    assert traced.raw_ir == fm.mask_mod(calls_banded).raw_ir
    assert traced.loc.file == "<typed at a REPL>"


SOURCELESS_REL = exec_mod("def rel(q, k, scale=2):\n    return (q - k) * scale\n")


def uses_sourceless_helper(b, h, q_idx, kv_idx):
    return SOURCELESS_REL(q_idx, kv_idx, scale=3) < 5


def helper_written_out(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) * 3 < 5


def test_a_parsed_mod_calling_a_helper_without_source_traces_the_helper():
    assert fm.mask_mod(uses_sourceless_helper).raw_ir == fm.mask_mod(helper_written_out).raw_ir
