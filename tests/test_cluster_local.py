"""Real multi-process clusters: a `dask scheduler` and `dask worker` processes on 127.0.0.1,
started with cluster/local/start.sh and stopped by their process ids."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import dask.array as da
import numpy as np
import pytest
from _procs import MAKE_CERTS, ROOT, LocalProcesses, _alive

from daskem import GaussianMixture
from daskem.cluster import connect

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def two_workers(tmp_path):
    # workers import this module to run _slow_copy
    procs = LocalProcesses(tmp_path / "run", 2, env={"PYTHONPATH": str(ROOT / "tests")})
    yield procs
    procs.stop()


def _data():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(c, 1.0, (4000, 3)) for c in (0.0, 2.0, 4.5)])
    return da.from_array(X, chunks=500)


def _fit(X, callback=None):
    init = dict(
        weights_init=[0.3, 0.3, 0.4],
        means_init=[[0.5] * 3, [1.5] * 3, [4.0] * 3],
        precisions_init=np.stack([np.eye(3)] * 3),
    )
    return GaussianMixture(3, tol=1e-9, max_iter=25, **init).fit(X, callback=callback)


def _same(a: GaussianMixture, b: GaussianMixture) -> None:
    for attr in ("weights_", "means_", "covariances_", "lower_bounds_"):
        np.testing.assert_allclose(getattr(a, attr), getattr(b, attr), rtol=1e-10)
    assert a.n_iter_ == b.n_iter_


def test_processes_fit_equals_threaded(two_workers):
    X = _data()
    ref = _fit(X)
    with connect(scheduler_file=two_workers.scheduler_file) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        gm = _fit(X)
        gm_np = _fit(X.compute())
    _same(gm, ref)
    _same(gm_np, ref)


def _slow_copy(block):
    time.sleep(0.05)
    return block.copy()


def test_worker_killed_mid_iteration_gives_the_same_model(two_workers):
    """SIGKILL one worker process while a pass is running: Dask recomputes its tasks on
    the other worker and the fit ends with the same model."""
    X = _data()
    ref = _fit(X)
    X = X.rechunk(2000)  # 6 chunks, 0.15 s per pass on two workers
    slow = X.map_blocks(_slow_copy, dtype=X.dtype)
    killed: list[int] = []

    def kill_during_next_pass(info):
        if info.iteration == 2 and not killed:
            pid = two_workers.pids["worker-1"]
            threading.Timer(0.07, os.kill, (pid, signal.SIGKILL)).start()
            killed.append(pid)

    with connect(two_workers.address) as client:
        gm = _fit(slow, callback=kill_during_next_pass)
        workers_left = len(client.scheduler_info()["workers"])
    assert killed and not _alive(killed[0])
    assert workers_left == 1
    _same(gm, ref)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_cluster_requires_certificates(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(certs)], check=True, capture_output=True)
    procs = LocalProcesses(tmp_path / "run", 1, env={"DASKEM_TLS_DIR": str(certs)})
    try:
        assert procs.address.startswith("tls://")
        X = _data()
        with connect(
            procs.address,
            tls_ca_file=certs / "ca.pem",
            tls_cert=certs / "node.pem",
            tls_key=certs / "node-key.pem",
        ):
            gm = _fit(X)
        _same(gm, _fit(X))
        from distributed import Client

        with pytest.raises(Exception, match="TLS|ssl|SSL|tls"):
            Client(procs.address, timeout="5s", set_as_default=False)
    finally:
        procs.stop()


def test_worker_memory_limit_below_a_chunk_fails_with_advice():
    """Workers whose memory limit is below one chunk's working set are killed by their
    nanny; the fit stops with a message naming the setting instead of hanging."""
    import dask
    from distributed import Client, LocalCluster

    from daskem.engine import WorkerMemoryError

    X = da.random.RandomState(0).normal(size=(8_000_000, 8), chunks=(8_000_000, 8))  # 512 MB
    init = dict(
        weights_init=[0.5, 0.5],
        means_init=np.array([[0.0] * 8, [1.0] * 8]),
        precisions_init=np.stack([np.eye(8)] * 2),
    )
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                memory_limit="300MiB",
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
            ) as cluster,
            Client(cluster),
        ):
            with pytest.raises(WorkerMemoryError, match="memory-limit"):
                GaussianMixture(2, max_iter=2, **init).fit(X)


def test_worker_malloc_settings_follow_the_memory_limit():
    from daskem.cluster import WORKER_MALLOC, _malloc_settings, _worker_limit

    assert _malloc_settings(None) == WORKER_MALLOC
    small = _malloc_settings(_worker_limit("400MiB", 2))
    # freed memory glibc keeps is at most an eighth of the limit (it counts towards the
    # pause threshold, and a worker paused by it never resumes)
    assert int(small["MALLOC_TRIM_THRESHOLD_"]) == 50 * 2**20
    assert int(small["MALLOC_MMAP_THRESHOLD_"]) <= int(small["MALLOC_TRIM_THRESHOLD_"])
    big = _malloc_settings(_worker_limit("16GiB", 2))
    assert big == WORKER_MALLOC
    assert _worker_limit("auto", 2) > 0 and _worker_limit(None, 2) is None


def test_ctrl_c_at_any_stage_exits_130_without_noise(tmp_path):
    """SIGINT while the embedded cluster starts (it was lost then) or while it works."""
    import signal
    import subprocess
    import sys

    for marker in ("stack: (", "fitting"):
        out_dir = tmp_path / marker[:3]
        proc = subprocess.Popen(
            [sys.executable, "-m", "daskem", "demo", "--size", "600", "--out", out_dir],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
        out = "".join(lines) + rest
        assert proc.returncode == 130, out
        assert out.strip().endswith("interrupted"), out
        assert "Traceback" not in out and "AllExit" not in out and "never retrieved" not in out


def test_add_worker_joins_and_stop_stops_it_too(tmp_path):
    import os
    import subprocess
    import sys

    from _procs import ROOT, LocalProcesses, _alive, _pids
    from distributed import Client

    procs = LocalProcesses(tmp_path / "run", 1)
    try:
        r = subprocess.run(
            ["bash", str(ROOT / "cluster" / "local" / "add-worker.sh"), str(tmp_path / "run")],
            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "worker-2 joined: 2 workers" in r.stdout
        with Client(scheduler_file=str(procs.scheduler_file)) as c:
            assert len(c.scheduler_info()["workers"]) == 2
        procs.pids = _pids(tmp_path / "run")  # the added worker is stopped with the rest
        assert "worker-2" in procs.pids
    finally:
        procs.stop()
    assert not [p for p in procs.pids.values() if _alive(p)]
