"""`wsi-mil predict-image`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

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
from wsi_mil.config import PredictImageConfig

NAME = "predict-image"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (PredictImageConfig, "predict_image")


def add_parser(sub: Any) -> None:
    """The ``predict-image`` sub-command: its flags and help."""
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
    pi.add_argument("--boxes", type=Path, default=None, help="ground-truth boxes CSV (image_id, label, x, y, width, height) to score the maps")
    add_overwrite_option(pi)
    add_output_options(pi)
    add_settings(pi, PredictImageConfig, "predict_image")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.predict_image import run_predict_image

    setup_logging(args.verbose)
    settings = settings_of(args, PredictImageConfig, "predict_image")
    claim_output(args, predict_record(args, {"cam": settings.cam, "cam_threshold": settings.cam_threshold,
                                               "boxes": str(args.boxes) if args.boxes else None},
                                        [args.source, *([args.boxes] if args.boxes else [])]))
    setup_logging(args.verbose, args.out / "predict.log")
    report = run_predict_image(args.run, args.source, out_dir=args.out, cam=settings.cam, cam_threshold=settings.cam_threshold,
                               boxes=args.boxes, progress=not args.no_progress)
    print(f"{report.n_images} image(s) predicted; predictions: {args.out / 'predictions.csv'}"
          + (f"; maps: {args.out / 'cam'}" if settings.cam else ""))
    for label, loc in report.localisation.items():
        acc = ", ".join(f"T(IoU)={t}: {v:.2f}" for t, v in loc["accuracy"].items() if v is not None)
        print(f"  {label}: localisation accuracy {acc}; avg false positives at 0.5: {loc['average_false_positives']['0.5']:.2f}")
    if report.failed:
        print(f"{len(report.failed)} image(s) could not be read: "
              + ", ".join(b["slide_id"] for b in report.failed[:10]), file=sys.stderr)
    return EXIT_SLIDES_FAILED if report.failed else EXIT_OK
