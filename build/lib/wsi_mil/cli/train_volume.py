"""`wsi-mil train-volume`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

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
from wsi_mil.config import VolumeTrainConfig

NAME = "train-volume"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (VolumeTrainConfig, "train_volume")


def add_parser(sub: Any) -> None:
    """The ``train-volume`` sub-command: its flags and help."""
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
    add_overwrite_option(tv)
    add_output_options(tv)
    add_settings(tv, VolumeTrainConfig, "train_volume")


def run(args: argparse.Namespace) -> int:
    require(args, "train-volume", source="SOURCE", out="--out")
    from wsi_mil.commands.train_volume import prepare_volume_inputs, resolve_intensity, run_train_volume

    config = settings_of(args, VolumeTrainConfig, "train_volume")
    config = resolve_intensity(config, args.source)  # the mode --intensity auto stands for, recorded as such
    config.prep()  # spacing / window checked before anything is read
    return train_from_source(args, config, "train_volume", prepare_volume_inputs, run_train_volume)
