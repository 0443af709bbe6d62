"""Block-sparsity analysis of mask IR: tile classes and closed-form loop bounds.  Knows nothing of Triton.

- `intervals`: abstract interpretation over every tile at once (intervals, truth pairs);
- `linear`: comparisons as constraints on shared affine forms (relational precision);
- `summaries`: per-block min/max of captured tensors read by a LOAD;
- `tiles`: the tiling, the banded analysis driver and the exact (evaluating) fallback;
- `closed_form`: sympy derivation of per-q-block kv ranges (`ClosedFormBounds`);
- `tables`: torch's ordered block tables without dense maps.
- `counts`: the count tables of closed-form bounds, built on the device from their symbolic form.
- `host`: the captured tensors' host copies the analysis reads (one device read per build), tables to the device.
"""

from __future__ import annotations

from .closed_form import closed_form_bounds

__all__ = ["closed_form_bounds"]
