"""What every sub-command shares: exit codes, the generated ``--flag`` per settings field,
logging to the console and the command's log file, the output folder's claim and lock."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_SLIDES_FAILED, EXIT_USAGE = 0, 1, 2
logger = logging.getLogger("wsi_mil")

_held: logging.handlers.MemoryHandler | None = None
_command = "?"  # the running command, recorded in the output folder's lock


def set_command(name: str) -> None:
    """The command this process runs (recorded in the locks of the folders it writes)."""
    global _command
    _command = name


def current_command() -> str:
    return _command


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows an option's default once: not when its help already says it, nor for flags
    and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default" in text or "default:" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, help and default taken from the field."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options (also settable in a YAML recipe)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f.metadata.get("help", "")
        if "(default" not in help_text and default is not None:
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")  # (argparse formats help with %)
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
        choices = f.metadata.get("choices")
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is tuple:  # several values: --formats png tiff
            element = typing.get_args(base)[0]
            group.add_argument(flag, dest=f.name, type=element, default=None, nargs=f.metadata.get("nargs", "+"),
                               metavar=f.metadata.get("metavar") or ("{" + ",".join(choices) + "}" if choices
                                                                     else f.name.upper()), help=help_text)
        else:
            # the choices are checked by build_config, with the message a recipe's value gets too
            group.add_argument(flag, dest=f.name, type=typing.cast("typing.Callable[[str], Any]", base), default=None,
                               metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(), help=help_text)


def add_settings(parser: argparse.ArgumentParser, cls: type, section: str) -> None:
    """A command's settings: ``--config RECIPE`` (its ``section``) and one flag per field of
    ``cls`` (type, choices, help and default from the field)."""
    parser.add_argument("--config", type=Path, help=f"YAML recipe whose '{section}:' section sets these options (see "
                                                     "pipelines/); flags override it")
    add_config_options(parser, cls)


def settings_of(args: argparse.Namespace, cls: type, section: str) -> Any:
    """The command's settings: the recipe's section, then the flags given, checked (exit 2)."""
    from wsi_mil.config import build_config, load_recipe

    recipe = load_recipe(args.config, section) if args.config else None
    settings = build_config(cls, recipe=recipe, overrides=config_overrides(args, cls))
    for f in dataclasses.fields(cls):  # the resolved values, as the command reads them
        setattr(args, f.name, getattr(settings, f.name))
    return settings


def train_from_source(args: argparse.Namespace, config: Any, section: str, prepare: Any, train: Any) -> int:
    """train-image / train-volume after their settings: every check that can refuse the run
    (manifest, labels, unreadable inputs, duplicates across the splits) by ``prepare``, before
    the run folder and before any feature is computed; then the run folder, its log and
    resolved settings, and ``train``."""
    from wsi_mil.train.runner import run_record, summary_text

    setup_logging(args.verbose)
    prepared = prepare(args.source, config, progress=not args.no_progress)
    claim_output(args, run_record(args.command, config, prepared[0]))
    setup_logging(args.verbose, args.out / "train.log")
    args.inputs = [args.source]
    write_resolved_config(args.out / "train_config.yaml", config, args, section, {})
    report = train(args.source, out_dir=args.out, config=config, progress=not args.no_progress, prepared=prepared)
    print(summary_text(report))
    return EXIT_OK


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def setup_logging(verbose: int, log_file: Path | None = None) -> None:
    """Console logging at the verbosity asked for, and the command's log file; the log
    file's folder (the command's --out) is checked writable first (exit 2 if not)."""
    from wsi_mil.logs import file_handler

    global _held
    if log_file is not None:  # the folder's lock first: a second run must not even open the log
        from wsi_mil.io.lock import lock_folder

        lock_folder(log_file.parent, _command)
    handler = file_handler(log_file) if log_file is not None else None
    root = logging.getLogger("wsi_mil")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(console)
    capture_warnings([console] + ([handler] if handler is not None else []))
    if handler is not None:
        root.addHandler(handler)
        if _held is not None:  # what was logged while the inputs were checked, before the run folder existed
            _held.setTarget(handler)
            _held.flush()
            _held.close()
            _held = None
    else:  # held until the command's log file exists (or dropped when the command is refused)
        _held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        _held.setLevel(logging.DEBUG)
        root.addHandler(_held)


def capture_warnings(handlers: list[logging.Handler]) -> None:
    """Python warnings raised by libraries (pydicom, tifffile ...) go through the command's
    log like its own: one line, `WARNING:` first, in the log file too (not a raw
    `file.py:12: UserWarning` line with a source line below it)."""
    import warnings

    def one_line(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
        return f"{category.__name__}: {message} ({Path(filename).name}:{lineno})"

    warnings.formatwarning = one_line  # type: ignore[assignment]
    logging.captureWarnings(False)  # re-installed each time: an earlier command in this process may have left it
    logging.captureWarnings(True)
    caught = logging.getLogger("py.warnings")
    caught.handlers.clear()
    caught.propagate = False
    for h in handlers:
        caught.addHandler(h)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds another run (other settings or inputs): remove that run's files first and "
                             "start again (without it such a folder is refused: one folder holds one run; the same "
                             "run resumes)")


def claim_output(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Make --out the folder of the run ``record`` describes (:mod:`wsi_mil.io.run_folder`:
    a folder of another run is refused, or with --overwrite cleared first), holding its
    lock first so that a second run can neither clear nor mark a folder in use; called
    before anything is written into it."""
    from wsi_mil.io.lock import lock_folder
    from wsi_mil.io.run_folder import claim

    lock_folder(args.out, _command)
    state = claim(args.out, record, overwrite=args.overwrite)
    if state != "new":
        logger.info("%s: %s", args.out, "the same run: resuming" if state == "resumed"
                    else "the earlier run's files were removed (--overwrite)")


def predict_record(args: argparse.Namespace, settings: dict[str, Any], sources: list[Path]) -> dict[str, Any]:
    """A prediction's identity: its settings, the run it applies (by that run's identity)
    and its inputs."""
    from wsi_mil.io.run_folder import identity, input_record, read_run

    made = read_run(args.run)
    return identity(args.command, settings, {"run": made["identity"] if made else str(Path(args.run).resolve()),
                                             "sources": [input_record(p) for p in sources]})


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Progress and log verbosity, the same for every batch command."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (also hidden by -q and by TQDM_DISABLE=1 in the environment)")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more log output (-vv for debug; default: info)")
    parser.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose", help="only warnings and errors")


def require(args: argparse.Namespace, command: str, **needed: str) -> None:
    """Arguments that are required unless a listing flag is given."""
    from wsi_mil.errors import ConfigError

    missing = [flag for name, flag in needed.items() if not getattr(args, name)]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} "
                          f"(see wsi-mil {command} --help)")


def write_resolved_config(path: Path, config: Any, args: argparse.Namespace,
                           section: str = "tile", extra: dict[str, Any] | None = None) -> None:
    from wsi_mil.config import write_settings

    if extra is None:
        extra = {"workers": args.workers, "scheduler": args.scheduler}
    write_settings(path, args.command, args.inputs, section, config.to_dict(), extra)


def remove_refused_output(out: Path) -> None:
    """A refused command (exit 2) leaves no output folder behind: the folder this command
    made is removed when it holds nothing but the command's own log and settings files."""
    from wsi_mil.io.lock import LOCK_NAME

    root = logging.getLogger("wsi_mil")
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    if all(p.is_file() and (p.suffix == ".log" or p.name.endswith("_config.yaml") or p.name in ("run.json", LOCK_NAME))
           for p in entries):
        for p in entries:
            p.unlink()
        out.rmdir()
