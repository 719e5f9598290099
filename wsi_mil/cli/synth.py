"""`wsi-mil synth`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil import choices
from wsi_mil.choices import described, names
from wsi_mil.cli.common import EXIT_OK, DefaultsFormatter, add_output_options, setup_logging

NAME = "synth"


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
    synth.add_argument("--n-slides", type=int, default=8, help="number of slides")
    synth.add_argument("--positive-fraction", type=float, default=0.5, help="fraction of slides with tumour")
    synth.add_argument("--size", type=int, default=8192, help="slide side in level-0 pixels")
    synth.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px written in the metadata")
    synth.add_argument("--preset", choices=names(choices.SYNTH_PRESETS), default="balanced",
                       help=(described(choices.SYNTH_PRESETS) + ". The cohort's README.md tabulates classes against "
                             "sources and sites").replace("%", "%%"))
    synth.add_argument("--tumour-size-um", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="tumour region diameter range (default: the preset's)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same cohort)")
    add_output_options(synth)


def run(args: argparse.Namespace) -> int:
    from wsi_mil.io.atomic import ensure_writable
    from wsi_mil.synth.cohort import cohort_settings, make_cohort

    setup_logging(args.verbose)
    cohort_settings(args.preset, n_slides=args.n_slides, positive_fraction=args.positive_fraction, size_px=args.size,
                    mpp=args.mpp, tumour_size_um=args.tumour_size_um, tumour_regions=None)  # bad options: no folder made
    ensure_writable(args.out)
    manifest = make_cohort(args.out, n_slides=args.n_slides, preset=args.preset, positive_fraction=args.positive_fraction,
                           size_px=args.size, mpp=args.mpp, seed=args.seed,
                           tumour_size_um=args.tumour_size_um,
                           progress=not args.no_progress)
    print(f"cohort of {args.n_slides} slides in {args.out}; manifest: {manifest}")
    return EXIT_OK
