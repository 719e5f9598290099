"""`wsi-mil heatmap`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsi_mil.cli import common
from wsi_mil.cli.common import (
    EXIT_OK,
    EXIT_SLIDES_FAILED,
    EXIT_USAGE,
    DefaultsFormatter,
    add_output_options,
    add_settings,
    settings_of,
    setup_logging,
)
from wsi_mil.config import HeatmapSettings

NAME = "heatmap"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (HeatmapSettings, "heatmap")


def add_parser(sub: Any) -> None:
    """The ``heatmap`` sub-command: its flags and help."""
    hm = sub.add_parser(
        "heatmap", help="attention heatmaps for review: PNG overlay, pyramidal TIFF, QuPath GeoJSON, patch gallery",
        description="Draw each slide's stored attention (train-mil / predict outputs; no re-tiling, no "
                    "re-extraction) as: overlay.png (thumbnail + heatmap + colour bar + prediction), heatmap.tif "
                    "(pyramidal TIFF with the slide's level-0 size and mpp: open it in QuPath/OpenSlide next to "
                    "the slide), patches.geojson (QuPath: File > Import objects; tiles with attention "
                    "measurements) and gallery.jpg (top/bottom patches). A train-mil run folder gives every "
                    "slide its out-of-fold map. Finer maps: tile with --overlap 0.5 (about 4x the extraction "
                    "time), extract, predict, then draw; --smooth-um blurs at no extraction cost. Exit status: "
                    "0 all drawn, 1 some slides failed, 2 bad options.",
        formatter_class=DefaultsFormatter,
    )
    hm.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                    help="train-mil run folder, predict output folder, or attention .h5 files")
    hm.add_argument("--out", type=Path, default=None, help="output folder (default: INPUT/heatmaps for one folder)")
    hm.add_argument("--slides", type=Path, default=None, metavar="MANIFEST",
                    help="manifest CSV giving slide paths (default: the paths recorded in the feature stores)")
    hm.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786): one task per slide on "
                                        "its workers, which must see the stores, slides and --out at the same paths "
                                        "(default: a few threads of this process)")
    hm.add_argument("--overwrite", action="store_true",
                    help="redraw slides already drawn with the same settings; --out holding the heatmaps of other "
                         "attention (another run or prediction) is refused without it, and cleared first with it")
    add_output_options(hm)
    add_settings(hm, HeatmapSettings, "heatmap")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.commands.heatmap import run_heatmap

    settings = settings_of(args, HeatmapSettings, "heatmap")  # bad settings: refused before any folder
    if args.out is None:
        if len(args.inputs) != 1 or not args.inputs[0].is_dir():
            print("wsi-mil heatmap: error: give --out when the input is not one folder", file=sys.stderr)
            return EXIT_USAGE
        args.out = args.inputs[0] / "heatmaps"
    from wsi_mil.commands.heatmap import attention_sources, claim_heatmap_folder
    from wsi_mil.io.lock import lock_folder

    setup_logging(args.verbose)
    attention_sources(args.inputs)  # inputs without attention: refused before any folder is made
    lock_folder(args.out, common.current_command())
    claim_heatmap_folder(args.inputs, args.out, overwrite=args.overwrite)  # before its log is written there
    setup_logging(args.verbose, args.out / "heatmap.log")
    report = run_heatmap(args.inputs, out_dir=args.out, settings=settings, slides_manifest=args.slides,
                         overwrite=args.overwrite, progress=not args.no_progress, scheduler=args.scheduler)
    print(report.table())
    print(f"\nheatmaps of {len(report.outcomes)} slide(s) in {args.out} ({report.seconds:.1f} s); index: {args.out / 'index.json'}")
    return EXIT_OK if report.ok else EXIT_SLIDES_FAILED
