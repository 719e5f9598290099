"""The extraction loop: batches from the loader -> encoder on the device -> chunked writes.

One process per device. Reading happens in DataLoader worker processes that prefetch
batches while the encoder runs; on a GPU the batch goes through pinned memory with a
non-blocking copy, under autocast (bf16/fp16), with a channels-last model and optionally
``torch.compile``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsi_mil.encoders.base import Encoder
from wsi_mil.encoders.loader import BatchDataset, SlideJob, make_loader
from wsi_mil.errors import OutputError, StoreError
from wsi_mil.io.features import FeatureWriter
from wsi_mil.runtime import release_freed_memory, reuse_freed_memory

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RunSettings:
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int = 1
    prefetch: int = 4
    channels_last: bool = True
    compile: bool = False
    threads: int | None = None
    chunk_batches: int = 8

    @property
    def chunk_patches(self) -> int:
        return self.batch_size * self.chunk_batches


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare(encoder: Encoder, settings: RunSettings) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.device]:
    """Move the encoder to its device and return the batch function to call."""
    device = torch.device(settings.device)
    if device.type == "cpu":
        reuse_freed_memory()  # no page faults per layer per batch (wsi_mil/runtime.py)
        if settings.threads:
            torch.set_num_threads(settings.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    encoder.to(device, channels_last=settings.channels_last)
    fn: Callable[[torch.Tensor], torch.Tensor] = encoder.forward_normalised
    if settings.compile:
        fn = torch.compile(fn, dynamic=False)  # type: ignore[assignment]
    dtype = resolve_dtype(settings.precision, device)

    def run(batch_uint8: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            x = encoder.normalise(batch_uint8)
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            n = x.shape[0]
            if settings.compile and n < settings.batch_size:  # keep one static shape
                x = torch.cat([x, x.new_zeros((settings.batch_size - n, *x.shape[1:]))])
            return fn(x)[:n].float()
    return run, device


@dataclass
class SlideProgress:
    job: SlideJob
    writer: FeatureWriter
    feats: list[np.ndarray] = field(default_factory=list)
    index: list[np.ndarray] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    chunk_start: int = 0
    seconds: float = 0.0

    def flush(self, end: int) -> None:
        dim = int(self.writer.meta["dim"])
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32)
        index = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        self.writer.write_chunk(self.chunk_start, end, feats, index, self.bad)
        self.feats, self.index, self.bad = [], [], []
        self.chunk_start = end


def embed_jobs(
    jobs: list[SlideJob], writers: list[FeatureWriter], encoder: Encoder, settings: RunSettings,
    *, on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, float, Exception | None]]:
    """Embed every job, writing a chunk whenever ``chunk_patches`` are done.

    Yields ``(job number, seconds, None)`` as each slide's last chunk is written (the
    caller then assembles the slide's store), or ``(job number, seconds, error)`` as soon
    as a slide fails (a chunk the writer refuses, e.g. non-finite features); the other
    slides go on.
    """
    run, device = prepare(encoder, settings)
    dataset = BatchDataset(jobs, encoder.preprocess, settings.batch_size)
    loader = make_loader(dataset, num_workers=settings.num_workers, prefetch=settings.prefetch,
                         pin_memory=device.type == "cuda", low_priority=device.type == "cpu")
    progress = {j: SlideProgress(job, writers[j], chunk_start=job.start) for j, job in enumerate(jobs)}
    failed: set[int] = set()
    for j, job in enumerate(jobs):  # nothing left to embed (all chunks done, or no patches)
        if job.start >= job.n_patches:
            yield j, 0.0, None
    t_last = time.perf_counter()
    for batch in loader:
        j = int(batch["job"])
        if j in failed:
            continue
        p = progress[j]
        images = batch["images"]
        if len(images):
            feats = run(images.to(device, non_blocking=True))
            p.feats.append(feats.cpu().numpy())
            p.index.append(batch["index"].numpy())
        p.bad.extend(batch["bad"])
        for b in batch["bad"]:
            logger.warning("%s: unreadable patch %d at level-0 (%d, %d): %s", p.job.slide_id, b["index"], b["x"], b["y"], b["error"])
        end = int(batch["end"])
        now = time.perf_counter()
        p.seconds += now - t_last
        t_last = now
        if on_batch is not None:
            on_batch(end - int(batch["start"]))
        if end == p.job.n_patches or end - p.chunk_start >= settings.chunk_patches:
            try:
                p.flush(end)
            except (StoreError, OutputError) as exc:
                failed.add(j)
                yield j, p.seconds, exc
                continue
        if end == p.job.n_patches:
            release_freed_memory()  # the slide's odd-sized last batch left fragments: memory flat in the slides
            yield j, p.seconds, None
