"""Classification metrics for bag predictions, with bootstrap confidence intervals.

Binary: AUC (95 % CI by stratified bootstrap), sensitivity, specificity, PPV, NPV, F1,
accuracy, balanced accuracy and the confusion matrix at a threshold chosen on
validation data (Youden's J, or the highest threshold reaching a target sensitivity).
Optional per-sample weights give the metrics at another prevalence (an enriched test set
re-weighted to the cohort's true prevalence); AUC, sensitivity and specificity do not
depend on prevalence, PPV, NPV, F1 and accuracy do.
Multi-class: accuracy, balanced accuracy, macro one-vs-rest AUC, confusion matrix and
per-class sensitivity / specificity / PPV / F1. Multi-label: binary metrics per label.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

THRESHOLD_METHODS = ("youden", "sensitivity")


def _safe_div(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float | None:
    """ROC AUC, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, p))


#: how AUC intervals are made (said in reports beside them)
AUC_CI_METHOD = ("BCa bootstrap (scipy.stats.bootstrap), positives and negatives resampled separately; percentile "
                 "where BCa is undefined")


def _auc_of(pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64], axis: int = -1) -> npt.NDArray[np.float64]:
    """The AUC of scores of positives against negatives along ``axis`` (Mann-Whitney: ties count
    half), for a whole batch of resamples at once."""
    from scipy.stats import rankdata

    n1, n0 = pos.shape[axis], neg.shape[axis]
    ranks = rankdata(np.concatenate([pos, neg], axis=axis), axis=axis)
    r1 = np.take(ranks, np.arange(n1), axis=axis).sum(axis=axis)
    return np.asarray((r1 - n1 * (n1 + 1) / 2) / (n1 * n0), dtype=np.float64)


def auc_interval(y: npt.ArrayLike, p: npt.ArrayLike, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[tuple[float, float] | None, str | None]:
    """(interval, method) of the AUC: a BCa interval from ``n_boot`` stratified resamples
    (scipy.stats.bootstrap, the AUC computed for all resamples at once); the percentile
    interval of the same resamples where BCa is undefined (every resample gives the same
    AUC, as a perfectly separated set does); None with fewer than 2 cases of a class."""
    import warnings

    from scipy.stats import bootstrap

    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) < 2 or len(neg) < 2 or n_boot < 2:
        return None, None
    batch = max(1, int(2e7 // (len(pos) + len(neg))))  # resamples per vectorised call (memory)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a degenerate BCa warns; it is then the percentile interval)
            res = bootstrap((pos, neg), _auc_of, n_resamples=n_boot, vectorized=True, paired=False, axis=-1,
                            confidence_level=level, method=method, batch=batch, **bootstrap_rng(seed))
        lo, hi = (float(v) for v in res.confidence_interval)
        if np.isfinite(lo) and np.isfinite(hi):
            return (lo, hi), method
    return None, None


@functools.cache
def _bootstrap_rng_key() -> str:
    import inspect

    from scipy.stats import bootstrap

    return "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"


def bootstrap_rng(seed: int) -> dict[str, Any]:
    """scipy.stats.bootstrap's generator argument: ``rng`` from scipy 1.15, ``random_state`` before."""
    return {_bootstrap_rng_key(): np.random.default_rng(seed)}


def weighted_auc(w: npt.NDArray[np.float64], y: npt.NDArray[np.int64], p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The AUC of scores ``p`` against labels ``y`` with case weights ``w`` (one row per resample:
    how many times each case was drawn; ties count half), NaN where a row weighs no case of a class."""
    if not np.isfinite(p).all():
        raise ValueError("weighted_auc: the scores hold NaN or infinite values")
    order = np.argsort(p, kind="stable")
    ps, ys, ws = p[order], y[order], w[..., order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # groups of tied scores
    wp = np.add.reduceat(ws * (ys == 1), starts, axis=-1)
    wn = np.add.reduceat(ws * (ys == 0), starts, axis=-1)
    below = np.cumsum(wn, axis=-1) - wn  # negative weight strictly below each group
    num = (wp * (below + 0.5 * wn)).sum(axis=-1)
    den = wp.sum(axis=-1) * wn.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def clustered_interval(statistic: Any, clusters: npt.ArrayLike, *, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95, min_defined: float = 0.9) -> tuple[tuple[float, float] | None, str | None]:
    """(interval, method) of a statistic of cases grouped in clusters (a patient's slides or films):
    scipy.stats.bootstrap resamples the *clusters* and ``statistic(w)`` gets, for a whole batch of
    resamples at once, the case weights ``w`` (one row per resample: how many times each case's
    cluster was drawn) and returns one value per row, NaN where the figure is undefined (a resample
    of one class). BCa where every resample has a value; otherwise the percentile interval of the
    resamples that have one, when at least ``min_defined`` of them do; else (None, None)."""
    import warnings

    from scipy.stats import bootstrap

    index: dict[Any, int] = {}  # one cluster per distinct id, as set() counts them (1 and "1" are two)
    inverse = np.asarray([index.setdefault(c, len(index)) for c in np.asarray(clusters, dtype=object).tolist()],
                         dtype=np.int64)
    k = len(index)
    if k < 4 or n_boot < 2:
        return None, None

    def of_clusters(drawn: npt.NDArray[np.int64], axis: int = -1) -> npt.NDArray[np.float64]:
        drawn = np.moveaxis(np.asarray(drawn, dtype=np.int64), axis, -1)
        flat = drawn.reshape(-1, drawn.shape[-1])
        rows = np.arange(len(flat))[:, None] * k
        counts = np.bincount((flat + rows).ravel(), minlength=len(flat) * k).reshape(len(flat), k)
        return np.asarray(statistic(counts[:, inverse].astype(np.float64)), dtype=np.float64).reshape(drawn.shape[:-1])

    batch = max(1, int(2e7 // max(len(inverse), k)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an undefined BCa warns; the percentile interval follows)
        res = bootstrap((np.arange(k),), of_clusters, n_resamples=n_boot, vectorized=True, axis=-1,
                        confidence_level=level, method="BCa", batch=batch, **bootstrap_rng(seed))
    lo, hi = (float(v) for v in res.confidence_interval)
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    if np.isfinite(dist).all() and np.isfinite(lo) and np.isfinite(hi) and np.ptp(dist) > 0:
        return (lo, hi), "BCa"
    finite = dist[np.isfinite(dist)]
    if len(finite) < min_defined * n_boot or not len(finite):
        return None, None
    alpha = (1 - level) / 2
    q = np.quantile(finite, [alpha, 1 - alpha])
    return (float(q[0]), float(q[1])), "percentile"


def bootstrap_auc_ci(y: npt.ArrayLike, p: npt.ArrayLike, *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float] | None:
    """The AUC's interval of :func:`auc_interval` (stratified bootstrap, BCa where defined)."""
    return auc_interval(y, p, n_boot=n_boot, seed=seed, level=level)[0]


def auc_interval_note(y: npt.ArrayLike, p: npt.ArrayLike, ci: tuple[float, float] | None, *,
                      auc_value: float | None = None) -> str | None:
    """Why an AUC interval says nothing, or None when it is informative.

    A stratified bootstrap of a perfectly separated set resamples perfectly separated sets,
    so its interval collapses onto the point (1.000-1.000) however few cases there are:
    that is a statement about the resampling, not about the model. The same holds for an
    interval of zero width, and there is no interval with fewer than 2 cases per class.
    ``auc_value``: the AUC when the caller has it already."""
    y = np.asarray(y).astype(int)
    n, k = len(y), int(y.sum())
    if ci is None:
        return f"no interval (n = {n}, {k} positive)"
    a = auc(y, p) if auc_value is None else auc_value
    if a is not None and (a >= 1.0 or a <= 0.0):
        return f"not informative (n = {n}, perfectly {'separated' if a >= 1.0 else 'inverted'})"
    if ci[1] - ci[0] < 1e-9:
        return f"not informative (n = {n}, zero-width interval)"
    return None


def auc_text(m: dict[str, Any]) -> str:
    """``0.912 (0.850–0.960)``, or ``1.000; 95% CI not informative (n = 8, perfectly separated)``."""
    a = m.get("auc")
    if a is None:
        return "–"
    note, ci = m.get("auc_ci_note"), m.get("auc_ci95")
    if note:
        return f"{a:.3f}; 95% CI {note}"
    return f"{a:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the logit


def _logit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


def _expit(z: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def choose_threshold(y: npt.ArrayLike, p: npt.ArrayLike, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """A decision threshold from validation predictions (0.5 when it cannot be chosen).

    The ROC picks an operating point between two neighbouring validation scores; the
    threshold is put halfway between them in logit space, never on a data point, so a
    test slide scoring just below the lowest validation positive that was called
    positive is not called negative by construction (a cut on the score itself would
    sit on that positive)."""
    from sklearn.metrics import roc_curve

    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thr: every distinct score, decreasing (thr[0] = inf)
    if method == "youden":
        i = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        ok = np.flatnonzero(tpr >= target_sensitivity)
        i = int(ok[0]) if len(ok) else len(thr) - 1
    else:
        raise ValueError(f"threshold method {method!r}: choose one of {THRESHOLD_METHODS}")
    # scores >= thr[i] are positive; the next lower score (thr[i + 1]) is the highest negative call
    upper = float(np.clip(thr[i], 0.0, 1.0)) if np.isfinite(thr[i]) else 1.0
    lower = float(thr[i + 1]) if i + 1 < len(thr) else 0.0
    return float(_expit((_logit(upper) + _logit(lower)) / 2))


def ensemble_threshold(thresholds: list[float]) -> float:
    """The decision threshold of a fold ensemble (whose probability is the mean of the
    folds' probabilities): the mean of the folds' validation thresholds in logit space."""
    return float(_expit(np.mean(_logit(thresholds))))


def binary_metrics(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float | npt.ArrayLike, *, weights: npt.ArrayLike | None = None,
                   ci: bool = True, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    thr = np.asarray(threshold, dtype=float)  # one threshold, or one per sample (each fold's own)
    pred = (p >= thr).astype(int)
    tp = float(w[(pred == 1) & (y == 1)].sum())
    tn = float(w[(pred == 0) & (y == 0)].sum())
    fp = float(w[(pred == 1) & (y == 0)].sum())
    fn = float(w[(pred == 0) & (y == 1)].sum())
    sens, spec = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
    ppv, npv = _safe_div(tp, tp + fp), _safe_div(tn, tn + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    interval, ci_method = auc_interval(y, p, n_boot=n_boot, seed=seed) if ci else (None, None)
    a = auc(y, p)
    out: dict[str, Any] = {
        "n": len(y), "n_positive": int(y.sum()),
        "threshold": float(thr) if thr.ndim == 0 else "each fold's own",
        "auc": a, "auc_ci95": interval, "auc_ci_note": auc_interval_note(y, p, interval, auc_value=a) if ci else None,
        "auc_ci_method": ci_method,
        "sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": npv, "f1": f1,
        "accuracy": _safe_div(tp + tn, tp + tn + fp + fn),
        "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
        "confusion": [[tn, fp], [fn, tp]],  # rows: true 0/1, columns: predicted 0/1
    }
    if weights is not None:
        out["prevalence"] = _safe_div(tp + fn, tp + tn + fp + fn)
    return out


def multiclass_metrics(y: npt.ArrayLike, probs: npt.ArrayLike, classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y, probs = np.asarray(y).astype(int), np.asarray(probs, dtype=float)
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    per_class = {}
    for c, name in enumerate(classes):
        tp = cm[c, c]
        fn, fp = cm[c].sum() - tp, cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        per_class[name] = {"sensitivity": _safe_div(tp, tp + fn), "specificity": _safe_div(tn, tn + fp),
                           "ppv": _safe_div(tp, tp + fp), "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
                           "auc": auc((y == c).astype(int), probs[:, c])}
    macro_auc = None
    if len(np.unique(y)) == k:
        macro_auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    sens = [v["sensitivity"] for v in per_class.values() if v["sensitivity"] is not None]
    return {"n": len(y), "accuracy": float((pred == y).mean()) if len(y) else None,
            "balanced_accuracy": float(np.mean(sens)) if sens else None, "auc": macro_auc,
            "confusion": cm.tolist(), "per_class": per_class}


def summarise(values: list[float | None]) -> dict[str, float | None]:
    """Mean, standard deviation and standard error over folds (None values skipped)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "sd": None, "se": None, "n": 0}
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "sd": sd, "se": sd / np.sqrt(len(v)), "n": len(v)}


def calibration_bins(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Equal-width probability bins: mean predicted probability, observed positive rate and
    count per bin (empty bins left out)."""
    ya, pa = np.asarray(y, dtype=float), np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    idx = np.minimum((pa * n_bins).astype(int), n_bins - 1)
    conf, freq, count = [], [], []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            conf.append(float(pa[sel].mean()))
            freq.append(float(ya[sel].mean()))
            count.append(int(sel.sum()))
    return {"confidence": conf, "observed": freq, "count": count}


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 10) -> float | None:
    """ECE of the positive-class probability: the count-weighted mean gap between the mean
    predicted probability and the observed positive rate over equal-width bins."""
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        return None
    b = calibration_bins(y, p, n_bins)
    gaps = np.abs(np.asarray(b["confidence"]) - np.asarray(b["observed"]))
    return float((gaps * np.asarray(b["count"])).sum() / len(y))
