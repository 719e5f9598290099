"""`wsi-mil import-features`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import EXIT_OK, EXIT_SLIDES_FAILED, DefaultsFormatter, add_output_options, setup_logging

NAME = "import-features"


def add_parser(sub: Any) -> None:
    """The ``import-features`` sub-command: its flags and help."""
    im = sub.add_parser(
        "import-features", help="turn CLAM or TRIDENT patch-feature h5 files into wsi-mil feature stores",
        description="Read the patch features another tool wrote (CLAM's h5_files/<slide>.h5: features + coords, "
                    "no attributes; TRIDENT's features_<encoder>/<slide>.h5: coords with patch_size_level0) and "
                    "write wsi-mil feature stores to OUT/features/, which train-mil, predict, evaluate and heatmap "
                    "read. Each file is checked: rows of features and coordinates agree, features are finite, the "
                    "coordinates lie on the grid of the patch size. The encoder comes from the file or TRIDENT's "
                    "folder name, else --encoder (required for CLAM: its files do not record it); where it came "
                    "from is recorded in each store. Exit status: 0 all imported, 1 some files failed (listed), "
                    "2 bad options.",
        formatter_class=DefaultsFormatter,
    )
    im.add_argument("source", type=Path, help="folder of feature h5 files (CLAM: h5_files/; TRIDENT: features_<encoder>/)")
    im.add_argument("--out", required=True, type=Path, help="output folder (stores go to OUT/features/)")
    im.add_argument("--format", choices=("auto", "clam", "trident"), default="auto",
                    help="layout of the files (auto: TRIDENT when the coords carry patch_size_level0, else CLAM)")
    im.add_argument("--encoder", default=None,
                    help="the encoder that made the features (required when the files do not say it: CLAM); "
                         "refused when it contradicts what a file records")
    im.add_argument("--clam-patches", type=Path, default=None,
                    help="CLAM's patches/ folder: each slide's patch size and level are read from it (CLAM's "
                         "feature files do not carry them)")
    im.add_argument("--patch-size-level0", type=float, default=None,
                    help="patch side in level-0 pixels, when no patch file gives it")
    im.add_argument("--mpp", type=float, default=None,
                    help="µm per pixel the patches were read at (recorded; predict then checks new slides against it)")
    add_output_options(im)


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.import_features import run_import
    from wsi_mil.errors import ConfigError

    setup_logging(args.verbose)
    if args.patch_size_level0 is not None and args.patch_size_level0 <= 0:
        raise ConfigError("--patch-size-level0 must be positive")
    if args.mpp is not None and args.mpp <= 0:
        raise ConfigError("--mpp must be positive")
    report = run_import(args.source, args.out, fmt=args.format, encoder=args.encoder,
                        patch_size_level0=args.patch_size_level0, clam_patches=args.clam_patches, mpp=args.mpp,
                        progress=not args.no_progress)
    print(f"{len(report['imported'])} imported, {len(report['kept'])} already imported, {len(report['failed'])} failed; "
          f"encoder {report['encoder']}; stores: {args.out / 'features'}")
    for f in report["failed"]:
        print(f"FAILED {f['slide_id']}: {f['error']}")
    return EXIT_OK if not report["failed"] else EXIT_SLIDES_FAILED
