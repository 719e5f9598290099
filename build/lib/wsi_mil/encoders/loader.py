"""Patch batches for the encoder, read in background worker processes.

Each item is one batch of one slide: the worker reads the patches straight from the
slide by coordinates (its own OpenSlide handle per process; horizontally adjacent
patches with one ``read_region`` call) or decodes the JPEG pixels the tiler stored (one
read for the batch's bytes), resizes the batch to the encoder's input size with one
antialiased uint8 resize, and returns a uint8
(B, 3, S, S) tensor in channels-last memory order (no copy is needed for a channels-last
model). A region that cannot be read is reported with its coordinates and left out of
the batch; the handle is reopened, because OpenSlide refuses further reads on a handle
after an error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from wsi_mil.encoders.base import Preprocess
from wsi_mil.errors import WsiMilError
from wsi_mil.tiling.grid import PatchGeometry


@dataclass(frozen=True)
class SlideJob:
    """One slide to embed: where its patches come from and where to start."""

    slide_id: str
    source: str  # "slide" (read by coordinates) or "store" (decode stored JPEG pixels)
    slide_path: str | None
    store_path: str
    geometry: PatchGeometry
    coords: npt.NDArray[np.int64]
    start: int = 0

    @property
    def n_patches(self) -> int:
        return len(self.coords)


@functools.lru_cache(maxsize=4)
def _slide_handle(path: str) -> Any:
    import openslide

    return openslide.open_slide(path)


@functools.lru_cache(maxsize=4)
def _store_handle(path: str) -> Any:
    from wsi_mil.io.store import PatchStore

    return PatchStore(path)


MAX_RUN = 16  # patches read with one read_region call (a 16 x 256 px strip)


def _runs(job: SlideJob, start: int, end: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` into runs of horizontally adjacent patches that one
    ``read_region`` call can cover pixel-identically (integral level downsample, grid step
    equal to the patch extent); other patches form runs of one."""
    g = job.geometry
    width0 = g.read_size_px * g.level_downsample
    mergeable = float(g.level_downsample).is_integer() and g.stride_px == g.patch_size_px
    runs: list[tuple[int, int]] = []
    a = start
    for i in range(start + 1, end + 1):
        adjacent = (mergeable and i < end and i - a < MAX_RUN and job.coords[i, 1] == job.coords[i - 1, 1]
                    and job.coords[i, 0] - job.coords[i - 1, 0] == width0)
        if not adjacent:
            runs.append((a, i))
            a = i
    return runs


def _slide_images(job: SlideJob, start: int, end: int) -> Iterator[tuple[int, Any]]:
    """(index, RGB Pillow image or the exception raised reading it) for patches ``[start, end)``."""
    from PIL import Image

    from wsi_mil.io.slide import read_region_image
    from wsi_mil.tiling.patches import read_patch_image

    if job.slide_path is None:
        raise WsiMilError(f"{job.slide_id}: no slide file to read patches from; give --slides DIR or use --source store")
    g = job.geometry
    r = g.read_size_px
    for a, b in _runs(job, start, end):
        if b - a > 1:
            try:
                strip = read_region_image(_slide_handle(job.slide_path), x_px=int(job.coords[a, 0]), y_px=int(job.coords[a, 1]),
                                          level=g.level, width=r * (b - a), height=r)
            except Exception:  # noqa: BLE001 - retried patch by patch below, to find the bad one
                _slide_handle.cache_clear()
            else:
                for k in range(b - a):
                    img = strip.crop((k * r, 0, (k + 1) * r, r))
                    if g.resized:
                        img = img.resize((g.patch_size_px, g.patch_size_px), Image.Resampling.BILINEAR)
                    yield a + k, img
                continue
        for i in range(a, b):
            try:
                yield i, read_patch_image(_slide_handle(job.slide_path), x_px=int(job.coords[i, 0]),
                                          y_px=int(job.coords[i, 1]), geometry=g)
            except Exception as exc:  # noqa: BLE001 - one bad region must not end the slide
                _slide_handle.cache_clear()  # OpenSlide handles are unusable after an error
                yield i, exc


def _store_images(job: SlideJob, start: int, end: int) -> Iterator[tuple[int, Any]]:
    from wsi_mil.tiling.patches import decode_jpeg_image

    store = _store_handle(job.store_path)
    try:
        blobs: list[Any] = store.patch_jpegs(start, end)
    except Exception:  # noqa: BLE001 - retried patch by patch below, to find the bad one
        blobs = [None] * (end - start)
    for i, data in zip(range(start, end), blobs, strict=True):
        try:
            yield i, decode_jpeg_image(store.patch_jpeg(i) if data is None else data)
        except Exception as exc:  # noqa: BLE001 - one bad patch must not end the slide
            yield i, exc


def read_batch(job: SlideJob, start: int, end: int, pre: Preprocess) -> dict[str, Any]:
    """Read patches ``[start, end)`` of ``job``; unreadable ones are reported, not raised."""
    images: list[Any] = []
    index: list[int] = []
    bad: list[dict[str, Any]] = []
    source = _store_images if job.source == "store" else _slide_images
    for i, img in source(job, start, end):
        if isinstance(img, Exception):
            x, y = (int(v) for v in job.coords[i])
            bad.append({"index": i, "x": x, "y": y, "error": f"{type(img).__name__}: {str(img)[:200]}"})
            continue
        images.append(np.asarray(img))
        index.append(i)
    if images:
        batch = pre.resize_batch(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))  # channels-last view
    else:
        batch = torch.zeros((0, 3, pre.input_size, pre.input_size), dtype=torch.uint8)
    return {
        "images": batch,
        "index": torch.as_tensor(np.asarray(index, dtype=np.int64)),
        "start": start, "end": end, "bad": bad,
    }


class BatchDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Batches of all jobs, in order; batch boundaries are multiples of ``batch_size``
    from patch 0, so a resumed slide is cut into exactly the same batches."""

    def __init__(self, jobs: list[SlideJob], pre: Preprocess, batch_size: int) -> None:
        self.jobs = jobs
        self.pre = pre
        self.items: list[tuple[int, int, int]] = []
        for j, job in enumerate(jobs):
            first = (job.start // batch_size) * batch_size
            for a in range(first, job.n_patches, batch_size):
                self.items.append((j, max(a, job.start), min(job.n_patches, a + batch_size)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        j, a, b = self.items[k]
        out = read_batch(self.jobs[j], a, b, self.pre)
        out["job"] = j
        return out


def _reader_init(_: int) -> None:
    torch.set_num_threads(1)  # readers decode and resize; the encoder owns the cores


def _cpu_reader_init(worker_id: int) -> None:
    """On a CPU run the encoder and the readers share the cores: readers run at the lowest
    priority, so they fill the encoder's idle gaps instead of pre-empting its threads."""
    _reader_init(worker_id)
    try:
        os.nice(19)
    except OSError:
        pass


def make_loader(dataset: BatchDataset, *, num_workers: int, prefetch: int, pin_memory: bool,
                low_priority: bool = False) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None, pin_memory=pin_memory,
        worker_init_fn=(_cpu_reader_init if low_priority else _reader_init) if num_workers else None,
        persistent_workers=False,
    )
