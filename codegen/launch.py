"""Launching generated kernels: the first of their configs that fits the GPU, and a cheaper launch path.

Triton's `kernel[grid](...)` re-derives, on every call, how each of the ~50 arguments specializes the kernel
(pointer alignment, integers equal to 1 or divisible by 16, dtypes) and hashes that into its cache key: about
0.1 ms of host time per launch on the H100 machine, which for small or very sparse problems is longer than the
kernel.  `launch_kernel` keys its own memo on exactly what Triton specializes on (constexprs and compile options by
value; tensors by dtype and 16-byte alignment; integers by ==1, %16 == 0 and 32-bit range), takes Triton's path
on a miss, and on a hit calls the compiled kernel directly (`CompiledKernel[grid](*all parameters)`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from triton.runtime.errors import OutOfResources

from flexcomp.errors import BackendError

Config = TypeVar("Config")

# Compile options for every generated kernel.  The online softmax relies on fused multiply-adds; Triton 3.9
# warns that its default for them turns off in 3.10, so say so explicitly instead of inheriting a default.
KERNEL_OPTIONS = {"enable_fp_fusion": True}


def launch_first_fitting(configs: Iterable[Config], run: Callable[[Config], None], refusal: str) -> Config:
    """Run `run` with each config in turn (the chosen one, then smaller: a mod that gathers from tables can need
    more shared memory) until one does not run out of resources, and return that one.  When none fits, a
    BackendError: `refusal` and the last error."""
    error = None
    for config in configs:
        try:
            run(config)
            return config
        except OutOfResources as e:
            error = e
    raise BackendError(f"{refusal}: {error}")


FAST_LAUNCH = os.environ.get("FLEXCOMP_FAST_LAUNCH", "1") != "0"  # "0": always Triton's own launch path
_COMPILED: dict[tuple, Any] = {}  # (kernel, specialization signature) -> Triton's compiled kernel
FAST_LAUNCHES = [0]  # launches that took the direct path (a counter, for checks)
_PARAMS: dict[Any, tuple] = {}  # kernel -> ((name, is_constexpr, default) per parameter, their names)
INT32 = range(-(2**31), 2**31)
_UNKNOWN = object()  # an argument of a kind _specialization does not know: that launch takes Triton's path


def launch_kernel(kernel, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """kernel[grid](*args, **kwargs, **KERNEL_OPTIONS), returning the compiled kernel (see the module docstring)."""
    kwargs.update(KERNEL_OPTIONS)
    if not FAST_LAUNCH or not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return kernel[grid](*args, **kwargs)
    if not hasattr(kernel, "params"):  # not a JITFunction (a wrapper that records launches)
        return kernel[grid](*args, **kwargs)
    params, names = _PARAMS.get(kernel) or _PARAMS.setdefault(kernel, _parameters(kernel))
    values = [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, _, default) in enumerate(params)]
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))  # num_warps, num_stages, ...
    signature = tuple(v if constexpr else _specialization(v) for v, (_, constexpr, _) in zip(values, params))
    if _UNKNOWN in signature:
        return kernel[grid](*args, **kwargs)
    key = (kernel, torch.cuda.current_device(), options, signature)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = kernel[grid](*args, **kwargs)
        return compiled
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*values)
    FAST_LAUNCHES[0] += 1
    return compiled


def _parameters(kernel) -> tuple[tuple[tuple[str, bool, Any], ...], frozenset[str]]:
    params = tuple((p.name, bool(p.is_constexpr), p.default if p.has_default else None) for p in kernel.params)
    return params, frozenset(name for name, _, _ in params)


def _specialization(value: Any) -> Any:
    """What Triton's launch specializes a runtime argument on (a superset: never a false hit)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int, value == 1, value % 16 == 0, value in INT32
    if isinstance(value, float):
        return float
    return _UNKNOWN
