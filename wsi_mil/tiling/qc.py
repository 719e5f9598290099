"""Quality-control image per slide: thumbnail, tissue outline and the kept patch grid."""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.io.atomic import atomic_path
from wsi_mil.tiling.tissue import inner_boundary

_MAX_SIDE = 1600
_BANNER_PX = 18
_PATCH_BLUE = (30, 60, 230)


def _runs(shape: tuple[int, int], line: npt.NDArray[np.int64], start: npt.NDArray[np.int64],
          stop: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Pixels of an image of ``shape`` on any run ``start .. stop`` (inclusive) along row
    ``line``: +1 where a run starts, -1 after it ends, summed along the rows; only the rows
    that hold a run are counted (with bincount) and summed (along the contiguous axis)."""
    m = shape[1]
    rows, which = np.unique(line, return_inverse=True)
    k = len(rows)
    ends = np.bincount(which * (m + 1) + stop + 1, minlength=k * (m + 1))
    steps = np.bincount(which * (m + 1) + start, minlength=k * (m + 1)) - ends
    out = np.zeros(shape, dtype=bool)
    out[rows] = np.cumsum(steps.reshape(k, m + 1), axis=1)[:, :m] > 0
    return out


def patch_outlines(shape: tuple[int, int], coords_px: npt.NDArray[np.int64], *, extent: tuple[float, float],
                   scale: tuple[float, float]) -> npt.NDArray[np.bool_]:
    """Pixels of an image of ``shape`` on the outline of any patch (level-0 corners
    ``coords_px`` times ``scale``, sides ``extent`` image pixels), drawn as runs along rows
    and along columns (vectorised: tens of thousands of patches cost milliseconds)."""
    h, w = shape
    if len(coords_px) == 0:
        return np.zeros(shape, dtype=bool)
    x0 = np.clip(np.floor(coords_px[:, 0] * scale[0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords_px[:, 1] * scale[1]).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.floor(coords_px[:, 0] * scale[0] + extent[0]).astype(np.int64), x0, w - 1)
    y1 = np.clip(np.floor(coords_px[:, 1] * scale[1] + extent[1]).astype(np.int64), y0, h - 1)
    out = _runs((h, w), np.concatenate([y0, y1]), np.concatenate([x0, x0]), np.concatenate([x1, x1]))  # top, bottom
    out |= _runs((w, h), np.concatenate([x0, x1]), np.concatenate([y0, y0]), np.concatenate([y1, y1])).T  # left, right
    return out


def qc_size(shape: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, width, height) of the QC drawing of a thumbnail of ``shape`` (h, w): a large
    thumbnail shrunk by the smallest whole factor that fits ``_MAX_SIDE`` (its last few
    pixels dropped; a whole factor is an exact block average), a small one enlarged."""
    h, w = shape
    if max(h, w) > _MAX_SIDE:
        k = math.ceil(max(h, w) / _MAX_SIDE)
        return 1.0 / k, max(1, w // k), max(1, h // k)
    scale = max(1.0, min(4.0, 800 / max(h, w)))
    return scale, max(1, int(round(w * scale))), max(1, int(round(h * scale)))


def _fit(image: npt.NDArray[Any], scale: float, size: tuple[int, int], *, nearest: bool = False) -> npt.NDArray[Any]:
    """``image`` at the drawing's ``size`` (w, h) from :func:`qc_size`: shrunk by its whole
    factor (every k-th pixel with ``nearest``; halving by OpenCV's bilinear path, which is the
    2 x 2 mean; else the area average), enlarged bilinearly or by nearest pixel."""
    import cv2

    w, h = size
    if scale < 1:
        k = round(1 / scale)
        if nearest:
            return np.ascontiguousarray(image[:h * k:k, :w * k:k])
        block = image[:h * k, :w * k]
        return cv2.resize(block, (w, h), interpolation=cv2.INTER_LINEAR if k == 2 else cv2.INTER_AREA)
    if (w, h) == image.shape[1::-1]:
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def qc_canvas(thumbnail: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The QC drawing's canvas, in OpenCV's BGR order: a white title banner above the RGB
    thumbnail at the drawing's size (needs no mask: can be made while tissue is found)."""
    import cv2
    from PIL import ImageDraw  # noqa: F401 - imported here, off the critical path, for the title banner

    scale, out_w, out_h = qc_size(thumbnail.shape[:2])
    canvas = np.empty((out_h + _BANNER_PX, out_w, 3), dtype=np.uint8)
    canvas[:_BANNER_PX] = 255
    cv2.cvtColor(_fit(thumbnail, scale, (out_w, out_h)), cv2.COLOR_RGB2BGR, dst=canvas[_BANNER_PX:])
    return canvas


def qc_name(slide_id: str) -> str:
    """The file name of a slide's QC image (in the run's ``qc/`` folder)."""
    return f"{slide_id}.png"


@lru_cache(maxsize=1)
def _tint_table() -> npt.NDArray[np.uint8]:
    """Per-channel look-up (BGR) of a patch outline's colour: 22 % of the pixel, 78 % blue."""
    ramp = np.arange(256, dtype=np.float64)[:, None] * 0.22 + np.array(_PATCH_BLUE[::-1], dtype=np.float64) * 0.78
    return np.clip(np.round(ramp), 0, 255).astype(np.uint8).reshape(256, 1, 3)


def write_qc_png(
    path: Path,
    *,
    mask: npt.NDArray[np.bool_],
    thumb_downsample: tuple[float, float],
    coords_px: npt.NDArray[np.int64],
    extent_level0_px: float,
    title: str,
    thumbnail: npt.NDArray[np.uint8] | None = None,
    canvas: npt.NDArray[np.uint8] | Future[npt.NDArray[np.uint8]] | None = None,
    pool: Executor | None = None,
) -> Path:
    """Draw the QC PNG (tissue outline in green, kept patches in blue) and save it
    atomically. Give the ``thumbnail``, or its :func:`qc_canvas` (or a future of it) when
    made already (the canvas is drawn on); with ``pool`` the patch outlines are drawn on
    one of its threads meanwhile."""
    import cv2
    from PIL import Image, ImageDraw

    scale, out_w, out_h = qc_size(mask.shape)
    sx, sy = scale / thumb_downsample[0], scale / thumb_downsample[1]
    outline_shape, extent = (out_h, out_w), (extent_level0_px * sx, extent_level0_px * sy)
    drawing = pool.submit(patch_outlines, outline_shape, coords_px, extent=extent, scale=(sx, sy)) if pool is not None else None
    # the tissue outline is traced on the mask at the drawing's size (a full-size mask costs more and is thinned away)
    tissue_outline = inner_boundary(_fit(mask.view(np.uint8), scale, (out_w, out_h), nearest=True).view(bool))
    if isinstance(canvas, Future):
        canvas = canvas.result()
    elif canvas is None:
        if thumbnail is None:
            raise ValueError("write_qc_png needs the thumbnail or its canvas")
        canvas = qc_canvas(thumbnail)
    if canvas.shape != (out_h + _BANNER_PX, out_w, 3):
        raise ValueError(f"QC canvas of shape {canvas.shape} does not fit a mask of shape {mask.shape}")
    bgr = canvas[_BANNER_PX:]
    outline = drawing.result() if drawing is not None else patch_outlines(outline_shape, coords_px, extent=extent, scale=(sx, sy))
    cv2.copyTo(cv2.LUT(bgr, _tint_table()), outline.view(np.uint8), bgr)
    del outline
    bgr[tissue_outline] = (0, 200, 0)
    banner = Image.new("L", (out_w, _BANNER_PX), 255)
    ImageDraw.Draw(banner).text((4, 3), title, fill=0)
    canvas[:_BANNER_PX] = np.asarray(banner)[..., None]
    # OpenCV's PNG writer without row filters: about the size of Pillow's at compress_level 1 in half the time
    # (two halves deflated at once with Python's zlib and joined took as long: its deflate is ~1.4x slower)
    # (OpenCV before 4.12 has no filter setting: its default filters, a little slower)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    ok, png = cv2.imencode(".png", canvas, params)
    if not ok:  # pragma: no cover - encoding a plain uint8 image does not fail
        raise RuntimeError(f"could not encode the QC image {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return path
