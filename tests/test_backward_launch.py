"""The backward's dK/dV and dQ programs in one launch of flex_bwd or in two (`launch_parts`).

Both layouts run the same programs on the same tiles, so their gradients agree bit for bit; each is also checked
against float64 autograd of naive attention (tests/test_kernel_backward.py's `compare`), with GQA, ragged lengths, a
block mask and a learnable captured tensor, and each case checks which launches ran.
"""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import launch as launch_module
from flexcomp.codegen.backward import BackwardConfig, launch_parts
from test_kernel_backward import SMALL_TILES, alibi_window_case, compare, program_parts, relative_bias_case

ONE_LAUNCH = {**SMALL_TILES, "ONE_BACKWARD_LAUNCH": True}  # the small tiles' 4-warp default is two
TWO_LAUNCHES = {**SMALL_TILES, "ONE_BACKWARD_LAUNCH": False}


def recorded_backward_launches(monkeypatch) -> list[tuple[str, dict]]:
    """("dkdv+dq", "dkdv" or "dq": the parts a flex_bwd launch runs; its keyword arguments) of each launch from now on."""
    seen, real = [], launch_module.launch_kernel

    def record(kernel, grid, *args, **kwargs):
        if kernel.fn.__name__ == "flex_bwd":
            seen.append(("+".join(part for part, _ in program_parts("flex_bwd", kwargs)), kwargs))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch_module, "launch_kernel", record)
    return seen


@pytest.mark.parametrize("case", [relative_bias_case, alibi_window_case])
def test_one_launch_and_two_give_the_same_bits(rng, monkeypatch, case) -> None:
    launches = recorded_backward_launches(monkeypatch)
    seed, grads = int(torch.randint(2**62, (), generator=rng)), {}
    for options in (ONE_LAUNCH, TWO_LAUNCHES):
        generator = torch.Generator().manual_seed(seed)  # the same inputs for both layouts

        def draw(*shape, generator=generator):
            return torch.randn(*shape, generator=generator)

        table, kwargs = case(draw)
        ours, tables = compare(draw, **kwargs, tables=(table,), options=options)
        grads[options is ONE_LAUNCH] = [t.grad for t in ours] + [t.grad for t in tables]
    assert [parts for parts, _ in launches] == ["dkdv+dq", "dkdv", "dq"]
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def test_deterministic_captured_gradients_in_one_launch(randn, monkeypatch) -> None:
    """The dQ programs' slices of the deterministic partial sums are numbered from the first dQ program."""
    launches = recorded_backward_launches(monkeypatch)
    bias, case = relative_bias_case(randn)
    torch.use_deterministic_algorithms(True)
    try:
        compare(randn, **case, tables=(bias,), options=ONE_LAUNCH)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [parts for parts, _ in launches] == ["dkdv+dq"]
    assert launches[0][1]["DETERMINISTIC"]


@pytest.mark.parametrize(("config", "atomic", "options", "expected"), [
    (BackwardConfig(64, 128, 128, 64, 8, 3, 8, 3), False, None, ("dkdv+dq",)),  # 8-warp programs fill an SM each
    (BackwardConfig(64, 128, 128, 64, 8, 3, 8, 3), False, {"ONE_BACKWARD_LAUNCH": False}, ("dkdv", "dq")),
    (BackwardConfig(64, 64, 64, 64, 4, 3, 4, 3), False, None, ("dkdv", "dq")),  # 4-warp programs share an SM
    (BackwardConfig(64, 64, 64, 64, 4, 3, 4, 3), False, {"ONE_BACKWARD_LAUNCH": True}, ("dkdv+dq",)),
    (BackwardConfig(64, 64, 64, 64, 8, 2, 8, 3), False, None, ("dkdv", "dq")),  # one pipeline depth per launch
    (BackwardConfig(32, 128, 128, 64, 8, 3, 4, 3), False, {"ONE_BACKWARD_LAUNCH": True}, ("dkdv", "dq")),
    (BackwardConfig(64, 128, 128, 64, 8, 3, 8, 3), True, None, ("dkdv",)),  # atomic dQ: no dQ programs
])  # fmt: skip
def test_launch_parts(config, atomic, options, expected) -> None:
    assert launch_parts(config, atomic, options) == expected
