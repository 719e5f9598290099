"""train-mil --bag patient on real MIL bags (Elephant, Corel): patients of two slides each, a
positive patient holding one positive and one negative bag (the evidence on one slide only), a
negative patient two negative bags. One prediction per patient, attention written back per slide
(over the patient's bag: a patient's slides share one distribution), the seeded sample of an
oversized bag recorded and reproduced, disagreeing slide labels of one patient refused by name."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.cli import main
from wsi_mil.commands.train_mil import run_train
from wsi_mil.config import TrainConfig
from wsi_mil.errors import ManifestError

CFG = {"folds": 3, "test_fraction": 0.0, "epochs": 3, "lr": 1e-3, "bootstrap": 20, "duplicates": "allow"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple:
    from wsi_mil.data.mil_import import import_classic

    root = tmp_path_factory.mktemp("patients")
    rows = list(csv.DictReader(open(import_classic("elephant", shared("mil"), root / "el"))))
    pos = [r for r in rows if r["label"] == "1"][:30]
    neg = [r for r in rows if r["label"] == "0"]
    out = []
    for i, p in enumerate(pos):
        out += [{**p, "patient_id": f"P{i:02d}", "label": 1, "site": "A"},
                {**neg[i], "patient_id": f"P{i:02d}", "label": 1, "site": "A" if i % 3 else "B"}]
    for j in range(15):
        out += [{**r, "patient_id": f"N{j:02d}", "label": 0, "site": "A"} for r in (neg[30 + 2 * j], neg[31 + 2 * j])]
    return root / "el" / "features", out


def _write(path, rows) -> object:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "path", "patient_id", "label", "site"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("slide_id", "path", "patient_id", "label", "site")} for r in rows)
    return path


def test_one_bag_per_patient_with_attention_per_slide(cohort, tmp_path) -> None:
    feats, rows = cohort
    m = _write(tmp_path / "m.csv", rows)
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(bag="patient", **CFG), progress=False)
    preds = [p for p in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if p["split"] == "val"]
    patients = sorted({r["patient_id"] for r in rows})
    assert sorted(p["patient_id"] for p in preds) == patients  # one out-of-fold prediction per patient
    assert report.metrics["pooled_validation"]["n"] == 45
    fold_of = {p["patient_id"]: p["fold"] for p in preds}
    for pid in ("P03", "N04"):
        slides = [r for r in rows if r["patient_id"] == pid]
        total = 0.0
        for r in slides:
            with h5py.File(tmp_path / "run" / "attention" / f"fold{fold_of[pid]}" / f"{r['slide_id']}.h5", "r") as f:
                with h5py.File(r["path"], "r") as s:
                    np.testing.assert_array_equal(f["coords"][:], s["coords"][:])  # the slide's own patches
                assert f.attrs["patient_bag"] == pid and f.attrs["slide_id"] == r["slide_id"]
                total += float(f["attention"][:].sum())
        assert total == pytest.approx(1.0, abs=1e-4)  # one attention distribution over the patient's slides
    # predict joins each patient's slides as training did: one row per patient, attention per slide
    assert main(["predict", str(tmp_path / "run"), str(feats), "--out", str(tmp_path / "nom"), "--no-progress",
                 "-q"]) == 2  # which slides are one patient's: the manifest says
    code = main(["predict", str(tmp_path / "run"), *[r["path"] for r in rows], "--manifest", str(m), "--out",
                 str(tmp_path / "pred"), "--no-progress", "-q"])
    assert code == 0
    got = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert sorted(g["patient_id"] for g in got) == patients
    p03 = next(g for g in got if g["patient_id"] == "P03")
    assert sorted(p03["slides"].split(";")) == sorted(r["slide_id"] for r in rows if r["patient_id"] == "P03")
    assert len(list((tmp_path / "pred" / "attention").glob("*.h5"))) == 90
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["patient_bags"]["slides"] == 90 and metrics["patient_bags"]["patients"] == 45
    assert "45 patient bags (`--bag patient`: 90 slides" in (tmp_path / "run" / "report.md").read_text()


def test_an_oversized_patient_bag_keeps_a_recorded_seeded_sample(cohort, tmp_path) -> None:
    from wsi_mil.data.bags import Task, bags_from_manifest
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.data.patient_bags import patient_bags, patient_columns

    feats, rows = cohort
    entries = read_manifest(_write(tmp_path / "m.csv", rows), require_path=False)
    task = Task("binary", ("1",), ("label",), ("0", "1"))
    slides, _ = bags_from_manifest(entries, [feats], task, cache=True)
    a = patient_bags(slides, task, max_instances=12, seed=7)
    b = patient_bags(slides, task, max_instances=12, seed=7)
    by_slide = {s.slide_id: s for s in slides}
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.features, pb.features)  # the same seed, the same sample
        n = sum(len(by_slide[s["slide_id"]].features) for s in pa.meta["slides"])
        assert len(pa.features) == min(12, n)
        if n > 12:
            assert pa.meta["sampled"] == {"kept": 12, "of": n, "seed": 7}
        for s in pa.meta["slides"]:  # each slide's kept rows are rows of that slide, in its order
            own = by_slide[s["slide_id"]]
            got = pa.features[s["start"]:s["end"]]
            idx = [int(np.flatnonzero((own.features == row).all(axis=1))[0]) for row in got]
            assert idx == sorted(idx) and len(idx) == s.get("kept", len(own.features))
    cols = patient_columns(a, {r["slide_id"]: {"site": r["site"]} for r in rows})
    assert cols["P00"]["site"] == "mixed" and cols["P01"]["site"] == "A"  # two sites: never silently one


def test_disagreeing_labels_of_one_patient_are_refused_by_name(cohort, tmp_path, capsys) -> None:
    feats, rows = cohort
    bad = [dict(r) for r in rows]
    bad[1]["label"] = 0  # P00's negative-looking slide labelled negative: the patient has two labels
    m = _write(tmp_path / "bad.csv", bad)
    with pytest.raises(ManifestError, match=r"patient P00: elephant-\d+ = '1', elephant-\d+ = '0'"):
        run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(bag="patient", **CFG), progress=False)
    assert not (tmp_path / "run").exists()
    code = main(["train-mil", str(m), "--features", str(feats), "--out", str(tmp_path / "cli"), "--bag", "patient",
                 "--test-fraction", "0", "--no-progress", "-q"])
    assert code == 2 and "carry different labels" in capsys.readouterr().err


def test_fixes_from_a_strangers_trial_of_patient_bags(cohort, tmp_path, capsys) -> None:
    """A patient with slides in two sites cannot be held out by --folds-by (was a pseudo-site 'mixed' whose
    slides leaked into the other folds); a slide none of whose patches is in its patient's sample gets no
    attention store instead of a crash; predict says which of a patient's slides were not in its bag."""
    feats, rows = cohort
    two = [dict(r, site="AB"[int(r["patient_id"][1:]) % 2]) for r in rows]  # each patient at one site ...
    two[1]["site"] = "C"  # ... but P00: one slide at A, one at C
    m = _write(tmp_path / "two.csv", two)
    with pytest.raises(ManifestError, match=r"1 patient\(s\) have slides in several sites \(P00: elephant-\d+ in A, "
                                            r"elephant-\d+ in C\)"):
        run_train(m, [feats], out_dir=tmp_path / "site", progress=False,
                  config=TrainConfig(bag="patient", folds_by="site", random_comparison=False, **CFG))
    # a sample so small that one slide of a patient keeps nothing
    m = _write(tmp_path / "m.csv", rows)
    run_train(m, [feats], out_dir=tmp_path / "tiny", progress=False,
              config=TrainConfig(bag="patient", patient_max_instances=2, **{**CFG, "epochs": 1}))
    metrics = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert metrics["pooled_validation"]["n"] == 45
    written = {p.stem for p in (tmp_path / "tiny" / "attention").glob("fold*/*.h5")}
    assert 45 <= len(written) < 90  # every patient's kept slides, none of the emptied ones
    # predict from some of a patient's slides: said in its row
    stores = [r["path"] for r in rows if r["slide_id"] != rows[0]["slide_id"]]
    assert main(["predict", str(tmp_path / "tiny"), *stores, "--manifest", str(m), "--out", str(tmp_path / "pred"),
                 "--no-progress", "-q"]) == 0
    got = {g["patient_id"]: g for g in csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))}
    assert got["P00"]["slides_missing"] == rows[0]["slide_id"] and got["P01"]["slides_missing"] == ""
