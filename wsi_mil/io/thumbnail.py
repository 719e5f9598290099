"""Read a low-resolution RGB image of a whole slide in bounded memory."""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
import numpy.typing as npt

from wsi_mil.io.slide import on_white

#: Longest side of a thumbnail; keeps tissue detection memory flat for any slide size.
MAX_THUMBNAIL_SIDE_PX = 4096
#: RGBA bytes of one band read from the slide (small enough that several threads share a level)
_BAND_BYTES = 8 << 20


def read_thumbnail(
    slide: object, *, slide_mpp: float, pixel_um: float, max_side_px: int = MAX_THUMBNAIL_SIDE_PX,
    pool: Executor | None = None,
) -> tuple[npt.NDArray[np.uint8], tuple[float, float], float]:
    """Thumbnail at about ``pixel_um`` µm per pixel (coarser if it would exceed ``max_side_px``).

    Reads the coarsest pyramid level that is at least as fine as the thumbnail, in
    horizontal bands, and downsamples each band, so memory stays bounded even for a
    single-level 100k-pixel slide. With ``pool`` the bands are read on its threads
    (OpenSlide's decoding and Pillow's resizing run outside the GIL).

    Returns:
        (rgb, (downsample_x, downsample_y), thumbnail µm/px) where the downsamples map
        thumbnail pixels to level-0 pixels.
    """
    from PIL import Image

    w0, h0 = slide.dimensions  # type: ignore[attr-defined]
    ds_target = max(pixel_um / slide_mpp, max(w0, h0) / max_side_px, 1.0)
    tw, th = max(1, int(round(w0 / ds_target))), max(1, int(round(h0 / ds_target)))
    downsamples = [float(d) for d in slide.level_downsamples]  # type: ignore[attr-defined]
    level = max((i for i, d in enumerate(downsamples) if d <= ds_target * 1.01), key=lambda i: downsamples[i])
    lw, lh = slide.level_dimensions[level]  # type: ignore[attr-defined]
    ds_level = downsamples[level]
    rows_per_band = max(1, int(_BAND_BYTES // max(1, lw * 4)))
    # make bands map onto whole thumbnail rows so resizing does not leave seams
    thumb_rows_per_band = max(1, int(rows_per_band * th / lh))
    out = np.empty((th, tw, 3), dtype=np.uint8)

    def band(ty0: int) -> None:
        ty1 = min(th, ty0 + thumb_rows_per_band)
        ly0 = int(np.floor(ty0 * lh / th))
        ly1 = min(lh, int(np.ceil(ty1 * lh / th)))
        region = slide.read_region((0, int(ly0 * ds_level)), level, (lw, ly1 - ly0))  # type: ignore[attr-defined]
        out[ty0:ty1] = np.asarray(on_white(region).resize((tw, ty1 - ty0), Image.Resampling.BOX))

    starts = range(0, th, thumb_rows_per_band)
    list(pool.map(band, starts) if pool is not None else map(band, starts))
    return out, (w0 / tw, h0 / th), float(slide_mpp * w0 / tw)
