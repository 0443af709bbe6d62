"""Flamingo-style cross-modal masking: each text token cross-attends only to the most recent image before it.

Paper: "Flamingo: a Visual Language Model for Few-Shot Learning" (2022).  Queries are text tokens, keys
are the images' visual tokens (TOKENS_PER_IMAGE per image, in order).  LAST_IMAGE[t] is the index of the
last image at or before text position t (-1 before the first one: such rows are fully masked and give 0).
"""

import torch

import flexcomp as fc

TEXT_LEN = 512
TOKENS_PER_IMAGE = 64
IMAGE_POSITIONS = torch.tensor([20, 90, 200, 210, 400])  # text positions where an image appears
LAST_IMAGE = (torch.searchsorted(IMAGE_POSITIONS, torch.arange(TEXT_LEN), right=True) - 1).to(torch.int32)
N_VISUAL = len(IMAGE_POSITIONS) * TOKENS_PER_IMAGE


def example(device="cpu") -> dict:
    """The mask with LAST_IMAGE on `device`: captured tensors live where q, k, v live (moved once)."""
    last_image = LAST_IMAGE.to(device)

    @fc.mask_mod
    def most_recent_image(b, h, q_idx, kv_idx):
        return kv_idx // TOKENS_PER_IMAGE == last_image[q_idx]

    return {
        "mask_mod": most_recent_image, "q_len": TEXT_LEN, "kv_len": N_VISUAL, "heads": 2, "block_size": 64,
        "check_q_len": 256, "check_kv_len": N_VISUAL,
    }


EXAMPLE = example()  # on the CPU
most_recent_image = EXAMPLE["mask_mod"]

if __name__ == "__main__":
    from _run import run_example

    run_example(example)
