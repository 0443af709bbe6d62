"""2-D neighborhood attention over an image: each pixel attends to the KERNEL x KERNEL pixels around it.

Papers: "Neighborhood Attention Transformer" (2023, NATTEN); "Faster Neighborhood Attention: Reducing the
O(n^2) Cost of Self Attention at the Threadblock Level" (2024).  Tokens are pixels in row-major order; as
in NATTEN the window is shifted inward at the borders (clamp), so every pixel sees exactly KERNEL^2 keys.
"""

import torch

import flexcomp as fc

IMG_H, IMG_W = 32, 32
KERNEL = 7  # odd
RADIUS = KERNEL // 2


def neighborhood_2d(img_h: int, img_w: int, kernel: int):
    @fc.mask_mod
    def neighborhood_2d(b, h, q_idx, kv_idx):
        row_start = torch.clamp(q_idx // img_w - kernel // 2, 0, img_h - kernel)
        col_start = torch.clamp(q_idx % img_w - kernel // 2, 0, img_w - kernel)
        kv_row = kv_idx // img_w
        kv_col = kv_idx % img_w
        rows_ok = (kv_row >= row_start) & (kv_row < row_start + kernel)
        cols_ok = (kv_col >= col_start) & (kv_col < col_start + kernel)
        return rows_ok & cols_ok

    neighborhood_2d.name = f"neighborhood_{img_h}x{img_w}_k{kernel}"
    return neighborhood_2d


natten = neighborhood_2d(IMG_H, IMG_W, KERNEL)

EXAMPLE = {"mask_mod": natten, "q_len": IMG_H * IMG_W, "heads": 2, "check_q_len": 256}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
