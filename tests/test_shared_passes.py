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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_select_after_keeps_the_best_candidate_and_its_exact_path(X):
    """After ``select_after`` shared passes only the best candidate goes on; its path is
    the one it follows alone, and it ends at least as high as every stopped one."""
    data = engine.as_chunked(X)
    starts = []
    for seed in (0, 1, 2, 3):
        gm = GaussianMixture(4, init_params="random", random_state=seed)
        gm._check_parameters(2)
        starts.append(engine.Start(gm._initial_params(data, seed)))
    kw = dict(tol=1e-8, max_iter=50)
    seen = []
    with _Counter() as c:
        raced = engine.fit_em_many(
            GMMModel(), data, starts, select_after=2, callback=seen.append, **kw
        )
    alone = [engine.fit_em(GMMModel(), data, s.params, **kw) for s in starts]
    after2 = [r.lower_bounds[1] for r in alone]
    best = int(np.argmax(after2))
    assert [r.stopped for r in raced] == [i != best for i in range(4)]
    np.testing.assert_array_equal(raced[best].params.means, alone[best].params.means)
    assert raced[best].n_iter == alone[best].n_iter
    for i, r in enumerate(raced):
        if i != best:
            assert r.n_iter == 2 and r.lower_bounds == alone[i].lower_bounds[:2]
            assert raced[best].lower_bound >= r.lower_bound
    # the shared passes: 2 with every candidate, then one per pass for the survivor
    assert c.n == alone[best].n_iter
    assert sum(1 for info in seen if info.stopped) == 3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_n_init_default_selects_after_one_pass_when_prefitted():
    from daskem.synthetic import make_samples

    Xn, _, _ = make_samples(30_000, 3, 4, seed=2, dtype="float32", separation=1.5)
    Xd = da.from_array(Xn, chunks=(5_000, 3))
    kw = dict(n_components=4, tol=1e-4, max_iter=200, random_state=1, init_sample_size=3_000)
    seen = []
    raced = GaussianMixture(n_init=3, **kw).fit(Xd, callback=seen.append)
    full = GaussianMixture(n_init=3, select_after=None, **kw).fit(Xd)
    assert raced._select_after(30_000) == 1 and full._select_after(30_000) is None
    # screened on the sample, then raced after one pass: one restart runs to the end
    assert len({i.candidate for i in seen if i.iteration > 1}) == 1
    assert raced.n_iter_ <= full.n_iter_
    # the restarts here end 1.5e-4 nats/px apart (about tol): racing may keep either
    assert raced.score(Xd) >= full.score(Xd) - 5 * kw["tol"]
    for bad in (0, "often", 1.5):
        with pytest.raises(ValueError, match="select_after"):
            GaussianMixture(2, select_after=bad).fit(Xn[:100])


def test_screening_drops_clearly_worse_and_duplicate_restarts():
    """On the shared sample: a restart that merged two clusters is clearly worse, and an
    exact duplicate of the best adds nothing; both are left out, the best goes on."""
    from daskem.model.gmm import GMMParams, compute_precision_cholesky

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    Xs = np.concatenate([rng.normal(c, 1.0, (2000, 2)) for c in centres])
    cov = np.repeat(np.eye(2)[None], 3, axis=0)
    pc, _ = compute_precision_cholesky(cov, "full")
    good = GMMParams(np.full(3, 1 / 3), centres, pc, "full", cov)
    merged_means = np.array([[3.0, 0.0], [3.0, 0.1], [0.0, 6.0]])
    merged_cov = np.array([[[10.0, 0.0], [0.0, 1.0]]] * 2 + [np.eye(2)])
    pcm, _ = compute_precision_cholesky(merged_cov, "full")
    merged = GMMParams(np.array([1 / 3, 1 / 3, 1 / 3]), merged_means, pcm, "full", merged_cov)
    gm = GaussianMixture(3, tol=1e-3)
    keep = gm._screen([merged, good, good], (Xs, None, None))
    assert keep == [False, True, False]
    # two restarts at different but equally good optima both go on
    shifted = GMMParams(np.full(3, 1 / 3), centres + 0.05, pc, "full", cov)
    assert gm._screen([good, shifted], (Xs, None, None)) == [True, True]
