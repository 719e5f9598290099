"""`wsi-mil synth`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import EXIT_OK, DefaultsFormatter, add_output_options, add_settings, settings_of, setup_logging
from wsi_mil.config import SynthConfig

NAME = "synth"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (SynthConfig, "synth")


def add_parser(sub: Any) -> None:
    """The ``synth`` sub-command: its flags and help."""
    synth = sub.add_parser(
        "synth", help="generate a labelled cohort of realistic pyramidal slides from real tissue",
        description="Build pyramidal JPEG-tiled TIFF slides by laying out real H&E tissue on glass, planting "
                    "tumour regions (from a different real tissue source) in a fraction of them, with a "
                    "ground-truth mask and a manifest CSV. Exit status: 0 written, 2 bad options.",
        formatter_class=DefaultsFormatter,
    )
    synth.add_argument("--out", required=True, type=Path, help="output folder for slides, masks and manifest.csv")
    add_output_options(synth)
    add_settings(synth, SynthConfig, "synth")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.io.atomic import ensure_writable
    from wsi_mil.synth.cohort import make_cohort

    setup_logging(args.verbose)
    settings_of(args, SynthConfig, "synth")  # bad options: no folder made
    ensure_writable(args.out)
    manifest = make_cohort(args.out, n_slides=args.n_slides, preset=args.preset, positive_fraction=args.positive_fraction,
                           size_px=args.size, mpp=args.mpp, seed=args.seed,
                           tumour_size_um=args.tumour_size_um,
                           progress=not args.no_progress)
    print(f"cohort of {args.n_slides} slides in {args.out}; manifest: {manifest}")
    return EXIT_OK
