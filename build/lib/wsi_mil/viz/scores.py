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

And, from the store's ``contribution`` (models with an additive readout), ``contribution``:
each patch's signed share of the slide's output (a survival model's log risk, a classifier's
logit, a regression's value), coloured symmetrically about 0 (:func:`signed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

NORMALISATIONS = ("rank", "softmax", "raw", "contribution")
#: perceptually uniform colour maps (matplotlib names), and the diverging one of signed values
COLOURMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "coolwarm")
#: the colour map of signed values (patches' contributions)
DIVERGING = "coolwarm"


@dataclass(frozen=True)
class Scores:
    """Normalised scores of one slide: ``unit`` in [0, 1] for colouring, ``value`` in
    the normalisation's own units (what colour bars and measurements show)."""

    method: str
    value: npt.NDArray[np.float64]
    unit: npt.NDArray[np.float64]
    vmin: float
    vmax: float
    what: str = ""  # (contribution: of which output, in which units)

    @property
    def description(self) -> str:
        if self.method == "contribution":
            return (f"each patch's share of {self.what} (attention x the head on its embedding; the shares sum to "
                    "the slide's output), symmetric about 0: red raises it, blue lowers it")
        return {"rank": "percentile rank of attention within the slide (0 = lowest, 1 = highest)",
                "softmax": "softmax attention (sums to 1 over the slide's patches)",
                "raw": "attention logit, log(attention) (pre-softmax score up to a per-slide constant)"}[self.method]


def store_scores(store: Any, attention: npt.NDArray[np.floating], attrs: dict[str, Any], method: str) -> Scores:
    """The scores a heatmap of one attention store draws: its attention normalised by ``method``, or with
    ``contribution`` its patches' shares of the slide's output (the called class's where there are several
    outputs, else the first), refused by name when the store has none."""
    if method != "contribution":
        return normalise(attention, method, attention_kind=str(attrs.get("attention_kind", "")))
    from wsi_mil.errors import ConfigError
    from wsi_mil.io.attention import read_contribution

    shares = read_contribution(store)
    if shares is None:
        raise ConfigError(f"{store}: this attention store holds no patch contributions (its model, "
                          f"{attrs.get('model')}, has no additive readout, or the run predates them); draw it with "
                          "--normalise rank, softmax or raw, or re-run train-mil / predict with abmil, gated_abmil, "
                          "clam_sb, mean or transmil (attention readout)")
    outputs = [str(o) for o in attrs.get("outputs") or []] or ["output"]
    col = outputs.index(str(attrs.get("prediction"))) if str(attrs.get("prediction")) in outputs[:shares.shape[1]] else 0
    unit = attrs.get("contribution_unit") or "logit"
    return signed(shares[:, col], f"the slide's {outputs[col] if col < len(outputs) else 'output'} ({unit})")


def colour_map(method: str, cmap: str) -> str:
    """The colour map drawn: contributions (signed) get the diverging one unless another was asked for."""
    return DIVERGING if method == "contribution" and cmap == "viridis" else cmap


def normalise(scores: npt.NDArray[np.floating], method: str, *, attention_kind: str = "") -> Scores:
    """Normalise one slide's stored instance scores (see the module docstring)."""
    if method == "contribution":
        raise ValueError("contribution shares are read from the store: store_scores, not normalise")
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


def signed(values: npt.NDArray[np.floating], what: str) -> Scores:
    """Signed values coloured symmetrically about 0: unit 0.5 at 0, 0 / 1 at minus / plus the slide's largest
    magnitude (``what``: what they are shares of, for the legend)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    top = float(np.abs(v).max()) if v.size else 0.0
    unit = 0.5 + 0.5 * v / top if top > 0 else np.full_like(v, 0.5)
    return Scores("contribution", v, np.clip(unit, 0.0, 1.0), -top, top, what)


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


def call_with(scores: Scores, call: dict[str, Any]) -> dict[str, Any]:
    """The slide's call as a heatmap of ``scores`` says it (contributions: what the colours are, at full
    strength whatever the call)."""
    if scores.method != "contribution":
        return call
    return {**call, "positive": None, "text": f"call: {call.get('label')}. Colours: {scores.description}"}


def call_opacity(opacity: float, call: dict[str, Any]) -> float:
    """Heatmap opacity tied to the slide's call: full for a positive call, fading with the
    positive probability for a negative one (at least a fifth, so the map stays visible)."""
    if call.get("positive") is False and call.get("p") is not None:
        return float(opacity * max(0.2, min(1.0, 0.2 + 1.6 * float(call["p"]))))
    return float(opacity)
