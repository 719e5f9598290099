"""Read a low-resolution RGB image of a whole slide in bounded memory."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from wsi_mil.io.slide import read_region_bgra, rgba_on_white

#: Longest side of a thumbnail; keeps tissue detection memory flat for any slide size.
MAX_THUMBNAIL_SIDE_PX = 4096
#: RGBA bytes of one band read from the slide (small enough that several threads share a
#: level, and that a band's pixels are still in cache when ``on_band`` works on them)
_BAND_BYTES = 6 << 20


@dataclass(frozen=True)
class ThumbnailPlan:
    """Which pyramid level a thumbnail is read from and how it is reduced.

    ``whole_factor``: level pixels per thumbnail pixel (both axes) for a whole-factor
    thumbnail, else None (a fractional resize to ``width`` x ``height``, the thumbnail's
    size); ``read_width`` / ``read_height``: the level pixels read (a whole-factor thumbnail
    drops the last few level pixels that do not fill a thumbnail pixel).
    """

    level: int
    level_downsample: float
    width: int
    height: int
    read_width: int
    read_height: int
    whole_factor: int | None


def plan_thumbnail(slide: object, *, slide_mpp: float, pixel_um: float, max_side_px: int = MAX_THUMBNAIL_SIDE_PX,
                   whole_factor: bool = False) -> ThumbnailPlan:
    """The :class:`ThumbnailPlan` of :func:`read_thumbnail` (nothing is read).

    The level is the coarsest at least as fine as the thumbnail. With ``whole_factor`` the
    thumbnail is that level reduced by a whole number (the one nearest the wanted ratio,
    raised until the longest side fits ``max_side_px``): an exact area average that OpenCV
    computes ~30x faster than a fractional one, at a pixel size within a factor 1.5 of the
    one asked for (e.g. a 100k px slide at 0.5 µm/px: 16 µm/px instead of 12.2).
    """
    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    ds_target = max(pixel_um / slide_mpp, max(w0, h0) / max_side_px, 1.0)
    downsamples = [float(d) for d in slide.level_downsamples]  # type: ignore[attr-defined]
    level = max((i for i, d in enumerate(downsamples) if d <= ds_target * 1.01), key=lambda i: downsamples[i])
    lw, lh = (int(v) for v in slide.level_dimensions[level])  # type: ignore[attr-defined]
    if whole_factor:
        f = max(1, round(ds_target / downsamples[level]))
        while math.ceil(max(lw, lh) / f) > max_side_px:
            f += 1
        tw, th = max(1, lw // f), max(1, lh // f)
        return ThumbnailPlan(level, downsamples[level], tw, th, min(lw, tw * f), min(lh, th * f), f)
    tw, th = max(1, round(w0 / ds_target)), max(1, round(h0 / ds_target))
    return ThumbnailPlan(level, downsamples[level], tw, th, lw, lh, None)


def read_thumbnail(
    slide: object, *, slide_mpp: float, pixel_um: float, max_side_px: int = MAX_THUMBNAIL_SIDE_PX,
    pool: Executor | None = None, on_band: Callable[[npt.NDArray[np.uint8], int], None] | None = None,
    whole_factor: bool = False, plan: ThumbnailPlan | None = None,
) -> tuple[npt.NDArray[np.uint8], tuple[float, float], float]:
    """Thumbnail at about ``pixel_um`` µm per pixel (coarser if it would exceed ``max_side_px``).

    Reads the coarsest pyramid level that is at least as fine as the thumbnail, in
    horizontal bands, and area-averages each band down, so memory stays bounded even for a
    single-level 100k-pixel slide. With ``pool`` the bands are read on its threads
    (OpenSlide's decoding and OpenCV's resizing run outside the GIL). ``on_band(rows, y0)``
    is called on each finished band of thumbnail rows (starting at row ``y0``) by the thread
    that read it, so per-pixel work on the thumbnail runs while other bands are decoded.
    ``whole_factor``: reduce the level by a whole number (see :func:`plan_thumbnail`);
    ``plan``: that plan when the caller made it already (its size is then known beforehand).

    Returns:
        (rgb, (downsample_x, downsample_y), thumbnail µm/px) where the downsamples map
        thumbnail pixels to level-0 pixels.
    """
    import cv2

    if plan is None:
        plan = plan_thumbnail(slide, slide_mpp=slide_mpp, pixel_um=pixel_um, max_side_px=max_side_px,
                              whole_factor=whole_factor)
    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    lw, lh = (int(v) for v in slide.level_dimensions[plan.level])  # type: ignore[attr-defined]
    tw, th, f = plan.width, plan.height, plan.whole_factor
    rows_per_band = max(1, int(_BAND_BYTES // max(1, plan.read_width * 4)))
    # bands map onto whole thumbnail rows, so resizing leaves no seams
    thumb_rows_per_band = max(1, rows_per_band // f if f else int(rows_per_band * th / lh))
    out = np.empty((th, tw, 3), dtype=np.uint8)
    # halving: bilinear at exactly half the size samples midway between each 2 x 2 block, which is
    # the block's mean, rounded as the area average rounds it, ~20x faster than OpenCV's area path
    interpolation = cv2.INTER_LINEAR if f == 2 else cv2.INTER_AREA

    def band(ty0: int) -> None:
        ty1 = min(th, ty0 + thumb_rows_per_band)
        if f:
            ly0, ly1 = ty0 * f, min(lh, ty1 * f)  # (a level thinner than f pixels: its rows only)
        else:
            ly0, ly1 = int(np.floor(ty0 * lh / th)), min(lh, int(np.ceil(ty1 * lh / th)))
        size = (tw, ty1 - ty0)
        y_px = int(ly0 * plan.level_downsample)
        bgra = read_region_bgra(slide, x_px=0, y_px=y_px, level=plan.level, width=plan.read_width, height=ly1 - ly0)
        if bgra is not None:  # OpenSlide's own pixel order: resized as they are, reordered at thumbnail size
            small = cv2.resize(bgra, size, interpolation=interpolation) if bgra.shape[1::-1] != size else bgra
            out[ty0:ty1] = cv2.cvtColor(small, cv2.COLOR_BGRA2RGB)
        else:
            region = slide.read_region((0, y_px), plan.level, (plan.read_width, ly1 - ly0))  # type: ignore[attr-defined]
            rgb = rgba_on_white(np.asarray(region))
            out[ty0:ty1] = cv2.resize(rgb, size, interpolation=interpolation) if rgb.shape[1::-1] != size else rgb
        if on_band is not None:
            on_band(out[ty0:ty1], ty0)

    starts = range(0, th, thumb_rows_per_band)
    if pool is None:
        for y in starts:
            band(y)
    else:
        from concurrent.futures import wait

        futures = [pool.submit(band, y) for y in starts]
        # every band is done before the first error is raised: the caller then closes the slide, and a band still
        # reading a closed OpenSlide handle aborts the process (seen on a slide corrupted in place)
        wait(futures)
        for job in futures:
            job.result()
    # level-0 pixels per thumbnail pixel: the part of the slide read, over the thumbnail's size
    ds = (w0 * plan.read_width / lw / tw, h0 * plan.read_height / lh / th)
    return out, ds, float(slide_mpp * ds[0])
