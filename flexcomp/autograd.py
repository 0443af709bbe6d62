"""flex attention through torch.autograd: the generated forward kernel, and generated backward kernels.

The score_mod's captured tensors are inputs of the autograd Function, so a learnable
bias table, per-head ALiBi slopes or a per-head softcap gets its gradient like q, k and v
do.  Users never write a backward: the score_mod's derivatives come from `flexcomp.grad`.
Those gradients follow torch's determinism switch: float32 atomics by default, bitwise reproducible
under `torch.use_deterministic_algorithms(True)` (codegen/backward.py reads the switch at backward time).
"""

from __future__ import annotations

from typing import Any

import torch

from .mods import Mod


class FlexAttentionFunction(torch.autograd.Function):
    """(out, lse, max_scores or None) = flex attention of q, k, v; differentiable in q, k, v, lse's users and
    captured tensors.  max_scores (return_aux's) is not differentiable, as in torch."""

    @staticmethod
    def forward(ctx, query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, return_max,
                *captured):
        from .codegen import flex_forward

        out, lse, *max_scores = flex_forward(query, key, value, score_mod, block_mask, scale, enable_gqa, True,
                                             kernel_options, return_max)
        ctx.save_for_backward(query, key, value, out, lse, *captured)
        ctx.mods = (score_mod, block_mask, scale, enable_gqa, kernel_options)
        ctx.set_materialize_grads(False)  # an unused lse's gradient stays None, not a zeroed tensor to read
        ctx.mark_non_differentiable(*max_scores)
        return out, lse, (max_scores[0] if max_scores else None)

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_max_scores):
        from .codegen.backward import flex_backward

        query, key, value, out, lse, *captured = ctx.saved_tensors
        score_mod, block_mask, scale, enable_gqa, kernel_options = ctx.mods
        specs = tuple(score_mod.buffers) if score_mod is not None else ()
        wanted = frozenset(spec.name for spec, t, needs in zip(specs, captured, ctx.needs_input_grad[-len(specs):])
                           if needs and t.is_floating_point())
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        dq, dk, dv, grads = flex_backward(
            query, key, value, out, lse, grad_out.contiguous(), grad_lse, score_mod, block_mask, scale, enable_gqa,
            kernel_options, captured={spec.name: t for spec, t in zip(specs, captured)}, grad_buffers=wanted,
        )
        captured_grads = [grads.get(spec.name) for spec in specs]
        return (dq, dk, dv, None, None, None, None, None, None, *captured_grads)


def triton_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Mod | None,
    block_mask: Any,
    scale: float | None,
    enable_gqa: bool,
    return_lse: bool,
    kernel_options: dict[str, Any] | None = None,
    *captured_tensors: torch.Tensor,
    return_max: bool = False,
) -> tuple[torch.Tensor, ...]:
    """flex_forward's arguments and result (out, lse, and max_scores with `return_max`), differentiable end to end.

    `captured_tensors` are the score_mod's captured tensors in the order of `score_mod.buffers`;
    by default their current values.  Gradients reach every one that requires grad.
    """
    del return_lse  # lse is always returned (and differentiable); the caller drops it
    if not vector_rows(query, key, value):
        return _with_padded_rows(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options,
                                 *captured_tensors, return_max=return_max)
    if score_mod is not None and not captured_tensors:
        values = score_mod.tensors()
        captured_tensors = tuple(values[spec.name] for spec in score_mod.buffers)
    if not wants_gradients(query, key, value, captured_tensors):  # nothing to differentiate: skip
        from .codegen import flex_forward  # the autograd Function's bookkeeping (host time on every call)

        return flex_forward(query, key, value, score_mod, block_mask, scale, enable_gqa, True, kernel_options,
                            return_max)
    out, lse, max_scores = FlexAttentionFunction.apply(query, key, value, score_mod, block_mask, scale, enable_gqa,
                                                       kernel_options, return_max, *captured_tensors)
    return (out, lse, max_scores) if return_max else (out, lse)


def wants_gradients(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, captured: Any) -> bool:
    """Whether autograd records the call: grad mode on, and q, k, v or a captured tensor requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *captured))


ROW_BYTES = 16  # head dims of 16-bit inputs are padded to rows of a multiple of this many bytes


def vector_rows(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can read each row of these tensors with vector loads: always for 4-byte elements; for
    16-bit ones, when every tensor starts 16-byte aligned, its strides keep rows at least 4-byte aligned and its
    head dim is even (an odd one masks its tiles' last column, which splits even aligned rows into elements:
    D=33 on rows of 34 computed wrong outputs on the H200).

    Otherwise Triton loads 16-bit tiles element by element into registers and stores them to shared memory, the
    path on which Triton 3.6 on sm_90 computed wrong outputs and faulted (issue 16, benchmarks/gpu_sweep.py)."""
    from .codegen.plans import row_alignment

    if tensors[0].element_size() != 2:
        return True
    if any(t.data_ptr() % 16 or t.shape[-1] % 2 for t in tensors):
        return False
    return row_alignment(*((t.element_size(), t.stride()) for t in tensors)) >= 2


def _with_padded_rows(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, *captured,
                      return_max=False):
    """triton_flex_attention on copies of q, k, v whose head dims are zero-padded to 16-byte rows (q.k and P V are
    unchanged by zero columns; the output's extra columns are cut off).  Autograd takes the gradients through the
    padding.  One copy of each input per call: only for layouts `vector_rows` refuses."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, *stats = triton_flex_attention(pad_rows(query), pad_rows(key), pad_rows(value), score_mod, block_mask,
                                        scale, enable_gqa, True, kernel_options, *captured, return_max=return_max)
    return out[..., :value.shape[-1]].contiguous(), *stats


def pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t with its last dim zero-padded to rows of a multiple of ROW_BYTES bytes, in a fresh (16-byte aligned)
    allocation whatever t's offset."""
    width = -(-t.shape[-1] * t.element_size() // ROW_BYTES) * ROW_BYTES // t.element_size()
    return torch.cat([t, t.new_zeros(*t.shape[:-1], width - t.shape[-1])], dim=-1)
