"""Block masks visit no more tiles than torch's and call FULL every tile torch does: the tables are exact.

Issue 17: where the analysis cannot decide a tile (a causal mask on positions inside a document read through
a table, a prefix read through two tables, a per-batch offset), create_block_mask evaluates the mask on the
undecided tiles alone, in bounded batches.  Every mask below (the issue's three cases written here, the gallery's
masks, the masks the other tests build) is compared tile by tile with torch's create_block_mask and with a dense
evaluation of the user's own function, and attention through the new tables is checked against float64.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from naive import assert_close_to_reference, naive_attention
from torch.nn.attention import flex_attention as torch_flex

import flexcomp as fc
from flexcomp import blockmask
from flexcomp.evaluate import evaluate
from flexcomp.ir import BufferSpec, DType, Op, arg, free_args, load
from flexcomp.mods import Mod
from flexcomp.sparsity import standard as std
from flexcomp.sparsity import tiles as tiles_module
from flexcomp.sparsity.standard import node
from flexcomp.sparsity.tables import ordered_to_classes
from flexcomp.tiles import TileClass

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
LENGTHS = [300, 150, 253, 200, 100]  # five packed documents, 1003 tokens


# ---------------------------------------------------------------- the issue's three cases, in our own words


def packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the document of every token, where each document starts; one entry past the last), both int32."""
    sizes = torch.tensor(lengths)
    document = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), sizes)
    start = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(torch.int32)
    return document, start


def document_causal(lengths: list[int]):
    """Causal inside each document, positions counted from the document's start (read through the start table)."""
    document, start = packed(lengths)

    def document_causal(b, h, q_idx, kv_idx):
        q_doc, kv_doc = document[q_idx], document[kv_idx]
        return (q_doc == kv_doc) & (q_idx - start[q_doc] >= kv_idx - start[kv_doc])

    return document_causal


def shared_prefix(lengths: list[int], prefix_of: list[int]):
    """Packed prompt + answers: a document sees itself causally, and an answer also sees all of its prompt."""
    document, start = packed(lengths)
    prompt = torch.tensor(prefix_of, dtype=torch.int32)  # a prompt is its own prompt

    def shared_prefix(b, h, q_idx, kv_idx):
        q_doc = document[q_idx]
        own = prompt[q_doc]
        itself = (kv_idx >= start[q_doc]) & (kv_idx <= q_idx)
        its_prompt = (own != q_doc) & (kv_idx >= start[own]) & (kv_idx < start[own + 1])
        return itself | its_prompt

    return shared_prefix


def batch_causal(shift: list[int], length: list[int]):
    """Each batch element has its own causal offset and its own number of keys, read from captured tensors."""
    offset, keys = torch.tensor(shift, dtype=torch.int32), torch.tensor(length, dtype=torch.int32)

    def batch_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset[b]) & (kv_idx < keys[b])

    return batch_causal


def chunked_causal(chunk: int):
    """Causal inside consecutive chunks of `chunk` tokens (attention-gym's batchify of causal)."""

    def chunked_causal(b, h, q_idx, kv_idx):
        return (q_idx // chunk == kv_idx // chunk) & (q_idx % chunk >= kv_idx % chunk)

    return chunked_causal


ISSUE_MASKS = {
    "document_causal": lambda: document_causal(LENGTHS),
    "shared_prefix": lambda: shared_prefix(LENGTHS, [0, 0, 0, 3, 3]),
    "batch_causal": lambda: batch_causal([0, 37, -20, 517], [1003, 640, 1003, 301]),
    "chunked_causal": lambda: chunked_causal(100),
}


# ---------------------------------------------------------------- the gallery's masks and the other tests'


def example(name: str):
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))  # examples import one another
    return importlib.import_module(name)


def gallery_masks() -> dict[str, object]:
    names = sorted(p.stem for p in EXAMPLES_DIR.glob("*.py") if not p.stem.startswith("_"))
    masks = {name: example(name).EXAMPLE.get("mask_mod") for name in names}
    causal = example("causal").causal
    masks.update({
        "window_17": fc.and_masks(causal, example("sliding_window").sliding_window(17)),
        "dilated_5x3": fc.and_masks(causal, example("dilated_sliding_window").dilated_window(5, 3)),
        "block_causal_24": example("block_causal").block_causal(24),
        "chunked_16_left1": example("chunked_asr").chunked_streaming(16, 1),
        "swin_w4_s2": example("swin").window_attention(12, 4, 2),
        "natten_12x12_k5": example("neighborhood_2d").neighborhood_2d(12, 12, 5),
        "sink3_window9": example("streaming_llm").sink_and_window(3, 9),
    })
    return {name: mask for name, mask in masks.items() if mask is not None}


def ir_mod(mask, tensors=None, name="mask") -> Mod:
    """A Mod built from hand-written IR, as tests/test_blockmask.py builds them; its function evaluates the IR."""
    tensors = dict(tensors or {})
    specs = tuple(BufferSpec(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items())

    def fn(b, h, q_idx, kv_idx):
        return evaluate(mask, {"b": b.int(), "h": h.int(), "q_idx": q_idx.int(), "kv_idx": kv_idx.int()}, tensors)

    return Mod("mask", name, mask, mask, specs, {k: (lambda v=v: v) for k, v in tensors.items()}, fn)


def suite_masks() -> dict[str, Mod]:
    doc, doc_tensors = std.document(1003, 7)
    gate = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    head_gate = load("GATE", DType.BOOL, (arg("h"), node(Op.FLOORDIV, std.Q, std.c(128)),
                                           node(Op.FLOORDIV, std.KV, std.c(128))))
    return {
        "ir_causal": ir_mod(std.causal()), "ir_sliding_window": ir_mod(std.sliding_window(70)),
        "ir_prefix_lm": ir_mod(std.prefix_lm(90)), "ir_block_causal": ir_mod(std.block_causal(48)),
        "ir_offset_causal": ir_mod(std.offset_causal(-126)), "ir_dilated": ir_mod(std.dilated_window(50)),
        "ir_neighborhood": ir_mod(std.neighborhood(31, 3)), "ir_document": ir_mod(doc, doc_tensors),
        "ir_document_causal": ir_mod(node(Op.AND, doc, std.causal()), doc_tensors),
        "ir_document_window": ir_mod(node(Op.AND, doc, std.sliding_window(100)), doc_tensors),
        "ir_head_gate": ir_mod(head_gate, {"GATE": gate}),
    }


# ---------------------------------------------------------------- the oracles


def dense(fn, B: int, H: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The user's function on the whole [B, H, Q, KV] grid of int32 indices (element by element where it uses
    Python control flow on its arguments, as a tree mask's `if kv_idx < PREFIX`)."""
    shape = (B, H, q_len, kv_len)
    b, h, q, kv = (torch.arange(n, dtype=torch.int32).view([-1 if d == i else 1 for d in range(4)])
                   for i, n in enumerate(shape))
    try:
        return torch.as_tensor(fn(b, h, q, kv)).expand(shape)
    except RuntimeError:
        points = torch.cartesian_prod(*(torch.arange(n, dtype=torch.int32) for n in shape))
        return torch.stack([torch.as_tensor(fn(*point)) for point in points]).view(shape)


def dense_classes(keep: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """uint8 TileClass of every tile; elements past Q_LEN or KV_LEN do not count."""
    B, H, q_len, kv_len = keep.shape
    (bq, bk), nq, nkv = block, -(-q_len // block[0]), -(-kv_len // block[1])
    padded = torch.full((B, H, nq * bq, nkv * bk), -1, dtype=torch.int8)
    padded[..., :q_len, :kv_len] = keep.to(torch.int8)
    tiles = padded.view(B, H, nq, bq, nkv, bk).transpose(3, 4).flatten(-2)
    any_true, any_false = (tiles == 1).any(-1), (tiles == 0).any(-1)
    return torch.where(~any_true, 0, torch.where(~any_false, 2, 1)).to(torch.uint8)


def torch_classes(fn, B: int, H: int, q_len: int, kv_len: int, block: tuple[int, int]) -> torch.Tensor:
    def four_args(b, h, q_idx, kv_idx):  # torch counts the parameters (and_masks' have *args) and wants a tensor
        return torch.zeros_like(q_idx, dtype=torch.bool) | fn(b, h, q_idx, kv_idx)

    theirs = torch_flex.create_block_mask(four_args, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    nq, nkv = -(-q_len // block[0]), -(-kv_len // block[1])
    return ordered_to_classes(theirs.kv_num_blocks, theirs.kv_indices, theirs.full_kv_num_blocks,
                              theirs.full_kv_indices, nkv)[..., :nq, :]


def check_against_torch(mask, q_len: int, kv_len: int, block: tuple[int, int], batch: int = 4, heads: int = 3,
                        torch_runs_it: bool = True) -> None:
    """Our tables = the dense evaluation's, tile by tile; visited ones a subset of torch's, FULL ones a superset.
    The batch / heads are evaluated only where the mask reads b / h (else both broadcast)."""
    mod = fc.mask_mod(mask) if not isinstance(mask, Mod) else mask
    used = free_args(mod.ir)
    B, H = (batch if "b" in used else 1), (heads if "h" in used else 1)
    ours = fc.create_block_mask(mod, B, H, q_len, kv_len, "cpu", block)
    assert not any("undecided" in how for how in ours.decided_by), ours.explain()
    got = ours.tile_classes().expand(B, H, -1, -1)
    expected = dense_classes(dense(mod.fn, B, H, q_len, kv_len), block)
    wrong = (got != expected).nonzero().tolist()
    assert not wrong, f"{mod.name}: {len(wrong)} tiles differ from the dense evaluation, e.g. {wrong[:4]}"
    check_q_major(ours, got)
    if not torch_runs_it:
        return
    theirs = torch_classes(mod.fn, B, H, q_len, kv_len, block)
    visited, torch_visited = got != TileClass.EMPTY, theirs != TileClass.EMPTY
    assert int(visited.sum()) <= int(torch_visited.sum()) and not (visited & ~torch_visited).any(), mod.name
    assert not ((theirs == TileClass.FULL) & (got != TileClass.FULL)).any(), f"{mod.name}: torch's FULL tile PARTIAL"


def check_q_major(ours, classes: torch.Tensor) -> None:
    """The q-major tables (the backward's) list exactly the transposed tiles."""
    nq = classes.shape[-2]
    q_major = ordered_to_classes(ours.q_num_blocks, ours.q_indices, ours.full_q_num_blocks, ours.full_q_indices, nq)
    assert torch.equal(q_major.transpose(-1, -2).expand_as(classes), classes)


SHAPES = [(1003, 1003, (16, 16)), (1003, 1003, (128, 128)), (1003, 877, (16, 32)), (877, 1003, (128, 64))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2][0]}x{s[2][1]}")
@pytest.mark.parametrize("name", sorted(ISSUE_MASKS))
def test_issue_masks_visit_what_torch_visits(name: str, shape) -> None:
    check_against_torch(ISSUE_MASKS[name](), *shape)


def test_the_analysis_alone_visits_more() -> None:
    """The issue's case at L=1003, block 16: the analysis alone leaves 93 EMPTY tiles PARTIAL (614 tiles visited
    where torch visits 521); the evaluation of the undecided tiles makes it 521."""
    mask = fc.mask_mod(document_causal(LENGTHS))
    ours = fc.create_block_mask(mask, None, None, 1003, 1003, "cpu", 16)
    lazy = fc.create_block_mask(mask, None, None, 1003, 1003, "cpu", 16, exact=False)
    theirs = torch_classes(mask.fn, 1, 1, 1003, 1003, (16, 16))
    visits = lambda classes: int((classes != TileClass.EMPTY).sum())
    assert visits(ours.tile_classes()) == visits(theirs) < visits(lazy.tile_classes())
    assert ours.decided_by["evaluation"] > 0 and "evaluation" not in lazy.decided_by


@pytest.mark.parametrize("shape", [(1003, 1003, (128, 128)), (1003, 877, (16, 32))], ids=["1003-128", "ragged-16"])
@pytest.mark.parametrize("name", sorted(gallery_masks()))
def test_gallery_masks_visit_what_torch_visits(name: str, shape) -> None:
    q_len, kv_len, block = shape
    settings = example(name).EXAMPLE if (EXAMPLES_DIR / f"{name}.py").exists() else {}  # else a factory's variant
    if name in ("medusa_tree", "flamingo"):  # their captured tables are sized for their own lengths
        q_len, kv_len = settings["q_len"], settings.get("kv_len") or settings["q_len"]
    # torch's create_block_mask vmaps the function: a Python `if` on an index (the tree mask) cannot run there
    check_against_torch(gallery_masks()[name], q_len, kv_len, block, settings.get("batch", 1),
                        settings.get("heads", 1), torch_runs_it=name != "medusa_tree")


@pytest.mark.parametrize("shape", [(1003, 1003, (16, 16)), (1003, 877, (128, 64))], ids=["1003-16", "ragged-128"])
@pytest.mark.parametrize("name", sorted(suite_masks()))
def test_suite_masks_visit_what_torch_visits(name: str, shape) -> None:
    check_against_torch(suite_masks()[name], *shape)


# ---------------------------------------------------------------- the fallback's cost


def test_only_undecided_tiles_are_evaluated_in_bounded_batches(monkeypatch) -> None:
    """Batches of at most EVAL_ELEMENTS elements (never Lq x Lkv), only the undecided tiles, and the same tables."""
    mask = fc.mask_mod(document_causal(LENGTHS))
    reference = fc.create_block_mask(mask, None, None, 1003, 1003, "cpu", 16).tile_classes()
    undecided = fc.create_block_mask(mask, None, None, 1003, 1003, "cpu", 16, exact=False).tile_classes()
    undecided = int((undecided == TileClass.PARTIAL).sum())
    evaluated, real = [], tiles_module._classes

    def spy(ir, tensors, grid, q0, tiles, device, q_offsets, kv_offsets):
        evaluated.append((tiles.shape[0], q_offsets.numel() * kv_offsets.numel()))
        return real(ir, tensors, grid, q0, tiles, device, q_offsets, kv_offsets)

    monkeypatch.setattr(tiles_module, "_classes", spy)
    monkeypatch.setattr(tiles_module, "EVAL_ELEMENTS", 1 << 12)
    got = fc.create_block_mask(mask, None, None, 1003, 1003, "cpu", 16)
    assert torch.equal(got.tile_classes(), reference)
    sampled, in_full = evaluated
    assert sampled[0] == undecided and in_full[0] < undecided  # the sample proved some PARTIAL
    assert got.decided_by["evaluation"] == undecided


def test_evaluation_batches_allocate_no_quadratic_tensor(monkeypatch) -> None:
    """A mask the analysis decides almost nowhere (a random table cell per position pair): the evaluation's largest
    tensor is one batch of EVAL_ELEMENTS elements, never Lq x Lkv, and the tables are still exact."""
    from test_blockmask import LargestTensor

    table = torch.randint(0, 3, (40, 40), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    cell = load("T", DType.I32, (node(Op.MOD, std.Q, std.c(40)), node(Op.MOD, std.KV, std.c(40))))
    mod = ir_mod(node(Op.EQ, cell, std.c(1)), {"T": table})
    largest, real = [], blockmask.evaluate_tiles

    def probed(*args):
        with LargestTensor() as probe:
            out = real(*args)
        largest.append(probe.largest)
        return out

    monkeypatch.setattr(blockmask, "evaluate_tiles", probed)
    monkeypatch.setattr(tiles_module, "EVAL_ELEMENTS", 1 << 14)
    bm = fc.create_block_mask(mod, None, None, 700, 600, "cpu", 32)
    assert largest and max(largest) <= 1 << 14, largest
    assert torch.equal(bm.tile_classes(), dense_classes(dense(mod.fn, 1, 1, 700, 600), (32, 32)))
    assert bm.decided_by["evaluation"] > bm.num_blocks[0] * bm.num_blocks[1] // 2, bm.explain()


# ---------------------------------------------------------------- attention through the exact tables


SMALL = [31, 15, 25, 19, 10]  # 100 tokens
SMALL_MASKS = {
    "document_causal": lambda: document_causal(SMALL),
    "shared_prefix": lambda: shared_prefix(SMALL, [0, 0, 2, 2, 2]),
    "batch_causal": lambda: batch_causal([-9, 20], [83, 45]),  # batch 0's first rows see no key: out 0, lse -inf
    "chunked_causal": lambda: chunked_causal(37),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(SMALL_MASKS))
def test_attention_through_exact_tables_matches_float64(name: str, backend: str, randn, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(blockmask, "row_bounds", lambda ir: None)  # batch_causal's rows are intervals: the fallback here
    mask = fc.mask_mod(SMALL_MASKS[name]())
    B, H, q_len, kv_len = (2 if name == "batch_causal" else 1), 2, 100, 83
    block_mask = fc.create_block_mask(mask, B, H, q_len, kv_len, "cpu", 16)
    assert block_mask.decided_by.get("evaluation", 0) > 0, block_mask.explain()  # the fallback made these tables
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = (randn(B, H, n, 16, dtype=dtype, requires_grad=True) for n in (q_len, kv_len, kv_len))
    options = {"BLOCK_M": 16, "BLOCK_N": 16} if backend == "triton" else None
    out, lse = fc.flex_attention(q, k, v, block_mask=block_mask, return_lse=True, backend=backend,
                                 kernel_options=options)
    want_out, want_lse = naive_attention(q, k, v, mask_fn=mask.fn)
    assert_close_to_reference(out, lse, want_out, want_lse, atol=1e-9 if backend == "reference" else 2e-5)
    if name == "batch_causal":
        assert torch.isinf(want_lse).any()  # the fully masked rows are there to check
    grad = randn(*out.shape, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(naive_attention(qd, kd, vd, mask_fn=mask.fn)[0], (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-9 if backend == "reference" else 5e-5, rtol=1e-4)
