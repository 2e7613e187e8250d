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

Numerics: :func:`block_stats` evaluates every component's log-density of a row
sub-block (``block_rows`` rows, copied feature-major and centred on a shift ``c``) with
one GEMM on the quadratic features ``[1, x - c, vech((x - c)(x - c)^T)]`` and every
statistic with a second GEMM on the same features, accumulated in float64. Float32
input keeps float32 sub-blocks for the E-step where a rounding-error bound allows it
(log-densities within 1e-3, typically 1e-6; float64 input: 1e-9), the statistics GEMM
is always float64, and rows the bound does not cover (far outliers, non-finite values)
are recomputed by the per-component float64 reference kernel. Statistics are turned
into centred per-block moments and merged pairwise across blocks
(:func:`daskem.model.stats.merge_centred_moments`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gaussian import (
    COVARIANCE_TYPES,
    compute_precision_cholesky,
    covariance_shape,
    covariances_from_precision_cholesky,
    n_covariance_parameters,
    precisions_from_cholesky,
)
from .gaussian import log_det_cholesky as _log_det_chol
from .stats import merge_centred_moments, merge_lowest

__all__ = [
    "COVARIANCE_TYPES",
    "PRECISIONS",
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
    "observed_weighted_log_prob",
    "precisions_from_cholesky",
]

_LOG_2PI = math.log(2.0 * math.pi)
_EPS10 = 10.0 * np.finfo(np.float64).eps
DEFAULT_BLOCK_ROWS = 8192
PRECISIONS = ("auto", "single")
_LOG_RESP_FLOOR = -80.0


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
    pattern_weights : tuple (patterns, weights) or None
        Mixing weights per pattern of observed attributes (missing data with weights by
        pattern, :class:`~daskem.model.missing.PatternGMMModel`): ``patterns`` (P, D)
        bool, ``weights`` (P, K). A row whose pattern is one of them takes that row of
        weights instead of ``weights``; ``None``: every row takes ``weights``.
    """

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str
    covariances: np.ndarray | None = None
    component_class: np.ndarray | None = None
    pattern_weights: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])


def _full_like(cov_type: str, K: int) -> bool:
    return cov_type in ("full", "tied")


def n_parameters(n_components: int, n_features: int, covariance_type: str) -> int:
    """Number of free parameters (for BIC/AIC), as scikit-learn counts them."""
    K, D = n_components, n_features
    return n_covariance_parameters(covariance_type, K, D) + K * D + K - 1


# --------------------------------------------------------------------------- E-step


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


def observed_weighted_log_prob(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """``log pi_k + log N(x_o | mu_k,o, Sigma_k,oo)`` over each row's observed features.

    Like :func:`estimate_weighted_log_prob`, but a non-finite value marks a missing
    attribute: rows with some missing use the exact marginal Gaussian over the observed
    ones (one marginal per pattern of observed features), rows with none observed are NaN.
    """
    X = np.asarray(X)
    n = X.shape[0]
    if params.pattern_weights is not None:
        from .missing import row_log_weights  # missing.py builds on this module

        K = params.n_components
        flat = dataclasses.replace(params, weights=np.ones(K), pattern_weights=None)
        return observed_weighted_log_prob(X, flat) + row_log_weights(X, params)
    with np.errstate(invalid="ignore", over="ignore"):
        if n == 0 or np.isfinite(np.sum(X)):
            return estimate_weighted_log_prob(X, params)
    wlp = np.full((n, params.n_components), np.nan)
    obs = np.isfinite(X)
    complete = obs.all(axis=1)
    if complete.any():
        wlp[complete] = estimate_weighted_log_prob(X[complete], params)
    partial = np.flatnonzero(~complete & obs.any(axis=1))
    if partial.size:
        patterns, inverse = np.unique(obs[partial], axis=0, return_inverse=True)
        for j, pattern in enumerate(patterns):
            rows = partial[inverse.ravel() == j]
            sub = marginal_params(params, pattern)
            wlp[rows] = estimate_weighted_log_prob(X[np.ix_(rows, pattern)], sub)
    return wlp


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
    wlp = observed_weighted_log_prob(X, params)
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
        Rows left out because some value was not finite (with missing attributes
        marginalised: because no value was).
    n_empty : int
        Rows with no finite attribute (among the excluded ones).
    n_partial : int
        Rows used with some attributes missing (marginalised, see
        :mod:`daskem.model.missing`).
    worst_score, worst_rows : ndarray (m,), (m, D)
        The ``m`` rows with the lowest ``log p(x)`` -- candidates for re-seeding.
    pattern_n : dict or None
        Only with weights by pattern of observed attributes: the pattern's key (its
        bool (D,) mask as bytes) -> ``sum_i w_i r_ik`` (K,) over the rows of that
        pattern.
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    loglik: float = 0.0
    weight: float = 0.0
    count: int = 0
    n_excluded: int = 0
    n_empty: int = 0
    n_partial: int = 0
    worst_score: np.ndarray = field(default_factory=lambda: np.empty(0))
    worst_rows: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    n_worst: int = 16
    pattern_n: dict | None = None

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
            n_empty=self.n_empty + other.n_empty,
            n_partial=self.n_partial + other.n_partial,
            worst_score=ws,
            worst_rows=wr,
            n_worst=size,
            pattern_n=_merge_counts(self.pattern_n, other.pattern_n),
        )

    def __radd__(self, other):  # lets ``sum()`` start from 0
        if other == 0:
            return self
        return NotImplemented

    @property
    def nbytes(self) -> int:
        return int(self.n.nbytes + self.mean.nbytes + self.m2.nbytes + self.worst_rows.nbytes)


def _merge_counts(a: dict | None, b: dict | None) -> dict | None:
    """Sum of two ``pattern_n`` records (None: no record)."""
    if a is None or b is None:
        return b if a is None else a
    out = dict(a)
    for code, n in b.items():
        out[code] = out[code] + n if code in out else n
    return out


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
    precision: str = "auto",
    rows: np.ndarray | None = None,
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
        Rows per sub-block (sized to stay in cache).
    n_worst : int
        How many worst-explained rows to keep for re-seeding.
    precision : {"auto", "single"}
        ``"auto"``: every log-density within a rounding-error bound (1e-3 for float32
        sub-blocks, 1e-8 for float64) and float64 statistics GEMMs. ``"single"`` (float32
        ``X`` only; float64 ``X`` is treated as ``"auto"``): float32 sub-blocks under a
        looser bound (0.1; measured errors are 10-40 times smaller) and float32 statistics
        GEMMs per sub-block, summed in float64: about twice as fast, with statistics
        accurate to about 1e-5 instead of 1e-9. Components or rows outside the bound are
        computed in float64 either way.
    rows : ndarray of int, optional
        Only these rows of ``X`` (``sample_weight``, ``labels`` and ``resp`` are then
        given for them, in this order). The fast kernel gathers them sub-block by
        sub-block, without a copy of the selected rows.

    Returns
    -------
    GMMStats

    Notes
    -----
    Most rows go through the fast kernel (:func:`_block_stats_fast`: one GEMM for every
    component's log-density, one GEMM for every statistic, float32 sub-blocks for float32
    input where the error bound allows it); rows it cannot bound (far outliers, non-finite
    values, labelled rows without an allowed component) and ``resp`` go through the
    per-component float64 kernel (:func:`_block_stats_reference`).
    """
    X = np.asarray(X)
    if rows is not None and (resp is not None or rows.size == 0):
        X, rows = take_rows(X, rows), None
    if resp is not None or X.shape[0] == 0:
        return _block_stats_reference(
            X, params, sample_weight, labels, resp=resp, block_rows=block_rows, n_worst=n_worst
        )
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w is not None and np.any(w < 0):
        raise ValueError("sample_weight must be non-negative; got negative weights")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    plan = _fast_plan(params, X.dtype, w, precision == "single")
    if plan is None:
        if rows is not None:
            X = take_rows(X, rows)
        return _block_stats_reference(X, params, w, labels, block_rows=block_rows, n_worst=n_worst)
    return _block_stats_fast(
        X, params, plan, w, labels, block_rows=block_rows, n_worst=n_worst, rows=rows
    )


def _moment_sums(acc: np.ndarray, D: int, full: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroth, first and second moment sums (K,), (K, D), (K, D, D) or (K, D) from the
    statistics GEMM's columns ``[1, x, x**2, x_i x_j (i < j, full only)]``."""
    K = acc.shape[0]
    S0 = acc[:, 0].copy()
    S1 = acc[:, 1 : 1 + D]
    if not full:
        return S0, S1, acc[:, 1 + D : 1 + 2 * D].copy()
    S2 = np.empty((K, D, D))
    di = np.arange(D)
    S2[:, di, di] = acc[:, 1 + D : 1 + 2 * D]
    iu, ju = np.triu_indices(D, 1)
    S2[:, iu, ju] = acc[:, 1 + 2 * D :]
    S2[:, ju, iu] = acc[:, 1 + 2 * D :]
    return S0, S1, S2


def _stats_from_shifted_sums(
    S0: np.ndarray, S1: np.ndarray, S2: np.ndarray, shift: np.ndarray, means: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Centred means and scatter from sums of ``x - shift`` (``shift`` (K, D) or (D,))."""
    safe = np.where(S0 > 0, S0, 1.0)
    off = S1 / safe[:, None]
    mean = np.where(S0[:, None] > 0, shift + off, means)
    if S2.ndim == 3:
        m2 = S2 - S0[:, None, None] * (off[:, :, None] * off[:, None, :])
    else:
        m2 = S2 - S0[:, None] * off * off
    return mean, m2


def _block_stats_reference(
    X: np.ndarray,
    params: GMMParams,
    sample_weight: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    resp: np.ndarray | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    n_worst: int = 16,
) -> GMMStats:
    """:func:`block_stats` by the per-component Cholesky-residual form, all in float64.

    Slow (K small GEMMs and K outer-product GEMMs per sub-block) but exact for any offset
    and any row: the reference the fast kernel is tested against, and its fallback.
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
    empty = 0
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
            empty += int((~np.isfinite(xb[~good]).any(axis=1)).sum())
            xb[~good] = 0.0
            w[~good] = 0.0
        lb = None if labels is None else np.asarray(labels[s : s + nb])
        if resp is None:
            wlp = _log_gaussian_block(xb, params) + logw
            log_norm, log_r = _normalise(wlp, _allowed_components(lb, params))
            # clip before exp: responsibilities below e^-80 are 0 and avoid subnormals
            with np.errstate(under="ignore"):
                r = np.exp(np.maximum(log_r, _LOG_RESP_FLOOR))
            r[log_r < _LOG_RESP_FLOOR] = 0.0
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
    out.n = S0
    out.mean, out.m2 = _stats_from_shifted_sums(S0, S1, S2, shift, shift)
    out.loglik = loglik
    out.weight = weight
    out.count = count
    out.n_excluded = excluded
    out.n_empty = empty
    out.worst_score = worst_score
    out.worst_rows = worst_rows
    return out


# --------------------------------------------------------------------------- fast kernel
#
# log pi_k + log N(x | mu_k, Sigma_k) is a linear function of the quadratic features
#     phi(x) = [1, x - c, (x - c)^2, (x_a - c_a)(x_b - c_b) for a < b]   (M = 1 + D + D(D+1)/2)
# (diag/spherical: no cross products), so one GEMM  A (K, M) @ Phi (M, nb)  gives every
# component's log-density of a sub-block, and one float64 GEMM  R (K, nb) @ Phi.T  gives
# every component's [S0, S1, diag S2, offdiag S2] about the shift c at once. Sub-blocks are
# copied feature-major (transposing, centring copy), so the log-sum-exp reduces over the
# short K axis row-wise (docs/performance.md trap 5); buffers are reused (trap 3 there).
#
# The expanded form cancels when x - c is large against a component's spread
# (docs/performance.md trap 6).
# For row i and component k the GEMM adds terms of total size at most
#     T_k(r) = |const_k| + ||Lambda_k delta_k|| r + ||abs(Lambda_k)|| r^2 / 2,   r = ||x_i - c||,
# (delta_k = mu_k - c), with a rounding error of about gamma T_k(r), gamma = (2 sqrt(M) + 4) u
# (a probabilistic bound for the dot product plus the roundings of phi and A; u the unit
# roundoff). Hence, per parameter set:
# * a component keeps the expanded form only if the error stays below _FAST_TOL[dtype] over
#   its bulk (Mahalanobis distance <= 5). Components that do not qualify (thin,
#   ill-conditioned, far from c) get the reference kernel's exact per-component form
#   ||P_k^T (x - mu_k)||^2, evaluated in float64, and statistics about mu_k. Float32 input
#   keeps float32 sub-blocks if at most K/4 components need that form (each costs about as
#   much as all the others' GEMM together), else float64 sub-blocks, where more components
#   qualify; the expanded-form components' float64 statistics about c are then accurate to
#   about 2 u T_k <= 1e-9 relative. Those float64 sub-blocks of float32 input take exp of
#   the (floored) log-responsibilities in float32 (SIMD where float64's exp is scalar, 4-5x
#   faster): each responsibility to ~1e-7 relative, far inside float32 sub-blocks' bound;
# * a row beyond radius sqrt(r2max_k) of a component it is relevant to (log-density within
#   80 of the row's best, with a margin of _SAFE_ERROR), beyond the radius where any error
#   could reach _SAFE_ERROR, or with non-finite values, is recomputed by the reference kernel.

# Bound on the absolute error of a log-density from the expanded form, per sub-block dtype.
_FAST_TOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-8}
# precision="single": the looser bound for float32 sub-blocks (the bound is a worst case;
# measured errors were 10-40 times smaller)
_SINGLE_TOL = 0.1
_SAFE_ERROR = 10.0
_RELEVANT = _LOG_RESP_FLOOR - _SAFE_ERROR
_BULK_MAHA = 25.0
# float32 sub-blocks only if every positive sample weight is at least this (so that
# floored responsibilities times weights never become subnormal).
_F32_MIN_WEIGHT = 1e-3
_WORKSPACES = threading.local()


class ObjectCache:
    """Values derived from live objects, keyed by the objects' identity.

    An entry lives as long as its object: a weakref checks that an id still names the
    object it was made for, and entries of freed objects are dropped at the next
    insertion. Shared by the threads of a pass: every block of a pass finds what the
    first one made for the same parameters (or block), whichever candidates a shared
    pass interleaves.
    """

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, Any]] = {}
        self._lock = threading.Lock()

    def get(self, obj: Any, make: Callable[[], Any]) -> Any:
        """The value kept for ``obj``, made by ``make()`` if there is none."""
        with self._lock:
            hit = self.entries.get(id(obj))
        if hit is not None and hit[0]() is obj:
            return hit[1]
        value = make()
        with self._lock:
            hit = self.entries.get(id(obj))
            if hit is not None and hit[0]() is obj:  # another thread was first
                return hit[1]
            for key in [k for k, v in self.entries.items() if v[0]() is None]:
                del self.entries[key]
            self.entries[id(obj)] = (weakref.ref(obj), value)
        return value


_PLANS = ObjectCache()  # params -> {(float32 allowed, single): plan}


@dataclass(frozen=True)
class _QuadPlan:
    """How the fast kernel evaluates one parameter set (see the comment above)."""

    dtype: np.dtype  # of the sub-block features and of the log-density GEMM
    shift: np.ndarray  # (D,) float64, exactly representable in ``dtype``
    full: bool  # cross products in phi (full/tied) or squares only (diag/spherical)
    order: np.ndarray  # (K,) components in kernel order: expanded form first, residual last
    A: np.ndarray  # (K, M) in ``dtype``; zero rows for the residual-form components
    n_quad: int  # components with the expanded form (the first n_quad of ``order``)
    r2max: np.ndarray  # (n_quad,) rows farther than this from c must find k irrelevant
    r2min: float  # min(r2max): rows within need no check
    r2safe: float  # rows farther than this go to the reference kernel
    PT_res: np.ndarray  # (n_res, D, D) float64: P_k^T of the residual-form components
    mu_res: np.ndarray  # (n_res, D) their means
    c_res: np.ndarray  # (n_res,) log w_k + log det P_k - D/2 log(2 pi)
    stats_dtype: np.dtype = np.dtype(np.float64)  # of the statistics GEMM of a sub-block
    res_dtype: np.dtype = np.dtype(np.float64)  # of the residual-form components
    scale: np.ndarray | None = None  # (D,) powers of two: phi is built from (x - c) / scale
    exp32: bool = False  # float64 sub-blocks of float32 input: responsibilities' exp in float32

    @property
    def n_res(self) -> int:
        return int(self.c_res.shape[0])


def _radius(c0: np.ndarray, lin: np.ndarray, q: np.ndarray, T: float) -> np.ndarray:
    """Largest r with c0 + lin r + q r^2 / 2 <= T (-1 where even r = 0 exceeds it)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (-lin + np.sqrt(lin * lin + 2.0 * q * (T - c0))) / q
    return np.where(c0 <= T, r, -1.0)


def _component_forms(params: GMMParams, shift: np.ndarray) -> dict:
    """float64 expanded-form rows about ``shift``, residual factors and error-bound terms."""
    ct = params.covariance_type
    means = np.asarray(params.means, dtype=np.float64)
    K, D = means.shape
    P = np.asarray(params.precisions_cholesky, dtype=np.float64)
    delta = means - shift
    cprime = _log_weights(params.weights) + _log_det_chol(P, ct, D) - 0.5 * D * _LOG_2PI
    if ct in ("full", "tied"):
        Pk = P if ct == "full" else np.broadcast_to(P, (K, D, D))
        lam = np.einsum("kij,klj->kil", Pk, Pk)
        iu, ju = np.triu_indices(D, 1)
        quad = np.concatenate([-0.5 * np.diagonal(lam, axis1=1, axis2=2), -lam[:, iu, ju]], axis=1)
        q = np.linalg.norm(np.abs(lam), 2, axis=(1, 2))
        lam_min = np.linalg.eigvalsh(lam)[:, 0]
        lin = np.einsum("kij,kj->ki", lam, delta)
    else:
        p2 = P**2 if ct == "diag" else np.repeat((P**2)[:, None], D, axis=1)
        Pk = np.stack([np.diag(v) for v in np.sqrt(p2)])
        quad = -0.5 * p2
        q = p2.max(axis=1)
        lam_min = p2.min(axis=1)
        lin = p2 * delta
    const = cprime - 0.5 * np.einsum("ki,ki->k", delta, lin)
    with np.errstate(divide="ignore"):
        bulk = np.linalg.norm(delta, axis=1) + np.sqrt(_BULK_MAHA / lam_min)
    return {
        "A": np.concatenate([const[:, None], lin, quad], axis=1),
        "const": np.abs(const),
        "lin": np.linalg.norm(lin, axis=1),
        "q": q,
        "bulk": bulk,
        "PT": np.ascontiguousarray(np.transpose(Pk, (0, 2, 1))),
        "cprime": cprime,
    }


def _fast_plan(
    params: GMMParams, x_dtype: np.dtype, w: np.ndarray | None, single: bool = False
) -> _QuadPlan | None:
    """How the fast kernel evaluates ``params`` (None: use the reference kernel).

    Cached per parameter object alive (every block of a pass shares it).
    """
    f32 = x_dtype == np.float32
    if f32 and w is not None and np.any((w > 0) & (w < _F32_MIN_WEIGHT)):
        f32 = False
    key = (f32, single and f32)
    plans = _PLANS.get(params, dict)
    if key not in plans:
        plans.setdefault(key, _make_plan(params, f32, single and f32))
    return plans[key]


def _make_plan(params: GMMParams, f32: bool, single: bool = False) -> _QuadPlan | None:
    weights = np.asarray(params.weights, dtype=np.float64)
    means = np.asarray(params.means, dtype=np.float64)
    live = weights > 0
    if not live.any() or not np.all(np.isfinite(means)):
        return None
    K = means.shape[0]
    centre = (weights[live, None] * means[live]).sum(axis=0) / weights[live].sum()
    scale, scaled = _feature_scale(params, live)
    units = [(None, params)] if scale is None else [(None, params), (scale, scaled)]
    for dt in [np.dtype(np.float32), np.dtype(np.float64)] if f32 else [np.dtype(np.float64)]:
        shift = centre.astype(dt).astype(np.float64)
        exact = _component_forms(params, shift)  # residual forms, in data units
        if not np.all(np.isfinite(exact["PT"])):
            return None
        tol = _SINGLE_TOL if single and dt == np.float32 else _FAST_TOL[dt]
        best = None
        for sc, p in units:  # data units, then per-feature scaled units if any
            f = exact if sc is None else _component_forms(p, shift / sc)
            if sc is not None:  # log-densities in data units: undo the Jacobian of 1/scale
                f["A"][:, 0] -= np.log(sc).sum()
                f["const"] = np.abs(f["A"][:, 0])
            if not np.all(np.isfinite(f["A"][live])):
                continue
            gamma = (2.0 * math.sqrt(f["A"].shape[1]) + 4.0) * np.finfo(dt).eps / 2
            rmax = _radius(f["const"], f["lin"], f["q"], tol / gamma)
            quad = ~live | (rmax >= f["bulk"])
            if best is None or np.count_nonzero(quad) > np.count_nonzero(best[2]):
                best = (sc, f, quad, rmax, gamma)
        if best is None:
            return None
        sc, f, quad, rmax, gamma = best
        if dt == np.float32 and np.count_nonzero(~quad) > K // 4:
            continue  # float32 E-step only if few components need the float64 residual form
        rsafe = _radius(f["const"], f["lin"], f["q"], _SAFE_ERROR / gamma)
        order = np.concatenate([np.flatnonzero(quad), np.flatnonzero(~quad)])
        qk = order[: int(quad.sum())]
        r2max = np.where(live[qk], np.square(rmax[qk]), np.inf)
        r2safe = np.where(live[qk], np.square(rsafe[qk]), np.inf)
        rk = order[int(quad.sum()) :]
        single32 = single and dt == np.float32
        rdt = (
            np.dtype(np.float32)
            if single32 and _f32_residual_ok(exact["PT"][rk], means[rk])
            else np.dtype(np.float64)
        )
        return _QuadPlan(
            dtype=dt,
            shift=shift,
            full=params.covariance_type in ("full", "tied"),
            order=order,
            A=np.ascontiguousarray(np.where(quad[order, None], f["A"][order], 0.0), dtype=dt),
            n_quad=int(qk.size),
            r2max=r2max,
            r2min=float(r2max.min()) if qk.size else np.inf,
            r2safe=float(r2safe.min()) if qk.size else np.inf,
            PT_res=np.ascontiguousarray(exact["PT"][rk], dtype=rdt),
            mu_res=means[rk].astype(rdt),
            c_res=exact["cprime"][rk],
            stats_dtype=dt if single32 else np.dtype(np.float64),
            res_dtype=rdt,
            scale=sc,
            exp32=f32 and dt == np.float64,
        )
    return None


def _feature_scale(params: GMMParams, live: np.ndarray) -> tuple[np.ndarray | None, GMMParams]:
    """Per-feature scales (powers of two, so scaling is exact) and the parameters in the
    scaled units ``x / scale``, for the expanded form (docs/performance.md trap 6:
    attributes in different units, e.g. spreads of 0.04 and 49, make it ill-conditioned
    in data units).

    ``scale_j`` is the weighted root-mean variance of feature j over the live components;
    None when every scale is 1.
    """
    ct = params.covariance_type
    P = np.asarray(params.precisions_cholesky, dtype=np.float64)
    K, D = np.shape(params.means)
    var = covariances_from_precision_cholesky(P, ct)
    if ct == "full":
        var = np.diagonal(var, axis1=1, axis2=2)
    elif ct == "tied":
        var = np.broadcast_to(np.diag(var), (K, D))
    elif ct == "spherical":
        var = np.repeat(var[:, None], D, axis=1)
    w = np.asarray(params.weights, dtype=np.float64) * live
    mean_var = (w[:, None] * var).sum(axis=0) / w.sum()
    if not np.all(np.isfinite(mean_var) & (mean_var > 0)):
        return None, params
    scale = np.exp2(np.round(0.5 * np.log2(mean_var)))
    if np.all(scale == 1.0):
        return None, params
    means = np.asarray(params.means, dtype=np.float64) / scale
    if ct in ("full", "tied"):  # Lambda' = S Lambda S, so P' = S P
        Ps = scale[:, None] * P
        cts = ct
    else:  # diag; spherical becomes diag in scaled units
        Ps = (P if ct == "diag" else np.repeat(P[:, None], D, axis=1)) * scale
        cts = "diag"
    return scale, GMMParams(params.weights, means, Ps, cts)


def _f32_residual_ok(PT: np.ndarray, mu: np.ndarray) -> bool:
    """Whether float32 keeps the residual form ``||P^T (x - mu)||^2 / 2`` of these
    components within _SINGLE_TOL over their bulk (Mahalanobis distance <= 5).

    There ``|y| = |P^T (x - mu)| <= 5`` and ``|x - mu| <= 5 sigma_max``; rounding ``mu``,
    ``x - mu`` and the D-term products perturbs ``y`` by at most about
    ``u ||P|| (|mu| + 5 (D + 1) sigma_max)``, hence ``|y|^2 / 2`` by 5 times that.
    """
    if PT.shape[0] == 0:
        return True
    D = PT.shape[-1]
    sv = np.linalg.svd(PT, compute_uv=False)  # singular values of P_k
    with np.errstate(divide="ignore"):
        sigma_max = 1.0 / sv[:, -1]
    err = 5.0 * np.finfo(np.float32).eps * sv[:, 0]
    err = err * (np.linalg.norm(mu, axis=1) + 5.0 * (D + 1) * sigma_max)
    return bool(np.all(err <= _SINGLE_TOL))


def _lowest(score: np.ndarray, take: int, group: int = 64) -> np.ndarray:
    """Indices of the ``take`` smallest entries of ``score`` (in no particular order).

    The ``take`` smallest lie in the ``take`` groups of ``group`` rows with the smallest
    minima, so only those groups are searched.
    """
    n = score.shape[0]
    if take >= n:
        return np.arange(n)
    full = n // group
    if full <= take:
        return np.argpartition(score, take - 1)[:take]
    mins = score[: full * group].reshape(full, group).min(axis=1)
    best = np.argpartition(mins, take - 1)[:take]
    cand = (best[:, None] * group + np.arange(group)).ravel()
    cand = np.concatenate([cand, np.arange(full * group, n)])
    return cand[np.argpartition(score[cand], take - 1)[:take]]


class _Workspace:
    """Preallocated sub-block buffers, reused across calls in one thread (no page faults)."""

    def __init__(self, dtype: np.dtype, K: int, M: int, nb: int) -> None:
        self.nb = nb
        self.phi = np.empty((M, nb), dtype=dtype)
        self.phi[0] = 1.0
        self.logp = np.empty((K, nb), dtype=dtype)
        self.top = np.empty(nb, dtype=dtype)
        self.norm = np.empty(nb, dtype=dtype)
        self.r2 = np.empty(nb, dtype=dtype)
        self.ok = np.empty(nb, dtype=bool)
        self.gram = np.empty((K, M))
        self.e32 = np.empty((K, nb), dtype=np.float32) if dtype == np.float64 else None
        if dtype != np.float64:
            self.phi64 = np.empty((M, nb))
            self.resp64 = np.empty((K, nb))
            self.gram32 = np.empty((K, M), dtype=dtype)
        self.log_norm = np.empty(0)
        self.diff = np.empty((0, 0, nb))

    def log_norm_buffer(self, n: int) -> np.ndarray:
        """A float64 (n,) buffer, grown (never shrunk) as blocks need."""
        if self.log_norm.shape[0] < n:
            self.log_norm = np.empty(n)
        return self.log_norm[:n]

    def residual_buffers(
        self, n_res: int, D: int, dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Buffers of the residual-form components: ``x - mu_k`` (n_res, D, nb), the raw
        rows (D, nb) and one (D, nb) scratch."""
        if self.diff.shape[:2] != (n_res + 2, D) or self.diff.dtype != dtype:
            self.diff = np.empty((n_res + 2, D, self.nb), dtype=dtype)
        return self.diff[:n_res], self.diff[n_res], self.diff[n_res + 1]


def _workspace(dtype: np.dtype, K: int, M: int, nb: int) -> _Workspace:
    cache = getattr(_WORKSPACES, "cache", None)
    if cache is None:
        cache = _WORKSPACES.cache = {}
    key = (dtype.str, K, M, nb)
    ws = cache.get(key)
    if ws is None:
        if len(cache) >= 12:  # EM with missing data: one per pattern size and block size
            cache.clear()
        ws = cache[key] = _Workspace(dtype, K, M, nb)
    return ws


def take_rows(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``X[rows]`` (n, D), gathered along ``X``'s contiguous axis.

    ``np.take`` first copies the whole of a non-contiguous input (a transposed view, a
    column of a row-major block): called once per sub-block or per feature, that copy
    costs far more than the gather itself (``docs/performance.md``, trap 9). So row-major
    blocks are gathered by rows, feature-major blocks by features, and other layouts by
    fancy indexing.
    """
    if X.flags.c_contiguous:
        return np.take(X, rows, axis=0)
    if X.flags.f_contiguous:
        return np.take(X.T, rows, axis=1).T
    return X[rows]


def _block_stats_fast(
    X: np.ndarray,
    params: GMMParams,
    plan: _QuadPlan,
    w: np.ndarray | None,
    labels: np.ndarray | None,
    *,
    block_rows: int,
    n_worst: int,
    rows: np.ndarray | None = None,
) -> GMMStats:
    """:func:`block_stats` by the expanded quadratic form (see the comment above).

    ``w`` is float64 and non-negative (checked by the caller). Rows the plan cannot
    bound are zeroed out of both GEMMs and passed to :func:`_block_stats_reference`.
    Components are processed in ``plan.order`` and put back in order at the end.
    ``rows``: only these rows of ``X`` (``w`` and ``labels`` given for them), gathered
    one sub-block at a time.
    """
    n, D = X.shape
    if rows is not None:
        n = rows.size
    K = params.n_components
    M = 1 + D + D * (D + 1) // 2 if plan.full else 1 + 2 * D
    dt = plan.dtype
    nq, nr = plan.n_quad, plan.n_res
    n_worst = max(n_worst, K)
    nb = max(1, min(block_rows, n))
    # buffers sized in powers of two (>= 1024 rows) so uneven blocks share them
    ws = _workspace(dt, K, M, min(max(block_rows, 1), max(1024, 1 << (n - 1).bit_length())))
    if nr:
        rdt = plan.res_dtype
        diff, raw, scratch = ws.residual_buffers(nr, D, rdt)
        res_S1 = np.zeros((nr, D))
        res_S2 = np.zeros((nr, D, D) if plan.full else (nr, D))
    A = plan.A
    shift = plan.shift.astype(dt)[:, None]
    inv_scale = None if plan.scale is None else (1.0 / plan.scale).astype(dt)[:, None]
    floor = dt.type(_LOG_RESP_FLOOR)
    r2min = dt.type(min(plan.r2min, float(np.finfo(dt).max)))
    r2max = plan.r2max[:, None]
    order = plan.order
    dead = np.flatnonzero(~(np.asarray(params.weights)[order] > 0))
    dead = dead if dead.size else None
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if not np.any(lab >= 0):
            lab = None
    if lab is not None:
        # per label value (-1 unlabelled, then each class id, then "no class": an id no
        # component has), additive log-masks and 0/1 factors of every component (in the
        # plan's order): a labelled row may only belong to its class's components
        cc = params.component_class
        cc_ord = (np.arange(K) if cc is None else np.asarray(cc))[order]
        n_ids = int(cc_ord.max()) + 1
        allowed_by_id = np.ones((K, n_ids + 2), dtype=bool)
        allowed_by_id[:, 1 : n_ids + 1] = cc_ord[:, None] == np.arange(n_ids)[None, :]
        allowed_by_id[:, n_ids + 1] = False
        log_mask_by_id = np.where(allowed_by_id, 0.0, -np.inf).astype(dt)
        keep_by_id = allowed_by_id.astype(dt)
    flagged = []
    w_in, wd = w, None
    if w is not None:
        bad_w = ~np.isfinite(w)
        if bad_w.any():
            flagged.append(np.flatnonzero(bad_w))
            w = np.where(bad_w, 0.0, w)
        wd = w.astype(dt, copy=False)
    acc = np.zeros((K, M))
    log_norm = ws.log_norm_buffer(n)
    with np.errstate(all="ignore"):
        for s in range(0, n, nb):
            e = min(s + nb, n)
            m = e - s
            phi = ws.phi[:, :m]
            logp = ws.logp[:, :m]
            top, norm, r2, ok = ws.top[:m], ws.norm[:m], ws.r2[:m], ws.ok[:m]
            xc = phi[1 : 1 + D]
            sq = phi[1 + D : 1 + 2 * D]
            xs = X[s:e].T if rows is None else take_rows(X, rows[s:e]).T  # (D, m)
            np.subtract(xs, shift, out=xc)
            if inv_scale is not None:
                xc *= inv_scale
            np.square(xc, out=sq)
            if plan.full:
                o = 1 + 2 * D
                for j in range(D - 1):
                    np.multiply(xc[j], xc[j + 1 :], out=phi[o : o + D - 1 - j])
                    o += D - 1 - j
            np.sum(sq, axis=0, out=r2)
            np.matmul(A, phi, out=logp)  # all K rows: BLAS is slow on odd row counts
            if nr:  # per-component residual form, like the reference (float64 unless single)
                if rdt == X.dtype:
                    src = xs
                else:
                    src = raw[:, :m]
                    np.copyto(src, xs)
                for j in range(nr):
                    d, y = diff[j, :, :m], scratch[:, :m]
                    lp = logp[nq + j] if dt == rdt else ws.resp64[nq + j, :m]
                    np.subtract(src, plan.mu_res[j][:, None], out=d)
                    np.matmul(plan.PT_res[j], d, out=y)
                    np.square(y, out=y)
                    np.sum(y, axis=0, out=lp)
                    lp *= -0.5
                    lp += plan.c_res[j]
                    if dt != rdt:  # only the rounding of the result to float32
                        np.copyto(logp[nq + j], lp, casting="same_kind")
            allowed = None  # (K, m) 0/1 factors of the rows' allowed components
            if lab is not None:
                lb = lab[s:e]
                if (lb >= 0).any():
                    ids = np.clip(lb, -1, n_ids) + 1
                    logp += np.take(log_mask_by_id, ids, axis=1)
                    allowed = np.take(keep_by_id, ids, axis=1)
            np.max(logp, axis=0, out=top)
            np.less_equal(r2, r2min, out=ok)
            if allowed is not None:
                ok &= top > -np.inf
            zeroed = not ok.all()
            if zeroed:
                bad = np.flatnonzero(~ok)
                far = r2[bad]
                relevant = logp[:nq, bad] > top[bad] + _RELEVANT
                trouble = (relevant & (far > r2max)).any(axis=0) | ~(far <= plan.r2safe)
                trouble |= ~(far < np.inf)
                if allowed is not None:
                    trouble |= ~(top[bad] > -np.inf)
                bad = bad[trouble]
                zeroed = bad.size > 0
            np.subtract(logp, top, out=logp)
            # floor before exp: no subnormals (responsibilities below e^-80 are ~0)
            np.maximum(logp, floor, out=logp)
            if plan.exp32:  # float64's exp is scalar where float32's is SIMD (4-5x)
                e32 = ws.e32[:, :m]
                np.copyto(e32, logp, casting="same_kind")
                np.exp(e32, out=e32)
                np.copyto(logp, e32)
            else:
                np.exp(logp, out=logp)
            if allowed is not None:
                logp *= allowed
            if dead is not None:
                logp[dead] = 0.0
            np.sum(logp, axis=0, out=norm)
            ln = log_norm[s:e]
            np.log(norm, out=ln)
            ln += top
            if wd is None:
                np.reciprocal(norm, out=norm)
            else:
                np.divide(wd[s:e], norm, out=norm)
            np.multiply(logp, norm, out=logp)  # weighted responsibilities
            if zeroed:
                logp[:, bad] = 0.0
                phi[:, bad] = 0.0
                flagged.append(s + bad)
            gram = ws.gram
            if dt == np.float64:
                np.matmul(logp, phi.T, out=gram)
            elif plan.stats_dtype == dt:  # precision="single": float32 within a sub-block
                gram = ws.gram32
                np.matmul(logp, phi.T, out=gram)
                if nr and rdt != dt:
                    np.copyto(ws.resp64[nq:, :m], logp[nq:])
            else:  # float64 statistics GEMM: S2 about the shift needs ~1e-10 (trap 7)
                phi64, resp64 = ws.phi64[:, :m], ws.resp64[:, :m]
                np.copyto(phi64, phi)
                np.copyto(resp64, logp)
                np.matmul(resp64, phi64.T, out=ws.gram)
            acc += gram
            if nr:  # their statistics about their own means (exact for any offset)
                if zeroed:
                    diff[:, :, bad] = 0.0
                resp = logp if dt == rdt else ws.resp64
                for j in range(nr):
                    d, y, r = diff[j, :, :m], scratch[:, :m], resp[nq + j, :m]
                    res_S1[j] += d @ r
                    if plan.full:
                        np.multiply(d, r, out=y)
                        res_S2[j] += y @ d.T
                    else:
                        np.square(d, out=y)
                        res_S2[j] += y @ r
            if zeroed:
                phi[0] = 1.0
    fidx = np.unique(np.concatenate(flagged)) if flagged else np.empty(0, dtype=np.intp)
    log_norm[fidx] = 0.0
    if w is None:
        weight = float(n - fidx.size)
        count = n - fidx.size
        loglik = float(log_norm.sum())
        score = log_norm
    else:
        w = w.copy()
        w[fidx] = 0.0
        weight = float(w.sum())
        count = int(np.count_nonzero(w))
        loglik = float(w @ log_norm)
        score = np.where(w > 0, log_norm, np.inf)
    score[fidx] = np.inf
    take = min(n_worst, count)
    worst_score = np.empty(0)
    worst_rows = np.empty((0, D))
    if take:
        idx = _lowest(score, take)
        idx = idx[np.isfinite(score[idx])]
        worst_score, worst_rows = merge_lowest(
            worst_score,
            worst_rows,
            score[idx],
            np.asarray(X[idx if rows is None else rows[idx]], dtype=np.float64),
            n_worst,
        )
    sums = np.empty_like(acc)
    sums[order] = acc
    S0, S1, S2 = _moment_sums(sums, D, plan.full)
    if plan.scale is not None:  # back to data units (exact: powers of two)
        S1 = S1 * plan.scale
        S2 *= np.outer(plan.scale, plan.scale) if plan.full else plan.scale**2
    means = np.asarray(params.means, dtype=np.float64)
    shift = np.repeat(plan.shift[None], K, axis=0)
    if nr:
        res = order[nq:]
        shift[res] = plan.mu_res
        S1[res] = res_S1
        S2[res] = res_S2
    mean, m2 = _stats_from_shifted_sums(S0, S1, S2, shift, means)
    out = GMMStats(
        n=S0,
        mean=mean,
        m2=m2,
        loglik=loglik,
        weight=weight,
        count=count,
        n_excluded=0,
        worst_score=worst_score,
        worst_rows=worst_rows,
        n_worst=n_worst,
    )
    if fidx.size:
        out = out + _block_stats_reference(
            X[fidx if rows is None else rows[fidx]],
            params,
            None if w_in is None else w_in[fidx],
            None if labels is None else np.asarray(labels)[fidx],
            n_worst=n_worst,
        )
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
    with the pooled covariance of the healthy components, and an event is returned.

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
    precision : {"auto", "single"}
        Arithmetic of the kernel for float32 data (see :func:`block_stats`).
    label_weight : float
        Weight of a labelled row relative to an unlabelled one (Nigam et al. 2000's
        lambda): it multiplies the row's sample weight in every statistic and in the
        objective.
    """

    covariance_type: str = "full"
    reg_covar: float = 1e-6
    allow_excluded: bool = False
    reseed: bool = True
    block_rows: int = DEFAULT_BLOCK_ROWS
    precision: str = "auto"
    label_weight: float = 1.0

    def block_stats(
        self,
        params: GMMParams,
        X: np.ndarray,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> GMMStats:
        if labels is not None and self.label_weight != 1.0:
            lw = np.where(np.asarray(labels) >= 0, self.label_weight, 1.0)
            sample_weight = lw if sample_weight is None else lw * sample_weight
        return self._block_stats(params, X, sample_weight, labels)

    def _block_stats(self, params, X, sample_weight, labels) -> GMMStats:
        return block_stats(
            X,
            params,
            sample_weight,
            labels,
            block_rows=self.block_rows,
            precision=self.precision,
        )

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

    # ---- rows (daskem.model.base.EMModel) ----------------------------------------

    def weighted_log_prob(self, params: GMMParams, X: np.ndarray) -> np.ndarray:
        return observed_weighted_log_prob(X, params)

    def log_density(
        self, params: GMMParams, X: np.ndarray, labels: np.ndarray | None = None
    ) -> np.ndarray:
        wlp = observed_weighted_log_prob(X, params)
        return _normalise(wlp, _allowed_components(labels, params))[0]

    def class_posterior(
        self, params: GMMParams, X: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return class_posterior(params, X, n_classes)

    def params_to_dict(self, params: GMMParams) -> dict:
        def lst(a):
            return None if a is None else np.asarray(a).tolist()

        return {
            "weights": lst(params.weights),
            "means": lst(params.means),
            "precisions_cholesky": lst(params.precisions_cholesky),
            "covariances": lst(params.covariances),
            "component_class": lst(params.component_class),
        }

    def params_from_dict(self, d: dict) -> GMMParams:
        def arr(v, dtype=np.float64):
            return None if v is None else np.asarray(v, dtype=dtype)

        return GMMParams(
            arr(d["weights"]),
            arr(d["means"]),
            arr(d["precisions_cholesky"]),
            self.covariance_type,
            arr(d["covariances"]),
            arr(d["component_class"], np.int64),
        )

    def n_parameters(self, params: GMMParams) -> int:
        K, D = np.shape(params.means)
        return n_parameters(K, D, self.covariance_type)

    def to_vector(self, params: GMMParams) -> np.ndarray:
        """Weights, means and covariances as one flat vector (for SQUAREM)."""
        cov = params.covariances
        if cov is None:
            cov = covariances_from_precision_cholesky(
                params.precisions_cholesky, params.covariance_type
            )
        return np.concatenate(
            [np.ravel(params.weights), np.ravel(params.means), np.ravel(cov)]
        ).astype(np.float64)

    def from_vector(self, vector: np.ndarray, like: GMMParams) -> GMMParams | None:
        """The parameters of :meth:`to_vector`'s layout; None unless valid (positive
        weights, positive-definite covariances)."""
        K, D = np.shape(like.means)
        ct = like.covariance_type
        weights, means = vector[:K], vector[K : K + K * D].reshape(K, D)
        shape = covariance_shape(ct, K, D)
        cov = vector[K + K * D :].reshape(shape)
        if not (np.all(np.isfinite(vector)) and np.all(weights > 0)):
            return None
        if ct in ("full", "tied"):
            cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
        elif np.any(cov <= 0):
            return None
        with np.errstate(all="ignore"):
            prec_chol, ok = compute_precision_cholesky(cov, ct)
        if not np.all(ok):
            return None
        return GMMParams(weights / weights.sum(), means, prec_chol, ct, cov, like.component_class)
