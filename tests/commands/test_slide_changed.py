"""A slide rewritten in place after tiling (same size, other content) is noticed: its
modification time moved, so its content is sampled again (before: its stale store was
reported "cached" and the slide "ok")."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from wsi_mil.cli import main


def test_a_slide_rewritten_in_place_is_not_taken_from_the_cache(tmp_path: Path, cmu_slide: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    slide = tmp_path / "slide.svs"
    shutil.copy(cmu_slide, slide)
    out = tmp_path / "tiles"
    assert main(["tile", str(slide), "--out", str(out), "--no-progress", "-q"]) == 0
    # only touched (a copy tool that resets times): the content is sampled again and still matches
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 5_000_000_000))
    store = next((out / "patches").glob("*.h5"))
    stamp = store.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["tile", str(slide), "--out", str(out), "--no-progress"]) == 0
    # the table of this run says cached (the report of the run that tiled it stays: nothing was redone)
    assert re.search(r"^slide\s+cached\b", capsys.readouterr().out, re.MULTILINE)
    assert store.stat().st_mtime_ns == stamp
    # rewritten in place, same size: a run of bytes in the middle of the file changed (a bad copy, a re-export)
    data = bytearray(slide.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 65536] = bytes(65536)
    slide.write_bytes(bytes(data))
    assert slide.stat().st_size == cmu_slide.stat().st_size
    capsys.readouterr()
    assert main(["tile", str(slide), "--out", str(out), "--no-progress"]) == 1
    row = json.loads((out / "run_report.json").read_text())["slides"][0]
    assert row["status"] == "failed" and "changed since it was tiled (same size, other content" in row["message"]
    assert "--overwrite" in row["message"]
    assert main(["tile", str(slide), "--out", str(out), "--no-progress", "-q", "--overwrite"]) in (0, 1)
    assert json.loads((out / "run_report.json").read_text())["slides"][0]["status"] != "cached"
