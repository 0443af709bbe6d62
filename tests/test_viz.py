"""`flexcomp viz`'s dense panel: the whole mask at its real size, pooled into pixels (issue 16, part 4)."""

import torch
import torch.nn.functional as F

import flexcomp as fc
from flexcomp.viz import PIXELS_MAX, SAMPLES_MAX, pooled_mask


def window_mask(window: int, shift: int = 0) -> fc.Mod:
    return fc.as_mod(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window + shift * h), "mask")


def test_unsampled_pixels_are_the_exact_fraction_attended(rng):
    q_len, kv_len = (int(n) for n in torch.randint(600, 1500, (2,), generator=rng))
    mod = window_mask(int(torch.randint(50, 400, (), generator=rng)), shift=7)
    pooled, (q_cell, kv_cell), sampled = pooled_mask(mod, q_len, kv_len, head_index=1)
    assert not sampled and pooled.shape[0] <= PIXELS_MAX and pooled.shape[1] <= PIXELS_MAX
    dense = fc.create_mask(mod, 1, 2, q_len, kv_len, device="cpu")[0, 1].float()
    # pad to whole pixels by repeating the last row and column, as the sampler clamps
    padded = F.pad(dense[None, None], (0, pooled.shape[1] * kv_cell - kv_len, 0, pooled.shape[0] * q_cell - q_len),
                   mode="replicate")[0, 0]
    want = padded.view(pooled.shape[0], q_cell, pooled.shape[1], kv_cell).mean(dim=(1, 3))
    torch.testing.assert_close(pooled, want)


def test_a_long_window_is_drawn_as_a_window_not_as_causal():
    q_len = 8192  # 16 positions a pixel: sampled
    pooled, (q_cell, _), sampled = pooled_mask(window_mask(1024), q_len, q_len)
    assert sampled and q_cell == q_len // PIXELS_MAX and q_cell > SAMPLES_MAX
    diagonal = pooled.diagonal()
    assert (diagonal > 0).all()  # every pixel on the diagonal attends somewhere
    far = pooled.tril(diagonal=-(2048 // q_cell))
    assert far.sum() == 0 and pooled.tril(-1).sum() > 0  # the band stops 1024 below the diagonal; causal would not
    assert pooled.triu(1).sum() == 0
