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
