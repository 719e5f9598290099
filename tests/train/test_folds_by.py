"""Site-held-out cross-validation (train-mil --folds-by COLUMN) on real MIL bags (the Fox and Elephant
Corel sets) with a planted binary label and centres assigned to them: no centre is ever split across
a fold's training and validation slides, each held-out centre's AUC is scikit-learn's on its own
out-of-fold predictions, the report names the protocol, and what cannot be judged is refused."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.train.test_survival_regression import _manifest, outcome_cohort
from wsi_mil.commands.train_mil import run_train
from wsi_mil.config import TrainConfig
from wsi_mil.errors import ConfigError, ManifestError

# (near-duplicate bags of the Corel sets are allowed: merged into one patient they would span two made-up sites)
CFG = {"folds": 5, "test_fraction": 0.0, "epochs": 8, "lr": 1e-3, "bootstrap": 100, "duplicates": "allow"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple:
    return outcome_cohort(tmp_path_factory.mktemp("sites"))


def _site(r: dict) -> str:
    return "site-" + "ABCD"[int(str(r["slide_id"]).rsplit("-", 1)[-1]) % 4]


def _columns(rows: list[dict]) -> dict:
    cut = float(np.median([r["burden"] for r in rows]))
    return {"label": lambda r: int(r["burden"] > cut), "site": _site}


def test_leave_one_site_out_never_splits_a_site_and_judges_each_on_its_own(cohort, tmp_path) -> None:
    from sklearn.metrics import roc_auc_score

    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, _columns(rows))
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(folds_by="site", **CFG),
                       progress=False)
    site = {r["slide_id"]: _site(r) for r in rows}
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert splits["centres"]["protocol"] == "leave-one-site-out (4 sites)" and splits["test"] == []
    for fold in splits["folds"]:  # each fold holds out one whole site
        held = {site[s] for s in fold["val"]}
        assert len(held) == 1 and not held & {site[s] for s in fold["train"]}
    by = report.metrics["by_centre"]
    preds = [p for p in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if p["split"] == "val"]
    for name, figures in by["centres"].items():
        mine = [p for p in preds if site[p["slide_id"]] == name]
        y = [int(p["label"]) for p in mine]
        score = [float(p[next(k for k in p if k.startswith("prob_"))]) for p in mine]
        assert figures["n"] == len(mine) and figures["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-6)
        assert figures["auc_ci95"][0] <= figures["auc"] <= figures["auc_ci95"][1]
    aucs = [v["auc"] for v in by["centres"].values()]
    assert by["spread"]["min"] == pytest.approx(min(aucs)) and by["spread"]["max"] == pytest.approx(max(aucs))
    assert report.metrics["headline"]["set"] == "pooled_validation"
    assert report.metrics["headline"]["why"].startswith("leave-one-site-out (4 sites): every site is held out once")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Held-out sites" in md and "| site-A |" in md and "Spread across sites" in md
    assert "Splits: leave-one-site-out (4 sites) made by wsi-mil" in md  # (said "stratified patient-level splits")
    assert "chosen on its held-out site itself: the figures lean optimistic" in md  # (--select best)
    # the random-fold figure of the same cohort beside it (trained in random_folds/, judged the same way)
    rand = report.metrics["random_folds"]
    sub = json.loads((tmp_path / "run" / "random_folds" / "splits.json").read_text())
    assert "centres" not in sub and len(sub["folds"]) == 5
    rp = [p for p in csv.DictReader(open(tmp_path / "run" / "random_folds" / "predictions.csv")) if p["split"] == "val"]
    assert rand["auc"] == pytest.approx(roc_auc_score([int(p["label"]) for p in rp],
                                                      [float(p[next(k for k in p if k.startswith("prob_"))]) for p in rp]))
    assert f"| random patient-level 5-fold (random_folds/) | {rand['auc']:.3f}" in md
    assert f"Optimism of random folds: {rand['auc'] - report.metrics['pooled_validation']['auc']:+.3f}" in md
    from wsi_mil.eval.shortcuts import warnings_of
    from wsi_mil.train.runner import summary_text

    assert (f"  protocol: leave-one-site-out (4 sites); random folds of the same cohort: AUC {rand['auc']:.3f}"
            in summary_text(report))  # (the terminal summary did not say which protocol made the figure)
    row = {"nuisance": "site", "auc": 0.9, "test": "chi-square", "p": 0.001, "warn": True, "kind": "categorical",
           "table": {"A": {"positive": 9, "negative": 1}, "B": {"positive": 1, "negative": 9}}}
    assert "hold it out (e.g. --folds-by site)" in warnings_of({"before": [row]})[0]
    assert "This run holds each site out (--folds-by site)" in warnings_of({"before": [row], "held_out": "site"})[0]


def test_many_sites_are_grouped_into_k_folds(cohort, tmp_path) -> None:
    feats, rows = cohort
    many = {r["slide_id"]: f"c{i % 12:02d}" for i, r in enumerate(rows)}
    m = _manifest(tmp_path / "m.csv", rows, {**_columns(rows), "centre": lambda r: many[r["slide_id"]]})
    config = TrainConfig(folds_by="centre", random_comparison=False, **{**CFG, "folds": 3, "epochs": 2})
    run_train(m, [feats], out_dir=tmp_path / "run", config=config, progress=False)
    assert not (tmp_path / "run" / "random_folds").exists()
    assert "(--no-random-comparison)" in (tmp_path / "run" / "report.md").read_text()
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert splits["centres"]["protocol"] == "centre-grouped 3-fold (12 centres, stratified on the label)"
    assert sorted(c for held in splits["centres"]["held_out"] for c in held) == sorted(set(many.values()))
    for fold in splits["folds"]:
        assert not {many[s] for s in fold["val"]} & {many[s] for s in fold["train"]}


def test_what_cannot_be_judged_by_site_is_refused(cohort, tmp_path) -> None:
    feats, rows = cohort
    columns = _columns(rows)
    with pytest.raises(ConfigError, match="add --test-fraction 0"):
        TrainConfig(folds_by="site")
    with pytest.raises(ConfigError, match="--folds is the most groups, 2 or more"):
        TrainConfig(folds_by="site", **{**CFG, "folds": 1})  # (was a raw scikit-learn error, or ignored)
    one_class = {**columns, "site": lambda r: "site-X" if columns["label"](r) == 1 and _site(r) == "site-A"
                 else _site(r)}  # (site-X: positives only)
    cases = [
        (one_class, r"a held-out set cannot be judged: .*site-X: every slide of one kind \(1\) \(at least 5 slides"),
        ({**columns, "site": lambda r: "" if r["slide_id"].endswith("7") else _site(r)},
         r"slide\(s\) have no site value"),
        ({**columns, "site": lambda r: "NA" if r["slide_id"].endswith("3") else _site(r)},
         r"slide\(s\) have no site value \(.*='NA'"),  # (NA is no centre: was a centre of its own)
        ({**columns, "site": lambda r: "site-A"}, r"every slide is in 'site-A'"),
        (columns, None),
    ]
    for cols, message in cases:
        if message is None:  # a patient with slides in two sites
            rows2 = [dict(r, patient_id="shared") if i < 2 else r for i, r in enumerate(rows)]
            m = _manifest(tmp_path / "m.csv", rows2, {**cols, "site": lambda r: "site-A" if r["slide_id"] ==
                                                       rows[0]["slide_id"] else "site-B" if r["slide_id"] ==
                                                       rows[1]["slide_id"] else _site(r)})
            message = r"1 patient\(s\) have slides in several centres \(shared in site-A/site-B\)"
        else:
            m = _manifest(tmp_path / "m.csv", rows, cols)
        with pytest.raises((ConfigError, ManifestError), match=message):
            run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(folds_by="site", **CFG), progress=False)
        assert not (tmp_path / "run").exists()
    m = _manifest(tmp_path / "m.csv", rows, {"label": columns["label"]})
    with pytest.raises(ConfigError, match="the manifest has no 'site' column"):
        run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(folds_by="site", **CFG), progress=False)
