"""The search journal: one JSON line per finished candidate, flushed to disk as it happens.

It is the search's only state on disk. A run killed at any moment loses at most the candidate
in flight: every line already there was fsynced when written, and a half-written last line
(the process died mid-write) is ignored on reading. `--resume` replays the lines in order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class JournalError(RuntimeError):
    """A journal that cannot be used to resume this search."""


class Journal:
    """Append-only JSONL file; the first line is the search's header (its settings)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, in order; a torn last line is dropped."""
        if not self.path.is_file():
            return []
        records = []
        lines = self.path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                if number == len(lines):  # the write in flight when the process died
                    break
                raise JournalError(f"{self.path}:{number} is not JSON ({err})") from err
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and fsync it before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def drop_torn_tail(self) -> None:
        """Cut a half-written last line, so that new records start on a line of their own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                os.fsync(f.fileno())
