"""flexcomp: attention variants as tiny Python functions, compiled to fused Triton kernels."""

from __future__ import annotations

import importlib

from .api import AuxOutput, AuxRequest, CompiledVariant, compile, flex_attention
from .errors import (
    BackendError,
    FlexcompError,
    FlexcompSyntaxError,
    FlexcompTypeError,
    ModKindError,
    SignatureError,
    SourceLoc,
    UndefinedNameError,
    UnsupportedConstructError,
)
from .mods import Mod, and_masks, as_mod, mask_mod, noop_mask, or_masks, score_mod

__version__ = "0.1.0"

# Block masks load on first use: they pull in the sparsity analysis (sympy), which `import flexcomp` need not pay for.
_LAZY = {"create_block_mask": "blockmask", "create_mask": "blockmask", "BlockMask": "blockmask",
         "PagedAttention": "paging"}

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BackendError",
    "BlockMask",
    "CompiledVariant",
    "FlexcompError",
    "FlexcompSyntaxError",
    "FlexcompTypeError",
    "Mod",
    "ModKindError",
    "PagedAttention",
    "SignatureError",
    "SourceLoc",
    "UndefinedNameError",
    "UnsupportedConstructError",
    "__version__",
    "and_masks",
    "as_mod",
    "compile",
    "create_block_mask",
    "create_mask",
    "flex_attention",
    "mask_mod",
    "noop_mask",
    "or_masks",
    "score_mod",
]  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        return value  # kept as a global: later reads do not come here (a block mask is often built every step)
    raise AttributeError(f"module 'flexcomp' has no attribute {name!r}")
