"""Per-slide score normalisation for heatmaps — explicit, and stated in every export.

The attention stores hold what the model produced per instance: for attention models
the softmax-normalised attention (sums to 1 over the bag), for the pooling baselines
the instance score. Three normalisations, all within one slide:

- ``softmax``: the attention as the model weighs it (sums to 1); colours span 0 … max.
  For score models the scores are passed through a softmax first.
- ``raw``: the attention logit, ``log(attention)`` (the model's pre-softmax score up to a
  per-slide constant, which a softmax discards anyway); for score models the score.
  Colours span the slide's min … max.
- ``rank`` (default): the percentile rank in [0, 1] — every slide uses the whole colour
  range, robust to a few extreme patches; what reviewers usually want.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

NORMALISATIONS = ("rank", "softmax", "raw")
#: perceptually uniform colour maps (matplotlib names)
COLOURMAPS = ("viridis", "magma", "inferno", "plasma", "cividis")


@dataclass(frozen=True)
class Scores:
    """Normalised scores of one slide: ``unit`` in [0, 1] for colouring, ``value`` in
    the normalisation's own units (what colour bars and measurements show)."""

    method: str
    value: npt.NDArray[np.float64]
    unit: npt.NDArray[np.float64]
    vmin: float
    vmax: float

    @property
    def description(self) -> str:
        return {"rank": "percentile rank of attention within the slide (0 = lowest, 1 = highest)",
                "softmax": "softmax attention (sums to 1 over the slide's patches)",
                "raw": "attention logit, log(attention) (pre-softmax score up to a per-slide constant)"}[self.method]


def normalise(scores: npt.NDArray[np.floating], method: str, *, attention_kind: str = "") -> Scores:
    """Normalise one slide's stored instance scores (see the module docstring)."""
    if method not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALISATIONS)}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        return Scores(method, s, s, 0.0, 1.0)
    is_attention = "attention" in attention_kind or not attention_kind
    if method == "rank":
        from scipy.stats import rankdata

        value = (rankdata(s, method="average") - 1.0) / max(1, s.size - 1)  # ties share a colour
        return Scores(method, value, value, 0.0, 1.0)
    if method == "softmax":
        if is_attention:
            value = s
        else:
            e = np.exp(s - s.max())
            value = e / e.sum()
        vmin, vmax = 0.0, float(value.max())
    else:
        value = np.log(np.clip(s, 1e-30, None)) if is_attention else s
        vmin, vmax = float(value.min()), float(value.max())
    span = vmax - vmin
    unit = (value - vmin) / span if span > 0 else np.full_like(value, 0.5)
    return Scores(method, value, np.clip(unit, 0.0, 1.0), vmin, vmax)
