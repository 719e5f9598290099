"""One running command per output folder.

Two runs writing one folder at once mixed their outputs (two ``tile`` runs with different
``--mpp``: 13 of one run's stores were the other's, both reported success). The first
command to write into a folder takes an exclusive lock on ``<folder>/.wsi-mil.lock``
(``flock``: the kernel releases it when the process ends, so a run killed with ``kill -9``
leaves no stale lock behind); a second command is refused at once, naming the process
that holds it. The lock is held until the process exits.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

LOCK_NAME = ".wsi-mil.lock"
_held: dict[Path, Any] = {}  # folder -> open lock file (kept open: closing it would release the lock)
_created: set[Path] = set()  # lock files this process made (a refused command removes them again)
_before: dict[Path, str] = {}  # what a lock file it did not make said before (a refused command puts it back)


def lock_folder(folder: Path, command: str) -> None:
    """Take ``folder``'s lock for this process (a no-op when it already holds it); raise
    :class:`ConfigError` naming the holder when another process does."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _held:
        return
    from wsi_mil.io.atomic import ensure_writable

    ensure_writable(folder)  # a read-only or full disk: its clear error, before the lock file
    path = folder / LOCK_NAME
    made = not path.exists()
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except ValueError:
            holder = {}
        fh.close()
        who = (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, wsi-mil {holder.get('command', '?')} "
               f"started {holder.get('started', '?')}")
        raise ConfigError(f"{folder} is being written by another wsi-mil run ({who}); two runs into one folder would "
                          "mix their outputs. Wait for it to finish, or choose another --out") from None
    _held[folder] = fh
    if made:
        _created.add(path)
    try:  # who holds it, for the message a second run gets (the lock itself needs no bytes: a full disk is fine)
        fh.seek(0)
        if not made:
            _before[path] = fh.read()
            fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        fh.flush()
    except OSError:
        pass


def release_all(*, remove_made: bool = False) -> None:
    """Release every lock this process holds (a process's exit does it anyway);
    ``remove_made``: a refused command also removes the lock files it made and puts back
    what the others said, so that a folder it was refused in is left as it was found."""
    import fcntl

    for folder, fh in _held.items():
        path = folder / LOCK_NAME
        try:
            if remove_made and path in _created:  # while still held: no other run can be using it
                path.unlink(missing_ok=True)
            elif remove_made and path in _before:  # the last run's record, as it was
                fh.seek(0)
                fh.truncate()
                fh.write(_before[path])
                fh.flush()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()
    _held.clear()
    _created.clear()
    _before.clear()
