"""naslung: find, train and deploy small 3D CNNs that classify lung nodules in chest CT.

`Arch` and `ConvRes` are loaded on first use, so that importing a light module of the package
(the console scripts' entry points) does not import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Arch", "ArchError", "ConvRes", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Arch", "ArchError"):
        from naslung import arch

        return getattr(arch, name)
    if name == "ConvRes":
        from naslung.models import ConvRes

        return ConvRes
    raise AttributeError(f"module 'naslung' has no attribute {name!r}")
