"""Coordinates → patch pixels. Each worker process opens its own slide handle."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.io.slide import read_region_image
from wsi_mil.tiling.grid import PatchGeometry


@functools.lru_cache(maxsize=4)
def _cached_handle(path: str) -> object:
    """A per-process OpenSlide handle (OpenSlide handles must not cross processes)."""
    import openslide

    return openslide.open_slide(path)


def read_patch_image(slide: object, *, x_px: int, y_px: int, geometry: PatchGeometry) -> Any:
    """Read one patch at the target resolution as an RGB Pillow image."""
    from PIL import Image

    img = read_region_image(
        slide, x_px=x_px, y_px=y_px, level=geometry.level,
        width=geometry.read_size_px, height=geometry.read_size_px,
    )
    if geometry.resized:  # Pillow's resize is antialiased when downscaling
        img = img.resize((geometry.patch_size_px, geometry.patch_size_px), Image.Resampling.BILINEAR)
    return img


def read_patch(slide: object, *, x_px: int, y_px: int, geometry: PatchGeometry) -> npt.NDArray[np.uint8]:
    """Read one patch at the target resolution as (P, P, 3) uint8."""
    return np.asarray(read_patch_image(slide, x_px=x_px, y_px=y_px, geometry=geometry))


def encode_jpeg(rgb: npt.NDArray[np.uint8] | Any, *, quality: int) -> bytes:
    """JPEG-encode an RGB patch, array or Pillow image (4:4:4 chroma, so thin stain detail survives)."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(rgb) if isinstance(rgb, np.ndarray) else rgb
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_jpeg_image(data: bytes | npt.NDArray[np.uint8]) -> Any:
    """Decode a stored patch to an RGB Pillow image."""
    from PIL import Image

    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    return Image.open(io.BytesIO(raw)).convert("RGB")


def decode_jpeg(data: bytes | npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Decode a stored patch back to (P, P, 3) uint8."""
    return np.asarray(decode_jpeg_image(data))


def iter_patches(
    slide_path: str, coords_px: npt.NDArray[np.int64], geometry: PatchGeometry
) -> Iterator[Any]:
    """Yield patches (RGB Pillow images) for ``coords_px`` read from a per-process handle of ``slide_path``."""
    slide = _cached_handle(slide_path)
    for x, y in coords_px:
        yield read_patch_image(slide, x_px=int(x), y_px=int(y), geometry=geometry)


def extract_jpeg_chunk(
    slide_path: str, coords_px: npt.NDArray[np.int64], geometry: PatchGeometry, quality: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Read and JPEG-encode a chunk of patches (a Dask task).

    Returns:
        The concatenated JPEG bytes as a flat uint8 array and the (n,) byte lengths:
        two numpy arrays, cheap to ship between processes.
    """
    blobs = [encode_jpeg(p, quality=quality) for p in iter_patches(slide_path, coords_px, geometry)]
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return flat, lengths
