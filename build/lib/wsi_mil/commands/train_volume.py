"""`wsi-mil train-volume`: 3D CT / MRI volume classification through the shared run.

Input: a volume manifest CSV (``path`` = a NIfTI file or a folder holding one DICOM series,
relative to the manifest; ``patient_id``, ``split``, label columns as for images) or a
MedMNIST 3D ``.npz``. Every volume is read into the canonical frame and prepared as the
settings say (``wsi_mil.data.volumes``: spacing, windowing, cube of ``volume_size``³); the
preparation is recorded in every model's spec and in report.md.

Two roads, both through ``wsi_mil.train.runner.run_cv`` (patient-level splits, folds,
thresholds, ensemble, calibration, the same report as train-mil and train-image):

* ``--mode cnn`` (:class:`VolumeRoad`): a 3D CNN on the whole volume (``--arch``
  resnet18_3d from scratch, or the pretrained 2D backbone turned 3D by ACS or inflated
  convolutions), trained with 3D augmentation that never mirrors left and right.
* ``--mode slices`` (:class:`SliceMilRoad`): 2.5D slice-MIL. The frozen 2D backbone embeds
  every axial slice once (the cached feature store of train-image), and the MIL
  aggregator (``--mil-model``: mean pooling, or attention) pools them; train-mil's
  :class:`MilRoad` fed slices. ``attention/`` holds the attention per slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.commands.train_image import ImageRoad, PatchMilRoad, check_entries, refuse_unreadable
from wsi_mil.config import VolumeTrainConfig
from wsi_mil.data.bags import Task
from wsi_mil.data.images import ImageEntry, ImageSample
from wsi_mil.data.volumes import (
    Geometry,
    VolumePrep,
    VolumeReadError,
    load_volume,
    npz_volume_entries,
    prepare_volume,
)
from wsi_mil.errors import ConfigError
from wsi_mil.train.runner import CvInputs, TrainReport, checks_before_training, run_cv, tensor_pixels

logger = logging.getLogger(__name__)


def read_volume_entries(source: Path, config: Any) -> tuple[list[ImageEntry], dict[str, Any]]:
    from wsi_mil.commands.train_image import read_entries

    return read_entries(source, config, npz_reader=npz_volume_entries, what="a volume manifest CSV", npz_kind="MedMNIST 3D",
                        folders=True,
                        csv_only=("give a volume manifest CSV (path, patient_id, split, label columns; a path is a NIfTI "
                                  "file or a DICOM series folder) or a MedMNIST 3D .npz"))


def load_volumes(entries: list[ImageEntry], prep: VolumePrep, *, progress: bool = False
                 ) -> tuple[torch.Tensor, list[Geometry | None], list[dict[str, str]], list[str]]:
    """Every volume prepared (N, 1, S, S, S) as float16, their geometries, the unreadable ones
    (id, reason) and the distinct notes (assumptions) the readers made."""
    from tqdm import tqdm

    n = prep.size
    out = torch.zeros((len(entries), 1, n, n, n), dtype=torch.float16)
    geos: list[Geometry | None] = []
    bad: list[dict[str, str]] = []
    notes: list[str] = []
    for i, e in enumerate(tqdm(entries, desc="reading volumes", unit="volume", disable=not progress)):
        try:
            vol = load_volume(e)
            x, geo = prepare_volume(vol, prep)
            out[i, 0] = torch.from_numpy(x)
            geos.append(geo)
            notes += [t for t in vol.notes if t not in notes]
        except VolumeReadError as exc:
            bad.append({"slide_id": e.slide_id, "reason": str(exc)})
            geos.append(None)
    return out, geos, bad, notes


class VolumeRoad(ImageRoad):
    """Whole volumes through a 3D CNN (the image road's feeder, loop and Grad-CAM)."""

    unit = "volume"
    command = "train-volume"

    def __init__(self, config: VolumeTrainConfig, task: Task, samples: list[ImageSample], volumes: torch.Tensor) -> None:
        from wsi_mil.data.augment import volume_preset
        from wsi_mil.encoders.volume import build_volume_classifier

        self.config, self.task, self.images = config, task, volumes  # type: ignore[assignment]
        self.row = {s.slide_id: i for i, s in enumerate(samples)}
        self.augment = volume_preset(config.augment)  # type: ignore[assignment]
        _, info = build_volume_classifier(config.arch, task.n_outputs, backbone=config.backbone, weights=config.weights,
                                          width=config.width)
        self.encoder = {**info, "mode": "cnn", "arch": config.arch, "prep": config.prep().record()}
        self.dim = int(info["dim"])
        self.model_name = str(info["encoder"])
        self.image_key = hashlib.sha256(volumes.numpy().tobytes()).hexdigest()[:16]
        self.features = None

    def new_model(self) -> Any:
        from wsi_mil.encoders.volume import build_volume_classifier

        c = self.config
        return build_volume_classifier(c.arch, self.task.n_outputs, backbone=c.backbone, weights=c.weights,  # type: ignore[attr-defined]
                                       width=c.width, dropout=c.dropout)[0]  # type: ignore[attr-defined]

    def param_groups(self, model: Any) -> None:
        return None  # every layer trained at the base rate

    def spec(self) -> dict[str, Any]:
        c: Any = self.config
        return {"kind": "volume", "mode": "cnn", "arch": c.arch, "backbone": c.backbone, "weights": c.weights,
                "width": c.width, "in_dim": self.dim, "n_outputs": self.task.n_outputs, "dropout": c.dropout,
                "prep": c.prep().record()}

    def save(self, stem: Path, model: Any, spec: dict[str, Any]) -> None:
        from wsi_mil.train.checkpoint import save_model

        save_model(stem, model, spec)

    def load(self, stem: Path) -> tuple[Any, dict[str, Any]]:
        return load_volume_model(stem)


def slice_stack(volumes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, D, H, W) -> (N * D, 1, size, size): every axial slice, resized (antialiased)."""
    n, _, d, h, w = volumes.shape
    flat = volumes.reshape(n * d, 1, h, w)
    if (h, w) == (size, size):
        return flat
    out = torch.empty((n * d, 1, size, size), dtype=volumes.dtype)
    for a in range(0, len(flat), 4096):
        out[a:a + 4096] = torch.nn.functional.interpolate(flat[a:a + 4096].float(), size=(size, size), mode="bilinear",
                                                          align_corners=False, antialias=h > size).to(volumes.dtype)
    return out


class SliceMilRoad(PatchMilRoad):
    """2.5D: a volume as the bag of its axial slices' frozen 2D features."""

    unit = "volume"
    command = "train-volume"

    def __init__(self, config: VolumeTrainConfig, task: Task, samples: list[ImageSample], volumes: torch.Tensor,
                 out_dir: Path, device: str, progress: bool) -> None:
        from wsi_mil.encoders.image import build_classifier, cached_features

        self.config, self.n_outputs, self.task = config, task.n_outputs, task  # type: ignore[assignment]
        self.images, self.row = volumes, {s.slide_id: i for i, s in enumerate(samples)}  # (for the audit)
        backbone, info = build_classifier(config.backbone, task.n_outputs, weights=config.weights)
        depth = int(volumes.shape[2])
        slices = slice_stack(volumes, config.slice_size)
        self.image_key = hashlib.sha256(volumes.numpy().tobytes()).hexdigest()[:16]
        cache = Path(config.feature_cache) if config.feature_cache else out_dir / "features"
        ids = [f"{s.slide_id}#{z}" for s in samples for z in range(depth)]
        feats = cached_features(cache, backbone, info, slices, ids, f"{self.image_key}|slices {config.slice_size}",
                                device=device, progress=progress).reshape(len(samples), depth, -1)
        self.encoder = {**info, "mode": "slices", "slice_size": config.slice_size, "prep": config.prep().record()}
        self.dim = int(info["dim"])
        self.model_name = f"{config.mil_model} over {depth} axial slices ({info['encoder']}, frozen)"
        coords = np.stack([np.zeros(depth, np.int64), np.arange(depth, dtype=np.int64)], axis=1)  # (x, y) = (0, slice)
        self.set_bags(samples, feats, coords, 1.0, 1.0)
        self.geometry = {"volume_size": config.volume_size, "coordinates": "(0, axial slice index) on the network grid, "
                         "slice 0 the most inferior"}

    def spec(self) -> dict[str, Any]:
        c: Any = self.config
        return {"kind": "volume", "mode": "slices", "model": c.mil_model, "in_dim": self.dim,
                "n_outputs": self.n_outputs, "model_args": c.model_args(), "backbone": c.backbone, "weights": c.weights,
                "slice_size": c.slice_size, "dropout": c.dropout, "prep": c.prep().record()}

    def load(self, stem: Path) -> tuple[Any, dict[str, Any]]:
        return load_volume_model(stem)


def load_volume_model(stem: Path) -> tuple[Any, dict[str, Any]]:
    """A fold's 3D CNN (or slice aggregator) from its safetensors + JSON (weights only)."""
    from safetensors.torch import load_file

    from wsi_mil.encoders.volume import build_volume_classifier

    spec_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not spec_path.exists() or not weights.exists():
        raise ConfigError(f"no volume model at {stem} (need {spec_path.name} and {weights.name})")
    spec = json.loads(spec_path.read_text())
    if spec.get("kind") != "volume":
        raise ConfigError(f"{spec_path}: not a volume model (made by train-{'image' if spec.get('kind') == 'image' else 'mil'}?)")
    if spec["mode"] == "slices":
        from wsi_mil.train.checkpoint import load_model

        return load_model(stem)
    model, _ = build_volume_classifier(spec["arch"], spec["n_outputs"], backbone=spec["backbone"], weights=spec.get("weights"),
                                       width=spec["width"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), spec


def prep_of(spec: dict[str, Any]) -> VolumePrep:
    p = spec["prep"]
    return VolumePrep(int(p["size"]), tuple(p["spacing"]) if p.get("spacing") else None, p["intensity"],  # type: ignore[arg-type]
                      tuple(p["window"]) if p.get("window") else None)  # type: ignore[arg-type]


def resolve_intensity(config: VolumeTrainConfig, source: Path) -> VolumeTrainConfig:
    """``--intensity auto`` made the concrete mode it stands for (window with --window, unit
    for a MedMNIST .npz, else minmax), so that the models record it and predict-volume
    maps every input the way training did, whatever file type it is given."""
    import dataclasses

    if config.intensity != "auto":
        return config
    mode = "window" if config.window else "unit" if Path(source).suffix.lower() == ".npz" else "minmax"
    logger.info("--intensity auto: %s (recorded with the models; predict-volume uses the same)", mode)
    return dataclasses.replace(config, intensity=mode)


def prepare_volume_inputs(source: Path, config: VolumeTrainConfig, *, progress: bool = False
                          ) -> tuple[CvInputs, torch.Tensor, list[str]]:
    """Checked inputs, the prepared volumes and the readers' notes; every check that can
    refuse the run (unreadable volumes, duplicates across the splits ...) is made here,
    before the run folder and any feature exist."""
    config = resolve_intensity(config, source)
    prep = config.prep()
    entries, consensus = read_volume_entries(source, config)
    inputs = check_entries(entries, consensus, config, unit="volume")
    volumes, _, bad, notes = load_volumes(entries, prep, progress=progress)
    refuse_unreadable(bad, len(entries), unit="volume")
    inputs.checked = checks_before_training(inputs.samples, tensor_pixels(volumes, inputs.samples), inputs.columns,
                                            inputs.user_split, config, "volume", task=inputs.task)
    from wsi_mil.io.run_folder import input_record

    inputs.sources = {"source": input_record(source)}
    return inputs, volumes, notes


def run_train_volume(source: Path, *, out_dir: Path, config: VolumeTrainConfig, progress: bool = True,
                     prepared: tuple[CvInputs, torch.Tensor, list[str]] | None = None) -> TrainReport:
    saved = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        config = resolve_intensity(config, source)
        prep = config.prep()
        inputs, volumes, notes = prepared or prepare_volume_inputs(source, config, progress=progress)
        device = config.resolved_device()
        road: VolumeRoad | SliceMilRoad
        if config.mode == "slices":
            road = SliceMilRoad(config, inputs.task, inputs.samples, volumes, out_dir, device, progress)
        else:
            road = VolumeRoad(config, inputs.task, inputs.samples, volumes)
        inputs.notes["transfer"] = {"mode": config.mode, "backbone": road.encoder["encoder"],
                                    "augment": config.augment if config.mode == "cnn" else "none (frozen features)",
                                    "volume preparation": prep.record(), **({"reader notes": notes} if notes else {})}
        return run_cv(road, inputs, config, out_dir, progress=progress)
    finally:
        torch.set_num_threads(saved)
