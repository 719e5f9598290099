"""External validation: how a trained model holds on a cohort it never saw.

Three questions, each answered from predictions and facts about the samples (nothing
here is specific to slides):

* **Calibration** (:func:`calibration_fit`): calibration-in-the-large (the observed rate
  minus the mean predicted probability, and the calibration intercept: the logistic
  model ``logit P(y) = a + logit(p)`` with the slope fixed at 1, Van Calster et al. 2019),
  the calibration slope (``logit P(y) = a + b logit(p)``; below 1: predictions too
  extreme, above 1: too timid) with bootstrap intervals, and the observed / expected
  ratio. Checked against statsmodels' GLM with an offset in the tests.
* **Threshold transfer** (:func:`threshold_transfer`): the decision threshold chosen on
  the development cohort applied as it is, beside one chosen again on the new cohort
  (optimistic: chosen and judged on the same cases; it says how much a local re-choice
  could recover, not what the model achieves).
* **Shift** (:func:`shift_check`): a domain classifier (logistic regression on the
  samples' embeddings, out-of-fold) telling the development cohort from the new one
  (AUC 0.5: indistinguishable, 1.0: told apart perfectly), and each fact of the samples
  (stain, tissue area, patch count, scanner resolution) compared by its standardised mean
  difference and a Mann-Whitney test; the largest one is named.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

#: a domain classifier at or above this AUC: the cohorts differ clearly in what the encoder sees
DOMAIN_AUC_WARN = 0.8
#: ... at or above this: they differ noticeably
DOMAIN_AUC_NOTE = 0.65
#: a fact whose standardised mean difference reaches this (in either direction) is a shift
SMD_WARN = 0.8
#: a calibration slope outside this range is worth a warning
SLOPE_RANGE = (0.7, 1.3)
#: at most this many development samples enter the domain classifier (seeded sample beyond)
MAX_DEVELOPMENT = 2000


def _logit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(q / (1 - q))


def _intercept(y: npt.NDArray[np.float64], lp: npt.NDArray[np.float64]) -> float | None:
    """The ``a`` of ``logit P(y) = a + lp`` (maximum likelihood: the root of its score
    equation, which is monotone in ``a``); None when every case has one class."""
    from scipy.optimize import brentq
    from scipy.special import expit

    if y.min() == y.max():
        return None
    score = lambda a: float(np.sum(y - expit(a + lp)))  # noqa: E731 - decreasing in a
    lo, hi = -1.0, 1.0
    while score(lo) < 0:
        lo *= 2
    while score(hi) > 0:
        hi *= 2
    return float(brentq(score, lo, hi, xtol=1e-10))


def _slope(y: npt.NDArray[np.float64], lp: npt.NDArray[np.float64]) -> tuple[float, float] | None:
    """(intercept, slope) of the unpenalised logistic regression of ``y`` on ``lp``; None
    when it is not defined (one class, or the cases perfectly separated: the slope runs
    off to infinity)."""
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():
        return None
    order = np.argsort(lp)
    ys = y[order]
    if np.all(np.diff(ys) >= 0) or np.all(np.diff(ys) <= 0):  # separated: no finite maximum
        return None
    fit = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000, tol=1e-10).fit(lp[:, None], y.astype(int))
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


def calibration_fit(y: npt.ArrayLike, p: npt.ArrayLike, *, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Calibration of probabilities ``p`` against 0/1 outcomes ``y`` (see the module
    docstring). Intervals: percentile bootstrap over cases with ``n_boot`` resamples (none
    when a class has fewer than 2 cases; a resample of one class or perfectly separated
    has no value, and an interval needs values on 90 % of the resamples)."""
    ya, pa = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    lp = _logit(pa)
    observed, expected = float(ya.mean()), float(pa.mean())
    fitted = _slope(ya, lp)
    out: dict[str, Any] = {
        "n": int(len(ya)), "observed_rate": observed, "mean_predicted": expected,
        "calibration_in_the_large": observed - expected,
        "observed_expected_ratio": observed / expected if expected > 0 else None,
        "calibration_intercept": _intercept(ya, lp),
        "calibration_slope": fitted[1] if fitted else None,
        "slope_note": None if fitted else ("not defined: the cases are perfectly separated (or of one class), so "
                                           "the fitted slope has no finite value"),
    }
    if n_boot and min(int(ya.sum()), int(len(ya) - ya.sum())) >= 2:
        # cases resampled as they come (not by class: the observed rate is part of what is estimated)
        rng = np.random.default_rng(seed)
        ints, slopes = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, len(ya), len(ya))
            a = _intercept(ya[idx], lp[idx])
            if a is not None:
                ints.append(a)
            f = _slope(ya[idx], lp[idx])
            if f is not None:
                slopes.append(f[1])
        out["calibration_intercept_ci95"] = _interval(ints, n_boot)
        out["calibration_slope_ci95"] = _interval(slopes, n_boot) if fitted else None
        out["bootstrap"] = n_boot
    return out


def _interval(values: list[float], n_boot: int) -> tuple[float, float] | None:
    """The 95 % percentile interval, or None when under 90 % of the resamples gave a value
    (a statistic undefined on many resamples has no honest interval)."""
    if len(values) < 0.9 * n_boot:
        return None
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(lo), float(hi)


def calibration_warnings(cal: dict[str, Any]) -> list[str]:
    """What a reader should not miss in :func:`calibration_fit`'s result."""
    out = []
    slope, ci = cal.get("calibration_slope"), cal.get("calibration_slope_ci95")
    if slope is not None and ci and slope < 0 and ci[1] < 0:
        out.append(f"calibration slope {slope:.2f}: higher probabilities go with fewer positives on this cohort (the "
                   "ranking is reversed); the model does not transfer")
    elif slope is not None and ci and not SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1] and not ci[0] <= 1 <= ci[1]:
        out.append(f"calibration slope {slope:.2f}: the probabilities are too {'extreme' if slope < 1 else 'timid'} "
                   "on this cohort; recalibrate on local cases before using them as risks")
    a, aci = cal.get("calibration_intercept"), cal.get("calibration_intercept_ci95")
    if a is not None and aci and not aci[0] <= 0 <= aci[1]:
        out.append(f"calibration intercept {a:+.2f} (95% CI {aci[0]:+.2f} to {aci[1]:+.2f}): the model "
                   f"{'under' if a > 0 else 'over'}-estimates the risk on this cohort (observed rate "
                   f"{cal['observed_rate']:.2f}, mean predicted {cal['mean_predicted']:.2f})")
    return out


def threshold_transfer(y: npt.ArrayLike, p: npt.ArrayLike, internal: float, *, rule: str = "youden",
                       target_sensitivity: float = 0.9) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV at the development threshold ``internal`` and at
    one chosen again on these cases by ``rule`` (optimistic), with Wilson intervals."""
    from wsi_mil.eval.audit import _rates
    from wsi_mil.eval.metrics import choose_threshold

    ya, pa = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    choices = [("development threshold, as trained", internal)]
    if len(set(ya.tolist())) == 2:  # (one class: nothing to choose a threshold on)
        rule_text = rule if rule != "sensitivity" else f"sensitivity >= {target_sensitivity:g}"
        choices.append((f"chosen again on this cohort ({rule_text}; optimistic)",
                        choose_threshold(ya, pa, rule, target_sensitivity)))
    rows = []
    for name, thr in choices:
        pred = pa >= thr
        tp, fp = int((pred & (ya == 1)).sum()), int((pred & (ya == 0)).sum())
        tn, fn = int((~pred & (ya == 0)).sum()), int((~pred & (ya == 1)).sum())
        rows.append({"threshold_source": name, "threshold": float(thr), **_rates(ya, pa, np.full(len(pa), thr)),
                     "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None,
                     "confusion": [[tn, fp], [fn, tp]]})
    return {"rule": rule, "rows": rows}


def _smd(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float | None:
    """Standardised mean difference (b - a) / pooled sd; None when both are constant."""
    if len(a) < 2 or len(b) < 2:
        return None
    sd = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    if sd == 0:
        return None if a.mean() == b.mean() else float(np.sign(b.mean() - a.mean()) * np.inf)
    return float((b.mean() - a.mean()) / sd)


def domain_classifier(development: npt.NDArray[Any], external: npt.NDArray[Any], *, seed: int = 0,
                      n_boot: int = 200, groups: list[str] | None = None) -> dict[str, Any]:
    """How well the two cohorts are told apart from their embeddings: standardised, reduced
    by PCA to at most 32 components (fitted within each fold), an L2 logistic regression,
    out-of-fold probabilities over 5 stratified folds, their AUC with a bootstrap interval."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi_mil.eval.metrics import auc, auc_interval_note, bootstrap_auc_ci

    # a sample without an embedding (a store of no patches: its mean is NaN) is left out, said in the result
    development, external = np.asarray(development, np.float64), np.asarray(external, np.float64)
    dev_ok, ext_ok = np.isfinite(development).all(axis=1), np.isfinite(external).all(axis=1)
    left_out = int((~dev_ok).sum() + (~ext_ok).sum())
    development, external = development[dev_ok], external[ext_ok]
    if groups is not None:  # (one per row of development then external)
        groups = [g for g, ok in zip(groups, np.r_[dev_ok, ext_ok], strict=True) if ok]
    x = np.concatenate([development, external])
    d = np.concatenate([np.zeros(len(development), int), np.ones(len(external), int)])
    # dimensions constant across both cohorts (up to float rounding) carry nothing; standardised they would
    # blow rounding noise (a mean summed in another order) up into a "shift"
    spread = x.std(axis=0)
    x = x[:, spread > 1e-6 * (np.abs(x).mean(axis=0) + 1e-12)]
    if not x.shape[1]:
        return {"auc": None, "note": "every embedding dimension is constant across the two cohorts"}
    folds = min(5, len(development), len(external))
    if folds < 2 or not len(x):
        return {"auc": None, "note": "too few samples in a cohort for a domain classifier (fewer than 2)"}
    n_comp = max(1, min(32, x.shape[1], int(len(x) * (folds - 1) / folds) - 1))
    model = make_pipeline(StandardScaler(), PCA(n_components=n_comp, random_state=seed),
                          LogisticRegression(C=0.1, max_iter=2000))
    # a patient's pictures on one side of each fold (follow-up films of one person look alike: split across the
    # folds they would make the cohorts look easier to tell apart than they are)
    if groups is not None and len(set(groups)) < len(groups):
        from sklearn.model_selection import StratifiedGroupKFold

        cv: Any = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        prob = cross_val_predict(model, x, d, cv=cv, groups=groups, method="predict_proba")[:, 1]
    else:
        prob = cross_val_predict(model, x, d, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                 method="predict_proba")[:, 1]
    a = auc(d, prob)
    ci = bootstrap_auc_ci(d, prob, n_boot=n_boot, seed=seed) if n_boot else None
    return {"auc": a, "auc_ci95": ci, "auc_ci_note": auc_interval_note(d, prob, ci, auc_value=a) if n_boot else None,
            "n_development": int(len(development)), "n_external": int(len(external)), "folds": folds,
            "n_left_out": left_out,
            "method": f"mean patch embedding per sample, standardised, PCA to {n_comp} components, logistic "
                      f"regression (L2, C = 0.1), {folds}-fold out-of-fold probabilities"
                      + (f"; {left_out} sample(s) without patches left out" if left_out else "")}


def fact_shifts(development: dict[str, dict[str, Any]], external: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each numeric fact both cohorts carry: medians, quartiles, the standardised mean
    difference and a two-sided Mann-Whitney p-value; largest shift first."""
    from scipy.stats import mannwhitneyu

    names = sorted({k for f in development.values() for k in f} & {k for f in external.values() for k in f})
    rows = []
    for name in names:
        a = np.asarray([float(f[name]) for f in development.values() if f.get(name) is not None], float)
        b = np.asarray([float(f[name]) for f in external.values() if f.get(name) is not None], float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) < 2 or len(b) < 2:
            continue
        smd = _smd(a, b)
        p = float(mannwhitneyu(a, b).pvalue) if (np.ptp(np.concatenate([a, b])) > 0) else 1.0
        rows.append({"fact": name, "n_development": int(len(a)), "n_external": int(len(b)),
                     "development_median": float(np.median(a)), "development_iqr": [float(v) for v in np.quantile(a, [0.25, 0.75])],
                     "external_median": float(np.median(b)), "external_iqr": [float(v) for v in np.quantile(b, [0.25, 0.75])],
                     "smd": smd, "p_mann_whitney": p})
    return sorted(rows, key=lambda r: -abs(r["smd"]) if r["smd"] is not None else 0.0)


def shift_check(dev_embeddings: npt.NDArray[Any] | None, ext_embeddings: npt.NDArray[Any] | None,
                dev_facts: dict[str, dict[str, Any]], ext_facts: dict[str, dict[str, Any]], *,
                seed: int = 0, n_boot: int = 200, groups: list[str] | None = None) -> dict[str, Any]:
    """The domain classifier and the facts' shifts, with the warnings they call for (the
    largest shift named)."""
    out: dict[str, Any] = {"facts": fact_shifts(dev_facts, ext_facts), "warnings": [], "notes": []}
    if dev_embeddings is not None and ext_embeddings is not None and len(dev_embeddings) and len(ext_embeddings):
        out["domain_classifier"] = domain_classifier(dev_embeddings, ext_embeddings, seed=seed, n_boot=n_boot,
                                                     groups=groups)
    dom = (out.get("domain_classifier") or {}).get("auc")
    facts = [r for r in out["facts"] if r["smd"] is not None]
    top = facts[0] if facts else None
    named = (f"; the largest shift in what was measured: {top['fact']} (standardised mean difference "
             f"{top['smd']:+.2f}; median {top['external_median']:.4g} here against {top['development_median']:.4g} in "
             "development)") if top else ""
    if dom is not None and dom >= DOMAIN_AUC_WARN:
        out["warnings"].append(f"the new cohort is told apart from the development cohort by its embeddings alone "
                               f"(domain classifier AUC {dom:.2f}): the encoder sees a different population or "
                               f"preparation{named}")
    elif dom is not None and dom >= DOMAIN_AUC_NOTE:
        out["notes"].append(f"the cohorts differ noticeably in their embeddings (domain classifier AUC {dom:.2f})"
                            f"{named}")
    for r in facts:
        if abs(r["smd"]) >= SMD_WARN and r["p_mann_whitney"] < 0.05:
            out["warnings"].append(f"{r['fact']} shifted: median {r['external_median']:.4g} here against "
                                   f"{r['development_median']:.4g} in development (standardised mean difference "
                                   f"{r['smd']:+.2f}, Mann-Whitney p = {r['p_mann_whitney']:.2g})")
    out["largest"] = top["fact"] if top else None
    return out
