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

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

IMBALANCE = ("weighted", "sampler", "focal", "none")


def label_weights(targets: npt.NDArray[np.float32], kind: str) -> torch.Tensor:
    """(2, C) [negative, positive] weights per output (binary / multi-label), or (C,) class
    weights (multi-class), from the training targets."""
    t = np.asarray(targets, dtype=np.float64)
    t = t[~np.isnan(t).any(axis=1)] if kind == "multiclass" else t
    if kind == "multiclass":
        freq = t.mean(axis=0).clip(min=1e-6)
        w = 1.0 / freq
        return torch.tensor(w / w.mean(), dtype=torch.float32)
    pos = np.nan_to_num(np.nanmean(t, axis=0), nan=0.5)  # blank labels (NaN) do not count
    # positive weight = negatives / total, negative weight = positives / total; x2 so that
    # a balanced set gets weight 1 for both
    return torch.tensor(np.stack([2 * pos, 2 * (1 - pos)]).clip(min=1e-3), dtype=torch.float32)


def sample_weights(targets: npt.NDArray[np.float32], kind: str) -> npt.NDArray[np.float64]:
    """Drawing probability per bag, inverse to the frequency of its class (multi-label:
    of its rarest positive label, or of the all-negative pattern)."""
    t = np.nan_to_num(np.asarray(targets, dtype=float), nan=0.0) > 0.5
    if kind == "multilabel":
        freq = t.mean(axis=0).clip(min=1e-6)
        neg = max(1e-6, float((~t.any(axis=1)).mean()))
        w = np.asarray([1.0 / freq[row].min() if row.any() else 1.0 / neg for row in t])
    else:
        cls = t.argmax(axis=1) if t.shape[1] > 1 else t[:, 0].astype(int)
        counts = np.bincount(cls, minlength=2).astype(float)
        w = 1.0 / counts[cls]
    return w / w.sum()


class BagLoss(nn.Module):
    weights: torch.Tensor | None  # a buffer (None: unweighted)

    def __init__(self, kind: str, mode: str = "weighted", weights: torch.Tensor | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        if mode not in IMBALANCE:
            raise ValueError(f"imbalance {mode!r}: choose one of {IMBALANCE}")
        self.kind, self.mode, self.gamma = kind, mode, gamma
        use = weights is not None and mode in ("weighted", "focal")
        self.register_buffer("weights", weights if use else None, persistent=False)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over the labelled entries: a NaN target (a blank label) is masked out,
        never counted as negative; a batch with no labelled entry gives 0."""
        logits = logits.float()
        known = ~torch.isnan(y)
        y = torch.nan_to_num(y, nan=0.0)
        if self.kind == "multiclass":
            rows = known.all(dim=1)
            target = y.argmax(dim=1)
            ce = F.cross_entropy(logits, target, weight=self.weights, reduction="none")
            if self.mode == "focal":
                pt = torch.softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
                ce = ce * (1 - pt) ** self.gamma
            return (ce * rows).sum() / rows.sum().clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if self.weights is not None:
            bce = bce * (y * self.weights[1] + (1 - y) * self.weights[0])
        if self.mode == "focal":
            p = torch.sigmoid(logits)
            pt = y * p + (1 - y) * (1 - p)
            bce = bce * (1 - pt) ** self.gamma
        return (bce * known).sum() / known.sum().clamp(min=1)
