"""Patch batches for the encoder, read in background worker processes.

Each item is one batch of one slide: the worker reads the patches straight from the
slide by coordinates (its own OpenSlide handle per process) or decodes the JPEG pixels
the tiler stored, resizes them to the encoder's input size, and returns a uint8
(B, 3, S, S) tensor in channels-last memory order (no copy is needed for a channels-last
model). A region that cannot be read is reported with its coordinates and left out of
the batch; the handle is reopened, because OpenSlide refuses further reads on a handle
after an error.
"""

from __future__ import annotations

import functools
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


def _read_one(job: SlideJob, i: int) -> Any:
    """Patch ``i`` as an RGB Pillow image."""
    from wsi_mil.tiling.patches import decode_jpeg_image, read_patch_image

    if job.source == "store":
        return decode_jpeg_image(_store_handle(job.store_path).patch_jpeg(i))
    if job.slide_path is None:
        raise WsiMilError(f"{job.slide_id}: no slide file to read patches from; give --slides DIR or use --source store")
    x, y = job.coords[i]
    return read_patch_image(_slide_handle(job.slide_path), x_px=int(x), y_px=int(y), geometry=job.geometry)


def read_batch(job: SlideJob, start: int, end: int, pre: Preprocess) -> dict[str, Any]:
    """Read patches ``[start, end)`` of ``job``; unreadable ones are reported, not raised."""
    images: list[npt.NDArray[np.uint8]] = []
    index: list[int] = []
    bad: list[dict[str, Any]] = []
    for i in range(start, end):
        try:
            rgb = _read_one(job, i)
        except Exception as exc:  # noqa: BLE001 - one bad region must not end the slide
            x, y = (int(v) for v in job.coords[i])
            bad.append({"index": i, "x": x, "y": y, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            _slide_handle.cache_clear()  # OpenSlide handles are unusable after an error
            continue
        images.append(pre.resize_uint8(rgb))
        index.append(i)
    s = pre.input_size
    arr = np.stack(images) if images else np.zeros((0, s, s, 3), dtype=np.uint8)
    return {
        "images": torch.from_numpy(arr).permute(0, 3, 1, 2),  # NCHW view of NHWC memory = channels-last
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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # readers decode and resize; the encoder owns the cores


def make_loader(dataset: BatchDataset, *, num_workers: int, prefetch: int, pin_memory: bool) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None, pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None, persistent_workers=False,
    )
