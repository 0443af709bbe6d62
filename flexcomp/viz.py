"""Pictures of a mask_mod: the dense mask at a small size beside the tile map at the real size.

matplotlib (Agg) is imported only when drawing, so importing flexcomp never needs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .mods import Mod
from .tiles import TileClass

DENSE_MAX = 256  # the dense panel is drawn at min(len, DENSE_MAX): a picture, not the data
TILE_COLOURS = {TileClass.EMPTY: "#f2f2f2", TileClass.PARTIAL: "#f4a340", TileClass.FULL: "#2b6cb0"}


def dense_mask(mask_mod: Mod, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """[B, H, Q, KV] bool: create_mask when the block-mask module is there, else the IR evaluator."""
    if importlib.util.find_spec("flexcomp.blockmask") is None:
        from .evaluate import evaluate, index_grid

        keep = evaluate(mask_mod.ir, index_grid(batch, heads, q_len, kv_len), mask_mod.tensors())
        return keep.expand(batch, heads, q_len, kv_len).bool()
    from .blockmask import create_mask

    return create_mask(mask_mod, batch, heads, q_len, kv_len, device="cpu").bool()


def tile_map(mask_mod: Mod, batch: int, heads: int, q_len: int, kv_len: int, block_size: int) -> torch.Tensor | None:
    """[B, H, n_q_blocks, n_kv_blocks] TileClass values from create_block_mask, or None without block masks."""
    if importlib.util.find_spec("flexcomp.blockmask") is None:
        return None
    from .blockmask import create_block_mask

    block_mask = create_block_mask(mask_mod, batch, heads, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)
    return torch.as_tensor(block_mask.tile_classes()).long()


def _pick(t: torch.Tensor, b: int, h: int) -> torch.Tensor:
    # masks that ignore b or h come back with a broadcast dimension of size 1
    return t[min(b, t.shape[0] - 1), min(h, t.shape[1] - 1)]


def draw_mask(
    mask_mod: Mod, output: str | Path, *, q_len: int, kv_len: int, batch: int = 1, heads: int = 1,
    block_size: int = 128, batch_index: int = 0, head_index: int = 0,
) -> Path:
    """Write a two-panel PNG: dense mask (left) and EMPTY/PARTIAL/FULL tile map (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    small_q, small_kv = min(q_len, DENSE_MAX), min(kv_len, DENSE_MAX)
    dense = _pick(dense_mask(mask_mod, batch, heads, small_q, small_kv), batch_index, head_index)
    tiles = tile_map(mask_mod, batch, heads, q_len, kv_len, block_size)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    fig.suptitle(f"{mask_mod.name}   (b={batch_index}, h={head_index})", fontsize=11)
    left.imshow(dense.numpy(), cmap=ListedColormap(["#ffffff", "#1a1a1a"]), vmin=0, vmax=1,
                interpolation="nearest", aspect="auto")
    left.set_title(f"dense mask, Q={small_q} x KV={small_kv} (black: attends)", fontsize=10)
    _label_axes(left, "kv_idx", "q_idx")
    if tiles is None:
        right.text(0.5, 0.5, "tile map unavailable:\nflexcomp.create_block_mask\nis not in this build",
                   ha="center", va="center")
        right.set_axis_off()
    else:
        grid = _pick(tiles, batch_index, head_index)
        colours = ListedColormap([TILE_COLOURS[c] for c in TileClass])
        right.imshow(grid.numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        counts = torch.bincount(grid.flatten(), minlength=3).tolist()
        right.set_title(f"tiles, Q={q_len} x KV={kv_len}, BLOCK_SIZE={block_size}\n"
                        f"({counts[0]} empty, {counts[1]} partial, {counts[2]} full)", fontsize=10)
        _label_axes(right, "kv block", "q block")
        right.legend(handles=[Patch(facecolor=TILE_COLOURS[c], edgecolor="#888888", label=c.name) for c in TileClass],
                     loc="upper right", fontsize=8, framealpha=0.9)
    output = Path(output)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def _label_axes(ax: Any, x: str, y: str) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
