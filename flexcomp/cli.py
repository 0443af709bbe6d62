"""`python -m flexcomp show|viz FILE.py[:NAME]`: see what flexcomp built from a file of mods.

show: the parsed and optimized IR of each mod, how the block mask's tiles were
classified at a shape (counts, closed-form bounds), and the generated kernel.
viz: a PNG of the whole mask (pooled into at most 512x512 pixels) beside the tile map, both at the given size.

Mods are found at module level in FILE: NAME (or NAME1,NAME2) picks them; without
NAME, the file's `EXAMPLE` dict (as in examples/) or else the last score_mod and
the last mask_mod defined.  Errors in the user's file print the FlexcompError
(with its caret) and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FlexcompError
from .mods import Mod

USAGE_ERROR = 2


class CliError(Exception):
    """A problem with the command line or the file: printed without a traceback, exit 2."""


@dataclass
class Selection:
    score_mod: Mod | None
    mask_mod: Mod | None

    @property
    def mods(self) -> list[Mod]:
        return [m for m in (self.score_mod, self.mask_mod) if m is not None]


# ---------------------------------------------------------------- loading


def split_target(target: str) -> tuple[Path, list[str]]:
    """"dir/file.py:a,b" -> (Path("dir/file.py"), ["a", "b"])."""
    path, sep, names = target.rpartition(":")
    if not sep or not path.endswith(".py"):
        path, names = target, ""
    return Path(path), [n for n in names.split(",") if n]


def load_module(path: Path) -> Any:
    """Execute the file as a module (its folder importable, as when run as a script)."""
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"_flexcomp_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and inspect look the module up by name
    try:
        spec.loader.exec_module(module)
    except FlexcompError:
        raise
    except SyntaxError as e:
        raise CliError(f"{path}:{e.lineno}: {e.msg}") from e
    except Exception as e:  # the user's own code failed: say where, not our traceback
        raise CliError(f"{path}: loading failed: {type(e).__name__}: {e}") from e
    return module


def select_mods(module: Any, names: list[str]) -> Selection:
    found = {name: value for name, value in vars(module).items() if isinstance(value, Mod)}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise CliError(f"no mod named {', '.join(missing)} in {module.__file__}; mods there: {', '.join(found)}")
        picked = [found[n] for n in names]
        return Selection(_last(picked, "score"), _last(picked, "mask"))
    example = getattr(module, "EXAMPLE", None)
    if isinstance(example, dict) and (example.get("score_mod") or example.get("mask_mod")):
        return Selection(example.get("score_mod"), example.get("mask_mod"))
    if not found:
        raise CliError(f"no score_mod or mask_mod at module level in {module.__file__}")
    return Selection(_last(found.values(), "score"), _last(found.values(), "mask"))


def _last(mods: Any, kind: str) -> Mod | None:
    of_kind = [m for m in mods if m.kind == kind]
    return of_kind[-1] if of_kind else None


def example_shape(module: Any) -> dict[str, int]:
    """Shape defaults from the file's EXAMPLE dict, when it has one."""
    example = getattr(module, "EXAMPLE", None) or {}
    keys = ("q_len", "kv_len", "batch", "heads", "block_size")
    return {k: example[k] for k in keys if isinstance(example.get(k), int)}


# ---------------------------------------------------------------- show


def describe_mod(mod: Mod) -> dict[str, Any]:
    from .ir import to_text

    loc = mod.loc
    return {
        "name": mod.name,
        "kind": mod.kind,
        "key": mod.key,
        "where": f"{loc.file}:{loc.line}" if loc is not None else None,
        "buffers": [{"name": b.name, "dtype": b.dtype, "shape": list(b.shape)} for b in mod.buffers],
        "parsed_ir": to_text(mod.raw_ir),
        "ir": to_text(mod.ir),
    }


def describe_tiles(mask_mod: Mod, shape: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .ir import to_expr

    progress(f"classifying tiles at B={shape.batch} H={shape.heads} Q={shape.q_len} KV={shape.kv_len} ...")
    block_mask = build_block_mask(mask_mod, shape)
    classes = torch.as_tensor(block_mask.tile_classes())
    counts = torch.bincount(classes.flatten().long(), minlength=3).tolist()
    bounds = getattr(block_mask, "bounds", None)
    fields = ("kv_lo", "kv_hi", "full_lo", "full_hi")
    progress("")
    return {
        "shape": {k: getattr(shape, k) for k in ("batch", "heads", "q_len", "kv_len", "block_size")},
        "grid": list(classes.shape),
        "counts": {"EMPTY": counts[0], "PARTIAL": counts[1], "FULL": counts[2]},
        "sparsity": float(block_mask.sparsity()),
        "decided_by": _decided_by(block_mask),
        "bounds": {f: to_expr(getattr(bounds, f)) for f in fields} if bounds is not None else None,
    }


def _decided_by(block_mask: Any) -> dict[str, int] | None:
    """How many tiles each method classified (closed form, analysis, evaluation), if the BlockMask records it."""
    decided = getattr(block_mask, "decided_by", None)
    return {str(how): int(n) for how, n in decided.items()} if isinstance(decided, dict) and decided else None


def build_block_mask(mask_mod: Mod, shape: argparse.Namespace) -> Any:
    from .blockmask import create_block_mask

    return create_block_mask(mask_mod, shape.batch, shape.heads, shape.q_len, shape.kv_len, device="cpu",
                             BLOCK_SIZE=shape.block_size)


def kernel_source(selection: Selection) -> str | None:
    from . import codegen

    render = getattr(codegen, "kernel_source", None)
    return render(selection.score_mod, selection.mask_mod) if render is not None else None


def show_report(selection: Selection, shape: argparse.Namespace, with_kernel: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"mods": [describe_mod(m) for m in selection.mods], "tiles": None, "notes": []}
    if selection.mask_mod is not None and have_block_masks():
        report["tiles"] = describe_tiles(selection.mask_mod, shape)
    elif selection.mask_mod is not None:
        report["notes"].append("tiles: flexcomp.create_block_mask is not available in this build")
    report["kernel_source"] = kernel_source(selection) if with_kernel else None
    if with_kernel and report["kernel_source"] is None:
        report["notes"].append("kernel source: the Triton code generator is not available in this build")
    return report


def have_block_masks() -> bool:
    return module_exists("flexcomp.blockmask")


def module_exists(name: str) -> bool:
    """Whether a flexcomp module has landed; an import error inside it is still raised."""
    return importlib.util.find_spec(name) is not None


def render_text(report: dict[str, Any]) -> str:
    out: list[str] = []
    for mod in report["mods"]:
        buffers = ", ".join(f"{b['name']}: {b['dtype']}{b['shape']}" for b in mod["buffers"]) or "none"
        where = f"{mod['where']}, " if mod["where"] else ""
        out += [f"== {mod['kind']}_mod {mod['name']}  ({where}key {mod['key']}, captured: {buffers})",
                "-- parsed IR", mod["parsed_ir"], "-- optimized IR", mod["ir"], ""]
    tiles = report["tiles"]
    if tiles is not None:
        s, c = tiles["shape"], tiles["counts"]
        out.append(f"== tiles at B={s['batch']} H={s['heads']} Q={s['q_len']} KV={s['kv_len']} "
                   f"BLOCK_SIZE={s['block_size']}: grid {tiles['grid']}")
        out.append(f"EMPTY {c['EMPTY']}  PARTIAL {c['PARTIAL']}  FULL {c['FULL']}  sparsity {tiles['sparsity']:.1f}%")
        if tiles["decided_by"]:
            out.append("decided by: " + ", ".join(f"{how} {n} tiles" for how, n in tiles["decided_by"].items()))
        if tiles["bounds"]:
            out.append("closed-form kv bounds for a q tile [q_lo, q_hi]:")
            out += [f"  {name:8s}= {expr}" for name, expr in tiles["bounds"].items()]
        else:
            out.append("closed-form bounds: none (the kernel reads the block mask's tile lists)")
        out.append("")
    out += [f"== {note}" for note in report["notes"]]
    if report["kernel_source"] is not None:
        out += ["== generated kernel source", report["kernel_source"]]
    return "\n".join(out)


# ---------------------------------------------------------------- commands


def progress(message: str) -> None:
    """One overwritten status line on stderr, only when a person is watching."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()


def cmd_show(args: argparse.Namespace) -> int:
    selection = select_mods(args.module, args.names)
    report = show_report(selection, args, with_kernel=not args.no_kernel)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from .viz import draw_mask

    selection = select_mods(args.module, args.names)
    if selection.mask_mod is None:
        raise CliError("viz needs a mask_mod; the file's selection has only a score_mod")
    progress(f"drawing {selection.mask_mod.name} ...")
    draw_mask(selection.mask_mod, args.output, q_len=args.q_len, kv_len=args.kv_len, batch=args.batch,
              heads=args.heads, block_size=args.block_size, batch_index=args.b, head_index=args.h)
    progress("")
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexcomp", description="see what flexcomp built from a file of mods")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="IR, tile classes and kernel source of a file's mods")
    viz = commands.add_parser("viz", help="PNG of the dense mask and the tile map")
    for sub in (show, viz):
        sub.add_argument("target", metavar="FILE.py[:NAME]", help="a Python file; NAME (or NAME1,NAME2) picks mods")
        sub.add_argument("--q-len", type=int, default=None, help="query length (default: the file's EXAMPLE or 1024)")
        sub.add_argument("--kv-len", type=int, default=None, help="key length (default: q-len)")
        sub.add_argument("--batch", type=int, default=None)
        sub.add_argument("--heads", type=int, default=None)
        sub.add_argument("--block-size", type=int, default=None)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--no-kernel", action="store_true", help="leave out the generated kernel source")
    viz.add_argument("-o", "--output", default="mask.png", help="PNG path (default mask.png)")
    viz.add_argument("--b", type=int, default=0, help="batch index to draw")
    viz.add_argument("--h", type=int, default=0, help="head index to draw")
    show.set_defaults(run=cmd_show)
    viz.set_defaults(run=cmd_viz)
    return parser


def _fill_shape(args: argparse.Namespace, module: Any) -> None:
    defaults = {"q_len": 1024, "batch": 1, "heads": 1, "block_size": 128, **example_shape(module)}
    for key in ("q_len", "batch", "heads", "block_size"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.kv_len is None:
        args.kv_len = defaults.get("kv_len", args.q_len) if args.q_len == defaults["q_len"] else args.q_len


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, args.names = split_target(args.target)
        args.module = load_module(path)
        _fill_shape(args, args.module)
        return args.run(args)
    except FlexcompError as e:
        print(f"{type(e).__module__.split('.')[0]}.{type(e).__name__}: {e}", file=sys.stderr)
        return USAGE_ERROR
    except CliError as e:
        print(f"flexcomp: {e}", file=sys.stderr)
        return USAGE_ERROR
