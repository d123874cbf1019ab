"""Partial Order Pruning (POP): the NAS-Lung search loop over a `SearchSpace`.

An untrained arch j below a trained arch m (narrower and/or shallower) is assumed to be no
more accurate than m. If some trained y is at least as accurate as m and cheaper than j,
then j cannot reach the Pareto front, so it is pruned without training.

The loop is a deterministic state machine: the next candidate is a function of the seed and
the evaluations recorded so far, so a run resumes exactly by recording its journal again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from naslung.search.space import SearchSpace


@dataclass(frozen=True)
class Evaluation:
    """One trained arch: its index in the space, its accuracy and its cost (latency, FLOPs...)."""

    index: int
    accuracy: float
    cost: float


class PartialOrderPruning:
    """The POP loop as a deterministic state machine, so a run can be replayed (resumed) from its journal.

    Call `draw` for an arch to train, then `record` its accuracy (or `record_failure`), until
    `draw` returns None and nothing is in flight; `stop_reason` then says why. Several draws
    may be in flight at once (parallel training): a drawn arch is never drawn again, and it is
    recorded when its training ends even if it was pruned meanwhile. Draw k uses a generator
    seeded with (seed, k), so the same draws and records in the same order always lead to the
    same candidates.
    """

    def __init__(self, space: SearchSpace, cost: np.ndarray, seed: int = 0, patience: int = 30,
                 max_candidates: int | None = None) -> None:
        cost = np.asarray(cost, dtype=np.float64)
        if cost.shape != (len(space),):
            raise ValueError(f"cost must give one value per arch: shape ({len(space)},), got {cost.shape}")
        if not np.isfinite(cost).all():
            raise ValueError("cost has NaN or infinite values; every arch needs a finite cost")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if max_candidates is not None and max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1 (None: no budget), got {max_candidates}")
        self.space = space
        self.cost = cost
        self.seed = seed
        self.patience = patience
        self.max_candidates = max_candidates
        self.trained: list[Evaluation] = []
        self.failed: list[int] = []
        self.in_flight: list[int] = []  # drawn, not yet recorded, in draw order
        self.front: list[int] = []
        self._unchanged = 0  # records since the front last changed
        self._done = np.zeros(len(space), bool)  # trained or failed
        self._pruned = np.zeros(len(space), bool)
        self._open = np.ones(len(space), bool)  # neither done nor pruned: may still be drawn
        self._below: list[np.ndarray] = []  # `space.below` of each trained arch, bit-packed (N/8 bytes)
        self._acc = np.empty(0)  # accuracy per trained arch, in record order
        self._threshold = np.empty(0)  # per trained m: cost of the cheapest trained y with acc(y) >= acc(m)
        self._front_acc = np.empty(0)  # accuracy per front member, in front order

    @property
    def n_pruned(self) -> int:
        """Archs ruled out without training."""
        return int((self._pruned & ~self._done).sum())

    @property
    def n_remaining(self) -> int:
        """Archs still open to be drawn: not trained, not failed, not pruned."""
        return int(np.count_nonzero(self._open))

    @property
    def stop_reason(self) -> str | None:
        """Why the search is over, or None while it goes on."""
        if self.n_remaining == 0:
            return "space exhausted"
        if self.max_candidates is not None and self.n_drawn >= self.max_candidates:
            return "candidate budget"
        if self._unchanged >= self.patience:
            return f"front unchanged for {self.patience} candidates"
        return None

    @property
    def n_drawn(self) -> int:
        """Archs drawn so far: trained, failed or in flight."""
        return len(self.trained) + len(self.failed) + len(self.in_flight)

    def draw(self) -> int | None:
        """An open arch (not drawn, not pruned) chosen uniformly at random and now in flight;
        None when a stop rule holds."""
        if self.stop_reason is not None:
            return None
        open_ = np.flatnonzero(self._open)
        rng = np.random.default_rng([self.seed, self.n_drawn])
        index = int(open_[rng.integers(len(open_))])
        self._open[index] = False
        self.in_flight.append(index)
        return index

    def _land(self, index: int) -> int:
        """Mark an arch done (and out of flight if it was drawn); it must be new and in the space."""
        if not 0 <= index < len(self.space):
            raise ValueError(f"arch index {index} is outside the space of {len(self.space)} archs")
        if self._done[index]:
            raise ValueError(f"arch {index} ({self.space.arch(index)}) was already recorded")
        if index in self.in_flight:
            self.in_flight.remove(index)
        self._done[index], self._open[index] = True, False
        return int(index)

    def record_failure(self, index: int) -> None:
        """A candidate whose training failed: it is never drawn again and never on the front.

        It counts against `max_candidates` (its training was spent) but not against patience.
        """
        index = self._land(index)
        self.failed.append(index)

    def record(self, index: int, accuracy: float) -> None:
        """Add a finished evaluation, update the Pareto front and prune."""
        accuracy = float(accuracy)
        if not np.isfinite(accuracy):
            raise ValueError(f"accuracy of arch {index} must be finite, got {accuracy}")
        index = self._land(index)
        cost = float(self.cost[index])
        self.trained.append(Evaluation(index, accuracy, cost))
        self._acc = np.append(self._acc, accuracy)
        self._below.append(np.packbits(self.space.below(index)))
        changed = self._update_front(index, accuracy, cost)
        self._unchanged = 0 if changed else self._unchanged + 1
        self._prune(accuracy, cost)

    def _update_front(self, index: int, accuracy: float, cost: float) -> bool:
        """Put the new evaluation on the front unless an earlier one is as good and as cheap.

        The front is kept sorted by cost, so its accuracies strictly increase along it.
        """
        costs = self.cost[self.front]
        accs = self._front_acc
        cheaper = np.searchsorted(costs, cost, side="right")
        if cheaper and accs[cheaper - 1] >= accuracy:
            return False
        start = np.searchsorted(costs, cost, side="left")
        stop = start + np.searchsorted(accs[start:], accuracy, side="right")  # now dominated
        self.front[start:stop] = [index]
        self._front_acc = np.concatenate([accs[:start], [accuracy], accs[stop:]])
        return True

    def _prune(self, accuracy: float, cost: float) -> None:
        """Apply the rule for the new arch, and again for each earlier m whose y got cheaper.

        Thresholds only fall as evaluations arrive, so pruned archs stay pruned.
        """
        # y for the new arch: the cheapest front member at least as accurate, itself at worst.
        y = int(np.searchsorted(self._front_acc, accuracy, side="left"))
        newer = (self._threshold > cost) & (self._acc[:-1] <= accuracy)  # the new arch is their y now
        self._threshold[newer] = cost
        self._threshold = np.append(self._threshold, self.cost[self.front[y]])
        for m in [*np.flatnonzero(newer), len(self.trained) - 1]:
            beaten = np.unpackbits(self._below[m], count=len(self.space)).view(bool)
            beaten &= self.cost > self._threshold[m]
            self._pruned |= beaten
            self._open &= ~beaten
