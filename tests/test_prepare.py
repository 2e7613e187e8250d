"""The one pass before EM (:func:`daskem.engine.prepare`): cache fill, the start's sample
and the labels' summary in a single read of the data, whatever the density of labels."""

import threading
import warnings

import dask
import dask.array as da
import numpy as np
import pytest

from daskem import GaussianMixture, GaussianMixtureClassifier, engine
from daskem.hmm import GaussianHMMClassifier


class _Reads:
    """Counts reads of every chunk of a source array (a thread-safe tally per chunk)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_chunk: dict[int, int] = {}

    def wrap(self, a: da.Array) -> da.Array:
        def read(block, block_info=None):
            i = block_info[0]["chunk-location"][0]
            with self.lock:
                self.by_chunk[i] = self.by_chunk.get(i, 0) + 1
            return block

        # a fresh name: no other graph shares these keys
        return a.map_blocks(read, dtype=a.dtype, name=f"source-{id(self)}")

    def wrap2d(self, a: da.Array) -> da.Array:
        """The same for a 2-D array, its chunks numbered in C order."""
        grid = a.numblocks

        def read(block, block_info=None):
            i = int(np.ravel_multi_index(block_info[0]["chunk-location"], grid))
            with self.lock:
                self.by_chunk[i] = self.by_chunk.get(i, 0) + 1
            return block

        return a.map_blocks(read, dtype=a.dtype, name=f"source-{id(self)}")

    def passes(self) -> int:
        """Reads of the most-read chunk (a pass reads every chunk once)."""
        return max(self.by_chunk.values(), default=0)

    def snapshot(self) -> dict[int, int]:
        with self.lock:
            return dict(self.by_chunk)


def _mixture(n, seed=0, D=3, C=3):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, C, n)
    means = rng.normal(scale=4.0, size=(C, D))
    return means[z] + rng.normal(size=(n, D)), z


def _first_iteration_reads(estimator, X, y, reads, label_reads=None):
    at_first: dict = {}

    def callback(info):
        if not at_first:
            at_first["X"] = reads.snapshot()
            at_first["y"] = None if label_reads is None else label_reads.snapshot()

    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = (X,) if y is None else (X, y)
        estimator.fit(*args, callback=callback)
    return at_first


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("labels", [None, "few", "every"])
def test_at_most_one_pass_before_the_first_iteration(cache, labels):
    n = 24_000
    X, z = _mixture(n)
    reads, label_reads = _Reads(), _Reads()
    Xd = reads.wrap(da.from_array(X, chunks=(3000, 3)))
    y = None
    if labels is not None:
        yy = np.full(n, -1)
        keep = np.arange(n) if labels == "every" else np.arange(0, n, 997)
        yy[keep] = z[keep]
        y = label_reads.wrap(da.from_array(yy, chunks=3000))
    kw = dict(max_iter=3, tol=0.0, random_state=0, cache=cache, init_sample_size=2000)
    gm = GaussianMixture(3, n_init=2, **kw) if y is None else GaussianMixtureClassifier(**kw)
    at_first = _first_iteration_reads(gm, Xd, y, reads, label_reads if y is not None else None)
    n_chunks = len(Xd.chunks[0])
    # when the first EM iteration is done, every chunk of X (and of y) was read once before
    # EM, and once more by that iteration if nothing is cached
    once = 1 if cache else 2
    assert at_first["X"] == dict.fromkeys(range(n_chunks), once)
    if y is not None:
        assert at_first["y"] == dict.fromkeys(range(n_chunks), once)
    # and afterwards: a cached fit reads nothing more, an uncached one once per pass
    assert reads.passes() == (1 if cache else 1 + gm.n_iter_)


def test_one_compute_before_em_without_cache():
    class Counter(dask.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.count = 0

        def _start(self, dsk):
            self.count += 1

    X, z = _mixture(12_000)
    y = np.where(np.arange(len(z)) % 50 == 0, z, -1)
    counts = {}
    gm = GaussianMixtureClassifier(max_iter=2, tol=0.0, cache=False)
    with dask.config.set(scheduler="threads"), Counter() as counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(
            da.from_array(X, chunks=2000),
            da.from_array(y, chunks=2000),
            callback=lambda info: counts.setdefault("first", counter.count),
        )
    assert counts["first"] == 2  # the preparatory compute, then the first iteration's


def test_hmm_classifier_reads_once_before_em():
    rng = np.random.default_rng(1)
    n, T, D = 600, 8, 2
    states = rng.integers(0, 2, (n, T))
    X = (states[..., None] * 3.0 + rng.normal(size=(n, T, D))).reshape(n, T * D)
    y = np.full((n, T), -1)
    y[:40] = states[:40]
    reads = _Reads()
    Xd = reads.wrap(da.from_array(X.reshape(n, T, D), chunks=(100, T, D)))
    hmm = GaussianHMMClassifier(n_iter=2, tol=0.0, random_state=0, cache=True)
    at_first = {}
    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hmm.fit(
            Xd,
            da.from_array(y, chunks=(100, T)),
            callback=lambda info: at_first.setdefault("X", reads.snapshot()),
        )
    assert at_first["X"] == dict.fromkeys(range(6), 1)  # cached: the pass before EM only


def test_labelled_sample_is_bounded_weighted_and_chunking_invariant():
    n = 30_000
    X, z = _mixture(n, seed=2)
    X[::7, 1] = np.nan  # partly observed rows
    X[::11] = np.nan  # nothing observed
    y = np.where(np.arange(n) % 3 == 0, -1, z)
    y[y == 2] = np.where(np.arange(n)[y == 2] % 40 == 0, 2, -1)  # a rare class
    out = {}
    for chunks in (1000, 4096, n):
        data = engine.as_chunked(
            da.from_array(X, chunks=(chunks, 3)), None, da.from_array(y, chunks)
        )
        for rule in ("any", "all"):
            out[chunks, rule] = engine.prepare(data, usable=rule, per_class=500, seed=5).labels
    s = out[1000, "any"]
    lab = y >= 0
    seen, full = np.isfinite(X).any(axis=1), np.isfinite(X).all(axis=1)
    np.testing.assert_array_equal(s.counts, np.bincount(y[lab]))
    np.testing.assert_array_equal(s.observed, np.bincount(y[lab & seen]))
    np.testing.assert_array_equal(s.complete, np.bincount(y[lab & full], minlength=3))
    assert (s.y_min, s.y_max, s.n_rows) == (-1, 2, lab.sum())
    for rule, usable in (("any", s.observed), ("all", s.complete)):
        got = out[1000, rule]
        per_class = np.bincount(got.y, minlength=3)
        np.testing.assert_array_equal(per_class, np.minimum(usable, 500))
        # each sampled row stands for its class's usable rows over its sampled ones
        np.testing.assert_allclose(np.bincount(got.y, weights=got.weight), usable)
        ok = np.isfinite(got.X).any(axis=1) if rule == "any" else np.isfinite(got.X).all(axis=1)
        assert ok.all()
        assert got.capped
        for chunks in (4096, n):  # the same rows whatever the chunking
            np.testing.assert_array_equal(out[chunks, rule].X, got.X)
            np.testing.assert_array_equal(out[chunks, rule].y, got.y)
    # a class under the bound is kept whole, weight 1
    rare = out[1000, "all"].y == 2
    np.testing.assert_array_equal(out[1000, "all"].weight[rare], 1.0)


def test_fully_labelled_fit_with_a_small_labelled_sample_is_the_class_statistics(monkeypatch):
    """With every row labelled and one component per class, EM's fixed point is the class
    means and covariances (Gaussian discriminant analysis), whatever the start's labelled
    sample: a sample of 50 rows per class gives the same model as one of every row."""
    X, z = _mixture(20_000, seed=4)
    Xd, yd = da.from_array(X, chunks=(2500, 3)), da.from_array(z, chunks=2500)
    fits = {}
    for cap in (50, 100_000):
        monkeypatch.setattr(engine, "LABEL_SAMPLE_PER_CLASS", cap)
        gm = GaussianMixtureClassifier(tol=1e-10, max_iter=20, random_state=0)
        fits[cap] = gm.fit(Xd, yd)
    for c in range(3):
        np.testing.assert_allclose(fits[50].means_[c], X[z == c].mean(axis=0), rtol=1e-9)
        np.testing.assert_allclose(
            fits[50].covariances_[c], np.cov(X[z == c].T, bias=True), rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(fits[50].means_, fits[100_000].means_, rtol=1e-9)
    np.testing.assert_allclose(fits[50].lower_bound_, fits[100_000].lower_bound_, rtol=1e-9)


def test_label_errors_come_from_the_summary():
    X, z = _mixture(5000, seed=3)
    Xd = da.from_array(X, chunks=(1000, 3))
    bad = z.copy()
    bad[17] = -3
    with pytest.raises(ValueError, match="y holds -3"):
        GaussianMixtureClassifier(max_iter=2).fit(Xd, da.from_array(bad, chunks=1000))
    masked = X.copy()
    masked[z == 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] is on a row with missing values"):
        GaussianMixtureClassifier(max_iter=2, nan_policy="omit").fit(
            da.from_array(masked, chunks=(1000, 3)), da.from_array(z, chunks=1000)
        )
    with pytest.raises(ValueError, match="non-finite"):
        GaussianMixtureClassifier(max_iter=2, nan_policy="raise").fit(
            da.from_array(masked, chunks=(1000, 3)), da.from_array(z, chunks=1000)
        )


@pytest.mark.parametrize("density", ["few", "every"])
def test_fit_stack_reads_the_stack_and_its_labels_once_before_em(density):
    """io.fit_stack: the labels are checked from the fit's pass before EM (no pass of
    their own), so each chunk of every attribute and of the label map is read once
    before the first EM iteration."""
    import xarray as xr

    from daskem import io

    ny, nx, ch = 120, 100, 40
    X, z = _mixture(ny * nx, seed=5)
    lab = np.where(np.arange(ny * nx) % 211 == 0, z, -1) if density == "few" else z
    reads = {name: _Reads() for name in ("a", "b", "c", "lc")}
    arrays = dict(zip("abc", X.T.reshape(3, ny, nx), strict=True))
    arrays["lc"] = lab.reshape(ny, nx).astype(np.int32)
    ds = xr.Dataset(
        {
            name: (("y", "x"), reads[name].wrap2d(da.from_array(a, chunks=ch)))
            for name, a in arrays.items()
        },
        coords={"y": np.arange(ny), "x": np.arange(nx)},
    )
    ds["lc"].attrs["unlabelled_value"] = -1
    stack = io.open_stack(ds, ["a", "b", "c"])
    at_first = {}

    def callback(info):
        at_first.setdefault("reads", {k: r.snapshot() for k, r in reads.items()})

    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = io.fit_stack(
            stack, labels="lc", max_iter=2, tol=0.0, cache=True, callback=callback,
            check_nodata_values=False,
        )  # fmt: skip
    assert gm.class_names_ == ["class_0", "class_1", "class_2"]
    n_chunks = 3 * 3
    for name in "abc":
        assert at_first["reads"][name] == dict.fromkeys(range(n_chunks), 1), name
    assert at_first["reads"]["lc"] == dict.fromkeys(range(n_chunks), 1)
