"""Survival and regression through train-mil and predict, on real MIL bags (the Fox and Elephant
Corel sets, 230-d instances) with outcomes planted in them: a bag's "lesion burden" is the share
of its instances beyond a fixed direction of the real feature space; the regression target is that
burden, the survival time is drawn with a hazard rising with it and with a covariate, censored
(wsi_mil/synth/outcomes.py). The Cox loss and the figures are checked against scikit-survival and
scipy."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import shared
from wsi_mil.commands.train_mil import run_train
from wsi_mil.config import TrainConfig
from wsi_mil.errors import ConfigError, ManifestError
from wsi_mil.synth.outcomes import plant_outcomes

CFG = {"folds": 2, "test_fraction": 0.25, "epochs": 12, "lr": 1e-3, "bootstrap": 100, "duplicates": "merge"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[dict[str, object]]]:
    return outcome_cohort(tmp_path_factory.mktemp("outcomes"))


def outcome_cohort(root: Path) -> tuple[Path, list[dict[str, object]]]:
    """The Fox and Elephant bags as feature stores in ``root``, each with a planted burden, outcome and age."""
    import h5py

    from wsi_mil.data.mil_import import import_classic

    feats = root / "features"
    feats.mkdir()
    for name in ("fox", "elephant"):
        import_classic(name, shared("mil"), root / name, feature_space="corel-230")
        for p in (root / name / "features").iterdir():
            p.rename(feats / p.name)
    stores = sorted(feats.glob("*.h5"))
    xs = [h5py.File(s, "r")["features"][:] for s in stores]
    w = np.random.default_rng(0).normal(size=xs[0].shape[1])
    cut = np.quantile(np.concatenate(xs) @ w, 0.7)
    burden = np.asarray([float(np.mean(x @ w > cut)) for x in xs])
    age = np.random.default_rng(1).normal(62, 9, len(xs))
    out = plant_outcomes(burden, age, burden_effect=1.2, covariate_effect=0.4, censoring=0.4, seed=2)
    rows = [{"slide_id": s.stem, "path": str(s), "patient_id": s.stem, "burden": b, "time": t, "event": e, "age": a}
            for s, b, t, e, a in zip(stores, burden, out.time, out.event, age, strict=True)]
    return feats, rows


def _manifest(path: Path, rows: list[dict[str, object]], columns: dict[str, object]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "path", "patient_id", *columns])
        w.writeheader()
        for r in rows:
            w.writerow({"slide_id": r["slide_id"], "path": r["path"], "patient_id": r["patient_id"],
                        **{c: f(r) for c, f in columns.items()}})  # type: ignore[operator]
    return path


def test_planted_outcomes_are_censored_as_asked_and_follow_the_burden() -> None:
    from sksurv.metrics import concordance_index_censored

    burden = np.random.default_rng(0).uniform(0, 1, 2000)
    out = plant_outcomes(burden, censoring=0.4, seed=1)
    assert abs(1 - out.event.mean() - 0.4) < 0.03 and (out.time > 0).all()
    c = concordance_index_censored(out.event.astype(bool), out.time, burden)[0]
    assert c > 0.6  # the burden predicts the time; a planted outcome with no link would sit at 0.5


def test_cox_loss_is_the_partial_likelihood_scikit_survival_maximises() -> None:
    """A linear Cox model fitted by minimising cox_loss (Breslow ties) lands on scikit-survival's coefficients."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    from wsi_mil.tasks.survival import cox_loss

    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 3))
    out = plant_outcomes(x @ np.array([1.0, -0.5, 0.0]), censoring=0.3, seed=4)
    time = np.round(out.time, 1)  # tied times, as follow-up in months has
    ref = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x, Surv.from_arrays(out.event.astype(bool), time))
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    xt, tt, et = torch.from_numpy(x), torch.from_numpy(time), torch.from_numpy(out.event.astype(float))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = cox_loss(xt @ beta, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), ref.coef_, atol=1e-4)
    assert float(cox_loss(xt[:5] @ beta.detach(), tt[:5], torch.zeros(5, dtype=torch.float64))) == 0.0  # no event: 0


def test_regression_figures_are_scipys_and_sklearns() -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    from wsi_mil.eval.regression import regression_metrics

    rng = np.random.default_rng(5)
    y = rng.normal(size=60)
    p = y + rng.normal(scale=0.5, size=60)
    m = regression_metrics(y, p, n_boot=200, seed=0)
    assert m["r2"] == pytest.approx(r2_score(y, p)) and m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["pearson"] == pytest.approx(pearsonr(y, p)[0]) and m["spearman"] == pytest.approx(spearmanr(y, p)[0])
    assert m["r2_ci"][0] < m["r2"] < m["r2_ci"][1] and m["spearman_ci"][0] < m["spearman"] < m["spearman_ci"][1]


def test_regression_end_to_end_in_the_targets_units(cohort, tmp_path) -> None:
    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, {"label": lambda r: f"{100 * r['burden']:.2f}"})  # percent: far from 0 / 1
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(task="regression", **CFG), progress=False)
    assert report.task.kind == "regression" and report.task.scale is not None
    test = report.metrics["ensemble_test"]
    assert test["n"] == len(json.loads((tmp_path / "run" / "splits.json").read_text())["test"])
    assert test["r2"] > 0.4 and test["spearman"] > 0.6, test  # the burden is learnt, in its units
    preds = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if r["fold"] == "ensemble"]
    y = np.array([float(r["label"]) for r in preds])
    p = np.array([float(r["predicted_label"]) for r in preds])
    assert abs(np.mean(p) - np.mean(y)) < 0.5 * np.std(y)  # percent, not standardised units
    assert test["mae"] == pytest.approx(float(np.mean(np.abs(y - p))), abs=1e-4)
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "| set | n | MAE | RMSE | R² (95% CI)" in report_md and "Decision threshold: none" in report_md
    files = report_md.split("Files: ")[1]  # (it listed roc.png, confusion.png ... that a regression never writes)
    assert "calibration.png" in files and "roc.png" not in files
    assert report.metrics["audit"]["shortcuts"]["note"].startswith("the shortcut checks compare nuisances between classes")
    assert (tmp_path / "run" / "calibration.png").stat().st_size > 5000
    # predict: the fold models' mean prediction, in percent, as the run's ensemble gave it
    from wsi_mil.commands.predict import run_predict

    ids = [r["slide_id"] for r in preds[:5]]
    run_predict(tmp_path / "run", [feats / f"{i}.h5" for i in ids], out_dir=tmp_path / "pred")
    again = {r["slide_id"]: float(r["predicted_label"]) for r in csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))}
    for r in preds[:5]:
        assert again[r["slide_id"]] == pytest.approx(float(r["predicted_label"]), abs=1e-4)
    from wsi_mil.io.attention import read_contribution

    mean, _ = report.task.scale  # the shares (in percent) add up to the prediction less the development mean
    for r in preds[:5]:
        for store in (tmp_path / "run" / "attention" / "ensemble" / f"{r['slide_id']}.h5",
                      tmp_path / "pred" / "attention" / f"{r['slide_id']}.h5"):
            assert float(read_contribution(store).sum()) + mean == pytest.approx(float(r["predicted_label"]), abs=1e-3)


def test_regression_loss_and_standardisation_are_the_runs_and_kept_with_the_models(cohort, tmp_path) -> None:
    """--regression-loss mse --no-standardise-target: the squared error on the raw target, recorded in each
    fold's model (predict reads it back: the same predictions), said in the report."""
    from wsi_mil.data.bags import Task
    from wsi_mil.tasks.regression import Regression

    kind, y = Regression(), torch.tensor([[10.0], [14.0], [float("nan")]])
    logits = torch.tensor([[0.5], [-3.0], [7.0]])
    huber = Task("regression", ("label",), ("label",), scale=(12.0, 2.0))
    assert float(kind.loss(logits, y, None, "weighted", 0.0, huber)) == pytest.approx((1.0 + 3.5) / 2)  # z = -1, 1: |d| 1.5, 4
    mse = dataclasses.replace(huber, loss="mse")
    assert float(kind.loss(logits, y, None, "weighted", 0.0, mse)) == pytest.approx((1.5 ** 2 + 4.0 ** 2) / 2)
    raw = kind.fitted(dataclasses.replace(mse, standardise=False, scale=None), np.array([[10.0], [14.0]]))
    assert raw.scale == (0.0, 1.0) and Task.from_dict(raw.to_dict()) == raw
    assert float(kind.loss(logits, y, None, "weighted", 0.0, raw)) == pytest.approx((9.5 ** 2 + 17.0 ** 2) / 2)

    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, {"label": lambda r: f"{r['burden']:.4f}"})
    config = TrainConfig(task="regression", regression_loss="mse", standardise_target=False, **CFG)
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=config, progress=False)
    assert (report.task.loss, report.task.standardise, report.task.scale) == ("mse", False, (0.0, 1.0))
    spec = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert spec["task"]["loss"] == "mse" and spec["task"]["standardise"] is False and spec["task"]["scale"] == [0, 1]
    assert report.metrics["ensemble_test"]["spearman"] > 0.5  # (learnt on the raw fraction too)
    assert "trained on its raw values (--no-standardise-target), with the squared error" in \
        (tmp_path / "run" / "report.md").read_text()
    from wsi_mil.commands.predict import run_predict

    preds = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if r["fold"] == "ensemble"][:3]
    run_predict(tmp_path / "run", [feats / f"{r['slide_id']}.h5" for r in preds], out_dir=tmp_path / "pred")
    again = {r["slide_id"]: float(r["predicted_label"]) for r in csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))}
    assert [again[r["slide_id"]] for r in preds] == pytest.approx([float(r["predicted_label"]) for r in preds], abs=1e-5)
    with pytest.raises(ConfigError, match="--regression-loss mse is a regression target's setting; this run has none"):
        TrainConfig(task="survival", regression_loss="mse")
    with pytest.raises(ConfigError, match="--no-standardise-target is a regression target's setting"):
        TrainConfig(standardise_target=False)  # (a classifier: it would be ignored)
    assert TrainConfig(targets="label_a,label_b:regression", regression_loss="mse").regression_loss == "mse"


def test_survival_end_to_end_with_concordance_groups_and_curves(cohort, tmp_path) -> None:
    from sksurv.metrics import concordance_index_censored

    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, {"label_time": lambda r: f"{r['time']:.4f}",
                                             "label_event": lambda r: r["event"], "age": lambda r: f"{r['age']:.1f}"})
    config = TrainConfig(task="survival", **CFG)
    assert config.bags_per_batch == 16  # the Cox likelihood needs several bags a step
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=config, progress=False)
    test = report.metrics["ensemble_test"]
    preds = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if r["fold"] == "ensemble"]
    by_id = {r["slide_id"]: r for r in rows}
    t = np.array([by_id[r["slide_id"]]["time"] for r in preds], float)
    e = np.array([by_id[r["slide_id"]]["event"] for r in preds], bool)
    risk = np.array([float(r["log_risk"]) for r in preds])
    assert test["c_index"] == pytest.approx(concordance_index_censored(e, t, risk)[0], abs=1e-4)
    assert test["c_index"] > 0.62 and test["c_index_ci"][0] < test["c_index"] < test["c_index_ci"][1], test
    assert test["n_events"] == int(e.sum()) and 0.4 < test["td_auc_mean"] <= 1.0
    assert test["logrank_p"] < 0.05 and {r["prediction"] for r in preds} == {"high risk", "low risk"}
    for r in preds:  # the truth in its own columns (was one text: "time 2.82, censored")
        assert float(r["label_time"]) == pytest.approx(by_id[r["slide_id"]]["time"], abs=1e-4)  # (as the manifest)
        assert int(r["label_event"]) == by_id[r["slide_id"]]["event"] and "label" not in r
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    share = [np.mean([by_id[s]["event"] for s in ids]) for ids in (splits["test"], splits["folds"][0]["val"])]
    assert abs(share[0] - share[1]) < 0.1  # stratified on the event
    assert (tmp_path / "run" / "kaplan_meier.png").stat().st_size > 5000
    history = list(csv.DictReader(open(tmp_path / "run" / "history" / "fold0.csv")))
    val_loss = [float(h["val_loss"]) for h in history]  # the Cox loss of the whole validation set (a bag alone has none)
    assert min(val_loss) > 0 and len(set(val_loss)) > 1
    assert "Harrell's C (95% CI)" in (tmp_path / "run" / "report.md").read_text()
    from wsi_mil.io.attention import read_attention_attrs, read_contribution

    for r in preds[:5]:  # each patch's share of the log risk (the heatmap's --normalise contribution) adds up to it
        store = tmp_path / "run" / "attention" / "ensemble" / f"{r['slide_id']}.h5"
        assert float(read_contribution(store).sum()) == pytest.approx(float(r["log_risk"]), abs=1e-4)
        assert read_attention_attrs(store)["contribution_unit"] == "log relative risk"
    assert test["ibs"] < test["ibs_kaplan_meier"] and test["ibs_ci"][0] < test["ibs"] < test["ibs_ci"][1]
    assert "integrated Brier (95% CI) vs Kaplan-Meier" in (tmp_path / "run" / "report.md").read_text()
    for key in ("c_index_uno", "td_auc_mean"):  # (with intervals, in the report too)
        assert test[f"{key}_ci"][0] <= test[key] <= test[f"{key}_ci"][1], test
    assert "Uno's C (95% CI)" in (tmp_path / "run" / "report.md").read_text()


def test_integrated_brier_score_rewards_a_risk_that_knows_time_and_not_one_that_does_not() -> None:
    """scikit-survival's integrated Brier score of the risk's survival curves (Breslow baseline) beside
    the Kaplan-Meier curve's: below it for a risk that drives the hazard, no better for a random one."""
    from sksurv.metrics import brier_score

    from wsi_mil.eval.survival import brier_times, integrated_brier, survival_metrics

    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    t_true, c = rng.exponential(np.exp(-x)), rng.exponential(1.5, size=300)
    t, e = np.minimum(t_true, c), (t_true < c).astype(float)
    good = survival_metrics(t, e, x, 0.0, n_boot=50)
    noise = survival_metrics(t, e, rng.normal(size=300), 0.0, n_boot=50)
    assert good["ibs"] < good["ibs_kaplan_meier"] - 0.03 and noise["ibs"] > noise["ibs_kaplan_meier"]
    assert good["ibs_kaplan_meier"] == noise["ibs_kaplan_meier"]  # (no model: the same curve for everyone)
    grid = brier_times(t, e)
    assert t[e > 0].min() < grid[0] < grid[-1] < t.max()
    # the integral is the mean of scikit-survival's Brier scores over the grid (trapezoids over the time range)
    from sksurv.linear_model.coxph import BreslowEstimator
    from sksurv.util import Surv

    y = Surv.from_arrays(e.astype(bool), t)
    est = np.stack([f(grid) for f in BreslowEstimator().fit(x, e.astype(bool), t).get_survival_function(x)])
    _, scores = brier_score(y, y, est, grid)
    assert integrated_brier(t, e, x, grid)[0] == pytest.approx(np.trapezoid(scores, grid) / (grid[-1] - grid[0]), rel=1e-9)


def test_uno_and_time_dependent_auc_have_bootstrap_intervals_from_scikit_survival() -> None:
    """Uno's C and the mean time-dependent AUC carry percentile intervals: scikit-survival's figure on
    each resample of the slides (the censoring weights refitted), above chance for a risk that drives
    the hazard, about chance for noise."""
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.util import Surv

    from wsi_mil.eval.survival import eval_times, survival_metrics

    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    t_true, c = rng.exponential(np.exp(-x)), rng.exponential(1.5, size=200)
    t, e = np.minimum(t_true, c), (t_true < c).astype(float)
    good = survival_metrics(t, e, x, 0.0, n_boot=60, seed=3)
    noise = survival_metrics(t, e, rng.normal(size=200), 0.0, n_boot=60, seed=3)
    for m in (good, noise):
        for key in ("c_index_uno", "td_auc_mean"):
            lo, hi = m[f"{key}_ci"]
            assert lo < m[key] < hi and hi - lo < 0.3, (key, m)
    assert good["c_index_uno_ci"][0] > 0.6 and good["td_auc_mean_ci"][0] > 0.6
    assert noise["c_index_uno_ci"][0] < 0.5 < noise["c_index_uno_ci"][1]
    # the same resamples through scikit-survival directly give the same interval
    draws, unos, tds = np.random.default_rng(3), [], []
    times = eval_times(t, e)
    for _ in range(60):
        i = draws.integers(0, len(t), len(t))
        y = Surv.from_arrays(e[i].astype(bool), t[i])
        unos.append(concordance_index_ipcw(y, y, x[i])[0])
    draws = np.random.default_rng(3)
    for _ in range(60):
        i = draws.integers(0, len(t), len(t))
        y = Surv.from_arrays(e[i].astype(bool), t[i])
        ok = [s for s in times if t[i].min() <= s < t[i].max()]
        tds.append(cumulative_dynamic_auc(y, y, x[i], ok)[1])
    assert good["c_index_uno_ci"] == pytest.approx((np.percentile(unos, 2.5), np.percentile(unos, 97.5)), abs=1e-9)
    assert good["td_auc_mean_ci"] == pytest.approx((np.percentile(tds, 2.5), np.percentile(tds, 97.5)), abs=1e-9)


@pytest.mark.parametrize(("columns", "task", "message"), [
    ({"label": lambda r: "12,5" if r["slide_id"].endswith("1") else r["burden"]}, "regression",
     r"not finite numbers: .*='12,5'"),
    ({"label_time": lambda r: r["time"]}, "survival", r"needs the columns label_time .* lacks \['label_event'\]"),
    ({"label_time": lambda r: r["time"], "label_event": lambda r: 2 if r["slide_id"].endswith("3") else r["event"]},
     "survival", r"label_event '2' is not 1 \(event\) or 0 \(censored\)"),
    ({"label_time": lambda r: -1 if r["slide_id"].endswith("5") else r["time"], "label_event": lambda r: r["event"]},
     "survival", r"label_time '-1' is not a follow-up time"),
    ({"label_time": lambda r: "" if r["slide_id"].endswith("7") else r["time"], "label_event": lambda r: r["event"]},
     "survival", r"follow-up time without an event or the reverse"),
])
def test_bad_outcomes_are_refused_naming_the_slides(cohort, tmp_path, columns, task, message) -> None:
    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, columns)
    with pytest.raises(ManifestError, match=message):
        run_train(m, [feats], out_dir=tmp_path / "run", config=TrainConfig(task=task, **CFG), progress=False)
    assert not (tmp_path / "run").exists()


def test_survival_with_one_bag_per_step_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--task survival needs --bags-per-batch 4 or more"):
        TrainConfig(task="survival", bags_per_batch=1)
    assert TrainConfig().bags_per_batch == 1 and TrainConfig(task="regression").bags_per_batch == 1


def test_heatmap_captions_of_a_risk_or_a_value_make_no_class_call() -> None:
    """A survival slide called "high risk" is not a NEGATIVE call of a class named "risk" (what a
    classifier's caption logic made of it), and its colours are not faded as a negative slide's are."""
    from wsi_mil.viz.scores import call_opacity, slide_call

    risk = slide_call({"outputs": ["risk"], "probability": [1.17], "prediction": "high risk", "task_kind": "survival"})
    assert risk["positive"] is None and "NEGATIVE" not in risk["text"] and "log relative risk = 1.17" in risk["text"]
    assert call_opacity(0.5, risk) == 0.5
    value = slide_call({"outputs": ["label"], "probability": [12.3], "prediction": 12.3, "task_kind": "regression"})
    assert "predicted label = 12.3" in value["text"] and value["positive"] is None
    binary = slide_call({"outputs": ["tumour"], "probability": [0.1], "prediction": "normal"})  # (an earlier store)
    assert binary["positive"] is False and "NEGATIVE call" in binary["text"]


def test_covariates_fused_in_the_network_are_learnt_and_kept_with_each_fold(cohort, tmp_path) -> None:
    """A target made of the planted burden and the patient's age: the image alone cannot know the age, the model
    given --covariates age,sex can (R² rises); the encoding (fitted on each fold's training slides, a blank age
    an indicator, never a zero) is stored with each fold's model, and predict needs the covariates back."""
    from wsi_mil.commands.predict import run_predict
    from wsi_mil.data.covariates import CovariateEncoder

    feats, rows = cohort
    ages = np.array([r["age"] for r in rows], float)
    z = (ages - ages.mean()) / ages.std()

    def target(r: dict[str, object]) -> str:
        i = rows.index(r)
        return f"{100 * float(r['burden']) + 25 * z[i]:.3f}"

    columns = {"label": target, "age": lambda r: "" if r["slide_id"].endswith("9") else f"{r['age']:.1f}",
               "sex": lambda r: "FM"[rows.index(r) % 2]}
    m = _manifest(tmp_path / "m.csv", rows, columns)
    image = run_train(m, [feats], out_dir=tmp_path / "image", config=TrainConfig(task="regression", **CFG), progress=False)
    fused = run_train(m, [feats], out_dir=tmp_path / "fused", config=TrainConfig(task="regression", covariates="age,sex",
                                                                               **CFG), progress=False)
    r2_image, r2_fused = image.metrics["ensemble_test"]["r2"], fused.metrics["ensemble_test"]["r2"]
    assert r2_fused > r2_image + 0.2, (r2_image, r2_fused)
    ablation = fused.metrics["ablation"]["variants"]  # the report's: what each input gives alone
    assert ablation["image and covariates (the model)"]["ensemble_test"]["score"] == pytest.approx(r2_fused, abs=1e-5)
    assert ablation["image branch alone"]["ensemble_test"]["score"] < r2_fused - 0.15  # (it cannot know the age)
    assert 0.1 < ablation["covariates alone"]["ensemble_test"]["score"] < r2_fused  # (nor the covariates the burden)
    assert "## What the covariates add" in (tmp_path / "fused" / "report.md").read_text()
    assert "ablation" not in image.metrics
    spec = json.loads((tmp_path / "fused" / "models" / "fold0.json").read_text())
    enc = CovariateEncoder.from_dict(spec["covariates"])
    assert enc.columns() == ["age", "age missing", "sex=F", "sex=M", "sex missing"] and spec["fusion"] == "concat"
    np.testing.assert_array_equal(enc.encode({"age": "", "sex": "M"}), [0, 1, 0, 1, 0])  # blank: the indicator
    train_ids = set(json.loads((tmp_path / "fused" / "splits.json").read_text())["folds"][0]["train"])
    train_ages = [r["age"] for r in rows if r["slide_id"] in train_ids and not r["slide_id"].endswith("9")]
    assert enc.numeric["age"][0] == pytest.approx(np.mean(train_ages), abs=0.06)  # fitted on the fold's training slides
    assert "covariates age, sex (concat fusion)" in (tmp_path / "fused" / "report.md").read_text()
    preds = [r for r in csv.DictReader(open(tmp_path / "fused" / "predictions.csv")) if r["fold"] == "ensemble"][:4]
    stores = [feats / f"{r['slide_id']}.h5" for r in preds]
    with pytest.raises(ConfigError, match="take the covariates age, sex: give --manifest"):
        run_predict(tmp_path / "fused", stores, out_dir=tmp_path / "p0")
    run_predict(tmp_path / "fused", stores, out_dir=tmp_path / "p1", manifest=m)
    again = {r["slide_id"]: float(r["predicted_label"]) for r in csv.DictReader(open(tmp_path / "p1" / "predictions.csv"))}
    for r in preds:
        assert again[r["slide_id"]] == pytest.approx(float(r["predicted_label"]), abs=1e-3)


def test_a_misspelt_or_label_covariate_is_refused_before_any_folder(cohort, tmp_path) -> None:
    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, {"label": lambda r: f"{r['burden']:.4f}", "age": lambda r: r["age"]})
    with pytest.raises(ManifestError, match=r"\['agee'\] not in the manifest \(its other columns: \['age'\]\)"):
        run_train(m, [feats], out_dir=tmp_path / "r", config=TrainConfig(task="regression", covariates="agee", **CFG),
                  progress=False)
    with pytest.raises(ConfigError, match=r"\['label'\] are label columns"):
        run_train(m, [feats], out_dir=tmp_path / "r", config=TrainConfig(task="regression", covariates="age,label",
                                                                         **CFG), progress=False)
    assert not (tmp_path / "r").exists()


def test_a_survival_fold_at_chance_is_a_failed_fold_and_the_headline_says_so() -> None:
    """Fold health judged AUC only: a survival fold at Harrell's C 0.45 (or a regression fold at R² < 0) passed
    as healthy and the fold ensemble led the report."""
    from wsi_mil.tasks import kind_of
    from wsi_mil.train.runner import choose_headline, fold_health

    kind = kind_of("survival")
    folds = [{"fold": 0, "val": {"c_index": 0.62}, "test": {"c_index": 0.45}},
             {"fold": 1, "val": {"c_index": 0.70}, "test": {"c_index": 0.71}}]
    health = fold_health(folds, kind.score_key, kind.score_name, kind.chance)
    assert health["failed"] == [{"fold": 0, "why": "test Harrell's C 0.450"}]
    m = {"ensemble_test": {"c_index": 0.66}, "pooled_validation": {"c_index": 0.64}, "fold_health": health}
    head = choose_headline(m, kind.score_key, kind.score_name)
    assert head == {"set": "pooled_validation", "why": "1 of 2 folds failed, and a fold ensemble hides failed folds "
                                                  "behind the confident ones"}
    reg = kind_of("regression")
    assert fold_health([{"fold": 0, "val": {"r2": -0.1}, "test": {"r2": 0.3}}], reg.score_key, reg.score_name,
                       reg.chance)["failed"][0]["why"] == "validation R² -0.100"


def test_what_a_stranger_fed_it_is_refused_before_any_folder(cohort, tmp_path) -> None:
    """Found by a trial run as a new user: a '>90' among ages made age categorical after the run folder
    existed; id columns and unused label columns were "not in the manifest"; classifier options were silently
    ignored by a regression; --task auto on a survival manifest spoke of positives; times that are all 0 trained."""
    feats, rows = cohort

    def run(columns: dict[str, object], **cfg: object) -> None:
        m = _manifest(tmp_path / "m.csv", rows, columns)
        run_train(m, [feats], out_dir=tmp_path / "r", config=TrainConfig(**{**CFG, **cfg}), progress=False)

    base = {"label": lambda r: f"{r['burden']:.4f}", "label_grade": lambda r: "1",
            "age": lambda r: ">90" if r["slide_id"].endswith("3") else f"{r['age']:.1f}"}
    with pytest.raises(ManifestError, match=r"covariate 'age' holds numbers and \d+ value\(s\) that are not: .*='>90'"):
        run(base, task="regression", label="label", covariates="age")
    with pytest.raises(ConfigError, match=r"\['slide_id'\] identify or place a slide"):
        run(base, task="regression", label="label", covariates="slide_id")
    with pytest.raises(ConfigError, match=r"\['label_grade'\] are label columns"):
        run(base, task="regression", label="label", covariates="label_grade")
    for option in ({"imbalance": "focal"}, {"min_minority_share": 0.5}, {"subgroups": "age"}):
        with pytest.raises(ConfigError, match="--task regression has no classes: .* would be ignored"):
            TrainConfig(task="regression", **option)
    with pytest.raises(ConfigError, match="--fusion gated joins covariates: give --covariates too"):
        TrainConfig(fusion="gated")
    surv = {"label_time": lambda r: f"{r['time']:.3f}", "label_event": lambda r: r["event"]}
    with pytest.raises(ManifestError, match="a survival task, which is never guessed; pass --task survival"):
        run(surv)
    with pytest.raises(ManifestError, match="follow-up times that do not differ"):
        run({"label_time": lambda r: "0", "label_event": lambda r: r["event"]}, task="survival")
    assert not (tmp_path / "r").exists()


def test_discrete_time_nll_is_the_person_period_logistic_likelihood_scikit_learn_maximises() -> None:
    """A discrete-time hazard model with a logit a_k + x.b per interval, fitted by minimising discrete_nll, lands
    on scikit-learn's unpenalised logistic regression of the person-period table (one row per slide per interval
    it was at risk in; the outcome 1 only in the interval of a seen event; a censored slide survives its own)."""
    from sklearn.linear_model import LogisticRegression

    from wsi_mil.tasks.survival import discrete_nll, interval_of

    rng = np.random.default_rng(4)
    n, k = 400, 4
    x = rng.normal(size=(n, 2))
    t_true, c = rng.exponential(np.exp(-(0.8 * x[:, 0] - 0.5 * x[:, 1]))), rng.exponential(2.0, n)
    time, event = np.minimum(t_true, c), (t_true < c).astype(float)
    edges = np.quantile(time[event > 0], [0.25, 0.5, 0.75])
    j = interval_of(torch.tensor(time, dtype=torch.float32), torch.tensor(edges, dtype=torch.float32)).numpy()
    rows, ys = [], []
    for i in range(n):
        for m in range(j[i] + 1):
            rows.append(np.r_[np.eye(k)[m], x[i]])
            ys.append(1 if (m == j[i] and event[i] > 0) else 0)
    ref = LogisticRegression(C=np.inf, fit_intercept=False, max_iter=5000, tol=1e-10).fit(np.array(rows), ys)
    a = torch.zeros(k, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")
    xt, tt, et = torch.tensor(x, dtype=torch.float32), torch.tensor(time, dtype=torch.float32), torch.tensor(event)
    et_edges = torch.tensor(edges, dtype=torch.float32)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = discrete_nll(a[None, :] + (xt @ b)[:, None], tt, et, et_edges)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(np.r_[a.detach().numpy(), b.detach().numpy()], ref.coef_[0], atol=2e-3)


def test_discrete_time_survival_end_to_end(cohort, tmp_path) -> None:
    from sksurv.metrics import concordance_index_censored

    from wsi_mil.commands.predict import run_predict

    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows, {"label_time": lambda r: f"{r['time']:.4f}",
                                             "label_event": lambda r: r["event"]})
    config = TrainConfig(task="survival", survival_loss="discrete", time_bins=4, **CFG)
    assert config.bags_per_batch == 1  # (a likelihood per bag)
    report = run_train(m, [feats], out_dir=tmp_path / "run", config=config, progress=False)
    task = report.task
    assert task.time_bins == 4 and len(task.bins) == 3 and task.n_logits == 4
    by_id = {r["slide_id"]: r for r in rows}
    dev = [by_id[s] for f in json.loads((tmp_path / "run" / "splits.json").read_text())["folds"] for s in f["val"]]
    times = np.array([r["time"] for r in dev if r["event"]], float)  # the edges: quantiles of development event times
    np.testing.assert_allclose(task.bins, np.quantile(times, [0.25, 0.5, 0.75]), rtol=1e-4)
    preds = [r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv")) if r["fold"] == "ensemble"]
    risk = np.array([float(r["risk"]) for r in preds])
    assert ((risk >= -4) & (risk <= 0)).all()  # minus the expected intervals survived
    e = np.array([by_id[r["slide_id"]]["event"] for r in preds], bool)
    t = np.array([by_id[r["slide_id"]]["time"] for r in preds], float)
    c = concordance_index_censored(e, t, risk)[0]
    assert report.metrics["ensemble_test"]["c_index"] == pytest.approx(c, abs=1e-4) and c > 0.62
    assert "discrete-time hazards, 4 intervals" in (tmp_path / "run" / "report.md").read_text()
    run_predict(tmp_path / "run", [feats / f"{r['slide_id']}.h5" for r in preds[:3]], out_dir=tmp_path / "pred")
    again = {r["slide_id"]: float(r["risk"]) for r in csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))}
    for r in preds[:3]:
        assert again[r["slide_id"]] == pytest.approx(float(r["risk"]), abs=1e-4)


def test_survival_loss_options_are_refused_where_they_cannot_apply(cohort, tmp_path) -> None:
    with pytest.raises(ConfigError, match="--survival-loss discrete is a survival target's setting; this run has none"):
        TrainConfig(survival_loss="discrete")
    with pytest.raises(ConfigError, match="--time-bins sets a discrete-time model's intervals"):
        TrainConfig(task="survival", time_bins=3)  # (was accepted and ignored by the Cox loss)
    assert TrainConfig(task="survival", survival_loss="discrete").time_bins == 4
    with pytest.raises(ConfigError, match="--time-bins must be 2 or more"):
        TrainConfig(task="survival", survival_loss="discrete", time_bins=1)
    assert TrainConfig(targets="label_a,survival", survival_loss="discrete").bags_per_batch == 1
    feats, rows = cohort
    m = _manifest(tmp_path / "m.csv", rows[:60], {"label_time": lambda r: f"{r['time']:.4f}",
                                                  "label_event": lambda r: r["event"]})
    n_events = sum(int(r["event"]) for r in rows[:60])
    with pytest.raises(ManifestError, match=rf"{n_events} event\(s\) for --time-bins 40: .*at most {n_events // 2}"):
        run_train(m, [feats], out_dir=tmp_path / "run", progress=False,
                  config=TrainConfig(task="survival", survival_loss="discrete", time_bins=40, **CFG))
