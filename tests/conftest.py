"""Shared fixtures for the daskem test suite.

Everything here is plain numpy: the suite must not depend on
``daskem.synthetic``.  Helpers are exposed as session-scoped fixtures that
return functions, so they can also be used from hypothesis tests.
"""

import warnings

import numpy as np
import pytest

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

FITTED_ARRAYS = (
    "weights_",
    "means_",
    "covariances_",
    "precisions_",
    "precisions_cholesky_",
)


def _make_data(n, d, k, seed=0, sep=8.0, dtype=np.float64):
    """A clear Gaussian mixture.

    Component ``j`` is centred at ``sep * j`` along a random unit direction
    (plus a small jitter) and has a random anisotropic covariance with
    standard deviations of order one.  Mixing proportions are unequal but
    none is tiny.  Returns ``(X, labels)``.
    """
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    centers = sep * np.arange(k)[:, None] * direction + rng.normal(scale=0.3, size=(k, d))
    proportions = np.arange(1, k + 1, dtype=float) + k
    proportions /= proportions.sum()
    labels = rng.choice(k, size=n, p=proportions)
    X = np.empty((n, d))
    for j in range(k):
        A = rng.normal(scale=0.4, size=(d, d))
        cov = A @ A.T + 0.5 * np.eye(d)
        idx = labels == j
        X[idx] = rng.multivariate_normal(centers[j], cov, size=idx.sum())
    return X.astype(dtype), labels


def _make_init(X, labels, k, covariance_type, precision_scale=1.0):
    """Deterministic, deliberately imperfect starting parameters.

    The mean of component ``j`` is the first sample of cluster ``j``, the
    weights are uniform and the precisions are ``precision_scale`` times the
    identity in the shape the covariance type requires.  EM therefore needs a
    few iterations from here, but starts in the right basin.
    """
    d = X.shape[1]
    means = np.stack([X[np.flatnonzero(labels == j)[0]] for j in range(k)])
    weights = np.full(k, 1.0 / k)
    s = precision_scale
    precisions = {
        "full": np.stack([s * np.eye(d)] * k),
        "tied": s * np.eye(d),
        "diag": np.full((k, d), s),
        "spherical": np.full(k, s),
    }[covariance_type]
    return dict(
        weights_init=weights.astype(np.float64),
        means_init=means.astype(np.float64),
        precisions_init=precisions,
    )


def _assert_same_fit(a, b, rtol, atol=0.0, check_iterations=True):
    """Fitted attributes of two GaussianMixture-like estimators agree."""
    for name in FITTED_ARRAYS:
        np.testing.assert_allclose(
            np.asarray(getattr(a, name)),
            np.asarray(getattr(b, name)),
            rtol=rtol,
            atol=atol,
            err_msg=name,
        )
    np.testing.assert_allclose(a.lower_bound_, b.lower_bound_, rtol=rtol, atol=atol)
    if check_iterations:
        assert a.n_iter_ == b.n_iter_
        assert bool(a.converged_) == bool(b.converged_)
        np.testing.assert_allclose(
            np.asarray(a.lower_bounds_),
            np.asarray(b.lower_bounds_),
            rtol=rtol,
            atol=atol,
            err_msg="lower_bounds_",
        )


def _fit_quiet(estimator, X, **kwargs):
    """``estimator.fit`` with convergence warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return estimator.fit(X, **kwargs)


@pytest.fixture(scope="session")
def make_data():
    return _make_data


@pytest.fixture(scope="session")
def make_init():
    return _make_init


@pytest.fixture(scope="session")
def assert_same_fit():
    return _assert_same_fit


@pytest.fixture(scope="session")
def fit_quiet():
    return _fit_quiet


def assert_finite_params(gm):
    for name in FITTED_ARRAYS:
        value = np.asarray(getattr(gm, name))
        assert np.all(np.isfinite(value)), name


@pytest.fixture(scope="session")
def assert_finite():
    return assert_finite_params
