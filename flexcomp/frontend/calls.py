"""The call table: which torch/math/builtin functions and tensor methods a mod may call, and their IR.

Every spelling (`torch.minimum`, `x.minimum`, `min`) maps to one key of BUILTINS, whose rule says how many
arguments it takes and which typed IR it builds.
"""

from __future__ import annotations

import builtins
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SignatureError, SourceLoc
from ..ir import DType, Node, Op, const
from .builders import binary, cast, clamp, is_nan, logical, logical_not, unary, where

UNARY_FLOAT = {"exp": Op.EXP, "exp2": Op.EXP2, "log": Op.LOG, "log2": Op.LOG2, "sqrt": Op.SQRT, "rsqrt": Op.RSQRT,
               "tanh": Op.TANH, "sigmoid": Op.SIGMOID, "sin": Op.SIN, "cos": Op.COS, "tan": Op.TAN, "erf": Op.ERF,
               "log1p": Op.LOG1P, "expm1": Op.EXPM1}  # fmt: skip
# torch's functions with keyword parameters or composed of several ops (flexcomp/frontend/functions.py), by the
# same name everywhere
ACTIVATIONS = {n: n for n in ("relu", "sign", "round", "erfc", "ceil", "trunc", "div", "true_divide", "fmod",
                              "logaddexp", "logaddexp2", "nan_to_num")}  # fmt: skip
# torch's comparison and bitwise functions and methods (torch.eq(a, b), x.ge(y), torch.bitwise_and(a, b))
COMPARISONS = {"eq": "eq", "ne": "ne", "not_equal": "ne", "lt": "lt", "less": "lt", "le": "le", "less_equal": "le",
               "gt": "gt", "greater": "gt", "ge": "ge", "greater_equal": "ge"}  # fmt: skip
BITWISE = {"bitwise_and": "bitwise_and", "bitwise_or": "bitwise_or", "bitwise_xor": "bitwise_xor",
           "bitwise_not": "bitwise_not", "logical_xor": "logical_xor"}  # fmt: skip
# one value's tests and simple compositions (calls.BUILTINS)
ELEMENTWISE = {n: n for n in ("isnan", "isinf", "isfinite", "isposinf", "isneginf", "square", "clamp_min",
                              "clamp_max")}  # fmt: skip

# spelling -> BUILTINS key, per namespace
TORCH_FUNCS = {**{n: n for n in UNARY_FLOAT}, "abs": "abs", "floor": "floor", "where": "where", "minimum": "min2",
               "maximum": "max2", "clamp": "clamp", "clip": "clamp", "neg": "neg", "negative": "neg",
               "logical_and": "logical_and", "logical_or": "logical_or", "logical_not": "logical_not",
               "pow": "pow", "remainder": "mod", "floor_divide": "floordiv", "sum": "sum", "dot": "dot",
               **ACTIVATIONS, "sgn": "sign", "divide": "div", "fix": "trunc", **COMPARISONS, **BITWISE,
               **ELEMENTWISE, "zeros_like": "zeros_like", "ones_like": "ones_like", "full_like": "full_like",
               "tensor": "tensor", "scalar_tensor": "tensor"}  # fmt: skip
FUNCTIONAL_FUNCS = {n: n for n in ("relu", "relu6", "hardtanh", "leaky_relu", "silu", "gelu", "softplus", "sigmoid",
                                   "tanh", "logsigmoid")}  # torch.nn.functional  # fmt: skip
SPECIAL_FUNCS = {**{n: n for n in ("erf", "erfc", "expm1", "exp2", "log1p", "round", "ndtr")},
                 "expit": "sigmoid"}  # torch.special  # fmt: skip
MATH_FUNCS = {"exp": "exp", "log": "log", "log2": "log2", "sqrt": "sqrt", "tanh": "tanh", "sin": "sin", "cos": "cos",
              "floor": "floor", "fabs": "abs", "tan": "tan", "erf": "erf", "erfc": "erfc", "log1p": "log1p",
              "expm1": "expm1", "ceil": "ceil", "trunc": "trunc", "fmod": "fmod", "isnan": "isnan",
              "isinf": "isinf", "isfinite": "isfinite"}  # fmt: skip
PY_BUILTINS = {"abs": "abs", "min": "min", "max": "max", "int": "int", "float": "float", "bool": "bool", "pow": "pow",
               "round": "round", "range": "range", "len": "len"}  # fmt: skip
# compile-time structure, not arithmetic: lowered by CallLowering.call_structural
STRUCTURAL_KEYS = frozenset({"range", "len", "size", "dim", "new_ones", "new_zeros", "new_full", "sum", "dot"})
METHODS = {**{n: n for n in UNARY_FLOAT}, "abs": "abs", "floor": "floor", "neg": "neg", "clamp": "clamp",
           "clip": "clamp", "float": "float", "double": "float", "half": "float", "bfloat16": "float", "int": "int",
           "long": "int", "bool": "bool", "to": "to", "type": "to", "minimum": "min2", "maximum": "max2",
           "pow": "pow", "logical_not": "logical_not", "logical_and": "logical_and", "logical_or": "logical_or",
           "sqrt": "sqrt", "remainder": "mod", "size": "size", "dim": "dim", "new_ones": "new_ones",
           "new_zeros": "new_zeros", "new_full": "new_full", "sum": "sum", "dot": "dot", **ACTIVATIONS,
           "sgn": "sign", "divide": "div", "fix": "trunc", **COMPARISONS, **BITWISE, **ELEMENTWISE,
           "type_as": "type_as", "floor_divide": "floordiv"}  # fmt: skip
# `torch.Tensor.tanh(x)` -> tanh(x): every method but `.to`/`.type`, which take a dtype
TENSOR_METHODS = {name: key for name, key in METHODS.items() if key != "to"}

# Every float dtype computes in f32 and every int dtype in i32 (the kernels' arithmetic).
TORCH_DTYPES = {"float32": DType.F32, "float": DType.F32, "float64": DType.F32, "double": DType.F32,
                "float16": DType.F32, "half": DType.F32, "bfloat16": DType.F32, "int32": DType.I32,
                "int": DType.I32, "int64": DType.I32, "long": DType.I32, "int16": DType.I32, "int8": DType.I32,
                "uint8": DType.I32, "bool": DType.BOOL}  # fmt: skip
CAST_KEYS = {DType.F32: "float", DType.I32: "int", DType.BOOL: "bool"}  # torch.float32(x) -> float(x)


def ir_dtype(dtype: torch.dtype) -> DType:
    """The IR's dtype for a torch dtype (float32 for the rare ones: complex and the like are refused elsewhere)."""
    return TORCH_DTYPES.get(str(dtype).removeprefix("torch."), DType.F32)
MODULE_CONSTANTS = {"torch": {"inf": math.inf, "pi": math.pi, "e": math.e, "nan": math.nan},
                    "math": {"inf": math.inf, "pi": math.pi, "e": math.e, "tau": math.tau, "nan": math.nan}}  # fmt: skip
MODULES = {"torch": torch, "math": math, "torch.nn": torch.nn, "torch.nn.functional": torch.nn.functional,
           "torch.special": torch.special}  # fmt: skip
NAMESPACES = {**MODULES, "torch.Tensor": torch.Tensor}
NAMESPACE_FUNCS = {"torch": TORCH_FUNCS, "math": MATH_FUNCS, "torch.nn": {}, "torch.nn.functional": FUNCTIONAL_FUNCS,
                   "torch.special": SPECIAL_FUNCS, "torch.Tensor": TENSOR_METHODS}  # fmt: skip
SUBMODULES = {("torch", "nn"): "torch.nn", ("torch.nn", "functional"): "torch.nn.functional",
              ("torch", "special"): "torch.special", ("torch", "Tensor"): "torch.Tensor"}  # their dotted names


def known_callable(value: Any) -> str | None:
    """The BUILTINS key of a torch/math/builtin function object (however it was imported), or of an unbound
    tensor method (`torch.Tensor.tanh`)."""
    tables = [(NAMESPACES[name], table) for name, table in NAMESPACE_FUNCS.items()]
    for module, table in (*tables, (builtins, PY_BUILTINS)):
        for name, key in table.items():
            if getattr(module, name, None) is value:
                return key
    return None


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    fewest: int  # arguments
    most: int
    build: Callable[[list[Node], SourceLoc], Node]


def unary_rule(op: Op) -> Rule:
    return Rule(1, 1, lambda xs, loc: unary(op, xs[0], loc))


def binary_rule(op: Op) -> Rule:
    return Rule(2, 2, lambda xs, loc: binary(op, xs[0], xs[1], loc))


def cast_rule(dtype: DType) -> Rule:
    return Rule(1, 1, lambda xs, loc: cast(xs[0], dtype, loc))


def fold_rule(op: Op, most: int) -> Rule:
    return Rule(2, most, lambda xs, loc: functools.reduce(lambda acc, x: binary(op, acc, x, loc), xs[1:], xs[0]))


BUILTINS: dict[str, Rule] = {
    **{name: unary_rule(op) for name, op in UNARY_FLOAT.items()},  # exp(x) -> EXP(float(x))
    "abs": unary_rule(Op.ABS), "floor": unary_rule(Op.FLOOR), "neg": unary_rule(Op.NEG),
    "int": cast_rule(DType.I32), "float": cast_rule(DType.F32), "bool": cast_rule(DType.BOOL),  # int(x) -> CAST
    "where": Rule(3, 3, lambda xs, loc: where(xs[0], xs[1], xs[2], loc)),
    "min": fold_rule(Op.MIN, 99), "max": fold_rule(Op.MAX, 99),  # min(a, b, c) -> MIN(MIN(a, b), c)
    "min2": fold_rule(Op.MIN, 2), "max2": fold_rule(Op.MAX, 2),  # torch.minimum takes exactly two
    "logical_not": Rule(1, 1, lambda xs, loc: logical_not(xs[0], loc)),
    "logical_and": Rule(2, 2, lambda xs, loc: logical(Op.AND, xs[0], xs[1], loc)),
    "logical_or": Rule(2, 2, lambda xs, loc: logical(Op.OR, xs[0], xs[1], loc)),
    "pow": binary_rule(Op.POW), "mod": binary_rule(Op.MOD), "floordiv": binary_rule(Op.FLOORDIV),
    **{name: binary_rule(Op[name.upper()]) for name in ("eq", "ne", "lt", "le", "gt", "ge")},  # torch.eq(a, b) -> a == b
    # bitwise_and(a, b) -> a & b (logical on bools, bitwise on ints, as the operators); bitwise_not(a) -> ~a
    **{f"bitwise_{name}": binary_rule(Op[name.upper()]) for name in ("and", "or", "xor")},
    "bitwise_not": unary_rule(Op.NOT), "logical_xor": Rule(2, 2, lambda xs, loc: logical(Op.XOR, xs[0], xs[1], loc)),
    "isnan": Rule(1, 1, lambda xs, loc: is_nan(xs[0], loc)),
    "isinf": Rule(1, 1, lambda xs, loc: _compare_abs(Op.EQ, xs[0], loc)),  # isinf(x) -> |x| == inf
    "isfinite": Rule(1, 1, lambda xs, loc: _compare_abs(Op.LT, xs[0], loc)),  # isfinite(x) -> |x| < inf (NaN: False)
    "isposinf": Rule(1, 1, lambda xs, loc: binary(Op.EQ, xs[0], const(math.inf, DType.F32, loc), loc)),  # x == inf
    "isneginf": Rule(1, 1, lambda xs, loc: binary(Op.EQ, xs[0], const(-math.inf, DType.F32, loc), loc)),
    "square": Rule(1, 1, lambda xs, loc: binary(Op.MUL, xs[0], xs[0], loc)),  # square(x) -> x * x
    "clamp_min": Rule(2, 2, lambda xs, loc: clamp(xs[0], xs[1], None, loc)),  # clamp_min(x, a) -> clamp(x, min=a)
    "clamp_max": Rule(2, 2, lambda xs, loc: clamp(xs[0], None, xs[1], loc)),
    "type_as": Rule(2, 2, lambda xs, loc: cast(xs[0], xs[1].dtype, loc)),  # a.type_as(b) -> CAST(a) to b's dtype
}  # fmt: skip


def _compare_abs(op: Op, x: Node, loc: SourceLoc) -> Node:
    return binary(op, unary(Op.ABS, cast(x, DType.F32, loc), loc), const(math.inf, DType.F32, loc), loc)


def apply_rule(key: str, spelled: str, args: list[Node], loc: SourceLoc) -> Node:
    """BUILTINS[key] applied to `args` (a call written `spelled`), after checking how many there are."""
    rule = BUILTINS[key]
    if not rule.fewest <= len(args) <= rule.most:
        want = f"{rule.fewest}" if rule.fewest == rule.most else f"at least {rule.fewest}"
        raise SignatureError(f"`{spelled}` takes {want} arguments here, got {len(args)}", loc)
    return rule.build(args, loc)


CLAMP_PARAMS = ("input", "min", "max")


def bind_clamp(args: list, kwargs: dict, loc: SourceLoc) -> dict[str, Any]:
    """clamp's arguments by name, as torch binds them: (input, min=None, max=None)."""
    if len(args) > len(CLAMP_PARAMS) or set(kwargs) - set(CLAMP_PARAMS):
        raise SignatureError(f"clamp takes (input, min=None, max=None), got {len(args)} positional arguments "
                             f"and keywords {sorted(kwargs)}", loc)
    bound = dict(zip(CLAMP_PARAMS, args)) | kwargs
    if "input" not in bound:
        raise SignatureError("clamp needs an input", loc)
    return bound
