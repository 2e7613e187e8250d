"""Prefit on the in-memory sample: same optimum as plain EM with fewer full passes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from daskem import GaussianMixture
from daskem.synthetic import make_samples


@pytest.fixture(scope="module")
def X():
    Xn, _, _ = make_samples(40_000, 4, 5, seed=1, dtype="float32", separation=2.0)
    return da.from_array(Xn, chunks=(5_000, 4))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefit_reaches_plain_em_with_fewer_passes(X):
    kw = dict(n_components=5, tol=1e-4, max_iter=400, random_state=0, init_sample_size=4_000)
    plain = GaussianMixture(prefit=False, **kw).fit(X)
    fast = GaussianMixture(**kw).fit(X)  # "auto": 40k rows > 2 x 4k sampled rows
    assert fast._use_prefit(40_000) and not plain._use_prefit(40_000)
    assert fast.score(X) >= plain.score(X) - 1e-4
    assert fast.n_iter_ < plain.n_iter_
    lb = fast.lower_bounds_
    assert np.all(np.diff(lb) >= -1e-9 * np.abs(lb[1:]))


def test_prefit_validation():
    with pytest.raises(ValueError, match="prefit"):
        GaussianMixture(2, prefit="yes").fit(np.random.default_rng(0).normal(size=(50, 2)))


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_squarem_prefit_reaches_the_em_optimum_in_fewer_e_steps(ct):
    """SQUAREM on the in-memory sample: same fixed point as plain EM, a non-decreasing
    objective, and fewer E-steps."""
    from daskem import engine
    from daskem.model.gmm import GMMModel
    from daskem.model.init import initial_responsibilities, params_from_resp

    Xn, _, _ = make_samples(20_000, 4, 5, seed=3, dtype="float64", separation=1.5)
    resp = initial_responsibilities(Xn, 5, "kmeans", np.random.default_rng(0))
    p0, _ = params_from_resp(Xn, resp, ct, 1e-6)
    model = GMMModel(ct)
    plain = engine.fit_em_local(model, Xn, p0, tol=1e-9, max_iter=3000)
    fast = engine.fit_em_local(model, Xn, p0, tol=1e-9, max_iter=3000, accelerate=True)
    assert plain.converged and fast.converged
    assert fast.n_iter < plain.n_iter
    h = np.asarray(fast.lower_bounds)
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    assert fast.lower_bound == pytest.approx(plain.lower_bound, abs=1e-6)
    np.testing.assert_allclose(
        np.sort(fast.params.means, axis=0), np.sort(plain.params.means, axis=0), atol=2e-2
    )


def test_from_vector_rejects_invalid_parameters():
    from daskem.model.gmm import GMMModel
    from daskem.model.init import initial_responsibilities, params_from_resp

    Xn, _, _ = make_samples(2_000, 3, 2, seed=0, dtype="float64")
    resp = initial_responsibilities(Xn, 2, "kmeans", np.random.default_rng(0))
    p, _ = params_from_resp(Xn, resp, "full", 1e-6)
    m = GMMModel("full")
    v = m.to_vector(p)
    back = m.from_vector(v, p)
    np.testing.assert_allclose(back.precisions_cholesky, p.precisions_cholesky, rtol=1e-10)
    bad = v.copy()
    bad[0] = -0.1  # a negative weight
    assert m.from_vector(bad, p) is None
    bad = v.copy()
    bad[2 + 6 :] = np.tile(-np.eye(3).ravel(), 2)  # negative-definite covariances
    assert m.from_vector(bad, p) is None
