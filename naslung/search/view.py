"""The search's live view: counts, candidates in training, the current front, epoch bars.

The driver calls `update` after every change; the view renders a snapshot taken then, so the
refresh thread never reads POP's state while the driver changes it. On a terminal the view
redraws in place; elsewhere (logs, CI) only the one-line-per-candidate log is printed.
"""

from __future__ import annotations

import time

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from naslung.console import console
from naslung.search.pop import PartialOrderPruning
from naslung.search.space import SearchSpace

FRONT_ROWS = 8  # the cheapest members of a long front; the rest are counted


class SearchView:
    """A rich Live display of a running search; use as a context manager."""

    def __init__(self, space: SearchSpace, objective: str, metric: str, enabled: bool = True) -> None:
        self.space, self.objective, self.metric = space, objective, metric
        self.executor = ""
        """Where trials run, as the executor describes it; set once the executor exists."""
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=console, disable=not enabled)
        self.started = time.perf_counter()
        self.snapshot: dict = {"trained": 0, "failed": 0, "in_flight": [], "pruned": 0,
                               "remaining": len(space), "front": []}
        self.live = Live(self, console=console, transient=True, refresh_per_second=4) if enabled else None

    def update(self, pop: PartialOrderPruning, scores: dict[int, float]) -> None:
        """Take a snapshot of ``pop`` (``scores``: validation score per trained index)."""
        self.snapshot = {
            "trained": len(pop.trained), "failed": len(pop.failed),
            "in_flight": [str(self.space.arch(i)) for i in pop.in_flight],
            "pruned": pop.n_pruned, "remaining": pop.n_remaining,
            "front": [(str(self.space.arch(i)), scores[i], float(pop.cost[i])) for i in pop.front]}

    def __rich__(self) -> Group:
        s = self.snapshot
        elapsed = time.perf_counter() - self.started
        status = (f"[bold]search[/bold] ({self.executor}, {elapsed:,.0f} s): {s['trained']} trained, "
                  f"{s['failed']} failed, {len(s['in_flight'])} training, {s['pruned']:,} pruned, "
                  f"{s['remaining']:,} remaining")
        front = Table(title=f"current front ({len(s['front'])})", title_justify="left", box=None)
        for column in ("arch", f"val {self.metric}", self.objective):
            front.add_column(column, justify="left" if column == "arch" else "right")
        for arch, score, cost in s["front"][:FRONT_ROWS]:
            front.add_row(arch, f"{score:.3f}", f"{cost:,.4g}")
        if len(s["front"]) > FRONT_ROWS:
            front.add_row(f"... {len(s['front']) - FRONT_ROWS} more", "", "")
        training = "training: " + ", ".join(s["in_flight"]) if s["in_flight"] else "training: -"
        return Group(status, training, front, self.progress)

    def __enter__(self) -> SearchView:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
