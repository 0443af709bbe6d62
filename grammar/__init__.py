"""The flexcomp language's grammar (mods.lark) and its parser."""

from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark
from lark.indenter import Indenter

GRAMMAR_PATH = Path(__file__).with_name("mods.lark")


class ModIndenter(Indenter):
    """Python-style INDENT/DEDENT tokens; newlines inside brackets are ignored."""

    NL_type = "_NEWLINE"
    OPEN_PAREN_types = ("LPAR", "LSQB", "LBRACE")
    CLOSE_PAREN_types = ("RPAR", "RSQB", "RBRACE")
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 8


class LambdaIndenter(ModIndenter):
    """A lambda is cut out of a larger expression: each newline in it is a continuation line, as in brackets."""

    def handle_NL(self, token):  # lark's hook for newline tokens
        yield from ()


@functools.cache
def mod_parser(start: str = "start") -> Lark:
    """The LALR parser for a mod's source: a `def` ("start") or a lambda ("lambda_mod"); built once each."""
    return Lark(
        GRAMMAR_PATH.read_text(),
        parser="lalr",
        lexer="contextual",
        start=start,
        postlex=LambdaIndenter() if start == "lambda_mod" else ModIndenter(),
        propagate_positions=True,
        maybe_placeholders=True,
    )
