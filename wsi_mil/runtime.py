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
    import ctypes  # (here: ctypes.util costs every command ~10 ms of start-up)
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    logger.debug("glibc heap reuse for large blocks: %s", "on" if ok else "refused")
    return ok


def prefer_passive_omp() -> None:
    """Before torch loads OpenMP: idle encoder threads sleep instead of spinning, so the
    patch readers can use those cycles (see benchmarks/results/extract.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
