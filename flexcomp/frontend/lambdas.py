"""Reading a lambda's source: the lambda cut out of the statement around it.

A lambda's source is part of a larger statement, possibly with other lambdas on the same line. The code
object's instruction positions (Python 3.11+) give the exact span of its body; the `lambda` keyword is the
last one before the body. The text from the keyword to the body's end parses as the grammar's `lambda_mod`.
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize
from collections.abc import Callable

from ..errors import SignatureError, SourceLoc
from .locations import Source, SourceUnavailable
from .signature import refuse_signature

LAMBDA_KEYWORD = re.compile(r"\blambda\b")
Position = tuple[int, int]  # (0-based line in the file, 0-based character column)


def read_lambda(fn: Callable) -> Source:
    code = fn.__code__
    try:
        file_lines, _ = inspect.findsource(fn)
        file = inspect.getsourcefile(fn) or code.co_filename
    except (OSError, TypeError) as e:
        raise SourceUnavailable(f"cannot read the source of the lambda from {code.co_filename!r} ({e}): a lambda "
                                "typed at a plain REPL or built by exec() has no source file to parse") from None
    lines = [line.rstrip("\r\n") for line in file_lines]
    (line, col), end = lambda_span(fn, lines)
    refuse_signature(fn, SourceLoc(file, line + 1, col + 1, lines[line], "<lambda>"))
    chunk = lines[line:end[0] + 1]
    chunk[-1] = chunk[-1][:end[1]]
    chunk[0] = chunk[0][col:]
    indent = [col] + [0] * (len(chunk) - 1)
    return Source("<lambda>", file, line + 1, indent, lines[line:end[0] + 1], "\n".join(chunk), "lambda_mod")


def lambda_span(fn: Callable, lines: list[str]) -> tuple[Position, Position]:
    """Where `fn`'s `lambda` keyword starts and where its body ends."""
    body = body_span_from_positions(fn.__code__, lines)
    if body is None:
        return lambda_span_by_arity(fn, lines)
    keyword = last_keyword_before(lines, fn.__code__.co_firstlineno - 1, body[0])
    if keyword is None:
        raise SignatureError(f"cannot find the `lambda` keyword of the lambda at line {body[0][0] + 1} of "
                             f"{fn.__code__.co_filename!r}")
    return keyword, body[1]


def body_span_from_positions(code, lines: list[str]) -> tuple[Position, Position] | None:
    """The span of the lambda's body from its instructions' positions; None before Python 3.11."""
    if not hasattr(code, "co_positions"):
        return None
    spans = [(line - 1, col, end_line - 1, end_col) for line, end_line, col, end_col in code.co_positions()
             if None not in (line, end_line, col, end_col) and (line, col) != (end_line, end_col)]  # not RESUME
    if not spans:
        return None
    start = min((line, col) for line, col, _, _ in spans)
    end = max((end_line, end_col) for _, _, end_line, end_col in spans)
    return char_position(lines, start), char_position(lines, end)


def char_position(lines: list[str], position: Position) -> Position:
    """Instruction positions count UTF-8 bytes; the parser counts characters."""
    line, byte_col = position
    return line, len(lines[line].encode()[:byte_col].decode(errors="ignore"))


def last_keyword_before(lines: list[str], first_line: int, body: Position) -> Position | None:
    found = None
    for line in range(first_line, body[0] + 1):
        text = lines[line][:body[1]] if line == body[0] else lines[line]
        for match in LAMBDA_KEYWORD.finditer(text):
            found = (line, match.start())
    return found


def lambda_span_by_arity(fn: Callable, lines: list[str]) -> tuple[Position, Position]:
    """Without instruction positions: the only lambda on its first line whose parameters are `fn`'s."""
    code = fn.__code__
    line = code.co_firstlineno - 1
    params = list(code.co_varnames[:code.co_argcount])
    candidates = [m for m in re.finditer(r"\blambda\b([^:]*):", lines[line])
                  if [p.strip() for p in m.group(1).split(",") if p.strip()] == params]
    if len(candidates) != 1:
        raise SignatureError(f"cannot tell which lambda on line {line + 1} of {code.co_filename!r} is the mod "
                             f"({len(candidates)} lambdas take ({', '.join(params)})); on Python < 3.11, put it on "
                             "its own line or write it as a `def`")
    start = (line, candidates[0].start())
    return start, expression_end(lines, (line, candidates[0].end()))


def expression_end(lines: list[str], start: Position) -> Position:
    """Where the expression starting at `start` ends: at a `,`, `;`, `for` or closing bracket outside its own
    brackets, or at the end of the statement.  The file is tokenized from its top so that brackets opened before
    the lambda (a call spread over lines) make its newlines continuation lines."""
    depth, last = 0, start
    try:
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
            if (tok.start[0] - 1, tok.start[1]) < start:
                continue
            if ends_expression(tok, depth):
                break
            depth += OPENING.get(tok.string, 0) if tok.type == tokenize.OP else 0
            if tok.type not in (tokenize.NL, tokenize.COMMENT):
                last = (tok.end[0] - 1, tok.end[1])
    except tokenize.TokenError:  # the file's text runs out: the expression ends with it
        pass
    return last


OPENING = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


def ends_expression(tok: tokenize.TokenInfo, depth: int) -> bool:
    if tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
        return True
    closes_outer = tok.type == tokenize.OP and OPENING.get(tok.string) == -1
    return depth == 0 and (closes_outer or tok.string in (",", ";", "for"))
