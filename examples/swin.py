"""Swin (shifted) window attention: pixels attend within non-overlapping WINDOW x WINDOW windows, shifted by SHIFT.

Paper: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (2021); see also "Flash
Window Attention: speedup the attention computation for Swin Transformer" (2024).  Swin shifts by rolling
the image and masking the wrapped-around pieces apart; on the unrolled image that is a partition into
regions (row - SHIFT) // WINDOW, where Python's floor division puts the first SHIFT rows in region -1.
"""

import flexcomp as fc

IMG_H, IMG_W = 32, 32
WINDOW = 8
SHIFT = WINDOW // 2  # 0 on the even (regular) layers, WINDOW // 2 on the odd (shifted) ones


def window_attention(img_w: int, window: int, shift: int):
    @fc.mask_mod
    def window_attention(b, h, q_idx, kv_idx):
        same_row_band = (q_idx // img_w - shift) // window == (kv_idx // img_w - shift) // window
        same_col_band = (q_idx % img_w - shift) // window == (kv_idx % img_w - shift) // window
        return same_row_band & same_col_band

    window_attention.name = f"swin_window{window}_shift{shift}"
    return window_attention


shifted_windows = window_attention(IMG_W, WINDOW, SHIFT)

EXAMPLE = {"mask_mod": shifted_windows, "q_len": IMG_H * IMG_W, "heads": 2, "check_q_len": 256}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
