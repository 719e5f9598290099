"""`wsi-mil predict`: apply a trained run (the ensemble of its fold models) to new slides.

Inputs are feature stores (files or folders) made with the same encoder as the training
run (checked). Writes ``predictions.csv`` (probability per output, prediction at the
fold ensemble's threshold: the mean of the folds' validation thresholds in logit
space), ``attention/<slide>.h5`` (ensemble
attention with coordinates, for heatmaps) and ``predict_report.json``. A store that
cannot be read is reported and the others are predicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.data.bags import Bag, Task, patch_geometry
from wsi_mil.errors import ConfigError, StoreError
from wsi_mil.io.atomic import write_csv, write_json
from wsi_mil.io.paths import path_record

logger = logging.getLogger(__name__)


@dataclass
class PredictReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def load_run(run_dir: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    from wsi_mil.io.run_folder import listed_folds
    from wsi_mil.train.checkpoint import load_model

    found = sorted((run_dir / "models").glob("fold*.json"))
    if not found:
        raise ConfigError(f"{run_dir}: no trained models (models/fold*.json); give the --out folder of train-mil")
    stems = [p.with_suffix("") for p in listed_folds(run_dir, found)]  # the run's folds, and only those
    loaded = [load_model(s) for s in stems]
    return [m for m, _ in loaded], [s for _, s in loaded]


def _stores(inputs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in inputs:
        if p.is_dir() and p.suffix != ".zarr":
            base = p / "features" if (p / "features").is_dir() else p
            out += sorted(q for q in base.iterdir() if q.suffix in (".h5", ".zarr"))
        elif not p.exists():  # said now, before any folder (was: "p: p: no such store. Run `wsi-mil tile` first")
            raise ConfigError(f"{p}: no such file or folder; give extract-features output folders (holding "
                              "features/) or feature store files")
        else:
            out.append(p)
    if not out:
        raise ConfigError("no feature stores found in the inputs; give extract-features output folders or store files")
    return out


#: no encoder's embedding comes near this; a store holding such values is damaged
ABSURD_FEATURE = 1e6


def check_resolution(attrs: dict[str, Any], enc: dict[str, Any], store: Path) -> None:
    """A store tiled at another resolution or patch size than the run's is refused (the
    model learnt one scale: a positive slide at twice the µm/px can read negative)."""
    from wsi_mil.commands.train_mil import same_resolution

    want_mpp: Any = enc.get("effective_mpp")  # JSON values: a number, None or "none" when not recorded
    want_size: Any = enc.get("patch_size_px")
    mpp: Any = attrs.get("effective_mpp")
    size: Any = attrs.get("patch_size_px")
    wrong = []
    if want_mpp is not None and mpp not in (None, "none") and not same_resolution(float(mpp), float(want_mpp)):
        wrong.append(f"{float(mpp):.3f} µm/px (the run: {float(want_mpp):.3f})")
    if want_size is not None and size not in (None, "none") and int(size) != int(want_size):
        wrong.append(f"{int(size)} px patches (the run: {int(want_size)})")
    if wrong:  # the advice names what the run recorded (a value it did not record is left out, not guessed)
        flags = [f"--mpp {float(want_mpp):g}" if want_mpp not in (None, "none") else "",
                 f"--patch-size {int(want_size)}" if want_size not in (None, "none") else ""]
        raise ConfigError(f"{store}: tiled at {' and '.join(wrong)}; the model was trained at one scale. Tile the "
                          f"slide with {' '.join(f for f in flags if f)} and extract its features again")


def _covariate_rows(specs: list[dict[str, Any]], manifest: Path | None) -> tuple[list[Any], dict[str, dict[str, str]]]:
    """Each fold model's covariate encoding and the manifest's rows (refused now when the run needs them)."""
    from wsi_mil.data.covariates import CovariateEncoder
    from wsi_mil.data.manifest import entry_columns, read_manifest

    if not any(s.get("covariates") for s in specs):
        return [], {}
    names = specs[0]["covariates"]["names"]
    if manifest is None:
        raise ConfigError(f"this run's models take the covariates {', '.join(names)}: give --manifest with those "
                          "columns for the slides to predict")
    columns = entry_columns(read_manifest(manifest, require_path=False))
    held = {k for row in columns.values() for k in row}
    missing = [n for n in names if n not in held]
    if missing:
        raise ConfigError(f"--manifest {manifest} lacks the covariate column(s) {missing} the run was trained with")
    return [CovariateEncoder.from_dict(s["covariates"]) for s in specs], columns


def run_predict(run_dir: Path, inputs: list[Path], *, out_dir: Path, device: str = "cpu",
                manifest: Path | None = None) -> PredictReport:
    from wsi_mil.commands.train_mil import _prediction
    from wsi_mil.io.attention import write_attention
    from wsi_mil.io.store import PatchStore
    from wsi_mil.train.loop import predict

    models, specs = load_run(run_dir)
    task = Task.from_dict(specs[0]["task"])
    if specs[0].get("bag") == "patient":
        return _predict_patients(run_dir, inputs, models, specs, task, out_dir=out_dir, device=device, manifest=manifest)
    encodings, covariate_rows = _covariate_rows(specs, manifest)
    enc = specs[0].get("encoder", {})
    thresholds = task.kind_obj.ensemble_thresholds(task, [s["thresholds"] for s in specs])
    report = PredictReport()
    for store in _stores(inputs):
        sid = store.stem
        try:
            with PatchStore(store) as opened:  # a store that cannot be opened says why (locked, damaged ...)
                attrs = opened.attrs
            if attrs.get("complete") is not True:
                raise ConfigError(f"{store} is incomplete or not a feature store")
            if attrs.get("encoder") is None:  # (was reported as "encoder mismatch: ... made with None")
                raise ConfigError(f"{store} is a patch store (tile's output), not a feature store: run "
                                  "`wsi-mil extract-features` on it first and predict from its features/")
            if enc.get("weights_sha256") and attrs.get("weights_sha256") != enc["weights_sha256"]:
                raise ConfigError(f"encoder mismatch: the store was made with {attrs.get('encoder')} "
                                  f"(weights {str(attrs.get('weights_sha256'))[:12]}), the model was trained on "
                                  f"{enc.get('encoder')} (weights {enc['weights_sha256'][:12]}); re-extract with the training encoder")
            if [str(t) for t in attrs.get("transforms", [])] != enc.get("transforms", []):
                raise ConfigError(f"test-time transforms differ: store {list(attrs.get('transforms', []))}, "
                                  f"training run {enc.get('transforms', [])}; re-extract with the training settings")
            check_resolution(attrs, enc, store)
            extent, step = patch_geometry(attrs, store)
            bag = Bag(sid, sid, np.zeros(task.n_targets, np.float32), store, step_px=step, extent_px=extent).cache()
            if bag.features is not None and not len(bag.features):  # scored at a constant probability before
                raise StoreError(f"{store} holds no patches (tiling found no tissue that passed its settings: see the "
                                 "slide's QC image); there is nothing to predict from. Re-tile it with other tissue "
                                 "settings (e.g. --min-tissue, --no-reject-pen)")
            preds = []
            for i, m in enumerate(models):
                if encodings:  # (each fold model with its own fitted encoding)
                    if sid not in covariate_rows:
                        raise ConfigError(f"not in --manifest {manifest}, whose covariates the models need")
                    bag.covariates = encodings[i].encode(covariate_rows[sid], f"slide {sid}")
                preds.append(predict(m, [bag], task, device=device))
            probs = np.mean([p.probs[0] for p in preds], axis=0)
            att = np.mean([p.attention[0] for p in preds], axis=0)
            share = None if any(p.contribution is None for p in preds) else \
                np.mean([p.contribution[0] for p in preds if p.contribution is not None], axis=0)
            if not (np.isfinite(probs).all() and np.isfinite(att).all()):
                peak = float(np.abs(bag.features).max()) if bag.features is not None and bag.features.size else 0.0
                if peak > ABSURD_FEATURE:  # finite, but no encoder gives these: the store, not the model, is damaged
                    raise StoreError(f"{store}: its features reach {peak:.3g}, far beyond what an encoder gives (the "
                                     "models overflow on them); the store is damaged: extract this slide's features "
                                     "again")
                raise StoreError(f"{store}: the models gave a non-finite probability or attention for this slide "
                                 "(its features are finite and in range, so a model is damaged); retrain the run")
        except Exception as exc:  # noqa: BLE001 - one bad store must not stop the batch
            logger.error("%s: %s", sid, exc)
            report.failed.append({"slide_id": sid, "store": str(store), "error": f"{type(exc).__name__}: {exc}"})
            continue
        pred = _prediction(task, probs, thresholds)
        att_dir = out_dir / "attention"
        assert bag.coords is not None  # Bag.cache() holds them
        write_attention(att_dir / f"{sid}.h5", coords=bag.coords, attention=att, contribution=share,
                        contribution_unit=task.kind_obj.contribution_unit, attrs={
            "slide_id": sid, "fold": "ensemble", "split": "predict", "model": specs[0]["model"],
            "outputs": list(task.outputs), "probability": [float(v) for v in probs], "prediction": pred,
            "task_kind": task.kind,
            **path_record("feature_store", store, att_dir), **path_record("run", run_dir, att_dir),
            "patch_extent_level0_px": extent,
            "grid_step_level0_px": step})
        row: dict[str, Any] = {"slide_id": sid}
        row.update({col: float(probs[c]) for c, col in enumerate(task.kind_obj.output_columns(task))})
        row["prediction"] = ";".join(pred) if isinstance(pred, list) else pred
        row.update(task.kind_obj.prediction_columns(task, probs, thresholds))
        report.rows.append(row)
    if report.rows:
        write_csv(out_dir / "predictions.csv", report.rows)
    write_json(out_dir / "predict_report.json", {"run": str(run_dir), "n_models": len(models), "thresholds": thresholds,
                                                 "task": task.to_dict(), "predicted": len(report.rows), "failed": report.failed})
    return report


def _predict_patients(run_dir: Path, inputs: list[Path], models: list[Any], specs: list[dict[str, Any]], task: Task, *,
                      out_dir: Path, device: str, manifest: Path | None) -> PredictReport:
    """A run trained with ``--bag patient``: the slides of each patient (``--manifest``'s
    patient_id) joined into one bag as in training, one row per patient, attention per slide."""
    from types import SimpleNamespace

    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.data.patient_bags import patient_bags
    from wsi_mil.io.store import PatchStore
    from wsi_mil.train.loop import predict

    if specs[0].get("covariates"):
        raise ConfigError("a run trained with --bag patient and --covariates cannot be predicted yet; predict is "
                          "per patient there and needs the covariates per patient")
    if manifest is None:
        raise ConfigError("this run was trained on patient bags (--bag patient): give --manifest with slide_id and "
                          "patient_id for the slides to predict (each patient's slides are joined into one bag)")
    patient_of = {e.slide_id: (e.patient_id or "") for e in read_manifest(manifest, require_path=False)}
    slides_of: dict[str, list[str]] = {}
    for sid, pid in patient_of.items():
        slides_of.setdefault(pid, []).append(sid)
    enc = specs[0].get("encoder", {})
    thresholds = task.kind_obj.ensemble_thresholds(task, [s["thresholds"] for s in specs])
    report = PredictReport()
    slides: list[Bag] = []
    for store in _stores(inputs):
        sid = store.stem
        try:
            if not patient_of.get(sid):
                raise ConfigError(f"no patient_id for {sid} in --manifest {manifest}: a patient-bag run joins the "
                                  "slides of each patient")
            with PatchStore(store) as opened:
                attrs = opened.attrs
            if attrs.get("complete") is not True or attrs.get("encoder") is None:
                raise ConfigError(f"{store} is incomplete or not a feature store")
            if enc.get("weights_sha256") and attrs.get("weights_sha256") != enc["weights_sha256"]:
                raise ConfigError(f"encoder mismatch: the store was made with {attrs.get('encoder')}, the model was "
                                  f"trained on {enc.get('encoder')}; re-extract with the training encoder")
            check_resolution(attrs, enc, store)
            extent, step = patch_geometry(attrs, store)
            bag = Bag(sid, patient_of[sid], np.zeros(task.n_targets, np.float32), store, step_px=step,
                      extent_px=extent, meta=attrs).cache()
            if bag.features is not None and not len(bag.features):
                raise StoreError(f"{store} holds no patches; there is nothing to predict from")
            slides.append(bag)
        except Exception as exc:  # noqa: BLE001 - one bad store must not stop the batch
            logger.error("%s: %s", sid, exc)
            report.failed.append({"slide_id": sid, "store": str(store), "error": f"{type(exc).__name__}: {exc}"})
    bags = patient_bags(slides, task, max_instances=specs[0].get("patient_max_instances"),
                        seed=int(specs[0].get("seed", 0))) if slides else []
    from wsi_mil.commands.train_mil import _prediction, _write_attention

    for bag in bags:
        preds = [predict(m, [bag], task, device=device) for m in models]
        probs = np.mean([p.probs[0] for p in preds], axis=0)
        att = np.mean([p.attention[0] for p in preds], axis=0)
        if not (np.isfinite(probs).all() and np.isfinite(att).all()):
            for s in bag.meta["slides"]:
                report.failed.append({"slide_id": s["slide_id"], "store": s["store"],
                                      "error": f"StoreError: the models gave a non-finite output for patient {bag.slide_id}"})
            continue
        share = None if any(p.contribution is None for p in preds) else \
            np.mean([p.contribution[0] for p in preds if p.contribution is not None], axis=0)
        single = SimpleNamespace(probs=[probs], attention=[att], contribution=[share] if share is not None else None)
        _write_attention(out_dir / "attention", [bag], single, task, fold="ensemble", split="predict",
                         thresholds=thresholds, model=specs[0]["model"])
        pred = _prediction(task, probs, thresholds)
        row: dict[str, Any] = {"patient_id": bag.slide_id,
                               "slides": ";".join(s["slide_id"] for s in bag.meta["slides"])}
        row.update({col: float(probs[c]) for c, col in enumerate(task.kind_obj.output_columns(task))})
        row["prediction"] = ";".join(pred) if isinstance(pred, list) else pred
        row.update(task.kind_obj.prediction_columns(task, probs, thresholds))
        row["patches_sampled"] = ""
        used = {s["slide_id"] for s in bag.meta["slides"]}
        unused = [sid for sid in slides_of.get(bag.slide_id, []) if sid not in used]
        row["slides_missing"] = ";".join(unused)  # the manifest's slides of this patient not in its bag
        if unused:
            logger.warning("patient %s predicted from %d of its %d slide(s) (%s not given or failed)", bag.slide_id,
                           len(used), len(used) + len(unused), ", ".join(unused))
        if bag.meta.get("sampled"):
            row["patches_sampled"] = f"{bag.meta['sampled']['kept']} of {bag.meta['sampled']['of']}"
        report.rows.append(row)
    if report.rows:
        write_csv(out_dir / "predictions.csv", report.rows)
    write_json(out_dir / "predict_report.json", {"run": str(run_dir), "n_models": len(models), "thresholds": thresholds,
                                                 "task": task.to_dict(), "unit": "patient",
                                                 "predicted": len(report.rows), "failed": report.failed})
    return report
