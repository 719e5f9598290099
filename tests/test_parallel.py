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
    with pytest.raises(ConfigError, match="--workers"), dask_client(workers=0):
        pass


def test_a_leaked_trim_threshold_does_not_reach_our_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any Dask cluster started earlier in this process leaves the variable in os.environ.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dask_client(workers=1) as client:
        envs = client.run(_worker_env)
    assert [value for value, _ in envs.values()] == [None]
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # restored for the caller


def _session_processes(sid: int) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                out.append(f"{p.pid} {p.info['status']} {' '.join(p.info['cmdline'] or [])[:80]}")
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return out


def test_tile_leaves_no_process_behind_and_no_port_warning(tmp_path, cmu_slide) -> None:
    """Regression: the resource tracker outlived `wsi-mil tile` (a zombie under init), and
    every run printed Dask's "Port 8787 is already in use" when the port was taken."""
    import socket
    import subprocess
    import time

    from tests.conftest import WSI_MIL

    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 8787))
        busy.listen()
    except OSError:
        pass  # something else holds it already: the condition under test all the same
    try:
        proc = subprocess.Popen(WSI_MIL + ["tile", str(cmu_slide), "--out", str(tmp_path / "t"), "--workers", "2",
                                           "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        _out, err = proc.communicate(timeout=300)
    finally:
        busy.close()
    assert proc.returncode == 0, err[-2000:]
    assert "already in use" not in err and "8787" not in err
    time.sleep(0.5)
    assert _session_processes(proc.pid) == []


def test_a_killed_worker_is_logged_and_the_run_completes(tmp_path, cohort) -> None:
    import subprocess
    import time

    import psutil

    from tests.conftest import WSI_MIL

    out = tmp_path / "t"
    proc = subprocess.Popen(WSI_MIL + ["tile", str(cohort), "--out", str(out), "--workers", "2", "--save-patches",
                                       "--chunk-patches", "4", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and proc.poll() is None:
        log = out / "tile.log"
        if log.exists() and "started a local Dask cluster" in log.read_text():
            workers = [c for c in psutil.Process(proc.pid).children()
                       if "spawn_main" in " ".join(c.cmdline()) or "forkserver" in " ".join(c.cmdline())]
            if len(workers) >= 2:
                time.sleep(0.3)
                killed = workers[0].pid
                os.kill(killed, 9)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, "no worker process to kill"
    assert proc.returncode == 0, err[-3000:]
    assert "was lost" in (out / "tile.log").read_text()
