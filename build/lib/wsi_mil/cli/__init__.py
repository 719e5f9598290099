"""`wsi-mil` entry point. One module per sub-command in this package
(``wsi_mil/cli/<verb>.py``: its flags, help and the call of its work in
:mod:`wsi_mil.commands`); what they share is :mod:`wsi_mil.cli.common`. A new verb is
one new module here plus its line in ``VERBS``. Heavy imports happen inside commands,
so that ``--help`` is quick."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from wsi_mil import __version__
from wsi_mil.cli import (
    audit,
    demo,
    evaluate,
    extract_features,
    heatmap,
    import_features,
    predict,
    predict_image,
    predict_volume,
    review,
    synth,
    tile,
    train_image,
    train_mil,
    train_volume,
)
from wsi_mil.cli.common import EXIT_OK, EXIT_SLIDES_FAILED, EXIT_USAGE, remove_refused_output, set_command
from wsi_mil.cli.common import setup_logging as _setup_logging  # (tests reset the logging through it)

__all__ = ["EXIT_OK", "EXIT_SLIDES_FAILED", "EXIT_USAGE", "VERBS", "_setup_logging", "build_parser", "entry", "main"]

#: the sub-commands, in the order ``wsi-mil --help`` lists them
VERBS = (tile, extract_features, import_features, train_mil, train_image, train_volume, predict_volume, predict_image, predict, evaluate,
         heatmap, audit, review, synth, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-mil", description="Weakly supervised whole-slide image classification (MIL).")
    parser.add_argument("--version", action="version", version=f"wsi-mil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from wsi_mil.errors import WsiMilError

    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "no_progress") and (args.verbose == 0 or os.environ.get("TQDM_DISABLE", "").strip().lower()
                                         in ("1", "true", "yes")):
        args.no_progress = True  # tqdm reads TQDM_DISABLE only where no one passes disable= (every bar here does)
    commands = {verb.NAME: verb.run for verb in VERBS}
    from wsi_mil.io.lock import release_all

    set_command(args.command)
    out = getattr(args, "out", None)
    fresh = out is not None and not Path(out).exists()
    try:
        return commands[args.command](args)
    except WsiMilError as exc:
        print(f"wsi-mil {args.command}: error: {exc}", file=sys.stderr)
        if exc.exit_code == EXIT_USAGE:  # refused: the folder is left as it was found
            release_all(remove_made=True)
            if fresh and out is not None:
                remove_refused_output(Path(out))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished slides are kept and a re-run resumes", file=sys.stderr)
        return 130
    finally:
        release_all()  # the folder is free for the next command (the process's end would free it too)


def entry() -> None:
    """The ``wsi-mil`` program: :func:`main`, then an exit that skips the interpreter's
    final clean-up. Every output is written and closed by then (atomically); what is left
    is the C libraries' own tear-down, where OpenSlide, after failing to open some DICOM
    variants, now and then crashed the finished process (SIGSEGV at exit under load:
    2 in 20 runs seen), turning a correct exit status into -11."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

