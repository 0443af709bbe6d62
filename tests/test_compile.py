"""flexcomp inside torch.compile (flexcomp/custom_op.py): fullgraph with no graph breaks, outputs and gradients equal
to eager calls (which tests/test_reference.py and the kernel tests hold to float64), on the reference backend and
the Triton kernels under the interpreter; guards that retrace when the call site changes; dynamic lengths."""

from __future__ import annotations

import pytest
import torch
from naive import naive_attention

import flexcomp as fc

L, D = 48, 16
BIAS = None  # a learnable [L] table the score_mod reads (rebound per test)
SHIFT = 0  # a captured Python int
DOCS = torch.zeros(L, dtype=torch.int64)  # document ids, rebound per step


def same_doc(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 8)


def biased(score, b, h, q_idx, kv_idx):
    return score + BIAS[kv_idx]


def shifted(b, h, q_idx, kv_idx):
    return q_idx + SHIFT >= kv_idx


@pytest.fixture
def inputs(randn):
    global BIAS
    BIAS = randn(L, requires_grad=True)
    return tuple(randn(2, 2, L, D, requires_grad=True) for _ in range(3))


def _grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), tensors)


def _assert_same(compiled, eager, tensors):
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(compiled, tensors), _grads(eager, tensors)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_mask_passed_in_no_graph_breaks(inputs):
    q, k, v = inputs
    block_mask = fc.create_block_mask(causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)

    def attend(q, k, v, block_mask):
        return fc.flex_attention(q, k, v, score_mod=biased, block_mask=block_mask) * 2

    explained = torch._dynamo.explain(attend)(q, k, v, block_mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(q, k, v, block_mask), attend(q, k, v, block_mask), (q, k, v, BIAS))
    ref, _ = naive_attention(q, k, v, score_fn=lambda s, b, h, qi, ki: s + BIAS.double()[ki], mask_fn=causal)
    torch.testing.assert_close(compiled(q, k, v, block_mask).double(), ref * 2, atol=1e-5, rtol=1e-5)


def test_block_mask_built_inside(inputs):
    q, k, v = inputs

    def attend(q, k, v):
        block_mask = fc.create_block_mask(window, None, None, q.shape[2], k.shape[2], device="cpu", BLOCK_SIZE=16)
        return fc.flex_attention(q, k, v, score_mod=biased, block_mask=block_mask)

    assert torch._dynamo.explain(attend)(q, k, v).graph_break_count == 0
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(q, k, v), attend(q, k, v), (q, k, v, BIAS))


def test_mods_decorated_inside(randn):
    """@fc.score_mod / @fc.mask_mod on functions defined inside the compiled function (torch's habit): no graph
    break, and the answer of float64 attention."""
    q, k, v = (randn(1, 2, L, D) for _ in range(3))

    def attend(q, k, v):
        @fc.score_mod
        def relative(score, b, h, q_idx, kv_idx):
            return score + (kv_idx - q_idx) * 0.1

        @fc.mask_mod
        def local(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < 8)

        block_mask = fc.create_block_mask(local, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        return fc.flex_attention(q, k, v, score_mod=relative, block_mask=block_mask)

    assert torch._dynamo.explain(attend)(q, k, v).graph_break_count == 0
    out = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    ref, _ = naive_attention(q, k, v, score_fn=lambda s, b, h, qi, ki: s + (ki - qi) * 0.1, mask_fn=window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_triton_kernels_under_inductor(inputs):
    """The generated forward and backward kernels (interpreted), called from an inductor graph."""
    q, k, v = inputs
    block_mask = fc.create_block_mask(causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)

    def attend(q, k, v):
        return fc.flex_attention(q, k, v, score_mod=biased, block_mask=block_mask, backend="triton").sin()

    _assert_same(torch.compile(attend, fullgraph=True)(q, k, v), attend(q, k, v), (q, k, v, BIAS))


def test_another_block_mask_retraces(inputs):
    """Two block masks with tables of the same shapes but different mask_mods: the graph's guards tell them apart."""
    q, k, v = (t.detach() for t in inputs)
    compiled = torch.compile(lambda q, k, v, bm: fc.flex_attention(q, k, v, block_mask=bm), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    for mask in (causal, window, causal):
        block_mask = fc.create_block_mask(mask, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        ref, _ = naive_attention(q, k, v, mask_fn=mask)
        torch.testing.assert_close(compiled(q, k, v, block_mask).double(), ref, atol=1e-5, rtol=1e-5)


def test_rebound_scalar_is_seen(inputs):
    global SHIFT
    q, k, v = (t.detach() for t in inputs)
    compiled = torch.compile(lambda q, k, v: fc.flex_attention(q, k, v, mask_mod=shifted), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    try:
        for SHIFT in (0, 5):
            ref, _ = naive_attention(q, k, v, mask_fn=shifted)
            torch.testing.assert_close(compiled(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
    finally:
        SHIFT = 0


def test_dynamic_lengths_one_graph(randn):
    """mask_mod= builds the block mask at run time: one graph serves every length."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda q, k, v: fc.flex_attention(q, k, v, mask_mod=causal), fullgraph=True,
                             dynamic=True, backend="aot_eager")  # fmt: skip
    for length in (24, 40, 56):
        q, k, v = (randn(1, 2, length, D) for _ in range(3))
        ref, _ = naive_attention(q, k, v, mask_fn=causal)
        torch.testing.assert_close(compiled(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("made", ["inside", "passed in"])
@pytest.mark.parametrize("dynamic", [True, None])
def test_dynamic_lengths_with_a_block_mask(randn, made, dynamic):
    """Lengths that change with a block mask, built inside from the inputs' (symbolic) lengths or passed in: the
    op takes the lengths from its query and key, so the graph does not specialize on them (as torch: one graph
    with dynamic=True where the mask is built inside; else a second, dynamic one after the first change)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def attend(q, k, v, block_mask=None):
        if block_mask is None:
            block_mask = fc.create_block_mask(window, None, None, q.shape[2], k.shape[2], device="cpu", BLOCK_SIZE=16)
        return fc.flex_attention(q, k, v, block_mask=block_mask)

    compiled = torch.compile(attend, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    lengths = (24, 40, 56, 72)
    for length in lengths:
        q, k, v = (randn(1, 2, length, D) for _ in range(3))
        passed = [fc.create_block_mask(window, None, None, length, length, device="cpu", BLOCK_SIZE=16)]
        ref, _ = naive_attention(q, k, v, mask_fn=window)
        out = compiled(q, k, v, *(passed if made == "passed in" else []))
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs <= (1 if (made, dynamic) == ("inside", True) else 2)


def test_changing_lengths_with_tables_as_inputs(randn):
    """A block mask decided by tables (document ids of a fixed-size buffer) passed in at four lengths: its tables
    are op inputs with symbolic sizes after the first change, two graphs in all (torch's count too)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    global DOCS
    DOCS = torch.arange(128) // 10
    compiled = torch.compile(lambda q, k, v, bm: fc.flex_attention(q, k, v, block_mask=bm), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    for length in (24, 40, 56, 72):
        q, k, v = (randn(1, 2, length, D) for _ in range(3))
        block_mask = fc.create_block_mask(same_doc, None, None, length, length, device="cpu", BLOCK_SIZE=16)
        ref, _ = naive_attention(q, k, v, mask_fn=same_doc)
        torch.testing.assert_close(compiled(q, k, v, block_mask).double(), ref, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_mask_reading_a_tensor_is_refused_inside(randn):
    """Tables built at trace time would not follow a captured tensor: say so, and what to do instead."""
    docs = torch.arange(L) // 10

    def same_doc(b, h, q_idx, kv_idx):
        return docs[q_idx] == docs[kv_idx]

    def attend(q):
        block_mask = fc.create_block_mask(same_doc, None, None, L, L, device="cpu")
        return fc.flex_attention(q, q, q, block_mask=block_mask)

    with pytest.raises(Exception, match="build the block mask outside the compiled function"):
        torch.compile(attend, fullgraph=True, backend="aot_eager")(randn(1, 1, L, D))


def test_block_masks_rebuilt_every_step_share_one_graph(randn, rng):
    """A document mask rebuilt each step from new ids (tables as op inputs), and a causal mask rebuilt each step
    (closed-form bounds): new objects, one graph each, right answers.  (A new mask_mod function each step, a
    closure over that step's ids, retraces: the graph keeps one mask_mod per trace.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda q, k, v, bm: fc.flex_attention(q, k, v, block_mask=bm), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    global DOCS
    q, k, v = (randn(1, 2, L, D) for _ in range(3))
    for _ in range(3):
        DOCS = (torch.rand(L, generator=rng) < 0.1).cumsum(0)  # rebound: the mask reads it live, as eagerly
        block_mask = fc.create_block_mask(same_doc, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        ref, _ = naive_attention(q, k, v, mask_fn=same_doc)
        torch.testing.assert_close(compiled(q, k, v, block_mask).double(), ref, atol=1e-5, rtol=1e-5)
    for _ in range(2):
        block_mask = fc.create_block_mask(causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)
        ref, _ = naive_attention(q, k, v, mask_fn=causal)
        torch.testing.assert_close(compiled(q, k, v, block_mask).double(), ref, atol=1e-5, rtol=1e-5)
    # document tables of another width recompile once, with symbolic sizes (torch's automatic dynamic shapes)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


POSITION = torch.tensor([0])  # the decoding step's query position, as gpt-fast's input_pos


def causal_at_position(b, h, q_idx, kv_idx):
    return q_idx + POSITION[0] >= kv_idx


def test_gpt_fast_decode_step_slices_the_block_mask_inside(randn):
    """gpt-fast compiles its decode step with fullgraph=True and slices the block mask built once for the maximum
    length inside it (`block_mask[:, :, input_pos // BLOCK]`, then its mask_mod and lengths set): one graph for
    every step, each step equal to the float64 reference."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    full = fc.create_block_mask(causal, 1, 1, L, L, device="cpu", BLOCK_SIZE=16)
    k, v = randn(1, 2, L, D), randn(1, 2, L, D)

    def decode_step(q, input_pos, block_mask):
        step_mask = block_mask[:, :, input_pos // 16]
        step_mask.mask_mod = causal_at_position
        step_mask.seq_lengths = (1, L)
        return fc.flex_attention(q, k, v, block_mask=step_mask)

    compiled = torch.compile(decode_step, fullgraph=True, backend="aot_eager")
    for position in (5, 21, L - 1):
        POSITION.fill_(position)
        q = randn(1, 2, 1, D)
        ref, _ = naive_attention(q, k, v, mask_fn=lambda b, h, qi, ki, p=position: qi + p >= ki)
        torch.testing.assert_close(compiled(q, torch.tensor([position]), full).double(), ref, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
