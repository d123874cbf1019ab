"""Data: the crop store every source writes, the built-in phantom, folds and augmentation."""

from naslung.data.store import CropStore, StoreError

__all__ = ["CropStore", "StoreError"]
