from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.errors import ResolutionError
from wsi_mil.tiling.grid import grid_coords, patch_geometry, tissue_fractions


def test_matching_level_is_read_without_resampling() -> None:
    g = patch_geometry(slide_mpp=0.25, level_downsamples=(1.0, 4.0, 16.0), target_mpp=1.0, patch_size_px=256, stride_px=256)
    assert (g.level, g.read_size_px, g.resized) == (1, 256, False)
    assert g.extent_level0_px == 1024 and g.effective_mpp == 1.0


def test_within_tolerance_counts_as_same_magnification() -> None:
    g = patch_geometry(slide_mpp=0.499, level_downsamples=(1.0,), target_mpp=0.5, patch_size_px=256, stride_px=256)
    assert (g.level, g.read_size_px, g.resized) == (0, 256, False)
    assert g.effective_mpp == pytest.approx(0.499)


def test_between_levels_reads_finer_level_and_downscales() -> None:
    g = patch_geometry(slide_mpp=0.25, level_downsamples=(1.0, 4.0, 16.0), target_mpp=0.5, patch_size_px=224, stride_px=112)
    assert g.level == 0 and g.read_size_px == 448 and g.resized
    assert g.extent_level0_px == 448 and g.step_level0_px == 224


def test_target_finer_than_scan_is_refused_with_fix() -> None:
    with pytest.raises(ResolutionError, match=r"--mpp 0\.50"):
        patch_geometry(slide_mpp=0.5, level_downsamples=(1.0,), target_mpp=0.25, patch_size_px=256, stride_px=256, slide_name="s")


def test_grid_patches_lie_inside_the_slide() -> None:
    g = patch_geometry(slide_mpp=0.5, level_downsamples=(1.0,), target_mpp=0.5, patch_size_px=256, stride_px=200)
    coords = grid_coords(width_px=1000, height_px=600, geometry=g)
    assert len(coords) == 4 * 2  # x: 0,200,400,600 (600+256<=1000); y: 0,200 (200+256<=600)
    assert (coords[:, 0] + 256 <= 1000).all() and (coords[:, 1] + 256 <= 600).all()
    assert grid_coords(width_px=100, height_px=100, geometry=g).shape == (0, 2)


def test_tissue_fraction_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((50, 70)) > 0.6
    coords = np.array([[0, 0], [80, 40], [320, 160], [16, 8]], dtype=np.int64)
    got = tissue_fractions(mask, mask_downsample=(8.0, 8.0), coords_px=coords, extent_level0_px=64)
    want = [mask[y // 8 : (y + 64) // 8, x // 8 : (x + 64) // 8].mean() for x, y in coords]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_tissue_fraction_fractional_downsample_and_edges_match_brute_force() -> None:
    """Fractional mask downsamples, patches over the mask's edge (clipped) and a strided mask."""
    rng = np.random.default_rng(1)
    mask = (rng.random((90, 130)) > 0.5)[::1, ::-1]  # (a reversed view: not C-contiguous)
    dx, dy = 7.3, 6.1
    coords = rng.integers(0, 900, (300, 2)).astype(np.int64)
    got = tissue_fractions(mask, mask_downsample=(dx, dy), coords_px=coords, extent_level0_px=40.0)
    want = []
    for x, y in coords:
        x0, y0 = min(int(np.floor(x / dx)), 130), min(int(np.floor(y / dy)), 90)
        x1 = max(min(int(np.ceil((x + 40.0) / dx)), 130), min(x0 + 1, 130))
        y1 = max(min(int(np.ceil((y + 40.0) / dy)), 90), min(y0 + 1, 90))
        want.append(mask[y0:y1, x0:x1].sum() / max((x1 - x0) * (y1 - y0), 1))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0 < np.mean(got) < 1 and (got == 0).any()  # (some patches lie beyond the mask: nothing inside)
