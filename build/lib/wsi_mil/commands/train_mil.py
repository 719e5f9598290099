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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from wsi_mil.config import TrainConfig
from wsi_mil.data.bags import Bag, Task, bags_from_manifest, infer_task
from wsi_mil.errors import ConfigError, ManifestError, StoreError
from wsi_mil.io.paths import path_record
from wsi_mil.train.runner import (  # noqa: F401 - the shared run's names, re-exported for callers
    METRIC_KEYS,
    THRESHOLD_RULE,
    TRAINING_REVISION,
    CheckedRun,
    CvInputs,
    TrainReport,
    _prediction,
    checks_before_training,
    evaluate,
    report_markdown,
    run_cv,
    summary_text,
)

logger = logging.getLogger(__name__)


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
    return {**info, **patch_resolution_of(bags)}


#: two patch resolutions closer than this (relative) are one: 20x and 40x scans tiled at 0.5 µm/px
#: read at 0.49-0.51; 0.5 and 1.0 µm/px are two
RESOLUTION_TOLERANCE = 0.1


def same_resolution(a: float, b: float) -> bool:
    return abs(a / b - 1) <= RESOLUTION_TOLERANCE


def patch_resolution_of(bags: list[Bag]) -> dict[str, Any]:
    """The patches' resolution (µm/px) and side (px) shared by every feature store, recorded
    with the run; stores of several resolutions or patch sizes are refused (a model learns
    one scale). Stores that do not record them (older wsi-mil) count as unknown."""
    groups: list[tuple[float | None, int | None, list[str]]] = []
    for b in bags:
        mpp = b.meta.get("effective_mpp") if b.meta else None
        size = b.meta.get("patch_size_px") if b.meta else None
        mpp = float(mpp) if mpp not in (None, "none") else None
        size = int(size) if size not in (None, "none") else None
        for g_mpp, g_size, ids in groups:
            if size == g_size and ((mpp is None and g_mpp is None) or (
                    mpp is not None and g_mpp is not None and same_resolution(mpp, g_mpp))):
                ids.append(b.slide_id)
                break
        else:
            groups.append((mpp, size, [b.slide_id]))
    known = [g for g in groups if g[0] is not None or g[1] is not None]
    if len(known) > 1:
        listing = "; ".join(f"{m if m is None else round(m, 3)} µm/px, {n} px patches: {', '.join(ids[:3])}"
                            f"{' ...' if len(ids) > 3 else ''} ({len(ids)})" for m, n, ids in known)
        raise StoreError(f"the feature stores were tiled at different resolutions or patch sizes ({listing}); one "
                         "model learns one scale. Tile every slide with the same --mpp and --patch-size (or train on "
                         "one group)")
    if not known:
        return {"effective_mpp": None, "patch_size_px": None}
    return {"effective_mpp": known[0][0], "patch_size_px": known[0][1]}


def _write_attention(out: Path, bags: list[Bag], pred: Any, task: Task, *, fold: str, split: str,
                     thresholds: list[float], model: str) -> None:
    from wsi_mil.io.attention import write_attention

    shares = pred.contribution if pred.contribution is not None else [None] * len(bags)
    kind = "normalised attention (sums to 1)" if model not in ("max", "mean") else model + " score"
    for bag, probs, att, share in zip(bags, pred.probs, pred.attention, shares, strict=True):
        _, coords = bag.load()
        assert bag.store is not None  # train-mil's bags are read from feature stores (read_bags)
        common = {"fold": fold, "split": split, "model": model, "outputs": list(task.outputs),
                  "probability": [float(v) for v in probs], "task_kind": task.kind,
                  "prediction": _prediction(task, probs, thresholds)}
        # a patient bag: each slide's rows in its own store, so heatmaps stay per slide
        parts = bag.meta.get("slides") or [{"slide_id": bag.slide_id, "store": str(bag.store), "start": 0,
                                            "end": len(coords), "extent_px": bag.extent_px, "step_px": bag.step_px}]
        for s in parts:
            if int(s["end"]) <= int(s["start"]):  # every patch of this slide fell out of the patient's sample
                logger.warning("%s: none of its patches is in patient %s's sampled bag (--patient-max-instances); "
                               "no attention store for it", s["slide_id"], bag.slide_id)
                continue
            rows = slice(int(s["start"]), int(s["end"]))
            extra = {"patient_bag": bag.slide_id, "attention_kind": kind + " over the patient's slides"} \
                if bag.meta.get("slides") else {"attention_kind": kind}
            write_attention(out / f"{s['slide_id']}.h5", coords=coords[rows], attention=att[rows],
                            contribution=None if share is None else share[rows],
                            contribution_unit=task.kind_obj.contribution_unit, attrs={
                "slide_id": s["slide_id"], **common, **path_record("feature_store", Path(s["store"]), out),
                "patch_extent_level0_px": float(s["extent_px"]), "grid_step_level0_px": float(s["step_px"]), **extra})


@dataclass
class TrainInputs:
    """The checked inputs of a run: the task and the bags, before anything is written."""

    task: Task
    task_line: str
    bags: list[Bag]
    skipped: list[dict[str, str]]
    user_split: dict[str, str]
    columns: dict[str, dict[str, str]] = field(default_factory=dict)  # slide_id -> manifest row
    checked: CheckedRun | None = None  # duplicates, splits ...: checked before the run folder exists
    notes: dict[str, Any] = field(default_factory=dict)  # facts for the report (blank patient ids ...)
    sources: dict[str, Any] = field(default_factory=dict)  # the inputs, as part of the run's identity
    covariates: list[str] = field(default_factory=list)  # --covariates, checked against the manifest


def prepare_inputs(manifest: Path, features_dirs: list[Path], config: TrainConfig, *,
                   progress: bool = False) -> TrainInputs:
    """Read and check the manifest, infer the task and read every bag (non-finite
    features included in the check). Labelled slides without a usable feature store stop
    the run (:class:`MissingDataError`, exit 1) unless ``config.allow_missing``."""
    from wsi_mil.data.manifest import entry_columns, manifest_classes, read_manifest
    from wsi_mil.errors import MissingDataError

    require_features(features_dirs)
    entries = read_manifest(manifest, require_path=False)
    task = infer_task(entries, config.task, config.label, config.class_list() or manifest_classes(manifest),
                      config.min_class_slides, targets=config.targets, target_weights=config.target_weights,
                      time_bins=config.time_bins or 0)
    task = task.kind_obj.configured(task, config)
    task_line = task.describe(entries)
    from wsi_mil.data.covariates import check_values, parse_covariates

    covariates = parse_covariates(config.covariates, sorted({k for e in entries for k in e.meta} - NOT_COVARIATES),
                                  sorted({k for e in entries for k in e.labels}), NOT_COVARIATES)
    check_values(covariates, {e.slide_id: e.meta for e in entries})
    if covariates:
        task_line += f"; covariates {', '.join(covariates)} ({config.fusion} fusion)"
    logger.info("%s", task_line)
    from wsi_mil.data.splits import check_blank_patients

    blank = check_blank_patients(entries, config.blank_patient, "slide")
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
    encoder_of(bags)  # one encoder, one resolution and patch size: refused now, before the run folder
    if len(bags) < 4:
        raise ManifestError(f"only {len(bags)} slide(s) have usable feature stores; training needs at least 4 "
                            f"({len(skipped)} left out, listed above)")
    columns = entry_columns(entries)
    notes: dict[str, Any] = {"blank_patients": blank} if blank else {}
    if config.bag == "patient":  # one bag per patient: labels agreeing, columns joined, the sample recorded
        from wsi_mil.data.patient_bags import patient_bags, patient_columns

        n_slides = len(bags)
        bags = patient_bags(bags, task, max_instances=config.patient_max_instances, seed=config.seed)
        by_slide = columns
        columns = patient_columns(bags, columns)
        if config.folds_by:  # a patient bag holds one centre's slides, or its centre could not be held out
            mixed = [b for b in bags if columns[b.slide_id].get(config.folds_by) == "mixed"]
            if mixed:
                listing = "; ".join(f"{b.slide_id}: " + ", ".join(f"{s['slide_id']} in {by_slide.get(s['slide_id'], {}).get(config.folds_by)}"
                                                                 for s in b.meta["slides"]) for b in mixed[:4])
                raise ManifestError(f"--bag patient --folds-by {config.folds_by}: {len(mixed)} patient(s) have slides in "
                                    f"several {config.folds_by}s ({listing}{' ...' if len(mixed) > 4 else ''}); a "
                                    f"patient bag in two {config.folds_by}s cannot be held out with either. Correct "
                                    f"the {config.folds_by} column, or train one bag per slide")
        user_split = {b.slide_id: b.split for b in bags if b.split}
        sampled = {b.slide_id: b.meta["sampled"] for b in bags if b.meta.get("sampled")}
        notes["patient_bags"] = {"slides": n_slides, "patients": len(bags),
                                 "max_slides_per_patient": max(len(b.meta["slides"]) for b in bags),
                                 "sampled": sampled, "cap": config.patient_max_instances}
        logger.info("--bag patient: %d slide(s) joined into %d patient bag(s)%s", n_slides, len(bags),
                    f"; {len(sampled)} bag(s) sampled to {config.patient_max_instances} patches" if sampled else "")
        if len(bags) < 4:
            raise ManifestError(f"--bag patient: only {len(bags)} patient(s); training needs at least 4")
    # every check that can refuse the run (duplicates across the splits, --subgroups ...) before its folder exists
    checked = checks_before_training(bags, None, columns, user_split, config, "slide", task=task)
    from wsi_mil.io.run_folder import input_record

    sources = {"manifest": input_record(manifest), "features": [str(Path(d).resolve()) for d in features_dirs],
               "stores": stores_digest(bags)}
    return TrainInputs(task, task_line, bags, skipped, user_split, columns, checked, notes, sources, covariates)


def stores_digest(bags: list[Bag]) -> str:
    """The feature stores' content as part of the run's identity: each slide's store
    fingerprint (the encoder's and its patch coordinates') and feature count, so features
    re-extracted into the same folder make another run, never a silent resume."""
    import hashlib
    import json

    body = sorted((b.slide_id, str(b.meta.get("fingerprint")), int(b.meta.get("n_features") or 0)) for b in bags)
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


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


#: manifest columns that identify or place a slide, never a patient's clinical value
NOT_COVARIATES = {"slide_id", "path", "patient_id", "split", "mpp", "annotations"}


#: the report's ablation of a run with --covariates
IMAGE_ALONE, COVARIATES_ALONE = "image branch alone", "covariates alone"


class MilRoad:
    """Slides as bags of patch features through the shared run (``wsi_mil.train.runner``)."""

    unit = "slide"
    command = "train-mil"
    #: --covariates, the manifest's rows and the fold's fitted encoding (the image and volume roads built on
    #: this one have none: they keep these defaults)
    covariates: Sequence[str] = ()
    columns: Mapping[str, dict[str, str]] = MappingProxyType({})
    encoding: Any = None

    def __init__(self, config: TrainConfig, bags: list[Bag], n_outputs: int,
                 columns: dict[str, dict[str, str]] | None = None, covariates: list[str] | None = None) -> None:
        self.config, self.n_outputs = config, n_outputs
        if config.bag == "patient":
            self.unit = "patient"
        self.encoder = encoder_of(bags)
        self.dim = int(bags[0].load()[0].shape[1])
        self.model_name = config.model + (f" + covariates ({config.fusion})" if covariates else "")
        self.columns, self.covariates = columns or {}, covariates or []

    def prepare_fold(self, train: list[Bag], samples: list[Bag]) -> None:
        """With --covariates: the encoding fitted on this fold's training slides, every slide's vector from it."""
        if not self.covariates:
            return
        from wsi_mil.data.covariates import CovariateEncoder

        self.encoding = CovariateEncoder.fit(list(self.covariates), [self.columns[b.slide_id] for b in train])
        for b in samples:
            b.covariates = self.encoding.encode(self.columns[b.slide_id], f"slide {b.slide_id}")

    def ablations(self, model: Any, train: list[Bag], sets: dict[str, list[Bag]], task: Task,
                  device: str) -> dict[str, dict[str, np.ndarray]]:
        """With --covariates, the report's ablation on each set: the fused model with every slide's covariates at
        its fold's training mean (the image branch alone: the covariates then tell nothing about a slide), and a
        model of the covariates alone fitted on the fold's training slides (the task kind's)."""
        if self.encoding is None:
            return {}
        from wsi_mil.train.loop import predict

        x_train = np.stack([np.asarray(b.covariates, np.float32) for b in train])
        mean = x_train.mean(axis=0)
        alone = task.kind_obj.covariate_model(task, x_train, np.stack([b.target for b in train]).astype(float))
        out: dict[str, dict[str, np.ndarray]] = {IMAGE_ALONE: {}, COVARIATES_ALONE: {}}
        for name, bags in sets.items():
            if not bags:
                continue
            kept = [b.covariates for b in bags]
            try:
                for b in bags:
                    b.covariates = mean
                out[IMAGE_ALONE][name] = predict(model, self.feeder(bags, False), task, device=device).probs
            finally:
                for b, c in zip(bags, kept, strict=True):
                    b.covariates = c
            out[COVARIATES_ALONE][name] = np.asarray(alone(np.stack([np.asarray(c, np.float32) for c in kept])), float)
        return out

    def feeder(self, samples: list[Bag], train: bool) -> Any:
        from wsi_mil.train.loop import BagFeeder

        return BagFeeder(samples, self.config.max_instances if train else None, self.config.bags_per_batch if train else 1)

    def new_model(self) -> Any:
        from wsi_mil.mil import build_model

        model = build_model(self.config.model, self.dim, self.n_outputs, **self.config.model_args())
        if self.encoding is None:
            return model
        from wsi_mil.mil.fusion import CovariateFusion

        return CovariateFusion(model, self.encoding.width, self.n_outputs, self.config.fusion)

    def param_groups(self, model: Any) -> None:
        return None

    def spec(self) -> dict[str, Any]:
        spec = {"model": self.config.model, "in_dim": self.dim, "n_outputs": self.n_outputs,
                "model_args": self.config.model_args()}
        if self.encoding is not None:
            spec |= {"covariates": self.encoding.to_dict(), "fusion": self.config.fusion}
        if self.config.bag == "patient":  # predict joins a patient's slides the same way
            spec |= {"bag": "patient", "patient_max_instances": self.config.patient_max_instances,
                     "seed": self.config.seed}
        return spec

    def save(self, stem: Path, model: Any, spec: dict[str, Any]) -> None:
        from wsi_mil.train.checkpoint import save_model

        save_model(stem, model, spec)

    def load(self, stem: Path) -> tuple[Any, dict[str, Any]]:
        from wsi_mil.train.checkpoint import load_model

        return load_model(stem)

    def fit_settings(self, config: TrainConfig, fold_index: int, device: str) -> Any:
        from wsi_mil.train.loop import FitSettings

        assert config.lr is not None  # TrainConfig.__post_init__ puts the model's default in for an unset --lr
        return FitSettings(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, patience=config.patience,
                           monitor=config.monitor, select=config.select, bags_per_batch=config.bags_per_batch, max_instances=config.max_instances,
                           imbalance=config.imbalance, focal_gamma=config.focal_gamma, seed=config.seed + fold_index,
                           device=device)

    def inputs_key(self) -> dict[str, Any] | None:
        return None

    def after_predict(self, out_dir: Path, samples: list[Bag], pred: Any, task: Task, *, fold: str, split: str,
                      thresholds: list[float]) -> None:
        _write_attention(out_dir / "attention" / (fold if fold == "ensemble" else f"fold{fold}"), samples, pred, task,
                         fold=fold, split=split, thresholds=thresholds, model=self.config.model)


def run_train(manifest: Path, features_dirs: list[Path], *, out_dir: Path, config: TrainConfig,
              progress: bool = True, inputs: TrainInputs | None = None) -> TrainReport:
    """Train and evaluate every fold (see the module docstring); the process's CPU thread
    count is set for the run (:func:`cpu_threads`) and restored afterwards."""
    import torch

    saved = torch.get_num_threads()
    try:
        if inputs is None:
            inputs = prepare_inputs(manifest, features_dirs, config, progress=progress)
        else:  # already printed when the inputs were checked; the run's log file gets it too
            logger.debug("%s", inputs.task_line)
        road = MilRoad(config, inputs.bags, inputs.task.n_logits, inputs.columns, inputs.covariates)
        device = config.resolved_device()
        threads = cpu_threads(inputs.bags, config.threads)
        if device == "cpu":
            torch.set_num_threads(threads)
            logger.info("training on %d CPU thread(s)%s", threads, "" if config.threads else " (--threads to change)")
        notes = {"threads": threads if device == "cpu" else None, **inputs.notes}
        if config.folds_by and config.random_comparison:  # the random-fold figure beside the site-held-out one
            notes["random_folds"] = _random_comparison(road, inputs, config, out_dir, notes, progress)
        cv = CvInputs(inputs.task, inputs.task_line, inputs.bags, inputs.skipped, inputs.user_split, notes,
                      inputs.columns, inputs.checked, inputs.sources)
        return run_cv(road, cv, config, out_dir, progress=progress)
    finally:
        torch.set_num_threads(saved)


def _random_comparison(road: MilRoad, inputs: TrainInputs, config: TrainConfig, out_dir: Path,
                       notes: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Random patient-level folds of the same cohort and settings (as many folds), trained in
    ``out_dir/random_folds`` (resumable as any run), and their pooled out-of-fold figure."""
    import dataclasses

    logger.info("--folds-by %s: training random patient-level folds of the same cohort for comparison "
                "(random_folds/; --no-random-comparison skips it)", config.folds_by)
    from wsi_mil.train.runner import make_split_plan

    plain = dataclasses.replace(config, folds_by=None)
    sub = out_dir / "random_folds"
    sub.mkdir(parents=True, exist_ok=True)
    plan = make_split_plan(inputs.bags, inputs.user_split, plain, inputs.columns, list(inputs.task.classes))
    assert inputs.checked is not None  # (prepare_inputs ran the checks)
    checked = dataclasses.replace(inputs.checked, plan=plan)
    cv = CvInputs(inputs.task, inputs.task_line, inputs.bags, inputs.skipped, inputs.user_split,
                  {**notes, "random_comparison_of": str(out_dir)}, inputs.columns, checked, inputs.sources)
    report = run_cv(road, cv, plain, sub, progress=progress)
    pooled = dict(report.metrics.get("pooled_validation") or {})
    return {**{k: v for k, v in pooled.items() if not isinstance(v, (list, dict)) or k.endswith("_ci95")},
            "protocol": f"random patient-level {config.folds}-fold", "folder": "random_folds"}


def require_features(features_dirs: list[Path]) -> None:
    for d in features_dirs:
        if not d.is_dir():
            raise ConfigError(f"--features {d}: not a folder; give the features/ folder written by extract-features")


