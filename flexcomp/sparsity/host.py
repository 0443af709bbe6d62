"""The host copies of captured tensors that the analysis reads: all of them for one device read (one sync).

The analysis (intervals, summaries, equality) runs on the host.  Reading each captured device tensor alone costs a
device sync apiece; `on_host` packs the device ones into one byte buffer and reads it once.  A caller that already
holds a tensor's values on the host (flexcomp.integrations.transformers builds its padding runs and offsets there)
`remember`s them, and the analysis reads no device at all for that tensor, as long as it is not written in place.
"""

from __future__ import annotations

import weakref

import torch

Tensor = torch.Tensor
_TWINS: dict[int, tuple[weakref.ref, int, Tensor]] = {}  # id(device tensor) -> (it, its _version, host copy)
# by id, not a WeakKeyDictionary: that compares keys with ==, which on tensors is elementwise


def remember(device_tensor: Tensor, host_tensor: Tensor) -> Tensor:
    """Record `host_tensor` (same values, on the CPU) as `device_tensor`'s host copy; returns `device_tensor`."""
    if device_tensor.device.type != "cpu":
        key = id(device_tensor)
        alive = weakref.ref(device_tensor, lambda _: _TWINS.pop(key, None))
        _TWINS[key] = (alive, device_tensor._version, host_tensor.detach())
    return device_tensor


def _twin(tensor: Tensor) -> Tensor | None:
    hit = _TWINS.get(id(tensor))
    if hit is None or hit[0]() is not tensor or hit[1] != tensor._version:  # written since: read it again
        return None
    return hit[2]


def on_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` (detached) on the CPU, the device ones read in one copy (one sync, none if all are remembered)."""
    out, to_read = {}, {}
    for k, v in tensors.items():
        twin = _twin(v) if v.device.type != "cpu" else None  # looked up by the tensor itself, not a detached view
        if twin is not None:
            out[k] = twin
        elif v.device.type != "cpu":
            to_read[k] = v.detach()
        else:
            out[k] = v.detach()
    if len(to_read) == 1:
        ((k, v),) = to_read.items()
        out[k] = v.cpu()
    elif to_read:
        out.update(_read_together(to_read))
    return out


def _read_together(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Several device tensors (of one device) to the CPU through one packed byte buffer: one copy."""
    flat = {k: v.contiguous().reshape(-1) for k, v in tensors.items()}
    as_bytes = [(v.view(torch.uint8) if v.dtype != torch.bool else v.to(torch.uint8)) for v in flat.values()]
    if len({b.device for b in as_bytes}) > 1:
        return {k: v.cpu() for k, v in tensors.items()}
    packed = torch.cat(as_bytes).cpu()
    out, start = {}, 0
    for (k, v), b in zip(flat.items(), as_bytes):
        chunk = packed[start : start + b.numel()]
        start += b.numel()
        # a copy: view(dtype) needs an offset aligned to the dtype's size
        out[k] = (chunk.to(torch.bool) if v.dtype == torch.bool else chunk.clone().view(v.dtype)).reshape(
            tensors[k].shape
        )
    return out


def on_device(tensors: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """Host tensors of one dtype on `device` through one copy (each copy from pageable memory waits for the device)."""
    if torch.device(device).type == "cpu" or len(tensors) < 2 or len({t.dtype for t in tensors}) > 1:
        return [t.to(device) for t in tensors]
    packed = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(packed.split([t.numel() for t in tensors]), tensors)]
