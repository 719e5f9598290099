"""Shortcut checks: is the label (before training) or the model's prediction (after it)
explained by something other than the disease?

A weakly supervised model scores on whatever separates its slide labels best. In a small
cohort that can be which hospital, scanner, stain or tissue source a slide came from
(generated cohorts of 40 slides: models ranked slides by one normal-tissue source at AUC
0.86-1.00 while their attention ignored the tumour, and the report read "AUC 0.805, the
folds agree"). Three checks, for every modality (they read manifest columns and facts
about each sample, nothing specific to slides):

* **Before training**: every *nuisance* the inputs carry (manifest columns that are not
  ids, labels or splits: site, scanner, source, stain, age ...; facts of each sample such
  as its patch count or resolution) against the label. A nuisance that alone separates
  the classes with AUC >= :data:`ASSOCIATION_AUC` (a number's own AUC, or the AUC of a
  category's positive share) and p < :data:`ASSOCIATION_P` (Fisher / chi-square /
  Mann-Whitney, scipy) is warned about: a model can learn it instead of the disease.
* **After training** (binary tasks, on the set the headline is computed on): the AUC
  within each level of a categorical nuisance (only pairs of slides from the same site
  count) against the overall AUC, and how well the predictions separate a nuisance's
  levels *within each class* (where the label cannot explain it). A within-level AUC
  :data:`WITHIN_DROP` below the overall one, or predictions that tell a level apart within
  the classes at AUC >= :data:`PREDICTION_AUC`, is a warning that the score leans on it.
* **Localisation**: where lesion masks exist, a slide AUC >= :data:`SLIDE_AUC_HIGH` with a
  localisation AUC <= :data:`LOCALISATION_CHANCE` is a loud warning: the slides are told
  apart, but not by the lesion.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

#: a nuisance that alone separates the classes at least this well (AUC), ...
ASSOCIATION_AUC = 0.7
#: ... with a p-value below this, is warned about before training
ASSOCIATION_P = 0.01
#: predictions that separate a nuisance's levels within the classes at least this well
PREDICTION_AUC = 0.75
#: a within-level AUC this far below the overall AUC says part of the score is the nuisance
WITHIN_DROP = 0.1
#: a slide AUC at least this high ...
SLIDE_AUC_HIGH = 0.8
#: ... with localisation at or below this: the slides are told apart, not by the lesion
LOCALISATION_CHANCE = 0.6
#: manifest columns that are never nuisances (ids, paths, labels, splits)
NOT_NUISANCES = {"slide_id", "image_id", "volume_id", "patient_id", "path", "image", "split", "label", "case_id",
                 "submitter_id", "file", "filename"}
#: a categorical column with more levels than this share of the samples is an identifier
MAX_LEVEL_SHARE = 0.5


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def nuisances(ids: list[str], columns: dict[str, dict[str, str]], facts: dict[str, dict[str, Any]] | None = None,
              label_columns: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"kind": "categorical" | "numeric", "values": {id: value}}}`` of every
    column that could be a nuisance: manifest columns other than ids, labels and splits
    (``columns``: id -> column -> value), and per-sample ``facts`` (id -> name -> value, e.g.
    patch count). Columns with one value, or as many levels as samples (identifiers), are
    left out; a blank cell is missing, never a level of its own."""
    skip = NOT_NUISANCES | (label_columns or set())
    names: list[str] = []
    for row in columns.values():
        names += [c for c in row if c not in names]
    for row in (facts or {}).values():
        names += [c for c in row if c not in names]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in skip or name.startswith("label_"):
            continue
        raw = {i: ((facts or {}).get(i, {}).get(name) if name in (facts or {}).get(i, {}) else
                   columns.get(i, {}).get(name)) for i in ids}
        raw = {i: v for i, v in raw.items() if v is not None and str(v).strip() != ""}
        if len(raw) < 4:
            continue
        nums = {i: _number(v) for i, v in raw.items()}
        levels = Counter(str(v).strip() for v in raw.values())
        if len(levels) < 2:
            continue
        if all(x is not None for x in nums.values()) and len(levels) > 2:
            out[name] = {"kind": "numeric", "values": nums}
        elif len(levels) <= max(2, MAX_LEVEL_SHARE * len(raw)):
            out[name] = {"kind": "categorical", "values": {i: str(v).strip() for i, v in raw.items()}}
    return out


def _auc(y: npt.NDArray[np.int64], s: npt.NDArray[np.float64]) -> float | None:
    from wsi_mil.eval.metrics import auc

    return auc(y, s)


def _level_share(y: npt.NDArray[np.int64], levels: list[str]) -> npt.NDArray[np.float64]:
    """Each sample's level's positive share: how well the level alone predicts the label
    (an AUC over these is 0.5 for a balanced column; the p-value guards against columns of
    many small levels, where it is optimistic)."""
    lv = np.asarray(levels)
    out = np.empty(len(y))
    for level in np.unique(lv):
        sel = lv == level
        out[sel] = y[sel].mean()
    return out


def label_association(ids: list[str], y: npt.ArrayLike, found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """How well each nuisance alone separates the classes: AUC (oriented: >= 0.5), p-value
    and, for categorical ones, the class x level table; ``warn`` when both pass the
    thresholds. Most associated first."""
    from scipy import stats

    y_all = np.asarray(y).astype(int)
    by_id = dict(zip(ids, y_all, strict=True))
    out = []
    for name, nz in found.items():
        have = [i for i in ids if i in nz["values"]]
        yy = np.array([by_id[i] for i in have])
        if len(np.unique(yy)) < 2:
            continue
        row: dict[str, Any] = {"nuisance": name, "kind": nz["kind"], "n": len(have)}
        if nz["kind"] == "numeric":
            v = np.array([nz["values"][i] for i in have], dtype=float)
            a = _auc(yy, v)
            p = float(stats.mannwhitneyu(v[yy == 1], v[yy == 0]).pvalue) if a is not None else 1.0
            row.update({"auc": max(a, 1 - a) if a is not None else None, "p": p, "test": "Mann-Whitney U",
                        "higher_in": "positive" if (a or 0.5) >= 0.5 else "negative",
                        "medians": {"negative": float(np.median(v[yy == 0])), "positive": float(np.median(v[yy == 1]))}})
        else:
            lv = [nz["values"][i] for i in have]
            levels = sorted(set(lv))
            table = {lev: {"negative": int(sum(1 for v, t in zip(lv, yy, strict=True) if v == lev and t == 0)),
                           "positive": int(sum(1 for v, t in zip(lv, yy, strict=True) if v == lev and t == 1))}
                     for lev in levels}
            counts = np.array([[table[lev]["negative"], table[lev]["positive"]] for lev in levels])
            if counts.shape == (2, 2):
                p = float(stats.fisher_exact(counts).pvalue)
                test = "Fisher's exact"
            else:
                p = float(stats.chi2_contingency(counts).pvalue)
                test = "chi-square"
            a = _auc(yy, _level_share(yy, lv))
            row.update({"auc": max(a, 1 - a) if a is not None else None, "p": p, "test": test, "table": table})
        row["warn"] = bool(row["auc"] is not None and row["auc"] >= ASSOCIATION_AUC and row["p"] < ASSOCIATION_P)
        out.append(row)
    return sorted(out, key=lambda r: -(r["auc"] or 0))


def _pair_auc(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], groups: npt.NDArray[Any]) -> float | None:
    """AUC over (positive, negative) pairs of the same group only (ties count 1/2)."""
    num = den = 0.0
    for g in np.unique(groups):
        sel = groups == g
        pos, neg = p[sel & (y == 1)], p[sel & (y == 0)]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            num += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            den += diff.size
    return num / den if den else None


def prediction_dependence(ids: list[str], y: npt.ArrayLike, p: npt.ArrayLike,
                          found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """After training: per nuisance, the AUC within its levels (categorical: pairs from the
    same level only) next to the overall AUC, and how well the predictions tell the
    nuisance apart within each class (categorical: the level most separated from the rest;
    numeric: AUC of predictions for above- vs below-median values), pairs within a class
    only, so the label cannot explain it. ``warn`` as in the module docstring."""
    y_all, p_all = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    overall = _auc(y_all, p_all)
    pos = {i: k for k, i in enumerate(ids)}
    out = []
    for name, nz in found.items():
        have = [i for i in ids if i in nz["values"]]
        if len(have) < 4:
            continue
        idx = np.array([pos[i] for i in have])
        yy, pp = y_all[idx], p_all[idx]
        row: dict[str, Any] = {"nuisance": name, "kind": nz["kind"], "n": len(have), "overall_auc": overall}
        if nz["kind"] == "categorical":
            lv = np.array([nz["values"][i] for i in have])
            row["within_level_auc"] = _pair_auc(yy, pp, lv)
            best: tuple[float, str] | None = None
            for level in np.unique(lv):
                a = _pair_auc((lv == level).astype(int), pp, yy)  # level vs rest, pairs within a class
                if a is not None and (best is None or abs(a - 0.5) > abs(best[0] - 0.5)):
                    best = (a, str(level))
            if best is not None:
                row["level_auc_within_class"], row["level"] = best
        else:
            v = np.array([nz["values"][i] for i in have], dtype=float)
            high = (v > np.median(v)).astype(int)
            row["level_auc_within_class"] = _pair_auc(high, pp, yy) if 0 < high.sum() < len(high) else None
            row["level"] = f"above the median ({np.median(v):g})"
        drop = (overall - row["within_level_auc"]) if overall is not None and row.get("within_level_auc") is not None \
            else None
        sep = row.get("level_auc_within_class")
        row["within_drop"] = drop
        row["warn"] = bool((drop is not None and drop >= WITHIN_DROP)
                           or (sep is not None and max(sep, 1 - sep) >= PREDICTION_AUC))
        out.append(row)
    return sorted(out, key=lambda r: (not r["warn"], r["nuisance"]))


def localisation_warning(slide_auc: float | None, localisation: dict[str, Any] | None) -> str | None:
    """The loud warning when slides are told apart but not by the lesion, else None."""
    if not localisation or slide_auc is None or localisation.get("mean") is None:
        return None
    if slide_auc >= SLIDE_AUC_HIGH and localisation["mean"] <= LOCALISATION_CHANCE:
        return (f"slide AUC {slide_auc:.3f} but localisation AUC {localisation['mean']:.3f} (at chance: <= "
                f"{LOCALISATION_CHANCE}) over {localisation['n']} lesion slide(s): the model tells the slides apart, "
                "but its attention is not on the lesions. It has probably learned something that comes with the "
                "label (a site, a stain, a tissue source); do not trust its heatmaps or its score")
    return None


def warnings_of(audit: dict[str, Any]) -> list[str]:
    """One line per warning of a run's shortcut audit (for the log and report.md)."""
    lines = []
    for r in audit.get("before", []):
        if r["warn"]:
            what = ("; ".join(f"{k}: {v['positive']} positive / {v['negative']} negative" for k, v in r["table"].items())
                    if r["kind"] == "categorical" else
                    f"median {r['medians']['positive']:g} in positives vs {r['medians']['negative']:g} in negatives")
            lines.append(f"the label is associated with {r['nuisance']!r} (it alone separates the classes at AUC "
                         f"{r['auc']:.2f}, {r['test']} p = {r['p']:.2g}; {what}): a model can learn "
                         f"{r['nuisance']} instead of the disease. Balance it, or hold it out (e.g. folds by site)")
    for r in audit.get("after", []):
        if r["warn"]:
            parts = []
            if r.get("within_drop") is not None and r["within_drop"] >= WITHIN_DROP:
                parts.append(f"AUC {r['within_level_auc']:.3f} within each {r['nuisance']} vs {r['overall_auc']:.3f} "
                             "overall")
            sep = r.get("level_auc_within_class")
            if sep is not None and max(sep, 1 - sep) >= PREDICTION_AUC:
                level = r["level"] if r["kind"] == "numeric" else f"= {r['level']}"
                parts.append(f"within each class the predictions separate {r['nuisance']} {level} from the rest at AUC "
                             f"{max(sep, 1 - sep):.2f}")
            lines.append(f"the predictions depend on {r['nuisance']!r} ({'; '.join(parts)}): part of the score is "
                         f"{r['nuisance']}, not the disease")
    if audit.get("localisation_warning"):
        lines.append(audit["localisation_warning"])
    return lines


def markdown(audit: dict[str, Any]) -> list[str]:
    """report.md's section on shortcuts."""
    from wsi_mil.eval.audit_run import _f

    lines = ["## Shortcut checks", ""]
    warned = warnings_of(audit)
    lines += [f"- **WARNING: {w}.**" for w in warned] + ([""] if warned else [])
    before, after = audit.get("before", []), audit.get("after", [])
    if not before and not after:
        lines += [("No nuisance to check: the inputs carry no column other than ids, labels and splits (add site, "
                   "scanner or source columns to the manifest to have them checked)."), ""]
    if before:
        lines += [(f"Before training, each nuisance against the label (warned at AUC >= {ASSOCIATION_AUC} with "
                   f"p < {ASSOCIATION_P}):"), "", "| nuisance | kind | n | AUC alone | p | test | warning |",
                  "|---|---|---:|---:|---:|---|---|"]
        lines += [(f"| {r['nuisance']} | {r['kind']} | {r['n']} | {_f(r['auc'])} | {r['p']:.2g} | {r['test']} | "
                   f"{'yes' if r['warn'] else ''} |") for r in before]
        lines.append("")
    if after:
        lines += [(f"After training ({audit.get('set', '')}): AUC within each level against overall (warned "
                   f"{WITHIN_DROP} lower), and how well predictions separate a level within the classes (warned at "
                   f"AUC >= {PREDICTION_AUC}):"), "",
                  "| nuisance | overall AUC | AUC within levels | level | separated within class (AUC) | warning |",
                  "|---|---:|---:|---|---:|---|"]
        lines += [(f"| {r['nuisance']} | {_f(r['overall_auc'])} | {_f(r.get('within_level_auc'))} | {r.get('level', '')} "
                   f"| {_f(r.get('level_auc_within_class'))} | {'yes' if r['warn'] else ''} |") for r in after]
        lines.append("")
    loc = audit.get("localisation")
    if loc:
        lines += [(f"Localisation (attention against the lesion masks, {loc['n']} lesion slide(s) the models did not "
                   f"train on): mean AUC {_f(loc['mean'])}, lowest {_f(loc['min'])}."), ""]
    return lines
