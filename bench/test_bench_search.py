"""The search's own cost: POP over the full 101,529-arch space, and its share of a smoke search.

Targets (issue: search): one POP step (draw, record, prune) well under 1 s on the full space,
and everything but training and evaluation <= 2 % of a smoke search's wall time.

    python -m pytest bench/test_bench_search.py --benchmark-json=/tmp/bench_search.json
    python bench/report.py /tmp/bench_search.json
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from naslung.search.pop import PartialOrderPruning
from naslung.search.space import SearchSpace


@pytest.fixture(scope="module")
def full_space() -> SearchSpace:
    return SearchSpace()


def test_space_and_costs(benchmark, full_space):
    """Building the original space and every arch's parameter count, vectorised."""
    benchmark.group = "search-space"
    benchmark.extra_info.update(provider="build+params", archs=len(full_space))
    benchmark.pedantic(lambda: SearchSpace().params(), rounds=5, warmup_rounds=1)


def test_pop_step_on_the_full_space(benchmark, full_space):
    """One candidate drawn and recorded (front update and pruning), 50 steps into a search."""
    benchmark.group = "search-pop-step"
    benchmark.extra_info.update(provider="draw+record", archs=len(full_space))
    cost = full_space.flops().astype(np.float64)
    oracle = np.log(full_space.params().astype(np.float64))  # monotone in the partial order
    pop = PartialOrderPruning(full_space, cost, seed=0, patience=10_000)
    for _ in range(50):
        index = pop.draw()
        pop.record(index, float(oracle[index]))

    def step() -> None:
        index = pop.draw()
        pop.record(index, float(oracle[index]))

    benchmark.pedantic(step, rounds=30, iterations=1)
    benchmark.extra_info["pruned_after"] = int(pop.n_pruned)


def test_smoke_search_overhead(benchmark, tmp_path):
    """A whole smoke search; the share of wall time outside training goes in extra_info."""
    from naslung.cli import search_main

    benchmark.group = "search-smoke"
    benchmark.extra_info.update(provider="naslung-search --preset smoke")
    runs = iter(range(100))

    def search() -> None:
        out = tmp_path / f"run{next(runs)}"
        assert search_main(["--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
        pareto = json.loads((out / "pareto.json").read_text())
        benchmark.extra_info["overhead_fraction"] = pareto["search_overhead_fraction_this_run"]

    benchmark.pedantic(search, rounds=1, iterations=1)
