"""What a deployed model says about itself: its input pipeline, members and label rule.

The ONNX file carries this as JSON in its ``metadata_props`` (key `METADATA_KEY`) and a
TensorRT engine in its sidecar JSON, so a runner needs no other file to turn a CT position
into the model's input (`SAMPLING` says how, in words, inside the file too). The graph itself
clips to each member's HU window and standardises with the member's statistics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INPUT_NAME = "ct_hu"
"""float32 (N, 1, crop, crop, crop) Hounsfield units."""
OUTPUT_NAMES = ("probability", "member_probabilities", "majority_vote", "attention", "gradcam")
"""probability (N,), member_probabilities (N, K), majority_vote (N,) int64, attention
(N, 1, crop, crop, crop) the stem CBAM's spatial map, gradcam (N, 1, c, c, c) with c = crop / 8."""
METADATA_KEY = "naslung"
FORMAT = 2
"""Version of the metadata layout; 2 added outside_hu and sampling (replacing background_hu)."""
THRESHOLD = 0.5
VOTE_RULE = ("a member votes malignant at probability >= 0.5; the ensemble's majority_vote is 1 "
             "when at least half of the members vote malignant (a tie counts as malignant)")
HU_UNITS = "HU"
SAMPLING = (
    "world coordinates are DICOM LPS millimetres; the grid is grid^3 points spacing_mm apart, "
    "centred on the nodule, its array axes (z, y, x) running along world +z, +y, +x; values are "
    "the CT's trilinear interpolation at those points rounded to int16 HU, outside_hu beyond the "
    "scan; the model input is the grid's cube [s:s+crop] on every axis, s = (grid - crop) // 2, "
    "as float32 of shape (N, 1, crop, crop, crop)")


class ModelError(ValueError):
    """A model file that cannot be used; str(err) is one line naming the file and the problem."""


@dataclass(frozen=True)
class MemberInfo:
    """One ensemble member: what it is, where it came from and how it normalises its input."""

    arch: str
    cbam: str
    head: str
    normalisation: dict[str, float]
    """hu_min, hu_max, mean, std: x' = (clip(x, hu_min, hu_max) - mean) / std, inside the graph."""
    source: str
    """The checkpoint directory it was read from."""
    fold: int | None = None
    val_metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a runner needs to prepare inputs and read outputs, and what made the model."""

    crop: int
    grid: int
    """Side of the 1 mm grid sampled around a nodule before its centred ``crop``^3 cube is taken
    (the crop store's side, so that inference sees exactly what evaluation saw)."""
    spacing_mm: float
    outside_hu: float
    """Value of grid points outside the scan."""
    units: str
    members: list[MemberInfo]
    label_rule: dict[str, Any]
    precision: str = "fp32"
    versions: dict[str, str] = field(default_factory=dict)
    sampling: str = SAMPLING
    format: int = FORMAT

    @property
    def archs(self) -> list[str]:
        return [m.arch for m in self.members]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, source: str | Path) -> ModelMetadata:
        """Parse the JSON a model carries; a missing, foreign or broken one is a `ModelError`."""
        if not text:
            raise ModelError(f"{source}: no naslung metadata in the model (was it made by naslung-export?)")
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ModelError(f"{source}: metadata format {data.get('format')!r} is not {FORMAT}; "
                                 "re-export the model with this version of naslung")
            members = [MemberInfo(**m) for m in data.pop("members")]
            if not members:
                raise ValueError("no members")
            metadata = cls(members=members, **data)
        except ModelError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ModelError(f"{source}: the naslung metadata is incomplete or malformed ({err})") from err
        return metadata


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    """The metadata of an ONNX file, without loading its weights into a session."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and friends, not one base class
        raise ModelError(f"{path}: not an ONNX model ({type(err).__name__})") from err
    props = {p.key: p.value for p in model.metadata_props}
    return ModelMetadata.from_json(props.get(METADATA_KEY), path)
