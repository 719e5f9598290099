"""Auditing an evaluation: subgroup performance, operating points and every error.

One implementation for every modality (slides, images, volumes): it works on the rows of
``predictions.csv`` (id, patient, label, probability) joined with manifest columns, so
``train-mil``, ``train-image``, ``train-volume`` and ``wsi-mil audit`` all call it.

- :func:`subgroup_report`: per subgroup of a manifest column (continuous columns banded
  by quartiles, the bands stated) the AUC with a stratified-bootstrap CI, sensitivity and
  specificity with Wilson CIs at the run's threshold, sample sizes, a warning where a
  subgroup has too few positives or negatives to say anything, and the largest gap.
- :func:`operating_points`: sensitivity at fixed specificities and the reverse (the
  threshold found on the evaluated set itself, so optimistic; CIs by bootstrap, the
  threshold re-found in each resample) and PPV / NPV at a deployment prevalence.
- :func:`error_cases`: every false negative and false positive at the threshold, most
  confident mistakes first, beside the most confident correct cases of the same class.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import numpy.typing as npt

#: a subgroup with fewer positives or negatives than this gets no verdict (its CIs are too wide)
SMALL_GROUP = 10
#: a numeric column with more distinct values than this is banded (by quartiles)
BAND_ABOVE_UNIQUE = 8
MISSING = "(missing)"


def wilson_ci(k: float, n: float, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion ``k / n`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - level) / 2))
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _number(v: Any) -> float | None:  # a cell's text or a fact's value; None when not a finite number
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def band_values(values: list[str]) -> tuple[list[str], str | None]:
    """Subgroup names for a column's values: the values themselves, or, for a numeric
    column with more than :data:`BAND_ABOVE_UNIQUE` distinct values, quartile bands
    ("40-52"); blank or non-numeric values of a banded column are ``(missing)``.
    Returns the names and a sentence stating the bands (None when not banded)."""
    clean = [str(v).strip() for v in values]
    nums = [_number(v) for v in clean]
    present = [x for x in nums if x is not None]
    if len(present) < max(1, 0.8 * sum(bool(v) for v in clean)) or len(set(present)) <= BAND_ABOVE_UNIQUE:
        return [v if v else MISSING for v in clean], None
    integer = all(float(x).is_integer() for x in present)
    edges = sorted(set(np.quantile(present, [0.25, 0.5, 0.75]).round(0 if integer else 2).tolist()))
    lo, hi = min(present), max(present)
    bounds = [lo, *[e for e in edges if lo < e <= hi], math.inf]

    def fmt(x: float) -> str:
        return f"{x:.0f}" if integer else f"{x:g}"

    names = []
    for a, b in itertools.pairwise(bounds):
        names.append(f">= {fmt(a)}" if b == math.inf else (f"{fmt(a)}-{fmt(b - 1)}" if integer else f"[{fmt(a)}, {fmt(b)})"))
    out = []
    for x in nums:
        if x is None:
            out.append(MISSING)
            continue
        i = max(k for k in range(len(bounds) - 1) if x >= bounds[k] or k == 0)
        out.append(names[i])
    text = (f"banded by quartiles into {len(names)} groups: " + ", ".join(names)
            + f" (from {fmt(lo)} to {fmt(hi)}; {sum(x is None for x in nums)} missing)")
    return out, text


def _rates(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], thr: npt.NDArray[np.float64]) -> dict[str, Any]:
    pred = p >= thr
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    tn, fp = int((~pred & (y == 0)).sum()), int((pred & (y == 0)).sum())
    return {"tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "sensitivity_ci95": wilson_ci(tp, tp + fn),
            "specificity": tn / (tn + fp) if tn + fp else None, "specificity_ci95": wilson_ci(tn, tn + fp)}


def patient_intervals(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], thr: npt.NDArray[np.float64],
                      patients: npt.NDArray[Any], *, n_boot: int,
                      seed: int) -> dict[str, tuple[tuple[float, float] | None, str | None]]:
    """95 % CIs of AUC, sensitivity and specificity resampling *patients* (each drawn patient
    brings all of their cases), for sets where patients have several cases: their cases are not
    independent, and a per-case interval would be too narrow. scipy.stats.bootstrap over
    patients, every resample's figures computed at once from case weights
    (:func:`wsi_mil.eval.metrics.clustered_interval`). Each figure: (interval, "BCa" or
    "percentile"), or (None, None) with fewer than 4 patients or too few resamples defined."""
    from wsi_mil.eval.metrics import clustered_interval, weighted_auc

    y, p, thr = np.asarray(y), np.asarray(p, dtype=float), np.asarray(thr, dtype=float)
    if not (len(y) == len(p) == len(thr) == len(patients)):
        raise ValueError(f"patient_intervals: {len(y)} labels, {len(p)} scores, {len(thr)} thresholds and "
                         f"{len(patients)} patients: one of each per case")
    if not np.isfinite(p).all() or np.isnan(thr).any() or not np.isin(y, (0, 1)).all():
        raise ValueError("patient_intervals: labels must be 0 / 1, scores finite and thresholds numbers (not NaN)")
    y = y.astype(int)
    pos, hit = (y == 1).astype(float), (p >= thr).astype(float)

    def rate(num: npt.NDArray[np.float64], den: npt.NDArray[np.float64]) -> Any:
        def of(w: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            d = (w * den).sum(axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(d > 0, (w * num).sum(axis=-1) / np.where(d > 0, d, 1), np.nan)
        return of

    stats = {"auc": lambda w: weighted_auc(w, y, p), "sensitivity": rate(pos * hit, pos),
             "specificity": rate((1 - pos) * (1 - hit), 1 - pos)}
    return {k: clustered_interval(f, patients, n_boot=n_boot, seed=seed) for k, f in stats.items()}


def patient_bootstrap(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], thr: npt.NDArray[np.float64],
                      patients: npt.NDArray[Any], *, n_boot: int, seed: int) -> dict[str, tuple[float, float] | None]:
    """The intervals of :func:`patient_intervals` without their methods."""
    return {k: v[0] for k, v in patient_intervals(y, p, thr, patients, n_boot=n_boot, seed=seed).items()}


def _patient_ci_method(methods: dict[str, str | None], n_patients: int) -> str:
    if n_patients < 4:
        return f"patient-level bootstrap not run: {n_patients} patient(s), fewer than 4 (patients have several cases)"
    said = ", ".join(f"{k} {m}" for k, m in methods.items() if m) or "none defined"
    return ("patient-level bootstrap (scipy.stats.bootstrap over patients; patients have several cases): " + said)


def subgroup_report(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float | npt.ArrayLike,
                    columns: dict[str, list[str]], *, n_boot: int = 1000, seed: int = 0,
                    patients: list[str] | None = None) -> dict[str, Any]:
    """Per-subgroup AUC / sensitivity / specificity of binary predictions (see the module
    docstring); ``columns`` maps a column name to one value per prediction. With
    ``patients``, a subgroup where some patient has several cases gets its intervals from a
    patient-level bootstrap (:func:`patient_bootstrap`; ``ci_method`` says which)."""
    from wsi_mil.eval.metrics import auc, auc_interval_note, bootstrap_auc_ci

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    pat = np.asarray(patients if patients is not None else [str(i) for i in range(len(y))], dtype=object)
    out: dict[str, Any] = {}
    for col, values in columns.items():
        if len(values) != len(y):
            raise ValueError(f"column {col}: {len(values)} values for {len(y)} predictions")
        names, bands = band_values(values)
        groups = []
        for name in sorted(set(names), key=lambda n: (n == MISSING, _sort_key(n))):
            k = np.array([n == name for n in names])
            yk, pk = y[k], p[k]
            n_pos, n_neg = int(yk.sum()), int(len(yk) - yk.sum())
            a = auc(yk, pk)
            clustered = len(set(pat[k])) < int(k.sum())  # some patient has several cases here
            if clustered:
                found = patient_intervals(yk, pk, thr[k], pat[k], n_boot=n_boot, seed=seed)
                ci = found["auc"][0] if a is not None else None
            else:
                ci = bootstrap_auc_ci(yk, pk, n_boot=n_boot, seed=seed) if a is not None else None
            g = {"group": name, "n": int(k.sum()), "n_patients": len(set(pat[k])), "n_positive": n_pos,
                 "n_negative": n_neg, "auc": a, "auc_ci95": ci,
                 "auc_ci_note": auc_interval_note(yk, pk, ci, auc_value=a) if a is not None else None,
                 **_rates(yk, pk, thr[k]),
                 "ci_method": (_patient_ci_method({key: v[1] for key, v in found.items()}, len(set(pat[k])))
                               if clustered else "stratified bootstrap (AUC), Wilson (sensitivity, specificity)")}
            if clustered:
                g["sensitivity_ci95"], g["specificity_ci95"] = found["sensitivity"][0], found["specificity"][0]
            pos_pat, neg_pat = len(set(pat[k][yk == 1])), len(set(pat[k][yk == 0]))
            if min(n_pos, n_neg) < SMALL_GROUP:
                g["warning"] = (f"too small to say anything: {n_pos} positive and {n_neg} negative "
                                f"(fewer than {SMALL_GROUP} of a class); its intervals are wide or undefined")
            elif min(pos_pat, neg_pat) < SMALL_GROUP:
                g["warning"] = (f"too few patients to say anything: {pos_pat} with a positive and {neg_pat} with a "
                                f"negative case (fewer than {SMALL_GROUP}); its intervals are wide or undefined")
            groups.append(g)
        out[col] = {"bands": bands, "groups": groups, "largest_gap": _largest_gap(groups)}
    return out


def _sort_key(name: str) -> tuple[float, str]:
    head = name.lstrip(">=[ ").split("-")[0].split(",")[0]
    x = _number(head)
    return (x if x is not None else math.inf, name)


def _largest_gap(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The widest spread of AUC, sensitivity and specificity between subgroups large enough to judge."""
    judged = [g for g in groups if "warning" not in g and g["group"] != MISSING]
    gaps: dict[str, Any] = {"groups_judged": len(judged)}
    for metric in ("auc", "sensitivity", "specificity"):
        have = [g for g in judged if g.get(metric) is not None]
        if len(have) < 2:
            gaps[metric] = None
            continue
        lo, hi = min(have, key=lambda g: g[metric]), max(have, key=lambda g: g[metric])
        lo_ci, hi_ci = lo.get(f"{metric}_ci95"), hi.get(f"{metric}_ci95")
        gaps[metric] = {"gap": hi[metric] - lo[metric], "lowest": lo["group"], "lowest_value": lo[metric],
                        "highest": hi["group"], "highest_value": hi[metric],
                        # overlapping 95 % intervals: the gap is no evidence of a real difference
                        "intervals_overlap": None if not (lo_ci and hi_ci) else bool(lo_ci[1] >= hi_ci[0])}
    return gaps


def _threshold_for_specificity(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], target: float) -> float | None:
    """The lowest threshold whose specificity (p >= t is positive) reaches ``target``."""
    neg = np.sort(p[y == 0])
    if not len(neg):
        return None
    # specificity at t = share of negatives below t; need ceil(target * n) negatives below
    need = int(math.ceil(target * len(neg) - 1e-9))
    if need <= 0:
        return float(-np.inf)
    if need > len(neg):
        return None
    return float(np.nextafter(neg[need - 1], np.inf))


def _threshold_for_sensitivity(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], target: float) -> float | None:
    """The highest threshold whose sensitivity reaches ``target``."""
    pos = np.sort(p[y == 1])[::-1]
    if not len(pos):
        return None
    need = int(math.ceil(target * len(pos) - 1e-9))
    if need <= 0:
        return float(np.inf)
    return float(pos[min(need, len(pos)) - 1])


def operating_points(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float | npt.ArrayLike, *,
                     specificities: tuple[float, ...] = (0.9, 0.95), sensitivities: tuple[float, ...] = (0.9, 0.95),
                     prevalence: float | None = None, n_boot: int = 1000, seed: int = 0,
                     patients: list[str] | None = None) -> dict[str, Any]:
    """Sensitivity at fixed specificity, specificity at fixed sensitivity and (with a
    deployment ``prevalence``) PPV / NPV at the run's ``threshold``; 95 % percentile CIs
    from a bootstrap that re-finds each threshold in every resample: stratified by class,
    or by patient when ``patients`` have several cases (a drawn patient brings them all)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    clustered = patients is not None and len(set(patients)) < len(y)
    if clustered:
        ids, inverse = np.unique(np.asarray(patients, dtype=object), return_inverse=True)
        rows = [np.flatnonzero(inverse == k) for k in range(len(ids))]
        boots = [np.concatenate([rows[k] for k in rng.integers(0, len(ids), len(ids))]) for _ in range(n_boot)] \
            if len(ids) >= 4 else []
    else:
        boots = [np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n_boot)] \
            if len(pos) >= 2 and len(neg) >= 2 else []

    def ci(values: list[float | None]) -> tuple[float, float] | None:
        v = [x for x in values if x is not None and np.isfinite(x)]
        if len(v) < 0.9 * max(1, len(boots)) or not v:
            return None
        lo, hi = np.quantile(v, [0.025, 0.975])
        return float(lo), float(hi)

    def sens_at_spec(yy: Any, pp: Any, s: float) -> float | None:
        t = _threshold_for_specificity(yy, pp, s)
        return None if t is None or not (yy == 1).any() else float((pp[yy == 1] >= t).mean())

    def spec_at_sens(yy: Any, pp: Any, s: float) -> float | None:
        t = _threshold_for_sensitivity(yy, pp, s)
        return None if t is None or not (yy == 0).any() else float((pp[yy == 0] < t).mean())

    out: dict[str, Any] = {"n": len(y), "n_positive": int(len(pos)), "sensitivity_at_specificity": [],
                           "specificity_at_sensitivity": [],
                           "note": "thresholds found on the evaluated set itself (optimistic); CIs re-find them in each "
                                   + ("patient-level bootstrap resample (patients have several cases)" if clustered else
                                      "stratified bootstrap resample")}
    for s in specificities:
        t = _threshold_for_specificity(y, p, s)
        out["sensitivity_at_specificity"].append({
            "specificity": s, "threshold": t, "sensitivity": sens_at_spec(y, p, s),
            "ci95": ci([sens_at_spec(y[b], p[b], s) for b in boots])})
    for s in sensitivities:
        t = _threshold_for_sensitivity(y, p, s)
        out["specificity_at_sensitivity"].append({
            "sensitivity": s, "threshold": t, "specificity": spec_at_sens(y, p, s),
            "ci95": ci([spec_at_sens(y[b], p[b], s) for b in boots])})
    if prevalence is not None:
        def pv(yy: Any, pp: Any, tt: Any) -> tuple[float | None, float | None]:
            r = _rates(yy, pp, tt)
            se, sp = r["sensitivity"], r["specificity"]
            if se is None or sp is None:
                return None, None
            ppv_den = se * prevalence + (1 - sp) * (1 - prevalence)
            npv_den = sp * (1 - prevalence) + (1 - se) * prevalence
            return (se * prevalence / ppv_den if ppv_den else None, sp * (1 - prevalence) / npv_den if npv_den else None)

        ppv, npv = pv(y, p, thr)
        bs = [pv(y[b], p[b], thr[b]) for b in boots]
        out["at_prevalence"] = {"prevalence": prevalence, "ppv": ppv, "ppv_ci95": ci([b[0] for b in bs]),
                                "npv": npv, "npv_ci95": ci([b[1] for b in bs]),
                                "note": "PPV and NPV from the sensitivity and specificity at the run's threshold "
                                        "(Bayes' rule at the given prevalence)"}
    return out


def error_cases(ids: list[str], patients: list[str], y: npt.ArrayLike, p: npt.ArrayLike, threshold: float | npt.ArrayLike,
                *, links: list[str | None] | None = None, n_correct: int = 4) -> dict[str, Any]:
    """Every false negative and false positive (most confident mistakes first) and, per
    class, the ``n_correct`` most confidently correct cases to show beside them."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    pred = (p >= thr).astype(int)
    links = links or [None] * len(ids)

    def case(i: int, kind: str) -> dict[str, Any]:
        return {"id": ids[i], "patient_id": patients[i], "label": int(y[i]), "probability": float(p[i]),
                "threshold": float(thr[i]), "kind": kind, "link": links[i]}

    fn = sorted((i for i in range(len(y)) if y[i] == 1 and pred[i] == 0), key=lambda i: p[i])
    fp = sorted((i for i in range(len(y)) if y[i] == 0 and pred[i] == 1), key=lambda i: -p[i])
    tp = sorted((i for i in range(len(y)) if y[i] == 1 and pred[i] == 1), key=lambda i: -p[i])[:n_correct]
    tn = sorted((i for i in range(len(y)) if y[i] == 0 and pred[i] == 0), key=lambda i: p[i])[:n_correct]
    return {"false_negatives": [case(i, "FN") for i in fn], "false_positives": [case(i, "FP") for i in fp],
            "confident_true_positives": [case(i, "TP") for i in tp],
            "confident_true_negatives": [case(i, "TN") for i in tn]}
