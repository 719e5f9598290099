"""One running command per output folder: a second run into a folder another run is
writing is refused at once naming its PID (before: two tile runs with different --mpp both
reported success with one run's stores among the other's); a lock left by a run killed
with kill -9 does not block the next run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.cli import main

HOLD = """
import sys, time
from pathlib import Path
from wsi_mil.io.lock import lock_folder
lock_folder(Path(sys.argv[1]), "tile")
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_ones_lock_is_taken_over(
        tmp_path: Path, cmu_slide: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiles"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another wsi-mil run is writing the folder
        code = main(["tile", str(cmu_slide), "--out", str(out), "--mpp", "1.0", "--no-progress", "-q"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"is being written by another wsi-mil run (PID {holder.pid}" in err and "wsi-mil tile" in err
        assert not (out / "patches").exists() and not (out / "tile.log").exists()  # nothing of this run
    finally:
        holder.send_signal(signal.SIGKILL)  # killed as with kill -9: the kernel releases its lock
        holder.wait()
    assert main(["tile", str(cmu_slide), "--out", str(out), "--no-progress", "-q"]) == 0
    assert json.loads((out / "run_report.json").read_text())["counts"] == {"ok": 1}
