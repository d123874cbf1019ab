"""Architecture search: the NAS-Lung search space and Partial Order Pruning over it."""
