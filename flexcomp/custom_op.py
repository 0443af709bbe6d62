"""flexcomp's attention as a torch custom op, so that torch.compile graphs hold it whole (fullgraph, no breaks).

Under torch.compile, `flexcomp.flex_attention` (and `create_block_mask`) take the path below instead of their
eager Python, which Dynamo cannot trace (mods parsed from source, plan caches, data-dependent table sizes):

- `call_key` runs once per trace, outside the graph (`torch._dynamo.assume_constant_result`): it compiles the
  mods, reads the block mask's description (lengths, block size, closed-form bounds, which tables it has) and
  files all that, with scale, enable_gqa, kernel_options and the backend, under a string key.
- The graph then holds one `torch.ops.flexcomp.flex_attention(query, key, value, tables, captured, call,
  want_max)`: the block mask's index tables and the score_mod's captured tensors are op inputs, so Dynamo sees
  them as data (a new block mask's tables each step, a learnable bias updated by the optimizer) and autograd
  reaches the captured tensors; want_max asks for return_aux's max_scores too (not differentiable).  Its fake
  implementation gives the output shapes, so dynamic shapes need no recompile.
- At run time the op calls the eager `flex_attention` on the real tensors (every backend, every feature; mods
  re-specialize on rebound scalars as in eager calls), and its backward (`torch.library.register_autograd`) runs
  the generated backward kernels, or autograd through the reference backend.
"""

from __future__ import annotations

import itertools
import operator
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .blockmask import BlockMask
from .errors import FlexcompError
from .mods import Mod, as_mod, specialized_mod
from .refs import resolve

TABLE_NAMES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


@dataclass(frozen=True, eq=False)
class Call:
    """What one flex_attention call site is, besides its tensors: filed under a key by `call_key`."""

    score_mod: Mod | None
    captured: tuple[tuple[str, Any, int | None], ...]  # where each captured tensor of the score_mod lives (`paths`)
    mask_mod: Mod | None  # a block mask's, or the call's mask_mod= (then built at every call, as eager does)
    rebuilt: tuple | None  # (batch, heads, device, exact, built inside): a block mask the op builds for its lengths
    # (closed-form bounds, or built inside the compiled function), else None
    tables: tuple[str, ...]  # the TABLE_NAMES the op takes as inputs, in order
    block_size: tuple[int, int] | None
    scale: float | None
    enable_gqa: bool
    kernel_options: dict[str, Any] | None
    backend: str


_CALLS: dict[str, Call] = {}
_KEYS = itertools.count()


@torch._dynamo.assume_constant_result
def call_key(score: Any, mask: Any, masking: tuple | None, scale: Any, enable_gqa: bool,
             kernel_options: tuple | None, backend: str) -> tuple[str, tuple[str, ...], tuple]:  # fmt: skip
    """File this call site's description (run by Dynamo once per trace, outside the graph) and return its key,
    the block-mask tables the op takes and where the score_mod's captured tensors live (`paths`): everything the
    traced code needs from the description comes back here, as constants, because a read of the registry from
    traced code is not followed by every Dynamo (torch 2.11 raised a KeyError on a key filed during the trace).

    Only constants come in (flexcomp/refs.py): the mods as functions or names, and for a block mask (torch's
    too) `masking` = (its mask_mod, block size, then the tables it has, or for a mask the op rebuilds, its
    batch, heads, device and exactness).  No sequence length: the op takes them from its query and key, so one
    graph serves every length (dynamic=True) and block masks rebuilt at every step share it.  A mask with
    closed-form bounds, or built inside the compiled function, is rebuilt by the op (`prepared`) for its lengths:
    it follows from the mask and the lengths alone."""
    from .api import normalize_kernel_options

    score_mod = as_mod(resolve(score), "score")
    options = normalize_kernel_options(dict(kernel_options) if kernel_options is not None else None)
    if masking is None:
        call = Call(score_mod, paths(score_mod), as_mod(resolve(mask), "mask"), None, (), None, scale, enable_gqa,
                    options, backend)  # fmt: skip
    else:
        mask_fn, block_size, rebuilt, tables = masking
        mask_mod = as_mod(resolve(mask_fn), "mask") if mask_fn is not None else None
        if rebuilt is not None and rebuilt[-1]:  # built inside the compiled function
            refuse_captured_tensors(specialized_mod(mask_mod, "mask"))
        call = Call(score_mod, paths(score_mod), mask_mod, rebuilt, tables, block_size, scale, enable_gqa, options,
                    backend)  # fmt: skip
    key = f"flexcomp-call-{next(_KEYS)}"
    _CALLS[key] = call
    return key, call.tables, call.captured


def _named(obj: Any) -> Any:
    """What the tracer hands `call_key` for a mod: its name (flexcomp/refs.py), or the function."""
    return obj.ref if isinstance(obj, Mod) else obj


def _masking(block_mask: Any) -> tuple | None:
    """The block mask's description as constants (traced: the graph keeps guards on what this reads, so another
    mask_mod or block size retraces and files its own call; the lengths are not read)."""
    if block_mask is None:
        return None
    if isinstance(block_mask, TracedBlockMask):
        rebuilt = (block_mask.batch, block_mask.heads, block_mask.device, block_mask.exact, True)
        return _named(block_mask.mask_mod), block_mask.BLOCK_SIZE, rebuilt, ()
    if getattr(block_mask, "bounds", None) is not None:
        batch, heads = _ints(block_mask.table_dims[:2])
        rebuilt, tables = (batch, heads, str(block_mask.device), True, False), ()
    else:
        rebuilt, tables = None, tuple(n for n in TABLE_NAMES if getattr(block_mask, n) is not None)
    return _named(block_mask.mask_mod), _ints(block_mask.BLOCK_SIZE), rebuilt, tables


def _ints(values: Any) -> tuple[int, ...]:
    """Python ints, also where Dynamo made them symbolic: operator.index specializes a SymInt with a guard
    (batch and head dims, block sizes: what call_key, which takes constants only, needs)."""
    return tuple(operator.index(v) for v in values)


def traced_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Any,
                          block_mask: Any, scale: Any, enable_gqa: bool, return_lse: bool, kernel_options: Any,
                          return_aux: Any, mask_mod: Any, backend: str) -> Any:  # fmt: skip
    """flex_attention as Dynamo traces it: one custom op, its tensors made explicit."""
    if isinstance(scale, torch.Tensor):
        raise FlexcompError("under torch.compile, pass scale as a Python number (a tensor scale would be read on "
                            "the host at every call)")  # fmt: skip
    options = tuple(sorted(kernel_options.items())) if kernel_options is not None else None
    call, table_names, places = call_key(_named(score_mod), _named(mask_mod), _masking(block_mask), scale,
                                         enable_gqa, options, backend)  # fmt: skip
    tables = [getattr(block_mask, name) for name in table_names]
    captured = _captured_at(_function(score_mod), places)
    want_max = return_aux is not None and bool(return_aux.max_scores)
    out, lse, max_scores = torch.ops.flexcomp.flex_attention(query, key, value, tables, captured, call, want_max)
    if return_aux is not None:
        from .api import AuxOutput

        return out, AuxOutput(lse=lse if return_aux.lse else None, max_scores=max_scores if want_max else None)
    return (out, lse) if return_lse else out


def paths(score_mod: Mod | None) -> tuple[tuple[str, Any, int | None], ...]:
    """Where each captured tensor of the score_mod lives, as ("global", name, item) or ("cell", index, item) of the
    mod's function (item: the tuple element, or None), so that the traced code reads it from there and Dynamo
    makes it a graph input that follows rebinding and in-place updates."""
    if score_mod is None:
        return ()
    fn = score_mod.fn
    cells = [c.cell_contents for c in (fn.__closure__ or ())] if fn is not None else []
    spaces = [("global", getattr(fn, "__globals__", {}).items()), ("cell", enumerate(cells))]
    found = []
    for spec in score_mod.buffers:
        tensor = score_mod.resolvers[spec.name]()
        where = next(((kind, name, item) for kind, names in spaces for name, value in list(names)
                      for item in _positions(value, tensor)), None)  # fmt: skip
        if where is None:
            raise FlexcompError(
                f"under torch.compile, the score_mod {score_mod.name} must capture its tensor {spec.name} as a "
                "global or a closure variable of its own function (or a tuple of them), so that the compiled graph "
                "reads it at every call; a tensor reached through a helper function is not followed",
                score_mod.loc,
            )  # fmt: skip
        found.append(where)
    return tuple(found)


def _positions(value: Any, tensor: torch.Tensor) -> list[int | None]:
    if value is tensor:
        return [None]
    if isinstance(value, (tuple, list)):
        return [i for i, v in enumerate(value) if v is tensor][:1]
    return []


def captured_tensors(entry: Call) -> list[torch.Tensor]:
    """The score_mod's captured tensors as they are now, read where they live."""
    return _captured_at(entry.score_mod.fn if entry.score_mod is not None else None, entry.captured)


def _captured_at(fn: Any, places: tuple) -> list[torch.Tensor]:
    """The tensors at `places` (`paths`) of the mod function fn (traced by Dynamo: each becomes a graph input)."""
    tensors = []
    for kind, name, item in places:
        value = _read(fn, kind, name)
        tensors.append(value if item is None else value[item])
    return tensors


def _function(score_mod: Any) -> Any:
    """The Python function of a score_mod as the call passed it (a Mod, or the plain function)."""
    return score_mod.fn if isinstance(score_mod, Mod) else score_mod


def _read(fn: Any, kind: str, name: Any) -> Any:
    """The value in a place `paths` names: a global of fn, or one of its closure cells."""
    return fn.__globals__[name] if kind == "global" else fn.__closure__[name].cell_contents


def _write(fn: Any, kind: str, name: Any, value: Any) -> None:
    if kind == "global":
        fn.__globals__[name] = value
    else:
        fn.__closure__[name].cell_contents = value


# ---------------------------------------------------------------- the op


@torch.library.custom_op("flexcomp::flex_attention", mutates_args=())
def flex_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tables: list[torch.Tensor],
                      captured: list[torch.Tensor], call: str,
                      want_max: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse, max_scores) of the call filed under `call`, on these tensors; max_scores (return_aux's) is empty
    unless `want_max`."""
    from .api import AuxRequest, flex_attention

    entry = _CALLS[call]
    score_mod, block_mask, mask_mod = prepared(entry, tables, query, key)
    out, aux = flex_attention(query, key, value, score_mod, block_mask, entry.scale, entry.enable_gqa,
                              kernel_options=entry.kernel_options, return_aux=AuxRequest(True, want_max),
                              mask_mod=mask_mod, backend=entry.backend)  # fmt: skip
    max_scores = aux.max_scores.contiguous().clone() if want_max else aux.lse.new_empty(0)
    return out.contiguous(), aux.lse.contiguous().clone(), max_scores  # contiguous, as the fake says; no views


@flex_attention_op.register_fake
def _(query, key, value, tables, captured, call, want_max):
    B, Hq, Lq, _ = query.shape
    stat_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    max_shape = (B, Hq, Lq) if want_max else (0,)
    return (query.new_empty(B, Hq, Lq, value.shape[-1]), query.new_empty(B, Hq, Lq, dtype=stat_dtype),
            query.new_empty(max_shape, dtype=stat_dtype))


_PREPARED: OrderedDict[tuple, tuple] = OrderedDict()  # (call, tables' storage) -> (score_mod, block_mask, mask_mod)
PREPARED_SIZE = 64


def prepared(entry: Call, tables: list[torch.Tensor], query: torch.Tensor,
             key: torch.Tensor) -> tuple[Any, Any, Any]:  # fmt: skip
    """(score_mod, block_mask, mask_mod) for the eager entry point, at the lengths of query and key.  A block mask
    is kept per (call, lengths) where the op builds it, and per table storage where it is made from the op's
    tables, so that repeated calls find the eager path's plans (codegen/plans.py)."""
    lengths = (query.shape[-2], key.shape[-2])
    if entry.rebuilt is not None and entry.mask_mod.buffers:  # its tables follow the captured tensors: built anew
        return entry.score_mod, _rebuilt_block_mask(entry, lengths), None
    if entry.rebuilt is not None:  # kept per length
        memo = (id(entry), *lengths)
        hit = _PREPARED.get(memo)
        if hit is None:
            hit = _PREPARED[memo] = (entry.score_mod, _rebuilt_block_mask(entry, lengths), None, entry)  # the
            # entry kept: its id stays unique
    elif not entry.tables:
        return entry.score_mod, None, entry.mask_mod
    else:
        memo = (id(entry), *lengths, *((t.data_ptr(), t.shape, t.stride()) for t in tables))
        hit = _PREPARED.get(memo)
        if hit is None:
            named = dict(zip(entry.tables, tables, strict=True))
            block_mask = BlockMask.from_kv_blocks(
                named["kv_num_blocks"], named["kv_indices"], named.get("full_kv_num_blocks"),
                named.get("full_kv_indices"), BLOCK_SIZE=entry.block_size, mask_mod=entry.mask_mod,
                seq_lengths=lengths,
            )  # fmt: skip
            hit = _PREPARED[memo] = (entry.score_mod, block_mask, None, tables)  # the tables kept: their storage stays
    _PREPARED.move_to_end(memo)
    if len(_PREPARED) > PREPARED_SIZE:
        _PREPARED.popitem(last=False)
    return hit[:3]


def _rebuilt_block_mask(entry: Call, lengths: tuple[int, int]) -> BlockMask:
    from .blockmask import eager_block_mask

    batch, heads, device, exact, _ = entry.rebuilt
    return eager_block_mask(entry.mask_mod, batch, heads, *lengths, device=device, BLOCK_SIZE=entry.block_size,
                            exact=exact)  # fmt: skip


def _setup_context(ctx, inputs, output):
    query, key, value, tables, captured, call, _ = inputs
    out, lse, max_scores = output
    ctx.save_for_backward(query, key, value, out, lse, *tables, *captured)
    ctx.call, ctx.n_tables = call, len(tables)
    ctx.mark_non_differentiable(max_scores)  # as torch's


def _backward(ctx, grad_out, grad_lse, grad_max_scores):
    query, key, value, out, lse, *rest = ctx.saved_tensors
    tables, captured = rest[: ctx.n_tables], rest[ctx.n_tables :]
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    dq, dk, dv, captured_grads = torch.ops.flexcomp.flex_attention_backward(
        query, key, value, out, lse, grad_out, grad_lse, list(tables), list(captured), ctx.call
    )
    needs = ctx.needs_input_grad
    captured_grads = [g if t.is_floating_point() and needs[4] else None for g, t in zip(captured_grads, captured)]
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, [None] * len(tables),
            captured_grads, None, None)  # fmt: skip


@torch.library.custom_op("flexcomp::flex_attention_backward", mutates_args=())
def flex_attention_backward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                               lse: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None,
                               tables: list[torch.Tensor], captured: list[torch.Tensor],
                               call: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """(dq, dk, dv, the captured tensors' gradients; zeros for those that get none) of the call under `call`."""
    from .api import choose_backend

    entry = _CALLS[call]
    if choose_backend(entry.backend, query) == "triton":
        dq, dk, dv, grads = _kernel_backward(entry, tables, captured, query, key, value, out, lse, grad_out,
                                             grad_lse)  # fmt: skip
    else:  # autograd through the reference, in a thread of its own: an op's body runs with autograd switched off
        with ThreadPoolExecutor(1) as pool:
            dq, dk, dv, grads = pool.submit(_recomputed_backward, entry, tables, captured, query, key, value,
                                            grad_out, grad_lse).result()  # fmt: skip
    grads = [t.new_zeros(t.shape) if g is None else g.to(t.dtype).contiguous() for g, t in zip(grads, captured)]
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), grads  # contiguous, as the fake says


@flex_attention_backward_op.register_fake
def _(query, key, value, out, lse, grad_out, grad_lse, tables, captured, call):
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            [t.new_empty(t.shape) for t in captured])  # fmt: skip


def _kernel_backward(entry, tables, captured, query, key, value, out, lse, grad_out, grad_lse):
    """The generated backward kernels on the forward's out and lse, on q, k, v as the forward took them: batch-1
    key/value broadcast, 16-bit rows zero-padded where the kernels cannot read them as vectors (autograd.py)."""
    from .api import build_block_mask, with_compiled_mask_mod
    from .autograd import pad_rows, vector_rows
    from .codegen.backward import flex_backward

    score_mod, block_mask, mask_mod = prepared(entry, list(tables), query, key)
    score_mod = specialized_mod(score_mod, "score")
    if block_mask is not None:
        block_mask = with_compiled_mask_mod(block_mask, compile_plain=True)
    elif mask_mod is not None:
        block_mask = build_block_mask(specialized_mod(mask_mod, "mask"), query, key)
    kv_batch = key.shape[0]
    k, v = (t.expand(query.shape[0], -1, -1, -1) for t in (key, value))
    q, o, do = query, out, grad_out.contiguous()
    if not vector_rows(q, k, v):
        q, k, v, o, do = (pad_rows(t) for t in (q, k, v, o, do))
    specs = tuple(score_mod.buffers) if score_mod is not None else ()
    wanted = frozenset(s.name for s, t in zip(specs, captured) if t.is_floating_point())
    scale = entry.scale if entry.scale is not None else query.shape[-1] ** -0.5
    dq, dk, dv, grads = flex_backward(
        q, k, v, o, lse, do, grad_lse, score_mod, block_mask, scale, entry.enable_gqa, entry.kernel_options,
        captured={s.name: t for s, t in zip(specs, captured)}, grad_buffers=wanted,
    )  # fmt: skip
    dq, dk, dv = dq[..., : query.shape[-1]], dk[..., : key.shape[-1]], dv[..., : value.shape[-1]]
    if kv_batch != query.shape[0]:  # key/value broadcast over the batch: their gradients sum over it
        dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), [grads.get(s.name) for s in specs]


def _recomputed_backward(entry, tables, captured, query, key, value, grad_out, grad_lse):
    """Autograd through the eager call, recomputed (the reference backend)."""
    from .api import flex_attention

    score_mod, block_mask, mask_mod = prepared(entry, list(tables), query, key)
    live = captured_tensors(entry)  # what the mod reads now: the same tensors as `captured`
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in live]
    with _captured_as(entry, leaves):
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        out, lse = flex_attention(q, k, v, score_mod, block_mask, entry.scale, entry.enable_gqa, True,
                                  entry.kernel_options, mask_mod=mask_mod, backend=entry.backend)  # fmt: skip
        outputs, grads_in = [out], [grad_out]
        if grad_lse is not None:
            outputs.append(lse)
            grads_in.append(grad_lse)
        floats = [t for t in leaves if t.is_floating_point()]
        grads = torch.autograd.grad(outputs, [q, k, v, *floats], grads_in, allow_unused=True)
    by_leaf = dict(zip(map(id, floats), grads[3:]))
    return grads[0], grads[1], grads[2], [by_leaf.get(id(t)) for t in leaves]


class _captured_as:
    """Within the block, the score_mod's captured tensors rebound to `tensors` where they live (so the recomputed
    reference differentiates with respect to these leaves, not to whatever graph made the originals)."""

    def __init__(self, entry: Call, tensors: list[torch.Tensor]):
        self.entry, self.tensors, self.saved = entry, tensors, []

    def __enter__(self):
        fn = self.entry.score_mod.fn if self.entry.score_mod is not None else None
        for (kind, name, item), tensor in zip(self.entry.captured, self.tensors):
            value = _read(fn, kind, name)
            self.saved.append((fn, kind, name, value))
            new = tensor if item is None else type(value)(tensor if i == item else x for i, x in enumerate(value))
            _write(fn, kind, name, new)
        return self

    def __exit__(self, *exc):
        for fn, kind, name, value in reversed(self.saved):
            _write(fn, kind, name, value)


flex_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- block masks built inside a compiled function

class TracedBlockMask:
    """create_block_mask as Dynamo traces it: the mask's description, built by the op for the lengths of each call
    (`prepared`), so that one graph serves every length.  Its lengths are the traced ones (symbolic under
    dynamic=True); it has no tables: pass it to flexcomp.flex_attention inside the same compiled function."""

    def __init__(self, mask_mod: Any, batch: int | None, heads: int | None, seq_lengths: tuple,
                 BLOCK_SIZE: tuple[int, int], device: str | None, exact: bool):  # fmt: skip
        self.mask_mod, self.batch, self.heads, self.seq_lengths = mask_mod, batch, heads, seq_lengths
        self.BLOCK_SIZE, self.device, self.exact = BLOCK_SIZE, device, exact

    @property
    def shape(self) -> tuple:
        return (self.batch or 1, self.heads or 1, *self.seq_lengths)


def traced_block_mask(mask_mod: Any, B: Any, H: Any, Q_LEN: Any, KV_LEN: Any, device: Any, BLOCK_SIZE: Any,
                      exact: bool) -> TracedBlockMask:  # fmt: skip
    """create_block_mask inside a compiled function: its description (checked when flex_attention files the call:
    a mask reading a captured tensor is refused, since the graph would not follow the tensor)."""
    from .blockmask import block_pair

    return TracedBlockMask(_named(mask_mod), B, H, (Q_LEN, KV_LEN), block_pair(BLOCK_SIZE),
                           str(device) if device is not None else None, exact)  # fmt: skip


def refuse_captured_tensors(mod: Mod) -> None:
    """A mask the op rebuilds from its description must not read captured tensors (document ids): a graph built
    for one of their values would not follow the next."""
    if mod is not None and mod.buffers:
        raise FlexcompError(
            f"create_block_mask inside torch.compile: the mask {mod.name} reads captured tensors "
            f"({', '.join(b.name for b in mod.buffers)}), whose values the compiled graph would not follow; build "
            "the block mask outside the compiled function and pass it in", mod.loc,
        )  # fmt: skip
