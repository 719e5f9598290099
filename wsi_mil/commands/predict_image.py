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
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.errors import ConfigError, ManifestError

logger = logging.getLogger(__name__)


@dataclass
class ImagePredictReport:
    out_dir: Path
    n_images: int
    metrics: dict[str, Any] = field(default_factory=dict)
    localisation: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)


def load_run(run_dir: Path) -> tuple[list[Any], dict[str, Any], list[float]]:
    """The fold models of a train-image run, the first fold's spec and the ensemble thresholds."""
    from wsi_mil.commands.train_image import load_image_model
    from wsi_mil.eval.metrics import ensemble_threshold

    stems = sorted((run_dir / "models").glob("fold*.json"))
    if not stems:
        raise ConfigError(f"{run_dir}: no models/fold*.json; give the --out folder of a finished train-image run")
    models, specs = [], []
    for s in stems:
        m, spec = load_image_model(s.with_suffix(""))
        models.append(m)
        specs.append(spec)
    thr = [ensemble_threshold([sp["thresholds"][c] for sp in specs]) for c in range(len(specs[0]["thresholds"]))]
    return models, specs[0], thr


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


def run_predict_image(run_dir: Path, source: Path, *, out_dir: Path, cam: str | None = None, cam_threshold: float = 0.5,
                      boxes: Path | None = None, batch_size: int = 64, progress: bool = True) -> ImagePredictReport:
    from tqdm import tqdm

    from wsi_mil.commands.train_image import load_pixels
    from wsi_mil.data.bags import Task
    from wsi_mil.data.images import read_image_manifest
    from wsi_mil.io.atomic import write_csv, write_json
    from wsi_mil.train.loop import probabilities
    from wsi_mil.train.runner import _prediction

    models, spec, thresholds = load_run(run_dir)
    task = Task.from_dict(spec["task"])
    size = int(spec["image_size"])
    window = tuple(float(v) for v in spec["window"].split(",")) if spec.get("window") else None
    if source.suffix.lower() == ".npz":
        from wsi_mil.data.images import npz_entries

        entries = npz_entries(source)
    elif source.suffix.lower() == ".csv":
        entries, _ = read_image_manifest(source, labels=list(task.label_columns))
    else:
        from wsi_mil.data.images import DICOM_SUFFIXES, IMAGE_SUFFIXES, ImageEntry, _image_id

        files = sorted(p for p in (source.rglob("*") if source.is_dir() else [source])
                       if p.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES)
        if not files:
            raise ConfigError(f"{source}: no images (PNG, JPEG, TIFF, DICOM), manifest CSV or .npz")
        entries = [ImageEntry(_image_id(str(p)), p, None, {}, None, {}) for p in files]
    images, bad = load_pixels(entries, size, window=window, use_voi=spec.get("use_voi", True), progress=progress)
    ok = [i for i, e in enumerate(entries) if e.slide_id not in {b["slide_id"] for b in bad}]
    for b in bad:
        logger.error("%s: %s", b["slide_id"], b["reason"])
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = np.zeros((len(entries), task.n_outputs), np.float32)
    with torch.no_grad():
        for a in tqdm(range(0, len(ok), batch_size), desc="predicting", unit="batch", disable=not progress):
            idx = torch.as_tensor(ok[a:a + batch_size])
            x = images[idx].float()
            probs[idx.numpy()] = np.mean([probabilities(m(x), task.kind).numpy() for m in models], axis=0)
    rows = []
    targets = []
    for i in ok:
        e = entries[i]
        row: dict[str, Any] = {"image_id": e.slide_id, "path": str(e.path) if e.path else ""}
        if e.labels and any(v.strip() for v in e.labels.values()):
            t = task.target(e.labels, f"image {e.slide_id}")
            targets.append(t)
            truth = _prediction(task, t, [0.5] * task.n_outputs)
            row["label"] = ";".join(truth) if isinstance(truth, list) else truth
        for c, name in enumerate(task.outputs):
            row[f"prob_{name}"] = round(float(probs[i, c]), 6)
        pr = _prediction(task, probs[i], thresholds)
        row["prediction"] = ";".join(pr) if isinstance(pr, list) else pr
        rows.append(row)
    write_csv(out_dir / "predictions.csv", rows)
    report = ImagePredictReport(out_dir, len(ok), failed=bad)
    if targets and len(targets) == len(ok):
        from types import SimpleNamespace

        from wsi_mil.train.runner import evaluate

        report.metrics = evaluate(task, np.stack(targets), probs[ok], thresholds, SimpleNamespace(bootstrap=1000, seed=0))
        write_json(out_dir / "metrics.json", report.metrics)
    if cam:
        report.localisation = _cams(models, task, entries, ok, images, probs, out_dir, cam, cam_threshold, boxes, progress)
    if bad:
        logger.warning("%d image(s) could not be read (listed above); %d predicted", len(bad), len(ok))
    return report


def _cams(models: list[Any], task: Any, entries: list[Any], ok: list[int], images: torch.Tensor, probs: np.ndarray,
          out_dir: Path, method: str, threshold: float, boxes_csv: Path | None, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from wsi_mil.eval.localisation import weak_localisation
    from wsi_mil.io.atomic import write_csv, write_json
    from wsi_mil.viz.geojson import write_geojson
    from wsi_mil.viz.gradcam import (
        cam_boxes,
        cam_layer,
        grad_cam,
        overlay_cam_png,
        region_features,
        resize_map,
    )

    truth = read_boxes(boxes_csv) if boxes_csv else {}
    layer = cam_layer(models[0])
    logger.info("%s maps from backbone stage %s", method, layer or "(last)")
    outputs = list(task.outputs)
    predicted: dict[str, dict[str, list[dict[str, float]]]] = {o: {} for o in outputs}
    box_rows: list[dict[str, Any]] = []
    for i in tqdm(ok, desc=f"{method} maps", unit="image", disable=not progress):
        e = entries[i]
        x = images[i:i + 1].float()
        original = e.pixels if e.pixels is not None else None
        if original is None:
            from wsi_mil.data.images import read_image

            original = read_image(e.path)
        shape = original.shape[:2]
        maps, titles, boxes, feats = {}, {}, {}, []
        for c, name in enumerate(outputs):
            cam = np.mean([grad_cam(m, x, c, method, layer) for m in models], axis=0)
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
