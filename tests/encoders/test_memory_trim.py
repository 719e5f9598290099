"""Extraction's memory stays flat in the number of slides: the heap that
``reuse_freed_memory`` keeps is trimmed between slides once it has grown a gigabyte past
the working set (measured after the working set regrew), and not before."""

from __future__ import annotations

import pytest

import wsi_mil.runtime as runtime


def test_the_heap_is_trimmed_only_past_the_margin_above_the_regrown_working_set(monkeypatch) -> None:
    if not runtime.reuse_freed_memory():
        pytest.skip("glibc heap reuse is off here (not Linux/glibc, or WSI_MIL_GLIBC_MMAP=default)")
    gib = 1 << 30
    rss = iter([1.5 * gib, 1.6 * gib, 2.4 * gib, 2.6 * gib, 1.7 * gib, 2.0 * gib, 2.8 * gib])
    trims = []
    monkeypatch.setattr(runtime, "_rss_bytes", lambda: int(next(rss)))
    monkeypatch.setattr(runtime, "_trimmed_at", [])
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: trims.append(1) or True)
    done = [runtime.release_freed_memory() for _ in range(7)]
    # 1.5 GB: the level; 1.6 / 2.4: within a gigabyte; 2.6: trimmed; 1.7: the regrown level (no trim);
    # 2.0: within; 2.8: trimmed again
    assert done == [False, False, False, True, False, False, True] and len(trims) == 2
