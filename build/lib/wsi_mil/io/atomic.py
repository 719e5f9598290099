"""Atomic file writes: write a sibling temporary file, then ``os.replace`` it into place."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file() and not tmp.is_symlink():  # the mode a plain new file gets (safetensors writes 0600)
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _same_text(path: Path, text: str) -> bool:
    """Whether ``path`` is a plain file that already holds exactly ``text``."""
    data = text.encode("utf-8")
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically; a file that already holds it is left as it is (an
    unchanged output keeps its time, so nothing downstream takes it for new)."""
    path = Path(path)
    if _same_text(path, text):
        return path
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write dict rows as a UTF-8 CSV atomically; columns in order of first appearance."""
    import csv
    import io

    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device" (or over quota), wherever in a chain of causes
    it appears (h5py and zarr wrap the OSError)."""
    import errno

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "disk quota exceeded" in text or "errno = 28" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(folder: str | Path) -> int | None:
    import shutil

    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` (and parents) and prove it can be written, before any work starts.

    Raises:
        OutputError: read-only, permission denied, or the disk is already full; the
            message says which and what to do (exit status 2).
    """
    import errno

    from wsi_mil.errors import OutputError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".wsi-mil-write-test.{os.getpid()}"
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        if is_disk_full(exc):
            raise OutputError(f"{folder}: the disk is full ({free_bytes(folder) or 0} bytes free); free some space "
                              "or choose another --out") from exc
        reason = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
                  errno.EPERM: "is not writable (permission denied)"}.get(exc.errno or 0, f"cannot be written ({exc})")
        raise OutputError(f"output folder {folder} {reason}; choose another --out, or make it writable") from exc
    return folder


#: room kept free on the output disk: HDF5 needs some to flush and close a file cleanly
#: (a write that fails half-way leaves HDF5 in a state that can crash the process later)
SPACE_MARGIN_BYTES = 1 << 20


def check_space(folder: str | Path, need_bytes: int, what: str) -> None:
    """Raise :class:`DiskFullError` before writing ``need_bytes`` would leave less than
    :data:`SPACE_MARGIN_BYTES` free on the disk of ``folder``."""
    from wsi_mil.errors import DiskFullError

    free = free_bytes(folder)
    if free is not None and free < need_bytes + SPACE_MARGIN_BYTES:
        raise DiskFullError(f"the disk of {folder} is full: {what} needs about {_mb(need_bytes)} and "
                            f"{_mb(free)} are free")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
