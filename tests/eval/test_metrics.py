"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.data.splits import prevalence_weights
from wsi_mil.eval.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    choose_threshold,
    multiclass_metrics,
)


def test_binary_metrics_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05])
    m = binary_metrics(y, p, 0.5, n_boot=200)
    # predicted positive: 0.9, 0.6 (TP), 0.7 (FP); FN: 0.3
    assert m["confusion"] == [[4, 1], [1, 2]]
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # AUC: pairs (pos > neg) = 0.9 beats 5, 0.6 beats 4, 0.3 beats 3 -> 12/15
    assert m["auc"] == pytest.approx(12 / 15)
    lo, hi = m["auc_ci95"]
    assert lo <= m["auc"] <= hi and hi - lo > 0.05


def _logit_mid(a: float, b: float) -> float:
    la, lb = np.log(a / (1 - a)), np.log(b / (1 - b))
    return float(1 / (1 + np.exp(-(la + lb) / 2)))


def test_thresholds_from_validation() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.5, 0.45, 0.3, 0.8, 0.9])
    # 2/3 sensitivity, no false positive: between 0.8 (lowest positive call) and 0.5 (highest negative call)
    assert choose_threshold(y, p, "youden") == pytest.approx(_logit_mid(0.8, 0.5))
    t = choose_threshold(y, p, "sensitivity", target_sensitivity=1.0)
    assert t == pytest.approx(_logit_mid(0.3, 0.1)) and binary_metrics(y, p, t, ci=False)["sensitivity"] == 1.0


def test_threshold_of_a_perfectly_separated_validation_set_lies_between_its_classes() -> None:
    """Regression: Youden's J used to return the lowest positive score itself, so a test
    positive just below it was called negative although validation separated perfectly."""
    y_val = np.array([0, 0, 0, 1, 1, 1])
    p_val = np.array([0.05, 0.1, 0.2, 0.8, 0.85, 0.95])
    t = choose_threshold(y_val, p_val, "youden")
    assert 0.2 < t < 0.8 and t == pytest.approx(0.5)
    # test scores that fall between the validation classes, on either side of the midpoint
    y_test = np.array([0, 0, 1, 1])
    p_test = np.array([0.25, 0.4, 0.6, 0.79])
    m = binary_metrics(y_test, p_test, t, ci=False)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0
    # per-sample thresholds (each fold's own, for the pooled out-of-fold predictions)
    m2 = binary_metrics(y_test, p_test, np.array([0.3, 0.3, 0.7, 0.7]), ci=False)
    assert m2["sensitivity"] == 0.5 and m2["specificity"] == 0.5 and m2["threshold"] == "each fold's own"


def test_ensemble_threshold_is_the_logit_mean() -> None:
    from wsi_mil.eval.metrics import ensemble_threshold

    assert ensemble_threshold([0.5, 0.5]) == pytest.approx(0.5)
    assert ensemble_threshold([0.2, 0.8]) == pytest.approx(0.5)
    assert ensemble_threshold([0.9, 0.99]) == pytest.approx(_logit_mid(0.9, 0.99))


def test_prevalence_reweighting_changes_ppv_not_sensitivity() -> None:
    rng = np.random.default_rng(0)
    y = np.array([1] * 50 + [0] * 50)
    p = np.clip(y * 0.3 + rng.random(100) * 0.7, 0, 1)
    enriched = binary_metrics(y, p, 0.5, ci=False)
    w = prevalence_weights(y, 0.1, 1)
    true = binary_metrics(y, p, 0.5, weights=w, ci=False)
    assert true["prevalence"] == pytest.approx(0.1)
    assert true["sensitivity"] == pytest.approx(enriched["sensitivity"]) and true["specificity"] == pytest.approx(enriched["specificity"])
    assert true["ppv"] < enriched["ppv"] and true["npv"] > enriched["npv"]


def test_multiclass_and_bootstrap_edge_cases() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    m = multiclass_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 6) and m["confusion"][2] == [0, 1, 1]
    assert m["per_class"]["c"]["sensitivity"] == pytest.approx(0.5)
    assert bootstrap_auc_ci(np.array([1, 1, 1]), np.array([0.2, 0.3, 0.4])) is None


def test_plots_keep_auc_axes_in_range_and_perfect_curves_visible() -> None:
    from wsi_mil.eval.plots import _plt, curves_figure, roc_figure

    y = np.array([0, 0, 1, 1])
    fig = roc_figure({"fold 0": (y, np.array([0.1, 0.2, 0.8, 0.9])), "fold 1": (y, np.array([0.3, 0.1, 0.7, 0.6]))}, "t")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo < 0 and hi > 1 and ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 1  # AUC-1 curves lie inside the frame
    assert all(not line.get_clip_on() for line in ax.lines[:2])
    _plt().close(fig)
    hist = {"fold0": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_auc": 1.0} for e in range(1, 6)]}
    fig = curves_figure(hist)
    assert fig.axes[1].get_ylim()[1] <= 1.05 and fig.axes[1].get_ylim()[0] >= -0.05
    _plt().close(fig)


def test_auc_intervals_are_scipys_bca_and_agree_with_the_percentile_loop_they_replace(elephant_predictions) -> None:
    """Intervals come from scipy.stats.bootstrap (BCa, the AUC of every resample at once) on real
    out-of-fold predictions (the Elephant bags' AUC from a logistic regression on bag means), within
    Monte Carlo error of the percentile loop over scikit-learn AUCs used before, in a fraction of the
    time; degenerate sets fall back to the percentile interval and say so."""
    import time

    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    from wsi_mil.eval.metrics import _auc_of, auc_interval, bootstrap_rng

    y, p = elephant_predictions
    sub = np.r_[np.flatnonzero(y == 1)[:20], np.flatnonzero(y == 0)[:20]]  # 40 cases: where BCa moves the interval
    for yy, pp in ((y, p), (y[sub], p[sub])):
        t0 = time.perf_counter()
        ci, method = auc_interval(yy, pp, n_boot=2000, seed=0)
        fast = time.perf_counter() - t0
        rng, pos, neg, stats = np.random.default_rng(1), np.flatnonzero(yy == 1), np.flatnonzero(yy == 0), []
        t0 = time.perf_counter()
        for _ in range(2000):  # the interval as it was made before
            idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
            stats.append(roc_auc_score(yy[idx], pp[idx]))
        slow = time.perf_counter() - t0
        old = np.quantile(stats, [0.025, 0.975])
        assert method == "BCa" and ci[0] < roc_auc_score(yy, pp) < ci[1]
        assert abs(ci[0] - old[0]) < 0.05 and abs(ci[1] - old[1]) < 0.05, (ci, old)
        assert fast < slow / 5, (fast, slow)
    # the vectorised AUC is scikit-learn's, ties counted half
    pos, neg = np.array([[0.9, 0.5, 0.5]]), np.array([[0.5, 0.1]])
    assert _auc_of(pos, neg)[0] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0], [0.9, 0.5, 0.5, 0.5, 0.1]))
    res = bootstrap((p[y == 1], p[y == 0]), _auc_of, n_resamples=500, vectorized=True, paired=False,
                    method="BCa", **bootstrap_rng(0))
    assert tuple(res.confidence_interval) == pytest.approx(auc_interval(y, p, n_boot=500, seed=0)[0])
    assert auc_interval([1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.7, 0.1, 0.2, 0.3], n_boot=200) == ((1.0, 1.0), "percentile")
