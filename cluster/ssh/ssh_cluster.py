"""Run daskem on machines reachable over SSH with ``distributed.SSHCluster``.

    python cluster/ssh/ssh_cluster.py node1 node2 node3 --scheduler-file sched.json
    daskem fit /shared/stack.zarr -k 6 --model model.json --scheduler-file sched.json

The first host runs the scheduler, every host runs workers (one single-threaded process
per core). Needs ``asyncssh`` on this machine, key-based SSH to every host, and the same
Python environment with daskem installed at the same path on all of them; the stack
must be on a filesystem every worker can read (or an fsspec URL).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hosts", nargs="+")
    p.add_argument("--scheduler-file", type=Path, required=True)
    p.add_argument("--procs-per-host", type=int, default=4)
    p.add_argument("--memory-limit", default="auto")
    p.add_argument("--python", default=None, help="remote python executable")
    p.add_argument(
        "--no-host-key-check",
        action="store_true",
        help="do not check the hosts' SSH keys against ~/.ssh/known_hosts (unsafe: only "
        "on a trusted network, e.g. fresh cloud nodes whose keys are not known yet)",
    )
    args = p.parse_args()

    from distributed import Client, SSHCluster

    cluster = SSHCluster(
        [args.hosts[0], *args.hosts],
        # host keys are checked against ~/.ssh/known_hosts unless told not to
        connect_options={"known_hosts": None} if args.no_host_key_check else {},
        worker_options={
            "n_workers": args.procs_per_host,
            "nthreads": 1,
            "memory_limit": args.memory_limit,
            # one BLAS thread per worker; reuse freed chunk buffers (docs/performance.md
            # traps 1 and 3)
            "env": {
                "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "MALLOC_MMAP_THRESHOLD_": "33554432",
                "MALLOC_TRIM_THRESHOLD_": "268435456",
            },
        },
        scheduler_options={"port": 0, "dashboard_address": ":0"},
        remote_python=args.python,
    )
    client = Client(cluster)
    info = {"type": "Scheduler", "address": cluster.scheduler_address}
    args.scheduler_file.write_text(json.dumps(info))
    print(f"scheduler {cluster.scheduler_address}; dashboard {client.dashboard_link}")
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
