"""`wsi-mil train-mil`: attention MIL on slide labels, with patient-level splits and honest evaluation.

Outputs in ``--out``:

* ``splits.json`` — the held-out test set and the train / validation slides of every fold;
* ``models/fold<k>.safetensors`` + ``.json`` — best weights per fold (weights only) with
  everything needed to rebuild the model, its task, encoder and decision threshold;
* ``metrics.json`` and ``report.md`` — per fold (validation and test), across folds
  (mean ± sd), and the fold ensemble on the test set; binary metrics also at the true
  prevalence when the test set was enriched;
* ``predictions.csv`` — one row per slide, fold and split;
* ``roc.png``, ``confusion.png``, ``training_curves.png``;
* ``attention/fold<k>/<slide>.h5`` and ``attention/ensemble/<slide>.h5`` — instance
  attention of every evaluated slide, with coordinates, for heatmaps;
* ``train.log``, ``train_config.yaml``, ``history/fold<k>.csv``.

A fold whose model already exists with the same settings is not trained again, so an
interrupted run resumes at the next fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil import __version__
from wsi_mil.config import TrainConfig
from wsi_mil.data.bags import Bag, Task, bags_from_manifest, infer_task
from wsi_mil.errors import ConfigError, ManifestError, StoreError
from wsi_mil.io.atomic import write_csv, write_json, write_text
from wsi_mil.io.paths import path_record

logger = logging.getLogger(__name__)

THRESHOLD_RULE = ("each fold's threshold is chosen on its validation slides (Youden's J, or the target "
                  "sensitivity) halfway, in logit space, between the two validation scores it separates; pooled "
                  "out-of-fold predictions are judged at their own fold's threshold; the fold ensemble, whose "
                  "probability is the mean of the folds', at the mean of the folds' thresholds in logit space")

METRIC_KEYS = ("auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "balanced_accuracy")


@dataclass
class TrainReport:
    out_dir: Path
    task: Task
    metrics: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def headline(self) -> dict[str, Any]:
        """The numbers people look at first: the ensemble on the held-out test set, or the
        pooled out-of-fold validation predictions when there is no test set."""
        return self.metrics.get("ensemble_test") or self.metrics.get("pooled_validation") or {}


def encoder_of(bags: list[Bag]) -> dict[str, Any]:
    """The encoder shared by every feature store (attributes in ``Bag.meta``); mixing
    encoders is refused."""
    seen: dict[str, list[str]] = {}
    info: dict[str, Any] = {}
    for b in bags:
        attrs = b.meta
        transforms = list(attrs.get("transforms", [])) if attrs else []
        key = (f"{attrs.get('encoder')} (weights {str(attrs.get('weights_sha256', '?'))[:12]}"
               f"{', ' + '+'.join(transforms) if transforms else ''})") if attrs else "unknown"
        seen.setdefault(key, []).append(b.slide_id)
        if attrs and not info:
            info = {"encoder": attrs.get("encoder"), "weights_sha256": attrs.get("weights_sha256"),
                    "transforms": [str(t) for t in transforms]}
    if len(seen) > 1:
        listing = "; ".join(f"{k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in seen.items())
        raise StoreError(f"the feature stores come from different encoders ({listing}); features of different "
                         "encoders cannot be mixed in one model. Re-extract with one encoder.")
    return info


#: bumped whenever training itself changes what a fold's model is, so that a resumed run
#: retrains folds made by older code instead of mixing them in (2: validation loss breaks
#: AUC ties in model selection)
TRAINING_REVISION = 3  # 3: thresholds between two validation scores (logit midpoint), not on one

#: settings that change how a run is carried out, not what a fold's model is
_RUN_ONLY = ("allow_missing", "threads", "cache_bags", "device", "bootstrap", "min_class_slides")


def _settings_hash(config: TrainConfig, fold: Any, dim: int) -> str:
    model_settings = {k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY}
    body = json.dumps({"config": model_settings, "train": fold.train, "val": fold.val, "dim": dim,
                       "training_revision": TRAINING_REVISION}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _threshold(task: Task, y: np.ndarray, p: np.ndarray, config: TrainConfig) -> list[float]:
    from wsi_mil.eval.metrics import choose_threshold

    if task.kind == "multiclass":
        return []
    return [choose_threshold(y[:, c], p[:, c], config.threshold, config.target_sensitivity) for c in range(task.n_outputs)]


def evaluate(task: Task, y: np.ndarray, p: np.ndarray, thresholds: list[float], config: TrainConfig,
             weights: np.ndarray | None = None, ci: bool = True) -> dict[str, Any]:
    """Metrics of predictions ``p`` (n, C) against targets ``y`` (n, C)."""
    from wsi_mil.eval.metrics import binary_metrics, multiclass_metrics

    if len(y) == 0:
        return {}
    if task.kind == "multiclass":
        return multiclass_metrics(y.argmax(axis=1), p, list(task.outputs))
    per = {name: binary_metrics(y[:, c], p[:, c], thresholds[c], weights=weights, ci=ci, n_boot=config.bootstrap, seed=config.seed)
           for c, name in enumerate(task.outputs)}
    if task.kind == "binary":
        return next(iter(per.values()))
    aucs = [m["auc"] for m in per.values() if m["auc"] is not None]
    return {"per_label": per, "auc": float(np.mean(aucs)) if aucs else None, "n": len(y)}


def _write_attention(out: Path, bags: list[Bag], pred: Any, task: Task, *, fold: str, split: str,
                     thresholds: list[float], model: str) -> None:
    from wsi_mil.io.attention import write_attention

    for bag, probs, att in zip(bags, pred.probs, pred.attention, strict=True):
        _, coords = bag.load()
        write_attention(out / f"{bag.slide_id}.h5", coords=coords, attention=att, attrs={
            "slide_id": bag.slide_id, "fold": fold, "split": split, "model": model,
            "outputs": list(task.outputs), "probability": [float(v) for v in probs],
            "prediction": _prediction(task, probs, thresholds), **path_record("feature_store", bag.store, out),
            "patch_extent_level0_px": bag.extent_px, "grid_step_level0_px": bag.step_px,
            "attention_kind": "normalised attention (sums to 1)" if model not in ("max", "mean") else model + " score",
        })


def _prediction(task: Task, probs: np.ndarray, thresholds: list[float]) -> Any:
    if task.kind == "multiclass":
        return task.outputs[int(np.argmax(probs))]
    if task.kind == "binary":
        return task.classes[int(probs[0] >= thresholds[0])]
    return [name for c, name in enumerate(task.outputs) if probs[c] >= thresholds[c]]


@dataclass
class TrainInputs:
    """The checked inputs of a run: the task and the bags, before anything is written."""

    task: Task
    task_line: str
    bags: list[Bag]
    skipped: list[dict[str, str]]
    user_split: dict[str, str]


def prepare_inputs(manifest: Path, features_dirs: list[Path], config: TrainConfig, *,
                   progress: bool = False) -> TrainInputs:
    """Read and check the manifest, infer the task and read every bag (non-finite
    features included in the check). Labelled slides without a usable feature store stop
    the run (:class:`MissingDataError`, exit 1) unless ``config.allow_missing``."""
    from wsi_mil.data.manifest import manifest_classes, read_manifest
    from wsi_mil.errors import MissingDataError

    require_features(features_dirs)
    entries = read_manifest(manifest, require_path=False)
    task = infer_task(entries, config.task, config.label, config.class_list() or manifest_classes(manifest),
                      config.min_class_slides)
    task_line = task.describe(entries)
    logger.info("%s", task_line)
    user_split = {e.slide_id: e.split for e in entries if e.split}
    bags, skipped = bags_from_manifest(entries, features_dirs, task, user_split, cache=config.cache_bags,
                                       progress=progress)
    if skipped:
        listing = "\n  ".join(f"{x['slide_id']}: {x['reason']}" for x in skipped)
        if not config.allow_missing:
            raise MissingDataError(
                f"{len(skipped)} of {len(entries)} labelled slide(s) have no usable feature store:\n  {listing}\n"
                "Fix the slide_id(s) or extract their features; or pass --allow-missing to train without them "
                "(they are then listed in the report).")
        for x in skipped:
            logger.warning("%s: left out (--allow-missing): %s", x["slide_id"], x["reason"])
    if len(bags) < 4:
        raise ManifestError(f"only {len(bags)} slide(s) have usable feature stores; training needs at least 4 "
                            f"({len(skipped)} left out, listed above)")
    return TrainInputs(task, task_line, bags, skipped, user_split)


def cpu_threads(bags: list[Bag], requested: int | None) -> int:
    """Threads for training on CPU: ``requested``, else 1 for bags of up to 4096 instances
    (a small MIL model's matrix products are too small to share: more threads only
    contend, badly so on a busy machine), else up to 4."""
    import os

    if requested:
        return requested
    sizes = [int(b.meta.get("n_features") or (len(b.features) if b.features is not None else 0)) for b in bags]
    median = float(np.median(sizes)) if sizes else 0.0
    return 1 if median <= 4096 else max(1, min(4, os.cpu_count() or 1))


def run_train(manifest: Path, features_dirs: list[Path], *, out_dir: Path, config: TrainConfig,
              progress: bool = True, inputs: TrainInputs | None = None) -> TrainReport:
    """Train and evaluate every fold (see the module docstring); the process's CPU thread
    count is set for the run (:func:`cpu_threads`) and restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    try:
        return _run_train(manifest, features_dirs, out_dir=out_dir, config=config, progress=progress, inputs=inputs)
    finally:
        torch.set_num_threads(saved)


def _run_train(manifest: Path, features_dirs: list[Path], *, out_dir: Path, config: TrainConfig,
               progress: bool, inputs: TrainInputs | None) -> TrainReport:
    import torch
    from tqdm import tqdm

    from wsi_mil.data.splits import make_plan, plan_from_user_split, prevalence_weights
    from wsi_mil.eval.metrics import ensemble_threshold
    from wsi_mil.mil import build_model
    from wsi_mil.train.checkpoint import load_model, save_model
    from wsi_mil.train.loop import FitSettings, Predictions, fit, predict, seed_everything

    t0 = time.perf_counter()
    if inputs is None:
        inputs = prepare_inputs(manifest, features_dirs, config, progress=progress)
    else:  # already printed when the inputs were checked; the run's log file gets it too
        logger.debug("%s", inputs.task_line)
    task, bags, skipped, user_split = inputs.task, inputs.bags, inputs.skipped, inputs.user_split
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = encoder_of(bags)
    by_id = {b.slide_id: b for b in bags}
    plan = plan_from_user_split(bags, seed=config.seed) if user_split else make_plan(
        bags, folds=config.folds, test_fraction=config.test_fraction, seed=config.seed,
        min_minority_share=config.min_minority_share)
    write_json(out_dir / "splits.json", plan.to_dict())
    dim = int(bags[0].load()[0].shape[1])
    device = config.resolved_device()
    threads = cpu_threads(bags, config.threads)
    if device == "cpu":
        torch.set_num_threads(threads)
        logger.info("training on %d CPU thread(s)%s", threads, "" if config.threads else " (--threads to change)")
    test = [by_id[s] for s in plan.test]
    logger.info("task %s (%s); %d slides, %d patients; %d fold(s); test set %d slides; device %s",
                task.kind, ", ".join(task.outputs), len(bags), len({b.patient_id for b in bags}), len(plan.folds), len(test), device)
    folds_out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    test_probs, test_atts, thresholds_all = [], [], []
    pooled_y, pooled_p, pooled_t = [], [], []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for fold in plan.folds:
        train, val = [by_id[s] for s in fold.train], [by_id[s] for s in fold.val]
        stem = out_dir / "models" / f"fold{fold.index}"
        h = _settings_hash(config, fold, dim)
        spec: dict[str, Any]
        if stem.with_suffix(".json").exists() and json.loads(stem.with_suffix(".json").read_text()).get("settings_hash") == h:
            model, spec = load_model(stem)
            histories[f"fold{fold.index}"] = spec.get("history", [])
            logger.info("fold %d: trained model found, not training again", fold.index)
            val_pred = predict(model, val, task, device=device)
        else:
            seed_everything(config.seed + fold.index)  # the initial weights do not depend on what ran before
            model = build_model(config.model, dim, task.n_outputs, **config.model_args())
            settings = FitSettings(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, patience=config.patience,
                                   monitor=config.monitor, bags_per_batch=config.bags_per_batch, max_instances=config.max_instances,
                                   imbalance=config.imbalance, focal_gamma=config.focal_gamma, seed=config.seed + fold.index,
                                   device=device)
            bar = tqdm(total=config.epochs, desc=f"fold {fold.index}", unit="epoch", disable=not progress)

            def log(row: dict[str, Any], bar: Any = bar, k: int = fold.index) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=row.get("val_auc"))
                logger.debug("fold %d %s", k, row)

            result = fit(model, train, val, task, settings, log)
            bar.close()
            histories[f"fold{fold.index}"] = result.history
            val_pred = predict(model, val, task, device=device)  # the selected weights
            spec = {"model": config.model, "in_dim": dim, "n_outputs": task.n_outputs, "model_args": config.model_args(),
                    "task": task.to_dict(), "encoder": encoder, "fold": fold.index, "best_epoch": result.best_epoch,
                    "thresholds": _threshold(task, val_pred.targets, val_pred.probs, config),
                    "threshold_method": config.threshold, "settings_hash": h, "wsi_mil_version": __version__,
                    "history": result.history}
            save_model(stem, model, spec)
            if result.history:
                write_csv(out_dir / "history" / f"fold{fold.index}.csv", result.history)
        thresholds = spec["thresholds"]
        thresholds_all.append(thresholds)
        test_pred = predict(model, test, task, device=device)
        pooled_y.append(val_pred.targets)
        pooled_p.append(val_pred.probs)
        pooled_t.append([np.full(len(val), t) for t in thresholds])  # each fold's own threshold
        entry: dict[str, Any] = {"fold": fold.index, "n_train": len(train), "n_val": len(val), "best_epoch": spec.get("best_epoch"),
                                 "thresholds": thresholds,
                                 "val": evaluate(task, val_pred.targets, val_pred.probs, thresholds, config, ci=False),
                                 "test": evaluate(task, test_pred.targets, test_pred.probs, thresholds, config)}
        folds_out.append(entry)
        for split, bag_list, pred in (("val", val, val_pred), ("test", test, test_pred)):
            _write_attention(out_dir / "attention" / f"fold{fold.index}", bag_list, pred, task, fold=str(fold.index),
                             split=split, thresholds=thresholds, model=config.model)
            rows += _rows(task, bag_list, pred, thresholds, fold=str(fold.index), split=split)
        if test and task.kind == "binary":
            curves[f"fold {fold.index} test"] = (test_pred.targets[:, 0], test_pred.probs[:, 0])
        test_probs.append(test_pred.probs)
        test_atts.append(test_pred.attention)
    metrics: dict[str, Any] = {"task": task.to_dict(), "model": config.model, "encoder": encoder,
                               "n_slides": len(bags), "n_patients": len({b.patient_id for b in bags}),
                               "splits": {"source": plan.source, "folds": len(plan.folds), "test": len(test),
                                          "test_sampling": plan.test_sampling},
                               "folds": folds_out}
    py, pp = np.concatenate(pooled_y), np.concatenate(pooled_p)
    # out-of-fold predictions are judged at the threshold of the fold that made them; the
    # fold ensemble (mean probability) at the logit-space mean of the folds' thresholds
    per_fold_thr = [np.concatenate([t[c] for t in pooled_t]) for c in range(len(thresholds_all[0]))]
    pooled_thr = [ensemble_threshold([t[c] for t in thresholds_all]) for c in range(len(thresholds_all[0]))]
    metrics["pooled_validation"] = evaluate(task, py, pp, per_fold_thr, config)  # type: ignore[arg-type]
    if task.kind == "binary":
        curves["pooled validation (out of fold)"] = (py[:, 0], pp[:, 0])
    if test:
        mean_p = np.mean(test_probs, axis=0)
        ens_y = np.stack([b.target for b in test])
        metrics["ensemble_test"] = evaluate(task, ens_y, mean_p, pooled_thr, config)
        metrics["across_folds_test"] = _across(folds_out, "test")
        if plan.test_sampling and task.kind == "binary":
            w = prevalence_weights(ens_y[:, 0].astype(int), plan.test_sampling["true_share"],
                                   plan.test_sampling["minority_class"])
            metrics["ensemble_test_at_true_prevalence"] = evaluate(task, ens_y, mean_p, pooled_thr, config, weights=w)
        ens_att = [np.mean([fa[i] for fa in test_atts], axis=0) for i in range(len(test))]

        ens = Predictions([b.slide_id for b in test], ens_y, mean_p, ens_att)
        _write_attention(out_dir / "attention" / "ensemble", test, ens, task, fold="ensemble", split="test",
                         thresholds=pooled_thr, model=config.model)
        rows += _rows(task, test, ens, pooled_thr, fold="ensemble", split="test")
        if task.kind == "binary":
            curves["ensemble test"] = (ens_y[:, 0], mean_p[:, 0])
    metrics["across_folds_val"] = _across(folds_out, "val")
    metrics["skipped"] = skipped
    metrics["threshold_rule"] = THRESHOLD_RULE
    metrics["task_line"] = inputs.task_line
    metrics["seed"] = config.seed
    metrics["threads"] = threads if device == "cpu" else None
    metrics["seconds"] = time.perf_counter() - t0
    _write_outputs(out_dir, task, metrics, rows, curves, histories)
    return TrainReport(out_dir, task, metrics, skipped, metrics["seconds"])


def _across(folds: list[dict[str, Any]], split: str) -> dict[str, Any]:
    from wsi_mil.eval.metrics import summarise

    keys = [k for k in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
            if any(k in f[split] for f in folds)]
    return {k: summarise([f[split].get(k) for f in folds]) for k in keys}


def _rows(task: Task, bags: list[Bag], pred: Any, thresholds: list[float], *, fold: str, split: str) -> list[dict[str, Any]]:
    rows = []
    for bag, probs in zip(bags, pred.probs, strict=True):
        row: dict[str, Any] = {"slide_id": bag.slide_id, "patient_id": bag.patient_id, "fold": fold, "split": split}
        truth: Any = _prediction(task, bag.target, [0.5] * task.n_outputs)
        row["label"] = ";".join(truth) if isinstance(truth, list) else truth
        for c, name in enumerate(task.outputs):
            row[f"prob_{name}"] = round(float(probs[c]), 6)
        pr = _prediction(task, probs, thresholds)
        row["prediction"] = ";".join(pr) if isinstance(pr, list) else pr
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _binary_line(name: str, m: dict[str, Any]) -> str:
    ci = m.get("auc_ci95")
    auc = _fmt(m.get("auc")) + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
    return "| " + " | ".join([name, str(m.get("n", "")), auc] + [_fmt(m.get(k)) for k in METRIC_KEYS[1:]] + [_fmt(m.get("threshold"))]) + " |"


def _write_outputs(out: Path, task: Task, metrics: dict[str, Any], rows: list[dict[str, Any]],
                   curves: dict[str, tuple[np.ndarray, np.ndarray]], histories: dict[str, list[dict[str, Any]]]) -> None:
    from wsi_mil.eval.plots import confusion_plot, curves_plot, roc_plot

    write_json(out / "metrics.json", metrics)
    write_csv(out / "predictions.csv", rows)
    if curves:
        roc_plot(out / "roc.png", curves, f"{metrics['model']}: ROC")
    head = metrics.get("ensemble_test") or metrics.get("pooled_validation") or {}
    if "confusion" in head:
        classes = list(task.classes) if task.kind == "binary" else list(task.outputs)
        confusion_plot(out / "confusion.png", head["confusion"], classes,
                       "ensemble, test set" if metrics.get("ensemble_test") else "pooled validation")
    if any(histories.values()):
        curves_plot(out / "training_curves.png", histories)
    write_text(out / "report.md", report_markdown(task, metrics))


def report_markdown(task: Task, m: dict[str, Any]) -> str:
    s = m["splits"]
    how = ("the manifest's split column" if s["source"] == "manifest"
           else f"stratified patient-level splits made by wsi-mil (seed {m.get('seed', 0)})")
    test = f"a held-out test set of {s['test']} slides" if s["test"] else "no held-out test set"
    lines = [f"# train-mil report: {m['model']} ({task.kind}: {', '.join(task.outputs)})", "",
             f"{m['n_slides']} slides of {m['n_patients']} patients; encoder `{m['encoder'].get('encoder')}`.", "",
             f"Task: {m.get('task_line', task.kind)}.", "",
             f"Splits: {how}; {s['folds']} cross-validation fold(s) and {test}; no patient is in two sets.", "",
             f"Decision threshold: {m.get('threshold_rule', '')}.", ""]
    if s.get("test_sampling"):
        t = s["test_sampling"]
        lines += [f"Test set enriched: minority-class share {t['sampled_share']:.2f} (true {t['true_share']:.2f}); "
                  "metrics are given at both prevalences.", ""]
    if task.kind == "binary":
        header = "| set | n | AUC (95% CI) | sensitivity | specificity | PPV | NPV | F1 | accuracy | balanced acc. | threshold |"
        lines += [header, "|" + "---|" * 11]
        for name, key in (("ensemble of folds, test", "ensemble_test"), ("… at the true prevalence", "ensemble_test_at_true_prevalence"),
                          ("pooled out-of-fold validation", "pooled_validation")):
            if m.get(key):
                lines.append(_binary_line(name, m[key]))
        for f in m["folds"]:
            if f["test"]:
                lines.append(_binary_line(f"fold {f['fold']}, test", f["test"]))
            lines.append(_binary_line(f"fold {f['fold']}, validation", f["val"]))
    else:
        lines += ["| set | n | AUC | accuracy | balanced acc. |", "|---|---|---|---|---|"]
        for name, key in (("ensemble of folds, test", "ensemble_test"), ("pooled out-of-fold validation", "pooled_validation")):
            if m.get(key):
                mm = m[key]
                lines.append(f"| {name} | {mm.get('n')} | {_fmt(mm.get('auc'))} | {_fmt(mm.get('accuracy'))} | {_fmt(mm.get('balanced_accuracy'))} |")
    for split in ("test", "val"):
        acc = m.get(f"across_folds_{split}")
        if acc:
            lines += ["", f"Across folds ({split}): " + ", ".join(
                f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in acc.items() if v["mean"] is not None)]
    if m.get("skipped"):
        lines += ["", f"**Left out with --allow-missing ({len(m['skipped'])} labelled slide(s) without a usable "
                  "feature store; the figures above do not include them):**", ""]
        lines += [f"- {x['slide_id']}: {x['reason']}" for x in m["skipped"]]
    lines += ["", "Files: metrics.json, predictions.csv, roc.png, confusion.png, training_curves.png, models/, attention/.", ""]
    return "\n".join(lines)


def require_features(features_dirs: list[Path]) -> None:
    for d in features_dirs:
        if not d.is_dir():
            raise ConfigError(f"--features {d}: not a folder; give the features/ folder written by extract-features")


def summary_text(report: TrainReport) -> str:
    """The few lines printed at the end of a run."""
    head = report.headline()
    where = "ensemble of folds on the held-out test set" if report.metrics.get("ensemble_test") else "pooled out-of-fold validation"
    t = report.task
    what = f"{t.classes[1]} vs {t.classes[0]}" if t.kind == "binary" else ", ".join(t.outputs)
    lines = [f"{report.metrics.get('task_line') or f'task {t.kind} ({what})'}", f"{report.metrics['n_slides']} slides; {where}:"]
    if report.task.kind == "binary":
        ci = head.get("auc_ci95")
        auc = f"{head['auc']:.3f}" if head.get("auc") is not None else "n/a"
        lines.append(f"  AUC {auc}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                     + "".join(f", {k} {head[k]:.3f}" for k in ("sensitivity", "specificity", "ppv", "f1") if head.get(k) is not None))
    else:
        lines.append("  " + ", ".join(f"{k} {head[k]:.3f}" for k in ("auc", "accuracy", "balanced_accuracy") if head.get(k) is not None))
    if report.skipped:
        lines.append(f"  {len(report.skipped)} labelled slide(s) LEFT OUT (--allow-missing; no usable feature store): "
                     + ", ".join(x["slide_id"] for x in report.skipped[:10]) + "; listed in report.md")
    lines.append(f"report: {report.out_dir / 'report.md'}   metrics: {report.out_dir / 'metrics.json'}   models: {report.out_dir / 'models'}")
    return "\n".join(lines)
