"""The heatmap as a pyramidal tiled TIFF with the slide's level-0 geometry and mpp.

OpenSlide opens it as a generic tiled TIFF (so QuPath does, as a second image with the
slide's size and pixel size — aligned pixel for pixel). Tiles are rendered on demand
from the score grid, so memory stays flat for any slide size; the heatmap is piecewise
constant, so tiles are Deflate-compressed (small, exact colours) and tiles that look
the same (one flat colour: background or inside one patch, or the same few blocks) are
encoded once and reused. The
description says what the colours mean; nothing of the source slide's metadata (or its
label/macro images) is copied.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

from wsi_mil.viz.raster import ScoreGrid, colourise

TILE_PX = 256  # the usual patch grid, so that most level-0 tiles are one cell
_CACHE_ENTRIES = 50_000
LEVEL_FACTOR = 4
_TOP_LEVEL_MAX_PX = 1024


def level_downsamples(width_px: int, height_px: int) -> list[int]:
    ds = [1]
    while max(width_px, height_px) / ds[-1] > _TOP_LEVEL_MAX_PX:
        ds.append(ds[-1] * LEVEL_FACTOR)
    return ds


def _compressor():  # type: ignore[no-untyped-def]
    """zlib-format Deflate: zlib-ng through imagecodecs (a dependency already; at level 3
    about 5x faster than zlib's level 1 on these tiles, and as small), else the standard
    library's zlib."""
    try:
        import imagecodecs

        if imagecodecs.ZLIBNG.available:
            return lambda data, level: imagecodecs.zlibng_encode(data, level=level)
    except ImportError:
        pass
    return zlib.compress


def _tiles(grid: ScoreGrid, rgb: npt.NDArray[np.uint8], background: npt.NDArray[np.uint8], ds: int
           ) -> Iterator[bytes]:
    """Deflate-encoded tiles of one level in row-major order.

    A tile is a few flat blocks (grid cells cut by the tile's edges), so it is described
    by a signature — the blocks' colours and sizes — and each distinct signature is
    encoded once: on a slide tiled on a 256-px grid almost every level-0 tile is one cell,
    so a slide of any size needs at most a few hundred encodings at level 0.
    """
    lw, lh = -(-grid.slide_width_px // ds), -(-grid.slide_height_px // ds)
    # every cell's colour as an id into a small palette; the background is one more colour
    cells = np.concatenate([rgb.reshape(-1, 3), background.reshape(1, 3)])
    palette, colour_of = np.unique(cells, axis=0, return_inverse=True)
    colour_of = colour_of.ravel().astype(np.int32)
    ny, nx = grid.values.shape
    bg_index = ny * nx
    cache: dict[bytes, bytes] = {}
    compress = _compressor()

    def runs_of(start: int, axis: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        pos = (np.arange(start, start + TILE_PX) + 0.5) * ds
        cols, rows = grid.cell_index(pos, pos)
        return _runs(rows if axis == 0 else cols)

    row_runs_at = {ty: runs_of(ty, 0) for ty in range(0, lh, TILE_PX)}
    col_runs_at = {tx: runs_of(tx, 1) for tx in range(0, lw, TILE_PX)}

    def encode(ty: int, tx: int) -> bytes:
        (row_runs, row_len), (col_runs, col_len) = row_runs_at[ty], col_runs_at[tx]
        idx = row_runs[:, None] * nx + col_runs[None, :]
        idx[(row_runs[:, None] < 0) | (col_runs[None, :] < 0)] = bg_index
        colours = colour_of[idx]
        if (colours == colours.flat[0]).all():  # one flat colour, whatever the cells
            colours, row_len, col_len = colours[:1, :1], np.array([TILE_PX]), np.array([TILE_PX])
        key = colours.tobytes() + row_len.tobytes() + col_len.tobytes()
        hit = cache.get(key)
        if hit is None:
            # widen the few distinct rows first, then repeat whole rows (one memcpy each)
            rows = np.repeat(palette[colours].astype(np.uint8), col_len, axis=1)
            block = np.repeat(rows, row_len, axis=0)
            # flat tiles recur everywhere: squeeze them hard once; the rest quickly
            hit = compress(block.tobytes(), 9 if colours.size == 1 else 3)
            if len(cache) < _CACHE_ENTRIES:
                cache[key] = hit
        return hit

    # tiles of background only (most of a slide) skip the signature: a summed-area table of
    # the cells that are not background answers "any tissue in these cells?" in 4 lookups
    tissue = np.zeros((ny + 1, nx + 1), np.int64)
    tissue[1:, 1:] = (colour_of[:bg_index] != colour_of[bg_index]).reshape(ny, nx).cumsum(0).cumsum(1)

    def span(runs: npt.NDArray[np.int64]) -> tuple[int, int]:
        inside = runs[runs >= 0]
        return (int(inside.min()), int(inside.max()) + 1) if len(inside) else (0, 0)

    row_span = {ty: span(r) for ty, (r, _) in row_runs_at.items()}
    col_span = {tx: span(c) for tx, (c, _) in col_runs_at.items()}
    flat_bg: list[bytes] = []

    def encode_row(ty: int) -> list[bytes]:
        (r0, r1), out = row_span[ty], []
        for tx in range(0, lw, TILE_PX):
            c0, c1 = col_span[tx]
            if r1 <= r0 or c1 <= c0 or tissue[r1, c1] - tissue[r0, c1] - tissue[r1, c0] + tissue[r0, c0] == 0:
                if not flat_bg:
                    flat_bg.append(encode(ty, tx))
                out.append(flat_bg[0])
            else:
                out.append(encode(ty, tx))
        return out

    # Deflate releases the GIL: rows of tiles are encoded on a few threads (a task per row,
    # not per tile: 150k tiles' futures cost more than their encoding), written in order
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        for row in pool.map(encode_row, range(0, lh, TILE_PX)):
            yield from row


def _runs(index: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Run-length encoding of a 1-D index: (values, lengths)."""
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    return index[starts], np.diff(np.r_[starts, len(index)])


def write_heatmap_tiff(path: Path, grid: ScoreGrid, *, cmap: str, mpp: float | None, description: str,
                       background: tuple[int, int, int] = (255, 255, 255)) -> Path:
    """Write the grid (unit scores) in colour map ``cmap`` as a pyramidal TIFF of the
    slide's level-0 size, ``background`` where no patch was scored; ``mpp`` goes into the
    resolution tags (µm/px → px/cm)."""
    import tifffile

    from wsi_mil.io.atomic import atomic_path

    w, h = grid.slide_width_px, grid.slide_height_px
    bg = np.asarray(background, np.uint8)
    rgb = colourise(grid.values, cmap, background=background)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, ds in enumerate(level_downsamples(w, h)):
            # None is tifffile's default for both: no resolution tags without an mpp
            resolution: tuple[float, float] | None = None
            resolutionunit: str | None = None
            if mpp:
                px_per_cm = 1e4 / (mpp * ds)
                resolution, resolutionunit = (px_per_cm, px_per_cm), "CENTIMETER"
            tif.write(_tiles(grid, rgb, bg, ds), shape=(-(-h // ds), -(-w // ds), 3), dtype=np.uint8,
                      tile=(TILE_PX, TILE_PX), photometric="rgb", compression="deflate",
                      subfiletype=0 if i == 0 else 1, description=description if i == 0 else None,
                      metadata=None, software="wsi-mil", resolution=resolution, resolutionunit=resolutionunit)
    return path
