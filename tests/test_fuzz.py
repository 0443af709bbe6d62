"""Random mods, end to end: Python source drawn from the test's seed (int arithmetic on the indices with Python's
floor division and modulo, torch.div/fmod, captured-table lookups, comparisons and bit logic for the mask; float
functions of the score and the indices for the score_mod), written to a file, compiled by flexcomp (grammar,
passes, tile analysis, closed-form bounds or tables, generated kernels) and run forward and backward on the
reference backend and the Triton interpreter, against torch's own flex_attention on the same functions in float64
(the forward; torch has no CPU backward) and dense float64 attention (tests/naive.py: the gradients).

Every run draws new programs (FLEXCOMP_FUZZ_CASES of them, default 6); `FLEXCOMP_TEST_SEED=<seed>` replays a failure,
whose source the message prints."""

from __future__ import annotations

import importlib.util
import os
import random
import sys

import pytest
import torch
from naive import naive_attention
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flexcomp as fc

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1,
         "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16}  # fmt: skip
TABLE = 64  # length of the captured int table T (indexed modulo its length)
CASES = int(os.environ.get("FLEXCOMP_FUZZ_CASES", "6"))  # programs per run


class Program:
    """A random program's source, drawn from `rnd`: int and bool expressions of bounded depth."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd
        self.weights = [round(self.rnd.uniform(-1, 1), 3) for _ in range(8)]

    def const(self, lo: int = -6, hi: int = 6) -> str:
        return str(self.rnd.randint(lo, hi))

    def divisor(self) -> str:
        return str(self.rnd.choice([-7, -5, -3, -2, 2, 3, 4, 5, 7]))

    def ints(self, depth: int) -> tuple[str, bool]:
        """(an int expression, whether it is a tensor: torch's binary functions refuse two Python ints)."""
        leaves = [("q_idx", True), ("kv_idx", True), ("q_idx", True), ("kv_idx", True), ("h", True), ("b", True),
                  (self.const(), False)]  # fmt: skip
        if depth == 0 or self.rnd.random() < 0.25:
            return self.rnd.choice(leaves)
        (a, ta), (b, tb) = self.ints(depth - 1), self.ints(depth - 1)
        forms = [(f"({a} + {b})", ta or tb), (f"({a} - {b})", ta or tb), (f"({a} * {self.const(-3, 3)})", ta),
                 (f"({a} // {self.divisor()})", ta), (f"({a} % {self.divisor()})", ta), (f"abs({a})", ta),
                 (f"torch.where({self.bools(depth - 1)}, {a}, {b})", True), (f"T[({a}) % {TABLE}]", True)]
        if ta and tb:
            forms += [(f"torch.minimum({a}, {b})", True), (f"torch.maximum({a}, {b})", True)]
        if ta:
            forms += [(f"torch.div({a}, {self.divisor()}, rounding_mode='trunc')", True),
                      (f"torch.fmod({a}, {self.divisor()})", True)]
        return self.rnd.choice(forms)

    def structured(self) -> str:
        """The building blocks of real masks: causal, windows, per-request lengths, per-head starts, documents,
        block gates (they reach the closed forms, the row bounds and the interval tables)."""
        return self.rnd.choice([
            "(q_idx >= kv_idx)", f"((q_idx - kv_idx) < {self.rnd.randint(1, 40)})", "(kv_idx < LEN[b])",
            "(kv_idx >= START[h])", "(DOC[q_idx] == DOC[kv_idx])", "G[h, q_idx // 16, kv_idx // 16]",
            f"(q_idx // {self.rnd.choice([4, 16])} >= kv_idx // {self.rnd.choice([4, 16])})",
        ])  # fmt: skip

    def bools(self, depth: int) -> str:
        (a, ta), (b, _) = self.ints(max(depth - 1, 0)), self.ints(max(depth - 1, 0))
        compare = f"({a if ta else 'q_idx'} {self.rnd.choice(['<', '<=', '>', '>=', '==', '!='])} {b})"
        if self.rnd.random() < 0.35:
            return self.structured()
        if depth == 0 or self.rnd.random() < 0.4:
            return compare
        a, b = self.bools(depth - 1), self.bools(depth - 1)
        return self.rnd.choice([f"({a} & {b})", f"({a} | {b})", f"({a} ^ {b})", f"(~{a})", compare])

    def score(self) -> str:
        d, tensor = self.ints(2)
        d = d if tensor else "(q_idx - kv_idx)"  # torch.exp refuses a Python number
        terms = [
            f"score * {self.rnd.choice(['0.5', '1.5', '-1.0'])}",
            f"{self.rnd.choice(['2.0', '5.0'])} * torch.tanh(score / {self.rnd.choice(['2.0', '5.0'])})",
            f"score + ({d}) * 0.1",
            f"score * torch.exp(-abs({d}) * 0.05)",
            f"torch.where({self.bools(1)}, score, score * 0.25 - 1.0)",
            f"score + T[({d}) % {TABLE}] * 0.2",
            f"score + W[({d}) % {len(self.weights)}] * 0.5",  # a learnable table: its gradient is checked too
        ]
        return " + ".join(self.rnd.sample(terms, self.rnd.randint(1, 3)))

    def source(self) -> str:
        table = [self.rnd.randint(-9, 9) for _ in range(TABLE)]
        docs = sorted(self.rnd.randint(0, 9) for _ in range(128))
        gate = [[[self.rnd.random() < 0.5 for _ in range(8)] for _ in range(8)] for _ in range(4)]
        return (f"import torch\n\nT = torch.tensor({table}, dtype=torch.int32)\n"
                f"W = torch.tensor({self.weights}, requires_grad=True)\n"
                f"LEN = torch.tensor({[self.rnd.randint(1, 100) for _ in range(4)]})  # per request\n"
                f"START = torch.tensor({[self.rnd.randint(0, 60) for _ in range(4)]})  # per head\n"
                f"DOC = torch.tensor({docs})  # sorted document ids\n"
                f"G = torch.tensor({gate})  # [head, q block, kv block]\n\n\n"
                f"def mask(b, h, q_idx, kv_idx):\n    return {self.bools(3)}\n\n\n"
                f"def score(score, b, h, q_idx, kv_idx):\n    return {self.score()}\n")  # fmt: skip


def load(source: str, tmp_path, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", range(CASES))
def test_random_mods_match_torch(case, rng, tmp_path):
    rnd = random.Random(int(torch.randint(2**62, (), generator=rng)))
    source = Program(rnd).source()
    module = load(source, tmp_path, f"fuzz_{case}_{rnd.randrange(10**9)}")
    B, Hkv, group = 2, 2, rnd.choice([1, 2])
    Lq, Lkv = rnd.randint(1, 100), rnd.randint(1, 100)  # up to 64 query rows the decode kernel runs, unless forced
    D, Dv = rnd.choice([8, 16, 24, 40]), rnd.choice([8, 16, 24, 40])
    dtype = rnd.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])  # the kernels' inputs
    # drawn at the kernels' precision, so that every run sees the same numbers
    q = torch.randn(B, Hkv * group, Lq, D, generator=rng, dtype=torch.float64).to(dtype).double()
    k = torch.randn(B, Hkv, Lkv, D, generator=rng, dtype=torch.float64).to(dtype).double()
    v = torch.randn(B, Hkv, Lkv, Dv, generator=rng, dtype=torch.float64).to(dtype).double()
    dout = torch.randn(B, Hkv * group, Lq, Dv, generator=rng, dtype=torch.float64).to(dtype).double()

    block_mask = torch_create_block_mask(module.mask, B, Hkv * group, Lq, Lkv, device="cpu")
    want = torch_flex_attention(q, k, v, score_mod=module.score, block_mask=block_mask, enable_gqa=group > 1)
    # torch's flex_attention has no backward on CPU: gradients from dense float64 attention on the same functions
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense, _ = naive_attention(*leaves, score_fn=module.score, mask_fn=module.mask, enable_gqa=group > 1)
    torch.testing.assert_close(dense.detach(), want, atol=1e-9, rtol=1e-9)  # the two oracles agree
    want_grads = torch.autograd.grad(dense, [*leaves, module.W], dout, allow_unused=True)

    score, mask = fc.score_mod(module.score), fc.mask_mod(module.mask)
    how = rnd.choice(["mask_mod", "flexcomp block mask", "torch block mask"])
    masking = {"mask_mod": mask} if how == "mask_mod" else {"block_mask": block_mask} if how == "torch block mask" \
        else {"block_mask": fc.create_block_mask(mask, B, Hkv * group, Lq, Lkv, device="cpu",
                                                 BLOCK_SIZE=rnd.choice([16, 32, 128, (16, 64)]))}  # fmt: skip
    options = {**SMALL, **rnd.choice([{}, {"BACKEND": "TRITON"}])}  # the decode kernel where it applies, or not
    setting = (f"B={B}, Hq={Hkv * group}, Hkv={Hkv}, Lq={Lq}, Lkv={Lkv}, D={D}, Dv={Dv}, {how}, "
               f"kernel_options={options}")
    for backend, inputs in (("reference", torch.float64), ("triton", dtype)):
        leaves = [t.to(inputs).requires_grad_() for t in (q, k, v)]
        got = fc.flex_attention(*leaves, score_mod=score, enable_gqa=group > 1, backend=backend,
                                kernel_options=options if backend == "triton" else None, **masking)  # fmt: skip
        grads = torch.autograd.grad(got, [*leaves, module.W], dout.to(inputs), allow_unused=True)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dW"), (got, *grads), (want, *want_grads)):
            if b is None:  # the program does not read W
                assert a is None or not a.any(), name
            elif name != "dW" or inputs not in RELATIVE_L2:  # W's gradient is often exactly 0 (W[h] shifts a whole
                # row): only an absolute bound says anything there, checked on the float32 draws
                assert_close(a, b, inputs, name, dout, lambda m, n=name, be=backend, i=inputs: (
                    f"{be} {n} ({i}) differs from torch's flex_attention ({setting}) for\n{source}\n{m}"))


ABSOLUTE = {torch.float64: 1e-9, torch.float32: 2e-4}  # elementwise, as assert_close
RELATIVE_L2 = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # 16-bit outputs: the error's norm over the reference's


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str, dout: torch.Tensor,
                 msg) -> None:  # fmt: skip
    if dtype in ABSOLUTE:
        tol = max(ABSOLUTE[dtype], 2e-5) if name == "dW" else ABSOLUTE[dtype]  # W is float32: summed in float32
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=msg)
        return
    assert not got.isnan().any(), msg("NaN")
    # over the reference's norm, but at least dout's (per element): where a row sees one key, dq is exactly 0 and
    # the 16-bit kernels' is rounding of terms as large as dout's
    scale = max(want.double().norm().item(), dout.norm().item() * (want.numel() / dout.numel()) ** 0.5)
    error = (got.double() - want.double()).norm().item() / scale
    assert error <= RELATIVE_L2[dtype], msg(f"relative L2 error {error:.2e} > {RELATIVE_L2[dtype]:.0e}")


@pytest.mark.parametrize("case", range(max(CASES // 2, 1)))
def test_random_mods_on_a_shuffled_paged_cache(case, rng, tmp_path):
    """The same programs through fc.PagedAttention (torch's API): requests of random lengths on pages handed out
    shuffled, a few query rows each, the logical mask converted and the score_mod wrapped; the kernels read K/V
    through the page table and run the mods on logical positions.  Against float64 attention on the contiguous
    cache, each request's keys cut at its length."""
    rnd = random.Random(int(torch.randint(2**62, (), generator=rng)))
    source = Program(rnd).source()
    module = load(source, tmp_path, f"paged_{case}_{rnd.randrange(10**9)}")
    B, Hkv, group, D = rnd.randint(1, 3), 2, rnd.choice([1, 2]), 16
    page_size, kv_block = rnd.choice([(16, 16), (16, 64), (16, 128), (32, 16), (32, 32), (32, 128)])
    lengths = [rnd.randint(1, 90) for _ in range(B)]
    n_pages = sum(-(-n // page_size) for n in lengths) + 2
    paged = fc.PagedAttention(n_pages, page_size, B, device="cpu")
    paged.empty_pages = [int(p) for p in torch.randperm(n_pages, generator=rng)]
    k_cache, v_cache = torch.zeros(1, Hkv, n_pages * page_size, D), torch.zeros(1, Hkv, n_pages * page_size, D)
    max_len = -(-max(lengths) // page_size) * page_size
    k, v = (torch.randn(B, Hkv, max_len, D, generator=rng) for _ in range(2))
    for i, n in enumerate(lengths):
        paged.reserve(torch.tensor(i), torch.tensor(n))
        paged.assign(torch.tensor([i]), torch.arange(n).view(1, -1), k[i : i + 1, :, :n], v[i : i + 1, :, :n],
                     k_cache, v_cache)  # fmt: skip
    Lq = rnd.randint(1, 8)
    q = torch.randn(B, Hkv * group, Lq, D, generator=rng)
    kv_len = torch.tensor(lengths)
    logical = fc.create_block_mask(fc.mask_mod(module.mask), B, Hkv * group, Lq, max_len, device="cpu",
                                   BLOCK_SIZE=(16, kv_block))  # fmt: skip
    converted = paged.convert_logical_block_mask(logical, kv_len=kv_len)
    score_mod = paged.get_score_mod(fc.score_mod(module.score), kv_len)

    def within(b, h, q_idx, kv_idx):
        return module.mask(b, h, q_idx, kv_idx) & (kv_idx < kv_len[b])

    want, want_lse = naive_attention(q.double(), k.double(), v.double(), score_fn=module.score, mask_fn=within,
                                     enable_gqa=group > 1)  # fmt: skip
    for backend in ("reference", "triton"):
        out, lse = fc.flex_attention(q, k_cache, v_cache, block_mask=converted, score_mod=score_mod,
                                     enable_gqa=group > 1, return_lse=True, backend=backend)  # fmt: skip
        setting = f"{backend}: lengths {lengths}, page {page_size}, kv block {kv_block}, Lq={Lq}, group {group}"
        torch.testing.assert_close(out.double(), want, atol=2e-4, rtol=2e-4, msg=lambda m, s=setting: (
            f"{s}: out differs for\n{source}\n{m}"))
        finite = want_lse.isfinite()
        assert torch.equal(lse.isfinite(), finite), f"{setting}: other fully masked rows for\n{source}"
        torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=2e-4, rtol=2e-4)
