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
                    "--prefix wsi_mil/review/web. The reviewer marks each slide agree / disagree / uncertain "
                    "(a comment, a corrected label) and draws regions (a missed lesion, a false-positive hot "
                    "spot, an artefact): saved in the run's review/ folder (verdicts.csv, regions/<slide>.geojson "
                    "for tile --annotations), never replaced without the page asking. --apply-verdicts writes a "
                    "manifest with the corrected labels for the next run. Exit status: 0 stopped with Ctrl-C, 2 "
                    "bad options or nothing to review.",
        formatter_class=DefaultsFormatter,
    )
    rv.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                    help="train-mil run folder, predict output folder, or attention .h5 files")
    rv.add_argument("--heatmaps", type=Path, default=None,
                    help="heatmap folder whose exports to offer (default: INPUT/heatmaps when it exists)")
    rv.add_argument("--slides", type=Path, default=None, metavar="MANIFEST", help="manifest CSV giving slide paths")
    rv.add_argument("--review-dir", type=Path, default=None,
                    help="where verdicts and drawn regions are saved (default: the run folder's review/)")
    rv.add_argument("--apply-verdicts", type=Path, default=None, nargs=2, metavar=("MANIFEST", "OUT"),
                    help="write OUT: MANIFEST with each slide's label replaced by the corrected label of its latest "
                         "verdict (and OUT's .changes.csv listing them), then exit; no server")
    add_output_options(rv)
    add_settings(rv, ReviewConfig, "review")


def run(args: argparse.Namespace) -> int:
    from wsi_mil.review.server import ReviewSite, make_server

    config = settings_of(args, ReviewConfig, "review")
    setup_logging(args.verbose)
    if args.apply_verdicts:
        from wsi_mil.review.server import default_review_dir
        from wsi_mil.review.verdicts import corrected_manifest

        folder = args.review_dir or default_review_dir(args.inputs)
        if not (folder / "verdicts.csv").is_file():
            from wsi_mil.errors import ConfigError

            raise ConfigError(f"{folder / 'verdicts.csv'}: no verdicts saved yet (review the run first, or give "
                              "--review-dir)")
        manifest, out = args.apply_verdicts
        changes = corrected_manifest(manifest, folder / "verdicts.csv", out)
        print(f"{out}: {len(changes)} label(s) corrected (listed in {out.with_name(out.stem + '.changes.csv')})")
        return EXIT_OK
    heatmaps = args.heatmaps
    if heatmaps is None and len(args.inputs) == 1 and (args.inputs[0] / "heatmaps").is_dir():
        heatmaps = args.inputs[0] / "heatmaps"
    site = ReviewSite(args.inputs, slides_manifest=args.slides, heatmaps=heatmaps, normalise=args.normalise,
                      cmap=args.cmap, review_dir=args.review_dir, reviewer=config.reviewer)
    for problem in site.problems:
        print(f"skipped {problem}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can see these slides", file=sys.stderr)
    server = make_server(site, host=args.host, port=args.port)
    host, port = (str(v) for v in server.server_address[:2])
    print(f"reviewing {len(site.slides)} slide(s) as {site.review.reviewer}: open http://{host}:{port}/ in a browser "
          f"(Ctrl-C stops); verdicts and regions go to {site.review.folder}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        site.close()
    return EXIT_OK
