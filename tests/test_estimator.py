"""Estimator behaviour: sample weights, dtypes, lazy outputs, n_init,
warm start, validation errors, degenerate data and the sklearn-style API."""

import math
import warnings

import dask
import dask.array as da
import numpy as np
import pytest

import daskem
from daskem import GaussianMixture

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
N, D, K = 1200, 2, 3


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def data(make_data):
    return make_data(N, D, K, seed=7, sep=4.0)


def _gm(X, y, make_init, covariance_type="full", **kwargs):
    kwargs.setdefault("tol", 1e-8)
    kwargs.setdefault("max_iter", 30)
    init = make_init(X, y, K, covariance_type)
    return GaussianMixture(K, covariance_type=covariance_type, **init, **kwargs)


def _n_parameters(covariance_type, k, d):
    cov = {
        "full": k * d * (d + 1) / 2,
        "tied": d * (d + 1) / 2,
        "diag": k * d,
        "spherical": k,
    }[covariance_type]
    return cov + k * d + k - 1


# --------------------------------------------------------------------------
# constructor / API conventions


def test_constructor_stores_parameters_as_given():
    params = dict(
        covariance_type="diag",
        tol=1e-4,
        reg_covar=1e-5,
        max_iter=7,
        n_init=2,
        init_params="random_from_data",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=42,
        warm_start=True,
        verbose=1,
        verbose_interval=3,
        chunk_size=1000,
        split_every=4,
        init_sample_size=500,
    )
    gm = GaussianMixture(5, **params)
    assert gm.n_components == 5
    for name, value in params.items():
        assert getattr(gm, name) == value, name


def test_fit_returns_self(data, make_init, fit_quiet):
    X, y = data
    gm = _gm(X, y, make_init)
    assert fit_quiet(gm, X) is gm
    assert gm.n_features_in_ == D


# --------------------------------------------------------------------------
# sample weights


def _weights_input(X, w, kind):
    if kind == "numpy":
        return X, w
    if kind == "dask":
        return da.from_array(X, chunks=(100, D)), da.from_array(w, chunks=100)
    if kind == "dask-X-numpy-w":
        return da.from_array(X, chunks=(100, D)), w
    if kind == "dask-misaligned":
        return da.from_array(X, chunks=(100, D)), da.from_array(w, chunks=250)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "dask", "dask-X-numpy-w", "dask-misaligned"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_integer_weights_equal_repeated_rows(
    data, make_init, fit_quiet, assert_same_fit, covariance_type, kind
):
    X, y = data
    w = np.random.default_rng(0).integers(1, 4, size=len(X))
    rep = fit_quiet(_gm(X, y, make_init, covariance_type), np.repeat(X, w, axis=0))
    X_in, w_in = _weights_input(X, w.astype(float), kind)
    wtd = fit_quiet(_gm(X, y, make_init, covariance_type), X_in, sample_weight=w_in)
    assert_same_fit(wtd, rep, rtol=1e-8, atol=1e-12)


def test_unit_weights_equal_no_weights(data, make_init, fit_quiet, assert_same_fit):
    X, y = data
    plain = fit_quiet(_gm(X, y, make_init), X)
    ones = fit_quiet(_gm(X, y, make_init), X, sample_weight=np.ones(len(X)))
    assert_same_fit(ones, plain, rtol=1e-10, atol=1e-12)


def test_sample_weight_scale_invariance(data, make_init, fit_quiet, assert_same_fit):
    X, y = data
    w = np.random.default_rng(3).uniform(0.5, 2.0, size=len(X))
    a = fit_quiet(_gm(X, y, make_init), X, sample_weight=w)
    b = fit_quiet(_gm(X, y, make_init), X, sample_weight=1e-3 * w)
    assert_same_fit(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_zero_weights_equal_dropped_rows(
    data, make_init, fit_quiet, assert_same_fit, covariance_type
):
    X, y = data
    keep = np.random.default_rng(1).random(len(X)) < 0.6
    # Put junk in the dropped rows: it must have no influence at all.
    X_junk = X.copy()
    X_junk[~keep] += 50.0
    dropped = fit_quiet(_gm(X[keep], y[keep], make_init, covariance_type), X[keep])
    zeroed = fit_quiet(
        _gm(X[keep], y[keep], make_init, covariance_type),
        X_junk,
        sample_weight=keep.astype(float),
    )
    assert_same_fit(zeroed, dropped, rtol=1e-8, atol=1e-12)


def test_score_with_sample_weight_is_weighted_mean(data, make_init, fit_quiet):
    X, y = data
    gm = fit_quiet(_gm(X, y, make_init), X)
    w = np.random.default_rng(2).random(len(X))
    expected = np.average(gm.score_samples(X), weights=w)
    np.testing.assert_allclose(gm.score(X, sample_weight=w), expected, rtol=1e-10)
    np.testing.assert_allclose(gm.score(X), gm.score_samples(X).mean(), rtol=1e-10)


# --------------------------------------------------------------------------
# dtypes and lazy outputs


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_input_close_to_float64(data, make_init, fit_quiet, covariance_type):
    X, y = data
    gm64 = fit_quiet(_gm(X, y, make_init, covariance_type, tol=1e-10), X)
    X32 = X.astype(np.float32)
    gm32 = fit_quiet(_gm(X, y, make_init, covariance_type, tol=1e-10), X32)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        value = np.asarray(getattr(gm32, name))
        assert value.dtype == np.float64, name
        np.testing.assert_allclose(value, getattr(gm64, name), rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(gm32.lower_bound_, gm64.lower_bound_, rtol=1e-4)
    proba = gm32.predict_proba(X32)
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert np.mean(gm32.predict(X32) == gm64.predict(X)) > 0.999


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_single_precision_reaches_the_float64_optimum(data, make_init, fit_quiet, covariance_type):
    """precision="single" (float32 GEMMs, float64 sums of sub-blocks): the same optimum
    as a float64 fit to ~1e-4, and a log-likelihood that does not decrease beyond float32
    rounding of the statistics."""
    X, y = data
    gm64 = fit_quiet(_gm(X, y, make_init, covariance_type, tol=1e-10), X)
    gm = _gm(X, y, make_init, covariance_type, tol=1e-10, precision="single", chunk_size=400)
    fit_quiet(gm, X.astype(np.float32))
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(
            getattr(gm, name), getattr(gm64, name), rtol=1e-4, atol=1e-5, err_msg=name
        )
    np.testing.assert_allclose(gm.lower_bound_, gm64.lower_bound_, rtol=1e-5)
    assert np.all(np.diff(gm.lower_bounds_) >= -1e-6 * abs(gm.lower_bound_))
    assert gm.get_params()["precision"] == "single"
    # a different arithmetic from "auto" on the same float32 data
    auto = _gm(X, y, make_init, covariance_type, tol=1e-10, chunk_size=400)
    fit_quiet(auto, X.astype(np.float32))
    assert not np.array_equal(gm.covariances_, auto.covariances_)


def test_dask_input_gives_lazy_outputs_equal_to_numpy(data, make_init, fit_quiet):
    X, y = data
    Xd = da.from_array(X, chunks=(300, D))
    gm = fit_quiet(_gm(X, y, make_init), Xd)
    for method in ("predict", "predict_proba", "score_samples"):
        lazy = getattr(gm, method)(Xd)
        eager = getattr(gm, method)(X)
        assert isinstance(lazy, da.Array), method
        assert isinstance(eager, np.ndarray), method
        assert lazy.shape == eager.shape, method
        np.testing.assert_allclose(lazy.compute(), eager, rtol=1e-12, err_msg=method)
    np.testing.assert_allclose(gm.score(Xd), gm.score(X), rtol=1e-12)


# --------------------------------------------------------------------------
# n_init, random_state, warm_start


def test_n_init_reproducible_and_not_worse(make_data, assert_same_fit, fit_quiet):
    X, _ = make_data(800, 2, 4, seed=11, sep=3.0)
    kwargs = dict(init_params="random", max_iter=40, random_state=123)
    a = fit_quiet(GaussianMixture(4, n_init=3, **kwargs), X)
    b = fit_quiet(GaussianMixture(4, n_init=3, **kwargs), X)
    assert_same_fit(a, b, rtol=1e-12, atol=1e-14)
    single = fit_quiet(GaussianMixture(4, n_init=1, **kwargs), X)
    assert a.lower_bound_ >= single.lower_bound_ - 1e-12


def test_random_state_controls_initialisation(make_data, fit_quiet):
    X, _ = make_data(800, 2, 4, seed=11, sep=3.0)
    fits = [
        fit_quiet(GaussianMixture(4, init_params="random", max_iter=2, random_state=s), X)
        for s in (0, 0, 1)
    ]
    np.testing.assert_array_equal(fits[0].means_, fits[1].means_)
    assert not np.allclose(fits[0].means_, fits[2].means_)


def test_warm_start_continues_from_previous_fit(data, fit_quiet):
    X, _ = data
    gm = fit_quiet(GaussianMixture(K, random_state=0, tol=1e-3), X)
    final_score = gm.score(X)
    previous_means = gm.means_.copy()
    gm.warm_start = True
    gm.max_iter = 1
    fit_quiet(gm, X)
    assert gm.n_iter_ == 1
    assert len(gm.lower_bounds_) == 1
    np.testing.assert_allclose(gm.lower_bounds_[0], final_score, rtol=1e-9)
    np.testing.assert_allclose(gm.means_, previous_means, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------
# validation errors


def test_too_few_samples_raises(data):
    X, _ = data
    with pytest.raises(ValueError, match="n_samples"):
        GaussianMixture(5).fit(X[:3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_non_finite_input_raises(data, bad, kind):
    X, _ = data
    X = X.copy()
    X[N // 2, 1] = bad
    X_in = da.from_array(X, chunks=(400, D)) if kind == "dask" else X
    with pytest.raises(ValueError, match="non-finite"):
        GaussianMixture(K, random_state=0).fit(X_in)


@pytest.mark.parametrize(
    "params",
    [
        dict(n_components=0),
        dict(n_components=-1),
        dict(covariance_type="bogus"),
        dict(init_params="bogus"),
        dict(n_init=0),
        dict(tol=-1.0),
        dict(reg_covar=-1.0),
        dict(precision="half"),
    ],
    ids=lambda p: next(iter(p)),
)
def test_invalid_parameters_raise(data, params):
    X, _ = data
    kwargs = dict(n_components=2, random_state=0)
    kwargs.update(params)
    with pytest.raises(ValueError):
        GaussianMixture(**kwargs).fit(X)


def test_invalid_sample_weight_raises(data):
    X, _ = data
    w = np.ones(len(X))
    w[3] = -1.0
    with pytest.raises(ValueError):
        GaussianMixture(2, random_state=0).fit(X, sample_weight=w)
    with pytest.raises(ValueError):
        GaussianMixture(2, random_state=0).fit(X, sample_weight=np.ones(len(X) - 1))


def test_negative_dask_sample_weight_raises(data):
    X, _ = data
    w = np.ones(len(X))
    w[N // 2] = -1.0
    with pytest.raises(ValueError):
        GaussianMixture(2, random_state=0).fit(
            da.from_array(X, chunks=(400, D)), sample_weight=da.from_array(w, chunks=400)
        )


def test_wrong_means_init_shape_raises(data):
    X, _ = data
    with pytest.raises(ValueError):
        GaussianMixture(K, means_init=np.zeros((K, D + 1))).fit(X)


# --------------------------------------------------------------------------
# degenerate data


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_constant_feature_gives_finite_parameters(
    make_data, fit_quiet, assert_finite, covariance_type
):
    X, _ = make_data(600, 3, 2, seed=5)
    X[:, 1] = 5.0
    gm = fit_quiet(GaussianMixture(2, covariance_type=covariance_type, random_state=0), X)
    assert_finite(gm)
    assert np.isfinite(gm.lower_bound_)
    assert np.all(np.isfinite(gm.score_samples(X)))
    np.testing.assert_allclose(gm.means_[:, 1], 5.0)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_n_samples_equal_n_components(fit_quiet, assert_finite, covariance_type):
    X = np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 4.0]])
    gm = fit_quiet(GaussianMixture(3, covariance_type=covariance_type, random_state=0), X)
    assert_finite(gm)
    assert gm.converged_
    assert len(set(gm.predict(X).tolist())) == 3


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_n_samples_equal_n_components_close_points(fit_quiet, assert_finite, covariance_type):
    # Points about sqrt(reg_covar) apart: components overlap, each holds a bit
    # less or more than one sample's worth of mass.  scikit-learn converges in
    # 3 iterations; re-seeding such a component at every iteration never ends.
    X = np.array([[0.0, 0.0], [1e-3, 0.0], [5e-4, 3e-4]])
    gm = fit_quiet(GaussianMixture(3, covariance_type=covariance_type, random_state=0), X)
    assert_finite(gm)
    assert gm.converged_
    assert len(gm.reseeds_) <= 3


def _precisions(covariance_type, k, d):
    return {
        "full": np.stack([np.eye(d)] * k),
        "tied": np.eye(d),
        "diag": np.ones((k, d)),
        "spherical": np.ones(k),
    }[covariance_type]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_collapsed_component_is_reseeded(assert_finite, covariance_type):
    rng = np.random.default_rng(9)
    X = np.concatenate([rng.normal(0.0, 0.1, (300, 2)), rng.normal(10.0, 0.1, (300, 2))])
    gm = GaussianMixture(
        3,
        covariance_type=covariance_type,
        weights_init=np.array([0.45, 0.45, 0.1]),
        means_init=np.array([[0.0, 0.0], [10.0, 10.0], [1000.0, 1000.0]]),
        precisions_init=_precisions(covariance_type, 3, 2),
        max_iter=20,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", daskem.ConvergenceWarning)
        with pytest.warns(UserWarning, match="re-seeded"):
            gm.fit(X)
    assert gm.reseeds_, "reseeds_ must record the collapse"
    first = gm.reseeds_[0]
    assert {"iteration", "component", "reason"} <= set(first)
    assert first["component"] == 2
    assert_finite(gm)
    assert np.all(np.isfinite(gm.lower_bounds_))
    np.testing.assert_allclose(gm.weights_.sum(), 1.0)
    assert np.all(gm.weights_ > 0)
    assert np.all(np.isfinite(gm.predict_proba(X)))


# --------------------------------------------------------------------------
# sample, information criteria, clustering quality, verbosity


def test_sample_shapes_and_labels(data, make_init, fit_quiet):
    X, y = data
    gm = fit_quiet(_gm(X, y, make_init), X)
    Xs, ys = gm.sample(500)
    assert Xs.shape == (500, D)
    assert ys.shape == (500,)
    assert set(np.unique(ys)) <= set(range(K))
    # Samples come from the component they are labelled with.
    assert np.mean(gm.predict(Xs) == ys) > 0.9
    Xs1, ys1 = gm.sample()
    assert Xs1.shape == (1, D) and ys1.shape == (1,)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bic_aic(data, make_init, fit_quiet, covariance_type):
    X, y = data
    gm = fit_quiet(_gm(X, y, make_init, covariance_type), X)
    bic, aic = gm.bic(X), gm.aic(X)
    assert np.isfinite(bic) and np.isfinite(aic)
    assert len(X) > math.e**2 and bic > aic
    p = _n_parameters(covariance_type, K, D)
    loglik = gm.score(X) * len(X)
    np.testing.assert_allclose(aic, -2 * loglik + 2 * p, rtol=1e-10)
    np.testing.assert_allclose(bic, -2 * loglik + p * np.log(len(X)), rtol=1e-10)


def test_kmeans_init_recovers_separated_clusters(make_data, fit_quiet):
    metrics = pytest.importorskip("sklearn.metrics")
    X, labels = make_data(3000, 2, 4, seed=21, sep=8.0)
    gm = GaussianMixture(4, init_params="kmeans", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pred = gm.fit_predict(X)
    assert metrics.adjusted_rand_score(labels, np.asarray(pred)) > 0.95
    assert gm.converged_


def test_verbose_output(data, make_init, fit_quiet, capsys):
    X, y = data
    fit_quiet(_gm(X, y, make_init, verbose=0), X)
    assert capsys.readouterr().out == ""
    fit_quiet(_gm(X, y, make_init, verbose=2, verbose_interval=1), X)
    assert capsys.readouterr().out.strip() != ""


def test_array_like_input(data, make_init, fit_quiet):
    X, y = data
    gm = fit_quiet(_gm(X, y, make_init), X.tolist())
    ref = fit_quiet(_gm(X, y, make_init), X)
    np.testing.assert_allclose(gm.means_, ref.means_, rtol=1e-12)
    rows = X[:50].tolist()
    np.testing.assert_array_equal(gm.predict(rows), ref.predict(X[:50]))
    np.testing.assert_allclose(gm.score(rows), ref.score(X[:50]), rtol=1e-12)
    np.testing.assert_allclose(gm.bic(rows), ref.bic(X[:50]), rtol=1e-12)
    np.testing.assert_allclose(gm.aic(rows), ref.aic(X[:50]), rtol=1e-12)
