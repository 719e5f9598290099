"""`wsi-mil train-image`: whole-image classification (chest X-rays) through the shared run.

Input: an image manifest CSV (``wsi_mil.data.images``) or a MedMNIST-layout ``.npz``. The
run is the one train-mil uses (``wsi_mil.train.runner``): patient-level splits (the
manifest's split column checked for patients in two sets), one model per fold, thresholds
chosen on validation, the fold ensemble on the held-out test set, report.md with
calibration; the models are a registry backbone with a linear head
(``wsi_mil.encoders.image``) in one of three transfer modes.

With ``--mode mil`` an image is a bag of overlapping patches (``patch_grid``): the frozen
backbone's patch features are cached and a MIL aggregator from the registry trains on
them through :class:`PatchMilRoad`, which is train-mil's :class:`MilRoad` fed images.

Outputs in ``--out`` are those of train-mil (attention/ only with ``--mode mil``: patch
corners in the pixels of the resized input), and with ``--mode linear`` / ``mil`` the
frozen-backbone feature cache in ``features/`` (or ``--feature-cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.commands.train_mil import MilRoad
from wsi_mil.config import ImageTrainConfig
from wsi_mil.data.bags import Task, infer_task
from wsi_mil.data.images import (
    ImageEntry,
    ImageReadError,
    ImageSample,
    npz_entries,
    read_image,
    read_image_manifest,
    resize_grey,
)
from wsi_mil.data.manifest import entry_columns
from wsi_mil.errors import ConfigError, ManifestError, MissingDataError
from wsi_mil.train.runner import CvInputs, TrainReport, checks_before_training, run_cv, tensor_pixels

logger = logging.getLogger(__name__)


def read_entries(source: Path, config: Any, *, npz_reader: Any = npz_entries, what: str = "an image manifest CSV",
                 csv_only: str | None = None, folders: bool = False, npz_kind: str = "MedMNIST"
                 ) -> tuple[list[ImageEntry], dict[str, Any]]:
    """Manifest CSV or MedMNIST NPZ -> entries (+ the consensus record). ``csv_only``: the
    message for a source that is neither (else anything else is read as a CSV)."""
    if not source.exists():
        raise ConfigError(f"{source}: no such file; give {what} or a {npz_kind} .npz")
    if source.suffix.lower() == ".npz":
        if config.readers or config.labels:
            raise ConfigError("--readers / --labels apply to manifest CSVs, not to an .npz")
        return npz_reader(source), {}
    if csv_only and source.suffix.lower() != ".csv":
        raise ConfigError(f"{source}: {csv_only}")
    return read_image_manifest(source, labels=config.label_list(), readers=config.reader_list(), folders=folders)


def load_pixels(entries: list[Any], size: int, *, window: tuple[float, float] | None = None, use_voi: bool = True,
                progress: bool = False) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Every image read, resized to ``size`` and held as float16 (N, 1, S, S); unreadable
    ones are returned as problems (id, reason) with a blank slot."""
    from tqdm import tqdm

    out = torch.zeros((len(entries), 1, size, size), dtype=torch.float16)
    bad: list[dict[str, str]] = []
    for i, e in enumerate(tqdm(entries, desc="reading images", unit="image", disable=not progress)):
        try:
            img = e.pixels if e.pixels is not None else read_image(e.path, window=window, use_voi=use_voi)
            if not np.isfinite(img).all():
                raise ImageReadError(f"{e.path}: non-finite pixel values")
            out[i, 0] = torch.from_numpy(resize_grey(img, size))
        except ImageReadError as exc:
            bad.append({"slide_id": e.slide_id, "reason": str(exc)})
    return out, bad


def check_entries(entries: list[ImageEntry], consensus: dict[str, Any], config: Any, unit: str = "image") -> CvInputs:
    """The checked run inputs of image or volume entries: task inferred with blank labels
    allowed, the consensus and blank labels noted, patients in two given sets named (and
    re-split with ``--resplit``). Pixels are read afterwards."""
    task = infer_task(entries, config.task, config.label, config.class_list(), config.min_class_slides, allow_blank=True,
                      unit=unit)
    task_line = task.describe(entries).replace("slide(s)", f"{unit}(s)")
    logger.info("%s", task_line)
    notes: dict[str, Any] = {}
    if consensus:
        notes["consensus"] = consensus
        logger.info("consensus of %d readers: %s %s, unanimous %s; %d tie(s) not labelled", consensus["readers"],
                    consensus["kappa_kind"], consensus["kappa"], consensus["unanimous_share"], len(consensus["ties"]))
    from wsi_mil.data.splits import check_blank_patients

    blank_patients = check_blank_patients(entries, config.blank_patient, unit)
    if blank_patients:
        notes["blank_patients"] = blank_patients
    blank = {c: sum(not e.labels.get(c, "").strip() for e in entries) for c in task.label_columns}
    if any(blank.values()):
        notes["blank_labels"] = ", ".join(f"{c} {n}" for c, n in blank.items() if n)
    user_split = {e.slide_id: e.split for e in entries if e.split}
    from wsi_mil.data.splits import shared_patients

    leaks = shared_patients((e.patient_id or e.slide_id, e.split) for e in entries if e.split)
    if leaks:
        listing = "; ".join(f"patient {p} in {'/'.join(s)}" for p, s in list(leaks.items())[:12])
        if not config.resplit:
            raise ManifestError(f"the split column puts {len(leaks)} patient(s) in more than one set ({listing}"
                                f"{' ...' if len(leaks) > 12 else ''}): their {unit}s would be trained on and tested "
                                "on. Pass --resplit to split again by patient, or fix the split column")
        logger.warning("the given split puts %d patient(s) in more than one set (%s); splitting again by patient "
                       "(--resplit)", len(leaks), listing)
        notes["patient_leak"] = {"patients": leaks, "action": f"the given split was discarded and the {unit}s were "
                                 "split again by patient (--resplit)"}
        user_split = {}
    samples = [ImageSample(e.slide_id, e.patient_id or e.slide_id, task.target(e.labels, f"{unit} {e.slide_id}"),
                           user_split.get(e.slide_id), e.path, e.pixels, e.meta) for e in entries]
    return CvInputs(task, task_line, samples, [], user_split, notes, entry_columns(entries))


def refuse_unreadable(bad: list[dict[str, str]], n: int, unit: str = "image") -> None:
    if bad:
        listing = "\n  ".join(f"{b['slide_id']}: {b['reason']}" for b in bad[:20])
        raise MissingDataError(f"{len(bad)} of {n} {unit}(s) cannot be read:\n  {listing}\n"
                               "Fix or remove them from the manifest")


def prepare_image_inputs(source: Path, config: ImageTrainConfig, *, progress: bool = False
                         ) -> tuple[CvInputs, torch.Tensor]:
    """Checked inputs (:func:`check_entries`) and the images (N, 1, S, S); unreadable
    images stop the run naming them (exit 1)."""
    entries, consensus = read_entries(source, config)
    inputs = check_entries(entries, consensus, config)
    images, bad = load_pixels(entries, config.image_size, window=config.window_pair(), use_voi=config.use_voi,
                              progress=progress)
    refuse_unreadable(bad, len(entries))
    # duplicates, splits and the rest are checked now: before the run folder and any feature exist
    inputs.checked = checks_before_training(inputs.samples, tensor_pixels(images, inputs.samples), inputs.columns,
                                            inputs.user_split, config, "image", task=inputs.task)
    from wsi_mil.io.run_folder import input_record

    inputs.sources = {"source": input_record(source)}
    return inputs, images


class ImageRoad:
    """Whole images (or their cached frozen features) through the shared run."""

    unit = "image"
    command = "train-image"

    def __init__(self, config: ImageTrainConfig, task: Task, samples: list[ImageSample], images: torch.Tensor,
                 out_dir: Path, device: str, progress: bool) -> None:
        from wsi_mil.data.augment import preset
        from wsi_mil.encoders.image import build_classifier

        self.config, self.task, self.images = config, task, images
        self.row = {s.slide_id: i for i, s in enumerate(samples)}
        self.augment = preset(config.augment)
        probe, self.encoder = build_classifier(config.backbone, task.n_outputs, weights=config.weights,
                                               random_init=config.random_init)
        self.encoder = {**self.encoder, "mode": config.mode, "image_size": config.image_size}
        self.dim = int(self.encoder["dim"])
        self.model_name = f"{self.encoder['encoder']} ({config.mode})"
        self.image_key = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
        self.features: np.ndarray | None = None
        if config.mode == "linear":
            from wsi_mil.encoders.image import cached_features

            cache = Path(config.feature_cache) if config.feature_cache else out_dir / "features"
            self.features = cached_features(cache, probe, self.encoder, images, [s.slide_id for s in samples],
                                            f"{self.image_key}|{config.image_size}", device=device, progress=progress)

    def feeder(self, samples: list[ImageSample], train: bool) -> Any:
        from wsi_mil.data.image_feed import FeatureFeeder, ImageFeeder

        idx = np.asarray([self.row[s.slide_id] for s in samples], dtype=np.int64)
        ids = [s.slide_id for s in samples]
        targets = np.stack([s.target for s in samples]) if samples else np.zeros((0, self.task.n_outputs), np.float32)
        if self.features is not None:
            return FeatureFeeder(ids, targets, self.features[idx])
        return ImageFeeder(ids, targets, self.images[torch.as_tensor(idx)], self.config.batch_size,
                           self.augment if train else None)

    def new_model(self) -> Any:
        from wsi_mil.encoders.image import build_classifier

        if self.config.mode == "linear":
            return torch.nn.Sequential(torch.nn.Dropout(self.config.dropout), torch.nn.Linear(self.dim, self.task.n_outputs))
        model, _ = build_classifier(self.config.backbone, self.task.n_outputs, weights=self.config.weights,
                                    random_init=self.config.random_init, dropout=self.config.dropout)
        return model

    def param_groups(self, model: Any) -> list[dict[str, Any]] | None:
        """Freezes what the mode keeps fixed and returns the trained groups (None: the probe)."""
        from wsi_mil.encoders.image import configure

        if self.config.mode == "linear":
            return None
        return configure(model, self.config.mode, train_stages=self.config.train_stages,
                         layer_decay=self.config.layer_decay)

    def spec(self) -> dict[str, Any]:
        c = self.config
        return {"kind": "image", "backbone": c.backbone, "weights": c.weights, "random_init": c.random_init,
                "mode": c.mode, "image_size": c.image_size, "in_dim": self.dim, "n_outputs": self.task.n_outputs,
                "dropout": c.dropout, "window": c.window, "use_voi": c.use_voi}

    def save(self, stem: Path, model: Any, spec: dict[str, Any]) -> None:
        from wsi_mil.train.checkpoint import save_model

        if self.config.mode == "linear":  # the probe: only the head; the backbone comes from the registry
            save_model(stem, torch.nn.ModuleDict({"head": model[1]}), spec)
        else:
            save_model(stem, model, spec)

    def load(self, stem: Path) -> tuple[Any, dict[str, Any]]:
        model, spec = load_image_model(stem)
        if self.config.mode == "linear":
            probe = torch.nn.Sequential(torch.nn.Dropout(self.config.dropout), torch.nn.Linear(self.dim, self.task.n_outputs))
            probe[1].load_state_dict(model.head.state_dict())
            return probe, spec
        return model, spec

    def fit_settings(self, config: ImageTrainConfig, fold_index: int, device: str) -> Any:
        from wsi_mil.train.loop import FitSettings

        return FitSettings(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, patience=config.patience,
                           monitor=config.monitor, select=config.select, imbalance=config.imbalance, focal_gamma=config.focal_gamma,
                           seed=config.seed + fold_index, device=device, min_epochs=min(5, config.epochs))

    def inputs_key(self) -> dict[str, Any]:
        return {"images": self.image_key, "backbone_sha256": self.encoder["weights_sha256"]}

    def after_predict(self, *args: Any, **kwargs: Any) -> None:
        return None  # Grad-CAM maps are drawn by predict-image --cam


class PatchMilRoad(MilRoad):
    """Images as bags of overlapping patches (``--mode mil``): train-mil's road over bags
    held in memory, made from the frozen backbone's cached patch features."""

    unit = "image"
    command = "train-image"
    # train-mil's road run with train-image's settings: every MilRoad method that reads them is overridden here
    config: ImageTrainConfig  # type: ignore[assignment]

    def __init__(self, config: ImageTrainConfig, task: Task, samples: list[ImageSample], images: torch.Tensor,
                 out_dir: Path, device: str, progress: bool) -> None:
        from wsi_mil.encoders.image import build_classifier, cached_features, patch_grid

        self.config, self.n_outputs, self.task = config, task.n_outputs, task
        self.images, self.row = images, {s.slide_id: i for i, s in enumerate(samples)}  # (for the audit)
        backbone, info = build_classifier(config.backbone, task.n_outputs, weights=config.weights)
        corners, side, step = patch_grid(config.image_size, config.patch_grid)
        self.image_key = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
        cache = Path(config.feature_cache) if config.feature_cache else out_dir / "features"
        self.cache_file = cache
        feats = cached_features(cache, backbone, info, images, [s.slide_id for s in samples],
                                f"{self.image_key}|{config.image_size}", device=device, progress=progress,
                                grid=config.patch_grid)
        self.encoder = {**info, "mode": "mil", "image_size": config.image_size, "patch_grid": config.patch_grid,
                        "patch_px": side, "patch_step_px": step}
        self.dim = int(info["dim"])
        self.model_name = f"{config.mil_model} over {len(corners)} patches ({info['encoder']}, frozen)"
        self.set_bags(samples, feats, corners, step, side)
        self.geometry = {"image_size": config.image_size, "patch_extent_px": side, "grid_step_px": step,
                         "coordinates": "top-left corners in pixels of the resized network input (image_size)"}

    def set_bags(self, samples: list[Any], feats: np.ndarray, coords: np.ndarray, step: float, extent: float) -> None:
        """In-memory bags: sample i's instances are ``feats[i]`` at ``coords``."""
        from wsi_mil.data.bags import Bag

        self.bags = {s.slide_id: Bag(s.slide_id, s.patient_id, s.target, None, s.split, feats[i], coords,
                                     step_px=float(step), extent_px=float(extent), meta={"n_features": len(coords)})
                     for i, s in enumerate(samples)}

    def feeder(self, samples: list[Any], train: bool) -> Any:
        from wsi_mil.train.loop import BagFeeder

        return BagFeeder([self.bags[s.slide_id] for s in samples], None, self.config.batch_size if train else 1)

    def new_model(self) -> Any:
        from wsi_mil.mil import build_model

        return build_model(self.config.mil_model, self.dim, self.n_outputs, **self.config.model_args())

    def spec(self) -> dict[str, Any]:
        c = self.config
        return {"kind": "image", "mode": "mil", "model": c.mil_model, "in_dim": self.dim, "n_outputs": self.n_outputs,
                "model_args": c.model_args(), "backbone": c.backbone, "weights": c.weights, "random_init": False,
                "image_size": c.image_size, "patch_grid": c.patch_grid, "dropout": c.dropout, "window": c.window,
                "use_voi": c.use_voi}

    def load(self, stem: Path) -> tuple[Any, dict[str, Any]]:
        return load_image_model(stem)

    def fit_settings(self, config: Any, fold_index: int, device: str) -> Any:
        from wsi_mil.train.loop import FitSettings

        return FitSettings(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, patience=config.patience,
                           monitor=config.monitor, select=config.select, bags_per_batch=config.batch_size, max_instances=None,
                           imbalance=config.imbalance, focal_gamma=config.focal_gamma, seed=config.seed + fold_index,
                           device=device, min_epochs=min(5, config.epochs))

    def inputs_key(self) -> dict[str, Any]:
        return {"images": self.image_key, "backbone_sha256": self.encoder["weights_sha256"]}

    def after_predict(self, out_dir: Path, samples: list[Any], pred: Any, task: Task, *, fold: str, split: str,
                      thresholds: list[float]) -> None:
        from wsi_mil.commands.train_mil import _prediction
        from wsi_mil.io.attention import write_attention

        folder = out_dir / "attention" / (fold if fold == "ensemble" else f"fold{fold}")
        for s, probs, att in zip(samples, pred.probs, pred.attention, strict=True):
            bag = self.bags[s.slide_id]
            assert bag.coords is not None  # set_bags: in-memory bags with their coordinates
            write_attention(folder / f"{s.slide_id}.h5", coords=bag.coords, attention=att, attrs={
                "slide_id": s.slide_id, "fold": fold, "split": split, "model": self.config.mil_model,
                "outputs": list(task.outputs), "probability": [float(v) for v in probs],
                "prediction": _prediction(task, probs, thresholds), **self.geometry,
                "attention_kind": "normalised attention (sums to 1)" if self.config.mil_model not in ("max", "mean")
                else self.config.mil_model + " score"})


def load_image_model(stem: Path) -> tuple[Any, dict[str, Any]]:
    """A fold's :class:`ImageClassifier` (or, for ``--mode mil``, its MIL aggregator) from
    its safetensors + JSON (weights only). A linear probe's backbone is rebuilt from the
    registry and must hash as it did in training; a patch-MIL model's backbone is
    :func:`patch_backbone`."""
    from safetensors.torch import load_file

    from wsi_mil.encoders.image import build_classifier

    spec_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not spec_path.exists() or not weights.exists():
        raise ConfigError(f"no image model at {stem} (need {spec_path.name} and {weights.name})")
    spec = json.loads(spec_path.read_text())
    if spec.get("kind") != "image":
        raise ConfigError(f"{spec_path}: not an image model (made by train-mil? use predict for slides)")
    if spec.get("mode") == "mil":
        from wsi_mil.train.checkpoint import load_model

        return load_model(stem)
    model, info = build_classifier(spec["backbone"], spec["n_outputs"], weights=spec.get("weights"),
                                   random_init=spec.get("random_init", False) and spec["mode"] != "linear")
    state = load_file(str(weights))
    if spec["mode"] == "linear":
        if info["weights_sha256"] != spec["encoder"]["weights_sha256"]:
            raise ConfigError(f"{stem}: the backbone {spec['backbone']} now has other weights than in training "
                              f"({info['weights_sha256'][:12]} vs {spec['encoder']['weights_sha256'][:12]})")
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()}, strict=True)
    else:
        model.load_state_dict(state, strict=True)
    return model.eval(), spec


def patch_backbone(spec: dict[str, Any]) -> Any:
    """The frozen backbone of a patch-MIL run, rebuilt from the registry; it must hash as it
    did in training."""
    from wsi_mil.encoders.image import build_classifier

    model, info = build_classifier(spec["backbone"], 1, weights=spec.get("weights"))
    if info["weights_sha256"] != spec["encoder"]["weights_sha256"]:
        raise ConfigError(f"the backbone {spec['backbone']} now has other weights than in training "
                          f"({info['weights_sha256'][:12]} vs {spec['encoder']['weights_sha256'][:12]})")
    return model.eval()


def run_train_image(source: Path, *, out_dir: Path, config: ImageTrainConfig, progress: bool = True,
                    prepared: tuple[CvInputs, torch.Tensor] | None = None) -> TrainReport:
    """The run; ``prepared`` (:func:`prepare_image_inputs`) when the inputs were checked
    before the run folder was made."""
    saved = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        inputs, images = prepared or prepare_image_inputs(source, config, progress=progress)
        device = config.resolved_device()
        road: ImageRoad | PatchMilRoad
        if config.mode == "mil":
            road = PatchMilRoad(config, inputs.task, inputs.samples, images, out_dir, device, progress)
        else:
            road = ImageRoad(config, inputs.task, inputs.samples, images, out_dir, device, progress)
        inputs.notes["transfer"] = {"mode": config.mode, "backbone": road.encoder["encoder"], "image_size": config.image_size,
                                    "augment": config.augment if config.mode not in ("linear", "mil") else "none (frozen features)"}
        if config.mode == "mil":
            inputs.notes["transfer"].update(patch_grid=config.patch_grid, patch_px=road.encoder["patch_px"],
                                            aggregator=config.mil_model)
        return run_cv(road, inputs, config, out_dir, progress=progress)
    finally:
        torch.set_num_threads(saved)
