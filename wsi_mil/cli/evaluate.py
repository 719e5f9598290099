"""`wsi-mil evaluate`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    DefaultsFormatter,
    add_output_options,
    add_overwrite_option,
    add_settings,
    claim_output,
    predict_record,
    settings_of,
    setup_logging,
)
from wsi_mil.config import EvaluateConfig

NAME = "evaluate"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (EvaluateConfig, "evaluate")


def add_parser(sub: Any) -> None:
    """The ``evaluate`` sub-command: its flags and help."""
    ev = sub.add_parser(
        "evaluate", help="judge a trained run on an external, labelled cohort: discrimination, calibration, "
                         "threshold transfer, subgroups and a shift check",
        description="Predict every slide of MANIFEST with the fold ensemble of a train-mil run (the checks of "
                    "predict: same encoder, resolution and transforms; a train-image or train-volume run: every image "
                    "or volume, as predict-image / predict-volume do) and judge the predictions against the "
                    "manifest's labels: the task's metrics with intervals beside the run's development figure, "
                    "calibration (calibration-in-the-large, intercept, slope, reliability plot), the development "
                    "threshold's sensitivity / specificity beside one chosen again on this cohort, subgroups "
                    "(--subgroups), operating points and every error, and a shift check against the development "
                    "cohort (a domain classifier on the slide embeddings; stain, tissue area, patch count and "
                    "scanner resolution compared), warning about the largest shift. Slides the run was developed on "
                    "are refused. Writes report.md, evaluation.json, predictions.csv, reliability.png, errors.csv "
                    "(binary runs) and attention/ (slides: for heatmap). Exit status: 0 all evaluated, 1 some slides could not be "
                    "predicted (listed), 2 bad options or inputs.",
        formatter_class=DefaultsFormatter,
    )
    ev.add_argument("run", type=Path, help="output folder of train-mil, train-image or train-volume")
    ev.add_argument("manifest", type=Path, help="the external cohort with the run's label column(s): a slide manifest "
                                                "CSV (train-mil), an image or volume manifest CSV or MedMNIST .npz "
                                                "(train-image, train-volume)")
    ev.add_argument("--features", type=Path, action="append", default=None,
                    help="features/ folder of the cohort's slides (extract-features with the run's encoder; "
                         "repeatable; train-mil runs only)")
    ev.add_argument("--development-features", type=Path, action="append", default=None,
                    help="features/ folder of the run's development slides, when they moved since training "
                         "(default: the folders the run recorded; repeatable)")
    ev.add_argument("--out", required=True, type=Path, help="output folder")
    add_overwrite_option(ev)
    add_output_options(ev)
    add_settings(ev, EvaluateConfig, "evaluate")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.evaluate import run_evaluate

    setup_logging(args.verbose)
    settings = settings_of(args, EvaluateConfig, "evaluate")
    claim_output(args, predict_record(args, {"subgroups": settings.subgroups, "prevalence": settings.prevalence,
                                             "bootstrap": settings.bootstrap, "seed": settings.seed},
                                      [args.manifest, *(args.features or [])]))
    setup_logging(args.verbose, args.out / "evaluate.log")
    ev = run_evaluate(args.run, args.manifest, list(args.features or []), out_dir=args.out, subgroups=settings.subgroups,
                      n_boot=settings.bootstrap, seed=settings.seed, device=settings.device,
                      development_features=args.development_features, prevalence=settings.prevalence)
    r = ev.result
    from wsi_mil.data.bags import Task

    kind = Task.from_dict(r["task"]).kind_obj
    dev = (r.get("development") or {}).get("metrics") or {}
    print(f"external evaluation of {args.run} on {r['n']} {r.get('unit', 'slide')}(s)"
          + (f" ({len(ev.failed)} not predicted)" if ev.failed else ""))
    print(f"  this cohort:{kind.summary_line(r['metrics'])}")
    if dev:
        print(f"  development ({r['development'].get('set')}):{kind.summary_line(dev)}")
    for name, cal in (r.get("calibration") or {}).items():
        slope = cal.get("calibration_slope")
        print(f"  calibration{' of ' + name if len(r['calibration']) > 1 else ''}: in-the-large "
              f"{cal['calibration_in_the_large']:+.3f}, slope " + (f"{slope:.2f}" if slope is not None else "not defined"))
    dc = ((r.get("shift") or {}).get("domain_classifier") or {})
    if dc.get("auc") is not None:
        print(f"  shift: domain classifier AUC {dc['auc']:.3f} (0.5: alike)")
    for w in r["warnings"]:
        print(f"WARNING: {w}")
    for n in r["notes"]:
        print(f"note: {n}")
    print(f"report: {args.out / 'report.md'}")
    return EXIT_OK if not ev.failed else EXIT_SLIDES_FAILED
