"""Hidden Markov models with Gaussian emissions over many sequences (pure NumPy).

Every row of a block is one observation sequence: ``T`` dates of ``D`` attributes laid
out date-major, ``[x_0, x_1, ..., x_{T-1}]`` (``T * D`` values), as a time stack
``(time, y, x)`` gives it for each pixel. With ``variable_length=True`` (tabular input
with hmmlearn's ``lengths``) a row starts with its sequence's length ``L <= T`` and the
dates from ``L`` on are padding. A non-finite value marks a missing attribute: a date
with nothing observed contributes no emission term (its state is still inferred from
its neighbours in time), a partly observed date uses the marginal Gaussian of its
observed attributes.

The parameters are shared by every sequence (``startprob``, ``transmat``, one Gaussian
per state), so the E-step -- a scaled forward-backward, vectorised over the sequences of
a block and looping over the ``T`` dates -- is independent per row, and the statistics
it produces are sums: the expected first states, the expected transition counts
(accumulated inside the backward pass, one ``(K, n) @ (n, K)`` product per date) and the
state-weighted moments of the observations (the mixture's centred moments,
:class:`daskem.model.gmm.GMMStats`, so missing attributes enter through their
conditional expectations exactly as in the mixture). The M-step is hmmlearn's (0.3.x)
maximum a posteriori update with its Dirichlet, normal and inverse-gamma/Wishart
priors, written on the centred moments.

Memory of one block: the sequences are processed in slabs of at most
``SLAB_SEQUENCES`` rows, each converted to float64 on its own; a slab holds a few float64
arrays of ``rows * T * K`` and ``rows * T * D`` values (emission terms, forward
variables, posteriors, the date rows). Measured with tracemalloc for a block of 65,536
sequences x 24 dates x 6 attributes, K = 5 (36 MiB of float32): 31-38 MiB of
temporaries beyond the block for the statistics. :meth:`HMMModel.posterior` and
:meth:`HMMModel.decode` return per-date arrays of the whole block (``n * T * K``
float64), their output. The statistics are float64 and small (``K^2 + K D^2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gaussian import compute_precision_cholesky
from .gmm import (
    _LOG_2PI,
    GMMParams,
    GMMStats,
    _stats_from_shifted_sums,
    observed_weighted_log_prob,
)
from .missing import resp_stats

__all__ = [
    "COVARIANCE_TYPES",
    "HMMModel",
    "HMMParams",
    "HMMStats",
    "SLAB_SEQUENCES",
    "forward_backward",
    "viterbi",
]

COVARIANCE_TYPES = ("spherical", "diag", "full", "tied")

#: sequences per slab of a block (bounds a block's working memory, see the module doc)
SLAB_SEQUENCES = 4_096

# emission terms below exp(-_FLOOR) of the best state of a date are clipped there, so
# the scaled forward-backward never computes with subnormal numbers (10x slower); the
# change of any probability is below exp(-80) ~ 2e-35 relative
_FLOOR = 80.0


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class HMMParams:
    """Parameters of a Gaussian HMM, in hmmlearn's layout.

    Attributes
    ----------
    startprob : ndarray (K,)
    transmat : ndarray (K, K)
        ``transmat[i, j] = p(z_{t+1} = j | z_t = i)``.
    means : ndarray (K, D)
    covars : ndarray
        (K,) for ``spherical``, (K, D) for ``diag``, (K, D, D) for ``full``, (D, D) for
        ``tied`` (hmmlearn's ``_covars_``).
    covariance_type : str
    state_class : ndarray (K,) or None
        The class owning each state (semi-supervised fits); None: state ``k`` is class ``k``.
    """

    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    covariance_type: str
    state_class: np.ndarray | None = None

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    def emission(self) -> GMMParams:
        """The state Gaussians as a mixture with equal weights (log weight 0)."""
        ct = self.covariance_type
        cov = np.asarray(self.covars, dtype=np.float64)
        if ct == "spherical":
            cov = cov.reshape(self.n_components, -1)[:, 0]
        prec, _ = compute_precision_cholesky(cov, ct)
        return GMMParams(np.ones(self.n_components), self.means, prec, ct, cov)


def n_parameters(params: HMMParams, fitted: str = "stmc") -> int:
    """Free parameters among those ``fitted`` (hmmlearn's count, for BIC and AIC)."""
    K, D = params.n_components, params.n_features
    count = {
        "s": K - 1,
        "t": K * (K - 1),
        "m": K * D,
        "c": {
            "spherical": K,
            "diag": K * D,
            "full": K * D * (D + 1) // 2,
            "tied": D * (D + 1) // 2,
        }[params.covariance_type],
    }
    return int(sum(count[c] for c in set(fitted) if c in count))


# --------------------------------------------------------------------------- statistics


@dataclass
class HMMStats:
    """Sufficient statistics of a Gaussian HMM over a set of sequences (``+`` merges).

    Attributes
    ----------
    start : ndarray (K,)
        ``sum_s w_s p(z_0 = k | x_s)``.
    trans : ndarray (K, K)
        Expected transition counts ``sum_s w_s sum_t p(z_t = i, z_{t+1} = j | x_s)``.
    emission : GMMStats
        State-weighted centred moments of the observed dates.
    loglik : float
        ``sum_s w_s log p(x_s)``.
    weight : float
        ``sum_s w_s`` over the sequences used.
    count : int
        Sequences used.
    n_dates : int
        Dates (of the sequences used) with something observed.
    n_excluded, n_empty : int
        Sequences left out (nothing observed on any date: both counts).
    n_partial : int
        Sequences used with some value missing.
    """

    start: np.ndarray
    trans: np.ndarray
    emission: GMMStats
    loglik: float = 0.0
    weight: float = 0.0
    count: int = 0
    n_dates: int = 0
    n_excluded: int = 0
    n_empty: int = 0
    n_partial: int = 0

    @classmethod
    def zeros(cls, K: int, D: int, covariance_type: str) -> HMMStats:
        return cls(np.zeros(K), np.zeros((K, K)), GMMStats.zeros(K, D, covariance_type, 0))

    def __add__(self, other: HMMStats) -> HMMStats:
        if not isinstance(other, HMMStats):
            return NotImplemented
        return HMMStats(
            self.start + other.start,
            self.trans + other.trans,
            self.emission + other.emission,
            self.loglik + other.loglik,
            self.weight + other.weight,
            self.count + other.count,
            self.n_dates + other.n_dates,
            self.n_excluded + other.n_excluded,
            self.n_empty + other.n_empty,
            self.n_partial + other.n_partial,
        )

    def __radd__(self, other):  # lets ``sum()`` start from 0
        if other == 0:
            return self
        return NotImplemented


# --------------------------------------------------------------------------- inference


@dataclass
class _Sequences:
    """A block's rows as sequences: observations (n, T, D), which dates exist, weights."""

    X: np.ndarray  # (n, T, D) float64, NaN where missing or padding
    valid: np.ndarray | None  # (n, T) bool: the date is part of its sequence (None: all)
    lengths: np.ndarray | None = field(default=None)


def _log_gaussian_rows(X: np.ndarray, params: HMMParams, gmm: GMMParams) -> np.ndarray:
    """``log N(x | state k)`` of complete rows (m, D), shape (m, K).

    Diagonal and spherical states: the expanded quadratic form about the rows' mean (two
    GEMMs; float64, so its rounding stays ~1e-16 (|x - c|^2 / var) nats); full and tied:
    the per-state Cholesky residuals of the mixture kernel.
    """
    if params.covariance_type not in ("diag", "spherical"):
        return observed_weighted_log_prob(X, gmm)
    K, D = params.n_components, params.n_features
    var = np.asarray(gmm.covariances, dtype=np.float64)
    var = np.broadcast_to(var[:, None] if var.ndim == 1 else var, (K, D))
    prec = 1.0 / var
    c = X.mean(axis=0) if X.shape[0] else np.zeros(D)
    xc = X - c
    m = params.means - c  # (K, D)
    const = -0.5 * (D * _LOG_2PI + np.log(var).sum(axis=1) + (m * m * prec).sum(axis=1))
    out = (xc * xc) @ (-0.5 * prec.T)
    out += xc @ (m * prec).T
    out += const
    return out


def log_emissions(params: HMMParams, X: np.ndarray, gmm: GMMParams | None = None) -> np.ndarray:
    """``log N(x_t | state k)`` over each date's observed attributes, time-major (T, n, K).

    ``X`` is (n, T, D). Dates with nothing observed (missing, or padding) get 0 (no
    emission term); partly observed dates the marginal Gaussian of what is observed.
    """
    n, T, D = X.shape
    K = params.n_components
    gmm = params.emission() if gmm is None else gmm
    flat = np.ascontiguousarray(X.transpose(1, 0, 2)).reshape(T * n, D)
    obs = np.isfinite(flat)
    complete = obs.all(axis=1)
    out = np.zeros((T * n, K))
    if complete.all():
        out[:] = _log_gaussian_rows(flat, params, gmm)
    else:
        if complete.any():
            out[complete] = _log_gaussian_rows(flat[complete], params, gmm)
        partial = ~complete & obs.any(axis=1)
        if partial.any():
            out[partial] = observed_weighted_log_prob(flat[partial], gmm)
    return out.reshape(T, n, K)


def _clamp(logB: np.ndarray, labels: np.ndarray | None, params: HMMParams) -> np.ndarray:
    """Labelled dates: states of other classes get probability 0 (``-inf`` emission).

    ``labels`` is (n, T) (class id or -1), ``logB`` time-major (T, n, K)."""
    if labels is None:
        return logB
    lab = np.asarray(labels)
    if not (lab >= 0).any():
        return logB
    K = params.n_components
    sc = np.arange(K) if params.state_class is None else np.asarray(params.state_class)
    lab = lab.T  # (T, n)
    bad = (lab[:, :, None] >= 0) & (sc[None, None, :] != lab[:, :, None])
    return np.where(bad, -np.inf, logB)


def _scaled(logB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Emission likelihoods scaled per date by their best state (``B``, ``offset``)."""
    # maxima over the short state axis, one state at a time (a reduction over a short
    # last axis is slow: docs/performance.md trap 5)
    off = logB[..., 0].copy()
    for k in range(1, logB.shape[2]):
        np.maximum(off, logB[..., k], out=off)
    off[~np.isfinite(off)] = 0.0
    B = logB - off[:, :, None]
    np.maximum(B, -_FLOOR, out=B)
    with np.errstate(under="ignore", invalid="ignore"):
        np.exp(B, out=B)
    if not np.isfinite(logB).all():
        B[~np.isfinite(logB)] = 0.0  # clamped states stay impossible
    return B, off


def forward_backward(
    params: HMMParams,
    logB: np.ndarray,
    valid: np.ndarray | None = None,
    w: np.ndarray | None = None,
    need_trans: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scaled forward-backward of every sequence of a block at once (time-major).

    Parameters
    ----------
    logB : ndarray (T, n, K)
        Log emission terms (0 where a date has no observation; ``-inf`` for states a
        label rules out), time-major so every date's (n, K) slab is contiguous.
    valid : ndarray (n, T) of bool, optional
        Dates that belong to their sequence (padding after a sequence's end is False,
        and must come after all its valid dates).
    w : ndarray (n,), optional
        Sequence weights for the transition counts.

    Returns
    -------
    gamma : ndarray (T, n, K)
        ``p(z_t = k | x)``.
    loglik : ndarray (n,)
        ``log p(x)`` of every sequence.
    trans : ndarray (K, K) or None
        ``sum_s w_s sum_t p(z_t = i, z_{t+1} = j | x_s)`` (transitions into padding left
        out), if ``need_trans``.
    """
    T, n, K = logB.shape
    A = np.asarray(params.transmat, dtype=np.float64)
    AT = np.ascontiguousarray(A.T)
    ones = np.ones(K)
    B, off = _scaled(logB)
    alpha = np.empty((T, n, K))
    c = np.empty((T, n))
    np.multiply(np.asarray(params.startprob, dtype=np.float64)[None, :], B[0], out=alpha[0])
    for t in range(T):
        if t:
            np.matmul(alpha[t - 1], A, out=alpha[t])
            alpha[t] *= B[t]
        at = alpha[t]
        np.matmul(at, ones, out=c[t])  # sums over the short state axis by GEMV
        ct = c[t]
        ct[ct <= 0] = 1.0  # a sequence no state can explain (all ruled out): stays 0
        at /= ct[:, None]
    with np.errstate(divide="ignore"):
        loglik = np.log(c).sum(axis=0) + off.sum(axis=0)
    # the backward pass overwrites B[t + 1] with B[t + 1] * beta[t + 1] / c[t + 1] and
    # ends with gamma in alpha (beta is never stored whole)
    trans = np.zeros((K, K)) if need_trans else None
    ww = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    beta = np.ones((n, K))
    for t in range(T - 2, -1, -1):
        b = B[t + 1]
        b *= beta
        b /= c[t + 1][:, None]
        alpha[t + 1] *= beta  # gamma of date t + 1
        beta = b @ AT
        if need_trans:
            wt = ww if valid is None else ww * valid[:, t + 1]
            at = alpha[t] * wt[:, None]
            trans += at.T @ b
    alpha[0] *= beta
    if need_trans:
        trans *= A
    gamma = alpha
    norm = gamma @ ones
    norm[norm <= 0] = 1.0
    gamma /= norm[:, :, None]
    return gamma, loglik, trans


def viterbi(
    params: HMMParams, logB: np.ndarray, lengths: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Most likely state path of every sequence (log space), vectorised over sequences.

    ``logB`` is time-major (T, n, K). Returns the paths (n, T) (int) and their log
    probabilities ``log p(x, z*)`` (n,). Padding dates (``t >= lengths``) repeat the
    last state of the sequence.
    """
    T, n, K = logB.shape
    with np.errstate(divide="ignore"):
        logA = np.log(np.asarray(params.transmat, dtype=np.float64))
        logpi = np.log(np.asarray(params.startprob, dtype=np.float64))
    delta = logpi[None, :] + logB[0]
    back = np.empty((T, n, K), dtype=np.int16 if K < 32_000 else np.int32)
    for t in range(1, T):
        cand = delta[:, :, None] + logA[None, :, :]  # (n, i, j)
        arg = cand.argmax(axis=1)
        back[t] = arg
        new = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0] + logB[t]
        if lengths is not None:  # past a sequence's end its score stays as it was
            past = (t >= lengths)[:, None]
            new = np.where(past, delta, new)
            back[t] = np.where(past, np.arange(K)[None, :], arg)
        delta = new
    path = np.empty((n, T), dtype=np.int64)
    path[:, T - 1] = delta.argmax(axis=1)
    logp = delta.max(axis=1)
    for t in range(T - 1, 0, -1):
        path[:, t - 1] = np.take_along_axis(back[t], path[:, t : t + 1], axis=1)[:, 0]
    return path, logp


def emission_stats(flat: np.ndarray, G: np.ndarray, params: HMMParams, gmm: GMMParams) -> GMMStats:
    """State-weighted centred moments of date rows ``flat`` (m, D) with weights ``G``
    (m, K) (posterior times sequence weight); missing attributes through their
    conditional expectations (:func:`daskem.model.missing.resp_stats`).

    Complete rows are summed about their mean ``c`` with one GEMM per moment (full and
    tied: one per state), then centred (float64; the shift keeps the rounding small).
    """
    K, D = params.n_components, params.n_features
    obs = np.isfinite(flat)
    complete = obs.all(axis=1)
    full = params.covariance_type in ("full", "tied")
    if not complete.all():
        rest = ~complete & obs.any(axis=1)
        out = emission_stats(flat[complete], G[complete], params, gmm)
        if rest.any():
            w = G[rest].sum(axis=1)
            q = G[rest] / np.where(w > 0, w, 1.0)[:, None]
            part = resp_stats(flat[rest], q, gmm, w, n_worst=0)
            part.worst_score, part.worst_rows = np.empty(0), np.empty((0, D))
            out = out + part
        return out
    X = flat
    S0 = G.sum(axis=0)
    c = X.mean(axis=0) if X.shape[0] else np.zeros(D)
    xc = X - c
    S1 = G.T @ xc
    if full:
        S2 = np.empty((K, D, D))
        for k in range(K):
            S2[k] = (xc * G[:, k : k + 1]).T @ xc
    else:
        S2 = G.T @ (xc * xc)
    mean, m2 = _stats_from_shifted_sums(S0, S1, S2, c, params.means)
    return GMMStats(
        n=S0,
        mean=mean,
        m2=m2,
        weight=float(G.sum()),
        count=int(X.shape[0]),
        worst_score=np.empty(0),
        worst_rows=np.empty((0, D)),
        n_worst=0,
    )


# --------------------------------------------------------------------------- the model


class HMMModel:
    """The EM interface (:class:`daskem.model.base.EMModel`) of a Gaussian HMM.

    Parameters
    ----------
    n_times : int
        Dates per sequence ``T`` (the longest, with ``variable_length``).
    n_attrs : int
        Attributes per date ``D``.
    covariance_type : {"spherical", "diag", "full", "tied"}
    variable_length : bool
        Rows start with their sequence's length (tabular input with ``lengths``).
    startprob_prior, transmat_prior, means_prior, means_weight, covars_prior,
    covars_weight : float or array
        hmmlearn's priors (see :class:`daskem.hmm.GaussianHMM`).
    params : str
        Which parameters the M-step updates: any of ``"s"`` (startprob), ``"t"``
        (transmat), ``"m"`` (means), ``"c"`` (covars).
    """

    #: the objective is the likelihood without the priors, which MAP-EM may lower: EM
    #: stops at the first change below ``tol``, negative ones included (hmmlearn's rule)
    stop_on_decrease = True

    def __init__(
        self,
        n_times: int,
        n_attrs: int,
        covariance_type: str = "diag",
        *,
        variable_length: bool = False,
        startprob_prior: Any = 1.0,
        transmat_prior: Any = 1.0,
        means_prior: Any = 0.0,
        means_weight: Any = 0.0,
        covars_prior: Any = 1e-2,
        covars_weight: Any = 1.0,
        params: str = "stmc",
    ) -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}")
        self.n_times = int(n_times)
        self.n_attrs = int(n_attrs)
        self.covariance_type = covariance_type
        self.variable_length = bool(variable_length)
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight
        self.params = params

    # ------------------------------------------------------------------ rows

    @property
    def row_width(self) -> int:
        return self.n_times * self.n_attrs + int(self.variable_length)

    def sequences(self, X: np.ndarray) -> _Sequences:
        """A block's rows as (n, T, D) sequences (padding set to NaN); float rows are
        viewed, not copied (slabs are converted to float64 one at a time)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.row_width:
            raise ValueError(
                f"expected rows of {self.row_width} values ({self.n_times} dates x "
                f"{self.n_attrs} attributes), got shape {X.shape}"
            )
        T, D = self.n_times, self.n_attrs
        if not self.variable_length:
            if X.dtype.kind != "f":
                X = X.astype(np.float64)
            return _Sequences(X.reshape(-1, T, D), None)
        lengths = np.asarray(X[:, 0]).astype(np.int64)
        S = np.array(X[:, 1:], dtype=np.float64).reshape(-1, T, D)
        valid = np.arange(T)[None, :] < lengths[:, None]
        S[~valid] = np.nan
        return _Sequences(S, valid, lengths)

    def _slabs(self, n: int):
        for s in range(0, n, SLAB_SEQUENCES):
            yield slice(s, min(n, s + SLAB_SEQUENCES))

    # ------------------------------------------------------------------ EM

    def block_stats(
        self,
        params: HMMParams,
        X: np.ndarray,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> HMMStats:
        seqs = self.sequences(X)
        n = seqs.X.shape[0]
        K, D = params.n_components, params.n_features
        out = HMMStats.zeros(K, D, self.covariance_type)
        need_trans = "t" in self.params
        gmm = params.emission()
        for sl in self._slabs(n):
            S = np.asarray(seqs.X[sl], dtype=np.float64)
            m, T = S.shape[0], S.shape[1]
            w = np.ones(m) if sample_weight is None else np.asarray(sample_weight[sl], float)
            seen_date = np.isfinite(S).any(axis=2)  # (m, T)
            empty = ~seen_date.any(axis=1)
            w = np.where(empty | ~np.isfinite(w), 0.0, w)
            lab = None if labels is None else self._labels(labels, sl, m)
            logB = _clamp(log_emissions(params, S, gmm), lab, params)
            valid = None if seqs.valid is None else seqs.valid[sl]
            gamma, ll, trans = forward_backward(params, logB, valid, w, need_trans)
            used = w > 0
            # date rows in the time-major order of gamma
            flat = np.ascontiguousarray(S.transpose(1, 0, 2)).reshape(T * m, D)
            gamma *= w[None, :, None]
            emis = emission_stats(flat, gamma.reshape(T * m, K), params, gmm)
            partial = used & ~np.isfinite(S).all(axis=(1, 2))
            if seqs.valid is not None:  # padding is not missing data
                n_obs = np.isfinite(S).all(axis=2).sum(axis=1)
                partial = used & (n_obs < seqs.lengths[sl])
            out = out + HMMStats(
                start=gamma[0].sum(axis=0),
                trans=trans if trans is not None else np.zeros((K, K)),
                emission=emis,
                loglik=float(w[used] @ ll[used]),
                weight=float(w.sum()),
                count=int(used.sum()),
                n_dates=int(seen_date[used].sum()),
                n_excluded=int(empty.sum()),
                n_empty=int(empty.sum()),
                n_partial=int(partial.sum()),
            )
        return out

    def _labels(self, labels: np.ndarray, sl: slice, m: int) -> np.ndarray:
        """Class ids of a slab's dates (m, T): a row label applies to every date."""
        lab = np.asarray(labels[sl])
        if lab.ndim == 1:
            lab = np.repeat(lab[:, None], self.n_times, axis=1)
        return lab.reshape(m, self.n_times)

    def m_step(self, stats: HMMStats, params: HMMParams) -> tuple[HMMParams, list[dict]]:
        """hmmlearn's MAP update (``GaussianHMM._do_mstep``) on the reduced statistics."""
        start, trans = params.startprob, params.transmat
        if "s" in self.params:
            new = np.maximum(np.asarray(self.startprob_prior) - 1.0 + stats.start, 0.0)
            start = np.where(params.startprob == 0, 0.0, new)
            start = start / (start.sum() if start.sum() else 1.0)
        if "t" in self.params:
            new = np.maximum(np.asarray(self.transmat_prior) - 1.0 + stats.trans, 0.0)
            new = np.where(params.transmat == 0, 0.0, new)
            rows = new.sum(axis=1, keepdims=True)
            trans = new / np.where(rows == 0, 1.0, rows)
        means, covars = self._emission_step(stats.emission, params)
        return (
            HMMParams(start, trans, means, covars, params.covariance_type, params.state_class),
            [],
        )

    def _emission_step(self, st: GMMStats, params: HMMParams) -> tuple[np.ndarray, np.ndarray]:
        K, D = params.n_components, params.n_features
        post = st.n  # (K,)
        mp = np.broadcast_to(np.asarray(self.means_prior, dtype=np.float64), (K, D))
        mw = np.broadcast_to(np.asarray(self.means_weight, dtype=np.float64), (K, D))
        means = np.asarray(params.means, dtype=np.float64)
        if "m" in self.params:
            denom = mw + post[:, None]
            new = (mw * mp + post[:, None] * st.mean) / np.where(denom > 0, denom, 1.0)
            means = np.where(denom > 0, new, means)
        covars = params.covars
        if "c" not in self.params:
            return means, covars
        ct = self.covariance_type
        md = means - mp
        d = st.mean - means  # the observations' mean about the new means
        cp = np.asarray(self.covars_prior, dtype=np.float64)
        cw = np.asarray(self.covars_weight, dtype=np.float64)
        if ct in ("spherical", "diag"):
            m2 = st.m2 if st.m2.ndim == 2 else np.diagonal(st.m2, axis1=1, axis2=2)
            c_n = mw * md**2 + m2 + post[:, None] * d**2
            c_d = np.maximum(cw - 1.0, 0.0) + post[:, None]
            cov = (cp + c_n) / np.maximum(c_d, 1e-5)
            if ct == "spherical":
                cov = cov.mean(axis=1)
            return means, cov
        mw1 = mw[:, 0]
        c_n = (
            mw1[:, None, None] * (md[:, :, None] * md[:, None, :])
            + st.m2
            + post[:, None, None] * (d[:, :, None] * d[:, None, :])
        )
        cvweight = np.maximum(cw - D, 0.0)
        if ct == "tied":
            cov = (cp + c_n.sum(axis=0)) / (cvweight + post.sum())
        else:
            cov = (cp + c_n) / (cvweight + post[:, None, None])
        return means, cov

    def check_stats(self, stats: HMMStats) -> None:
        if stats.count == 0:
            raise ValueError("no sequence has any observed value: nothing to fit")

    def objective(self, stats: HMMStats) -> float:
        """The total log-likelihood ``sum_s w_s log p(x_s)`` (hmmlearn's ``monitor_``)."""
        return float(stats.loglik)

    # ------------------------------------------------------------------ rows

    def posterior(
        self, params: HMMParams, X: np.ndarray, labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``p(z_t = k | x)`` (n, T, K) and ``log p(x)`` (n,) of every sequence (row).

        Sequences with nothing observed get NaN; with labels, ``log p(x, classes)``.
        """
        seqs = self.sequences(X)
        n, T = seqs.X.shape[:2]
        K = params.n_components
        gamma = np.full((n, T, K), np.nan)
        ll = np.full(n, np.nan)
        for sl in self._slabs(n):
            S = np.asarray(seqs.X[sl], dtype=np.float64)
            lab = None if labels is None else self._labels(labels, sl, S.shape[0])
            logB = _clamp(log_emissions(params, S), lab, params)
            g, lk, _ = forward_backward(params, logB, need_trans=False)
            seen = np.isfinite(S).any(axis=(1, 2))
            gamma[sl][seen], ll[sl][seen] = g.transpose(1, 0, 2)[seen], lk[seen]
        return gamma, ll

    def decode(
        self, params: HMMParams, X: np.ndarray, labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Viterbi paths (n, T) and their ``log p(x, z*)`` (n,) of every sequence; labelled
        dates (``labels`` (n, T), -1 unlabelled) keep to their class's states."""
        seqs = self.sequences(X)
        n, T = seqs.X.shape[:2]
        paths = np.empty((n, T), dtype=np.int64)
        logp = np.empty(n)
        for sl in self._slabs(n):
            S = np.asarray(seqs.X[sl], dtype=np.float64)
            lengths = None if seqs.lengths is None else seqs.lengths[sl]
            lab = None if labels is None else self._labels(labels, sl, S.shape[0])
            logB = _clamp(log_emissions(params, S), lab, params)
            paths[sl], logp[sl] = viterbi(params, logB, lengths)
        return paths, logp

    def log_density(
        self, params: HMMParams, X: np.ndarray, labels: np.ndarray | None = None
    ) -> np.ndarray:
        """``log p(x)`` of every sequence (NaN where nothing is observed)."""
        return self.posterior(params, X, labels)[1]

    def weighted_log_prob(self, params: HMMParams, X: np.ndarray) -> np.ndarray:
        """``log p(x, z_0 = k)`` of every sequence, shape (n, K) (NaN: nothing observed)."""
        gamma, ll = self.posterior(params, X)
        with np.errstate(divide="ignore"):
            return np.log(gamma[:, 0]) + ll[:, None]

    def class_posterior(
        self, params: HMMParams, X: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``p(class of z_0 | x)`` (n, n_classes) and ``log p(x)`` (n,)."""
        gamma, ll = self.posterior(params, X)
        sc = np.arange(params.n_components) if params.state_class is None else params.state_class
        M = np.zeros((params.n_components, n_classes))
        M[np.arange(params.n_components), sc] = 1.0
        return gamma[:, 0] @ M, ll

    # ------------------------------------------------------------------ values

    def params_to_dict(self, params: HMMParams) -> dict[str, Any]:
        return {
            "startprob": params.startprob.tolist(),
            "transmat": params.transmat.tolist(),
            "means": params.means.tolist(),
            "covars": np.asarray(params.covars).tolist(),
            "covariance_type": params.covariance_type,
            "state_class": None
            if params.state_class is None
            else [int(c) for c in params.state_class],
        }

    def params_from_dict(self, d: dict[str, Any]) -> HMMParams:
        sc = d.get("state_class")
        return HMMParams(
            np.asarray(d["startprob"], dtype=np.float64),
            np.asarray(d["transmat"], dtype=np.float64),
            np.asarray(d["means"], dtype=np.float64),
            np.asarray(d["covars"], dtype=np.float64),
            str(d["covariance_type"]),
            None if sc is None else np.asarray(sc, dtype=np.int64),
        )

    def n_parameters(self, params: HMMParams) -> int:
        return n_parameters(params, self.params)
