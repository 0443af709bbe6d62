"""Shared by the language tests: random mod arguments, and the check that a mod's IR computes what its function does."""

from __future__ import annotations

import torch

import flexcomp.mods as fm
from flexcomp.evaluate import evaluate
from flexcomp.ir import MASK_MOD_ARGS, SCORE_MOD_ARGS


def mod_inputs(rng: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """n random values of each canonical argument; indices include negatives, as a mod may see after arithmetic."""
    return {
        "score": torch.randn(n, generator=rng) * 3,
        "b": torch.randint(0, 2, (n,), dtype=torch.int32, generator=rng),
        "h": torch.randint(0, 4, (n,), dtype=torch.int32, generator=rng),
        "q_idx": torch.randint(-20, 40, (n,), dtype=torch.int32, generator=rng),
        "kv_idx": torch.randint(-20, 40, (n,), dtype=torch.int32, generator=rng),
    }


def mod_args(mod: fm.Mod, env: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """`env`'s tensors in the order of the mod's parameters."""
    return [env[name] for name in (SCORE_MOD_ARGS if mod.kind == "score" else MASK_MOD_ARGS)]


def assert_ir_matches(mod: fm.Mod, expected: torch.Tensor, env: dict[str, torch.Tensor],
                      equal_nan: bool = False) -> None:
    """mod's IR, raw and optimized, evaluated on `env` == `expected` (a bool mask, or float32 scores to 1e-5)."""
    n = len(env["score"])
    for root in (mod.raw_ir, mod.ir):
        got = evaluate(root, env, mod.tensors()).expand(n)
        if mod.kind == "mask":
            assert got.dtype == torch.bool
            assert torch.equal(got, expected.bool().expand(n)), mod.name
        else:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected.double().expand(n), rtol=1e-5, atol=1e-5,
                                       equal_nan=equal_nan, msg=mod.name)
