"""Launching a generated kernel with the first of its configs that fits the GPU."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

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
