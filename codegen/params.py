"""Entry kernels' parameters, declared once as data.

A kernel's declaration is a tuple of groups (one line of the rendered signature each).  The template's parameter
text is rendered from it (`Signature.render`) and the host's launch arguments are built from it by name
(`Signature.bind`): the host hands a dict name -> value, and a missing or unknown name raises at plan-build time,
so the two sides cannot drift apart by position.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["pointer", "stride", "int", "float", "constexpr", "buffers"]
NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    default: Any = NO_DEFAULT  # constexprs only: the value when the host leaves it out

    def text(self) -> str:
        if self.kind != "constexpr":
            return self.name
        suffix = "" if self.default is NO_DEFAULT else f" = {self.default!r}"
        return f"{self.name}: tl.constexpr{suffix}"


Group = tuple[Param, ...]


def tensor(pointer: str, *strides: str) -> Group:
    """A tensor's pointer, then one stride per dim (the order the kernel indexes them)."""
    return (Param(pointer, "pointer"), *(Param(s, "stride") for s in strides))


def scalars(*names: str, kind: Kind = "int") -> Group:
    return tuple(Param(n, kind) for n in names)


def constexprs(*names: str, default: Any = NO_DEFAULT) -> Group:
    return tuple(Param(n, "constexpr", default) for n in names)


# The mod's captured tensors: a variable-length run of pointers and strides, named by the generated source
# (ops.buffer_params) and bound from one list of values, in the order the mods list their buffers.
MOD_BUFFERS: Group = (Param("mod_buffers", "buffers"),)


def block_tables(num: str, idx: str, full_num: str, full_idx: str, s: str = "") -> tuple[Group, ...]:
    """One direction's four block tables (what flexcomp.blockmask / torch's BlockMask carry): the counts [B, H, rows]
    and the indices [B, H, rows, cols] of the PARTIAL blocks, then of the FULL ones, each a pointer and its strides
    (0 where a dim broadcasts); `s` tells two directions' strides apart.  ops.program_tiles reads them."""
    counts, indices = ("b", "h", "m"), ("b", "h", "m", "n")
    return (tensor(num, *(f"stride_{s}n{d}" for d in counts)), tensor(idx, *(f"stride_{s}i{d}" for d in indices)),
            tensor(full_num, *(f"stride_{s}fn{d}" for d in counts)),
            tensor(full_idx, *(f"stride_{s}fi{d}" for d in indices)))  # fmt: skip


# The kv blocks of each q block: what the forward (and decode) walk, and the backward's dQ programs.
KV_TABLES = block_tables("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX")
TABLE_NAMES = tuple(p.name for g in KV_TABLES for p in g)  # the order forward.index_tables lists their values
# The q blocks of each kv block: what the backward's dK/dV programs walk.
Q_TABLES = block_tables("Q_NUM", "Q_IDX", "FULL_Q_NUM", "FULL_Q_IDX", "q")
Q_TABLE_NAMES = tuple(p.name for g in Q_TABLES for p in g)


@dataclass(frozen=True)
class Signature:
    """One entry kernel's parameters, in order."""

    groups: tuple[Group, ...]

    @functools.cached_property  # a plan binds on every build (each decode step's new block mask): computed once
    def params(self) -> tuple[Param, ...]:
        return tuple(p for g in self.groups for p in g)

    @functools.cached_property
    def _by_name(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    @functools.cached_property
    def _required(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.default is NO_DEFAULT)

    def names(self, buffers: Mapping[str, list[str]]) -> list[str]:
        """The kernel's parameter names in order, each "buffers" run replaced by its generated names in `buffers`."""
        return [n for p in self.params for n in (buffers[p.name] if p.kind == "buffers" else [p.name])]

    def render(self, buffers: Mapping[str, list[str]], indent: str = "    ") -> str:
        """The parameter text of the kernel's `def` (one group a line, a trailing comma on each)."""
        if set(buffers) != {p.name for p in self.params if p.kind == "buffers"}:
            raise TypeError(f"buffer runs {sorted(buffers)} do not match the declaration")
        lines = []
        for group in self.groups:
            texts = [n for p in group for n in (buffers[p.name] if p.kind == "buffers" else [p.text()])]
            if texts:
                lines.append(indent + ", ".join(texts) + ",")
        return "\n".join(lines)

    def bind(self, values: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """(positional arguments, constexpr keywords) for a launch; every name checked against the declaration."""
        unknown = sorted(values.keys() - self._by_name.keys())
        missing = [name for name in self._required if name not in values]
        if unknown or missing:
            raise TypeError(f"kernel arguments do not match the declaration: missing {missing}, unknown {unknown}")
        args: list[Any] = []
        for p in self.params:
            if p.kind == "buffers":
                args.extend(values[p.name])
            elif p.kind != "constexpr":
                args.append(values[p.name])
        kwargs = {p.name: values[p.name] for p in self.params if p.kind == "constexpr" and p.name in values}
        return args, kwargs


def bind_tensor(group: Group, pointer: Any, strides: tuple[int, ...] | list[Any]) -> dict[str, Any]:
    """`group`'s names -> the pointer and the strides (a rank that does not match the declaration raises)."""
    if len(strides) != len(group) - 1:
        raise TypeError(f"{group[0].name} takes {len(group) - 1} strides, got {len(strides)}")
    return dict(zip((p.name for p in group), (pointer, *strides), strict=True))


# What both directions read, under the same names: q, k, v with their [B, H, L, D] strides.
Q_TENSOR = tensor("Q", "stride_qb", "stride_qh", "stride_qm", "stride_qd")
K_TENSOR = tensor("K", "stride_kb", "stride_kh", "stride_kn", "stride_kd")
V_TENSOR = tensor("V", "stride_vb", "stride_vh", "stride_vn", "stride_vd")

FORWARD_OUT = tensor("Out", "stride_ob", "stride_oh", "stride_om", "stride_od")
FORWARD_LSE = tensor("Lse", "stride_lb", "stride_lh", "stride_lm")
# return_aux's max_scores: float32 [B, H_Q, Q_LEN] laid out as Lse (the host allocates both), written when OUTPUT_MAX
FORWARD_MAX = scalars("MaxScores", kind="pointer")

# A paged KV cache (flexcomp.paging): K/V hold pages, each request's page-table row maps its logical pages to them,
# and its length ends its rows.  PAGE_SIZE 0: contiguous K/V, the two tables unread.
PAGED_KV: Group = (*tensor("PAGE_TABLE", "stride_pgb"), *tensor("KV_LENS"), *constexprs("PAGE_SIZE"))

FORWARD = Signature((
    Q_TENSOR, K_TENSOR, V_TENSOR, FORWARD_OUT, FORWARD_LSE, FORWARD_MAX,
    *KV_TABLES,
    MOD_BUFFERS,
    (Param("sm_scale", "float"), *scalars("Q_LEN", "KV_LEN", "H_Q", "GQA_GROUP")),
    PAGED_KV,
    constexprs("HAS_SCORE_MOD", "USE_BOUNDS", "HAS_FULL"),
    constexprs("SPARSE_Q", "SPARSE_KV", "TILES_PER_BLOCK"),
    constexprs("BLOCK_M", "BLOCK_N"),
    constexprs("BLOCK_D", "BLOCK_DV", "D", "DV"),
    constexprs("DOT_PRECISION"),
    constexprs("EVEN_Q", "EVEN_KV", "FAST_TANH", default=False),
    constexprs("USE_TMA", "FLOAT_INDEX", "FOLD_SCALE", default=False),
    (*constexprs("PREFETCH_INDEX", "OUTPUT_MAX", default=False), *constexprs("ROW_ALIGN", default=1)),
))  # fmt: skip


BACKWARD_DO = tensor("DO", "stride_dob", "stride_doh", "stride_dom", "stride_dod")
BACKWARD_DQ = tensor("DQ", "stride_dqb", "stride_dqh", "stride_dqm", "stride_dqd")
BACKWARD_DK = tensor("DK_OUT", "stride_dkb", "stride_dkh", "stride_dkn", "stride_dkd")
BACKWARD_DV = tensor("DV_OUT", "stride_dvb", "stride_dvh", "stride_dvn", "stride_dvd")

BACKWARD = Signature((
    Q_TENSOR, K_TENSOR, V_TENSOR, BACKWARD_DO,
    scalars("LSE2", "DELTA", kind="pointer"),  # contiguous float32 [B, H_Q, Q_LEN]: lse in base 2, delta
    scalars("DQ_ACC", kind="pointer"),  # contiguous float32 [B, H_Q, Q_LEN, D], zeroed (ATOMIC_DQ; else unused)
    BACKWARD_DQ, BACKWARD_DK, BACKWARD_DV,
    *Q_TABLES, *KV_TABLES,
    (*MOD_BUFFERS, Param("grad_buffers", "buffers")),  # captured tensors, then their gradients' (each + slice stride)
    (Param("sm_scale", "float"), *scalars("Q_LEN", "KV_LEN", "H_Q", "H_KV")),
    scalars("dkdv_programs", "kv_tiles", "q_tiles"),  # programs [0, dkdv_programs) do dK/dV, the rest dQ
    constexprs("GQA_GROUP", "BLOCK_D", "BLOCK_DV", "D", "DV"),
    constexprs("DOT_PRECISION", "FAST_TANH"),
    constexprs("DKDV_PART", "SPARSE_Q1", "SPARSE_KV1", "BLOCK_M1"),  # 1: the dK/dV part (BackwardConfig's names)
    constexprs("BLOCK_N1", "EVEN_Q1", "EVEN_KV1", "PREFETCH_INDEX1"),
    constexprs("ATOMIC_DQ"),
    constexprs("DQ_PART", "SPARSE_Q2", "SPARSE_KV2", "BLOCK_M2"),  # 2: the dQ part
    constexprs("BLOCK_N2", "EVEN_Q2", "EVEN_KV2", "PREFETCH_INDEX2"),
    constexprs("DETERMINISTIC", "ROW_ALIGN"),
))  # fmt: skip


# The tensors whose batch, head and row strides an entry kernel restates as multiples of ROW_ALIGN on entry
# (ops.aligned): the ones the host's plans.row_alignment found them multiples of.  The last stride, the elements',
# is left as it is.
FORWARD_ROW_ALIGNED = (Q_TENSOR, K_TENSOR, V_TENSOR, FORWARD_OUT)  # the forward's and the decoding kernel's
BACKWARD_ROW_ALIGNED = (Q_TENSOR, K_TENSOR, V_TENSOR, BACKWARD_DO, BACKWARD_DQ, BACKWARD_DK, BACKWARD_DV)


def render_row_aligned(tensors: tuple[Group, ...], indent: str = "    ") -> str:
    """The kernel's opening statements, one a tensor: `stride_qb, ... = aligned(stride_qb, ROW_ALIGN), ...`."""
    lines = []
    for group in tensors:
        names = [p.name for p in group[1:-1]]  # the pointer and the elements' stride left out
        lines.append(f"{indent}{', '.join(names)} = {', '.join(f'aligned({n}, ROW_ALIGN)' for n in names)}")
    return "\n".join(lines)


# The split-KV decoding kernel (codegen/decode.py): the forward's inputs; out and lse when it runs unsplit, else each
# split's normalized output and base-2 lse in float32 workspaces [B, H_Q, Q_LEN, N_SPLITS(, DV)], merged by the
# last split of each row tile to arrive (FUSED_MERGE: ARRIVALS holds one int32 counter per program of a split, zero
# between launches) or by a separate launch after.
DECODE_PARTS = (scalars("O_PART", "L2_PART", "ARRIVALS", kind="pointer"),)

DECODE = Signature((
    Q_TENSOR, K_TENSOR, V_TENSOR, FORWARD_OUT, FORWARD_LSE, *DECODE_PARTS,
    *KV_TABLES,
    MOD_BUFFERS,
    (Param("sm_scale", "float"), *scalars("Q_LEN", "KV_LEN", "H_Q", "GQA_GROUP")),
    PAGED_KV,
    constexprs("PACK", "N_SPLITS", "FUSED_MERGE"),  # query heads packed per program (sharing a kv head); splits
    constexprs("HAS_SCORE_MOD", "USE_BOUNDS", "HAS_FULL"),
    constexprs("SPARSE_KV", "TILES_PER_BLOCK"),
    constexprs("BLOCK_M", "BLOCK_N"),
    constexprs("BLOCK_D", "BLOCK_DV", "D", "DV"),
    constexprs("DOT_PRECISION"),
    constexprs("EVEN_KV", "FAST_TANH", "FLOAT_INDEX", "FOLD_SCALE", "PREFETCH_INDEX", default=False),
    constexprs("ROW_ALIGN", default=1),
))  # fmt: skip
