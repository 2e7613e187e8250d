"""`daskem fit` / `daskem predict` against real scheduler and worker processes on 127.0.0.1:
same model and posterior as the embedded default, a worker SIGKILLed mid-fit, a lost
scheduler then --resume, and TLS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from _procs import MAKE_CERTS, LocalProcesses, _alive

from daskem.synthetic import make_stack, write_stack

pytestmark = pytest.mark.cluster

DASKEM = [sys.executable, "-m", "daskem"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stack") / "s.zarr"
    write_stack(make_stack((384, 384), seed=3), path, chunks=48)  # 64 chunks
    return path


def _run(*args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [*DASKEM, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError(f"daskem {' '.join(args)} -> {out.returncode}\n{out.stderr}")
    return out


FIT = ("--labels", "labels", "-k", "4", "--seed", "0", "--tol", "1e-9", "--max-iter", "12")


def _params(model: Path) -> dict:
    fitted = json.loads(model.read_text())["fitted"]
    return {k: np.asarray(fitted[k]) for k in ("weights", "means", "covariances")}


def _same_model(a: Path, b: Path, rtol: float = 1e-10) -> None:
    pa, pb = _params(a), _params(b)
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, err_msg=k)


@pytest.fixture(scope="module")
def embedded(stack, tmp_path_factory) -> tuple[Path, Path]:
    """The reference: fit and predict on the embedded default cluster."""
    out = tmp_path_factory.mktemp("embedded")
    model, post = out / "m.json", out / "p.zarr"
    _run("fit", str(stack), *FIT, "--model", str(model), "--quiet")
    _run("predict", str(stack), "--model", str(model), "--out", str(post), "--quiet")
    return model, post


def test_fit_and_predict_on_a_running_cluster_equal_the_embedded_default(stack, embedded, tmp_path):
    procs = LocalProcesses(tmp_path / "run", 2)
    try:
        model, post = tmp_path / "m.json", tmp_path / "p.zarr"
        fit = _run("fit", str(stack), *FIT, "--model", str(model), "--scheduler", procs.address)
        assert f"scheduler {procs.address}, 2 workers" in fit.stderr
        _run(
            "predict", str(stack), "--model", str(model), "--out", str(post),
            "--scheduler-file", str(procs.scheduler_file),
        )  # fmt: skip
    finally:
        procs.stop()
    _same_model(model, embedded[0])
    a, b = xr.open_zarr(post), xr.open_zarr(embedded[1])
    np.testing.assert_array_equal(a["label"].values, b["label"].values)
    np.testing.assert_allclose(a["probability"].values, b["probability"].values, rtol=1e-5)


def _wait_for_iterations(log: Path, n: int, proc: subprocess.Popen, timeout: float = 120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"fit ended early: {proc.stderr.read()}")
        if log.exists():
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            seen = sum(x.get("event") == "iteration" for x in lines)
            if seen >= n:
                return seen
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_fit_survives_a_worker_killed_mid_fit(stack, embedded, tmp_path):
    procs = LocalProcesses(tmp_path / "run", 2)
    try:
        model, log = tmp_path / "m.json", tmp_path / "log.jsonl"
        proc = subprocess.Popen(
            [*DASKEM, "fit", str(stack), *FIT, "--model", str(model),
             "--scheduler", procs.address, "--log-json", str(log)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        seen = _wait_for_iterations(log, 2, proc)
        os.kill(procs.pids["worker-1"], signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert not _alive(procs.pids["worker-1"])
        events = [json.loads(x) for x in log.read_text().splitlines()]
        assert sum(e.get("event") == "iteration" for e in events) > seen  # killed mid-fit
        # the lost worker is said, on stderr and in --log-json
        assert "left the cluster (1 connected)" in err
        assert any("left the cluster" in e.get("message", "") for e in events)
    finally:
        procs.stop()
    _same_model(model, embedded[0])


def test_all_workers_lost_waits_then_gives_up_with_worker_timeout(stack, tmp_path):
    procs = LocalProcesses(tmp_path / "run", 2)
    try:
        log = tmp_path / "log.jsonl"
        proc = subprocess.Popen(
            [*DASKEM, "fit", str(stack), *FIT, "--max-iter", "500", "--model",
             str(tmp_path / "m.json"), "--scheduler", procs.address, "--log-json", str(log),
             "--worker-timeout", "6"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_iterations(log, 2, proc)
        for name in ("worker-1", "worker-2"):
            os.kill(procs.pids[name], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # fails instead of hanging
    finally:
        procs.stop()
    assert proc.returncode == 1, err
    assert "waiting for workers (0 connected)" in err
    assert "no Dask worker connected for 6 s" in err and "--resume" in err
    assert not (tmp_path / "m.json").exists()


def test_workers_paused_at_their_memory_limit_stop_with_the_settings(stack, tmp_path):
    # a limit below what a worker needs to import daskem: it pauses at once
    procs = LocalProcesses(tmp_path / "run", 1, env={"DASKEM_MEMORY_LIMIT": "120MiB"})
    try:
        out = _run(
            "fit", str(stack), *FIT, "--model", str(tmp_path / "m.json"),
            "--scheduler", procs.address, "--worker-timeout", "5", check=False, timeout=180,
        )  # fmt: skip
    finally:
        procs.stop()
    assert out.returncode == 1, out.stderr
    assert "every worker is at its memory limit (120 MiB per worker)" in out.stderr
    assert "--memory-limit" in out.stderr
    assert not (tmp_path / "m.json").exists()


def test_lost_scheduler_stops_with_advice_and_resume_finishes(stack, embedded, tmp_path):
    procs = LocalProcesses(tmp_path / "run", 2)
    model, log, ckpt = tmp_path / "m.json", tmp_path / "log.jsonl", tmp_path / "ckpt"
    try:
        proc = subprocess.Popen(
            [*DASKEM, "fit", str(stack), *FIT, "--model", str(model), "--checkpoint",
             str(ckpt), "--scheduler", procs.address, "--log-json", str(log)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_iterations(log, 2, proc)
        os.kill(procs.pids["scheduler"], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        procs.stop()
    assert proc.returncode == 1, err
    assert "lost the connection to the Dask scheduler" in err and "--resume" in err
    assert not model.exists()
    again = LocalProcesses(tmp_path / "run2", 2)
    try:
        _run(
            "fit", str(stack), *FIT, "--model", str(model), "--checkpoint", str(ckpt),
            "--resume", "--scheduler", again.address,
        )  # fmt: skip
    finally:
        again.stop()
    _same_model(model, embedded[0], rtol=0)  # resumed: exactly the uninterrupted model


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_fit_with_certificates_and_refused_without(stack, embedded, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(certs)], check=True, capture_output=True)
    procs = LocalProcesses(tmp_path / "run", 2, env={"DASKEM_TLS_DIR": str(certs)})
    try:
        assert procs.address.startswith("tls://")
        model = tmp_path / "m.json"
        tls = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "node.pem"),
               "--tls-key", str(certs / "node-key.pem")]  # fmt: skip
        ok = _run(
            "fit", str(stack), *FIT, "--model", str(model), "--scheduler", procs.address, *tls
        )
        assert "plain HTTP" in ok.stderr + ok.stdout
        refused = _run(
            "fit", str(stack), *FIT, "--model", str(tmp_path / "x.json"),
            "--scheduler", procs.address, check=False, timeout=120,
        )  # fmt: skip
        # certificates of another CA, and certificates against a tcp:// address
        other = tmp_path / "other-certs"
        subprocess.run(["bash", str(MAKE_CERTS), str(other)], check=True, capture_output=True)
        wrong = [a.replace(str(certs), str(other)) for a in tls]
        wrong_ca = _run(
            "fit", str(stack), *FIT, "--model", str(tmp_path / "x.json"),
            "--scheduler", procs.address, *wrong, check=False, timeout=120,
        )  # fmt: skip
        tcp = _run(
            "fit", str(stack), *FIT, "--model", str(tmp_path / "x.json"),
            "--scheduler", procs.address.replace("tls://", "tcp://"), *tls, check=False,
            timeout=120,
        )  # fmt: skip
    finally:
        procs.stop()
    _same_model(model, embedded[0])
    assert refused.returncode == 2, refused.stderr
    assert "the scheduler speaks TLS; give --tls-ca-file" in refused.stderr
    assert wrong_ca.returncode == 2, wrong_ca.stderr
    assert "TLS with the scheduler at tls://" in wrong_ca.stderr
    assert "--tls-ca-file the CA that signed" in wrong_ca.stderr
    assert tcp.returncode == 2, tcp.stderr
    assert "--tls-* options need a tls:// scheduler" in tcp.stderr
    assert not (tmp_path / "x.json").exists()
