"""torch's activation and rounding functions with their keyword parameters, as small compositions of IR ops.

`F.gelu(x, approximate="tanh")`, `F.softplus(x, beta=2.0)`, `torch.round(x, decimals=1)`: each function here has
torch's signature (parameter names, order and defaults) and builds its value from the IR's ops, so the
derivative, the interval rule and every backend come with those ops.  Parameters other than the input are
compile-time constants, as torch requires them to be Python numbers.  Each rule's comment is its formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SignatureError, SourceLoc, UnsupportedConstructError
from ..ir import DType, Node, Op, const
from .builders import binary, cast, unary, where
from .values import Text

Options = dict[str, Any]


@dataclass(frozen=True)
class Function:
    params: tuple[tuple[str, Any], ...]  # after the input: (name, default), in torch's order
    build: Callable[[Node, Options, SourceLoc], Node]


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


NO_INPLACE = (("inplace", False),)

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
}
CHOICES = {"approximate": ("none", "tanh"), "inplace": (False,)}


def call_function(key: str, x: Node, args: list[Any], kwargs: dict[str, Any], loc: SourceLoc) -> Node:
    """`key(x, *args, **kwargs)`: the other arguments bound to torch's parameters, each a constant."""
    function = FUNCTIONS[key]
    names = [name for name, _ in function.params]
    if len(args) > len(names) or set(kwargs) - set(names) or set(names[: len(args)]) & set(kwargs):
        wanted = ", ".join(["input"] + [f"{n}={d!r}" for n, d in function.params])
        raise SignatureError(
            f"`{key}` takes ({wanted}); got {1 + len(args)} positional arguments and keywords {sorted(kwargs)}", loc
        )
    options = dict(function.params) | dict(zip(names, args)) | kwargs
    options = {name: _constant(key, name, value, loc) for name, value in options.items()}
    return function.build(x, options, loc)


def _constant(key: str, name: str, value: Any, loc: SourceLoc) -> Any:
    """A parameter's Python value: a constant node's, or a string literal's; checked against its choices."""
    if isinstance(value, Node):
        if value.op != Op.CONST:
            raise SignatureError(f"`{name}` of `{key}` must be a constant (torch takes a Python number here)", loc)
        value = value.arg
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
