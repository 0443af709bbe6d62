"""The mbarrier protocols of codegen/gluon/attention.py, modelled in Python and run under random schedules.

There is no Gluon interpreter: on the GPU a barrier phase error hangs the kernel.  Each partition of versions A
and B is written here as a generator of the kernel's barrier operations and wgmma reads, in the kernel's order
(keep them in step with the kernel); TMA copies land at random later times.  The model checks that every run
finishes (no deadlock) and that no copy lands in a ring slot a wgmma is still reading or before it is waited for.
"""

import random

import pytest


class Barrier:
    """An mbarrier: `count` arrivals plus the expected transaction bytes complete a phase."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.completed = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.completed, self.pending = self.completed + 1, self.count

    def arrive(self):
        assert self.pending > 0, "more arrivals than the barrier's count"
        self.pending -= 1
        self._maybe_complete()

    def expect(self, nbytes=1):  # mbarrier.arrive.expect_tx
        self.tx += nbytes
        self.arrive()

    def land(self, nbytes=1):  # a TMA copy's complete_tx
        self.tx -= nbytes
        self._maybe_complete()

    def passed(self, parity):  # try_wait.parity: the phase of this parity has completed
        return (self.completed & 1) != parity


class Machine:
    """The ring's slots, the copies in flight, and what the wgmmas in flight read."""

    def __init__(self, rng):
        self.rng, self.copies, self.holds, self.reading = rng, [], {}, {}

    def copy(self, barrier, slot, tile):
        self.copies.append((barrier, slot, tile))

    def land_one(self):
        if self.copies and self.rng.random() < 0.5:
            barrier, slot, tile = self.copies.pop(self.rng.randrange(len(self.copies)))
            assert not self.reading.get(slot), f"tile {tile} overwrote slot {slot} while a wgmma read it"
            self.holds[slot] = tile
            barrier.land()

    def read(self, slot, tile, start):
        assert self.holds.get(slot) == tile, f"slot {slot} holds tile {self.holds.get(slot)}, the wgmma wants {tile}"
        self.reading[slot] = self.reading.get(slot, 0) + (1 if start else -1)


def run(partitions, machine, steps=100_000):
    """Round-robin at random over the partitions whose wait (the predicate they yielded) holds."""
    waiting = {i: None for i in range(len(partitions))}
    for _ in range(steps):
        if not waiting and not machine.copies:
            return
        machine.land_one()
        ready = [i for i, cond in waiting.items() if cond is None or cond()]
        if not ready and not machine.copies:
            raise RuntimeError(f"deadlock: {len(waiting)} partitions wait")
        if ready:
            i = machine.rng.choice(ready)
            try:
                waiting[i] = next(partitions[i])
            except StopIteration:
                del waiting[i]
    raise RuntimeError("did not finish")


def version_a(machine, n_tiles, stages):
    """_forward_a and _step_a: one partition loads, computes and refills."""
    ready = [Barrier(1) for _ in range(stages)]

    def partition():
        for i in range(min(stages, n_tiles)):
            ready[i].expect()
            machine.copy(ready[i], i, i)
        yield lambda: ready[0].passed(0)
        machine.read(0, 0, True)  # S_0, waited at once
        machine.read(0, 0, False)
        for j in range(n_tiles):
            last, prev = j == n_tiles - 1, max(j - 1, 0)
            machine.read(prev % stages, prev, True)  # O += P_{j-1} V_{j-1} (P = 0 for j = 0)
            if not last:
                nxt = j + 1
                yield lambda t=nxt: ready[t % stages].passed((t // stages) & 1)
                machine.read(nxt % stages, nxt, True)  # S_{j+1}
            yield None  # the softmax of tile j
            machine.read(prev % stages, prev, False)  # wait_group 1: P V retired
            if not last:
                refill = prev + stages
                if j >= 1 and refill < n_tiles:
                    ready[refill % stages].expect()
                    machine.copy(ready[refill % stages], refill % stages, refill)
                machine.read(nxt % stages, nxt, False)  # wait_group 0: S_{j+1} retired
        machine.read((n_tiles - 1) % stages, n_tiles - 1, True)  # the last P V
        machine.read((n_tiles - 1) % stages, n_tiles - 1, False)

    return [partition()]


def version_b(machine, n_tiles, stages, consumers=2):
    """_forward_b: `consumers` warpgroups taking turns in a ring (CONSUMERS), one producer."""
    q_ready, turn = Barrier(1), [Barrier(1) for _ in range(consumers)]
    ready, empty = [Barrier(1) for _ in range(stages)], [Barrier(consumers) for _ in range(stages)]

    def producer():
        q_ready.expect(consumers)
        for wg in range(consumers):
            machine.copy(q_ready, f"q{wg}", 0)
        for t in range(n_tiles):
            yield lambda t=t: empty[t % stages].passed(((t // stages) & 1) ^ 1)
            ready[t % stages].expect()
            machine.copy(ready[t % stages], t % stages, t)

    def consumer(wg):
        if wg == consumers - 1:
            turn[0].arrive()
        yield lambda: q_ready.passed(0)
        for j in range(n_tiles):
            yield lambda j=j: turn[wg].passed(j & 1)
            yield lambda j=j: ready[j % stages].passed((j // stages) & 1)
            machine.read(j % stages, j, True)  # S_j
            if j:
                machine.read((j - 1) % stages, j - 1, True)  # O += P_{j-1} V_{j-1}
            turn[(wg + 1) % consumers].arrive()
            machine.read(j % stages, j, False)  # wait_group 1 (0 for j = 0): S_j retired
            yield None  # the softmax of tile j
            if j:
                machine.read((j - 1) % stages, j - 1, False)  # wait_group 0
                empty[(j - 1) % stages].arrive()
        machine.read((n_tiles - 1) % stages, n_tiles - 1, True)  # the last P V
        machine.read((n_tiles - 1) % stages, n_tiles - 1, False)

    return [*(consumer(wg) for wg in range(consumers)), producer()]


def version_b3(machine, n_tiles, stages):
    """_forward_b with CONSUMERS=3 (tile_config's D=64 A/B)."""
    return version_b(machine, n_tiles, stages, consumers=3)


@pytest.mark.parametrize(
    "version, stages",
    [(version_a, 3), (version_a, 4), (version_b, 2), (version_b, 3), (version_b, 4), (version_b3, 2), (version_b3, 4)],
)
def test_the_barrier_protocol_finishes_and_never_overwrites_a_slot_in_use(version, stages):
    rng = random.Random(stages)
    for _ in range(40):
        for n_tiles in (1, 2, 3, 5, 9):
            machine = Machine(rng)
            run(version(machine, n_tiles, stages), machine)


def test_the_model_catches_a_ring_too_short_for_version_a():
    """Version A refills a slot one step after its P V: with 2 stages tile j+1 is waited before it is loaded
    (the kernel's static_assert refuses STAGES < 3)."""
    machine = Machine(random.Random(0))
    with pytest.raises(RuntimeError, match="deadlock"):
        run(version_a(machine, 5, 2), machine)
