"""The block mask build's host reads: captured tensors read in one packed copy (sparsity.host), point reads of small
tables by one gather (sparsity.summaries), and transformers' mask hook, whose padding runs and offsets feed both."""

import pytest
import torch
from test_blockmask import brute_classes

from flexcomp.sparsity import host, summaries

GRID = 4  # grid dims of the analysis: b, h, q blocks, kv blocks


def test_packed_read_round_trips_every_dtype(rng):
    tensors = {
        "ids": torch.randint(-5, 50, (3, 7), generator=rng, dtype=torch.int32),
        "kept": torch.rand(5, generator=rng) > 0.5,
        "bias": torch.randn(2, 3, generator=rng).to(torch.float16),  # after an odd byte count: offsets unaligned
        "scale": torch.randn((), generator=rng, dtype=torch.float64),
        "steps": torch.randint(0, 9, (4,), generator=rng)[::2],  # not contiguous
    }
    got = host._read_together(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name


def test_a_remembered_copy_is_used_until_written():
    device_tensor = torch.empty(3, dtype=torch.int32, device="meta")  # not CPU, and reading it would fail
    kept = torch.tensor([4, 1, 7], dtype=torch.int32)
    host.remember(device_tensor, kept)
    assert torch.equal(host.on_host({"t": device_tensor})["t"], kept)
    device_tensor.add_(1)  # written in place: the host copy is stale
    with pytest.raises(NotImplementedError):  # read again (a meta tensor cannot be)
        host.on_host({"t": device_tensor})


def _per_axis(values: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * GRID
    shape[axis] = values.numel()
    return values.view(shape)


def _point(value: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(value).view([1] * GRID), torch.tensor(value).view([1] * GRID)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bool])
def test_point_reads_equal_the_reductions(monkeypatch, rng, dtype):
    """start[b], table[b, 3], offsets[1], and reads the point path must leave (a range, an index outside): the
    same bounds as the per-dimension reductions give."""
    b = _per_axis(torch.arange(4), 0)
    q_lo, q_hi = _per_axis(torch.tensor([0, 8, 16]), 2), _per_axis(torch.tensor([7, 15, 20]), 2)
    raw = torch.randn(4, 21, generator=rng) * 100
    table = raw > 0 if dtype == torch.bool else raw.to(dtype)
    reads = [
        (table[:, 0], [(b, b)]),
        (table, [(b, b), _point(3)]),
        (table[0], [_point(1)]),
        (table[0], [_point(-1)]),  # wraps: the whole dimension, by the reductions
        (table, [(b, b), (q_lo, q_hi)]),  # a range: the reductions
        (table[0], [(q_lo, q_lo)]),  # one q per block: a point read along q
    ]
    fast = [summaries.load_bounds(t, ranges) for t, ranges in reads]
    monkeypatch.setattr(summaries, "POINT_MAX", -1)  # no point reads
    slow = [summaries.load_bounds(t, ranges) for t, ranges in reads]
    for i, ((f_lo, f_hi), (s_lo, s_hi)) in enumerate(zip(fast, slow)):
        assert f_lo.dtype == s_lo.dtype, i
        assert torch.equal(f_lo, s_lo) and torch.equal(f_hi, s_hi), i
    assert torch.equal(fast[0][0].view(-1), table[:, 0].to(fast[0][0].dtype))  # and they are the table's values


# ---------------------------------------------------------------- transformers' mask hook

fct = pytest.importorskip("flexcomp.integrations.transformers")


@pytest.mark.parametrize("offsets", [(0, 0), (5, 0), (torch.tensor(5), torch.tensor(0))])
def test_model_mask_left_padding_equals_a_dense_mask(monkeypatch, rng, offsets):
    """Left padding (a run per row) at query offsets given as ints or as tensors (a StaticCache's), three forwards
    with new padding (the later ones reuse the first one's lowering): the hook's mask, its Python function and its
    tile classes against the mask written out densely."""
    batch, q_len, kv_len = 3, 40, 45
    q_offset, kv_offset = offsets
    q = torch.arange(q_len)[:, None] + int(q_offset)
    kv = torch.arange(kv_len)[None, :] + int(kv_offset)
    keys = set()
    for _ in range(3):
        keep = torch.ones(batch, kv_len, dtype=torch.long)
        for row in range(batch):
            keep[row, : int(torch.randint(0, 20, (), generator=rng))] = 0
        got = fct.model_mask(batch, q_len, kv_len, q_offset, kv_offset, None, keep, "cpu")
        expected = ((kv <= q)[None] & keep.bool()[:, None, :])[:, None]
        mod = got.block_mask.mask_mod
        keys.add(mod.key)
        assert torch.equal(fct.fc.create_mask(mod, batch, 1, q_len, kv_len, "cpu"), expected)
        b, q_idx, kv_idx = torch.arange(batch).view(-1, 1, 1, 1), torch.arange(q_len)[:, None], torch.arange(kv_len)
        assert torch.equal(mod(b, 0, q_idx, kv_idx), expected)  # calling the Mod runs its Python function
        assert torch.equal(got.offsets, torch.tensor([int(q_offset), int(kv_offset)], dtype=torch.int32))
        classes = got.block_mask.tile_classes().expand(batch, 1, -1, -1)
        assert torch.equal(classes, brute_classes(mod, batch, 1, q_len, kv_len, got.block_mask.BLOCK_SIZE))
        monkeypatch.setattr(fct, "_lowered", _not_again)  # the later forwards reuse the first one's lowering
    assert len(keys) == 1  # one IR: one kernel for every forward


def _not_again(*args):
    raise AssertionError("the mask was lowered again")


def test_a_pattern_with_tensors_of_its_own_is_lowered_at_each_forward(rng):
    """chunked attention captures the left padding itself: no reuse, and still the dense mask."""
    batch, length, chunk = 2, 24, 8
    keep = torch.ones(batch, length, dtype=torch.long)
    keep[1, :5] = 0
    left = torch.tensor([0, 5])
    pattern = fct.fc.and_masks(fct._causal, fct._chunked(chunk, left))
    with fct.use_mods(mask_mod=pattern):
        got = fct.model_mask(batch, length, length, 0, 0, None, keep, "cpu")
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    start = left.view(-1, 1, 1)
    same_chunk = (kv - start) // chunk == (q - start) // chunk
    expected = ((kv <= q) & same_chunk & keep.bool()[:, None, :])[:, None]
    assert torch.equal(fct.fc.create_mask(got.block_mask.mask_mod, batch, 1, length, length, "cpu"), expected)
