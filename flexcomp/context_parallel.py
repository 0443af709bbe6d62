"""Context parallelism: one sequence sharded along its length across the ranks of a torch.distributed group.

Each rank holds a shard of q, k and v; `flex_attention` returns the rank's shard of the output (and lse), exact and
differentiable, for any score_mod / mask_mod, which see global positions.  The sequence is cut into chunks; with
`load_balance` (the default, as torch's context_parallel) rank r holds chunks r and 2W-1-r of 2W, so that causal-like
masks give every rank the same work.

Which (q chunk, kv chunk) pairs have anything unmasked is decided on the host by the sparsity analysis, run on the
mask with each pair's offsets as constants (`Plan`).  A rank receives only the K/V chunks its q chunks need, by
point-to-point sends between the ranks (torch.distributed, gloo or NCCL), and attends each needed pair with
flexcomp's kernels, its mods shifted by the pair's offsets (0-d tensors: one kernel for every pair); the pairs'
outputs are merged exactly by their log-sum-exp.  Empty pairs are neither sent nor computed.  The transfers run
while the rank attends its own chunks' pairs; in the backward the gradients of the received K/V chunks travel back
to their owners.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .blockmask import BlockMask, create_block_mask
from .ir import free_args
from .mods import as_mod

# ---------------------------------------------------------------- sharding


Layout = tuple[tuple[int, ...], ...]  # the chunks each rank holds (`balanced_layout`)


def chunks_of(rank: int, world: int, load_balance: bool | Layout = True) -> tuple[int, ...]:
    """The sequence chunks rank `rank` holds, in the order they lie in its shard: `load_balance` True is torch's
    head-tail (chunks r and 2W-1-r of 2W), False one contiguous chunk each, a Layout (`balanced_layout`) its own."""
    if isinstance(load_balance, tuple):
        return load_balance[rank]
    return (rank, 2 * world - 1 - rank) if load_balance else (rank,)


def chunk_count(world: int, load_balance: bool | Layout = True) -> int:
    if isinstance(load_balance, tuple):
        return sum(map(len, load_balance))
    return 2 * world if load_balance else world


def _world(group: Any) -> tuple[int, int]:
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, group: Any = None, dim: int = 2, load_balance: bool | Layout = True) -> torch.Tensor:
    """This rank's shard of `x` along `dim` (the sequence dim of [B, H, L, D] by default)."""
    rank, world = _world(group)
    n_chunks = chunk_count(world, load_balance)
    if x.shape[dim] % n_chunks:
        raise ValueError(f"sequence length {x.shape[dim]} must be a multiple of {n_chunks} chunks "
                         f"({world} ranks{', load balanced' if load_balance else ''})")  # fmt: skip
    parts = x.chunk(n_chunks, dim)
    return torch.cat([parts[c] for c in chunks_of(rank, world, load_balance)], dim)


def unshard(x: torch.Tensor, group: Any = None, dim: int = 2, load_balance: bool | Layout = True) -> torch.Tensor:
    """The whole sequence from every rank's shard (an all-gather)."""
    _, world = _world(group)
    if world == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    per_rank = len(chunks_of(0, world, load_balance))
    parts: dict[int, torch.Tensor] = {}
    for r, t in enumerate(gathered):
        for c, piece in zip(chunks_of(r, world, load_balance), t.chunk(per_rank, dim)):
            parts[c] = piece
    return torch.cat([parts[c] for c in sorted(parts)], dim)


# ---------------------------------------------------------------- the plan: which pairs are needed


@dataclass(frozen=True)
class Plan:
    """Which (q chunk, kv chunk) pairs have anything unmasked, for a mask, a length and a number of ranks."""

    world: int
    load_balance: bool | Layout
    chunk_len: int
    needed: frozenset[tuple[int, int]]
    tiles: tuple[tuple[tuple[int, int], int], ...] = ()  # ((q chunk, kv chunk), tiles visited) of needed pairs

    @property
    def n_chunks(self) -> int:
        return chunk_count(self.world, self.load_balance)

    def work(self, rank: int) -> int:
        """Tiles rank `rank` attends (each needed pair's visited tiles: the work, not the token count)."""
        mine = chunks_of(rank, self.world, self.load_balance)
        return sum(n for (qc, _), n in self.tiles if qc in mine)

    def owner(self, chunk: int) -> int:
        return next(r for r in range(self.world) if chunk in chunks_of(r, self.world, self.load_balance))

    def kv_chunks_for(self, rank: int) -> list[int]:
        """The kv chunks rank `rank` attends to (its own and received), ascending."""
        mine = chunks_of(rank, self.world, self.load_balance)
        return sorted({kc for qc, kc in self.needed if qc in mine})

    def bytes_sent(self, kv_bytes_per_chunk: int) -> tuple[int, int]:
        """(K/V bytes this plan sends, bytes an all-gather of every chunk would send)."""
        sent = sum(kv_bytes_per_chunk for r in range(self.world) for kc in self.kv_chunks_for(r)
                   if self.owner(kc) != r)  # fmt: skip
        every = self.world * (self.n_chunks - len(chunks_of(0, self.world, self.load_balance))) * kv_bytes_per_chunk
        return sent, every


def plan(mask_mod: Any, seq_len: int, world: int, load_balance: bool | Layout = True, batch: int = 1, heads: int = 1,
         block_size: int = 128) -> Plan:  # fmt: skip
    """The pairs of chunks the mask leaves anything unmasked in, from the sparsity analysis of the mask shifted by
    each pair's offsets (conservative: a pair the analysis cannot decide counts as needed)."""
    n_chunks = chunk_count(world, load_balance)
    chunk_len = seq_len // n_chunks
    pairs = [(qc, kc) for qc in range(n_chunks) for kc in range(n_chunks)]
    if mask_mod is None:
        tiles_each = (-(-chunk_len // block_size)) ** 2
        return Plan(world, load_balance, chunk_len, frozenset(pairs), tuple((p, tiles_each) for p in pairs))
    tiles = [(p, _tiles_visited(mask_mod, p[0] * chunk_len, p[1] * chunk_len, chunk_len, batch, heads, block_size))
             for p in pairs]  # fmt: skip
    tiles = tuple((p, n) for p, n in tiles if n)
    return Plan(world, load_balance, chunk_len, frozenset(p for p, _ in tiles), tiles)


def _tiles_visited(mask_mod: Any, q_offset: int, kv_offset: int, chunk_len: int, batch: int, heads: int,
                   block: int) -> int:  # fmt: skip
    """Tiles of one pair of chunks the kernels would visit (0: the pair is empty), from the analysis alone."""
    bm = _offset_block_mask(mask_mod, q_offset, kv_offset, chunk_len, batch, heads, "cpu", block, exact=False)
    full = bm.full_kv_num_blocks
    return int(bm.kv_num_blocks.sum()) + (int(full.sum()) if full is not None else 0)


def _offset_block_mask(mask_mod: Any, q_offset: int, kv_offset: int, chunk_len: int, batch: int, heads: int,
                       device: Any, block: int, exact: bool = True) -> BlockMask:  # fmt: skip
    """The block mask of one pair of chunks: the mask at global positions, the offsets Python ints (constants to
    the analysis, which so finds the pair's closed form), over batch and heads only where the mask reads b / h."""
    mask_fn = getattr(mask_mod, "fn", mask_mod)

    def pair_mask(b, h, q_idx, kv_idx):
        return mask_fn(b, h, q_idx + q_offset, kv_idx + kv_offset)

    used = free_args(as_mod(mask_mod, "mask").ir)
    return create_block_mask(pair_mask, batch if "b" in used else None, heads if "h" in used else None, chunk_len,
                             chunk_len, device=device, BLOCK_SIZE=min(block, _pow2_at_most(chunk_len)),
                             exact=exact)  # fmt: skip


def balanced_layout(mask_mod: Any, seq_len: int, world: int, batch: int = 1, heads: int = 1,
                    block_size: int = 128) -> Layout:  # fmt: skip
    """Two chunks of 2W per rank, assigned so that the ranks' work (tiles visited, from the analysis) is as even
    as a greedy assignment, largest chunk first, makes it; head-tail where that is at least as even.  Pass it as
    `load_balance` to `shard`, `unshard` and `flex_attention`."""
    the_plan = plan(mask_mod, seq_len, world, True, batch, heads, block_size)
    per_chunk = [0] * the_plan.n_chunks
    for (qc, _), n in the_plan.tiles:
        per_chunk[qc] += n
    ranks: list[list[int]] = [[] for _ in range(world)]
    for chunk in sorted(range(the_plan.n_chunks), key=lambda c: -per_chunk[c]):
        open_ranks = [r for r in range(world) if len(ranks[r]) < 2]
        ranks[min(open_ranks, key=lambda r: sum(per_chunk[c] for c in ranks[r]))].append(chunk)
    greedy = tuple(tuple(sorted(r)) for r in ranks)
    head_tail = tuple(chunks_of(r, world, True) for r in range(world))
    heaviest = lambda layout: max(sum(per_chunk[c] for c in chunks) for chunks in layout)
    return greedy if heaviest(greedy) < heaviest(head_tail) else head_tail


def _pow2_at_most(n: int) -> int:
    return max(16, 1 << (n.bit_length() - 1))


# ---------------------------------------------------------------- attention


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Any = None,
                   block_mask: Any = None, scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options: dict | None = None, *, mask_mod: Any = None,
                   group: Any = None, load_balance: bool | Layout = True, backend: str = "auto") -> Any:  # fmt: skip
    """flexcomp.flex_attention's arguments on this rank's shards of q, k, v (from `shard`): this rank's shard of
    the output (and of lse with `return_lse`).  Mods see global positions; a `block_mask` (built for the whole
    sequence) gives its mask_mod, whose tiles are re-derived per pair of chunks.  Differentiable in q, k, v and the
    score_mod's captured tensors (each rank gets the gradient of its own pairs: sum them over the group, as data
    parallelism does, for a parameter every rank holds)."""
    if block_mask is not None:
        if mask_mod is not None:
            raise ValueError("pass mask_mod or block_mask, not both: a block mask carries its own mask_mod")
        mask_mod = block_mask.mask_mod
    rank, world = _world(group)
    per_rank = len(chunks_of(rank, world, load_balance))
    local_len = query.shape[2]
    if local_len % per_rank or key.shape[2] != local_len:
        raise ValueError(f"q and k shards must have the same length, a multiple of {per_rank}; got "
                         f"{local_len} and {key.shape[2]}")  # fmt: skip
    chunk_len = local_len // per_rank
    the_plan = _cached_plan(mask_mod, chunk_len * per_rank * world, world, load_balance, query.shape[0],
                            query.shape[1], min(128, _pow2_at_most(chunk_len)))  # fmt: skip
    mine = chunks_of(rank, world, load_balance)
    k_parts, v_parts = key.split(chunk_len, 2), value.split(chunk_len, 2)
    local = {c: (k_parts[i], v_parts[i]) for i, c in enumerate(mine)}
    in_flight: list = []
    local, remote = _exchanged(the_plan, rank, group, local, in_flight)  # sends and receives start now
    scale = query.shape[-1] ** -0.5 if scale is None else scale

    def attend(q, qc, sources):
        return [_pair(q, *sources[kc], qc, kc, the_plan, score_mod, mask_mod, scale, enable_gqa, kernel_options,
                      backend) for kc in sorted(sources) if (qc, kc) in the_plan.needed]  # fmt: skip

    q_chunks = [query[:, :, i * chunk_len : (i + 1) * chunk_len] for i in range(len(mine))]
    parts = [attend(q, qc, local) for q, qc in zip(q_chunks, mine)]  # the local pairs overlap the transfers
    _wait(in_flight)
    outs, lses, computed = [], [], 0
    for q, qc, own in zip(q_chunks, mine, parts):
        pairs = own + attend(q, qc, remote)
        computed += len(pairs)
        out, lse = _merged(pairs, q, value.shape[-1])
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    if not computed:  # every pair of this rank is empty: still part of the graph, so that its backward joins the
        out = out + 0 * sum(t.sum() for pair in local.values() for t in pair) + 0 * query.sum()  # exchange
    return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=64)
def _cached_plan(mask_mod: Any, seq_len: int, world: int, load_balance: bool | Layout, batch: int, heads: int,
                 block: int) -> Plan:  # fmt: skip
    return plan(mask_mod, seq_len, world, load_balance, batch, heads, block)


def _pair(q, k, v, qc, kc, the_plan, score_mod, mask_mod, scale, enable_gqa, kernel_options, backend):
    """(out, lse) of q chunk qc against kv chunk kc, the mods at global positions."""
    from .api import flex_attention as attend

    q_off, kv_off = qc * the_plan.chunk_len, kc * the_plan.chunk_len
    shifted_score, shifted_mask = _shifted_mods(score_mod, mask_mod, q_off, kv_off, q.device)
    block_mask = None
    if shifted_mask is not None:
        block_mask = _pair_block_mask(mask_mod, shifted_mask, q_off, kv_off, the_plan.chunk_len, q.shape[0],
                                      q.shape[1], q.device)  # fmt: skip
    return attend(q, k, v, score_mod=shifted_score, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                  return_lse=True, kernel_options=kernel_options, backend=backend)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _shifted_mods(score_mod: Any, mask_mod: Any, q_off: int, kv_off: int, device: torch.device) -> tuple[Any, Any]:
    """The mods read at global positions: q_idx + q_offset, kv_idx + kv_offset, the offsets captured as 0-d int32
    tensors (so every pair's mods have one IR and one compiled kernel; each pair keeps its own tensors, which the
    backward reads again)."""
    q_offset = torch.tensor(q_off, dtype=torch.int32, device=device)
    kv_offset = torch.tensor(kv_off, dtype=torch.int32, device=device)
    score_fn = getattr(score_mod, "fn", score_mod)
    mask_fn = getattr(mask_mod, "fn", mask_mod)
    shifted_score = shifted_mask = None
    if score_fn is not None:

        def shifted_score(score, b, h, q_idx, kv_idx):
            return score_fn(score, b, h, q_idx + q_offset, kv_idx + kv_offset)

    if mask_fn is not None:

        def shifted_mask(b, h, q_idx, kv_idx):
            return mask_fn(b, h, q_idx + q_offset, kv_idx + kv_offset)

    return shifted_score, shifted_mask


@functools.lru_cache(maxsize=256)
def _pair_tables(mask_mod: Any, q_off: int, kv_off: int, chunk_len: int, batch: int, heads: int,
                 device: torch.device) -> BlockMask:  # fmt: skip
    """The pair's block mask tables, from the analysis of the mask with the offsets as constants (exact)."""
    return _offset_block_mask(mask_mod, q_off, kv_off, chunk_len, batch, heads, device, 128)


def _pair_block_mask(mask_mod, shifted_mask, q_off, kv_off, chunk_len, batch, heads, device) -> BlockMask:
    """The pair's tables, with the shifted mask_mod (tensor offsets) applied in their PARTIAL tiles."""
    tables = _pair_tables(mask_mod, q_off, kv_off, chunk_len, batch, heads, device)
    return BlockMask.from_kv_blocks(tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks,
                                    tables.full_kv_indices, BLOCK_SIZE=tables.BLOCK_SIZE, mask_mod=shifted_mask,
                                    seq_lengths=tables.seq_lengths)  # fmt: skip


def _merged(parts: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, dv: int) -> tuple[torch.Tensor, ...]:
    """Exact merge of partial attentions by their log-sum-exp; rows masked everywhere give 0 and -inf, never NaN
    (also in the gradients)."""
    B, H, Lq, _ = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32  # and lse's dtype, as flex_attention's
    if not parts:
        return q.new_zeros(B, H, Lq, dv), q.new_full((B, H, Lq), -math.inf, dtype=work)
    outs = torch.stack([o.to(work) for o, _ in parts])
    lses = torch.stack([lse.to(work) for _, lse in parts])
    top = lses.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lses - top)
    total = weights.sum(0)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    out = (weights[..., None] * outs).sum(0) / safe[..., None]
    lse = torch.where(empty, torch.full_like(total, -math.inf), top + torch.log(safe))
    return out.to(q.dtype), lse


# ---------------------------------------------------------------- communication


def _exchanged(the_plan: Plan, rank: int, group: Any, local: dict[int, tuple[torch.Tensor, torch.Tensor]],
               in_flight: list) -> tuple[dict, dict]:  # fmt: skip
    """(this rank's K/V chunks, the chunks its pairs need from other ranks), both through one exchange: the
    received ones by point-to-point sends (only the needed ones), running asynchronously (their requests go to
    `in_flight`, to be waited for before those chunks are read).  The local chunks pass through it so that every
    rank's backward runs the exchange's, and so joins the transfers that return other ranks' gradients."""
    if the_plan.world == 1:
        return local, {}
    wanted = [kc for kc in the_plan.kv_chunks_for(rank) if the_plan.owner(kc) != rank]
    sends = [(kc, r) for kc in sorted(local) for r in range(the_plan.world)
             if r != rank and kc in the_plan.kv_chunks_for(r)]  # fmt: skip
    flat = _Exchange.apply(group, rank, the_plan, tuple(sends), tuple(wanted), in_flight,
                           *(t for kc in sorted(local) for t in local[kc]))  # fmt: skip
    own = {kc: (flat[2 * i], flat[2 * i + 1]) for i, kc in enumerate(sorted(local))}
    received = flat[2 * len(own) :]
    return own, {kc: (received[2 * i], received[2 * i + 1]) for i, kc in enumerate(wanted)}


def _global_rank(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _Exchange(torch.autograd.Function):
    """Send this rank's K/V chunks to the ranks that need them and receive the chunks it needs; backward sends the
    received chunks' gradients back to their owners and adds the returned ones to the local chunks'."""

    @staticmethod
    def forward(ctx, group, rank, the_plan, sends, wanted, in_flight, *local_kv):
        mine = sorted(chunks_of(rank, the_plan.world, the_plan.load_balance))
        local = {kc: (local_kv[2 * i], local_kv[2 * i + 1]) for i, kc in enumerate(mine)}
        template_k, template_v = local[mine[0]]
        ctx.templates = (template_k.new_empty(template_k.shape), template_v.new_empty(template_v.shape))
        received = [(torch.empty_like(template_k), torch.empty_like(template_v)) for _ in wanted]
        ops = []
        for kc, dst in sends:
            ops += [dist.P2POp(dist.isend, t.contiguous(), _global_rank(group, dst), group) for t in local[kc]]
        for kc, (k, v) in zip(wanted, received):
            src = _global_rank(group, the_plan.owner(kc))
            ops += [dist.P2POp(dist.irecv, k, src, group), dist.P2POp(dist.irecv, v, src, group)]
        if ops:
            in_flight.extend(dist.batch_isend_irecv(ops))
        ctx.exchange = (group, rank, the_plan, sends, wanted, mine)
        return (*(t.clone() for t in local_kv), *(t for pair in received for t in pair))

    @staticmethod
    def backward(ctx, *grads):
        group, _, the_plan, sends, wanted, mine = ctx.exchange
        passed, grads = grads[: 2 * len(mine)], grads[2 * len(mine) :]  # the local chunks', the received ones'
        ops, returned = [], []
        templates = ctx.templates
        for i, kc in enumerate(wanted):  # the gradients of what this rank received go back to the owners
            src = _global_rank(group, the_plan.owner(kc))
            for g, like in zip(grads[2 * i : 2 * i + 2], templates):
                g = torch.zeros_like(like) if g is None else g
                ops.append(dist.P2POp(dist.isend, g.contiguous(), src, group))
        for kc, dst in sends:  # and those of what it sent come back
            pair = [torch.empty_like(like) for like in templates]
            returned.append((kc, pair))
            ops += [dist.P2POp(dist.irecv, t, _global_rank(group, dst), group) for t in pair]
        _run(ops)
        local_grads = {kc: list(passed[2 * i : 2 * i + 2]) for i, kc in enumerate(mine)}
        for kc, (gk, gv) in returned:
            for j, g in enumerate((gk, gv)):
                local_grads[kc][j] = g if local_grads[kc][j] is None else local_grads[kc][j] + g
        flat = [g for kc in mine for g in local_grads[kc]]
        return (None, None, None, None, None, None, *flat)


def _run(ops: list) -> None:
    if ops:
        _wait(dist.batch_isend_irecv(ops))


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()
