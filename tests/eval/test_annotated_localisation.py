"""Lesions drawn as annotations judge attention as the lesion masks do: a generated cohort of real
tissue whose truth masks are exported as QuPath GeoJSON (wsi_mil.io.annotations.mask_features),
tiled with --annotations, trained with train-mil; each patch's stored overlap matches the
mask's share, and the run's localisation, now read from the drawn regions, matches the
mask-based figure slide for slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.cli import main


@pytest.fixture(scope="module")
def road(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import openslide

    from wsi_mil.io.annotations import mask_features, write_geojson
    from wsi_mil.synth.slide import read_truth_mask

    root = tmp_path_factory.mktemp("annotated")
    common = ["--no-progress", "-q"]
    assert main(["synth", "--preset", "balanced", "--n-slides", "16", "--size", "2560", "--out", str(root / "slides"),
                 *common]) == 0
    notes = root / "annotations"
    notes.mkdir()
    for slide in sorted((root / "slides").glob("*.tiff")):
        features: list[dict] = []
        if slide.with_name(slide.stem + ".tumour.png").exists():
            mask, ds = read_truth_mask(slide)
            with openslide.OpenSlide(str(slide)) as s:
                features = mask_features(mask, ds, "Tumor", size=s.dimensions)
        write_geojson(notes / f"{slide.stem}.geojson", features)
    assert main(["tile", str(root / "slides" / "manifest.csv"), "--out", str(root / "tiles"), "--workers", "1",
                 "--annotations", str(notes), *common]) == 0
    assert main(["extract-features", str(root / "tiles"), "--out", str(root / "tiles"), *common]) == 0
    assert main(["train-mil", str(root / "slides" / "manifest.csv"), "--features", str(root / "tiles" / "features"),
                 "--out", str(root / "run"), "--epochs", "6", "--folds", "2", "--bootstrap", "50", *common]) == 0
    return root


def test_stored_overlaps_match_the_masks_they_were_drawn_from(road) -> None:
    from wsi_mil.eval.localisation import patch_tumour_share
    from wsi_mil.io.store import PatchStore
    from wsi_mil.synth.slide import read_truth_mask

    checked = 0
    for store in sorted((road / "tiles" / "patches").glob("*.h5")):
        slide = road / "slides" / f"{store.stem}.tiff"
        with PatchStore(store) as ps:
            classes, overlap = ps.annotation_overlap()
            coords, extent = ps.coords, float(ps.attrs["extent_level0_px"])
        mask, ds = read_truth_mask(slide)
        if not mask.any():
            assert classes == [] and overlap.shape == (len(coords), 0)  # (an empty file: nothing drawn)
            continue
        share = patch_tumour_share(coords, extent, mask, ds)
        assert classes == ["Tumor"] and np.abs(overlap[:, 0] - share).max() < 0.08, store.stem
        assert ((overlap[:, 0] >= 0.5) == (share >= 0.5)).mean() > 0.97
        checked += 1
    assert checked >= 4


def test_localisation_from_drawn_regions_matches_the_masks(road) -> None:
    from wsi_mil.data.bags import attention_patch_extent
    from wsi_mil.eval.localisation import DRAWN, run_localisation, slide_localisation_auc
    from wsi_mil.io.attention import out_of_fold_stores, read_attention

    loc = run_localisation(road / "run")
    assert loc is not None and loc["truth"] == {DRAWN: loc["n"]} and loc["n"] >= 4
    stores = out_of_fold_stores(road / "run")
    for key, value in loc["per_slide"].items():
        sid = key.split("/")[1]
        coords, att, attrs = read_attention(stores[sid])
        from_mask = slide_localisation_auc(coords, att, road / "slides" / f"{sid}.tiff",
                                           attention_patch_extent(attrs, stores[sid]))
        assert from_mask is not None and abs(value - from_mask) < 0.03, (sid, value, from_mask)
    shortcuts = json.loads((road / "run" / "metrics.json").read_text())["audit"]["shortcuts"]
    assert shortcuts["localisation"]["truth"] == {DRAWN: loc["n"]}  # (the run's own record says so)
