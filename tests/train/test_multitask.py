"""Several targets in one model (--targets): a binary, a regression and a survival target of the same
real MIL bags (Fox and Elephant, Corel 230-d) with outcomes planted in them, some cells blank. Each
target is checked against what its own library computes on the slides that have it; a blank cell
masks that target for that slide (the loss and every figure), never counts as a value."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tests.train.test_survival_regression import CFG, _manifest, cohort  # noqa: F401 - the module's fixture
from wsi_mil.commands.train_mil import run_train
from wsi_mil.config import TrainConfig
from wsi_mil.errors import ConfigError, ManifestError

TARGETS = "label_high,label_burden:regression,survival"


def _columns(rows: list[dict[str, object]]) -> dict[str, object]:
    med = float(np.median([r["burden"] for r in rows]))
    blank_high = {r["slide_id"] for i, r in enumerate(rows) if i % 4 == 1}  # a quarter unlabelled, another fifth
    blank_burden = {r["slide_id"] for i, r in enumerate(rows) if i % 5 == 2 and i % 4 != 1}  # without a burden
    return {"label_high": lambda r: "" if r["slide_id"] in blank_high else int(r["burden"] > med),
            "label_burden": lambda r: "" if r["slide_id"] in blank_burden else f"{100 * r['burden']:.2f}",
            "label_time": lambda r: f"{r['time']:.4f}", "label_event": lambda r: r["event"]}


def test_three_targets_in_one_model_each_judged_on_its_own_slides(cohort, tmp_path) -> None:  # noqa: F811
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score
    from sksurv.metrics import concordance_index_censored

    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, {**_columns(rows), "age": lambda r: f"{r['age']:.1f}"})
    config = TrainConfig(targets=TARGETS, target_weights="1,1,2", covariates="age", **CFG)
    assert config.task == "multitask" and config.bags_per_batch == 16  # (a survival target among them)
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=config, progress=False)
    task = report.task
    assert [p.kind for p in task.parts] == ["binary", "regression", "survival"] and task.weights == (1.0, 1.0, 2.0)
    assert task.parts[1].scale is not None  # the regression target standardised by the development slides
    run = tmp_path / "run"
    preds = [r for r in csv.DictReader(open(run / "predictions.csv")) if r["fold"] == "ensemble"]
    test = report.metrics["ensemble_test"]
    by_id = {r["slide_id"]: r for r in rows}

    high = [r for r in preds if r["label_high"] != ""]  # the binary target on the slides that have it
    assert test["parts"]["high"]["n"] == len(high) < len(preds)
    assert test["parts"]["high"]["n_not_labelled"] == len(preds) - len(high)
    auc = roc_auc_score([int(r["label_high"]) for r in high], [float(r["prob_high:1"]) for r in high])
    assert test["parts"]["high"]["auc"] == pytest.approx(auc, abs=1e-4) and auc > 0.7
    burden = [r for r in preds if r["label_burden"] != ""]
    assert test["parts"]["burden"]["n"] == len(burden) < len(preds)
    rho = spearmanr([float(r["label_burden"]) for r in burden], [float(r["predicted_label_burden"]) for r in burden])[0]
    assert test["parts"]["burden"]["spearman"] == pytest.approx(rho, abs=1e-4) and rho > 0.4
    e = np.array([by_id[r["slide_id"]]["event"] for r in preds], bool)
    t = np.array([by_id[r["slide_id"]]["time"] for r in preds], float)
    c = concordance_index_censored(e, t, np.array([float(r["log_risk"]) for r in preds]))[0]
    assert test["parts"]["survival"]["c_index"] == pytest.approx(c, abs=1e-4) and c > 0.6
    skills = [2 * (auc - 0.5), test["parts"]["burden"]["r2"], 2 * (c - 0.5)]  # the stated combination
    assert test["skill"] == pytest.approx(np.average(skills, weights=[1, 1, 2]), abs=1e-4)
    assert {r["predicted_survival"] for r in preds} == {"high risk", "low risk"}
    assert all(r["predicted_high"] in ("0", "1") for r in preds)  # a call for every slide, labelled or not

    history = list(csv.DictReader(open(run / "history" / "fold0.csv")))  # per-target monitoring
    assert {"val_score_high", "val_score_burden", "val_score_survival"} <= set(history[0])
    assert len({h["val_score_survival"] for h in history}) > 1
    md = (run / "report.md").read_text()
    for heading in ("### Target high", "### Target burden", "### Target survival", "weighted mean skill"):
        assert heading in md
    for f in ("targets/high/roc.png", "targets/burden/calibration.png", "targets/survival/kaplan_meier.png"):
        assert (run / f).stat().st_size > 5000 and f in report.metrics["figures"]
    ablation = report.metrics["ablation"]  # what the covariate adds, per target too (not only their mean skill)
    assert ablation["target_scores"] == {"high": "high: AUC", "burden": "burden: R²", "survival": "survival: Harrell's C"}
    both = ablation["variants"]["image and covariates (the model)"]["ensemble_test"]
    assert both["targets"]["survival"] == pytest.approx(c, abs=1e-6) and both["score"] == pytest.approx(test["skill"])
    assert set(ablation["variants"]["covariates alone"]["ensemble_test"]["targets"]) == {"high", "burden", "survival"}
    assert "| covariates alone | ensemble of folds, test |" in md
    assert "reliability.png" in report.metrics["figures"] and (run / "reliability.png").is_file()  # (drawn, listed)
    spec = json.loads((run / "models" / "fold0.json").read_text())
    assert len(spec["thresholds"]) == 2  # the binary target's and the survival median (the regression has none)

    from wsi_mil.commands.predict import run_predict  # the fold models' mean, per target, as the run gave it

    ids = [r["slide_id"] for r in preds[:4]]
    run_predict(run, [feats / f"{i}.h5" for i in ids], out_dir=tmp_path / "pred", manifest=m)
    again = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))}
    for r in preds[:4]:
        for col in ("prob_high:1", "predicted_label_burden", "log_risk"):
            assert float(again[r["slide_id"]][col]) == pytest.approx(float(r[col]), abs=1e-4)
        assert again[r["slide_id"]]["predicted_survival"] == r["predicted_survival"]


def test_a_blank_target_is_masked_not_counted() -> None:
    """The multi-task loss is the weighted sum of each target's loss over the slides that have it."""
    from wsi_mil.data.bags import Task
    from wsi_mil.tasks.base import TaskKind
    from wsi_mil.tasks.multitask import Multitask
    from wsi_mil.train.losses import BagLoss

    binary = Task("binary", ("1",), ("label_a",), ("0", "1"), ("0", "1"))
    reg = Task("regression", ("label_b",), ("label_b",), scale=(10.0, 2.0))
    task = Task("multitask", ("a:1", "label_b"), ("label_a", "label_b"), parts=(binary, reg), weights=(1.0, 0.5))
    logits = torch.tensor([[0.3, 0.1], [-1.0, 2.0], [2.0, -0.5]])
    y = torch.tensor([[1.0, float("nan")], [float("nan"), 13.0], [0.0, 9.0]])
    got = BagLoss("multitask", "none", task=task)(logits, y)
    kind = TaskKind()
    want = kind.loss(logits[[0, 2], :1], y[[0, 2], :1], None, "none", 2.0) + \
        0.5 * reg.kind_obj.loss(logits[[1, 2], 1:], y[[1, 2], 1:], None, "none", 2.0, reg)
    assert float(got) == pytest.approx(float(want), abs=1e-6)
    zero_filled = BagLoss("multitask", "none", task=task)(logits, torch.nan_to_num(y, nan=0.0))
    assert abs(float(zero_filled) - float(got)) > 0.1  # (a blank read as 0 would be another loss)
    assert isinstance(task.kind_obj, Multitask)
    assert Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task  # kept with the models as it was


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"targets": "label_high"}, r"needs two targets or more"),
    ({"targets": "label_high,label_high"}, r"named twice"),
    ({"targets": "label_high,label_burden:ordinal"}, r"kind 'ordinal' is not one of"),
    ({"targets": "label_high,label_burden:survival"}, r"a survival target is written 'survival'"),
    ({"targets": "label_time:regression,survival"}, r"label_time is half of the survival outcome"),
    ({"targets": "label_event,survival"}, r"label_event is half of the survival outcome"),
    ({"targets": TARGETS, "task": "binary"}, r"--task binary is one"),
    ({"targets": TARGETS, "label": "label_high"}, r"--label and --classes are for one target"),
    ({"targets": TARGETS, "imbalance": "sampler"}, r"--imbalance sampler act\(s\) on one class"),
    ({"targets": TARGETS, "target_weights": "1,2"}, r"one positive number per target \(3 targets\)"),
    ({"targets": TARGETS, "bags_per_batch": 2}, r"--task survival needs --bags-per-batch 4 or more"),
    ({"task": "multitask"}, r"--task multitask needs --targets"),
    ({"target_weights": "1,2"}, r"give --targets too"),
])
def test_what_cannot_make_a_multitask_run_is_refused_with_the_fix(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_targets_without_survival_keep_one_bag_per_step() -> None:
    assert TrainConfig(targets="label_a,label_b:regression").bags_per_batch == 1


@pytest.mark.parametrize(("change", "message"), [
    ("typo", r"--targets: 'label_hihg' is not a label column of the manifest"),
    ("none", r"2 slide\(s\) have none of the targets \(elephant-0001, elephant-0002\)"),
    ("stray", r"--targets label_burden: column 'label_burden' of a regression task holds values that are not finite"),
])
def test_a_manifest_that_does_not_fit_the_targets_is_refused_before_any_folder(cohort, tmp_path, change,  # noqa: F811
                                                                               message) -> None:
    feats, rows = cohort
    cols = _columns(rows)
    targets = "label_hihg,label_burden:regression" if change == "typo" else "label_high,label_burden:regression"
    if change == "none":  # two slides with every target blank
        bh, bb = cols["label_high"], cols["label_burden"]
        cols["label_high"] = lambda r: "" if r["slide_id"] in ("elephant-0001", "elephant-0002") else bh(r)
        cols["label_burden"] = lambda r: "" if r["slide_id"] in ("elephant-0001", "elephant-0002") else bb(r)
    if change == "stray":
        b = cols["label_burden"]
        cols["label_burden"] = lambda r: "12,5" if r["slide_id"] == "fox-0010" else b(r)
    m = _manifest(tmp_path / "m.csv", rows, {k: v for k, v in cols.items() if not k.startswith("label_t")
                                             and k != "label_event"})
    with pytest.raises(ManifestError, match=message):
        run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(targets=targets, **CFG), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_target_at_chance_fails_its_fold_whatever_the_others_mean() -> None:
    """The survival target below chance in fold 1 (C 0.42) while the binary target carries the mean skill: the
    fold failed, said per target (it read "the folds agree")."""
    from wsi_mil.data.bags import Task
    from wsi_mil.train.runner import _with_parts, fold_health

    binary = Task("binary", ("1",), ("label_a",), ("0", "1"), ("0", "1"))
    surv = Task("survival", ("risk",), ("label_time", "label_event"))
    task = Task("multitask", ("a:1", "risk"), ("label_a", "label_time", "label_event"), parts=(binary, surv),
                weights=(1.0, 1.0))

    def fold(k: int, c_test: float) -> dict[str, object]:
        sets = {s: {"parts": {"a": {"auc": 0.9}, "survival": {"c_index": c}}, "skill": 0.8 + (c - 0.5)}
                for s, c in (("val", 0.6), ("test", c_test))}
        return {"fold": k, **sets}

    folds = [fold(0, 0.62), fold(1, 0.42)]
    alone = fold_health(folds, "skill", "weighted mean skill over chance", 0.0)
    assert alone["failed"] == []  # (what the run said before)
    health = _with_parts(alone, task.kind_obj.part_views(task, {"folds": folds}))
    assert health["failed"] == [{"fold": 1, "why": "test survival Harrell's C 0.420"}] and health["disagree"]
