"""A run works from any folder and after its whole output tree is moved (issue 11, item 5):
every recorded path is kept absolute and relative to the file that records it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WSI_MIL


@pytest.fixture(scope="module")
def tree(tmp_path_factory, cmu_slide) -> Path:
    """tile → extract-features → attention store (written by train-mil's writer) under
    ``root/tree``, every command run from ``root`` with relative paths, as a user would."""
    import os

    from wsi_mil.commands.extract_features import run_extract
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.commands.train_mil import _write_attention
    from wsi_mil.config import ExtractConfig, TileConfig
    from wsi_mil.data.bags import Bag, Task
    from wsi_mil.data.manifest import resolve_inputs
    from wsi_mil.train.loop import Predictions

    root = tmp_path_factory.mktemp("moved")
    (root / "tree" / "slides").mkdir(parents=True)
    shutil.copy(cmu_slide, root / "tree" / "slides" / "cmu.svs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rel = Path("tree")
        assert run_tile(resolve_inputs([rel / "slides" / "cmu.svs"]), out_dir=rel / "tiles", config=TileConfig(),
                        workers=1, progress=False).ok
        assert run_extract([rel / "tiles"], out_dir=rel / "features", config=ExtractConfig(batch_size=16, readers=1),
                           progress=False).ok
        store = rel / "features" / "features" / "cmu.h5"
        task = Task("binary", ("tumour",), ("label",), ("normal", "tumour"), ("0", "1"))
        bag = Bag("cmu", "p1", np.zeros(1, np.float32), store, extent_px=256.0, step_px=256.0).cache()
        n = len(bag.features)
        att = np.random.default_rng(0).random(n).astype(np.float32)
        pred = Predictions(["cmu"], np.zeros((1, 1)), np.array([[0.2]]), [att / att.sum()])
        _write_attention(rel / "run" / "attention" / "ensemble", [bag], pred, task, fold="ensemble", split="test",
                         thresholds=[0.5], model="abmil")
        res = subprocess.run(WSI_MIL + ["heatmap", "tree/run", "--formats", "png", "geojson", "--no-progress"],
                             cwd=root, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        os.chdir(cwd)
    return root / "tree"


def test_recorded_paths_are_absolute_and_relative(tree) -> None:
    from wsi_mil.io.attention import read_attention_attrs
    from wsi_mil.io.store import PatchStore, read_complete_attrs

    attrs = read_attention_attrs(tree / "run" / "attention" / "ensemble" / "cmu.h5")
    assert Path(attrs["feature_store"]).is_absolute() and attrs["feature_store_rel"] == "../../../features/features/cmu.h5"
    fattrs = read_complete_attrs(tree / "features" / "features" / "cmu.h5")
    assert Path(fattrs["source_store"]).is_absolute() and fattrs["source_store_rel"] == "../../tiles/patches/cmu.h5"
    with PatchStore(tree / "tiles" / "patches" / "cmu.h5") as ps:
        assert ps.attrs["slide_path_rel"] == "../../slides/cmu.svs"
    marker = json.loads((tree / "run" / "heatmaps" / "cmu" / "heatmap.json").read_text())
    assert marker["files"] == {"png": "overlay.png", "geojson": "patches.geojson"}


def test_heatmap_and_review_from_another_folder_and_after_the_tree_moved(tree, tmp_path) -> None:
    from wsi_mil.review.server import ReviewSite

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run(WSI_MIL + ["heatmap", str(tree / "run"), "--formats", "png", "geojson", "--no-progress"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "already drawn" in res.stdout, res.stdout + res.stderr[-2000:]

    moved = tmp_path / "moved-tree"
    shutil.copytree(tree, moved)  # the original stays: absolute paths would still resolve to it
    shutil.rmtree(tree / "slides")  # ... except for the slide, which must now be found relative to the moved tree
    res = subprocess.run(WSI_MIL + ["heatmap", str(moved / "run"), "--out", str(moved / "run" / "heatmaps2"),
                                    "--formats", "png", "--no-progress"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert (moved / "run" / "heatmaps2" / "cmu" / "overlay.png").stat().st_size > 0
    pytest.importorskip("openslide")
    try:
        site = ReviewSite([moved / "run"], heatmaps=moved / "run" / "heatmaps")
    except Exception as exc:  # noqa: BLE001 - OpenSeadragon missing is the only acceptable reason
        assert "OpenSeadragon" in str(exc), exc
        return
    try:
        slide = site.slides["cmu"]
        assert slide.slide_path.resolve() == (moved / "slides" / "cmu.svs").resolve()
        assert set(slide.exports) == {"png", "geojson"}
        assert all(p.resolve().is_relative_to(moved.resolve()) for p in slide.exports.values())
    finally:
        site.close()
