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


@functools.cache
def mod_parser() -> Lark:
    """The LALR parser for a mod's source (built once, on first use)."""
    return Lark(
        GRAMMAR_PATH.read_text(),
        parser="lalr",
        lexer="contextual",
        postlex=ModIndenter(),
        propagate_positions=True,
        maybe_placeholders=True,
    )
