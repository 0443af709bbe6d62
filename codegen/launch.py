"""Launching generated kernels: the first of their configs that fits the GPU, and a cheaper launch path.

Triton's `kernel[grid](...)` re-derives, on every call, how each of the ~50 arguments specializes the kernel
(pointer alignment, integers equal to 1 or divisible by 16, dtypes) and hashes that into its cache key: about
0.1 ms of host time per launch on the H100 machine, which for small or very sparse problems is longer than the
kernel.  `launch_kernel` keys its own memo on exactly what Triton specializes on (constexprs and compile options by
value; tensors by dtype and 16-byte alignment; integers by ==1, %16 == 0 and 32-bit range), takes Triton's path
on a miss, and on a hit calls the compiled kernel directly (`CompiledKernel[grid](*all parameters)`).

A `PreparedLaunch` goes one step further for the call plans of codegen/plans.py: every argument is fixed once
except the per-call tensors (`Slot`s), so a repeated call fills a few list entries and calls the compiled kernel,
with no specialization work at all (the plan's key guarantees the specialization is the same).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch
from triton.compiler.compiler import CompiledKernel
from triton.runtime.errors import OutOfResources

from flexcomp.errors import BackendError

Config = TypeVar("Config")

# Compile options for every generated kernel.  The online softmax relies on fused multiply-adds; Triton 3.9
# warns that its default for them turns off in 3.10, so say so explicitly instead of inheriting a default.
# FLEXCOMP_FP_FUSION=0 turns them off, to see whether a numerical difference comes from where the compilers fused
# (benchmarks/alibi_slope_grad.py; Triton's own TRITON_DEFAULT_FP_FUSION does not reach these launches).
KERNEL_OPTIONS = {"enable_fp_fusion": os.environ.get("FLEXCOMP_FP_FUSION", "1") != "0"}


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
    if not _direct_launch_possible(kernel):
        return kernel[grid](*args, **kwargs)
    params, values, options = _bind(kernel, args, kwargs)
    signature = tuple(v if constexpr else _specialization(v) for v, (_, constexpr, _) in zip(values, params))
    if _UNKNOWN in signature:
        return kernel[grid](*args, **kwargs)
    key = (kernel, torch.cuda.current_device(), options, signature)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = kernel[grid](*args, **kwargs)
        return compiled
    compiled[_grid3(grid)](*values)
    FAST_LAUNCHES[0] += 1
    return compiled


def _bind(kernel, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, list[Any], tuple]:
    """(the kernel's parameters, every parameter's value in order, the compile options such as num_warps)."""
    params, names = _PARAMS.get(kernel) or _PARAMS.setdefault(kernel, _parameters(kernel))
    values = [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, _, default) in enumerate(params)]
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))  # num_warps, num_stages, ...
    return params, values, options


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


class Slot(NamedTuple):
    """A per-call argument of a PreparedLaunch: the tensor of this name in each call's `tensors`."""

    name: str


class PreparedLaunch:
    """`kernel[grid](*args, **kwargs)` with every argument fixed except the `Slot`s, which each call fills.

    The first call launches through `launch_kernel`; later calls (on a GPU, with the fast launch on) call Triton's
    compiled kernel with the argument list bound once.  Sound only while the slots' tensors specialize as the
    first call's did: same dtypes and 16-byte alignment, which the owner's cache key guarantees (plans.layout)."""

    def __init__(self, kernel, grid: tuple[int, ...], args: list[Any], kwargs: dict[str, Any]):
        self.kernel, self.grid = kernel, _grid3(grid)
        self.args, self.kwargs = list(args), {**kwargs, **KERNEL_OPTIONS}
        self.slots = [(i, a.name) for i, a in enumerate(self.args) if isinstance(a, Slot)]
        self.values: list[Any] | None = None  # every parameter, in order, for the compiled kernel
        self.runner: Callable[..., Any] | None = None

    def __call__(self, tensors: Mapping[str, Any]) -> Any:
        """Launch with the slots filled from `tensors`; returns the compiled kernel on the first launch."""
        if self.runner is not None:
            values = self.values.copy()
            for i, name in self.slots:
                values[i] = tensors[name]
            FAST_LAUNCHES[0] += 1
            return self.runner(*values)
        args = self.args.copy()
        for i, name in self.slots:
            args[i] = tensors[name]
        compiled = launch_kernel(self.kernel, self.grid, *args, **self.kwargs)
        if _direct_launch_possible(self.kernel) and isinstance(compiled, CompiledKernel):
            _, values, _ = _bind(self.kernel, tuple(self.args), self.kwargs)
            self.values, self.runner = values, _runner(compiled, self.grid)
        return compiled


def _runner(compiled: CompiledKernel, grid: tuple[int, int, int]) -> Callable[..., Any]:
    """`compiled[grid]`, or where no launch hook is set (profilers set one) and the compiled kernel has the fields
    its own runner uses, a leaner call of its launcher: Triton's runner looks up the current device, stream and
    hooks through several layers on every launch (~13 us per launch on the slower GPU hosts; benchmarks/
    NOTES_backward.md).  A hook set after a plan's first launch is not called for that plan's launches."""
    from triton import knobs

    compiled._init_handles()
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    fields = ("run", "function", "packed_metadata")
    if any(_set(hook) for hook in hooks) or not all(hasattr(compiled, f) for f in fields):
        return compiled[grid]
    launcher, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    device = torch.cuda.current_device()  # where _init_handles loaded the kernel
    stream_of = torch._C._cuda_getCurrentRawStream  # what Triton's driver.get_current_stream is for CUDA

    def run(*values: Any) -> None:
        launcher(*grid, stream_of(device), function, metadata, None, None, None, *values)

    return run


def interpreter_ready() -> bool:
    """Whether kernels can run under Triton's interpreter: TRITON_INTERPRET=1 now, and already when Triton was
    imported (its own library, tl.cdiv, tl.sum and the rest, is made interpreted or compiled then, once: a kernel
    interpreted later cannot call a compiled tl.sum)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and _imported_interpreted()


@functools.cache
def _imported_interpreted() -> bool:  # fixed once Triton is imported
    from triton.language import standard

    return type(standard.cdiv).__name__ == "InterpretedFunction"


def _direct_launch_possible(kernel) -> bool:
    """Whether the compiled kernel may be called directly: the fast launch on, a GPU, no interpreter, and a
    JITFunction (not a wrapper that records launches)."""
    return (FAST_LAUNCH and hasattr(kernel, "params") and torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1")


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(grid) + (1,) * (3 - len(grid))


def _set(hook: Any) -> bool:
    """Whether a launch hook is set: not None (Triton 3.6), and not an empty HookChain (later versions)."""
    return hook is not None and bool(getattr(hook, "calls", True))
