"""Engine-level guarantees: chunking / reduction-tree / scheduler invariance,
one dask compute per EM iteration, and EM monotonicity."""

import os
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from hypothesis import given, settings
from hypothesis import strategies as st

import daskem
from daskem import GaussianMixture

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")
N, D, K = 4000, 3, 3
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(scope="module")
def data(make_data):
    return make_data(N, D, K, seed=3, sep=4.0)


def _estimator(X, y, make_init, covariance_type="full", **kwargs):
    kwargs.setdefault("tol", 1e-8)
    kwargs.setdefault("max_iter", 30)
    return GaussianMixture(
        K,
        covariance_type=covariance_type,
        **make_init(X, y, K, covariance_type),
        **kwargs,
    )


def _reference(X, y, make_init, fit_quiet, covariance_type="full"):
    with dask.config.set(scheduler="synchronous"):
        return fit_quiet(_estimator(X, y, make_init, covariance_type), X)


CHUNKINGS = {
    "one-chunk": lambda X: da.from_array(X, chunks=X.shape),
    "uneven": lambda X: da.from_array(X, chunks=((1, 999, 37, 2000, 963), (D,))),
    "zero-length": lambda X: da.from_array(X, chunks=((0, 500, 1, 3499), (D,))),
    "feature-chunks": lambda X: da.from_array(X, chunks=((700,) * 5 + (500,), (1, 2))),
}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_chunking_invariance(
    data, make_init, fit_quiet, assert_same_fit, covariance_type, chunking
):
    X, y = data
    ref = _reference(X, y, make_init, fit_quiet, covariance_type)
    with dask.config.set(scheduler="synchronous"):
        gm = fit_quiet(_estimator(X, y, make_init, covariance_type), CHUNKINGS[chunking](X))
    assert_same_fit(gm, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("chunk_size", [1, 333, 4000])
def test_numpy_chunk_size_invariance(data, make_init, fit_quiet, assert_same_fit, chunk_size):
    X, y = data
    X = X[:300] if chunk_size == 1 else X  # keep the 1-row-chunk graph small
    y = y[:300] if chunk_size == 1 else y
    ref = _reference(X, y, make_init, fit_quiet)
    with dask.config.set(scheduler="synchronous"):
        gm = fit_quiet(_estimator(X, y, make_init, chunk_size=chunk_size), X)
    assert_same_fit(gm, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("split_every", [2, 4, 32])
def test_split_every_invariance(data, make_init, fit_quiet, assert_same_fit, split_every):
    X, y = data
    Xd = da.from_array(X, chunks=(97, D))  # 42 chunks: a deep tree for 2
    ref = _reference(X, y, make_init, fit_quiet)
    with dask.config.set(scheduler="synchronous"):
        gm = fit_quiet(_estimator(X, y, make_init, split_every=split_every), Xd)
    assert_same_fit(gm, ref, rtol=RTOL, atol=ATOL)


def test_threaded_equals_synchronous(data, make_init, fit_quiet, assert_same_fit):
    X, y = data
    Xd = da.from_array(X, chunks=(250, D))
    fits = {}
    for scheduler in ("synchronous", "threads"):
        with dask.config.set(scheduler=scheduler):
            fits[scheduler] = fit_quiet(_estimator(X, y, make_init), Xd)
    assert_same_fit(fits["threads"], fits["synchronous"], rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    # Worker processes must be able to import daskem.
    root = str(Path(daskem.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, old) if p)
    try:
        with distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as lc:
            yield lc
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.cluster
def test_distributed_cluster_equals_local(cluster, data, make_init, fit_quiet, assert_same_fit):
    from distributed import Client, get_task_stream

    X, y = data
    Xd = da.from_array(X, chunks=(500, D))
    ref = _reference(X, y, make_init, fit_quiet)
    with Client(cluster) as client:
        with get_task_stream(client) as stream:
            gm = fit_quiet(_estimator(X, y, make_init), Xd)
        # The EM passes really ran on the cluster (not a local scheduler).
        assert len(stream.data) >= gm.n_iter_
        proba = gm.predict_proba(Xd)
        assert isinstance(proba, da.Array)
        proba = proba.compute()
    assert_same_fit(gm, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(proba, ref.predict_proba(X), rtol=RTOL, atol=ATOL)


class _ComputeCounter(Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def _start(self, dsk):
        self.count += 1


def _count_computes(X_in, X, y, make_init, max_iter):
    gm = _estimator(X, y, make_init, tol=0.0, max_iter=max_iter)
    with dask.config.set(scheduler="threads"), _ComputeCounter() as counter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gm.fit(X_in)
    assert gm.n_iter_ == max_iter
    return counter.count


@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_one_compute_per_iteration(data, make_init, kind):
    X, y = data
    X_in = da.from_array(X, chunks=(1000, D)) if kind == "dask" else X
    one = _count_computes(X_in, X, y, make_init, max_iter=1)
    six = _count_computes(X_in, X, y, make_init, max_iter=6)
    assert one >= 1
    assert six - one == 5


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(50, 400),
    d=st.integers(1, 4),
    k=st.integers(1, 4),
    k_true=st.integers(1, 4),
    sep=st.floats(0.0, 8.0),
    covariance_type=st.sampled_from(COVARIANCE_TYPES),
    init_params=st.sampled_from(INIT_PARAMS),
    chunk_size=st.sampled_from([37, 128, 65536]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lower_bound_is_monotone(
    make_data,
    n,
    d,
    k,
    k_true,
    sep,
    covariance_type,
    init_params,
    chunk_size,
    seed,
):
    X, _ = make_data(n, d, k_true, seed=seed, sep=sep)
    gm = GaussianMixture(
        k,
        covariance_type=covariance_type,
        init_params=init_params,
        tol=1e-7,
        max_iter=25,
        chunk_size=chunk_size,
        random_state=seed,
    )
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gm.fit(X)
    lbs = np.asarray(gm.lower_bounds_)
    assert len(lbs) == gm.n_iter_ >= 1
    assert np.all(np.isfinite(lbs))
    np.testing.assert_allclose(gm.lower_bound_, lbs[-1])
    if not gm.reseeds_:
        assert np.all(np.diff(lbs) >= -1e-9 * (1 + np.abs(lbs[1:])))


def test_auto_chunk_rows():
    from daskem.engine import auto_chunk_rows

    # 10 M float32 pixels x 8 attributes on 2 threads: 10 chunks of 1 M rows (32 MB)
    assert auto_chunk_rows(10_000_000, 32, 2) == 1_000_000
    # 9.6 chunks' worth on 4 threads: 12 equal chunks
    assert auto_chunk_rows(10_000_000, 32, 4) == 833_334
    # small inputs: at least two chunks per thread, never below 4,096 rows
    assert auto_chunk_rows(100_000, 32, 2) == 25_000
    assert auto_chunk_rows(1_000, 32, 8) == 4096
    data = daskem.engine.as_chunked(np.zeros((50_000, 4), dtype=np.float32))
    assert len(data.X.chunks[0]) >= 2
    with pytest.raises(ValueError, match="chunk_size"):
        GaussianMixture(2, chunk_size="big").fit(np.zeros((100, 2)))


def test_block_task_runs_blas_on_one_thread():
    """A worker whose BLAS has several threads (other pre-spawn settings) is pinned to
    one by the first block task (docs/performance.md trap 1)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from daskem.engine import _block_task
    from daskem.model.gmm import GMMModel

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        pytest.skip("no BLAS library found by threadpoolctl")
    X = np.random.default_rng(0).normal(size=(200, 3))
    gm = GaussianMixture(2, random_state=0)
    gm._check_parameters(3)
    p = gm._initial_params(daskem.engine.as_chunked(X), 0)
    with threadpool_limits(limits=2, user_api="blas"):
        _block_task(GMMModel(), [p], X, None, None)
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
