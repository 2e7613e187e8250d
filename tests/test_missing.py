"""Missing attributes: gap filling, posterior maps with gaps filled, options and errors.

The EM itself is checked against an independent dense implementation in
``test_missing_reference.py``.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal

from daskem import GaussianMixture
from daskem.io import fit_stack, open_stack, posterior
from daskem.synthetic import make_stack

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _blobs(n=1500, D=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * D, [4.0] * D, [0.0, 4.0] + [2.0] * (D - 2)])
    A = rng.normal(size=(D, D)) * 0.4 + np.eye(D)
    X = centres[rng.integers(0, 3, n)] + rng.normal(size=(n, D)) @ A.T
    return X


def _hide(X, frac=0.3, seed=1):
    rng = np.random.default_rng(seed)
    Xm = X.copy()
    n, D = X.shape
    for i in rng.choice(n, int(frac * n), replace=False):
        Xm[i, rng.choice(D, rng.integers(1, D), replace=False)] = np.nan
    return Xm


@pytest.fixture(scope="module")
def fitted():
    X = _blobs()
    Xm = _hide(X)
    gm = GaussianMixture(3, nan_policy="marginalize", random_state=0).fit(Xm)
    return X, Xm, gm


def test_impute_is_the_posterior_mixed_conditional_mean(fitted):
    """Row by row from the definition, with scipy's densities (full covariances)."""
    _, Xm, gm = fitted
    filled, std = gm.impute(Xm, return_std=True)
    rows = np.flatnonzero(np.isnan(Xm).any(axis=1) & np.isfinite(Xm).any(axis=1))[:25]
    for i in rows:
        o = np.isfinite(Xm[i])
        m = ~o
        dens = np.array(
            [
                w * multivariate_normal(mu[o], S[np.ix_(o, o)]).pdf(Xm[i, o])
                for w, mu, S in zip(gm.weights_, gm.means_, gm.covariances_, strict=True)
            ]
        )
        r = dens / dens.sum()
        cm, cv = [], []
        for mu, S in zip(gm.means_, gm.covariances_, strict=True):
            B = S[np.ix_(m, o)] @ np.linalg.inv(S[np.ix_(o, o)])
            cm.append(mu[m] + B @ (Xm[i, o] - mu[o]))
            cv.append(np.diag(S[np.ix_(m, m)] - B @ S[np.ix_(o, m)]))
        cm, cv = np.array(cm), np.array(cv)
        mean = r @ cm
        var = r @ (cv + (cm - mean) ** 2)
        np.testing.assert_allclose(filled[i, m], mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(std[i, m], np.sqrt(var), rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(filled[i, o], Xm[i, o])
        assert np.all(std[i, o] == 0)


def test_impute_dask_equals_numpy_and_rows_with_nothing_observed_stay_nan(fitted):
    _, Xm, gm = fitted
    Xm = Xm.copy()
    Xm[:3] = np.nan
    f_np, s_np = gm.impute(Xm, return_std=True)
    f_da, s_da = gm.impute(da.from_array(Xm, chunks=(200, 4)), return_std=True)
    assert isinstance(f_da, da.Array)
    # same rows, grouped by pattern per chunk instead of over all rows: rounding only
    np.testing.assert_allclose(f_da.compute(), f_np, rtol=1e-13, atol=0)
    np.testing.assert_allclose(s_da.compute(), s_np, rtol=1e-12, atol=0)
    assert np.isnan(f_np[:3]).all() and np.isnan(s_np[:3]).all()
    assert np.isfinite(f_np[3:]).all()


def test_impute_beats_mean_filling(fitted):
    X, Xm, gm = fitted
    filled, std = gm.impute(Xm, return_std=True)
    hidden = np.isnan(Xm)
    err = np.sqrt(np.mean((filled[hidden] - X[hidden]) ** 2))
    mean_err = np.sqrt(np.mean((np.nanmean(Xm, axis=0)[None].repeat(len(X), 0) - X)[hidden] ** 2))
    assert err < 0.8 * mean_err
    cover = np.mean(np.abs(filled[hidden] - X[hidden]) <= 2 * std[hidden])
    assert 0.9 <= cover <= 0.99


def test_marginalized_model_predicts_rows_with_missing_values(fitted):
    X, Xm, gm = fitted
    proba = gm.predict_proba(Xm)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(gm.predict(X), gm.predict_proba(X).argmax(axis=1))
    assert np.isfinite(gm.score_samples(Xm)).all()
    # the other policies keep refusing missing values at prediction
    omit = GaussianMixture(3, nan_policy="omit", random_state=0).fit(Xm)
    with pytest.raises(ValueError, match="non-finite"):
        omit.predict(Xm)


def test_nan_policy_unknown_and_omit_with_every_row_partial():
    X = _blobs(300)
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        GaussianMixture(2, nan_policy="drop").fit(X)
    Xp = X.copy()
    Xp[::2, 0] = np.nan
    Xp[1::2, 1] = np.nan  # every row misses one attribute
    with pytest.raises(ValueError, match="nan_policy='omit'.*use nan_policy='marginalize'"):
        GaussianMixture(2, nan_policy="omit").fit(Xp)
    gm = GaussianMixture(2, nan_policy="marginalize", random_state=0).fit(Xp)
    assert gm.n_partial_ == len(X) and gm.n_excluded_ == 0
    Xn = X.copy()
    Xn[:, 2] = np.nan
    with pytest.raises(ValueError, match=r"Attribute\(s\) \(columns of X\) \[2\] are missing"):
        GaussianMixture(2, nan_policy="marginalize").fit(Xn)


@pytest.mark.parametrize("D", [1, 3, 8, 9, 16, 20])
def test_pattern_codes_name_patterns_in_any_layout(D):
    from itertools import product

    from daskem.model.missing import observed_patterns, pattern_code, pattern_codes

    rng = np.random.default_rng(D)
    if D <= 9:
        obs = np.array(list(product([False, True], repeat=D)))
    else:
        obs = rng.random((3000, D)) < 0.7
    codes = pattern_codes(obs)
    np.testing.assert_array_equal(pattern_codes(np.asfortranarray(obs)), codes)
    _, inverse = np.unique(obs, axis=0, return_inverse=True)
    assert len(np.unique(codes)) == len(np.unique(inverse))  # one code per pattern
    assert all(pattern_code(obs[i]) == codes[i] for i in range(0, len(obs), 97))
    groups = observed_patterns(obs)
    assert sum(len(rows) for _, rows, _ in groups) == len(obs)
    for pattern, rows, code in groups:
        assert (obs[rows] == pattern).all() and (codes[rows] == code).all()


# ------------------------------------------------------------------- stacks with clouds


@pytest.fixture(scope="module")
def clouds():
    ds = make_stack((128, 128), n_classes=4, n_features=4, clouds=0.3, seed=3)
    stack = open_stack(ds, chunks=64)
    assert stack.variables == ("attr_0", "attr_1", "attr_2", "attr_3")
    with dask.config.set(scheduler="synchronous"):
        fits = {
            p: fit_stack(stack, 4, random_state=0, nan_policy=p, tol=1e-6, max_iter=500)
            for p in ("marginalize", "omit")
        }
    return ds, stack, fits


def test_fit_stack_counts_pixels_without_an_extra_pass(clouds):
    ds, stack, fits = clouds
    X = np.stack([ds[v].values.ravel() for v in stack.variables], axis=1)
    obs = np.isfinite(X)
    empty, partial = int((~obs.any(1)).sum()), int((obs.any(1) & ~obs.all(1)).sum())
    assert partial > 0.2 * len(X)
    m, o = fits["marginalize"], fits["omit"]
    assert m.excluded_counts_ == {"all_missing": empty, "partially_missing": partial,
                                  "total": empty}  # fmt: skip
    assert o.excluded_counts_ == {"all_missing": empty, "partially_missing": partial,
                                  "total": empty + partial}  # fmt: skip
    assert m.n_partial_ == partial and o.n_partial_ == 0


def test_marginalize_recovers_weights_closer_than_omit(clouds):
    """Clouds cover whole regions, hence some classes more than others: leaving cloudy
    pixels out biases the mixing weights; fitting them through their observed attributes
    does not."""
    ds, _, fits = clouds
    t = ds["truth"].values.ravel()
    true_w = np.bincount(t[t >= 0], minlength=4) / (t >= 0).sum()
    true_means = np.asarray(ds.attrs["true_means"])
    sd = np.sqrt(np.diagonal(np.asarray(ds.attrs["true_covariances"]), axis1=1, axis2=2))
    errors = {}
    for p, gm in fits.items():
        d = (((gm.means_[:, None] - true_means[None]) / sd.mean(0)) ** 2).sum(-1)
        r, c = linear_sum_assignment(d)
        idx = r[np.argsort(c)]
        errors[p] = np.abs(gm.weights_[idx] - true_w).max()
    assert errors["marginalize"] < errors["omit"], errors


def test_posterior_impute_fills_only_the_gaps(clouds):
    ds, stack, fits = clouds
    post = posterior(fits["marginalize"], stack, impute=True)
    names = list(stack.variables)
    for v in names:
        assert post[v].dtype == np.float32 and post[f"{v}_std"].dtype == np.float32
        assert post[v].dims == stack.dims
        assert "gaps filled" in post[v].attrs["long_name"]
    post = post.compute()
    se, se_mean, inside = [], [], []
    for v in names:
        x = ds[v].values
        filled, std = post[v].values, post[f"{v}_std"].values
        observed = np.isfinite(x)
        np.testing.assert_array_equal(filled[observed], x[observed])
        assert np.isnan(std[observed]).all()
        if f"{v}_true" in ds:
            truth = ds[f"{v}_true"].values
            gap = ~observed & np.isfinite(truth) & np.isfinite(filled)
            assert gap.sum() > 100 and np.isfinite(std[gap]).all()
            sd = np.nanstd(x)
            se.append(((filled[gap] - truth[gap]) / sd) ** 2)
            se_mean.append(((np.nanmean(x) - truth[gap]) / sd) ** 2)
            inside.append(np.abs(filled[gap] - truth[gap]) <= 2 * std[gap])
    rmse, rmse_mean = np.sqrt(np.concatenate(se).mean()), np.sqrt(np.concatenate(se_mean).mean())
    assert rmse < rmse_mean
    assert 0.93 <= np.concatenate(inside).mean() <= 0.97


def test_posterior_impute_refuses_name_clashes_and_models_that_cannot_impute(clouds):
    ds, stack, fits = clouds
    clash = ds.rename({"attr_0": "entropy"})
    st = open_stack(clash, chunks=64)
    gm = fits["marginalize"]
    saved = gm.feature_names_in_
    try:
        gm.feature_names_in_ = np.asarray(st.variables, dtype=object)
        with pytest.raises(ValueError, match=r"\['entropy'\] clash"):
            posterior(gm, st, impute=True)
    finally:
        gm.feature_names_in_ = saved

    class NoImpute(GaussianMixture):  # a model kind without gap filling
        _impute_rows = None

    plain = NoImpute(4)
    plain.__dict__.update({k: v for k, v in gm.__dict__.items() if k.endswith("_")})
    with pytest.raises(ValueError, match="cannot fill missing attributes"):
        posterior(plain, stack, impute=True)


def test_blocks_with_no_usable_partial_row():
    """A block whose only incomplete rows have nothing observed (or are empty)."""
    from daskem.model.gmm import GMMModel
    from daskem.model.missing import MissingGMMModel

    X = _blobs(400)
    gm = GaussianMixture(3, random_state=0).fit(X)
    params = gm._fitted_params()
    Xe = X.copy()
    Xe[:5] = np.nan
    full = GMMModel(gm.covariance_type).block_stats(params, X[5:])
    st = MissingGMMModel(gm.covariance_type).block_stats(params, Xe)
    assert st.n_empty == st.n_excluded == 5 and st.n_partial == 0
    np.testing.assert_allclose(st.mean, full.mean, rtol=1e-12)
    empty = MissingGMMModel(gm.covariance_type).block_stats(params, X[:0])
    assert empty.count == 0


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("pattern_weights", [False, True])
def test_block_statistics_do_not_depend_on_the_memory_layout(covariance_type, pattern_weights):
    """Row-major, feature-major and strided blocks give the same statistics.

    The kernels gather rows along the block's contiguous axis (a gather along the other
    axis would first copy the whole block); the values must not depend on which.
    """
    X = _hide(_blobs(3000, D=5), frac=0.4)
    gm = GaussianMixture(
        3,
        covariance_type=covariance_type,
        nan_policy="marginalize",
        pattern_weights=pattern_weights,
        max_iter=5,
        random_state=0,
    ).fit(X)
    model = gm._model()
    params = gm._fitted_params()
    for dtype in (np.float64, np.float32):
        Xc = X.astype(dtype)
        ref = model.block_stats(params, Xc)
        wide = np.zeros((X.shape[0], 2 * X.shape[1]), dtype=dtype)
        wide[:, ::2] = Xc
        for other in (np.asfortranarray(Xc), wide[:, ::2]):
            assert other.flags.c_contiguous is False
            st = model.block_stats(params, other)
            np.testing.assert_allclose(st.n, ref.n, rtol=1e-10)
            np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(st.m2, ref.m2, rtol=1e-10, atol=1e-12)
            assert st.loglik == pytest.approx(ref.loglik, rel=1e-12)
            assert st.count == ref.count and st.n_partial == ref.n_partial


def test_block_codes_are_kept_for_read_only_blocks_only():
    """A read-only block's codes are computed once while it lives; a writeable block is
    scanned every time (it may change), and a block with no missing value has none."""
    from daskem.engine import _feature_major
    from daskem.model import missing

    X = _hide(_blobs(500))
    block = _feature_major(X)
    assert not block.flags.writeable and block.flags.f_contiguous
    codes = missing.block_codes(block)
    np.testing.assert_array_equal(codes, missing.finite_codes(X))
    assert missing.block_codes(block) is codes  # kept
    assert missing.block_codes(_feature_major(_blobs(500))) is None  # nothing missing
    Xw = X.copy()
    first = missing.block_codes(Xw)
    Xw[:] = 0.0
    assert first is not None and missing.block_codes(Xw) is None  # writeable: scanned again
    del block
    other = _feature_major(X)
    missing.block_codes(other)  # an insertion prunes the freed blocks' entries
    assert all(ref() is not None for ref, _ in missing._CODES.entries.values())
    assert missing._CODES.entries[id(other)][0]() is other
