"""Where the parsed text of a mod lies in the user's file: parser positions -> `SourceLoc`s."""

from __future__ import annotations

from dataclasses import dataclass

from lark import Token, Tree

from ..errors import SignatureError, SourceLoc


class SourceUnavailable(SignatureError):
    """`inspect` cannot read a function's source (a plain REPL, `python -c`, `exec`): the mod is traced instead."""


@dataclass
class Source:
    """A function's source as parsed, and how to map parser positions back to the file."""

    fn_name: str
    file: str
    first_line: int  # file line of the parsed text's line 1
    indent: list[int]  # characters removed from the start of each parsed line
    lines: list[str]  # the file's lines, unchanged
    text: str = ""
    start: str = "start"  # the grammar rule the text parses as: "start" (a def) or "lambda_mod"

    def loc(self, item: Tree | Token | None, fallback: SourceLoc | None = None) -> SourceLoc | None:
        if isinstance(item, Tree):
            if item.meta.empty:
                return fallback
            line, col, end_line, end_col = item.meta.line, item.meta.column, item.meta.end_line, item.meta.end_column
        elif isinstance(item, Token) and item.line is not None:
            line, col, end_line, end_col = item.line, item.column, item.end_line, item.end_column
        else:
            return fallback
        return self.at(line, col, end_col if end_line == line else None)

    def at(self, line: int, column: int, end_column: int | None = None) -> SourceLoc:
        shift = self.indent[line - 1] if 0 < line <= len(self.indent) else 0
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        end = end_column + shift if end_column is not None else None
        return SourceLoc(self.file, self.first_line + line - 1, column + shift, text, self.fn_name, end)
