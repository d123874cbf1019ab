"""How the kernels run: under Triton's CPU interpreter or compiled, which autotune configs they
try, and on which GPU they launch.

* `interpreting` reads ``TRITON_INTERPRET`` exactly as Triton itself does (its knobs accept
  ``1``, ``true``, ``on``...), so naslung and Triton never disagree about the mode.
* `autotune_configs` is the one place that chooses a kernel's configs: under the interpreter one
  large tile (the interpreter's cost grows with program instances, not tile size); with
  ``NASLUNG_AUTOTUNE=first`` only the first config, so a correctness check does not pay for
  tuning; otherwise all of them.
* `on_tensor_device` makes a host function launch on its first tensor's GPU: Triton launches on
  the *current* CUDA device, which is not the tensors' when they live on ``cuda:1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

AUTOTUNE_ENV = "NASLUNG_AUTOTUNE"
AUTOTUNE_MODES = ("all", "first")

F = TypeVar("F", bound=Callable[..., Any])


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``), as Triton reads it."""
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4 read the variable itself, "1" only
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def autotune_mode() -> str:
    mode = os.environ.get(AUTOTUNE_ENV, "all").strip().lower() or "all"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}={mode!r}: expected one of {', '.join(AUTOTUNE_MODES)}")
    return mode


def autotune_configs(configs: Sequence[Any], interpreter_config: Any) -> list[Any]:
    """The configs a kernel's autotuner tries here (see the module doc)."""
    if interpreting():
        return [interpreter_config]
    return list(configs[:1]) if autotune_mode() == "first" else list(configs)


def device_guard(device: Any) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current for Triton launches when it is a CUDA device."""
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(launcher: F) -> F:
    """Run the host function ``launcher`` with its first tensor argument's device current."""
    import torch

    @functools.wraps(launcher)
    def launch(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        with device_guard(device):
            return launcher(*args, **kwargs)

    launch.launches_on_tensor_device = True  # type: ignore[attr-defined]
    return launch  # type: ignore[return-value]
