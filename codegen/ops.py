"""IR -> Triton expression text, through one op table.

Shared by every kernel template (forward now, backward later): a template asks
`render_block` for the SSA lines of some IR roots, given the names under which
the mod's arguments (and any values computed earlier, e.g. hoisted out of a
loop) are available, and pastes them into its text.

Typing follows flexcomp/ir.py: each operand is coerced to the dtype the op works
in (the node's dtype for arithmetic, the promoted source dtype for comparisons),
so Triton's own promotion rules never decide anything.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flexcomp.errors import BackendError
from flexcomp.ir import BufferSpec, DType, Node, Op, free_args, map_nodes, promote, toposort

TL_DTYPE = {DType.BOOL: "tl.int1", DType.I32: "tl.int32", DType.F32: "tl.float32"}
MAX_POW_UNROLL = 8  # x ** n with a constant |n| <= this becomes a product


@dataclass(frozen=True)
class Operand:
    """A source as the op table sees it: its node and its text, coerced on request."""

    node: Node
    text: str
    as_tensor: bool = False  # a constant that must be a 0-d tensor, not a Python literal

    def as_(self, dtype: DType) -> str:
        if self.node.op == Op.CONST:
            return (tensor_literal if self.as_tensor else literal)(self.node.arg, dtype)
        if self.node.dtype == dtype:
            return self.text
        if dtype == DType.BOOL:
            return f"({self.text} != 0)"
        return f"{self.text}.to({TL_DTYPE[dtype]})"


def literal(value: bool | float, dtype: DType) -> str:
    """A Python literal of `value` in `dtype` (Triton types bare literals weakly, like torch scalars)."""
    if dtype == DType.BOOL:
        return repr(bool(value))
    if dtype == DType.I32:
        return f"({int(value)})" if value < 0 else str(int(value))
    value = float(value)
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    if math.isnan(value):
        return 'float("nan")'
    return f"({value!r})" if value < 0 else repr(value)


def tensor_literal(value: bool | float, dtype: DType) -> str:
    """A 0-d tensor: for constants that would otherwise reach a tl.* call or a return as Python values."""
    return f"tl.full([], {literal(value, dtype)}, {TL_DTYPE[dtype]})"


# ---------------------------------------------------------------- the op table

Rule = Callable[[Node, list[Operand]], str]


def _float_call(fn: str) -> Rule:
    return lambda n, a: f"{fn}({a[0].as_(DType.F32)})"


def _infix(symbol: str) -> Rule:  # both operands in the node's dtype
    return lambda n, a: f"({a[0].as_(n.dtype)} {symbol} {a[1].as_(n.dtype)})"


def _compare(symbol: str) -> Rule:  # both operands in their promoted dtype
    def rule(n: Node, a: list[Operand]) -> str:
        dt = promote(*(s.dtype for s in n.src))
        return f"({a[0].as_(dt)} {symbol} {a[1].as_(dt)})"

    return rule


def _call2(fn: str) -> Rule:
    return lambda n, a: f"{fn}({a[0].as_(n.dtype)}, {a[1].as_(n.dtype)})"


def _division(float_form: str, by_positive: str, general: str) -> Rule:
    """Python's floor `//` or `%`: `float_form` on floats; on ints the helper for a positive constant divisor
    (cheaper) or the general one (any signs)."""

    def rule(n: Node, a: list[Operand]) -> str:
        x, y = (o.as_(n.dtype) for o in a)
        if n.dtype == DType.F32:
            return float_form.format(x=x, y=y)
        helper = by_positive if n.src[1].op == Op.CONST and n.src[1].arg > 0 else general
        return f"{helper}({x}, {y})"

    return rule


def _pow(n: Node, a: list[Operand]) -> str:
    base, exponent = a[0].as_(n.dtype), n.src[1]
    if exponent.op == Op.CONST and float(exponent.arg).is_integer() and abs(exponent.arg) <= MAX_POW_UNROLL:
        k = int(exponent.arg)
        if k < 0 and n.dtype == DType.I32:
            raise BackendError(f"integer ** negative constant is undefined: {k=}", loc=n.loc)
        product = " * ".join([base] * abs(k)) or literal(1, n.dtype)
        return f"({product})" if k >= 0 else f"(1.0 / ({product}))"
    if n.dtype == DType.I32:
        raise BackendError("integer ** with a non-constant (or large) exponent is not supported", loc=n.loc)
    if exponent.op == Op.CONST and exponent.arg == 0.5:
        return f"tl.sqrt({base})"
    # a ** b = 2 ** (b * log2 a): NaN for a < 0, as torch gives for non-integer b
    return f"tl.exp2({a[1].as_(DType.F32)} * tl.log2({base}))"


def _cast(n: Node, a: list[Operand]) -> str:
    return a[0].as_(n.dtype)  # float -> int truncates toward zero in both torch and Triton


def _not(n: Node, a: list[Operand]) -> str:
    return f"({a[0].as_(DType.BOOL)} == 0)" if n.dtype == DType.BOOL else f"(~{a[0].as_(n.dtype)})"


def _where(n: Node, a: list[Operand]) -> str:
    return f"tl.where({a[0].as_(DType.BOOL)}, {a[1].as_(n.dtype)}, {a[2].as_(n.dtype)})"


OP_RULES: dict[Op, Rule] = {
    Op.NEG: lambda n, a: f"(-{a[0].as_(n.dtype)})",
    Op.NOT: _not,
    Op.ABS: lambda n, a: f"tl.abs({a[0].as_(n.dtype)})",
    Op.EXP: _float_call("tl.exp"),
    Op.EXP2: _float_call("tl.exp2"),
    Op.LOG: _float_call("tl.log"),
    Op.LOG2: _float_call("tl.log2"),
    Op.SQRT: _float_call("tl.sqrt"),
    Op.RSQRT: _float_call("tl.rsqrt"),
    Op.TANH: lambda n, a: f"tanh_f32({a[0].as_(DType.F32)})",
    Op.SIGMOID: _float_call("tl.sigmoid"),
    Op.SIN: _float_call("tl.sin"),
    Op.COS: _float_call("tl.cos"),
    Op.TAN: _float_call("tan_f32"),
    Op.ERF: _float_call("tl.erf"),
    Op.LOG1P: _float_call("log1p_f32"),
    Op.EXPM1: _float_call("expm1_f32"),
    Op.FLOOR: lambda n, a: f"tl.floor({a[0].as_(n.dtype)})" if n.dtype == DType.F32 else a[0].as_(n.dtype),  # int: floor(x) = x
    Op.ROUND: lambda n, a: f"round_half_even({a[0].as_(n.dtype)})" if n.dtype == DType.F32 else a[0].as_(n.dtype),
    Op.CAST: _cast,
    Op.ADD: _infix("+"),
    Op.SUB: _infix("-"),
    Op.MUL: _infix("*"),
    Op.DIV: lambda n, a: f"({a[0].as_(DType.F32)} / {a[1].as_(DType.F32)})",
    Op.FLOORDIV: _division("tl.floor({x} / {y})", "floordiv_by_positive", "floordiv_i32"),  # a // b
    Op.MOD: _division("({x} - {y} * tl.floor({x} / {y}))", "mod_by_positive", "mod_i32"),  # a % b
    Op.POW: _pow,
    Op.MIN: _call2("tl.minimum"),
    Op.MAX: _call2("tl.maximum"),
    Op.LT: _compare("<"),
    Op.LE: _compare("<="),
    Op.GT: _compare(">"),
    Op.GE: _compare(">="),
    Op.EQ: _compare("=="),
    Op.NE: _compare("!="),
    Op.AND: _infix("&"),
    Op.OR: _infix("|"),
    Op.XOR: _infix("^"),
    # counts clamp to 0..31 (a left shift by 32 or more gives 0), as flexcomp/evaluate.py defines them
    Op.SHL: lambda n, a: f"tl.where({a[1].as_(DType.I32)} >= 32, 0, {a[0].as_(DType.I32)} << "
    f"tl.minimum(tl.maximum({a[1].as_(DType.I32)}, 0), 31))",
    Op.SHR: lambda n, a: f"({a[0].as_(DType.I32)} >> tl.minimum(tl.maximum({a[1].as_(DType.I32)}, 0), 31))",
    Op.WHERE: _where,
}

# Small @triton.jit helpers the rules above call; every generated file starts with them.
PRELUDE = '''
@triton.jit
def floordiv_i32(a, b):
    # Triton's // truncates toward zero (C); Python's floors: step down when the signs differ
    q = a // b
    return q - (((a % b) != 0) & ((a < 0) != (b < 0))).to(tl.int32)


@triton.jit
def mod_i32(a, b):
    # Python's % takes the divisor's sign; Triton's takes the dividend's
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def floordiv_by_positive(a, b):
    return a // b - ((a % b) < 0).to(tl.int32)


@triton.jit
def mod_by_positive(a, b):
    r = a % b
    return tl.where(r < 0, r + b, r)


@triton.jit
def tanh_f32(x):
    # 2 sigmoid(2x) - 1: saturates to +-1 without overflow for large |x|
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def tan_f32(x):
    # no tl.tan in every Triton we support (3.6 and newer); libdevice's does not run under the interpreter
    return tl.sin(x) / tl.cos(x)


@triton.jit
def log1p_f32(x):
    # log(1 + x) loses x's low bits when |x| is small: there 2 atanh(z), z = x / (2 + x), as a series
    # (|z| <= 1/7: relative error below 1e-8)
    z = x / (2.0 + x)
    z2 = z * z
    series = 2.0 * z * (1.0 + z2 * (1.0 / 3.0 + z2 * (1.0 / 5.0 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0)))))
    return tl.where(tl.abs(x) < 0.25, series, tl.log(1.0 + x))


@triton.jit
def expm1_f32(x):
    # exp(x) - 1 cancels when |x| is small: there the Taylor series to x^9 (relative error below 1e-8)
    s = 1.0 + x * (1.0 / 9.0)
    s = 1.0 + x * (1.0 / 8.0) * s
    s = 1.0 + x * (1.0 / 7.0) * s
    s = 1.0 + x * (1.0 / 6.0) * s
    s = 1.0 + x * (1.0 / 5.0) * s
    s = 1.0 + x * (1.0 / 4.0) * s
    s = 1.0 + x * (1.0 / 3.0) * s
    s = 1.0 + x * 0.5 * s
    return tl.where(tl.abs(x) < 0.5, x * s, tl.exp(x) - 1.0)


@triton.jit
def round_half_even(x):
    # torch.round: to the nearest integer, a half to the even one.  x - floor(x) is exact in float32, so the
    # comparisons with 0.5 are too (unlike floor(x + 0.5), which rounds 0.49999997 up)
    down = tl.floor(x)
    frac = x - down
    odd = (down * 0.5 - tl.floor(down * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, down + 1.0, down)


@triton.jit
def as_i32(x):
    # a literal or constexpr int (a call's `0`, or an argument Triton specialized for being 1) as an int32 tensor,
    # which the rendered casts (`.to`) and comparisons need; free on a tensor
    return x + tl.zeros([], tl.int32)


@triton.jit
def wrap_index(i, size):
    # Python's negative indices count from the end; anything still out of range is clamped, never read wild
    i = tl.where(i < 0, i + size, i)
    return tl.minimum(tl.maximum(i, 0), size - 1)
'''

def dot_precision(dtype: Any, interpreted: bool) -> str:
    """The kernels' DOT_PRECISION for a torch dtype: exact float32 products for float32 inputs, tensor cores for
    16-bit ones ("upcast" under the interpreter, see `mma`)."""
    name = str(dtype).removeprefix("torch.")
    if name == "float32":
        return "ieee"
    return "upcast" if interpreted and name == "bfloat16" else "tf32"


# Helpers of both kernel templates (forward and backward), ahead of the templates in every generated file.
KERNEL_HELPERS = '''
@triton.jit
def aligned(stride, ROW_ALIGN: tl.constexpr):
    # the host found the stride a multiple of ROW_ALIGN elements (codegen/plans.py row_alignment): said so, 16-bit
    # rows of 24 or 40 elements load as 16-byte vectors instead of element by element.  (stride // A) * A states it
    # where tl.multiple_of cannot: an argument has no defining op to carry the attribute; a shift and a multiply,
    # once per program
    if ROW_ALIGN > 1:
        stride = (stride // ROW_ALIGN) * ROW_ALIGN
    return stride


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    # a @ b (+ acc).  "upcast" is set only under Triton's interpreter, whose bfloat16 tl.dot multiplies raw bit
    # patterns: there the tiles are multiplied in float32
    if DOT_PRECISION == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return c


@triton.jit
def tanh_approx(x):
    # one MUFU op (max rel. error ~2^-11): used for 16-bit inputs on CUDA only (FAST_TANH); the interpreter cannot run asm
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def load_tile(ptrs, rows_in, cols_in, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # bounds checks only where a length is not a multiple of the tile (decided on the host)
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=rows_in & cols_in, other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows_in, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols_in, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def load_kv_tile(head, start_n, stride_n, stride_d, KV_LEN, BLOCK_N: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 COLS: tl.constexpr, TRANSPOSED: tl.constexpr, CHECK_ROWS: tl.constexpr):
    # kv rows [start_n, start_n + BLOCK_N) x head-dim columns of one head's K or V (`head` points at its row 0),
    # zero past KV_LEN and COLS: the one place a kernel addresses contiguous K/V (a paged cache: tile_rows, then
    # load_kv_rows).  TRANSPOSED gives [BLOCK_COLS, BLOCK_N], the operand of q @ k^T, loaded in that layout (not a
    # tl.trans).
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return load_kv_rows(head, offs_n, offs_n < KV_LEN, stride_n, stride_d, BLOCK_COLS, COLS, TRANSPOSED, CHECK_ROWS)


@triton.jit
def load_kv_rows(head, rows, kv_in, stride_n, stride_d, BLOCK_COLS: tl.constexpr, COLS: tl.constexpr,
                 TRANSPOSED: tl.constexpr, CHECK_ROWS: tl.constexpr):
    # load_kv_tile at cache rows found already (a paged walk reads a tile's page entries one tile ahead)
    offs_c = tl.arange(0, BLOCK_COLS)
    if TRANSPOSED:
        x = load_tile(head + rows[None, :] * stride_n + offs_c[:, None] * stride_d,
                      kv_in[None, :], offs_c[:, None] < COLS, CHECK_ROWS, BLOCK_COLS != COLS)
    else:
        x = load_tile(head + rows[:, None] * stride_n + offs_c[None, :] * stride_d,
                      kv_in[:, None], offs_c[None, :] < COLS, CHECK_ROWS, BLOCK_COLS != COLS)
    return x


@triton.jit
def paged_request(b, PAGE_TABLE, stride_pgb, KV_LENS, KV_LEN, PAGE_SIZE: tl.constexpr):
    # (request b's page-table row, its kv length): a paged request's rows end where its pages (or its length as
    # converted) end, before the logical KV_LEN the tiles are planned for; positions past it are masked
    page_row = PAGE_TABLE
    kv_len = KV_LEN
    if PAGE_SIZE > 0:
        page_row = PAGE_TABLE + b * stride_pgb
        kv_len = tl.minimum(KV_LEN, tl.load(KV_LENS + b))
    return page_row, kv_len


@triton.jit
def tile_start(i, n_tiles, first_lo, n_first, second_lo, index_row, stride_index, USE_BOUNDS: tl.constexpr,
               SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    # the first row of tile i of a program's list (program_tiles: two runs of consecutive tiles, or a table row)
    if USE_BOUNDS:
        start = tl.where(i < n_first, first_lo + i * BLOCK, second_lo + (i - n_first) * BLOCK)
    else:
        start = listed_tile_start(index_row, stride_index, i, n_tiles, SPARSE, BLOCK)
    return start


@triton.jit
def tile_rows(start_n, KV_LEN, page_row, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    # the cache rows holding logical kv rows [start_n, start_n + BLOCK_N): themselves, or through the page table
    # (`page_row`: the request's logical page -> physical page; entries past KV_LEN are never read).  A page of at
    # least a tile (the host checks BLOCK_N divides it) costs one page-table read per tile and keeps the rows one
    # contiguous run.  A tile of whole smaller pages (16-row pages under 64-row tiles) gathers its BLOCK_N //
    # PAGE_SIZE page ids once per tile (4 int32 per 64 rows, beside 32 KiB of K and V at D=128 bf16), not one per
    # row, and expands each to its page's rows; other page sizes read one entry per row (BLOCK_N // PAGE_SIZE
    # distinct, from L1).  Each page's rows stay contiguous, so the loads remain vectorized along the head dim.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if PAGE_SIZE == 0:
        rows = offs_n
    elif PAGE_SIZE >= BLOCK_N:
        page = tl.load(page_row + start_n // PAGE_SIZE, mask=start_n < KV_LEN, other=0).to(tl.int64)
        rows = page * PAGE_SIZE + (start_n % PAGE_SIZE) + tl.arange(0, BLOCK_N)
    elif BLOCK_N % PAGE_SIZE == 0:  # start_n is a multiple of BLOCK_N, so the tile starts a page
        slots = start_n // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
        page = tl.load(page_row + slots, mask=slots * PAGE_SIZE < KV_LEN, other=0).to(tl.int64)
        rows = tl.reshape(page[:, None] * PAGE_SIZE + tl.arange(0, PAGE_SIZE)[None, :], [BLOCK_N])
    else:
        page = tl.load(page_row + offs_n // PAGE_SIZE, mask=offs_n < KV_LEN, other=0).to(tl.int64)
        rows = page * PAGE_SIZE + offs_n % PAGE_SIZE
    return rows


@triton.jit
def closed_form_tiles(kv_lo, kv_hi, full_lo, full_hi, KV_LEN, BLOCK_N: tl.constexpr):
    # a program's kv tile range from closed-form bounds, as two runs of consecutive tiles: PARTIAL tiles from
    # part_lo (n_left of them before the FULL run, n_partial in all, the rest from full_hi) and n_full FULL tiles
    # from full_lo.  The one place that turns bounds into tiles (a split-KV kernel would cut these runs).
    n_kv_tiles = tl.cdiv(KV_LEN, BLOCK_N)
    # partial range rounded outward, full range rounded inward (a full range that reaches
    # KV_LEN keeps the ragged last tile: it is bounds-checked like every tile)
    part_lo = tl.minimum(tl.maximum(kv_lo, 0), KV_LEN) // BLOCK_N * BLOCK_N
    part_hi = tl.maximum(tl.cdiv(tl.minimum(tl.maximum(kv_hi, 0), KV_LEN), BLOCK_N) * BLOCK_N, part_lo)
    full_lo = tl.maximum(tl.cdiv(tl.minimum(tl.maximum(full_lo, 0), KV_LEN), BLOCK_N) * BLOCK_N, part_lo)
    full_hi = tl.minimum(tl.maximum(full_hi, 0), KV_LEN)
    full_hi = tl.where(full_hi >= KV_LEN, n_kv_tiles * BLOCK_N, full_hi // BLOCK_N * BLOCK_N)
    full_hi = tl.minimum(full_hi, part_hi)
    no_full = full_hi <= full_lo
    full_lo = tl.where(no_full, part_hi, full_lo)
    full_hi = tl.where(no_full, part_hi, full_hi)
    n_left = (full_lo - part_lo) // BLOCK_N
    n_partial = n_left + (part_hi - full_hi) // BLOCK_N
    n_full = (full_hi - full_lo) // BLOCK_N
    return part_lo, n_left, full_hi, n_partial, full_lo, n_full


@triton.jit
def program_tiles(lo, hi, full_lo, full_hi, b, h, row,
                  NUM, stride_nb, stride_nh, stride_nm, IDX, stride_ib, stride_ih, stride_im, stride_in,
                  FULL_NUM, stride_fnb, stride_fnh, stride_fnm, FULL_IDX, stride_fib, stride_fih, stride_fim, stride_fin,
                  LEN, USE_BOUNDS: tl.constexpr, HAS_FULL: tl.constexpr, BLOCK: tl.constexpr,
                  TILES_PER_BLOCK: tl.constexpr):
    # The tiles one program walks, whichever axis (a forward or decode program's kv tiles; a backward dK/dV
    # program's q tiles, a dQ program's kv tiles), as two lists: PARTIAL tiles (mask applied) and FULL ones (mask
    # skipped).  Returns (n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row): with
    # USE_BOUNDS the partial list is two runs of consecutive tiles (first_lo, n_first of them; then from second_lo)
    # and the full list one run from full_lo, from the closed-form bounds lo..full_hi; else each list is a row of
    # a direction's block tables (row `row` of batch b, head h; codegen/params.py block_tables), walked by
    # walk_step.  The one place that turns bounds or tables into tile lists: a kernel walks [i_lo, i_hi) of each.
    if USE_BOUNDS:
        first_lo, n_first, second_lo, n_partial, full_lo, n_full = closed_form_tiles(lo, hi, full_lo, full_hi, LEN,
                                                                                      BLOCK)
        partial_row = IDX
        full_row = IDX
    else:
        first_lo, n_first, second_lo, full_lo = 0, 0, 0, 0
        n_partial = tl.load(NUM + b * stride_nb + h * stride_nh + row * stride_nm) * TILES_PER_BLOCK
        partial_row = IDX + b * stride_ib + h * stride_ih + row * stride_im
        if HAS_FULL:
            n_full = tl.load(FULL_NUM + b * stride_fnb + h * stride_fnh + row * stride_fnm) * TILES_PER_BLOCK
        else:
            n_full = 0
        full_row = FULL_IDX + b * stride_fib + h * stride_fih + row * stride_fim
    return n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row


@triton.jit
def split_tiles(n_tiles, split, N_SPLITS: tl.constexpr):
    # [lo, hi): split `split`'s share of a list of n_tiles tiles cut into N_SPLITS near-equal consecutive parts
    if N_SPLITS == 1:  # the whole list (the forward): no arithmetic
        lo, hi = 0, n_tiles
    else:
        per_split = tl.cdiv(n_tiles, N_SPLITS)
        lo = tl.minimum(split * per_split, n_tiles)
        hi = tl.minimum(lo + per_split, n_tiles)
    return lo, hi


@triton.jit
def listed_tile_start(index_row, stride_index, i, n_tiles, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    # the first index of the i-th of n_tiles tiles (i clamped to the last; none read when n_tiles is 0) of the
    # blocks a block-mask row lists: each sparse block is SPARSE // BLOCK tiles
    i = tl.minimum(i, n_tiles - 1)
    block = tl.load(index_row + (i // (SPARSE // BLOCK)) * stride_index, mask=i >= 0, other=0).to(tl.int32)
    return block * SPARSE + (i % (SPARSE // BLOCK)) * BLOCK


@triton.jit
def walk_ahead(index_row, stride_index, i_lo, n_tiles, SPARSE: tl.constexpr, BLOCK: tl.constexpr,
               PREFETCH_INDEX: tl.constexpr):
    # walk_step's `ahead` before the first step (tile i_lo): that tile's start when reading ahead
    ahead = 0
    if PREFETCH_INDEX:
        ahead = listed_tile_start(index_row, stride_index, i_lo, n_tiles, SPARSE, BLOCK)
    return ahead


@triton.jit
def walk_step(index_row, stride_index, i, n_tiles, ahead, SPARSE: tl.constexpr, BLOCK: tl.constexpr,
              PREFETCH_INDEX: tl.constexpr):
    """(the i-th listed tile's start, `ahead` for the next step).

    PREFETCH_INDEX: `ahead` holds the start read one step earlier, and the next one is read now.  Read in the
    step whose loads it addresses, Triton's pipeliner (3.6) copies the index asynchronously after those loads,
    and the loop's one wait then drains every copy in flight (cp.async.wait_group 0): the loads of the tiles
    ahead no longer overlap the math.  Only a pipeline of 3+ stages has tiles ahead to overlap."""
    if PREFETCH_INDEX:
        start = ahead
        ahead = listed_tile_start(index_row, stride_index, i + 1, n_tiles, SPARSE, BLOCK)
    else:
        start = listed_tile_start(index_row, stride_index, i, n_tiles, SPARSE, BLOCK)
    return start, ahead
'''

# ---------------------------------------------------------------- template text


def args_text(names: list[str]) -> str:
    """`a, b, ` (trailing separator, so an empty list leaves no stray comma)."""
    return "".join(f"{n}, " for n in names)


def lhs_text(names: list[str]) -> str:
    """`a, b` as an assignment's targets (`_unused` when there are none)."""
    return ", ".join(names) if names else "_unused"


def fill_holes(template: str, fill: dict[str, str]) -> str:
    """`template` with each `{NAME}` hole replaced by fill[NAME]."""
    for key, value in fill.items():
        template = template.replace("{" + key + "}", value)
    return template


# ---------------------------------------------------------------- captured tensors


def identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def buffer_params(prefix: str, buffers: tuple[BufferSpec, ...]) -> list[str]:
    """Kernel parameters for captured tensors: a pointer and one stride per dim (shapes are constants)."""
    params = []
    for spec in buffers:
        base = f"{prefix}_{identifier(spec.name)}"
        params += [f"{base}_ptr"] + [f"{base}_stride{d}" for d in range(len(spec.shape))]
    return params


LOAD_CAST = {DType.BOOL: " != 0", DType.I32: ".to(tl.int32)", DType.F32: ".to(tl.float32)"}


def _render_load(n: Node, a: list[Operand], prefix: str, buffers: dict[str, BufferSpec]) -> str:
    spec = buffers[n.arg]
    base = f"{prefix}_{identifier(spec.name)}"
    terms = []
    for d, (index, size) in enumerate(zip(a, spec.shape)):
        if index.node.op == Op.CONST:  # fold the wrap and clamp now
            i = int(index.node.arg)
            i = min(max(i + size if i < 0 else i, 0), size - 1)
            terms.append(f"{i} * {base}_stride{d}")
        else:
            terms.append(f"wrap_index({index.as_(DType.I32)}, {size}) * {base}_stride{d}")
    return f"(tl.load({base}_ptr + {' + '.join(terms) or '0'}){LOAD_CAST[spec.ir_dtype]})"


# ---------------------------------------------------------------- rendering


def render_block(
    roots: list[Node],
    names: dict[Node, str],
    prefix: str,
    buffers: tuple[BufferSpec, ...],
    buffer_prefix: str,
    indent: str = "    ",
) -> tuple[list[str], list[str]]:
    """SSA lines computing `roots`, and each root's text.

    `names` maps nodes already available (ARGs, values hoisted earlier) to variable
    names; it is extended with every node this block assigns.  Constants are
    inlined as literals, except where all of an op's sources are constants (or a
    root is one): those become 0-d tensors so no tl.* call sees a Python number.
    """
    by_name = {spec.name: spec for spec in buffers}
    lines: list[str] = []
    for root in roots:
        for node in toposort(root):
            if node in names or node.op == Op.CONST:
                continue
            if node.op == Op.ARG:
                raise BackendError(f"argument {node.arg!r} is not available here", loc=node.loc)
            all_const = node.op != Op.LOAD and all(s.op == Op.CONST for s in node.src)
            operands = [Operand(s, names.get(s, ""), all_const) for s in node.src]
            if node.op == Op.LOAD:
                expr = _render_load(node, operands, buffer_prefix, by_name)
            elif node.op in OP_RULES:
                expr = OP_RULES[node.op](node, operands)
            else:
                raise BackendError(f"no Triton rule for op {node.op.value}", loc=node.loc)
            name = f"{prefix}{len(names)}"
            names[node] = name
            lines.append(f"{indent}{name} = {expr}")
    results = [names[r] if r in names else tensor_literal(r.arg, r.dtype) for r in roots]
    return lines, results


def variant_nodes(roots: list[Node], loop_args: frozenset[str]) -> set[Node]:
    """Nodes that depend on an ARG in `loop_args` (they must be computed inside the loop)."""
    variant: set[Node] = set()
    for root in roots:
        for node in toposort(root):
            if (node.op == Op.ARG and node.arg in loop_args) or any(s in variant for s in node.src):
                variant.add(node)
    return variant


def hoistable(roots: list[Node], loop_args: frozenset[str]) -> list[Node]:
    """Loop-invariant computed nodes that the loop body uses: compute them once, before the loop."""
    variant = variant_nodes(roots, loop_args)
    used_by_loop = {s for node in variant for s in node.src} | set(roots)
    seen, hoisted = set(), []
    for root in roots:
        for node in toposort(root):
            if node in used_by_loop and node not in variant and node.op not in (Op.CONST, Op.ARG) and node not in seen:
                seen.add(node)
                hoisted.append(node)
    return hoisted



# ---------------------------------------------------------------- exact float index arithmetic
#
# `cast_f32(kv_idx - q_idx)` costs an int subtract and an int->float conversion per score element,
# and the conversion runs at a quarter of the FP32 rate on Hopper.  Pushed down to the leaves, the
# conversions happen once per vector instead: cast_f32(q_idx) once per q tile (hoisted) and
# cast_f32(kv_idx) as `start_n + arange` in float per kv tile.  Exact, bit for bit, while every value
# involved stays within +-2^24 (float32 holds every such integer; sums, differences and products of
# them that stay in range are exact too): `float_index_exact` checks that on the host.

FLOAT_EXACT_LIMIT = 2**24
INDEX_LOOP_ARG = "kv_idx"  # the leaf whose float form the kernel builds per tile; others are hoisted


def cast_f32(node: Node) -> Node:
    return Node(Op.CAST, DType.F32, (node,))


def _f32_op(op: Op, *src: Node) -> Node:
    return Node(op, DType.F32, src)


def _float_zero() -> Node:
    return Node(Op.CONST, DType.F32, (), 0.0)


def _times_const(a: Node, c: int, f: Callable[[Node], Node]) -> Node:
    if c == 0:
        return _float_zero()
    if c > 0:
        return _f32_op(Op.MUL, f(a), Node(Op.CONST, DType.F32, (), float(c)))
    # 0.0 - x*|c| rather than x*c: an int 0 casts to +0.0, and x * -c would give -0.0
    return _f32_op(Op.SUB, _float_zero(), _f32_op(Op.MUL, f(a), Node(Op.CONST, DType.F32, (), float(-c))))


def _mul_rule(n: Node, f: Callable[[Node], Node]) -> Node | None:
    a, b = n.src
    if b.op == Op.CONST and b.dtype == DType.I32:
        return _times_const(a, b.arg, f)
    if a.op == Op.CONST and a.dtype == DType.I32:
        return _times_const(b, a.arg, f)
    return None


# cast_f32(n) for an int `n` -> its float form, given `f` = the float form of a source; None: n stays a leaf
FloatIndexRule = Callable[[Node, Callable[[Node], Node]], Node | None]
FLOAT_INDEX_RULES: dict[Op, FloatIndexRule] = {
    # cast_f32(c) -> float(c)
    Op.CONST: lambda n, f: Node(Op.CONST, DType.F32, (), float(n.arg)),
    # cast_f32(a + b) -> cast_f32(a) + cast_f32(b)
    Op.ADD: lambda n, f: _f32_op(Op.ADD, f(n.src[0]), f(n.src[1])),
    # cast_f32(a - b) -> cast_f32(a) - cast_f32(b)
    Op.SUB: lambda n, f: _f32_op(Op.SUB, f(n.src[0]), f(n.src[1])),
    # cast_f32(-a) -> 0.0 - cast_f32(a)   (not -cast_f32(a): that is -0.0 where a = 0)
    Op.NEG: lambda n, f: _f32_op(Op.SUB, _float_zero(), f(n.src[0])),
    # cast_f32(a * c) -> cast_f32(a) * c   (c < 0: 0.0 - cast_f32(a) * -c; c = 0: 0.0); non-constant products stay
    Op.MUL: _mul_rule,
}


def _float_form(n: Node, memo: dict[Node, Node], region: set[Node]) -> Node:
    """The float32 form of int node `n`; `region` collects every int node whose value it carries."""
    if n in memo:
        return memo[n]
    region.add(n)
    rule = FLOAT_INDEX_RULES.get(n.op) if n.dtype == DType.I32 else None
    form = None
    if rule is not None and (n.op == Op.CONST or INDEX_LOOP_ARG in free_args(n)):
        form = rule(n, lambda s: _float_form(s, memo, region))
    # leaves: the loop's index (the kernel's per-tile float iota), hoisted values (one conversion per q tile),
    # and anything the rules do not cover (converted as before)
    memo[n] = form or cast_f32(n)
    return memo[n]


def float_index_form(root: Node) -> tuple[Node, frozenset[Node]]:
    """`root` with each int->float32 cast of a kv_idx expression pushed down to its leaves, and the int
    nodes whose values the float arithmetic then carries (every one must stay within +-2^24)."""
    memo: dict[Node, Node] = {}
    region: set[Node] = set()

    def rewrite(node: Node) -> Node | None:
        if node.op != Op.CAST or node.dtype != DType.F32 or node.src[0].dtype != DType.I32:
            return None
        if INDEX_LOOP_ARG not in free_args(node.src[0]):
            return None  # loop-invariant: hoisted whole, converted once per q tile already
        return _float_form(node.src[0], memo, region)

    return map_nodes(root, rewrite), frozenset(region)


# ---- integer ranges, for the guard

Interval = tuple[float, float]
UNBOUNDED: Interval = (-math.inf, math.inf)


def _products(a: Interval, b: Interval) -> Interval:
    corners = [x * y for x in a for y in b if not (math.isinf(x) and y == 0 or math.isinf(y) and x == 0)]
    return (min(corners), max(corners)) if corners else UNBOUNDED


def _floordiv_interval(n: Node, a: Interval, b: Interval) -> Interval:
    c = n.src[1]
    if c.op == Op.CONST and c.arg > 0 and not any(map(math.isinf, a)):
        return (a[0] // c.arg, a[1] // c.arg)
    return UNBOUNDED


def _mod_interval(n: Node, a: Interval, b: Interval) -> Interval:
    c = n.src[1]
    return (0, c.arg - 1) if c.op == Op.CONST and c.arg > 0 else UNBOUNDED


IntervalRule = Callable[..., Interval]
INTERVAL_RULES: dict[Op, IntervalRule] = {
    Op.CONST: lambda n: (n.arg, n.arg),
    Op.ADD: lambda n, a, b: (a[0] + b[0], a[1] + b[1]),
    Op.SUB: lambda n, a, b: (a[0] - b[1], a[1] - b[0]),
    Op.NEG: lambda n, a: (-a[1], -a[0]),
    Op.MUL: lambda n, a, b: _products(a, b),
    Op.FLOORDIV: _floordiv_interval,
    Op.MOD: _mod_interval,
    Op.MIN: lambda n, a, b: (min(a[0], b[0]), min(a[1], b[1])),
    Op.MAX: lambda n, a, b: (max(a[0], b[0]), max(a[1], b[1])),
    Op.ABS: lambda n, a: (0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1])), max(abs(a[0]), abs(a[1]))),
}


def int_intervals(root: Node, arg_ranges: dict[str, Interval]) -> dict[Node, Interval]:
    """A range for every int/bool node (bools are 0..1; ops without a rule are unbounded)."""
    ranges: dict[Node, Interval] = {}
    for n in toposort(root):
        if n.dtype == DType.BOOL:
            ranges[n] = (0, 1)
        elif n.dtype != DType.I32:
            continue
        elif n.op == Op.ARG:
            ranges[n] = arg_ranges.get(n.arg, UNBOUNDED)
        elif n.op in INTERVAL_RULES and all(s in ranges for s in n.src):
            ranges[n] = INTERVAL_RULES[n.op](n, *(ranges[s] for s in n.src))
        elif n.op == Op.CAST and n.src[0].dtype == DType.BOOL:
            ranges[n] = (0, 1)
        else:
            ranges[n] = UNBOUNDED
    return ranges


@functools.lru_cache(maxsize=256)
def float_index_exact(root: Node, arg_ranges: tuple[tuple[str, int, int], ...]) -> bool:
    """Whether `float_index_form(root)` changes something and computes exactly what `root` does, for the
    ARG ranges given as (name, lo, hi) inclusive (a host-side check; the kernel takes it as a constexpr)."""
    rewritten, region = float_index_form(root)
    if rewritten == root:
        return False
    ranges = int_intervals(root, {name: (lo, hi) for name, lo, hi in arg_ranges})
    return all(max(abs(ranges[n][0]), abs(ranges[n][1])) <= FLOAT_EXACT_LIMIT for n in region)
