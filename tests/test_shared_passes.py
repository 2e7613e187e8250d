"""n_init restarts share every pass over the data and follow their own paths exactly."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback

from daskem import GaussianMixture, engine
from daskem.model.gmm import GMMModel


class _Counter(Callback):
    def __init__(self):
        super().__init__()
        self.n = 0

    def _start(self, dsk):
        self.n += 1


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(3)
    data = np.concatenate([rng.normal(c, 1.0, (1500, 2)) for c in (0.0, 2.0, 4.0, 7.0)])
    return da.from_array(data, chunks=700)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_restarts_equal_separate_fits_and_share_passes(X):
    kw = dict(n_components=4, tol=1e-6, max_iter=60, random_state=5)
    with dask.config.set(scheduler="threads"):
        with _Counter() as c:
            gm = GaussianMixture(n_init=3, cache=False, **kw).fit(X)
        total_computes = c.n
    # the same three candidates one by one, from the parameters the restarts started with
    rng = np.random.RandomState(5)
    seeds = [int(rng.randint(np.iinfo(np.int32).max)) for _ in range(3)]
    data = engine.as_chunked(X)
    single = GaussianMixture(**kw)
    single._check_parameters(2)
    sample = engine.draw_sample(data, single.init_sample_size, seeds[0])  # shared by all
    results = [
        engine.fit_em(
            GMMModel(), data, single._initial_params(data, s, sample=sample), tol=1e-6, max_iter=60
        )
        for s in seeds
    ]
    best = max(results, key=lambda r: r.lower_bound)
    np.testing.assert_array_equal(gm.means_, best.params.means)
    np.testing.assert_array_equal(gm.lower_bounds_, best.lower_bounds)
    # passes are shared: the count follows the longest candidate, not the sum
    longest = max(r.n_iter for r in results)
    assert sum(r.n_iter for r in results) > longest
    init_computes = 1  # one chunk-wise sample shared by the initialisations
    assert total_computes == longest + init_computes


def test_fit_em_many_candidates_of_different_sizes(X):
    """Candidates may differ in K (model selection): each one's result is its own."""
    data = engine.as_chunked(X)
    starts = []
    for k in (2, 3):
        gm = GaussianMixture(k, random_state=0)
        gm._check_parameters(2)
        starts.append(engine.Start(gm._initial_params(data, 0)))
    many = engine.fit_em_many(GMMModel(), data, starts, tol=1e-6, max_iter=40)
    for st, res in zip(starts, many, strict=True):
        alone = engine.fit_em(GMMModel(), data, st.params, tol=1e-6, max_iter=40)
        np.testing.assert_array_equal(res.params.means, alone.params.means)
        assert res.n_iter == alone.n_iter


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cache_reads_once_and_changes_nothing(X):
    reads = []

    def counted(block):
        reads.append(block.shape[0])
        return block

    Xc = X.map_blocks(counted, dtype=X.dtype)
    kw = dict(n_components=3, tol=0, max_iter=4, random_state=0, prefit=False)
    streamed = GaussianMixture(cache=False, **kw).fit(Xc)
    n_streamed = len(reads)
    reads.clear()
    cached = GaussianMixture(cache=True, **kw).fit(Xc)
    n_chunks = X.numblocks[0]
    assert n_streamed >= 4 * n_chunks  # every pass reads every chunk again
    assert len(reads) < 2 * n_chunks  # read once (plus the sampled chunks of the init)
    np.testing.assert_array_equal(cached.means_, streamed.means_)
    with pytest.raises(ValueError, match="cache"):
        GaussianMixture(3, cache="sometimes").fit(X)
