"""`wsi-mil train-image`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    add_output_options,
    add_overwrite_option,
    add_settings,
    require,
    settings_of,
    train_from_source,
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
    require(args, "train-image", source="SOURCE", out="--out")
    from wsi_mil.commands.train_image import prepare_image_inputs, run_train_image

    return train_from_source(args, settings_of(args, ImageTrainConfig, "train_image"), "train_image", prepare_image_inputs, run_train_image)
