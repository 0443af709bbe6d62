"""Where a traced mod is: the user's frame (the first outside flexcomp and torch), its line, and the columns of the
instruction it runs (from the code object's instruction positions), for errors with a caret."""

from __future__ import annotations

import dis
import linecache
import os
import types

import torch

from ..errors import SourceLoc

# Frames in these directories are not the user's: a location is the first frame outside them.
FRAMEWORK_DIRS = tuple(os.path.dirname(p) + os.sep for p in (os.path.dirname(__file__), torch.__file__))


def code_loc(code: types.CodeType, line: int, lasti: int | None = None) -> SourceLoc:
    """A line of `code` (and, from its instruction positions, the columns of instruction `lasti`)."""
    text = linecache.getline(code.co_filename, line).rstrip("\r\n")
    column, end = 1, None
    positions = list(code.co_positions()) if lasti is not None and hasattr(code, "co_positions") else []
    if 0 <= (lasti or 0) // 2 < len(positions):
        first, last, start_col, end_col = positions[lasti // 2]
        if first == line and start_col is not None:
            column = char_column(text, start_col)
            if last == line and end_col is not None:
                end = char_column(text, end_col)
    return SourceLoc(code.co_filename, line, column, text, code.co_name, end)


def char_column(text: str, byte_offset: int) -> int:
    """1-based character column of a 0-based UTF-8 byte offset (instruction positions count bytes)."""
    return len(text.encode()[:byte_offset].decode(errors="ignore")) + 1 if text else byte_offset + 1


def user_frame(frame: types.FrameType | None) -> types.FrameType | None:
    """The innermost frame of the user's code: the first outside flexcomp and torch."""
    while frame is not None and frame.f_code.co_filename.startswith(FRAMEWORK_DIRS):
        frame = frame.f_back
    return frame


def user_frame_loc(frame: types.FrameType | None, fallback: SourceLoc) -> SourceLoc:
    frame = user_frame(frame)
    return fallback if frame is None else code_loc(frame.f_code, frame.f_lineno, frame.f_lasti)


def comparison_written(frame: types.FrameType | None) -> str | None:
    """The comparison operator the user's frame is executing (`<` for `3 < x`, which Python runs as x.__gt__(3))."""
    frame = user_frame(frame)
    if frame is None:
        return None
    instruction = next((i for i in dis.get_instructions(frame.f_code) if i.offset == frame.f_lasti), None)
    if instruction is None or instruction.opname != "COMPARE_OP":
        return None
    return str(instruction.argval).removeprefix("bool(").removesuffix(")")  # 3.13 spells a test `bool(<)`


def traceback_loc(tb: types.TracebackType | None, fallback: SourceLoc) -> SourceLoc:
    """The innermost user frame of a traceback: where the user's code raised."""
    found = fallback
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(FRAMEWORK_DIRS):
            found = code_loc(tb.tb_frame.f_code, tb.tb_lineno, tb.tb_lasti)
        tb = tb.tb_next
    return found
