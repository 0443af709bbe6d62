"""Generated kernels on disk and in memory.

Triton's jit reads a kernel's source from its file, so generated code is
written to `$FLEXCOMP_CACHE_DIR` (default ~/.cache/flexcomp) and imported from
there.  A file is named by a hash of what its text depends on (the mods' keys,
the bounds, and the code generator's own source, IR rewrites included), so a second process finds it
without regenerating, and Triton's cache, keyed by that same text, finds the
binaries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType

_MODULES: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("FLEXCOMP_CACHE_DIR") or Path.home() / ".cache" / "flexcomp"
    return Path(root)


# flexcomp's modules whose rules shape the generated text (IR rewrites, derivatives), beside codegen/'s own
GENERATOR_MODULES = ("ir.py", "rewrite.py", "grad.py", "tiles.py")


@cache
def generator_version() -> str:
    """A hash of the generator's files: editing any of them invalidates every cached kernel."""
    here = Path(__file__).parent
    package = Path(importlib.util.find_spec("flexcomp").origin).parent
    digest = hashlib.sha256()
    for path in [*sorted(here.glob("*.py")), *(package / name for name in GENERATOR_MODULES)]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_key(*parts: str) -> str:
    text = "\n--\n".join((generator_version(), *parts))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_generated(name: str, key: str, make_source: Callable[[], str]) -> ModuleType:
    """The module for `key`: from memory, else from the cache folder, else generated and written there."""
    module_name = f"flexcomp_generated_{name}_{key}"
    if module_name in _MODULES:
        return _MODULES[module_name]
    folder = cache_dir()
    path = folder / f"{name}_{key}.py"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, make_source())
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    _MODULES[module_name] = module
    return module


def _write_atomically(path: Path, text: str) -> None:
    # another process may be writing the same file: write aside, then rename over
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def clear_memory_cache() -> None:
    """Forget imported modules (tests use it to check the disk cache)."""
    for module_name in _MODULES:
        sys.modules.pop(module_name, None)
    _MODULES.clear()
