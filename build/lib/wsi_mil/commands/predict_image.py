"""`wsi-mil predict-image`: apply a train-image run (the ensemble of its fold models) to
images, with Grad-CAM / Grad-CAM++ maps, boxes from thresholded maps and, given
ground-truth boxes, weak-localisation scores (ChestX-ray8's T(IoU) accuracy and average
false positives).

Outputs in ``--out``: ``predictions.csv`` (one row per image: probabilities, the call at
the run's ensemble thresholds, the label when the input has one), ``metrics.json`` when
labels are present, and with ``--cam``: ``cam/<image>.png`` (overlay, one panel per
output, boxes drawn), ``cam/<image>.geojson`` (high-activation regions, QuPath
annotations in the image's pixels), ``boxes.csv`` and, with ``--boxes``,
``localisation.json``.

A patch-MIL run (``train-image --mode mil``) is applied the same way; its maps are the
aggregator's attention over the patches (``--cam attention``), spread over each patch's
pixels (overlaps averaged) and written by the same exporters.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from wsi_mil.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)


@dataclass
class ImagePredictReport:
    out_dir: Path
    n_images: int
    metrics: dict[str, Any] | None = field(default_factory=dict)  # None when no input has a reference label
    localisation: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)


def load_run(run_dir: Path, loader: Any = None, command: str = "train-image"
             ) -> tuple[list[Any], dict[str, Any], list[float]]:
    """The fold models of a train-image (or, with its ``loader``, train-volume) run, the
    first fold's spec and the ensemble thresholds."""
    from wsi_mil.commands.train_image import load_image_model
    from wsi_mil.eval.metrics import ensemble_threshold
    from wsi_mil.io.run_folder import listed_folds

    stems = sorted((run_dir / "models").glob("fold*.json"))
    if not stems:
        raise ConfigError(f"{run_dir}: no models/fold*.json; give the --out folder of a finished {command} run")
    stems = listed_folds(run_dir, stems)  # the run's folds, and only those
    models, specs = [], []
    for s in stems:
        m, spec = (loader or load_image_model)(s.with_suffix(""))
        models.append(m)
        specs.append(spec)
    thr = [ensemble_threshold([sp["thresholds"][c] for sp in specs]) for c in range(len(specs[0]["thresholds"]))]
    return models, specs[0], thr


def reference_target(task: Any, entry: Any, unit: str) -> np.ndarray | None:
    """An input's reference label as a target (NaN where a cell is blank), or None when it
    has no label at all (predicted only)."""
    if not entry.labels or not any(v.strip() for v in entry.labels.values()):
        return None
    return np.asarray(task.target(entry.labels, f"{unit} {entry.slide_id}"), dtype=np.float32)


def labelled_metrics(task: Any, targets: list[np.ndarray | None], probs: np.ndarray, thresholds: list[float],
                     unit: str) -> dict[str, Any] | None:
    """Metrics over the inputs that have a reference label (blank ones are predicted, not
    scored, and counted), or None when none has."""
    from types import SimpleNamespace

    from wsi_mil.train.runner import evaluate

    rows = [i for i, t in enumerate(targets) if t is not None and np.isfinite(t).any()]
    if not rows:
        return None
    n_blank = len(targets) - len(rows)
    if n_blank:
        logger.warning("metrics over the %d labelled %s(s); %d %s(s) have no label and are predicted only",
                       len(rows), unit, n_blank, unit)
    metrics = evaluate(task, np.stack([targets[i] for i in rows]), np.asarray(probs)[rows], thresholds,  # type: ignore[misc]
                       SimpleNamespace(bootstrap=1000, seed=0))
    return {**metrics, f"n_{unit}s_labelled": len(rows), f"n_{unit}s_unlabelled": n_blank}


def read_boxes(path: Path) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Ground-truth boxes: CSV with image_id, label, x, y, width, height (pixels of the
    image as read) -> {label: {image_id: [box]}}."""
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    need = {"image_id", "label", "x", "y", "width", "height"}
    if not rows or not need <= set(rows[0]):
        raise ManifestError(f"{path}: a box CSV needs the columns {sorted(need)}")
    for r in rows:
        x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
        if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            raise ManifestError(f"{path}: box of {r['image_id']} has a non-finite or empty extent")
        out.setdefault(r["label"], {}).setdefault(r["image_id"], []).append({"x0": x, "y0": y, "x1": x + w, "y1": y + h})
    return out


def image_entries(source: Path, task: Any) -> list[Any]:
    """The images of ``source`` (a manifest CSV with the task's label columns when it has them,
    a MedMNIST .npz, a folder or one file)."""
    from wsi_mil.data.images import read_image_manifest

    if source.suffix.lower() == ".npz":
        from wsi_mil.data.images import npz_entries

        return npz_entries(source)
    if source.suffix.lower() == ".csv":
        return read_image_manifest(source, labels=list(task.label_columns), labels_optional=True)[0]
    from wsi_mil.data.images import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageEntry, unique_file_ids

    files = sorted(p for p in (source.rglob("*") if source.is_dir() else [source])
                   if p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES)
    if not files:
        raise ConfigError(f"{source}: no images (PNG, JPEG, TIFF, DICOM), manifest CSV or .npz")
    return [ImageEntry(i, p, None, {}, None, {}) for i, p in zip(unique_file_ids(files), files, strict=True)]


def run_predict_image(run_dir: Path, source: Path, *, out_dir: Path, cam: str | None = None, cam_threshold: float = 0.5,
                      boxes: Path | None = None, batch_size: int = 64, progress: bool = True) -> ImagePredictReport:
    from tqdm import tqdm

    from wsi_mil.commands.train_image import load_pixels
    from wsi_mil.data.bags import Task
    from wsi_mil.io.atomic import write_csv, write_json
    from wsi_mil.train.loop import probabilities
    from wsi_mil.train.runner import _prediction

    models, spec, thresholds = load_run(run_dir)
    task = Task.from_dict(spec["task"])
    size = int(spec["image_size"])
    # CENTRE,WIDTH as the training run recorded it (checked then: two numbers)
    window = cast("tuple[float, float] | None",
                  tuple(float(v) for v in spec["window"].split(",")) if spec.get("window") else None)
    entries = image_entries(source, task)
    images, bad = load_pixels(entries, size, window=window, use_voi=spec.get("use_voi", True), progress=progress)
    ok = [i for i, e in enumerate(entries) if e.slide_id not in {b["slide_id"] for b in bad}]
    for b in bad:
        logger.error("%s: %s", b["slide_id"], b["reason"])
    out_dir.mkdir(parents=True, exist_ok=True)
    mil = spec.get("mode") == "mil"
    if cam and (cam == "attention") != mil:
        raise ConfigError(f"--cam {cam}: a {'patch-MIL' if mil else 'whole-image'} run's maps are "
                          + ("its attention over patches: use --cam attention" if mil else "class activations: use "
                             "--cam gradcam or gradcam++ (--cam attention is for train-image --mode mil runs)"))
    probs = np.zeros((len(entries), task.n_outputs), np.float32)
    attention: dict[int, np.ndarray] = {}
    if mil:
        probs[ok], att = _predict_patch_mil(models, spec, task, images[torch.as_tensor(ok, dtype=torch.long)],
                                            [entries[i] for i in ok], progress)
        attention = dict(zip(ok, att, strict=True))
    else:
        with torch.no_grad():
            for a in tqdm(range(0, len(ok), batch_size), desc="predicting", unit="batch", disable=not progress):
                idx = torch.as_tensor(ok[a:a + batch_size])
                x = images[idx].float()
                probs[idx.numpy()] = np.mean([probabilities(m(x), task.kind).numpy() for m in models], axis=0)
    rows = []
    targets: list[np.ndarray | None] = []
    for i in ok:
        e = entries[i]
        row: dict[str, Any] = {"image_id": e.slide_id, "path": str(e.path) if e.path else ""}
        t = reference_target(task, e, "image")
        targets.append(t)
        if t is not None:
            truth = _prediction(task, t, [0.5] * task.n_outputs)
            row["label"] = ";".join(truth) if isinstance(truth, list) else truth
        for c, name in enumerate(task.outputs):
            row[f"prob_{name}"] = float(probs[i, c])
        pr = _prediction(task, probs[i], thresholds)
        row["prediction"] = ";".join(pr) if isinstance(pr, list) else pr
        rows.append(row)
    write_csv(out_dir / "predictions.csv", rows)
    report = ImagePredictReport(out_dir, len(ok), failed=bad)
    report.metrics = labelled_metrics(task, targets, probs[ok], thresholds, "image")
    if report.metrics is not None:
        write_json(out_dir / "metrics.json", report.metrics)
    if cam == "attention":
        grid = _attention_maps(spec, attention)
        report.localisation = _write_maps(task, entries, ok, probs, out_dir, cam, cam_threshold, boxes, progress,
                                          lambda i, c: grid[i])
    elif cam:
        from wsi_mil.viz.gradcam import cam_layer, grad_cam

        layer = cam_layer(models[0])
        logger.info("%s maps from backbone stage %s", cam, layer or "(last)")

        def gradcam_of(i: int, c: int) -> np.ndarray:
            x = images[i:i + 1].float()
            return np.mean([grad_cam(m, x, c, cam, layer) for m in models], axis=0)  # type: ignore[no-any-return]

        report.localisation = _write_maps(task, entries, ok, probs, out_dir, cam, cam_threshold, boxes, progress,
                                          gradcam_of)
    if bad:
        logger.warning("%d image(s) could not be read (listed above); %d predicted", len(bad), len(ok))
    return report


def _predict_patch_mil(models: list[Any], spec: dict[str, Any], task: Any, images: torch.Tensor, entries: list[Any],
                       progress: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities (mean of the folds) and attention (mean of the folds, per patch) of a
    patch-MIL run: the frozen backbone embeds every patch once, each fold's aggregator
    attends over them."""
    from wsi_mil.commands.train_image import patch_backbone
    from wsi_mil.data.bags import Bag
    from wsi_mil.encoders.image import patch_features, patch_grid
    from wsi_mil.train.loop import predict

    corners, side, step = patch_grid(int(spec["image_size"]), int(spec["patch_grid"]))
    feats = patch_features(patch_backbone(spec), images, int(spec["patch_grid"]), progress=progress)
    blank = np.zeros(task.n_outputs, np.float32)
    bags = [Bag(e.slide_id, e.slide_id, blank, None, None, feats[j], corners, step_px=float(step), extent_px=float(side))
            for j, e in enumerate(entries)]
    preds = [predict(m, bags, task) for m in models]
    probs = np.mean([p.probs for p in preds], axis=0)
    att = [np.mean([p.attention[j] for p in preds], axis=0) for j in range(len(bags))]
    return probs, att


def _attention_maps(spec: dict[str, Any], attention: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each image's patch attention spread over the pixels of the network input (a pixel
    covered by several patches gets their mean)."""
    from wsi_mil.encoders.image import patch_grid

    size = int(spec["image_size"])
    corners, side, _ = patch_grid(size, int(spec["patch_grid"]))
    out = {}
    for i, att in attention.items():
        total, count = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
        for (x, y), a in zip(corners.tolist(), np.asarray(att, np.float32), strict=True):
            total[y:y + side, x:x + side] += a
            count[y:y + side, x:x + side] += 1
        out[i] = total / np.maximum(count, 1)
    return out


def _write_maps(task: Any, entries: list[Any], ok: list[int], probs: np.ndarray, out_dir: Path, method: str,
                threshold: float, boxes_csv: Path | None, progress: bool, map_of: Any) -> dict[str, Any]:
    """One map per image and output (``map_of(i, c)``, any resolution; scaled to the image
    and to its peak) as overlay PNG, GeoJSON regions and boxes, scored against the
    ground-truth boxes when given."""
    from tqdm import tqdm

    from wsi_mil.eval.localisation import weak_localisation
    from wsi_mil.io.atomic import write_csv, write_json
    from wsi_mil.viz.geojson import write_geojson
    from wsi_mil.viz.gradcam import cam_boxes, overlay_cam_png, region_features, resize_map

    truth = read_boxes(boxes_csv) if boxes_csv else {}
    outputs = list(task.outputs)
    predicted: dict[str, dict[str, list[dict[str, float]]]] = {o: {} for o in outputs}
    box_rows: list[dict[str, Any]] = []
    for i in tqdm(ok, desc=f"{method} maps", unit="image", disable=not progress):
        e = entries[i]
        original = e.pixels if e.pixels is not None else None
        if original is None:
            from wsi_mil.data.images import read_image

            original = read_image(e.path)
        shape = original.shape[:2]
        maps, titles, boxes, feats = {}, {}, {}, []
        for c, name in enumerate(outputs):
            cam = np.asarray(map_of(i, c), np.float32)
            cam = cam / cam.max() if cam.max() > 0 else cam
            cam = resize_map(cam.astype(np.float32), shape)
            maps[name] = cam
            titles[name] = f"{name}: p = {probs[i, c]:.3f}"
            boxes[name] = cam_boxes(cam, threshold)
            predicted[name][e.slide_id] = boxes[name]
            box_rows += [{"image_id": e.slide_id, "label": name, "x": b["x0"], "y": b["y0"], "width": b["x1"] - b["x0"],
                          "height": b["y1"] - b["y0"], "peak": round(b["peak"], 4), "probability": round(float(probs[i, c]), 6)}
                         for b in boxes[name]]
            feats += region_features(cam, threshold, name=name, probability=float(probs[i, c]))
        overlay_cam_png(out_dir / "cam" / f"{e.slide_id}.png", original, maps, titles, boxes=boxes,
                        suptitle=f"{e.slide_id} ({method}, boxes at {threshold:.2f} of the peak)")
        write_geojson(out_dir / "cam" / f"{e.slide_id}.geojson", feats)
    write_csv(out_dir / "boxes.csv", box_rows)
    result: dict[str, Any] = {}
    for label, gt in truth.items():
        if label not in predicted:
            raise ManifestError(f"{boxes_csv}: label {label!r} is not an output of the model ({outputs})")
        result[label] = weak_localisation(predicted[label], gt)
    if result:
        write_json(out_dir / "localisation.json", {"method": method, "threshold": threshold, "per_label": result})
    return result
