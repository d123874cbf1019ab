"""Option value types for the command line: every number is checked when it is parsed.

A value that makes no sense (``--epochs 0``, ``--lr nan``, ``--time-budget -5``) is refused
before any work, as argparse's one-line usage error, instead of being silently replaced by a
default or discovered an hour into a run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """A whole number >= ``low``."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number_above(low: float) -> Callable[[str], float]:
    """A finite number > ``low``."""
    def parse(text: str) -> float:
        value = _number(text)
        if value <= low:
            raise argparse.ArgumentTypeError(f"must be greater than {low:g}, got {value:g}")
        return value

    parse.__name__ = f"number > {low:g}"
    return parse


def number_at_least(low: float) -> Callable[[str], float]:
    """A finite number >= ``low``."""
    def parse(text: str) -> float:
        value = _number(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {value:g}")
        return value

    parse.__name__ = f"number >= {low:g}"
    return parse


def number_range(text: str) -> tuple[float, float]:
    """``LOW,HIGH``: two finite numbers, LOW < HIGH (e.g. an HU window)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}")
    low, high = (_number(part) for part in parts)
    if not low < high:
        raise argparse.ArgumentTypeError(f"LOW must be below HIGH, got {text!r}")
    return low, high


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_number = number_above(0.0)
non_negative_number = number_at_least(0.0)
