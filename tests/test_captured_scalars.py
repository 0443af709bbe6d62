"""Captured ints, floats and bools rebound after decoration are seen by the next call (issue 16, part 2).

A mod bakes its captured Python values in as constants; flexcomp/guards.py re-reads them at every call and the
mod re-specializes when one changed, as torch's compiled flex_attention recompiles on a failed guard.
"""

from __future__ import annotations

import pytest
import torch

import flexcomp as fc
from flexcomp.errors import FlexcompError, UndefinedNameError
from flexcomp.guards import same_value, value_key
from flexcomp.tiles import TileClass

BACKENDS = ["reference", "triton"]
L, BLOCK = 64, 16  # four tiles a side: closed-form bounds and table walks both have tiles to skip

OFF = 0  # rebound by the tests (through the `rebind` fixture, which restores it)
WIDTH = 8
DOUBLE = False
EXPONENT = 1


@fc.mask_mod
def shifted(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx + OFF


def near(q_idx, kv_idx):  # a helper: its globals are guarded like the mod's own
    return q_idx - kv_idx < WIDTH


@fc.mask_mod
def local(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & near(q_idx, kv_idx)


@fc.mask_mod
def shifted_window(b, h, q_idx, kv_idx):  # a mod calling a mod that captures OFF
    return shifted(b, h, q_idx, kv_idx) & (q_idx - kv_idx < 24)


@fc.score_mod
def maybe_doubled(score, b, h, q_idx, kv_idx):  # as torch's score_mod_scale test: a captured bool
    return score * 2 if DOUBLE else score


@fc.score_mod
def powered(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * EXPONENT * 0.05


def make_softcap(cap: float):
    """A closure over a float, and a setter that rebinds its cell."""

    @fc.score_mod
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    def set_cap(value: float) -> None:
        nonlocal cap
        cap = value

    return softcap, set_cap


@pytest.fixture
def rebind(monkeypatch):
    """rebind(NAME, value): set a module global for this test only."""
    return lambda name, value: monkeypatch.setitem(globals(), name, value)


@pytest.fixture
def qkv(randn):
    return tuple(randn(1, 2, L, 16) for _ in range(3))


def attend(qkv, backend, **kw):
    return fc.flex_attention(*qkv, backend=backend, return_lse=True, **kw)


def assert_matches(got, want):
    from naive import assert_close_to_reference

    assert_close_to_reference(*got, *want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_int_rebound(backend, rebind, qkv, naive_attention):
    for off in (0, 16, -5, 0):
        rebind("OFF", off)
        want = naive_attention(*qkv, mask_fn=lambda b, h, i, j, off=off: j <= i + off)
        assert_matches(attend(qkv, backend, mask_mod=shifted), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_float_rebound(backend, qkv, naive_attention):
    softcap, set_cap = make_softcap(20.0)
    for cap in (20.0, 0.5):
        set_cap(cap)
        want = naive_attention(*qkv, score_fn=lambda s, b, h, i, j, c=cap: c * torch.tanh(s / c))
        assert_matches(attend(qkv, backend, score_mod=softcap), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_bool_rebound(backend, rebind, qkv, naive_attention):
    for double in (False, True, False):
        rebind("DOUBLE", double)
        want = naive_attention(*qkv, score_fn=lambda s, b, h, i, j, d=double: s * 2 if d else s)
        assert_matches(attend(qkv, backend, score_mod=maybe_doubled), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_read_in_a_helper_rebound(backend, rebind, qkv, naive_attention):
    for width in (8, 3):
        rebind("WIDTH", width)
        want = naive_attention(*qkv, mask_fn=lambda b, h, i, j, w=width: (i >= j) & (i - j < w))
        assert_matches(attend(qkv, backend, mask_mod=local), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mod_called_by_a_mod_and_composed_masks_see_the_rebinding(backend, rebind, qkv, naive_attention):
    composed = fc.and_masks(shifted, lambda b, h, q_idx, kv_idx: q_idx - kv_idx < 24)
    for off in (0, 9):
        rebind("OFF", off)
        want = naive_attention(*qkv, mask_fn=lambda b, h, i, j, off=off: (j <= i + off) & (i - j < 24))
        assert_matches(attend(qkv, backend, mask_mod=shifted_window), want)
        assert_matches(attend(qkv, backend, mask_mod=composed), want)


def test_int_float_and_bool_of_equal_value_are_different_constants(rebind, qkv, naive_attention):
    variants = []
    for exponent in (1, 1.0, True):
        rebind("EXPONENT", exponent)
        variants.append(powered.specialized())
        want = naive_attention(*qkv, score_fn=lambda s, b, h, i, j: s + (j - i) * 0.05)
        assert_matches(attend(qkv, "reference", score_mod=powered), want)
    assert len({id(v) for v in variants}) == 3
    assert len({v.raw_ir for v in variants}) == 3  # each its own constant, i32, f32 or bool (folded alike later)


def tile_classes(keep: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) [nq, nkv] of a dense [L, L] mask, by brute force."""
    tiles = keep.view(L // block, block, L // block, block).transpose(1, 2).flatten(2)
    full = tiles.all(-1)
    return full, tiles.any(-1) & ~full


def dense(mask_fn) -> torch.Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return mask_fn(i, j)


def test_create_block_mask_sees_the_rebinding(rebind):
    for off in (0, 16, -20):
        rebind("OFF", off)
        block_mask = fc.create_block_mask(shifted, None, None, L, L, device="cpu", BLOCK_SIZE=BLOCK)
        full, partial = tile_classes(dense(lambda i, j, off=off: j <= i + off), BLOCK)
        classes = block_mask.tile_classes()[0, 0]
        assert torch.equal(classes == TileClass.FULL, full) and torch.equal(classes == TileClass.PARTIAL, partial)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("off", [16, -6])
def test_block_mask_built_before_the_rebinding_has_torchs_meaning(backend, off, rebind, qkv, naive_attention):
    """torch's BlockMask keeps the tables it was built with and calls its mask_mod, which reads the name now, in
    the PARTIAL tiles: so do flexcomp's, whose closed-form bounds (from the old value) are then not used."""
    block_mask = fc.create_block_mask(shifted, None, None, L, L, device="cpu", BLOCK_SIZE=BLOCK)
    assert block_mask.bounds is not None  # built in closed form: the bounds must be dropped below
    rebind("OFF", off)
    full, partial = tile_classes(dense(lambda i, j: j <= i), BLOCK)
    new_mask = dense(lambda i, j: j <= i + off)
    expand = lambda t: t.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    keep = expand(full) | (expand(partial) & new_mask)
    assert not torch.equal(keep, new_mask) and not torch.equal(keep, dense(lambda i, j: j <= i))  # both matter
    want = naive_attention(*qkv, dense_mask=keep)
    assert_matches(attend(qkv, backend, block_mask=block_mask), want)


def test_unchanged_values_do_not_relower(rebind, qkv):
    mod = fc.mask_mod(local.fn)  # a fresh Mod, compiled for WIDTH = 8
    relowered = []
    relower = mod.relower
    mod.relower = lambda: relowered.append(1) or relower()
    for _ in range(3):
        attend(qkv, "reference", mask_mod=mod)
        fc.create_block_mask(mod, None, None, L, L, device="cpu")
    assert relowered == [] and mod.specialized() is mod
    rebind("WIDTH", 5)
    narrow = mod.specialized()
    assert relowered == [1] and narrow is not mod
    for width, want in ((5, narrow), (8, mod), (5, narrow)):  # alternating values compile once each
        rebind("WIDTH", width)
        attend(qkv, "reference", mask_mod=mod)
        assert mod.specialized() is want
    assert relowered == [1]


def test_a_deleted_global_is_an_error_at_the_call(monkeypatch, qkv):
    monkeypatch.delitem(globals(), "WIDTH")
    with pytest.raises(UndefinedNameError, match="name 'WIDTH' is not defined") as info:
        attend(qkv, "reference", mask_mod=local)
    assert info.value.loc.line == near.__code__.co_firstlineno + 1


def test_a_value_that_no_longer_compiles_is_an_error_at_the_call(rebind, qkv):
    rebind("OFF", 2**40)
    with pytest.raises(FlexcompError, match="OFF"):
        attend(qkv, "reference", mask_mod=shifted)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (1, 1, True),
        (1, 1.0, False),
        (1, True, False),
        (0.0, -0.0, False),
        (float("nan"), float("nan"), True),
        ((1, 2.0), (1, 2.0), True),
        ((1, 2.0), (1, 2), False),
        (None, None, True),
        (torch.float32, torch.float32, True),
        (torch.float32, torch.float16, False),
    ],
)
def test_values_are_compared_by_type_and_value(a, b, same):
    assert same_value(a, b) is same
    assert (value_key(a) == value_key(b)) is same
