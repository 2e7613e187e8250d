"""EM with missing attributes (``nan_policy="marginalize"``) against a dense reference.

The reference below is an independent, deliberately plain NumPy/SciPy implementation
of EM for a Gaussian mixture with attributes missing at random (Ghahramani & Jordan
1994). It does not use anything from ``daskem.model``. Per iteration, from weights
``pi_k``, means ``mu_k`` and covariances ``Sigma_k``:

* E-step, row ``i`` with observed attributes ``o`` and missing ``m``: ``log p(x_o | k)``
  from the marginal ``N(mu_k[o], Sigma_k[o, o])``; ``r_ik`` the posterior of ``k``
  (clamped to the row's class for labelled rows); rows with nothing observed are left
  out.
* Expected statistics: ``x_hat_ik`` is ``x_i`` with ``x_m`` replaced by its conditional
  mean ``mu_k[m] + Sigma_k[m, o] Sigma_k[o, o]^-1 (x_o - mu_k[o])``, and ``C_ik`` is zero
  except for its ``[m, m]`` block, the conditional covariance
  ``Sigma_k[m, m] - Sigma_k[m, o] Sigma_k[o, o]^-1 Sigma_k[o, m]``.
* M-step with scikit-learn's conventions (``N_k + 10 eps``, ``reg_covar`` on the
  diagonal) over ``w_i r_ik [(x_hat_ik - mu_k)(x_hat_ik - mu_k)^T + C_ik]``.
* Objective: the observed-data mean log-likelihood at the parameters *before* the
  M-step (as scikit-learn's ``lower_bound_``).

The reference is checked on its own: on complete data it follows scikit-learn's
iterations, on incomplete data its objective never decreases and its fixed point is a
stationary point of the observed-data likelihood (numerical gradient). daskem is then
compared with it.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy.linalg import cho_solve, solve_triangular
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

import daskem

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
EPS10 = 10.0 * np.finfo(np.float64).eps
LOG_2PI = np.log(2.0 * np.pi)
N, D, K = 3000, 5, 3
N_ALL_MISSING = 7
RTOL, ATOL = 1e-8, 1e-10


# --------------------------------------------------------------------------- reference


def ref_expand(cov: np.ndarray, ct: str, n_components: int, n_features: int) -> np.ndarray:
    """Covariances in ``ct``'s (scikit-learn) layout as a (K, D, D) stack of matrices."""
    cov = np.asarray(cov, dtype=np.float64)
    if ct == "full":
        return cov.copy()
    if ct == "tied":
        return np.repeat(cov[None], n_components, axis=0)
    if ct == "diag":
        return np.stack([np.diag(c) for c in cov])
    if ct == "spherical":
        return cov[:, None, None] * np.eye(n_features)[None]
    raise ValueError(ct)


def ref_covariances_from_precisions(prec: np.ndarray, ct: str) -> np.ndarray:
    """Covariances from scikit-learn-style ``precisions_init``."""
    prec = np.asarray(prec, dtype=np.float64)
    if ct == "full":
        return np.stack([np.linalg.inv(p) for p in prec])
    if ct == "tied":
        return np.linalg.inv(prec)
    return 1.0 / prec


def ref_e_step(X, weights, means, cov_full, labels=None):
    """E-step with missing values.

    Returns
    -------
    used : bool (n,)
        Rows with at least one observed attribute.
    log_norm : (n,)
        ``log sum_k pi_k p(x_o | k)`` (unlabelled) or ``log pi_c + log p(x_o | c)``
        (labelled); NaN for rows that are not used.
    resp : (n, K)
        Responsibilities (zero on unused rows).
    xhat : (n, K, D)
        Rows completed with each component's conditional mean.
    cond_cov : (n, K, D, D)
        Conditional covariance of the missing block (zero elsewhere).

    ``labels`` (optional, one component per class): rows with ``label >= 0`` have their
    responsibilities clamped to that component. ``weights`` is (K,), or (n, K) for
    weights that differ between rows (weights by pattern).
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    k_ = np.shape(weights)[-1]
    observed = np.isfinite(X)
    log_prob = np.full((n, k_), np.nan)
    xhat = np.zeros((n, k_, d))
    cond_cov = np.zeros((n, k_, d, d))
    patterns, inverse = np.unique(observed, axis=0, return_inverse=True)
    inverse = np.ravel(inverse)
    for p, o in enumerate(patterns):
        rows = np.flatnonzero(inverse == p)
        if not o.any():
            continue
        m = ~o
        xo = X[np.ix_(rows, np.flatnonzero(o))]
        for k in range(k_):
            sig = cov_full[k]
            s_oo = sig[np.ix_(o, o)]
            chol = np.linalg.cholesky(s_oo)
            diff = (xo - means[k, o]).T  # (|o|, n_p)
            z = solve_triangular(chol, diff, lower=True)
            log_prob[rows, k] = (
                -0.5 * np.sum(z * z, axis=0)
                - np.sum(np.log(np.diag(chol)))
                - 0.5 * o.sum() * LOG_2PI
            )
            xk = X[rows].copy()
            ck = np.zeros((d, d))
            if m.any():
                s_mo = sig[np.ix_(m, o)]
                xk[:, m] = means[k, m] + (s_mo @ cho_solve((chol, True), diff)).T
                ck[np.ix_(m, m)] = sig[np.ix_(m, m)] - s_mo @ cho_solve((chol, True), s_mo.T)
            xhat[rows, k] = xk
            cond_cov[rows, k] = ck
    used = observed.any(axis=1)
    with np.errstate(divide="ignore"):  # weights (K,), or (n, K): one row per row of X
        wlp = np.log(np.atleast_2d(weights)) + log_prob
    log_norm = np.full(n, np.nan)
    resp = np.zeros((n, k_))
    log_norm[used] = logsumexp(wlp[used], axis=1)
    resp[used] = np.exp(wlp[used] - log_norm[used, None])
    if labels is not None:
        labels = np.asarray(labels)
        lab = np.flatnonzero(used & (labels >= 0))
        resp[lab] = 0.0
        resp[lab, labels[lab]] = 1.0
        log_norm[lab] = wlp[lab, labels[lab]]
    return used, log_norm, resp, xhat, cond_cov


def ref_m_step(resp, xhat, cond_cov, sample_weight, used, ct, reg_covar):
    """scikit-learn's M-step on the expected complete-data statistics."""
    wr = sample_weight[used, None] * resp[used]
    xh, cc = xhat[used], cond_cov[used]
    d = xh.shape[2]
    nk = wr.sum(axis=0) + EPS10
    means = np.einsum("nk,nkd->kd", wr, xh) / nk[:, None]
    diff = xh - means[None]
    scatter = np.einsum("nk,nkd,nke->kde", wr, diff, diff) + np.einsum("nk,nkde->kde", wr, cc)
    weights = nk / nk.sum()
    if ct == "full":
        cov = scatter / nk[:, None, None] + reg_covar * np.eye(d)[None]
    elif ct == "tied":
        cov = scatter.sum(axis=0) / nk.sum() + reg_covar * np.eye(d)
    else:
        diag = np.einsum("kdd->kd", scatter) / nk[:, None] + reg_covar
        cov = diag if ct == "diag" else diag.mean(axis=1)
    return weights, means, cov


def ref_em(
    X,
    weights,
    means,
    cov,
    ct,
    n_iter,
    *,
    reg_covar=1e-6,
    sample_weight=None,
    labels=None,
    pattern_weights=False,
):
    """``n_iter`` EM iterations; returns the parameters and the objective history.

    ``pattern_weights``: after each M-step every pattern of observed attributes whose
    rows weigh at least ``10 K`` gets its own weights, ``pi_{k|m} = sum_{i in m} w_i
    r_ik / sum_{i in m} w_i`` (floored at ``exp(-80)``, renormalised), used by its rows
    in the next E-step; the rows of other patterns, and every row in the first E-step,
    use the global weights. ``patterns`` and ``pattern_weights`` are returned.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    k_ = len(weights)
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    history = []
    row_weights = weights
    observed = np.isfinite(X)
    patterns, inverse = np.unique(observed, axis=0, return_inverse=True)
    inverse = np.ravel(inverse)
    table = None
    for _ in range(n_iter):
        cov_full = ref_expand(cov, ct, k_, d)
        used, log_norm, resp, xhat, cc = ref_e_step(X, row_weights, means, cov_full, labels)
        history.append(float(np.sum(sw[used] * log_norm[used]) / np.sum(sw[used])))
        weights, means, cov = ref_m_step(resp, xhat, cc, sw, used, ct, reg_covar)
        row_weights = weights
        if pattern_weights:
            table = np.zeros((len(patterns), k_))
            for p, o in enumerate(patterns):
                rows = np.flatnonzero(inverse == p)
                if o.any() and sw[rows].sum() >= 10.0 * k_:
                    pw = np.maximum((sw[rows] @ resp[rows]) / sw[rows].sum(), np.exp(-80.0))
                    table[p] = pw / pw.sum()
                else:  # too few rows (or nothing observed): the global weights
                    table[p] = weights
            own = np.array([o.any() and sw[inverse == p].sum() >= 10.0 * k_ for p, o in
                            enumerate(patterns)])  # fmt: skip
            row_weights = table[inverse]
    out = {"weights": weights, "means": means, "covariances": cov, "history": history}
    if pattern_weights:
        out["patterns"] = patterns[own]
        out["pattern_weights"] = table[own]
    return out


def ref_objective(X, weights, means, cov, ct, sample_weight=None, labels=None):
    """Observed-data (weighted) mean log-likelihood at the given parameters."""
    X = np.asarray(X, dtype=np.float64)
    sw = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    cov_full = ref_expand(cov, ct, len(weights), X.shape[1])
    used, log_norm, *_ = ref_e_step(X, weights, means, cov_full, labels)
    return float(np.sum(sw[used] * log_norm[used]) / np.sum(sw[used]))


# --------------------------------------------------------------------------- data


def _blobs(n, d, k, seed, sep=4.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=sep, size=(k, d))
    proportions = np.arange(1, k + 1, dtype=float) + k
    proportions /= proportions.sum()
    labels = rng.choice(k, size=n, p=proportions)
    X = np.empty((n, d))
    for j in range(k):
        A = rng.normal(scale=0.5, size=(d, d))
        cov = A @ A.T + 0.5 * np.eye(d)
        idx = labels == j
        X[idx] = rng.multivariate_normal(centers[j], cov, size=idx.sum())
    return X, labels, centers


def _punch_holes(X, seed, frac=0.3, n_all_missing=N_ALL_MISSING):
    """30 % of rows lose 1-3 attributes; ``n_all_missing`` rows lose all of them."""
    rng = np.random.default_rng(seed)
    X = X.copy()
    n, d = X.shape
    rows = rng.choice(n, size=int(frac * n), replace=False)
    for i in rows:
        cols = rng.choice(d, size=rng.integers(1, 4), replace=False)
        X[i, cols] = np.nan
    all_missing = rng.choice(np.setdiff1d(np.arange(n), rows), size=n_all_missing, replace=False)
    X[all_missing] = np.nan
    return X, np.sort(all_missing)


def _init(ct, centers, d, k, seed, poor=False):
    """Starting (weights, means, precisions_init, covariances) in ``ct``'s layout."""
    rng = np.random.default_rng(seed)
    if poor:
        weights = np.full(k, 1.0 / k)
        means = centers.mean(axis=0) + rng.normal(scale=0.3, size=(k, d))
        cov_full = np.stack([25.0 * np.eye(d)] * k)
    else:
        weights = np.array([0.25, 0.35, 0.4])[:k]
        weights = weights / weights.sum()
        means = centers + rng.normal(scale=0.7, size=(k, d))
        cov_full = []
        for _ in range(k):
            A = rng.normal(scale=0.4, size=(d, d))
            cov_full.append(A @ A.T + 1.5 * np.eye(d))
        cov_full = np.stack(cov_full)
    cov = {
        "full": cov_full,
        "tied": cov_full.mean(axis=0),
        "diag": np.stack([np.diag(c) for c in cov_full]),
        "spherical": np.array([np.diag(c).mean() for c in cov_full]),
    }[ct]
    prec = {
        "full": lambda c: np.stack([np.linalg.inv(ci) for ci in c]),
        "tied": np.linalg.inv,
        "diag": lambda c: 1.0 / c,
        "spherical": lambda c: 1.0 / c,
    }[ct](cov)
    # the reference starts from the covariances that ``prec`` stands for
    return weights, means, prec, ref_covariances_from_precisions(prec, ct)


@pytest.fixture(scope="module")
def complete():
    X, labels, centers = _blobs(N, D, K, seed=1)
    return X, labels, centers


@pytest.fixture(scope="module")
def incomplete(complete):
    X, labels, centers = complete
    Xm, all_missing = _punch_holes(X, seed=2)
    return Xm, labels, centers, all_missing


def _assert_params(gm, ref, what=""):
    for attr, key in (
        ("weights_", "weights"),
        ("means_", "means"),
        ("covariances_", "covariances"),
    ):
        np.testing.assert_allclose(
            getattr(gm, attr), ref[key], rtol=RTOL, atol=ATOL, err_msg=f"{what} {attr}"
        )


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_reference_matches_sklearn_on_complete_data(complete, ct):
    X, _, centers = complete
    n_iter = 6
    w0, m0, p0, c0 = _init(ct, centers, D, K, seed=3)
    ref = ref_em(X, w0, m0, c0, ct, n_iter)
    sk = SklearnGaussianMixture(
        K,
        covariance_type=ct,
        weights_init=w0,
        means_init=m0,
        precisions_init=p0,
        max_iter=n_iter,
        tol=0.0,
        reg_covar=1e-6,
        random_state=0,
    ).fit(X)
    assert sk.n_iter_ == n_iter
    _assert_params(sk, ref, "sklearn")
    np.testing.assert_allclose(sk.lower_bound_, ref["history"][-1], rtol=RTOL, atol=ATOL)
    # the trajectory really moves (the comparison is not of a fixed point)
    assert abs(ref["history"][-1] - ref["history"][0]) > 1e-2


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_reference_loglik_never_decreases(incomplete, ct):
    X, _, centers, _ = incomplete
    w0, m0, _, c0 = _init(ct, centers, D, K, seed=4, poor=True)
    hist = np.array(ref_em(X, w0, m0, c0, ct, 30)["history"])
    assert hist[-1] > hist[0] + 1.0
    assert np.all(np.diff(hist) >= -1e-10 * np.abs(hist[1:]))


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_reference_fixed_point_is_stationary(ct):
    """At the EM fixed point (reg_covar=0) the observed-data likelihood is stationary.

    This checks the conditional means and, through the covariance gradient, the
    conditional covariances of the reference on data with missing attributes.
    """
    d, k = 3, 2
    X, _, centers = _blobs(400, d, k, seed=5, sep=5.0)
    X, _ = _punch_holes(X, seed=6, frac=0.4, n_all_missing=2)
    w0, m0, _, c0 = _init(ct, centers, d, k, seed=7)
    w, m, c = w0[:k] / w0[:k].sum(), m0, c0
    for _ in range(40):
        fit = ref_em(X, w, m, c, ct, 25, reg_covar=0.0)
        moved = np.max(np.abs(fit["means"] - m))
        w, m, c = fit["weights"], fit["means"], fit["covariances"]
        if moved < 1e-12:
            break
    assert moved < 1e-10

    def grad(f, x, h=1e-5, symmetric=False):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            if symmetric and idx[-2] > idx[-1]:
                continue
            e = np.zeros_like(x)
            e[idx] = h
            if symmetric:
                e[idx[:-2] + (idx[-1], idx[-2])] = h
            g[idx] = (f(x + e) - f(x - e)) / (2 * h)
        return g

    g_means = grad(lambda mm: ref_objective(X, w, mm, c, ct), m)
    g_cov = grad(lambda cc: ref_objective(X, w, m, cc, ct), c, symmetric=ct in ("full", "tied"))
    g_weights = grad(lambda ww: ref_objective(X, ww, m, c, ct), w)
    np.testing.assert_allclose(g_means, 0.0, atol=1e-7)
    np.testing.assert_allclose(g_cov, 0.0, atol=1e-7)
    # d/dpi_k of the unnormalised log-likelihood is N_k / (n pi_k) = 1 at the fixed point
    np.testing.assert_allclose(g_weights, 1.0, atol=1e-7)


# --------------------------------------------------------------------------- daskem


def _daskem_gm(ct, w0, m0, p0, max_iter, cls=daskem.GaussianMixture, **kwargs):
    return cls(
        n_components=K,
        covariance_type=ct,
        nan_policy="marginalize",
        means_init=m0,
        weights_init=w0,
        precisions_init=p0,
        max_iter=max_iter,
        tol=0.0,
        reg_covar=1e-6,
        random_state=0,
        **kwargs,
    )


def _fit_with_reference(incomplete, ct, kind, n_iter=10, **kwargs):
    """The reference's ``n_iter`` iterations and daskem's from the same start, on the
    NumPy rows or on Dask chunks (uneven row chunks and a chunked feature axis:
    statistics merged across chunks)."""
    X, _, centers, all_missing = incomplete
    w0, m0, p0, c0 = _init(ct, centers, D, K, seed=3)
    ref = ref_em(X, w0, m0, c0, ct, n_iter, **kwargs)
    X_in = X if kind == "numpy" else da.from_array(X, chunks=((317, 1000, 50, 1633), (2, 3)))
    gm = _daskem_gm(ct, w0, m0, p0, n_iter, **kwargs).fit(X_in)
    return X, all_missing, ref, gm


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_marginalize_matches_reference(incomplete, ct, kind):
    X, all_missing, ref, gm = _fit_with_reference(incomplete, ct, kind)
    n_iter = 10
    assert gm.n_iter_ == n_iter
    _assert_params(gm, ref, "daskem")
    np.testing.assert_allclose(gm.lower_bound_, ref["history"][-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gm.lower_bounds_, ref["history"], rtol=RTOL, atol=ATOL)
    assert gm.n_excluded_ == len(all_missing)


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_marginalize_loglik_never_decreases(incomplete, ct):
    X, _, centers, _ = incomplete
    w0, m0, p0, _ = _init(ct, centers, D, K, seed=4, poor=True)
    gm = _daskem_gm(ct, w0, m0, p0, 30).fit(X)
    hist = np.asarray(gm.lower_bounds_)
    assert len(hist) == 30
    assert not gm.reseeds_
    assert hist[-1] > hist[0] + 1.0  # the start really was poor
    assert np.all(np.diff(hist) >= -1e-10 * np.abs(hist[1:])), np.diff(hist)


def test_marginalize_sample_weight(incomplete):
    X, _, centers, _ = incomplete
    ct, n_iter = "full", 8
    sw = np.random.default_rng(8).integers(0, 4, size=len(X))
    Xr = np.repeat(X, sw, axis=0)
    w0, m0, p0, c0 = _init(ct, centers, D, K, seed=3)
    weighted = _daskem_gm(ct, w0, m0, p0, n_iter).fit(X, sample_weight=sw.astype(float))
    repeated = _daskem_gm(ct, w0, m0, p0, n_iter).fit(Xr)
    for attr in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(
            getattr(weighted, attr), getattr(repeated, attr), rtol=RTOL, atol=ATOL, err_msg=attr
        )
    np.testing.assert_allclose(weighted.lower_bound_, repeated.lower_bound_, rtol=RTOL, atol=ATOL)
    ref = ref_em(X, w0, m0, c0, ct, n_iter, sample_weight=sw)
    _assert_params(weighted, ref, "weighted")
    np.testing.assert_allclose(weighted.lower_bound_, ref["history"][-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_marginalize_labels_match_reference(incomplete, ct):
    X, labels, centers, all_missing = incomplete
    n_iter = 10
    rng = np.random.default_rng(9)
    y = np.full(len(X), -1, dtype=np.int64)
    candidates = np.setdiff1d(np.arange(len(X)), all_missing)
    lab = rng.choice(candidates, size=int(0.05 * len(X)), replace=False)
    y[lab] = labels[lab]
    assert set(y[lab]) == set(range(K))
    # some labelled rows have missing attributes: they must be used, marginalised
    assert np.isnan(X[lab]).any(axis=1).sum() > 10
    w0, m0, p0, c0 = _init(ct, centers, D, K, seed=3)
    ref = ref_em(X, w0, m0, c0, ct, n_iter, labels=y)
    clf = daskem.GaussianMixtureClassifier(
        covariance_type=ct,
        nan_policy="marginalize",
        means_init=m0,
        weights_init=w0,
        precisions_init=p0,
        max_iter=n_iter,
        tol=0.0,
        reg_covar=1e-6,
        random_state=0,
    ).fit(X, y)
    np.testing.assert_array_equal(clf.classes_, np.arange(K))
    np.testing.assert_array_equal(clf.component_classes_, np.arange(K))
    assert clf.n_iter_ == n_iter
    _assert_params(clf, ref, "classifier")
    np.testing.assert_allclose(clf.lower_bound_, ref["history"][-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(clf.lower_bounds_, ref["history"], rtol=RTOL, atol=ATOL)
    assert clf.n_excluded_ == len(all_missing)


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_marginalize_equals_plain_fit_without_missing(complete, ct):
    X, _, centers = complete
    w0, m0, p0, _ = _init(ct, centers, D, K, seed=3)
    marg = _daskem_gm(ct, w0, m0, p0, 10).fit(X)
    plain = daskem.GaussianMixture(
        n_components=K,
        covariance_type=ct,
        means_init=m0,
        weights_init=w0,
        precisions_init=p0,
        max_iter=10,
        tol=0.0,
        reg_covar=1e-6,
        random_state=0,
    ).fit(X)
    np.testing.assert_array_equal(marg.means_, plain.means_)
    for attr in ("weights_", "covariances_", "lower_bounds_"):
        np.testing.assert_allclose(
            getattr(marg, attr), getattr(plain, attr), rtol=1e-12, atol=0, err_msg=attr
        )
    assert marg.n_excluded_ == 0


# --------------------------------------------------------------------------- weights by pattern


def _sorted_patterns(patterns, weights):
    """Patterns (and their weights) in one order, to compare two fits' tables."""
    order = np.lexsort(np.asarray(patterns, dtype=int).T[::-1])
    return np.asarray(patterns)[order], np.asarray(weights)[order]


@pytest.mark.parametrize("kind", ["numpy", "dask"])
@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_pattern_weights_match_reference(incomplete, ct, kind):
    X, all_missing, ref, gm = _fit_with_reference(incomplete, ct, kind, pattern_weights=True)
    _assert_params(gm, ref, "daskem")
    np.testing.assert_allclose(gm.lower_bounds_, ref["history"], rtol=RTOL, atol=ATOL)
    pat, pw = _sorted_patterns(gm.patterns_, gm.pattern_weights_)
    ref_pat, ref_pw = _sorted_patterns(ref["patterns"], ref["pattern_weights"])
    np.testing.assert_array_equal(pat, ref_pat)
    np.testing.assert_allclose(pw, ref_pw, rtol=RTOL, atol=ATOL)
    assert gm.n_excluded_ == len(all_missing)
    # the weights by pattern differ from the global ones: the test can fail
    assert np.abs(pw - gm.weights_).max() > 1e-3
    # rows take their pattern's weights in prediction
    cov_full = ref_expand(gm.covariances_, ct, K, D)
    table = {p.tobytes(): w for p, w in zip(pat, pw, strict=True)}
    obs = np.isfinite(X)
    used = obs.any(axis=1)
    row_w = np.stack([table.get(o.tobytes(), gm.weights_) for o in obs])
    _, log_norm, resp, _, _ = ref_e_step(X, row_w, gm.means_, cov_full)
    np.testing.assert_allclose(gm.score_samples(X)[used], log_norm[used], rtol=1e-9)
    np.testing.assert_allclose(gm.predict_proba(X)[used], resp[used], rtol=1e-7, atol=1e-9)


def test_pattern_weights_with_labels_and_weights_match_reference(incomplete):
    X, labels, centers, _ = incomplete
    ct, n_iter = "full", 8
    rng = np.random.default_rng(5)
    sw = rng.uniform(0.5, 2.0, size=len(X))
    lab = np.full(len(X), -1)
    pick = rng.choice(np.flatnonzero(np.isfinite(X).any(axis=1)), size=60, replace=False)
    lab[pick] = labels[pick]
    w0, m0, p0, c0 = _init(ct, centers, D, K, seed=3)
    ref = ref_em(X, w0, m0, c0, ct, n_iter, sample_weight=sw, labels=lab, pattern_weights=True)
    gm = _daskem_gm(
        ct, w0, m0, p0, n_iter, cls=daskem.GaussianMixtureClassifier, pattern_weights=True
    ).fit(X, lab, sample_weight=sw)
    _assert_params(gm, ref, "classifier")
    pat, pw = _sorted_patterns(gm.patterns_, gm.pattern_weights_)
    np.testing.assert_allclose(
        pw, _sorted_patterns(ref["patterns"], ref["pattern_weights"])[1], rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("ct", COVARIANCE_TYPES)
def test_pattern_weights_loglik_never_decreases(incomplete, ct):
    X, _, centers, _ = incomplete
    w0, m0, p0, _ = _init(ct, centers, D, K, seed=4, poor=True)
    gm = _daskem_gm(ct, w0, m0, p0, 30, pattern_weights=True).fit(X)
    hist = np.asarray(gm.lower_bounds_)
    assert len(hist) == 30 and not gm.reseeds_
    assert hist[-1] > hist[0] + 1.0
    assert np.all(np.diff(hist) >= -1e-10 * np.abs(hist[1:])), np.diff(hist)
