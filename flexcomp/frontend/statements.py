"""Lowering a function body: statements run in order on an environment of locals; `if`s become selects."""

from __future__ import annotations

from lark import Tree

from ..errors import FlexcompTypeError, UnsupportedConstructError
from ..ir import Node, Op
from .builders import BINOPS, where
from .expressions import UNSUPPORTED_RULES, ExpressionLowering
from .values import RangeValue, Value, describe

# lark rule -> FunctionLowering method
SIMPLE_STATEMENTS = {"assign": "assign", "augassign": "augassign", "annassign": "annassign",
                     "expr_stmt": "expression_statement"}
Branches = tuple[list[tuple[Tree, Tree]], Tree | None]  # [(test, body) of if/elifs], else body


class FunctionLowering(ExpressionLowering):
    """Lowers one function's lark tree (a `funcdef` or a `lambda_mod`) to IR."""

    def params(self) -> list[str]:
        if self.tree.data == "lambda_mod":
            names = self.tree.children[1]
            return [str(n) for n in names.children] if names is not None else []
        is_async, _name, params, _returns, _body = self.tree.children
        if is_async is not None:
            self.refuse("async functions", self.tree)
        names = []
        for p in params.children if params is not None else []:
            if p.data == "param_star":
                self.refuse("`*args`" if p.children[1] is not None else "keyword-only parameters", p)
            if p.data in UNSUPPORTED_RULES:
                self.refuse(UNSUPPORTED_RULES[p.data], p)
            if p.data == "param":
                names.append(str(p.children[0]))
        return names

    def lower_body(self, env: dict[str, Value]) -> Node:
        if self.tree.data == "lambda_mod":
            return self.returned(self.tree.children[-1], self.tree.children[-1], env)
        result = self.block(statements(self.tree.children[-1]), env)
        if result is None:
            raise FlexcompTypeError(f"{self.src.fn_name!r} does not return a value on every path", self.def_loc,
                                    "every branch of an if/elif/else must end in `return`, or the function must "
                                    "end with one")
        return result

    def returned(self, value: Tree, stmt: Tree, env: dict[str, Value]) -> Value:
        if self.check_return is None:  # a helper may return a tuple (`return idx // W, idx % W`)
            return self.expr(value, env)
        return self.check_return(self.node(value, env), self.src.loc(stmt))

    def block(self, stmts: list[Tree], env: dict[str, Value]) -> Node | None:
        """The value returned by `stmts` (None if control falls off the end)."""
        for i, stmt in enumerate(stmts):
            kind = stmt.data
            if kind == "return_stmt":
                if stmt.children[0] is None:
                    self.refuse("a bare `return` (a mod must return a value)", stmt)
                return self.returned(stmt.children[0], stmt, env)
            if kind == "if_stmt":
                if any(s.data == "return_stmt" for s in stmt.iter_subtrees()):
                    return self.if_returning(if_branches(stmt), stmts[i + 1:], env)
                self.if_assigning(if_branches(stmt), env)
            elif kind == "for_stmt":
                self.unrolled_loop(stmt, env)
            elif kind in SIMPLE_STATEMENTS:
                getattr(self, SIMPLE_STATEMENTS[kind])(stmt, env)
            elif kind != "pass_stmt":
                self.refuse(UNSUPPORTED_RULES.get(kind, f"`{kind}`"), stmt)
        return None

    def if_returning(self, parts: Branches, rest: list[Tree], env: dict[str, Value]) -> Node | None:
        # Each branch continues with the statements after the if: a select of the paths' results.
        branches, orelse = parts
        if not branches:
            return self.block((statements(orelse) if orelse is not None else []) + rest, dict(env))
        (test, body), later = branches[0], branches[1:]
        cond = self.condition(test, env)
        if cond.op == Op.CONST:  # `if bias is None:` is known at compile time: the other path is never lowered
            if cond.arg:
                return self.block(statements(body) + rest, dict(env))
            return self.if_returning((later, orelse), rest, env)
        if_true = self.block(statements(body) + rest, dict(env))
        if_false = self.if_returning((later, orelse), rest, env)
        if if_true is None or if_false is None:
            return None
        return self.select(cond, if_true, if_false, test)

    def if_assigning(self, parts: Branches, env: dict[str, Value]) -> None:
        # No branch returns: run each on a copy of the locals, then select every local that differs.
        branches, orelse = parts
        if not branches:
            if orelse is not None:
                self.block(statements(orelse), env)
            return
        (test, body), later = branches[0], branches[1:]
        cond = self.condition(test, env)
        if cond.op == Op.CONST:
            if cond.arg:
                self.block(statements(body), env)
            else:
                self.if_assigning((later, orelse), env)
            return
        env_true, env_false = dict(env), dict(env)
        self.block(statements(body), env_true)
        self.if_assigning((later, orelse), env_false)
        for name in set(env_true) | set(env_false):
            a, b = env_true.get(name), env_false.get(name)
            if a is None or b is None:
                env.pop(name, None)  # bound on one path only: using it later is an error
            else:
                env[name] = self.select(cond, a, b, test)

    def select(self, cond: Node, a: Value, b: Value, test: Tree) -> Value:
        """`a if cond else b` for values: nodes become a WHERE, tuples are selected item by item."""
        if a is b or a == b:
            return a
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            return tuple(self.select(cond, x, y, test) for x, y in zip(a, b))
        return where(cond, self.as_node(a, test), self.as_node(b, test), self.src.loc(test))

    # ------------------------------------------------ loops

    def unrolled_loop(self, stmt: Tree, env: dict[str, Value]) -> None:
        """`for i in range(4):` / `for m in captured_tuple:` runs the body once per item, at compile time."""
        _for, target, iterable, body, orelse = stmt.children
        if orelse is not None:
            self.refuse("`for ... else`", stmt)
        for s in body.iter_subtrees():
            if s.data in ("return_stmt", "loop_control"):
                self.refuse("`return`/`break`/`continue` inside an unrolled `for` loop", s)
        names = [str(n) for n in target.children]
        for item in self.loop_items(iterable, env):
            if len(names) == 1:
                env[names[0]] = item
            else:
                self.bind(Tree("tuple", [Tree("name", [n]) for n in target.children]), item, env)
            self.block(statements(body), env)

    def loop_items(self, iterable: Tree, env: dict[str, Value]) -> tuple:
        value = self.expr_or_tuple(iterable, env)
        if isinstance(value, tuple):
            return value
        if isinstance(value, RangeValue):
            return value.items
        raise UnsupportedConstructError(f"a `for` loop over {describe(value)}: the number of iterations must be "
                                        "known when the mod is compiled", self.src.loc(iterable),
                                        "loop over range(constant) or a captured tuple/list, or write the bound as "
                                        "a mask (e.g. `torch.where(i < n, term, 0)` inside `for i in range(MAX)`)")

    # ------------------------------------------------ simple statements

    def assign(self, stmt: Tree, env: dict[str, Value]) -> None:
        *targets, value_tree = stmt.children
        value = self.expr_or_tuple(value_tree, env)
        for target in targets:
            self.bind(target, value, env)

    def annassign(self, stmt: Tree, env: dict[str, Value]) -> None:
        target, _annotation, value = stmt.children
        if value is not None:
            self.bind(target, self.expr(value, env), env)

    def augassign(self, stmt: Tree, env: dict[str, Value]) -> None:
        target, op, value = stmt.children
        if target.data != "name":
            self.refuse("augmented assignment to anything but a local name", target)
        symbol = str(op)[:-1]  # "+=" -> "+"
        if symbol not in BINOPS:
            self.refuse(f"`{op}`", op)
        env[str(target.children[0])] = self.arith(symbol, self.node(target, env), self.node(value, env), op)

    def expression_statement(self, stmt: Tree, env: dict[str, Value]) -> None:
        if stmt.children[0].data != "string":  # docstrings and bare strings are comments
            self.expr(stmt.children[0], env)  # an unsupported call is the better message
            self.refuse("an expression statement (its value would be discarded)", stmt)

    def expr_or_tuple(self, tree: Tree, env: dict[str, Value]) -> Value:
        if tree.data == "tuple":
            return tuple(self.expr(c, env) for c in tree.children if c is not None)
        return self.expr(tree, env)

    def bind(self, target: Tree, value: Value, env: dict[str, Value]) -> None:
        if target.data == "name":
            env[str(target.children[0])] = value
        elif target.data == "tuple" and isinstance(value, tuple):
            names = [c for c in target.children if c is not None]
            if len(names) != len(value):
                raise FlexcompTypeError(f"cannot unpack {len(value)} values into {len(names)} names",
                                        self.src.loc(target))
            for t, v in zip(names, value):
                self.bind(t, v, env)
        else:
            self.refuse("assignment to anything but a local name", target)


def statements(suite: Tree) -> list[Tree]:
    """A suite's statements, with `a; b` on one line split apart."""
    simple = [suite] if suite.data == "simple_stmt" else suite.children
    out = []
    for stmt in simple:
        if stmt.data == "simple_stmt":
            out.extend(c for c in stmt.children if c is not None)
        else:
            out.append(stmt)
    return out


def if_branches(stmt: Tree) -> Branches:
    test, body, *rest = stmt.children
    branches = [(test, body)] + [tuple(c.children) for c in rest if c is not None and c.data == "elif_clause"]
    orelse = next((c.children[0] for c in rest if c is not None and c.data == "else_clause"), None)
    return branches, orelse
