"""The tissue thumbnail: a pyramid level reduced by a whole factor (exact area averages)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from wsi_mil.io.slide import open_slide
from wsi_mil.io.thumbnail import plan_thumbnail, read_thumbnail


def _pyramid(side: int, downsamples: tuple[float, ...]) -> SimpleNamespace:
    return SimpleNamespace(dimensions=(side, side), level_downsamples=downsamples,
                           level_dimensions=tuple((round(side / d), round(side / d)) for d in downsamples))


def test_whole_factor_plans() -> None:
    """The factor nearest the asked resolution, raised until the thumbnail fits 4096 px."""
    levels = (1.0, 4.0, 16.0, 64.0)
    p = plan_thumbnail(_pyramid(100_000, levels), slide_mpp=0.5, pixel_um=8.0, whole_factor=True)
    assert (p.level, p.whole_factor, p.width) == (2, 2, 3125)  # 6,250 px level > 4,096: halved (16 µm/px)
    p = plan_thumbnail(_pyramid(50_000, levels), slide_mpp=0.5, pixel_um=8.0, whole_factor=True)
    assert (p.level, p.whole_factor, p.width) == (2, 1, 3125)  # the level is the asked 8 µm/px
    p = plan_thumbnail(_pyramid(75_020, levels), slide_mpp=0.5, pixel_um=8.0, whole_factor=True)
    assert (p.whole_factor, p.width) == (2, 2344) and p.read_width == 4688  # 4,689 px level: its last one dropped
    p = plan_thumbnail(_pyramid(80_000, levels), slide_mpp=0.2527, pixel_um=8.0, whole_factor=True)
    assert (p.level, p.whole_factor) == (2, 2)  # 31.7x asked from a 16x level: 2, not a fractional 1.98
    p = plan_thumbnail(_pyramid(20_000, (1.0,)), slide_mpp=0.5, pixel_um=8.0, whole_factor=True)
    assert (p.level, p.whole_factor, p.width) == (0, 16, 1250)  # a single-level image: reduced from level 0
    p = plan_thumbnail(_pyramid(300_000, (1.0,)), slide_mpp=0.25, pixel_um=8.0, whole_factor=True)
    assert p.whole_factor == 74 and p.width <= 4096  # 32x asked, 74x needed to fit 4,096 px
    p = plan_thumbnail(_pyramid(100_000, levels), slide_mpp=0.5, pixel_um=8.0)
    assert (p.whole_factor, p.width) == (None, 4096)  # the display thumbnail keeps its exact size


def test_whole_factor_thumbnail_is_the_exact_area_average(cmu_slide) -> None:
    """On the real SVS: each thumbnail pixel is the rounded mean of its f x f level pixels
    (composited on white), and the downsample maps thumbnail pixels to level-0 pixels."""
    with open_slide(cmu_slide) as slide:
        for pixel_um, factor in ((4.0, 8), (1.0, 2)):  # (halving takes OpenCV's bilinear path: the same means)
            _check_whole_factor_thumbnail(slide, pixel_um, factor)


def _check_whole_factor_thumbnail(slide: object, pixel_um: float, factor: int) -> None:
    plan = plan_thumbnail(slide, slide_mpp=0.499, pixel_um=pixel_um, whole_factor=True)
    thumb, ds, um = read_thumbnail(slide, slide_mpp=0.499, pixel_um=pixel_um, whole_factor=True)
    f = plan.whole_factor
    assert f == factor and thumb.shape == (plan.height, plan.width, 3)
    level = np.asarray(slide.read_region((0, 0), plan.level, (plan.read_width, plan.read_height)).convert("RGB"))
    blocks = level.reshape(plan.height, f, plan.width, f, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(thumb.astype(np.float64) - blocks).max() <= 0.5 + 1e-9
    w0 = slide.dimensions[0]
    assert abs(ds[0] - plan.level_downsample * f) / ds[0] < 0.01 and abs(um - 0.499 * ds[0]) < 1e-9
    assert plan.read_width * plan.level_downsample <= w0


def test_a_failed_band_waits_for_the_others_before_the_slide_can_be_closed() -> None:
    """One band's read fails while the others are still reading: read_thumbnail raises only once every band has
    finished (it raised at once, and plan_slide closed the OpenSlide handle under the running bands: the process
    aborted on a slide corrupted in place)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pytest
    from PIL import Image

    running, finished_after_raise = [0], []
    lock, raised = threading.Lock(), threading.Event()

    class Slide(SimpleNamespace):
        def read_region(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
            with lock:
                running[0] += 1
            try:
                if loc[1] == 0:
                    raise OSError("corrupt JPEG data")  # (the first band fails at once)
                time.sleep(0.3)
                if raised.is_set():
                    finished_after_raise.append(loc[1])
                return Image.new("RGBA", size, (255, 255, 255, 255))
            finally:
                with lock:
                    running[0] -= 1

    slide = Slide(**vars(_pyramid(4096, (1.0,))))
    with ThreadPoolExecutor(4) as pool:
        with pytest.raises(OSError, match="corrupt JPEG data"):
            try:
                read_thumbnail(slide, slide_mpp=0.5, pixel_um=16.0, pool=pool, whole_factor=True)
            finally:
                raised.set()
                assert running[0] == 0  # (no band still reading when the error reaches the caller)
    assert not finished_after_raise
