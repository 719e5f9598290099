"""`wsi-mil demo`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import DefaultsFormatter, add_output_options, add_settings, default_workers, settings_of, setup_logging
from wsi_mil.config import DemoConfig
from wsi_mil.runtime import prefer_passive_omp

NAME = "demo"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (DemoConfig, "demo")


def add_parser(sub: Any) -> None:
    """The ``demo`` sub-command: its flags and help."""
    demo = sub.add_parser(
        "demo", help="run the pipeline on the built-in sample cohort (offline)",
        description="Builds a small labelled cohort from the bundled real tissue, tiles it together with the "
                    "bundled real slide, embeds every patch with the offline ImageNet EfficientNet-Lite0, trains "
                    "and evaluates attention MIL, measures the attention's localisation of the planted tumour, "
                    "draws every slide's heatmaps, and prints the figures, where the outputs are and how to open "
                    "the review page. Each step writes its log and resolved settings beside its outputs. Exit "
                    "status: 0 done, 1 a step failed for some slides, 2 bad options.",
        formatter_class=DefaultsFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("wsi-mil-demo"), help="output folder")
    add_output_options(demo)
    add_settings(demo, DemoConfig, "demo")


def run(args: argparse.Namespace) -> int:
    prefer_passive_omp()
    from wsi_mil.commands.demo import run_demo

    settings_of(args, DemoConfig, "demo")
    if args.workers is None:
        args.workers = default_workers()
    setup_logging(args.verbose, args.out / "demo.log")
    sizes = {k: v for k, v in (("n_slides", args.n_slides), ("size_px", args.size)) if v is not None}
    return run_demo(out_dir=args.out, workers=args.workers, seed=args.seed, progress=not args.no_progress, **sizes)
