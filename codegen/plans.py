"""Call plans: what a repeated attention call launches, decided once.

A training loop calls attention with the same tensor layouts, mods, block mask and options at every step.  What
the host derives from those (input checks, the launch config, the kernel module, the constexprs, the block tables'
arguments, each compiled kernel's argument list) depends on nothing else, so a plan keeps it under a key made of
exactly those things, and a repeated call computes the key, allocates its outputs and launches
(codegen/launch.py `PreparedLaunch`).  Host time per call is what decides small and very sparse problems, where
the GPU finishes a step before the host has issued the next (benchmarks/profile_host.py).

What a key holds: each tensor's `layout` (dtype, device, shape, strides, 16-byte alignment: all a kernel
specializes on), the mods by identity (a plan keeps them alive, so their ids stay theirs), the block mask by
identity (held weakly: its plan goes when it goes) with its mask_mod and, for flexcomp's BlockMask, its `version`
(bumped when a table is replaced), and the scalars and options.  A torch BlockMask whose tables are replaced in
place after use is served the tables its plan first read: build a new one instead (torch's own are immutable).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch

from flexcomp.mods import Mod


def layout(t: torch.Tensor) -> tuple:
    """What a launch depends on in a tensor besides its data: dtype, device, shape, strides, 16-byte alignment."""
    return t.dtype, t.device, t.shape, t.stride(), t.data_ptr() % 16 == 0


def row_alignment(*layouts: tuple[int, tuple[int, ...]]) -> int:
    """ROW_ALIGN: the largest power of two, up to 16 bytes' worth of elements, that divides every batch, head and
    row stride of the given (element size, strides) pairs; 1 unless every last stride is 1.

    Triton specializes an integer argument only on divisibility by 16, so a row stride of 40 or 24 elements (a
    16-bit head dim of 40 or 24: 16-byte rows) reads as unaligned and its tiles load element by element.  The
    kernels hint the strides with tl.multiple_of(stride, ROW_ALIGN) instead: 16-byte vector loads (cp.async).  That
    element-wise path is also where Triton 3.6 on sm_90 computed wrong outputs (D=40, Dv=24: relative error 1.3)
    and faulted (D=72, Dv=24): issue 16; benchmarks/NOTES_forward.md."""
    align = 16
    for size, strides in layouts:
        if strides[-1] != 1:
            return 1
        align = min(align, 16 // size)
        for s in strides[:-1]:
            while align > 1 and s % align:
                align //= 2
    return align


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a new contiguous tensor of `shape` (what a plan binds for the outputs it allocates)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def options_key(kernel_options: Mapping[str, Any] | None) -> Hashable:
    """kernel_options as part of a key (a TypeError for unhashable values: such calls are not planned)."""
    if not kernel_options:
        return None
    items = tuple(sorted(kernel_options.items()))
    hash(items)
    return items


def live_buffers(mod: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """(slot name, tensor) of each captured tensor of `mod`, as the kernels read them (bool as uint8 bytes).

    `Mod.tensors` resolves them now (a global rebound to another tensor of the same shape is seen at every
    call) and refuses a shape or dtype the mod was not compiled for."""
    if not isinstance(mod, Mod) or not mod.buffers:
        return []
    values = mod.tensors()
    out = []
    for spec in mod.buffers:
        t = values[spec.name]
        out.append((f"{prefix}{spec.name}", t.view(torch.uint8) if t.dtype == torch.bool else t))
    return out


_CACHES: weakref.WeakSet[PlanCache] = weakref.WeakSet()


def clear_plans() -> None:
    """Forget every plan (for scripts that change a config table between calls, such as the tuning scripts)."""
    for cache in list(_CACHES):
        cache.clear()


class PlanCache:
    """Plans by key, the least recently used dropped past `size`.

    A plan made for a block mask (`anchor`) is found only for that very object and is dropped when it dies: the
    key holds the anchor's id, which Python reuses once the object is gone."""

    def __init__(self, size: int = 64):
        self.size = size
        self._plans: OrderedDict[Hashable, tuple[weakref.ref | None, Any]] = OrderedDict()
        _CACHES.add(self)

    def get(self, key: Hashable, anchor: Any) -> Any:
        entry = self._plans.get(key)
        if entry is None:
            return None
        ref, plan = entry
        if ref is not None and ref() is not anchor:
            return None
        self._plans.move_to_end(key)
        return plan

    def put(self, key: Hashable, anchor: Any, plan: Any) -> None:
        ref = None
        if anchor is not None:
            try:
                ref = weakref.ref(anchor, lambda dead, key=key: self._drop(key, dead))
            except TypeError:  # an object without weak references: plans for it are not kept
                return
        self._plans[key] = (ref, plan)
        self._plans.move_to_end(key)
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)

    def _drop(self, key: Hashable, dead: weakref.ref) -> None:
        entry = self._plans.get(key)
        if entry is not None and entry[0] is dead:
            del self._plans[key]

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
