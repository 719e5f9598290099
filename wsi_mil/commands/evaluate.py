"""`wsi-mil evaluate`: a trained run on an external cohort, with its labels.

The fold ensemble predicts every slide of the new manifest (as ``predict`` does: the same
checks of encoder, resolution and transforms, ``attention/`` kept for heatmaps), then the
predictions are judged against the manifest's labels: the task's own metrics with
intervals beside the development figure, calibration (:mod:`wsi_mil.eval.external`), the
development threshold against one chosen again, subgroups, operating points and every
error (binary tasks), and a shift check between the development cohort (the run's
recorded manifest and features) and this one. A slide the run was developed on is
refused: it is not external.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    result: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _Cohort:
    """The development cohort as the run recorded it (what the shift check compares with)."""

    manifest: Path | None = None
    stores: dict[str, Path] = field(default_factory=dict)  # slide id -> feature store
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)
    note: str | None = None


def development_cohort(run_dir: Path, features: list[Path] | None) -> _Cohort:
    """The run's development slides, their stores and store attributes, from its run.json
    (``features``: other folders when the stores moved); a note says why when they cannot
    be found (the shift and overlap checks are then left out, said in the report)."""
    from wsi_mil.data.bags import feature_store_attrs, find_feature_store
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.io.run_folder import read_run

    missing = [str(d) for d in features or [] if not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"--development-features {', '.join(missing)}: no such folder")
    made = read_run(run_dir) or {}
    inputs = made.get("inputs") or {}
    manifest = Path((inputs.get("manifest") or {}).get("path", "")) if inputs.get("manifest") else None
    dirs = [Path(d) for d in (features or inputs.get("features") or [])]
    if manifest is None or not manifest.is_file():
        return _Cohort(note=f"the run's development manifest ({manifest or 'not recorded'}) is not found; the shift "
                            "check and the check that no slide is a development slide were left out")
    entries = read_manifest(manifest, require_path=False)
    cohort = _Cohort(manifest=manifest)
    for e in entries:
        store = next((s for d in dirs if (s := find_feature_store(d, e.slide_id))), None)
        attrs = feature_store_attrs(store) if store is not None else None
        if store is not None and attrs is not None:
            cohort.stores[e.slide_id], cohort.attrs[e.slide_id] = store, attrs
        cohort.patients[e.slide_id] = e.patient_id or e.slide_id
    if not cohort.stores:
        cohort.note = (f"none of the development slides' feature stores were found in {', '.join(map(str, dirs)) or '-'} "
                       "(moved?); give --development-features; the shift check was left out")
    return cohort


def _not_external(bags: list[Any], dev: _Cohort) -> None:
    """A slide of the development cohort (its id in the development manifest, the same
    slide file or the same store) is refused."""
    prints = {str(a.get("slide_fingerprint")): sid for sid, a in dev.attrs.items() if a.get("slide_fingerprint")}
    stores = {p.resolve(): sid for sid, p in dev.stores.items()}
    same = []
    for b in bags:
        fp = str((b.meta or {}).get("slide_fingerprint") or "")
        if b.slide_id in dev.patients:
            same.append(f"{b.slide_id} (a slide id of the development manifest {dev.manifest}; if it is another "
                        "slide, give it another id)")
        elif fp and fp in prints:
            same.append(f"{b.slide_id} (the slide file of development slide {prints[fp]})")
        elif b.store is not None and Path(b.store).resolve() in stores:
            same.append(f"{b.slide_id} (the development feature store {b.store})")
    if same:
        raise ConfigError(f"{len(same)} slide(s) of this manifest were in the run's development cohort: "
                          f"{'; '.join(same[:6])}{' ...' if len(same) > 6 else ''}. An external evaluation must be "
                          "on slides the model never saw; remove them from the manifest")


def _mean_embeddings(stores: list[Path]) -> npt.NDArray[np.float64]:
    from wsi_mil.io.features import FeatureStore

    out = []
    for s in stores:
        with FeatureStore(s) as fs:
            f = np.asarray(fs.features, dtype=np.float64)
        out.append(f.mean(axis=0) if len(f) else np.full(f.shape[1], np.nan))
    return np.asarray(out)


def _development_sample(dev: _Cohort, seed: int) -> tuple[list[str], npt.NDArray[np.float64]]:
    """The development slides the shift check compares with (a seeded sample of
    :data:`~wsi_mil.eval.external.MAX_DEVELOPMENT` beyond that) and their mean embeddings."""
    from wsi_mil.eval.external import MAX_DEVELOPMENT

    ids = sorted(dev.stores)
    if len(ids) > MAX_DEVELOPMENT:
        ids = sorted(np.random.default_rng(seed).choice(ids, MAX_DEVELOPMENT, replace=False).tolist())
    return ids, _mean_embeddings([dev.stores[i] for i in ids]) if ids else np.zeros((0, 0))


def _no_copies(ext_ids: list[str], ext_emb: npt.NDArray[np.float64], dev_ids: list[str],
               dev_emb: npt.NDArray[np.float64]) -> None:
    """A store whose features are those of a development slide (a copied store, or the same
    slide under another id) is refused: its slide is not external."""
    def key(v: npt.NDArray[Any]) -> bytes:  # the mean to 6 significant digits: the same rows in any order
        return np.ascontiguousarray(np.asarray([float(f"{x:.6g}") for x in v])).tobytes()

    seen = {key(v): i for i, v in zip(dev_ids, dev_emb, strict=True)}
    same = [f"{i} (the features of development slide {seen[k]})" for i, v in zip(ext_ids, ext_emb, strict=True)
            if (k := key(v)) in seen]
    if same:
        raise ConfigError(f"{len(same)} slide(s) of this manifest hold exactly the features of slides the run was "
                          f"developed on: {'; '.join(same[:6])}{' ...' if len(same) > 6 else ''}. An external "
                          "evaluation must be on slides the model never saw; remove them from the manifest")


def _development_predictions(run_dir: Path, set_name: str, columns: list[str]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
    """The run's own predictions of its headline set (labels, outputs) for the reliability plot."""
    import csv

    path = run_dir / "predictions.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if "test" in set_name:  # the ensemble's test predictions (each fold's own when the ensemble's are not written)
        rows = [r for r in rows if r.get("split") == "test" and r.get("fold") == "ensemble"] or \
            [r for r in rows if r.get("split") == "test"]
    else:
        rows = [r for r in rows if r.get("split") == "val"]
    try:
        p = np.asarray([[float(r[c]) for c in columns] for r in rows], dtype=float)
    except (KeyError, ValueError):
        return None
    return np.asarray([r.get("label", "") for r in rows], dtype=object), p


def run_evaluate(run_dir: Path, manifest: Path, features: list[Path], *, out_dir: Path, subgroups: str | None = None,
                 n_boot: int = 1000, seed: int = 0, device: str = "cpu", development_features: list[Path] | None = None,
                 prevalence: float | None = None) -> Evaluation:
    from wsi_mil.commands.predict import load_run, run_predict
    from wsi_mil.data.bags import Task, bags_from_manifest
    from wsi_mil.data.manifest import entry_columns, read_manifest
    from wsi_mil.io.atomic import write_csv
    from wsi_mil.io.run_folder import read_run
    from wsi_mil.train.runner import sample_facts

    if (read_run(run_dir) or {}).get("command") in ("train-image", "train-volume"):
        return _evaluate_pictures(run_dir, manifest, out_dir=out_dir, subgroups=subgroups, n_boot=n_boot, seed=seed,
                                  prevalence=prevalence)
    if not features:
        raise ConfigError("--features: give the features/ folder of the cohort's slides (extract-features with the "
                          "run's encoder)")

    _models, specs = load_run(run_dir)
    task = Task.from_dict(specs[0]["task"])
    if specs[0].get("bag") == "patient":
        raise ConfigError(f"{run_dir} was trained on patient bags (--bag patient); evaluate judges slide-bag runs "
                          "only so far: use `wsi-mil predict RUN FEATURES --manifest M` (one row per patient) and "
                          "judge its predictions.csv")
    kind = task.kind_obj
    entries = read_manifest(manifest, require_path=False)
    held = {k for e in entries for k in e.labels} | {k for e in entries for k in e.meta}
    absent = [c for c in task.label_columns if c not in held]
    if absent:
        raise ConfigError(f"{manifest} has no column {', '.join(map(repr, absent))}, the run's label column(s); its "
                          f"columns: {', '.join(sorted(held)) or 'none besides slide_id / path / patient_id'}")
    columns = entry_columns(entries)
    if subgroups:  # refused now, before anything is predicted or written
        if not kind.single_positive:
            raise ConfigError(f"--subgroups: subgroup figures are computed for binary runs; this run is {task.kind}")
        from wsi_mil.eval.audit_run import subgroup_columns

        subgroup_columns([e.slide_id for e in entries], columns, subgroups)
    unlabelled = [e.slide_id for e in entries if np.isnan(task.target(e.labels, f"slide {e.slide_id}")).all()]
    if unlabelled:
        raise ConfigError(f"{len(unlabelled)} slide(s) of {manifest} have no label in {', '.join(task.label_columns)} "
                          f"({', '.join(unlabelled[:6])}{' ...' if len(unlabelled) > 6 else ''}); evaluate judges "
                          "labelled slides only: label them, or use `wsi-mil predict` for unlabelled ones")
    dev = development_cohort(run_dir, development_features)
    bags, missing = bags_from_manifest(entries, features, task)
    _not_external(bags, dev)
    if not bags:
        raise ConfigError(f"no slide of {manifest} has a feature store in {', '.join(map(str, features))} "
                          f"({missing[0]['reason'] if missing else 'empty manifest'})")
    ext_ids = [b.slide_id for b in bags]
    ext_emb = _mean_embeddings([b.store for b in bags if b.store is not None])
    dev_ids, dev_emb = _development_sample(dev, seed)
    _no_copies(ext_ids, ext_emb, dev_ids, dev_emb)
    report = run_predict(run_dir, [b.store for b in bags if b.store is not None], out_dir=out_dir, device=device,
                         manifest=manifest)
    failed = missing + [{"slide_id": f["slide_id"], "reason": f["error"]} for f in report.failed]
    by_id = {b.slide_id: b for b in bags}
    rows = [r for r in report.rows if r["slide_id"] in by_id]
    if not rows:
        raise ConfigError(f"no slide could be predicted ({failed[0]['reason'] if failed else '?'})")
    ids = [r["slide_id"] for r in rows]
    cols = kind.output_columns(task)
    y = np.stack([by_id[i].target for i in ids]).astype(float)
    p = np.asarray([[float(r[c]) for c in cols] for r in rows], dtype=float)
    thresholds = kind.ensemble_thresholds(task, [s["thresholds"] for s in specs])
    patients = [by_id[i].patient_id for i in ids]
    shift_in: dict[str, Any] = {"note": None, "sample_note": None}
    if dev.stores:
        from wsi_mil.data.bags import Bag

        if len(dev_ids) < len(dev.stores):
            shift_in["sample_note"] = f"the shift check compares with a seeded sample of {len(dev_ids)} development slides"
        dev_bags = [Bag(i, dev.patients.get(i, i), np.zeros(1, np.float32), dev.stores[i], meta=dev.attrs[i])
                    for i in dev_ids]
        row_of = {i: k for k, i in enumerate(ext_ids)}
        shift_in.update(dev_emb=dev_emb, ext_emb=ext_emb[[row_of[i] for i in ids]], dev_facts=sample_facts(dev_bags),
                        ext_facts=sample_facts([by_id[i] for i in ids]),
                        groups=[f"p:{dev.patients.get(i, i)}" for i in dev_ids] + [f"p:{q}" for q in patients])
    else:
        shift_in["note"] = ((dev.note or "the development cohort could not be read; no shift check")
                            + "; slides were checked against the development manifest's ids only")
    truth = {i: kind.truth_columns(task, by_id[i].target) for i in ids}
    out_rows = []
    for r, i in zip(rows, ids, strict=True):
        t = truth[i]
        row = {"slide_id": i, "patient_id": by_id[i].patient_id,
               **(t if t is not None else {"label": _label_text(task, by_id[i].target)})}
        row.update({k: v for k, v in r.items() if k != "slide_id"})
        out_rows.append(row)
    write_csv(out_dir / "predictions.csv", out_rows)
    return _judge(run_dir, manifest, task, specs[0], ids, patients, y, p, thresholds, failed=failed, out_dir=out_dir,
                  columns=columns, subgroups=subgroups, prevalence=prevalence, n_boot=n_boot, seed=seed,
                  shift_in=shift_in, dev_patients=set(dev.patients.values()), links=[f"attention/{i}.h5" for i in ids],
                  extra={"features": [str(f) for f in features]})


def _judge(run_dir: Path, manifest: Path, task: Any, spec: dict[str, Any], ids: list[str], patients: list[str],
           y: npt.NDArray[Any], p: npt.NDArray[Any], thresholds: list[Any], *, failed: list[dict[str, str]],
           out_dir: Path, columns: dict[str, dict[str, str]], subgroups: str | None, prevalence: float | None,
           n_boot: int, seed: int, shift_in: dict[str, Any], dev_patients: set[str], links: list[str | None],
           extra: dict[str, Any], unit: str = "slide") -> Evaluation:
    """Every road's predictions judged against their labels (metrics, calibration, threshold
    transfer, subgroups, the shift check) and the report written."""
    from wsi_mil.eval.audit_run import prediction_audit
    from wsi_mil.eval.external import calibration_fit, calibration_warnings, shift_check, threshold_transfer
    from wsi_mil.io.atomic import write_json, write_text
    from wsi_mil.io.run_folder import read_run

    kind = task.kind_obj
    config = SimpleNamespace(bootstrap=n_boot, seed=seed)
    result: dict[str, Any] = {
        "run": str(run_dir), "manifest": str(manifest), **extra, "unit": unit,
        "task": task.to_dict(), "n": len(ids), "n_positive": int(np.nansum(y[:, 0])) if kind.single_positive else None,
        "n_failed": len(failed), "failed": failed, "thresholds": thresholds,
        "metrics": kind.evaluate(task, y, p, thresholds, config),
        "development": _development_figure(run_dir), "notes": [], "warnings": []}
    shared = sorted(set(patients) & dev_patients)
    if shared:
        result["warnings"].append(f"{len(shared)} patient id(s) of this cohort are also in the development cohort "
                                  f"({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}): if they are the same "
                                  "people this is not an external cohort")
    if kind.calibrated_per_output and kind.has_classes:
        result["calibration"], result["threshold_transfer"] = {}, {}
        rule = str(spec.get("threshold_method") or "youden")  # the run's own rule and target
        target = float(((read_run(run_dir) or {}).get("settings") or {}).get("target_sensitivity") or 0.9)
        for c, name in enumerate(task.outputs):
            ok, yc = kind.one_vs_rest(y, c)
            if len(set(yc.tolist())) < 2:
                result["notes"].append(f"{name}: one class only in this cohort; no calibration slope or threshold choice")
            result["calibration"][name] = cal = calibration_fit(yc, p[ok, c], n_boot=min(n_boot, 200), seed=seed)
            result["warnings"] += [f"{name}: {w}" if task.n_outputs > 1 else w for w in calibration_warnings(cal)]
            result["threshold_transfer"][name] = threshold_transfer(yc, p[ok, c], float(thresholds[c]), rule=rule,
                                                                    target_sensitivity=target)
    else:
        result["notes"].append(f"calibration and threshold transfer are computed for binary and multi-label outputs; "
                               f"not for a {task.kind} run")
    if kind.single_positive:
        result["audit"] = prediction_audit(ids, patients, y[:, 0], p[:, 0], thresholds[0], set_name="external cohort",
                                           columns=columns, subgroups=subgroups, prevalence=prevalence, n_boot=n_boot,
                                           seed=seed, links=links)
    if shift_in.get("note"):
        result["shift"] = None
        result["warnings"].append(shift_in["note"])
    else:
        if shift_in.get("sample_note"):
            result["notes"].append(shift_in["sample_note"])
        shift = shift_check(shift_in["dev_emb"], shift_in["ext_emb"], shift_in["dev_facts"], shift_in["ext_facts"],
                            seed=seed, n_boot=min(n_boot, 200), groups=shift_in.get("groups"))
        if shift_in.get("method"):
            (shift.get("domain_classifier") or {})["method"] = shift_in["method"]
        result["shift"] = shift
        result["warnings"] += shift["warnings"]
        result["notes"] += shift["notes"]
    _plots(out_dir, task, y, p, run_dir, result)
    write_json(out_dir / "evaluation.json", result)
    write_text(out_dir / "report.md", "\n".join(evaluation_markdown(result)) + "\n")
    if result.get("audit"):
        from wsi_mil.eval.audit_run import write_audit_files

        write_audit_files(out_dir, {"evaluation": result["audit"]})
    return Evaluation(result, failed)


def _picture_embeddings(road: str, spec: dict[str, Any], entries: list[Any]) -> tuple[
        npt.NDArray[np.float64], dict[str, dict[str, Any]], list[str]]:
    """What the shift check compares for images and volumes: each picture as the network is
    given it (windowed, resized; a volume prepared), reduced to 32 x 32 pixels (8 x 8 x 8
    voxels), and its intensity mean and sd; the ids of the unreadable ones."""
    import torch
    import torch.nn.functional as F

    emb, facts, bad = [], {}, []
    if road == "train-image":
        from wsi_mil.commands.train_image import load_pixels

        window = tuple(float(v) for v in spec["window"].split(",")) if spec.get("window") else None
        px, problems = load_pixels(entries, 32, window=window, use_voi=spec.get("use_voi", True))  # type: ignore[arg-type]
        bad = [b["slide_id"] for b in problems]
        for e, a in zip(entries, px.float(), strict=True):
            if e.slide_id in bad:
                continue
            emb.append(a.reshape(-1).numpy().astype(np.float64))
            facts[e.slide_id] = {"intensity mean": float(a.mean()), "intensity sd": float(a.std())}
    else:
        from wsi_mil.commands.train_volume import prep_of
        from wsi_mil.data.volumes import VolumeReadError, load_volume, prepare_volume

        prep = prep_of(spec)
        for e in entries:
            try:
                vol = load_volume(e)
                x, _ = prepare_volume(vol, prep)
            except VolumeReadError:
                bad.append(e.slide_id)
                continue
            t = torch.from_numpy(np.asarray(x, np.float32))[None, None]
            emb.append(F.adaptive_avg_pool3d(t, 8).reshape(-1).numpy().astype(np.float64))
            facts[e.slide_id] = {"intensity mean": float(t.mean()), "intensity sd": float(t.std()),
                                 "voxel spacing mm (largest)": float(max(vol.spacing)),
                                 "voxel spacing mm (smallest)": float(min(vol.spacing))}
    return np.asarray(emb), facts, bad


def _evaluate_pictures(run_dir: Path, source: Path, *, out_dir: Path, subgroups: str | None, n_boot: int, seed: int,
                       prevalence: float | None) -> Evaluation:
    """A train-image or train-volume run on a labelled external cohort (a manifest CSV or a
    MedMNIST .npz): predicted as predict-image / predict-volume do, judged as slides are."""
    import csv

    from wsi_mil.commands.predict_image import image_entries, load_run, reference_target
    from wsi_mil.data.bags import Task
    from wsi_mil.data.manifest import entry_columns
    from wsi_mil.io.run_folder import read_run

    made = read_run(run_dir) or {}
    road = str(made.get("command"))
    unit = "image" if road == "train-image" else "volume"
    if road == "train-volume":
        from wsi_mil.commands.predict_volume import _entries
        from wsi_mil.commands.train_volume import load_volume_model

        _models, spec, thresholds = load_run(run_dir, load_volume_model, "train-volume")
        task = Task.from_dict(spec["task"])
        entries, dev_entries_of = _entries(source, task), lambda src: _entries(src, task)
    else:
        _models, spec, thresholds = load_run(run_dir)
        task = Task.from_dict(spec["task"])
        entries, dev_entries_of = image_entries(source, task), lambda src: image_entries(src, task)
    kind = task.kind_obj
    targets = {e.slide_id: reference_target(task, e, unit) for e in entries}
    unlabelled = [i for i, t in targets.items() if t is None or np.isnan(t).all()]
    if unlabelled:
        raise ConfigError(f"{len(unlabelled)} {unit}(s) of {source} have no label in {', '.join(task.label_columns)} "
                          f"({', '.join(unlabelled[:6])}{' ...' if len(unlabelled) > 6 else ''}); evaluate judges "
                          f"labelled {unit}s only: label them, or use `wsi-mil predict-{unit}` for unlabelled ones")
    columns = entry_columns(entries)
    if subgroups:
        if not kind.single_positive:
            raise ConfigError(f"--subgroups: subgroup figures are computed for binary runs; this run is {task.kind}")
        from wsi_mil.eval.audit_run import subgroup_columns

        subgroup_columns([e.slide_id for e in entries], columns, subgroups)
    # the development cohort: the source the run recorded
    dev_source = Path(((made.get("inputs") or {}).get("source") or {}).get("path", ""))
    dev_entries = dev_entries_of(dev_source) if dev_source.exists() and str(dev_source) not in ("", ".") else []
    # an id of the development source is refused only when it names a file (an .npz's ids are positions in it:
    # the pixel check below judges those)
    dev_ids_named = {d.slide_id for d in dev_entries if d.path is not None}
    same = [e.slide_id for e in entries if e.path is not None and (e.slide_id in dev_ids_named
            or e.path in {d.path for d in dev_entries if d.path is not None})]
    if same and dev_source.resolve() != source.resolve():
        raise ConfigError(f"{len(same)} {unit}(s) of {source} were in the run's development cohort ({dev_source}): "
                          f"{', '.join(same[:6])}{' ...' if len(same) > 6 else ''}; an external evaluation must be on "
                          f"{unit}s the model never saw: remove them")
    if same:
        raise ConfigError(f"{source} is the run's own development source; give an external cohort")
    ext_emb, ext_facts, ext_bad = _picture_embeddings(road, spec, entries)
    # every development picture (up to 20,000, a seeded sample beyond) for the copy check; 2,000 of them for the
    # domain classifier
    rng = np.random.default_rng(seed)
    checked = dev_entries if len(dev_entries) <= 20000 else [dev_entries[i] for i in
                                                             sorted(rng.choice(len(dev_entries), 20000, replace=False))]
    all_emb, all_facts, _ = _picture_embeddings(road, spec, checked) if checked else (None, {}, [])
    read = [d for d in checked if d.slide_id in all_facts]
    if all_emb is not None and len(all_emb) and len(ext_emb):
        ext_keys: dict[bytes, list[str]] = {}
        for i, v in zip([e.slide_id for e in entries if e.slide_id not in ext_bad], ext_emb, strict=True):
            ext_keys.setdefault(np.round(v, 6).tobytes(), []).append(i)
        copies = [f"{i} (the pixels of development {unit} {d.slide_id})"
                  for d, v in zip(read, all_emb, strict=True) for i in ext_keys.get(np.round(v, 6).tobytes(), [])]
        if copies:
            raise ConfigError(f"{len(copies)} {unit}(s) of {source} hold the pixels of development {unit}s: "
                              f"{'; '.join(copies[:6])}{' ...' if len(copies) > 6 else ''}; an external evaluation "
                              f"must be on {unit}s the model never saw")
    keep = list(range(len(read))) if len(read) <= 2000 else sorted(rng.choice(len(read), 2000, replace=False).tolist())
    sample = [read[k] for k in keep]
    dev_emb = all_emb[keep] if all_emb is not None and len(read) else None
    dev_facts = {d.slide_id: all_facts[d.slide_id] for d in sample}
    if road == "train-volume":
        from wsi_mil.commands.predict_volume import run_predict_volume

        rep = run_predict_volume(run_dir, source, out_dir=out_dir, progress=False)
    else:
        from wsi_mil.commands.predict_image import run_predict_image

        rep = run_predict_image(run_dir, source, out_dir=out_dir, progress=False)
    failed = [{"slide_id": f["slide_id"], "reason": f["reason"]} for f in rep.failed]
    with open(out_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    id_col = f"{unit}_id"
    ids = [r[id_col] for r in rows]
    y = np.stack([targets[i] for i in ids]).astype(float)  # type: ignore[misc]
    p = np.asarray([[float(r[f"prob_{o}"]) for o in task.outputs] for r in rows], dtype=float)
    patients = [str(next(e.patient_id for e in entries if e.slide_id == i) or i) for i in ids]
    row_of = {i: k for k, i in enumerate(e.slide_id for e in entries if e.slide_id not in ext_bad)}
    shift_in: dict[str, Any] = {"note": None, "sample_note": None}
    if dev_emb is not None and len(dev_emb):
        patient_of = {e.slide_id: str(e.patient_id or e.slide_id) for e in [*entries, *sample]}
        shift_in.update(dev_emb=dev_emb, ext_emb=ext_emb[[row_of[i] for i in ids]], dev_facts=dev_facts,
                        ext_facts={i: ext_facts[i] for i in ids},
                        groups=[f"p:{patient_of[d.slide_id]}" for d in sample] + [f"p:{patient_of[i]}" for i in ids],
                        method=f"each {unit} as the network is given it, reduced to "
                               f"{'32 x 32 pixels' if unit == 'image' else '8 x 8 x 8 voxels'}, standardised, PCA, "
                               "logistic regression, out-of-fold")
        if len(sample) < len(read):
            shift_in["sample_note"] = f"the shift check compares with a seeded sample of {len(sample)} development {unit}s"
    else:
        shift_in["note"] = (f"the run's development source ({dev_source}) is not found; the shift check and the check "
                            f"that no {unit} is a development {unit} were left out")
    return _judge(run_dir, source, task, spec, ids, patients, y, p, list(thresholds), failed=failed, out_dir=out_dir,
                  columns=columns, subgroups=subgroups, prevalence=prevalence, n_boot=n_boot, seed=seed,
                  shift_in=shift_in, dev_patients={str(d.patient_id) for d in dev_entries if d.patient_id},
                  links=[None] * len(ids), extra={}, unit=unit)


def _label_text(task: Any, target: npt.NDArray[Any]) -> str:
    t = np.asarray(target, float)
    if task.kind_obj.has_classes and task.classes and len(t) == 1:
        return str(task.classes[int(t[0] > 0.5)])
    if task.kind_obj.argmax_call and task.classes and len(t) == len(task.classes) and abs(t.sum() - 1) < 1e-6:
        return str(task.classes[int(np.argmax(t))])  # a multi-class one-hot target: its class
    return ";".join(f"{v:g}" for v in np.asarray(target, float))


def _development_figure(run_dir: Path) -> dict[str, Any]:
    """The run's headline figure (the set it was computed on and why) and threshold rule."""
    import json

    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {"note": "the run's metrics.json could not be read"}
    head = m.get("headline") or {}
    figure = m.get(head.get("set", ""), {}) if isinstance(head, dict) else {}
    return {"set": head.get("set"), "why": head.get("why"), "metrics": figure if isinstance(figure, dict) else {},
            "threshold_rule": m.get("threshold_rule", ""), "splits": (m.get("splits") or {}).get("protocol")}


def _plots(out_dir: Path, task: Any, y: npt.NDArray[Any], p: npt.NDArray[Any], run_dir: Path,
           result: dict[str, Any]) -> None:
    """reliability.png: this cohort beside the development set (binary and multi-label outputs)."""
    from wsi_mil.eval.plots import reliability_plot

    kind = task.kind_obj
    if not (kind.calibrated_per_output and kind.has_classes):
        return
    sets: dict[str, tuple[Any, Any]] = {}
    dev = _development_predictions(run_dir, str(result["development"].get("set") or ""), kind.output_columns(task))
    for c, name in enumerate(task.outputs):
        ok, yc = kind.one_vs_rest(y, c)
        suffix = f" {name}" if task.n_outputs > 1 else ""
        sets[f"external{suffix} (n = {len(yc)})"] = (yc, p[ok, c])
        if dev is not None and task.n_outputs == 1 and len(dev[0]):
            yd = np.asarray([str(v) == str(task.classes[1]) for v in dev[0]], dtype=int)
            sets[f"development, {result['development'].get('set')} (n = {len(yd)})"] = (yd, dev[1][:, 0])
    try:
        reliability_plot(out_dir / "reliability.png", sets)
        result["figures"] = ["reliability.png"]
    except Exception as exc:  # noqa: BLE001 - a plot must not lose the evaluation
        logger.warning("could not draw reliability.png (%s)", exc)


def _num(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _ci(c: Any, fmt: str = ".2f") -> str:
    return "" if not c else f" ({format(c[0], fmt)} to {format(c[1], fmt)})"


def evaluation_markdown(r: dict[str, Any]) -> list[str]:
    from wsi_mil.data.bags import Task
    from wsi_mil.eval.audit_run import audit_markdown

    task = Task.from_dict(r["task"])
    kind = task.kind_obj
    dev = r["development"]
    unit = r.get("unit", "slide")
    lines = ["# External evaluation", "", f"Run: `{r['run']}`; cohort: `{r['manifest']}` ({r['n']} {unit}s judged"
             + (f", {r['n_positive']} positive" if r.get("n_positive") is not None else "")
             + (f"; {r['n_failed']} could not be predicted, listed below" if r["n_failed"] else "") + ").", "",
             ("Predictions are the fold ensemble's (the mean of the folds' probabilities at the mean of their "
              "thresholds in logit space), as `wsi-mil predict` makes them." if kind.calibrated_per_output and
              kind.has_classes else "Predictions are the fold ensemble's (the mean of the folds' outputs), as "
              "`wsi-mil predict` makes them."), ""]
    lines[-2] = lines[-2].replace("`wsi-mil predict`", "`wsi-mil predict`" if unit == "slide" else f"`wsi-mil predict-{unit}`")
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in r["warnings"]] + [""]
    lines += ["## Performance", "", "| cohort | figure |", "|---|---|"]
    dm = dev.get("metrics") or {}
    if dm:
        lines.append(f"| development ({dev.get('set')}: {dev.get('why') or ''}) | {kind.summary_line(dm).strip()} |")
    lines.append(f"| **this cohort** | {kind.summary_line(r['metrics']).strip()} |")
    lines.append("")
    if kind.has_classes:
        from wsi_mil.eval.metrics import AUC_CI_METHOD

        lines += [f"AUC intervals (95%): {AUC_CI_METHOD}.", ""]
    key = kind.score_key
    if dm.get(key) is not None and r["metrics"].get(key) is not None:
        lines += [f"Change from development to this cohort: {r['metrics'][key] - dm[key]:+.3f} ({kind.score_name}).", ""]
    for name, cal in (r.get("calibration") or {}).items():
        title = f" of {name}" if task.n_outputs > 1 else ""
        lines += [f"## Calibration{title}", "",
                  f"- observed rate {cal['observed_rate']:.3f}, mean predicted probability {cal['mean_predicted']:.3f}: "
                  f"calibration-in-the-large {cal['calibration_in_the_large']:+.3f} (observed / expected "
                  f"{_num(cal['observed_expected_ratio'], '.2f')})",
                  f"- calibration intercept (slope fixed at 1): {_num(cal['calibration_intercept'], '+.2f')}"
                  f"{_ci(cal.get('calibration_intercept_ci95'), '+.2f')} (0: the average risk is right)",
                  f"- calibration slope: {_num(cal['calibration_slope'], '.2f')}{_ci(cal.get('calibration_slope_ci95'))}"
                  " (1: ideal; below 1 the probabilities are too extreme, above 1 too timid)"
                  + (f"; {cal['slope_note']}" if cal.get("slope_note") else ""),
                  f"- intervals: bootstrap over {unit}s, {cal.get('bootstrap', 0)} resamples", ""]
    if r.get("figures"):
        lines += ["![reliability: this cohort beside the development set](reliability.png)", ""]
    for name, tt in (r.get("threshold_transfer") or {}).items():
        title = f" of {name}" if task.n_outputs > 1 else ""
        lines += [f"## Threshold transfer{title}", "",
                  f"| threshold | value | sensitivity (95% CI) | specificity (95% CI) | PPV at this cohort's prevalence "
                  f"({r['calibration'][name]['observed_rate']:.2f}) | NPV |", "|---|---:|---|---|---:|---:|"]
        for row in tt["rows"]:
            lines.append(f"| {row['threshold_source']} | {row['threshold']:.3f} | {_num(row['sensitivity'])}"
                         f"{_ci(row['sensitivity_ci95'])} | {_num(row['specificity'])}{_ci(row['specificity_ci95'])} "
                         f"| {_num(row['ppv'])} | {_num(row['npv'])} |")
        lines += ["", "Sensitivity and specificity with Wilson intervals; PPV and NPV depend on the prevalence (see "
                      "the operating points for --prevalence). A second row is chosen and judged on the same cases: "
                      "it shows what a local re-choice could recover, not what the model achieves.", ""]
    shift = r.get("shift")
    lines += ["## Shift between the development cohort and this one", ""]
    if shift:
        dc = shift.get("domain_classifier") or {}
        if dc.get("auc") is not None:
            note = f"; 95% CI {dc['auc_ci_note']}" if dc.get("auc_ci_note") else _ci(dc.get("auc_ci95"), ".3f")
            lines += [f"Domain classifier (development {dc['n_development']} vs this cohort {dc['n_external']}): AUC "
                      f"**{dc['auc']:.3f}**{note} (0.5: the cohorts look alike to the encoder; 1.0: told apart "
                      f"perfectly). {dc['method']}.", ""]
        if shift["facts"]:
            lines += ["| fact | development median (IQR) | this cohort median (IQR) | standardised mean difference | "
                      "Mann-Whitney p |", "|---|---|---|---:|---:|"]
            for f in shift["facts"]:
                lines.append(f"| {f['fact']} | {f['development_median']:.4g} ({f['development_iqr'][0]:.4g}–"
                             f"{f['development_iqr'][1]:.4g}) | {f['external_median']:.4g} ({f['external_iqr'][0]:.4g}–"
                             f"{f['external_iqr'][1]:.4g}) | {_num(f['smd'], '+.2f')} | {f['p_mann_whitney']:.2g} |")
            lines.append("")
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    if r.get("audit"):
        lines += audit_markdown({"evaluation": r["audit"]}, unit)[2:]
    if r["failed"]:
        lines += ["## Not evaluated", ""] + [f"- {f['slide_id']}: {f['reason']}" for f in r["failed"]] + [""]
    return lines
