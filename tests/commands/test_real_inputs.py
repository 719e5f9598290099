"""Slide files of other formats and folders as users have them (issue 11, items 6 and 9):
a DICOM whole-slide image is one series of files and one slide; folder scans skip
sidecars and list them; an unsupported file is not called corrupt."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WSI_MIL
from wsi_mil.data.manifest import resolve_inputs_reporting


@pytest.fixture(scope="module")
def dicom_wsi(tmp_path_factory, cmu_slide) -> Path:
    """The real CMU slide converted to a DICOM WSI series (one file per pyramid level) by
    wsidicomizer, decoded through OpenSlide; returns the series folder."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    from wsidicomizer.extras.openslide.openslide_source import OpenSlideSource

    out = tmp_path_factory.mktemp("dicom") / "CMU-1-dicom"
    wsidicomizer.WsiDicomizer.convert(cmu_slide, out, include_label=False, include_overview=False,
                                      preferred_source=OpenSlideSource, add_missing_levels=True)
    return out


def _tile(tmp_path: Path, *inputs: Path | str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "tiles"
    res = subprocess.run(WSI_MIL + ["tile", *map(str, inputs), "--out", str(out), "--workers", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    report = json.loads((out / "run_report.json").read_text()) if (out / "run_report.json").exists() else {}
    return res, report


def test_a_dicom_series_folder_is_one_slide(dicom_wsi, tmp_path, cmu_slide) -> None:
    files = sorted(dicom_wsi.glob("*.dcm"))
    assert len(files) >= 3  # one file per level
    import pydicom

    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    resolved = resolve_inputs_reporting([dicom_wsi])
    # named by its series, not by its folder (which many exports call DICOM/)
    assert [e.slide_id for e in resolved.entries] == [uid] and not resolved.skipped
    # the same files given one by one (a shell glob) are still one slide
    assert len(resolve_inputs_reporting(files).entries) == 1
    # .dicom is a DICOM suffix too
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in files:
        shutil.copy(f, renamed / (f.stem + ".dicom"))
    assert [e.slide_id for e in resolve_inputs_reporting([renamed]).entries] == [uid]

    res, report = _tile(tmp_path, dicom_wsi)
    assert res.returncode == 0, res.stderr[-2000:]
    assert report["counts"] == {"ok": 1} and report["slides"][0]["slide_id"] == uid
    # the same tissue as the SVS it was converted from
    _, report2 = _tile(tmp_path / "svs", cmu_slide)
    assert abs(report["slides"][0]["n_patches"] - report2["slides"][0]["n_patches"]) <= 2
    assert report["slides"][0]["mpp"] == pytest.approx(0.499, abs=1e-3)


def test_two_series_in_one_folder_are_two_slides_and_non_wsi_dicom_is_skipped(dicom_wsi, tmp_path, cmu_slide) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path / "mixed"
    folder.mkdir()
    uid = generate_uid()
    for f in dicom_wsi.glob("*.dcm"):
        shutil.copy(f, folder / f.name)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / ("copy-" + f.name))
    ct = pydicom.dcmread(next(dicom_wsi.glob("*.dcm")), stop_before_pixels=True)
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ct.save_as(folder / "ct.dcm", enforce_file_format=False)
    resolved = resolve_inputs_reporting([folder])
    assert len(resolved.entries) == 2 and len({e.slide_id for e in resolved.entries}) == 2
    assert [Path(s["path"]).name for s in resolved.skipped] == ["ct.dcm"]
    assert "not a whole-slide image" in resolved.skipped[0]["reason"]


def test_folder_scan_skips_masks_and_sidecars_and_lists_them(tmp_path, cohort) -> None:
    """The generator's own folder: slides, <slide>.tumour.png masks, <slide>.json, manifest.csv."""
    folder = cohort.parent
    resolved = resolve_inputs_reporting([folder])
    names = {e.path.name for e in resolved.entries}
    assert names and all(n.endswith(".tiff") for n in names)
    skipped = {Path(s["path"]).name for s in resolved.skipped}
    assert any(n.endswith(".tumour.png") for n in skipped) and "manifest.csv" in skipped
    res, report = _tile(tmp_path, folder)
    assert res.returncode == 0, res.stderr[-2000:]  # the masks used to be tiled as slides and fail
    assert len(report["slides"]) == len(names)
    assert {Path(s["path"]).name for s in report["skipped_inputs"]} == skipped
    assert "not slides and were skipped" in res.stdout


def test_unsupported_dicom_is_not_called_corrupt(tmp_path, dicom_wsi) -> None:
    """A DICOM WSI OpenSlide cannot read: its ImageType has two values, and OpenSlide
    answers "Couldn't get image flavor" (seen on real files) - not damage."""
    import pydicom

    from wsi_mil.errors import SlideOpenError
    from wsi_mil.io.slide import open_slide

    folder = tmp_path / "flavourless"
    folder.mkdir()
    for f in dicom_wsi.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.save_as(folder / f.name)
    with pytest.raises(SlideOpenError) as info, open_slide(next(folder.glob("*.dcm"))):
        pass
    msg = str(info.value)
    assert "Couldn't get image flavor" in msg and "cannot read this variant" in msg
    assert "truncated" not in msg and "damaged or" not in msg
    res, report = _tile(tmp_path, folder)
    assert res.returncode == 1 and "Couldn't get image flavor" in report["slides"][0]["message"]
    assert "--mpp-override" not in res.stderr


def test_truncated_slide_is_still_called_truncated(truncated_slide) -> None:
    from wsi_mil.errors import SlideOpenError
    from wsi_mil.io.slide import open_slide

    with pytest.raises(SlideOpenError, match="the file is truncated: .* past the end of the file"), \
            open_slide(truncated_slide):
        pass


def test_dicom_slides_in_folders_of_one_name_keep_their_own_ids(dicom_wsi, tmp_path) -> None:
    """Two patients' exports both in a folder called DICOM/, and a lone file of each: before,
    both slides were named "DICOM" (refused as two inputs of one name, or, tiled in two runs
    into one --out, the second replaced the first's store)."""
    import pydicom
    from pydicom.uid import generate_uid

    ids = []
    for patient in ("p1", "p2"):
        folder = tmp_path / patient / "DICOM"
        folder.mkdir(parents=True)
        uid = generate_uid()
        for f in dicom_wsi.glob("*.dcm"):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = uid
            ds.save_as(folder / f.name)
        ids.append(uid)
    resolved = resolve_inputs_reporting([tmp_path / "p1" / "DICOM", tmp_path / "p2" / "DICOM"])
    assert sorted(e.slide_id for e in resolved.entries) == sorted(ids)
    lone = tmp_path / "lone" / "DICOM"
    lone.mkdir(parents=True)
    biggest = max(dicom_wsi.glob("*.dcm"), key=lambda p: p.stat().st_size)
    shutil.copy(biggest, lone / "IM000123.dcm")
    assert [e.slide_id for e in resolve_inputs_reporting([lone / "IM000123.dcm"]).entries] == ["IM000123"]


def test_a_dicom_of_tissue_to_its_edges_is_not_called_tinted_glass(tmp_path, cmu_slide) -> None:
    """A region of the real CMU slide exported tissue to its edges, as a DICOM series
    (wsidicomizer): there is no glass at the edge, so no "not white glass" or "mask covers
    93%" warning; the slide is tiled and an INFO line says why its colours were not checked.
    (The wrong-colour case that warning exists for stays flagged: tests/tiling/test_stains.py.)"""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    import openslide
    import tifffile
    from wsidicomizer.extras.openslide.openslide_source import OpenSlideSource

    with openslide.OpenSlide(str(cmu_slide)) as s:
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        mpp = float(s.properties["openslide.mpp-x"])
    crop = np.ascontiguousarray(rgb[2300:2967, 500:1500])  # tissue everywhere, the edges included
    tif = tmp_path / "region.tif"
    with tifffile.TiffWriter(tif) as tw:
        tw.write(crop, tile=(256, 256), photometric="rgb", compression="jpeg", resolution=(1e4 / mpp, 1e4 / mpp),
                 resolutionunit="CENTIMETER")
    series = tmp_path / "DICOM"
    wsidicomizer.WsiDicomizer.convert(tif, series, include_label=False, include_overview=False,
                                      preferred_source=OpenSlideSource, add_missing_levels=True)
    res, report = _tile(tmp_path, series)
    assert res.returncode == 0, res.stderr
    assert report["counts"] == {"ok": 1}
    assert "not white glass" not in res.stderr + res.stdout
    assert "which is rare on a real slide" not in res.stderr + res.stdout
    assert "tissue reaches the image's edges" in res.stderr
