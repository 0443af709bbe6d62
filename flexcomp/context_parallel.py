"""Context parallelism: one sequence sharded along its length across the ranks of a torch.distributed group.

Each rank holds a shard of q, k and v; `flex_attention` returns the rank's shard of the output (and lse), exact and
differentiable, for any score_mod / mask_mod, which see global positions.  The sequence is cut into chunks; with
`load_balance` (the default, as torch's context_parallel) rank r holds chunks r and 2W-1-r of 2W, so that causal-like
masks give every rank the same work.

Which (q chunk, kv chunk) pairs have anything unmasked is decided on the host by the sparsity analysis, run on the
mask with each pair's offsets as constants (`Plan`).  A rank receives only the K/V chunks its q chunks need, by
point-to-point sends between the ranks (torch.distributed, gloo or NCCL), and attends each needed pair with
flexcomp's kernels, its mods shifted by the pair's offsets (0-d tensors: one kernel for every pair); the pairs'
outputs are merged exactly by their log-sum-exp.  Empty pairs are neither sent nor computed.  Two schedules:
"p2p" (the default) sends each needed chunk straight to its users, all at once, while a rank attends its own
chunks' pairs, and its backward returns the received chunks' gradients to their owners; "ring" passes chunks one
rank a step, each only as far as its last user (up the ring, down, or both), each step's transfers under the
previous step's kernels, so that a rank holds O(1) remote chunks; its dK/dV accumulate as they travel.
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
from .mods import as_mod, specialized_mod

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


def _as_group(group: Any) -> Any:
    """A process group from a group, None (the default group) or a one-dimensional DeviceMesh (as torch's
    `context_parallel` takes)."""
    return group.get_group() if hasattr(group, "get_group") else group


def shard(x: torch.Tensor, group: Any = None, dim: int = 2, load_balance: bool | Layout = True) -> torch.Tensor:
    """This rank's shard of `x` along `dim` (the sequence dim of [B, H, L, D] by default)."""
    rank, world = _world(_as_group(group))
    n_chunks = chunk_count(world, load_balance)
    if x.shape[dim] % n_chunks:
        raise ValueError(f"sequence length {x.shape[dim]} must be a multiple of {n_chunks} chunks "
                         f"({world} ranks{', load balanced' if load_balance else ''})")  # fmt: skip
    parts = x.chunk(n_chunks, dim)
    return torch.cat([parts[c] for c in chunks_of(rank, world, load_balance)], dim)


def unshard(x: torch.Tensor, group: Any = None, dim: int = 2, load_balance: bool | Layout = True) -> torch.Tensor:
    """The whole sequence from every rank's shard (an all-gather)."""
    group = _as_group(group)
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
        """(K/V bytes the p2p schedule's forward sends, bytes an all-gather of every chunk would send)."""
        every = self.world * (self.n_chunks - len(chunks_of(0, self.world, self.load_balance))) * kv_bytes_per_chunk
        return self.traffic("p2p", kv_bytes_per_chunk)[0], every

    def users(self, chunk: int) -> frozenset[int]:
        """The ranks whose pairs read kv chunk `chunk`."""
        return frozenset(self.owner(qc) for qc, kc in self.needed if kc == chunk)

    def ring_arms(self, chunk: int) -> dict[int, tuple[int, ...]]:
        """The ring's arms for `chunk`: {way: the hops at which a rank needs it going that way}, way +1 carrying it
        from rank r to r + 1, -1 the other way.  Its remote users are split into those reached going up and those
        reached going down, where the two arms' lengths sum least (then: fewer arms).  With head-tail, a causal
        mask's early chunks go up and its late ones down; a document's chunk goes both ways to its neighbours."""
        return self._all_arms[chunk]

    def ring_reach(self, chunk: int, way: int) -> int:
        """How far `chunk` travels going `way` (0: not that way)."""
        return max(self.ring_arms(chunk).get(way, ()), default=0)

    def ring_held(self, rank: int, step: int) -> list[tuple[int, int]]:
        """The (kv chunk, way) rank `rank` holds at ring step `step`: at step 0 its own chunks (way 0), then those
        that set out `step` ranks before it, either way, and still travel; ascending."""
        if step == 0:
            return [(c, 0) for c in sorted(chunks_of(rank, self.world, self.load_balance))]
        return sorted((c, way) for way in (1, -1) for c in chunks_of((rank - way * step) % self.world, self.world,
                      self.load_balance) if self.ring_reach(c, way) >= step)  # fmt: skip

    @functools.cached_property
    def _all_arms(self) -> dict[int, dict[int, tuple[int, ...]]]:
        return {c: self._arms(c) for c in range(self.n_chunks)}

    def _arms(self, chunk: int) -> dict[int, tuple[int, ...]]:
        far = sorted({(r - self.owner(chunk)) % self.world for r in self.users(chunk)} - {0})  # hops going up

        def cost(split: int) -> tuple[int, int]:  # far[:split] reached going up, the rest going down
            up, down = far[:split], far[split:]
            return (up[-1] if up else 0) + (self.world - down[0] if down else 0), bool(up) + bool(down)

        split = min(range(len(far) + 1), key=cost)
        arms = {1: tuple(far[:split]), -1: tuple(sorted(self.world - d for d in far[split:]))}
        return {way: hops for way, hops in arms.items() if hops}

    def traffic(self, schedule: str, kv_bytes_per_chunk: int) -> tuple[int, int]:
        """(bytes the forward sends, bytes the backward sends) under `schedule`, all ranks together.  The p2p
        backward returns each received chunk's dK/dV to its owner; the ring's backward passes K/V around again
        (it kept none), with each arm's dK/dV accumulating from its first user to its last, then sent home."""
        chunks = range(self.n_chunks)
        if schedule == "p2p":
            sent = sum(len(self.users(c) - {self.owner(c)}) for c in chunks) * kv_bytes_per_chunk
            return sent, sent
        sends = [self.ring_sends(r, step) for r in range(self.world) for step in range(self.world + 1)]
        forward = sum(kv for kv, _ in sends)
        return forward * kv_bytes_per_chunk, (forward + sum(sums for _, sums in sends)) * kv_bytes_per_chunk

    def ring_sends(self, rank: int, step: int) -> tuple[int, int]:
        """(K/V chunks, dK/dV sums) rank `rank` sends at ring step `step`, while it computes that step's pairs: the
        chunks it holds that travel on (forward, and again in the backward), and the sums of what it held at the
        step before that travel on or go home (backward; step `world` has only those)."""
        held = self.ring_held(rank, step) if step < self.world else []
        kv = sum(self.ring_reach(c, onward) > step for c, way in held for onward in ((-1, 1) if way == 0 else (way,)))
        before = self.ring_held(rank, step - 1) if step else []
        hop = step - 1
        sums = sum(self.ring_reach(c, way) == hop or self.ring_arms(c)[way][0] <= hop < self.ring_reach(c, way)
                   for c, way in before if way)  # fmt: skip
        return kv, sums

    def remote_chunks_held(self, schedule: str) -> int:
        """The most remote kv chunks a rank holds at once (received, in flight or kept for the backward)."""
        if schedule == "p2p":
            return max(sum(self.owner(c) != r for c in self.kv_chunks_for(r)) for r in range(self.world))
        return max(len(self.ring_held(r, s)) * (s > 0) + len(self.ring_held(r, s + 1)) * (s + 1 < self.world)
                   for r in range(self.world) for s in range(self.world))  # fmt: skip


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


SCHEDULES = ("p2p", "ring")  # p2p: each needed chunk sent once, straight to its users; ring: passed rank to rank


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Any = None,
                   block_mask: Any = None, scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options: dict | None = None, *, mask_mod: Any = None,
                   group: Any = None, load_balance: bool | Layout = True, backend: str = "auto",
                   schedule: str = "p2p") -> Any:  # fmt: skip
    """flexcomp.flex_attention's arguments on this rank's shards of q, k, v (from `shard`): this rank's shard of
    the output (and of lse with `return_lse`).  Mods see global positions; a `block_mask` (built for the whole
    sequence) gives its mask_mod, whose tiles are re-derived per pair of chunks.  Differentiable in q, k, v and the
    score_mod's captured tensors (each rank gets the gradient of its own pairs: sum them over the group, as data
    parallelism does, for a parameter every rank holds).

    `schedule` "p2p" (the default: the fewest bytes, no recomputation) sends each needed K/V chunk straight to the
    ranks that need it, all at once; "ring" passes chunks from rank to rank, one step at a time, so that a rank holds
    O(1) remote chunks however many ranks there are (its backward recomputes each pair's forward)."""
    if block_mask is not None:
        if mask_mod is not None:
            raise ValueError("pass mask_mod or block_mask, not both: a block mask carries its own mask_mod")
        mask_mod = block_mask.mask_mod
    if schedule not in SCHEDULES:
        raise ValueError(f"{schedule=} must be one of {SCHEDULES}")
    group = _as_group(group)
    rank, world = _world(group)
    per_rank = len(chunks_of(rank, world, load_balance))
    local_len = query.shape[2]
    if local_len % per_rank or key.shape[2] != local_len:
        raise ValueError(f"q and k shards must have the same length, a multiple of {per_rank}; got "
                         f"{local_len} and {key.shape[2]}")  # fmt: skip
    chunk_len = local_len // per_rank
    mask_values = _captured_values(mask_mod)
    the_plan = _cached_plan(mask_mod, chunk_len * per_rank * world, world, load_balance, query.shape[0],
                            query.shape[1], min(128, _pow2_at_most(chunk_len)), mask_values)  # fmt: skip
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    pairs = _Pairs(the_plan, rank, group, score_mod, mask_mod, mask_values, scale, enable_gqa, kernel_options,
                   backend)  # fmt: skip
    if world > 1:
        _first_collective(group)
    schedule_function = _Ring if schedule == "ring" else _P2P
    out, lse = schedule_function.apply(pairs, query, key, value, *_captured_requiring_grad(score_mod))
    return (out, lse) if return_lse else out


_STARTED_GROUPS: set[int] = set()


def _first_collective(group: Any) -> None:
    """NCCL wants a group's first collective to involve all its ranks, and batch_isend_irecv may be that one, skipped
    by a rank with nothing to send or receive: a barrier first, once per group."""
    key = id(dist.group.WORLD if group is None else group)
    if key not in _STARTED_GROUPS and dist.get_backend(group) == "nccl":
        dist.barrier(group=group)
    _STARTED_GROUPS.add(key)


@functools.lru_cache(maxsize=64)
def _cached_plan(mask_mod: Any, seq_len: int, world: int, load_balance: bool | Layout, batch: int, heads: int,
                 block: int, mask_values: tuple) -> Plan:  # fmt: skip
    return plan(mask_mod, seq_len, world, load_balance, batch, heads, block)


class _Same:
    """A captured value in a cache key, equal only to itself (and kept alive by the key, so its id is not reused)."""

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _captured_values(mask_mod: Any) -> tuple:
    """What the plan and the pairs' tables depend on beyond the mask's code: the values it captures, each tensor by
    identity and version (rebinding a document-id tensor, or writing into it, changes the key)."""
    if mask_mod is None:
        return ()
    values = specialized_mod(mask_mod, "mask").tensors()
    return tuple((name, _Same(v), v._version) if isinstance(v, torch.Tensor) else (name, _Same(v))
                 for name, v in sorted(values.items()))  # fmt: skip


@dataclass
class _Pairs:
    """What attending one (q chunk, kv chunk) pair needs beyond its tensors: the plan, this rank and the call's
    arguments."""

    plan: Plan
    rank: int
    group: Any
    score_mod: Any
    mask_mod: Any
    mask_values: tuple  # `_captured_values` of mask_mod
    scale: float
    enable_gqa: bool
    kernel_options: dict | None
    backend: str

    @property
    def mine(self) -> tuple[int, ...]:
        return chunks_of(self.rank, self.plan.world, self.plan.load_balance)

    def transfers(self) -> _Transfers:
        return _Transfers(self.group, self.plan.world)

    def chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's shard `x` cut into its chunks (in the order of `mine`)."""
        return x.split(self.plan.chunk_len, 2)

    def attend_all(self, q: torch.Tensor, qc: int, sources: dict) -> list:
        """(out, lse) of q chunk qc against each kv chunk of `sources` ({chunk: (k, v)}) that it needs."""
        return [self.attend(q, qc, *sources[kc], kc) for kc in sorted(sources) if (qc, kc) in self.plan.needed]

    def attend(self, q: torch.Tensor, qc: int, k: torch.Tensor, v: torch.Tensor, kc: int) -> tuple:
        """(out, lse) of q chunk qc against kv chunk kc, the mods at global positions."""
        from .api import flex_attention as attend

        q_off, kv_off = qc * self.plan.chunk_len, kc * self.plan.chunk_len
        shifted_score, shifted_mask = _shifted_mods(self.score_mod, self.mask_mod, q_off, kv_off, q.device)
        block_mask = None
        if shifted_mask is not None:
            block_mask = _pair_block_mask(self.mask_mod, self.mask_values, shifted_mask, q_off, kv_off,
                                          self.plan.chunk_len, q.shape[0], q.shape[1], q.device)  # fmt: skip
        return attend(q, k, v, score_mod=shifted_score, block_mask=block_mask, scale=self.scale,
                      enable_gqa=self.enable_gqa, return_lse=True, kernel_options=self.kernel_options,
                      backend=self.backend)  # fmt: skip


def _captured_requiring_grad(score_mod: Any) -> tuple[torch.Tensor, ...]:
    """The score_mod's captured tensors that want a gradient: each schedule's autograd Function takes them as
    inputs, as its backward computes their gradients itself."""
    if score_mod is None:
        return ()
    captured = specialized_mod(score_mod, "score").tensors().values()
    return tuple(t for t in captured if isinstance(t, torch.Tensor) and t.requires_grad)


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
def _pair_tables(mask_mod: Any, mask_values: tuple, q_off: int, kv_off: int, chunk_len: int, batch: int, heads: int,
                 device: torch.device) -> BlockMask:  # fmt: skip
    """The pair's block mask tables, from the analysis of the mask with the offsets as constants (exact)."""
    return _offset_block_mask(mask_mod, q_off, kv_off, chunk_len, batch, heads, device, 128)


def _pair_block_mask(mask_mod, mask_values, shifted_mask, q_off, kv_off, chunk_len, batch, heads, device) -> BlockMask:
    """The pair's tables, with the shifted mask_mod (tensor offsets) applied in their PARTIAL tiles."""
    tables = _pair_tables(mask_mod, mask_values, q_off, kv_off, chunk_len, batch, heads, device)
    return BlockMask.from_kv_blocks(tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks,
                                    tables.full_kv_indices, BLOCK_SIZE=tables.BLOCK_SIZE, mask_mod=shifted_mask,
                                    seq_lengths=tables.seq_lengths)  # fmt: skip


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # and lse's dtype, as flex_attention's


def _merged(parts: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, dv: int,
            out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Exact merge of partial attentions by their log-sum-exp, the output in `out_dtype` (q's by default); rows
    masked everywhere give 0 and -inf, never NaN (also in the gradients)."""
    B, H, Lq, _ = q.shape
    work = _work_dtype(q)
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
    return out.to(out_dtype or q.dtype), lse


# ---------------------------------------------------------------- communication


class _P2P(torch.autograd.Function):
    """The p2p schedule.  Every needed K/V chunk goes straight from its owner to the ranks that need it, all transfers
    at once, while the rank attends its own chunks' pairs; then the received chunks' pairs.  Each pair's forward is
    recorded by autograd on leaves of its own and kept with the received chunks for the backward (the memory the
    ring saves; nothing is recomputed), which differentiates each pair against the merged out and lse as the ring's
    does, sends each received chunk's dK/dV share home and sums the shares of its own chunks in the work dtype
    (float32): one rounding to the K/V dtype per user of a chunk, as the ring's one per hop.  (Through autograd's
    own graph, a chunk used by two pairs had its gradients summed in bf16: W=4 causal dV over its bound on the H200.)"""

    @staticmethod
    def forward(ctx, pairs, query, key, value, *captured):
        plan = pairs.plan
        local = dict(zip(pairs.mine, zip(pairs.chunks(key), pairs.chunks(value))))
        transfers, received = pairs.transfers(), {}
        for kc, user in _p2p_sends(pairs):
            for t in local[kc]:
                transfers.send(t, user)
        for kc in _p2p_wanted(pairs):
            received[kc] = (torch.empty_like(local[pairs.mine[0]][0]), torch.empty_like(local[pairs.mine[0]][1]))
            for t in received[kc]:
                transfers.recv(t, plan.owner(kc))
        transfers.start()
        q_chunks, recorded, grads = pairs.chunks(query), {}, any(ctx.needs_input_grad)
        for q, qc in zip(q_chunks, pairs.mine):  # the own chunks' pairs while the others travel
            recorded.update(_record_all(pairs, q, qc, local, grads))
        transfers.wait()
        for q, qc in zip(q_chunks, pairs.mine):
            recorded.update(_record_all(pairs, q, qc, received, grads))
        merged = [_merged([(o.detach(), lse.detach()) for (c, _), (o, lse, _) in sorted(recorded.items()) if c == qc],
                          q, value.shape[-1]) for q, qc in zip(q_chunks, pairs.mine)]  # fmt: skip
        out, lse = torch.cat([o for o, _ in merged], 2), torch.cat([lse for _, lse in merged], 2)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.pairs, ctx.received, ctx.recorded = pairs, received, recorded
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        pairs = ctx.pairs
        query, key, value, out, lse = ctx.saved_tensors
        received, recorded = ctx.received, ctx.recorded
        per_q, dq, captured, dcaptured = _backward_inputs(pairs, query, out, lse, dout, dlse)
        transfers, returned = pairs.transfers(), []
        for kc in _p2p_wanted(pairs):  # the received chunks' shares go home first: the owners wait for them
            share = _contributions(pairs, per_q, kc, *received[kc], dq, captured, dcaptured, recorded)
            for g, like in zip(share or (None, None), received[kc]):
                transfers.send(torch.zeros_like(like) if g is None else g.to(like.dtype), pairs.plan.owner(kc))
        local = dict(zip(pairs.mine, zip(pairs.chunks(key), pairs.chunks(value))))
        for kc, user in _p2p_sends(pairs):  # and the shares of this rank's chunks come back
            returned.append((kc, [torch.empty_like(t) for t in local[kc]]))
            for t in returned[-1][1]:
                transfers.recv(t, user)
        transfers.start()
        home = {kc: _contributions(pairs, per_q, kc, *local[kc], dq, captured, dcaptured, recorded) for kc in local}
        transfers.wait()
        parts = {kc: _summed([home[kc], *(share for c, share in returned if c == kc)], key.dtype) for kc in local}
        return _backward_outputs(pairs, query, key, value, parts, dq, captured, dcaptured)


def _record_all(pairs: _Pairs, q, qc: int, sources: dict, grads: bool) -> dict:
    """{(qc, kc): `_recorded` pair} for each kv chunk of `sources` ({chunk: (k, v)}) that q chunk qc needs; without
    `grads` (nothing to differentiate) attended without recording."""
    needed = [kc for kc in sorted(sources) if (qc, kc) in pairs.plan.needed]
    if not grads:
        return {(qc, kc): (*pairs.attend(q, qc, *sources[kc], kc), None) for kc in needed}
    return {(qc, kc): _recorded(pairs, q, qc, *sources[kc], kc) for kc in needed}


def _p2p_sends(pairs: _Pairs) -> list[tuple[int, int]]:
    """(chunk, rank) for each of this rank's chunks and each other rank that needs it, in the order both ends use."""
    plan = pairs.plan
    return [(kc, r) for kc in sorted(pairs.mine) for r in range(plan.world)
            if r != pairs.rank and kc in plan.kv_chunks_for(r)]  # fmt: skip


def _p2p_wanted(pairs: _Pairs) -> list[int]:
    """The chunks of other ranks that this rank's pairs need, in the order their owners send them."""
    return [kc for kc in pairs.plan.kv_chunks_for(pairs.rank) if pairs.plan.owner(kc) != pairs.rank]


def _global_rank(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _Transfers:
    """Point-to-point transfers with the ranks of a group, started together and waited for together.  Where the
    backend cannot send device tensors (gloo), they go through host memory: what a test on one GPU needs."""

    def __init__(self, group: Any, world: int):
        self.group, self.world = group, world
        self.ops: list = []
        self.requests: list = []
        self.landing: list = []  # (device tensor, host buffer received for it)

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.contiguous()
        self._add(dist.isend, tensor.cpu() if self._through_host(tensor) else tensor, peer)

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        if self._through_host(tensor):
            host = torch.empty(tensor.shape, dtype=tensor.dtype)
            self.landing.append((tensor, host))
            tensor = host
        self._add(dist.irecv, tensor, peer)

    def start(self) -> _Transfers:
        if self.ops:
            self.requests = dist.batch_isend_irecv(self.ops)
        return self

    def wait(self) -> None:
        for request in self.requests:
            request.wait()
        with torch.no_grad():  # recorded, the copy would be the received chunk's last op: its gradient would stop
            for tensor, host in self.landing:  # there, never reaching the owner (p2p's dK/dV, wrong on one GPU)
                tensor.copy_(host)

    def _add(self, fn: Any, tensor: torch.Tensor, peer: int) -> None:
        """`peer` is a rank of the group, modulo its size (the ring's neighbours)."""
        self.ops.append(dist.P2POp(fn, tensor, _global_rank(self.group, peer % self.world), self.group))

    def _through_host(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type != "cpu" and dist.get_backend(self.group) == "gloo"


# ---------------------------------------------------------------- the ring


class _Ring(torch.autograd.Function):
    """The ring schedule.  Each kv chunk travels round the ring one rank a step, on one or two arms (up and down,
    `Plan.ring_arms`), each only as far as the last rank that needs it.  At step s a rank posts the sends of what
    it holds that travels on and the receives of step s + 1's chunks, attends its needed pairs with what it holds,
    merges them into a running (out, lse), then waits: at most two steps' chunks are held at once.

    Backward passes K/V around again (the forward kept none: that is the memory the ring saves) and recomputes each
    needed pair's forward to differentiate it against the merged out and lse.  On each arm a chunk's dK/dV
    accumulate as they travel, from the arm's first user to its last, which sends the sum home: one gradient buffer
    per held chunk and one message per hop, where returning every user's share to the owner would have the owner
    hold one buffer per user.
    """

    @staticmethod
    def forward(ctx, pairs, query, key, value, *captured):
        held = dict(zip(pairs.plan.ring_held(pairs.rank, 0), zip(pairs.chunks(key), pairs.chunks(value))))
        q_chunks = pairs.chunks(query)
        running: list = [None] * len(q_chunks)  # per q chunk: the (out, lse) merged so far, in the work dtype
        for step in range(pairs.plan.world):
            incoming: dict = {}
            transfers = _ring_kv_ops(pairs, step, held, incoming, key, pairs.transfers())
            transfers.start()
            sources = {kc: kv for (kc, _), kv in held.items()}  # a rank is on one arm of a chunk at most
            for i, (q, qc) in enumerate(zip(q_chunks, pairs.mine)):
                for part in pairs.attend_all(q, qc, sources):
                    so_far = [part] if running[i] is None else [running[i], part]
                    running[i] = _merged(so_far, q, value.shape[-1], _work_dtype(q))
            transfers.wait()
            held = incoming
        merged = [_merged([] if r is None else [r], q, value.shape[-1]) for r, q in zip(running, q_chunks)]
        out, lse = torch.cat([o for o, _ in merged], 2), torch.cat([lse for _, lse in merged], 2)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.pairs = pairs
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        pairs = ctx.pairs
        query, key, value, out, lse = ctx.saved_tensors
        per_q, dq, captured, dcaptured = _backward_inputs(pairs, query, out, lse, dout, dlse)
        held = dict(zip(pairs.plan.ring_held(pairs.rank, 0), zip(pairs.chunks(key), pairs.chunks(value))))
        home: dict = {}  # this rank's chunks' dK/dV: its own share (way 0) and each arm's sum, once back
        done: dict = {}  # what was held at the step before, its dK/dV accumulated so far
        for step in range(pairs.plan.world + 1):
            incoming, arriving = {}, {}
            transfers = _ring_grad_ops(pairs, step, done, arriving, home, key, pairs.transfers())
            if step < pairs.plan.world:
                _ring_kv_ops(pairs, step, held, incoming, key, transfers)
            transfers.start()
            local = {item: _contributions(pairs, per_q, item[0], *kv, dq, captured, dcaptured)
                     for item, kv in held.items()}  # fmt: skip
            transfers.wait()
            done = {item: _summed([arriving.get(item), local[item]], key.dtype) for item in held}
            home.update((item, g) for item, g in done.items() if item[1] == 0)
            held = incoming
        parts = {kc: _summed([g for (c, _), g in home.items() if c == kc], key.dtype) for kc in pairs.mine}
        return _backward_outputs(pairs, query, key, value, parts, dq, captured, dcaptured)


def _backward_inputs(pairs: _Pairs, query, out, lse, dout, dlse) -> tuple:
    """What both schedules' backwards start from: per q chunk (q, chunk, out, dout, lse, dlse), zeroed dQ chunks in
    the work dtype, the captured tensors that want gradients and their (empty) gradients."""
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    rows = [pairs.chunks(t.unsqueeze(-1)) for t in (lse, dlse)]  # lse's chunks, with a last dim to split
    per_q = list(zip(pairs.chunks(query), pairs.mine, pairs.chunks(out), pairs.chunks(dout), *rows))
    captured = _captured_requiring_grad(pairs.score_mod)
    dq = [torch.zeros(q.shape, dtype=_work_dtype(q), device=q.device) for q in pairs.chunks(query)]
    return per_q, dq, captured, [None] * len(captured)


def _backward_outputs(pairs: _Pairs, query, key, value, parts: dict, dq: list, captured, dcaptured) -> tuple:
    """The Function's gradients from each own chunk's summed [dK, dV] (None: no pair used it), dQ and the captured
    tensors' gradients."""
    dk, dv = ([parts[kc][j] if parts[kc] is not None else torch.zeros_like(part)
               for kc, part in zip(pairs.mine, pairs.chunks(t))] for j, t in enumerate((key, value)))  # fmt: skip
    grads_captured = [torch.zeros_like(t) if g is None else g.to(t.dtype) for t, g in zip(captured, dcaptured)]
    return (None, torch.cat(dq, 2).to(query.dtype), torch.cat(dk, 2), torch.cat(dv, 2), *grads_captured)


def _contributions(pairs: _Pairs, per_q: list, kc: int, k, v, dq: list, captured: tuple, dcaptured: list,
                   recorded: dict | None = None):  # fmt: skip
    """[dK, dV] of kv chunk kc from this rank's needed pairs (None if it needs none), in the work dtype; adds the
    pairs' dQ to `dq` and the captured tensors' gradients to `dcaptured`.  Each pair is differentiated through its
    forward as `recorded` holds it ({(q chunk, kv chunk): `_recorded`}, p2p's), else recomputed (the ring's)."""
    dk = dv = None
    for i, (q, qc, out, dout, lse, dlse) in enumerate(per_q):
        if (qc, kc) not in pairs.plan.needed:
            continue
        record = recorded[qc, kc] if recorded is not None else _recorded(pairs, q, qc, k, v, kc)
        grads = _pair_grads(record, out, dout, lse.squeeze(-1), dlse.squeeze(-1), captured)
        dq[i] += grads[0]
        dk = grads[1].to(dq[i].dtype) if dk is None else dk + grads[1]
        dv = grads[2].to(dq[i].dtype) if dv is None else dv + grads[2]
        for j, g in enumerate(grads[3:]):
            if g is not None:
                dcaptured[j] = g if dcaptured[j] is None else dcaptured[j] + g
    return None if dk is None else [dk, dv]


def _recorded(pairs: _Pairs, q, qc, k, v, kc) -> tuple:
    """(out, lse, (q, k, v)) of one pair, attended with autograd recording, on leaves of its own (so that each pair's
    gradients come out separately, to be summed in the work dtype)."""
    with torch.enable_grad():
        q_, k_, v_ = leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        return (*pairs.attend(q_, qc, k_, v_, kc), leaves)


def _pair_grads(record: tuple, out, dout, lse, dlse, captured) -> tuple:
    """(dq, dk, dv, *captured's) of one recorded pair.  With the merged output out = sum_i w_i o_i,
    w_i = exp(lse_i - lse): d o_i = w_i dout and d lse_i = w_i (rowsum(dout * (o_i - out)) + dlse)."""
    o, pair_lse, leaves = record
    work = pair_lse.dtype
    weight = torch.where(torch.isinf(pair_lse), 0.0, torch.exp(pair_lse.detach() - lse.to(work)))
    d_o = (weight[..., None] * dout.to(work)).to(o.dtype)
    d_lse = weight * ((dout.to(work) * (o.detach().to(work) - out.to(work))).sum(-1) + dlse.to(work))
    return torch.autograd.grad((o, pair_lse), (*leaves, *captured), (d_o, d_lse), allow_unused=True)


def _summed(parts: list, dtype: torch.dtype):
    """[dK, dV] summed over `parts` (each [dK, dV] or None), added in the work dtype, kept in the K/V dtype (what
    travels on); None if all are."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    work = _work_dtype(parts[0][0])
    return [sum(p[j].to(work) for p in parts).to(dtype) for j in range(2)]


def _ring_kv_ops(pairs: _Pairs, step: int, held: dict, incoming: dict, like: torch.Tensor,
                 transfers: _Transfers) -> _Transfers:  # fmt: skip
    """Step `step`'s K/V transfers: what is held and travels further goes on (a rank's own chunks onto their arms);
    the next step's chunks come from the neighbours (into `incoming`)."""
    the_plan, rank = pairs.plan, pairs.rank
    for kc, way in sorted(held):
        for onward in (-1, 1) if way == 0 else (way,):
            for t in held[(kc, way)] if the_plan.ring_reach(kc, onward) > step else ():
                transfers.send(t, rank + onward)
    for kc, way in the_plan.ring_held(rank, step + 1) if step + 1 < the_plan.world else ():
        incoming[(kc, way)] = _buffers(like, pairs)
        for t in incoming[(kc, way)]:
            transfers.recv(t, rank - way)
    return transfers


def _ring_grad_ops(pairs: _Pairs, step: int, done: dict, arriving: dict, home: dict, like: torch.Tensor,
                   transfers: _Transfers) -> _Transfers:  # fmt: skip
    """The dK/dV transfers posted at the start of step `step`, for what was held at the step before (`done`):
    first an arm's sum going home from its last user (into `home` at the owner), then the sums travelling on to
    the next rank of their arm (into `arriving` there).  Sender and receiver post each link's transfers in the
    same order."""
    the_plan, rank, hop = pairs.plan, pairs.rank, step - 1
    for kc, way in sorted(done):  # this rank was the arm's last hop: its sum goes home
        if way and the_plan.ring_reach(kc, way) == hop:
            for g in done[(kc, way)]:
                transfers.send(g, the_plan.owner(kc))
    for kc in sorted(pairs.mine):  # and this rank's chunks' arms that ended the step before come back
        for way in (-1, 1):
            if hop > 0 and the_plan.ring_reach(kc, way) == hop:
                home[(kc, way)] = _buffers(like, pairs)
                for g in home[(kc, way)]:
                    transfers.recv(g, rank + way * hop)
    for kc, way in sorted(done):  # sums travelling on
        if way and the_plan.ring_reach(kc, way) > hop and done[(kc, way)] is not None:
            for g in done[(kc, way)]:
                transfers.send(g, rank + way)
    for kc, way in the_plan.ring_held(rank, step) if 0 < step < the_plan.world else ():
        if the_plan.ring_arms(kc)[way][0] < step:  # the arm's first user is behind: a sum is on its way
            arriving[(kc, way)] = _buffers(like, pairs)
            for g in arriving[(kc, way)]:
                transfers.recv(g, rank - way)
    return transfers


def _buffers(like: torch.Tensor, pairs: _Pairs) -> list[torch.Tensor]:
    """Two empty chunk-sized buffers (K and V, or their gradients) to receive into."""
    chunk = pairs.chunks(like)[0]
    return [torch.empty(chunk.shape, dtype=like.dtype, device=like.device) for _ in range(2)]
