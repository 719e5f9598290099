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
from typing import Any

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


def slide_call(attrs: dict[str, Any]) -> dict[str, Any]:
    """The slide-level call of an attention store, for every view of its heatmap:
    ``positive`` (True / False; None for multi-class), the probability of the positive
    class (``p``), and a sentence that says what the colours do and do not mean."""
    from wsi_mil.tasks import kind_of

    outputs = list(attrs.get("outputs") or [])
    probs = [float(v) for v in (attrs.get("probability") or [])]
    pred = attrs.get("prediction")
    probability = dict(zip(outputs, probs, strict=False))
    kind = kind_of(str(attrs.get("task_kind") or "binary"))  # (stores of earlier runs: a classifier's)
    if not kind.class_call:  # a risk or a value: no positive call, colours at full strength
        text = (f"call: {pred} ({kind.value_text(probability)}). Colours rank patches by attention within this "
                "slide: where the model looked, not a map of the outcome")
        return {"positive": None, "p": None, "label": str(pred), "text": text}
    if isinstance(pred, list):  # multi-label: the labels called
        positive: bool | None = bool(pred)
        p = max(probs) if probs else None
        label = ", ".join(map(str, pred)) or "none of " + ", ".join(outputs)
    elif len(outputs) == 1:  # binary: outputs = (positive class,)
        positive = str(pred) == outputs[0]
        p = probs[0] if probs else None
        label = str(pred)
    else:
        positive, p, label = None, max(probs) if probs else None, str(pred)
    ptxt = ", ".join(f"p({k}) = {v:.2f}" for k, v in probability.items())
    if positive is False:
        text = (f"NEGATIVE call: {label} ({ptxt}). Colours rank patches within this slide only; "
                "bright does not mean tumour here")
    elif positive:
        text = f"POSITIVE call: {label} ({ptxt})"
    else:
        text = f"call: {label} ({ptxt})"
    return {"positive": positive, "p": p, "label": label, "text": text}


def call_opacity(opacity: float, call: dict[str, Any]) -> float:
    """Heatmap opacity tied to the slide's call: full for a positive call, fading with the
    positive probability for a negative one (at least a fifth, so the map stays visible)."""
    if call.get("positive") is False and call.get("p") is not None:
        return float(opacity * max(0.2, min(1.0, 0.2 + 1.6 * float(call["p"]))))
    return float(opacity)
