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


def _worker_watch() -> Any:
    """A scheduler plugin for a local cluster that logs every worker leaving while work is
    running (killed, crashed, out of memory); Dask re-runs its tasks on another worker."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class WorkerWatch(SchedulerPlugin):  # type: ignore[misc]
        name = "wsi-mil-worker-watch"

        def __init__(self) -> None:
            self.closing = False
            self.lost: list[str] = []

        def remove_worker(self, scheduler: Any = None, worker: str = "", **kwargs: Any) -> None:
            if self.closing:
                return
            self.lost.append(worker)
            logger.warning("Dask worker %s was lost (killed or crashed, e.g. out of memory); its unfinished tasks "
                           "run again on another worker", worker)

        def add_worker(self, scheduler: Any = None, worker: str = "", **kwargs: Any) -> None:
            if self.lost and not self.closing:
                logger.info("Dask worker %s joined (replacing a lost one)", worker)

    return WorkerWatch()


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker, started for the workers, would otherwise outlive
    this process by a moment and be left to the system as a zombie."""
    try:
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        if getattr(tracker, "_pid", None) is not None:
            tracker._stop()  # type: ignore[attr-defined]  # private, missing from typeshed; on purpose (see except)
    except Exception:  # noqa: BLE001 - private API; missing it only leaves a zombie behind
        pass


def _reap_children(timeout: float = 5.0) -> None:
    """Wait for (then end) any process this one started that is still there."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for p in alive:
        logger.warning("ending leftover process %d (%s)", p.pid, " ".join(p.cmdline()[:3]))
        p.kill()
    psutil.wait_procs(alive, timeout=timeout)


@contextmanager
def dask_client(*, workers: int = 1, scheduler: str | None = None, dashboard: str | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client``; the LocalCluster (if any) is closed on exit, its
    processes waited for, and lost workers are logged.

    Args:
        workers: Worker processes of the LocalCluster (one thread each: OpenSlide
            decoding and JPEG encoding hold the GIL only briefly but numpy-heavy tissue
            detection does not scale with threads).
        scheduler: Address of an existing scheduler (``tcp://host:8786``); ``workers`` is
            then ignored.
        dashboard: Address for Dask's dashboard (``:8787``); none unless asked (the
            scheduler's HTTP server then takes any free port, so a busy 8787 is no warning).
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
                dashboard_address=dashboard or ":0", silence_logs=logging.CRITICAL,  # failures are reported per slide
                scheduler_kwargs={"dashboard": bool(dashboard)},
            )
    finally:
        if saved is not None:
            os.environ[_MALLOC_TRIM] = saved
    watch = _worker_watch()
    try:
        cluster.scheduler.add_plugin(watch, name=watch.name)
    except Exception as exc:  # noqa: BLE001 - monitoring only
        logger.debug("cannot watch the workers: %s", exc)
    client = Client(cluster)
    logger.info("started a local Dask cluster with %d worker process(es)%s", workers,
                f"; dashboard at {cluster.dashboard_link}" if dashboard else "")
    try:
        yield client
    finally:
        watch.closing = True
        client.close()
        cluster.close()
        _stop_resource_tracker()
        _reap_children()


class ThreadClient:
    """The part of ``distributed.Client`` the batch loops use, on this process's threads.

    For small jobs (one slide), where starting a cluster of processes costs more than the
    work: OpenSlide's decoding, Pillow's resizing and JPEG coding and numpy's array maths
    release the GIL, so threads share one slide's strips. ``pool`` is the thread pool.
    """

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if workers < 1:
            raise ConfigError("--workers must be at least 1")
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-mil")

    def submit(self, fn: Any, *args: Any, pure: bool = True, **kwargs: Any) -> Any:
        return self.pool.submit(fn, *args, **kwargs)

    def scheduler_info(self) -> dict[str, Any]:
        return {"workers": {f"thread-{i}": {} for i in range(self.workers)}}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def thread_client(workers: int) -> Iterator[ThreadClient]:
    """Yield a :class:`ThreadClient` of ``workers`` threads, shut down on exit."""
    client = ThreadClient(workers)
    logger.info("running on %d thread(s) of this process (no Dask cluster)", workers)
    try:
        yield client
    finally:
        client.close()


def worker_count(client: Any) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))
