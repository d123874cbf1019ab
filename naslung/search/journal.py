"""The search journal: one JSON line per finished candidate, flushed to disk as it happens.

It is the search's only state on disk. A run killed at any moment loses at most the candidate
in flight: every line already there was fsynced when written, and a half-written last line
(the process died mid-write) is ignored on reading. `--resume` replays the lines in order.

A journal is also input a user may have edited or damaged, so every line is checked against
its schema here (`check_record`), and the driver recomputes on replay what can be recomputed
(the arch at each index, its parameters, FLOPs and cost). Any mismatch is one `JournalError`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

_NUMBER = (int, float)
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "header": {"config": dict, "store_sha256": str, "store": str},
    "candidate": {"index": int, "arch": str, "seed": int, "params": int, "flops": int,
                  "cost": _NUMBER, "status": str},
    "slots": {"slots": int},
}
"""The fields every line of each ``type`` must have, and their JSON types."""


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
                record = json.loads(line)
            except ValueError as err:
                if number == len(lines):  # the write in flight when the process died
                    break
                raise JournalError(f"{self.path}:{number} is not JSON ({err})") from err
            check_record(record, first=not records, where=f"{self.path}:{number}")
            records.append(record)
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


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false are not numbers
        return kind is bool
    return isinstance(value, kind)


def check_record(record: Any, first: bool, where: str) -> None:
    """`JournalError` unless ``record`` is a well-formed journal line (the header first)."""
    if not isinstance(record, dict):
        raise JournalError(f"{where}: a journal line must be a JSON object, got {type(record).__name__}")
    kind = record.get("type")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise JournalError(f"{where}: unknown line type {kind!r} (expected one of {', '.join(SCHEMA)})")
    if first != (kind == "header"):
        raise JournalError(f"{where}: {'the first line must be the header' if first else 'a second header'}")
    for name, expected in SCHEMA[kind].items():
        if name not in record:
            raise JournalError(f"{where}: a {kind} line without {name!r}")
        if not _is(record[name], expected):
            raise JournalError(f"{where}: {name} {record[name]!r} is not of the expected type")
    if "slots" in record and (not _is(record["slots"], int) or record["slots"] < 1):
        raise JournalError(f"{where}: slots {record['slots']!r} must be a whole number >= 1")
    if kind != "candidate":
        return
    if record["index"] < 0:
        raise JournalError(f"{where}: index {record['index']} is negative")
    if record["status"] not in ("ok", "failed"):
        raise JournalError(f"{where}: status {record['status']!r} is neither 'ok' nor 'failed'")
    score = record.get("score")
    if record["status"] == "ok" and not (_is(score, _NUMBER) and math.isfinite(score) and 0 <= score <= 1):
        raise JournalError(f"{where}: score {score!r} of a trained candidate must be a number in 0..1")
