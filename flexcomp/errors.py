"""Errors that point at the user's code.

Every error about a mod carries a `SourceLoc` and renders as

    flexcomp.UnsupportedConstructError: `lambda` is not supported in a mod
      File "model.py", line 12, column 16, in my_mask
        return (lambda x: x)(q_idx)
                ^
    Allowed: arithmetic, comparisons, ... (see docs/language.md)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceLoc:
    """A position in the user's file (1-based line and column) and the line's text."""

    file: str
    line: int
    column: int
    text: str = ""
    function: str = ""
    end_column: int | None = None

    def render(self) -> str:
        where = f'  File "{self.file}", line {self.line}, column {self.column}'
        if self.function:
            where += f", in {self.function}"
        if not self.text:
            return where
        stripped = self.text.lstrip()
        indent = len(self.text) - len(stripped)
        width = max(1, (self.end_column or self.column + 1) - self.column)
        caret = " " * (self.column - 1 - indent) + "^" * min(width, max(1, len(stripped)))
        return f"{where}\n    {stripped.rstrip()}\n    {caret}"


class FlexcompError(Exception):
    """Base class of every error flexcomp raises about a user's mod or call."""

    def __init__(self, message: str, loc: SourceLoc | None = None, hint: str | None = None):
        self.message = message
        self.loc = loc
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message]
        if self.loc is not None:
            parts.append(self.loc.render())
        if self.hint:
            parts.append(self.hint)
        return "\n".join(parts)


class FlexcompSyntaxError(FlexcompError):
    """The mod's source does not parse as the flexcomp language."""


class UnsupportedConstructError(FlexcompError):
    """Valid Python, but outside the language (a loop, a lambda, an unknown call...)."""


class UndefinedNameError(FlexcompError):
    """A name that is neither a parameter, a local, nor bound in the closure or globals."""


class FlexcompTypeError(FlexcompError):
    """An ill-typed expression: a float used as an index, a mask that does not return bool..."""


class SignatureError(FlexcompError):
    """A mod with the wrong number of parameters, or a captured value of an unusable kind."""


class ModKindError(SignatureError, TypeError):
    """A Mod of the other kind, or no function at all, where a score_mod or mask_mod is expected.

    Also a TypeError: a wrong argument to `flex_attention` is one, as in torch."""


class BackendError(FlexcompError):
    """A backend that cannot run this call (no Triton, unsupported shape...)."""
