"""`wsi-mil predict-volume`: apply a train-volume run (the ensemble of its fold models) to
volumes, with heatmaps.

Outputs in ``--out``: ``predictions.csv`` (one row per volume: probabilities, the call at
the run's ensemble thresholds, the label when the input has one), ``metrics.json`` when
labels are present, and with ``--maps``:

* ``maps/<id>.nii.gz``: the heatmap in [0, 1] on the input's own voxel grid, with the
  input's affine (a DICOM series: the affine of its (slice, row, column) array), so it
  opens as an overlay on the scan; for a MedMNIST array, on the array as stored;
* ``maps/<id>.png``: three orthogonal planes through the map's peak, blended over the
  prepared volume; for slice-MIL also the attention per axial slice;
* ``attention.csv`` (slice-MIL): the attention of every slice of every volume.

A 3D CNN's map is 3D Grad-CAM of the predicted output (mean over the fold models), taken
at the deepest stage whose map keeps 7 or more voxels a side (a 2³ last stage would only
say which octant); a
slice-MIL run's map is its attention per slice (mean over the folds), spread over each
slice, scaled to its peak.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.commands.predict_image import ImagePredictReport, labelled_metrics, load_run, reference_target
from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)


def _entries(source: Path, task: Any) -> list[Any]:
    from wsi_mil.data.images import ImageEntry, _image_id, read_image_manifest, unique_file_ids
    from wsi_mil.data.volumes import NIFTI_SUFFIXES, npz_volume_entries

    if source.suffix.lower() == ".npz":
        return npz_volume_entries(source)
    if source.suffix.lower() == ".csv":
        return read_image_manifest(source, labels=list(task.label_columns), folders=True, labels_optional=True)[0]
    if source.is_file() and source.name.lower().endswith(NIFTI_SUFFIXES):
        return [ImageEntry(_image_id(source.name), source, None, {}, None, {})]
    if source.is_dir():
        nifti = sorted(p for p in source.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES))
        if nifti:
            return [ImageEntry(i, p, None, {}, None, {}) for i, p in zip(unique_file_ids(nifti, "volume"), nifti,
                                                                          strict=True)]
        return [ImageEntry(_image_id(source.name), source, None, {}, None, {})]  # one DICOM series
    raise ConfigError(f"{source}: give a volume manifest CSV, a MedMNIST 3D .npz, a NIfTI file, a DICOM series folder "
                      "or a folder of NIfTI files")


def run_predict_volume(run_dir: Path, source: Path, *, out_dir: Path, maps: bool = False, limit_maps: int | None = None,
                       progress: bool = True) -> ImagePredictReport:
    from tqdm import tqdm

    from wsi_mil.commands.train_volume import load_volume_model, prep_of
    from wsi_mil.data.bags import Task
    from wsi_mil.data.volumes import VolumeReadError, load_volume, prepare_volume
    from wsi_mil.io.atomic import write_csv, write_json
    from wsi_mil.train.loop import probabilities
    from wsi_mil.train.runner import _prediction

    models, spec, thresholds = load_run(run_dir, load_volume_model, "train-volume")
    task = Task.from_dict(spec["task"])
    prep = prep_of(spec)
    entries = _entries(source, task)
    slices = spec["mode"] == "slices"
    backbone = None
    if slices:
        from wsi_mil.commands.train_image import patch_backbone

        backbone = patch_backbone(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, targets, probs_ok, failed, att_rows = [], [], [], [], []
    n_maps = 0
    for e in tqdm(entries, desc="predicting", unit="volume", disable=not progress):
        try:
            vol = load_volume(e)
            x_np, geo = prepare_volume(vol, prep)
        except VolumeReadError as exc:
            logger.error("%s: %s", e.slide_id, exc)
            failed.append({"slide_id": e.slide_id, "reason": str(exc)})
            continue
        x = torch.from_numpy(x_np)[None, None]
        attention = None
        if slices:
            probs, attention = _slice_mil(models, backbone, spec, task, x)
            att_rows += [{"volume_id": e.slide_id, "slice": z, "attention": round(float(a), 6)} for z, a in enumerate(attention)]
        else:
            with torch.no_grad():
                probs = np.mean([probabilities(m(x), task.kind).numpy()[0] for m in models], axis=0)
        row: dict[str, Any] = {"volume_id": e.slide_id, "path": str(e.path) if e.path else ""}
        t = reference_target(task, e, "volume")
        targets.append(t)
        if t is not None:
            truth = _prediction(task, t, [0.5] * task.n_outputs)
            row["label"] = ";".join(truth) if isinstance(truth, list) else truth
        for c, name in enumerate(task.outputs):
            row[f"prob_{name}"] = float(probs[c])
        pr = _prediction(task, probs, thresholds)
        row["prediction"] = ";".join(pr) if isinstance(pr, list) else pr
        rows.append(row)
        probs_ok.append(probs)
        if maps and (limit_maps is None or n_maps < limit_maps):
            _write_maps(out_dir, e.slide_id, vol, geo, x_np, models, task, probs, attention)
            n_maps += 1
    write_csv(out_dir / "predictions.csv", rows)
    if att_rows:
        write_csv(out_dir / "attention.csv", att_rows)
    report = ImagePredictReport(out_dir, len(rows), failed=failed)
    report.metrics = labelled_metrics(task, targets, np.stack(probs_ok) if probs_ok else np.zeros((0, 0)), thresholds,
                                      "volume")
    if report.metrics is not None:
        write_json(out_dir / "metrics.json", report.metrics)
    if failed:
        logger.warning("%d volume(s) could not be read (listed above); %d predicted", len(failed), len(rows))
    return report


@torch.no_grad()
def _slice_mil(models: list[Any], backbone: Any, spec: dict[str, Any], task: Any, x: torch.Tensor
               ) -> tuple[np.ndarray, np.ndarray]:
    from wsi_mil.commands.train_volume import slice_stack
    from wsi_mil.data.bags import Bag
    from wsi_mil.encoders.image import image_features
    from wsi_mil.train.loop import predict

    depth = int(x.shape[2])
    feats = image_features(backbone, slice_stack(x, int(spec["slice_size"])))
    coords = np.stack([np.zeros(depth, np.int64), np.arange(depth, dtype=np.int64)], axis=1)
    bag = Bag("v", "v", np.zeros(task.n_outputs, np.float32), None, None, feats, coords)
    preds = [predict(m, [bag], task) for m in models]
    return np.mean([p.probs[0] for p in preds], axis=0), np.mean([p.attention[0] for p in preds], axis=0)


def _write_maps(out_dir: Path, vid: str, vol: Any, geo: Any, x: np.ndarray, models: list[Any], task: Any,
                probs: np.ndarray, attention: np.ndarray | None) -> None:
    from wsi_mil.viz.gradcam import cam_layer, grad_cam
    from wsi_mil.viz.volume import orthogonal_png, write_nifti_map

    if attention is not None:
        a = np.asarray(attention, np.float32)
        grid = np.repeat((a / a.max() if a.max() > 0 else a)[:, None, None], x.shape[1], axis=1)
        grid = np.repeat(grid, x.shape[2], axis=2)
        maps = {"attention": grid}
        titles = {"attention": f"slice attention; p = {', '.join(f'{p:.3f}' for p in probs)}"}
    else:
        c = int(np.argmax(probs)) if task.kind_obj.argmax_call else 0
        t = torch.from_numpy(x)[None, None]
        layer = cam_layer(models[0], max_reduction=max(2, x.shape[0] // 7))  # a map of 7 or more voxels a side
        cam = np.mean([grad_cam(m, t, c, "gradcam", layer) for m in models], axis=0)
        name = task.outputs[c]
        maps = {name: (cam / cam.max() if cam.max() > 0 else cam).astype(np.float32)}
        titles = {name: f"3D Grad-CAM {name}: p = {probs[c]:.3f}"}
    source_map = vol.to_source(geo.to_canonical(next(iter(maps.values()))))
    write_nifti_map(out_dir / "maps" / f"{vid}.nii.gz", np.clip(source_map, 0, 1), vol.source_affine,
                    description=f"wsi-mil {'slice attention' if attention is not None else '3D Grad-CAM'}")
    orthogonal_png(out_dir / "maps" / f"{vid}.png", x, maps, titles, attention=attention, suptitle=vid)
