"""Bag losses with class-imbalance handling.

* ``weighted`` (default): binary and per label for multi-label, the positive weight is
  negatives/total and the negative weight positives/total (so both classes contribute
  equally; scaled so that a balanced set has weight 1); multi-class: inverse class
  frequency, normalised to mean 1.
* ``focal``: the weighted loss modulated by (1 - p_t)^gamma (Lin et al. 2017).
* ``sampler``: an unweighted loss with bags drawn inversely to their class frequency
  (see ``sample_weights``); ``none``: plain loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

IMBALANCE = ("weighted", "sampler", "focal", "none")


def label_weights(targets: npt.NDArray[np.float32], kind: str, task: Any = None) -> torch.Tensor:
    """(2, C) [negative, positive] weights per output (binary / multi-label), or (C,) class
    weights (multi-class), from the training targets (the task kind's; a multi-task's targets'
    side by side)."""
    from wsi_mil.tasks import kind_of

    return kind_of(kind).loss_weights(targets, task)


def sample_weights(targets: npt.NDArray[np.float32], kind: str) -> npt.NDArray[np.float64]:
    """Drawing probability per bag, inverse to the frequency of its class (multi-label:
    of its rarest positive label, or of the all-negative pattern)."""
    from wsi_mil.tasks import kind_of

    return kind_of(kind).sample_weights(targets)


class BagLoss(nn.Module):
    weights: torch.Tensor | None  # a buffer (None: unweighted)

    def __init__(self, kind: str, mode: str = "weighted", weights: torch.Tensor | None = None, gamma: float = 2.0,
                 task: Any = None) -> None:
        super().__init__()
        if mode not in IMBALANCE:
            raise ValueError(f"imbalance {mode!r}: choose one of {IMBALANCE}")
        from wsi_mil.tasks import kind_of

        self.kind, self.mode, self.gamma, self.task = kind, mode, gamma, task
        self.task_kind = kind_of(kind)
        use = weights is not None and mode in ("weighted", "focal")
        self.register_buffer("weights", weights if use else None, persistent=False)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over the labelled entries: a NaN target (a blank label) is masked out,
        never counted as negative; a batch with no labelled entry gives 0 (the task kind's loss)."""
        return self.task_kind.loss(logits, y, self.weights, self.mode, self.gamma, self.task)
