"""One output folder holds one run.

A run has an identity: its command, its settings and its inputs, hashed. The first
command into a folder writes ``run.json`` with them; a later command into the same folder
resumes when its identity is the same and is refused when it differs (another seed, fewer
folds, another cohort), with a message that names what changed and ``--overwrite``, which
removes the earlier run's files first. Without this, a 2-fold run written over a 3-fold one
kept the old ``fold2`` model, which ``predict`` then averaged in, and old attention files
won over new ones in ``heatmap`` and ``review``.

A folder holding the outputs of an earlier wsi-mil (models, metrics, predictions without a
``run.json``) is treated as another run. Caches the command keeps beside its outputs
(``features/``: keyed by content) survive ``--overwrite``; anything a run did not write is
never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

RUN_FILE = "run.json"
#: settings that change how a run is computed, not what it computes
RUNTIME_SETTINGS = frozenset({"threads", "device", "feature_cache"})
#: what runs write in their folder (removed by --overwrite); anything else is left alone
RUN_OUTPUTS = frozenset({
    RUN_FILE, "models", "attention", "history", "heatmaps", "audit", "cam", "maps", "metrics.json",
    "predictions.csv", "attention.csv", "boxes.csv", "localisation.json", "predict_report.json", "report.md",
    "splits.json", "errors.csv", "gallery.png", "roc.png", "confusion.png", "training_curves.png", "reliability.png",
    "calibration.png", "kaplan_meier.png", "targets", "train_config.yaml", "train.log", "predict.log",
    "evaluation.json", "evaluate.log", "random_folds"})
#: files that show a folder holds a run of an earlier wsi-mil (before run.json existed)
_LEGACY_MARKS = ("models", "metrics.json", "predictions.csv", "attention")
#: what the data commands write in their --out: a run's folder is never one of theirs
_DATA_MARKS = {"run_report.json": "tile", "tile.log": "tile", "features_report.json": "extract-features",
               "extract.log": "extract-features", "import_report.json": "import-features"}


#: slide files: a folder holding them is the user's slides, never a command's --out
_SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}


def _stores_or_slides(folder: Path) -> str | None:
    stores = next(folder.glob("*.h5"), None) or next(folder.glob("*.zarr"), None)
    if stores is not None:
        return f"patch or feature stores ({stores.name} ...)"
    slide = next((p for p in folder.iterdir() if p.suffix.lower() in _SLIDE_SUFFIXES), None)
    return f"slide files ({slide.name} ...)" if slide is not None else None


def _data_folder(folder: Path) -> str | None:
    """What makes ``folder`` another command's data folder (a tiling or feature output, a
    folder of stores such as ``features/``) or the user's slides, or None."""
    for name, command in _DATA_MARKS.items():
        if (folder / name).exists():
            return f"the output of wsi-mil {command} ({name})"
    return _stores_or_slides(folder)


def refuse_foreign_data_folder(folder: Path, command: str) -> None:
    """``tile`` / ``extract-features`` --out: refused when it is a run's folder (a trainer's
    or predictor's ``run.json``), a folder of stores (``features/`` itself: extract wrote
    ``features/features/`` beside the stores) or of slides."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    run = read_run(folder)
    what = (f"a {run.get('command')} run (run.json)" if run is not None else
            _stores_or_slides(folder) if not any((folder / m).exists() for m in _DATA_MARKS) else None)
    if what is not None:
        raise ConfigError(f"{folder} holds {what}; {command} would write its outputs among them. Choose another "
                          "--out (for extract-features, usually the tile --out folder that holds patches/)")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (manifests, .npz sources: small next to the work)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_record(path: Path) -> dict[str, Any]:
    """An input as part of a run's identity: a file by its content, a folder by its path."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "sha256": file_digest(p)}
    return {"path": str(p.resolve())}


#: settings added after runs were made, left out of a run's identity while at their default
#: (so a run made before them keeps its identity: its re-run resumes instead of being refused)
LATER_SETTINGS: dict[str, Any] = {"model_options": None, "covariates": None, "fusion": "concat", "targets": None,
                                  "target_weights": None, "survival_loss": "cox", "time_bins": None,
                                  "regression_loss": "huber", "standardise_target": True, "lesion_class": "Tumor",
                                  "folds_by": None, "bag": "slide", "patient_max_instances": 65536,
                                  "random_comparison": True}


def identity(command: str, settings: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The record of a run: command, settings (runtime ones left out), inputs, and their hash."""
    kept = {k: v for k, v in sorted(settings.items())
            if k not in RUNTIME_SETTINGS and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    body = {"command": command, "settings": kept, "inputs": inputs}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {**body, "identity": digest}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    a, b = old.get("settings", {}), new["settings"]
    def value(d: dict[str, Any], k: str) -> Any:  # a later setting left out of the record is at its default
        return d.get(k, LATER_SETTINGS.get(k))

    parts += [f"{k} {value(a, k)!r} -> {value(b, k)!r}" for k in sorted(set(a) | set(b)) if value(a, k) != value(b, k)]
    ai, bi = old.get("inputs", {}), new["inputs"]
    parts += [f"input {k} changed" for k in sorted(set(ai) | set(bi)) if ai.get(k) != bi.get(k)]
    return "; ".join(parts[:8]) + (" ..." if len(parts) > 8 else "") if parts else "another run"


def read_run(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _run_output(p: Path) -> bool:
    return p.name in RUN_OUTPUTS


def clear_run(folder: Path, outputs: Callable[[Path], bool] = _run_output) -> list[str]:
    """Remove what a run wrote in ``folder`` (``outputs`` says which entries: by default
    :data:`RUN_OUTPUTS`); returns the names."""
    removed = []
    for p in sorted(Path(folder).iterdir()):
        if outputs(p):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p.name)
    return removed


def claim(folder: Path, record: dict[str, Any], *, overwrite: bool = False,
          outputs: Callable[[Path], bool] = _run_output,
          legacy_marks: Callable[[Path], bool] | None = None) -> str:
    """Make ``folder`` the run ``record`` describes: "new", "resumed" (the same run was
    there) or "replaced" (``overwrite``: the earlier run's files removed first). A folder
    of another run is refused (:class:`ConfigError`, exit 2) naming what changed.
    ``outputs``: which entries of the folder a run of this command writes (what
    ``overwrite`` removes); ``legacy_marks``: entries that show an earlier wsi-mil's run
    without ``run.json`` (default: models, metrics, predictions, attention)."""
    from wsi_mil.io.atomic import ensure_writable, write_json

    folder = Path(folder)
    old = read_run(folder) if folder.is_dir() else None
    marks = legacy_marks or (lambda p: p.name in _LEGACY_MARKS)
    legacy = old is None and folder.is_dir() and any(marks(p) for p in folder.iterdir())
    state = "new"
    if old is not None and old.get("identity") == record["identity"]:
        return "resumed"
    data = _data_folder(folder) if old is None and folder.is_dir() else None
    if data is not None:  # `train-mil --out features/` wrote models among the stores it reads
        raise ConfigError(f"{folder} holds {data}, not a run; a run's files would mix with them (and --overwrite "
                          "would not apply). Choose another --out, such as a new folder beside it")
    if old is not None and old.get("command") != record["command"]:
        # never replaced, not even with --overwrite: `predict RUN --out RUN --overwrite` removed the run it reads
        raise ConfigError(f"{folder} holds a {old.get('command')} run, not a {record['command']} one; its files are "
                          f"not this command's to replace. Choose another --out (a folder inside it is fine)")
    if old is not None or legacy:
        if not overwrite:
            what = ("the outputs of a run made by an earlier wsi-mil (no run.json)" if legacy else
                    f"another run ({_changes(old or {}, record)})")
            raise ConfigError(f"{folder} holds {what}; one folder holds one run, so its files would mix with this "
                              "one's. Choose another --out, or pass --overwrite to replace it (that run's files are "
                              "removed first)")
        clear_run(folder, outputs)
        state = "replaced"
    ensure_writable(folder)
    write_json(folder / RUN_FILE, {**record, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return state


def mark_finished(folder: Path) -> None:
    """Record in ``run.json`` that the run wrote every output (a re-run with the same
    identity has nothing to do)."""
    from wsi_mil.io.atomic import write_json

    run = read_run(folder)
    if run is not None and not run.get("finished"):
        write_json(Path(folder) / RUN_FILE, {**run, "finished": True})


def set_folds(folder: Path, folds: list[int]) -> None:
    """Record the folds a run trained: ``predict`` and the heatmaps use these, and only these."""
    from wsi_mil.io.atomic import write_json

    run = read_run(folder)
    if run is not None and run.get("folds") != folds:
        write_json(Path(folder) / RUN_FILE, {**run, "folds": folds})


def listed_folds(run_dir: Path, found: list[Path]) -> list[Path]:
    """The model files of the folds ``run.json`` lists (all found ones for a run without
    it); a listed fold whose model is missing is an error."""
    run = read_run(run_dir)
    if run is None or run.get("folds") is None:
        return found
    by_index = {p.stem.removeprefix("fold"): p for p in found}
    missing = [f for f in run["folds"] if str(f) not in by_index]
    if missing:
        raise ConfigError(f"{run_dir}: the run lists fold(s) {missing} whose models are missing from models/; "
                          "re-run the training command to finish it")
    return [by_index[str(f)] for f in run["folds"]]
