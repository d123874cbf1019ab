"""Learning-rate schedules: the epoch's rate, a pure function of the config and the epoch.

* ``constant``: the Adam rate throughout (what the original's search-time training used);
* ``original``: NAS-Lung's final training. Its ``main.py`` lowers the rate at the end of each
  of the last ``num_epochs_decay`` epochs by ``lr / num_epochs_decay`` of the *current* rate
  (``lr -= lr / float(num_epochs_decay)``), i.e. multiplies it by (1 - 1/D) per epoch: 70 of
  400 epochs, so the last epoch trains at (69/70)^69 = 0.37 of the initial rate. Here D is
  the same fraction, 70/400, of the run's epochs (at least 1);
* ``cosine``: half a cosine from the initial rate to 0 over the run's epochs.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "original", "cosine")
ORIGINAL_DECAY_FRACTION = 70 / 400
"""run_training.sh: --num_epochs 400, main.py: num_epochs_decay = 70."""


def decay_epochs(epochs: int) -> int:
    """The number of final epochs the ``original`` schedule decays over."""
    return max(1, round(ORIGINAL_DECAY_FRACTION * epochs))


def learning_rate(schedule: str, lr: float, epoch: int, epochs: int) -> float:
    """The rate to train epoch ``epoch`` (0-based) of ``epochs`` with."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} is outside 0..{epochs - 1}")
    if schedule == "constant":
        return lr
    if schedule == "original":
        decays = decay_epochs(epochs)
        # the update after epoch e applies when e + 1 > epochs - decays, so before epoch e
        # there were max(0, e - (epochs - decays)) of them
        return lr * (1 - 1 / decays) ** max(0, epoch - (epochs - decays))
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
