"""Patch geometry at a target resolution and the level-0 patch grid. Pure: no I/O.

Vocabulary: *target* = the resolution the user asked for (``target_mpp``) and the patch
size there (``patch_size_px``); *level* = the pyramid level pixels are read from;
*level 0* = the slide's full resolution, in which all coordinates are expressed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import ResolutionError
from wsi_mil.io.slide import MPP_TOLERANCE


@dataclass(frozen=True)
class PatchGeometry:
    """How one patch is read and where it lies.

    Attributes:
        target_mpp: Requested µm/px of the output patches.
        effective_mpp: µm/px of the stored patches (== level mpp when no resampling).
        patch_size_px: Output patch side (pixels at ``effective_mpp``).
        stride_px: Grid step, in output pixels.
        level: Pyramid level read from.
        level_downsample: Downsample of ``level`` relative to level 0.
        read_size_px: Side of the region read at ``level`` (resized to ``patch_size_px``
            when it differs).
        extent_level0_px: Side of one patch in level-0 pixels.
        step_level0_px: Grid step in level-0 pixels.
    """

    target_mpp: float
    effective_mpp: float
    patch_size_px: int
    stride_px: int
    level: int
    level_downsample: float
    read_size_px: int
    extent_level0_px: float
    step_level0_px: float

    @property
    def resized(self) -> bool:
        return self.read_size_px != self.patch_size_px

    @classmethod
    def from_store_attrs(cls, attrs: dict[str, Any]) -> PatchGeometry:
        """The geometry a store was tiled with (its root attributes, see ``wsi-mil tile``)."""
        extent = float(attrs["extent_level0_px"])
        return cls(
            target_mpp=float(attrs["target_mpp"]), effective_mpp=float(attrs["effective_mpp"]),
            patch_size_px=int(attrs["patch_size_px"]), stride_px=int(attrs["stride_px"]),
            level=int(attrs["patch_level"]), level_downsample=float(attrs["level_downsample"]),
            read_size_px=int(attrs["read_size_px"]), extent_level0_px=extent,
            step_level0_px=extent * int(attrs["stride_px"]) / int(attrs["patch_size_px"]),
        )

    def to_dict(self) -> dict[str, float | int | bool]:
        d: dict[str, float | int | bool] = asdict(self)
        d["resized"] = self.resized
        return d


def patch_geometry(
    *,
    slide_mpp: float,
    level_downsamples: tuple[float, ...] | list[float],
    target_mpp: float,
    patch_size_px: int,
    stride_px: int,
    slide_name: str = "slide",
    tolerance: float = MPP_TOLERANCE,
) -> PatchGeometry:
    """Choose the pyramid level and read size for patches at ``target_mpp``.

    The coarsest level whose resolution is at least the target (within ``tolerance``)
    is read; when that level's mpp matches the target within ``tolerance`` the patch is
    read at exactly ``patch_size_px`` (no resampling), otherwise a larger region is read
    and downscaled.

    Raises:
        ResolutionError: the target is finer than the slide's level 0.
    """
    if patch_size_px < 1 or stride_px < 1:
        raise ResolutionError(f"{slide_name}: patch size and stride must be positive")
    level_mpps = [slide_mpp * float(d) for d in level_downsamples]
    candidates = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + tolerance)]
    if not candidates:
        raise ResolutionError(
            f"{slide_name}: scanned at {slide_mpp:.3f} µm/px, so it cannot be tiled at the finer "
            f"{target_mpp:.3f} µm/px. Use --mpp {slide_mpp:.2f} or coarser."
        )
    level = max(candidates, key=lambda i: level_mpps[i])
    level_mpp = level_mpps[level]
    ds = float(level_downsamples[level])
    if abs(level_mpp / target_mpp - 1) <= tolerance:
        read_size, effective = patch_size_px, level_mpp
        extent = patch_size_px * ds
    else:
        read_size = int(round(patch_size_px * target_mpp / level_mpp))
        effective = target_mpp
        extent = read_size * ds
    step = extent * stride_px / patch_size_px
    return PatchGeometry(
        target_mpp=float(target_mpp),
        effective_mpp=float(effective),
        patch_size_px=int(patch_size_px),
        stride_px=int(stride_px),
        level=int(level),
        level_downsample=ds,
        read_size_px=int(read_size),
        extent_level0_px=float(extent),
        step_level0_px=float(step),
    )


def grid_coords(*, width_px: int, height_px: int, geometry: PatchGeometry) -> npt.NDArray[np.int64]:
    """Top-left level-0 (x, y) of every grid patch lying fully inside the slide, row-major."""
    extent, step = geometry.extent_level0_px, geometry.step_level0_px
    nx = int(np.floor((width_px - extent) / step)) + 1 if width_px >= extent else 0
    ny = int(np.floor((height_px - extent) / step)) + 1 if height_px >= extent else 0
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    xs = np.round(np.arange(nx) * step).astype(np.int64)
    ys = np.round(np.arange(ny) * step).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(
    mask: npt.NDArray[np.bool_],
    *,
    mask_downsample: tuple[float, float],
    coords_px: npt.NDArray[np.int64],
    extent_level0_px: float,
) -> npt.NDArray[np.float32]:
    """Fraction of each patch's footprint covered by tissue (summed-area table; O(1) per patch).

    Args:
        mask: Tissue mask at low resolution.
        mask_downsample: (x, y) level-0 pixels per mask pixel.
        coords_px: (N, 2) level-0 top-left corners.
        extent_level0_px: Patch side in level-0 pixels.
    """
    import cv2

    if len(coords_px) == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = mask.shape
    dx, dy = mask_downsample
    x0 = np.clip(np.floor(coords_px[:, 0] / dx).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords_px[:, 1] / dy).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords_px[:, 0] + extent_level0_px) / dx).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords_px[:, 1] + extent_level0_px) / dy).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    # OpenCV's summed-area table (one pass, ~2.5x faster than summing bands of rows with numpy)
    sat = cv2.integral(np.ascontiguousarray(mask).view(np.uint8), sdepth=cv2.CV_32S if mask.size < 2**31 else cv2.CV_64F)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (inside / area).astype(np.float32)
