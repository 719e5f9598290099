"""`wsi-mil review`: the sub-command's flags, help and what it runs (the work itself: `wsi_mil.commands`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from wsi_mil.cli.common import (
    EXIT_OK,
    DefaultsFormatter,
    add_output_options,
    add_settings,
    settings_of,
    setup_logging,
)
from wsi_mil.config import ReviewConfig

NAME = "review"
#: the settings this command takes (its flags, recipe section, help and checks come from them)
SETTINGS = (ReviewConfig, "review")


def add_parser(sub: Any) -> None:
    """The ``review`` sub-command: its flags and help."""
    rv = sub.add_parser(
        "review", help="local web page to review a run's attention over the slides (127.0.0.1)",
        description="Serve a review page: each slide in a deep-zoom viewer (tiles cut by OpenSlide from the "
                    "slide's pyramid; never its label or macro image), the attention heatmap over it with an "
                    "opacity control, the top patches as a list that jumps to them, the prediction, and the "
                    "run's slides to move between. Only the run's slides and exports are reachable, and only "
                    "requests naming the bound host are answered. Needs the page's front-end packages: npm ci "
                    "--prefix wsi_mil/review/web. Exit status: 0 stopped with Ctrl-C, 2 bad options or nothing "
                    "to review.",
        formatter_class=DefaultsFormatter,
    )
    rv.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                    help="train-mil run folder, predict output folder, or attention .h5 files")
    rv.add_argument("--heatmaps", type=Path, default=None,
                    help="heatmap folder whose exports to offer (default: INPUT/heatmaps when it exists)")
    rv.add_argument("--slides", type=Path, default=None, metavar="MANIFEST", help="manifest CSV giving slide paths")
    add_output_options(rv)
    add_settings(rv, ReviewConfig, "review")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.review.server import ReviewSite, make_server

    settings_of(args, ReviewConfig, "review")
    setup_logging(args.verbose)
    heatmaps = args.heatmaps
    if heatmaps is None and len(args.inputs) == 1 and (args.inputs[0] / "heatmaps").is_dir():
        heatmaps = args.inputs[0] / "heatmaps"
    site = ReviewSite(args.inputs, slides_manifest=args.slides, heatmaps=heatmaps, normalise=args.normalise,
                      cmap=args.cmap)
    for problem in site.problems:
        print(f"skipped {problem}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can see these slides", file=sys.stderr)
    server = make_server(site, host=args.host, port=args.port)
    host, port = (str(v) for v in server.server_address[:2])
    print(f"reviewing {len(site.slides)} slide(s): open http://{host}:{port}/ in a browser (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        site.close()
    return EXIT_OK
