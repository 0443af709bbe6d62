"""Full (unmasked) attention: every query attends to every key.

Paper: "Attention Is All You Need" (2017).  The baseline every other example is measured against:
no score change, no mask, so every tile is FULL and the kernel never evaluates a mask.
"""

import flexcomp as fc

noop = fc.noop_mask

EXAMPLE = {"mask_mod": noop, "q_len": 1024, "heads": 2}

if __name__ == "__main__":
    from _run import run_example

    run_example(**EXAMPLE)
