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
