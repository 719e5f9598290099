"""Quality-control image per slide: thumbnail, tissue outline and the kept patch grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from wsi_mil.io.atomic import atomic_path
from wsi_mil.tiling.tissue import inner_boundary

_MAX_SIDE = 1600


def patch_outlines(shape: tuple[int, int], coords_px: npt.NDArray[np.int64], *, extent: tuple[float, float],
                   scale: tuple[float, float]) -> npt.NDArray[np.bool_]:
    """Pixels of an image of ``shape`` on the outline of any patch (level-0 corners
    ``coords_px`` times ``scale``, sides ``extent`` image pixels), drawn with difference
    arrays (vectorised: tens of thousands of patches cost milliseconds)."""
    h, w = shape
    out = np.zeros(shape, dtype=bool)
    if len(coords_px) == 0:
        return out
    x0 = np.clip(np.floor(coords_px[:, 0] * scale[0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords_px[:, 1] * scale[1]).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.floor(coords_px[:, 0] * scale[0] + extent[0]).astype(np.int64), x0, w - 1)
    y1 = np.clip(np.floor(coords_px[:, 1] * scale[1] + extent[1]).astype(np.int64), y0, h - 1)
    rows = np.zeros((h, w + 1), dtype=np.int32)  # top and bottom sides: +1 at the start of a run, -1 after its end
    for y in (y0, y1):
        np.add.at(rows, (y, x0), 1)
        np.add.at(rows, (y, x1 + 1), -1)
    out |= np.cumsum(rows, axis=1)[:, :w] > 0
    cols = np.zeros((h + 1, w), dtype=np.int32)  # left and right sides
    for x in (x0, x1):
        np.add.at(cols, (y0, x), 1)
        np.add.at(cols, (y1 + 1, x), -1)
    out |= np.cumsum(cols, axis=0)[:h] > 0
    return out


def qc_size(shape: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, width, height) of the QC drawing of a thumbnail of ``shape`` (h, w)."""
    h, w = shape
    scale = min(1.0, _MAX_SIDE / max(h, w)) if max(h, w) > _MAX_SIDE else max(1.0, min(4.0, 800 / max(h, w)))
    return scale, max(1, int(round(w * scale))), max(1, int(round(h * scale)))


def qc_background(thumbnail: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The thumbnail at the QC drawing's size (needs no mask: can run while tissue is found)."""
    from PIL import Image

    _, out_w, out_h = qc_size(thumbnail.shape[:2])
    return np.array(Image.fromarray(thumbnail).resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=2.0))


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
) -> Path:
    """Draw the QC PNG (tissue outline in green, kept patches in blue) and save it
    atomically; ``background`` is :func:`qc_background` of the thumbnail when made already."""
    from PIL import Image, ImageDraw

    scale, out_w, out_h = qc_size(mask.shape)
    rgb = qc_background(thumbnail) if background is None else background.copy()
    sx, sy = scale / thumb_downsample[0], scale / thumb_downsample[1]
    outline = patch_outlines((out_h, out_w), coords_px, extent=(extent_level0_px * sx, extent_level0_px * sy), scale=(sx, sy))
    rgb[outline] = (rgb[outline] * 0.22 + np.array([30, 60, 230]) * 0.78).astype(np.uint8)
    # the tissue outline is traced on the mask at the drawing's size (a full-size mask costs more and is thinned away)
    small = np.asarray(Image.fromarray(mask).resize((out_w, out_h), Image.Resampling.NEAREST))
    rgb[inner_boundary(small)] = (0, 200, 0)
    image = Image.fromarray(rgb)
    banner = Image.new("RGB", (out_w, 18), (255, 255, 255))
    ImageDraw.Draw(banner).text((4, 3), title, fill=(0, 0, 0))
    canvas = Image.new("RGB", (out_w, out_h + 18), (255, 255, 255))
    canvas.paste(banner, (0, 0))
    canvas.paste(image, (0, 18))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)
    return path
