"""naslung: find, train and deploy small 3D CNNs that classify lung nodules in chest CT."""

from naslung.arch import Arch, ArchError
from naslung.models import ConvRes

__version__ = "0.1.0"
__all__ = ["Arch", "ArchError", "ConvRes", "__version__"]
