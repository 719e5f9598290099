"""Log files: one format for every command's log beside its outputs (the demo's steps too)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

LOGGER = "wsi_mil"


def file_handler(path: Path) -> logging.Handler:
    """A DEBUG-level handler writing to ``path``; its folder is created and checked
    writable first (:func:`wsi_mil.io.atomic.ensure_writable`: read-only or full disks
    are a clear error before any work starts)."""
    from wsi_mil.io.atomic import ensure_writable

    ensure_writable(path.parent)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


@contextlib.contextmanager
def step_log(path: Path) -> Iterator[None]:
    """Everything wsi-mil logs while the block runs also goes to ``path``."""
    handler = file_handler(path)
    root = logging.getLogger(LOGGER)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
