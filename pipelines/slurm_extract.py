"""Feature extraction on a SLURM cluster, through Dask (dask-jobqueue's SLURMCluster).

Each SLURM job runs one Dask worker. With ``--gpus-per-job 1`` the job asks SLURM for a
GPU (``--gres=gpu:1``) and the worker advertises it as the Dask resource ``GPU=1``, so
``extract-features --scheduler`` puts exactly one shard of slides on each GPU; without it
every job is a CPU worker. The workers read and write the same paths as this script: run
it from a shared filesystem, with the same virtual environment on every node.

    pip install 'wsi-mil[slurm]'
    python pipelines/slurm_extract.py TILES --out FEATURES --jobs 4 --partition gpu \\
        --gpus-per-job 1 --cores 8 --memory 48GB --walltime 04:00:00 \\
        -- --encoder resnet50.tv_in1k@layer3 --weights resnet50.safetensors --precision bf16

    python pipelines/slurm_extract.py ... --print-job-script     # check the script, submit nothing

Everything after ``--`` goes to ``wsi-mil extract-features`` unchanged; a killed run
resumes like any other (re-run the same command).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any


def make_cluster(*, partition: str | None, cores: int, memory: str, walltime: str, gpus_per_job: int = 0,
                 account: str | None = None, python: str = sys.executable, local_directory: str = "$TMPDIR",
                 extra_directives: list[str] | None = None) -> Any:
    """A ``SLURMCluster`` whose jobs are one Dask worker each, with one task slot (one shard
    of slides at a time) and ``cores`` CPUs for its patch readers."""
    from dask_jobqueue import SLURMCluster

    directives = list(extra_directives or [])
    worker_args: list[str] = []
    if gpus_per_job:
        directives.append(f"--gres=gpu:{gpus_per_job}")
        worker_args += ["--resources", f"GPU={gpus_per_job}"]
    # one task slot per worker (cores=1: one shard at a time, its readers use the job's CPUs)
    return SLURMCluster(
        queue=partition, account=account, cores=1, job_cpu=cores, processes=1, memory=memory, walltime=walltime,
        python=python, local_directory=local_directory, job_extra_directives=directives,
        worker_extra_args=worker_args, job_name="wsi-mil-extract", scheduler_options={"dashboard_address": ":0"},
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="tile output folders (as for extract-features)")
    p.add_argument("--out", required=True, help="output folder of extract-features")
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs = Dask workers")
    p.add_argument("--partition", help="SLURM partition (queue)")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--gpus-per-job", type=int, default=0, help="GPUs per job (0: CPU workers)")
    p.add_argument("--cores", type=int, default=8, help="CPU cores per job (patch readers)")
    p.add_argument("--memory", default="32GB", help="memory per job")
    p.add_argument("--walltime", default="04:00:00", help="time limit per job")
    p.add_argument("--print-job-script", action="store_true", help="print the job script and exit")
    args = p.parse_args(argv)
    cluster = make_cluster(partition=args.partition, account=args.account, cores=args.cores, memory=args.memory,
                           walltime=args.walltime, gpus_per_job=args.gpus_per_job)
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        from distributed import Client

        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(1)
        devices = ["--devices", "cuda"] if args.gpus_per_job else ["--devices", "cpu"]
        cmd = [sys.executable, "-m", "wsi_mil.cli", "extract-features", *args.inputs, "--out", args.out,
               "--scheduler", cluster.scheduler_address, *devices, *passthrough]
        return subprocess.call(cmd)
    finally:
        cluster.close()


if __name__ == "__main__":
    raise SystemExit(main())
