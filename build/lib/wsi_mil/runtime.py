"""Process-level settings that make CPU inference and training run at the speed of the cores.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` on free. A CNN's activations for a batch are
tens of MiB each, so on CPU every layer of every batch paid for page faults on newly
zeroed pages: with EfficientNet-Lite0 at batch 32 on 2 cores, half of all CPU time was
kernel time and the forward ran at 37 patches/s. Serving those blocks from the heap and
keeping freed memory for the next batch removes the faults (about 85-100 patches/s; see
benchmarks/results/extract.md). The cost is that the process keeps its peak heap, which
for an inference or training loop is the working set it needs again on the next batch.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 1 << 30


@functools.lru_cache(maxsize=1)
def reuse_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and keep freed memory (idempotent).

    Returns whether the setting took effect (False off glibc, or when the environment
    variable ``WSI_MIL_GLIBC_MMAP=default`` asks to keep glibc's behaviour)."""
    if not sys.platform.startswith("linux") or os.environ.get("WSI_MIL_GLIBC_MMAP") == "default":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # musl or another libc: nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    logger.debug("glibc heap reuse for large blocks: %s", "on" if ok else "refused")
    return ok


#: the heap may grow this far past its size after the last trim before it is trimmed again
TRIM_GROWTH_BYTES = 1 << 30
_trimmed_at: list[int] = []


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``), where
    :func:`reuse_freed_memory` keeps them, once the process has grown by
    :data:`TRIM_GROWTH_BYTES` since the last time: called between slides, so the blocks
    freed by each slide's odd-sized last batch (fragments no later batch fits) do not pile
    up slide after slide (a 200-slide extraction grew by 4 MB a slide, to 2.5 GB): the
    process stays within a gigabyte of its working set however many slides it embeds.
    Not after every slide: a trim gives back the working set too, and re-faulting it cost
    half as much time again on small slides (a 256 MB margin still trimmed every third
    slide, as the working set regrows over several). Returns whether it trimmed; a no-op
    off glibc."""
    if not reuse_freed_memory():
        return False
    rss = _rss_bytes()
    if rss is None:
        return False
    if not _trimmed_at or _trimmed_at[0] < 0:  # the first call, or the first after a trim: the working set
        _trimmed_at[:] = [rss]                  # (regrown by now) is the level growth is measured from
        return False
    if rss - _trimmed_at[0] < TRIM_GROWTH_BYTES:
        return False
    if not _malloc_trim():
        return False
    _trimmed_at[0] = -1
    return True


def _malloc_trim() -> bool:
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _libc():  # type: ignore[no-untyped-def]
    """The C library (found once: ``ctypes.util.find_library`` runs a subprocess), or None."""
    import ctypes  # (here: ctypes.util costs every command ~10 ms of start-up)
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def prefer_passive_omp() -> None:
    """Before torch loads OpenMP: idle encoder threads sleep instead of spinning, so the
    patch readers can use those cycles (see benchmarks/results/extract.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
