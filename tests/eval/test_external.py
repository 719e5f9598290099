"""External validation's figures (wsi_mil.eval.external) checked against the references users
trust: calibration intercept and slope against statsmodels' GLM (the intercept with the
logit as an offset), the domain classifier on real MIL features from two different image
collections (Fox and Elephant: Corel images of different animals) against two halves of
one, and the shifts of facts against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.eval.external import calibration_fit, calibration_warnings, domain_classifier, fact_shifts, shift_check


def _miscalibrated(n: int, a: float, b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities p and outcomes drawn with logit P(y) = a + b logit(p)."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(0, 1.5, n)))
    lp = np.log(p / (1 - p))
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(a + b * lp)))).astype(int)
    return y, p


def test_calibration_intercept_and_slope_are_statsmodels_glm() -> None:
    import statsmodels.api as sm

    y, p = _miscalibrated(1500, 0.4, 0.6, seed=0)
    lp = np.log(p / (1 - p))
    cal = calibration_fit(y, p, n_boot=100, seed=0)
    slope_fit = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit()
    offset_fit = sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit()
    assert cal["calibration_slope"] == pytest.approx(slope_fit.params[1], abs=1e-5)
    assert cal["calibration_intercept"] == pytest.approx(offset_fit.params[0], abs=1e-6)
    assert cal["calibration_in_the_large"] == pytest.approx(y.mean() - p.mean())
    assert abs(cal["calibration_slope"] - 0.6) < 0.12  # the planted miscalibration is recovered
    lo, hi = cal["calibration_slope_ci95"]
    assert lo < cal["calibration_slope"] < hi < 1.0  # too extreme, and the interval says so
    assert any("too extreme" in w for w in calibration_warnings(cal))


def test_well_calibrated_predictions_give_no_warning_and_separated_ones_no_slope() -> None:
    y, p = _miscalibrated(1500, 0.0, 1.0, seed=1)
    cal = calibration_fit(y, p, n_boot=100, seed=0)
    assert cal["calibration_slope_ci95"][0] <= 1.0 <= cal["calibration_slope_ci95"][1]
    assert calibration_warnings(cal) == []
    rev, pr = _miscalibrated(1500, 0.0, -1.0, seed=2)  # the ranking reversed: not "too extreme"
    warned = calibration_warnings(calibration_fit(rev, pr, n_boot=100, seed=0))
    assert "the ranking is reversed" in warned[0] and not any("too extreme" in w for w in warned)
    sep = calibration_fit([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8], n_boot=50)
    assert sep["calibration_slope"] is None and "perfectly separated" in sep["slope_note"]
    assert sep["calibration_intercept"] is not None  # the average risk is still judged


def _bag_means(name: str) -> np.ndarray:
    with np.load(shared("mil") / f"{name}.npz") as z:
        x, bag = z["X"].astype(np.float64), z["bag_id"]
    return np.stack([x[bag == b].mean(axis=0) for b in np.unique(bag)])


def test_domain_classifier_tells_a_rescaled_half_apart_but_not_two_halves_of_one_set() -> None:
    """Two halves of the Elephant bags look alike; the second half with each feature's scale
    changed by a few per cent (as a scanner or stain change moves an encoder's features) is
    told apart. (Fox against Elephant is not a shift test: both are the same Corel
    descriptors of natural images, and their bag means are told apart at about 0.6.)"""
    elephant = _bag_means("elephant")
    order = np.random.default_rng(0).permutation(len(elephant))
    first, second = elephant[order[:100]], elephant[order[100:]]
    halves = domain_classifier(first, second, n_boot=100)
    gain = np.random.default_rng(1).normal(1.0, 0.05, elephant.shape[1])
    shifted = domain_classifier(first, second * gain, n_boot=100)
    assert halves["auc"] < 0.65 and halves["auc_ci95"][0] < 0.5 < halves["auc_ci95"][1], halves
    assert shifted["auc"] > 0.8 and shifted["auc_ci95"][0] > halves["auc_ci95"][1], (shifted, halves)
    with_empty = np.vstack([first, np.full((1, first.shape[1]), np.nan)])  # a store of no patches: a NaN mean
    left = domain_classifier(with_empty, second * gain, n_boot=50)
    assert left["n_left_out"] == 1 and left["auc"] == pytest.approx(shifted["auc"], abs=0.05)  # (was: no figure)
    warned = shift_check(first, second * gain, {}, {}, n_boot=50)
    assert warned["warnings"] and "told apart from the development cohort" in warned["warnings"][0]
    assert not shift_check(first, second, {}, {}, n_boot=50)["warnings"]


def test_fact_shifts_are_standardised_mean_differences_largest_first_and_named() -> None:
    rng = np.random.default_rng(0)
    dev = {f"d{i}": {"tissue colour: haematoxylin": rng.normal(0.03, 0.005), "patch count": rng.normal(900, 200)}
           for i in range(60)}
    ext = {f"e{i}": {"tissue colour: haematoxylin": rng.normal(0.045, 0.005), "patch count": rng.normal(950, 200)}
           for i in range(40)}
    rows = fact_shifts(dev, ext)
    assert [r["fact"] for r in rows] == ["tissue colour: haematoxylin", "patch count"]
    a = np.asarray([v["tissue colour: haematoxylin"] for v in dev.values()])
    b = np.asarray([v["tissue colour: haematoxylin"] for v in ext.values()])
    assert rows[0]["smd"] == pytest.approx((b.mean() - a.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
    out = shift_check(None, None, dev, ext)
    assert out["largest"] == "tissue colour: haematoxylin"
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("tissue colour: haematoxylin shifted")
