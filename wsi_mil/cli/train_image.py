"""`wsi-mil train-image`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    EXIT_OK,
    add_output_options,
    add_overwrite_option,
    add_settings,
    claim_output,
    require,
    settings_of,
    setup_logging,
    write_resolved_config,
)
from wsi_mil.config import ImageTrainConfig

NAME = "train-image"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (ImageTrainConfig, "train_image")


def add_parser(sub: Any) -> None:
    """The ``train-image`` sub-command: its flags and help."""
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
    add_overwrite_option(ti)
    add_output_options(ti)
    add_settings(ti, ImageTrainConfig, "train_image")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.config import ImageTrainConfig

    require(args, "train-image", source="SOURCE", out="--out")
    from wsi_mil.commands.train_image import prepare_image_inputs, run_train_image
    from wsi_mil.train.runner import run_record, summary_text

    config = settings_of(args, ImageTrainConfig, "train_image")
    setup_logging(args.verbose)
    # every check that can refuse the run (manifest, labels, unreadable images, duplicates across the
    # splits) comes before the run folder, and before any feature is computed
    prepared = prepare_image_inputs(args.source, config, progress=not args.no_progress)
    claim_output(args, run_record("train-image", config, prepared[0]))
    setup_logging(args.verbose, args.out / "train.log")
    args.inputs = [args.source]
    write_resolved_config(args.out / "train_config.yaml", config, args, "train_image", {})
    report = run_train_image(args.source, out_dir=args.out, config=config, progress=not args.no_progress,
                             prepared=prepared)
    print(summary_text(report))
    return EXIT_OK
