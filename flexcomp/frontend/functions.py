"""torch's functions that take keyword parameters or are compositions: activations, rounding, division with a
rounding mode, log-add-exp, NaN handling and constant constructors, as small compositions of IR ops.

`F.gelu(x, approximate="tanh")`, `F.softplus(x, beta=2.0)`, `torch.round(x, decimals=1)`,
`torch.div(a, b, rounding_mode="trunc")`: each function here has torch's signature (its inputs, then parameter
names, order and defaults) and builds its value from the IR's ops, so the derivative, the interval rule and every
backend come with those ops.  Parameters other than the inputs are compile-time constants, as torch requires them
to be Python numbers.  Each rule's comment is its formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SignatureError, SourceLoc, UnsupportedConstructError
from ..ir import DType, Node, Op, const
from .builders import binary, cast, constant, is_nan, logical, number, unary, where
from .calls import ir_dtype
from .values import NONE, Text, TorchDType

Options = dict[str, Any]
REQUIRED = object()  # a parameter without a default
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: nan_to_num's default bounds


@dataclass(frozen=True)
class Function:
    params: tuple[tuple[str, Any], ...]  # after the inputs: (name, default), in torch's order
    build: Callable[..., Node]  # (*inputs, options, loc) -> Node
    inputs: tuple[str, ...] = ("input",)  # the node arguments, first, by torch's names


def _num(value: float, loc: SourceLoc) -> Node:
    return const(float(value), DType.F32, loc)


def _relu(x: Node, o: Options, loc: SourceLoc) -> Node:
    # relu(x) = where(x <= 0, 0, x): NaN stays NaN, and x = 0 takes the 0 branch (torch's gradient there is 0)
    x = cast(x, DType.I32, loc) if x.dtype == DType.BOOL else x
    return where(binary(Op.LE, x, const(0, x.dtype, loc), loc), const(0, x.dtype, loc), x, loc)


def _hardtanh(x: Node, o: Options, loc: SourceLoc) -> Node:
    # hardtanh(x) = where(x <= lo, lo, where(x >= hi, hi, x)): at either bound the gradient is 0, as torch's
    x = cast(x, DType.F32, loc)
    lo, hi = _num(o["min_val"], loc), _num(o["max_val"], loc)
    return where(binary(Op.LE, x, lo, loc), lo, where(binary(Op.GE, x, hi, loc), hi, x, loc), loc)


def _leaky_relu(x: Node, o: Options, loc: SourceLoc) -> Node:
    # leaky_relu(x) = where(x > 0, x, x * slope)
    x = cast(x, DType.F32, loc)
    return where(binary(Op.GT, x, _num(0, loc), loc), x, binary(Op.MUL, x, _num(o["negative_slope"], loc), loc), loc)


def _silu(x: Node, o: Options, loc: SourceLoc) -> Node:
    # silu(x) = x * sigmoid(x)
    x = cast(x, DType.F32, loc)
    return binary(Op.MUL, x, unary(Op.SIGMOID, x, loc), loc)


def _normal_cdf(x: Node, loc: SourceLoc) -> Node:
    # Phi(x) = 0.5 * (1 + erf(x / sqrt 2))
    erf = unary(Op.ERF, binary(Op.MUL, x, _num(math.sqrt(0.5), loc), loc), loc)
    return binary(Op.MUL, _num(0.5, loc), binary(Op.ADD, _num(1, loc), erf, loc), loc)


def _gelu(x: Node, o: Options, loc: SourceLoc) -> Node:
    # 'none': x * Phi(x);  'tanh': 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    x = cast(x, DType.F32, loc)
    if o["approximate"] == "none":
        return binary(Op.MUL, x, _normal_cdf(x, loc), loc)
    cube = binary(Op.MUL, binary(Op.MUL, x, x, loc), x, loc)
    inner = binary(Op.ADD, x, binary(Op.MUL, _num(0.044715, loc), cube, loc), loc)
    tanh = unary(Op.TANH, binary(Op.MUL, _num(math.sqrt(2 / math.pi), loc), inner, loc), loc)
    half_x = binary(Op.MUL, _num(0.5, loc), x, loc)
    return binary(Op.MUL, half_x, binary(Op.ADD, _num(1, loc), tanh, loc), loc)


def _softplus(x: Node, o: Options, loc: SourceLoc) -> Node:
    # softplus(x) = where(beta x > threshold, x, log1p(exp(beta x)) / beta); the exp reads 0 where the linear
    # branch is taken, so neither value nor gradient overflows there
    x = cast(x, DType.F32, loc)
    beta = _num(o["beta"], loc)
    scaled = binary(Op.MUL, x, beta, loc)
    linear = binary(Op.GT, scaled, _num(o["threshold"], loc), loc)
    safe = where(linear, _num(0, loc), scaled, loc)
    smooth = binary(Op.DIV, unary(Op.LOG1P, unary(Op.EXP, safe, loc), loc), beta, loc)
    return where(linear, x, smooth, loc)


def _sign(x: Node, o: Options, loc: SourceLoc) -> Node:
    # sign(x) = (x > 0) - (x < 0), in x's dtype (NaN -> 0, as torch); a bool is its own sign
    if x.dtype == DType.BOOL:
        return x
    zero = const(0, x.dtype, loc)
    positive, negative = (cast(binary(op, x, zero, loc), x.dtype, loc) for op in (Op.GT, Op.LT))
    return binary(Op.SUB, positive, negative, loc)


def _round(x: Node, o: Options, loc: SourceLoc) -> Node:
    # round(x, d) = round(x * 10^d) / 10^d (d < 0: round(x / 10^-d) * 10^-d), halves to even, as torch
    decimals = o["decimals"]
    if not isinstance(decimals, int) or isinstance(decimals, bool):
        raise SignatureError(f"round's decimals must be an int constant, got {decimals!r}", loc)
    if decimals == 0:
        return unary(Op.ROUND, x, loc)
    x = cast(x, DType.F32, loc)
    scale = _num(10.0 ** abs(decimals), loc)
    into, back = (Op.MUL, Op.DIV) if decimals > 0 else (Op.DIV, Op.MUL)
    return binary(back, unary(Op.ROUND, binary(into, x, scale, loc), loc), scale, loc)


def _erfc(x: Node, o: Options, loc: SourceLoc) -> Node:
    # erfc(x) = 1 - erf(x)  (absolute error ~1e-7: fine for scores, not for log(erfc(x)) at large x)
    return binary(Op.SUB, _num(1, loc), unary(Op.ERF, cast(x, DType.F32, loc), loc), loc)


def _ceil(x: Node, o: Options, loc: SourceLoc) -> Node:
    # ceil(x) = -floor(-x); an int is its own ceiling
    return unary(Op.NEG, unary(Op.FLOOR, unary(Op.NEG, x, loc), loc), loc)


def _trunc(x: Node, o: Options, loc: SourceLoc) -> Node:
    # trunc(x) = where(x >= 0, floor(x), ceil(x)): toward zero; an int is its own
    if x.dtype != DType.F32:
        return cast(x, DType.I32, loc) if x.dtype == DType.BOOL else x
    return where(binary(Op.GE, x, _num(0, loc), loc), unary(Op.FLOOR, x, loc), _ceil(x, o, loc), loc)


def _signs_differ(a: Node, b: Node, loc: SourceLoc) -> Node:
    # (a < 0) != (b < 0)
    zero = const(0, DType.I32, loc)
    return binary(Op.NE, binary(Op.LT, a, zero, loc), binary(Op.LT, b, zero, loc), loc)


def _div(a: Node, b: Node, o: Options, loc: SourceLoc) -> Node:
    # rounding_mode None: a / b (float);  "floor": a // b;  "trunc": ints a // b + 1 where a % b != 0 and the signs
    # differ (rounded toward zero), floats trunc(a / b)
    mode = o["rounding_mode"]
    if mode is None:
        return binary(Op.DIV, a, b, loc)
    if mode == "floor":
        return binary(Op.FLOORDIV, a, b, loc)
    if DType.F32 in (a.dtype, b.dtype):
        return _trunc(binary(Op.DIV, a, b, loc), o, loc)
    floor = binary(Op.FLOORDIV, a, b, loc)
    inexact = binary(Op.NE, binary(Op.MOD, a, b, loc), const(0, floor.dtype, loc), loc)
    up = logical(Op.AND, inexact, _signs_differ(a, b, loc), loc)
    return where(up, binary(Op.ADD, floor, const(1, floor.dtype, loc), loc), floor, loc)


def _fmod(a: Node, b: Node, o: Options, loc: SourceLoc) -> Node:
    # fmod(a, b) = r - b where r = a % b is nonzero and the signs of a and b differ, else r: C's remainder takes the
    # dividend's sign, Python's (Op.MOD) the divisor's
    r = binary(Op.MOD, a, b, loc)
    inexact = binary(Op.NE, r, const(0, r.dtype, loc), loc)
    return where(logical(Op.AND, inexact, _signs_differ(a, b, loc), loc), binary(Op.SUB, r, cast(b, r.dtype, loc),
                                                                                  loc), r, loc)


def _logaddexp(a: Node, b: Node, o: Options, loc: SourceLoc, base2: bool = False) -> Node:
    # logaddexp(a, b) = m + log1p(exp(-|a - b|)), m = max(a, b); m itself where it is infinite (a = b = -inf
    # would give NaN);  base 2: m + log2(1 + exp2(-|a - b|))
    a, b = cast(a, DType.F32, loc), cast(b, DType.F32, loc)
    m = binary(Op.MAX, a, b, loc)
    infinite = binary(Op.EQ, unary(Op.ABS, m, loc), _num(math.inf, loc), loc)
    gap = unary(Op.NEG, unary(Op.ABS, binary(Op.SUB, a, b, loc), loc), loc)
    gap = where(infinite, _num(0, loc), gap, loc)  # keeps the untaken branch (and its gradient) finite
    if base2:
        tail = unary(Op.LOG2, binary(Op.ADD, _num(1, loc), unary(Op.EXP2, gap, loc), loc), loc)
    else:
        tail = unary(Op.LOG1P, unary(Op.EXP, gap, loc), loc)
    return where(infinite, m, binary(Op.ADD, m, tail, loc), loc)


def _logsigmoid(x: Node, o: Options, loc: SourceLoc) -> Node:
    # logsigmoid(x) = min(x, 0) - log1p(exp(-|x|))
    x = cast(x, DType.F32, loc)
    tail = unary(Op.LOG1P, unary(Op.EXP, unary(Op.NEG, unary(Op.ABS, x, loc), loc), loc), loc)
    return binary(Op.SUB, binary(Op.MIN, x, _num(0, loc), loc), tail, loc)


def _nan_to_num(x: Node, o: Options, loc: SourceLoc) -> Node:
    # nan_to_num(x) = where(x != x, nan, where(x == inf, posinf, where(x == -inf, neginf, x))); the bounds default
    # to float32's largest finite values (a mod computes in float32); ints pass through
    if x.dtype != DType.F32:
        return x
    posinf = FLOAT32_MAX if o["posinf"] is None else o["posinf"]
    neginf = -FLOAT32_MAX if o["neginf"] is None else o["neginf"]
    out = where(binary(Op.EQ, x, _num(-math.inf, loc), loc), _num(neginf, loc), x, loc)
    out = where(binary(Op.EQ, x, _num(math.inf, loc), loc), _num(posinf, loc), out, loc)
    return where(is_nan(x, loc), _num(o["nan"], loc), out, loc)


def _dtype_of(value: Any, default: DType) -> DType:
    """A dtype= argument (a torch dtype as the parser or the tracer holds it) as the IR's dtype."""
    if value is None:
        return default
    return value.dtype if isinstance(value, TorchDType) else ir_dtype(value)


def _filled(fill: Any, x: Node, o: Options, loc: SourceLoc) -> Node:
    # zeros_like / ones_like / full_like(x, v) -> the constant v in x's dtype (or dtype=): a mod computes one value
    value = number(o["fill_value"] if fill is None else fill, loc)
    if value is None:
        raise SignatureError(f"fill_value must be a number known when the mod is compiled, got {o['fill_value']!r}",
                             loc)  # fmt: skip
    return cast(value, _dtype_of(o["dtype"], x.dtype), loc)


def _tensor(x: Node, o: Options, loc: SourceLoc) -> Node:
    # torch.tensor(c) -> the constant c (a Python number, or a captured one): float32, int32 or bool, or dtype=
    if x.op != Op.CONST:
        raise SignatureError("torch.tensor(...) in a mod takes a number known when the mod is compiled", loc,
                             "write the value itself: `score + 0.5`, or index a captured tensor")
    return cast(x, _dtype_of(o["dtype"], x.dtype), loc)


NO_INPLACE = (("inplace", False),)
CONSTRUCTOR = (("dtype", None), ("device", None), ("requires_grad", False))  # *_like and torch.tensor keywords

# BUILTINS-style key -> torch's signature after the input, and the composition
FUNCTIONS: dict[str, Function] = {
    "relu": Function(NO_INPLACE, _relu),
    "relu6": Function(NO_INPLACE, lambda x, o, loc: _hardtanh(x, {"min_val": 0.0, "max_val": 6.0}, loc)),
    "hardtanh": Function((("min_val", -1.0), ("max_val", 1.0), *NO_INPLACE), _hardtanh),
    "leaky_relu": Function((("negative_slope", 0.01), *NO_INPLACE), _leaky_relu),
    "silu": Function(NO_INPLACE, _silu),
    "gelu": Function((("approximate", "none"),), _gelu),
    "softplus": Function((("beta", 1.0), ("threshold", 20.0)), _softplus),
    "sign": Function((), _sign),
    "round": Function((("decimals", 0),), _round),
    "erfc": Function((), _erfc),
    "ndtr": Function((), lambda x, o, loc: _normal_cdf(cast(x, DType.F32, loc), loc)),
    "ceil": Function((), _ceil),
    "trunc": Function((), _trunc),
    "div": Function((("rounding_mode", None),), _div, ("input", "other")),
    "true_divide": Function((), lambda a, b, o, loc: binary(Op.DIV, a, b, loc), ("input", "other")),
    "fmod": Function((), _fmod, ("input", "other")),
    "logaddexp": Function((), _logaddexp, ("input", "other")),
    "logaddexp2": Function((), lambda a, b, o, loc: _logaddexp(a, b, o, loc, base2=True), ("input", "other")),
    "logsigmoid": Function((), _logsigmoid),
    "nan_to_num": Function((("nan", 0.0), ("posinf", None), ("neginf", None)), _nan_to_num),
    "zeros_like": Function(CONSTRUCTOR, lambda x, o, loc: _filled(0, x, o, loc)),
    "ones_like": Function(CONSTRUCTOR, lambda x, o, loc: _filled(1, x, o, loc)),
    "full_like": Function((("fill_value", REQUIRED), *CONSTRUCTOR), lambda x, o, loc: _filled(None, x, o, loc)),
    "tensor": Function(CONSTRUCTOR, _tensor, ("data",)),
}
CHOICES = {"approximate": ("none", "tanh"), "inplace": (False,), "rounding_mode": (None, "trunc", "floor"),
           "requires_grad": (False,)}  # fmt: skip
PASSED_AS_IS = frozenset({"dtype", "device"})  # a torch dtype and a device (ignored) are not numbers


def call_function(key: str, inputs: list[Node], args: list[Any], kwargs: dict[str, Any], loc: SourceLoc) -> Node:
    """`key(*inputs, *args, **kwargs)`: the arguments after the inputs bound to torch's parameters, each a
    constant."""
    function = FUNCTIONS[key]
    names = [name for name, _ in function.params]
    given = {**dict(zip(names, args)), **kwargs}
    missing = [n for n, d in function.params if d is REQUIRED and n not in given]
    if len(args) > len(names) or set(kwargs) - set(names) or set(names[: len(args)]) & set(kwargs) or missing:
        wanted = ", ".join([*function.inputs] + [n if d is REQUIRED else f"{n}={d!r}" for n, d in function.params])
        raise SignatureError(f"`{key}` takes ({wanted}); got {len(inputs) + len(args)} positional arguments and "
                             f"keywords {sorted(kwargs)}", loc)  # fmt: skip
    options = dict(function.params) | given
    options = {name: value if name in PASSED_AS_IS else _constant(key, name, value, loc)
               for name, value in options.items()}  # fmt: skip
    return function.build(*inputs, options, loc)


def split_inputs(key: str, args: list[Any], kwargs: dict[str, Any], loc: SourceLoc) -> tuple[list, list, dict]:
    """(the function's node arguments, the positional ones after them, the keywords left) of a call to `key`:
    inputs come first, positionally or by torch's names (`input=`, `other=`)."""
    names = FUNCTIONS[key].inputs
    kwargs = dict(kwargs)
    inputs = list(args[: len(names)]) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
    if len(inputs) < len(names):
        raise SignatureError(f"`{key}` needs {' and '.join(names)}", loc)
    return inputs, list(args[len(names):]), kwargs


def _constant(key: str, name: str, value: Any, loc: SourceLoc) -> Any:
    """A parameter's Python value: a constant node's, or a string literal's; checked against its choices."""
    if value is None or value is REQUIRED or value is NONE:  # NONE: `None` as written in a parsed mod
        return None if value is NONE else value
    if isinstance(value, Node):
        folded = constant(value)  # -float("inf"), N - 1: computed from constants
        if folded is None:
            raise SignatureError(f"`{name}` of `{key}` must be a constant (torch takes a Python number here)", loc)
        value = folded.arg
    elif isinstance(value, Text):
        value = value.value
    if name in CHOICES and value not in CHOICES[name]:
        hint = "a mod computes a new value: drop inplace=True" if name == "inplace" else None
        raise UnsupportedConstructError(
            f"`{key}` with {name}={value!r} is not supported (supported: {', '.join(map(repr, CHOICES[name]))})",
            loc,
            hint,
        )
    return value
