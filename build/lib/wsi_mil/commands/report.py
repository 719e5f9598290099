"""Pieces shared by the batch commands' run reports: status counts, tables, failure messages."""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

from wsi_mil.errors import WsiMilError


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts


def format_table(rows: Sequence[Sequence[str]], problems: Sequence[str] = ()) -> str:
    """Left-aligned columns under a dashed rule (``rows[0]`` is the header), then the full
    text of every problem, which the table's note column only starts."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if problems:
        lines += ["", "problems (full messages):"] + [f"  {p}" for p in problems]
    return "\n".join(lines)


def note_of(message: str | None, width: int = 90) -> tuple[str, bool]:
    """A table's note for ``message`` and whether its full text goes to the problems list:
    a message that fits is shown once, in the table; a longer one once, below it (the table
    pointing there), not both."""
    if not message:
        return "", False
    if "\n" not in message and len(message) <= width:
        return message, False
    return "(full message below)", True


def failure_message(exc: BaseException, expected: tuple[type[BaseException], ...] = (WsiMilError,)) -> str:
    """Expected errors speak for themselves; anything else keeps its type and the last
    frame, for the bug report."""
    if isinstance(exc, expected):
        return str(exc)
    from wsi_mil.io.atomic import is_disk_full

    if is_disk_full(exc):
        return f"the disk is full (no space left on the output device): {exc}"
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
    return f"unexpected {type(exc).__name__}: {exc}{where}"


def still_reported(path: Path, now: dict[str, str], same: dict[str, set[str]], key: str = "slides") -> bool:
    """Whether the report at ``path`` already tells what a run that found everything done
    would: the same items (``now``: id -> this run's status) and, for each, a status that
    ``same`` maps this run's status to (the store a run made, "ok", is the one found now,
    "cached"), nothing failed or left out. Then the report is left as it was: a re-run
    that changes nothing rewrites nothing."""
    import json

    try:
        old = json.loads(Path(path).read_text())
        rows = {str(r["slide_id"]): str(r["status"]) for r in old[key]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if old.get("skipped_inputs") or set(rows) != set(now):
        return False
    return all(rows[i] in same.get(s, set()) for i, s in now.items())
