"""`wsi-mil predict-volume`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    add_output_options,
    add_overwrite_option,
    add_settings,
    claim_output,
    predict_record,
    settings_of,
    setup_logging,
)
from wsi_mil.config import PredictVolumeConfig

NAME = "predict-volume"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (PredictVolumeConfig, "predict_volume")


def add_parser(sub: Any) -> None:
    """The ``predict-volume`` sub-command: its flags and help."""
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
    add_overwrite_option(pv)
    add_output_options(pv)
    add_settings(pv, PredictVolumeConfig, "predict_volume")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.predict_volume import run_predict_volume

    settings_of(args, PredictVolumeConfig, "predict_volume")
    setup_logging(args.verbose)
    claim_output(args, predict_record(args, {"maps": args.maps, "limit_maps": args.limit_maps}, [args.source]))
    setup_logging(args.verbose, args.out / "predict.log")
    report = run_predict_volume(args.run, args.source, out_dir=args.out, maps=args.maps, limit_maps=args.limit_maps,
                                progress=not args.no_progress)
    print(f"{report.n_images} volume(s) predicted; predictions: {args.out / 'predictions.csv'}"
          + (f"; maps: {args.out / 'maps'}" if args.maps else ""))
    if report.failed:
        print(f"{len(report.failed)} volume(s) could not be read: "
              + ", ".join(b["slide_id"] for b in report.failed[:10]), file=sys.stderr)
    return EXIT_SLIDES_FAILED if report.failed else EXIT_OK
