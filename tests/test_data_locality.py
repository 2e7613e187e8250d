"""Data stays where it is: an iteration's graph carries parameters, never pixels, and
only the small reduced statistics come back to the client."""

from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest

from daskem import engine
from daskem.model.gmm import GMMModel, GMMParams, compute_precision_cholesky


def _params(D=4, K=3):
    cov = np.stack([np.eye(D)] * K)
    pc, _ = compute_precision_cholesky(cov, "full")
    return GMMParams(
        np.full(K, 1 / K), np.arange(K * D, dtype=float).reshape(K, D), pc, "full", cov
    )


def _arrays_in(graph):
    """Every NumPy array literally embedded in a task graph."""
    found = []

    def walk(obj, depth=0):
        if depth > 20:
            return
        if isinstance(obj, np.ndarray):
            found.append(obj)
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                walk(o, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth + 1)
        elif hasattr(obj, "args") and hasattr(obj, "kwargs"):  # dask Task objects
            walk(list(obj.args), depth + 1)
            walk(dict(obj.kwargs), depth + 1)
        elif hasattr(obj, "value"):  # DataNode
            walk(obj.value, depth + 1)

    for task in dict(graph).values():
        walk(task)
    return found


@pytest.mark.parametrize("n_rows", [40_000, 160_000])
def test_zarr_backed_pass_ships_no_pixels(tmp_path, n_rows):
    X = da.random.RandomState(0).normal(size=(n_rows, 4), chunks=(n_rows // 8, 4))
    path = tmp_path / "x.zarr"
    X.to_zarr(str(path))
    Xz = da.from_zarr(str(path))
    data = engine.ChunkedData(Xz)
    params = _params()
    g = engine.pass_graph(GMMModel(), data, [params])
    biggest = max((a.nbytes for a in _arrays_in(g.__dask_graph__())), default=0)
    assert biggest <= params.means.nbytes * 16, "pixel data embedded in the graph"
    (stats,) = engine.em_pass(GMMModel(), data, [params])
    # what comes back per iteration does not grow with the stack
    assert len(pickle.dumps(stats)) < 20_000
    assert stats.count == n_rows


def test_numpy_input_is_sent_to_distributed_workers_once():
    distributed = pytest.importorskip("distributed")
    X = np.random.default_rng(0).normal(size=(50_000, 4))
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        data = engine.as_chunked(X, chunk_size=10_000)
        g = engine.pass_graph(GMMModel(), data, [_params()])
        biggest = max((a.nbytes for a in _arrays_in(g.__dask_graph__())), default=0)
        assert biggest < 10_000 * 4 * 8, "NumPy chunks travel with every iteration's graph"
        (stats,) = engine.em_pass(GMMModel(), data, [_params()])
        assert stats.count == 50_000
