"""The documented SLURM recipe (pipelines/slurm_extract.py): its generated job script."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "slurm_extract.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("slurm_extract", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_gpu_job_script_asks_slurm_for_a_gpu_and_advertises_it_to_dask() -> None:
    cluster = _recipe().make_cluster(partition="gpu", account="path-lab", cores=8, memory="48GB", walltime="04:00:00",
                                     gpus_per_job=1, python="/opt/venv/bin/python")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    for directive in ("#SBATCH -J wsi-mil-extract", "#SBATCH -p gpu", "#SBATCH -A path-lab", "#SBATCH -n 1",
                      "#SBATCH --cpus-per-task=8", "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:1"):
        assert directive in lines, (directive, script)
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line or "dask worker" in line)
    assert worker.startswith("/opt/venv/bin/python")
    assert "--nthreads 1" in worker and "--resources GPU=1" in worker and worker.count("--nthreads") == 1


def test_cpu_job_script_has_no_gpu_and_the_cli_prints_it() -> None:
    res = subprocess.run([sys.executable, str(RECIPE), "tiles", "--out", "features", "--partition", "cpu", "--cores", "4",
                          "--print-job-script"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH -p cpu" in res.stdout and "#SBATCH --cpus-per-task=4" in res.stdout
    assert "gres" not in res.stdout and "GPU=" not in res.stdout
