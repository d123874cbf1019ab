"""Training: one split (`train_fold`), k-fold cross-validation, metrics and checkpoints."""

from naslung.train.checkpoint import load_checkpoint, save_checkpoint
from naslung.train.crossval import cross_validate
from naslung.train.metrics import binary_metrics, summarise
from naslung.train.trainer import FoldSplit, TrainConfig, train_fold

__all__ = ["FoldSplit", "TrainConfig", "binary_metrics", "cross_validate", "load_checkpoint",
           "save_checkpoint", "summarise", "train_fold"]
