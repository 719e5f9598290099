"""`wsi-mil audit`: the trainers' audit, run alone on a finished run folder.

Reads the run's predictions.csv, metrics.json and splits.json and a manifest (for the
subgroup and label-source columns, and the images' paths), and writes ``audit/``:
audit.json, report.md, errors.csv and gallery.png. Duplicates are looked for among the
manifest's images (their pixels) or, with ``--features``, the slides' feature stores, and
checked against the run's own splits (reported; nothing is refused after the fact).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, ManifestError
from wsi_mil.io.atomic import write_json, write_text

logger = logging.getLogger(__name__)


def manifest_rows(path: Path) -> dict[str, dict[str, str]]:
    """id -> row of a slide or image manifest (id: slide_id, image_id, or the stem of path)."""
    from wsi_mil.data.images import _image_id

    try:
        lines = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if not ln.lstrip().startswith("#")]
        rows = list(csv.DictReader(lines))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc}); it must be a UTF-8 CSV") from exc
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        r = {(k or "").strip(): (v or "").strip() for k, v in r.items()}
        sid = (r.get("slide_id") or r.get("image_id") or r.get("volume_id")
               or (_image_id(r["path"]) if r.get("path") else ""))
        if sid:
            out[sid] = r
    if not out:
        raise ManifestError(f"{path}: no rows with a slide_id, image_id or path")
    return out


def run_audit(run: Path, manifest: Path, *, out_dir: Path | None = None, subgroups: str | None = None,
              prevalence: float | None = None, label_sources: str | None = None, features: Path | None = None,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Audit a finished run (see the module docstring); returns the audit dict."""
    from wsi_mil.data.duplicates import leaking_pairs
    from wsi_mil.eval.audit_run import (
        audit_markdown,
        duplicate_audit,
        label_source_audit,
        prediction_audit,
        sample_picture,
        split_sets,
        write_audit_files,
    )

    for name in ("metrics.json", "predictions.csv", "splits.json"):
        if not (run / name).exists():
            raise ConfigError(f"{run} is not a finished run of train-mil / train-image / train-volume (no {name})")
    metrics = json.loads((run / "metrics.json").read_text())
    task, unit = metrics["task"], metrics.get("unit", "slide")
    from wsi_mil.tasks import kind_of

    if not kind_of(task["kind"]).single_positive:
        raise ConfigError(f"the audit's subgroups, operating points and errors need a binary task; this run is {task['kind']}")
    with open(run / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    key = f"{unit}_id"
    headline = (metrics.get("headline") or {}).get("set", "ensemble_test")
    ens = [r for r in preds if r["fold"] == "ensemble"] if headline == "ensemble_test" else []  # the headline's set
    rows, set_name = (ens, "ensemble test") if ens else ([r for r in preds if r["split"] == "val"], "pooled out-of-fold validation")
    positive, out_name = task["classes"][1], task["outputs"][0]
    if ens:
        thr: Any = float(metrics["ensemble_test"]["threshold"])
    else:
        by_fold = {str(f["fold"]): f["thresholds"][0] for f in metrics["folds"]}
        thr = np.array([by_fold[r["fold"]] for r in rows], dtype=float)
    y = np.array([np.nan if r["label"] == "" else float(r["label"] == positive) for r in rows])
    p = np.array([float(r[f"prob_{out_name}"]) for r in rows])
    ids = [r[key] for r in rows]
    columns = manifest_rows(manifest)
    missing = [i for i in ids if i not in columns]
    if missing:
        raise ManifestError(f"{manifest} lacks {len(missing)} of the run's {unit}(s) ({', '.join(missing[:5])}): give the "
                            "manifest the run was trained on")
    out = out_dir or run / "audit"
    links = []  # each error's attention store (its heatmap's source), relative to the audit's folder
    for r in rows:
        rel = Path("attention") / ("ensemble" if r["fold"] == "ensemble" else f"fold{r['fold']}") / f"{r[key]}.h5"
        links.append(Path(os.path.relpath(run / rel, out)).as_posix() if (run / rel).exists() else None)
    audit: dict[str, Any] = {"run": str(run.resolve()), "manifest": str(manifest.resolve())}
    all_ids = sorted(columns)
    audit["label_sources"] = label_source_audit(all_ids, columns, label_sources)
    samples = _samples(columns, manifest, features, unit)
    if samples:
        found = duplicate_audit(samples)
        splits = json.loads((run / "splits.json").read_text())
        sets = split_sets([(f["train"], f["val"]) for f in splits["folds"]], splits["test"])
        audit["duplicates"] = {"policy": "report (run alone)", "method": found["method"],
                               "pairs": [x.to_dict() for x in found["pairs"]], "within_slide": found["within"],
                               "leaks": leaking_pairs(found["pairs"], sets)}
    audit["evaluation"] = prediction_audit(ids, [r["patient_id"] for r in rows], y, p, thr, set_name=set_name,
                                           columns=columns, subgroups=subgroups, prevalence=prevalence, n_boot=n_boot,
                                           seed=seed, links=links)
    audit["shortcuts"] = _shortcuts(run, preds, key, positive, rows, ids, y, p, columns, samples, set_name, unit)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {s.slide_id: s for s in samples}
    write_audit_files(out, audit, (lambda sid: sample_picture(by_id.get(sid))) if samples else None)
    write_json(out / "audit.json", audit)
    from wsi_mil.eval.shortcuts import markdown as shortcuts_markdown

    write_text(out / "report.md", "\n".join([f"# Audit of {run.name}", ""] + audit_markdown(audit, unit) + [""]
                                            + shortcuts_markdown(audit["shortcuts"])))
    return audit


def _shortcuts(run: Path, preds: list[dict[str, str]], key: str, positive: str, rows: list[dict[str, str]],
               ids: list[str], y: np.ndarray, p: np.ndarray, columns: dict[str, dict[str, str]], samples: list[Any],
               set_name: str, unit: str) -> dict[str, Any]:
    """The trainers' shortcut checks, again, with this manifest's columns (a site column
    added since training is checked now) and the stores' facts (with ``--features``): every
    labelled sample of the run against its label, the headline set's predictions against
    every nuisance, and localisation on generated slides; each warning logged."""
    from wsi_mil.eval.localisation import run_localisation
    from wsi_mil.eval.metrics import auc
    from wsi_mil.eval.shortcuts import (
        label_association,
        localisation_warning,
        log_findings,
        nuisances,
        prediction_dependence,
    )
    from wsi_mil.train.runner import sample_facts

    labels = {r[key]: r["label"] for r in preds if r["label"] != ""}
    known = sorted(labels)
    facts = sample_facts([s for s in samples if s.slide_id in labels])
    found = nuisances(known, {i: columns[i] for i in known if i in columns}, facts)
    record: dict[str, Any] = {"checked": sorted(found), "set": set_name,
                              "before": label_association(known, [int(labels[i] == positive) for i in known], found)}
    ok = ~np.isnan(y)
    record["after"] = prediction_dependence([i for i, k in zip(ids, ok, strict=True) if k], y[ok].astype(int), p[ok],
                                            found)
    if unit == "slide":
        try:  # (the class the run judged its lesions by)
            lesion = json.loads((run / "run.json").read_text()).get("settings", {}).get("lesion_class") or "Tumor"
        except (OSError, ValueError):
            lesion = "Tumor"
        loc = run_localisation(run, str(lesion))
        if loc is not None:
            record["localisation"] = loc
            record["localisation_warning"] = localisation_warning(auc(y[ok].astype(int), p[ok]), loc)
    log_findings(record, logger)
    return record


def _samples(columns: dict[str, dict[str, str]], manifest: Path, features: Path | None, unit: str) -> list[Any]:
    """Images with readable paths, or (with ``features``) slides with feature stores."""
    from wsi_mil.data.images import ImageSample

    if features is not None:
        from wsi_mil.data.bags import Bag

        bags = []
        for sid, r in columns.items():
            store = next((features / f"{sid}{ext}" for ext in (".h5", ".zarr") if (features / f"{sid}{ext}").exists()), None)
            if store is not None:  # with the store's attributes: patch count, tissue area and colour (shortcut checks)
                from wsi_mil.data.bags import feature_store_attrs

                meta = feature_store_attrs(store) or {}
                if "n_features" not in meta and meta.get("n_patches") is not None:
                    meta["n_features"] = meta["n_patches"]
                bags.append(Bag(sid, r.get("patient_id") or sid, np.zeros(1, np.float32), store, meta=meta))
        return bags
    out = []
    for sid, r in columns.items():
        rel = r.get("path") or r.get("image")
        if not rel or unit == "slide":
            continue
        path = Path(rel) if Path(rel).is_absolute() else manifest.parent / rel
        if path.is_file():
            out.append(ImageSample(sid, r.get("patient_id") or sid, np.zeros(1, np.float32), None, path))
    return out
