"""Triton code generation: IR -> the source of a fused FlexAttention kernel, cached and launched.

Entry points:
  flex_forward(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options=None)
      -> (out, lse)
  kernel_source(score_mod, mask_mod, **specialization) -> str
"""

from .forward import flex_forward, kernel_source

__all__ = ["flex_forward", "kernel_source"]
