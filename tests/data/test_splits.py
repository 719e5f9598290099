"""Patient-level splits, user-split leak detection (on the real NIH1000 leak) and test enrichment."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.data.bags import Bag
from wsi_mil.data.splits import make_plan, plan_from_user_split
from wsi_mil.errors import ManifestError


def _bags(n_patients: int = 40, positive_every: int = 4, seed: int = 0) -> list[Bag]:
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        label = float(p % positive_every == 0)
        for s in range(int(rng.integers(1, 4))):  # 1-3 slides per patient
            bags.append(Bag(f"p{p:02d}-s{s}", f"p{p:02d}", np.asarray([label], np.float32), None))
    return bags


def test_generated_plan_never_splits_a_patient_and_stratifies() -> None:
    bags = _bags()
    patient = {b.slide_id: b.patient_id for b in bags}
    label = {b.slide_id: b.label_index for b in bags}
    plan = make_plan(bags, folds=4, test_fraction=0.25, seed=1)
    test_patients = {patient[s] for s in plan.test}
    assert plan.test and 0 < sum(label[s] for s in plan.test) < len(plan.test)
    vals = []
    for f in plan.folds:
        tr, va = {patient[s] for s in f.train}, {patient[s] for s in f.val}
        assert not tr & va and not (tr | va) & test_patients
        assert set(f.train) | set(f.val) | set(plan.test) == set(patient)
        assert 0 < sum(label[s] for s in f.val) < len(f.val)
        vals += f.val
    assert sorted(vals) == sorted(set(patient) - set(plan.test))  # each development slide validated once
    again = make_plan(bags, folds=4, test_fraction=0.25, seed=1)
    assert again.to_dict() == plan.to_dict()


def test_min_minority_share_enriches_the_test_set_with_whole_patients() -> None:
    bags = _bags(60, positive_every=5)
    plan = make_plan(bags, folds=3, test_fraction=0.3, seed=0, min_minority_share=0.5)
    label = {b.slide_id: b.label_index for b in bags}
    share = np.mean([label[s] for s in plan.test])
    assert share >= 0.5 and plan.test_sampling["true_share"] < 0.35
    patient = {b.slide_id: b.patient_id for b in bags}
    dev = {patient[s] for f in plan.folds for s in f.train + f.val}
    assert not dev & {patient[s] for s in plan.test}


def test_user_split_with_a_patient_in_two_sets_is_refused_naming_them() -> None:
    """NIH1000's given folders put 8 patients in both train and test."""
    rows = list(csv.DictReader(open(shared("cxr", "nih1000", "labels.csv"))))
    key = "split" if "split" in rows[0] else next(k for k in rows[0] if "split" in k.lower())
    pid = "patient_id" if "patient_id" in rows[0] else next(k for k in rows[0] if "patient" in k.lower())
    name = {"valid": "val", "validation": "val"}
    bags = [Bag(f"img{i}", r[pid], np.asarray([0.0], np.float32), None, split=name.get(r[key].lower(), r[key].lower()))
            for i, r in enumerate(rows)]
    by_set: dict[str, set[str]] = {}
    for b in bags:
        by_set.setdefault(b.split, set()).add(b.patient_id)
    leaked = sorted({p for s, ps in by_set.items() for t, qs in by_set.items() if s < t for p in ps & qs})
    assert leaked
    with pytest.raises(ManifestError) as err:
        plan_from_user_split(bags)
    msg = str(err.value)
    assert f"{len(leaked)} patient(s)" in msg and all(p in msg for p in leaked[:10])
    clean = [b for b in bags if b.patient_id not in leaked]
    plan = plan_from_user_split(clean)
    assert plan.source == "manifest" and plan.test and plan.folds[0].val
