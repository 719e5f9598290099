"""The Dask client: a LocalCluster by default, or an existing scheduler by address.

Both give the same ``distributed.Client``, so the calling code has one path. With a
remote scheduler, workers need wsi-mil installed and the slides and output folder on a
shared file system at the same paths.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wsi_mil.errors import ConfigError

logger = logging.getLogger(__name__)
_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"


@contextmanager
def dask_client(*, workers: int = 1, scheduler: str | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client``; the LocalCluster (if any) is closed on exit.

    Args:
        workers: Worker processes of the LocalCluster (one thread each: OpenSlide
            decoding and JPEG encoding hold the GIL only briefly but numpy-heavy tissue
            detection does not scale with threads).
        scheduler: Address of an existing scheduler (``tcp://host:8786``); ``workers`` is
            then ignored.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); check the address or omit --scheduler") from exc
        logger.info("connected to Dask scheduler %s (%d workers)", scheduler, len(client.scheduler_info().get("workers", {})))
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    import dask

    # Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers (and leaves it in
    # this process's environment, so any earlier cluster leaks it into later ones). Setting
    # it freezes glibc's mmap threshold at 128 KiB, so every patch-sized buffer (256 KiB
    # RGBA) becomes an mmap/munmap pair with fresh page faults: patch extraction ran 30 %
    # slower. Our workers allocate and free the same buffer sizes all the time, so glibc's
    # adaptive default is the right one. (Workers behind --scheduler keep their own env.)
    saved = os.environ.pop(_MALLOC_TRIM, None)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{_MALLOC_TRIM}": None}):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=logging.CRITICAL,  # failures are reported per slide
            )
    finally:
        if saved is not None:
            os.environ[_MALLOC_TRIM] = saved
    client = Client(cluster)
    logger.info("started a local Dask cluster with %d worker process(es)", workers)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def worker_count(client: Any) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))
