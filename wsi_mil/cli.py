"""`wsi-mil` entry point: one sub-command per verb. Heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from wsi_mil import __version__
from wsi_mil.runtime import prefer_passive_omp

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_USAGE = 0, 1, 2
logger = logging.getLogger("wsi_mil")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default once: not when its help already says it, nor for flags
    and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default" in text or "default:" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, help and default taken from the field."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options (also settable in a YAML recipe)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text and default is not None:
            help_text += f" (default: {default})"
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            # the choices are checked by build_config, with the message a recipe's value gets too
            choices = f.metadata.get("choices")
            group.add_argument(flag, dest=f.name, type=base, default=None,
                               metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(), help=help_text)


def _config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


_held: logging.handlers.MemoryHandler | None = None
_command = "?"  # the running command, recorded in the output folder's lock


def _setup_logging(verbose: int, log_file: Path | None = None) -> None:
    """Console logging at the verbosity asked for, and the command's log file; the log
    file's folder (the command's --out) is checked writable first (exit 2 if not)."""
    from wsi_mil.logs import file_handler

    global _held
    if log_file is not None:  # the folder's lock first: a second run must not even open the log
        from wsi_mil.io.lock import lock_folder

        lock_folder(log_file.parent, _command)
    handler = file_handler(log_file) if log_file is not None else None
    root = logging.getLogger("wsi_mil")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(console)
    _capture_warnings([console] + ([handler] if handler is not None else []))
    if handler is not None:
        root.addHandler(handler)
        if _held is not None:  # what was logged while the inputs were checked, before the run folder existed
            _held.setTarget(handler)
            _held.flush()
            _held.close()
            _held = None
    else:  # held until the command's log file exists (or dropped when the command is refused)
        _held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        _held.setLevel(logging.DEBUG)
        root.addHandler(_held)


def _capture_warnings(handlers: list[logging.Handler]) -> None:
    """Python warnings raised by libraries (pydicom, tifffile ...) go through the command's
    log like its own: one line, `WARNING:` first, in the log file too (not a raw
    `file.py:12: UserWarning` line with a source line below it)."""
    import warnings

    def one_line(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
        return f"{category.__name__}: {message} ({Path(filename).name}:{lineno})"

    warnings.formatwarning = one_line  # type: ignore[assignment]
    logging.captureWarnings(False)  # re-installed each time: an earlier command in this process may have left it
    logging.captureWarnings(True)
    caught = logging.getLogger("py.warnings")
    caught.handlers.clear()
    caught.propagate = False
    for h in handlers:
        caught.addHandler(h)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _add_heatmap_style_options(parser: argparse.ArgumentParser) -> None:
    # the choices are wsi_mil.viz.scores.NORMALISATIONS / COLOURMAPS, spelled out so that
    # --help imports nothing heavy
    parser.add_argument("--normalise", default="rank", choices=["rank", "softmax", "raw"],
                        help="rank: percentile within the slide; softmax: attention as the model weighs it; "
                             "raw: log attention")
    parser.add_argument("--cmap", default="viridis", choices=["viridis", "magma", "inferno", "plasma", "cividis"],
                        help="perceptually uniform colour map")


def _add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds another run (other settings or inputs): remove that run's files first and "
                             "start again (without it such a folder is refused: one folder holds one run; the same "
                             "run resumes)")


def _claim_output(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Make --out the folder of the run ``record`` describes (:mod:`wsi_mil.io.run_folder`:
    a folder of another run is refused, or with --overwrite cleared first), holding its
    lock first so that a second run can neither clear nor mark a folder in use; called
    before anything is written into it."""
    from wsi_mil.io.lock import lock_folder
    from wsi_mil.io.run_folder import claim

    lock_folder(args.out, _command)
    state = claim(args.out, record, overwrite=args.overwrite)
    if state != "new":
        logger.info("%s: %s", args.out, "the same run: resuming" if state == "resumed"
                    else "the earlier run's files were removed (--overwrite)")


def _predict_record(args: argparse.Namespace, settings: dict[str, Any], sources: list[Path]) -> dict[str, Any]:
    """A prediction's identity: its settings, the run it applies (by that run's identity)
    and its inputs."""
    from wsi_mil.io.run_folder import identity, input_record, read_run

    made = read_run(args.run)
    return identity(args.command, settings, {"run": made["identity"] if made else str(Path(args.run).resolve()),
                                             "sources": [input_record(p) for p in sources]})


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Progress and log verbosity, the same for every batch command."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (also hidden by -q and by TQDM_DISABLE=1 in the environment)")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more log output (-vv for debug; default: info)")
    parser.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose", help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    from wsi_mil.config import ExtractConfig, ImageTrainConfig, TileConfig, TrainConfig, VolumeTrainConfig

    parser = argparse.ArgumentParser(prog="wsi-mil", description="Weakly supervised whole-slide image classification (MIL).")
    parser.add_argument("--version", action="version", version=f"wsi-mil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tile = sub.add_parser(
        "tile", help="find tissue and extract patch coordinates (and optionally pixels) from slides",
        description="Find tissue on each slide and write one patch store per slide (coordinates in level-0 "
                    "pixels, optional JPEG pixels), a QC PNG per slide and a run report. Finished slides are "
                    "skipped on re-run; an interrupted run resumes. Exit status: 0 all slides done, 1 some "
                    "slides failed (see the report), 2 bad options or manifest.",
    )
    tile.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files, folders of slides, or manifest CSVs (see slides_manifest/)")
    tile.add_argument("--out", required=True, type=Path, help="output folder (patches/, qc/, run_report.json, tile.log)")
    tile.add_argument("--config", type=Path, help="YAML recipe with a 'tile:' section (see pipelines/); flags override it")
    tile.add_argument("--workers", type=int, default=_default_workers(),
                      help=f"worker processes of the local Dask cluster, or threads with --executor threads (default: {_default_workers()})")
    tile.add_argument("--executor", choices=("auto", "threads", "processes"), default="auto",
                      help="processes: a local Dask cluster, one slide per worker process; threads: this process, one "
                           "slide at a time shared by --workers threads (no cluster start); auto (default): threads when "
                           "one slide needs coordinates only, processes for a batch or --save-patches")
    tile.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786) instead of a local cluster")
    tile.add_argument("--overwrite", action="store_true", help="rebuild stores that already exist")
    tile.add_argument("--dashboard", metavar="ADDRESS", default=None,
                      help="serve Dask's dashboard at ADDRESS (e.g. :8787) while tiling (default: no dashboard)")
    _add_output_options(tile)
    _add_config_options(tile, TileConfig)

    ext = sub.add_parser(
        "extract-features", help="embed the tiled patches with a frozen encoder into feature stores",
        description="Read each slide's patches (from the slide by coordinates, or the pixels saved by "
                    "`tile --save-patches`) in background reader processes, embed them with a frozen encoder "
                    "(default: ImageNet EfficientNet-Lite0, offline) and write one feature store per slide "
                    "(features + coords, CLAM-compatible HDF5 or Zarr) under OUT/features/. Work is saved in "
                    "chunks: a killed run resumes mid-slide. Exit status: 0 all slides done, 1 some failed, "
                    "2 bad options.",
    )
    ext.add_argument("inputs", nargs="*", metavar="INPUT", help="tile output folders (with patches/), folders of patch stores, or store files")
    ext.add_argument("--out", type=Path, help="output folder (features/, features_report.json, extract.log); required")
    ext.add_argument("--config", type=Path, help="YAML recipe with an 'extract_features:' section (see pipelines/); flags override it")
    ext.add_argument("--slides", type=Path, action="append", default=[], help="folder holding the slides, when they moved since tiling (repeatable)")
    ext.add_argument("--overwrite", action="store_true", help="replace existing feature stores (needed to switch encoder)")
    ext.add_argument("--list-encoders", action="store_true", help="print the registered encoders and exit")
    ext.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786): shard the slides over its "
                                         "workers (one per GPU with `dask worker ADDR --resources GPU=1`, else per CPU "
                                         "worker) instead of the local devices; the workers must see the same files")
    _add_output_options(ext)
    _add_config_options(ext, ExtractConfig)

    tr = sub.add_parser(
        "train-mil", help="train an attention-MIL model on slide labels, with patient-level splits and evaluation",
        description="Join the manifest's slide labels with the feature stores, split by patient (held-out test "
                    "set + stratified group k-fold, or the manifest's split column, checked for patients in two "
                    "sets), train one model per fold with early stopping on validation, choose the decision "
                    "threshold on validation and report test metrics per fold, across folds and for the fold "
                    "ensemble (AUC with bootstrap CI, sensitivity, specificity, PPV, NPV, F1, confusion matrix). "
                    "Writes weights-only models, metrics.json, report.md, predictions.csv, ROC / confusion / "
                    "training-curve PNGs and per-slide attention for heatmaps. A re-run resumes at the next "
                    "untrained fold. Exit status: 0 done; 1 labelled slides have no usable feature store (see "
                    "--allow-missing); 2 bad options, manifest or labels.",
    )
    tr.add_argument("manifest", type=Path, nargs="?", help="manifest CSV with slide_id, patient_id and label column(s) (see slides_manifest/)")
    tr.add_argument("--features", type=Path, action="append", help="features/ folder of extract-features (repeatable; required)")
    tr.add_argument("--out", type=Path, help="output folder of the run (required)")
    tr.add_argument("--config", type=Path, help="YAML recipe with a 'train_mil:' section (see pipelines/); flags override it")
    tr.add_argument("--list-models", action="store_true", help="print the registered MIL models and exit")
    _add_overwrite_option(tr)
    _add_output_options(tr)
    _add_config_options(tr, TrainConfig)

    ti = sub.add_parser(
        "train-image", help="train a whole-image classifier (chest X-rays ...) with the same splits, loop and report",
        description="Classify 2D images (PNG / JPEG 8- or 16-bit, DICOM, or a MedMNIST .npz) with a registry backbone "
                    "and a linear head, trained by the loop train-mil uses: patient-level splits (a given split "
                    "column is checked for patients in two sets), one model per fold, thresholds chosen on "
                    "validation, the fold ensemble on the held-out test set; report.md with AUC (CI), sensitivity, "
                    "specificity, PPV, F1, calibration (ECE, reliability.png). Transfer modes: linear (probe on cached "
                    "frozen features), partial (last stages), full (discriminative learning rates). Default "
                    "augmentation never flips left-right (see README). A re-run resumes at the next untrained fold. "
                    "Exit status: 0 done; 1 unreadable images; 2 bad options, manifest or labels.",
    )
    ti.add_argument("source", type=Path, nargs="?", help="image manifest CSV (path, patient_id, split, label columns) or a MedMNIST .npz")
    ti.add_argument("--out", type=Path, help="output folder of the run (required)")
    ti.add_argument("--config", type=Path, help="YAML recipe with a 'train_image:' section (see pipelines/); flags override it")
    _add_overwrite_option(ti)
    _add_output_options(ti)
    _add_config_options(ti, ImageTrainConfig)

    tv = sub.add_parser(
        "train-volume", help="train a 3D CT / MRI volume classifier (3D CNN or 2.5D slice-MIL) with the same run",
        description="Classify 3D volumes (NIfTI, DICOM series folders, or a MedMNIST 3D .npz) through the run "
                    "train-mil and train-image use (patient-level splits, folds, validation thresholds, the fold "
                    "ensemble on the test set, report.md with AUC (CI), sensitivity, specificity, PPV, F1, "
                    "calibration). Volumes are put in the canonical frame, optionally resampled to --spacing mm, "
                    "windowed (--window LOW,HIGH in HU) or normalised, and fitted to a --volume-size cube (aspect "
                    "kept). --mode cnn: a 3D CNN (--arch resnet18_3d from scratch; acs / inflate: the pretrained 2D "
                    "backbone turned 3D). --mode slices: 2.5D slice-MIL, frozen 2D features of every axial slice "
                    "pooled by --mil-model (mean, or attention along the volume). Augmentation never flips left-right "
                    "unless asked (--augment volume-flip). Exit status: 0 done; 1 unreadable volumes; 2 bad options, "
                    "manifest or labels.",
    )
    tv.add_argument("source", type=Path, nargs="?", help="volume manifest CSV (path = NIfTI file or DICOM series folder, "
                                                         "patient_id, split, label columns) or a MedMNIST 3D .npz")
    tv.add_argument("--out", type=Path, help="output folder of the run (required)")
    tv.add_argument("--config", type=Path, help="YAML recipe with a 'train_volume:' section (see pipelines/); flags override it")
    _add_overwrite_option(tv)
    _add_output_options(tv)
    _add_config_options(tv, VolumeTrainConfig)

    pv = sub.add_parser(
        "predict-volume", help="apply a train-volume run to volumes, with 3D Grad-CAM / slice attention heatmaps",
        description="Predict with the fold models of a train-volume run (probabilities averaged; thresholds = the "
                    "logit mean of the folds' validation thresholds). With --maps, per volume: maps/<id>.nii.gz (the "
                    "heatmap on the input's own voxel grid, with its affine: opens beside the scan in 3D Slicer or "
                    "ITK-SNAP), maps/<id>.png (three orthogonal planes through the peak; slice-MIL runs add the "
                    "attention along the axis). A 3D CNN's maps are 3D Grad-CAM, a slice-MIL run's the attention per "
                    "slice. Exit status: 0 all predicted, 1 some volumes unreadable, 2 bad options.",
    )
    pv.add_argument("run", type=Path, help="output folder of train-volume")
    pv.add_argument("source", type=Path, help="volume manifest CSV, MedMNIST 3D .npz, a NIfTI file, a DICOM series "
                                              "folder, or a folder of NIfTI files")
    pv.add_argument("--out", required=True, type=Path, help="output folder")
    pv.add_argument("--maps", action="store_true", help="write heatmaps (NIfTI + PNG) for every volume")
    pv.add_argument("--limit-maps", type=int, default=None, help="at most this many volumes get maps (the first ones)")
    _add_overwrite_option(pv)
    _add_output_options(pv)

    pi = sub.add_parser(
        "predict-image", help="apply a train-image run to images, with Grad-CAM maps, boxes and GeoJSON",
        description="Predict with the fold models of a train-image run (probabilities averaged; thresholds = the "
                    "logit mean of the folds' validation thresholds). With --cam, one Grad-CAM (or Grad-CAM++; for a "
                    "patch-MIL run the attention over its patches) map per output and image: cam/<image>.png (overlay with boxes), cam/<image>.geojson (high-activation "
                    "regions as QuPath annotations) and boxes.csv; with --boxes, weak-localisation accuracy at IoU "
                    "0.1-0.7 and average false positives (localisation.json). Exit status: 0 all predicted, 1 some "
                    "images unreadable, 2 bad options.",
    )
    pi.add_argument("run", type=Path, help="output folder of train-image")
    pi.add_argument("source", type=Path, help="image manifest CSV, MedMNIST .npz, an image file or a folder of images")
    pi.add_argument("--out", required=True, type=Path, help="output folder")
    pi.add_argument("--cam", choices=["gradcam", "gradcam++", "attention"], default=None,
                    help="write maps with this method: gradcam / gradcam++ for whole-image runs, attention (over the "
                         "patches) for train-image --mode mil runs")
    pi.add_argument("--cam-threshold", type=float, default=0.5, help="boxes and regions where the map reaches this share of its peak")
    pi.add_argument("--boxes", type=Path, default=None, help="ground-truth boxes CSV (image_id, label, x, y, width, height) to score the maps")
    _add_overwrite_option(pi)
    _add_output_options(pi)

    pr = sub.add_parser(
        "predict", help="apply a trained run (ensemble of its fold models) to new slides' feature stores",
        description="Predict slide labels with the fold models of a train-mil run (probabilities averaged; "
                    "threshold = the mean of the folds' validation thresholds). Writes predictions.csv, "
                    "attention/<slide>.h5 and predict_report.json. A store that cannot be read or holds "
                    "non-finite features is reported as failed, never predicted. Exit status: 0 all predicted, 1 some "
                    "stores failed, 2 bad options.",
    )
    pr.add_argument("run", type=Path, help="output folder of train-mil")
    pr.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="feature stores, or folders of them (extract-features output)")
    pr.add_argument("--out", required=True, type=Path, help="output folder")
    pr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    _add_overwrite_option(pr)
    _add_output_options(pr)

    hm = sub.add_parser(
        "heatmap", help="attention heatmaps for review: PNG overlay, pyramidal TIFF, QuPath GeoJSON, patch gallery",
        description="Draw each slide's stored attention (train-mil / predict outputs; no re-tiling, no "
                    "re-extraction) as: overlay.png (thumbnail + heatmap + colour bar + prediction), heatmap.tif "
                    "(pyramidal TIFF with the slide's level-0 size and mpp: open it in QuPath/OpenSlide next to "
                    "the slide), patches.geojson (QuPath: File > Import objects; tiles with attention "
                    "measurements) and gallery.jpg (top/bottom patches). A train-mil run folder gives every "
                    "slide its out-of-fold map. Finer maps: tile with --overlap 0.5 (about 4x the extraction "
                    "time), extract, predict, then draw; --smooth-um blurs at no extraction cost. Exit status: "
                    "0 all drawn, 1 some slides failed, 2 bad options.",
        formatter_class=_DefaultsFormatter,
    )
    hm.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                    help="train-mil run folder, predict output folder, or attention .h5 files")
    hm.add_argument("--out", type=Path, default=None, help="output folder (default: INPUT/heatmaps for one folder)")
    _add_heatmap_style_options(hm)
    hm.add_argument("--formats", nargs="+", default=["png", "tiff", "geojson", "gallery"],
                    choices=["png", "tiff", "geojson", "gallery"], help="exports to write")
    hm.add_argument("--top-k", type=int, default=8, help="patches per row of the gallery")
    hm.add_argument("--geojson-top-k", type=int, default=0, help="only the k highest patches in the GeoJSON (0: all)")
    hm.add_argument("--smooth-um", type=float, default=0.0, help="Gaussian smoothing sigma in µm within the tissue (0: none)")
    hm.add_argument("--opacity", type=float, default=0.5, help="heatmap opacity over the thumbnail in overlay.png")
    hm.add_argument("--slides", type=Path, default=None, metavar="MANIFEST",
                    help="manifest CSV giving slide paths (default: the paths recorded in the feature stores)")
    hm.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786): one task per slide on "
                                        "its workers, which must see the stores, slides and --out at the same paths "
                                        "(default: a few threads of this process)")
    hm.add_argument("--overwrite", action="store_true",
                    help="redraw slides already drawn with the same settings; --out holding the heatmaps of other "
                         "attention (another run or prediction) is refused without it, and cleared first with it")
    _add_output_options(hm)

    au = sub.add_parser(
        "audit", help="audit a finished run: subgroups, operating points, every error, duplicates, label sources",
        description="The audit train-mil / train-image / train-volume run, alone on a finished run folder: per-subgroup "
                    "AUC, sensitivity and specificity with CIs (--subgroups; numeric columns banded by quartiles, small "
                    "subgroups flagged, the largest gap stated), sensitivity at fixed specificity and the reverse, PPV / "
                    "NPV at --prevalence, every false negative and false positive with its probability, patient and "
                    "heatmap (errors.csv, gallery.png), near-duplicate images (or slides, with --features) across the "
                    "run's splits, and disagreeing label sources (--label-sources). Writes RUN/audit/ (or --out): "
                    "audit.json, report.md, errors.csv, gallery.png. Exit status: 0 done; 2 bad options or inputs.",
        formatter_class=_DefaultsFormatter,
    )
    au.add_argument("run", type=Path, help="output folder of train-mil, train-image or train-volume")
    au.add_argument("--manifest", type=Path, required=True, help="the manifest the run was trained on (its columns give the subgroups)")
    au.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/audit)")
    au.add_argument("--subgroups", default=None, help="manifest columns, comma-separated (e.g. sex,age,view,site)")
    au.add_argument("--prevalence", type=float, default=None, help="deployment prevalence for PPV / NPV (e.g. 0.02)")
    au.add_argument("--label-sources", default=None, help="two manifest columns with labels from different sources, a,b")
    au.add_argument("--features", type=Path, default=None, help="features/ folder of the run's slides (near-duplicate slides)")
    au.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    _add_output_options(au)

    rv = sub.add_parser(
        "review", help="local web page to review a run's attention over the slides (127.0.0.1)",
        description="Serve a review page: each slide in a deep-zoom viewer (tiles cut by OpenSlide from the "
                    "slide's pyramid; never its label or macro image), the attention heatmap over it with an "
                    "opacity control, the top patches as a list that jumps to them, the prediction, and the "
                    "run's slides to move between. Only the run's slides and exports are reachable, and only "
                    "requests naming the bound host are answered. Needs the page's front-end packages: npm ci "
                    "--prefix wsi_mil/review/web. Exit status: 0 stopped with Ctrl-C, 2 bad options or nothing "
                    "to review.",
        formatter_class=_DefaultsFormatter,
    )
    rv.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                    help="train-mil run folder, predict output folder, or attention .h5 files")
    rv.add_argument("--heatmaps", type=Path, default=None,
                    help="heatmap folder whose exports to offer (default: INPUT/heatmaps when it exists)")
    rv.add_argument("--slides", type=Path, default=None, metavar="MANIFEST", help="manifest CSV giving slide paths")
    rv.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback exposes the slides)")
    rv.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    _add_heatmap_style_options(rv)
    _add_output_options(rv)

    synth = sub.add_parser(
        "synth", help="generate a labelled cohort of realistic pyramidal slides from real tissue",
        description="Build pyramidal JPEG-tiled TIFF slides by laying out real H&E tissue on glass, planting "
                    "tumour regions (from a different real tissue source) in a fraction of them, with a "
                    "ground-truth mask and a manifest CSV. Exit status: 0 written, 2 bad options.",
        formatter_class=_DefaultsFormatter,
    )
    synth.add_argument("--out", required=True, type=Path, help="output folder for slides, masks and manifest.csv")
    synth.add_argument("--n-slides", type=int, default=8, help="number of slides")
    synth.add_argument("--positive-fraction", type=float, default=0.5, help="fraction of slides with tumour")
    synth.add_argument("--size", type=int, default=8192, help="slide side in level-0 pixels")
    synth.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px written in the metadata")
    synth.add_argument("--preset", choices=("balanced", "confounded", "hard", "easy"), default="balanced",
                       help="balanced: normal tissue from several real sources without repeats, stain varied per "
                            "slide, both balanced across the classes (matched pairs), tumour colour-matched, 1-2 "
                            "regions of 100-250 µm; confounded: balanced plus a site column whose stain comes with "
                            "the label (80%% of positives, 20%% of negatives: for testing shortcut checks); hard: as "
                            "balanced but sources and stain drawn per slide regardless of the label (small cohorts "
                            "confound by chance), 150-400 µm; easy: one mirror-tiled source and larger tumours in "
                            "their own colours (a pipeline check that MIL solves perfectly). The cohort's README.md "
                            "tabulates classes against sources and sites")
    synth.add_argument("--tumour-size-um", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="tumour region diameter range (default: the preset's)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same cohort)")
    _add_output_options(synth)

    demo = sub.add_parser(
        "demo", help="run the pipeline on the built-in sample cohort (offline)",
        description="Builds a small labelled cohort from the bundled real tissue, tiles it together with the "
                    "bundled real slide, embeds every patch with the offline ImageNet EfficientNet-Lite0, trains "
                    "and evaluates attention MIL, measures the attention's localisation of the planted tumour, "
                    "draws every slide's heatmaps, and prints the figures, where the outputs are and how to open "
                    "the review page. Each step writes its log and resolved settings beside its outputs. Exit "
                    "status: 0 done, 1 a step failed for some slides, 2 bad options.",
        formatter_class=_DefaultsFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("wsi-mil-demo"), help="output folder")
    demo.add_argument("--workers", type=int, default=_default_workers(), help="worker processes")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--n-slides", type=int, default=None, help="generated slides (default: the built-in cohort's)")
    demo.add_argument("--size", type=int, default=None, help="generated slide side in level-0 px (default: built-in)")
    _add_output_options(demo)
    return parser


def _require(args: argparse.Namespace, command: str, **needed: str) -> None:
    """Arguments that are required unless a listing flag is given."""
    from wsi_mil.errors import ConfigError

    missing = [flag for name, flag in needed.items() if not getattr(args, name)]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} "
                          f"(see wsi-mil {command} --help)")


def _cmd_tile(args: argparse.Namespace) -> int:
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import TileConfig, build_config, load_recipe
    from wsi_mil.data.manifest import resolve_inputs_reporting
    _setup_logging(args.verbose)
    recipe = load_recipe(args.config, "tile") if args.config else None
    config = build_config(TileConfig, recipe=recipe, overrides=_config_overrides(args, TileConfig))
    resolved = resolve_inputs_reporting(args.inputs)  # a bad manifest stops here, before --out is made
    entries = resolved.entries
    from wsi_mil.io.run_folder import refuse_foreign_data_folder

    refuse_foreign_data_folder(args.out, "tile")
    _setup_logging(args.verbose, args.out / "tile.log")
    _write_resolved_config(args.out / "tile_config.yaml", config, args)
    logger.info("tiling %d slide(s) into %s", len(entries), args.out)
    report = run_tile(entries, out_dir=args.out, config=config, workers=args.workers, scheduler=args.scheduler,
                      overwrite=args.overwrite, progress=not args.no_progress, skipped_inputs=resolved.skipped,
                      dashboard=args.dashboard, executor=args.executor)
    print(report.table())
    d = report.to_dict()
    print(f"\n{len(entries)} slide(s): {d['counts']}; {d['n_patches']} patches in {report.seconds:.1f} s")
    print(f"stores: {args.out / 'patches'}   QC images: {args.out / 'qc'}   report: {args.out / 'run_report.json'}")
    if report.disk_full:
        full = report.disk_full
        print(f"stopped: {full['message']}. Finished stores are kept; about {full['needed_bytes'] / 1e6:.0f} MB more "
              f"are needed for the {len(full['slides_left'])} slide(s) left. Free space (or choose another --out) and "
              "run the same command again: it resumes.", file=sys.stderr)
    if not report.ok:
        print(f"{report.n_failed} slide(s) failed; see the messages above and {args.out / 'tile.log'}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_SLIDES_FAILED


def _write_resolved_config(path: Path, config: Any, args: argparse.Namespace,
                           section: str = "tile", extra: dict[str, Any] | None = None) -> None:
    from wsi_mil.config import write_settings

    if extra is None:
        extra = {"workers": args.workers, "scheduler": args.scheduler}
    write_settings(path, args.command, args.inputs, section, config.to_dict(), extra)


def _cmd_extract(args: argparse.Namespace) -> int:
    prefer_passive_omp()
    from wsi_mil.commands.extract_features import run_extract
    from wsi_mil.config import ExtractConfig, build_config, load_recipe
    if args.list_encoders:
        from wsi_mil.encoders import available

        for name, desc in available().items():
            print(f"{name:24s} {desc}")
        return EXIT_OK
    _require(args, "extract-features", inputs="INPUT (a tile output folder)", out="--out")
    _setup_logging(args.verbose)
    recipe = load_recipe(args.config, "extract_features") if args.config else None
    config = build_config(ExtractConfig, recipe=recipe, overrides=_config_overrides(args, ExtractConfig))
    from wsi_mil.io.run_folder import refuse_foreign_data_folder

    refuse_foreign_data_folder(args.out, "extract-features")
    _setup_logging(args.verbose, args.out / "extract.log")
    _write_resolved_config(args.out / "extract_config.yaml", config, args, "extract_features",
                           {"slides": [str(s) for s in args.slides], "scheduler": args.scheduler})
    report = run_extract(args.inputs, out_dir=args.out, config=config, overwrite=args.overwrite,
                         slide_dirs=args.slides, progress=not args.no_progress, scheduler=args.scheduler)
    print(report.table())
    d = report.to_dict()
    rate = f", {d['patches_per_s']:.1f} patches/s while embedding" if d["patches_per_s"] else ""
    print(f"\n{len(report.outcomes)} slide(s): {d['counts']}; {d['n_features']} features "
          f"({report.encoder['encoder']}, {report.encoder['dim']}-d) in {report.seconds:.1f} s{rate}")
    print(f"feature stores: {args.out / 'features'}   report: {args.out / 'features_report.json'}")
    if not report.ok:
        print(f"some slides failed; see the messages above and {args.out / 'extract.log'}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_SLIDES_FAILED


def _cmd_train(args: argparse.Namespace) -> int:
    from wsi_mil.config import TrainConfig, build_config, load_recipe

    if args.list_models:
        from wsi_mil.mil import available

        for name, desc in available().items():
            print(f"{name:14s} {desc}")
        return EXIT_OK
    _require(args, "train-mil", manifest="MANIFEST", features="--features", out="--out")
    from wsi_mil.commands.train_mil import prepare_inputs, run_train, summary_text
    _setup_logging(args.verbose)
    recipe = load_recipe(args.config, "train_mil") if args.config else None
    config = build_config(TrainConfig, recipe=recipe, overrides=_config_overrides(args, TrainConfig))
    # every check of the manifest, the labels and the feature stores comes before the run folder
    inputs = prepare_inputs(args.manifest, args.features, config, progress=not args.no_progress)
    from wsi_mil.train.runner import run_record

    _claim_output(args, run_record("train-mil", config, inputs))  # type: ignore[arg-type]
    _setup_logging(args.verbose, args.out / "train.log")
    args.inputs = [args.manifest]
    _write_resolved_config(args.out / "train_config.yaml", config, args, "train_mil",
                           {"features": [str(f) for f in args.features]})
    report = run_train(args.manifest, args.features, out_dir=args.out, config=config, progress=not args.no_progress,
                       inputs=inputs)
    print(summary_text(report))
    return EXIT_OK


def _cmd_train_image(args: argparse.Namespace) -> int:
    from wsi_mil.config import ImageTrainConfig, build_config, load_recipe

    _require(args, "train-image", source="SOURCE", out="--out")
    from wsi_mil.commands.train_image import prepare_image_inputs, run_train_image
    from wsi_mil.train.runner import run_record, summary_text

    recipe = load_recipe(args.config, "train_image") if args.config else None
    config = build_config(ImageTrainConfig, recipe=recipe, overrides=_config_overrides(args, ImageTrainConfig))
    _setup_logging(args.verbose)
    # every check that can refuse the run (manifest, labels, unreadable images, duplicates across the
    # splits) comes before the run folder, and before any feature is computed
    prepared = prepare_image_inputs(args.source, config, progress=not args.no_progress)
    _claim_output(args, run_record("train-image", config, prepared[0]))
    _setup_logging(args.verbose, args.out / "train.log")
    args.inputs = [args.source]
    _write_resolved_config(args.out / "train_config.yaml", config, args, "train_image", {})
    report = run_train_image(args.source, out_dir=args.out, config=config, progress=not args.no_progress,
                             prepared=prepared)
    print(summary_text(report))
    return EXIT_OK


def _cmd_train_volume(args: argparse.Namespace) -> int:
    from wsi_mil.config import VolumeTrainConfig, build_config, load_recipe

    _require(args, "train-volume", source="SOURCE", out="--out")
    from wsi_mil.commands.train_volume import prepare_volume_inputs, resolve_intensity, run_train_volume
    from wsi_mil.train.runner import run_record, summary_text

    recipe = load_recipe(args.config, "train_volume") if args.config else None
    config = build_config(VolumeTrainConfig, recipe=recipe, overrides=_config_overrides(args, VolumeTrainConfig))
    config = resolve_intensity(config, args.source)  # the mode --intensity auto stands for, recorded as such
    config.prep()  # spacing / window checked before anything is read
    _setup_logging(args.verbose)
    prepared = prepare_volume_inputs(args.source, config, progress=not args.no_progress)  # refusals: no folder yet
    _claim_output(args, run_record("train-volume", config, prepared[0]))
    _setup_logging(args.verbose, args.out / "train.log")
    args.inputs = [args.source]
    _write_resolved_config(args.out / "train_config.yaml", config, args, "train_volume", {})
    report = run_train_volume(args.source, out_dir=args.out, config=config, progress=not args.no_progress,
                              prepared=prepared)
    print(summary_text(report))
    return EXIT_OK


def _cmd_predict_volume(args: argparse.Namespace) -> int:
    from wsi_mil.commands.predict_volume import run_predict_volume

    _setup_logging(args.verbose)
    _claim_output(args, _predict_record(args, {"maps": args.maps, "limit_maps": args.limit_maps}, [args.source]))
    _setup_logging(args.verbose, args.out / "predict.log")
    report = run_predict_volume(args.run, args.source, out_dir=args.out, maps=args.maps, limit_maps=args.limit_maps,
                                progress=not args.no_progress)
    print(f"{report.n_images} volume(s) predicted; predictions: {args.out / 'predictions.csv'}"
          + (f"; maps: {args.out / 'maps'}" if args.maps else ""))
    if report.failed:
        print(f"{len(report.failed)} volume(s) could not be read: "
              + ", ".join(b["slide_id"] for b in report.failed[:10]), file=sys.stderr)
    return EXIT_SLIDES_FAILED if report.failed else EXIT_OK


def _cmd_predict_image(args: argparse.Namespace) -> int:
    from wsi_mil.commands.predict_image import run_predict_image

    if not 0 < args.cam_threshold < 1:
        print("wsi-mil predict-image: error: --cam-threshold must be in (0, 1)", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    _claim_output(args, _predict_record(args, {"cam": args.cam, "cam_threshold": args.cam_threshold,
                                               "boxes": str(args.boxes) if args.boxes else None},
                                        [args.source, *([args.boxes] if args.boxes else [])]))
    _setup_logging(args.verbose, args.out / "predict.log")
    report = run_predict_image(args.run, args.source, out_dir=args.out, cam=args.cam, cam_threshold=args.cam_threshold,
                               boxes=args.boxes, progress=not args.no_progress)
    print(f"{report.n_images} image(s) predicted; predictions: {args.out / 'predictions.csv'}"
          + (f"; maps: {args.out / 'cam'}" if args.cam else ""))
    for label, loc in report.localisation.items():
        acc = ", ".join(f"T(IoU)={t}: {v:.2f}" for t, v in loc["accuracy"].items() if v is not None)
        print(f"  {label}: localisation accuracy {acc}; avg false positives at 0.5: {loc['average_false_positives']['0.5']:.2f}")
    if report.failed:
        print(f"{len(report.failed)} image(s) could not be read: "
              + ", ".join(b["slide_id"] for b in report.failed[:10]), file=sys.stderr)
    return EXIT_SLIDES_FAILED if report.failed else EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from wsi_mil.commands.predict import run_predict

    _setup_logging(args.verbose)
    _claim_output(args, _predict_record(args, {}, list(args.inputs)))
    _setup_logging(args.verbose, args.out / "predict.log")
    report = run_predict(args.run, args.inputs, out_dir=args.out, device=args.device)
    print(f"{len(report.rows)} slide(s) predicted, {len(report.failed)} failed; predictions: {args.out / 'predictions.csv'}")
    return EXIT_OK if not report.failed else EXIT_SLIDES_FAILED


def _cmd_synth(args: argparse.Namespace) -> int:
    from wsi_mil.io.atomic import ensure_writable
    from wsi_mil.synth.cohort import cohort_settings, make_cohort

    _setup_logging(args.verbose)
    cohort_settings(args.preset, n_slides=args.n_slides, positive_fraction=args.positive_fraction, size_px=args.size,
                    mpp=args.mpp, tumour_size_um=args.tumour_size_um, tumour_regions=None)  # bad options: no folder made
    ensure_writable(args.out)
    manifest = make_cohort(args.out, n_slides=args.n_slides, preset=args.preset, positive_fraction=args.positive_fraction,
                           size_px=args.size, mpp=args.mpp, seed=args.seed,
                           tumour_size_um=args.tumour_size_um,
                           progress=not args.no_progress)
    print(f"cohort of {args.n_slides} slides in {args.out}; manifest: {manifest}")
    return EXIT_OK


def _cmd_heatmap(args: argparse.Namespace) -> int:
    from wsi_mil.commands.heatmap import HeatmapSettings, run_heatmap

    if args.out is None:
        if len(args.inputs) != 1 or not args.inputs[0].is_dir():
            print("wsi-mil heatmap: error: give --out when the input is not one folder", file=sys.stderr)
            return EXIT_USAGE
        args.out = args.inputs[0] / "heatmaps"
    from wsi_mil.commands.heatmap import attention_sources, claim_heatmap_folder
    from wsi_mil.io.lock import lock_folder

    _setup_logging(args.verbose)
    attention_sources(args.inputs)  # inputs without attention: refused before any folder is made
    lock_folder(args.out, _command)
    claim_heatmap_folder(args.inputs, args.out, overwrite=args.overwrite)  # before its log is written there
    _setup_logging(args.verbose, args.out / "heatmap.log")
    settings = HeatmapSettings(normalise=args.normalise, cmap=args.cmap, formats=tuple(args.formats),
                               top_k=args.top_k, geojson_top_k=args.geojson_top_k, smooth_um=args.smooth_um,
                               opacity=args.opacity)
    report = run_heatmap(args.inputs, out_dir=args.out, settings=settings, slides_manifest=args.slides,
                         overwrite=args.overwrite, progress=not args.no_progress, scheduler=args.scheduler)
    print(report.table())
    print(f"\nheatmaps of {len(report.outcomes)} slide(s) in {args.out} ({report.seconds:.1f} s); index: {args.out / 'index.json'}")
    return EXIT_OK if report.ok else EXIT_SLIDES_FAILED


def _cmd_review(args: argparse.Namespace) -> int:
    from wsi_mil.review.server import ReviewSite, make_server

    _setup_logging(args.verbose)
    heatmaps = args.heatmaps
    if heatmaps is None and len(args.inputs) == 1 and (args.inputs[0] / "heatmaps").is_dir():
        heatmaps = args.inputs[0] / "heatmaps"
    site = ReviewSite(args.inputs, slides_manifest=args.slides, heatmaps=heatmaps, normalise=args.normalise,
                      cmap=args.cmap)
    for problem in site.problems:
        print(f"skipped {problem}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can see these slides", file=sys.stderr)
    server = make_server(site, host=args.host, port=args.port)
    host, port = server.server_address[:2]
    print(f"reviewing {len(site.slides)} slide(s): open http://{host}:{port}/ in a browser (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        site.close()
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from wsi_mil.commands.audit import run_audit
    from wsi_mil.errors import ConfigError

    _setup_logging(args.verbose)
    if args.prevalence is not None and not 0 < args.prevalence < 1:
        raise ConfigError("--prevalence must be in (0, 1)")
    audit = run_audit(args.run, args.manifest, out_dir=args.out, subgroups=args.subgroups, prevalence=args.prevalence,
                      label_sources=args.label_sources, features=args.features, n_boot=args.bootstrap)
    ev = audit["evaluation"]
    e = ev["errors"]
    print(f"audit of {args.run} ({ev['set']}, {ev['n']} labelled): {len(e['false_negatives'])} false negative(s), "
          f"{len(e['false_positives'])} false positive(s)")
    if audit.get("duplicates"):
        d = audit["duplicates"]
        print(f"near-duplicates: {len(d['pairs'])} pair(s), {len(d['leaks'])} across sets under different patients")
    if audit.get("label_sources"):
        print(f"label sources disagree on {audit['label_sources']['n_conflicts']} row(s)")
    for col, rep in (ev.get("subgroups") or {}).items():
        gap = rep["largest_gap"].get("auc")
        print(f"subgroups by {col}: {len(rep['groups'])}" + (f"; largest AUC gap {gap['gap']:.3f} ({gap['lowest']} vs "
                                                              f"{gap['highest']})" if gap else ""))
    from wsi_mil.eval.shortcuts import notes_of, warnings_of

    for line in warnings_of(audit.get("shortcuts") or {}):
        print(f"WARNING: {line}")
    for line in notes_of(audit.get("shortcuts") or {}):
        print(f"note: {line}")
    print(f"report: {(args.out or args.run / 'audit') / 'report.md'}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    prefer_passive_omp()
    from wsi_mil.commands.demo import run_demo

    _setup_logging(args.verbose, args.out / "demo.log")
    sizes = {k: v for k, v in (("n_slides", args.n_slides), ("size_px", args.size)) if v is not None}
    return run_demo(out_dir=args.out, workers=args.workers, seed=args.seed, progress=not args.no_progress, **sizes)


def _remove_refused_output(out: Path) -> None:
    """A refused command (exit 2) leaves no output folder behind: the folder this command
    made is removed when it holds nothing but the command's own log and settings files."""
    from wsi_mil.io.lock import LOCK_NAME

    root = logging.getLogger("wsi_mil")
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    if all(p.is_file() and (p.suffix == ".log" or p.name.endswith("_config.yaml") or p.name in ("run.json", LOCK_NAME))
           for p in entries):
        for p in entries:
            p.unlink()
        out.rmdir()


def main(argv: list[str] | None = None) -> int:
    from wsi_mil.errors import WsiMilError

    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "no_progress") and (args.verbose == 0 or os.environ.get("TQDM_DISABLE", "").strip().lower()
                                         in ("1", "true", "yes")):
        args.no_progress = True  # tqdm reads TQDM_DISABLE only where no one passes disable= (every bar here does)
    commands = {"tile": _cmd_tile, "extract-features": _cmd_extract, "synth": _cmd_synth, "train-mil": _cmd_train, "predict": _cmd_predict,
                "train-image": _cmd_train_image, "predict-image": _cmd_predict_image,
                "train-volume": _cmd_train_volume, "predict-volume": _cmd_predict_volume,
                "heatmap": _cmd_heatmap, "review": _cmd_review, "demo": _cmd_demo, "audit": _cmd_audit}
    from wsi_mil.io.lock import release_all

    global _command
    _command = args.command
    out = getattr(args, "out", None)
    fresh = out is not None and not Path(out).exists()
    try:
        return commands[args.command](args)
    except WsiMilError as exc:
        print(f"wsi-mil {args.command}: error: {exc}", file=sys.stderr)
        if exc.exit_code == EXIT_USAGE:  # refused: the folder is left as it was found
            release_all(remove_made=True)
            if fresh:
                _remove_refused_output(Path(out))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished slides are kept and a re-run resumes", file=sys.stderr)
        return 130
    finally:
        release_all()  # the folder is free for the next command (the process's end would free it too)


def entry() -> None:
    """The ``wsi-mil`` program: :func:`main`, then an exit that skips the interpreter's
    final clean-up. Every output is written and closed by then (atomically); what is left
    is the C libraries' own tear-down, where OpenSlide, after failing to open some DICOM
    variants, now and then crashed the finished process (SIGSEGV at exit under load:
    2 in 20 runs seen), turning a correct exit status into -11."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
