"""Paths recorded in stores and indexes so that a run works from any folder and after
its output tree is moved.

Each recorded path is written twice: absolute (``key``) and relative to the folder of the
file that records it (``key_rel``). Reading tries the relative one first (it survives
moving the whole tree), then the absolute one (it survives moving only the recording
file), then — for stores written before the relative form existed — the value as given,
relative to the current folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def path_record(key: str, target: str | Path, base_dir: str | Path) -> dict[str, str]:
    """``{key: absolute path, key_rel: path relative to base_dir}`` of ``target``."""
    target_abs = Path(target).resolve()
    try:
        rel = os.path.relpath(target_abs, Path(base_dir).resolve())
    except ValueError:  # another drive (Windows)
        rel = str(target_abs)
    return {key: str(target_abs), f"{key}_rel": Path(rel).as_posix()}


def resolve_recorded(attrs: dict[str, Any], key: str, base_dir: str | Path) -> Path | None:
    """The existing file or folder that ``attrs`` records under ``key`` (see the module
    docstring for the order), or None when none of the candidates exists."""
    rel, value = (str(attrs.get(k) or "none") for k in (f"{key}_rel", key))  # stores keep None as "none"
    candidates = ([Path(base_dir) / rel] if rel != "none" else []) + ([Path(value)] if value != "none" else [])
    return next((c for c in candidates if c.exists()), None)
