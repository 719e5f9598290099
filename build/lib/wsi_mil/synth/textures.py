"""Real tissue textures for generated slides, from the bundled sample (or any given file)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

#: Texture sides are cropped to a multiple of this so every pyramid level tiles seamlessly.
ALIGN_PX = 64


def sample_path(name: str) -> Path:
    """Path of a file of the bundled sample (``wsi_mil/sample``)."""
    return Path(str(resources.files("wsi_mil") / "sample" / name))


NORMAL_SOURCE = "cmu-1-small-region.svs"
TUMOUR_SOURCE = "TCGA-HE-7130-01Z-00-DX1.png"


@dataclass(frozen=True)
class Texture:
    """An RGB tissue texture with its physical pixel size."""

    rgb: npt.NDArray[np.uint8]
    mpp: float
    name: str


def _load_rgb(path: Path) -> tuple[npt.NDArray[np.uint8], float | None]:
    if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB")), None
    from wsi_mil.io.slide import metadata_mpp, open_slide, read_region_rgb

    with open_slide(path) as slide:
        w, h = slide.dimensions
        return read_region_rgb(slide, x_px=0, y_px=0, level=0, width=w, height=h), metadata_mpp(slide)


def _tissue_crop(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Crop to the rows/columns that are mostly tissue, so tiling it does not paste glass."""
    from wsi_mil.tiling.tissue import tissue_mask

    small = rgb[::8, ::8]
    mask = tissue_mask(np.ascontiguousarray(small), pixel_um=4.0)
    c0, c1 = _longest_run(mask.mean(axis=0) > 0.7)
    r0, r1 = _longest_run(mask[:, c0:c1].mean(axis=1) > 0.7)
    if c1 - c0 < 8 or r1 - r0 < 8:
        return rgb
    return rgb[r0 * 8 : r1 * 8, c0 * 8 : c1 * 8]


def _longest_run(flags: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """[start, end) of the longest run of True."""
    best, start = (0, 0), None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    return best


def load_texture(path: str | Path, *, mpp: float | None = None, crop_to_tissue: bool = True) -> Texture:
    """Load a texture, crop it to tissue and to a multiple of ``ALIGN_PX``.

    Args:
        path: Slide or image file with real tissue.
        mpp: Pixel size when the file carries none (images); defaults to 0.5.
    """
    path = Path(path)
    rgb, file_mpp = _load_rgb(path)
    if crop_to_tissue:
        rgb = _tissue_crop(rgb)
    h, w = (s - s % ALIGN_PX for s in rgb.shape[:2])
    if h < ALIGN_PX or w < ALIGN_PX:
        raise ValueError(f"{path}: texture smaller than {ALIGN_PX} px after cropping to tissue")
    return Texture(np.ascontiguousarray(rgb[:h, :w]), float(mpp or file_mpp or 0.5), path.stem)


def default_textures() -> tuple[Texture, Texture]:
    """(normal, tumour) textures from the bundled real H&E sample."""
    normal = load_texture(sample_path(NORMAL_SOURCE))
    tumour = load_texture(sample_path(TUMOUR_SOURCE), mpp=0.5, crop_to_tissue=False)
    return normal, tumour
