"""The kernel libraries built from csrc/ (CMakeLists.txt, driven by the package build), loaded
with ctypes.

``host`` is always built: the kernel sources compiled as C++ (csrc/portable.h), for
``--kernels native`` on the CPU and for the tests. ``cuda`` exists where nvcc was found when
the package was installed: the same sources for sm_80 and sm_90, for ``--kernels cuda``.
``NASLUNG_HOST_LIBRARY=path`` loads another build of the host library instead (the tests'
sanitized build).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

HERE = Path(__file__).parent
HOST_LIBRARY_ENV = "NASLUNG_HOST_LIBRARY"

INT, I64, F32, PTR = ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_void_p
"""The C types of the ABI's arguments (csrc/portable.h): status, sizes, scalars, pointers."""

_signatures: dict[str, tuple[type, list[type]]] = {"nl_status_name": (ctypes.c_char_p, [INT])}


def declare(signatures: dict[str, tuple[type, list[type]]]) -> None:
    """Declare C ABI functions (name -> return type, argument types), as each op module does
    for its csrc/ file's header."""
    _signatures.update(signatures)


class NativeLibraryError(RuntimeError):
    """A kernel library that is not built, or a kernel call it refused; one line."""


def library_path(kind: str) -> Path | None:
    """Where the ``host`` or ``cuda`` library is, or None where it was not built."""
    if kind == "host" and os.environ.get(HOST_LIBRARY_ENV):
        return Path(os.environ[HOST_LIBRARY_ENV])
    path = HERE / f"libnaslung_{kind}{EXTENSION_SUFFIXES[0]}"  # built for this Python, by setup.py
    return path if path.is_file() else None


@functools.cache
def load(kind: str) -> ctypes.CDLL:
    """The ``host`` or ``cuda`` library with every function's signature declared."""
    path = library_path(kind)
    if path is None:
        hint = ("no CUDA compiler was found when naslung was installed" if kind == "cuda"
                else "reinstall naslung (pip install -e .) to build csrc/")
        raise NativeLibraryError(f"the {kind} kernel library is not built ({hint})")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeLibraryError(f"cannot load the {kind} kernel library {path}: {err}") from err
    return lib


def call(kind: str, name: str, *args: object) -> int:
    """Call the declared function ``name`` in the ``kind`` library; a non-zero status becomes a
    NativeLibraryError (functions that return a size return it)."""
    function = getattr(load(kind), name)
    function.restype, function.argtypes = _signatures[name]
    status = function(*args)
    if function.restype is INT and status != 0:
        describe = load(kind).nl_status_name
        describe.restype, describe.argtypes = _signatures["nl_status_name"]
        raise NativeLibraryError(f"{name} failed: {describe(status).decode()} (status {status})")
    return status


def available(kind: str) -> bool:
    """Whether the ``kind`` library is built and loads."""
    try:
        load(kind)
    except NativeLibraryError:
        return False
    return True


DTYPES = {torch.float32: 0, torch.bfloat16: 1}
"""Storage dtypes of feature maps and their codes in the C ABI (nl_dtype)."""


def device_kind(t: torch.Tensor) -> str:
    """The library for ``t``'s device: ``host`` on the CPU, ``cuda`` on a GPU."""
    if t.device.type == "cpu":
        return "host"
    if t.device.type == "cuda":
        return "cuda"
    raise ValueError(f"the native kernels run on the CPU and on CUDA GPUs, not on {t.device}")


def stream_of(t: torch.Tensor) -> int | None:
    """The stream a kernel on ``t``'s device is launched on: torch's current one."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else None


def dtype_code(t: torch.Tensor) -> int:
    """``t``'s storage dtype in the C ABI."""
    if t.dtype not in DTYPES:
        raise ValueError(f"the native kernels take fp32 or bf16 feature maps, not {t.dtype}")
    return DTYPES[t.dtype]


def ptr(t: torch.Tensor | None) -> int | None:
    """``t``'s data pointer; None (a null pointer) for an absent optional tensor."""
    return None if t is None else t.data_ptr()


@contextlib.contextmanager
def on_device_of(t: torch.Tensor) -> Iterator[None]:
    """Launch on ``t``'s GPU (the CUDA runtime launches on the current device), or on the CPU."""
    with torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext():
        yield


def check_operands(x: torch.Tensor, **operands: torch.Tensor | None) -> None:
    """Every operand on ``x``'s device: the kernels dereference their pointers on it, and a CPU
    pointer on a GPU (or the reverse) is an illegal address that poisons the CUDA context."""
    for name, t in operands.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, the feature map on {x.device}: move them together")


def fp32_vector(t: torch.Tensor, length: int, name: str) -> torch.Tensor:
    """``t`` as the contiguous fp32 vector of ``length`` values the C ABI reads."""
    if t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} values, the map {length} channels")
    return t.float().contiguous()
