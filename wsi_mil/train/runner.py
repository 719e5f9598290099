"""The cross-validated training run every trainer shares (slides with ``train-mil``, images
with ``train-image``): splits, one model per fold trained by the one loop
(``wsi_mil.train.loop.fit``), thresholds chosen on validation, evaluation of every fold, the
pooled out-of-fold predictions and the fold ensemble, calibration, predictions.csv,
metrics.json, report.md and the plots. What differs between modalities enters through a
:class:`Road`: how samples are fed, which model is built, what is written per sample.

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
from typing import Any, Protocol

import numpy as np

from wsi_mil import __version__
from wsi_mil.data.bags import Task
from wsi_mil.io.atomic import write_csv, write_json, write_text

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
        """The numbers people look at first (``headline_set`` says which and why)."""
        return self.metrics.get(headline_set(self.metrics)) or {}


#: a fold whose validation or test AUC is at or below this learned nothing (or the inverse)
FAILED_FOLD_AUC = 0.5
#: folds whose test AUCs spread more than this (standard deviation) disagree
DISAGREE_SD = 0.1
SET_NAMES = {"ensemble_test": "ensemble of folds on the held-out test set",
             "pooled_validation": "pooled out-of-fold validation"}


def fold_health(folds: list[dict[str, Any]], key: str = "auc", name: str = "AUC",
                failed_at: float = FAILED_FOLD_AUC) -> dict[str, Any]:
    """Failed folds (validation or test score ``key`` <= ``failed_at``: chance) and whether the folds
    disagree (a failed fold, or test scores spread by more than ``DISAGREE_SD``). The score is the
    task kind's: AUC, Harrell's C (chance 0.5), R² (chance 0)."""
    failed = []
    for f in folds:
        why = [f"{split_name} {name} {f[split][key]:.3f}" for split, split_name in (("val", "validation"), ("test", "test"))
               if f.get(split) and f[split].get(key) is not None and f[split][key] <= failed_at]
        if why:
            failed.append({"fold": f["fold"], "why": ", ".join(why)})
    test = [f["test"][key] for f in folds if f.get("test") and f["test"].get(key) is not None]
    sd = float(np.std(test, ddof=1)) if len(test) > 1 else 0.0
    return {"failed": failed, "n_folds": len(folds), "test_auc_sd": sd, "disagree": bool(failed) or sd > DISAGREE_SD,
            "score": name}


def _with_parts(health: dict[str, Any], parts: dict[str, tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """A multi-task run's health: a fold fails when any target's score is at or below its chance (a target that
    failed is never hidden behind the others' mean)."""
    failed = {f["fold"]: [f["why"]] for f in health["failed"]}
    for name, (view, kind) in parts.items():
        for f in fold_health(view["folds"], kind.score_key, f"{name} {kind.score_name}", kind.chance)["failed"]:
            failed.setdefault(f["fold"], []).append(f["why"])
    health["failed"] = [{"fold": k, "why": ", ".join(v)} for k, v in sorted(failed.items())]
    health["disagree"] = health["disagree"] or bool(health["failed"])
    return health


def failed_folds_text(health: dict[str, Any]) -> str:
    """``fold 1: validation AUC 0.330; fold 3: test AUC 0.400``."""
    return "; ".join(f"fold {f['fold']}: {f['why']}" for f in health.get("failed", []))


def choose_headline(metrics: dict[str, Any], key: str = "auc", name: str = "AUC") -> dict[str, str]:
    """The set whose figures lead the report: the held-out test ensemble when it can be
    trusted, else the pooled out-of-fold predictions (more cases, every fold's own model);
    ``key`` / ``name``: the task kind's score."""
    ens, pooled = metrics.get("ensemble_test"), metrics.get("pooled_validation")
    if not ens:
        return {"set": "pooled_validation", "why": "no held-out test set"}
    reasons = []
    health = metrics.get("fold_health") or {}
    if health.get("failed"):
        reasons.append(f"{len(health['failed'])} of {health['n_folds']} folds failed, and a fold ensemble hides "
                       "failed folds behind the confident ones")
    elif health.get("disagree"):
        reasons.append(f"the folds disagree on the test set ({name} sd {health['test_auc_sd']:.3f})")
    if ens.get(f"{key}_ci_note"):
        reasons.append(f"the test set's {name} interval is {ens[f'{key}_ci_note']}")
    if reasons and pooled and pooled.get(key) is not None:
        if ens.get(key) is not None and ens[key] < pooled[key]:  # never quote the kinder of the two
            return {"set": "ensemble_test", "why": "; ".join(reasons) + f"; but the held-out test's {name} "
                    f"({ens[key]:.3f}) is below the pooled out-of-fold one ({pooled[key]:.3f}), and the headline "
                    "never quotes the more optimistic figure"}
        return {"set": "pooled_validation", "why": "; ".join(reasons)}
    return {"set": "ensemble_test", "why": "held-out test set; the folds agree"}


def headline_set(metrics: dict[str, Any]) -> str:
    chosen = metrics.get("headline", {}).get("set")
    if chosen:
        return str(chosen)
    return "ensemble_test" if metrics.get("ensemble_test") else "pooled_validation"



#: bumped whenever training itself changes what a fold's model is, so that a resumed run
#: retrains folds made by older code instead of mixing them in (2: validation loss breaks
#: AUC ties in model selection)
TRAINING_REVISION = 5  # 3: thresholds between two validation scores (logit midpoint), not on one;
# 4: max pooling is a smooth maximum, TransMIL convolves position on the patch grid;
# 5: TransMIL reads out its class token by default, as the paper does

#: settings that change how a run is carried out, not what a fold's model is
_RUN_ONLY = ("allow_missing", "threads", "cache_bags", "device", "bootstrap", "min_class_slides", "feature_cache",
             "duplicates", "label_sources", "subgroups", "prevalence", "lesion_class", "random_comparison")


#: settings added since folds were last hashed, left out while at their default (a fold trained by the
#: previous version is found again instead of being retrained)
_LATER_FOLD_SETTINGS = {"covariates": None, "fusion": "concat", "targets": None, "target_weights": None,
                        "survival_loss": "cox", "time_bins": None,
                        "regression_loss": "huber", "standardise_target": True, "folds_by": None,
                        "bag": "slide", "patient_max_instances": 65536}


def _settings_hash(config: Any, fold: Any, dim: int, extra: dict[str, Any] | None = None) -> str:
    model_settings = {k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY
                      and not (k in _LATER_FOLD_SETTINGS and v == _LATER_FOLD_SETTINGS[k])}
    payload: dict[str, Any] = {"config": model_settings, "train": fold.train, "val": fold.val, "dim": dim,
                               "training_revision": TRAINING_REVISION}
    if extra:
        payload["inputs"] = extra
    body = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _threshold(task: Task, y: np.ndarray, p: np.ndarray, config: Any) -> list[float]:
    return task.kind_obj.thresholds(task, y, p, config.threshold, config.target_sensitivity)


def evaluate(task: Task, y: np.ndarray, p: np.ndarray, thresholds: list[float] | list[np.ndarray], config: Any,
             weights: np.ndarray | None = None, ci: bool = True) -> dict[str, Any]:
    """Metrics of predictions ``p`` (n, C) against targets ``y`` (n, C); a NaN target (a
    blank label) leaves that sample out of that label's metrics. Binary and multi-label
    metrics include the expected calibration error (``ece``)."""
    if len(y) == 0:
        return {}
    return task.kind_obj.evaluate(task, y, p, thresholds, config, weights, ci)


def _prediction(task: Task, probs: np.ndarray, thresholds: list[float]) -> Any:
    return task.kind_obj.predicted(task, probs, thresholds)


# ---- run ----
class Road(Protocol):
    """What one modality brings to :func:`run_cv`."""

    unit: str  # "slide" or "image": the word reports use
    command: str  # the command that made the run
    encoder: dict[str, Any]  # provenance of the features / backbone
    dim: int  # input dimension recorded with each model
    model_name: str  # shown in reports

    def feeder(self, samples: list[Any], train: bool) -> Any: ...
    def new_model(self) -> Any: ...
    def param_groups(self, model: Any) -> list[dict[str, Any]] | None: ...
    def spec(self) -> dict[str, Any]: ...
    def save(self, stem: Path, model: Any, spec: dict[str, Any]) -> None: ...
    def load(self, stem: Path) -> tuple[Any, dict[str, Any]]: ...
    def fit_settings(self, config: Any, fold_index: int, device: str) -> Any: ...
    def inputs_key(self) -> dict[str, Any] | None: ...
    def after_predict(self, out_dir: Path, samples: list[Any], pred: Any, task: Task, *, fold: str, split: str,
                      thresholds: list[float]) -> None: ...


@dataclass
class CvInputs:
    """Checked samples of a run (bags or images) with the task and the given split."""

    task: Task
    task_line: str
    samples: list[Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    user_split: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # extra facts for the report (consensus, leaks ...)
    columns: dict[str, dict[str, str]] = field(default_factory=dict)  # sample id -> manifest column -> value
    checked: CheckedRun | None = None  # the checks before training, when made before the run folder
    sources: dict[str, Any] = field(default_factory=dict)  # the inputs, as part of the run's identity


def run_record(command: str, config: Any, inputs: CvInputs) -> dict[str, Any]:
    """The identity of a training run (:mod:`wsi_mil.io.run_folder`): command, settings, inputs."""
    from wsi_mil.io.run_folder import identity

    return identity(command, config.to_dict(), inputs.sources)


@dataclass
class CheckedRun:
    """What :func:`checks_before_training` found: the audit so far and the split plan."""

    audit: dict[str, Any]
    plan: Any
    nuisances: dict[str, Any] = field(default_factory=dict)  # what the shortcut checks read (wsi_mil.eval.shortcuts)


def checks_before_training(samples: list[Any], pixels: Any, columns: dict[str, dict[str, str]],
                           user_split: dict[str, str], config: Any, unit: str, *, task: Task | None = None) -> CheckedRun:
    """Every check that can refuse a run, made before its output folder exists and before
    any feature is computed: the --subgroups columns, near-duplicates (with the --duplicates
    policy: ``merge`` changes patient ids here, once), the label sources, the split plan and
    the duplicates that would cross it. ``pixels`` (id -> array) gives images / volumes."""
    from wsi_mil.eval.audit_run import (
        apply_duplicate_policy,
        check_leaks,
        duplicate_audit,
        label_source_audit,
        subgroup_columns,
    )

    subgroup_columns([], columns, config.subgroups)  # a --subgroups typo stops the run now, not after training
    found = duplicate_audit(samples, pixels)
    audit: dict[str, Any] = {"duplicates": apply_duplicate_policy(samples, found, config.duplicates)}
    audit["label_sources"] = label_source_audit([b.slide_id for b in samples], columns, config.label_sources)
    strata = task.kind_obj.strata(task, np.stack([np.asarray(s.target, float) for s in samples])) \
        if task is not None and samples else None
    for s, stratum in zip(samples, strata or [], strict=False):
        s.stratum = stratum
    plan = make_split_plan(samples, user_split, config, columns, list(task.classes) if task is not None else None)
    audit["duplicates"]["leaks"] = check_leaks(found, plan, config.duplicates, unit)
    audit["shortcuts"], nz = shortcuts_before_training(samples, columns, task,
                                                       held_out=getattr(config, "folds_by", None))
    return CheckedRun(audit, plan, nz)


def sample_facts(samples: list[Any]) -> dict[str, dict[str, Any]]:
    """Facts of each sample that could come with its label: a slide's patch count and
    tissue area, its scanner's native resolution (slides of one scanner share it; the
    resolution tiled at is one per run, checked elsewhere) and its tissue's colour."""
    from wsi_mil.eval.shortcuts import COLOUR
    from wsi_mil.tiling.tissue import STAIN_NAMES

    out: dict[str, dict[str, Any]] = {}
    for s in samples:
        facts: dict[str, Any] = {}
        meta = getattr(s, "meta", None) or {}
        meta = meta if isinstance(meta, dict) else {}
        n = len(s.features) if getattr(s, "features", None) is not None else meta.get("n_features")
        if n is not None:
            facts["patch count"] = int(n)
        if meta.get("slide_mpp") is not None:
            facts["scanner µm per pixel"] = meta["slide_mpp"]
        if meta.get("tissue_area_mm2") is not None:
            facts["tissue area mm²"] = meta["tissue_area_mm2"]
        for key, name in STAIN_NAMES.items():  # the thumbnail's tissue colour (stores tiled since wsi-mil 0.x)
            if meta.get(key) is not None:
                facts[COLOUR + name] = meta[key]
        out[s.slide_id] = facts
    return out


def shortcuts_before_training(samples: list[Any], columns: dict[str, dict[str, str]], task: Task | None = None,
                              held_out: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every nuisance the inputs carry against the label, each warning logged now, before
    training: binary and multi-class tasks against the class, multi-label tasks against
    each label (one-vs-rest, blanks left out). Returns (the audit's "shortcuts" record, the
    nuisances the checks after training read)."""
    from wsi_mil.eval.shortcuts import label_association, log_findings, nuisances

    targets = [np.atleast_1d(np.asarray(s.target, dtype=float)) for s in samples]
    if not samples:
        return {"note": "no samples"}, {}
    kind = task.kind if task is not None else ("binary" if all(len(t) == 1 for t in targets) else "unknown")
    if kind == "unknown":
        return {"note": "shortcut checks need the task (binary, multiclass or multilabel)"}, {}
    all_ids = [s.slide_id for s in samples]
    found = nuisances(all_ids, columns, sample_facts(samples))
    before: list[dict[str, Any]] = []
    questions = _labelled(kind, all_ids, targets, task)
    if not questions:
        return {"note": f"the shortcut checks compare nuisances between classes; a {kind} task has none (not run)"}, {}
    for label, ids, y, names in questions:
        rows = label_association(ids, y, found, class_names=names)
        before += [{**r, "label": label} if label else r for r in rows]
    record: dict[str, Any] = {"before": before, "checked": sorted(found), "task": kind}
    if held_out:  # --folds-by: that column's association is what the held-out figures are free of
        record["held_out"] = held_out
    log_findings({"before": before, "held_out": held_out}, logger)
    return record, found


def _labelled(kind: str, ids: list[str], targets: Any, task: Task | None
              ) -> list[tuple[str | None, list[str], list[int], list[str] | None]]:
    """(label name or None, ids with a known value, their class index, class names) per
    question the shortcut checks ask: one for binary and multi-class tasks, one per label
    for multi-label ones."""
    from wsi_mil.tasks import kind_of

    t = np.stack([np.asarray(x, dtype=float) for x in targets])
    return kind_of(kind).questions(task, ids, t)


def tensor_pixels(images: Any, samples: list[Any]) -> Any:
    """id -> the image / volume at its row of an (N, 1, ...) tensor (what a road holds)."""
    row = {s.slide_id: i for i, s in enumerate(samples)}
    return lambda sid: images[row[sid], 0].float().numpy()


def make_split_plan(samples: list[Any], user_split: dict[str, str], config: Any,
                    columns: dict[str, dict[str, str]] | None = None, class_names: list[str] | None = None) -> Any:
    from wsi_mil.data.splits import make_plan, plan_by_centre, plan_from_user_split

    column = getattr(config, "folds_by", None)
    if column:
        from wsi_mil.errors import ConfigError

        if user_split:
            raise ConfigError(f"--folds-by {column} makes the folds; the manifest's split column makes its own: "
                              "use one (drop the split column, or --folds-by)")
        columns = columns or {}
        if not any(column in c for c in columns.values()):
            found = sorted({k for c in columns.values() for k, v in c.items() if str(v).strip()})
            raise ConfigError(f"--folds-by {column}: the manifest has no {column!r} column (it has "
                              f"{', '.join(found) or 'no other columns'})")
        return plan_by_centre(samples, {s.slide_id: columns.get(s.slide_id, {}).get(column, "") for s in samples},
                              column, folds=config.folds, seed=config.seed, min_slides=config.min_class_slides,
                              class_names=class_names)
    if user_split:
        return plan_from_user_split(samples, seed=config.seed)
    return make_plan(samples, folds=config.folds, test_fraction=config.test_fraction, seed=config.seed,
                     min_minority_share=config.min_minority_share)


def run_cv(road: Road, inputs: CvInputs, config: Any, out_dir: Path, *, progress: bool = True) -> TrainReport:
    """Train and evaluate every fold of ``inputs`` (see the module docstring)."""
    from tqdm import tqdm

    from wsi_mil.data.splits import prevalence_weights
    from wsi_mil.train.loop import Predictions, fit, predict, seed_everything

    t0 = time.perf_counter()
    task, samples, skipped = inputs.task, inputs.samples, inputs.skipped
    pixels = road_pixels(road)
    checked = inputs.checked or checks_before_training(samples, pixels, inputs.columns, inputs.user_split, config,
                                                       road.unit, task=task)
    audit, plan = dict(checked.audit), checked.plan
    in_test = set(plan.test)  # what the task learns from targets (a regression's scale): the development samples only
    task = task.kind_obj.fitted(task, np.stack([np.asarray(s.target, float) for s in samples if s.slide_id not in in_test]))
    from wsi_mil.io.run_folder import claim, set_folds

    state = claim(out_dir, run_record(road.command, config, inputs))  # a folder of another run is refused, never mixed
    set_folds(out_dir, [f.index for f in plan.folds])
    if state == "resumed":
        done = _finished(out_dir, road, config, plan, task, skipped)
        if done is not None:
            return done
    by_id = {b.slide_id: b for b in samples}
    write_json(out_dir / "splits.json", plan.to_dict())
    device = config.resolved_device()
    test = [by_id[s] for s in plan.test]
    unit = road.unit
    logger.info("task %s (%s); %s; %d fold(s); test set %d %ss; device %s", task.kind, ", ".join(task.outputs),
                f"{len(samples)} patients" if unit == "patient" else
                f"{len(samples)} {unit}s, {len({b.patient_id for b in samples})} patients",
                len(plan.folds), len(test), unit, device)
    folds_out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    test_probs, test_atts, thresholds_all = [], [], []
    ablation: dict[str, dict[str, list[np.ndarray]]] = {}
    test_shares: list[list[np.ndarray] | None] = []
    pooled_y, pooled_p, pooled_t, pooled_ids = [], [], [], []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    test_feed = road.feeder(test, False) if test else None
    for fold in plan.folds:
        train, val = [by_id[s] for s in fold.train], [by_id[s] for s in fold.val]
        prepare_fold = getattr(road, "prepare_fold", None)  # (what a fold fits on its training samples: covariates)
        if prepare_fold is not None:
            prepare_fold(train, samples)
        val_feed = road.feeder(val, False)
        stem = out_dir / "models" / f"fold{fold.index}"
        h = _settings_hash(config, fold, road.dim, road.inputs_key())
        spec: dict[str, Any]
        if stem.with_suffix(".json").exists() and json.loads(stem.with_suffix(".json").read_text()).get("settings_hash") == h:
            model, spec = road.load(stem)
            histories[f"fold{fold.index}"] = spec.get("history", [])
            logger.info("fold %d: trained model found, not training again", fold.index)
            val_pred = predict(model, val_feed, task, device=device)
        else:
            seed_everything(config.seed + fold.index)  # the initial weights do not depend on what ran before
            model = road.new_model()
            bar = tqdm(total=config.epochs, desc=f"fold {fold.index}", unit="epoch", disable=not progress)

            def log(row: dict[str, Any], bar: Any = bar, k: int = fold.index) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=row.get("val_auc"))
                logger.debug("fold %d %s", k, row)

            result = fit(model, road.feeder(train, True), val_feed, task, road.fit_settings(config, fold.index, device),
                         log, param_groups=road.param_groups(model))
            bar.close()
            histories[f"fold{fold.index}"] = result.history
            val_pred = predict(model, val_feed, task, device=device)  # the selected weights
            spec = {**road.spec(), "task": task.to_dict(), "encoder": road.encoder, "fold": fold.index,
                    "best_epoch": result.best_epoch,
                    "thresholds": _threshold(task, val_pred.targets, val_pred.probs, config),
                    "threshold_method": config.threshold, "settings_hash": h, "wsi_mil_version": __version__,
                    "training_revision": TRAINING_REVISION, "history": result.history}
            road.save(stem, model, spec)
            if result.history:
                write_csv(out_dir / "history" / f"fold{fold.index}.csv", result.history)
        thresholds = spec["thresholds"]
        thresholds_all.append(thresholds)
        test_pred = predict(model, test_feed, task, device=device) if test_feed is not None else Predictions(
            [], np.zeros((0, task.n_targets), np.float32), np.zeros((0, task.n_outputs)), [])
        pooled_ids += [(b.slide_id, f"fold{fold.index}") for b in val]
        pooled_y.append(val_pred.targets)
        pooled_p.append(val_pred.probs)
        pooled_t.append([np.full(len(val), t) for t in thresholds])  # each fold's own threshold
        entry: dict[str, Any] = {"fold": fold.index, "n_train": len(train), "n_val": len(val), "best_epoch": spec.get("best_epoch"),
                                 "thresholds": thresholds,
                                 "val": evaluate(task, val_pred.targets, val_pred.probs, thresholds, config, ci=False),
                                 "test": evaluate(task, test_pred.targets, test_pred.probs, thresholds, config)}
        folds_out.append(entry)
        for split, sample_list, pred in (("val", val, val_pred), ("test", test, test_pred)):
            road.after_predict(out_dir, sample_list, pred, task, fold=str(fold.index), split=split, thresholds=thresholds)
            rows += _rows(task, sample_list, pred, thresholds, fold=str(fold.index), split=split, unit=unit)
        if test and task.kind_obj.single_positive:
            curves[f"fold {fold.index} test"] = _known(test_pred.targets[:, 0], test_pred.probs[:, 0])
        test_probs.append(test_pred.probs)
        test_atts.append(test_pred.attention)
        test_shares.append(test_pred.contribution)
        ablate = getattr(road, "ablations", None)  # (--covariates: what each input gives alone)
        for variant, by_set in (ablate(model, train, {"val": val, "test": test}, task, device) if ablate else {}).items():
            for split, probs in by_set.items():
                ablation.setdefault(variant, {}).setdefault(split, []).append(probs)
    metrics: dict[str, Any] = {"task": task.to_dict(), "model": road.model_name, "encoder": road.encoder,
                               "unit": unit, "command": road.command,
                               f"n_{unit}s": len(samples), "n_patients": len({b.patient_id for b in samples}),
                               "splits": {"source": plan.source, "folds": len(plan.folds), "test": len(test),
                                          "test_sampling": plan.test_sampling,
                                          **({"centres": plan.centres} if plan.centres else {})},
                               "folds": folds_out, **inputs.notes}
    py, pp = np.concatenate(pooled_y), np.concatenate(pooled_p)
    # out-of-fold predictions are judged at the threshold of the fold that made them; the
    # fold ensemble (mean probability) at the logit-space mean of the folds' thresholds
    n_thr = len(thresholds_all[0])
    per_fold_thr = [np.concatenate([t[c] for t in pooled_t]) for c in range(n_thr)]
    pooled_thr = task.kind_obj.ensemble_thresholds(task, thresholds_all)
    metrics["pooled_validation"] = evaluate(task, py, pp, per_fold_thr, config)
    calibration: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if task.kind_obj.single_positive:
        curves["pooled validation (out of fold)"] = _known(py[:, 0], pp[:, 0])
        calibration["pooled validation (out of fold)"] = _known(py[:, 0], pp[:, 0])
    if test:
        assert test_feed is not None  # made whenever there is a test set
        mean_p = np.mean(test_probs, axis=0)
        ens_y = test_feed.targets
        metrics["ensemble_test"] = evaluate(task, ens_y, mean_p, pooled_thr, config)
        metrics["across_folds_test"] = _across(folds_out, "test")
        if plan.test_sampling and task.kind_obj.single_positive:
            w = prevalence_weights(ens_y[:, 0].astype(int), plan.test_sampling["true_share"],
                                   plan.test_sampling["minority_class"])
            metrics["ensemble_test_at_true_prevalence"] = evaluate(task, ens_y, mean_p, pooled_thr, config, weights=w)
        ens_att = [np.mean([fa[i] for fa in test_atts], axis=0) for i in range(len(test))]
        # (the ensemble's output is the folds' mean: so are its patches' shares of it)
        ens_share = None if any(fs is None for fs in test_shares) else \
            [np.mean([fs[i] for fs in test_shares if fs is not None], axis=0) for i in range(len(test))]
        ens = Predictions([b.slide_id for b in test], ens_y, mean_p, ens_att, contribution=ens_share)
        road.after_predict(out_dir, test, ens, task, fold="ensemble", split="test", thresholds=pooled_thr)
        rows += _rows(task, test, ens, pooled_thr, fold="ensemble", split="test", unit=unit)
        if task.kind_obj.single_positive:
            curves["ensemble test"] = _known(ens_y[:, 0], mean_p[:, 0])
            calibration["ensemble test"] = _known(ens_y[:, 0], mean_p[:, 0])
    # kinds with several outputs add a reliability line per output: the test ensemble, else out of fold
    ys, ps, where = ((test_feed.targets, np.mean(test_probs, axis=0), "test") if test_feed is not None  # (iff test)
                     else (py, pp, "out of fold"))
    calibration.update(task.kind_obj.calibration_lines(task, ys, ps, where))
    metrics["figures"] = task.kind_obj.plots(task, out_dir, ys, ps, where,
                                             pooled_thr if test_feed is not None else per_fold_thr)
    if calibration and not task.kind_obj.class_call:  # (a multi-task's classifier targets: drawn below)
        metrics["figures"].append("reliability.png")
    if ablation:
        metrics["ablation"] = _ablation(task, ablation, py, pp, test_feed.targets if test_feed is not None else None,
                                        np.mean(test_probs, axis=0) if test_feed is not None else None)
    metrics["across_folds_val"] = _across(folds_out, "val")
    kind = task.kind_obj
    metrics["fold_health"] = _with_parts(fold_health(folds_out, kind.score_key, kind.score_name, kind.chance),
                                         kind.part_views(task, metrics))
    metrics["headline"] = choose_headline(metrics, kind.score_key, kind.score_name)
    if plan.centres:  # (each centre held out once: the pooled out-of-fold figure is the site-held-out one)
        metrics["by_centre"] = _by_centre(task, plan.centres, pooled_ids, py, pp, per_fold_thr, inputs.columns, config)
        metrics["headline"]["why"] = (f"{plan.centres['protocol']}: every {plan.centres['column']} is held out once "
                                      "and scored by a model trained without it; the pooled out-of-fold figure is the "
                                      f"{plan.centres['column']}-held-out one")
        if config.select == "best":  # (the held-out centre is also each fold's validation set)
            metrics["by_centre"]["note"] = (
                f"each fold's epoch (--select best) and decision threshold were chosen on its held-out "
                f"{plan.centres['column']} itself: the figures lean optimistic (--select swa trains a fixed schedule)")
    # the audit looks at the headline's set: the test ensemble, or the pooled out-of-fold validation
    if task.kind_obj.single_positive:
        ev: tuple[Any, ...]
        if test and headline_set(metrics) == "ensemble_test":
            ev = ("ensemble test", [(b.slide_id, "ensemble") for b in test], ens_y[:, 0], mean_p[:, 0], pooled_thr[0])
        else:
            ev = ("pooled out-of-fold validation", pooled_ids, py[:, 0], pp[:, 0], per_fold_thr[0])
        audit["evaluation"] = _evaluation_audit(ev, by_id, inputs.columns, config, out_dir)
        audit["shortcuts"] = _shortcuts_after(dict(audit.get("shortcuts") or {}), ev, checked.nuisances, out_dir, unit,
                                              getattr(config, "lesion_class", "Tumor"))
    else:
        audit["evaluation_note"] = "subgroups, operating points and the error gallery are computed for binary tasks"
        on_test = bool(test) and headline_set(metrics) == "ensemble_test"
        audit["shortcuts"] = _shortcuts_after_per_output(
            dict(audit.get("shortcuts") or {}), "ensemble test" if on_test else "pooled out-of-fold validation",
            [b.slide_id for b in test] if on_test else [k for k, _ in pooled_ids],
            ens_y if on_test else py, mean_p if on_test else pp, task, checked.nuisances)
    metrics["audit"] = audit
    _audit_files(out_dir, audit, by_id, pixels)
    metrics["skipped"] = skipped
    metrics["threshold_rule"] = task.kind_obj.threshold_rule(THRESHOLD_RULE, task).replace("validation slides", f"validation {unit}s")
    metrics["task_line"] = inputs.task_line
    metrics["seed"] = config.seed
    select = getattr(config, "select", "best")
    metrics["model_selection"] = (
        f"swa: every one of {config.epochs} epochs trained, the weights averaged over epochs {config.epochs // 2 + 1}-"
        f"{config.epochs} (a fixed schedule; validation not used to choose)" if select == "swa" else
        f"best: the epoch with the best validation "
        f"{task.kind_obj.score_name if getattr(config, 'monitor', 'auc') == 'auc' else 'loss'} (validation loss breaks ties), "
        f"early stopping after {getattr(config, 'patience', '?')} epochs without improvement")
    metrics["seconds"] = time.perf_counter() - t0
    _write_outputs(out_dir, task, metrics, rows, curves, histories, calibration)
    from wsi_mil.io.run_folder import mark_finished

    mark_finished(out_dir)  # a re-run of the same run with the same inputs now has nothing to do
    return TrainReport(out_dir, task, metrics, skipped, metrics["seconds"])


#: what a finished run holds besides its models (a run missing one is evaluated again)
FINISHED_OUTPUTS = ("metrics.json", "predictions.csv", "report.md", "splits.json")


def _finished(out_dir: Path, road: Road, config: Any, plan: Any, task: Task, skipped: list[Any]) -> TrainReport | None:
    """The report of a run that is already finished with these settings and inputs (its
    identity is checked by ``claim``): every fold's model trained with these settings and
    every output there, so nothing is trained, evaluated or written again; else None."""
    from wsi_mil.io.run_folder import read_run

    run = read_run(out_dir) or {}
    if not run.get("finished") or not all((out_dir / name).is_file() for name in FINISHED_OUTPUTS):
        return None
    if road.unit == "slide" and not (out_dir / "attention").is_dir():
        return None
    for fold in plan.folds:
        spec_path = out_dir / "models" / f"fold{fold.index}.json"
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            return None
        if spec.get("settings_hash") != _settings_hash(config, fold, road.dim, road.inputs_key()) or \
                not spec_path.with_suffix(".safetensors").is_file():
            return None
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    logger.info("%s: up to date (every fold trained, every output written, nothing changed): nothing to do; "
                "--overwrite trains it again", out_dir)
    return TrainReport(out_dir, task, metrics, skipped, 0.0)


def _shortcuts_after(record: dict[str, Any], ev: tuple[Any, ...], found: dict[str, Any], out_dir: Path,
                     unit: str, lesion_class: str = "Tumor") -> dict[str, Any]:
    """The shortcut checks after training, on the headline's set (``ev``): predictions
    against every nuisance, and, for slides with lesion masks, localisation; each warning
    logged."""
    from wsi_mil.eval.localisation import run_localisation
    from wsi_mil.eval.metrics import auc
    from wsi_mil.eval.shortcuts import localisation_warning, log_findings, prediction_dependence

    name, keys, y, p, _ = ev
    ids = [k for k, _ in keys]
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    ok = np.isin(y, (0.0, 1.0))
    record["set"] = name
    record["after"] = prediction_dependence([i for i, k in zip(ids, ok, strict=True) if k], y[ok], p[ok], found)
    if unit == "slide":
        loc = run_localisation(out_dir, lesion_class)
        if loc is not None:
            record["localisation"] = loc
            record["localisation_warning"] = localisation_warning(auc(y[ok], p[ok]), loc)
    log_findings({"after": record["after"], "localisation_warning": record.get("localisation_warning")}, logger)
    return record


def _evaluation_audit(ev: tuple[Any, ...], by_id: dict[str, Any], columns: dict[str, dict[str, str]], config: Any,
                      out_dir: Path) -> dict[str, Any]:
    from wsi_mil.eval.audit_run import prediction_audit

    name, keys, y, p, thr = ev
    ids = [k for k, _ in keys]
    links = []
    for sid, folder in keys:  # a slide's attention (its heatmap's source), relative to the run folder
        rel = Path("attention") / folder / f"{sid}.h5"
        links.append(rel.as_posix() if (out_dir / rel).exists() else None)
    return prediction_audit(ids, [str(by_id[i].patient_id) for i in ids], np.asarray(y, dtype=float), np.asarray(p, dtype=float),
                            thr, set_name=name, columns=columns, subgroups=config.subgroups, prevalence=config.prevalence,
                            n_boot=config.bootstrap, seed=config.seed, links=links)


def road_pixels(road: Any) -> Any:
    """id -> the image / volume a road holds in memory (its ``images`` tensor, row per
    sample), or None for roads over feature stores (slides)."""
    images, row = getattr(road, "images", None), getattr(road, "row", None)
    if images is None or row is None:
        return None
    return lambda sid: images[row[sid], 0].float().numpy()


def _audit_files(out_dir: Path, audit: dict[str, Any], by_id: dict[str, Any], pixels: Any) -> None:
    from wsi_mil.eval.audit_run import sample_picture, write_audit_files

    def picture(sid: str) -> np.ndarray | None:
        if pixels is None:
            return sample_picture(by_id.get(sid))
        a = pixels(sid)
        return a[a.shape[0] // 2] if a.ndim == 3 else a  # a volume: its middle slice

    write_audit_files(out_dir, audit, picture)


def _shortcuts_after_per_output(record: dict[str, Any], set_name: str, ids: list[str], y: np.ndarray, p: np.ndarray,
                                task: Task, found: dict[str, Any]) -> dict[str, Any]:
    """The checks after training of a multi-class or multi-label run: each class (one
    against the rest) or label, its probability against every nuisance; each warning
    logged."""
    from wsi_mil.eval.shortcuts import log_findings, prediction_dependence

    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    record["set"], record["after"] = set_name, []
    for c, name in enumerate(task.kind_obj.output_names(task)):
        ok, yc = task.kind_obj.one_vs_rest(y, c)
        if len(np.unique(yc)) < 2:
            continue
        kept = [i for i, k in zip(ids, ok, strict=True) if k]
        rows = prediction_dependence(kept, yc, p[ok, c], found)
        record["after"] += [{**r, "label": name} for r in rows]
    log_findings({"after": record["after"]}, logger)
    return record


def _ablation(task: Task, found: dict[str, dict[str, list[np.ndarray]]], py: np.ndarray, pp: np.ndarray,
              ty: np.ndarray | None, tp: np.ndarray | None) -> dict[str, Any]:
    """The task's score of the model and of each ablation (pooled out of fold; the fold ensemble on the test set)."""
    kind = task.kind_obj

    def figures(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        parts = kind.score_parts(task, y, p)  # (a multi-task run: each target's score too)
        return {"score": kind.score(task, y, p), **({"targets": parts} if parts else {})}

    variants = {"image and covariates (the model)": (pp, tp), **{
        v: (np.concatenate(by_set["val"]), np.mean(by_set["test"], axis=0) if by_set.get("test") else None)
        for v, by_set in found.items()}}
    rows: dict[str, Any] = {}
    for variant, (pv, pt) in variants.items():
        rows[variant] = {"pooled_validation": figures(py, pv)}
        if ty is not None and pt is not None:
            rows[variant]["ensemble_test"] = figures(ty, pt)
    names = {p: f"{p}: {k.score_name}" for p, (_, k) in kind.part_views(task, {}).items()}
    return {"score": kind.score_name, "variants": rows, "target_scores": names}


def _by_centre(task: Task, centres: dict[str, Any], pooled_ids: list[tuple[str, str]], py: np.ndarray,
               pp: np.ndarray, thresholds: list[np.ndarray], columns: dict[str, dict[str, str]],
               config: Any) -> dict[str, Any]:
    """Each held-out centre's figures (its slides, out of fold) with intervals, and their spread."""
    kind = task.kind_obj
    column = centres["column"]
    of = np.asarray([columns.get(sid, {}).get(column, "") for sid, _ in pooled_ids])
    per = {}
    for c in sorted(set(of.tolist())):
        m = of == c
        per[c] = evaluate(task, py[m], pp[m], [t[m] for t in thresholds], config)
    scores = [float(v[kind.score_key]) for v in per.values() if v.get(kind.score_key) is not None]
    spread = ({"min": min(scores), "max": max(scores), "median": float(np.median(scores)),
               "sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0} if scores else {})
    return {"column": column, "protocol": centres["protocol"], "score": kind.score_name, "score_key": kind.score_key,
            "centres": per, "spread": spread}


def _by_centre_markdown(m: dict[str, Any]) -> list[str]:
    b = m.get("by_centre")
    if not b:
        return []
    key = b["score_key"]
    lines = ["", f"## Held-out {b['column']}s", "",
             (f"Protocol: {b['protocol']}. Each {b['column']} scored by the fold model trained without it (95% "
              "bootstrap intervals of its own slides)."
              + (f" **Note: {b['note']}.**" if b.get("note") else "")), "",
             f"| {b['column']} | n | positives or events | {b['score']} (95% CI) |", "|---|---|---|---|"]
    for c, v in b["centres"].items():
        ci = v.get(f"{key}_ci95") or v.get(f"{key}_ci")  # (an AUC's interval, or a C's / an R²'s)
        value = v.get(key)
        note = v.get(f"{key}_ci_note") or v.get("c_index_ci_note")
        text = "–" if value is None else f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "") + \
            (f" ({note})" if note else "")
        lines.append(f"| {c} | {v.get('n')} | {v.get('n_positive', v.get('n_events', '–'))} | {text} |")
    s = b.get("spread")
    if s:
        lines += ["", (f"Spread across {b['column']}s: {s['min']:.3f} to {s['max']:.3f} (median {s['median']:.3f}, "
                       f"sd {s['sd']:.3f}).")]
    r = m.get("random_folds")
    pooled = (m.get("pooled_validation") or {}).get(key)
    if r and r.get(key) is not None and pooled is not None:
        ci = r.get(f"{key}_ci95")
        lines += ["", f"| protocol, same cohort and settings | pooled out-of-fold {b['score']} (95% CI) |", "|---|---|",
                  f"| {b['protocol']} | {pooled:.3f}"
                  + (f" ({m['pooled_validation'][f'{key}_ci95'][0]:.3f}–{m['pooled_validation'][f'{key}_ci95'][1]:.3f})"
                     if m["pooled_validation"].get(f"{key}_ci95") else "") + " |",
                  f"| {r['protocol']} (random_folds/) | {r[key]:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
                  + " |", "",
                  f"Optimism of random folds: {r[key] - pooled:+.3f} ({b['score']}): "
                  + ("the random-fold figure is higher, as it is when a model partly learns its centres; the "
                     "site-held-out figure is the one to expect at a new centre." if r[key] - pooled > 0.02 else
                     "the two protocols agree within 0.02 here.")]
    elif not r:
        lines += ["", "The random-fold figure of the same cohort is not in this run (--no-random-comparison): train "
                      "without --folds-by to compare."]
    return lines


def _ablation_markdown(m: dict[str, Any]) -> list[str]:
    a = m.get("ablation")
    if not a:
        return []
    lines = ["", "## What the covariates add", "",
             f"{a['score']} of the model, of its image branch alone (every slide's covariates set to its fold's "
             "training mean: they then tell nothing about a slide) and of a linear model of the covariates alone "
             "fitted on each fold's training slides (logistic, ridge or Cox by the task; the fold models averaged "
             "on the test set as the MIL folds are).", "",
             "| inputs | set | " + " | ".join([a["score"], *a.get("target_scores", {}).values()]) + " |",
             "|---|---|" + "---|" * (1 + len(a.get("target_scores", {})))]
    for variant, v in a["variants"].items():
        for key, set_name in (("pooled_validation", "pooled out-of-fold validation"), ("ensemble_test", "ensemble of folds, test")):
            if v.get(key):
                cells = [v[key]["score"], *(v[key].get("targets", {}).get(t) for t in a.get("target_scores", {}))]
                lines.append(f"| {variant} | {set_name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return lines


def _known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = ~np.isnan(y)
    return y[k], p[k]


def _across(folds: list[dict[str, Any]], split: str) -> dict[str, Any]:
    from wsi_mil.eval.metrics import summarise

    keys = [k for k in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
            if any(k in f[split] for f in folds)]
    return {k: summarise([f[split].get(k) for f in folds]) for k in keys}


def _rows(task: Task, bags: list[Any], pred: Any, thresholds: list[float], *, fold: str, split: str,
          unit: str = "slide") -> list[dict[str, Any]]:
    rows = []
    for bag, probs in zip(bags, pred.probs, strict=True):
        row: dict[str, Any] = {f"{unit}_id": bag.slide_id, "patient_id": bag.patient_id, "fold": fold, "split": split}
        own = task.kind_obj.truth_columns(task, bag.target)
        if own is not None:  # (a survival's follow-up and event, each in its column)
            row.update(own)
        else:
            truth: Any = _prediction(task, bag.target, [0.5] * task.n_outputs)
            row["label"] = ";".join(truth) if isinstance(truth, list) else truth
        for c, column in enumerate(task.kind_obj.output_columns(task)):
            row[column] = float(probs[c])  # full precision: a recomputed AUC must not meet ties rounding made
        pr = _prediction(task, probs, thresholds)
        row["prediction"] = ";".join(pr) if isinstance(pr, list) else pr
        row.update(task.kind_obj.prediction_columns(task, probs, thresholds))
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _binary_line(name: str, m: dict[str, Any]) -> str:
    from wsi_mil.eval.metrics import auc_text

    auc = auc_text(m)
    return "| " + " | ".join([name, str(m.get("n", "")), auc] + [_fmt(m.get(k)) for k in METRIC_KEYS[1:]]
                             + [_fmt(m.get("threshold")), _fmt(m.get("ece"))]) + " |"


def _write_outputs(out: Path, task: Task, metrics: dict[str, Any], rows: list[dict[str, Any]],
                   curves: dict[str, tuple[np.ndarray, np.ndarray]], histories: dict[str, list[dict[str, Any]]],
                   calibration: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    from wsi_mil.eval.plots import confusion_plot, curves_plot, reliability_plot, roc_plot

    write_json(out / "metrics.json", metrics)
    write_csv(out / "predictions.csv", rows)
    if curves:
        roc_plot(out / "roc.png", curves, f"{metrics['model']}: ROC")
    key = headline_set(metrics)
    head = metrics.get(key) or {}
    if "confusion" in head:
        classes = task.kind_obj.confusion_classes(task)
        confusion_plot(out / "confusion.png", head["confusion"], classes, SET_NAMES.get(key, key))
    if any(histories.values()):
        note = ("validation loss over the whole set, training loss over batches of bags: a loss that ranks bags "
                "against each other (Cox) grows with their number, so the two levels do not compare"
                if task.kind_obj.loss_over_set else "")
        curves_plot(out / "training_curves.png", histories, task.kind_obj.score_name, note)
    if calibration:
        reliability_plot(out / "reliability.png", calibration)
    write_text(out / "report.md", report_markdown(task, metrics))


def report_markdown(task: Task, m: dict[str, Any]) -> str:
    s = m["splits"]
    how = ("the manifest's split column" if s["source"] == "manifest"
           else f"{s['centres']['protocol']} made by wsi-mil (seed {m.get('seed', 0)})" if s.get("centres")
           else f"stratified patient-level splits made by wsi-mil (seed {m.get('seed', 0)})")
    unit = m.get("unit", "slide")
    test = f"a held-out test set of {s['test']} {unit}s" if s["test"] else "no held-out test set"
    lines = [f"# {m.get('command', 'train-mil')} report: {m['model']} ({task.kind}: {', '.join(task.outputs)})", "",
             (f"{m[f'n_{unit}s']} patient bags (`--bag patient`: {m['patient_bags']['slides']} slides, at most "
              f"{m['patient_bags']['max_slides_per_patient']} per patient, each patient's slides in one bag with its "
              "label; attention written per slide)" + (
                  f"; {len(m['patient_bags']['sampled'])} bag(s) over {m['patient_bags']['cap']} patches keep a seeded "
                  "sample of that many (metrics.json patient_bags.sampled)" if m['patient_bags']['sampled'] else "")
              if m.get("patient_bags") else f"{m[f'n_{unit}s']} {unit}s of {m['n_patients']} patients")
             + f"; encoder `{m['encoder'].get('encoder')}`.", "",
             f"Task: {m.get('task_line', task.kind)}.", "",
             f"Splits: {how}; {s['folds']} cross-validation fold(s) and {test}; no patient is in two sets"
             + (f" ({m['blank_patients']['n_blank']} {unit}(s) without a patient_id each counted as its own patient: "
                "two of one patient could still be)" if m.get("blank_patients") else "") + ".", "",
             f"Decision threshold: {m.get('threshold_rule', '')}.", ""]
    if task.kind_obj.has_classes:
        from wsi_mil.eval.metrics import AUC_CI_METHOD

        lines += [f"AUC intervals (95%): {AUC_CI_METHOD} (--bootstrap resamples).", ""]
    if s.get("test_sampling"):
        t = s["test_sampling"]
        lines += [(f"Test set enriched: minority-class share {t['sampled_share']:.2f} (true {t['true_share']:.2f}); "
                  "metrics are given at both prevalences."), ""]
    lines += _notes_markdown(m)
    lines += _headline_markdown(task, m)
    lines += task.kind_obj.report_table(task, m)
    lines += _by_centre_markdown(m)
    lines += _ablation_markdown(m)
    for split in ("test", "val"):
        acc = m.get(f"across_folds_{split}")
        if acc:
            lines += ["", f"Across folds ({split}, mean ± sd over folds): " + ", ".join(
                f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in acc.items() if v["mean"] is not None)]
    if m.get("skipped"):
        lines += ["", (f"**Left out with --allow-missing ({len(m['skipped'])} labelled slide(s) without a usable "
                  "feature store; the figures above do not include them):**"), ""]
        lines += [f"- {x['slide_id']}: {x['reason']}" for x in m["skipped"]]
    if task.kind_obj.calibrated_per_output:
        lines += ["", "ECE: expected calibration error, 10 equal-width probability bins (reliability.png shows the bins)."]
    if (m.get("audit") or {}).get("shortcuts", {}).get("before") is not None:
        from wsi_mil.eval.shortcuts import markdown as shortcuts_markdown

        lines += [""] + shortcuts_markdown(m["audit"]["shortcuts"])
    if m.get("audit"):
        from wsi_mil.eval.audit_run import audit_markdown

        lines += audit_markdown(m["audit"], unit)
    extra = ", attention/" if unit == "slide" or (m.get("transfer") or {}).get("mode") in ("mil", "slices") else ""
    figures = ("roc.png, reliability.png, confusion.png" if task.kind_obj.class_call
               else ", ".join(m.get("figures") or []) or "no figure of the kind")
    lines += ["", f"Files: metrics.json, predictions.csv, {figures}, training_curves.png, models/{extra}.", ""]
    return "\n".join(lines)


def _headline_markdown(task: Task, m: dict[str, Any]) -> list[str]:
    """Which figure leads and why; failed folds said out loud."""
    from wsi_mil.eval.metrics import auc_text

    out: list[str] = []
    health = m.get("fold_health") or {}
    if health.get("failed"):
        out += [f"**{len(health['failed'])} of {health['n_folds']} folds failed** ({task.kind_obj.score_name} at or below "
                "chance): "
                + failed_folds_text(health) + (". The fold ensemble's test figure is not the headline: confident folds "
                                               "outvote failed ones." if headline_set(m) != "ensemble_test" else
                                               ". The held-out test figure stays the headline: it is the less "
                                               "optimistic one."), ""]
    elif health.get("disagree"):
        out += [f"**The folds disagree** on the test set ({task.kind_obj.score_name} sd {health['test_auc_sd']:.3f} "
                "over folds).", ""]
    key = headline_set(m)
    head = m.get(key) or {}
    if head and task.kind_obj.single_positive:
        out += [f"Headline: {SET_NAMES.get(key, key)}, AUC {auc_text(head)}, n = {head.get('n')} "
                f"({head.get('n_positive')} positive); {m.get('headline', {}).get('why', '')}.", ""]
    elif head and not task.kind_obj.class_call:  # (a risk or a value)
        out += [f"Headline: {SET_NAMES.get(key, key)}: {task.kind_obj.summary_line(head).strip()}; "
                f"{m.get('headline', {}).get('why', '')}.", ""]
    if m.get("model_selection"):
        out += [f"Model selection: {m['model_selection']}.", ""]
    if key == "pooled_validation" and m.get("folds") and not str(m.get("model_selection", "")).startswith("swa"):
        out += ["Out-of-fold predictions come from models whose epoch was chosen on those same cases (early "
                "stopping), so they lean optimistic; the held-out test set has no such bias but fewer cases.", ""]
    return out


def _notes_markdown(m: dict[str, Any]) -> list[str]:
    """Facts about how the labels and splits were made (image manifests)."""
    out: list[str] = []
    c = m.get("consensus")
    if c:
        kappa = "–" if c.get("kappa") is None else f"{c['kappa']:.3f}"
        share = "–" if c.get("unanimous_share") is None else f"{c['unanimous_share']:.1%}"
        out += [(f"Reference labels: consensus of {c['readers']} readers ({c['rule']}). Agreement over the "
                f"{c['n_all_readers']} images every reader labelled: {c['kappa_kind']} {kappa}; unanimous {share}; "
                f"{len(c.get('ties', []))} tie(s) left not labelled."), ""]
    leak = m.get("patient_leak")
    if leak:
        listing = ", ".join(f"{p} ({'/'.join(s)})" for p, s in list(leak["patients"].items())[:20])
        out += [(f"**The given split put {len(leak['patients'])} patient(s) in more than one set** ({listing}); "
                f"{leak['action']}."), ""]
    if m.get("blank_labels"):
        out += [f"Blank label cells (not labelled; masked out of loss and metrics): {m['blank_labels']}.", ""]
    t = m.get("transfer")
    if t:
        def show(v: Any) -> str:
            return ", ".join(f"{k} {show(x)}" for k, x in v.items()) if isinstance(v, dict) else \
                "; ".join(map(str, v)) if isinstance(v, list) else str(v)
        out += ["Model and inputs: " + "; ".join(f"{k}: {show(v)}" for k, v in t.items()) + ".", ""]
    return out


def summary_text(report: TrainReport) -> str:
    """The few lines printed at the end of a run."""
    head = report.headline()
    key = headline_set(report.metrics)
    where = SET_NAMES.get(key, key)
    t = report.task
    what = t.kind_obj.what(t)
    unit = report.metrics.get("unit", "slide")
    lines = [f"{report.metrics.get('task_line') or f'task {t.kind} ({what})'}",
             f"{report.metrics[f'n_{unit}s']} {unit}s; {where}:"]
    lines.append(t.kind_obj.summary_line(head))
    centres = (report.metrics.get("splits") or {}).get("centres")
    if centres:  # the protocol the figure comes from, and the random-fold figure beside it
        key = t.kind_obj.score_key
        rand = (report.metrics.get("random_folds") or {}).get(key)
        lines.append(f"  protocol: {centres['protocol']}" + (
            f"; random folds of the same cohort: {t.kind_obj.score_name} {rand:.3f} ({rand - head[key]:+.3f})"
            if rand is not None and head.get(key) is not None else ""))
    health = report.metrics.get("fold_health") or {}
    if health.get("failed"):
        lines.append(f"  WARNING: {len(health['failed'])} of {health['n_folds']} folds failed ({failed_folds_text(health)})")
    if report.metrics.get("headline", {}).get("set") == "pooled_validation" and report.metrics.get("ensemble_test"):
        lines.append(f"  (not the test ensemble: {report.metrics['headline']['why']})")
    from wsi_mil.eval.shortcuts import notes_of, warnings_of

    shortcuts = (report.metrics.get("audit") or {}).get("shortcuts") or {}
    lines += [f"  WARNING: {w}" for w in warnings_of(shortcuts)] + [f"  note: {n}" for n in notes_of(shortcuts)]
    if report.skipped:
        lines.append(f"  {len(report.skipped)} labelled slide(s) LEFT OUT (--allow-missing; no usable feature store): "
                     + ", ".join(x["slide_id"] for x in report.skipped[:10]) + "; listed in report.md")
    lines.append(f"report: {report.out_dir / 'report.md'}   metrics: {report.out_dir / 'metrics.json'}   models: {report.out_dir / 'models'}")
    return "\n".join(lines)
