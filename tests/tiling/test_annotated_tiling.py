"""Tiling with drawn regions, on the real CMU-1-Small-Region slide: --include keeps tissue inside
a hand-drawn QuPath region (its hole left out), --exclude drops a pen-mark region, each patch's
overlap with each class is stored beside the coordinates (checked against matplotlib's point-in-
polygon on a fine sampling of each patch), the file's hash is provenance and part of the cache
key, and what is wrong is refused (a misspelt class before any folder; a slide without its file
or with a region outside it fails alone, the batch goes on)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from wsi_mil.commands.tile import run_tile
from wsi_mil.config import TileConfig
from wsi_mil.data.manifest import SlideEntry
from wsi_mil.errors import ConfigError
from wsi_mil.io.store import PatchStore

TUMOUR = [[[300.5, 400.5], [1700.5, 450.5], [1600.5, 1900.5], [350.5, 1700.5], [300.5, 400.5]],
          [[800.5, 900.5], [1100.5, 900.5], [1100.5, 1200.5], [800.5, 1200.5], [800.5, 900.5]]]
PEN = [[[1000.5, 1500.5], [2220.0, 1500.5], [2220.0, 2300.5], [1000.5, 2300.5], [1000.5, 1500.5]]]


def _geojson(path: Path, features: list[tuple[str, list]]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
         "properties": {"objectType": "annotation", "classification": {"name": cls}}} for cls, rings in features]}))
    return path


def _share(rings: list, coords: np.ndarray, extent: float, n: int = 16) -> np.ndarray:
    """Each patch's share inside the first ring and outside the others, from n x n sample points (matplotlib)."""
    u = (np.arange(n) + 0.5) / n * extent
    offsets = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    pts = (coords[:, None, :] + offsets[None]).reshape(-1, 2)
    inside = MplPath(np.asarray(rings[0])).contains_points(pts)
    for hole in rings[1:]:
        inside &= ~MplPath(np.asarray(hole)).contains_points(pts)
    return inside.reshape(len(coords), -1).mean(axis=1)


def _tile(entries: list[SlideEntry], out: Path, **kw: object):
    config = TileConfig(patch_size=128, qc=False, **kw)  # type: ignore[arg-type]
    return run_tile(entries, out_dir=out, config=config, workers=1, progress=False, executor="threads")


def test_include_exclude_and_each_patchs_overlap_per_class(cmu_slide, tmp_path) -> None:
    notes = tmp_path / "annotations"
    notes.mkdir()
    file = _geojson(notes / "cmu.geojson", [("Tumor", TUMOUR), ("Pen", PEN)])
    entry = SlideEntry("cmu", cmu_slide)
    plain = _tile([entry], tmp_path / "plain")
    inside = _tile([entry], tmp_path / "inside", annotations=str(notes), include="Tumor")
    outside = _tile([entry], tmp_path / "outside", annotations=str(notes), exclude="Pen")
    assert plain.ok and inside.ok and outside.ok
    n = {name: r.outcomes[0].n_patches for name, r in (("plain", plain), ("inside", inside), ("outside", outside))}
    assert 0 < n["inside"] < n["plain"] and 0 < n["outside"] < n["plain"], n

    with PatchStore(Path(inside.outcomes[0].store)) as s:
        coords, extent, attrs = s.coords, float(s.attrs["extent_level0_px"]), s.attrs
        classes, overlap = s.annotation_overlap()
    assert classes == ["Pen", "Tumor"] and overlap.shape == (len(coords), 2)
    tumour = _share(TUMOUR, coords, extent)
    assert np.abs(overlap[:, 1] - tumour).max() < 0.1  # (a grid of an eighth of a patch against 16 x 16 points)
    assert np.abs(overlap[:, 0] - _share(PEN, coords, extent)).max() < 0.1
    # every kept patch is --min-tissue (0.5) inside the drawn tumour by its own overlap (was judged on the 16 µm/px
    # tissue grid, where a 64 µm patch kept at 0.33 inside)
    assert overlap[:, 1].min() >= 0.5 and tumour.min() > 0.4
    record = attrs["annotations"]
    assert record["include"] == ["Tumor"] and record["exclude"] == [] and record["file"] == "cmu.geojson"
    assert record["sha256"] == __import__("hashlib").sha256(file.read_bytes()).hexdigest()
    assert record["regions"] == {"Pen": 1, "Tumor": 1}

    with PatchStore(Path(outside.outcomes[0].store)) as s:
        pen = _share(PEN, s.coords, extent)
        assert s.annotation_overlap() is not None
    assert pen.max() <= 0.55  # (kept: at least half of the patch outside the pen region)
    with PatchStore(Path(plain.outcomes[0].store)) as s:
        assert s.annotation_overlap() is None and "annotations" not in s.attrs
        assert _share(PEN, s.coords, extent).max() > 0.9  # (without --exclude the pen region is tiled)

    again = _tile([entry], tmp_path / "inside", annotations=str(notes), include="Tumor")
    assert again.outcomes[0].status == "cached"
    _geojson(file, [("Tumor", [TUMOUR[0]]), ("Pen", PEN)])  # the hole redrawn away: the store is out of date
    stale = _tile([entry], tmp_path / "inside", annotations=str(notes), include="Tumor")
    assert stale.outcomes[0].status == "failed" and "annotation_sha256" in stale.outcomes[0].message
    redone = run_tile([entry], out_dir=tmp_path / "inside", config=TileConfig(patch_size=128, qc=False,
                      annotations=str(notes), include="Tumor"), overwrite=True, progress=False, executor="threads")
    assert redone.outcomes[0].n_patches > n["inside"]  # (the hole's tissue now in)


def test_a_misspelt_class_is_refused_before_any_folder_and_a_bad_slide_fails_alone(cmu_slide, tmp_path) -> None:
    notes = tmp_path / "annotations"
    notes.mkdir()
    _geojson(notes / "good.geojson", [("Tumor", TUMOUR)])
    _geojson(notes / "far.geojson", [("Tumor", [[[100, 2500], [900, 2500], [900, 3400], [100, 2500]]])])
    _geojson(notes / "typo.geojson", [("Tumor", TUMOUR), ("tumor", [PEN[0]])])
    entries = [SlideEntry(i, cmu_slide) for i in ("good", "far", "bare", "typo")]
    with pytest.raises(ConfigError, match=r"--include / --exclude Tumour: no slide's annotation file has this class; "
                                          r"the files read have Tumor"):
        _tile(entries, tmp_path / "out", annotations=str(notes), include="Tumour")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="give --annotations DIR with the slides' files, or an annotations column"):
        _tile(entries, tmp_path / "out", include="Tumor")
    assert not (tmp_path / "out").exists()
    report = _tile(entries, tmp_path / "out", annotations=str(notes), include="Tumor")
    by = {o.slide_id: o for o in report.outcomes}
    assert by["good"].status == "ok" and by["good"].n_patches > 0
    assert by["far"].status == "failed" and "far.geojson, feature 0, ring 0: the region spans" in by["far"].message
    assert by["bare"].status == "failed" and "no annotation file in" in by["bare"].message
    # (a near-miss class in one file: its regions would silently not count)
    assert by["typo"].status == "failed" and "typo.geojson, feature 1: class 'tumor' is not 'Tumor'" in by["typo"].message


def test_a_manifest_column_names_each_slides_file(cmu_slide, tmp_path) -> None:
    """The manifest's annotations column (relative to the manifest) instead of a folder; a named file that is not
    there fails its slide."""
    from wsi_mil.data.manifest import read_manifest

    (tmp_path / "drawn").mkdir()
    _geojson(tmp_path / "drawn" / "a.geojson", [("Tumor", TUMOUR)])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,path,annotations\na,{cmu_slide},drawn/a.geojson\nb,{cmu_slide},drawn/gone.geojson\n")
    entries = read_manifest(manifest)
    assert entries[0].meta["annotations"] == str(tmp_path / "drawn" / "a.geojson")
    report = _tile(entries, tmp_path / "out", include="Tumor")
    by = {o.slide_id: o for o in report.outcomes}
    assert by["a"].status == "ok" and by["a"].n_patches > 0
    assert by["b"].status == "failed" and "drawn/gone.geojson (the manifest's annotations column) is not there" in \
        by["b"].message
    with PatchStore(Path(by["a"].store)) as s:
        assert s.attrs["annotations"]["file"] == "a.geojson" and s.annotation_overlap()[0] == ["Tumor"]


def test_regions_drawn_on_glass_are_warned_about(cmu_slide, tmp_path) -> None:
    """Regions that fall inside the slide but on almost no tissue (a file drawn at half scale, or on another slide)
    are tiled, with a warning that says so."""
    notes = tmp_path / "annotations"
    notes.mkdir()
    _geojson(notes / "cmu.geojson", [("Tumor", [[[50, 100], [550, 100], [550, 900], [50, 900], [50, 100]]])])
    report = _tile([SlideEntry("cmu", cmu_slide)], tmp_path / "out", annotations=str(notes))
    assert report.outcomes[0].status == "ok" and "cmu.geojson cover almost no tissue" in report.outcomes[0].message
    _geojson(notes / "cmu.geojson", [("Tumor", TUMOUR)])
    again = _tile([SlideEntry("cmu", cmu_slide)], tmp_path / "out2", annotations=str(notes))
    assert "almost no tissue" not in again.outcomes[0].message


def test_two_sources_and_an_unreadable_only_file_are_said_plainly(cmu_slide, tmp_path) -> None:
    notes = tmp_path / "annotations"
    notes.mkdir()
    (notes / "cmu.geojson").write_text("{not json")
    with pytest.raises(ConfigError, match=r"1 slide\(s\) have no readable file, e.g. \S*/cmu.geojson: not valid JSON"):
        _tile([SlideEntry("cmu", cmu_slide)], tmp_path / "out", annotations=str(notes), include="Tumor")
    named = SlideEntry("cmu", cmu_slide, meta={"annotations": str(notes / "cmu.geojson")})
    with pytest.raises(ConfigError, match="two sources of annotation files"):
        _tile([named], tmp_path / "out", annotations=str(notes))
