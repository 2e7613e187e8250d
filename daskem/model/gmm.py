"""Gaussian mixture math as pure NumPy block kernels.

This module owns the model math of a Gaussian mixture with ``full``, ``tied``,
``diag`` or ``spherical`` covariances, in scikit-learn's parametrisation by the
Cholesky factors of the precision matrices:

* :func:`estimate_weighted_log_prob` -- ``log pi_k + log N(x | mu_k, Sigma_k)`` for a block;
* :func:`log_responsibilities` -- the E-step, with optional clamping of labelled rows;
* :func:`block_stats` -- the fused E-step and sufficient statistics of one block,
  returned as a :class:`GMMStats` record whose ``+`` merges records in any order;
* :func:`m_step` -- reduced statistics to new parameters, with ``reg_covar`` and
  re-seeding of collapsed components;
* :class:`GMMModel` -- the object the EM engine drives (see :mod:`daskem.engine`).

It must not import Dask or xarray: every function takes NumPy arrays of one
block and returns NumPy arrays or small records.

Numerics: whatever the input dtype, a block is processed in row sub-blocks of
``block_rows`` rows cast to float64 one at a time (no whole-block upcast);
statistics are accumulated in float64, shifted by the current means (the
E-step forms ``x - mu_k`` anyway), turned into centred per-block moments and
merged pairwise across blocks (:func:`daskem.model.stats.merge_centred_moments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .stats import merge_centred_moments, merge_lowest

__all__ = [
    "COVARIANCE_TYPES",
    "GMMModel",
    "GMMParams",
    "GMMStats",
    "block_stats",
    "class_membership",
    "class_posterior",
    "compute_precision_cholesky",
    "covariances_from_precision_cholesky",
    "estimate_weighted_log_prob",
    "log_responsibilities",
    "m_step",
    "marginal_params",
    "n_parameters",
    "precisions_from_cholesky",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_LOG_2PI = math.log(2.0 * math.pi)
_EPS10 = 10.0 * np.finfo(np.float64).eps
DEFAULT_BLOCK_ROWS = 4096


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class GMMParams:
    """Parameters of a Gaussian mixture.

    Attributes
    ----------
    weights : ndarray of shape (K,)
    means : ndarray of shape (K, D)
    precisions_cholesky : ndarray
        (K, D, D) for ``full``, (D, D) for ``tied``, (K, D) for ``diag``, (K,) for
        ``spherical``; upper-triangular factors ``P`` with ``precision = P @ P.T``
        as in scikit-learn.
    covariance_type : str
    covariances : ndarray or None
        Same shapes as ``precisions_cholesky`` (covariance matrices / variances).
    component_class : ndarray of shape (K,) or None
        Class id owning each component, used to clamp labelled rows. ``None``
        means component ``k`` is class ``k``.
    """

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str
    covariances: np.ndarray | None = None
    component_class: np.ndarray | None = None

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])


def _full_like(cov_type: str, K: int) -> bool:
    return cov_type in ("full", "tied")


def compute_precision_cholesky(
    covariances: np.ndarray, covariance_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors of the precisions from covariances.

    Returns
    -------
    precisions_cholesky : ndarray
        Factors in scikit-learn's layout; rows of failed components are filled
        with the identity so the array stays finite.
    ok : ndarray of bool, shape (K,) (shape (1,) for ``tied``)
        Which components had a positive-definite covariance.
    """
    cov = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        K, D, _ = cov.shape
        out = np.empty_like(cov)
        ok = np.ones(K, dtype=bool)
        eye = np.eye(D)
        for k in range(K):
            try:
                c = np.linalg.cholesky(cov[k])
            except np.linalg.LinAlgError:
                ok[k] = False
                out[k] = eye
                continue
            # solve L Y = I  ->  Y = L^-1; precision cholesky = (L^-1)^T (upper)
            out[k] = _solve_lower(c, eye).T
            if not np.all(np.isfinite(out[k])):
                ok[k] = False
                out[k] = eye
        return out, ok
    if covariance_type == "tied":
        D = cov.shape[0]
        try:
            c = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            return np.eye(D), np.zeros(1, dtype=bool)
        out = _solve_lower(c, np.eye(D)).T
        return out, np.array([np.all(np.isfinite(out))])
    if covariance_type in ("diag", "spherical"):
        good = np.isfinite(cov) & (cov > 0)
        out = np.where(good, 1.0 / np.sqrt(np.where(good, cov, 1.0)), 1.0)
        ok = good if covariance_type == "spherical" else good.all(axis=1)
        return out, ok
    raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")


def _solve_lower(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve ``L X = B`` for lower-triangular ``L`` (forward substitution, D is small)."""
    D = L.shape[0]
    X = np.zeros_like(B, dtype=np.float64)
    for i in range(D):
        X[i] = (B[i] - L[i, :i] @ X[:i]) / L[i, i]
    return X


def precisions_from_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """Precision matrices (or diagonals) from their Cholesky factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def covariances_from_precision_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """Covariances from precision Cholesky factors (used when only precisions are known)."""
    if covariance_type == "full":
        return np.stack([np.linalg.inv(p @ p.T) for p in prec_chol])
    if covariance_type == "tied":
        return np.linalg.inv(prec_chol @ prec_chol.T)
    return 1.0 / prec_chol**2


def n_parameters(n_components: int, n_features: int, covariance_type: str) -> int:
    """Number of free parameters (for BIC/AIC), as scikit-learn counts them."""
    K, D = n_components, n_features
    cov = {
        "full": K * D * (D + 1) / 2.0,
        "tied": D * (D + 1) / 2.0,
        "diag": K * D,
        "spherical": K,
    }[covariance_type]
    return int(cov + K * D + K - 1)


# --------------------------------------------------------------------------- E-step


def _log_det_chol(prec_chol: np.ndarray, cov_type: str, D: int) -> np.ndarray:
    if cov_type == "full":
        return np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    if cov_type == "tied":
        return np.log(np.diag(prec_chol)).sum()
    if cov_type == "diag":
        return np.log(prec_chol).sum(axis=1)
    return D * np.log(prec_chol)


def _log_gaussian_block(xb: np.ndarray, params: GMMParams) -> np.ndarray:
    """log N(x | mu_k, Sigma_k) for a float64 sub-block, shape (n, K)."""
    n, D = xb.shape
    K = params.n_components
    P = params.precisions_cholesky
    ct = params.covariance_type
    maha = np.empty((n, K))
    if ct in ("full", "tied"):
        for k in range(K):
            Pk = P[k] if ct == "full" else P
            y = (xb - params.means[k]) @ Pk
            maha[:, k] = np.einsum("ij,ij->i", y, y)
    elif ct == "diag":
        for k in range(K):
            y = (xb - params.means[k]) * P[k]
            maha[:, k] = np.einsum("ij,ij->i", y, y)
    else:
        for k in range(K):
            d = xb - params.means[k]
            maha[:, k] = np.einsum("ij,ij->i", d, d) * P[k] ** 2
    return -0.5 * (D * _LOG_2PI + maha) + _log_det_chol(P, ct, D)


def estimate_weighted_log_prob(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """``log pi_k + log N(x | mu_k, Sigma_k)`` for every row of ``X``, shape (n, K), float64."""
    X = np.asarray(X)
    out = np.empty((X.shape[0], params.n_components))
    logw = _log_weights(params.weights)
    for s in range(0, X.shape[0], DEFAULT_BLOCK_ROWS):
        xb = np.asarray(X[s : s + DEFAULT_BLOCK_ROWS], dtype=np.float64)
        out[s : s + xb.shape[0]] = _log_gaussian_block(xb, params) + logw
    return out


def _log_weights(weights: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(weights)


def _allowed_components(labels: np.ndarray, params: GMMParams) -> np.ndarray | None:
    """Boolean (n, K) mask of the components each row may belong to, or None if unlabelled."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    lab = labels >= 0
    if not lab.any():
        return None
    cc = (
        params.component_class
        if params.component_class is not None
        else np.arange(params.n_components)
    )
    allowed = np.ones((labels.shape[0], params.n_components), dtype=bool)
    allowed[lab] = cc[None, :] == labels[lab, None]
    return allowed


def _normalise(wlp: np.ndarray, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Log-sum-exp normalisation of weighted log probabilities, clamped where ``allowed``."""
    if allowed is not None:
        wlp = np.where(allowed, wlp, -np.inf)
    mx = wlp.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(under="ignore"):
        s = np.exp(wlp - mx).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_norm = np.log(s) + mx
    log_resp = wlp - log_norm
    return log_norm[:, 0], log_resp


def log_responsibilities(
    X: np.ndarray, params: GMMParams, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The E-step on a block.

    Parameters
    ----------
    X : ndarray of shape (n, D)
    params : GMMParams
    labels : ndarray of int, shape (n,), optional
        Class of each row, ``-1`` for unlabelled. Labelled rows have their
        responsibilities clamped to the components of their class (renormalised
        within those components).

    Returns
    -------
    log_norm : ndarray of shape (n,)
        ``log p(x)`` for unlabelled rows and ``log p(x, class)`` for labelled rows.
    log_resp : ndarray of shape (n, K)
    """
    wlp = estimate_weighted_log_prob(X, params)
    allowed = _allowed_components(labels, params)
    return _normalise(wlp, allowed)


def marginal_params(params: GMMParams, observed: np.ndarray) -> GMMParams:
    """Parameters of the marginal mixture over the ``observed`` features (bool mask (D,)).

    The marginal of a Gaussian over a subset of coordinates is the Gaussian with the
    corresponding sub-vector of the mean and sub-matrix of the covariance (exact).
    """
    ct = params.covariance_type
    obs = np.asarray(observed, dtype=bool)
    cov = params.covariances
    if cov is None:
        cov = covariances_from_precision_cholesky(params.precisions_cholesky, ct)
    if ct == "full":
        sub = cov[:, obs][:, :, obs]
    elif ct == "tied":
        sub = cov[obs][:, obs]
    elif ct == "diag":
        sub = cov[:, obs]
    else:
        sub = cov
    prec_chol, _ = compute_precision_cholesky(sub, ct)
    return GMMParams(
        params.weights, params.means[:, obs], prec_chol, ct, sub, params.component_class
    )


def class_membership(params: GMMParams, n_classes: int | None = None) -> np.ndarray:
    """One-hot (K, C) matrix of the class owning each component."""
    cc = (
        np.arange(params.n_components)
        if params.component_class is None
        else np.asarray(params.component_class)
    )
    C = int(cc.max()) + 1 if n_classes is None else n_classes
    M = np.zeros((params.n_components, C))
    M[np.arange(params.n_components), cc] = 1.0
    return M


def class_posterior(
    params: GMMParams, X: np.ndarray, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior class probabilities and log density of each row, missing values allowed.

    Parameters
    ----------
    params : GMMParams
    X : ndarray of shape (n, D)
        NaN (or inf) marks a missing attribute.
    n_classes : int, optional
        Number of classes (default: from ``params.component_class``).

    Returns
    -------
    proba : ndarray of shape (n, n_classes)
        ``p(class | x_observed)``: the sum of the posteriors of the class's components.
        Rows with every attribute missing are NaN.
    log_density : ndarray of shape (n,)
        ``log p(x_observed)``; rows with some attributes missing use the marginal
        Gaussian over the observed ones (exact), rows with none observed are NaN.
    """
    X = np.asarray(X)
    n = X.shape[0]
    M = class_membership(params, n_classes)
    wlp = np.full((n, params.n_components), np.nan)
    obs = np.isfinite(X)
    complete = obs.all(axis=1)
    if complete.all():
        wlp = estimate_weighted_log_prob(X, params)
    else:
        if complete.any():
            wlp[complete] = estimate_weighted_log_prob(X[complete], params)
        partial = np.flatnonzero(~complete & obs.any(axis=1))
        if partial.size:
            patterns, inverse = np.unique(obs[partial], axis=0, return_inverse=True)
            for j, pattern in enumerate(patterns):
                rows = partial[inverse.ravel() == j]
                sub = marginal_params(params, pattern)
                wlp[rows] = estimate_weighted_log_prob(X[np.ix_(rows, pattern)], sub)
    valid = ~np.isnan(wlp[:, 0]) if n else np.zeros(0, dtype=bool)
    log_dens = np.full(n, np.nan)
    proba = np.full((n, M.shape[1]), np.nan)
    if valid.any():
        log_norm, log_resp = _normalise(wlp[valid], None)
        log_dens[valid] = log_norm
        with np.errstate(under="ignore"):
            proba[valid] = np.exp(log_resp) @ M
    return proba, log_dens


# --------------------------------------------------------------------------- statistics


@dataclass
class GMMStats:
    """Sufficient statistics of a Gaussian mixture over a set of rows.

    ``a + b`` merges two records (Chan's pairwise update of centred moments),
    so any reduction tree over blocks gives the same result up to rounding.

    Attributes
    ----------
    n : ndarray (K,)
        Weighted responsibility mass per component, ``sum_i w_i r_ik``.
    mean : ndarray (K, D)
        Responsibility-weighted means.
    m2 : ndarray (K, D, D) for full/tied, (K, D) for diag/spherical
        Centred scatter ``sum_i w_i r_ik (x_i - mean_k)(x_i - mean_k)^T`` (or diagonal).
    loglik : float
        ``sum_i w_i log p(x_i)`` (labelled rows: ``log p(x_i, class_i)``).
    weight : float
        ``sum_i w_i`` over the rows used.
    count : int
        Number of rows used.
    n_excluded : int
        Rows left out because some value was not finite.
    worst_score, worst_rows : ndarray (m,), (m, D)
        The ``m`` rows with the lowest ``log p(x)`` -- candidates for re-seeding.
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    loglik: float = 0.0
    weight: float = 0.0
    count: int = 0
    n_excluded: int = 0
    worst_score: np.ndarray = field(default_factory=lambda: np.empty(0))
    worst_rows: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    n_worst: int = 16

    @classmethod
    def zeros(cls, K: int, D: int, covariance_type: str, n_worst: int = 16) -> GMMStats:
        full = _full_like(covariance_type, K)
        return cls(
            n=np.zeros(K),
            mean=np.zeros((K, D)),
            m2=np.zeros((K, D, D)) if full else np.zeros((K, D)),
            worst_score=np.empty(0),
            worst_rows=np.empty((0, D)),
            n_worst=n_worst,
        )

    def __add__(self, other: GMMStats) -> GMMStats:
        if not isinstance(other, GMMStats):
            return NotImplemented
        n, mean, m2 = merge_centred_moments(
            self.n, self.mean, self.m2, other.n, other.mean, other.m2, full=self.m2.ndim == 3
        )
        size = max(self.n_worst, other.n_worst)
        ws, wr = merge_lowest(
            self.worst_score, self.worst_rows, other.worst_score, other.worst_rows, size
        )
        return GMMStats(
            n=n,
            mean=mean,
            m2=m2,
            loglik=self.loglik + other.loglik,
            weight=self.weight + other.weight,
            count=self.count + other.count,
            n_excluded=self.n_excluded + other.n_excluded,
            worst_score=ws,
            worst_rows=wr,
            n_worst=size,
        )

    def __radd__(self, other):  # lets ``sum()`` start from 0
        if other == 0:
            return self
        return NotImplemented

    @property
    def nbytes(self) -> int:
        return int(self.n.nbytes + self.mean.nbytes + self.m2.nbytes + self.worst_rows.nbytes)


def _finite_rows(xb: np.ndarray) -> np.ndarray:
    return np.isfinite(xb).all(axis=1)


def block_stats(
    X: np.ndarray,
    params: GMMParams,
    sample_weight: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    resp: np.ndarray | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    n_worst: int = 16,
) -> GMMStats:
    """Fused E-step and sufficient statistics of one block of rows.

    Parameters
    ----------
    X : ndarray of shape (n, D), any float dtype
        Rows containing a non-finite value are excluded and counted in ``n_excluded``.
    params : GMMParams
        Current parameters (the E-step uses them; their means are the shift of the moments).
    sample_weight : ndarray of shape (n,), optional
    labels : ndarray of int, shape (n,), optional
        ``-1`` unlabelled, otherwise the row's class (responsibilities clamped).
    resp : ndarray of shape (n, K), optional
        Given responsibilities instead of an E-step (used for initialisation);
        ``loglik`` is then 0 and ``params`` only provide the shift.
    block_rows : int
        Rows per float64 sub-block (sized to stay in cache).
    n_worst : int
        How many worst-explained rows to keep for re-seeding.

    Returns
    -------
    GMMStats
    """
    X = np.asarray(X)
    n, D = X.shape
    K = params.n_components
    ct = params.covariance_type
    full = _full_like(ct, K)
    n_worst = max(n_worst, K)
    out = GMMStats.zeros(K, D, ct, n_worst)
    if n == 0:
        return out
    shift = np.asarray(params.means, dtype=np.float64)
    logw = _log_weights(params.weights)
    S0 = np.zeros(K)
    S1 = np.zeros((K, D))
    S2 = np.zeros((K, D, D)) if full else np.zeros((K, D))
    loglik = 0.0
    weight = 0.0
    count = 0
    excluded = 0
    worst_score = np.empty(0)
    worst_rows = np.empty((0, D))
    for s in range(0, n, block_rows):
        xb = np.array(X[s : s + block_rows], dtype=np.float64)  # one sub-block copy
        nb = xb.shape[0]
        w = (
            np.ones(nb)
            if sample_weight is None
            else np.asarray(sample_weight[s : s + nb], dtype=np.float64).copy()
        )
        if np.any(w < 0):
            raise ValueError("sample_weight must be non-negative; got negative weights")
        good = _finite_rows(xb) & np.isfinite(w)
        nbad = int(nb - good.sum())
        if nbad:
            excluded += nbad
            xb[~good] = 0.0
            w[~good] = 0.0
        lb = None if labels is None else np.asarray(labels[s : s + nb])
        if resp is None:
            wlp = _log_gaussian_block(xb, params) + logw
            log_norm, log_r = _normalise(wlp, _allowed_components(lb, params))
            # clip before exp: responsibilities below e^-80 are 0 and avoid subnormals
            with np.errstate(under="ignore"):
                r = np.exp(np.maximum(log_r, -80.0))
            r[log_r < -80.0] = 0.0
            lw = w * log_norm
            lw[w == 0] = 0.0
            loglik += float(lw.sum())
            used = w > 0
            if used.any():
                sc = log_norm[used]
                take = min(n_worst, sc.shape[0])
                idx = np.argpartition(sc, take - 1)[:take] if take < sc.shape[0] else slice(None)
                worst_score, worst_rows = merge_lowest(
                    worst_score, worst_rows, sc[idx], xb[used][idx], n_worst
                )
        else:
            r = np.asarray(resp[s : s + nb], dtype=np.float64)
        rw = r * w[:, None]
        S0 += rw.sum(axis=0)
        weight += float(w.sum())
        count += int((w > 0).sum())
        for k in range(K):
            d = xb - shift[k]
            rk = rw[:, k]
            S1[k] += rk @ d
            if full:
                S2[k] += (d * rk[:, None]).T @ d
            else:
                S2[k] += rk @ (d * d)
    safe = np.where(S0 > 0, S0, 1.0)
    off = S1 / safe[:, None]
    mean = np.where(S0[:, None] > 0, shift + off, shift)
    if full:
        m2 = S2 - S0[:, None, None] * (off[:, :, None] * off[:, None, :])
    else:
        m2 = S2 - S0[:, None] * off * off
    out.n = S0
    out.mean = mean
    out.m2 = m2
    out.loglik = loglik
    out.weight = weight
    out.count = count
    out.n_excluded = excluded
    out.worst_score = worst_score
    out.worst_rows = worst_rows
    return out


# --------------------------------------------------------------------------- M-step


def _covariances_from_stats(
    n: np.ndarray, m2: np.ndarray, cov_type: str, reg_covar: float
) -> np.ndarray:
    nk = n + _EPS10
    D = m2.shape[1]
    if cov_type == "full":
        cov = m2 / nk[:, None, None]
        cov = cov + reg_covar * np.eye(D)[None]
        return 0.5 * (cov + np.transpose(cov, (0, 2, 1)))
    if cov_type == "tied":
        cov = m2.sum(axis=0) / nk.sum()
        cov = cov + reg_covar * np.eye(D)
        return 0.5 * (cov + cov.T)
    diag = m2 / nk[:, None] + reg_covar
    if cov_type == "diag":
        return diag
    return diag.mean(axis=1)


def m_step(
    stats: GMMStats,
    covariance_type: str,
    reg_covar: float,
    *,
    component_class: np.ndarray | None = None,
    min_mass: float = 0.5,
    reseed: bool = True,
) -> tuple[GMMParams, list[dict]]:
    """New parameters from reduced statistics.

    Follows scikit-learn's M-step (``nk = n + 10 eps``, ``reg_covar`` added to the
    diagonal). A component is *collapsed* when its responsibility mass is below
    ``min_mass`` rows' worth (half a row by default) or its covariance is not
    positive definite; with ``reseed`` it is moved to one of the worst-explained rows
    with the pooled
    covariance of the healthy components, and an event is returned.

    Returns
    -------
    params : GMMParams
    events : list of dict
        One ``{"component", "reason"}`` per re-seeded component.
    """
    K, D = stats.mean.shape
    if stats.weight <= 0 or not np.any(stats.n > 0):
        raise ValueError(
            "No sample carries weight: all rows are excluded (non-finite values) or have "
            "sample_weight 0."
        )
    nk = stats.n + _EPS10
    means = stats.mean * (stats.n / nk)[:, None]
    cov = _covariances_from_stats(stats.n, stats.m2, covariance_type, reg_covar)
    prec_chol, ok = compute_precision_cholesky(cov, covariance_type)
    row_weight = stats.weight / max(stats.count, 1)
    collapsed = stats.n < min_mass * row_weight
    if covariance_type == "tied":
        if not ok[0]:
            raise ValueError(
                "The tied covariance is not positive definite (collapsed or constant data). "
                "Increase reg_covar or scale the input data."
            )
    else:
        collapsed |= ~ok
    weights = nk / nk.sum()
    events: list[dict] = []
    if collapsed.any():
        if not reseed:
            raise ValueError(
                f"Components {np.flatnonzero(collapsed).tolist()} collapsed (ill-defined "
                "covariance). Decrease n_components, increase reg_covar, or scale the data."
            )
        healthy = ~collapsed
        if not healthy.any():
            raise ValueError(
                "Every component collapsed: none has enough responsibility mass and a "
                "positive-definite covariance (a constant feature or duplicated points with "
                "reg_covar=0?). Increase reg_covar, decrease n_components, or scale the data."
            )
        # pooled scatter of healthy components, as a full matrix or a diagonal
        m2h = stats.m2[healthy].sum(axis=0)
        pooled = m2h / stats.n[healthy].sum()
        if pooled.ndim == 1:
            pooled_var = pooled + reg_covar
        else:
            pooled_var = pooled + reg_covar * np.eye(D)
        candidates = stats.worst_rows
        # also fall back to the healthy means if there are too few candidates
        bad = np.flatnonzero(collapsed)
        means = means.copy()
        weights = weights.copy()
        cov = cov.copy()
        for j, k in enumerate(bad):
            if j < candidates.shape[0]:
                means[k] = candidates[j]
                reason = "collapsed: moved to a worst-explained sample"
            else:
                means[k] = means[healthy][j % healthy.sum()] + np.sqrt(
                    np.diag(pooled_var) if pooled_var.ndim == 2 else pooled_var
                )
                reason = "collapsed: moved next to a healthy component"
            if covariance_type == "full":
                cov[k] = pooled_var if pooled_var.ndim == 2 else np.diag(pooled_var)
            elif covariance_type == "diag":
                cov[k] = np.diag(pooled_var) if pooled_var.ndim == 2 else pooled_var
            elif covariance_type == "spherical":
                cov[k] = (np.diag(pooled_var) if pooled_var.ndim == 2 else pooled_var).mean()
            weights[k] = 1.0 / K
            mass = float(stats.n[k])
            events.append({"component": int(k), "reason": reason, "mass": mass})
        weights = weights / weights.sum()
        prec_chol, ok = compute_precision_cholesky(cov, covariance_type)
        if not ok.all():
            raise ValueError(
                "Covariances are singular even after re-seeding (a constant feature or "
                "duplicated data with reg_covar=0?). Increase reg_covar or scale the data."
            )
    params = GMMParams(
        weights=weights,
        means=means,
        precisions_cholesky=prec_chol,
        covariance_type=covariance_type,
        covariances=cov,
        component_class=component_class,
    )
    return params, events


# --------------------------------------------------------------------------- engine model


@dataclass(frozen=True)
class GMMModel:
    """The Gaussian mixture as seen by :func:`daskem.engine.fit_em`.

    Parameters
    ----------
    covariance_type : {"full", "tied", "diag", "spherical"}
    reg_covar : float
    allow_excluded : bool
        If False, a pass that meets a non-finite value raises ``ValueError``.
    reseed : bool
        Re-seed collapsed components instead of raising.
    block_rows : int
        Sub-block size of the kernel.
    """

    covariance_type: str = "full"
    reg_covar: float = 1e-6
    allow_excluded: bool = False
    reseed: bool = True
    block_rows: int = DEFAULT_BLOCK_ROWS

    def block_stats(
        self,
        params: GMMParams,
        X: np.ndarray,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> GMMStats:
        return block_stats(X, params, sample_weight, labels, block_rows=self.block_rows)

    def m_step(self, stats: GMMStats, params: GMMParams) -> tuple[GMMParams, list[dict]]:
        self.check_stats(stats)
        return m_step(
            stats,
            self.covariance_type,
            self.reg_covar,
            component_class=params.component_class,
            reseed=self.reseed,
        )

    def check_stats(self, stats: GMMStats) -> None:
        if stats.n_excluded and not self.allow_excluded:
            raise ValueError(
                f"Input contains {stats.n_excluded} rows with non-finite values (NaN or inf). "
                "Remove or impute them, or give them sample_weight 0 after replacing the values."
            )

    def objective(self, stats: GMMStats) -> float:
        return stats.loglik / stats.weight if stats.weight > 0 else -np.inf
