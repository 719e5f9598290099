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
  the classes at AUC >= :data:`PREDICTION_AUC`, each with a permutation p-value below
  :data:`DEPENDENCE_P` (the nuisance shuffled within each class, so a few test slides do
  not separate anything by chance), is a warning that the score leans on it.
* **Localisation**: where lesion masks exist, a slide AUC >= :data:`SLIDE_AUC_HIGH` with a
  localisation AUC <= :data:`LOCALISATION_CHANCE` is a loud warning: the slides are told
  apart, but not by the lesion.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.eval.audit import _number

#: a nuisance that alone separates the classes at least this well (AUC), ...
ASSOCIATION_AUC = 0.7
#: ... with a p-value below this, is warned about before training
ASSOCIATION_P = 0.01
#: predictions that separate a nuisance's levels within the classes at least this well
PREDICTION_AUC = 0.75
#: a within-level AUC this far below the overall AUC says part of the score is the nuisance
WITHIN_DROP = 0.1
#: ... each only with a permutation p-value below this (the nuisance shuffled within each class)
DEPENDENCE_P = 0.01
PERMUTATIONS = 999
#: a slide AUC at least this high ...
SLIDE_AUC_HIGH = 0.8
#: ... with localisation at or below this: the slides are told apart, not by the lesion
LOCALISATION_CHANCE = 0.6
#: manifest columns that are never nuisances (ids, paths, labels, splits)
NOT_NUISANCES = {"slide_id", "image_id", "volume_id", "patient_id", "path", "image", "split", "label", "case_id",
                 "submitter_id", "file", "filename"}
#: a categorical column with more levels than this share of the samples is an identifier
MAX_LEVEL_SHARE = 0.5


#: nuisances named with this prefix measure the tissue's colour (wsi_mil.tiling.tissue.stain_statistics):
#: a stain, site or scanner shows there, but so do large lesions in their own colours, so an
#: association is a note to check, not a warning
COLOUR = "tissue colour: "

#: cells that mean "no value" (as spreadsheets and pandas write them), never a level
BLANKS = {"", "na", "n/a", "nan", "none", "null", "-", "?"}


def _blank(v: Any) -> bool:
    return v is None or str(v).strip().lower() in BLANKS


def nuisances(ids: list[str], columns: dict[str, dict[str, str]], facts: dict[str, dict[str, Any]] | None = None,
              label_columns: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {"kind": "categorical" | "numeric", "values": {id: value}}}`` of every
    column that could be a nuisance: manifest columns other than ids, labels and splits
    (``columns``: id -> column -> value), and per-sample ``facts`` (id -> name -> value, e.g.
    patch count). Columns with one value, or as many levels as samples (identifiers), are
    left out; a blank cell (or NA, n/a, none ...) is missing, never a level of its own, and
    a column blank for some samples is also checked as "<column> (blank or not)"."""
    skip = NOT_NUISANCES | (label_columns or set())
    facts = facts or {}
    column_names = dict.fromkeys(c for row in columns.values() for c in row)
    names = [*column_names, *(c for c in dict.fromkeys(c for row in facts.values() for c in row)
                              if c not in column_names)]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in skip or name.startswith("label_"):
            continue
        cells = {i: facts[i][name] if name in facts.get(i, {}) else columns.get(i, {}).get(name) for i in ids}
        raw = {i: v for i, v in cells.items() if not _blank(v)}
        if name in column_names and 2 <= len(raw) <= len(ids) - 2:
            # which slides have a value at all can itself come with the label (a note written for positives only)
            out[f"{name} (blank or not)"] = {"kind": "categorical",
                                             "values": {i: "filled" if i in raw else "blank" for i in ids}}
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


def label_association(ids: list[str], y: npt.ArrayLike, found: dict[str, dict[str, Any]], *,
                      class_names: list[str] | None = None) -> list[dict[str, Any]]:
    """How well each nuisance alone separates the classes: AUC (oriented: >= 0.5), p-value
    and, for categorical ones, the class x level table; ``warn`` when both pass the
    thresholds. ``y``: 0/1, or class indices (named by ``class_names``) for more than two
    classes, where the AUC is the best one-vs-rest AUC and the p-value the test over all
    classes (Kruskal-Wallis, chi-square). Most associated first."""
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
        if class_names is not None and len(class_names) > 2:
            row.update(_multiclass_association(yy, [nz["values"][i] for i in have], nz["kind"], class_names))
        elif nz["kind"] == "numeric":
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
        hit = bool(row["auc"] is not None and row["auc"] >= ASSOCIATION_AUC and row["p"] < ASSOCIATION_P)
        row["warn"], row["note"] = (False, hit) if name.startswith(COLOUR) else (hit, False)
        out.append(row)
    return sorted(out, key=lambda r: -(r["auc"] or 0))


def _multiclass_association(yy: npt.NDArray[np.int64], values: list[Any], kind: str,
                            names: list[str]) -> dict[str, Any]:
    """A nuisance against several classes: the test over all classes, and the class it
    separates best from the others (one-vs-rest AUC, oriented)."""
    from scipy import stats

    present = [c for c in range(len(names)) if (yy == c).any()]
    best: tuple[float, int] | None = None
    if kind == "numeric":
        v = np.asarray(values, dtype=float)
        groups = [v[yy == c] for c in present]
        p = float(stats.kruskal(*groups).pvalue) if len({float(x) for x in v}) > 1 else 1.0
        for c in present:
            a = _auc((yy == c).astype(int), v)
            if a is not None and (best is None or max(a, 1 - a) > best[0]):
                best = (max(a, 1 - a), c)
        extra: dict[str, Any] = {"test": "Kruskal-Wallis",
                                 "medians": {names[c]: float(np.median(v[yy == c])) for c in present}}
    else:
        levels = sorted(set(values))
        lv = np.asarray(values)
        table = {lev: {names[c]: int(((lv == lev) & (yy == c)).sum()) for c in present} for lev in levels}
        counts = np.array([[table[lev][names[c]] for c in present] for lev in levels])
        p = float(stats.chi2_contingency(counts).pvalue)
        for c in present:
            a = _auc((yy == c).astype(int), _level_share((yy == c).astype(int), list(values)))
            if a is not None and (best is None or max(a, 1 - a) > best[0]):
                best = (max(a, 1 - a), c)
        extra = {"test": "chi-square", "table": table}
    return {"auc": best[0] if best else None, "p": p, "class": names[best[1]] if best else None, **extra}


def _pair_auc(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], groups: npt.NDArray[Any]) -> float | None:
    """AUC over (positive, negative) pairs of the same group only (ties count 1/2): the
    Mann-Whitney U of each group from ranks, summed (n log n, not pairs)."""
    from scipy.stats import rankdata

    num = den = 0.0
    for g in np.unique(groups):
        sel = groups == g
        yy = y[sel]
        n1, n0 = int((yy == 1).sum()), int((yy == 0).sum())
        if n1 and n0:
            r = rankdata(p[sel])
            num += float(r[yy == 1].sum()) - n1 * (n1 + 1) / 2
            den += n1 * n0
    return num / den if den else None


def _dependence(yy: npt.NDArray[np.int64], pp: npt.NDArray[np.float64], lv: npt.NDArray[Any],
                numeric: bool) -> tuple[float | None, float | None, str | None]:
    """(AUC within the nuisance's levels, the strongest separation of a level from the
    rest within the classes as an AUC >= 0.5, that level) of one assignment of levels."""
    within = None if numeric else _pair_auc(yy, pp, lv)
    best: tuple[float, str] | None = None
    for level in ([True] if numeric else np.unique(lv)):
        a = _pair_auc((lv == level).astype(int), pp, yy)  # the level vs the rest, pairs within a class
        if a is not None and (best is None or abs(a - 0.5) > abs(best[0] - 0.5)):
            best = (a, str(level))
    if best is None:
        return within, None, None
    return within, max(best[0], 1 - best[0]), f"{best[1]} ({'higher' if best[0] >= 0.5 else 'lower'})"


def prediction_dependence(ids: list[str], y: npt.ArrayLike, p: npt.ArrayLike, found: dict[str, dict[str, Any]],
                          *, n_perm: int = PERMUTATIONS, seed: int = 0) -> list[dict[str, Any]]:
    """After training: per nuisance, the AUC within its levels (categorical: pairs from the
    same level only) next to the overall AUC, and how well the predictions tell the
    nuisance apart within each class (categorical: the level most separated from the rest;
    numeric: above- vs below-median values; as an AUC >= 0.5 with its direction), pairs
    within a class only, so the label cannot explain it. Each comes with a p-value from
    ``n_perm`` permutations of the nuisance within each class (a handful of test slides
    separates anything by chance); ``warn`` when an effect passes its threshold with
    p < :data:`DEPENDENCE_P`."""
    y_all, p_all = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    overall = _auc(y_all, p_all)
    pos = {i: k for k, i in enumerate(ids)}
    rng = np.random.default_rng(seed)
    out = []
    for name, nz in found.items():
        have = [i for i in ids if i in nz["values"]]
        if len(have) < 4:
            continue
        idx = np.array([pos[i] for i in have])
        yy, pp = y_all[idx], p_all[idx]
        numeric = nz["kind"] == "numeric"
        if numeric:
            v = np.array([nz["values"][i] for i in have], dtype=float)
            lv = v > np.median(v)
        else:
            lv = np.array([nz["values"][i] for i in have])
        within, sep, level = _dependence(yy, pp, lv, numeric)
        if numeric and level is not None:
            level = f"above the median ({np.median(v):g}), {level.split('(')[1][:-1]}"
        drop = overall - within if overall is not None and within is not None else None
        p_drop = p_sep = None
        if drop is not None or sep is not None:
            hits_drop = hits_sep = 0
            for _ in range(n_perm):
                shuffled = lv.copy()
                for c in (0, 1):  # the nuisance permuted within each class: the label's link to it kept
                    members = np.flatnonzero(yy == c)
                    shuffled[members] = lv[rng.permutation(members)]
                w, s_, _ = _dependence(yy, pp, shuffled, numeric)
                hits_drop += (drop is not None and overall is not None  # (a drop needs the overall AUC)
                              and w is not None and overall - w >= drop - 1e-12)
                hits_sep += sep is not None and s_ is not None and s_ >= sep - 1e-12
            p_drop = (hits_drop + 1) / (n_perm + 1) if drop is not None else None
            p_sep = (hits_sep + 1) / (n_perm + 1) if sep is not None else None
        row: dict[str, Any] = {"nuisance": name, "kind": nz["kind"], "n": len(have), "overall_auc": overall,
                               "within_level_auc": within, "within_drop": drop, "p_within_drop": p_drop,
                               "level_auc_within_class": sep, "level": level, "p_level": p_sep}
        hit = bool((drop is not None and drop >= WITHIN_DROP and p_drop is not None and p_drop < DEPENDENCE_P)
                   or (sep is not None and sep >= PREDICTION_AUC and p_sep is not None and p_sep < DEPENDENCE_P))
        row["warn"], row["note"] = (False, hit) if name.startswith(COLOUR) else (hit, False)
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


def _what(r: dict[str, Any]) -> str:
    """The class x level table, or the medians, of a label-association row, in words."""
    if r["kind"] == "categorical":
        if all(set(v) == {"negative", "positive"} for v in r["table"].values()):
            return "; ".join(f"{k}: {v['positive']} positive / {v['negative']} negative" for k, v in r["table"].items())
        return "; ".join(f"{k}: " + ", ".join(f"{n} {c}" for c, n in v.items()) for k, v in r["table"].items())
    med = r["medians"]
    if set(med) == {"negative", "positive"}:
        return f"median {med['positive']:g} in positives vs {med['negative']:g} in negatives"
    return "medians " + ", ".join(f"{c} {m:g}" for c, m in med.items())


def warnings_of(audit: dict[str, Any]) -> list[str]:
    """One line per warning of a run's shortcut audit (for the log and report.md)."""
    lines = []
    for r in audit.get("before", []):
        if r["warn"]:
            label = f"label {r['label']!r}" if r.get("label") else "the label"
            sep = (f"it alone separates class {r['class']} from the others at AUC" if r.get("class") else
                   "it alone separates the classes at AUC")
            held = audit.get("held_out")
            advice = (f"This run holds each {held} out (--folds-by {held}): its held-out figures cannot lean on it"
                      if held == r["nuisance"] else "Balance it, or hold it out (e.g. --folds-by site)")
            lines.append(f"{label} is associated with {r['nuisance']!r} ({sep} {r['auc']:.2f}, {r['test']} p = "
                         f"{r['p']:.2g}; {_what(r)}): a model can learn {r['nuisance']} instead of the disease. "
                         + advice)
    for r in audit.get("after", []):
        if r["warn"]:
            parts = []
            if (r.get("within_drop") is not None and r["within_drop"] >= WITHIN_DROP
                    and (r.get("p_within_drop") or 1) < DEPENDENCE_P):
                parts.append(f"AUC {r['within_level_auc']:.3f} within each {r['nuisance']} vs {r['overall_auc']:.3f} "
                             f"overall, permutation p = {r['p_within_drop']:.3f}")
            sep = r.get("level_auc_within_class")
            if sep is not None and sep >= PREDICTION_AUC and (r.get("p_level") or 1) < DEPENDENCE_P:
                level = r["level"] if r["kind"] == "numeric" else f"= {r['level']}"
                parts.append(f"within each class the predictions separate {r['nuisance']} {level} from the rest at AUC "
                             f"{sep:.2f}, permutation p = {r['p_level']:.3f}")
            whose = f"the predictions of {r['label']!r}" if r.get("label") else "the predictions"
            lines.append(f"{whose} depend on {r['nuisance']!r} ({'; '.join(parts)}): part of the score is "
                         f"{r['nuisance']}, not the disease")
    if audit.get("localisation_warning"):
        lines.append(audit["localisation_warning"])
    return lines


def log_findings(audit: dict[str, Any], log: Any) -> None:
    """Each warning of ``audit`` (a shortcut record, or part of one) at WARNING, each note at INFO."""
    for line in warnings_of(audit):
        log.warning("%s", line)
    for line in notes_of(audit):
        log.info("note: %s", line)


def notes_of(audit: dict[str, Any]) -> list[str]:
    """One line per colour nuisance that passed a warning's thresholds (see :data:`COLOUR`)."""
    lines = []
    for r in audit.get("before", []):
        if r.get("note"):
            of = f" for label {r['label']!r}" if r.get("label") else ""
            lines.append(f"the {r['nuisance'][len(COLOUR):]} of the tissue differs between the classes{of} (AUC "
                         f"{r['auc']:.2f}, {r['test']} p = {r['p']:.2g}; {_what(r)}): either the lesions' own colour "
                         "(large lesions) or a stain, site or scanner that comes with the label; where lesions are "
                         "small, suspect the stain, and check that the heatmaps point at lesions")
    for r in audit.get("after", []):
        if r.get("note"):
            whose = f"the predictions of {r['label']!r}" if r.get("label") else "the predictions"
            lines.append(f"within the classes {whose} follow the {r['nuisance'][len(COLOUR):]} of the tissue "
                         f"(see the table): the lesions' colour, or a stain the model learned")
    return lines


def _named(r: dict[str, Any]) -> str:
    """A table row's nuisance, with the label (multi-label) or class it concerns."""
    return r["nuisance"] + (f" ({r['label']})" if r.get("label") else "") + (f" (class {r['class']})" if r.get("class") else "")


def markdown(audit: dict[str, Any]) -> list[str]:
    """report.md's section on shortcuts."""
    from wsi_mil.eval.audit_run import _f

    lines = ["## Shortcut checks", ""]
    warned = warnings_of(audit)
    noted = notes_of(audit)
    lines += [f"- **WARNING: {w}.**" for w in warned] + [f"- Note: {n}." for n in noted] + ([""] if warned or noted else [])
    before, after = audit.get("before", []), audit.get("after", [])
    if not before and not after:
        lines += [("No nuisance to check: the inputs carry no column other than ids, labels and splits (add site, "
                   "scanner or source columns to the manifest to have them checked)."), ""]
    if before:
        lines += [(f"Before training, each nuisance against the label (warned at AUC >= {ASSOCIATION_AUC} with "
                   f"p < {ASSOCIATION_P}):"), "", "| nuisance | kind | n | AUC alone | p | test | warning |",
                  "|---|---|---:|---:|---:|---|---|"]
        lines += [(f"| {_named(r)} | {r['kind']} | {r['n']} | {_f(r['auc'])} | {r['p']:.2g} | {r['test']} | "
                   f"{'yes' if r['warn'] else 'note' if r.get('note') else ''} |") for r in before]
        lines.append("")
    if after:
        lines += [(f"After training ({audit.get('set', '')}): AUC within each level against overall (warned "
                   f"{WITHIN_DROP} lower), and how well predictions separate a level within the classes (warned at "
                   f"AUC >= {PREDICTION_AUC}):"), "",
                  ("| nuisance | n | overall AUC | AUC within levels (p) | level | separated within class: AUC (p) "
                  "| warning |"), "|---|---:|---:|---:|---|---:|---|"]
        lines += [(f"| {_named(r)} | {r['n']} | {_f(r['overall_auc'])} | {_f(r.get('within_level_auc'))} "
                   f"({_f(r.get('p_within_drop'))}) | {r.get('level') or ''} | {_f(r.get('level_auc_within_class'))} "
                   f"({_f(r.get('p_level'))}) | {'yes' if r['warn'] else 'note' if r.get('note') else ''} |") for r in after]
        lines.append("")
    loc = audit.get("localisation")
    if loc and loc.get("unjudged"):
        lines += [(f"**Localisation left out {len(loc['unjudged'])} slide(s) whose drawn regions have no class "
                   f"{loc.get('lesion_class')!r}** (their classes: "
                   f"{', '.join(sorted({c for v in loc['unjudged'].values() for c in v}))}): name the lesion class "
                   "with --lesion-class."), ""]
    if loc and loc.get("n"):
        source = " and ".join(f"{v} slide(s): {k}" + (f", class {loc['lesion_class']!r}" if k.startswith("drawn") else "")
                              for k, v in (loc.get("truth") or {}).items()) or "lesion masks"
        lines += [(f"Localisation (attention against the lesions, {loc['n']} lesion slide(s) the models did not "
                   f"train on; {source}): mean patch AUC {_f(loc['mean'])}, lowest {_f(loc['min'])}"
                   + (f"; Dice of the heatmap above half its range against the lesion patches {_f(loc['dice_mean'])}"
                      if loc.get("dice_mean") is not None else "") + "."), ""]
        fr = loc.get("froc")
        if fr:
            at = fr["sensitivity_at_fp_per_slide"]
            lines += [(f"FROC (CAMELYON16 style: local maxima of each slide's heatmap times its probability; "
                       f"{fr['n_lesions']} lesion(s) on {fr['n_slides']} slide(s)): score {_f(fr['score'])}; "
                       "sensitivity at " + ", ".join(f"{k} FP/slide {_f(v)}" for k, v in at.items()) + "."), ""]
    return lines
