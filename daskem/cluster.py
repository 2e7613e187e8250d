"""Where the computation runs: the only module that makes a ``distributed.Client``.

Library functions never start a cluster behind the user's back: they use whatever
scheduler is active (an existing ``Client``, or Dask's default threaded scheduler).
Scripts and the command line call :func:`connect`, which either joins an existing
cluster (address or scheduler file) or starts an embedded ``LocalCluster`` sized to
the machine, and shuts down what it started on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("daskem")

__all__ = ["connect", "peak_rss"]


def peak_rss() -> int:
    """Peak resident set size of the calling process, in bytes.

    ``VmHWM`` of this address space where ``/proc`` has it (unlike ``ru_maxrss`` it does
    not carry a parent's peak into a spawned child such as a Dask worker), else
    ``ru_maxrss``. ``client.run(peak_rss)`` gives every worker's.
    """
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    *,
    scheduler_file: str | os.PathLike | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = "auto",
    processes: bool = True,
    dashboard_address: str | None = ":0",
    security: Any = None,
    tls_ca_file: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client`` for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``, ``tls://...``). Default:
        Dask's ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``) if set.
    scheduler_file : path, optional
        Scheduler file written by ``dask scheduler --scheduler-file``.
    n_workers, threads_per_worker, memory_limit, processes, dashboard_address
        Passed to ``distributed.LocalCluster`` when neither ``scheduler`` nor
        ``scheduler_file`` is given. By default one single-threaded worker process per
        core (NumPy kernels hold the GIL between small calls, so processes scale better
        than threads on few cores).
    security : distributed.Security, optional
        TLS settings for the connection. Without it (and without ``tls_*``), Dask's
        configuration (``distributed.comm.tls.*``, ``DASK_DISTRIBUTED__COMM__TLS__*``)
        applies as usual.
    tls_ca_file, tls_cert, tls_key : path, optional
        CA certificate, client certificate and key for a ``tls://`` scheduler (the
        names of Dask's own ``--tls-ca-file --tls-cert --tls-key`` options).

    Yields
    ------
    distributed.Client
    """
    from distributed import Client, LocalCluster

    if scheduler and scheduler_file:
        raise ValueError("give either a scheduler address or a scheduler file, not both")
    if not scheduler and not scheduler_file:
        import dask

        scheduler = dask.config.get("scheduler-address", None)  # DASK_SCHEDULER_ADDRESS
    if any(v is not None for v in (tls_ca_file, tls_cert, tls_key)):
        if security is not None:
            raise ValueError("give either security or tls_* files, not both")
        security = _tls_security(tls_ca_file, tls_cert, tls_key)
    if scheduler or scheduler_file:
        kwargs: dict[str, Any] = {"security": security} if security is not None else {}
        if scheduler_file:
            kwargs["scheduler_file"] = os.fspath(scheduler_file)
            client = Client(**kwargs)
        else:
            client = Client(scheduler, **kwargs)
        logger.info("connected to %s", client.scheduler.address)
        try:
            yield client
        finally:
            client.close()
        return
    cores = os.cpu_count() or 1
    if n_workers is None:
        n_workers = cores if threads_per_worker is None else max(1, cores // threads_per_worker)
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // n_workers)
    # Worker processes inherit a blocked SIGINT: Ctrl-C reaches only this process,
    # which then shuts the cluster down cleanly (no traceback from every worker). A Ctrl-C
    # during the start interrupts once the cluster is up, which is then closed here.
    cluster = None
    try:
        with _sigint_ignored(), _worker_malloc_settings(_worker_limit(memory_limit, n_workers)):
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                memory_limit=memory_limit,
                processes=processes,
                dashboard_address=dashboard_address,
            )
        client = Client(cluster)
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise
    logger.info("embedded cluster: %d workers, dashboard %s", n_workers, client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


# glibc malloc for embedded workers: distributed's default trim threshold (64 KiB) turns
# every large temporary into a fresh mmap and its page faults; these settings made
# Zarr-backed passes about 1.4x faster here (scripts/bench.py). A user's own values win.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def _worker_limit(memory_limit: Any, n_workers: int) -> int | None:
    """Bytes of memory a worker may use (None: no limit or unknown)."""
    from dask.utils import parse_bytes

    if memory_limit in (None, 0, "0"):
        return None
    if memory_limit == "auto":
        try:
            import psutil

            return int(psutil.virtual_memory().total // max(n_workers, 1))
        except ImportError:  # pragma: no cover - psutil comes with distributed
            return None
    try:
        if isinstance(memory_limit, str):
            return int(parse_bytes(memory_limit))
        return int(memory_limit)
    except (TypeError, ValueError):
        return None


def _malloc_settings(limit: int | None) -> dict[str, str]:
    """:data:`WORKER_MALLOC`, with freed memory kept by glibc (the trim threshold) at most
    an eighth of a worker's memory limit: memory a worker keeps but does not use still
    counts towards distributed's pause threshold (80 %), and a worker paused by it never
    resumes (seen with 400 MiB workers: a fit waited forever)."""
    out = dict(WORKER_MALLOC)
    if limit:
        trim = min(int(out["MALLOC_TRIM_THRESHOLD_"]), max(limit // 8, 4 * 2**20))
        out["MALLOC_TRIM_THRESHOLD_"] = str(trim)
        out["MALLOC_MMAP_THRESHOLD_"] = str(min(int(out["MALLOC_MMAP_THRESHOLD_"]), trim))
    return out


@contextlib.contextmanager
def _worker_malloc_settings(limit: int | None = None) -> Iterator[None]:
    import dask

    settings = _malloc_settings(limit)
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    user = {k: os.environ[k] for k in settings if k in os.environ}
    if user:  # the user chose: leave it alone
        yield
        return
    environ.update(settings)
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # the nanny prefers the parent's environment
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # blocked, not ignored: the worker processes (and the cluster's threads) inherit the
    # blocked mask and never see Ctrl-C, while a Ctrl-C pressed during the start stays
    # pending here and interrupts as soon as the cluster is up (an ignored one was lost)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _tls_security(ca_file, cert, key) -> Any:
    """A ``distributed.Security`` requiring encryption, from certificate files."""
    from distributed import Security

    files = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    for option, path in files.items():
        if path is None:
            raise ValueError(f"TLS needs {option} too (give --tls-ca-file, --tls-cert, --tls-key)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: {path} does not exist")
    return Security(
        tls_ca_file=os.fspath(ca_file),
        tls_client_cert=os.fspath(cert),
        tls_client_key=os.fspath(key),
        require_encryption=True,
    )
