"""The pure NumPy kernels: associative statistics, stable moments, clamping, marginals."""

from __future__ import annotations

import numpy as np
import pytest

from daskem import GaussianMixture, GaussianMixtureClassifier
from daskem.model.gmm import (
    GMMParams,
    block_stats,
    class_posterior,
    compute_precision_cholesky,
    log_responsibilities,
    m_step,
)

COV_TYPES = ["full", "tied", "diag", "spherical"]


def _params(ct: str, K: int = 3, D: int = 3, seed: int = 0, offset: float = 0.0) -> GMMParams:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)) * 3 + offset
    A = rng.normal(size=(K, D, D)) * 0.3
    full = A @ np.transpose(A, (0, 2, 1)) + np.eye(D)
    cov = {
        "full": full,
        "tied": full[0],
        "diag": np.stack([np.diag(f) for f in full]),
        "spherical": np.array([np.diag(f).mean() for f in full]),
    }[ct]
    pc, ok = compute_precision_cholesky(cov, ct)
    assert ok.all()
    return GMMParams(np.full(K, 1.0 / K), means, pc, ct, cov)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_stats_merge_is_associative(ct):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1000, 3)) * 2
    w = rng.uniform(0.1, 2.0, size=1000)
    p = _params(ct)
    whole = block_stats(X, p, w, block_rows=4096)
    cuts = [0, 0, 7, 300, 301, 999, 1000]
    parts = [
        block_stats(X[a:b], p, w[a:b], block_rows=64) for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    left = parts[0]
    for s in parts[1:]:
        left = left + s
    right = parts[-1]
    for s in reversed(parts[:-1]):
        right = s + right
    for merged in (left, right):
        np.testing.assert_allclose(merged.n, whole.n, rtol=1e-11)
        np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10, atol=1e-10)
        assert merged.loglik == pytest.approx(whole.loglik, rel=1e-12)
        assert merged.count == whole.count == 1000


@pytest.mark.parametrize("ct", ["full", "diag"])
def test_large_offset_float32_keeps_variance(ct):
    """Microscopy-like data (mean 1e4, std 1) in float32: no catastrophic cancellation."""
    rng = np.random.default_rng(2)
    n = 200_000
    X = (1e4 + rng.normal(size=(n, 2))).astype(np.float32)
    gm = GaussianMixture(1, covariance_type=ct, tol=1e-10, max_iter=3, chunk_size=7_000)
    gm.fit(X)
    var = np.diag(gm.covariances_[0]) if ct == "full" else gm.covariances_[0]
    truth = X.astype(np.float64).var(axis=0)
    np.testing.assert_allclose(var, truth, rtol=1e-6)
    np.testing.assert_allclose(gm.means_[0], X.astype(np.float64).mean(0), rtol=1e-10)


def test_labelled_rows_are_clamped_exactly():
    p = _params("full")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 3)) * 3
    y = np.full(50, -1)
    y[:10] = np.arange(10) % 3
    _, log_resp = log_responsibilities(X, p, y)
    resp = np.exp(log_resp)
    np.testing.assert_array_equal(resp[:10], np.eye(3)[y[:10]])
    np.testing.assert_allclose(resp[10:].sum(1), 1.0)
    assert (resp[10:] < 1).all()


def test_clamping_within_a_class_of_several_components():
    base = _params("diag", K=3)
    p = GMMParams(
        base.weights,
        base.means,
        base.precisions_cholesky,
        "diag",
        base.covariances,
        component_class=np.array([0, 0, 1]),
    )
    X = np.random.default_rng(4).normal(size=(20, 3))
    y = np.zeros(20, dtype=int)
    _, log_resp = log_responsibilities(X, p, y)
    resp = np.exp(log_resp)
    assert np.all(resp[:, 2] == 0)
    np.testing.assert_allclose(resp[:, :2].sum(1), 1.0)


def _log_mvn(x, mean, cov):
    d = x - mean
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, d)
    return -0.5 * (len(x) * np.log(2 * np.pi) + z @ z) - np.log(np.diag(L)).sum()


@pytest.mark.parametrize("ct", COV_TYPES)
def test_marginal_posterior_of_partly_missing_rows(ct):
    p = _params(ct, K=3, D=4, seed=5)
    x = np.array([0.5, np.nan, -1.0, np.nan])
    obs = np.isfinite(x)
    full_cov = {
        "full": lambda k: p.covariances[k],
        "tied": lambda k: p.covariances,
        "diag": lambda k: np.diag(p.covariances[k]),
        "spherical": lambda k: np.eye(4) * p.covariances[k],
    }[ct]
    logs = np.array(
        [
            np.log(p.weights[k]) + _log_mvn(x[obs], p.means[k][obs], full_cov(k)[np.ix_(obs, obs)])
            for k in range(3)
        ]
    )
    X = np.stack([x, np.full(4, np.nan), np.array([0.1, 0.2, 0.3, 0.4])])
    proba, logd = class_posterior(p, X)
    mx = logs.max()
    expected_logd = mx + np.log(np.exp(logs - mx).sum())
    assert logd[0] == pytest.approx(expected_logd, rel=1e-12)
    np.testing.assert_allclose(proba[0], np.exp(logs - expected_logd), rtol=1e-12)
    assert np.isnan(proba[1]).all() and np.isnan(logd[1])
    assert np.isfinite(proba[2]).all() and proba[2].sum() == pytest.approx(1.0)


def test_m_step_reseeds_a_collapsed_component():
    p = _params("full", K=3)
    rng = np.random.default_rng(6)
    X = np.concatenate([rng.normal(size=(200, 3)) + p.means[0], rng.normal(size=(200, 3)) + 50])
    # component 2 explains nothing: it will get zero mass
    far = GMMParams(
        np.array([0.5, 0.49, 0.01]),
        np.stack([p.means[0], np.full(3, 50.0), np.full(3, -1e3)]),
        p.precisions_cholesky,
        "full",
        p.covariances,
    )
    stats = block_stats(X, far)
    assert stats.n[2] < 1e-6
    new, events = m_step(stats, "full", 1e-6)
    assert [e["component"] for e in events] == [2]
    assert np.all(np.isfinite(new.means)) and np.all(np.isfinite(new.precisions_cholesky))
    # moved onto one of the worst-explained rows of the data
    assert np.min(np.abs(X - new.means[2]).sum(1)) == 0


def test_semi_supervised_objective_never_decreases():
    rng = np.random.default_rng(7)
    X = np.concatenate([rng.normal(size=(300, 2)) + c for c in ([0, 0], [2.5, 0], [0, 2.5])])
    y = np.full(len(X), -1)
    y[[0, 1, 300, 301, 600, 601]] = [0, 0, 1, 1, 2, 2]
    gm = GaussianMixtureClassifier(tol=0, max_iter=40, random_state=0)
    with pytest.warns(UserWarning):
        gm.fit(X, y)
    lb = gm.lower_bounds_
    assert np.all(np.diff(lb) >= -1e-10 * np.abs(lb[1:]))
    assert gm.n_classes_ == 3
    # the labels tie each component to its cluster
    np.testing.assert_allclose(gm.means_, [[0, 0], [2.5, 0], [0, 2.5]], atol=0.35)
