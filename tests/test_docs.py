"""Docs that cannot rot: every ```python block of README.md and docs/*.md runs, and so does every
`python -m flexcomp ...` line of their ```bash blocks.

A document's python blocks run in order in one fresh namespace, as a reader would paste them, each
from its own file (mods read their source with `inspect`, so it must exist on disk).  A block whose
first line is `# not run` is only parsed: keep those few, and say why on that line.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
CLI_LINE = re.compile(r"^((?:\w+=\S+\s+)*)python -m flexcomp (.+)$")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence
    lang: str
    code: str

    @property
    def runnable(self) -> bool:
        return not self.code.lstrip().startswith("# not run")


def blocks(doc: Path, lang: str) -> list[Block]:
    text = doc.read_text()
    return [Block(doc, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
            for m in FENCE.finditer(text) if m.group(1) == lang]


def doc_id(doc: Path) -> str:
    return str(doc.relative_to(REPO))


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "python")], ids=doc_id)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes a file writes it here
    saved = os.environ.copy()  # a block that sets a variable sets it for itself (os.environ itself stays: torch's
    try:  # inductor sets variables that its C++ side reads back through the real environment)
        _run_blocks(doc, tmp_path)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _run_blocks(doc: Path, tmp_path: Path) -> None:
    namespace = {"__name__": f"docs_{doc.stem}"}
    for i, block in enumerate(blocks(doc, "python")):
        where = f"{doc_id(doc)}:{block.line}"
        ast.parse(block.code, where)
        if not block.runnable:
            continue
        path = tmp_path / f"{doc.stem}_{i}.py"
        path.write_text(block.code)
        try:
            exec(compile(block.code, str(path), "exec"), namespace)  # noqa: S102 (running the docs is the point)
        except Exception as e:
            raise AssertionError(f"the ```python block at {where} fails: {type(e).__name__}: {e}") from e


def cli_lines() -> list[tuple[str, str]]:
    lines = []
    for doc in DOCS:
        for block in blocks(doc, "bash"):
            for offset, line in enumerate(block.code.splitlines(), start=1):
                if CLI_LINE.match(line.strip()):
                    lines.append((f"{doc_id(doc)}:{block.line + offset}", line.strip()))
    return lines


@pytest.mark.parametrize(("where", "line"), cli_lines(), ids=[w for w, _ in cli_lines()])
def test_cli_lines_run(where, line, tmp_path, monkeypatch, capsys):
    """`python -m flexcomp ARGS` is `flexcomp.cli.main(ARGS)`; run in-process (a subprocess per line costs an import
    of torch each), from a scratch folder that sees the repository's examples/, so `-o mask.png` lands there."""
    from flexcomp.cli import main

    env_part, args = CLI_LINE.match(line).groups()
    args = shlex.split(args, comments=True)
    for assignment in env_part.split():
        monkeypatch.setenv(*assignment.split("=", 1))
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    status = main(args)
    out, err = capsys.readouterr()
    assert status == 0, f"{where}: `{line}` exited {status}:\n{err[-2000:]}"
    assert out.strip(), f"{where}: `{line}` printed nothing"
    if "-o" in args:
        output = args[args.index("-o") + 1]
        assert (tmp_path / output).stat().st_size > 0, f"{where}: `{line}` wrote no {output}"
    if "FLEXCOMP_DEBUG" in env_part:
        assert "after fold_constants" in err, f"{where}: FLEXCOMP_DEBUG=1 printed no IR after the passes"


def test_every_doc_block_is_checked():
    """A runnable block in a language this file does not run would rot silently."""
    for doc in DOCS:
        for m in FENCE.finditer(doc.read_text()):
            assert m.group(1) in ("python", "bash", "text", ""), f"{doc_id(doc)}: a ```{m.group(1)} block"


def test_readme_lists_every_example():
    """The README's Examples table is the gallery's one copy: every examples/*.py is in it, and only those."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Examples"):readme.index("\n## ", readme.index("## Examples") + 1)]
    listed = set(re.findall(r"\]\(examples/(\w+\.py)\)", table))
    on_disk = {p.name for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_")}
    assert listed == on_disk, f"missing from the table: {on_disk - listed}; not on disk: {listed - on_disk}"


def runnable_code() -> str:
    return "\n".join(b.code for doc in DOCS for b in blocks(doc, "python") if b.runnable)


def test_every_public_name_has_a_running_example():
    import flexcomp as fc

    code = runnable_code()
    missing = [name for name in fc.__all__ if f"fc.{name}" not in code]
    assert not missing, f"public names no doc example uses: {missing}"


def test_every_cli_flag_and_kernel_option_is_exercised():
    from flexcomp.cli import build_parser

    lines = " ".join(line for _, line in cli_lines())
    subcommands = build_parser()._subparsers._group_actions[0].choices
    flags = {flag for sub in subcommands.values() for action in sub._actions for flag in action.option_strings}
    missing = sorted(f for f in flags - {"-h", "--help", "--output"} if f" {f} " not in f" {lines} ")
    assert not missing, f"CLI flags no doc command line uses: {missing}"
    for name in subcommands:
        assert any(line.startswith(f"python -m flexcomp {name} ") for _, line in cli_lines()), f"no `{name}` line"
    code = runnable_code()
    for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        assert f'"{key}"' in code, f"kernel_options key {key!r} has no running example"


def test_every_environment_variable_is_documented():
    used = set()
    for folder in ("flexcomp", "codegen", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            used |= set(re.findall(r"os\.environ(?:\.get|\.setdefault)?[\[(]\"(\w+)\"", path.read_text()))
    docs = "".join(doc.read_text() for doc in DOCS)
    assert used and not [v for v in used if v not in docs], f"undocumented: {sorted(v for v in used if v not in docs)}"
