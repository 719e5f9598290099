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
