"""Reading a mod's source (a `def`, or a lambda via lambdas.py) and parsing it with the grammar."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from lark import Tree
from lark.exceptions import LarkError, UnexpectedInput
from lark.indenter import DedentError

from ..errors import FlexcompSyntaxError, SourceLoc, UnsupportedConstructError
from ..grammar import mod_parser
from .lambdas import read_lambda
from .locations import Source, SourceUnavailable
from .values import ALLOWED


def read_function(fn: Callable) -> tuple[Source, Tree]:
    """`fn`'s source and its parse tree: a `funcdef` tree, or a `lambda_mod` tree for a lambda.

    Kept per code object: a closure made anew at every step (a document mask over this batch's ids, a
    transformers padding mask) shares its code with the last one, and finding the source (inspect tokenizes the
    file) and parsing it cost milliseconds.  Neither reads the closure's values; the trees are never mutated."""
    code = fn.__code__
    hit = _READ.get(code)
    if hit is None:
        src = read_lambda(fn) if fn.__name__ == "<lambda>" else read_def(fn)
        tree = parse_source(src)
        hit = _READ[code] = (src, tree.children[-1] if src.start == "start" else tree)
        if len(_READ) > READ_CACHE_SIZE:
            del _READ[next(iter(_READ))]  # the oldest
    return hit


READ_CACHE_SIZE = 512
_READ: dict = {}  # code object -> (Source, tree)


# ---------------------------------------------------------------- def

DEF_LINE = re.compile(r"\s*(async\s+)?def\s")


def read_def(fn: Callable) -> Source:
    name = getattr(fn, "__name__", repr(fn))
    try:
        lines, first = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or fn.__code__.co_filename
    except (OSError, TypeError) as e:
        raise SourceUnavailable(f"cannot read the source of {name!r} from {fn.__code__.co_filename!r} ({e})") from None
    start = next((i for i, line in enumerate(lines) if DEF_LINE.match(line)), None)
    if start is None:
        raise UnsupportedConstructError(f"cannot compile {name!r}: a mod must be a `def` or a `lambda`",
                                        SourceLoc(file, first, 1, lines[0].rstrip("\n"), name), ALLOWED)
    lines = [line.rstrip("\r\n") for line in lines[start:]]
    def_indent = len(lines[0]) - len(lines[0].lstrip())
    indent = [min(def_indent, len(line) - len(line.lstrip())) for line in lines]  # dedent, so the def parses
    text = "\n".join(line[cut:] for line, cut in zip(lines, indent)) + "\n"
    return Source(name, file, first + start, indent, lines, text)


# ---------------------------------------------------------------- parsing

SYNTAX_EXAMPLES = {
    "this statement is not part of the flexcomp language (no class, yield, try/except, match or nested decorators)": [
        "def f(x):\n    class A: pass\n",
        "def f(x):\n    yield x\n",
        "def f(x):\n    try:\n        pass\n    except E:\n        pass\n",
        "def f(x):\n    @d\n    def g(): pass\n",
    ],
    "a star-expression is not part of the flexcomp language": ["def f(x):\n    return *x\n", "def f(x):\n    a = *x\n"],
}


def parse_source(src: Source) -> Tree:
    """The lark tree of `src`; a FlexcompSyntaxError with a caret if it does not parse."""
    parser = mod_parser(src.start)
    try:
        return parser.parse(src.text)
    except UnexpectedInput as e:
        raise syntax_error(src, e) from None
    except DedentError as e:
        raise FlexcompSyntaxError(f"inconsistent indentation in {src.fn_name!r}: {e}") from None
    except LarkError as e:
        raise FlexcompSyntaxError(f"cannot parse {src.fn_name!r}: {e}") from None


def syntax_error(src: Source, e: UnexpectedInput) -> FlexcompSyntaxError:
    examples = SYNTAX_EXAMPLES if src.start == "start" else {}  # the examples are defs
    label = e.match_examples(mod_parser(src.start).parse, examples, use_accepts=True) if examples else None
    token = getattr(e, "token", None)
    shown = f"`{token}`" if token is not None and str(token).strip() else "this"
    message = label or f"unexpected {shown}: not part of the flexcomp language"
    column = e.column
    if label and label.startswith("this statement"):  # the keyword lexes as a name: point at the statement
        line = src.text.splitlines()[e.line - 1]
        column = len(line) - len(line.lstrip()) + 1
    return FlexcompSyntaxError(f"{message} (in mod {src.fn_name!r})", src.at(e.line, column), ALLOWED)
