"""Pictures of a mask_mod: the mask and its tile map, both at the real size.

The dense panel shows the whole Q x KV mask, each pixel the fraction of its positions that attend: a window
of 1024 in a 2048 mask looks like one, not like causal (which a small crop would show).

matplotlib (Agg) is imported only when drawing, so importing flexcomp never needs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .mods import Mod
from .tiles import TileClass

PIXELS_MAX = 512  # the dense panel's pixels per axis: a picture, not the data
SAMPLES_MAX = 8  # positions per pixel and axis evaluated; a larger pixel is sampled evenly (said in the title)
TILE_COLOURS = {TileClass.EMPTY: "#f2f2f2", TileClass.PARTIAL: "#f4a340", TileClass.FULL: "#2b6cb0"}


def axis_samples(length: int) -> tuple[torch.Tensor, int, bool]:
    """[pixels, samples] positions along one axis, the positions one pixel covers, and whether it samples."""
    cell = -(-length // PIXELS_MAX)
    pixels = -(-length // cell)
    if cell <= SAMPLES_MAX:
        offsets = torch.arange(cell)
    else:
        offsets = torch.linspace(0, cell - 1, SAMPLES_MAX).round().long()
    positions = (torch.arange(pixels)[:, None] * cell + offsets[None, :]).clamp(max=length - 1)
    return positions.int(), cell, cell > SAMPLES_MAX


def pooled_mask(mask_mod: Mod, q_len: int, kv_len: int, batch_index: int = 0, head_index: int = 0
                ) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """The mask of (batch_index, head_index) at its real size as [q pixels, kv pixels] fractions attended, the
    positions a pixel covers (q, kv), and whether pixels were sampled.  O(pixels x samples) memory, not O(L^2)."""
    from .evaluate import evaluate

    mod = mask_mod.specialized()
    q_pos, q_cell, q_sampled = axis_samples(q_len)
    kv_pos, kv_cell, kv_sampled = axis_samples(kv_len)
    scalar = lambda i: torch.tensor(i, dtype=torch.int32).view(1, 1, 1, 1)
    kv_idx = kv_pos.flatten().view(1, 1, 1, -1)
    rows = []
    for chunk in q_pos.split(64):  # 64 q pixels at a time: at most 64*8 x 4096 evaluated at once
        env = {"b": scalar(batch_index), "h": scalar(head_index), "q_idx": chunk.flatten().view(1, 1, -1, 1),
               "kv_idx": kv_idx}
        keep = evaluate(mod.ir, env, mod.tensors()).expand(1, 1, chunk.numel(), kv_idx.numel())
        rows.append(keep.reshape(chunk.shape[0], chunk.shape[1], kv_pos.shape[0], kv_pos.shape[1]).float()
                    .mean(dim=(1, 3)))
    return torch.cat(rows), (q_cell, kv_cell), q_sampled or kv_sampled


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

    dense, (q_cell, kv_cell), sampled = pooled_mask(mask_mod, q_len, kv_len, batch_index, head_index)
    tiles = tile_map(mask_mod, batch, heads, q_len, kv_len, block_size)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    fig.suptitle(f"{mask_mod.name}   (b={batch_index}, h={head_index})", fontsize=11)
    left.imshow(dense.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                extent=(0, kv_len, q_len, 0))
    pixel = "one position" if q_cell == kv_cell == 1 else f"{q_cell} x {kv_cell} positions" + (
        f", {SAMPLES_MAX} x {SAMPLES_MAX} sampled" if sampled else "")
    left.set_title(f"mask, Q={q_len} x KV={kv_len}, a pixel = {pixel}\n(black: all attend, grey: some)",
                   fontsize=10)
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
