"""Figures that cannot be trusted are not printed as if they could: collapsed intervals,
failed folds, and a fold ensemble that outvotes them."""

from __future__ import annotations

import numpy as np

from wsi_mil.data.bags import Task
from wsi_mil.eval.metrics import auc_interval_note, auc_text, binary_metrics
from wsi_mil.train.runner import choose_headline, fold_health, report_markdown


def test_perfect_separation_on_eight_cases_is_not_an_interval() -> None:
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.15, 0.3, 0.05, 0.9, 0.8, 0.7])
    m = binary_metrics(y, p, 0.5)
    assert m["auc"] == 1.0 and m["auc_ci95"] == (1.0, 1.0)  # what the bootstrap gives
    assert m["auc_ci_note"] == "not informative (n = 8, perfectly separated)"
    assert auc_text(m) == "1.000; 95% CI not informative (n = 8, perfectly separated)"
    # an inverted model is no more informative
    assert auc_interval_note(y, 1 - p, (0.0, 0.0)) == "not informative (n = 8, perfectly inverted)"


def test_an_overlapping_set_keeps_its_interval() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    p = np.concatenate([rng.normal(0, 1, 30), rng.normal(1, 1, 30)])
    m = binary_metrics(y, p, 0.5)
    assert m["auc_ci_note"] is None and 0.6 < m["auc"] < 0.95
    lo, hi = m["auc_ci95"]
    assert lo < m["auc"] < hi and hi - lo > 0.1
    assert auc_text(m) == f"{m['auc']:.3f} ({lo:.3f}–{hi:.3f})"
    # one positive: no interval, and it says so
    assert binary_metrics([0, 0, 0, 1], [0.1, 0.4, 0.2, 0.3], 0.5)["auc_ci_note"] == "no interval (n = 4, 1 positive)"


def _fold(k: int, val_auc: float, test_auc: float) -> dict:
    return {"fold": k, "val": {"auc": val_auc, "n": 6}, "test": {"auc": test_auc, "n": 8}}


def _metrics(folds: list[dict], ensemble_auc: float, ens_note: str | None) -> dict:
    ens = {"auc": ensemble_auc, "auc_ci95": (ensemble_auc, ensemble_auc), "auc_ci_note": ens_note, "n": 8, "n_positive": 3}
    pooled = {"auc": 0.918, "auc_ci95": (0.80, 0.99), "auc_ci_note": None, "n": 32, "n_positive": 10}
    m = {"folds": folds, "ensemble_test": ens, "pooled_validation": pooled}
    m["fold_health"] = fold_health(folds)
    m["headline"] = choose_headline(m)
    return m


def test_failed_folds_are_flagged_and_the_ensemble_is_not_the_headline() -> None:
    # clam_sb as found on the hard cohort: 3 confident folds, 2 at 0.33 validation AUC
    folds = [_fold(0, 1.0, 1.0), _fold(1, 0.33, 0.4), _fold(2, 1.0, 1.0), _fold(3, 0.33, 0.47), _fold(4, 0.9, 1.0)]
    m = _metrics(folds, 1.0, "not informative (n = 8, perfectly separated)")
    h = m["fold_health"]
    assert [f["fold"] for f in h["failed"]] == [1, 3] and h["disagree"]
    assert "validation AUC 0.330" in h["failed"][0]["why"] and "test AUC 0.400" in h["failed"][0]["why"]
    assert m["headline"]["set"] == "pooled_validation"
    assert "2 of 5 folds failed" in m["headline"]["why"] and "not informative" in m["headline"]["why"]
    m.update({"splits": {"source": "wsi-mil", "folds": 5, "test": 8, "test_sampling": None}, "model": "clam_sb",
              "n_slides": 40, "n_patients": 40, "encoder": {"encoder": "x"}})
    md = report_markdown(Task("binary", ("label",), ("label",), ("0", "1")), m)
    assert "**2 of 5 folds failed**" in md and "fold 1: validation AUC 0.330, test AUC 0.400" in md
    assert "Headline: pooled out-of-fold validation, AUC 0.918 (0.800–0.990), n = 32" in md
    assert "| ensemble of folds, test | 8 | 1.000; 95% CI not informative (n = 8, perfectly separated) |" in md


def test_agreeing_folds_keep_the_test_ensemble_as_headline() -> None:
    folds = [_fold(k, 0.8 + 0.02 * k, 0.85 + 0.01 * k) for k in range(5)]
    m = _metrics(folds, 0.87, None)
    assert not m["fold_health"]["failed"] and not m["fold_health"]["disagree"]
    assert m["headline"] == {"set": "ensemble_test", "why": "held-out test set; the folds agree"}
    # spread folds without a failure still disagree
    spread = [_fold(0, 0.9, 0.95), _fold(1, 0.7, 0.6), _fold(2, 0.8, 0.9), _fold(3, 0.85, 0.7)]
    m = _metrics(spread, 0.95, None)
    assert m["fold_health"]["disagree"] and not m["fold_health"]["failed"]
    assert m["headline"]["set"] == "pooled_validation" and "disagree" in m["headline"]["why"]


def test_the_headline_is_never_kinder_than_the_held_out_test_when_folds_fail() -> None:
    """The issue's cohort (small lesions, 60 slides): 3 of 5 folds failed, the held-out test
    near chance, and the headline fell back to the pooled out-of-fold AUC, which was higher."""
    folds = [_fold(0, 0.4, 0.45), _fold(1, 0.9, 0.6), _fold(2, 0.45, 0.5), _fold(3, 0.3, 0.42), _fold(4, 0.8, 0.55)]
    m = _metrics(folds, 0.52, None)  # pooled out-of-fold: 0.918
    assert len(m["fold_health"]["failed"]) == 3
    assert m["headline"]["set"] == "ensemble_test"
    assert "3 of 5 folds failed" in m["headline"]["why"] and "never quotes the more optimistic" in m["headline"]["why"]
    spread = [_fold(0, 0.9, 0.95), _fold(1, 0.7, 0.6), _fold(2, 0.8, 0.9), _fold(3, 0.85, 0.7)]  # folds disagree
    assert _metrics(spread, 0.8, None)["headline"]["set"] == "ensemble_test"
