"""Quality-control image per slide: thumbnail, tissue outline and the kept patch grid."""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

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
    """(scale, width, height) of the QC drawing of a thumbnail of ``shape`` (h, w)."""
    h, w = shape
    scale = min(1.0, _MAX_SIDE / max(h, w)) if max(h, w) > _MAX_SIDE else max(1.0, min(4.0, 800 / max(h, w)))
    return scale, max(1, int(round(w * scale))), max(1, int(round(h * scale)))


def qc_background(thumbnail: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The thumbnail at the QC drawing's size (needs no mask: can run while tissue is found)."""
    import cv2

    scale, out_w, out_h = qc_size(thumbnail.shape[:2])
    # area averaging when shrinking (no aliasing), bilinear when enlarging a small thumbnail
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(thumbnail), (out_w, out_h), interpolation=interpolation)


def write_qc_png(
    path: Path,
    *,
    thumbnail: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    thumb_downsample: tuple[float, float],
    coords_px: npt.NDArray[np.int64],
    extent_level0_px: float,
    title: str,
    background: npt.NDArray[np.uint8] | None = None,
    pool: Executor | None = None,
) -> Path:
    """Draw the QC PNG (tissue outline in green, kept patches in blue) and save it
    atomically; ``background`` is :func:`qc_background` of the thumbnail when made already;
    with ``pool`` the patch outlines are drawn on one of its threads meanwhile."""
    import cv2
    from PIL import Image, ImageDraw

    scale, out_w, out_h = qc_size(mask.shape)
    canvas = np.full((out_h + _BANNER_PX, out_w, 3), 255, dtype=np.uint8)  # title banner above the drawing
    rgb = canvas[_BANNER_PX:]
    rgb[...] = qc_background(thumbnail) if background is None else background
    sx, sy = scale / thumb_downsample[0], scale / thumb_downsample[1]
    outline_args = ((out_h, out_w), coords_px)
    outline_kw = {"extent": (extent_level0_px * sx, extent_level0_px * sy), "scale": (sx, sy)}
    drawing = pool.submit(patch_outlines, *outline_args, **outline_kw) if pool is not None else None
    # the tissue outline is traced on the mask at the drawing's size (a full-size mask costs more and is thinned away)
    small = cv2.resize(mask.view(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST).view(bool)
    tissue_outline = inner_boundary(small)
    outline = drawing.result() if drawing is not None else patch_outlines(*outline_args, **outline_kw)
    tinted = cv2.add(cv2.multiply(rgb, (0.22, 0.22, 0.22, 0.0)), tuple(0.78 * c for c in _PATCH_BLUE) + (0.0,))
    np.copyto(rgb, tinted, where=outline[..., None])
    del tinted, outline
    rgb[tissue_outline] = (0, 200, 0)
    banner = Image.new("RGB", (out_w, _BANNER_PX), (255, 255, 255))
    ImageDraw.Draw(banner).text((4, 3), title, fill=(0, 0, 0))
    canvas[:_BANNER_PX] = np.asarray(banner)
    # OpenCV's PNG writer without row filters: about the size of Pillow's at compress_level 1 in half the time
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE])
    if not ok:  # pragma: no cover - encoding a plain uint8 image does not fail
        raise RuntimeError(f"could not encode the QC image {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return path
