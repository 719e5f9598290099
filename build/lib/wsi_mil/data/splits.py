"""Patient-level splits: nothing of one patient is ever on both sides of a split.

* ``make_plan``: a held-out test set (stratified by label, grouped by patient), then
  stratified group k-fold over the rest (train / validation per fold). Optionally the
  test set is sampled so that the minority class makes up at least a given share (the
  "50 % positives in test" protocol); the true prevalence is kept for re-weighted metrics.
* ``plan_from_user_split``: the manifest's ``split`` column (train / val / test), refused
  when a patient appears in two sets (the message names the patients).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_mil.data.bags import Bag
from wsi_mil.errors import ConfigError, ManifestError

SPLITS = ("train", "val", "test")


@dataclass
class Fold:
    index: int
    train: list[str]
    val: list[str]


@dataclass
class SplitPlan:
    folds: list[Fold]
    test: list[str]
    source: str  # "generated" or "manifest"
    test_sampling: dict[str, Any] = field(default_factory=dict)
    #: --folds-by: the protocol, the column and each fold's held-out centres
    centres: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "test": self.test, "test_sampling": self.test_sampling,
                "folds": [{"index": f.index, "train": f.train, "val": f.val} for f in self.folds],
                **({"centres": self.centres} if self.centres else {})}


def _stratum_keys(bags: list[Bag]) -> list[str]:
    return [getattr(b, "stratum", None) or ("".join(str(int(v > 0.5)) for v in b.target) if b.label_index < 0
                                            else str(b.label_index)) for b in bags]


def _strata(bags: list[Bag]) -> np.ndarray:
    """One stratum per bag: the one its task kind gave it (a survival's event, a regression's quartile),
    else its class (binary / multi-class) or label combination (multi-label)."""
    keys = _stratum_keys(bags)
    uniq = {k: i for i, k in enumerate(sorted(set(keys)))}
    return np.asarray([uniq[k] for k in keys])


def _group_kfold(bags: list[Bag], n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.asarray([b.patient_id for b in bags])
    n_patients = len(set(groups.tolist()))
    if n_patients < n_splits:
        raise ConfigError(f"{n_patients} patient(s) cannot be split {n_splits} ways; use fewer folds or a smaller test fraction")
    y = _strata(bags)
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(sgkf.split(np.zeros(len(bags)), y, groups))


def shared_patients(pairs: Any) -> dict[str, list[str]]:
    """Patients found in more than one set, with their sets, from (patient, set) pairs."""
    where: dict[str, set[str]] = defaultdict(set)
    for patient, name in pairs:
        where[patient].add(name)
    return {p: sorted(s) for p, s in sorted(where.items()) if len(s) > 1}


def check_patients(sets: dict[str, list[Bag]]) -> None:
    """Refuse sets that share a patient; the message names them."""
    shared = shared_patients((b.patient_id, name) for name, bags in sets.items() for b in bags)
    if shared:
        listing = "; ".join(f"{p} in {'/'.join(s)}" for p, s in sorted(shared.items())[:10])
        raise ManifestError(f"{len(shared)} patient(s) appear in more than one split ({listing}"
                            f"{' ...' if len(shared) > 10 else ''}). Every slide of a patient must be in the same "
                            "split: fix the manifest's split column, or remove it to let wsi-mil split by patient.")


def _minority(bags: list[Bag]) -> int | None:
    labels = [b.label_index for b in bags]
    if any(v < 0 for v in labels):
        return None
    counts = np.bincount(labels)
    return int(np.argmin(counts))


def _enrich_test(test: list[Bag], share: float) -> tuple[list[Bag], list[Bag], dict[str, Any]]:
    """Move whole majority-class patients out of ``test`` until the minority class makes
    up at least ``share`` of it; returns (test, moved out, sampling record)."""
    minority = _minority(test)
    if minority is None:
        raise ConfigError("--min-minority-share applies to binary and multi-class tasks")
    true_share = float(np.mean([b.label_index == minority for b in test])) if test else 0.0
    by_patient: dict[str, list[Bag]] = defaultdict(list)
    for b in test:
        by_patient[b.patient_id].append(b)
    kept = list(test)
    moved: list[Bag] = []
    rng = np.random.default_rng(0)
    majority_patients = [p for p, bs in by_patient.items() if all(b.label_index != minority for b in bs)]
    for p in rng.permutation(majority_patients):
        n_min = sum(b.label_index == minority for b in kept)
        if n_min >= share * len(kept):
            break
        moved += by_patient[p]
        kept = [b for b in kept if b.patient_id != p]
    record = {"minority_class": minority, "min_share": share, "true_share": true_share,
              "sampled_share": float(np.mean([b.label_index == minority for b in kept])) if kept else 0.0,
              "moved_to_development": [b.slide_id for b in moved]}
    return kept, moved, record


def make_plan(bags: list[Bag], *, folds: int = 5, test_fraction: float = 0.2, seed: int = 0,
              min_minority_share: float | None = None) -> SplitPlan:
    """Held-out test (patient-level, stratified) + stratified group k-fold on the rest."""
    if folds < 1:
        raise ConfigError("--folds must be 1 or more")
    if not 0 <= test_fraction < 1:
        raise ConfigError("--test-fraction must be in [0, 1)")
    dev, test = list(bags), []
    if test_fraction > 0:
        n = max(2, int(round(1 / test_fraction)))
        _, test_idx = _group_kfold(bags, n, seed)[0]
        test = [bags[i] for i in test_idx]
        dev = [b for i, b in enumerate(bags) if i not in set(test_idx.tolist())]
    sampling: dict[str, Any] = {}
    if min_minority_share:
        if not test:
            raise ConfigError("--min-minority-share needs a held-out test set (--test-fraction > 0)")
        test, moved, sampling = _enrich_test(test, min_minority_share)
        dev += moved
    splits = _group_kfold(dev, max(2, folds), seed + 1)
    if folds == 1:
        splits = splits[:1]
    out = [Fold(k, [dev[i].slide_id for i in tr], [dev[i].slide_id for i in va]) for k, (tr, va) in enumerate(splits)]
    check_patients({"test": test, "development": dev})
    return SplitPlan(out, [b.slide_id for b in test], "generated", sampling)


def plan_by_centre(bags: list[Bag], centres: dict[str, str], column: str, *, folds: int = 5, seed: int = 0,
                   min_slides: int = 5, class_names: list[str] | None = None) -> SplitPlan:
    """Folds that never split a centre (``train-mil --folds-by COLUMN``): leave-one-centre-out when there are at most
    ``folds`` centres, else centre-grouped k-fold stratified on the label. No separate test set: every centre is
    held out once, and the pooled out-of-fold figure is the site-held-out one. Refused by name: a slide without a
    centre, a patient in two centres, one centre only, and a held-out set (a centre, or a fold of centres) with
    fewer than ``min_slides`` slides or one class (stratum) only: its AUC would not exist."""
    from wsi_mil.data.bags import MISSING_TOKENS

    blank = [b.slide_id for b in bags if str(centres.get(b.slide_id, "")).strip().lower() in {"", *MISSING_TOKENS}]
    if blank:  # (NA, None, unknown ... are no centre: never a centre of their own)
        listing = ", ".join(f"{s}={centres.get(s, '')!r}" for s in blank[:5])
        raise ManifestError(f"--folds-by {column}: {len(blank)} slide(s) have no {column} value ({listing}); give "
                            "every slide its centre")
    where: dict[str, set[str]] = defaultdict(set)
    for b in bags:
        where[b.patient_id].add(centres[b.slide_id])
    across = {p: sorted(s) for p, s in where.items() if len(s) > 1}
    if across:
        listing = "; ".join(f"{p} in {'/'.join(s)}" for p, s in sorted(across.items())[:5])
        raise ManifestError(f"--folds-by {column}: {len(across)} patient(s) have slides in several centres ({listing}): "
                            "a patient's slides must stay in one fold; fix the column")
    names = sorted({centres[b.slide_id] for b in bags})
    if len(names) < 2:
        raise ConfigError(f"--folds-by {column}: every slide is in {names[0]!r}: one centre cannot be held out "
                          "against the others")
    keys = np.asarray(_stratum_keys(bags))
    groups = np.asarray([centres[b.slide_id] for b in bags])
    if len(names) <= max(folds, 2):
        protocol = f"leave-one-{column}-out ({len(names)} {column}s)"
        held = [np.flatnonzero(groups == c) for c in names]
    else:
        from sklearn.model_selection import StratifiedGroupKFold

        protocol = f"{column}-grouped {folds}-fold ({len(names)} {column}s, stratified on the label)"
        sgkf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        held = [va for _, va in sgkf.split(np.zeros(len(bags)), _strata(bags), groups)]
    problems = []
    for idx in held:
        label = ", ".join(sorted(set(groups[idx].tolist())))
        counts = {k: int((keys[idx] == k).sum()) for k in sorted(set(keys[idx].tolist()))}
        if len(idx) < min_slides:
            problems.append(f"{label}: {len(idx)} slide(s)")
        elif len(counts) < 2:
            only = next(iter(counts))
            named = class_names[int(only)] if class_names and only.isdigit() and int(only) < len(class_names) else only
            problems.append(f"{label}: every slide of one kind ({named})")
    if problems:
        fewer = (f", use fewer --folds (larger groups of {column}s)" if len(names) > max(folds, 2) else "")
        raise ConfigError(f"--folds-by {column}: a held-out set cannot be judged: {'; '.join(problems)} (at least "
                          f"{min_slides} slides and two kinds each: classes, events and censored slides, or target "
                          f"quartiles). Merge small {column}s in the manifest{fewer}, or hold out by another column")
    out = []
    for k, idx in enumerate(held):
        inside = set(idx.tolist())
        out.append(Fold(k, [b.slide_id for i, b in enumerate(bags) if i not in inside], [bags[i].slide_id for i in idx]))
    return SplitPlan(out, [], f"by {column}", centres={"protocol": protocol, "column": column,
                                                       "held_out": [sorted(set(groups[idx].tolist())) for idx in held]})


def plan_from_user_split(bags: list[Bag], *, seed: int = 0) -> SplitPlan:
    """The manifest's own train / val / test split (validated); a missing ``val`` set is
    carved from ``train`` by patient."""
    bad = sorted({str(b.split) for b in bags if b.split not in SPLITS})
    if bad:
        raise ManifestError(f"split column has value(s) {bad}; use train, val or test for every slide (or remove the column)")
    sets = {s: [b for b in bags if b.split == s] for s in SPLITS}
    check_patients({k: v for k, v in sets.items() if v})
    if not sets["train"]:
        raise ManifestError("the manifest's split column names no 'train' slides")
    if sets["val"]:
        fold = Fold(0, [b.slide_id for b in sets["train"]], [b.slide_id for b in sets["val"]])
    else:
        tr, va = _group_kfold(sets["train"], 5, seed)[0]
        fold = Fold(0, [sets["train"][i].slide_id for i in tr], [sets["train"][i].slide_id for i in va])
    return SplitPlan([fold], [b.slide_id for b in sets["test"]], "manifest")


def prevalence_weights(labels: np.ndarray, true_share: float, minority: int) -> np.ndarray:
    """Per-sample weights that give the minority class its true share again (for metrics
    of an enriched test set at the true prevalence)."""
    is_min = labels == minority
    n_min, n_maj = int(is_min.sum()), int((~is_min).sum())
    if n_min == 0 or n_maj == 0 or not 0 < true_share < 1:
        return np.ones(len(labels))
    w_maj = n_min * (1 - true_share) / (true_share * n_maj)
    return np.where(is_min, 1.0, w_maj)


def check_blank_patients(entries: list[Any], policy: str, unit: str = "slide") -> dict[str, Any] | None:
    """Samples without a patient id become their own patient; say how many, and refuse
    (``policy`` ``refuse``) when the manifest names the patient of its other rows: a blank
    cell there is missing data, and two samples of that patient could land in train and
    test while the report says no patient is in two sets. Returns the note for the report."""
    import logging

    blank = [e.slide_id for e in entries if not (e.patient_id or "").strip()]
    if not blank:
        return None
    n = len(entries)
    partly = len(blank) < n
    if partly and policy != "own":
        raise ManifestError(f"{len(blank)} of {n} {unit}(s) have a blank patient_id ({', '.join(blank[:8])}"
                            f"{' ...' if len(blank) > 8 else ''}) while the others have one: several {unit}s of one "
                            "patient could land in train and test. Fill in their patient_id, or pass --blank-patient "
                            f"own to take each such {unit} as its own patient")
    logging.getLogger(__name__).warning(
        "%d of %d %s(s) have no patient_id: each is taken as its own patient, so %ss of one patient could land in "
        "different sets", len(blank), n, unit, unit)
    return {"n_blank": len(blank), "of": n, "rule": f"each {unit} without a patient_id is its own patient",
            "examples": blank[:8]}
