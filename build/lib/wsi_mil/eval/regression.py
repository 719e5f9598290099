"""Metrics and the calibration plot of a continuous target: MAE, RMSE, R², Pearson and
Spearman correlation, each interval a paired percentile bootstrap (``scipy.stats.bootstrap``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def _r2(y: npt.NDArray[Any], p: npt.NDArray[Any], axis: int = -1) -> Any:
    ss_res = np.sum((y - p) ** 2, axis=axis)
    ss_tot = np.sum((y - np.mean(y, axis=axis, keepdims=True)) ** 2, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - ss_res / ss_tot


def _pearson(y: npt.NDArray[Any], p: npt.NDArray[Any], axis: int = -1) -> Any:
    yc = y - np.mean(y, axis=axis, keepdims=True)
    pc = p - np.mean(p, axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(yc * pc, axis=axis) / np.sqrt(np.sum(yc**2, axis=axis) * np.sum(pc**2, axis=axis))


def _spearman(y: npt.NDArray[Any], p: npt.NDArray[Any], axis: int = -1) -> Any:
    from scipy.stats import rankdata

    return _pearson(rankdata(y, axis=axis), rankdata(p, axis=axis), axis=axis)


def _ci(stat: Any, y: npt.NDArray[Any], p: npt.NDArray[Any], n_boot: int, seed: int) -> tuple[float, float] | None:
    from scipy.stats import bootstrap

    if n_boot <= 0 or len(y) < 5:
        return None
    res = bootstrap((y, p), stat, paired=True, vectorized=True, n_resamples=n_boot, method="percentile",
                    random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if not (np.isfinite(lo) and np.isfinite(hi)) else (lo, hi)


def regression_metrics(y: npt.NDArray[Any], p: npt.NDArray[Any], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Figures of predictions ``p`` against targets ``y`` (1-D, labelled samples only); the
    correlations and R² are None where undefined (fewer than 3 samples, a constant)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    out: dict[str, Any] = {"n": len(y)}
    if len(y) == 0:
        return out
    out["mae"] = float(np.mean(np.abs(y - p)))
    out["rmse"] = float(np.sqrt(np.mean((y - p) ** 2)))
    defined = len(y) >= 3 and np.var(y) > 0 and np.var(p) > 0
    for name, stat in (("r2", _r2), ("pearson", _pearson), ("spearman", _spearman)):
        value = float(stat(y, p)) if defined or (name == "r2" and len(y) >= 3 and np.var(y) > 0) else None
        out[name] = value
        out[f"{name}_ci"] = _ci(stat, y, p, n_boot, seed) if value is not None else None
    out["mae_ci"] = _ci(lambda a, b, axis=-1: np.mean(np.abs(a - b), axis=axis), y, p, n_boot, seed)
    out["ci_method"] = "percentile bootstrap, paired (scipy.stats.bootstrap)" if n_boot > 0 else None
    return out


def calibration_plot(path: Path, y: npt.NDArray[Any], p: npt.NDArray[Any], name: str, where: str) -> None:
    """Predicted against observed, with the identity line and the mean observed value per
    decile of the prediction (where the model is biased, the deciles leave the line)."""
    from wsi_mil.eval.plots import _plt, _save

    fig, ax = _plt().subplots(figsize=(4.8, 4.6))
    ax.scatter(p, y, s=14, alpha=0.6, label=f"{where} slides")
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect calibration")
    if len(y) >= 10:
        edges = np.quantile(p, np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
        px = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
        py = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
        ax.plot(px, py, "o-", color="tab:red", label="mean observed per decile")
    ax.set_xlabel(f"predicted {name}")
    ax.set_ylabel(f"observed {name}")
    ax.set_title(f"calibration ({where})")
    ax.legend(fontsize=8)
    _save(fig, path)
