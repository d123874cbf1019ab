"""Partial Order Pruning against exhaustive evaluation, with a synthetic accuracy (no training)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from naslung.search.pop import PartialOrderPruning
from naslung.search.space import SearchSpace


@pytest.fixture(scope="module")
def small() -> SearchSpace:
    return SearchSpace((4, 8, 16, 32), 3, 6)


@pytest.fixture(scope="module")
def full() -> SearchSpace:
    return SearchSpace()


def oracle(space: SearchSpace) -> np.ndarray:
    """An accuracy monotone in the partial order, yet not a function of FLOPs.

    log(params), depth and a sum of per-block bonuses (random, increasing with width, per stage)
    all grow under widening and adding blocks; params and FLOPs weigh the stages differently,
    so they rank archs differently, and the bonuses break the ties params and FLOPs leave.
    """
    bonus = np.sort(np.random.default_rng(7).random((3, len(space.widths))), axis=1) * 0.01
    blocks = space.codes >= 0
    ends, block = np.cumsum(space.stage_lengths, axis=1), np.arange(space.max_depth)
    stage = (block >= ends[:, :1]).astype(int) + (block >= ends[:, 1:2])
    return (np.log(space.params()) + 0.05 * blocks.sum(1)
            + np.where(blocks, bonus[stage, space.codes], 0).sum(1))


def exhaustive_front(accuracy: np.ndarray, cost: np.ndarray) -> list[int]:
    """Archs no other beats on both accuracy and cost (all values distinct here), by cost."""
    order = np.lexsort((-accuracy, cost))
    best_before = np.maximum.accumulate(np.concatenate([[-np.inf], accuracy[order][:-1]]))
    return order[accuracy[order] > best_before].tolist()


def run(pop: PartialOrderPruning, accuracy: np.ndarray) -> PartialOrderPruning:
    while (index := pop.draw()) is not None:
        pop.record(index, accuracy[index])
    return pop


def test_oracle_is_monotone_and_not_a_function_of_cost(small):
    accuracy, flops = oracle(small), small.flops()
    for i in range(len(small)):
        below = small.below(i)
        below[i] = False
        assert (accuracy[below] < accuracy[i]).all()
    by_cost = np.argsort(flops)
    assert (np.diff(accuracy[by_cost]) < 0).any()  # a costlier arch can be less accurate
    pairs = np.stack([accuracy, flops], axis=1)
    assert len(np.unique(pairs, axis=0)) == len(small)  # so the exhaustive front is unambiguous


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cost_kind", ["flops", "noisy latency"])
def test_pop_recovers_the_exhaustive_front(small, seed, cost_kind):
    accuracy, cost = oracle(small), small.flops().astype(float)
    if cost_kind == "noisy latency":  # not monotone in the order: the rule must still be safe
        cost *= np.random.default_rng(seed).uniform(0.5, 1.5, len(small))
    pop = run(PartialOrderPruning(small, cost, seed=seed, patience=10**9), accuracy)
    assert pop.stop_reason == "space exhausted"
    assert pop.front == exhaustive_front(accuracy, cost)
    assert len(pop.trained) + pop.n_pruned == len(small)
    print(f"POP ({cost_kind}, seed {seed}) evaluated {len(pop.trained)} of {len(small)} archs")
    assert len(pop.trained) < len(small) / 2


@pytest.mark.slow
def test_pop_recovers_the_exhaustive_front_of_the_full_space(full):
    accuracy, cost = oracle(full), full.flops()
    pop = PartialOrderPruning(full, cost, seed=0, patience=10**9)
    slowest = 0.0
    while (index := pop.draw()) is not None:
        start = time.perf_counter()
        pop.record(index, accuracy[index])
        slowest = max(slowest, time.perf_counter() - start)
    assert pop.front == exhaustive_front(accuracy, cost.astype(float))
    print(f"POP evaluated {len(pop.trained)} of {len(full)} archs; front of {len(pop.front)}; "
          f"slowest record {slowest * 1e3:.1f} ms")
    assert len(pop.trained) < len(full) / 10  # the speed of a record is bench/test_bench_search.py's


def test_front_keeps_the_first_of_exact_ties_and_drops_dominated(small):
    rng = np.random.default_rng(3)
    cost = rng.integers(0, 6, len(small)).astype(float)  # many equal costs
    pop = PartialOrderPruning(small, cost, patience=10**9)
    accuracy = {}
    for index in rng.permutation(len(small))[:80]:
        if pop._done[index]:
            continue
        accuracy[index] = float(rng.integers(0, 6))  # many equal accuracies
        pop.record(index, accuracy[index])
    order = list(accuracy)
    expected = [i for i in order if not any(
        cost[k] <= cost[i] and accuracy[k] >= accuracy[i]
        and (cost[k] < cost[i] or accuracy[k] > accuracy[i] or order.index(k) < order.index(i))
        for k in order if k != i)]
    assert pop.front == sorted(expected, key=lambda i: cost[i])
    assert sorted(e.index for e in pop.trained) == sorted(accuracy)


def test_candidate_budget(small):
    pop = PartialOrderPruning(small, small.flops(), max_candidates=5, patience=10**9)
    for k in range(5):
        index = pop.draw()
        pop.record_failure(index) if k == 2 else pop.record(index, float(k))
    assert pop.stop_reason == "candidate budget" and pop.draw() is None
    assert len(pop.trained) == 4 and pop.failed == [pop.failed[0]]


def test_patience(full):
    cost = full.flops()
    pop = PartialOrderPruning(full, cost, patience=3)
    pop.record(int(np.argmin(cost)), 1.0)  # cheapest and best: no later arch can change the front
    for _ in range(3):
        assert pop.stop_reason is None
        pop.record(pop.draw(), 0.5)
    assert pop.stop_reason == "front unchanged for 3 candidates" and pop.draw() is None
    assert pop.front == [int(np.argmin(cost))]


def test_record_failure(small):
    pop = PartialOrderPruning(small, small.flops(), patience=10**9)
    remaining = pop.n_remaining
    failed = pop.draw()
    pop.record_failure(failed)
    assert pop.n_remaining == remaining - 1 and pop.failed == [failed] and pop.front == []
    drawn = []
    while (index := pop.draw()) is not None:
        drawn.append(index)
        pop.record(index, 0.0)
    assert failed not in drawn and failed not in pop.front
    with pytest.raises(ValueError, match="already recorded"):
        pop.record(failed, 1.0)


def windowed_run(space: SearchSpace, accuracy: np.ndarray, slots: int, seed: int = 0) -> PartialOrderPruning:
    """Parallel training as the search driver does it: keep `slots` draws in flight and record
    them in draw order."""
    pop = PartialOrderPruning(space, space.flops(), seed=seed, patience=10**9)
    while True:
        while len(pop.in_flight) < slots and pop.draw() is not None:
            pass
        if not pop.in_flight:
            return pop
        head = pop.in_flight[0]
        pop.record(head, accuracy[head])


def test_draws_in_flight_are_distinct_and_count_against_the_budget(small):
    pop = PartialOrderPruning(small, small.flops(), max_candidates=4, patience=10**9)
    drawn = [pop.draw() for _ in range(4)]
    assert len(set(drawn)) == 4 and pop.in_flight == drawn
    assert pop.stop_reason == "candidate budget" and pop.draw() is None
    pop.record(drawn[2], 0.9)
    pop.record_failure(drawn[0])
    assert pop.in_flight == [drawn[1], drawn[3]] and pop.draw() is None


def test_an_arch_pruned_while_in_flight_is_still_recorded(small):
    cost = small.flops().astype(float)
    pop = PartialOrderPruning(small, cost, patience=10**9)
    drawn = pop.draw()
    above = next(m for m in np.argsort(-cost) if m != drawn and small.below(m)[drawn])
    pop.record(int(above), 1.0)
    pop.record(int(np.argmin(cost)), 1.0)  # as accurate as `above` and cheaper than `drawn`
    assert pop._pruned[drawn] and pop.in_flight == [drawn]
    pop.record(drawn, 0.5)
    assert pop.in_flight == [] and drawn in [e.index for e in pop.trained]


@pytest.mark.parametrize("slots", [2, 5])
def test_parallel_draws_still_find_the_exhaustive_front(small, slots):
    accuracy = oracle(small)
    pop = windowed_run(small, accuracy, slots)
    assert pop.front == exhaustive_front(accuracy, small.flops().astype(float))
    again = windowed_run(small, accuracy, slots)
    assert [e.index for e in again.trained] == [e.index for e in pop.trained]  # deterministic
    sequential = windowed_run(small, accuracy, 1)
    print(f"{slots} in flight: {len(pop.trained)} trained, sequential: {len(sequential.trained)}")


def journal_run(space: SearchSpace, accuracy: np.ndarray, seed: int) -> tuple[PartialOrderPruning, list]:
    """A run where every fifth candidate fails; returns it and its journal of (index, accuracy)."""
    pop, journal = PartialOrderPruning(space, space.flops(), seed=seed, patience=15), []
    while (index := pop.draw()) is not None:
        if len(journal) % 5 == 4:
            pop.record_failure(index)
            journal.append((index, None))
        else:
            pop.record(index, accuracy[index])
            journal.append((index, accuracy[index]))
    return pop, journal


def state(pop: PartialOrderPruning) -> tuple:
    return (pop.front, pop.trained, pop.failed, pop.n_pruned, pop.n_remaining, pop.stop_reason,
            pop.in_flight)


def test_replaying_the_journal_reproduces_the_run(small):
    accuracy = oracle(small)
    original, journal = journal_run(small, accuracy, seed=11)
    assert original.stop_reason is not None and len(journal) > 10
    replay = PartialOrderPruning(small, small.flops(), seed=11, patience=15)
    for k, (index, acc) in enumerate(journal):
        if k < len(journal) // 2:  # resume: the first half is recorded without drawing
            assert replay.draw() == index
        replay.record_failure(index) if acc is None else replay.record(index, acc)
    assert state(replay) == state(original)
    other, other_journal = journal_run(small, accuracy, seed=12)
    assert [i for i, _ in other_journal] != [i for i, _ in journal]


@pytest.mark.parametrize("kwargs, message", [
    ({"cost": np.zeros(3)}, "one value per arch"),
    ({"cost": "nan"}, "NaN or infinite"),
    ({"patience": 0}, "patience must be at least 1"),
    ({"max_candidates": 0}, "max_candidates must be at least 1"),
])
def test_bad_arguments_are_rejected(small, kwargs, message):
    kwargs = {"cost": small.flops(), **kwargs}
    if isinstance(kwargs["cost"], str):
        kwargs["cost"] = np.full(len(small), np.nan)
    with pytest.raises(ValueError, match=message):
        PartialOrderPruning(small, **kwargs)


def test_bad_records_are_rejected(small):
    pop = PartialOrderPruning(small, small.flops())
    with pytest.raises(ValueError, match="outside the space"):
        pop.record(len(small), 0.5)
    with pytest.raises(ValueError, match="must be finite"):
        pop.record(0, float("nan"))
    pop.record(0, 0.5)
    with pytest.raises(ValueError, match="already recorded"):
        pop.record_failure(0)
