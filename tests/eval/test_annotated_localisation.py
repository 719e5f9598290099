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
    fr = loc["froc"]  # every judged slide, the negatives' hot spots counted as false positives
    assert fr["n_slides"] > loc["n"] and fr["n_lesions"] >= loc["n"] and 0 <= fr["score"] <= 1
    values = list(fr["sensitivity_at_fp_per_slide"].values())
    assert values == sorted(values) and 0 <= loc["dice_mean"] <= 1
    report = (road / "run" / "report.md").read_text()
    assert "FROC (CAMELYON16 style" in report and "drawn lesion regions (tile --annotations), class 'Tumor'" in report


def test_lesions_drawn_under_another_name_are_not_taken_for_none(road) -> None:
    """--lesion-class names the lesion class; a generated slide falls back to its own mask, an annotated slide
    whose file has other classes only is left out and said (was: judged as if nothing were drawn, or silently
    dropped)."""
    from wsi_mil.eval.localisation import GENERATED, run_localisation

    loc = run_localisation(road / "run", "Tumour")
    assert loc is not None and set(loc["truth"]) == {GENERATED} and loc["lesion_class"] == "Tumour"
    metas = sorted((road / "slides").glob("*.json"))
    try:  # (the same slides without their generator's masks: annotated slides only)
        for m in metas:
            m.rename(m.with_suffix(".json.away"))
        loc = run_localisation(road / "run", "Tumour")
        assert loc is not None and loc["n"] == 0 and loc["unjudged"]
        assert all(v == ["Tumor"] for v in loc["unjudged"].values())
        from wsi_mil.eval.shortcuts import markdown

        text = "\n".join(markdown({"localisation": loc}))
        assert "Localisation left out" in text and "--lesion-class" in text
    finally:
        for m in metas:
            m.with_suffix(".json.away").rename(m)


def test_froc_and_dice_on_a_worked_example() -> None:
    """Three slides worked by hand: a lesion found at the top score, a negative slide called 0.5 with
    two hot spots, a slide with two lesions and a hot spot between them."""
    from wsi_mil.eval.localisation import froc, patch_dice

    row = lambda n: np.array([[100 * i, 0] for i in range(n)])  # noqa: E731 - a patch grid of one row
    a = (row(4), np.array([0.1, 0.9, 0.5, 0.3]), np.array([0, 1, 1, 0], bool), 1.0)
    b = (row(4), np.array([0.2, 0.1, 0.1, 0.6]), np.zeros(4, bool), 0.5)
    c = (row(5), np.array([0.8, 0.1, 0.2, 0.1, 0.3]), np.array([1, 0, 0, 0, 1], bool), 0.8)
    out = froc([a, b, c])
    # detections by score: A's lesion 1.0, C's first 0.8, B's FP 0.5, C's second 0.229, C's FP 0.114, B's FP 0.1
    assert out["n_lesions"] == 3 and out["n_slides"] == 3
    assert out["sensitivity_at_fp_per_slide"] == pytest.approx(
        {"0.25": 2 / 3, "0.5": 1.0, "1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0})
    assert out["score"] == pytest.approx((2 / 3 + 5) / 6)
    assert froc([b]) is None  # (no lesion: nothing to find)
    assert patch_dice(a[2], a[1]) == 1.0 and patch_dice(c[2], c[1]) == pytest.approx(2 / 3)
