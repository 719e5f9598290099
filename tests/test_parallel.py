"""The local Dask cluster our commands start."""

from __future__ import annotations

import os

import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.parallel import dask_client, worker_count


def _worker_env() -> tuple[str | None, int]:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.getpid()


def test_local_cluster_workers_keep_glibc_adaptive_malloc() -> None:
    # Dask exports MALLOC_TRIM_THRESHOLD_ to its workers by default; with it set, every
    # patch buffer is mmap'ed afresh and patch extraction ran ~30 % slower.
    with dask_client(workers=2) as client:
        assert worker_count(client) == 2
        envs = client.run(_worker_env)
    assert len(envs) == 2
    pids = {pid for _, pid in envs.values()}
    assert os.getpid() not in pids and len(pids) == 2
    assert all(value is None for value, _ in envs.values()), envs


def test_zero_workers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--workers"):
        with dask_client(workers=0):
            pass


def test_a_leaked_trim_threshold_does_not_reach_our_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any Dask cluster started earlier in this process leaves the variable in os.environ.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dask_client(workers=1) as client:
        envs = client.run(_worker_env)
    assert [value for value, _ in envs.values()] == [None]
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # restored for the caller
