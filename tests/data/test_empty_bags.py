"""A slide on which tiling found no tissue has a feature store with no patches: training
scored it at one constant probability and counted it in every metric, and predict did
the same, without a word. Now it is a slide that cannot be used, named with why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.cli import main


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path) -> tuple[Path, Path]:
    """Feature stores of the real CMU slide and of a slide of bare glass (the same
    background colour, no tissue), made by tile and extract-features."""
    root = tmp_path_factory.mktemp("empty")
    glass = np.full((2048, 2048, 3), (236, 235, 233), np.uint8)
    Image.fromarray(glass).save(root / "glass.tif", dpi=(50800, 50800))  # 0.5 µm/px
    manifest = root / "slides.csv"
    manifest.write_text(f"slide_id,path,patient_id,label\ncmu,{cmu_slide},p1,1\nglass,glass.tif,p2,0\n")
    assert main(["tile", str(manifest), "--out", str(root / "tiles"), "--workers", "1", "--slide-mpp", "0.5",
                 "--no-progress", "-q"]) in (0, 1)
    assert main(["extract-features", str(root / "tiles"), "--out", str(root / "tiles"), "--no-progress", "-q"]) == 0
    return manifest, root / "tiles" / "features"


def test_a_store_without_patches_is_not_a_bag(stores) -> None:
    from wsi_mil.data.bags import bags_from_manifest, infer_task
    from wsi_mil.data.manifest import read_manifest

    manifest, features = stores
    assert (features / "glass.h5").exists()  # extract-features wrote it, empty
    entries = read_manifest(manifest)
    bags, missing = bags_from_manifest(entries, [features], infer_task(entries, min_per_class=1))
    assert [b.slide_id for b in bags] == ["cmu"]
    assert [m["slide_id"] for m in missing] == ["glass"] and "holds no patches" in missing[0]["reason"]


def test_predict_names_a_store_without_patches(stores, tmp_path: Path) -> None:
    _manifest, features = stores
    # a tiny run on the CMU slide's store (two copies under two ids: a two-class cohort is needed)
    import shutil

    feats = tmp_path / "feats"
    feats.mkdir()
    rows = ["slide_id,patient_id,label"]
    for k in range(12):
        shutil.copy(features / "cmu.h5", feats / f"s{k}.h5")
        rows.append(f"s{k},p{k},{k % 2}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train-mil", str(tmp_path / "m.csv"), "--features", str(feats), "--out", str(run), "--epochs", "1",
                 "--folds", "2", "--test-fraction", "0", "--bootstrap", "10", "--duplicates", "allow",
                 "--min-class-slides", "2", "--no-progress", "-q"]) == 0
    pred = tmp_path / "pred"
    assert main(["predict", str(run), str(features), "--out", str(pred)]) == 1  # a slide failed, the rest predicted
    import json

    report = json.loads((pred / "predict_report.json").read_text())
    assert [f["slide_id"] for f in report["failed"]] == ["glass"] and "holds no patches" in report["failed"][0]["error"]
    assert "glass" not in (pred / "predictions.csv").read_text()
