"""Versions recorded with every artefact, so a result can be traced to the code that made it."""

from __future__ import annotations

import platform

import numpy as np
import torch

import naslung


def versions() -> dict[str, str]:
    """naslung, Python, NumPy and torch versions, and the CUDA/cuDNN torch was built with."""
    return {
        "naslung": naslung.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
    }


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one (timings name their machine)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"
