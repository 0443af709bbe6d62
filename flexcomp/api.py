"""The public entry points: `flex_attention` (a drop-in for torch's) and `compile`."""

from __future__ import annotations

import copy
import numbers
import os
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .checks import validate_inputs
from .custom_op import traced_flex_attention
from .errors import BackendError
from .ir import free_args, to_text
from .mods import Mod, specialized_mod
from .paging import direct_paged
from .tiles import table_device

BACKENDS = ("auto", "triton", "reference")

# torch's FlexKernelOptions.  Used by flexcomp's kernels: BLOCK_M, BLOCK_N (forward and decode tiles), BLOCK_M1,
# BLOCK_N1, BLOCK_M2, BLOCK_N2 (backward tiles), num_warps, num_stages, and BACKEND / FORCE_USE_FLEX_ATTENTION (the
# decode kernel or not: codegen/decode.py); the rest are accepted and have no effect (hints and switches of torch's
# own kernels; flexcomp's are always safe on fully masked rows).  `autotune`, `BACKWARD_DQ` (codegen/backward.py)
# `NUM_SPLITS` (the decode kernel's split count) and `DECODE_MERGE` (its merge: "fused" or "separate") are flexcomp's.
KERNEL_OPTIONS = (
    "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_warps", "num_stages",
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION", "USE_TMA",
    "kpack", "matrix_instr_nonkdim", "waves_per_eu", "BACKEND",
    "FOLD_SCALE", "REFINE_TILES", "PREFETCH_INDEX",  # flexcomp's switches (codegen/forward.py; the last two the
    # backward too), for A/B
    "autotune", "BACKWARD_DQ", "ONE_BACKWARD_LAUNCH", "NUM_SPLITS", "DECODE_MERGE",
)  # fmt: skip
TORCH_BACKENDS = ("AUTO", "TRITON", "FLASH", "TRITON_DECODE", "GLUON")  # GLUON: flexcomp's (codegen/gluon/dispatch.py)


try:  # torch's own classes, so code written for torch sees the types it expects
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:  # torch before return_aux existed

    class AuxRequest(NamedTuple):
        """Which auxiliary outputs flex_attention returns."""

        lse: bool = False
        max_scores: bool = False

    class AuxOutput(NamedTuple):
        """lse [B, Hq, Lq] and max_scores [B, Hq, Lq] (natural log units), None where not requested."""

        lse: torch.Tensor | None = None
        max_scores: torch.Tensor | None = None


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Any = None,
    block_mask: Any = None,
    scale: float | torch.Tensor | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
    *,
    return_aux: Any = None,
    mask_mod: Any = None,
    backend: str = "auto",
) -> Any:
    """torch.nn.attention.flex_attention's arguments and semantics, through flexcomp's compiler.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv] -> out [B, Hq, Lq, Dv]
    (and lse [B, Hq, Lq], natural log, with `return_lse`; or `return_aux=AuxRequest(lse=..., max_scores=...)`
    -> (out, AuxOutput), as torch).  key/value with batch 1 broadcast over the query's batch when a block mask
    (or mask_mod) is given for that batch, as torch.  `scale` may be a one-element tensor.  `kernel_options`
    takes torch's keys (see `KERNEL_OPTIONS`).  `score_mod` / `mask_mod` may be Mods or plain functions.
    `mask_mod=` without a `block_mask` builds the block mask for you.
    `backend`: "auto" (the generated Triton kernel on CUDA, the reference elsewhere),
    "triton" (on CPU tensors it needs TRITON_INTERPRET=1) or "reference".
    """
    if mask_mod is not None and block_mask is not None:
        raise ValueError("pass mask_mod or block_mask, not both: a block mask carries its own mask_mod")
    if torch.compiler.is_compiling():  # one custom op in the graph (flexcomp/custom_op.py)
        return traced_flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                                     kernel_options, return_aux, mask_mod, backend)
    validate_inputs(query, key, value, enable_gqa)
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; expected one of {', '.join(BACKENDS)}")
    scale = as_scale(scale)
    kernel_options = normalize_kernel_options(kernel_options)
    want_lse, want_max = aux_wanted(return_lse, return_aux)
    score_mod = specialized_mod(score_mod, "score")
    mask_mod = specialized_mod(mask_mod, "mask")
    key, value = broadcast_batch(query, key, value, block_mask, mask_mod is not None)
    backend = choose_backend(backend, query)
    if block_mask is not None:
        validate_block_mask(block_mask, query, key)
        block_mask = with_compiled_mask_mod(block_mask, compile_plain=backend == "triton")
    max_scores = None
    if backend == "reference":
        from .reference import reference_attention_aux

        out, lse, max_scores = reference_attention_aux(query, key, value, score_mod, block_mask, scale, enable_gqa,
                                                       mask_mod=mask_mod)
    else:
        if block_mask is None and mask_mod is not None:
            block_mask = build_block_mask(mask_mod, query, key)
        if block_mask is not None and not _wants_gradients(query, key, value, score_mod):
            block_mask, score_mod = _paged_direct(block_mask, score_mod)
        out, lse, *maxima = _triton_forward()(query, key, value, score_mod, block_mask, scale, enable_gqa,
                                              want_lse, kernel_options, return_max=want_max)
        max_scores = maxima[0] if maxima else None
    if return_aux is not None:
        return out, AuxOutput(lse=lse if want_lse else None, max_scores=max_scores if want_max else None)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- checks


def broadcast_batch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any,
                    has_mask_mod: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's batch rule: Bq != Bkv only with a block mask of batch Bq, and then Bkv must be 1 (broadcast).

    A `mask_mod=` builds its block mask for the query's batch, so it counts as one.  Errors are torch's.
    """
    Bq, Bkv = query.shape[0], key.shape[0]
    if Bq == Bkv:
        return key, value
    if block_mask is None and not has_mask_mod:
        raise ValueError(f"Expect query and key/value to have the same batch size, or non-none block_mask, "
                         f"but got block_mask=None, {Bq=}, and {Bkv=}.")
    B_block_mask = block_mask.shape[0] if block_mask is not None else Bq  # torch's: the batch it was made for
    if B_block_mask != Bq:
        raise ValueError(f"Expect query and key/value to have the same batch size, or block_mask and query to have "
                         f"the same batch size, but got {Bq=}, {Bkv=}, {B_block_mask=}.")
    if Bkv != 1:
        raise RuntimeError(f"Bq and Bkv must broadcast. Got {Bq=} and {Bkv=}")
    return key.expand(Bq, -1, -1, -1), value.expand(Bq, -1, -1, -1)  # views: no copy, gradients sum over Bq


def as_scale(scale: Any) -> float | None:
    """None, a number, or a one-element tensor (as torch accepts) -> a float."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"a tensor scale must have one element, got shape {tuple(scale.shape)}")
        return float(scale)
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number, a one-element tensor or None, got {type(scale).__name__}")
    return float(scale)


def aux_wanted(return_lse: bool, return_aux: Any) -> tuple[bool, bool]:
    """(lse wanted, max_scores wanted), refusing both spellings at once as torch does."""
    if return_aux is None:
        return bool(return_lse), False
    if return_lse:
        raise ValueError("Cannot specify both return_lse and return_aux. "
                         "return_lse is deprecated, please use return_aux=AuxRequest(lse=True) instead.")
    return bool(return_aux.lse), bool(return_aux.max_scores)


def normalize_kernel_options(kernel_options: Any) -> dict[str, Any] | None:
    """torch's kernel_options (keys optionally prefixed fwd_ / bwd_, as torch) -> flexcomp's unprefixed dict.

    Unknown keys are refused with the list of known ones, rather than silently ignored.
    """
    if kernel_options is None:
        return None
    if not isinstance(kernel_options, Mapping):
        raise TypeError(f"kernel_options must be a dict, got {type(kernel_options).__name__}")
    options: dict[str, Any] = {}
    for name, value in kernel_options.items():
        base = name.removeprefix("fwd_").removeprefix("bwd_")
        if base not in KERNEL_OPTIONS:
            raise ValueError(f"unknown kernel_options key {name!r}; known (each also as fwd_<key> / bwd_<key>): "
                             f"{', '.join(KERNEL_OPTIONS)}")
        if base in options and options[base] != value:
            raise ValueError(f"kernel_options sets {base} twice ({options[base]!r} and {name}={value!r}): flexcomp "
                             "uses one value for forward and backward")
        options[base] = value
    backend = options.get("BACKEND", "AUTO")
    if backend not in TORCH_BACKENDS:
        raise ValueError(f"Invalid BACKEND value {backend!r}. Must be one of {TORCH_BACKENDS}")
    return options


def validate_block_mask(block_mask: Any, query: torch.Tensor, key: torch.Tensor) -> None:
    """The block mask must be made for these lengths, this batch and these heads (or broadcast), on this device."""
    q_len, kv_len = query.shape[2], key.shape[2]
    block_mask_q_len, block_mask_kv_len = block_mask.seq_lengths
    if q_len != block_mask_q_len:
        raise ValueError(f"{q_len=} != {block_mask_q_len=}; build the block mask for these lengths")
    if kv_len != block_mask_kv_len:
        raise ValueError(f"{kv_len=} != {block_mask_kv_len=}; build the block mask for these lengths")
    q_batch, q_heads = query.shape[:2]
    block_mask_batch, block_mask_heads = block_mask.shape[:2]  # torch's: what it was made for (tables may broadcast)
    if block_mask_batch not in (1, q_batch):
        raise ValueError(f"{block_mask_batch=} is neither 1 nor {q_batch=}")
    if block_mask_heads not in (1, q_heads):
        raise ValueError(f"{block_mask_heads=} is neither 1 nor {q_heads=}")
    block_mask_device = table_device(block_mask)
    if block_mask_device != query.device:
        raise ValueError(f"{block_mask_device=} != {query.device=}")


def with_compiled_mask_mod(block_mask: Any, compile_plain: bool) -> Any:
    """The block mask with its mask_mod specialized for the live captured values, and a plain function (e.g. in
    torch's own BlockMask) compiled when `compile_plain`; a shallow copy when anything changed (one per block mask
    and compiled mod, so that repeated calls find their plans).

    A mask_mod re-specialized since the block mask was built (a captured value rebound) gets torch's meaning: the
    tables stay as they were built, and the mask_mod as it is now applies in their PARTIAL tiles.  The closed-form
    `bounds` described the old mask, so the copy drops them and the kernel walks the tables instead."""
    mask_mod = block_mask.mask_mod
    if mask_mod is None or not (compile_plain or isinstance(mask_mod, Mod)):
        return block_mask
    compiled = specialized_mod(mask_mod, "mask")
    if compiled is mask_mod:
        return block_mask
    try:
        remembered = _RESPECIALIZED.get(block_mask)
    except TypeError:  # not weak-referenceable: a copy per call
        return respecialized_copy(block_mask, compiled)
    stale = remembered is None or remembered.mask_mod is not compiled or \
        getattr(remembered, "version", 0) != getattr(block_mask, "version", 0)  # a table replaced since
    if stale:
        remembered = _RESPECIALIZED[block_mask] = respecialized_copy(block_mask, compiled)
    return remembered


_RESPECIALIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block mask -> its latest re-specialized copy


def respecialized_copy(block_mask: Any, mask_mod: Mod) -> Any:
    """A shallow copy of `block_mask` (its tables shared) with `mask_mod`, and without closed-form bounds."""
    respecialized = copy.copy(block_mask)
    respecialized.mask_mod = mask_mod
    if getattr(respecialized, "bounds", None) is not None:
        respecialized.bounds = None
    return respecialized


def _wants_gradients(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Mod | None) -> bool:
    """autograd.wants_gradients (the Triton backend's own rule) for this call's inputs."""
    from .autograd import wants_gradients

    captured = score_mod.tensors().values() if score_mod is not None else ()
    return wants_gradients(query, key, value, captured)


def _paged_direct(block_mask: Any, score_mod: Mod | None) -> tuple[Any, Mod | None]:
    """On a paged cache, the logical block mask and mods the kernels read the pages with (flexcomp.paging)."""
    logical, user_score_mod = direct_paged(block_mask, score_mod)
    if logical is block_mask:
        return block_mask, score_mod
    return with_compiled_mask_mod(logical, compile_plain=True), specialized_mod(user_score_mod, "score")


def choose_backend(backend: str, query: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if query.device.type == "cuda" else "reference"
    if backend == "triton" and query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            "backend='triton' on CPU tensors runs the kernel under Triton's interpreter, which is off",
            hint="set TRITON_INTERPRET=1 in the environment before triton is imported, or use backend='reference'",
        )
    if backend == "triton" and query.device.type == "cpu" and not _interpreter_ready():
        raise BackendError(
            "TRITON_INTERPRET=1 was set after Triton was imported: Triton decides then whether its own library "
            "(tl.sum, tl.cdiv...) is interpreted, so an interpreted kernel cannot run in this process",
            hint="set it before Python starts (TRITON_INTERPRET=1 python ...) or before the first import of "
            "flexcomp, torch's compiler or triton; or use backend='reference'",
        )
    return backend


def _interpreter_ready() -> bool:
    from .codegen.launch import interpreter_ready  # codegen only when a kernel is asked for

    return interpreter_ready()


def _triton_forward():
    """The generated kernels behind an autograd Function: forward, and backward when gradients are needed."""
    try:
        from .autograd import triton_flex_attention
    except ImportError as e:
        raise BackendError(f"the Triton backend is unavailable: {e}", hint="use backend='reference'") from e
    return triton_flex_attention


def build_block_mask(mask_mod: Mod, query: torch.Tensor, key: torch.Tensor, **kwargs: Any) -> Any:
    """create_block_mask over the batch and heads only when the mask reads `b` / `h`; otherwise they broadcast."""
    from .blockmask import create_block_mask

    used = free_args(mask_mod.ir)
    B = query.shape[0] if "b" in used else 1
    H = query.shape[1] if "h" in used else 1
    return create_block_mask(mask_mod, B, H, query.shape[2], key.shape[2], device=query.device, **kwargs)


# ---------------------------------------------------------------- compile


class CompiledVariant:
    """An attention variant: a score_mod and/or mask_mod, their IR, kernel source and a callable."""

    def __init__(self, score_mod: Mod | None, mask_mod: Mod | None):
        self.score_mod = score_mod
        self.mask_mod = mask_mod

    @property
    def name(self) -> str:
        return " + ".join(m.name for m in (self.score_mod, self.mask_mod) if m is not None) or "softmax attention"

    @property
    def ir(self) -> str:
        """The optimized IR of both mods, as text."""
        parts = [f"# {m.kind}_mod {m.name}\n{to_text(m.ir)}" for m in (self.score_mod, self.mask_mod) if m is not None]
        return "\n\n".join(parts) or "# no mods: plain softmax attention"

    @property
    def source(self) -> str:
        """The generated Triton kernel's source."""
        try:
            from .codegen import kernel_source
        except ImportError as e:
            raise BackendError(f"kernel source is unavailable: the Triton code generator did not load ({e})") from e
        return kernel_source(specialized_mod(self.score_mod, "score"), specialized_mod(self.mask_mod, "mask"))

    def block_mask(self, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device: Any = None,
                   **kwargs: Any) -> Any:
        """create_block_mask for this variant's mask_mod (noop_mask without one)."""
        from .blockmask import create_block_mask

        mask = self.mask_mod
        if mask is None:
            from .mods import noop_mask

            mask = noop_mask
        return create_block_mask(mask, B, H, Q_LEN, KV_LEN, device=device, **kwargs)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any = None,
                 scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                 kernel_options: dict[str, Any] | None = None, *, return_aux: Any = None,
                 backend: str = "auto") -> Any:
        mask_mod = self.mask_mod if block_mask is None else None
        return flex_attention(query, key, value, self.score_mod, block_mask, scale, enable_gqa, return_lse,
                              kernel_options, return_aux=return_aux, mask_mod=mask_mod, backend=backend)

    def __repr__(self) -> str:
        fields = ", ".join(f"{m.kind}_mod={m.name} key={m.key}" for m in (self.score_mod, self.mask_mod) if m)
        return f"<flexcomp.CompiledVariant {fields or 'no mods'}>"


def compile(score_mod: Any = None, mask_mod: Any = None) -> CompiledVariant:
    """Compile a score_mod and/or mask_mod (Mods or plain functions) into a `CompiledVariant`."""
    return CompiledVariant(specialized_mod(score_mod, "score"), specialized_mod(mask_mod, "mask"))
