"""Multi-class and multi-label training on real MIL bags (Fox and Elephant, 230-d each)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared
from wsi_mil.commands.train_mil import run_train
from wsi_mil.config import TrainConfig
from wsi_mil.data.mil_import import import_classic

# the Fox and Elephant sets share some Corel background bags (exact copies under two ids, found by the
# audit): one cohort of both must keep each copy with its original, so they are merged into one patient
CFG = {"folds": 2, "test_fraction": 0.25, "epochs": 6, "bags_per_batch": 8, "lr": 1e-3, "bootstrap": 50,
       "duplicates": "merge"}


@pytest.fixture(scope="module")
def animals(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("animals")
    rows = []
    for name in ("fox", "elephant"):
        m = import_classic(name, shared("mil"), root / name, feature_space="corel-230")
        for r in list(csv.DictReader(open(m)))[::2]:  # every other bag keeps the test quick
            rows.append({**r, "source": name})
    feats = root / "features"
    feats.mkdir()
    for name in ("fox", "elephant"):
        for p in (root / name / "features").iterdir():
            p.rename(feats / p.name)
    return feats, rows


def _manifest(path: Path, rows: list[dict[str, str]], label_cols: dict[str, callable]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "path", "patient_id", *label_cols])
        w.writeheader()
        for r in rows:
            w.writerow({"slide_id": r["slide_id"], "path": r["path"], "patient_id": r["patient_id"],
                        **{c: f(r) for c, f in label_cols.items()}})
    return path


def test_multiclass_softmax_over_three_classes(animals, tmp_path) -> None:
    feats, rows = animals
    m = _manifest(tmp_path / "mc.csv", rows, {"label": lambda r: f"{r['source']}-{r['label']}" if r["label"] == "1" else "background",
                                              "image_set": lambda r: r["source"]})
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(**CFG), progress=False)
    assert report.task.kind == "multiclass" and report.task.outputs == ("background", "elephant-1", "fox-1")
    ens = report.metrics["ensemble_test"]
    assert np.asarray(ens["confusion"]).shape == (3, 3) and np.asarray(ens["confusion"]).sum() == ens["n"]
    assert set(ens["per_class"]) == {"background", "elephant-1", "fox-1"}
    preds = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))
    probs = np.asarray([[float(r[f"prob_{c}"]) for c in report.task.outputs] for r in preds])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    # the shortcut checks of a multi-class task: the image set a bag comes from tells fox-1 from the rest (the
    # fox images hold every fox-1 bag), over all three classes by chi-square
    shortcuts = report.metrics["audit"]["shortcuts"]
    before = next(r for r in shortcuts["before"] if r["nuisance"] == "image_set")
    assert before["warn"] and before["test"] == "chi-square" and before["class"] in ("fox-1", "elephant-1")
    assert set(before["table"]["fox"]) == {"background", "elephant-1", "fox-1"} and before["table"]["fox"]["elephant-1"] == 0
    assert "the label is associated with 'image_set' (it alone separates class" in (tmp_path / "run" / "report.md").read_text()
    after = {r["label"] for r in shortcuts["after"] if r["nuisance"] == "image_set"}
    assert after == {"background", "elephant-1", "fox-1"}  # each class's probability against the nuisance


def test_multilabel_independent_sigmoids(animals, tmp_path) -> None:
    feats, rows = animals
    m = _manifest(tmp_path / "ml.csv", rows, {
        "label_elephant": lambda r: int(r["source"] == "elephant" and r["label"] == "1"),
        "label_fox": lambda r: int(r["source"] == "fox" and r["label"] == "1"), "image_set": lambda r: r["source"]})
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(**CFG), progress=False)
    assert report.task.kind == "multilabel" and report.task.outputs == ("elephant", "fox")
    ens = report.metrics["ensemble_test"]
    assert set(ens["per_label"]) == {"elephant", "fox"}
    for label in ("elephant", "fox"):
        assert {"auc", "sensitivity", "specificity", "threshold"} <= set(ens["per_label"][label])
    dup = report.metrics["audit"]["duplicates"]
    exact = [p for p in dup["pairs"] if p["kind"] == "exact"]
    assert exact and all({p["a"].split("-")[0], p["b"].split("-")[0]} == {"fox", "elephant"} for p in exact)
    assert dup["leaks"] == [] and len(dup["merged"]) >= len(exact)
    # a fox image is "background" in the elephant set: the same bag under two labels of this task
    assert dup["n_labels_differ"] >= 1 and "carry different labels" in (tmp_path / "run" / "report.md").read_text()
    saved = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert len(saved["thresholds"]) == 2 and saved["task"]["kind"] == "multilabel"
    # the shortcut checks of a multi-label task: each label against every nuisance
    shortcuts = report.metrics["audit"]["shortcuts"]
    by_label = {r["label"]: r for r in shortcuts["before"] if r["nuisance"] == "image_set"}
    assert set(by_label) == {"elephant", "fox"} and by_label["fox"]["warn"] and by_label["fox"]["test"] == "Fisher's exact"
    assert "label 'fox' is associated with 'image_set'" in (tmp_path / "run" / "report.md").read_text()
    assert {r["label"] for r in shortcuts["after"]} == {"elephant", "fox"}
