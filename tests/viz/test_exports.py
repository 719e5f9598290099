"""`wsi-mil heatmap` exports on real slides: each one opens in the tool it is made for,
is aligned to the slide, states its normalisation, and carries nothing identifying."""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WSI_MIL
from tests.viz.conftest import EXTENT, source_identity_strings
from wsi_mil.commands.heatmap import HeatmapSettings, run_heatmap
from wsi_mil.viz.raster import colourise, score_grid
from wsi_mil.viz.scores import normalise

QUPATH_OBJECT_TYPES = {"annotation", "detection", "tile", "cell"}


@pytest.fixture(scope="module")
def drawn(attention_run, tmp_path_factory):
    attention, manifest, made = attention_run
    out = tmp_path_factory.mktemp("heatmaps")
    report = run_heatmap([attention], out_dir=out, settings=HeatmapSettings(top_k=4), slides_manifest=manifest,
                         progress=False)
    assert report.ok, report.table()
    return out, made, report


def test_tiff_opens_in_openslide_with_the_slide_geometry_and_mpp_and_aligned_colours(drawn) -> None:
    import openslide

    out, made, _ = drawn
    for sid, (coords, att, path) in made.items():
        with openslide.OpenSlide(str(path)) as src, openslide.OpenSlide(str(out / sid / "heatmap.tif")) as hm:
            assert hm.dimensions == src.dimensions
            assert float(hm.properties["openslide.mpp-x"]) == pytest.approx(float(src.properties["openslide.mpp-x"]), rel=1e-4)
            assert hm.level_count >= 2 and dict(hm.associated_images) == {}
        unit = normalise(att, "rank").unit
        expected = colourise(unit, "viridis")
        rng = np.random.default_rng(1)
        with openslide.OpenSlide(str(out / sid / "heatmap.tif")) as hm:
            for i in rng.choice(len(coords), 25, replace=False):  # centre of a patch = that patch's colour
                x, y = coords[i] + EXTENT // 2
                px = np.asarray(hm.read_region((int(x), int(y)), 0, (1, 1)))[0, 0, :3]
                assert px.tolist() == expected[i].tolist(), (sid, i)
            # the top-left corner holds no patch (grid offset 37, 53): background
            assert np.asarray(hm.read_region((5, 5), 0, (1, 1)))[0, 0, :3].tolist() == [255, 255, 255]
            # a coarser level agrees with level 0 away from cell edges
            i = int(np.argmax(unit))
            ds = hm.level_downsamples[1]
            x, y = coords[i] + EXTENT // 2
            lvl = np.asarray(hm.read_region((int(x), int(y)), 1, (1, 1)))[0, 0, :3]
            assert np.abs(lvl.astype(int) - expected[i].astype(int)).max() <= 2 or ds > EXTENT / 2


def test_geojson_is_a_qupath_feature_collection_in_level0_pixels(drawn) -> None:
    out, made, _ = drawn
    coords, att, _ = made["tumour-slide"]
    doc = json.loads((out / "tumour-slide" / "patches.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    rank = normalise(att, "rank")
    by_name = {}
    for f in doc["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed linear ring
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert max(xs) - min(xs) == EXTENT and max(ys) - min(ys) == EXTENT
        props = f["properties"]
        assert props["objectType"] in QUPATH_OBJECT_TYPES
        m = props["measurements"]
        assert isinstance(m, dict) and all(isinstance(k, str) and math.isfinite(v) for k, v in m.items())
        i = int(props["name"].split()[-1])
        assert (min(xs), min(ys)) == tuple(float(v) for v in coords[i])
        assert m["attention (rank)"] == pytest.approx(rank.value[i]) and m["attention (stored)"] == pytest.approx(att[i])
        assert m["slide probability (tumour)"] == pytest.approx(0.91)
        by_name[i] = m["attention rank"]
    assert sorted(by_name.values()) == list(range(1, len(coords) + 1))
    assert doc["features"][0]["properties"]["measurements"]["attention rank"] == 1  # highest first


def test_geojson_top_k_keeps_only_the_highest_patches(attention_run, tmp_path) -> None:
    attention, manifest, made = attention_run
    run_heatmap([attention / "tumour-slide.h5"], out_dir=tmp_path, slides_manifest=manifest, progress=False,
                settings=HeatmapSettings(formats=("geojson",), geojson_top_k=5))
    doc = json.loads((tmp_path / "tumour-slide" / "patches.geojson").read_text())
    _, att, _ = made["tumour-slide"]
    top = set(np.argsort(-att)[:5].tolist())
    assert {int(f["properties"]["name"].split()[-1]) for f in doc["features"]} == top
    assert not (tmp_path / "tumour-slide" / "heatmap.tif").exists()


def test_the_heatmap_is_high_on_the_planted_tumour(drawn) -> None:
    """The exports are drawn where the attention is: the TIFF is bright over the truth mask."""
    import openslide

    from wsi_mil.synth.slide import read_truth_mask

    out, made, _ = drawn
    _, _, path = made["tumour-slide"]
    mask, ds = read_truth_mask(path)
    with openslide.OpenSlide(str(out / "tumour-slide" / "heatmap.tif")) as hm:
        lvl = hm.level_count - 1
        img = np.asarray(hm.read_region((0, 0), lvl, hm.level_dimensions[lvl]))[..., :3].astype(float)
        scale = hm.level_downsamples[lvl] / ds
    ys, xs = np.nonzero(mask)
    inside = img[np.clip((ys / scale).astype(int), 0, img.shape[0] - 1), np.clip((xs / scale).astype(int), 0, img.shape[1] - 1)]
    # viridis: bright yellow-green (high) has a high red+green, dark purple (low) a low one
    tissue = img[(img != 255).any(-1)]
    assert inside[:, :2].sum(-1).mean() > tissue[:, :2].sum(-1).mean() + 80


def test_overlay_and_gallery_pngs(drawn) -> None:
    from PIL import Image

    out, made, _ = drawn
    for sid in made:
        ov = Image.open(out / sid / "overlay.png")
        assert ov.width >= 800 and ov.mode in ("RGB", "RGBA")
        gal = Image.open(out / sid / "gallery.jpg")
        assert gal.width > 4 * 160 and gal.height > 2 * 160
    index = json.loads((out / "index.json").read_text())
    assert index["counts"] == {"ok": 2}
    marker = json.loads((out / "tumour-slide" / "heatmap.json").read_text())
    assert marker["settings"]["normalise"] == "rank" and set(marker["files"]) == {"png", "tiff", "geojson", "gallery"}


def test_no_export_carries_the_label_macro_or_slide_metadata(drawn, cmu_slide) -> None:
    """CMU-1-Small-Region has a label and a macro image and an Aperio description with
    the scanner's file name, date and user: none of it may reach any export."""
    import openslide
    from PIL import Image

    out, _, _ = drawn
    with openslide.OpenSlide(str(cmu_slide)) as s:
        assert {"label", "macro"} <= set(s.associated_images)  # the test is only meaningful with both
    secrets = source_identity_strings(cmu_slide)
    assert any("Aperio" in v or "ScanScope" in v for v in secrets) and len(secrets) >= 5
    files = sorted((out / "cmu-1").iterdir())
    assert {f.name for f in files} >= {"overlay.png", "heatmap.tif", "patches.geojson", "gallery.jpg"}
    for f in files:
        blob = f.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, (f.name, secret)
    with openslide.OpenSlide(str(out / "cmu-1" / "heatmap.tif")) as hm:
        assert dict(hm.associated_images) == {}
        assert all(not k.startswith("aperio.") for k in hm.properties)
    for name in ("overlay.png", "gallery.jpg"):  # no EXIF, comment or text chunk: only the format's own header
        info = Image.open(out / "cmu-1" / name).info
        assert set(info) <= {"Software", "dpi", "jfif", "jfif_version", "jfif_unit", "jfif_density"}, info


def test_rerun_skips_drawn_slides_and_redraws_on_new_settings(attention_run, drawn) -> None:
    attention, manifest, _ = attention_run
    out, _, _ = drawn
    again = run_heatmap([attention], out_dir=out, settings=HeatmapSettings(top_k=4), slides_manifest=manifest,
                        progress=False)
    assert {o.status for o in again.outcomes} == {"skipped"}


def test_a_slide_that_cannot_be_found_is_reported_and_the_rest_are_drawn(attention_run, tmp_path) -> None:
    attention, manifest, _ = attention_run
    bad = tmp_path / "manifest.csv"
    bad.write_text(manifest.read_text().replace("tumour-slide.tiff", "moved-away.tiff"))
    res = subprocess.run(WSI_MIL + ["heatmap", str(attention), "--out", str(tmp_path / "hm"), "--slides", str(bad),
                                    "--formats", "png", "geojson", "--no-progress"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 1, res.stderr
    assert "moved-away.tiff" in res.stdout and "file not found" in res.stdout
    assert (tmp_path / "hm" / "cmu-1" / "overlay.png").exists()
    assert not (tmp_path / "hm" / "tumour-slide").exists()


def test_normalisations_are_what_they_say() -> None:
    att = np.array([0.1, 0.2, 0.2, 0.5])
    r = normalise(att, "rank")
    assert r.value.tolist() == [0.0, 0.5, 0.5, 1.0]  # ties share a rank
    s = normalise(att, "softmax")
    assert s.value.sum() == pytest.approx(1.0) and (s.vmin, s.vmax) == (0.0, 0.5)
    raw = normalise(att, "raw")
    assert raw.value == pytest.approx(np.log(att)) and raw.unit.min() == 0 and raw.unit.max() == 1
    scores = normalise(np.array([2.0, 0.0]), "softmax", attention_kind="max score")
    assert scores.value == pytest.approx(np.exp([2, 0]) / np.exp([2, 0]).sum())
    with pytest.raises(ValueError, match="rank"):
        normalise(att, "zscore")


def test_overlapping_patches_average_into_finer_cells_and_smoothing_stays_in_tissue() -> None:
    coords = np.array([[0, 0], [128, 0]])  # 256-px patches with 50 % overlap
    g = score_grid(coords, np.array([0.0, 1.0]), extent_px=256, slide_width_px=1024, slide_height_px=512)
    assert g.cell_px == 128
    assert g.values[0, :3].tolist() == [0.0, 0.5, 1.0] and np.isnan(g.values[0, 3])
    sm = score_grid(coords, np.array([0.0, 1.0]), extent_px=256, slide_width_px=1024, slide_height_px=512,
                    smooth_um=64, mpp=0.5)
    assert np.isnan(sm.values[0, 3]) and 0 < sm.values[0, 0] < 0.5 < sm.values[0, 2] < 1


def test_bad_options_are_refused_with_the_choices() -> None:
    from wsi_mil.errors import ConfigError

    with pytest.raises(ConfigError, match="perceptually uniform"):
        HeatmapSettings(cmap="jet").validate()
    with pytest.raises(ConfigError, match="--formats"):
        HeatmapSettings(formats=("pdf",)).validate()


def test_attention_sources_give_out_of_fold_maps_for_runs_and_take_predict_outputs(tmp_path) -> None:
    from wsi_mil.commands.heatmap import attention_sources
    from wsi_mil.errors import ConfigError
    from wsi_mil.io.attention import write_attention

    def put(path, split):
        write_attention(path, coords=np.zeros((1, 2), np.int64), attention=np.ones(1, np.float32),
                        attrs={"slide_id": path.stem, "split": split})

    run = tmp_path / "run" / "attention"
    put(run / "ensemble" / "a.h5", "test")
    put(run / "fold0" / "a.h5", "test")
    put(run / "fold0" / "b.h5", "val")
    put(run / "fold1" / "b.h5", "train")
    put(run / "fold1" / "c.h5", "val")
    found = attention_sources([tmp_path / "run"])
    assert found == {"a": run / "ensemble" / "a.h5", "b": run / "fold0" / "b.h5", "c": run / "fold1" / "c.h5"}
    put(tmp_path / "pred" / "attention" / "d.h5", "predict")  # wsi-mil predict --out pred
    assert attention_sources([tmp_path / "pred"]) == {"d": tmp_path / "pred" / "attention" / "d.h5"}
    with pytest.raises(ConfigError, match="no attention stores"):
        attention_sources([tmp_path / "empty"])


def test_the_slide_call_is_visible_in_every_view(drawn) -> None:
    """A confidently negative slide's rank-normalised map is bright somewhere by
    construction; its overlay is faint and says NEGATIVE, the gallery gives level-0
    coordinates, and heatmap.json records the call (issue 11, item 15)."""
    from PIL import Image

    from wsi_mil.viz.scores import call_opacity, slide_call

    out, made, _ = drawn
    neg = json.loads((out / "cmu-1" / "heatmap.json").read_text())
    pos = json.loads((out / "tumour-slide" / "heatmap.json").read_text())
    assert neg["call"]["positive"] is False and neg["call"]["text"].startswith("NEGATIVE call: normal")
    assert pos["call"]["positive"] is True and pos["call"]["text"].startswith("POSITIVE call: tumour")
    assert neg["overlay_opacity"] < 0.5 * pos["overlay_opacity"]
    coords = made["cmu-1"][0]
    for p in neg["top_patches"]:
        assert [p["x"], p["y"]] == coords[p["index"]].tolist()
    # the negative overlay changes the thumbnail less than the positive one does
    def heat_strength(sid: str) -> float:
        img = np.asarray(Image.open(out / sid / "overlay.png").convert("RGB")).astype(float)
        h, w = img.shape[:2]
        img = img[int(0.3 * h):int(0.7 * h)]  # the two image panels only (no titles, banner or colour bar)
        return float(np.abs(img[:, w // 2:] - img[:, :w // 2][:, : w - w // 2]).mean())
    assert heat_strength("cmu-1") < heat_strength("tumour-slide")
    assert call_opacity(0.5, slide_call({"outputs": ["t"], "probability": [0.0], "prediction": "n"})) == pytest.approx(0.1)
    assert call_opacity(0.5, slide_call({"outputs": ["t"], "probability": [0.9], "prediction": "t"})) == 0.5


def test_heatmaps_of_other_attention_are_refused_and_review_does_not_offer_them(attention_run, tmp_path,
                                                                                 capsys) -> None:
    """Drawing prediction B into the folder of A's heatmaps exited 0 and kept A's drawing of
    the slide B does not have; `review B --heatmaps A's` offered A's exports as B's."""
    import shutil

    from wsi_mil.cli import main
    from wsi_mil.review.server import ReviewSite

    attention, manifest, _ = attention_run
    other = tmp_path / "prediction-b"  # another prediction: one of the two slides
    other.mkdir()
    shutil.copy(attention / "cmu-1.h5", other / "cmu-1.h5")
    hm = tmp_path / "hm"
    common = ["--slides", str(manifest), "--formats", "png", "geojson", "--no-progress", "-q"]
    assert main(["heatmap", str(attention), "--out", str(hm), *common]) == 0
    drawn = sorted(p.name for p in hm.iterdir())
    capsys.readouterr()
    assert main(["heatmap", str(other), "--out", str(hm), *common]) == 2
    err = capsys.readouterr().err
    assert f"{hm} holds another run" in err and "--overwrite" in err
    assert sorted(p.name for p in hm.iterdir()) == drawn  # left as it was
    site = ReviewSite([other], slides_manifest=manifest, heatmaps=hm)
    assert site.slides["cmu-1"].exports == {}  # A's drawing was made from another store
    assert any("drawn from other attention" in p for p in site.problems)
    assert ReviewSite([attention], slides_manifest=manifest, heatmaps=hm).slides["cmu-1"].exports  # A's own
    assert main(["heatmap", str(other), "--out", str(hm), "--overwrite", *common]) == 0
    assert not (hm / "tumour-slide").exists() and (hm / "cmu-1" / "overlay.png").exists()
    assert [s["slide_id"] for s in json.loads((hm / "index.json").read_text())["slides"]] == ["cmu-1"]


@pytest.mark.parametrize("method", ["rank", "softmax", "raw"])
def test_the_fast_geojson_writer_writes_the_same_bytes_as_the_features_it_replaces(drawn, tmp_path, method) -> None:
    """patches.geojson is composed as text (100k patches: about 6x faster); it is the very
    JSON the per-patch dicts gave, for every normalisation, a NaN score, a subset and a
    class name that needs escaping."""
    from wsi_mil.io.attention import read_attention
    from wsi_mil.viz.geojson import patch_features, write_geojson, write_patch_geojson
    from wsi_mil.viz.scores import normalise

    out, _, _ = drawn
    marker = json.loads((out / "tumour-slide" / "heatmap.json").read_text())
    coords, att, attrs = read_attention(Path(marker["source"]))
    att = att.astype(np.float32).copy()
    att[1] = np.nan
    scores = normalise(np.nan_to_num(att, nan=0.0), method, attention_kind=str(attrs.get("attention_kind", "")))
    prob = {"tumour": 0.875, 'odd "name"': 0.125}
    for index in (None, np.argsort(-scores.unit, kind="stable")[:3]):
        write_geojson(tmp_path / "a.geojson", patch_features(coords, 256.0, scores, att, probability=prob, index=index))
        write_patch_geojson(tmp_path / "b.geojson", coords, 256.0, scores, att, probability=prob, index=index)
        assert (tmp_path / "a.geojson").read_bytes() == (tmp_path / "b.geojson").read_bytes()


def test_heatmaps_drawn_on_a_dask_cluster_equal_the_local_ones(attention_run, drawn, tmp_path) -> None:
    """``heatmap --scheduler``: one task per slide on the cluster's workers (here a local cluster's
    worker process, reached by address as a user's cluster would be), the same files as drawn here."""
    from distributed import Client, LocalCluster

    attention, manifest, _ = attention_run
    local_out, made, _ = drawn
    out = tmp_path / "hm"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        res = subprocess.run(WSI_MIL + ["heatmap", str(attention), "--out", str(out), "--slides", str(manifest),
                                        "--top-k", "4", "--scheduler", cluster.scheduler_address, "--no-progress"],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        ran = client.run(lambda dask_worker: sorted({str(e[0]) for e in dask_worker.state.log
                                                     if str(e[0]).startswith("wsi-mil-heatmap-")}))
    keys = [k for v in ran.values() for k in v]
    assert {k.rsplit("-", 1)[0] for k in keys} == {f"wsi-mil-heatmap-{sid}" for sid in made}
    for sid in made:
        for name in ("overlay.png", "patches.geojson", "gallery.jpg"):
            assert (out / sid / name).read_bytes() == (local_out / sid / name).read_bytes(), (sid, name)


def test_the_gallery_is_a_small_faithful_jpeg_and_a_redraw_leaves_no_file_of_the_old_drawing(attention_run,
                                                                                             tmp_path) -> None:
    """gallery.png took 0.5-0.9 MB per slide (16 photographs as PNG); as JPEG it is a fraction, its patches
    the slide's pixels within JPEG error. Drawn again with fewer formats, the slide's folder holds the new
    drawing only (the old exports were left beside it)."""
    from PIL import Image

    from wsi_mil.commands.heatmap import _patch
    from wsi_mil.io.slide import open_slide

    attention, manifest, made = attention_run
    out = tmp_path / "hm"
    run_heatmap([attention], out_dir=out, settings=HeatmapSettings(top_k=8, formats=("gallery", "geojson")),
                slides_manifest=manifest, progress=False)
    gallery = out / "tumour-slide" / "gallery.jpg"
    sheet = np.asarray(Image.open(gallery).convert("RGB"), dtype=np.float64)
    as_png = io.BytesIO()
    Image.fromarray(sheet.astype(np.uint8)).save(as_png, format="PNG")
    assert gallery.stat().st_size < 0.4 * len(as_png.getvalue()), (gallery.stat().st_size, len(as_png.getvalue()))
    coords, att, path = made["tumour-slide"]
    top = int(np.argmax(att))
    with open_slide(path) as slide:
        patch = np.asarray(_patch(slide, coords[top], EXTENT), dtype=np.float64)
    side = patch.shape[0]
    # the highest patch is the first of the top row (under the 60 px heading and its 42 px caption, after the
    # 24 px row label and 6 px padding); the lowest patch is a different picture there
    error = np.abs(sheet[102:102 + side, 30:30 + side] - patch).mean()
    with open_slide(path) as slide:
        other = np.asarray(_patch(slide, coords[int(np.argmin(att))], EXTENT), dtype=np.float64)
    assert error < 4.0 and np.abs(other - patch).mean() > 4 * error, error  # mean absolute error in 0..255
    assert sorted(p.name for p in (out / "tumour-slide").iterdir()) == ["gallery.jpg", "heatmap.json", "patches.geojson"]
    run_heatmap([attention], out_dir=out, settings=HeatmapSettings(top_k=8, formats=("geojson",)),
                slides_manifest=manifest, progress=False)
    assert sorted(p.name for p in (out / "tumour-slide").iterdir()) == ["heatmap.json", "patches.geojson"]


def test_a_survival_heatmap_draws_each_patchs_share_of_the_risk_about_zero(attention_run, tmp_path) -> None:
    """--normalise contribution: the store's signed shares of the log risk (red raises, blue lowers, white 0),
    the top patches those that raise it most (the planted tumour here); a store without shares is refused by
    name and the batch goes on."""
    import shutil

    import h5py

    from wsi_mil.eval.localisation import patch_tumour_share
    from wsi_mil.io.attention import write_attention
    from wsi_mil.synth.slide import read_truth_mask

    attention, manifest, made = attention_run
    coords, att, path = made["tumour-slide"]
    mask, ds = read_truth_mask(path)
    share = patch_tumour_share(coords, EXTENT, mask, ds)
    shares = np.where(share > 0.5, 0.05, -0.01 * att / att.max()).astype(np.float32)
    src = tmp_path / "attention"
    write_attention(src / "tumour-slide.h5", coords=coords, attention=att, contribution=shares[:, None],
                    contribution_unit="log relative risk", attrs={
                        "slide_id": "tumour-slide", "fold": "ensemble", "split": "test", "model": "abmil",
                        "outputs": ["risk"], "probability": [float(shares.sum())], "prediction": "high risk",
                        "task_kind": "survival", "feature_store": str(tmp_path / "missing.h5"),
                        "patch_extent_level0_px": EXTENT})
    shutil.copy(attention / "cmu-1.h5", src / "cmu-1.h5")  # (a store of a model without shares)
    out = tmp_path / "heatmaps"
    report = run_heatmap([src], out_dir=out, settings=HeatmapSettings(normalise="contribution", formats=("png", "tiff")),
                         slides_manifest=manifest, progress=False)
    status = {o.slide_id: o for o in report.outcomes}
    assert status["tumour-slide"].status == "ok"
    assert status["cmu-1"].status == "failed" and "holds no patch contributions" in status["cmu-1"].message
    meta = json.loads((out / "tumour-slide" / "heatmap.json").read_text())
    assert meta["colours"].startswith("coolwarm over each patch's share of the slide's risk (log relative risk)")
    assert "symmetric about 0" in meta["colours"] and meta["overlay_opacity"] == 0.5  # (no fading: not a class call)
    top = [p["index"] for p in meta["top_patches"]]
    assert all(share[i] > 0.5 for i in top) and all(p["score"] == pytest.approx(0.05) for p in meta["top_patches"])
    with h5py.File(src / "tumour-slide.h5") as f:
        assert f["contribution"].shape == (len(coords), 1)
    import tifffile

    with tifffile.TiffFile(out / "tumour-slide" / "heatmap.tif") as tif:
        assert "coolwarm" in tif.pages[0].description and "log relative risk" in tif.pages[0].description
    from wsi_mil.errors import ConfigError

    with pytest.raises(ConfigError, match="coolwarm is diverging"):
        HeatmapSettings(cmap="coolwarm")
