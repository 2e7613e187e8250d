"""EM for a Gaussian mixture with missing attributes (Ghahramani & Jordan 1994), pure NumPy.

A row with some attributes missing (not finite) contributes to a Gaussian mixture's EM
through its observed attributes ``x_o`` only:

* E-step: ``r_k ∝ pi_k N(x_o | mu_k,o, Sigma_k,oo)``, the marginal Gaussian of the
  observed attributes; the row's term of the objective is ``log p(x_o)``, so the
  objective is the observed-data log-likelihood, which EM never decreases;
* statistics: the row counts as the vector ``x̂_k`` whose missing part is the conditional
  mean ``mu_k,m + A_k (x_o - mu_k,o)`` (:mod:`daskem.model.gaussian`), and the
  conditional covariance ``C_k`` is added to the missing block of its second moment.

Rows are grouped by their pattern of observed attributes, so a pattern costs one
marginal Gaussian and one conditional per component. Because ``x̂_k`` is an affine image
of ``x_o``, the centred moments of the filled rows follow from the responsibility-weighted
moments of ``x_o`` alone: with ``N``, ``x̄_o``, ``M_oo`` those of a component over a
pattern's rows,

    mean = [x̄_o, mu_m + A (x̄_o - mu_o)],
    m2   = [[M_oo, M_oo A^T], [A M_oo, A M_oo A^T + N C]],

so a partly observed row costs about what a complete row costs (one GEMM for every
component's log-density over the observed features, one for every statistic: the
complete-data fast kernel for large pattern groups, :func:`_direct_stats` for small
ones). Diagonal and spherical covariances need no grouping: features are independent
given the component, so :func:`_separable_stats` treats all partly observed rows at once
with the observation indicators as features. The result is a
:class:`~daskem.model.gmm.GMMStats` record, merged with the complete rows' record by
``+`` and reduced like any other.

:func:`impute` fills missing attributes with their conditional mean mixed over the
row's posterior, ``E[x_m | x_o] = sum_k r_k x̂_k,m``, and gives the conditional standard
deviation from ``Var[x_m | x_o] = sum_k r_k (diag C_k + (x̂_k,m - E[x_m | x_o])^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .gaussian import Conditional, conditional, full_covariances, whitening
from .gmm import (
    _F32_MIN_WEIGHT,
    _LOG_RESP_FLOOR,
    DEFAULT_BLOCK_ROWS,
    GMMModel,
    GMMParams,
    GMMStats,
    ObjectCache,
    _allowed_components,
    _block_stats_fast,
    _block_stats_reference,
    _log_weights,
    _lowest,
    _make_plan,
    _normalise,
    _stats_from_shifted_sums,
    block_stats,
    covariances_from_precision_cholesky,
    take_rows,
)
from .stats import merge_lowest

__all__ = [
    "PatternGMMModel",
    "finite_codes",
    "pattern_code",
    "pattern_codes",
    "MissingGMMModel",
    "impute",
    "marginal_block_stats",
    "observed_patterns",
    "partial_block_stats",
    "resp_stats",
    "row_log_weights",
]


_GATHER_BITS = np.uint64(0x0102040810204080)  # low bits of 8 bytes -> top byte
# the bit of the gathered byte that byte j's low bit lands on
_BIT_OF_BYTE = [
    (((1 << 8 * j) * int(_GATHER_BITS)) % 2**64 >> 56).bit_length() - 1 for j in range(8)
]


def pattern_codes(obs: np.ndarray) -> np.ndarray:
    """One unsigned integer per row naming its pattern of observed features.

    Parameters
    ----------
    obs : ndarray of bool, shape (n, D)

    Returns
    -------
    ndarray of uint8 (D <= 8), uint16 (D <= 16) or uint64 (D <= 64), shape (n,)
        Rows share a code exactly when they share a pattern; every feature observed and
        none observed have the codes of :func:`pattern_code` of an all-True / all-False
        row. For ``D > 64`` the codes are pattern ranks (int64).

    Notes
    -----
    Eight booleans are the eight bytes of a uint64, and one multiplication gathers their
    low bits into its top byte: a few passes over ``n * ceil(D / 8)`` words instead of a
    row-wise reduction, and codes of at most 16 bits sort by radix.
    """
    obs = np.asarray(obs, dtype=bool)
    n, D = obs.shape
    if D <= 16 and obs.flags.f_contiguous and not obs.flags.c_contiguous:
        # feature-major (as daskem keeps cached chunks): one pass per contiguous column,
        # each feature on the bit the row-major path below gives it
        dtype = np.uint8 if D <= 8 else np.uint16
        code = np.zeros(n, dtype=dtype)
        for j in range(D):
            code |= obs[:, j].view(np.uint8).astype(dtype) << dtype(
                _BIT_OF_BYTE[j % 8] + 8 * (j // 8)
            )
        return code
    obs = np.ascontiguousarray(obs)
    if D > 64:
        return np.unique(obs, axis=0, return_inverse=True)[1].ravel().astype(np.int64)
    G = (D + 7) // 8
    if D == 8 * G:
        padded = obs
    else:
        padded = np.zeros((n, 8 * G), dtype=bool)
        padded[:, :D] = obs
    words = padded.view(np.uint64)  # (n, G)
    with np.errstate(over="ignore"):
        groups = (words * _GATHER_BITS) >> np.uint64(56)  # (n, G), one byte each
    if G == 1:
        return groups[:, 0].astype(np.uint8)
    dtype = np.uint16 if G == 2 else np.uint64
    code = np.zeros(n, dtype=dtype)
    for g in range(G):
        code |= groups[:, g].astype(dtype) << dtype(8 * g)
    return code


def finite_codes(X: np.ndarray) -> np.ndarray:
    """:func:`pattern_codes` of ``np.isfinite(X)``.

    For a feature-major block of at most 16 features, one pass per contiguous column,
    without the (n, D) boolean mask in between.
    """
    X = np.asarray(X)
    n, D = X.shape
    if D > 16 or not (X.flags.f_contiguous and not X.flags.c_contiguous):
        return pattern_codes(np.isfinite(X))
    dtype = np.uint8 if D <= 8 else np.uint16
    code = np.zeros(n, dtype=dtype)
    fin = np.empty(n, dtype=bool)
    bit = np.empty(n, dtype=dtype)
    for j in range(D):
        np.isfinite(X[:, j], out=fin)
        np.left_shift(fin.view(np.uint8), dtype(_BIT_OF_BYTE[j % 8] + 8 * (j // 8)), out=bit)
        code |= bit
    return code


def pattern_code(pattern: np.ndarray) -> int:
    """The code :func:`pattern_codes` gives a row observed on ``pattern`` (bool (D,))."""
    return int(pattern_codes(np.asarray(pattern, dtype=bool)[None])[0])


def observed_patterns(
    obs: np.ndarray, codes: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Group rows by their pattern of observed features.

    Parameters
    ----------
    obs : ndarray of bool, shape (n, D)
    codes : ndarray, optional
        :func:`pattern_codes` of ``obs``, if already computed.

    Returns
    -------
    list of (pattern, rows, code)
        ``pattern`` a bool (D,) mask, ``rows`` the increasing indices of the rows with it,
        ``code`` its integer code.
    """
    n = obs.shape[0]
    if n == 0:
        return []
    code = pattern_codes(obs) if codes is None else codes
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    starts = np.flatnonzero(np.r_[True, sorted_code[1:] != sorted_code[:-1]])
    ends = np.r_[starts[1:], n]
    return [
        (obs[order[a]], order[a:b], int(sorted_code[a])) for a, b in zip(starts, ends, strict=True)
    ]


_LOG_2PI = float(np.log(2.0 * np.pi))
_FORMS = ObjectCache()  # params -> {pattern code: _Forms}
# a pattern with fewer rows than this in a block takes the direct float64 path: per row
# about as fast as the complete-data kernel, without its plan (~1.3 ms per pattern and
# parameter set, measured for K = 8, 6 observed features)
_PLAN_MIN_ROWS = 32768
_CODES = ObjectCache()  # read-only block -> its codes or None (block_codes)
_DIRECT_ROWS = 2048  # sub-block of the separable path: phi (M x rows float64) stays in L2
# sub-block of the direct path of one pattern (phi of up to 36 rows for 8 features: 1.2
# MiB); measured 4 % faster than 2,048 on 92 random patterns of ~3,300 rows per block
_DIRECT_GROUP_ROWS = 4096


def _pairs(o: int, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i <= j) of the quadratic features (the diagonal only if not ``full``)."""
    key = (o, full)
    if key not in _PAIRS:
        _PAIRS[key] = np.triu_indices(o) if full else (np.arange(o), np.arange(o))
    return _PAIRS[key]


_PAIRS: dict = {}


@dataclass
class _Direct:
    """The expanded quadratic form of a pattern's marginal log-densities about a centre
    ``c`` (the weighted centre of the components' observed means), its rounding-error
    coefficients, and the layout of ``phi = [1, d, d_i d_j (i <= j)]``, ``d = x_o - c``."""

    c: np.ndarray  # (o,)
    mu_o: np.ndarray  # (K, o)
    const: np.ndarray  # (K,) log weight + normalising constant
    coef: np.ndarray  # (K, M)
    err: tuple  # (err0, err1, err2), each (K,)
    squares: np.ndarray  # rows of phi holding d_i^2
    full: bool


def _make_direct(forms: _Forms) -> _Direct:
    params = forms.params
    K, o = forms.whiten.shape[:2]
    full = params.covariance_type in ("full", "tied")
    mu_o = np.asarray(params.means, dtype=np.float64)[:, forms.pattern]
    weights = np.asarray(params.weights, dtype=np.float64)
    live = weights > 0
    c = (weights[live, None] * mu_o[live]).sum(axis=0) / weights[live].sum()
    iu, ju = _pairs(o, full)
    M = 1 + o + iu.size
    P = forms.precision  # (K, o, o)
    delta = mu_o - c  # (K, o)
    Pd = np.einsum("kij,kj->ki", P, delta)
    quad = np.einsum("ki,ki->k", delta, Pd)
    # rounding error of the expanded form for rows within sqrt(r2) of c:
    # 1e-15 (M + 4) (|quad_k| + |P_k delta_k| sqrt(r2) + |P_k| r2)
    lead = 1e-15 * (M + 4)
    err = (
        lead * np.abs(quad),
        lead * np.linalg.norm(Pd, axis=1),
        lead * np.sqrt(np.einsum("kij,kij->k", P, P)),
    )
    const = -0.5 * o * _LOG_2PI + forms.log_det + _log_weights(params.weights)
    coef = np.empty((K, M))
    coef[:, 0] = const - 0.5 * quad
    coef[:, 1 : 1 + o] = Pd
    coef[:, 1 + o :] = P[:, iu, ju] * np.where(iu == ju, -0.5, -1.0)
    squares = 1 + o + np.flatnonzero(iu == ju)
    return _Direct(c, mu_o, const, coef, err, squares, full)


@dataclass
class _Forms:
    """Everything a pattern of observed features needs, for every component at once.

    ``whiten`` (K, o, o) maps ``x_o - mu_k,o`` to independent unit normals (the inverse
    Cholesky factor of ``Sigma_k,oo``; diagonal for diagonal covariances), ``log_det``
    (K,) is ``log det`` of ``whiten``; the conditional Gaussians of the missing features,
    the marginal mixture and the fast kernel's plans for it are made when first needed.
    """

    params: GMMParams
    pattern: np.ndarray
    whiten: np.ndarray
    log_det: np.ndarray
    _cond: Conditional | None = None
    _marginal: GMMParams | None = None
    _precision: np.ndarray | None = None
    _direct: _Direct | None = None
    plans: dict = field(default_factory=dict)

    @property
    def cond(self) -> Conditional:
        if self._cond is None:
            p = self.params
            self._cond = conditional(
                _covariances(p), p.covariance_type, self.pattern, len(p.weights)
            )
        return self._cond

    @property
    def marginal(self) -> GMMParams:
        """The mixture of the observed features (exact marginal of each component)."""
        if self._marginal is None:
            p, o = self.params, self.pattern
            ct = p.covariance_type
            cov = _covariances(p)
            if ct == "full":
                sub = cov[:, o][:, :, o]
                chol = np.transpose(self.whiten, (0, 2, 1))  # upper: P P^T = Sigma_oo^-1
            elif ct == "tied":
                sub = cov[o][:, o]
                chol = self.whiten[0].T
            elif ct == "diag":
                sub = cov[:, o]
                chol = 1.0 / np.sqrt(sub)
            else:
                sub = cov
                chol = 1.0 / np.sqrt(sub)
            self._marginal = GMMParams(
                p.weights, p.means[:, o], np.ascontiguousarray(chol), ct, sub, p.component_class
            )
        return self._marginal

    @property
    def precision(self) -> np.ndarray:
        """``Sigma_k,oo^-1``, shape (K, o, o)."""
        if self._precision is None:
            self._precision = np.matmul(np.transpose(self.whiten, (0, 2, 1)), self.whiten)
        return self._precision

    @property
    def direct(self) -> _Direct:
        """What :func:`_direct_stats` needs of the pattern, whatever its rows."""
        if self._direct is None:
            self._direct = _make_direct(self)
        return self._direct

    def plan(self, f32: bool, single: bool):
        """The fast kernel's plan for the marginal mixture (None: reference kernel)."""
        key = (f32, single)
        if key not in self.plans:
            self.plans[key] = _make_plan(self.marginal, f32, single)
        return self.plans[key]


def _covariances(params: GMMParams) -> np.ndarray:
    if params.covariances is not None:
        return np.asarray(params.covariances, dtype=np.float64)
    return covariances_from_precision_cholesky(params.precisions_cholesky, params.covariance_type)


def _forms(params: GMMParams, pattern: np.ndarray, code: int) -> _Forms:
    """The pattern's forms, cached per parameter object alive (a pass shares it; with
    weights by pattern a pass has one parameter object per pattern)."""
    table = _FORMS.get(params, dict)
    forms = table.get(code)
    if forms is None:  # dict.setdefault is atomic: the blocks of a pass run in threads
        forms = table.setdefault(code, _make_forms(params, pattern))
    return forms


def _make_forms(params: GMMParams, pattern: np.ndarray) -> _Forms:
    K, D = params.means.shape
    ct = params.covariance_type
    cov = _covariances(params)
    if ct in ("diag", "spherical"):
        var = cov if ct == "diag" else np.repeat(np.reshape(cov, (K, 1)), D, axis=1)
        inv_sd = 1.0 / np.sqrt(var[:, pattern])
        whiten = inv_sd[:, :, None] * np.eye(int(pattern.sum()))[None]
        return _Forms(params, pattern, whiten, np.log(inv_sd).sum(axis=1))
    full = full_covariances(cov, ct, K, D)
    whiten, log_det = whitening(full[:1] if ct == "tied" else full, pattern)
    if ct == "tied":
        whiten, log_det = np.repeat(whiten, K, axis=0), np.repeat(log_det, K)
    return _Forms(params, pattern, whiten, log_det)


def _posterior(xo, params, pattern, forms, labels):
    """Log-norm (n,) and responsibilities (n, K) of rows ``xo`` observed on ``pattern``."""
    d = xo[None, :, :] - params.means[:, None, pattern]  # (K, n, o)
    y = np.matmul(d, np.transpose(forms.whiten, (0, 2, 1)))
    maha = np.einsum("kno,kno->nk", y, y)
    wlp = -0.5 * (xo.shape[1] * _LOG_2PI + maha) + forms.log_det + _log_weights(params.weights)
    log_norm, log_r = _normalise(wlp, _allowed_components(labels, params))
    with np.errstate(under="ignore"):
        r = np.exp(np.maximum(log_r, _LOG_RESP_FLOOR))
    r[log_r < _LOG_RESP_FLOOR] = 0.0
    return log_norm, r


def _filled(xo, cond, means, r, pattern) -> np.ndarray:
    """Rows with missing features replaced by the posterior-mixed conditional mean."""
    out = np.empty((xo.shape[0], pattern.shape[0]))
    out[:, pattern] = xo
    out[:, ~pattern] = np.einsum("nk,knm->nm", r, cond.mean(xo, means))
    return out


def partial_block_stats(
    X: np.ndarray,
    params: GMMParams,
    sample_weight: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    n_worst: int = 16,
    precision: str = "auto",
    rows: np.ndarray | None = None,
    codes: np.ndarray | None = None,
    pattern_params=None,
    counts: dict | None = None,
) -> GMMStats:
    """E-step and sufficient statistics of rows with some attributes missing.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        Non-finite values mark missing attributes. Rows with every attribute missing, or a
        non-finite sample weight, are excluded and counted in ``n_excluded``; rows with
        every attribute observed are handled like the others (this kernel is exact for them
        too, but slower than :func:`daskem.model.gmm.block_stats`).
    params : GMMParams
    sample_weight : ndarray of shape (n,), optional
    labels : ndarray of int, shape (n,), optional
        ``-1`` unlabelled, otherwise the row's class (responsibilities clamped).
    block_rows, precision
        As in :func:`daskem.model.gmm.block_stats`.
    rows : ndarray of int, optional
        Only these rows of ``X`` (default: all); ``sample_weight`` and ``labels`` are
        then still indexed like ``X``.
    codes : ndarray, optional
        :func:`pattern_codes` of ``X``'s rows, if already computed.
    n_worst : int
        Worst-explained rows kept (filled with their conditional means) for re-seeding.
    pattern_params : callable, optional
        Weights by pattern: ``pattern_params(pattern)`` gives the parameters of the rows
        observed on ``pattern`` (bool (D,); same emissions as ``params``, their own
        weights, one object per pattern for a pass).
    counts : dict, optional
        Filled with each pattern's responsibility mass: ``_pattern_key(pattern)`` ->
        ``sum_i w_i r_ik`` (K,), added to what is there.

    Returns
    -------
    GMMStats
        Moments of the filled rows plus the conditional covariances; ``loglik`` is the sum
        of ``w log p(x_o)``; ``n_partial`` counts the rows used.

    Notes
    -----
    Per pattern, the rows' observed features go through the complete-data kernel of
    :mod:`daskem.model.gmm` under the marginal mixture (its GEMMs, float32 sub-blocks and
    error bounds), and the moments of the filled rows follow from its statistics in
    closed form (module docstring). The per-pattern forms (marginal mixture and its
    kernel plan, conditionals) are computed once per parameter object and reused by every
    block of a pass.
    """
    X = np.asarray(X)
    n, D = X.shape
    K = params.n_components
    ct = params.covariance_type
    n_worst = max(n_worst, K)
    out = GMMStats.zeros(K, D, ct, n_worst)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w is not None and np.any(w < 0):
        raise ValueError("sample_weight must be non-negative; got negative weights")
    if codes is None:
        codes = finite_codes(X)
    if rows is None:
        rows = np.arange(n)
    sub = codes[rows]
    usable = sub != 0
    if w is not None:
        usable &= np.isfinite(w[rows])
    f32 = X.dtype == np.float32
    if f32 and w is not None and np.any((w > 0) & (w < _F32_MIN_WEIGHT)):
        f32 = False  # as the fast kernel decides for complete rows
    single = precision == "single" and f32
    means = np.asarray(params.means, dtype=np.float64)
    if ct in ("diag", "spherical"):  # features independent given k: no patterns needed
        row_lw, use = None, rows[usable]
        if pattern_params is not None or counts is not None:
            # rows sorted by pattern (a radix sort of small codes): a sub-block then
            # holds a few runs of one pattern each
            order = np.argsort(sub[usable], kind="stable")
            use = use[order]
            row_lw = _row_pattern_log_weights(X, use, sub[usable][order], params, pattern_params)
        out = _separable_stats(X, use, params, w, labels, n_worst, D, row_lw, counts)
        out.n_excluded = int(rows.size - usable.sum())
        out.n_empty = int((sub == 0).sum())
        return out
    lab_all = None if labels is None else np.asarray(labels)
    # the usable rows gathered once in block order (one sequential sweep), feature-major
    # and contiguous; then sorted by pattern (each pattern's rows a slice of ``use``), and
    # each pattern's rows, spread over the block, gathered from that smaller copy
    # (docs/performance.md trap 10)
    use, use_codes = rows[usable], sub[usable]
    packedT = np.ascontiguousarray(take_rows(X, use).T)  # (D, rows used)
    order = np.argsort(use_codes, kind="stable")
    use, use_codes = use[order], use_codes[order]
    starts = np.flatnonzero(np.r_[True, use_codes[1:] != use_codes[:-1]]) if use.size else []
    ends = np.r_[starts[1:], use.size] if use.size else []
    worst: list = []  # (scores, observed rows, pattern, forms) of each pattern
    for a, b in zip(starts, ends, strict=True):
        group = use[a:b]
        pattern = np.isfinite(X[group[0]])
        cols = np.flatnonzero(pattern)
        pp = params if pattern_params is None else pattern_params(pattern)
        forms = _forms(pp, pattern, int(use_codes[a]))
        xoT = np.empty((cols.size, group.size), dtype=X.dtype)
        for i, j in enumerate(cols):
            np.take(packedT[j], order[a:b], out=xoT[i], mode="clip")  # indices are valid
        wp = None if w is None else w[group]
        lab = None if lab_all is None else lab_all[group]
        if b - a < _PLAN_MIN_ROWS:
            st = _direct_stats(xoT, forms, wp, lab, n_worst)
        elif (plan := forms.plan(f32, single)) is None:
            st = _block_stats_reference(
                xoT.T, forms.marginal, wp, lab, block_rows=block_rows, n_worst=n_worst
            )
        else:
            st = _block_stats_fast(
                xoT.T, forms.marginal, plan, wp, lab, block_rows=block_rows, n_worst=n_worst
            )
        if counts is not None:
            key = _pattern_key(pattern)
            counts[key] = counts.get(key, 0.0) + np.asarray(st.n, dtype=np.float64)
        out = out + _fill_stats(st, forms, means, pattern, D)
        if st.worst_rows.shape[0]:
            worst.append((st.worst_score, st.worst_rows, pattern, forms))
    if worst:  # the lowest-scoring rows of all patterns, filled with conditional means
        scores = np.concatenate([w[0] for w in worst])
        which = np.repeat(np.arange(len(worst)), [len(w[0]) for w in worst])
        pos = np.concatenate([np.arange(len(w[0])) for w in worst])
        keep = np.argsort(scores, kind="stable")[:n_worst]
        rows_out = np.empty((keep.size, D))
        for j, i in enumerate(keep):
            _, xw, pattern, forms = worst[which[i]]
            x = np.asarray(xw[pos[i] : pos[i] + 1], dtype=np.float64)
            _, r = _posterior(x, forms.params, pattern, forms, None)
            rows_out[j] = _filled(x, forms.cond, means, r, pattern)[0]
        out.worst_score, out.worst_rows = scores[keep], rows_out
    out.n_excluded = int(rows.size - usable.sum())
    out.n_empty = int((sub == 0).sum())
    return out


def _responsibilities_inplace(e: np.ndarray, labels, params: GMMParams, f32: bool) -> np.ndarray:
    """Log-densities ``e`` (K, m) -> responsibilities in place (labelled rows clamped); returns
    ``log p(x)`` (m,).

    A component whose log-density is more than 80 below the row's best gets exactly 0
    (floored before ``exp``, so no subnormals, and masked out by a multiplication, not a
    branchy masked copy); its share would be below e^-80. ``f32``: exponentiate in float32
    (SIMD; float64 exp is scalar on AVX2), each responsibility to ~1e-7 relative, as the
    complete-data kernel does for float32 input.
    """
    if labels is not None:
        allowed = _allowed_components(labels, params)
        if allowed is not None:
            e[~allowed.T] = -np.inf
    top = e.max(axis=0)
    top[~np.isfinite(top)] = 0.0
    e -= top
    keep = e > _LOG_RESP_FLOOR
    np.maximum(e, _LOG_RESP_FLOOR, out=e)
    with np.errstate(under="ignore"):
        if f32:
            e32 = e.astype(np.float32)
            np.exp(e32, out=e32)
            e32 *= keep
            np.copyto(e, e32)
        else:
            np.exp(e, out=e)
            e *= keep
    total = e.sum(axis=0)
    with np.errstate(divide="ignore"):
        log_norm = np.log(total)
    log_norm += top
    e /= total
    return log_norm


def _row_pattern_log_weights(X, rows, codes, params, pattern_params):
    """Weights by pattern for ``rows`` sorted by pattern (``codes``: theirs): the
    patterns' log weights (K, P), the bounds of their runs of rows (P + 1 ints) and the
    patterns' keys (P)."""
    if not rows.size:
        return np.zeros((params.n_components, 0)), [0], []
    cuts = [0, *(np.flatnonzero(codes[1:] != codes[:-1]) + 1).tolist(), rows.size]
    keys, table = [], []
    for a in cuts[:-1]:
        pattern = np.isfinite(X[rows[a]])
        pp = params if pattern_params is None else pattern_params(pattern)
        keys.append(_pattern_key(pattern))
        table.append(_log_weights(np.asarray(pp.weights, dtype=np.float64)))
    return np.asarray(table).T.copy(), cuts, keys


def _separable_stats(
    X, rows, params: GMMParams, w, labels, n_worst: int, D: int, row_lw=None, counts=None
) -> GMMStats:
    """Statistics of partly observed rows under diagonal or spherical covariances.

    Features are independent given the component, so a row's log-density is a sum of
    per-feature terms over its observed features, and a missing feature's conditional
    moments are the component's own (``mu_kj``, ``mu_kj^2 + sigma_kj^2``). With the
    observation indicators ``o``, every component's log-density of every row is one GEMM
    of ``[1, o, o d, o d^2]`` (``d = x - c``, ``c`` the weighted centre of the means), and
    every statistic one more, whatever the rows' patterns (no grouping); float64, in
    sub-blocks of ``_DIRECT_ROWS`` rows. The worst-explained rows are picked once at the
    end, from every row's log-likelihood. With weights by pattern, ``row_lw`` is
    :func:`_row_pattern_log_weights`'s triple: each row's pattern's log weights replace
    the global ones, and ``counts`` gets each pattern's responsibility mass.
    """
    K = params.n_components
    means = np.asarray(params.means, dtype=np.float64)
    var = _covariances(params)
    var = var if params.covariance_type == "diag" else np.repeat(var.reshape(K, 1), D, axis=1)
    prec = 1.0 / var
    weights = np.asarray(params.weights, dtype=np.float64)
    live = weights > 0
    c = (weights[live, None] * means[live]).sum(axis=0) / weights[live].sum()
    delta = means - c
    coef = np.concatenate(
        [
            _log_weights(weights)[:, None],  # x 1
            -0.5 * prec * delta**2 + 0.5 * np.log(prec) - 0.5 * _LOG_2PI,  # x 1[observed]
            prec * delta,  # x d
            -0.5 * prec,  # x d^2
        ],
        axis=1,
    )  # (K, 1 + 3D)
    n = rows.size
    nb = max(1, min(n, _DIRECT_ROWS))
    if row_lw is not None:
        row_lw, cuts, pattern_keys = row_lw
        mass = np.zeros((K, len(pattern_keys)))
    G = np.zeros((K, 1 + 3 * D))
    log_norm = np.empty(n)
    phi = np.empty((1 + 3 * D, nb))
    phi[0] = 1.0
    e_buf = np.empty((K, nb))
    fin_buf = np.empty((D, nb), dtype=bool)
    nfin_buf = np.empty((D, nb), dtype=bool)
    lab_all = None if labels is None else np.asarray(labels)
    f32 = X.dtype == np.float32

    def features(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """phi of rows ``idx`` (in the buffer) and their observed mask."""
        m = idx.size
        ph, fin, nfin = phi[:, :m], fin_buf[:, :m], nfin_buf[:, :m]
        obs, d, d2 = ph[1 : 1 + D], ph[1 + D : 1 + 2 * D], ph[1 + 2 * D :]
        xb = take_rows(X, idx).T
        np.isfinite(xb, out=fin)
        np.copyto(obs, fin)
        np.copyto(d, xb)  # cast first: a mixed-type broadcast subtraction is slower
        d -= c[:, None]
        np.logical_not(fin, out=nfin)
        np.putmask(d, nfin, 0.0)
        np.multiply(d, d, out=d2)
        return ph, fin

    run = 0  # with weights by pattern: the run of the sub-block's first row
    for s in range(0, n, nb):
        stop = min(s + nb, n)
        idx = rows[s:stop]
        m = idx.size
        ph, _ = features(idx)
        e = e_buf[:, :m]
        runs = []  # (start, stop, pattern) of the runs in the sub-block, from its start
        if row_lw is not None:
            while cuts[run + 1] <= s:
                run += 1
            j = run
            while cuts[j] < stop:
                runs.append((max(cuts[j], s) - s, min(cuts[j + 1], stop) - s, j))
                j += 1
            # a sub-block of one pattern takes its log weights in the GEMM
            coef[:, 0] = row_lw[:, run] if len(runs) == 1 else 0.0
        np.matmul(coef, ph, out=e)  # (K, m) log-densities
        if len(runs) > 1:
            for a, b, j in runs:
                e[:, a:b] += row_lw[:, j, None]
        lab = None if lab_all is None else lab_all[idx]
        log_norm[s:stop] = _responsibilities_inplace(e, lab, params, f32)
        if w is not None:
            e *= w[idx]
        for a, b, j in runs:
            mass[:, j] += e[:, a:b].sum(axis=1)
        G += e @ ph.T
    if w is None:
        weight, count = float(n), n
        loglik = float(log_norm.sum())
        score = log_norm
    else:
        wb = w[rows]
        lw = wb * log_norm
        lw[wb == 0] = 0.0
        loglik, weight = float(lw.sum()), float(wb.sum())
        count = int(np.count_nonzero(wb > 0))
        score = np.where(wb > 0, log_norm, np.inf)
    worst_score, worst_rows = np.empty(0), np.empty((0, D))
    take = min(n_worst, count)
    if take:
        low = _lowest(score, take)
        low = low[score[low] < np.inf]
        idx = rows[low]
        ph, fin = features(idx)
        e = e_buf[:, : idx.size]
        if row_lw is not None:
            coef[:, 0] = 0.0  # rows of several patterns: each its own log weights
        np.matmul(coef, ph, out=e)
        if row_lw is not None:
            e += row_lw[:, np.searchsorted(cuts, low, side="right") - 1]
        _responsibilities_inplace(e, None if lab_all is None else lab_all[idx], params, f32)
        expected = e.T @ means  # missing values: their conditional mean
        filled = np.where(fin.T, np.asarray(take_rows(X, idx), dtype=np.float64), expected)
        worst_score, worst_rows = merge_lowest(worst_score, worst_rows, score[low], filled, n_worst)
    if row_lw is not None and counts is not None:
        for j, key in enumerate(pattern_keys):
            counts[key] = counts.get(key, 0.0) + mass[:, j]
    S0, N = G[:, 0], G[:, 1 : 1 + D]
    S1, S2 = G[:, 1 + D : 1 + 2 * D], G[:, 1 + 2 * D :]
    gone = S0[:, None] - N  # responsibility mass of the rows missing feature j
    S1 = S1 + gone * delta
    S2 = S2 + gone * (delta**2 + var)
    mean, m2 = _stats_from_shifted_sums(S0, S1, S2, c, means)
    return GMMStats(
        n=S0,
        mean=mean,
        m2=m2,
        loglik=loglik,
        weight=weight,
        count=count,
        n_partial=count,
        worst_score=worst_score,
        worst_rows=worst_rows,
        n_worst=max(n_worst, K),
    )


def _direct_stats(xoT, forms: _Forms, w, labels, n_worst: int) -> GMMStats:
    """Statistics over the observed features of rows of one pattern, without a kernel plan.

    ``xoT`` (o, n) holds the rows' observed features, feature-major. Rows are centred on
    the weighted centre ``c`` of the components' observed means (:class:`_Direct`, made
    once per pattern and parameter set); every component's log-density is then one
    float64 GEMM of the quadratic features ``phi = [1, d, d_i d_j (i <= j)]``
    (``d = x_o - c``) and every statistic one more GEMM of the responsibilities with
    ``phi``, in sub-blocks of ``_DIRECT_GROUP_ROWS`` rows that stay in cache. A component
    whose expanded form could lose more than 1e-9 to cancellation over a sub-block (far
    from ``c`` against its spread, bounded with the sub-block's largest ``|x - c|^2``)
    gets its log-density from the residual form ``|W_k (x_o - mu_k)|^2`` instead, in
    that sub-block only.
    """
    params = forms.params
    dr = forms.direct
    K, M = dr.coef.shape
    o = dr.c.size
    full, c, mu_o, const, coef, squares = dr.full, dr.c, dr.mu_o, dr.const, dr.coef, dr.squares
    err0, err1, err2 = dr.err
    iu, ju = _pairs(o, full)
    n = xoT.shape[1]
    G = np.zeros((K, M))
    log_norm = np.empty(n)
    nb = max(1, min(n, _DIRECT_GROUP_ROWS))
    phi_buf = np.empty((M, nb))
    phi_buf[0] = 1.0
    e_buf = np.empty((K, nb))
    f32 = xoT.dtype == np.float32
    for s in range(0, n, nb):
        m = min(n, s + nb) - s
        phi, e = phi_buf[:, :m], e_buf[:, :m]
        dT = phi[1 : 1 + o]
        np.subtract(xoT[:, s : s + m], c[:, None], out=dT)
        if full:  # d_i d_j (j >= i), row by row: no (pairs x m) temporaries
            at = 1 + o
            for i in range(o):
                np.multiply(dT[i], dT[i:], out=phi[at : at + o - i])
                at += o - i
        else:
            np.multiply(dT, dT, out=phi[1 + o :])
        np.matmul(coef, phi, out=e)  # (K, m) log-densities
        r2 = float(phi[squares].sum(axis=0).max())
        for k in np.flatnonzero(err0 + err1 * np.sqrt(r2) + err2 * r2 >= 1e-9):
            y = forms.whiten[k] @ (xoT[:, s : s + m] - mu_o[k][:, None])
            e[k] = const[k] - 0.5 * np.einsum("jm,jm->m", y, y)
        lab = None if labels is None else labels[s : s + m]
        log_norm[s : s + m] = _responsibilities_inplace(e, lab, params, f32)
        if w is not None:
            e *= w[s : s + m]
        G += e @ phi.T  # (K, M): S0, S1, S2 about c
    S0, S1, S2v = G[:, 0], G[:, 1 : 1 + o], G[:, 1 + o :]
    wp = np.ones(n) if w is None else w
    lw = wp * log_norm
    lw[wp == 0] = 0.0
    off = S1 / np.where(S0 > 0, S0, 1.0)[:, None]
    mean = np.where(S0[:, None] > 0, c + off, mu_o)
    if full:
        S2 = np.empty((K, o, o))
        S2[:, iu, ju] = S2v
        S2[:, ju, iu] = S2v
        m2 = S2 - S0[:, None, None] * (off[:, :, None] * off[:, None, :])
    else:
        m2 = S2v - S0[:, None] * off * off
    used = np.flatnonzero(wp > 0)
    take = min(n_worst, used.size)
    idx = used[np.argpartition(log_norm[used], take - 1)[:take]] if take else used
    return GMMStats(
        n=S0,
        mean=mean,
        m2=m2,
        loglik=float(lw.sum()),
        weight=float(wp.sum()),
        count=int(used.size),
        worst_score=log_norm[idx],
        worst_rows=np.asarray(xoT[:, idx].T, dtype=np.float64),
        n_worst=n_worst,
    )


def _fill_stats(st: GMMStats, forms: _Forms, means, pattern, D) -> GMMStats:
    """Statistics of a pattern's rows over its observed features -> over all features."""
    K = means.shape[0]
    cond = forms.cond
    A = cond.regression
    mis = ~pattern
    mean = np.empty((K, D))
    mean[:, pattern] = st.mean
    mean[:, mis] = means[:, mis] + np.einsum("kmo,ko->km", A, st.mean - means[:, pattern])
    S0 = st.n
    if st.m2.ndim == 3:
        moo = st.m2
        mom = np.matmul(A, moo)  # (K, m, o)
        mmm = np.matmul(mom, np.transpose(A, (0, 2, 1))) + S0[:, None, None] * cond.covariance
        o_idx, m_idx = np.flatnonzero(pattern), np.flatnonzero(mis)
        m2 = np.empty((K, D, D))
        m2[:, o_idx[:, None], o_idx] = moo
        m2[:, m_idx[:, None], o_idx] = mom
        m2[:, o_idx[:, None], m_idx] = np.transpose(mom, (0, 2, 1))
        m2[:, m_idx[:, None], m_idx] = mmm
    else:
        m2 = np.empty((K, D))
        m2[:, pattern] = st.m2
        m2[:, mis] = S0[:, None] * cond.variances()
    return GMMStats(
        n=S0,
        mean=mean,
        m2=m2,
        loglik=st.loglik,
        weight=st.weight,
        count=st.count,
        n_excluded=st.n_excluded,
        n_partial=st.count,
        worst_score=np.empty(0),  # filled for the block's worst rows by the caller
        worst_rows=np.empty((0, D)),
        n_worst=st.n_worst,
    )


def impute(
    X: np.ndarray, params: GMMParams, *, return_std: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Fill missing attributes with their conditional mean given the observed ones.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        Non-finite values mark missing attributes.
    params : GMMParams
    return_std : bool
        Also return the conditional standard deviation of each filled value.

    Returns
    -------
    filled : ndarray of shape (n, D), float64
        ``X`` with every missing value of a row with at least one observed attribute
        replaced by ``E[x_m | x_o]`` under the mixture (rows with nothing observed stay
        NaN).
    std : ndarray of shape (n, D), float64
        Only with ``return_std``: ``sqrt(Var[x_m | x_o])`` where a value was filled, 0 where
        it was observed, NaN where nothing was observed.
    """
    X = np.asarray(X)
    filled = np.array(X, dtype=np.float64)
    obs = np.isfinite(X)
    filled[~obs] = np.nan
    std = np.where(obs, 0.0, np.nan)
    partial = np.flatnonzero(obs.any(axis=1) & ~obs.all(axis=1))
    means = np.asarray(params.means, dtype=np.float64)
    table = _pattern_table(params)
    for pattern, rows, code in observed_patterns(obs[partial]):
        rows = partial[rows]
        forms = _forms(params, pattern, code)
        xo = filled[rows][:, pattern]
        _, r = _posterior(xo, _with_pattern_weights(params, pattern, table), pattern, forms, None)
        cm = forms.cond.mean(xo, means)  # (K, n, m)
        mean = np.einsum("nk,knm->nm", r, cm)
        mis = np.flatnonzero(~pattern)
        filled[np.ix_(rows, mis)] = mean
        if return_std:
            spread = (cm - mean[None]) ** 2 + forms.cond.variances()[:, None, :]
            std[np.ix_(rows, mis)] = np.sqrt(np.einsum("nk,knm->nm", r, spread))
    return (filled, std) if return_std else filled


def block_codes(X: np.ndarray) -> np.ndarray | None:
    """:func:`finite_codes` of a block, or None when every value in it is finite.

    A read-only block (the engine keeps its cached chunks read-only, and every pass sees
    them again) is assumed not to change while it lives: its answer is kept until it is
    freed, so a pass does not scan it again (a sum and the codes: about 15 % of a pass
    over a block with 8 features).
    """

    def scan() -> np.ndarray | None:
        with np.errstate(invalid="ignore", over="ignore"):
            return None if np.isfinite(np.sum(X)) else finite_codes(X)

    return scan() if X.flags.writeable else _CODES.get(X, scan)


def marginal_block_stats(
    X: np.ndarray,
    params: GMMParams,
    sample_weight: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    pattern_params=None,
    counts: dict | None = None,
    **kwargs,
) -> GMMStats:
    """:func:`daskem.model.gmm.block_stats` with missing attributes marginalised.

    Complete rows go through the fast kernel; rows with some attributes missing through
    :func:`partial_block_stats`; rows with none observed are excluded and counted. A block
    with no missing value costs one extra pass over it (a sum), unless it is read-only and
    was seen before (:func:`block_codes`).
    ``pattern_params`` and ``counts``: weights by pattern, as in
    :func:`partial_block_stats` (the complete rows are a pattern too).
    """
    X = np.asarray(X)
    every = np.ones(X.shape[1], dtype=bool)
    p_all = params if pattern_params is None else pattern_params(every)

    def complete_rows(*args, **kw) -> GMMStats:
        st = block_stats(X, p_all, *args, **kw, **kwargs)
        if counts is not None and st.count:
            key = _pattern_key(every)
            counts[key] = counts.get(key, 0.0) + np.asarray(st.n, dtype=np.float64)
        return st

    if X.shape[0] == 0:
        return complete_rows(sample_weight, labels)
    codes = block_codes(X)
    if codes is None:  # no missing value
        return complete_rows(sample_weight, labels)
    complete = codes == pattern_code(every)
    rows, keep = np.flatnonzero(~complete), np.flatnonzero(complete)
    w = None if sample_weight is None else np.asarray(sample_weight)
    lab = None if labels is None else np.asarray(labels)
    # the complete rows alone (the fast kernel would send non-finite rows to its slow
    # path), gathered by the kernel one sub-block at a time
    base = complete_rows(
        None if w is None else w[keep], None if lab is None else lab[keep], rows=keep
    )
    part = partial_block_stats(
        X,
        params,
        w,
        lab,
        rows=rows,
        codes=codes,
        pattern_params=pattern_params,
        counts=counts,
        **kwargs,
    )
    out = base + part
    out.n_excluded = base.n_excluded + part.n_excluded
    out.n_empty = part.n_empty
    return out


class MissingGMMModel(GMMModel):
    """The Gaussian mixture with missing attributes marginalised, for the EM engine.

    Same parameters, statistics and M-step as :class:`~daskem.model.gmm.GMMModel`; the
    E-step uses every row with at least one observed attribute, and the objective is the
    observed-data log-likelihood per unit of weight.
    """

    def _block_stats(self, params, X, sample_weight, labels) -> GMMStats:
        return marginal_block_stats(
            X,
            params,
            sample_weight,
            labels,
            block_rows=self.block_rows,
            precision=self.precision,
        )

    def check_stats(self, stats: GMMStats) -> None:  # rows with nothing observed may be left out
        return None


def resp_stats(
    X: np.ndarray, q: np.ndarray, gmm: GMMParams, w: np.ndarray | None, n_worst: int = 16
) -> GMMStats:
    """Mixture statistics of rows with given responsibilities ``q``, missing attributes
    through their conditional expectations (mean and covariance) per component."""
    X = np.asarray(X)
    n, D = X.shape
    K = gmm.n_components
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    obs = np.isfinite(X)
    complete = obs.all(axis=1)
    if complete.all():
        return _block_stats_reference(X, gmm, w, resp=q, n_worst=n_worst)
    out = _block_stats_reference(X[complete], gmm, w[complete], resp=q[complete], n_worst=n_worst)
    partial = np.flatnonzero(~complete & obs.any(axis=1))
    out.n_excluded = int(n - complete.sum() - partial.size)
    out.n_empty = out.n_excluded
    if not partial.size:
        return out
    ct = gmm.covariance_type
    full_like = out.m2.ndim == 3
    patterns, inverse = np.unique(obs[partial], axis=0, return_inverse=True)
    inverse = inverse.ravel()
    for j, pattern in enumerate(patterns):
        rows = partial[inverse == j]
        mis = ~pattern
        cond = conditional(gmm.covariances, ct, pattern, K)
        xo = X[np.ix_(rows, pattern)]
        S0 = np.zeros(K)
        mean = np.zeros((K, D))
        m2 = np.zeros((K, D, D)) if full_like else np.zeros((K, D))
        for k in range(K):
            r = w[rows] * q[rows, k]
            s0 = r.sum()
            if s0 <= 0:
                mean[k] = gmm.means[k]
                continue
            xk = np.empty((rows.size, D))
            xk[:, pattern] = xo
            xk[:, mis] = gmm.means[k, mis] + (xo - gmm.means[k, pattern]) @ cond.regression[k].T
            mk = r @ xk / s0
            d = xk - mk
            Ck = np.zeros((D, D))
            Ck[np.ix_(mis, mis)] = cond.covariance[k]
            S0[k], mean[k] = s0, mk
            if full_like:
                m2[k] = (d * r[:, None]).T @ d + s0 * Ck
            else:
                m2[k] = r @ (d * d) + s0 * np.diag(Ck)
        part = GMMStats(n=S0, mean=mean, m2=m2, n_worst=out.n_worst)
        part.worst_rows = np.empty((0, D))
        part.weight = float(w[rows].sum())
        part.count = int(rows.size)
        part.n_partial = int(rows.size)
        out = out + part
    return out


# ---- mixing weights by pattern of observed attributes --------------------------------
#
# Under ``pattern_weights=True`` (estimators) the mixing weights depend on the row's
# pattern of observed attributes: p(x_o | pattern m) = sum_k pi_{k|m} N(x_o | k). The
# emissions are shared, the pattern is an observed covariate, and pi_{k|m} is its own
# categorical per pattern (its M-step: the responsibility mass of k over the pattern's
# rows over their weight). This is the model of missing data whose missingness depends
# on the class: cloudy pixels of a scene come from the classes under the clouds, not in
# the scene's proportions. With one set of weights (:class:`MissingGMMModel`) the
# responsibilities of a partly observed row follow the global proportions and pull
# other classes' means towards it; per pattern they follow the pattern's own. Rows of
# each pattern share the E-step of :class:`MissingGMMModel` with the pattern's weights,
# so the objective (the observed-data log-likelihood given the patterns) never decreases.


def _pattern_key(pattern: np.ndarray) -> bytes:
    """Dictionary key of a pattern (bool (D,)): the same in every block and process."""
    return np.ascontiguousarray(pattern, dtype=bool).tobytes()


def _pattern_table(params: GMMParams) -> dict[bytes, np.ndarray]:
    if params.pattern_weights is None:
        return {}
    patterns, weights = params.pattern_weights
    return {_pattern_key(p): w for p, w in zip(patterns, weights, strict=True)}


_PATTERN_PARAMS = ObjectCache()  # params -> {pattern key: its params}


def _with_pattern_weights(params: GMMParams, pattern: np.ndarray, table: dict) -> GMMParams:
    """``params`` with the weights of rows observed on ``pattern`` (and no table): one
    object per pattern and parameter object alive, so that every block of a pass shares
    it and its cached forms and kernel plans."""
    if params.pattern_weights is None:
        return params
    cached = _PATTERN_PARAMS.get(params, dict)
    key = _pattern_key(pattern)
    out = cached.get(key)
    if out is None:
        w = table.get(key, params.weights)
        made = replace(params, weights=np.asarray(w, dtype=np.float64), pattern_weights=None)
        out = cached.setdefault(key, made)
    return out


def row_log_weights(X: np.ndarray, params: GMMParams) -> np.ndarray:
    """Log mixing weights of each row of ``X`` (n, K): its pattern's if
    ``params.pattern_weights`` has it, else ``log(params.weights)``."""
    X = np.asarray(X)
    table = _pattern_table(params)
    out = np.empty((X.shape[0], params.n_components))
    out[:] = _log_weights(np.asarray(params.weights, dtype=np.float64))
    if not table or X.shape[0] == 0:
        return out
    obs = np.isfinite(X)
    for pattern, rows, _ in observed_patterns(obs, finite_codes(X)):
        w = table.get(_pattern_key(pattern))
        if w is not None:
            out[rows] = _log_weights(np.asarray(w, dtype=np.float64))
    return out


#: a pattern gets weights of its own when its rows weigh at least this many times the
#: number of components (fewer rows leave its K - 1 weights poorly determined: its rows
#: take the global weights)
MIN_PATTERN_WEIGHT_PER_COMPONENT = 10.0


class PatternGMMModel(MissingGMMModel):
    """:class:`MissingGMMModel` with mixing weights by pattern of observed attributes.

    The parameters carry ``pattern_weights`` (:class:`~daskem.model.gmm.GMMParams`)
    after the first M-step; before it (a start) every pattern takes the global weights.
    The statistics carry each pattern's responsibility mass (``GMMStats.pattern_n``);
    the global weights stay the components' share of all rows. Patterns whose rows
    weigh less than :data:`MIN_PATTERN_WEIGHT_PER_COMPONENT` times the number of
    components keep the global weights (a rule on the data alone, the same at every
    iteration: EM stays monotone).
    """

    def _block_stats(self, params, X, sample_weight, labels) -> GMMStats:
        table = _pattern_table(params)
        counts: dict[bytes, np.ndarray] = {}
        out = marginal_block_stats(
            X,
            params,
            sample_weight,
            labels,
            pattern_params=lambda pattern: _with_pattern_weights(params, pattern, table),
            counts=counts,
            block_rows=self.block_rows,
            precision=self.precision,
        )
        out.pattern_n = counts
        return out

    def m_step(self, stats: GMMStats, params: GMMParams) -> tuple[GMMParams, list[dict]]:
        new, events = super().m_step(stats, params)
        if events or not stats.pattern_n or len(stats.pattern_n) == 1:
            # a re-seeded component has no share in any pattern yet: one E-step with the
            # global weights gives it one; and rows of one pattern only (a complete
            # stack) have the global weights (the fit is the plain one, bit for bit)
            return replace(new, pattern_weights=None), events
        keys = sorted(stats.pattern_n)
        mass = np.stack([np.asarray(stats.pattern_n[k], dtype=np.float64) for k in keys])
        total = mass.sum(axis=1)  # the rows' weight: the same at every iteration
        # (the responsibilities of a row sum to 1 up to rounding: a pattern of exactly the
        # threshold's weight must not drop out by 1e-15)
        keep = total >= MIN_PATTERN_WEIGHT_PER_COMPONENT * params.n_components * (1 - 1e-9)
        if not keep.any():
            return replace(new, pattern_weights=None), events
        patterns = np.stack([np.frombuffer(k, dtype=bool) for k in keys])[keep]
        # a component with no mass in a pattern keeps the E-step's floor of a
        # responsibility there (its log stays finite in the kernels' GEMMs)
        weights = np.maximum(mass[keep] / total[keep, None], np.exp(_LOG_RESP_FLOOR))
        weights /= weights.sum(axis=1, keepdims=True)
        return replace(new, pattern_weights=(patterns, weights)), events

    def params_to_dict(self, params: GMMParams) -> dict:
        d = super().params_to_dict(params)
        if params.pattern_weights is not None:
            patterns, weights = params.pattern_weights
            d["patterns"] = np.asarray(patterns, dtype=bool).tolist()
            d["pattern_weights"] = np.asarray(weights, dtype=np.float64).tolist()
        return d

    def params_from_dict(self, d: dict) -> GMMParams:
        params = super().params_from_dict(d)
        if d.get("patterns") is None:
            return params
        patterns = np.asarray(d["patterns"], dtype=bool)
        weights = np.asarray(d["pattern_weights"], dtype=np.float64)
        return replace(params, pattern_weights=(patterns, weights))

    def n_parameters(self, params: GMMParams) -> int:
        """The mixture's parameters with ``K - 1`` free weights per pattern instead of
        ``K - 1`` in all."""
        n = super().n_parameters(params)
        if params.pattern_weights is None:
            return n
        K = params.n_components
        return n + (len(params.pattern_weights[0]) - 1) * (K - 1)

    def from_vector(self, vector: np.ndarray, like: GMMParams) -> GMMParams | None:
        """SQUAREM moves the shared parameters; the patterns' weights stay ``like``'s."""
        out = super().from_vector(vector, like)
        if out is None or like.pattern_weights is None:
            return out
        return replace(out, pattern_weights=like.pattern_weights)
