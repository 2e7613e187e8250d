"""Start and stop real Dask scheduler/worker processes for tests, by process id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "cluster" / "local" / "start.sh"
STOP = ROOT / "cluster" / "local" / "stop.sh"
MAKE_CERTS = ROOT / "cluster" / "tls" / "make-certs.sh"


def _pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as stopped
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


class LocalProcesses:
    def __init__(self, run_dir: Path, n_workers: int, env: dict | None = None):
        self.run_dir = run_dir
        full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
        subprocess.run(
            ["bash", str(START), str(n_workers), str(run_dir)],
            check=True,
            env=full_env,
            timeout=120,
            capture_output=True,
        )
        self.pids = _pids(run_dir)
        self.scheduler_file = run_dir / "scheduler.json"
        self.address = json.loads(self.scheduler_file.read_text())["address"]

    def stop(self) -> None:
        subprocess.run(["bash", str(STOP), str(self.run_dir)], check=True, timeout=60)
        deadline = time.monotonic() + 10  # SIGKILL is asynchronous; stop.sh waits too
        while [p for p in self.pids.values() if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in self.pids.values() if _alive(p)], "a process survived stop.sh"
