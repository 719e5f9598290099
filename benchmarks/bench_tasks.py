"""Survival and regression on a generated cohort of real tissue: does train-mil learn an outcome
planted in the slides' lesions, and how does it compare with what users would otherwise fit?

Cohort: the small-lesion benchmark's 120 slides (``bench_mil_small.py`` makes and caches them:
real tissue, 1-2 lesions of 100-250 µm per positive slide, tiled at 0.5 µm/px, EfficientNet-Lite0
features). Each slide's **lesion burden** is the share of its tiled patches that are at least half
tumour (from the generator's truth masks); a covariate ("age") is drawn per patient. Outcomes
(wsi_mil/synth/outcomes.py): a follow-up time whose hazard rises with the burden and with age,
about 40 % censored; the regression target is the burden in percent.

Survival, on the same held-out test slides of each seed (the run's own patient-level split):
- **image only**: train-mil --task survival (abmil, Cox partial likelihood), the fold ensemble's risk;
- **covariate only**: a Cox model of age (scikit-survival), fitted on the development slides;
- **image + covariate (late fusion)**: a Cox model of [the MIL out-of-fold risk, age] fitted on the
  development slides' out-of-fold risks, applied to the test ensemble's risk;
- **image + covariate (fused)**: train-mil --task survival --covariates age (concat fusion in the network);
- **discrete time**: train-mil --task survival --survival-loss discrete (4 intervals, a logistic hazard each);
- **multi-task**: train-mil --targets survival,label_burden:regression: the same aggregator also regresses the
  lesion burden (a pathologist's tumour-fraction score in real life; here the generator's truth), its risk judged;
- **oracle**: a Cox model of [the true burden, age]: what a perfect lesion detector would give.
Figures: Harrell's C with its bootstrap interval, the time-dependent AUC at the event-time quartiles, the
integrated Brier score beside the Kaplan-Meier curve's (no model).

Regression: train-mil --task regression against a ridge regression on each slide's mean feature
(the usual non-MIL baseline; alpha chosen by cross-validation on the development slides), R²,
Spearman and MAE on the test slides.

Seeds 0, 1, 2 (outcomes and splits); medians with min-max.
Results: benchmarks/results/survival.{json,md} and regression.{json,md}.

    .venv/bin/python benchmarks/bench_tasks.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COHORT = HERE / ".cache" / "small-lesions" / "balanced-120"
#: log hazard per sd of the burden: half the slides have none, so this mostly separates lesion from none
BURDEN_EFFECT = 2.0
MODELS = ("abmil", "linear_max")


def burdens(manifest: Path, feats: Path) -> dict[str, float]:
    """Share of each slide's patches at least half tumour (the generator's truth masks)."""
    import h5py

    from wsi_mil.eval.localisation import patch_tumour_share
    from wsi_mil.synth.slide import read_truth_mask

    out = {}
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        slide = manifest.parent / r["path"]
        with h5py.File(feats / f"{r['slide_id']}.h5", "r") as f:
            coords, extent = f["coords"][:], float(f.attrs["extent_level0_px"])
        if slide.with_name(slide.stem + ".tumour.png").exists():
            mask, ds = read_truth_mask(slide)
            share = patch_tumour_share(coords, extent, mask, ds)
            out[r["slide_id"]] = float(np.mean(share >= 0.5))
        else:
            out[r["slide_id"]] = 0.0
    return out


def _cox(x_dev: np.ndarray, t_dev: np.ndarray, e_dev: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    model = CoxPHSurvivalAnalysis(alpha=1e-4).fit(x_dev, Surv.from_arrays(e_dev.astype(bool), t_dev))
    return model.predict(x_test)


def survival_seed(seed: int, manifest: Path, feats: Path, burden: dict[str, float], work: Path) -> dict[str, Any]:
    from wsi_mil.commands.train_mil import run_train
    from wsi_mil.config import TrainConfig
    from wsi_mil.eval.survival import survival_metrics
    from wsi_mil.synth.outcomes import plant_outcomes

    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["slide_id"] for r in rows]
    b = np.array([burden[i] for i in ids])
    age = np.random.default_rng(100 + seed).normal(62, 9, len(ids))
    out = plant_outcomes(b, age, burden_effect=BURDEN_EFFECT, covariate_effect=0.7, censoring=0.4, seed=seed)
    m = work / f"survival-{seed}.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "patient_id", "label_time", "label_event", "age", "label_burden"])
        for r, t, e, a, bb in zip(rows, out.time, out.event, age, b, strict=True):
            w.writerow([r["slide_id"], str(manifest.parent / r["path"]), r["patient_id"], f"{t:.5f}", e, f"{a:.1f}",
                        f"{100 * bb:.4f}"])
    t, e = out.time, out.event
    ix = {s: i for i, s in enumerate(ids)}
    rows_out: dict[str, Any] = {}
    seconds = []
    for model in MODELS:
        run = work / f"survival-run-{model}-{seed}"
        shutil.rmtree(run, ignore_errors=True)  # (one run per folder: the seed's earlier run goes)
        t0 = time.perf_counter()
        report = run_train(m, [feats], out_dir=run, config=TrainConfig(task="survival", model=model, seed=seed,
                                                                       bootstrap=500), progress=False)
        seconds.append(time.perf_counter() - t0)
        preds = list(csv.DictReader(open(run / "predictions.csv")))
        test_ids = [p["slide_id"] for p in preds if p["fold"] == "ensemble"]
        oof = {p["slide_id"]: float(p["log_risk"]) for p in preds if p["split"] == "val"}
        ens = {p["slide_id"]: float(p["log_risk"]) for p in preds if p["fold"] == "ensemble"}
        te = np.array([ix[s] for s in test_ids])
        dev = np.array([ix[s] for s in oof])

        def figs(risk: np.ndarray, te: np.ndarray = te) -> dict[str, Any]:
            mm = survival_metrics(t[te], e[te], risk, None, n_boot=500, seed=seed)
            return {k: mm.get(k) for k in ("c_index", "c_index_ci", "td_auc_mean", "c_index_uno", "ibs",
                                           "ibs_kaplan_meier")}

        image = np.array([ens[s] for s in test_ids])
        rows_out[f"image only (train-mil survival, {model})"] = figs(image)
        assert report.metrics["ensemble_test"]["c_index"] == rows_out[f"image only (train-mil survival, {model})"]["c_index"]
        rows_out[f"image ({model}) + covariate (late fusion Cox)"] = figs(_cox(
            np.c_[[oof[s] for s in oof], age[dev]], t[dev], e[dev], np.c_[image, age[te]]))
    run = work / f"survival-run-fused-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    fused = run_train(m, [feats], out_dir=run, config=TrainConfig(task="survival", model="abmil", seed=seed,
                                                                  covariates="age", bootstrap=500), progress=False)
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    fused_risk = np.array([float(p["log_risk"]) for p in preds if p["fold"] == "ensemble"])
    fused_ids = [p["slide_id"] for p in preds if p["fold"] == "ensemble"]
    assert fused_ids == test_ids  # (the same split: the covariates do not change it)
    rows_out["image (abmil) + covariate fused in the network (--covariates age)"] = figs(fused_risk)
    assert fused.metrics["ensemble_test"]["c_index"] == rows_out[
        "image (abmil) + covariate fused in the network (--covariates age)"]["c_index"]
    for key, name, config, column in (
            ("discrete", "image only (train-mil survival, abmil, discrete time: 4 intervals)",
             TrainConfig(task="survival", survival_loss="discrete", time_bins=4, seed=seed, bootstrap=500), "risk"),
            ("multitask", "image (abmil) multi-task: survival + the burden regressed (--targets)",
             TrainConfig(targets="survival,label_burden:regression", seed=seed, bootstrap=500), "log_risk")):
        run = work / f"survival-run-{key}-{seed}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        report = run_train(m, [feats], out_dir=run, config=config, progress=False)
        seconds.append(time.perf_counter() - t0)
        preds = [p for p in csv.DictReader(open(run / "predictions.csv")) if p["fold"] == "ensemble"]
        assert [p["slide_id"] for p in preds] == test_ids  # (the same held-out slides)
        rows_out[name] = figs(np.array([float(p[column]) for p in preds]))
        head = report.metrics["ensemble_test"]
        assert (head.get("parts", {}).get("survival") or head)["c_index"] == rows_out[name]["c_index"]
    rows_out["covariate only (Cox of age)"] = figs(_cox(age[dev, None], t[dev], e[dev], age[te, None]))
    rows_out["oracle (Cox of true burden and age)"] = figs(_cox(np.c_[b[dev], age[dev]], t[dev], e[dev],
                                                                np.c_[b[te], age[te]]))
    seconds = float(np.median(seconds))
    return {"seed": seed, "n_test": len(te), "n_events_test": int(e[te].sum()), "censored_share": float(1 - e.mean()),
            "train_seconds": seconds, "rows": rows_out}


def regression_seed(seed: int, manifest: Path, feats: Path, burden: dict[str, float], work: Path) -> dict[str, Any]:
    import h5py
    from sklearn.linear_model import RidgeCV

    from wsi_mil.commands.train_mil import run_train
    from wsi_mil.config import TrainConfig
    from wsi_mil.eval.regression import regression_metrics

    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    m = work / f"regression-{seed}.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "patient_id", "label"])
        for r in rows:
            w.writerow([r["slide_id"], str(manifest.parent / r["path"]), r["patient_id"], f"{100 * burden[r['slide_id']]:.4f}"])
    run = work / f"regression-run-{seed}"
    t0 = time.perf_counter()
    shutil.rmtree(run, ignore_errors=True)
    run_train(m, [feats], out_dir=run, config=TrainConfig(task="regression", seed=seed, bootstrap=500), progress=False)
    seconds = time.perf_counter() - t0
    preds = list(csv.DictReader(open(run / "predictions.csv")))
    test = [p for p in preds if p["fold"] == "ensemble"]
    test_ids = {p["slide_id"] for p in test}
    y = np.array([100 * burden[p["slide_id"]] for p in test])
    mil = np.array([float(p["predicted_label"]) for p in test])

    def mean_feature(sid: str) -> np.ndarray:
        with h5py.File(feats / f"{sid}.h5", "r") as f:
            return np.asarray(f["features"][:].mean(axis=0))

    dev_ids = [r["slide_id"] for r in rows if r["slide_id"] not in test_ids]
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(np.stack([mean_feature(s) for s in dev_ids]),
                                                        [100 * burden[s] for s in dev_ids])
    base = ridge.predict(np.stack([mean_feature(p["slide_id"]) for p in test]))
    keep = ("r2", "r2_ci", "spearman", "spearman_ci", "mae")
    return {"seed": seed, "n_test": len(test), "train_seconds": seconds, "target_sd_test": float(np.std(y)),
            "rows": {"train-mil regression (abmil)": {k: regression_metrics(y, mil, n_boot=500, seed=seed)[k] for k in keep},
                     "ridge on the mean feature": {k: regression_metrics(y, base, n_boot=500, seed=seed)[k] for k in keep}}}


def _summary(per_seed: list[dict[str, Any]], key: str) -> dict[str, str]:
    out = {}
    for name in per_seed[0]["rows"]:
        v = [s["rows"][name][key] for s in per_seed if s["rows"][name].get(key) is not None]
        out[name] = f"{np.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "–"
    return out


def _markdown_survival(res: dict[str, Any]) -> str:
    seeds = res["seeds"]
    c, td, uno, ibs, km = (_summary(seeds, k) for k in ("c_index", "td_auc_mean", "c_index_uno", "ibs",
                                                         "ibs_kaplan_meier"))
    lines = ["# Survival: an outcome planted in the lesions, learnt from the slides", "",
             (f"Cohort: the small-lesion benchmark's 120 generated slides of real tissue (0.5 µm/px, EfficientNet-Lite0 "
              f"features); the log hazard rises by {BURDEN_EFFECT:g} per sd of each slide's lesion burden (share of "
              f"patches at least half tumour) and by 0.7 per sd of a drawn covariate; about {100 * np.median([s['censored_share'] for s in seeds]):.0f} % censored. "
              f"Every model is judged on the same held-out test slides of each seed ({seeds[0]['n_test']} slides, "
              f"{', '.join(str(s['n_events_test']) for s in seeds)} events). Median (min-max) over seeds "
              f"{', '.join(str(s['seed']) for s in seeds)}. Command: `python benchmarks/bench_tasks.py`."), "",
             "| model | Harrell's C | Uno's C | time-dependent AUC (mean over the event-time quartiles) | "
             "integrated Brier (lower is better) |",
             "|---|---|---|---|---|"]
    for name in c:
        lines.append(f"| {name} | {c[name]} | {uno[name]} | {td[name]} | {ibs.get(name, '–')} |")
    lines += ["", f"Integrated Brier score of the test set's own Kaplan-Meier curve given to every slide (no model): "
                  f"{next(iter(km.values()), '–')}; the models' survival curves come from their risk through a Breslow "
                  "baseline estimated on the test set (wsi_mil/eval/survival.py)."]
    lines += ["", "Harrell's C of each seed with its 95% bootstrap interval (500 resamples of the test slides):", ""]
    for s in seeds:
        lines.append(f"- seed {s['seed']}: " + "; ".join(
            f"{n}: {r['c_index']:.3f} ({r['c_index_ci'][0]:.3f}-{r['c_index_ci'][1]:.3f})" if r.get("c_index_ci")
            else f"{n}: {r.get('c_index')}" for n, r in s["rows"].items()))
    lines += ["", ("Half the slides carry no lesion (burden 0): their hazard differs only by the covariate, so even the "
                   f"oracle's C stays well below 1. With {seeds[0]['n_test']} test slides an interval spans about ±0.17: "
                   "differences smaller than that between rows are not informative; the seeds' spread says as much. "
                   "The late fusion is a Cox model on the MIL risk and the covariate, fitted after training; the "
                   "fused row trains the covariate inside the network (train-mil --covariates age, concat fusion)."),
              "",
              ("What it says: from about 1 % of tumour per positive slide and 96 development slides, the Cox-trained "
               "MIL models learn a weak risk (C well below the oracle's, and below the covariate alone), while the same "
               "features regress the burden itself well (regression.md: Spearman ρ about 0.7). The survival signal per "
               "slide is much noisier than the burden (exponential times, 40 % censored), and a Cox step sees only its "
               "batch's 16 bags: more slides, or a risk built on a learnt burden, are what would close the gap. The "
               "covariate fused in the network adds little (C 0.61 against 0.57) and stays below a Cox model of the "
               "covariate alone (its head starts at zero and learns with the MIL model; a 10x faster rate for it was "
               "tried on seed 1 and did not help: 0.58); the noisy image risk and early stopping on 19 validation "
               "slides' concordance are the likelier limits. The discrete-time loss (4 intervals, one bag a step) "
               "learns less still (C 0.53); regressing the burden beside the risk in one model (multi-task) leaves C "
               "where it was (0.58 against 0.57): with 96 slides the burden head's signal does not reach the risk "
               "head through the shared aggregator. By the integrated Brier score no image-only model beats the "
               "test set's own Kaplan-Meier curve (0.23): their risks rank a little but carry no usable survival "
               "curve; the covariate's Cox models do (0.21), the oracle clearly (0.11). The headline is therefore "
               "the weak one: image-only C 0.57, not the late-fusion row, whose gain is the covariate's."),
              f"Training: {np.median([s['train_seconds'] for s in seeds]):.0f} s per run (5 folds, 2 CPU cores).", ""]
    return "\n".join(lines)


def _markdown_regression(res: dict[str, Any]) -> str:
    seeds = res["seeds"]
    r2, sp, mae = (_summary(seeds, k) for k in ("r2", "spearman", "mae"))
    lines = ["# Regression: the lesion burden (percent of patches), learnt from the slides", "",
             (f"Cohort: as benchmarks/results/survival.md; the target is each slide's lesion burden in percent "
              f"(0 for the half without lesions; test-set sd {np.median([s['target_sd_test'] for s in seeds]):.2f}). "
              f"Same held-out test slides for both models ({seeds[0]['n_test']}). Median (min-max) over seeds "
              f"{', '.join(str(s['seed']) for s in seeds)}. Command: `python benchmarks/bench_tasks.py`."), "",
             "| model | R² | Spearman ρ | MAE (percent points) |", "|---|---|---|---|"]
    for name in r2:
        lines.append(f"| {name} | {r2[name]} | {sp[name]} | {mae[name]} |")
    lines += ["", ("Lesions cover about 1 % of a positive slide: the mean feature barely moves with them, a MIL model's "
                   f"attention can find them. {seeds[0]['n_test']} test slides: intervals (metrics.json of each run) span "
                   "about ±0.2 in R²."),
              f"Training: {np.median([s['train_seconds'] for s in seeds]):.0f} s per run.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md files from the .json ones")
    a = p.parse_args()
    if a.markdown_only:
        (RESULTS / "survival.md").write_text(_markdown_survival(json.loads((RESULTS / "survival.json").read_text())))
        (RESULTS / "regression.md").write_text(_markdown_regression(json.loads((RESULTS / "regression.json").read_text())))
        return
    manifest, feats = COHORT / "slides" / "manifest.csv", COHORT / "tiles" / "features"
    if not feats.is_dir():
        raise SystemExit(f"{feats}: run benchmarks/bench_mil_small.py first (it generates, tiles and embeds the cohort)")
    work = HERE / ".cache" / "tasks"
    work.mkdir(parents=True, exist_ok=True)
    burden = burdens(manifest, feats)
    surv = {"seeds": [survival_seed(s, manifest, feats, burden, work) for s in a.seeds]}
    (RESULTS / "survival.json").write_text(json.dumps(surv, indent=2) + "\n")
    (RESULTS / "survival.md").write_text(_markdown_survival(surv))
    reg = {"seeds": [regression_seed(s, manifest, feats, burden, work) for s in a.seeds]}
    (RESULTS / "regression.json").write_text(json.dumps(reg, indent=2) + "\n")
    (RESULTS / "regression.md").write_text(_markdown_regression(reg))
    print((RESULTS / "survival.md").read_text())
    print((RESULTS / "regression.md").read_text())


if __name__ == "__main__":
    main()
