"""Exactly-once and resume properties of the latent loader.

The plan functions are pure, so most properties are checked by simulation without
reading files (up to 1,024 ranks x 4 workers). The reading path is checked with real
latent shards and real DataLoader workers in test_loader_processes.py.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from latentforge.data.loader import Layout, Plan, Position, Segment, deal, epoch_segments, part_order, plan_for


def consume(plan: Plan, k0: int, k1: int) -> Counter:
    """Samples (part, position) consumed by all ranks in micro-steps [k0, k1)."""
    seen: Counter = Counter()
    for r in range(plan.layout.world_size):
        for s, j in plan.rank_schedule(r)[k0:k1]:
            seen.update(plan.batch_samples(s, j))
    return seen


def run_epoch(counts: list[int], seed: int, epoch: int, layouts: list[Layout], cut_rng: random.Random) -> Counter:
    """Consume one epoch, switching to the next layout at random interruption points."""
    pos = Position(epoch=epoch)
    seen: Counter = Counter()
    for i, layout in enumerate(layouts):
        plan, k = plan_for(pos, counts, seed, layout)
        last = i == len(layouts) - 1
        stop = plan.steps if last else cut_rng.randint(k, plan.steps)
        seen += consume(plan, k, stop)
        pos = Position(epoch, list(plan.segments), layout, stop)
    return seen


def expected(counts: list[int]) -> Counter:
    return Counter((p, i) for p, n in enumerate(counts) for i in range(n))


def test_order_is_a_pure_function_of_seed_epoch_dataset():
    assert list(part_order(3, 1, 50)) == list(part_order(3, 1, 50))
    assert list(part_order(3, 1, 50)) != list(part_order(3, 2, 50))
    assert list(part_order(3, 1, 50)) != list(part_order(4, 1, 50))
    assert sorted(part_order(3, 1, 50)) == list(range(50))


def test_deal_balances_and_keeps_every_segment():
    segs = [Segment(i, 0, n) for i, n in enumerate([5, 9, 1, 7, 7, 3, 2])]
    streams = deal(segs, 3)
    assert sorted(s for st in streams for s in st) == sorted(segs)
    loads = [sum(s.size for s in st) for st in streams]
    assert max(loads) - min(loads) <= max(s.size for s in segs)


@pytest.mark.parametrize("world,workers,batch", [(1, 0, 4), (2, 2, 3), (3, 1, 5), (4, 4, 2)])
def test_one_uninterrupted_epoch_sees_every_sample_once(world, workers, batch):
    rng = np.random.default_rng(world * 100 + batch)
    counts = [int(c) for c in rng.integers(0, 40, size=13)]
    seen = run_epoch(counts, seed=7, epoch=0, layouts=[Layout(world, workers, batch)], cut_rng=random.Random(0))
    assert seen == expected(counts)


def test_every_rank_takes_the_same_number_of_micro_steps():
    plan = Plan(epoch_segments(1, 0, [10, 3, 50, 7, 0, 22]), Layout(3, 2, 4))
    for r in range(3):
        assert len(plan.rank_schedule(r)) <= plan.steps
    assert plan.steps == max(len(plan.rank_schedule(r)) for r in range(3))


@pytest.mark.parametrize("trial", range(30))
def test_interrupted_epochs_across_world_sizes_see_every_sample_once(trial):
    """Random interruptions, random layout changes (1->2, 2->1, 2->2, ...): exactly once."""
    rng = random.Random(trial)
    counts = [rng.randint(0, 60) for _ in range(rng.randint(1, 25))]
    if sum(counts) == 0:
        counts[0] = 1
    layouts = [Layout(rng.choice([1, 2, 3, 8]), rng.choice([0, 1, 2, 4]), rng.choice([1, 2, 4, 7]))
               for _ in range(rng.randint(1, 5))]
    seen = run_epoch(counts, seed=trial, epoch=rng.randint(0, 5), layouts=layouts, cut_rng=rng)
    assert seen == expected(counts), f"layouts {layouts}"


def test_same_layout_resume_continues_the_same_batches():
    """Resuming with the same layout replays nothing and skips nothing: the batch sequence
    after the interruption equals the uninterrupted one (the basis of bitwise resume)."""
    counts = [17, 33, 8, 41, 25]
    layout = Layout(2, 2, 4)
    plan, _ = plan_for(Position(0), counts, 5, layout)
    for k in (0, 1, 6, 13, plan.steps - 1):
        resumed, k2 = plan_for(Position(0, list(plan.segments), layout, k), counts, 5, layout)
        assert k2 == k
        for r in range(2):
            a = [plan.batch_samples(s, j) for s, j in plan.rank_schedule(r)[k:]]
            b = [resumed.batch_samples(s, j) for s, j in resumed.rank_schedule(r)[k2:]]
            assert a == b


def test_position_state_round_trips():
    p = Position(3, [Segment(1, 2, 9), Segment(0, 0, 4)], Layout(2, 1, 8), 5)
    assert Position.from_state(p.state_dict()) == p


@pytest.mark.parametrize("new_layout", [Layout(1024, 4, 2), Layout(1000, 3, 5), Layout(1, 0, 64)])
def test_simulation_1024_ranks_x_4_workers(new_layout):
    """A large job (1,024 ranks x 4 workers) interrupted mid-epoch and resumed at another
    size: every sample of the epoch still seen exactly once."""
    rng = np.random.default_rng(0)
    counts = [int(c) for c in rng.integers(50, 200, size=5000)]
    layouts = [Layout(1024, 4, 8), new_layout]
    seen = run_epoch(counts, seed=11, epoch=2, layouts=layouts, cut_rng=random.Random(1))
    assert seen == expected(counts)


# ---------------------------------------------------------------------------------------
# Buckets and weighted sources: the same properties through LatentLoader's own planning
# (constructing a loader reads no files; the simulation walks every rank's order).

from latentforge.data.loader import EpochPlan, LatentLoader  # noqa: E402
from latentforge.data.sources import epoch_counts  # noqa: E402

SHAPES = {"latent": [4, 8, 8], "text": [5, 8], "pooled": [8]}
BUCKETS = [[4, 8, 8], [4, 6, 10], [4, 10, 6], [4, 4, 16], [4, 16, 4]]


def make_parts(rng: random.Random, sizes: list[tuple[int, int]]) -> list[dict]:
    """sizes: (number of parts, max samples per part) per source; each part one random bucket."""
    parts = []
    for s, (n, most) in enumerate(sizes):
        for _ in range(n):
            parts.append({"file": f"p{len(parts)}.tar", "count": rng.randint(0, most), "source": s,
                          "latent": rng.choice(BUCKETS)})
    return parts


def loader(parts: list[dict], layout: Layout, seed: int, position: dict | None = None, weights=(1.0,),
           epoch_samples: int = 0) -> LatentLoader:
    return LatentLoader("/nonexistent", parts, micro_batch=layout.micro_batch, seed=seed, rank=0,
                        world_size=layout.world_size, num_workers=layout.num_workers, shapes=SHAPES,
                        position=position, sources=[{"name": f"s{i}", "weight": w} for i, w in enumerate(weights)],
                        epoch_samples=epoch_samples)


def consume_epoch_plan(plan: EpochPlan, k0: int, k1: int) -> Counter:
    """Samples (part, position, pass) all ranks take in global micro-steps [k0, k1); checks
    on the way that every rank takes the scheduled bucket at every step."""
    seen: Counter = Counter()
    for r in range(plan.layout.world_size):
        for k, item in enumerate(plan.rank_order(r)[k0:k1], start=k0):
            if item is None:
                continue
            b, s, j = item
            assert b == plan.schedule[k]
            seen.update(plan.plans[b].batch_positions(s, j))
    return seen


def planned(lo: LatentLoader, epoch: int, starts: list[int]) -> Counter:
    return Counter((seg.part, p, seg.pass_) for seg in lo._epoch_segments(epoch, starts)
                   for p in range(seg.start, seg.end))


def run_mixed_epoch(parts, seed, layouts, cut_rng, weights, epoch_samples=0, position=None):
    """One epoch from `position`, switching layout at random micro-steps; returns (samples
    seen, the position after the epoch's last step, the loader of the last layout)."""
    seen: Counter = Counter()
    for i, layout in enumerate(layouts):
        lo = loader(parts, layout, seed, position, weights, epoch_samples)
        plan, k = lo._plan, lo._k
        stop = plan.steps if i == len(layouts) - 1 else cut_rng.randint(k, plan.steps)
        seen += consume_epoch_plan(plan, k, stop)
        lo._k = lo.position.k = stop
        position = lo.state_dict()
    return seen, position, lo


@pytest.mark.parametrize("trial", range(12))
def test_buckets_and_sources_exactly_once_across_world_sizes(trial):
    """Random buckets, 1-3 weighted sources, random interruptions and layouts: each epoch
    takes exactly its planned samples, each once, every rank on the scheduled bucket."""
    rng = random.Random(100 + trial)
    nsrc = rng.randint(1, 3)
    parts = make_parts(rng, [(rng.randint(1, 12), rng.choice([5, 40, 90])) for _ in range(nsrc)])
    for s in range(nsrc):  # every source holds samples
        next(p for p in parts if p["source"] == s)["count"] += 1
    weights = [rng.choice([0.5, 1.0, 3.0]) for _ in range(nsrc)]
    epoch_samples = rng.choice([0, 150])
    position = None
    for epoch in range(3):
        layouts = [Layout(rng.choice([1, 2, 3, 8]), rng.choice([0, 1, 2, 4]), rng.choice([1, 2, 4, 7]))
                   for _ in range(rng.randint(1, 4))]
        first = loader(parts, layouts[0], trial, position, weights, epoch_samples)
        want = planned(first, epoch, first.position.starts)
        seen, position, last = run_mixed_epoch(parts, trial, layouts, rng, weights, epoch_samples, position)
        assert last.epoch == epoch
        assert seen == want, f"epoch {epoch}, layouts {layouts}"
        position = dict(position, epoch=epoch + 1, base=None, layout=None, k=0,
                        starts=[a + t for a, t in zip(position["starts"], last.take)])


def test_mixing_proportions_per_epoch_and_passes_without_repeats():
    """Weights 3:1 over sources of 400 and 50 samples: each epoch takes exactly the
    apportioned counts; the large source is subsampled and the small one repeats, and in
    each source's sequence of passes every sample appears once per pass, in order."""
    rng = random.Random(5)
    parts = make_parts(rng, [(20, 40), (5, 20)])
    sizes = [sum(p["count"] for p in parts if p["source"] == s) for s in range(2)]
    take = epoch_counts(sizes, [3.0, 1.0], 300)
    assert sum(take) == 300 and take == [225, 75] and take[1] > sizes[1] and take[0] < sizes[0]
    position, per_source = None, [[], []]
    for epoch in range(6):
        seen, position, last = run_mixed_epoch(parts, 9, [Layout(3, 2, 4)], rng, [3.0, 1.0], 300, position)
        counts = Counter(parts[p]["source"] for (p, _, _), n in seen.items() for _ in range(n))
        assert [counts[0], counts[1]] == take
        for (p, pos, pass_), n in seen.items():
            per_source[parts[p]["source"]].extend([(pass_, p, pos)] * n)
        position = dict(position, epoch=epoch + 1, base=None, layout=None, k=0,
                        starts=[a + t for a, t in zip(position["starts"], last.take)])
    for s, items in enumerate(per_source):
        by_pass = Counter(pass_ for pass_, _, _ in items)
        full = [p for p in by_pass if by_pass[p] == sizes[s]]
        assert len(set(items)) == len(items)  # no sample twice in one pass
        assert sorted(by_pass) == list(range(len(by_pass)))  # passes in order, none skipped
        assert all(p in full for p in sorted(by_pass)[:-1])  # every pass but the last is complete


def test_mixing_proportions_hold_across_a_resume_at_another_world_size():
    rng = random.Random(11)
    parts = make_parts(rng, [(10, 60), (4, 30), (6, 10)])
    weights = [1.0, 2.0, 0.5]
    whole, _, lo = run_mixed_epoch(parts, 3, [Layout(4, 2, 3)], random.Random(0), weights)
    cut, _, _ = run_mixed_epoch(parts, 3, [Layout(4, 2, 3), Layout(2, 1, 5), Layout(8, 4, 2)], random.Random(1),
                                weights)
    assert cut == whole
    by_source = Counter(parts[p]["source"] for (p, _, _), n in cut.items() for _ in range(n))
    assert [by_source[s] for s in range(3)] == lo.take


@pytest.mark.parametrize("new_layout", [Layout(1024, 4, 2), Layout(999, 3, 4)])
def test_simulation_1024_ranks_x_4_workers_buckets_and_mixing(new_layout):
    """A 1,024-rank x 4-worker job over 5 buckets and 3 weighted sources, interrupted mid-
    epoch and resumed at another size: every planned sample exactly once, and padding
    (masked rows) at most 2% of the rows in both deals."""
    rng = np.random.default_rng(0)
    parts, sources = [], [(1500, 400), (700, 300), (300, 150)]  # (parts, mean samples per part) per source
    for s, (n, mean) in enumerate(sources):
        for c in rng.integers(mean // 2, mean * 3 // 2, size=n):
            parts.append({"file": "x", "count": int(c), "source": s, "latent": BUCKETS[int(rng.integers(5))]})
    weights = [2.0, 1.0, 1.0]
    first = loader(parts, Layout(1024, 4, 2), 11, None, weights)
    want = planned(first, 0, first.position.starts)
    assert first._plan.padding <= 0.02 * first._plan.steps * 1024 * 2, first._plan.padding
    seen, _, last = run_mixed_epoch(parts, 11, [Layout(1024, 4, 2), new_layout], random.Random(1), weights)
    assert seen == want
    rows = last._plan.steps * new_layout.world_size * new_layout.micro_batch
    assert last._plan.padding <= 0.02 * rows, (last._plan.padding, rows)


def test_bucket_schedule_puts_every_rank_on_one_bucket_per_step():
    rng = random.Random(3)
    parts = make_parts(rng, [(30, 50)])
    lo = loader(parts, Layout(5, 3, 4), 1)
    plan = lo._plan
    assert len(plan.buckets) > 1 and plan.steps == len(plan.schedule)
    for r in range(5):
        order = plan.rank_order(r)
        assert len(order) == plan.steps
        for k, item in enumerate(order):
            if item is not None:
                b, s, j = item
                assert b == plan.schedule[k] and s // 3 == r
                assert {tuple(parts[p]["latent"]) for p, _, _ in plan.plans[b].batch_positions(s, j)} == {b}
    # Each bucket's padding is under one global step; ranks differ by at most one batch.
    for b, p in plan.plans.items():
        assert max(p.rank_lengths) - min(p.rank_lengths) <= 1


def test_a_position_saved_before_buckets_resumes_with_its_own_deal():
    """A version-1 state (3-number segments, no starts, no version) continues with the deal
    it was saved with: the batches after the cut are the old plan's, bitwise."""
    counts = [17, 33, 8, 41, 25]
    layout = Layout(2, 2, 4)
    segs = epoch_segments(5, 3, counts)  # pass 3 = epoch 3
    old = Plan(segs, layout, balanced=False)
    state = {"epoch": 3, "base": [[p, s, e] for p, s, e, _ in segs], "layout": layout.as_list(), "k": 6}
    lo = LatentLoader("/nonexistent", [{"file": "x", "count": c} for c in counts], micro_batch=4, seed=5, rank=0,
                      world_size=2, num_workers=2, shapes=SHAPES, position=state)
    assert lo._k == 6 and lo.position.version == 1 and lo.position.starts == [3 * sum(counts)]
    (b,) = lo._plan.buckets
    for r in range(2):
        new = [lo._plan.plans[b].batch_samples(item[1], item[2]) for item in lo._plan.rank_order(r)[6:] if item]
        want = [old.batch_samples(s, j) for s, j in old.rank_schedule(r)[6:]]
        assert new == want


def test_position_with_starts_round_trips():
    p = Position(3, [Segment(1, 2, 9, 4), Segment(0, 0, 4, 3)], Layout(2, 1, 8), 5, [12, 40])
    assert Position.from_state(p.state_dict()) == p
