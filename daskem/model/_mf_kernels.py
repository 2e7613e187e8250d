"""Compiled loops of the mean-field kernel on 2-D grids (:mod:`daskem.model.spatial`).

The NumPy kernel of :mod:`~daskem.model.spatial` makes a few element-wise passes over
K planes per step (``docs/performance.md``, trap 11); these loops do a row of a
sub-lattice at a time instead, every per-pixel step of a row in one compiled function,
with the same data layout (each parity sub-lattice class-major with a zero border,
stacked along a leading axis) and the same arithmetic per pixel: neighbour sums in
the order of the neighbour table, then the classes in order. Per-pixel values are
computed without ``fastmath``, so a pixel's value does not depend on the row, strip or
chunk it is computed in (vectorised and scalar iterations round alike); only the sums
over pixels of the statistics (float64, :func:`_dot`, :func:`_sum`) are compiled with
``fastmath``, so that they vectorise (their grouping depends on the block anyway).

``exp`` of float32 values is the classic Cody-Waite range reduction with a degree-6
polynomial (Cephes' ``expf`` coefficients, relative error ~1e-7), written so that the
compiler vectorises it; float64 values use the C library's ``exp``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .spatial import _HASH_MULT, _SPLITMIX, _STREAM

__all__ = [
    "drawn_field_2d",
    "emission_sums_2d",
    "log_gauss_diag",
    "log_gauss_full",
    "start_from_g",
    "start_rows",
    "stats_2d",
    "sweep_2d",
]

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4


@njit(inline="always")
def _exp_parts(v):
    """``exp(v)`` of a float32 as ``(p, bits)``: ``p`` times the float32 whose bits are
    ``bits`` (``2 ** n``); ``p`` is 0 where ``exp(v)`` underflows (``v = -inf`` too)."""
    lo = np.float32(-87.0)
    small = v < lo
    # exp(v) rounds to 1 for |v| < 2**-25: v = 0 gives the same value without the tiny
    # products of the polynomial (subnormal operands and results are slow on x86)
    v = np.float32(0.0) if abs(v) < np.float32(2.0**-25) else v  # NaN stays NaN
    v = min(max(v, lo), np.float32(88.0))
    n = np.floor(v * np.float32(_LOG2E) + np.float32(0.5))
    r = v - n * np.float32(_LN2_HI)
    r = r - n * np.float32(_LN2_LO)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return (np.float32(0.0) if small else p), (np.int32(n) + np.int32(127)) << np.int32(23)


@njit(nogil=True, cache=True)
def _exp_rows(E, I, w):  # noqa: E741
    """``E[k, :w] = exp(E[k, :w])`` in place (``I`` an int32 scratch of E's shape)."""
    K = E.shape[0]
    if E.itemsize == 8:
        for k in range(K):
            e = E[k]
            for x in range(w):
                e[x] = math.exp(e[x])
        return
    for k in range(K):
        e = E[k]
        ik = I[k]
        for x in range(w):
            e[x], ik[x] = _exp_parts(e[x])
        scale = ik.view(np.float32)
        for x in range(w):
            e[x] *= scale[x]


@njit(nogil=True, cache=True)
def _neighbour_sums(Q, nb, r, x0, w, N):
    """``N[c, x]`` = the sum over the neighbours of pixel ``(r, x0 + x)``, ``x < w``, of
    their class ``c``, in the order of the table ``nb`` (4 or 8 entries: sub-lattice,
    row shift, column shift); one pass per class (a loop per neighbour would store and
    reload the partial sums)."""
    C = N.shape[0]
    if nb.shape[0] == 4:
        for c in range(C):
            a0 = Q[nb[0, 0], c, 1 + r + nb[0, 1], 1 + x0 + nb[0, 2] :]
            a1 = Q[nb[1, 0], c, 1 + r + nb[1, 1], 1 + x0 + nb[1, 2] :]
            a2 = Q[nb[2, 0], c, 1 + r + nb[2, 1], 1 + x0 + nb[2, 2] :]
            a3 = Q[nb[3, 0], c, 1 + r + nb[3, 1], 1 + x0 + nb[3, 2] :]
            nc = N[c]
            for x in range(w):
                nc[x] = a0[x] + a1[x] + a2[x] + a3[x]
        return
    for c in range(C):
        a0 = Q[nb[0, 0], c, 1 + r + nb[0, 1], 1 + x0 + nb[0, 2] :]
        a1 = Q[nb[1, 0], c, 1 + r + nb[1, 1], 1 + x0 + nb[1, 2] :]
        a2 = Q[nb[2, 0], c, 1 + r + nb[2, 1], 1 + x0 + nb[2, 2] :]
        a3 = Q[nb[3, 0], c, 1 + r + nb[3, 1], 1 + x0 + nb[3, 2] :]
        a4 = Q[nb[4, 0], c, 1 + r + nb[4, 1], 1 + x0 + nb[4, 2] :]
        a5 = Q[nb[5, 0], c, 1 + r + nb[5, 1], 1 + x0 + nb[5, 2] :]
        a6 = Q[nb[6, 0], c, 1 + r + nb[6, 1], 1 + x0 + nb[6, 2] :]
        a7 = Q[nb[7, 0], c, 1 + r + nb[7, 1], 1 + x0 + nb[7, 2] :]
        nc = N[c]
        for x in range(w):
            nc[x] = (
                a0[x] + a1[x] + a2[x] + a3[x]
                + a4[x] + a5[x] + a6[x] + a7[x]
            )  # fmt: skip


@njit(nogil=True, cache=True)
def _row_sum(E, w, S):
    """``S[x] = sum_k E[k, x]`` over ``x < w``, the components in order."""
    e0 = E[0]
    for x in range(w):
        S[x] = e0[x]
    for k in range(1, E.shape[0]):
        ek = E[k]
        for x in range(w):
            S[x] += ek[x]


@njit(nogil=True, cache=True)
def _normalise_store(E, S, act, j, r, w, cc, Q, q, inv):
    """``q`` of row ``r`` of sub-lattice ``j`` = ``E / S`` (times ``act`` if not empty),
    into ``q`` (if not empty) and its class sums into ``Q``; ``inv`` a scratch row.
    Probabilities below the square root of the dtype's smallest normal number are set to
    0 (as :func:`daskem.model.spatial._floor_q`)."""
    one = Q.dtype.type(1.0)
    floor = Q.dtype.type(np.sqrt(np.finfo(Q.dtype).tiny))  # as spatial._floor_q
    zero = Q.dtype.type(0.0)
    if act.shape[0] > 0:
        a = act[j, r]
        for x in range(w):
            inv[x] = a[x] / S[x]
    else:
        for x in range(w):
            inv[x] = one / S[x]
    if q.shape[0] > 0:
        for c in range(Q.shape[1]):
            qc = Q[j, c, 1 + r, 1 : 1 + w]
            for x in range(w):
                qc[x] = 0.0
        for k in range(E.shape[0]):
            qk = q[j, k, r]
            qc = Q[j, cc[k], 1 + r, 1 : 1 + w]
            ek = E[k]
            for x in range(w):
                v = ek[x] * inv[x]
                v = v if v >= floor else zero
                qk[x] = v
                qc[x] += v
    else:
        for k in range(E.shape[0]):
            qc = Q[j, k, 1 + r, 1 : 1 + w]
            ek = E[k]
            for x in range(w):
                v = ek[x] * inv[x]
                qc[x] = v if v >= floor else zero


@njit(nogil=True, cache=True)
def _prior_normaliser(N, bt, b, w, E, I, den):  # noqa: E741
    """``E[c] = exp(beta N[c])`` and ``den = sum_c b_c E[c]`` (classes in order) of a
    row of neighbour sums."""
    C = N.shape[0]
    for c in range(C):
        nc = N[c]
        ec = E[c]
        for x in range(w):
            ec[x] = bt * nc[x]
    _exp_rows(E[:C], I[:C], w)
    _class_weighted_sum(b, E, C, w, den)


@njit(nogil=True, cache=True)
def _class_weighted_sum(b, E, C, w, den):
    """``den = sum_c b_c E[c]`` over the first ``w`` pixels, the classes in order."""
    for x in range(w):
        den[x] = b[0] * E[0, x]
    for c in range(1, C):
        bc = b[c]
        ec = E[c]
        for x in range(w):
            den[x] += bc * ec[x]


@njit(nogil=True, cache=True)
def _count_exp_table(b, n_max):
    """``exp(b * n)`` for the neighbour counts ``n = 0 .. n_max`` of a drawn field (``b``
    in the work dtype), computed as :func:`_exp_rows` computes ``exp(b * N)`` of each
    pixel's counts, so a look-up gives the same value."""
    t = np.empty((1, n_max + 1), dtype=type(b))
    for n in range(n_max + 1):
        t[0, n] = b * type(b)(n)
    _exp_rows(t, np.empty((1, n_max + 1), dtype=np.int32), n_max + 1)
    return t[0]


@njit(nogil=True, cache=True)
def _count_exps(N, tab, w, E):
    """``E[c, x] = exp(beta N[c, x])`` of a row of neighbour counts (whole numbers: the
    drawn field is one-hot) by the table of :func:`_count_exp_table`."""
    for c in range(N.shape[0]):
        nc = N[c]
        ec = E[c]
        for x in range(w):
            ec[x] = tab[np.int64(nc[x])]


@njit(nogil=True, cache=True)
def sweep_2d(Q, G, act, lnS, qN, q, cc, nbr, counts, beta, sweeps, log_route, E, I, N, S, inv):  # noqa: E741,E501
    """``sweeps`` colour sweeps of the mean-field update over a 2-D block.

    Parameters
    ----------
    Q : (J, C, hmax + 2, wmax + 2)
        Class probabilities of each sub-lattice (in colour order), zero-bordered.
    G : (J, K, hmax, wmax)
        ``exp(L - max L)`` (``L - max L`` on the log route) of the pixel-wise logits.
    act : (J, hmax, wmax) or (0, 0, 0)
        1 for the pixels of the field, 0 for the others; empty: all are.
    lnS, qN : (J, hmax, wmax)
        Set on the last sweep: the log normaliser of each pixel's update and
        ``sum_c Q_c N_c`` of its class probabilities and neighbour sums.
    q : (J, K, hmax, wmax) or (0, 0, 0, 0)
        Component probabilities when components and classes differ (``cc`` maps each
        component to its class); empty: component ``k`` is class ``k``.
    nbr : (J, n, 3) int64
        Per sub-lattice, its neighbours: sub-lattice and (row, column) shift.
    counts : (J, 2) int64
        Each sub-lattice's shape.
    E, I, N, S, inv : scratch rows, (K, wmax) float, (K, wmax) int32, (C, wmax) float,
        (wmax,), (wmax,)
    """
    J = Q.shape[0]
    b = Q.dtype.type(beta)
    # stage i = (sweep i // J, sub-lattice i % J), by bands of rows (_band_rows)
    n_stages = sweeps * J
    lag, n_bands = _band_schedule(nbr, counts, n_stages)
    for band in range(n_bands):
        for i in range(n_stages):
            j = i % J
            r0, r1 = _band_rows(band, i, lag, counts[j, 0])
            for r in range(r0, r1):
                _sweep_row(
                    Q, G, act, lnS, qN, q, cc, nbr, j, r, counts[j, 1], b,
                    i // J == sweeps - 1, log_route, E, I, N, S, inv,
                )  # fmt: skip


@njit(nogil=True, cache=True)
def _band_schedule(nbr, counts, n_stages):
    """The row lag and number of bands of a sweep of ``n_stages`` stages by bands of
    rows (:func:`_band_rows`)."""
    H = 0
    lag = 1  # the farthest neighbour's row shift (1: the rows r - 1 .. r + 1)
    for j in range(counts.shape[0]):
        H = max(H, counts[j, 0])
        for n in range(nbr.shape[1]):
            lag = max(lag, abs(nbr[j, n, 1]))
    if n_stages == 0:
        return lag, 0
    return lag, -(-(H + (n_stages - 1) * lag) // _SWEEP_BAND)


@njit(inline="always")
def _band_rows(band, i, lag, h):
    """Rows ``r0 .. r1`` of stage ``i`` (of ``h`` rows) in band ``band``.

    Stages (a sub-lattice's update, in the order of a plain loop over stages and rows)
    run band after band of _SWEEP_BAND rows, stage i ``lag`` rows behind stage i - 1. A
    row's neighbours lie in the rows r - lag .. r + lag of the other sub-lattices, so
    every stage before i has updated them and no stage after it has: each row sees what
    the plain loop gives it (the same values, bit for bit), while the rows in use stay
    in the cache."""
    end = (band + 1) * _SWEEP_BAND - i * lag
    return max(0, end - _SWEEP_BAND), min(h, end)


# rows per band of sweep_2d's schedule: the rows in use (about sweeps * J + band rows of
# each plane) stay in the L2 cache; a 1,000 x 1,000 block, K = 8, float32, 3 sweeps:
# 56-60 ms, against 83 ms for the plain loop, which streams every plane through the
# cache for each sub-lattice of each sweep
_SWEEP_BAND = 16


@njit(nogil=True, cache=True, inline="always")
def _sweep_row(Q, G, act, lnS, qN, q, cc, nbr, j, r, w, b, last, log_route, E, I, N, S, inv):  # noqa: E741,E501
    """The mean-field update of row ``r`` of sub-lattice ``j`` (``w`` pixels), as
    :func:`sweep_2d` describes it (``last``: the sweep that sets ``lnS`` and ``qN``)."""
    C = Q.shape[1]
    K = G.shape[1]
    groups = q.shape[0] > 0
    tiny = Q.dtype.type(1e-30)
    _neighbour_sums(Q, nbr[j], r, 0, w, N)
    # unnormalised q of the row's components, and their sum S
    if log_route:  # q ∝ exp(L - max L + beta N - top), top the row's max
        for k in range(K):
            nk = N[cc[k]] if groups else N[k]
            g = G[j, k, r]
            ek = E[k]
            for x in range(w):
                ek[x] = g[x] + b * nk[x]
        e0 = E[0]
        for x in range(w):
            S[x] = e0[x]
        for k in range(1, K):
            ek = E[k]
            for x in range(w):
                S[x] = max(S[x], ek[x])
        for k in range(K):
            ek = E[k]
            for x in range(w):
                ek[x] -= S[x]
        if last:
            ln = lnS[j, r]
            for x in range(w):
                ln[x] = S[x]
        _exp_rows(E, I, w)
        _row_sum(E, w, S)
    elif E.itemsize == 8:  # q ∝ exp(L - max L) exp(beta N)
        for k in range(K):
            nk = N[cc[k]] if groups else N[k]
            g = G[j, k, r]
            ek = E[k]
            for x in range(w):
                ek[x] = math.exp(b * nk[x]) * g[x]
        _row_sum(E, w, S)
    else:
        for k in range(K):
            nk = N[cc[k]] if groups else N[k]
            ek = E[k]
            ik = I[k]
            for x in range(w):
                ek[x], ik[x] = _exp_parts(b * nk[x])
        for k in range(K):
            g = G[j, k, r]
            ek = E[k]
            scale = I[k].view(np.float32)
            if k == 0:
                for x in range(w):
                    v = ek[x] * scale[x]
                    v = v * g[x]
                    ek[x] = v
                    S[x] = v
            else:
                for x in range(w):
                    v = ek[x] * scale[x]
                    v = v * g[x]
                    ek[x] = v
                    S[x] += v
    for x in range(w):
        S[x] = max(S[x], tiny)
    if last:
        ln = lnS[j, r]
        if log_route:
            for x in range(w):
                ln[x] += math.log(S[x])
        else:
            for x in range(w):
                ln[x] = math.log(S[x])
    _normalise_store(E, S, act, j, r, w, cc, Q, q, inv)
    if last:
        out = qN[j, r]
        qc = Q[j, 0, 1 + r, 1 : 1 + w]
        nc = N[0]
        for x in range(w):
            out[x] = qc[x] * nc[x]
        for c in range(1, C):
            qc = Q[j, c, 1 + r, 1 : 1 + w]
            nc = N[c]
            for x in range(w):
                out[x] += qc[x] * nc[x]


# the constants of daskem.model.spatial.pixel_uniforms, whose NumPy twin this is
_M0, _M1 = (np.uint64(m) for m in _HASH_MULT[:2])
_S0 = np.uint64(0)  # the drawn field's stream (0)
_S1 = np.uint64(_STREAM)  # the simulated field's stream (1)
_F0, _F1 = (np.uint64(m) for m in _SPLITMIX)


@njit(nogil=True, cache=True)
def _uniform(g0, g1, h0):
    """``daskem.model.spatial.pixel_uniforms`` of the pixel at global index (g0, g1)
    (``h0``: the stream's start, ``stream * _STREAM``)."""
    h = np.uint64(h0)
    h ^= (np.uint64(g0) + np.uint64(1)) * _M0
    h = (h << np.uint64(31)) | (h >> np.uint64(33))
    h ^= (np.uint64(g1) + np.uint64(1)) * _M1
    h = (h << np.uint64(31)) | (h >> np.uint64(33))
    h ^= h >> np.uint64(30)
    h *= _F0
    h ^= h >> np.uint64(27)
    h *= _F1
    h ^= h >> np.uint64(31)
    return np.float64(h >> np.uint64(11)) * 2.0**-53


@njit(inline="always")
def _one_hot_row(Z, j, r, w, pick, act, has_act):
    """Row ``r`` of sub-lattice ``j`` of the one-hot field ``Z`` (bordered) set to the
    classes ``pick`` of its ``w`` pixels; inactive pixels (``act`` 0) take none."""
    for c in range(Z.shape[1]):
        zc = Z[j, c, 1 + r, 1:]
        for x in range(w):
            zc[x] = 0.0
    for x in range(w):
        if has_act and act[j, r, x] == 0:
            continue
        Z[j, pick[x], 1 + r, 1 + x] = 1.0


@njit(nogil=True, cache=True)
def drawn_field_2d(Q, act, counts, starts, origin, Z):
    """One draw ``Z`` (one-hot, bordered like ``Q``, its border and padding zero on
    entry; every pixel is written) of the class field from ``Q`` by each pixel's fixed
    uniform: the first class whose cumulative probability reaches it, the last if
    rounding leaves every one below (the cumulative sums never decrease, so that class
    is the number of classes below it); inactive pixels (``act`` 0) draw nothing."""
    J = Q.shape[0]
    C = Q.shape[1]
    has_act = act.shape[0] > 0
    W = Q.shape[3]
    u = np.empty(W)
    cum = np.empty(W, dtype=Q.dtype)
    pick = np.empty(W, dtype=np.int64)
    for j in range(J):
        w = counts[j, 1]
        for r in range(counts[j, 0]):
            g0 = origin[0] + starts[j, 0] + 2 * r
            g1 = origin[1] + starts[j, 1]
            for x in range(w):
                u[x] = _uniform(g0, g1 + 2 * x, _S0)
                cum[x] = 0.0
                pick[x] = 0
            for c in range(C - 1):
                qc = Q[j, c, 1 + r, 1:]
                for x in range(w):
                    cum[x] += qc[x]
                    pick[x] += cum[x] < u[x]
            _one_hot_row(Z, j, r, w, pick, act, has_act)


@njit(nogil=True, cache=True)
def _conditional_row(Z, G, j, r, x0, nbr, w, cc, groups, beta, log_route, E, I, N, S, tab):  # noqa: E741,E501
    """The posterior conditionals of pixels ``x0 .. x0 + w`` of row ``r`` of sub-lattice
    ``j`` given the field ``Z`` of the neighbours: ``E[k] ∝ G_k exp(beta N_class(k))``
    (``G`` as in :func:`sweep_2d`; on the log route the max is taken out first) and
    their sum ``S``, unnormalised; ``N`` a scratch (C, >= w); ``tab`` the table of
    :func:`_count_exp_table` (not used on the log route)."""
    K = G.shape[1]
    b = Z.dtype.type(beta)
    _neighbour_sums(Z, nbr[j], r, x0, w, N)
    if log_route:
        for k in range(K):
            nk = N[cc[k]] if groups else N[k]
            g = G[j, k, r, x0:]
            ek = E[k]
            for x in range(w):
                ek[x] = g[x] + b * nk[x]
        for x in range(w):
            S[x] = E[0, x]
        for k in range(1, K):
            for x in range(w):
                S[x] = max(S[x], E[k, x])
        for k in range(K):
            for x in range(w):
                E[k, x] -= S[x]
        _exp_rows(E, I, w)
    else:
        _count_exps(N, tab, w, N)  # N now holds exp(beta N)
        for k in range(K):
            nk = N[cc[k]] if groups else N[k]
            g = G[j, k, r, x0:]
            ek = E[k]
            for x in range(w):
                ek[x] = g[x] * nk[x]
    _row_sum(E, w, S)


@njit(nogil=True, cache=True)
def simulated_field_2d(Z, G, act, cc, groups, nbr, counts, starts, origin, beta, log_route):
    """One colour sweep of the simulated field (Celeux, Forbes & Peyrard 2003) over the
    drawn field ``Z`` (one-hot, bordered): each pixel, colour after colour, draws its
    class from its posterior conditional given its neighbours' current classes,
    ``∝ sum_{k in c} G_k exp(beta N_c)``, by its fixed uniform of stream 1; inactive
    pixels keep no class."""
    J = Z.shape[0]
    C = Z.shape[1]
    K = G.shape[1]
    has_act = act.shape[0] > 0
    W = Z.shape[3]
    E = np.empty((K, W), dtype=Z.dtype)
    I = np.empty((max(K, C), W), dtype=np.int32)  # noqa: E741
    N = np.empty((C, W), dtype=Z.dtype)
    S = np.empty(W, dtype=Z.dtype)
    u = np.empty(W, dtype=Z.dtype)
    cum = np.empty(W, dtype=Z.dtype)
    pick = np.empty(W, dtype=np.int64)
    tab = _count_exp_table(Z.dtype.type(beta), nbr.shape[1])
    lag, n_bands = _band_schedule(nbr, counts, J)
    for band in range(n_bands):  # the sub-lattices by bands of rows, as sweep_2d
        for j in range(J):
            r0, r1 = _band_rows(band, j, lag, counts[j, 0])
            for r in range(r0, r1):
                _simulated_row(
                    Z, G, act, cc, groups, nbr, counts[j, 1], starts, origin, beta, log_route,
                    j, r, has_act, E, I, N, S, u, cum, pick, tab,
                )  # fmt: skip


@njit(nogil=True, cache=True, inline="always")
def _simulated_row(
    Z, G, act, cc, groups, nbr, w, starts, origin, beta, log_route, j, r, has_act, E, I, N, S,  # noqa: E741
    u, cum, pick, tab,
):  # fmt: skip
    """Row ``r`` of sub-lattice ``j`` (``w`` pixels) of :func:`simulated_field_2d`."""
    C = Z.shape[1]
    K = G.shape[1]
    _conditional_row(Z, G, j, r, 0, nbr, w, cc, groups, beta, log_route, E, I, N, S, tab)
    g0 = origin[0] + starts[j, 0] + 2 * r
    g1 = origin[1] + starts[j, 1]
    for x in range(w):
        u[x] = _uniform(g0, g1 + 2 * x, _S1) * S[x]
        cum[x] = 0.0
        pick[x] = 0
    for c in range(C - 1):
        for x in range(w):
            N[c, x] = 0.0
        for k in range(K):
            if (cc[k] if groups else k) == c:
                for x in range(w):
                    N[c, x] += E[k, x]
        for x in range(w):
            cum[x] += N[c, x]
            pick[x] += cum[x] < u[x]
    _one_hot_row(Z, j, r, w, pick, act, has_act)


@njit(nogil=True, cache=True, fastmath=True)
def _dot(u, v, n):
    """``sum_x u[x] v[x]`` over ``x < n`` in float64, vectorised (a sum over pixels: its
    grouping may differ by block anyway; no per-pixel value is computed here)."""
    t = 0.0
    for x in range(n):
        t += u[x] * v[x]
    return t


@njit(nogil=True, cache=True, fastmath=True)
def _sum(u, n):
    t = 0.0
    for x in range(n):
        t += u[x]
    return t


@njit(nogil=True, cache=True)
def _prior_softmax(N, alpha, beta, cc, groups, w, lg, tops, tots):
    """The prior's softmax on the log-sum-exp route (float64): ``lg[k, x] = exp(alpha_k +
    beta N[class k, x] - tops[x])`` with ``tops`` the pixel's largest logit and ``tots``
    the sum of ``lg`` over the components (in order)."""
    K = alpha.shape[0]
    for x in range(w):
        top = -np.inf
        for k in range(K):
            v = alpha[k] + beta * np.float64(N[cc[k] if groups else k, x])
            lg[k, x] = v
            top = max(top, v)
        t = 0.0
        for k in range(K):
            lg[k, x] = math.exp(lg[k, x] - top)
            t += lg[k, x]
        tops[x] = top
        tots[x] = t


@njit(inline="always")
def _core_row_weights(w, starts, j, r, x0, n, wr):
    """``wr`` = the weights of pixels ``x0 .. x0 + n`` of row ``r`` of sub-lattice ``j``
    (``w`` grid-shaped); returns the row's grid row and its first pixel's column."""
    row = starts[j, 0] + 2 * r
    c0 = starts[j, 1] + 2 * x0
    for x in range(n):
        wr[x] = w[row, c0 + 2 * x]
    return row, c0


@njit(nogil=True, cache=True)
def stats_2d(
    Q, q, cc, Z, G, maxL, lnS, qN, w, act, nbr, counts, starts, core, alpha, a, b, amax,
    beta, log_route, need_pl, estimate_beta, alpha_terms, g, H,
):  # fmt: skip
    """The prior's statistics of a block's core from its swept field: returns the summed
    weighted local free energy and weight, and adds the pseudo-likelihood's gradient and
    Hessian in ``(alpha, beta)`` to ``g`` (K + 1) and ``H`` (K + 1, K + 1) (float64).

    ``Z`` the simulated field (:func:`drawn_field_2d`, :func:`simulated_field_2d`), the
    gradient's targets the posterior conditionals at its neighbours; ``G`` (as in
    :func:`sweep_2d`), ``maxL`` (float64), ``lnS``, ``qN`` as left by :func:`sweep_2d`;
    ``w`` the block's pixel weights (grid-shaped);
    ``starts`` each sub-lattice's local parities, ``core`` its core's row and column
    ranges (J, 4); ``a`` = ``exp(alpha - amax)`` and ``b`` its class sums (work dtype).
    ``alpha_terms`` False: only ``beta``'s terms of the gradient and Hessian (a staged
    fit's prior stage, where ``alpha`` is not fitted).
    """
    J = Q.shape[0]
    C = Q.shape[1]
    K = alpha.shape[0]
    groups = q.shape[0] > 0
    has_act = act.shape[0] > 0
    dt = Q.dtype.type
    bt = dt(beta)
    W = Q.shape[3]
    N = np.empty((C, W), dtype=Q.dtype)
    Ns = np.empty((C, W), dtype=Q.dtype)
    E = np.empty((max(C, K), W), dtype=Q.dtype)
    I = np.empty((max(C, K), W), dtype=np.int32)  # noqa: E741
    den = np.empty(W, dtype=Q.dtype)
    qn = np.empty(W, dtype=Q.dtype)
    P = np.empty((K, W), dtype=Q.dtype)
    PC = np.empty((C, W), dtype=Q.dtype)
    wp = np.empty((K, W))
    lg = np.empty((K, W))
    wr = np.empty(W)
    t64 = np.empty(W)
    tops = np.empty(W)
    tots = np.empty(W)
    T = np.empty((K, W), dtype=Q.dtype)
    N2 = np.empty((C, W), dtype=Q.dtype)
    S2 = np.empty(W, dtype=Q.dtype)
    tab = _count_exp_table(bt, nbr.shape[1])
    energy = 0.0
    weight = 0.0
    # the sub-lattices by bands of rows, so that the neighbours' rows each reads stay in
    # the cache (sweep_2d's bands; nothing here depends on the order)
    n_rows = 0
    for j in range(J):
        n_rows = max(n_rows, core[j, 1])
    for band in range(-(-n_rows // _SWEEP_BAND)):
        for j in range(J):
            r0, r1, x0, x1 = core[j, 0], core[j, 1], core[j, 2], core[j, 3]
            w_ = x1 - x0
            if w_ <= 0:
                continue
            for r in range(max(r0, band * _SWEEP_BAND), min(r1, (band + 1) * _SWEEP_BAND)):
                _core_row_weights(w, starts, j, r, x0, w_, wr)
                _neighbour_sums(Q, nbr[j], r, x0, w_, N)
                # the local free energy: log q_ik = L_ik - max_k L_ik + beta N'_ik - lnS_i
                qc = Q[j, 0, 1 + r, 1 + x0 :]
                nc = N[0]
                for x in range(w_):
                    qn[x] = qc[x] * nc[x]
                for c in range(1, C):
                    qc = Q[j, c, 1 + r, 1 + x0 :]
                    nc = N[c]
                    for x in range(w_):
                        qn[x] += qc[x] * nc[x]
                if log_route:
                    _prior_softmax(N, alpha, beta, cc, groups, w_, lg, tops, tots)
                    for x in range(w_):
                        lg[0, x] = math.log(tots[x]) + tops[x]
                else:
                    _prior_normaliser(N, bt, b, w_, E, I, den)
                    for x in range(w_):
                        lg[0, x] = math.log(den[x]) + amax
                mL = maxL[j, r, x0:]
                lS = lnS[j, r, x0:]
                lN = qN[j, r, x0:]
                lz = lg[0]
                for x in range(w_):
                    e = mL[x] + np.float64(lS[x]) - lz[x]
                    t64[x] = e + beta * (np.float64(qn[x]) - np.float64(lN[x]))
                if has_act:
                    ac = act[j, r, x0:]
                    for x in range(w_):
                        if ac[x] == 0:
                            t64[x] = 0.0
                energy += _dot(wr, t64, w_)
                weight += _sum(wr, w_)
                if not need_pl:
                    continue
                # the pseudo-likelihood's gradient and Hessian at the drawn field's neighbours
                _neighbour_sums(Z, nbr[j], r, x0, w_, Ns)
                if log_route:
                    _prior_softmax(Ns, alpha, beta, cc, groups, w_, lg, tops, tots)
                    for k in range(K):
                        for x in range(w_):
                            P[k, x] = lg[k, x] / tots[x]
                else:
                    _count_exps(Ns, tab, w_, E)  # exp(beta Ns), Ns whole numbers
                    _class_weighted_sum(b, E, C, w_, den)
                    for x in range(w_):
                        den[x] = dt(1.0) / den[x]
                    for k in range(K):
                        ek = E[cc[k]] if groups else E[k]
                        ak = a[k]
                        g_ = G[j, k, r, x0:]
                        tk = T[k]
                        for x in range(w_):
                            P[k, x] = ek[x] * den[x] * ak
                            tk[x] = g_[x] * ek[x]  # as _conditional_row, exp(beta N) reused
                    _row_sum(T, w_, S2)
                # the targets: the posterior conditionals at the simulated field's neighbours
                if log_route:
                    _conditional_row(
                        Z, G, j, r, x0, nbr, w_, cc, groups, beta, True, T, I, N2, S2, tab
                    )  # fmt: skip
                if alpha_terms:  # the conditionals themselves (else only their mean count)
                    for x in range(w_):  # a pixel's weight over its conditionals' sum
                        t64[x] = wr[x] / np.float64(S2[x])
                    for k in range(K):
                        pk = P[k]
                        for x in range(w_):
                            wp[k, x] = np.float64(pk[x]) * wr[x]
                        s_p = _sum(wp[k], w_)
                        g[k] += _dot(T[k], t64, w_) - s_p
                        H[k, k] -= s_p
                    for k in range(K):
                        for k2 in range(k, K):
                            t = _dot(wp[k], P[k2], w_)
                            H[k, k2] += t
                            if k2 != k:
                                H[k2, k] += t
                if not estimate_beta:
                    continue
                if groups:
                    for c in range(C):
                        for x in range(w_):
                            PC[c, x] = 0.0
                    for k in range(K):
                        for x in range(w_):
                            PC[cc[k], x] += P[k, x]
                else:
                    PC[:, :w_] = P[:, :w_]
                for x in range(w_):  # nbar, in den
                    den[x] = PC[0, x] * Ns[0, x]
                for c in range(1, C):
                    for x in range(w_):
                        den[x] += PC[c, x] * Ns[c, x]
                # sum_k T_k Ns_k / S: the conditionals' mean count (one division a pixel)
                for x in range(w_):
                    t64[x] = 0.0
                for k in range(K):
                    nk = Ns[cc[k]] if groups else Ns[k]
                    tk = T[k]
                    for x in range(w_):
                        t64[x] += np.float64(tk[x]) * np.float64(nk[x])
                for x in range(w_):
                    t64[x] = t64[x] / np.float64(S2[x]) - np.float64(den[x])
                g[K] += _dot(wr, t64, w_)
                for x in range(w_):  # sum_c P_c (Ns_c - nbar)^2, in qn (no longer needed)
                    d = Ns[0, x] - den[x]
                    qn[x] = PC[0, x] * (d * d)
                for c in range(1, C):
                    for x in range(w_):
                        d = Ns[c, x] - den[x]
                        qn[x] += PC[c, x] * (d * d)
                for x in range(w_):
                    t64[x] = qn[x]
                H[K, K] -= _dot(wr, t64, w_)
                if not alpha_terms:
                    continue
                for k in range(K):
                    c = cc[k] if groups else k
                    for x in range(w_):
                        t64[x] = Ns[c, x] - den[x]
                    t = _dot(wp[k], t64, w_)
                    H[k, K] -= t
                    H[K, k] -= t
    return energy, weight


@njit(nogil=True, cache=True)
def start_rows(L, ok, j, r0, w, log_route, cc, G, maxL, Q, q, act, lnS, E, I, inv, need_lnS):  # noqa: E741
    """The pixel-wise start of rows ``r0 ..`` of sub-lattice ``j`` from their logits ``L``
    (K, m) float64, pixels row by row (``w`` per row): ``maxL``, ``G`` = ``exp(L - max
    L)`` (``L - max L`` on the log route), ``q ∝ exp(L)`` into ``Q`` (and ``q``) and the
    log normaliser ``lnS``. ``ok`` (m, K) the components each pixel may take (empty:
    all); ``act`` as in :func:`sweep_2d`; ``E``, ``I``, ``inv`` scratch rows (K, >= w),
    (K, >= w) int32, (>= w,). ``need_lnS`` False: sweeps follow, which set ``lnS``."""
    K = L.shape[0]
    rows = L.shape[1] // w if w > 0 else 0
    has_ok = ok.shape[0] > 0
    if has_ok:  # components a pixel may not take
        for i in range(L.shape[1]):
            for k in range(K):
                if not ok[i, k]:
                    L[k, i] = -np.inf
    for rr in range(rows):
        r = r0 + rr
        base = rr * w
        mrow = maxL[j, r]
        l0 = L[0, base : base + w]
        for x in range(w):
            mrow[x] = l0[x]
        for k in range(1, K):
            lk = L[k, base : base + w]
            for x in range(w):
                mrow[x] = max(mrow[x], lk[x])
        for x in range(w):
            if not np.isfinite(mrow[x]):
                mrow[x] = 0.0
        for k in range(K):
            g = G[j, k, r]
            lk = L[k, base : base + w]
            for x in range(w):
                g[x] = lk[x] - mrow[x]
            ek = E[k]
            for x in range(w):
                ek[x] = g[x]
        _exp_rows(E, I, w)
        if not log_route:  # G holds the exponentials, as does E
            for k in range(K):
                g = G[j, k, r]
                ek = E[k]
                for x in range(w):
                    g[x] = ek[x]
        _finish_start_row(E, w, j, r, cc, Q, q, act, lnS, inv, need_lnS)


@njit(nogil=True, cache=True)
def _finish_start_row(E, w, j, r, cc, Q, q, act, lnS, inv, need_lnS):
    """The pixel-wise start of row ``r`` of sub-lattice ``j`` from its exponentials ``E``
    (K, >= w): ``q`` into ``Q`` (and ``q``) and the normaliser into ``lnS`` (its log if
    ``need_lnS``)."""
    tiny = Q.dtype.type(1e-30)
    S = lnS[j, r]  # the sum first, its log below
    _row_sum(E, w, S)
    for x in range(w):
        S[x] = max(S[x], tiny)
    _normalise_store(E, S, act, j, r, w, cc, Q, q, inv)
    if need_lnS:
        for x in range(w):
            S[x] = math.log(S[x])


@njit(nogil=True, cache=True)
def start_from_g(j, n_rows, w, log_route, cc, G, Q, q, act, lnS, E, I, inv, need_lnS):  # noqa: E741
    """The pixel-wise start of rows ``0 .. n_rows`` of sub-lattice ``j`` (``w`` pixels a
    row) from ``G`` as :func:`start_rows` left it (a kept start,
    :class:`daskem.model.spatial._StartCache`): the same values, without the logits."""
    K = G.shape[1]
    for r in range(n_rows):
        for k in range(K):
            g = G[j, k, r]
            ek = E[k]
            for x in range(w):
                ek[x] = g[x]
        if log_route:  # G holds L - max L
            _exp_rows(E, I, w)
        _finish_start_row(E, w, j, r, cc, Q, q, act, lnS, inv, need_lnS)


@njit(nogil=True, cache=True)
def _count_not_finite(tot, w):
    """How many of ``tot[:w]`` are NaN or infinite."""
    n = 0
    for x in range(w):
        v = tot[x]
        n += not (v - v == 0.0)
    return n


@njit(nogil=True, cache=True)
def log_gauss_diag(X, means, prec, const, out, xbuf, tot):
    """``out[k, i] = const[k] - 0.5 * sum_d ((x_id - means[k, d]) * prec[k, d]) ** 2``
    (float64) of the pixels of ``X`` (h, w, D), any strides, row by row (``i = r * w +
    x``): the diagonal-covariance log-density in its residual form, each pixel's sum in
    the order of the attributes. A pixel with a missing attribute gets NaN. ``xbuf`` a
    (D, >= w) and ``tot`` a (>= w,) float64 scratch. Returns the number of pixels whose
    sum over the components is not finite (missing attributes, or values beyond
    float64), so that a caller looks for them only when there are some."""
    h, w, D = X.shape
    K = means.shape[0]
    n_bad = 0
    for r in range(h):
        for x in range(w):
            for d in range(D):
                xbuf[d, x] = X[r, x, d]
            tot[x] = 0.0
        base = r * w
        for k in range(K):
            o = out[k, base : base + w]
            for x in range(w):
                o[x] = 0.0
            for d in range(D):
                mu = means[k, d]
                pk = prec[k, d]
                xd = xbuf[d]
                for x in range(w):
                    y = (xd[x] - mu) * pk
                    o[x] += y * y
            ck = const[k]
            for x in range(w):
                o[x] = ck - 0.5 * o[x]
                tot[x] += o[x]
        n_bad += _count_not_finite(tot, w)
    return n_bad


@njit(nogil=True, cache=True)
def log_gauss_full(X, means, prec, const, out, cbuf, ybuf, tri, tot):
    """``out[k, i] = const[k] - 0.5 * |(x_i - means[k]) @ prec[k]|^2`` (float64) of the
    pixels of ``X`` (h, w, D), any strides, row by row (``i = r * w + x``): the
    full-covariance log-density in its residual form, ``prec[k]`` the Cholesky factor of
    component k's precision (upper triangular if ``tri``: only ``prec[k, :j+1, j]`` is
    read for column j). Each pixel's sums run in a fixed order (attributes, then
    columns), whatever its position in the row. A pixel with a missing attribute gets
    NaN. ``cbuf`` a (D, >= w) and ``ybuf``, ``tot`` (>= w,) float64 scratches. Returns
    the number of pixels whose sum over the components is not finite
    (:func:`log_gauss_diag`)."""
    h, w, D = X.shape
    K = means.shape[0]
    n_bad = 0
    for r in range(h):
        base = r * w
        for x in range(w):
            tot[x] = 0.0
        for k in range(K):
            for d in range(D):
                mu = means[k, d]
                cd = cbuf[d]
                for x in range(w):
                    cd[x] = np.float64(X[r, x, d]) - mu
            o = out[k, base : base + w]
            for x in range(w):
                o[x] = 0.0
            for j in range(D):
                top = j + 1 if tri else D
                p0 = prec[k, 0, j]
                c0 = cbuf[0]
                for x in range(w):
                    ybuf[x] = c0[x] * p0
                for i in range(1, top):
                    p = prec[k, i, j]
                    ci = cbuf[i]
                    for x in range(w):
                        ybuf[x] += ci[x] * p
                for x in range(w):
                    o[x] += ybuf[x] * ybuf[x]
            ck = const[k]
            for x in range(w):
                o[x] = ck - 0.5 * o[x]
                tot[x] += o[x]
        n_bad += _count_not_finite(tot, w)
    return n_bad


@njit(nogil=True, cache=True)
def emission_sums_2d(Q, q, X, w, starts, core, shift, full, acc):
    """Adds the emission statistics of a block's core to ``acc`` (K, M) float64: per
    component k, the sums over pixels of ``r_k [1, x, x^2, x_a x_b (a < b)]`` about
    ``shift`` (the features of ``spatial._quad_features``; no cross products unless
    ``full``), ``r_k = q_k w``. ``Q``/``q`` the swept field (``q`` empty: component k is
    class k, read from ``Q``), ``X`` the block (h, w, D) with every attribute observed,
    ``w`` its pixel weights (grid-shaped), ``starts`` and ``core`` as in
    :func:`stats_2d`. Sums over pixels only (:func:`_dot`, :func:`_sum`)."""
    J = Q.shape[0]
    K = acc.shape[0]
    D = X.shape[2]
    groups = q.shape[0] > 0
    W = Q.shape[3]
    xc = np.empty((D, W))
    wr = np.empty(W)
    rk = np.empty(W)
    t = np.empty(W)
    for j in range(J):
        r0, r1, x0, x1 = core[j, 0], core[j, 1], core[j, 2], core[j, 3]
        n = x1 - x0
        if n <= 0:
            continue
        for r in range(r0, r1):
            row, c0 = _core_row_weights(w, starts, j, r, x0, n, wr)
            for d in range(D):
                s = shift[d]
                xd = xc[d]
                for x in range(n):
                    xd[x] = np.float64(X[row, c0 + 2 * x, d]) - s
            for k in range(K):
                qk = q[j, k, r, x0:] if groups else Q[j, k, 1 + r, 1 + x0 :]
                for x in range(n):
                    rk[x] = np.float64(qk[x]) * wr[x]
                ak = acc[k]
                ak[0] += _sum(rk, n)
                o = 1 + 2 * D
                for a in range(D):
                    xa = xc[a]
                    for x in range(n):
                        t[x] = rk[x] * xa[x]
                    ak[1 + a] += _sum(t, n)
                    ak[1 + D + a] += _dot(t, xa, n)
                    if full:
                        for b in range(a + 1, D):
                            ak[o] += _dot(t, xc[b], n)
                            o += 1
