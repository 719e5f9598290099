"""Patch scores → a score grid aligned to the slide's level-0 pixels.

The grid's cell is the tiling step (the patch side without overlap, a fraction of it
with overlap), its origin the offset of the tiling grid, so every patch covers whole
cells and overlapping patches average where they meet: overlap gives a finer map for
free once the patches were tiled and scored with overlap. Optional Gaussian smoothing
(``smooth_um``) only ever mixes cells that hold scores (normalised convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ScoreGrid:
    """``values[row, col]`` covers level-0 x in ``origin_x + col*cell_px`` … +cell_px
    (same for y); NaN where no patch was scored."""

    values: npt.NDArray[np.float32]
    origin_x: float
    origin_y: float
    cell_px: float
    slide_width_px: int
    slide_height_px: int

    def cell_index(self, xs: npt.NDArray[np.floating], ys: npt.NDArray[np.floating]
                   ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Grid (col, row) of level-0 positions; -1 outside the grid."""
        ny, nx = self.values.shape
        c = np.floor((np.asarray(xs) - self.origin_x) / self.cell_px).astype(np.int64)
        r = np.floor((np.asarray(ys) - self.origin_y) / self.cell_px).astype(np.int64)
        c[(c < 0) | (c >= nx)] = -1
        r[(r < 0) | (r >= ny)] = -1
        return c, r


def grid_step(coords: npt.NDArray[np.integer] | npt.NDArray[np.floating], extent_px: float) -> float:
    """The tiling step: the smallest positive spacing between patch origins (the patch
    extent when patches do not touch), never more than the extent."""
    best = float(extent_px)
    for axis in (0, 1):
        u = np.unique(np.asarray(coords)[:, axis])
        if len(u) > 1:
            best = min(best, float(np.diff(u).min()))
    return max(best, 1.0)


def score_grid(coords: npt.NDArray[np.int64], unit: npt.NDArray[np.floating], *, extent_px: float,
               slide_width_px: int, slide_height_px: int, smooth_um: float = 0.0, mpp: float | None = None
               ) -> ScoreGrid:
    """Average each cell over the patches that cover it (``unit`` scores in [0, 1])."""
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    cell = grid_step(xy, extent_px) if len(xy) else float(extent_px)
    ox, oy = (xy.min(axis=0) % cell) if len(xy) else (0.0, 0.0)
    nx = max(1, int(np.ceil((slide_width_px - ox) / cell)))
    ny = max(1, int(np.ceil((slide_height_px - oy) / cell)))
    total = np.zeros((ny, nx), np.float64)
    count = np.zeros((ny, nx), np.float64)
    if len(xy):
        span = max(1, int(round(extent_px / cell)))  # cells per patch side
        c0 = np.round((xy[:, 0] - ox) / cell).astype(np.int64)
        r0 = np.round((xy[:, 1] - oy) / cell).astype(np.int64)
        u = np.asarray(unit, dtype=np.float64)
        for dr in range(span):
            for dc in range(span):
                r, c = r0 + dr, c0 + dc
                ok = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
                np.add.at(total, (r[ok], c[ok]), u[ok])
                np.add.at(count, (r[ok], c[ok]), 1.0)
    if smooth_um > 0:
        if not mpp:
            raise ValueError("smoothing in µm needs the slide's mpp")
        from scipy.ndimage import gaussian_filter

        sigma = smooth_um / (mpp * cell)
        has = count > 0
        mean = np.where(has, total / np.maximum(count, 1), 0.0)
        num = gaussian_filter(mean, sigma, mode="constant")
        den = gaussian_filter(has.astype(np.float64), sigma, mode="constant")
        values = np.where(has, num / np.maximum(den, 1e-12), np.nan)
    else:
        values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return ScoreGrid(values.astype(np.float32), float(ox), float(oy), float(cell), int(slide_width_px),
                     int(slide_height_px))


def colourise(values: npt.NDArray[np.floating], cmap: str, *, background: tuple[int, ...] = (255, 255, 255),
              alpha: int | None = None) -> npt.NDArray[np.uint8]:
    """Unit values → RGB (or RGBA with ``alpha`` where scored, 0 elsewhere) uint8; NaN →
    ``background``."""
    import matplotlib

    lut = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    v = np.asarray(values)
    has = np.isfinite(v)
    idx = np.clip(np.nan_to_num(v, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    channels = 3 if alpha is None else 4
    out = np.empty(v.shape + (channels,), np.uint8)
    out[..., :3] = lut[idx]
    if alpha is None:
        out[~has] = np.asarray(background[:3], np.uint8)
    else:
        out[..., 3] = np.where(has, alpha, 0)
        out[~has, :3] = 0
    return out
