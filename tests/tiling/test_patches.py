"""Patches read at a lower level (or resized) match the same region read at level 0."""

from __future__ import annotations

import numpy as np
from PIL import Image

from wsi_mil.io.slide import open_slide, read_region_rgb
from wsi_mil.tiling.grid import patch_geometry
from wsi_mil.tiling.patches import decode_jpeg, encode_jpeg, read_patch


def _reference(slide, x, y, extent, size):
    full = read_region_rgb(slide, x_px=x, y_px=y, level=0, width=extent, height=extent)
    return np.asarray(Image.fromarray(full).resize((size, size), Image.Resampling.BOX)).astype(np.float32)


def test_patch_from_pyramid_level_aligns_with_level0(big_slide) -> None:
    with open_slide(big_slide) as slide:
        assert slide.level_count == 3
        g = patch_geometry(slide_mpp=0.5, level_downsamples=slide.level_downsamples, target_mpp=2.0,
                           patch_size_px=128, stride_px=128)
        assert g.level == 1 and not g.resized
        x, y = 4096, 3072  # inside the tissue of this seed
        patch = read_patch(slide, x_px=x, y_px=y, geometry=g).astype(np.float32)
        ref = _reference(slide, x, y, 512, 128)
        shifted = _reference(slide, x + 64, y, 512, 128)
    assert patch.shape == (128, 128, 3)
    assert patch.std() > 10  # real tissue, not glass
    err, err_shifted = np.abs(patch - ref).mean(), np.abs(patch - shifted).mean()
    assert err < 12 and err < 0.6 * err_shifted  # aligned: far closer than a 64 px offset


def test_resized_patch_matches_downscaled_level0(cmu_slide) -> None:
    with open_slide(cmu_slide) as slide:
        g = patch_geometry(slide_mpp=0.499, level_downsamples=slide.level_downsamples, target_mpp=1.0,
                           patch_size_px=256, stride_px=256)
        assert g.level == 0 and g.resized and g.read_size_px == 513
        patch = read_patch(slide, x_px=900, y_px=1800, geometry=g).astype(np.float32)
        ref = _reference(slide, 900, 1800, 513, 256)
        shifted = _reference(slide, 916, 1800, 513, 256)
    assert patch.shape == (256, 256, 3)
    err, err_shifted = np.abs(patch - ref).mean(), np.abs(patch - shifted).mean()
    # bilinear (antialiased) vs box filter differ by a few grey levels; a 16 px misalignment far more
    assert err < 8 and err < 0.5 * err_shifted


def test_jpeg_roundtrip_is_faithful(cmu_slide) -> None:
    with open_slide(cmu_slide) as slide:
        rgb = read_region_rgb(slide, x_px=900, y_px=1800, level=0, width=256, height=256)
    back = decode_jpeg(encode_jpeg(rgb, quality=90))
    assert back.shape == rgb.shape
    assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 4
