"""Block-mask construction: flexcomp (O(tiles)) beside torch's create_block_mask (O(L^2)), same process and device.

Each flexcomp case is timed twice: "lazy" is the BlockMask as the kernel uses it (with closed-form
bounds the index tables stay unbuilt: the kernel computes its loop bounds), "all tables" is the same
call followed by building every torch-layout table (counts, kv_indices, full_kv_indices and the q-major
transposes q_indices / full_q_indices), checked to leave none lazy; its peak memory includes the tables
themselves, whose bytes are reported beside it.
Times are the median of warm runs (the first call, which derives the closed form with sympy, is
excluded and reported separately as "cold").  Peak extra memory is measured per run:
  cpu:  VmHWM growth over VmRSS before the run, after resetting the high-water mark through
        /proc/self/clear_refs, with glibc's mmap threshold pinned to 64 KiB so freed tensors go back to
        the OS (otherwise reused pages would hide allocations); torch CPU tensors included;
  cuda: torch.cuda.max_memory_allocated() growth after reset_peak_memory_stats() (plus the CPU figure,
        since the analysis runs on the host and only the tables move to the GPU).
Document masks are checked on ALL tiles: against per-document counts (tile true count =
sum over documents of q-count x kv-count, an oracle independent of the analysis), and against the
per-element brute force (the exact fallback's chunked evaluation of every tile) on CUDA or with
--brute-force.
The "lazy build" table times one lazy causal / sliding-window build at L=32768, which issues no device op (the
forward kernel reads no table of a closed-form mask; the ops listed must be none), so all of it is Python overhead
(argument checks, the mod, the cached closed form and symbolic counts, the BlockMask object); beside it, the time
the counts take when something first reads them (`sparsity.counts.build`: the aten ops that make kv_num_blocks /
full_kv_num_blocks, listed: a backward does, once per block mask).  Its
document rows time `sparsity.equality.interval_tables` as the GPU runs it (sync-free dense tables: on CUDA one launch
of codegen.interval_kernel, its aten ops and launches listed, and its time again with the launch stubbed out); on a
CPU, create_block_mask takes the banded path instead (one host read) and interval_tables the torch ops.  On CUDA the
document rows also check the kernel's tables against the torch ops' and an unsorted id vector's handling.
(device="meta" is no proxy for the Python part: meta ops run Python shape functions, and the sliding window's
clamp_ takes ~0.6 ms there.)  In the comparison with torch both read the document ids from the device.
No cache of BlockMasks is involved: every timed call builds a new one (the symbolic counts are cached per
bounds and grid, like the sympy derivation).
Run: python benchmarks/bench_blockmask.py [--device cuda|cpu] [--quick] [--threads N] [--only causal,sliding]
     [--sections long,breakdown,torch,fractions] [--json PATH]
The document build alone (about a minute): --sections breakdown,torch
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch

from flexcomp import blockmask
from flexcomp.blockmask import create_block_mask
from flexcomp.evaluate import evaluate
from flexcomp.ir import BufferSpec, Op
from flexcomp.mods import Mod
from flexcomp.sparsity import standard as std
from flexcomp.sparsity.standard import node
from flexcomp.sparsity.tiles import Grid, evaluate_tiles
from flexcomp.tiles import TileClass

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")  # fmt: skip


def mod_of(mask, tensors=None, name="mask") -> Mod:
    """A Mod from hand-built IR (no front end); calling it evaluates the IR."""
    tensors = dict(tensors or {})
    specs = tuple(BufferSpec(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items())

    def fn(b, h, q_idx, kv_idx):
        return evaluate(mask, {"b": b.int(), "h": h.int(), "q_idx": q_idx.int(), "kv_idx": kv_idx.int()}, tensors)

    return Mod("mask", name, mask, mask, specs, {k: (lambda v=v: v) for k, v in tensors.items()}, fn)


# ---------------------------------------------------------------- measuring


class Meter:
    """Wall time and peak extra memory of a call on one device (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.hwm_resettable = _pin_mmap_threshold() and _reset_hwm()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], reps: int) -> float:
        times = []
        for _ in range(reps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak(self, fn: Callable[[], object]) -> dict[str, float]:
        """Peak extra MiB during one call: {"cpu": ..., "cuda": ...} (cpu is None when unmeasurable)."""
        self.sync()
        out: dict[str, float] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base_cuda = torch.cuda.memory_allocated(self.device)
        rss = _status_mib("VmRSS")
        if self.hwm_resettable:
            _reset_hwm()
        result = fn()
        self.sync()
        out["cpu"] = _status_mib("VmHWM") - rss if self.hwm_resettable else None
        if self.cuda:
            out["cuda"] = (torch.cuda.max_memory_allocated(self.device) - base_cuda) / 2**20
        del result
        return out


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _pin_mmap_threshold() -> bool:
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def materialize(bm) -> object:
    """Every torch-layout table built (counts, kv_indices, full_kv_indices, the q-major transposes), none left lazy."""
    for name in TABLES:
        getattr(bm, name)
    assert not bm._lazy, f"tables left unbuilt: {sorted(bm._lazy)}"
    return bm


def table_mib(bm) -> float:
    """Bytes of all the tables themselves: what "all tables" peak memory is to be compared with."""
    tables = [getattr(bm, name) for name in TABLES]
    return sum(t.numel() * t.element_size() for t in tables if t is not None) / 2**20


def _materialized(build: Callable[[], object]) -> object:
    return materialize(build())


# ---------------------------------------------------------------- exactness of document masks


def per_document_classes(doc: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
    """Exact tile classes of DOC[q] == DOC[kv] on every tile: true count = sum_d n_q(i, d) * n_kv(j, d)."""
    doc = doc.to(device).long()
    n, num_docs = -(-doc.numel() // block), int(doc.max().item()) + 1
    counts = torch.zeros(n, num_docs, dtype=torch.float32, device=device)
    counts.index_put_((torch.arange(doc.numel(), device=device) // block, doc),
                      torch.ones(doc.numel(), dtype=torch.float32, device=device), accumulate=True)
    true = counts @ counts.T  # exact in float32: every partial sum is an integer <= block**2 < 2**24
    sizes = counts.sum(1)
    total = sizes[:, None] * sizes[None, :]
    return torch.where(true == 0, 0, torch.where(true == total, 2, 1)).to(torch.uint8).cpu()


def brute_force_classes(mask, tensors, grid: Grid, device: torch.device) -> torch.Tensor:
    """Every tile evaluated element by element, in bounded chunks (the exact fallback's evaluator)."""
    out = torch.empty(grid.num_q_blocks, grid.num_kv_blocks, dtype=torch.uint8)
    rows = max(1, (1 << 20) // grid.num_kv_blocks)
    for q0 in range(0, grid.num_q_blocks, rows):
        q1 = min(grid.num_q_blocks, q0 + rows)
        qb, kb = torch.meshgrid(torch.arange(q1 - q0), torch.arange(grid.num_kv_blocks), indexing="ij")
        tiles = torch.stack([torch.zeros_like(qb), torch.zeros_like(qb), qb, kb], -1).reshape(-1, 4)
        out[q0:q1] = evaluate_tiles(mask, tensors, grid, q0, tiles, device).view(q1 - q0, -1)
    return out


def check_document(bm, mask, tensors, grid: Grid, device: torch.device, brute: bool) -> str:
    got = bm.tile_classes()[0, 0].cpu()
    tiles = got.numel()
    notes = []
    oracle = per_document_classes(tensors["DOC"], grid.q_block, device)
    notes.append(f"{int((oracle == got).sum())}/{tiles} tiles = per-document counts")
    if brute:
        start = time.perf_counter()
        exact = brute_force_classes(mask, tensors, grid, device)
        notes.append(f"{int((exact == got).sum())}/{tiles} = per-element brute force "
                     f"({time.perf_counter() - start:.0f} s)")
    return "; ".join(notes)


# ---------------------------------------------------------------- cases


def document_mask(L: int, num_docs: int, causal: bool = False):
    mask, tensors = std.document(L, num_docs)
    return (node(Op.AND, mask, std.causal()) if causal else mask), tensors


def long_cases(quick: bool) -> list[tuple[str, int, object, dict]]:
    big, doc_small, doc_big = (1 << 18, 1 << 15, 1 << 17) if quick else (1 << 20, 1 << 18, 1 << 20)
    return [("causal", big, std.causal(), {}), ("sliding window 4096", big, std.sliding_window(4096), {}),
            ("document x1000", doc_small, *document_mask(doc_small, 1000)),
            ("document x1000", doc_big, *document_mask(doc_big, 1000)),
            ("document x1000 & causal", doc_small, *document_mask(doc_small, 1000, causal=True))]


def run_long(meter: Meter, quick: bool, brute: bool, only: str | None = None) -> list[dict]:
    rows = []
    for name, L, mask, tensors in long_cases(quick):
        if only and not any(word in name for word in only.split(",")):
            continue
        mod = mod_of(mask, tensors, name)
        build = functools.partial(create_block_mask, mod, None, None, L, L, meter.device)
        every_table = functools.partial(_materialized, build)
        cold = meter.time(build, 1)
        reps = 3 if L >= 1 << 20 else 5
        row = {"case": name, "L": L, "device": str(meter.device), "cold_s": cold,
               "lazy_s": meter.time(build, reps), "all_tables_s": meter.time(every_table, reps),
               "lazy_mem": meter.peak(build), "all_tables_mem": meter.peak(every_table)}
        bm = materialize(build())
        row["tables_mib"] = table_mib(bm)
        check = "closed form (tests: = brute force)" if bm.bounds is not None else "not checked here"
        row.update(sparsity=bm.sparsity(), decided_by=bm.decided_by, check=check)
        if "DOC" in tensors and "causal" not in name:
            grid = Grid(1, 1, L, L, 128, 128)
            row["check"] = check_document(bm, mask, tensors, grid, meter.device, brute and L <= (1 << 18))
        rows.append(row)
        print(f"  {name} L={L}: lazy {row['lazy_s'] * 1e3:.1f} ms, all tables {_ms(row['all_tables_s'])}, "
              f"{_mem(row['all_tables_mem'])} peak for {row['tables_mib']:.1f} MiB of tables", flush=True)
    return rows


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops run while active (views excluded: they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.__name__.startswith(("view", "_unsafe_view")):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def run_breakdown(meter: Meter, L: int = 32768) -> list[dict]:
    """Lazy closed-form builds split into device ops and Python overhead (see the module docstring)."""
    from flexcomp.sparsity import counts

    rows = []
    for name, mask in (("causal", std.causal()), ("sliding window 1024", std.sliding_window(1024))):
        mod = mod_of(mask, {}, name)
        build = functools.partial(create_block_mask, mod, None, None, L, L, meter.device)
        bm = build()
        values = counts.symbolic_counts(bm.bounds, L, L, *bm.BLOCK_SIZE)
        counts_on_read = functools.partial(counts.build, values, bm.num_blocks[0], meter.device)
        with OpLog() as log:
            build()
        with OpLog() as count_log:
            counts_on_read()
        gc.collect()  # the sympy derivation's garbage is not collected inside the timed builds
        row = {"case": name, "L": L, "device": str(meter.device), "total_s": meter.time(build, 201),
               "device_ops_s": 0.0, "ops": log.ops, "counts_on_read_s": meter.time(counts_on_read, 201),
               "count_ops": count_log.ops}
        row["python_s"] = row["total_s"]
        rows.append(row)
        print(f"  lazy build {name} L={L}: {row['total_s'] * 1e6:.1f} us, {len(log.ops)} ops; the counts on first "
              f"read {row['counts_on_read_s'] * 1e6:.1f} us ({', '.join(count_log.ops)})", flush=True)
    return rows + run_document_breakdown(meter, L)


class LaunchLog:
    """While active, the launches of the document kernel (codegen.interval_kernel) are logged into `ops`, or, with
    `stub`, replaced by nothing (what is left is the path's Python and allocations)."""

    def __init__(self, ops: list[str] | None = None, stub: bool = False):
        self.ops, self.stub = ops, stub

    def __getitem__(self, grid):
        if self.ops is not None:
            self.ops.append(f"launch {self.kernel.fn.__name__}[{grid[0]}]")
        return (lambda *args, **kwargs: None) if self.stub else self.kernel[grid]

    def __enter__(self):
        from flexcomp.codegen import interval_kernel

        self.kernel = interval_kernel.interval_tables_kernel
        interval_kernel.interval_tables_kernel = self
        return self

    def __exit__(self, *exc):
        from flexcomp.codegen import interval_kernel

        interval_kernel.interval_tables_kernel = self.kernel


def run_document_breakdown(meter: Meter, L: int) -> list[dict]:
    """The document build's device work: `equality.interval_tables` as the GPU runs it (sync_free: dense tables, no
    host read; on CUDA one launch of codegen.interval_kernel), on this device; its aten ops and launches listed
    (views and the CPU-side wrapping of Python scalars excluded), and its time with the launch stubbed out (the
    path's Python and allocations).  On CUDA the kernel's tables are also checked against the torch ops' (element
    for element), and an unsorted id vector against its contract (every tile PARTIAL, decided_by says so)."""
    from flexcomp.sparsity import equality

    rows = []
    for name, causal in ((f"document x{L // 1024}", False), (f"document x{L // 1024} & causal", True)):
        mask, tensors = document_mask(L, L // 1024, causal)
        tensors = {k: v.to(meter.device) for k, v in tensors.items()}
        mod = mod_of(mask, tensors, name)
        build = functools.partial(create_block_mask, mod, None, None, L, L, meter.device)
        grid = Grid(1, 1, L, L, 128, 128)
        ops_only = functools.partial(equality.interval_tables, mask, tensors, grid, meter.device, True)
        ops_only()
        with OpLog() as log, LaunchLog(log.ops):
            ops_only()
        ops = [op for op in log.ops if op.split(".")[0] not in ("slice", "detach", "expand", "scalar_tensor", "lift_fresh")]
        row = {"case": name, "L": L, "device": str(meter.device), "total_s": meter.time(build, 201),
               "device_ops_s": meter.time(ops_only, 201), "ops": ops}
        with LaunchLog(stub=True):
            row["no_launch_s"] = meter.time(ops_only, 201)
        row["python_s"] = row["total_s"] - row["device_ops_s"]
        if meter.cuda:
            row["checks"] = check_document_kernel(mask, tensors, grid, meter.device)
        rows.append(row)
        print(f"  lazy build {name} L={L}: {row['total_s'] * 1e6:.1f} us (create_block_mask, this device's path) = "
              f"sync-free ops {row['device_ops_s'] * 1e6:.1f} us ({len(ops)}: {', '.join(ops)}; without the launch "
              f"{row['no_launch_s'] * 1e6:.1f} us) {row.get('checks', '')}", flush=True)
    return rows


def check_document_kernel(mask, tensors, grid: Grid, device: torch.device) -> str:
    """The kernel's four tables = those of the torch ops it replaces; an unsorted id vector (one swapped pair in the
    middle of the ids: seen by one program's slice) gives every tile PARTIAL, reported, and the scratch is clear
    after it (a sorted build right after is exact again)."""
    from flexcomp.sparsity import equality
    from flexcomp.sparsity.tables import interval_spans, spans_to_tables

    def torch_ops(tensors):
        lo, hi, _ = equality.row_intervals(equality.interval_plan(mask), tensors, grid, device)
        return spans_to_tables(interval_spans(lo, hi, grid), grid)

    got = equality.interval_tables(mask, tensors, grid, device, True)
    same = all(torch.equal(a, b) for a, b in zip(got[:4], torch_ops(tensors))) and int(got[4]) == 0
    doc = tensors["DOC"].clone()
    middle = doc.numel() // 2
    doc[[middle - 3000, middle + 3000]] = doc[[middle + 3000, middle - 3000]]
    bm = create_block_mask(mod_of(mask, {"DOC": doc}), None, None, grid.q_len, grid.kv_len, device)
    all_partial = bool((bm.tile_classes() == TileClass.PARTIAL).all()) and list(bm.decided_by) == [blockmask.UNSORTED_IDS]
    again = equality.interval_tables(mask, tensors, grid, device, True)
    clear = all(torch.equal(a, b) for a, b in zip(again[:4], got[:4])) and int(again[4]) == 0
    return f"[kernel tables = torch ops': {same}; unsorted ids: all PARTIAL and reported: {all_partial}; then exact: {clear}]"


def torch_cases(L: int, device: torch.device) -> list[tuple[str, object, dict, Callable]]:
    """(name, IR, captured tensors, the same mask as a plain torch mask_mod for torch's create_block_mask)."""
    window = 1024
    doc_mask, tensors = document_mask(L, max(2, L // 1024))
    tensors = {k: v.to(device) for k, v in tensors.items()}  # the ids where both read them: on the device
    doc = tensors["DOC"]
    return [("causal", std.causal(), {}, lambda b, h, q, kv: q >= kv),
            ("sliding window 1024", std.sliding_window(window), {},
             lambda b, h, q, kv: (q >= kv) & (q - kv < window)),
            (f"document x{L // 1024}", doc_mask, tensors, lambda b, h, q, kv: doc[q] == doc[kv])]


def run_versus_torch(meter: Meter, L: int) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    rows = []
    device = meter.device
    for name, mask, tensors, torch_fn in torch_cases(L, device):
        mod = mod_of(mask, tensors, name)
        ours = functools.partial(create_block_mask, mod, None, None, L, L, device)
        every_table = functools.partial(_materialized, ours)
        theirs = functools.partial(torch_create_block_mask, torch_fn, None, None, L, L, device=device)
        theirs()  # warm-up (and the vmap trace)
        ours()
        torch_s = meter.time(theirs, 3)
        gc.collect()  # so the garbage of torch's trace is not collected inside our few-microsecond builds
        row = {"case": name, "L": L, "device": str(device), "torch_s": torch_s,
               "lazy_s": meter.time(ours, 51), "all_tables_s": meter.time(every_table, 7),
               "torch_mem": meter.peak(theirs), "lazy_mem": meter.peak(ours), "all_tables_mem": meter.peak(every_table)}
        row["same_tiles_visited"] = bool(torch.equal(ours().to_dense().cpu(), theirs().to_dense().cpu()))
        rows.append(row)
        print(f"  vs torch {name} L={L}: torch {row['torch_s'] * 1e3:.1f} ms, ours {row['lazy_s'] * 1e3:.2f} ms",
              flush=True)
    return rows


def exact_fractions() -> list[dict]:
    """Tiles decided without evaluation / tiles brute force calls FULL or EMPTY, at L~4096 (auto-evaluation off)."""
    doc, doc_tensors = std.document(4096, 40)
    variants = {
        "causal": (std.causal(), {}, 4000, 3000), "sliding window": (std.sliding_window(500), {}, 4000, 4000),
        "prefix-LM": (std.prefix_lm(700), {}, 4000, 4000), "document": (doc, doc_tensors, 4096, 4096),
        "block-causal": (std.block_causal(300), {}, 4000, 4000),
        "dilated window": (std.dilated_window(501), {}, 4000, 4000),
        "2-D neighborhood (W=64, R=3)": (std.neighborhood(64, 3), {}, 4096, 4096),
        "2-D neighborhood (W=60, R=3)": (std.neighborhood(60, 3), {}, 3600, 3600),
        "document & causal": (node(Op.AND, doc, std.causal()), doc_tensors, 4096, 4096),
    }
    rows = []
    for name, (mask, tensors, q_len, kv_len) in variants.items():
        # exact=False: no evaluation, so what the analysis alone decides
        bm = create_block_mask(mod_of(mask, tensors), None, None, q_len, kv_len, "cpu", exact=False)
        got = bm.tile_classes()[0, 0]
        brute = brute_force_classes(mask, tensors, Grid(1, 1, q_len, kv_len, 128, 128), torch.device("cpu"))
        decided, decidable = got != TileClass.PARTIAL, brute != TileClass.PARTIAL
        rows.append({"variant": name, "decided": int(decided.sum()), "decidable": int(decidable.sum()),
                     "wrong": int((got != brute).sum()), "decided_by": bm.decided_by})
    return rows


# ---------------------------------------------------------------- report


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"


def _mem(m: dict) -> str:
    cpu = "n/a" if m.get("cpu") is None else f"{m['cpu']:.1f}"
    return f"{cpu} MiB" + (f" (GPU {m['cuda']:.1f} MiB)" if "cuda" in m else "")


def markdown(long_rows: list[dict], torch_rows: list[dict], fractions: list[dict], meta: dict,
             breakdown: list[dict] = ()) -> str:
    out = [(f"Device: {meta['device']}; torch {meta['torch']}; CPU threads {meta['threads']}; "
            f"CPU memory: {meta['cpu_memory']}.")]
    if long_rows:
        out += ["", ("| mask | L | lazy (kernel's view) | all tables | cold first call | peak extra mem lazy | "
                     "peak extra mem all tables | bytes of the tables | sparsity | decided by | exactness |"),
                "|---" * 11 + "|"]
    for r in long_rows:
        how = ", ".join(f"{k}: {v}" for k, v in r["decided_by"].items())
        out.append(f"| {r['case']} | {r['L']:,} | {_ms(r['lazy_s'])} | {_ms(r['all_tables_s'])} | {_ms(r['cold_s'])} | "
                   f"{_mem(r['lazy_mem'])} | {_mem(r['all_tables_mem'])} | {r['tables_mib']:.1f} MiB | "
                   f"{r['sparsity']:.2f}% | {how} | "
                   f"{r['check']} |")
    if torch_rows:
        out += ["", ("| mask (same process, same device) | L | torch create_block_mask | flexcomp lazy | "
                     "flexcomp all tables | speedup lazy / all tables | torch peak mem | flexcomp peak mem (all tables) "
                     "| same tiles |"), "|---" * 9 + "|"]
    for r in torch_rows:
        out.append(f"| {r['case']} | {r['L']:,} | {_ms(r['torch_s'])} | {_ms(r['lazy_s'])} | "
                   f"{_ms(r['all_tables_s'])} | {r['torch_s'] / r['lazy_s']:.0f}x / "
                   f"{r['torch_s'] / r['all_tables_s']:.0f}x | {_mem(r['torch_mem'])} | {_mem(r['all_tables_mem'])} | "
                   f"{r['same_tiles_visited']} |")
    if breakdown:
        out += ["", ("| lazy build (cold: no BlockMask cache) | L | total | device work (counts.build / "
                     "interval_tables) | of it without the launch | Python overhead (total - device work) | "
                     "aten ops and launches issued |"), "|---" * 7 + "|"]
        for r in breakdown:
            no_launch = f"{r['no_launch_s'] * 1e6:.1f} us" if "no_launch_s" in r else "-"
            checks = f" {r['checks']}" if "checks" in r else ""
            if "counts_on_read_s" in r:
                checks += (f" (the counts, on first read: {r['counts_on_read_s'] * 1e6:.1f} us, "
                           f"{', '.join(r['count_ops'])})")
            out.append(f"| {r['case']} | {r['L']:,} | {r['total_s'] * 1e6:.1f} us | {r['device_ops_s'] * 1e6:.1f} us | "
                       f"{no_launch} | {r['python_s'] * 1e6:.1f} us | "
                       f"{len(r['ops'])}: {', '.join(r['ops'])}{checks} |")
    if fractions:
        out += ["", ("| variant (L~4096, 128x128 tiles) | decided without evaluation / decidable | exact fraction | "
                     "wrong |"), "|---|---|---|---|"]
    for r in fractions:
        out.append(f"| {r['variant']} | {r['decided']}/{r['decidable']} | "
                   f"{100 * r['decided'] / max(1, r['decidable']):.1f}% | {r['wrong']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a minute on a CPU)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", help="comma-separated substrings: only the long cases named so (e.g. causal,sliding),"
                        " and no torch comparison or exact-fraction tables")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sections", default="long,breakdown,torch,fractions",
                        help="comma-separated tables to run: long (the long cases), breakdown (the lazy-build split), "
                        "torch (the comparison with torch), fractions (the exact fractions)")
    parser.add_argument("--brute-force", choices=("auto", "on", "off"), default="auto",
                        help="per-element check of every document tile (auto: on CUDA only; ~15 min on a CPU core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meter = Meter(device)
    brute = args.brute_force == "on" or (args.brute_force == "auto" and device.type == "cuda")
    versus_L = 32768 if device.type == "cuda" or not args.quick else 8192
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_memory": "VmHWM growth (clear_refs reset, mmap threshold 64 KiB)" if meter.hwm_resettable
            else "unavailable (no /proc/self/clear_refs)"}
    sections = set(args.sections.split(","))
    long_rows = run_long(meter, args.quick, brute, args.only) if "long" in sections else []
    breakdown = [] if args.only or "breakdown" not in sections else run_breakdown(meter)
    torch_rows = [] if args.only or "torch" not in sections else run_versus_torch(meter, versus_L)
    fractions = [] if args.only or "fractions" not in sections else exact_fractions()
    print(markdown(long_rows, torch_rows, fractions, meta, breakdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "long": long_rows, "versus_torch": torch_rows, "exact_fractions": fractions,
                       "lazy_build_breakdown": breakdown},
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()
