"""Which kernel variants a fused ConvRes really launches, recorded under Triton's interpreter.

`recorded_launches` notes every launch in a block as the variant it is (see
`naslung.kernels.compile_proof`): the kernel, its pointer dtypes, its flags and the ints Triton
would fix to 1. The interpreter launches differ from compiled ones in two flags only, UPCAST
(an interpreter workaround) and ALLOW_TF32 (off under the interpreter), so each launch is noted
as the launches it stands for on a GPU (`compiled_forms`): fp32 convs with TF32 on and off,
bf16 ones without TF32. `fused_convres_variants` runs what the fused modules run, training and
eval steps of both CBAM variants, fp32 and bf16, running statistics with a momentum and as a
cumulative average, at batch 2 and 1; ``python -m naslung.kernels.coverage`` prints the
variants as JSON (it must run with ``TRITON_INTERPRET=1``).

A compiled kernel is also specialised on which int arguments are divisible by 16, so one
variant is built once per such pattern its launches show: the recording counts those
*specialisations* too, which the GPU check's plan uses to estimate its compile time.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from naslung.kernels.compile_proof import TILE_PARAMETERS, Kind, Variant

CROP = 16
"""Large enough that no spatial size reaches 1 (16 -> 8 -> 4 -> 2), as at ConvRes's 32^3."""
ARCHS = ("4,8/8/16", "4/8,8/16")
_TYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
               "bool": "i1", "uint8": "u8"}


def _kind(value: Any, constexpr: bool) -> Kind:
    import torch

    if constexpr:
        return ("=", value)
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return ("=", 1) if value == 1 else "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def _constexpr_params(fn: Any) -> set[str]:
    return {name for name, param in inspect.signature(fn.fn).parameters.items()
            if "constexpr" in str(param.annotation)}


def launch_variant(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Kind]:
    """The kinds of one launch's arguments (autotune parameters left out)."""
    constexprs = _constexpr_params(fn)
    bound = {**dict(zip(fn.arg_names, args, strict=False)), **kwargs}
    return {name: _kind(bound[name], name in constexprs) for name in fn.arg_names
            if name in bound and name not in TILE_PARAMETERS}


def compiled_forms(name: str, kinds: dict[str, Kind]) -> set[Variant]:
    """The variants a launch under the interpreter stands for when compiled for a GPU."""
    if "UPCAST" not in kinds:
        return {(name, frozenset(kinds.items()))}
    first_pointer = next(kind for kind in kinds.values() if isinstance(kind, str) and kind.startswith("*"))
    tf32_modes = (True, False) if first_pointer == "*fp32" else (False,)
    return {(name, frozenset({**kinds, "UPCAST": ("=", False), "ALLOW_TF32": ("=", tf32)}.items()))
            for tf32 in tf32_modes}


@dataclass
class Recording:
    """The compiled variants the recorded launches stand for, and their specialisations: each
    variant with the set of its int arguments divisible by 16."""

    variants: set[Variant] = field(default_factory=set)
    specialisations: set[tuple[Variant, frozenset[str]]] = field(default_factory=set)


def _divisible_by_16(fn: Any, args: tuple, kwargs: dict[str, Any]) -> frozenset[str]:
    bound = {**dict(zip(fn.arg_names, args, strict=False)), **kwargs}
    constexprs = _constexpr_params(fn)
    return frozenset(name for name, value in bound.items()
                     if name not in constexprs and type(value) is int and value != 1 and value % 16 == 0)


@contextlib.contextmanager
def recorded_launches() -> Iterator[Recording]:
    """Every kernel launch in the block, as the compiled variants it stands for."""
    from triton.runtime.interpreter import InterpretedFunction

    recording = Recording()
    original = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> Any:
        forms = compiled_forms(self.__name__, launch_variant(self, args, kwargs))
        recording.variants.update(forms)
        divisible = _divisible_by_16(self, args, kwargs)
        recording.specialisations.update((form, divisible) for form in forms)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield recording
    finally:
        InterpretedFunction.run = original


def fused_convres_launches() -> Recording:
    """Run the fused ConvRes as training and evaluation do, and return what it launched."""
    import torch

    from naslung.kernels.runtime import interpreting
    from naslung.models import ConvRes, make_loss
    from naslung.models.fused import fuse

    if not interpreting():
        raise RuntimeError("recording launches needs the interpreter: set TRITON_INTERPRET=1")
    with recorded_launches() as recording:
        for arch, cbam, dtype, batch, cumulative in (
                (ARCHS[0], "nas-lung", torch.float32, 2, False), (ARCHS[1], "woo", torch.float32, 1, True),
                (ARCHS[0], "woo", torch.bfloat16, 2, False), (ARCHS[1], "nas-lung", torch.bfloat16, 2, True)):
            torch.manual_seed(0)
            model = fuse(ConvRes(arch, cbam=cbam)).to(dtype)
            if cumulative:
                for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)):
                    bn.momentum = None
            x = torch.randn(batch, 1, CROP, CROP, CROP, dtype=dtype)
            y = torch.arange(batch) % 2
            make_loss(model.head)(model(x).float(), y).backward()
            model.eval()
            with torch.no_grad():
                model(x)
    return recording


def to_json(variants: set[Variant]) -> list:
    rows = [[name, sorted([arg, list(kind) if isinstance(kind, tuple) else kind] for arg, kind in kinds)]
            for name, kinds in variants]
    return sorted(rows, key=json.dumps)


def from_json(rows: list) -> set[Variant]:
    return {(name, frozenset((arg, tuple(kind) if isinstance(kind, list) else kind) for arg, kind in kinds))
            for name, kinds in rows}


def recorded_launches_in_child() -> tuple[set[Variant], float]:
    """`fused_convres_launches`, run in a child process under the interpreter (Triton picks the
    interpreter or the compiler when first imported, so this process cannot switch): the
    variants, and how many specialisations a variant has on average."""
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "naslung.kernels.coverage"], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"recording the fused ConvRes's launches failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    return from_json(data["variants"]), data["specialisations_per_variant"]


def recorded_variants() -> set[Variant]:
    return recorded_launches_in_child()[0]


if __name__ == "__main__":
    found = fused_convres_launches()
    per_variant = len(found.specialisations) / max(1, len(found.variants))
    print(json.dumps({"variants": to_json(found.variants), "specialisations_per_variant": per_variant}))
