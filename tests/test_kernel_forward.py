"""The generated forward Triton kernel, under Triton's interpreter, against a dense float64 oracle.

Every mod below is an ordinary Python function: the kernel runs its compiled IR,
the oracle (tests/naive.py) calls the function itself on torch index tensors.
Block masks come from torch's create_block_mask (same table layout as flexcomp's),
with our Mod and, where a test says so, hand-written closed-form bounds attached.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass, replace

import pytest
import torch
from flexcomp.codegen import cache as codegen_cache
from flexcomp.codegen import flex_forward, kernel_source
from flexcomp.codegen import forward_source as forward_source_module
from flexcomp.codegen.ops import OP_RULES
from naive import assert_close_to_reference as check
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import flexcomp as fc
from flexcomp.ir import Node, Op, arg, const, toposort
from flexcomp.mods import Mod
from flexcomp.tiles import ClosedFormBounds

SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}  # two kernel tiles per 32-wide sparse block


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flexcomp-cache"))


# ---------------------------------------------------------------- block masks


@dataclass
class BlockMask:
    """torch's BlockMask fields plus flexcomp's `bounds` (a stand-in until flexcomp.blockmask is used)."""

    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int]
    mask_mod: Mod
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None
    bounds: ClosedFormBounds | None = None


def block_mask_for(mask: Mod, B, H, Lq, Lkv, block=32, bounds=None) -> BlockMask:
    t = torch_create_block_mask(mask.fn, B, H, Lq, Lkv, device="cpu", BLOCK_SIZE=block, _compile=False)
    return BlockMask(t.seq_lengths, t.BLOCK_SIZE, mask, t.kv_num_blocks, t.kv_indices,
                     t.full_kv_num_blocks, t.full_kv_indices, bounds)


def dense_from_tiles(bm: BlockMask, mask_fn, B, H) -> torch.Tensor:
    """The [B, H, Lq, Lkv] mask torch's kernels apply: FULL tiles all true, PARTIAL tiles mask_fn, others false."""
    Lq, Lkv = bm.seq_lengths
    bq, bkv = bm.BLOCK_SIZE
    tiles = torch.zeros(B, H, -(-Lq // bq), -(-Lkv // bkv), dtype=torch.int8)
    for num, idx, cls in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        num, idx = num.expand(B, H, -1), idx.expand(B, H, -1, -1)
        for b in range(B):
            for h in range(H):
                for row in range(tiles.shape[2]):
                    tiles[b, h, row, idx[b, h, row, : num[b, h, row]].long()] = cls
    tiles = tiles.repeat_interleave(bq, 2).repeat_interleave(bkv, 3)[:, :, :Lq, :Lkv]
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1)
    qi, ki = torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lkv).view(1, 1, 1, Lkv)
    return (tiles == 2) | ((tiles == 1) & mask_fn(b, h, qi, ki))


def bounds_of(kv_lo: Node, kv_hi: Node, full_lo: Node, full_hi: Node) -> ClosedFormBounds:
    return ClosedFormBounds(kv_lo, kv_hi, full_lo, full_hi)


def _add(a: Node, c: int) -> Node:
    return Node(Op.ADD, a.dtype, (a, const(c)))


def _sub(a: Node, c: int) -> Node:
    return Node(Op.SUB, a.dtype, (a, const(c)))


# for q in [q_lo, q_hi]: causal keeps kv <= q, so kv < q_hi + 1 may be true and kv < q_lo + 1 always is
CAUSAL_BOUNDS = bounds_of(const(0), _add(arg("q_hi"), 1), const(0), _add(arg("q_lo"), 1))
WINDOW = 20
WINDOW_BOUNDS = bounds_of(_sub(arg("q_lo"), WINDOW), _add(arg("q_hi"), 1),
                          _sub(arg("q_hi"), WINDOW), _add(arg("q_lo"), 1))


# ---------------------------------------------------------------- mods


@fc.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@fc.mask_mod
def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


document_ids = torch.tensor([0] * 30 + [1] * 45 + [2] * 10 + [3] * 35)


@fc.mask_mod
def document(b, h, q_idx, kv_idx):
    return document_ids[q_idx] == document_ids[kv_idx]


alibi_slopes = torch.rand(4) + 0.1


@fc.score_mod
def alibi(score, b, h, q_idx, kv_idx):
    return score + alibi_slopes[h] * (kv_idx - q_idx)


@fc.score_mod
def softcap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


relative_bias = torch.randn(255)
head_table = torch.randn(2, 3, 8)


@fc.score_mod
def table_bias(score, b, h, q_idx, kv_idx):
    # negative indices wrap as in Python; index arithmetic across several dims
    return score + relative_bias[kv_idx - q_idx] + head_table[h - 2, q_idx % 3, (kv_idx // 16) - 8]


@fc.score_mod
def floor_div_mod(score, b, h, q_idx, kv_idx):
    d = q_idx - kv_idx
    return score + 0.1 * (d // -7) + 0.05 * (d % 5) + 0.01 * (d // (h - 3)) + 0.02 * ((d - 9) % (h - 4))


@fc.score_mod
def every_op(score, b, h, q_idx, kv_idx):
    x = torch.sigmoid(score) + torch.exp(-torch.abs(score)) + torch.exp2(score * 0.25) - torch.log(score * score + 1.0)
    y = torch.log2(torch.abs(score) + 2.0) * torch.sqrt(torch.abs(score)) + torch.rsqrt(score * score + 1.0)
    z = torch.sin(score) * torch.cos(score) + torch.floor(score) / 3.0 + torch.tanh(score) ** 2
    near = (q_idx - kv_idx < 5) & ~(kv_idx > q_idx) | (q_idx == 0) ^ (kv_idx != 3)
    i = torch.minimum(q_idx, kv_idx) - torch.maximum(-q_idx, kv_idx * 2) + (q_idx & 6) + (kv_idx | 1) + (~q_idx ^ 5)
    return torch.where(near, x + y, z) + i * 0.01 - (-score)


@fc.mask_mod
def starts_at_20(b, h, q_idx, kv_idx):
    return (q_idx >= 20) & (kv_idx <= q_idx)


@fc.mask_mod
def even_kv(b, h, q_idx, kv_idx):
    return kv_idx % 2 == 0


def run(q, k, v, score_mod=None, block_mask=None, gqa=False, options=SMALL_BLOCKS, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return flex_forward(q, k, v, score_mod, block_mask, scale, gqa, True, dict(options))


# ---------------------------------------------------------------- tests


def test_no_mask_ragged_lengths(randn, naive_attention):
    q, k, v = randn(2, 2, 37, 32), randn(2, 2, 53, 32), randn(2, 2, 53, 32)
    out, lse = run(q, k, v)
    check(out, lse, *naive_attention(q, k, v))


@pytest.mark.parametrize("with_bounds", [False, True], ids=["tables", "bounds"])
def test_causal(randn, naive_attention, with_bounds):
    q, k, v = randn(1, 2, 75, 16), randn(1, 2, 75, 16), randn(1, 2, 75, 16)
    bm = block_mask_for(causal, 1, 1, 75, 75, bounds=CAUSAL_BOUNDS if with_bounds else None)
    check(*run(q, k, v, block_mask=bm), *naive_attention(q, k, v, mask_fn=causal.fn))


@pytest.mark.parametrize("with_bounds", [False, True], ids=["tables", "bounds"])
def test_sliding_window_lq_ne_lkv(randn, naive_attention, with_bounds):
    q, k, v = randn(1, 1, 90, 16), randn(1, 1, 110, 16), randn(1, 1, 110, 16)
    bm = block_mask_for(sliding_window, 1, 1, 90, 110, bounds=WINDOW_BOUNDS if with_bounds else None)
    check(*run(q, k, v, block_mask=bm), *naive_attention(q, k, v, mask_fn=sliding_window.fn))


def test_document_mask_with_alibi_and_gqa(randn, naive_attention):
    L = len(document_ids)
    q, k, v = randn(1, 4, L, 16), randn(1, 2, L, 16), randn(1, 2, L, 16)
    bm = block_mask_for(document, 1, 1, L, L)
    out, lse = run(q, k, v, alibi, bm, gqa=True, options={"BLOCK_M": 32, "BLOCK_N": 16})
    check(out, lse, *naive_attention(q, k, v, alibi.fn, document.fn, enable_gqa=True))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_softcap_dtypes(randn, naive_attention, dtype, atol):
    q, k, v = (randn(1, 2, 48, 32, dtype=dtype) * 2 for _ in range(3))
    out, lse = run(q, k, v, softcap, block_mask_for(causal, 1, 1, 48, 48))
    assert out.dtype == dtype and lse.dtype == torch.float32
    check(out, lse, *naive_attention(q, k, v, softcap.fn, causal.fn), atol=atol)


def test_table_reads_with_negative_indices(randn, naive_attention):
    q, k, v = randn(1, 2, 64, 16), randn(1, 2, 96, 16), randn(1, 2, 96, 16)
    check(*run(q, k, v, table_bias), *naive_attention(q, k, v, table_bias.fn))


def test_floor_div_and_mod_with_negative_operands(randn, naive_attention):
    q, k, v = randn(1, 2, 40, 16), randn(1, 2, 40, 16), randn(1, 2, 40, 16)
    check(*run(q, k, v, floor_div_mod), *naive_attention(q, k, v, floor_div_mod.fn))


def test_every_op(randn, naive_attention):
    used = {n.op for n in toposort(every_op.ir)}
    q, k, v = randn(1, 1, 33, 16), randn(1, 1, 33, 16), randn(1, 1, 33, 16)
    check(*run(q, k, v, every_op), *naive_attention(q, k, v, every_op.fn), atol=1e-4)
    assert len(used) >= 25, sorted(op.value for op in used)


def test_op_table_covers_the_ir():
    assert set(Op) - {Op.CONST, Op.ARG, Op.LOAD} <= set(OP_RULES)


def test_head_dims_48_dv_80_gqa_non_contiguous(randn, naive_attention):
    # [B, L, H, D] storage seen as [B, H, L, D]: no dim is contiguous in the kernel's order
    q = randn(2, 50, 4, 48).transpose(1, 2)
    k = randn(2, 70, 2, 48).transpose(1, 2)
    v = randn(2, 2, 80, 70).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    bm = block_mask_for(causal, 1, 1, 50, 70)
    out, lse = run(q, k, v, alibi, bm, gqa=True)
    assert out.shape == (2, 4, 50, 80)
    check(out, lse, *naive_attention(q, k, v, alibi.fn, causal.fn, enable_gqa=True))


def test_row_alignment_is_the_strides_common_power_of_two():
    from flexcomp.codegen.plans import row_alignment

    assert row_alignment((2, (8000, 40, 1)), (2, (7992, 24, 1))) == 8  # 16-bit D=40, Dv=24: 16-byte rows
    assert row_alignment((2, (4096, 64, 1)), (4, (2048, 32, 1))) == 4  # float32: 4 elements make 16 bytes
    assert row_alignment((2, (7200, 36, 1))) == 4  # 72-byte rows: 8-byte vectors
    assert row_alignment((2, (8200, 41, 1))) == 1  # an odd stride: element by element
    assert row_alignment((2, (4096, 1, 64))) == 1  # the head dim is not the unit stride


@pytest.mark.parametrize("pad", [0, 1, 4], ids=["aligned", "odd stride", "8-byte rows"])
def test_issue_16_head_dims_40_24_with_stride_hints(randn, naive_attention, pad):
    """D=40, Dv=24 in fp16 (GPU: wrong output before ROW_ALIGN) as contiguous tensors and as views of wider rows."""
    def view(*shape):
        return randn(*shape[:-1], shape[-1] + pad)[..., :shape[-1]].to(torch.float16)

    q, k, v = view(1, 4, 37, 40), view(1, 2, 51, 40), view(1, 2, 51, 24)
    bm = block_mask_for(causal, 1, 1, 37, 51)
    out, lse = run(q, k, v, alibi, bm, gqa=True)
    check(out, lse, *naive_attention(q.double(), k.double(), v.double(), alibi.fn, causal.fn, enable_gqa=True),
          atol=2e-3)


@pytest.mark.parametrize("with_bounds", [False, True], ids=["tables", "bounds"])
def test_fully_masked_rows_give_zero_and_minus_inf(randn, naive_attention, with_bounds):
    q, k, v = randn(1, 1, 40, 16), randn(1, 1, 40, 16), randn(1, 1, 40, 16)
    bounds = bounds_of(const(0), _add(arg("q_hi"), 1), const(0), const(0)) if with_bounds else None
    out, lse = run(q, k, v, softcap, block_mask_for(starts_at_20, 1, 1, 40, 40, bounds=bounds))
    assert torch.equal(out[0, 0, :20], torch.zeros(20, 16))
    assert torch.isneginf(lse[0, 0, :20]).all()
    check(out, lse, *naive_attention(q, k, v, softcap.fn, starts_at_20.fn))


def test_captured_values_change_between_calls(randn, naive_attention):
    q, k, v = randn(1, 4, 32, 16), randn(1, 4, 32, 16), randn(1, 4, 32, 16)
    before = alibi_slopes.clone()
    try:
        first = run(q, k, v, alibi)
        modules = dict(codegen_cache._MODULES)
        alibi_slopes.mul_(-3.0)  # in place: same Mod, same kernel, new values
        second = run(q, k, v, alibi)
        assert codegen_cache._MODULES == modules
        check(*second, *naive_attention(q, k, v, alibi.fn))
        assert not torch.allclose(first[0], second[0])
    finally:
        alibi_slopes.copy_(before)


def test_full_tiles_skip_the_mask(randn, naive_attention):
    # tables from causal, mask_mod from another function: FULL tiles must follow the tables, as in torch
    q, k, v = randn(1, 1, 64, 16), randn(1, 1, 64, 16), randn(1, 1, 64, 16)
    bm = replace(block_mask_for(causal, 1, 1, 64, 64), mask_mod=even_kv)
    assert bm.full_kv_num_blocks.sum() > 0
    out, lse = run(q, k, v, block_mask=bm)
    dense = dense_from_tiles(bm, even_kv.fn, 1, 1)
    check(out, lse, *naive_attention(q, k, v, dense_mask=dense))
    masked_everywhere = naive_attention(q, k, v, dense_mask=dense & even_kv.fn(0, 0, 0, torch.arange(64)))
    assert not torch.allclose(out.double(), masked_everywhere[0], atol=1e-3)


def test_without_full_tables_everything_is_partial(randn, naive_attention):
    q, k, v = randn(1, 1, 64, 16), randn(1, 1, 64, 16), randn(1, 1, 64, 16)
    bm = block_mask_for(causal, 1, 1, 64, 64)
    bm = replace(bm, kv_num_blocks=bm.kv_num_blocks + bm.full_kv_num_blocks,
                 kv_indices=_merge_indices(bm), full_kv_num_blocks=None, full_kv_indices=None)
    check(*run(q, k, v, block_mask=bm), *naive_attention(q, k, v, mask_fn=causal.fn))


def _merge_indices(bm: BlockMask) -> torch.Tensor:
    merged = torch.zeros_like(bm.kv_indices)
    for row in range(merged.shape[2]):
        n = bm.kv_num_blocks[0, 0, row]
        f = bm.full_kv_num_blocks[0, 0, row]
        merged[0, 0, row, : n + f] = torch.cat([bm.kv_indices[0, 0, row, :n], bm.full_kv_indices[0, 0, row, :f]])
    return merged


def test_kernel_source_is_readable():
    text = kernel_source(alibi, document)
    assert "return score + alibi_slopes[h] * (kv_idx - q_idx)" in text  # the user's code, in the header
    assert "load alibi_slopes" in text and "load document_ids" in text  # and its IR
    assert "@triton.jit\ndef flex_forward_kernel(" in text
    assert "def score_mod(" in text and "def mask_mod(" in text
    compile(text, "<generated>", "exec")
    bounded = kernel_source(None, causal, bounds=CAUSAL_BOUNDS)
    assert "kv_hi = (q_hi + 1)" in bounded
    with pytest.raises(TypeError, match="unknown specialization"):
        kernel_source(None, causal, bogus=1)


def test_disk_cache_is_reused(randn, tmp_path, monkeypatch, naive_attention):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path))
    q, k, v = randn(1, 1, 24, 16), randn(1, 1, 24, 16), randn(1, 1, 24, 16)
    codegen_cache.clear_memory_cache()
    first = run(q, k, v, softcap)
    files = list(tmp_path.glob("forward_*.py"))
    assert len(files) == 1 and "def flex_forward_kernel" in files[0].read_text()

    def no_regeneration(*args):
        raise AssertionError("regenerated a cached kernel")

    codegen_cache.clear_memory_cache()  # as a fresh process would start
    monkeypatch.setattr(forward_source_module, "forward_source", no_regeneration)
    monkeypatch.setattr("flexcomp.codegen.forward.forward_source", no_regeneration)
    second = run(q, k, v, softcap)
    assert torch.equal(first[0], second[0])


def test_bad_inputs_are_named(randn):
    q, k, v = randn(1, 1, 32, 16), randn(1, 1, 32, 16), randn(1, 1, 32, 16)
    bm = block_mask_for(causal, 1, 1, 48, 32)
    with pytest.raises(ValueError, match="q_len=32.*block_mask_q_len=48"):
        run(q, k, v, block_mask=bm)
    with pytest.raises(ValueError, match="BLOCK_M=48"):
        run(q, k, v, block_mask=block_mask_for(causal, 1, 1, 32, 32), options={"BLOCK_M": 48})
    with pytest.raises(ValueError, match="q_heads=2 != kv_heads=1; pass enable_gqa=True"):
        run(randn(1, 2, 32, 16), k, v)
    with pytest.raises(ValueError, match="query batch 1 != key/value batch 2"):  # flex_attention broadcasts; the kernel does not
        run(q, randn(2, 1, 32, 16), randn(2, 1, 32, 16))


def test_float_semantics_of_scale(randn, naive_attention):
    q, k, v = randn(1, 1, 20, 16), randn(1, 1, 20, 16), randn(1, 1, 20, 16)
    check(*run(q, k, v, alibi, scale=0.37), *naive_attention(q, k, v, alibi.fn, scale=0.37))



@pytest.mark.parametrize("mask", [causal, sliding_window, document], ids=lambda m: m.name)
def test_flexcomp_block_mask(randn, naive_attention, mask):
    # flexcomp's own BlockMask: closed-form bounds where the analysis finds them, and then no table is built
    from flexcomp.blockmask import create_block_mask

    L = len(document_ids)
    q, k, v = randn(1, 2, L, 16), randn(1, 2, L, 16), randn(1, 2, L, 16)
    bm = create_block_mask(mask, 1, 2, L, L, device="cpu", BLOCK_SIZE=32)
    assert (bm.bounds is not None) == (mask is not document)
    check(*run(q, k, v, softcap, bm), *naive_attention(q, k, v, softcap.fn, mask.fn))
    if bm.bounds is not None:
        assert "kv_indices" in bm._lazy and "full_kv_indices" in bm._lazy  # never materialized
