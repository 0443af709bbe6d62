"""Context parallelism (flexcomp/context_parallel.py) on CPU: world sizes 1-4 over gloo, each rank's output shard
and gradients (through out and lse) against the single-process result on the same inputs (float64, reference backend;
one case on the Triton kernels under the interpreter), under both schedules (p2p and ring), and the plan skipping
(neither sending nor computing) empty chunk pairs."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexcomp as fc
from flexcomp import context_parallel as cp

CHUNK, H, D = 16, 2, 16
DOCS = None  # int32 [L] document ids, set per world size
BIAS = None  # float64 [L] learnable table read by the score_mod


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):  # far pairs of chunks are empty
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 5)


def document(b, h, q_idx, kv_idx):
    return DOCS[q_idx] == DOCS[kv_idx]


def one_way(b, h, q_idx, kv_idx):  # at 2 ranks: rank 1 (chunks 1, 2) computes nothing, yet sends chunk 1 to rank 0
    q_chunk, kv_chunk = q_idx // CHUNK, kv_idx // CHUNK
    return ((q_chunk == kv_chunk) & (q_chunk != 1) & (q_chunk != 2)) | ((q_chunk == 3) & (kv_chunk == 1))


def ends_heavy(b, h, q_idx, kv_idx):  # the first and last chunk attend everything, the others themselves
    q_chunk, kv_chunk, last = q_idx // CHUNK, kv_idx // CHUNK, LAST_CHUNK
    return (q_chunk == kv_chunk) | (q_chunk == 0) | (q_chunk == last)


LAST_CHUNK = 3


def biased(score, b, h, q_idx, kv_idx):
    return score + BIAS[kv_idx] * 0.5


def _check(world, mask, score=None, backend="auto", dtype=torch.float64, tol=1e-10, load_balance=True,
           schedules=cp.SCHEDULES, group=None):  # fmt: skip
    """One case on every rank (of `group`, of `world` ranks): same global inputs (same seed), this rank's shards
    through context parallelism under each schedule, against one single-process reference."""
    L = CHUNK * 2 * world
    g = torch.Generator().manual_seed(world * 100 + len(mask.__name__))
    q, k, v = (torch.randn(2, H, L, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, H, L, D, generator=g, dtype=dtype)
    leaves = (q, k, v, BIAS) if score is not None else (q, k, v)
    dlse = torch.randn(2, H, L, generator=g, dtype=torch.float64)
    ref, ref_lse = fc.flex_attention(q, k, v, score_mod=score, mask_mod=mask, backend=backend, return_lse=True)
    ref_grads = torch.autograd.grad(_loss(ref, ref_lse, dout, dlse), leaves)
    for schedule in schedules:
        _check_schedule(schedule, (q, k, v), (dout, dlse), ref, ref_grads, mask, score, backend, tol, load_balance,
                        group)  # fmt: skip


def _loss(out, lse, dout, dlse):  # reaches lse too (rows masked everywhere have lse -inf: left out)
    return (out * dout).sum() + (torch.where(lse.isinf(), 0, lse) * dlse).sum()


def _check_schedule(schedule, qkv, douts, ref, ref_grads, mask, score, backend, tol, load_balance, group):
    shard = lambda t, dim=2: cp.shard(t, group, dim, load_balance)
    local = [shard(t.detach()).requires_grad_() for t in qkv]
    with _bytes_sent() as sent:
        out, lse = cp.flex_attention(*local, score_mod=score, mask_mod=mask, return_lse=True, backend=backend,
                                     load_balance=load_balance, schedule=schedule, group=group)  # fmt: skip
        loss = _loss(out, lse, shard(douts[0]), shard(douts[1], dim=2))
        grads = torch.autograd.grad(loss, local + ([BIAS] if score is not None else []))
    if dist.is_initialized():  # what the ranks sent, together, is what the plan says the schedule sends
        world = dist.get_world_size(group)
        plan = cp.plan(mask, local[0].shape[2] * world, world, load_balance, batch=local[0].shape[0], heads=H,
                       block_size=CHUNK)  # fmt: skip
        total = torch.tensor([sent[0]])
        dist.all_reduce(total, group=group)
        expected = plan.traffic(schedule, 2 * local[0][:, :, :CHUNK].nbytes)  # (forward, backward)
        assert total.item() == sum(expected), (schedule, total.item(), expected, sent[0])
    torch.testing.assert_close(out, shard(ref.detach()), atol=tol, rtol=tol)
    whole = cp.unshard(out.detach(), group, load_balance=load_balance)
    torch.testing.assert_close(whole, ref.detach(), atol=tol, rtol=tol)
    for got, want in zip(grads[:3], ref_grads[:3]):
        torch.testing.assert_close(got, shard(want), atol=tol, rtol=tol)
    if score is not None:  # each rank has its pairs' share of the bias gradient: summed, the whole
        summed = grads[3].clone()
        dist.all_reduce(summed, group=group)
        torch.testing.assert_close(summed, ref_grads[3], atol=tol, rtol=tol)
    assert not lse.isnan().any()


@contextlib.contextmanager
def _bytes_sent():
    """Counts the bytes this rank's point-to-point sends carry, in a one-element list."""
    sent, batch = [0], dist.batch_isend_irecv

    def counting(ops):
        sent[0] += sum(op.tensor.nbytes for op in ops if op.op is dist.isend)
        return batch(ops)

    dist.batch_isend_irecv = counting
    try:
        yield sent
    finally:
        dist.batch_isend_irecv = batch


def _worker(rank, ranks, path):
    """Every world size 1..ranks on the first ranks of one spawn (a group each), then a group whose ranks are not
    the global ones, then torch's manager on all."""
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=ranks)
    try:
        groups = {world: dist.new_group(list(range(world))) for world in range(1, ranks + 1)}  # all ranks, in order
        ranks_1_and_2 = dist.new_group([1, 2])
        for world, group in groups.items():
            if rank < world:
                _cases(rank, world, group)
            dist.barrier()
        if rank in (1, 2):
            _check(2, document, group=ranks_1_and_2)
        if rank < 2:
            _check_landing_in_host_buffers(groups[2])
        _under_torch_context_parallel(ranks)
    finally:
        dist.destroy_process_group()


def _cases(rank, world, group):
    global DOCS, BIAS
    L = CHUNK * 2 * world
    g = torch.Generator().manual_seed(7)
    DOCS = (torch.rand(L, generator=g) < 0.08).cumsum(0).to(torch.int32)
    BIAS = torch.randn(L, generator=g, dtype=torch.float64, requires_grad=True)
    _check(world, causal, group=group)
    _check(world, document, group=group)
    _check(world, window, score=biased, group=group)  # a learnable captured table; far chunk pairs entirely empty
    if world == 4:  # chunks that travel both ways round the ring
        _check(world, neighbours, schedules=("ring",), group=group)
    if world == 2:  # a rank that only sends, a layout balanced by work, the generated kernels interpreted
        _check(world, one_way, group=group)
        layout = cp.balanced_layout(ends_heavy, L, world, block_size=CHUNK)
        assert layout != ((0, 3), (1, 2))  # head-tail would give one rank both heavy chunks
        _check(world, ends_heavy, load_balance=layout, group=group)
        _check(world, window, score=biased, backend="triton", dtype=torch.float32, tol=2e-5, group=group)
    plan = cp.plan(window, L, world)
    if world > 1:  # the window leaves far chunk pairs empty: fewer pairs computed, fewer chunks sent
        assert len(plan.needed) < plan.n_chunks**2
        sent, every = plan.bytes_sent(1)
        assert sent < every


def _check_landing_in_host_buffers(group):
    """gloo cannot send CUDA tensors: they go through host buffers and are copied into the received chunks (what
    benchmarks/cp_one_gpu.py runs on one GPU).  Forced here for CPU tensors: the copy into a received chunk must not
    cut the way its gradient takes back to the owner (p2p's dK/dV were wrong on the GPU when it did)."""
    through_host = cp._Transfers._through_host
    cp._Transfers._through_host = lambda self, tensor: True
    try:
        _check(2, causal, group=group)
    finally:
        cp._Transfers._through_host = through_host
    _check_without_gradients(group)


def _check_without_gradients(group):
    """Inference (no_grad, or inputs that need no gradient): both schedules attend without recording a graph, and
    give the single-process output."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, H, CHUNK * 4, D, generator=g, dtype=torch.float64) for _ in range(3))
    ref = fc.flex_attention(q, k, v, mask_mod=causal)
    local = [cp.shard(t, group) for t in (q, k, v)]
    for schedule in cp.SCHEDULES:
        with torch.no_grad():
            out = cp.flex_attention(*local, mask_mod=causal, group=group, schedule=schedule)
        torch.testing.assert_close(out, cp.shard(ref, group), atol=1e-10, rtol=1e-10)
        assert out.grad_fn is None and not out.requires_grad


def _under_torch_context_parallel(world):
    """Inside torch's `context_parallel` manager: its sharded buffers (head-tail, as ours) go to our flex_attention
    with its mesh as the group, and its `context_parallel_unshard` restores the output."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard  # where torchtitan takes it

    mesh = init_device_mesh("cpu", (world,))
    L = CHUNK * 2 * world
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    expected = fc.flex_attention(q, k, v, mask_mod=document)
    ours = [cp.shard(t) for t in (q, k, v)]
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):
        assert all(torch.equal(a, b) for a, b in zip((q, k, v), ours))  # the same layout
        out = cp.flex_attention(q, k, v, mask_mod=document, group=mesh, schedule="ring")
        (whole,) = context_parallel_unshard(mesh, [out], [2])
    torch.testing.assert_close(whole, expected, atol=1e-10, rtol=1e-10)


def test_context_parallel_matches_one_process():
    """World sizes 1-4 (one spawn of 4 processes: each size a group of the first ranks)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(4, f"{tmp}/rendezvous"), nprocs=4, join=True)


def test_balanced_layout_evens_the_work():
    """Chunks 0 and 7 of 8 attend everything, the others themselves: head-tail puts both on rank 0 (16 of 22
    pair-tiles); balancing by the analysis' tile counts gives every rank at most 9."""
    global LAST_CHUNK
    LAST_CHUNK = 7
    try:
        layout = cp.balanced_layout(ends_heavy, 8 * CHUNK, 4, block_size=CHUNK)
        balanced = cp.plan(ends_heavy, 8 * CHUNK, 4, load_balance=layout, block_size=CHUNK)
        head_tail = cp.plan(ends_heavy, 8 * CHUNK, 4, load_balance=True, block_size=CHUNK)
    finally:
        LAST_CHUNK = 3
    assert sorted(c for chunks in layout for c in chunks) == list(range(8))
    assert max(head_tail.work(r) for r in range(4)) == 16
    assert max(balanced.work(r) for r in range(4)) == 9


def neighbours(b, h, q_idx, kv_idx):  # each chunk attends itself and the chunks either side
    q_chunk, kv_chunk = q_idx // CHUNK, kv_idx // CHUNK
    return (q_chunk - kv_chunk <= 1) & (kv_chunk - q_chunk <= 1)


def test_ring_travels_as_far_as_needed():
    """At 4 ranks (8 chunks, head-tail) each chunk travels the ring only as far as its last user, on one arm or two:
    a causal mask's forward sends what p2p sends, holding fewer remote chunks at once; a window's chunks make one
    hop; chunk 1 (rank 1), read by ranks 0 and 2, goes one hop each way rather than 3 hops one way."""
    causal_plan, window_plan, neighbours_plan = (cp.plan(mask, 8 * CHUNK, 4, block_size=CHUNK)
                                                 for mask in (causal, window, neighbours))  # fmt: skip
    assert [sum(causal_plan.ring_reach(c, way) for way in (1, -1)) for c in range(8)] == [3, 3, 3, 3, 3, 2, 1, 0]
    assert causal_plan.traffic("ring", 1)[0] == causal_plan.traffic("p2p", 1)[0] == 18  # of an all-gather's 24
    assert causal_plan.remote_chunks_held("ring") < causal_plan.remote_chunks_held("p2p") == 6
    assert all(hops == (1,) for c in range(8) for hops in window_plan.ring_arms(c).values())
    assert window_plan.ring_held(1, 1) == [(0, 1), (5, -1)]  # chunk 0 from rank 0, chunk 5 (window reaches 6) rank 2
    assert neighbours_plan.ring_arms(1) == {1: (1,), -1: (1,)}
    assert neighbours_plan.traffic("ring", 1)[0] == neighbours_plan.traffic("p2p", 1)[0]


def test_rebound_or_rewritten_captured_mask_values(randn):
    """The plan and the pairs' tables are cached per mask: a document-id tensor rebound to another, or written in
    place, must not reuse them (it did: a silently wrong output)."""
    global DOCS
    q, k, v = (randn(1, 2, 4 * CHUNK, D, dtype=torch.float64) for _ in range(3))
    saved = DOCS
    try:
        for step in range(3):
            if step == 0:
                DOCS = torch.tensor([0] * 2 * CHUNK + [1] * 2 * CHUNK, dtype=torch.int32)
            elif step == 1:
                DOCS = torch.zeros(4 * CHUNK, dtype=torch.int32)  # rebound: one document
            else:
                DOCS[CHUNK + 3 :] = 1  # written in place
            out = cp.unshard(cp.flex_attention(*(cp.shard(t) for t in (q, k, v)), mask_mod=document))
            torch.testing.assert_close(out, fc.flex_attention(q, k, v, mask_mod=document), atol=1e-10, rtol=1e-10)
    finally:
        DOCS = saved


def test_shard_round_trip_and_plan_without_ranks(randn):
    """Without a process group: one rank, shard is the identity's chunks in order; the plan of a window at 4 ranks
    (no communication needed to compute it) skips exactly the pairs with nothing unmasked."""
    x = randn(1, 1, 64, 4)
    assert torch.equal(cp.unshard(cp.shard(x)), x)
    plan = cp.plan(window, 8 * CHUNK, 4)
    for qc in range(8):
        for kc in range(8):
            q_idx = torch.arange(qc * CHUNK, (qc + 1) * CHUNK)[:, None]
            kv_idx = torch.arange(kc * CHUNK, (kc + 1) * CHUNK)[None, :]
            assert ((qc, kc) in plan.needed) == bool(window(0, 0, q_idx, kv_idx).any())


def test_one_gpu_script_runs_quick():
    """benchmarks/cp_one_gpu.py (the lead runs it on a GPU) with --quick: 2 ranks on CPU, tiny shapes; every rank
    within its bound, and the overlap table printed."""
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "cp_one_gpu.py"
    command = [sys.executable, str(script), "--quick"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| yes |") == 4 and "| NO |" not in done.stdout  # 2 ranks x 2 schedules
    assert "| 2 | document | 1 | p2p |" in done.stdout
