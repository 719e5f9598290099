"""`wsi-mil train-mil`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

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
from wsi_mil.config import TrainConfig

NAME = "train-mil"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (TrainConfig, "train_mil")


def add_parser(sub: Any) -> None:
    """The ``train-mil`` sub-command: its flags and help."""
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
    tr.add_argument("--list-models", action="store_true", help="print the registered MIL models and exit")
    add_overwrite_option(tr)
    add_output_options(tr)
    add_settings(tr, TrainConfig, "train_mil")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.config import TrainConfig

    if args.list_models:
        from wsi_mil.mil import available
        from wsi_mil.mil.models import model_settings

        for name, desc in available().items():
            own = ", ".join(f"{k}={d}" for k, (_, d) in model_settings(name).items())
            print(f"{name:14s} {desc}" + (f"\n{'':14s} --model-options (defaults): {own}" if own else ""))
        return EXIT_OK
    require(args, "train-mil", manifest="MANIFEST", features="--features", out="--out")
    from wsi_mil.commands.train_mil import prepare_inputs, run_train, summary_text
    setup_logging(args.verbose)
    config = settings_of(args, TrainConfig, "train_mil")
    # every check of the manifest, the labels and the feature stores comes before the run folder
    inputs = prepare_inputs(args.manifest, args.features, config, progress=not args.no_progress)
    from wsi_mil.train.runner import run_record

    claim_output(args, run_record("train-mil", config, inputs))  # type: ignore[arg-type]
    setup_logging(args.verbose, args.out / "train.log")
    args.inputs = [args.manifest]
    write_resolved_config(args.out / "train_config.yaml", config, args, "train_mil",
                           {"features": [str(f) for f in args.features]})
    report = run_train(args.manifest, args.features, out_dir=args.out, config=config, progress=not args.no_progress,
                       inputs=inputs)
    print(summary_text(report))
    return EXIT_OK
