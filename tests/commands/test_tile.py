"""`wsi-mil tile` end to end: bad input, stores, caching, Dask scheduler, SIGKILL resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import WSI_MIL
from wsi_mil.commands.tile import run_tile
from wsi_mil.config import TileConfig
from wsi_mil.data.manifest import read_manifest
from wsi_mil.io.slide import open_slide
from wsi_mil.io.store import PatchStore
from wsi_mil.tiling.grid import PatchGeometry
from wsi_mil.tiling.patches import read_patch


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(WSI_MIL + args, capture_output=True, text=True, timeout=300, **kw)


def test_batch_continues_past_bad_slides_and_reports_each(tmp_path, cmu_slide, kidney_slide, truncated_slide) -> None:
    (tmp_path / "notes.svs").write_text("not a slide")
    Image.new("RGB", (3000, 2000), (243, 242, 240)).save(tmp_path / "glass.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "slide_id,path,patient_id,mpp\n"
        f"cmu,{cmu_slide},p1,\n"
        f"kidney-no-mpp,{kidney_slide},p2,\n"
        f"kidney,{kidney_slide},p2,0.5\n"
        f"cut-copy,{truncated_slide},p3,\n"
        f"missing,{tmp_path / 'missing.svs'},p4,\n"
        f"notes,{tmp_path / 'notes.svs'},p5,\n"
        f"glass,{tmp_path / 'glass.png'},p6,0.5\n"
    )
    out = tmp_path / "out"
    proc = _run(["tile", str(manifest), "--out", str(out), "--workers", "2", "--no-progress"])
    assert proc.returncode == 1, proc.stderr  # some slides failed
    report = json.loads((out / "run_report.json").read_text())
    status = {s["slide_id"]: s for s in report["slides"]}
    assert {k: v["status"] for k, v in status.items()} == {
        "cmu": "ok", "kidney-no-mpp": "failed", "kidney": "no_tissue", "cut-copy": "failed",
        "missing": "failed", "notes": "failed", "glass": "no_tissue",
    }
    assert "--slide-mpp" in status["kidney-no-mpp"]["message"]
    assert "the file is truncated" in status["cut-copy"]["message"]
    assert "past the end of the file" in status["cut-copy"]["message"]
    assert "not found" in status["missing"]["message"] and "not a slide" in status["notes"]["message"]
    assert status["cmu"]["n_patches"] > 20 and status["cmu"]["mpp_source"] == "metadata"
    assert status["kidney"]["mpp_source"] == "manifest"
    for sid in ("cmu", "kidney-no-mpp", "missing"):
        assert sid in proc.stdout  # the printed table lists every slide
    for sid in ("kidney", "glass", "kidney-no-mpp"):  # each message once in the printed report (was twice, and logged)
        assert proc.stdout.count(status[sid]["message"][:60]) == 1, proc.stdout
    assert Path(status["cmu"]["qc_png"]).exists()
    with PatchStore(out / "patches" / "cmu.h5") as store:
        attrs = store.attrs
        assert attrs["mpp_source"] == "metadata" and attrs["slide_mpp"] == pytest.approx(0.499)
        assert len(attrs["slide_fingerprint"]) == 64 and attrs["n_patches"] == len(store)
        assert "slide_sha256" not in attrs  # the whole-file hash only with --full-hash
        assert (store.tissue_fraction >= 0.5).all()
    with PatchStore(out / "patches" / "glass.h5") as store:  # zero-patch store, so re-runs skip it
        assert len(store) == 0
    again = _run(["tile", str(manifest), "--out", str(out), "--workers", "1", "--no-progress"])
    report2 = json.loads((out / "run_report.json").read_text())
    assert {s["slide_id"]: s["status"] for s in report2["slides"]}["cmu"] == "cached", again.stderr


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_saved_patches_equal_direct_reads(tmp_path, cohort, fmt) -> None:
    entries = read_manifest(cohort)[:1]
    config = TileConfig(save_patches=True, format=fmt, chunk_patches=7, mpp=1.0, patch_size=128)
    report = run_tile(entries, out_dir=tmp_path, config=config, workers=2, progress=False)
    (outcome,) = report.outcomes
    assert outcome.status == "ok" and outcome.n_patches > 20
    with PatchStore(outcome.store) as store, open_slide(entries[0].path) as slide:
        assert store.has_patches and len(store) == outcome.n_patches
        a = store.attrs
        geom = PatchGeometry.from_store_attrs(a)
        for i in (0, len(store) // 2, len(store) - 1):
            x, y = store.coords[i]
            direct = read_patch(slide, x_px=int(x), y_px=int(y), geometry=geom).astype(int)
            assert np.abs(store.patch(i).astype(int) - direct).mean() < 3


def test_changed_settings_are_refused_unless_overwrite(tmp_path, cmu_slide) -> None:
    out = tmp_path / "o"
    assert _run(["tile", str(cmu_slide), "--out", str(out), "--workers", "1", "--no-progress"]).returncode == 0
    proc = _run(["tile", str(cmu_slide), "--out", str(out), "--patch-size", "128", "--workers", "1", "--no-progress"])
    assert proc.returncode == 1 and "--overwrite" in proc.stdout
    message = json.loads((out / "run_report.json").read_text())["slides"][0]["message"]
    assert "changed: patch_size 256 -> 128" in message  # the store records its settings: the message names the change
    proc = _run(["tile", str(cmu_slide), "--out", str(out), "--patch-size", "128", "--overwrite", "--workers", "1", "--no-progress"])
    assert proc.returncode == 0
    with PatchStore(out / "patches" / "cmu-1-small-region.h5") as store:
        assert store.attrs["patch_size_px"] == 128


def test_store_from_the_old_default_tissue_mpp_matches_again_with_tissue_mpp_8(tmp_path, cmu_slide) -> None:
    """Stores of an earlier wsi-mil record no settings and were tiled at the old default
    --tissue-mpp 8: a re-run at the new default is refused with a message that says so,
    and --tissue-mpp 8 finds them cached again."""
    import h5py

    out = tmp_path / "o"
    base = ["tile", str(cmu_slide), "--out", str(out), "--workers", "1", "--no-progress"]
    assert _run(base + ["--tissue-mpp", "8"]).returncode == 0
    with h5py.File(out / "patches" / "cmu-1-small-region.h5", "r+") as f:  # as an earlier wsi-mil wrote it
        del f.attrs["tile_settings"]
    proc = _run(base)
    message = json.loads((out / "run_report.json").read_text())["slides"][0]["message"]
    assert proc.returncode == 1 and "match again with --tissue-mpp 8" in message
    proc = _run(base + ["--tissue-mpp", "8"])
    report = json.loads((out / "run_report.json").read_text())
    assert proc.returncode == 0 and report["slides"][0]["status"] == "cached"


def test_existing_scheduler_gives_same_result_as_local_cluster(tmp_path, cmu_slide) -> None:
    from distributed import LocalCluster

    from wsi_mil.data.manifest import resolve_inputs

    entries = resolve_inputs([cmu_slide])
    local = run_tile(entries, out_dir=tmp_path / "local", config=TileConfig(), workers=1, progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = run_tile(entries, out_dir=tmp_path / "remote", config=TileConfig(), scheduler=cluster.scheduler_address, progress=False)
    with PatchStore(local.outcomes[0].store) as a, PatchStore(remote.outcomes[0].store) as b:
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.attrs == b.attrs


def _store_snapshot(out: Path) -> dict[str, tuple]:
    snap = {}
    for path in sorted((out / "patches").glob("*.h5")):
        with PatchStore(path) as s:
            snap[path.name] = (s.coords.tobytes(), [s.patch_jpeg(i) for i in range(len(s))], s.attrs)
    return snap


def test_sigkilled_run_resumes_to_identical_stores(tmp_path, cohort) -> None:
    args = ["tile", str(cohort), "--save-patches", "--patch-size", "64", "--workers", "1",
            "--chunk-patches", "64", "--no-progress", "-q"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(WSI_MIL + args + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((killed / "patches").glob("*.h5")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: CLI process and its Dask workers
    proc.wait()
    done_before = list((killed / "patches").glob("*.h5"))
    assert 1 <= len(done_before) < 4, "the kill must land mid-run"
    assert not (killed / "run_report.json").exists()
    resumed = _run(args + ["--out", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((killed / "run_report.json").read_text())
    assert sum(s["status"] == "cached" for s in report["slides"]) == len(done_before)
    assert not list((killed / "patches").glob("*.partial"))

    clean = tmp_path / "clean"
    assert _run(args + ["--out", str(clean)]).returncode == 0
    assert _store_snapshot(killed) == _store_snapshot(clean)


def test_threads_and_processes_give_the_same_store(tmp_path, big_slide) -> None:
    """One slide runs on threads by default (no cluster start); its strips shared by two
    threads give the same patches as a one-process Dask worker, and --full-hash records
    the whole file's SHA-256."""
    import hashlib

    runs = {"auto2": ["--workers", "2"], "procs": ["--workers", "1", "--executor", "processes", "--full-hash"]}
    stores = {}
    for name, extra in runs.items():
        proc = _run(["tile", str(big_slide), "--out", str(tmp_path / name), "--no-progress", *extra])
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / name / "run_report.json").read_text())
        assert report["executor"] == ("threads" if name == "auto2" else "processes")
        with PatchStore(tmp_path / name / "patches" / f"{big_slide.stem}.h5") as store:
            stores[name] = (store.coords, store.tissue_fraction, dict(store.attrs))
    (ca, fa, aa), (cb, fb, ab) = stores["auto2"], stores["procs"]
    assert len(ca) > 100 and np.array_equal(ca, cb) and np.array_equal(fa, fb)
    assert aa["tissue_area_mm2"] == ab["tissue_area_mm2"] and aa["slide_fingerprint"] == ab["slide_fingerprint"]
    for key in ("stain_haematoxylin", "stain_eosin", "tissue_lightness", "tissue_a", "tissue_b"):  # the tissue's colour
        assert np.isfinite(aa[key]) and aa[key] == ab[key]
    assert ab["slide_sha256"] == hashlib.sha256(big_slide.read_bytes()).hexdigest() and "slide_sha256" not in aa
    bad = _run(["tile", str(big_slide), "--out", str(tmp_path / "bad"), "--executor", "threads",
                "--scheduler", "tcp://127.0.0.1:1", "--no-progress"])
    assert bad.returncode == 2 and "leave out --scheduler" in bad.stderr


def test_store_from_an_earlier_tissue_method_is_kept_with_a_notice(tmp_path, cmu_slide) -> None:
    """A store written by an earlier tissue-detection method (no or another
    tissue_method_version) is still a valid cache, but the re-run says so and names
    --overwrite; --overwrite re-tiles it with the current method."""
    import h5py

    from wsi_mil.tiling.tissue import TISSUE_METHOD_VERSION

    out = tmp_path / "t"
    args = ["tile", str(cmu_slide), "--out", str(out), "--no-progress"]
    assert _run(args).returncode == 0
    store = out / "patches" / f"{cmu_slide.stem}.h5"
    with PatchStore(store) as s:
        assert s.attrs["tissue_method_version"] == TISSUE_METHOD_VERSION
    again = _run(args)
    assert again.returncode == 0 and "earlier tissue-detection method" not in again.stdout + again.stderr
    with h5py.File(store, "r+") as f:  # as a store from wsi-mil before the version was recorded
        del f.attrs["tissue_method_version"]
    old = _run(args)
    report = json.loads((out / "run_report.json").read_text())
    assert old.returncode == 0 and report["slides"][0]["status"] == "cached"
    assert "earlier tissue-detection method (version 1, now" in report["slides"][0]["message"]
    assert "--overwrite" in old.stderr
    redo = _run(args + ["--overwrite"])
    report = json.loads((out / "run_report.json").read_text())
    assert redo.returncode == 0 and report["slides"][0]["status"] == "ok"
    with PatchStore(store) as s:
        assert s.attrs["tissue_method_version"] == TISSUE_METHOD_VERSION


def test_non_finite_settings_are_refused_naming_the_option(tmp_path, cmu_slide) -> None:
    """--tissue-mpp inf used to reach the thumbnail planner and fail the slide with an
    OverflowError; every non-finite number is now refused before any slide is read."""
    from wsi_mil.errors import ConfigError

    for option, value in (("--tissue-mpp", "inf"), ("--mpp", "nan"), ("--slide-mpp", "-inf")):
        proc = _run(["tile", str(cmu_slide), "--out", str(tmp_path / "t"), "--no-progress", f"{option}={value}"])
        assert proc.returncode == 2 and f"{option} must be a finite number" in proc.stderr, proc.stderr
        assert not (tmp_path / "t" / "patches").exists()
    with pytest.raises(ConfigError, match="--min-tissue-area-um2 must be a finite number"):
        TileConfig(min_tissue_area_um2=float("inf"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_qc_image_that_cannot_be_written_leaves_no_store(tmp_path, cmu_slide, workers) -> None:
    """The QC image is written on a helper thread while the store is written (2 workers) or
    before it (1): either way a slide whose QC cannot be written fails and leaves no store,
    so the re-run redoes it instead of finding it cached without its QC."""
    out = tmp_path / "o"
    blocker = out / "qc" / f"{cmu_slide.stem}.png"
    blocker.mkdir(parents=True)  # a folder where the QC file goes: the atomic rename onto it fails
    args = ["tile", str(cmu_slide), "--out", str(out), "--workers", workers, "--no-progress"]
    proc = _run(args)
    report = json.loads((out / "run_report.json").read_text())
    assert proc.returncode == 1 and report["slides"][0]["status"] == "failed", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not any((out / "patches").iterdir())  # neither a finished store nor a .partial
    blocker.rmdir()
    proc = _run(args)
    report = json.loads((out / "run_report.json").read_text())
    assert proc.returncode == 0 and report["slides"][0]["status"] == "ok" and blocker.is_file()


def test_slides_waiting_for_their_pixels_keep_their_coordinates_on_disk_not_in_the_driver(tmp_path, cohort,
                                                                                         monkeypatch) -> None:
    """With --save-patches the driver held every slide's coordinates until the pixel phase (2 GB at 10,000
    slides): they wait in mapped files beside the stores, which the run removes; the stores are unchanged."""
    import wsi_mil.commands.tile as tile_cmd

    entries = read_manifest(cohort)[:2]
    seen: list[tuple[str, bool, bool]] = []
    real = tile_cmd._pixel_phase

    def watched(client, plans, config, stores_dir, outcomes, progress):
        for p in plans:
            seen.append((p.slide_id, isinstance(p.coords_px, np.memmap), isinstance(p.tissue_fraction, np.memmap)))
        return real(client, plans, config, stores_dir, outcomes, progress)

    monkeypatch.setattr(tile_cmd, "_pixel_phase", watched)
    config = TileConfig(save_patches=True, chunk_patches=16, mpp=2.0, patch_size=128)
    report = run_tile(entries, out_dir=tmp_path / "px", config=config, workers=1, progress=False)
    assert report.ok and seen == [(e.slide_id, True, True) for e in entries]
    assert not (tmp_path / "px" / "patches" / tile_cmd.PLANS_DIR).exists()
    coords_only = run_tile(entries, out_dir=tmp_path / "xy", config=TileConfig(mpp=2.0, patch_size=128), workers=1,
                           progress=False)
    for a, b in zip(report.outcomes, coords_only.outcomes, strict=True):
        with PatchStore(a.store) as sa, PatchStore(b.store) as sb:
            assert sa.has_patches and len(sa) == len(sb) > 0
            np.testing.assert_array_equal(sa.coords, sb.coords)
            np.testing.assert_array_equal(sa.tissue_fraction, sb.tissue_fraction)


def test_tiling_for_an_encoder_takes_its_resolution_and_says_when_told_another(tmp_path, cmu_slide) -> None:
    """--encoder makes the encoder's training resolution the default --mpp (CTransPath: 1.0 µm/px), records
    the resolution used (not the encoder: a store tiled at 1.0 without it is the same store), warns when a
    given --mpp differs, and refuses an encoder without a recorded resolution unless --mpp is given."""
    out = tmp_path / "o"
    base = ["tile", str(cmu_slide), "--out", str(out), "--workers", "1", "--no-progress"]
    proc = _run(base + ["--encoder", "ctranspath"])
    assert proc.returncode == 0, proc.stderr
    assert "trained at" not in proc.stderr
    with PatchStore(out / "patches" / "cmu-1-small-region.h5") as store:
        assert store.attrs["tile_settings"]["mpp"] == 1.0
    proc = _run(base + ["--mpp", "1.0"])
    assert proc.returncode == 0 and "up to date (every slide already tiled with these settings)" in proc.stderr
    proc = _run(base + ["--encoder", "uni", "--mpp", "1.0"])
    assert proc.returncode == 0 and "for encoder uni, which was trained at 0.5 µm/px" in proc.stderr, proc.stderr
    proc = _run(["tile", str(cmu_slide), "--out", str(tmp_path / "x"), "--encoder", "efficientnet_lite0"])
    assert proc.returncode == 2 and "training resolution is not recorded; give --mpp" in proc.stderr
    proc = _run(["tile", str(cmu_slide), "--out", str(tmp_path / "y"), "--encoder", "no_such_encoder"])
    assert proc.returncode == 2 and "no_such_encoder" in proc.stderr and not (tmp_path / "y").exists()
    assert TileConfig().mpp == 0.5 and TileConfig(encoder="uni").mpp == 0.5 and TileConfig(encoder="ctranspath").mpp == 1.0
