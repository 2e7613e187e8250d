"""Start a Dask cluster on SLURM with dask-jobqueue and keep it up for daskem jobs.

    python cluster/slurm/start_cluster.py --jobs 4 --scheduler-file ~/daskem-scheduler.json
    daskem fit /data/stack.zarr -k 6 --labels labels --model model.json \
        --scheduler-file ~/daskem-scheduler.json --checkpoint ckpt/
    daskem predict /data/stack.zarr --model model.json --out posterior.zarr \
        --scheduler-file ~/daskem-scheduler.json

The scheduler runs in this process (keep it running, e.g. in tmux or a small batch
job); workers are SLURM jobs configured by cluster/slurm/jobqueue.yaml (or any
``jobqueue.slurm`` Dask config). Ctrl-C cancels the worker jobs and stops the scheduler.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask
import yaml


def make_cluster(
    config: Path | None,
    jobs: int,
    scheduler_file: Path | None,
    scheduler_options: dict | None = None,
    **overrides,
):
    """A ``SLURMCluster`` from our YAML config (if given) and keyword overrides."""
    from dask_jobqueue import SLURMCluster

    if config is not None:
        dask.config.update(dask.config.config, yaml.safe_load(config.read_text()), priority="new")
    scheduler_options = dict(scheduler_options or {})
    if scheduler_file:
        scheduler_options["scheduler_file"] = str(scheduler_file)
    cluster = SLURMCluster(scheduler_options=scheduler_options, **overrides)
    if jobs:
        cluster.scale(jobs=jobs)
    return cluster


def main() -> None:
    here = Path(__file__).parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=here / "jobqueue.yaml")
    p.add_argument("--jobs", type=int, default=2, help="number of SLURM worker jobs")
    p.add_argument("--scheduler-file", type=Path, required=True)
    p.add_argument("--print-job-script", action="store_true", help="print it and exit")
    args = p.parse_args()
    cluster = make_cluster(
        args.config, 0 if args.print_job_script else args.jobs, args.scheduler_file
    )
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return
    print(f"scheduler {cluster.scheduler_address}; dashboard {cluster.dashboard_link}")
    print(f"scheduler file {args.scheduler_file}; Ctrl-C to stop")
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
