"""codegen/params.py: each entry kernel's parameters are declared once and drive both sides.

The generated kernel's signature is the declaration's names in order (with the mods' buffers spliced in), and the
host's launch arguments are bound by name: a missing or unknown name raises when the launch is built.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import ast

import pytest
import torch
from flexcomp.codegen import launch as launch_module
from flexcomp.codegen.backward_source import backward_source
from flexcomp.codegen.forward_source import forward_source
from flexcomp.codegen.ops import buffer_params
from flexcomp.codegen.params import (
    BACKWARD,
    BACKWARD_ROW_ALIGNED,
    FORWARD,
    FORWARD_ROW_ALIGNED,
    NO_DEFAULT,
    Q_TENSOR,
    bind_tensor,
)
from naive import naive_attention

import flexcomp as fc


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flexcomp-cache"))


def biased_mods(bias: torch.Tensor):
    @fc.score_mod
    def head_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h]

    @fc.mask_mod
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return head_bias, causal


def signature(source: str, kernel: str) -> list[str]:
    """The parameter names of `kernel` in a generated file, as Python parses them."""
    tree = ast.parse(source)
    (fn,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == kernel]
    return [a.arg for a in fn.args.args]


def buffer_names(mod, prefix: str) -> list[str]:
    return buffer_params(prefix, tuple(mod.buffers))


def test_forward_signature_is_the_declaration(randn):
    score, mask = biased_mods(randn(4))
    names = FORWARD.names({"mod_buffers": buffer_names(score, "sb") + buffer_names(mask, "mb")})
    assert signature(forward_source(score, mask, None), "flex_forward_kernel") == names
    assert "sb_bias_ptr" in names and names.index("sb_bias_ptr") < names.index("sm_scale")


def test_backward_signature_is_the_declaration(randn):
    score, mask = biased_mods(randn(4))
    grads = ["gb_bias_ptr", "gb_bias_stride0", "gb_bias_slot_stride"]
    names = BACKWARD.names({"mod_buffers": buffer_names(score, "sb"), "grad_buffers": grads})
    assert signature(backward_source(score, mask, frozenset({"bias"})), "flex_bwd") == names
    assert names[:5] == [p.name for p in Q_TENSOR]  # the group the forward declares too, under the same names


def test_bind_checks_names():
    values = {p.name: i for i, p in enumerate(FORWARD.params) if p.default is NO_DEFAULT}
    values["mod_buffers"] = ["buffer", 1]
    args, kwargs = FORWARD.bind(values)
    positional = [p for p in FORWARD.params if p.kind != "constexpr"]
    assert len(args) == len(positional) + 1  # the buffer run spreads into its values
    assert args[0] == values["Q"] and "buffer" in args and set(kwargs) <= {p.name for p in FORWARD.params}
    missing = dict(values)
    del missing["KV_LEN"]
    with pytest.raises(TypeError, match="missing \\['KV_LEN'\\]"):
        FORWARD.bind(missing)
    with pytest.raises(TypeError, match="unknown \\['KV_LENGTH'\\]"):
        FORWARD.bind({**values, "KV_LENGTH": 3})
    with pytest.raises(TypeError, match="takes 4 strides"):
        bind_tensor(Q_TENSOR, "q", (1, 2, 3))


def test_launches_bind_every_declared_name(randn, monkeypatch):
    """A forward and backward run: each launch's positional arguments are the declaration's, the result right."""
    bias = randn(2)
    score, mask = biased_mods(bias)
    q, k, v = (randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    seen, real = {}, launch_module.launch_kernel

    def record(kernel, grid, *args, **kwargs):
        seen[kernel.fn.__name__] = (kernel, args)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch_module, "launch_kernel", record)
    block_mask = fc.create_block_mask(mask, 1, 1, 40, 40, device="cpu", BLOCK_SIZE=16)
    out = fc.flex_attention(
        q, k, v, score_mod=score, block_mask=block_mask, kernel_options={"BLOCK_M": 16}, backend="triton"
    )
    grad_out = randn(*out.shape)
    out.backward(grad_out)
    for name in ("flex_forward_kernel", "flex_bwd"):
        kernel, args = seen[name]
        constexprs = {p.name for p in (FORWARD if name == "flex_forward_kernel" else BACKWARD).params
                      if p.kind == "constexpr"}  # fmt: skip
        assert len(args) == len([n for n in kernel.arg_names if n not in constexprs])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = naive_attention(*leaves, score_fn=score.fn, mask_fn=mask.fn)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for got, want in zip((q.grad, k.grad, v.grad), leaves, strict=True):
        torch.testing.assert_close(got.double(), want.grad, atol=1e-4, rtol=1e-4)


def calls(source: str, function: str) -> list[str]:
    """The names of the functions `function` calls in a generated file, once per call site."""
    (fn,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == function]
    return [node.func.id for node in ast.walk(fn) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]


def table_reads(source: str) -> set[str]:
    """The generated functions that load from a block table (a parameter named like KV_NUM, FULL_Q_IDX, ...)."""
    readers = set()
    for fn in (node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)):
        for call in (node for node in ast.walk(fn) if isinstance(node, ast.Call)):
            loaded = ast.unparse(call.args[0]) if ast.unparse(call.func) == "tl.load" and call.args else ""
            if any(table in loaded for table in ("_NUM", "_IDX")):
                readers.add(fn.name)
    return readers


def test_every_program_gets_its_tiles_from_program_tiles(randn):
    """Issue 18: one helper turns bounds or block tables into a program's tile lists, whichever axis it walks, and
    each program walks both its lists (PARTIAL, FULL) from one call."""
    score, mask = biased_mods(randn(4))
    forward, backward = forward_source(score, mask, None), backward_source(score, mask, frozenset({"bias"}))
    for kernel in ("flex_forward_kernel", "flex_decode_kernel"):
        assert calls(forward, kernel).count("program_tiles") == 1, kernel
    assert calls(forward, "flex_forward_kernel").count("attend_lists") == 1
    backward_calls = calls(backward, "flex_bwd")  # its dK/dV programs and its dQ programs
    assert [backward_calls.count(f) for f in ("program_tiles", "dkdv_tiles", "dq_tiles")] == [2, 1, 1]
    assert table_reads(forward) == table_reads(backward) == {"program_tiles"}


def test_each_entry_kernel_aligns_the_row_strides_of_its_declared_tensors(randn):
    """The ROW_ALIGN statements are rendered from codegen/params.py's lists: each entry kernel restates the batch,
    head and row strides of those tensors (the ones plans.row_alignment checks), and only strides it takes."""
    score, mask = biased_mods(randn(4))
    forward, backward = forward_source(score, mask, None), backward_source(score, mask, frozenset({"bias"}))
    for source, kernel, tensors in ((forward, "flex_forward_kernel", FORWARD_ROW_ALIGNED),
                                    (forward, "flex_decode_kernel", FORWARD_ROW_ALIGNED),
                                    (backward, "flex_bwd", BACKWARD_ROW_ALIGNED)):  # fmt: skip
        (fn,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == kernel]
        aligned = [target.id for node in fn.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
                   and all(ast.unparse(v).startswith("aligned(") for v in node.value.elts)
                   for target in node.targets[0].elts]  # fmt: skip
        assert aligned == [p.name for group in tensors for p in group[1:-1]], kernel
        assert set(aligned) <= set(signature(source, kernel)), kernel
