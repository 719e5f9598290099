"""`wsi-mil import-features`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    DefaultsFormatter,
    add_output_options,
    add_settings,
    settings_of,
    setup_logging,
)
from wsi_mil.config import ImportFeaturesConfig

NAME = "import-features"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (ImportFeaturesConfig, "import_features")


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
    add_output_options(im)
    add_settings(im, ImportFeaturesConfig, "import_features")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.import_features import run_import

    setup_logging(args.verbose)
    settings = settings_of(args, ImportFeaturesConfig, "import_features")
    report = run_import(args.source, args.out, fmt=settings.format, encoder=settings.encoder,
                        patch_size_level0=settings.patch_size_level0,
                        clam_patches=Path(settings.clam_patches) if settings.clam_patches else None, mpp=settings.mpp,
                        progress=not args.no_progress)
    print(f"{len(report['imported'])} imported, {len(report['kept'])} already imported, {len(report['failed'])} failed; "
          f"encoder {report['encoder']}; stores: {args.out / 'features'}")
    for f in report["failed"]:
        print(f"FAILED {f['slide_id']}: {f['error']}")
    return EXIT_OK if not report["failed"] else EXIT_SLIDES_FAILED
