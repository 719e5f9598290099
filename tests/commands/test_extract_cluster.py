"""`extract-features --scheduler`: slides sharded over the workers of an existing Dask
cluster, started as a user with a real cluster would (``dask scheduler``, ``dask worker``
as separate processes), through the same per-shard code as a local run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WSI_MIL
from wsi_mil.commands.extract_features import cluster_plan
from wsi_mil.commands.tile import run_tile
from wsi_mil.config import ExtractConfig, TileConfig
from wsi_mil.data.manifest import read_manifest
from wsi_mil.errors import ConfigError
from wsi_mil.io.features import FeatureStore

DASK = [str(Path(sys.executable).with_name("dask"))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two one-thread workers in their own processes; yields the address."""
    d = tmp_path_factory.mktemp("dask")
    sched_file = d / "scheduler.json"
    procs = [subprocess.Popen(DASK + ["scheduler", "--scheduler-file", str(sched_file), "--host", "127.0.0.1", "--port", "0",
                                      "--dashboard-address", ":0"], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        for i in range(2):
            procs.append(subprocess.Popen(DASK + ["worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                                  "--nworkers", "1", "--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1"],
                                          cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory, cohort) -> Path:
    """Tiled before the cluster starts (a local tiling run ends its own leftover children)."""
    tmp = tmp_path_factory.mktemp("cluster_run")
    assert run_tile(read_manifest(cohort), out_dir=tmp / "tiles", config=TileConfig(patch_size=128, mpp=2.0), workers=1,
                    progress=False).ok
    return tmp / "tiles"


def test_extraction_on_an_existing_cluster_equals_the_local_run_and_resumes(tiles, cluster) -> None:
    tmp_path = tiles.parent
    out = tmp_path / "cluster"
    # through the CLI, from another working directory, with relative paths
    res = subprocess.run(WSI_MIL + ["extract-features", "tiles", "--out", "cluster", "--scheduler", cluster,
                                    "--readers", "0", "--batch-size", "16", "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((out / "features_report.json").read_text())
    assert report["ok"] and report["counts"] == {"ok": 4}
    from wsi_mil.commands.extract_features import run_extract

    local = run_extract([tiles], out_dir=tmp_path / "local", config=ExtractConfig(devices="cpu", readers=0, batch_size=16),
                        progress=False)
    assert set(local.to_dict()) == set(report)  # the same report
    for o in local.outcomes:
        with FeatureStore(o.store) as fa, FeatureStore(out / "features" / Path(o.store).name) as fb:
            np.testing.assert_allclose(fb.features, fa.features, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(fb.coords, fa.coords)
            assert fb.attrs["encoder_fingerprint"] == fa.attrs["encoder_fingerprint"]
    # both workers took a shard (2 workers, 4 slides balanced by patch count)
    from distributed import Client

    with Client(cluster) as c:
        done = c.run(lambda dask_worker: len({str(e[0]) for e in dask_worker.state.log if "wsi-mil-extract" in str(e[0])}))
    assert len(done) == 2 and all(v > 0 for v in done.values())
    # a re-run resumes: every slide is cached, nothing is recomputed
    again = run_extract([tiles], out_dir=out, config=ExtractConfig(readers=0, batch_size=16), progress=False, scheduler=cluster)
    assert [o.status for o in again.outcomes] == ["cached"] * 4


def test_cluster_plan_claims_one_gpu_per_shard_or_uses_every_cpu_worker() -> None:
    gpu = {"a": {"resources": {"GPU": 1}}, "b": {"resources": {"GPU": 1}}, "c": {"resources": {}}}
    assert cluster_plan(gpu, "auto") == (2, "cuda", {"GPU": 1})
    assert cluster_plan(gpu, "cpu") == (3, "cpu", None)
    cpu = {"a": {}, "b": {"resources": {}}}
    assert cluster_plan(cpu, "auto") == (2, "cpu", None)
    with pytest.raises(ConfigError, match="--resources GPU=1"):
        cluster_plan(cpu, "cuda")
