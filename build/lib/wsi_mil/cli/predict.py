"""`wsi-mil predict`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
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
from wsi_mil.config import PredictConfig

NAME = "predict"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (PredictConfig, "predict")


def add_parser(sub: Any) -> None:
    """The ``predict`` sub-command: its flags and help."""
    pr = sub.add_parser(
        "predict", help="apply a trained run (ensemble of its fold models) to new slides' feature stores",
        description="Predict slide labels with the fold models of a train-mil run (probabilities averaged; "
                    "threshold = the mean of the folds' validation thresholds; a regression: the mean predicted "
                    "value, column predicted_<target>; survival: the mean log risk, column log_risk, and its risk "
                    "group). A run trained with --covariates needs --manifest. Writes predictions.csv, "
                    "attention/<slide>.h5 and predict_report.json. A store that cannot be read or holds "
                    "non-finite features is reported as failed, never predicted. Exit status: 0 all predicted, 1 some "
                    "stores failed, 2 bad options.",
    )
    pr.add_argument("run", type=Path, help="output folder of train-mil")
    pr.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="feature stores, or folders of them (extract-features output)")
    pr.add_argument("--out", required=True, type=Path, help="output folder")
    add_overwrite_option(pr)
    add_output_options(pr)
    add_settings(pr, PredictConfig, "predict")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.predict import run_predict

    setup_logging(args.verbose)
    settings = settings_of(args, PredictConfig, "predict")
    manifest = Path(settings.manifest) if settings.manifest else None
    claim_output(args, predict_record(args, {}, list(args.inputs) + ([manifest] if manifest else [])))
    setup_logging(args.verbose, args.out / "predict.log")
    report = run_predict(args.run, args.inputs, out_dir=args.out, device=settings.device, manifest=manifest)
    unit = "patient(s)" if report.rows and "patient_id" in report.rows[0] else "slide(s)"
    print(f"{len(report.rows)} {unit} predicted, {len(report.failed)} failed; predictions: {args.out / 'predictions.csv'}")
    return EXIT_OK if not report.failed else EXIT_SLIDES_FAILED
