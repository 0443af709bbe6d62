"""Shared test setup: Triton's interpreter on CPU, seeded-but-fresh randomness, the naive oracle."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels run on CPU tensors

import random
import zlib

import pytest
import torch

# A new seed every run (so the suite keeps exploring), printed so a failure can be replayed:
# FLEXCOMP_TEST_SEED=<seed> python -m pytest ...
SESSION_SEED = int(os.environ.get("FLEXCOMP_TEST_SEED", random.randrange(2**31)))


SEED_LINE = "flexcomp test seed: FLEXCOMP_TEST_SEED={}"


def pytest_report_header(config):
    return SEED_LINE.format(SESSION_SEED)


def pytest_configure(config):
    """On an xdist worker, the controller's seed: every worker draws from the seed that is printed."""
    global SESSION_SEED
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "flexcomp_test_seed" in workerinput:
        SESSION_SEED = workerinput["flexcomp_test_seed"]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist's hook (on the controller, once per worker it starts)
    node.workerinput["flexcomp_test_seed"] = SESSION_SEED


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end, where `-q` still shows it: a red run can be replayed."""
    terminalreporter.write_line(SEED_LINE.format(SESSION_SEED))


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the session seed and the test's id: fresh per run, reproducible per test."""
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def randn(rng):
    """randn(*shape, dtype=torch.float32): standard normal tensors from the test's generator."""

    def make(*shape, dtype=torch.float32, requires_grad=False):
        t = torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    return make


@pytest.fixture
def naive_attention():
    from naive import naive_attention

    return naive_attention


@pytest.fixture
def torch_flex(monkeypatch):
    """torch's own flex_attention, run eagerly (no Dynamo: fast, forward only)."""
    from torch.nn.attention import flex_attention as torch_fa

    monkeypatch.setattr(torch_fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    return torch_fa
