"""Which LIDC nodules count, and whether each is benign or malignant.

The radiologists' malignancy ratings (1 highly unlikely .. 5 highly suspicious) are turned
into a binary label the way NAS-Lung and most LIDC studies do: a nodule is kept when enough
readers marked it and it is large enough, its readers' ratings are summarised (mean by
default, median as an option), above 3 is malignant, below 3 benign, and exactly 3
(indeterminate) leaves the nodule out. The rule knows nothing about where the ratings come
from, so the built-in phantom and real LIDC-IDRI data share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: The nine ratings of the LIDC reading protocol, named as pylidc's ``Annotation`` names them.
RATINGS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin",
           "lobulation", "spiculation", "texture", "malignancy")
LABEL_RULES = ("mean", "median")
BENIGN, MALIGNANT = 0, 1
INDETERMINATE = 3


@dataclass(frozen=True)
class LabelRule:
    """Inclusion thresholds and the summary that labels a nodule from its readers' ratings."""

    rule: str = "mean"
    min_readers: int = 3
    min_diameter_mm: float = 3.0

    def __post_init__(self) -> None:
        if self.rule not in LABEL_RULES:
            raise ValueError(f"unknown label rule {self.rule!r}; choose one of "
                             f"{', '.join(LABEL_RULES)}")
        if self.min_readers < 1:
            raise ValueError(f"min_readers must be at least 1, got {self.min_readers}")
        if not math.isfinite(self.min_diameter_mm) or self.min_diameter_mm < 0:
            raise ValueError(f"the minimum diameter must be a finite number of mm >= 0, got "
                             f"{self.min_diameter_mm}")

    def includes(self, n_readers: int, diameter_mm: float) -> bool:
        """Whether a nodule read by ``n_readers`` with this mean diameter is considered."""
        return n_readers >= self.min_readers and diameter_mm >= self.min_diameter_mm

    def score(self, malignancy: Sequence[int]) -> float:
        """The readers' malignancy ratings summarised by the rule."""
        if len(malignancy) == 0:
            raise ValueError("a nodule needs at least one malignancy rating")
        summary = np.mean if self.rule == "mean" else np.median
        return float(summary(np.asarray(malignancy, dtype=np.float64)))

    def label(self, malignancy: Sequence[int]) -> int | None:
        """`MALIGNANT` above 3, `BENIGN` below 3, None (left out) at exactly 3."""
        score = self.score(malignancy)
        if score == INDETERMINATE:
            return None
        return MALIGNANT if score > INDETERMINATE else BENIGN


def rating_columns(readers: Sequence[Mapping[str, int]]) -> dict[str, int | str | float]:
    """Table columns for one nodule: ``n_readers``, every rating in `RATINGS` as its readers'
    values joined by ";" (reader order is the same in every column), and the malignancy
    ratings' mean and median."""
    malignancy = [reader["malignancy"] for reader in readers]
    return {"n_readers": len(readers),
            **{name: ";".join(str(int(reader[name])) for reader in readers) for name in RATINGS},
            "malignancy_mean": round(float(np.mean(malignancy)), 4),
            "malignancy_median": float(np.median(malignancy))}
