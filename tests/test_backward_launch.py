"""The backward's dK/dV and dQ programs in one launch of flex_bwd or in two (`launch_parts`).

Both layouts run the same programs on the same tiles, so their gradients agree bit for bit; each is also checked
against float64 autograd of naive attention (tests/test_kernel_backward.py's `compare`), with GQA, ragged lengths, a
block mask and a learnable captured tensor, and each case checks which launches ran.
"""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen.backward import BackwardConfig, launch_parts
from test_kernel_backward import SMALL_TILES, alibi_window_case, compare, recorded_launches, relative_bias_case

ONE_LAUNCH = {**SMALL_TILES, "ONE_BACKWARD_LAUNCH": True}  # the small tiles' 4-warp default is two
TWO_LAUNCHES = {**SMALL_TILES, "ONE_BACKWARD_LAUNCH": False}


def flex_bwd_launches(launches) -> list[str]:
    """The parts each flex_bwd launch ran, one string per launch ("dkdv+dq", or "dkdv" then "dq")."""
    names = [(name, kwargs) for name, kwargs in launches if name in ("dkdv", "dq")]
    out, i = [], 0
    while i < len(names):  # program_parts lists a launch of both parts as two consecutive entries of one kwargs
        if i + 1 < len(names) and names[i][1]["DKDV_PART"] and names[i][1]["DQ_PART"]:
            out.append("dkdv+dq")
            i += 2
        else:
            out.append(names[i][0])
            i += 1
    return out


@pytest.mark.parametrize("case", [relative_bias_case, alibi_window_case])
def test_one_launch_and_two_give_the_same_bits(rng, monkeypatch, case) -> None:
    launches = recorded_launches(monkeypatch)
    seed, grads = int(torch.randint(2**62, (), generator=rng)), {}
    for options in (ONE_LAUNCH, TWO_LAUNCHES):
        generator = torch.Generator().manual_seed(seed)  # the same inputs for both layouts

        def draw(*shape, generator=generator):
            return torch.randn(*shape, generator=generator)

        table, kwargs = case(draw)
        ours, tables = compare(draw, **kwargs, tables=(table,), options=options)
        grads[options is ONE_LAUNCH] = [t.grad for t in ours] + [t.grad for t in tables]
    assert flex_bwd_launches(launches) == ["dkdv+dq", "dkdv", "dq"]
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def test_deterministic_captured_gradients_in_one_launch(randn, monkeypatch) -> None:
    """The dQ programs' slices of the deterministic partial sums are numbered from the first dQ program."""
    launches = recorded_launches(monkeypatch)
    bias, case = relative_bias_case(randn)
    torch.use_deterministic_algorithms(True)
    try:
        compare(randn, **case, tables=(bias,), options=ONE_LAUNCH)
    finally:
        torch.use_deterministic_algorithms(False)
    assert flex_bwd_launches(launches) == ["dkdv+dq"]
    assert all(kwargs["DETERMINISTIC"] for name, kwargs in launches if name == "dq")


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
