"""The layering rules of docs/architecture.md, checked on the source's imports (ast: no module is imported).

sparsity/ decides tiles with torch ops and imports no kernel machinery (the Triton kernel that builds document
tables lives in codegen/, handed to sparsity by its caller); the front end builds IR and knows nothing of Mod
objects' evaluation (mods) or the torch reference; codegen/backward.py shares host pieces through codegen/host.py,
not forward.py's internals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module path a file imports, relative ones resolved against flexcomp's package layout, anywhere in the
    file (lazy imports inside functions count too)."""
    package = _package_of(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(package, node.module, node.level)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _package_of(path: Path) -> list[str]:
    relative = path.relative_to(ROOT).with_suffix("").parts
    top = {"codegen": "flexcomp.codegen", "grammar": "flexcomp.grammar"}.get(relative[0], relative[0])
    return [*top.split("."), *relative[1:-1]]


def _resolve(package: list[str], module: str | None, level: int) -> str:
    base = package[: len(package) - (level - 1)] if level else []
    return ".".join([*base, *([module] if module else [])])


def _forbidden(found: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in found if any(m == p or m.startswith(p + ".") for p in prefixes))


# (files, module prefixes none of them may import)
RULES = [
    ("flexcomp/sparsity/*.py", ("triton", "flexcomp.codegen")),  # sparsity: torch ops only, no kernels
    ("flexcomp/frontend/*.py", ("flexcomp.mods", "flexcomp.reference")),  # the front end builds IR only
    ("codegen/backward.py", ("flexcomp.codegen.forward",)),  # shared host parts live in codegen/host.py
]


@pytest.mark.parametrize(("pattern", "prefixes"), RULES)
def test_layering(pattern: str, prefixes: tuple[str, ...]) -> None:
    files = sorted(ROOT.glob(pattern))
    assert files, pattern
    broken = {str(f.relative_to(ROOT)): bad for f in files if (bad := _forbidden(imported_modules(f), prefixes))}
    assert not broken, broken


def test_the_checker_sees_relative_and_lazy_imports(tmp_path) -> None:
    """The rule checker itself: a lazy relative import inside a function is found and resolved."""
    path = ROOT / "flexcomp" / "sparsity" / "equality.py"
    found = imported_modules(path)
    assert "flexcomp.ir" in found and "flexcomp.sparsity.tables" in found
    assert _forbidden({"flexcomp.codegen.launch", "triton.language", "tritonx"}, ("triton", "flexcomp.codegen")) == [
        "flexcomp.codegen.launch",
        "triton.language",
    ]
