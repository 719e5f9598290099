"""Outputs on a full disk or a read-only folder (issue 11, item 10), on a real small
tmpfs mounted for the test (skipped where the test may not mount)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import WSI_MIL


@contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A real tmpfs at ``where`` for the test (skipped where the test may not mount)."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def small_disk(tmp_path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "small", "size=6m") as where:  # (the 4-slide cohort tiled with pixels: ~8 MB)
        yield where


@pytest.fixture()
def read_only(tmp_path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as where:
        yield where


def test_full_disk_stops_cleanly_keeps_finished_stores_and_resumes(cohort, small_disk) -> None:
    out = small_disk / "tiles"
    args = WSI_MIL + ["tile", str(cohort), "--out", str(out), "--save-patches", "--workers", "1", "--no-progress",
                      "--chunk-patches", "16"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])  # not a segfault (139), not a traceback
    assert "Traceback" not in res.stderr and "MB more are needed" in res.stderr
    report = json.loads((out / "run_report.json").read_text())
    assert report["disk_full"] and report["disk_full"]["needed_bytes"] > 0
    done = [s for s in report["slides"] if s["status"] == "ok"]
    left = report["disk_full"]["slides_left"]
    assert done and left and len(done) + len(left) == 4
    for s in done:  # finished stores are complete and kept
        assert Path(s["store"]).exists()
    partials = list((out / "patches").glob("*.partial"))
    assert len(partials) <= 1 and all(p.stem.removesuffix(".h5") in left for p in partials)
    # more room: the same command finishes the rest, keeping what was done
    assert subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)]).returncode == 0
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert {s["status"] for s in report["slides"]} <= {"ok", "cached"} and report["disk_full"] is None
    assert not list((out / "patches").glob("*.partial"))


@pytest.mark.parametrize("command", ["tile", "extract-features", "train-mil"])
def test_read_only_output_is_refused_at_start(read_only, cohort, command, tmp_path) -> None:
    out = read_only / "run"
    args = {"tile": ["tile", str(cohort)], "extract-features": ["extract-features", str(tmp_path)],
            "train-mil": ["train-mil", str(cohort), "--features", str(tmp_path)]}[command]
    if command == "train-mil":
        pytest.importorskip("h5py")
    res = subprocess.run(WSI_MIL + args + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    if command == "train-mil":  # the inputs are checked first: no feature stores here
        assert res.returncode in (1, 2) and "Traceback" not in res.stderr
        return
    assert res.returncode == 2, res.stderr[-2000:]
    assert "read-only file system" in res.stderr and "--out" in res.stderr and "Traceback" not in res.stderr


def test_ensure_writable_names_the_problem(read_only, tmp_path) -> None:
    from wsi_mil.errors import OutputError
    from wsi_mil.io.atomic import ensure_writable

    with pytest.raises(OutputError, match="read-only"):
        ensure_writable(read_only / "x")
    assert ensure_writable(tmp_path / "a" / "b").is_dir()


def test_extract_features_on_a_full_disk_fails_the_slide_cleanly_and_resumes(tmp_path, cmu_slide) -> None:
    tiles = tmp_path / "tiles"
    res = subprocess.run(WSI_MIL + ["tile", str(cmu_slide), "--out", str(tiles), "--workers", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    with _tmpfs(tmp_path / "tiny", "size=1m") as disk:
        args = WSI_MIL + ["extract-features", str(tiles), "--out", str(disk / "feats"), "--batch-size", "8",
                          "--readers", "1", "--no-progress"]
        res = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
        assert "is full" in res.stderr and "Traceback" not in res.stderr
        report = json.loads((disk / "feats" / "features_report.json").read_text())
        assert [s["status"] for s in report["slides"]] == ["failed"]
        assert not list((disk / "feats" / "features").glob("*.h5"))  # nothing that looks finished
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
        res = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (disk / "feats" / "features" / "cmu-1-small-region.h5").exists()
