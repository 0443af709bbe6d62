"""BlockMask tables against torch's create_block_mask and against brute force."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import flexcomp
from flexcomp.blockmask import BlockMask, create_block_mask, create_mask
from flexcomp.evaluate import evaluate
from flexcomp.ir import Op
from flexcomp.mods import Mod
from flexcomp.sparsity import equality
from flexcomp.sparsity import standard as std
from flexcomp.sparsity import tables as tables_module
from flexcomp.sparsity.standard import node
from flexcomp.sparsity.tables import rows_from_ranges, transpose_ordered
from flexcomp.sparsity.tiles import Grid
from flexcomp.tiles import TileClass

H_ARG = __import__("flexcomp.ir", fromlist=["arg"]).arg("h")


def mod_of(mask, tensors=None, name="mask") -> Mod:
    """A Mod built by hand from IR (no front end): the function evaluates the IR, for torch."""
    tensors = dict(tensors or {})

    def fn(b, h, q_idx, kv_idx):
        env = {"b": b.int(), "h": h.int(), "q_idx": q_idx.int(), "kv_idx": kv_idx.int()}
        return evaluate(mask, env, tensors)

    return Mod("mask", name, mask, mask, resolvers={}, fn=fn) if not tensors else _with_tensors(mask, tensors, fn, name)


def _with_tensors(mask, tensors, fn, name) -> Mod:
    from flexcomp.ir import BufferSpec

    specs = tuple(BufferSpec(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items())
    return Mod("mask", name, mask, mask, specs, {k: (lambda v=v: v) for k, v in tensors.items()}, fn)


def torch_classes(fn, B, H, q_len, kv_len, block) -> torch.Tensor:
    bm = torch_flex.create_block_mask(fn, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    nkv = -(-kv_len // (block if isinstance(block, int) else block[1]))
    partial = torch_flex._ordered_to_dense(bm.kv_num_blocks, bm.kv_indices, bm.kv_indices.shape[-1])[..., :nkv]
    full = torch_flex._ordered_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, bm.full_kv_indices.shape[-1])
    return (partial + 2 * full[..., :nkv]).to(torch.uint8)


def brute_classes(mod: Mod, B, H, q_len, kv_len, block) -> torch.Tensor:
    bq, bk = (block, block) if isinstance(block, int) else block
    dense = create_mask(mod, B, H, q_len, kv_len, "cpu")
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    padded = torch.full((dense.shape[0], dense.shape[1], nq * bq, nk * bk), -1, dtype=torch.int8)
    padded[..., :q_len, :kv_len] = dense.to(torch.int8)
    tiles = padded.view(*padded.shape[:2], nq, bq, nk, bk).permute(0, 1, 2, 4, 3, 5).flatten(-2)
    any_true, any_false = (tiles == 1).any(-1), (tiles == 0).any(-1)
    return torch.where(~any_true, 0, torch.where(~any_false, 2, 1)).to(torch.uint8)


def _doc_mod():
    mask, tensors = std.document(300, 7)
    return mod_of(mask, tensors, "document")


HEAD_GATE = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.5
CASES = {
    "causal": lambda: mod_of(std.causal()),
    "sliding_window": lambda: mod_of(std.sliding_window(70)),
    "prefix_lm": lambda: mod_of(std.prefix_lm(90)),
    "block_causal": lambda: mod_of(std.block_causal(48)),
    "dilated": lambda: mod_of(std.dilated_window(50)),
    "document": _doc_mod,
    "head_gate": lambda: mod_of(__import__("flexcomp.ir", fromlist=["load"]).load(
        "GATE", __import__("flexcomp.ir", fromlist=["DType"]).DType.BOOL,
        (H_ARG, node(Op.FLOORDIV, std.Q, std.c(64)), node(Op.FLOORDIV, std.KV, std.c(64)))), {"GATE": HEAD_GATE}),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", [(300, 300, 64), (300, 257, (32, 64)), (200, 300, (64, 32))])
def test_tables_match_torch(name: str, shape) -> None:
    q_len, kv_len, block = shape
    mod = CASES[name]()
    H = 3 if name == "head_gate" else None
    ours = create_block_mask(mod, 2, H, q_len, kv_len, "cpu", block, exact=True)
    assert_tables_match_torch(ours, mod, mod.fn, 1, H or 1)


def assert_tables_match_torch(ours: BlockMask, mod: Mod, fn, B: int, H: int) -> None:
    """`ours` lists the tiles torch's create_block_mask lists, with its classes, except where torch pads: it fills
    a ragged last q or kv block with masked elements, so it never calls those FULL; we may (as brute_classes)."""
    (q_len, kv_len), block = ours.seq_lengths, ours.BLOCK_SIZE
    theirs = torch_classes(fn, B, H, q_len, kv_len, block)
    got = ours.tile_classes().expand_as(theirs)
    assert torch.equal(got != TileClass.EMPTY, theirs != 0), mod.name
    bq, bk = ours.BLOCK_SIZE
    interior = torch.ones_like(theirs, dtype=torch.bool)
    if q_len % bq:
        interior[..., -1, :] = False
    if kv_len % bk:
        interior[..., -1] = False
    assert torch.equal(got[interior], theirs[interior]), mod.name
    assert torch.equal(got, brute_classes(mod, B, H, q_len, kv_len, block).expand_as(theirs)), mod.name


def test_closed_forms_are_exact_without_evaluation() -> None:
    for name in ("causal", "sliding_window", "prefix_lm", "block_causal"):
        mod = CASES[name]()
        bm = create_block_mask(mod, None, None, 300, 250, "cpu", 32)
        assert bm.decided_by.get("evaluation", 0) == 0 and "undecided" not in " ".join(bm.decided_by), bm.explain()
        assert torch.equal(bm.tile_classes(), brute_classes(mod, 1, 1, 300, 250, 32)), name


def test_broadcast_dims_and_head_dependence() -> None:
    causal = create_block_mask(CASES["causal"](), 4, 8, 256, 256, "cpu")
    assert causal.kv_num_blocks.shape == (1, 1, 2) and causal.table_dims == (1, 1, 2)  # broadcast tables
    assert causal.shape == (4, 8, 256, 256)  # torch's shape: what it was made for
    assert causal[1].shape == (1, 8, 256, 256) and causal[:, 2:5].shape == (4, 3, 256, 256)  # indexed as torch's
    assert causal.to("cpu").shape == (4, 8, 256, 256)
    assert create_block_mask(CASES["causal"](), None, None, 256, 256, "cpu").shape == (1, 1, 256, 256)
    gated = create_block_mask(CASES["head_gate"](), 4, 3, 300, 300, "cpu", 64)
    assert gated.kv_num_blocks.shape == (1, 3, 5) and gated.shape == (4, 3, 300, 300)  # depends on h, not on b
    per_head = gated.tile_classes()
    assert not torch.equal(per_head[0, 0], per_head[0, 1]) or not torch.equal(per_head[0, 1], per_head[0, 2])


def test_closed_form_tables_and_lazy_fields() -> None:
    bm = create_block_mask(CASES["sliding_window"](), None, None, 1000, 900, "cpu", (64, 32))
    assert bm.bounds is not None and "kv_indices" in bm._lazy and bm.decided_by == {"closed form": 16 * 29}
    assert bm.BLOCK_SIZE == (64, 32) and bm.seq_lengths == (1000, 900)
    expected = brute_classes(CASES["sliding_window"](), 1, 1, 1000, 900, (64, 32))
    assert torch.equal(bm.tile_classes(), expected)
    # q-major tables are the transposes of the kv-major ones
    for num, idx, cls in ((bm.q_num_blocks, bm.q_indices, TileClass.PARTIAL),
                          (bm.full_q_num_blocks, bm.full_q_indices, TileClass.FULL)):
        for k in range(expected.shape[-1]):
            rows = (expected[0, 0, :, k] == cls).nonzero().flatten().tolist()
            assert idx[0, 0, k, : num[0, 0, k]].tolist() == rows
    assert "kv in [(q_lo - 69), (q_hi + 1))" in bm.explain()


def test_from_kv_blocks_sparsity_and_to_string() -> None:
    num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128, seq_lengths=(256, 256))
    assert bm.to_dense().tolist() == [[[[1, 0], [1, 1]]]]
    assert bm.sparsity() == pytest.approx(25.0)
    assert bm.q_num_blocks.tolist() == [[[2, 1]]] and bm.q_indices[0, 0, 0].tolist() == [0, 1]
    assert bm.to_string().splitlines()[1:3] == ["██  ", "████"]
    theirs = torch_flex.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=128, seq_lengths=(256, 256))
    assert bm.sparsity() == pytest.approx(theirs.sparsity())
    sliced = create_block_mask(CASES["head_gate"](), 2, 3, 300, 300, "cpu", 64)[:, 1]
    assert sliced.kv_num_blocks.shape == (1, 1, 5)


def test_create_mask_matches_torch() -> None:
    mod = CASES["prefix_lm"]()
    ours = create_mask(mod, 2, 1, 70, 90, "cpu")
    theirs = torch_flex.create_mask(mod.fn, 2, 1, 70, 90, device="cpu")
    assert torch.equal(ours, theirs)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        create_block_mask(CASES["causal"](), None, None, 64, 64, "cpu", (0, 64))
    with pytest.raises(ValueError, match="Q_LEN"):
        create_block_mask(CASES["causal"](), None, None, 0, 64, "cpu")


# ---------------------------------------------------------------- document-style masks (sparsity.equality)

DOC_TABLE = std.document(300, 7)[1]["DOC"]
EQUALITY_TERMS = {
    "doc": lambda: node(Op.EQ, ir_load(std.Q), ir_load(std.KV)),
    "doc swapped": lambda: node(Op.EQ, ir_load(std.KV), ir_load(std.Q)),
    "block diagonal": lambda: node(Op.EQ, node(Op.FLOORDIV, std.Q, std.c(50)), node(Op.FLOORDIV, std.KV, std.c(70))),
    "doc of q vs kv // 40": lambda: node(Op.EQ, ir_load(std.Q), node(Op.FLOORDIV, std.KV, std.c(40))),
}
OTHER_TERMS = {"none": None, "causal": std.causal(), "window": std.sliding_window(90),
               "head gate": CASES["head_gate"]().ir, "not equal": node(Op.NE, std.Q, std.KV)}
INTERVAL_OTHERS = ("none", "causal", "window")  # the conjuncts that leave one kv interval per row


def ir_load(index):
    from flexcomp.ir import DType, load

    return load("DOC", DType.I32, (index,))


@pytest.mark.parametrize("term", sorted(EQUALITY_TERMS))
@pytest.mark.parametrize("other", sorted(OTHER_TERMS))
def test_equality_ranges_match_brute_force(term: str, other: str) -> None:
    mask = EQUALITY_TERMS[term]()
    if OTHER_TERMS[other] is not None:
        mask = node(Op.AND, OTHER_TERMS[other], mask)
    mod = mod_of(mask, {"DOC": DOC_TABLE, "GATE": HEAD_GATE})
    for q_len, kv_len, block in [(300, 300, 16), (300, 257, (32, 8)), (173, 300, (8, 64))]:
        bm = create_block_mask(mod, None, 3, q_len, kv_len, "cpu", block)
        expected = brute_classes(mod, 1, bm.kv_num_blocks.shape[1], q_len, kv_len, block)
        got = bm.tile_classes().expand_as(expected)
        if other in INTERVAL_OTHERS:  # one kv interval per row: exact tables, nothing evaluated
            assert list(bm.decided_by) == ["equality intervals"], bm.explain()
            assert torch.equal(got, expected), (term, other)
            continue
        assert bm.decided_by.get("equality ranges", 0) > 0, bm.explain()
        assert not ((got == TileClass.FULL) & (expected != TileClass.FULL)).any(), (term, other)
        assert not ((got == TileClass.EMPTY) & (expected != TileClass.EMPTY)).any(), (term, other)
        exact = create_block_mask(mod, None, 3, q_len, kv_len, "cpu", block, exact=True)
        assert torch.equal(exact.tile_classes().expand_as(expected), expected), (term, other)


def test_unsorted_documents_fall_back_to_bands() -> None:
    shuffled = DOC_TABLE[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    mod = mod_of(std.document(300, 7)[0], {"DOC": shuffled})
    bm = create_block_mask(mod, None, None, 300, 300, "cpu", 32, exact=True)
    assert "equality ranges" not in bm.decided_by
    assert torch.equal(bm.tile_classes(), brute_classes(mod, 1, 1, 300, 300, 32))


# ---------------------------------------------------------------- chunked index tables (sparsity.tables)

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")  # fmt: skip


def random_ranges(rows: int, cols: int, monotone: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """Per-row (a, f0, f1, c) with 0 <= a <= f0 <= f1 <= c <= cols, non-decreasing over rows if `monotone`."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randint(0, cols + 1, (rows, 4), generator=g).sort(1).values
    if monotone:
        points = points.sort(0).values
    return tuple(points.T.contiguous())


def listed(num: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    return [idx[0, 0, r, : num[0, 0, r]].tolist() for r in range(num.shape[-1])]


@pytest.mark.parametrize("monotone", [True, False])
@pytest.mark.parametrize("rows, cols", [(1, 1), (37, 53), (61, 19)])
def test_chunked_range_tables_equal_one_shot_and_brute_force(monkeypatch, monotone, rows, cols) -> None:
    ranges = random_ranges(rows, cols, monotone, seed=rows * cols)
    grid = Grid(1, 1, rows * 16, cols * 16, 16, 16)
    built = {}
    for chunk in (1, 7, cols + 1, 1 << 40):  # one row per band ... the whole table in one band
        monkeypatch.setattr(tables_module, "CHUNK_ELEMENTS", chunk)
        lazy = rows_from_ranges(ranges, grid, torch.device("cpu"))
        built[chunk] = {name: make() for name, make in lazy.items()}
    one_shot = built[1 << 40]
    for chunk, got in built.items():
        assert all(torch.equal(got[name], one_shot[name]) for name in TABLES), chunk
    a, f0, f1, c = (t.tolist() for t in ranges)
    partial = [list(range(a[r], f0[r])) + list(range(f1[r], c[r])) for r in range(rows)]
    full = [list(range(f0[r], f1[r])) for r in range(rows)]
    by_col = lambda lists: [[r for r in range(rows) if k in lists[r]] for k in range(cols)]
    expected = {"kv": partial, "full_kv": full, "q": by_col(partial), "full_q": by_col(full)}
    for kind, lists in expected.items():
        assert listed(one_shot[f"{kind}_num_blocks"], one_shot[f"{kind}_indices"]) == lists, kind


@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm", "block_causal"])
@pytest.mark.parametrize("shape", [(1000, 777, (48, 40)), (777, 1000, (40, 48)), (130, 1000, (128, 7))])
def test_chunked_block_mask_equals_one_shot(monkeypatch, name, shape) -> None:
    q_len, kv_len, block = shape
    mod = CASES[name]()
    built = {}
    for chunk in (5, 1 << 40):
        monkeypatch.setattr(tables_module, "CHUNK_ELEMENTS", chunk)
        bm = create_block_mask(mod, None, None, q_len, kv_len, "cpu", block)
        built[chunk] = {table: getattr(bm, table) for table in TABLES}
    assert all(torch.equal(built[5][t], built[1 << 40][t]) for t in TABLES), name
    got = built[5]
    assert torch.equal(BlockMask.from_kv_blocks(*(got[t] for t in TABLES[:4]), block, mod, (q_len, kv_len))
                       .tile_classes(), brute_classes(mod, 1, 1, q_len, kv_len, block)), name
    nkv = -(-kv_len // block[1])
    for kind in ("", "full_"):  # the q-major tables from ranges = the transposes of the listed kv entries
        num, idx = transpose_ordered(got[f"{kind}kv_num_blocks"], got[f"{kind}kv_indices"], nkv)
        assert listed(num, idx) == listed(got[f"{kind}q_num_blocks"], got[f"{kind}q_indices"]), (name, kind)


# ---------------------------------------------------------------- no O(L^2) memory


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any torch op produces while active, and the storages of those above `limit`."""

    def __init__(self, limit: int = 1 << 62):
        super().__init__()
        self.largest, self.limit, self.big_storages = 0, limit, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() > self.limit:
                    self.big_storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "document banded"])
def test_no_quadratic_allocation_at_long_lengths(monkeypatch, name: str) -> None:
    """Nothing of L**2 elements; the dense document tables (nq x nkv, sync-free) are O(tiles), the banded ones less."""
    if name == "document banded":
        monkeypatch.setattr(equality, "DENSE_TILES", 1 << 20)
    dense_document = name == "document"
    name = name.split()[0]
    L = 1 << 20 if name != "document" else 1 << 18
    mask, tensors = std.document(L, 1000) if name == "document" else (
        std.causal() if name == "causal" else std.sliding_window(4096), {})
    mod = mod_of(mask, tensors)
    with LargestTensor() as probe:
        bm = create_block_mask(mod, None, None, L, L, "cpu")
        if name != "causal":  # causal's full table is inherently nq * nkv / 2 entries: stays lazy
            for table in ("kv_indices", "full_kv_indices", "q_indices", "full_q_indices"):
                getattr(bm, table)
    tiles = bm.num_blocks[0] * bm.num_blocks[1]
    limit = bm.num_blocks[0] * (bm.num_blocks[1] + 1) if dense_document else max(L, tiles // 16)
    assert probe.largest <= limit, f"{name}: a tensor of {probe.largest} elements ({L=}, {tiles=})"


def test_causal_tables_at_long_lengths_allocate_only_themselves() -> None:
    """Every table of causal at L = 2**20: the nq * nkv tables are built in bands, their only big allocations."""
    L = 1 << 20
    bm = create_block_mask(mod_of(std.causal()), None, None, L, L, "cpu")
    tiles = bm.num_blocks[0] * bm.num_blocks[1]
    with LargestTensor(limit=tiles // 16) as probe:
        tables = {name: getattr(bm, name) for name in TABLES}
    table_storages = {t.untyped_storage().data_ptr() for t in tables.values()}
    assert probe.big_storages <= table_storages and len(probe.big_storages) == 2, probe.big_storages
    full_q = tables["full_q_indices"][0, 0]
    assert full_q.shape[-1] == bm.num_blocks[0] - 1 and full_q[5, : tables["full_q_num_blocks"][0, 0, 5]].tolist() \
        == list(range(6, bm.num_blocks[0]))  # kv block 5 is FULL for the q blocks after it


# ---------------------------------------------------------------- closed-form counts on the device


SYMBOLIC_MASKS = {
    "causal": std.causal(), "sliding 7": std.sliding_window(7), "sliding 300": std.sliding_window(300),
    "prefix-LM": std.prefix_lm(700), "block-causal": std.block_causal(300), "offset +": std.offset_causal(333),
    "offset -": std.offset_causal(-333),
    "scaled": node(Op.LE, std.KV, node(Op.FLOORDIV, node(Op.MUL, std.Q, std.c(3)), std.c(2))),  # kv <= 3q // 2
    "abs band": node(Op.LE, node(Op.ABS, node(Op.SUB, std.Q, std.KV)), std.c(100)),
}  # fmt: skip
GRIDS = [(1000, 777, 48, 40), (777, 1000, 40, 48), (130, 1000, 128, 7), (4096, 2048, 128, 64), (1, 1, 128, 128),
         (5, 300, 16, 16), (2999, 1234, 100, 32), (32768, 32768, 128, 128)]


@pytest.mark.parametrize("name", sorted(SYMBOLIC_MASKS))
def test_device_counts_equal_host_ranges(name: str) -> None:
    """sparsity.counts (symbolic in the q-block index, replayed as device ops) = bounds_rows' counts, on every grid."""
    from flexcomp.sparsity import counts
    from flexcomp.sparsity.closed_form import closed_form_bounds
    from flexcomp.sparsity.tables import bounds_rows

    bounds = closed_form_bounds(SYMBOLIC_MASKS[name])
    assert bounds is not None, name
    for q_len, kv_len, bq, bk in GRIDS:
        grid = Grid(1, 1, q_len, kv_len, bq, bk)
        a, f0, f1, c = bounds_rows(bounds, grid, {})
        values = counts.symbolic_counts(bounds, q_len, kv_len, bq, bk)
        assert values is not None, (name, q_len, kv_len, bq, bk)
        partial, full = counts.build(values, grid.num_q_blocks, torch.device("cpu"))
        assert partial.dtype == full.dtype == torch.int32 and partial.shape == (1, 1, grid.num_q_blocks)
        assert torch.equal(partial[0, 0], ((f0 - a) + (c - f1)).int()), (name, q_len, kv_len, bq, bk)
        assert torch.equal(full[0, 0], (f1 - f0).int()), (name, q_len, kv_len, bq, bk)


class Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops run while active, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, most", [("causal", 2), ("sliding_window", 5)])
def test_lazy_closed_form_build_is_a_handful_of_ops(name: str, most: int) -> None:
    """The build issues no op at all; the counts, when read, only aranges / fulls / elementwise ops: no copy, no
    sync (item, nonzero), no sort."""
    mod = mod_of(std.causal() if name == "causal" else std.sliding_window(1024))
    create_block_mask(mod, None, None, 32768, 32768, "cpu")  # derives and caches the symbolic counts
    with Ops() as log:
        bm = create_block_mask(mod, None, None, 32768, 32768, "cpu")
        assert bm.table_dims == (1, 1, 256) and bm.shape == (1, 1, 32768, 32768) and bm.device.type == "cpu"
    assert log.names == []
    with Ops() as log:
        counts = bm.kv_num_blocks, bm.full_kv_num_blocks
    device_ops = [op for op in log.names if not op.startswith(("view", "_unsafe_view"))]
    assert len(device_ops) <= most and set(device_ops) <= {"arange.start_step", "full.default", "clamp_.default",
                                                           "sub.Tensor"}, log.names
    assert bm.table_dims == tuple(counts[0].shape) == tuple(counts[1].shape)
    assert bm._lazy.keys() >= {"kv_indices", "full_kv_indices", "q_indices"}
    expected = brute_classes(mod, 1, 1, 2048, 2048, 128) if name == "causal" else None
    if expected is not None:  # the same call at a size brute force affords
        assert torch.equal(create_block_mask(mod, None, None, 2048, 2048, "cpu").tile_classes(), expected)


def test_a_forward_with_closed_form_bounds_reads_no_table() -> None:
    """The kernel loops from the bounds: a forward-only user never pays for a causal mask's tables."""
    torch.manual_seed(0)
    mod = mod_of(std.causal())
    bm = create_block_mask(mod, None, None, 200, 200, "cpu")
    q, k, v = (torch.randn(1, 2, 200, 16) for _ in range(3))
    out = flexcomp.flex_attention(q, k, v, block_mask=bm, backend="triton")
    assert set(bm._tables) == set(), "a table was built"
    dense = torch.ones(200, 200, dtype=torch.bool).tril()
    expected = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 4).masked_fill(~dense, float("-inf")),
                             -1) @ v.double()
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_counts_fall_back_to_the_host_outside_the_fragment(monkeypatch) -> None:
    from flexcomp.sparsity import counts

    mod = CASES["sliding_window"]()
    fast = create_block_mask(mod, None, None, 1000, 900, "cpu", (64, 32))
    monkeypatch.setattr(counts, "symbolic_counts", lambda *args: None)
    slow = create_block_mask(mod, None, None, 1000, 900, "cpu", (64, 32))
    for table in TABLES:
        assert torch.equal(getattr(fast, table), getattr(slow, table)), table


def test_listed_first_is_torchs_stable_sort(rng) -> None:
    """The tables list each row's tiles as torch's stable descending sort does, placed without sorting."""
    from flexcomp.sparsity.tables import columns, listed_first

    for rows, width in [(1, 1), (3, 7), (16, 64), (5, 300)]:
        listed = torch.rand(rows, width, generator=rng) < torch.rand(rows, 1, generator=rng)
        expected = listed.sort(dim=1, descending=True, stable=True).indices.to(torch.int32)
        assert torch.equal(listed_first(listed, columns(width, torch.device("cpu"))), expected)
