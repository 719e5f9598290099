"""Quality-control image per slide: thumbnail, tissue outline and the kept patch grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from wsi_mil.io.atomic import atomic_path
from wsi_mil.tiling.tissue import inner_boundary

_MAX_SIDE = 1600


def write_qc_png(
    path: Path,
    *,
    thumbnail: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.bool_],
    thumb_downsample: tuple[float, float],
    coords_px: npt.NDArray[np.int64],
    extent_level0_px: float,
    title: str,
) -> Path:
    """Draw the QC PNG (tissue outline in green, kept patches in blue) and save it atomically."""
    from PIL import Image, ImageDraw

    h, w = mask.shape
    scale = min(1.0, _MAX_SIDE / max(h, w)) if max(h, w) > _MAX_SIDE else max(1.0, min(4.0, 800 / max(h, w)))
    out_w, out_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    image = Image.fromarray(thumbnail).resize((out_w, out_h), Image.Resampling.BILINEAR)
    # the outline is traced on the mask at the drawing's size (a full-size mask costs more and is thinned away)
    small = np.asarray(Image.fromarray(mask).resize((out_w, out_h), Image.Resampling.NEAREST))
    edge_img = Image.fromarray(inner_boundary(small).view(np.uint8) * np.uint8(255))
    green = Image.new("RGB", (out_w, out_h), (0, 200, 0))
    image.paste(green, mask=edge_img)
    draw = ImageDraw.Draw(image, "RGBA")
    sx, sy = scale / thumb_downsample[0], scale / thumb_downsample[1]
    for x, y in coords_px:
        x0, y0 = x * sx, y * sy
        draw.rectangle([x0, y0, x0 + extent_level0_px * sx, y0 + extent_level0_px * sy], outline=(30, 60, 230, 200))
    banner = Image.new("RGB", (out_w, 18), (255, 255, 255))
    ImageDraw.Draw(banner).text((4, 3), title, fill=(0, 0, 0))
    canvas = Image.new("RGB", (out_w, out_h + 18), (255, 255, 255))
    canvas.paste(banner, (0, 0))
    canvas.paste(image, (0, 18))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=3)
    return path
