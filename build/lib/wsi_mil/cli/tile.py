"""`wsi-mil tile`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsi_mil import choices
from wsi_mil.choices import described, names
from wsi_mil.cli.common import (
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    add_output_options,
    add_settings,
    default_workers,
    logger,
    settings_of,
    setup_logging,
    write_resolved_config,
)
from wsi_mil.config import TileConfig
from wsi_mil.errors import ConfigError

NAME = "tile"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (TileConfig, "tile")


def add_parser(sub: Any) -> None:
    """The ``tile`` sub-command: its flags and help."""
    tile = sub.add_parser(
        "tile", help="find tissue and extract patch coordinates (and optionally pixels) from slides",
        description="Find tissue on each slide and write one patch store per slide (coordinates in level-0 "
                    "pixels, optional JPEG pixels), a QC PNG per slide and a run report. Finished slides are "
                    "skipped on re-run; an interrupted run resumes. Exit status: 0 all slides done, 1 some "
                    "slides failed (see the report), 2 bad options or manifest.",
    )
    tile.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files, folders of slides, or manifest CSVs (see slides_manifest/)")
    tile.add_argument("--out", required=True, type=Path, help="output folder (patches/, qc/, run_report.json, tile.log)")
    tile.add_argument("--workers", type=int, default=default_workers(),
                      help=f"worker processes of the local Dask cluster, or threads with --executor threads (default: {default_workers()})")
    tile.add_argument("--executor", choices=names(choices.EXECUTORS), default="auto",
                      help=described(choices.EXECUTORS) + " (default: auto)")
    tile.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786) instead of a local cluster")
    tile.add_argument("--overwrite", action="store_true", help="rebuild stores that already exist")
    tile.add_argument("--dashboard", metavar="ADDRESS", default=None,
                      help="serve Dask's dashboard at ADDRESS (e.g. :8787) while tiling (default: no dashboard)")
    add_output_options(tile)
    add_settings(tile, TileConfig, "tile")


def warn_encoder_resolution(config: TileConfig) -> bool:
    """Say when the patches are tiled at another resolution than their --encoder was trained at."""
    if config.encoder is None:
        return False
    from wsi_mil.encoders.registry import encoder_mpp

    trained = encoder_mpp(config.encoder)
    if trained is None or abs(trained - config.mpp) <= 1e-6 * trained:
        return False
    logger.warning("tiling at %g µm/px for encoder %s, which was trained at %g µm/px: its features will describe "
                   "tissue at another scale than it learned (leave --mpp out to tile at %g)", config.mpp,
                   config.encoder, trained, trained)
    return True


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import TileConfig
    from wsi_mil.data.manifest import resolve_inputs_reporting
    setup_logging(args.verbose)
    config = settings_of(args, TileConfig, "tile")
    warn_encoder_resolution(config)
    if args.workers < 1:  # (checked again by the cluster, after the folder would exist)
        raise ConfigError("--workers must be at least 1")
    resolved = resolve_inputs_reporting(args.inputs)  # a bad manifest stops here, before --out is made
    entries = resolved.entries
    from wsi_mil.io.run_folder import refuse_foreign_data_folder

    refuse_foreign_data_folder(args.out, "tile")
    setup_logging(args.verbose, args.out / "tile.log")
    write_resolved_config(args.out / "tile_config.yaml", config, args)
    logger.info("tiling %d slide(s) into %s", len(entries), args.out)
    report = run_tile(entries, out_dir=args.out, config=config, workers=args.workers, scheduler=args.scheduler,
                      overwrite=args.overwrite, progress=not args.no_progress, skipped_inputs=resolved.skipped,
                      dashboard=args.dashboard, executor=args.executor)
    print(report.table())
    d = report.to_dict()
    print(f"\n{len(entries)} slide(s): {d['counts']}; {d['n_patches']} patches in {report.seconds:.1f} s")
    print(f"stores: {args.out / 'patches'}   QC images: {args.out / 'qc'}   report: {args.out / 'run_report.json'}")
    if report.disk_full:
        full = report.disk_full
        print(f"stopped: {full['message']}. Finished stores are kept; about {full['needed_bytes'] / 1e6:.0f} MB more "
              f"are needed for the {len(full['slides_left'])} slide(s) left. Free space (or choose another --out) and "
              "run the same command again: it resumes.", file=sys.stderr)
    if not report.ok:
        print(f"{report.n_failed} slide(s) failed; see the messages above and {args.out / 'tile.log'}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_SLIDES_FAILED
