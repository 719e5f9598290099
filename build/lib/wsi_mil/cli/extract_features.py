"""`wsi-mil extract-features`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    add_output_options,
    add_settings,
    require,
    settings_of,
    setup_logging,
    write_resolved_config,
)
from wsi_mil.config import ExtractConfig
from wsi_mil.runtime import prefer_passive_omp

NAME = "extract-features"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (ExtractConfig, "extract_features")


def add_parser(sub: Any) -> None:
    """The ``extract-features`` sub-command: its flags and help."""
    ext = sub.add_parser(
        "extract-features", help="embed the tiled patches with a frozen encoder into feature stores",
        description="Read each slide's patches (from the slide by coordinates, or the pixels saved by "
                    "`tile --save-patches`) in background reader processes, embed them with a frozen encoder "
                    "(default: ImageNet EfficientNet-Lite0, offline) and write one feature store per slide "
                    "(features + coords, CLAM-compatible HDF5 or Zarr) under OUT/features/. Work is saved in "
                    "chunks: a killed run resumes mid-slide. Exit status: 0 all slides done, 1 some failed, "
                    "2 bad options.",
    )
    ext.add_argument("inputs", nargs="*", metavar="INPUT", help="tile output folders (with patches/), folders of patch stores, or store files")
    ext.add_argument("--out", type=Path, help="output folder (features/, features_report.json, extract.log); required")
    ext.add_argument("--slides", type=Path, action="append", default=[], help="folder holding the slides, when they moved since tiling (repeatable)")
    ext.add_argument("--overwrite", action="store_true", help="replace existing feature stores (needed to switch encoder)")
    ext.add_argument("--list-encoders", action="store_true", help="print the registered encoders and exit")
    ext.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786): shard the slides over its "
                                         "workers (one per GPU with `dask worker ADDR --resources GPU=1`, else per CPU "
                                         "worker) instead of the local devices; the workers must see the same files")
    add_output_options(ext)
    add_settings(ext, ExtractConfig, "extract_features")


def run(args: argparse.Namespace) -> int:
    prefer_passive_omp()
    from wsi_mil.commands.extract_features import run_extract
    from wsi_mil.config import ExtractConfig
    if args.list_encoders:
        from wsi_mil.encoders import available

        for name, desc in available().items():
            print(f"{name:24s} {desc}")
        return EXIT_OK
    require(args, "extract-features", inputs="INPUT (a tile output folder)", out="--out")
    setup_logging(args.verbose)
    config = settings_of(args, ExtractConfig, "extract_features")
    from wsi_mil.encoders.registry import check_encoder_name

    check_encoder_name(config.encoder)  # a name that names nothing: refused before the folder is made
    from wsi_mil.io.run_folder import refuse_foreign_data_folder

    refuse_foreign_data_folder(args.out, "extract-features")
    setup_logging(args.verbose, args.out / "extract.log")
    write_resolved_config(args.out / "extract_config.yaml", config, args, "extract_features",
                           {"slides": [str(s) for s in args.slides], "scheduler": args.scheduler})
    report = run_extract(args.inputs, out_dir=args.out, config=config, overwrite=args.overwrite,
                         slide_dirs=args.slides, progress=not args.no_progress, scheduler=args.scheduler)
    print(report.table())
    d = report.to_dict()
    rate = f", {d['patches_per_s']:.1f} patches/s while embedding" if d["patches_per_s"] else ""
    print(f"\n{len(report.outcomes)} slide(s): {d['counts']}; {d['n_features']} features "
          f"({report.encoder['encoder']}, {report.encoder['dim']}-d) in {report.seconds:.1f} s{rate}")
    print(f"feature stores: {args.out / 'features'}   report: {args.out / 'features_report.json'}")
    if not report.ok:
        print(f"some slides failed; see the messages above and {args.out / 'extract.log'}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_SLIDES_FAILED
