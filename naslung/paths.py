"""Where naslung keeps generated data by default: one cache directory per user."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$NASLUNG_CACHE``, else ``$XDG_CACHE_HOME/naslung``, else ``~/.cache/naslung``."""
    if os.environ.get("NASLUNG_CACHE"):
        return Path(os.environ["NASLUNG_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "naslung"


def default_phantom_dir(limit: int | None = None) -> Path:
    """The built-in dataset's store; a ``--limit`` build gets its own directory."""
    name = "lidc-phantom" if limit is None else f"lidc-phantom-limit{limit}"
    return cache_root() / name
