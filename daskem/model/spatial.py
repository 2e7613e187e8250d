"""Gaussian mixture with a Potts prior between neighbouring pixels (hidden Markov random
field), fitted by mean-field (variational) EM.

Model (Zhang, Brady & Smith 2001; Celeux, Forbes & Peyrard 2003): every pixel ``i`` of a
grid has a hidden component ``z_i``; the attributes follow the Gaussian mixture's
emissions ``p(x_i | z_i = k)`` (any covariance type, missing attributes marginalised);
the field of classes follows a Potts model,
``p(z) ∝ exp(sum_i alpha_{z_i} + beta * sum_{i~j} [class(z_i) = class(z_j)])``,
over the pixel pairs ``i ~ j`` of a 4- or 8-neighbourhood (3-D: 6 or 26). Components of
the same class do not repel each other: the prior acts on classes.

**E-step (mean field).** The posterior ``p(z | x)`` is intractable; it is approximated by
a factorised ``q(z) = prod_i q_i(z_i)`` maximising the free energy

    F(q, theta) = sum_i w_i [ sum_k q_ik (log p(x_i | k) + alpha_k)
                              + beta / 2 * sum_k q_ik n_ik - sum_k q_ik log q_ik ],

with ``n_ik = sum_{j in N(i)} Q_j,class(k)`` the neighbours' class probabilities (``Q``
the class sums of ``q``), up to the constant ``-log Z(alpha, beta)``. Maximising over one
pixel's ``q_i`` with the others fixed gives ``q_ik ∝ p(x_i | k) exp(alpha_k + beta
n_ik)``. Pixels are updated colour by colour (a colouring in which no two neighbours
share a colour: 2 colours for 4/6-neighbourhoods, ``2 ** ndim`` for 8/26), so each
colour's update is an exact coordinate ascent step and **F never decreases during the
sweeps** at fixed parameters (:func:`free_energy`; tested). Labelled pixels keep ``q`` on
their class's components; pixels with nothing observed have no emission term and take
their class from the prior.

Each E-step starts from the pixel-wise posterior ``q_ik ∝ p(x_i | k) exp(alpha_k)`` at
the current parameters and runs ``sweeps`` full sweeps. A pixel's result then depends on
the pixels within ``sweeps * n_colours`` steps only, and its statistics on one step more
(:func:`halo_depth`), so a chunk
extended by that halo gives exactly the whole-image result for its core pixels: the fit
keeps no per-pixel state between iterations (the memory bound of the pixel-wise fit
holds) and does not depend on the chunking.

**M-step.** Emission parameters: the Gaussian mixture's M-step with ``q`` as
responsibilities (missing attributes through their conditional expectations), which
maximises F at fixed ``q``. Prior parameters: one Newton step on the pseudo-likelihood
``sum_i w_i sum_k q_ik log softmax_k(alpha + beta n_i)`` (Besag 1975, with the mean-field
``q`` in place of the unobserved field) from its gradient and Hessian, which are sums over
pixels reduced like every other statistic. ``alpha`` is always estimated; ``beta`` only
when asked (``spatial_beta="auto"``), else fixed.

Guarantee (tested): at fixed parameters F never decreases through the sweeps, and the
emission M-step never decreases F at fixed ``q``. Restarting the sweeps from the
pixel-wise posterior at each iteration, and the pseudo-likelihood step, are not ascent
steps of F, and F itself moves with ``alpha`` and ``beta`` (its ``log Z`` is dropped).
The objective reported per iteration, on whose change the fit converges, is therefore
:func:`local_free_energy` per unit weight: the free energy of each pixel's mixture with
prior ``softmax(alpha + beta n_i)`` (no partition function needed); it is monitored, not
guaranteed to increase.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gmm import (
    GMMModel,
    GMMParams,
    GMMStats,
    class_membership,
    observed_weighted_log_prob,
)
from .gmm import (
    m_step as gmm_m_step,
)
from .missing import resp_stats

__all__ = [
    "NEIGHBOURHOODS",
    "SpatialBlock",
    "SpatialGMMModel",
    "SpatialParams",
    "SpatialStats",
    "check_neighbourhood",
    "free_energy",
    "halo_depth",
    "mean_field",
]

#: neighbourhoods allowed per number of spatial dims
NEIGHBOURHOODS = {2: (4, 8), 3: (6, 26)}
# largest step of the pseudo-likelihood Newton update, per coordinate
_MAX_STEP = 1.0
# pixels per slab of a block's core in the statistics (bounds the temporaries)
_SLAB_PIXELS = 65536


def check_neighbourhood(ndim: int, neighbourhood: int) -> None:
    """Raise ``ValueError`` unless ``neighbourhood`` suits ``ndim`` spatial dims."""
    if ndim not in NEIGHBOURHOODS:
        raise ValueError(
            f"a spatial prior needs 2 or 3 spatial dims, got {ndim}: neighbourhoods are "
            f"defined on grids {sorted(NEIGHBOURHOODS)}-D"
        )
    if neighbourhood not in NEIGHBOURHOODS[ndim]:
        raise ValueError(
            f"neighbourhood must be one of {NEIGHBOURHOODS[ndim]} on a {ndim}-D grid, got "
            f"{neighbourhood!r}"
        )


def _full(ndim: int, neighbourhood: int) -> bool:
    return neighbourhood == 3**ndim - 1


def neighbour_offsets(ndim: int, neighbourhood: int) -> list[tuple[int, ...]]:
    """Offsets of the neighbours of a pixel, in a fixed order."""
    check_neighbourhood(ndim, neighbourhood)
    if _full(ndim, neighbourhood):
        return [o for o in itertools.product((-1, 0, 1), repeat=ndim) if any(o)]
    out = []
    for d in range(ndim):
        for s in (-1, 1):
            o = [0] * ndim
            o[d] = s
            out.append(tuple(o))
    return out


def n_colours(ndim: int, neighbourhood: int) -> int:
    """Colours of the update order: no two neighbours share one."""
    return 2**ndim if _full(ndim, neighbourhood) else 2


def halo_depth(ndim: int, neighbourhood: int, sweeps: int) -> int:
    """Pixels around a chunk that its core's statistics depend on: ``q`` after the sweeps
    depends on pixels ``sweeps * n_colours`` steps away, and the core's statistics use
    the neighbours' final ``q`` (one step more)."""
    return int(sweeps) * n_colours(ndim, neighbourhood) + 1


def colour_map(shape: tuple[int, ...], origin: tuple[int, ...], neighbourhood: int) -> np.ndarray:
    """Colour of every pixel of a block whose first pixel is at global index ``origin``."""
    ndim = len(shape)
    idx = np.indices(shape, dtype=np.int64)
    par = [(idx[d] + int(origin[d])) % 2 for d in range(ndim)]
    if _full(ndim, neighbourhood):
        return sum(p << d for d, p in enumerate(par)).astype(np.int8)
    return (sum(par) % 2).astype(np.int8)


def neighbour_sum(P: np.ndarray, offsets: list[tuple[int, ...]]) -> np.ndarray:
    """``out[i] = sum over offsets o of P[i + o]`` (zero beyond the array), shape of ``P``.

    ``P`` has the grid dims first and one trailing dim (classes).
    """
    out = np.zeros_like(P)
    shape = P.shape[:-1]
    for o in offsets:
        dst, src = [], []
        for d, s in enumerate(o):
            n = shape[d]
            dst.append(slice(max(0, -s), n - max(0, s)))
            src.append(slice(max(0, s), n - max(0, -s)))
        out[tuple(dst)] += P[tuple(src)]
    return out


_HASH_MULT = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)


def pixel_uniforms(shape: tuple[int, ...], origin: tuple[int, ...]) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) for every pixel, from its global grid index
    only (a hash: the same in any chunk, at every iteration)."""
    idx = np.indices(shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(shape, dtype=np.uint64)
        for d in range(len(shape)):
            g = idx[d] + np.uint64(origin[d]) + np.uint64(1)
            h ^= g * np.uint64(_HASH_MULT[d % 3])
            h = (h << np.uint64(31)) | (h >> np.uint64(33))
        # splitmix64 finaliser
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in place in ``a`` (which is returned)."""
    m = a.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0.0
    a -= m
    with np.errstate(under="ignore"):
        np.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    return a


def mean_field(
    log_emission: np.ndarray,
    alpha: np.ndarray,
    beta: float,
    membership: np.ndarray,
    *,
    allowed: np.ndarray | None,
    neighbourhood: int,
    origin: tuple[int, ...],
    sweeps: int,
    active: np.ndarray | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Mean-field responsibilities of a grid block, shape ``(*grid, K)``.

    Parameters
    ----------
    log_emission : ndarray (*grid, K)
        ``log p(x_i | k)``; 0 for pixels with nothing observed (no emission term).
    alpha : ndarray (K,)
    beta : float
    membership : ndarray (K, C)
        One-hot class of each component.
    allowed : bool ndarray (*grid, K) or None
        Components a pixel may take (labelled pixels: those of their class).
    neighbourhood : int
    origin : tuple of int
        Global index of the block's first pixel (fixes the colouring).
    sweeps : int
        Full colour sweeps after the pixel-wise start.
    active : bool ndarray (*grid) or None
        Pixels of the field; others (e.g. zero sample weight) have ``q = 0`` and are not
        neighbours of anyone.
    overwrite : bool, default False
        Turn ``log_emission`` into the logits ``log_emission + alpha`` (``-inf`` where
        not allowed) in place, saving a copy.
    """
    grid = log_emission.shape[:-1]
    if overwrite:  # the logits take the place of the log emissions
        logits = log_emission
        logits += alpha
    else:
        logits = log_emission + alpha
    if allowed is not None:
        logits[~allowed] = -np.inf
    q = _softmax_rows(logits.copy())
    if active is not None:
        q[~active] = 0.0
    if beta == 0.0 or sweeps == 0:
        return q
    ndim = len(grid)
    identity = membership.shape[0] == membership.shape[1] and np.array_equal(
        membership, np.eye(membership.shape[0])
    )
    C = membership.shape[1]
    # Q (class probabilities) inside a zero border, so every neighbour is a strided view
    Qp = np.zeros(tuple(n + 2 for n in grid) + (C,))
    inner = tuple(slice(1, n + 1) for n in grid)
    Qp[inner] = q if identity else q @ membership
    offsets = neighbour_offsets(ndim, neighbourhood)
    for _ in range(sweeps):
        for lattices in _colour_lattices(grid, origin, neighbourhood):
            for start in lattices:  # parity sub-lattices of one colour: no two are neighbours
                sub = tuple(slice(a, None, 2) for a in start)
                shape = logits[sub].shape[:-1]
                if not all(shape):
                    continue
                N = np.zeros((*shape, C))
                for o in offsets:
                    view = tuple(
                        slice(1 + a + d, 1 + a + d + 2 * (n - 1) + 1, 2)
                        for a, d, n in zip(start, o, shape, strict=True)
                    )
                    N += Qp[view]
                lg = logits[sub] + beta * (N if identity else N @ membership.T)
                qc = _softmax_rows(lg)
                if active is not None:
                    qc[~active[sub]] = 0.0
                q[sub] = qc
                Qp[tuple(slice(1 + a, None, 2) for a in start)][
                    tuple(slice(0, n) for n in shape)
                ] = qc if identity else qc @ membership
    return q


def _colour_lattices(
    grid: tuple[int, ...], origin: tuple[int, ...], neighbourhood: int
) -> list[list[tuple[int, ...]]]:
    """Per colour of :func:`colour_map`, in colour order, the local starts of its parity
    sub-lattices (``[a::2, b::2, ...]``)."""
    ndim = len(grid)
    out: list[list[tuple[int, ...]]] = [[] for _ in range(n_colours(ndim, neighbourhood))]
    for par in itertools.product((0, 1), repeat=ndim):
        start = tuple((p - int(o)) % 2 for p, o in zip(par, origin, strict=True))
        if _full(ndim, neighbourhood):
            colour = sum(p << d for d, p in enumerate(par))
        else:
            colour = sum(par) % 2
        out[colour].append(start)
    return out


def free_energy(
    q: np.ndarray,
    log_emission: np.ndarray,
    alpha: np.ndarray,
    beta: float,
    membership: np.ndarray,
    neighbourhood: int,
    weight: np.ndarray | None = None,
    core: tuple[slice, ...] | None = None,
) -> float:
    """``F`` of the module docstring summed over the pixels of ``core`` (default: all).

    The pair term of a pixel counts half of each of its pairs (so blocks add up).
    """
    grid = q.shape[:-1]
    Q = q @ membership
    N = neighbour_sum(Q, neighbour_offsets(len(grid), neighbourhood)) @ membership.T
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        per = np.where(q > 0, q * (log_emission + alpha + 0.5 * beta * N), 0.0) - ent
    per = per.sum(axis=-1)
    if weight is not None:
        per = per * weight
    if core is not None:
        per = per[core]
    return float(per.sum())


def local_free_energy(
    q: np.ndarray,
    log_emission: np.ndarray,
    alpha: np.ndarray,
    beta: float,
    N: np.ndarray,
    weight: np.ndarray,
    core: tuple[slice, ...],
) -> float:
    """The reported objective, summed over ``core``: the free energy of the pixel-wise
    mixtures with each pixel's prior ``softmax(alpha + beta n_i)`` from its neighbours'
    ``q`` (the mean-field-like approximation of Celeux, Forbes & Peyrard 2003),
    ``sum_i w_i sum_k q_ik (log p(x_i | k) + log softmax_k(alpha + beta n_i) - log q_ik)``.

    Unlike :func:`free_energy` it needs no partition function: it is a lower bound on
    the log-likelihood of those local mixtures, comparable across ``alpha`` and ``beta``.
    """
    logits = alpha + beta * N
    m = logits.max(axis=-1, keepdims=True)
    log_prior = logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(q > 0, q, 1.0)
        per = np.where(q > 0, q * (log_emission + log_prior - np.log(safe)), 0.0)
    return float((per.sum(axis=-1) * weight)[core].sum())


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class SpatialBlock:
    """A chunk of the grid with its halo.

    Attributes
    ----------
    data : ndarray (*ext, D)
        Attributes of the extended block (NaN = missing).
    core : tuple of slice
        The chunk's own pixels within ``data``.
    origin : tuple of int
        Global grid index of ``data``'s first pixel.
    """

    data: np.ndarray
    core: tuple[slice, ...]
    origin: tuple[int, ...]


@dataclass(frozen=True)
class SpatialParams:
    """Emission mixture (``weights`` = the components' share of the map), the Potts
    prior's per-component field ``alpha`` and interaction ``beta``."""

    gmm: GMMParams
    alpha: np.ndarray
    beta: float

    @property
    def n_components(self) -> int:
        return self.gmm.n_components

    @property
    def component_class(self):
        return self.gmm.component_class


@dataclass
class SpatialStats:
    """Mergeable statistics of one E-step.

    ``emission``: the mixture's statistics with ``q`` as responsibilities; ``energy``: F
    over the pixels; ``weight``: their summed weight; ``grad`` / ``hess``: gradient and
    Hessian of the pseudo-likelihood in ``(alpha, beta)``.
    """

    emission: GMMStats
    energy: float = 0.0
    weight: float = 0.0
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hess: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    n_excluded: int = 0
    n_empty: int = 0
    n_partial: int = 0

    def __add__(self, other: SpatialStats) -> SpatialStats:
        if not isinstance(other, SpatialStats):
            return NotImplemented
        return SpatialStats(
            self.emission + other.emission,
            self.energy + other.energy,
            self.weight + other.weight,
            self.grad + other.grad,
            self.hess + other.hess,
            self.n_excluded + other.n_excluded,
            self.n_empty + other.n_empty,
            self.n_partial + other.n_partial,
        )

    def __radd__(self, other):
        if other == 0:
            return self
        return NotImplemented

    @property
    def loglik(self) -> float:
        return self.energy


def log_emission(gmm: GMMParams, X: np.ndarray) -> np.ndarray:
    """``log p(x_o | k)`` of rows (marginal over observed attributes), 0 where none is."""
    out = observed_weighted_log_prob(X, gmm)
    empty = np.isnan(out[:, 0])
    with np.errstate(divide="ignore"):
        out -= np.log(gmm.weights)
    out[empty] = 0.0
    return out


def _allowed(labels: np.ndarray | None, gmm: GMMParams) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    lab = labels >= 0
    if not lab.any():
        return None
    cc = gmm.component_class if gmm.component_class is not None else np.arange(gmm.n_components)
    allowed = np.ones((labels.size, gmm.n_components), dtype=bool)
    allowed[lab] = cc[None, :] == labels[lab, None]
    return allowed


def _pl_terms(q, N, alpha, beta, w, estimate_beta, Ns=None):
    """Gradient and Hessian of the pseudo-likelihood at ``(alpha, beta)`` (core pixels)."""
    K = q.shape[1]
    Nd = N
    if Ns is not None:
        N = Ns
    p = _softmax_rows(alpha + beta * N)
    g = np.empty(K + 1)
    H = np.zeros((K + 1, K + 1))
    wq = w[:, None] * (q - p)
    g[:K] = wq.sum(axis=0)
    wp = w[:, None] * p
    H[:K, :K] = -(np.diag(wp.sum(axis=0)) - wp.T @ p)
    if estimate_beta:
        g[K] = (w[:, None] * (q * Nd - p * N)).sum()
        nbar = (p * N).sum(axis=1)
        dn = N - nbar[:, None]
        H[K, K] = -(w * (p * dn * dn).sum(axis=1)).sum()
        hab = -(wp * dn).sum(axis=0)
        H[:K, K] = hab
        H[K, :K] = hab
    else:
        g[K] = 0.0
    return g, H


def newton_prior(
    alpha: np.ndarray, beta: float, grad: np.ndarray, hess: np.ndarray, estimate_beta: bool
) -> tuple[np.ndarray, float]:
    """One damped Newton step on the pseudo-likelihood (``beta`` kept >= 0).

    ``alpha`` is defined up to a constant (the Hessian's null direction): the minimum-norm
    step is taken, and ``alpha`` is centred on its mean.
    """
    K = alpha.shape[0]
    n = K + 1 if estimate_beta else K
    H, g = -hess[:n, :n], grad[:n]
    step = np.linalg.lstsq(H, g, rcond=1e-10)[0]
    big = np.abs(step).max() if step.size else 0.0
    if big > _MAX_STEP:
        step *= _MAX_STEP / big
    a = alpha + step[:K]
    a = a - a.mean()
    b = max(0.0, beta + float(step[K])) if estimate_beta else beta
    return a, b


@dataclass(frozen=True)
class SpatialGMMModel:
    """The hidden Markov random field mixture for the EM engine (blocks are
    :class:`SpatialBlock`; ``sample_weight`` and ``labels`` are grid-shaped like
    ``block.data[..., 0]``)."""

    emission: GMMModel
    neighbourhood: int = 8
    sweeps: int = 3
    estimate_beta: bool = False

    # ---- the EM iteration --------------------------------------------------------

    def responsibilities(
        self,
        params: SpatialParams,
        block: SpatialBlock,
        labels: np.ndarray | None = None,
        active: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean-field ``q`` (*ext, K) and the pixel-wise logits ``log p(x | k) + alpha_k``
        (*ext, K; ``-inf`` for components a labelled pixel may not take) of a block."""
        data = np.asarray(block.data)
        grid = data.shape[:-1]
        X = data.reshape(-1, data.shape[-1])
        E = log_emission(params.gmm, X)
        allowed = _allowed(labels, params.gmm)
        K = params.n_components
        M = class_membership(params.gmm)
        q = mean_field(
            E.reshape(*grid, K),
            params.alpha,
            float(params.beta),
            M,
            allowed=None if allowed is None else allowed.reshape(*grid, K),
            neighbourhood=self.neighbourhood,
            origin=block.origin,
            sweeps=self.sweeps,
            active=active,
            overwrite=True,
        )
        return q, E.reshape(*grid, K)

    def block_stats(
        self,
        params: SpatialParams,
        block: SpatialBlock,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> SpatialStats:
        data = np.asarray(block.data)
        grid = data.shape[:-1]
        w = np.ones(grid) if sample_weight is None else np.asarray(sample_weight, np.float64)
        active = np.isfinite(w) & (w > 0)
        w = np.where(active, w, 0.0)
        if labels is not None and self.emission.label_weight != 1.0:
            w = np.where(np.asarray(labels) >= 0, w * self.emission.label_weight, w)
        q, logits = self.responsibilities(params, block, labels, active)
        M = class_membership(params.gmm)
        offsets = neighbour_offsets(len(grid), self.neighbourhood)
        D = data.shape[-1]
        alpha, beta = params.alpha, float(params.beta)
        core = tuple(slice(*c.indices(n)[:2]) for c, n in zip(block.core, grid, strict=True))
        c0, c1 = core[0].start, core[0].stop
        rest = core[1:]
        stats: SpatialStats | None = None
        # the core in slabs along the first axis, so the per-pixel temporaries stay small
        step = max(1, _SLAB_PIXELS // max(1, math.prod(s.stop - s.start for s in rest)))
        for a in range(c0, c1, step):
            b = min(c1, a + step)
            lo, hi = max(0, a - 1), min(grid[0], b + 1)  # one ring for the neighbour sums
            inner = (slice(a - lo, b - lo), *rest)
            qs = q[lo:hi]
            Qs = qs @ M
            Qn = (neighbour_sum(Qs, offsets) @ M.T)[inner].reshape(-1, q.shape[-1])
            # one draw of the class field from q (fixed per pixel), for the pseudo-likelihood
            u = pixel_uniforms(Qs.shape[:-1], (block.origin[0] + lo, *block.origin[1:]))
            z = np.minimum((np.cumsum(Qs, axis=-1) < u[..., None]).sum(axis=-1), M.shape[1] - 1)
            Z = np.zeros_like(Qs)
            np.put_along_axis(Z, z[..., None], 1.0, axis=-1)
            Z[~active[lo:hi]] = 0.0
            Ns = (neighbour_sum(Z, offsets) @ M.T)[inner].reshape(-1, q.shape[-1])
            qc = qs[inner].reshape(-1, q.shape[-1])
            wc = w[lo:hi][inner].reshape(-1)
            act = active[lo:hi][inner].reshape(-1)
            Xc = data[lo:hi][inner].reshape(-1, D)
            Ec = logits[lo:hi][inner].reshape(-1, q.shape[-1]) - alpha
            seen = np.isfinite(Xc).any(axis=1)
            energy = local_free_energy(qc, Ec, alpha, beta, Qn, wc, (slice(None),))
            every = bool(act.all())
            sel = slice(None) if every else act
            emission = resp_stats(Xc[sel], qc[sel], params.gmm, wc[sel])
            g, H = _pl_terms(qc[sel], Qn[sel], alpha, beta, wc[sel], self.estimate_beta, Ns[sel])
            part = SpatialStats(
                emission,
                energy,
                float(wc.sum()),
                g,
                H,
                n_excluded=int((~(act & seen)).sum()),
                n_empty=int((~seen).sum()),
                n_partial=emission.n_partial,
            )
            stats = part if stats is None else stats + part
        assert stats is not None
        return stats

    def m_step(self, stats: SpatialStats, params: SpatialParams) -> tuple[SpatialParams, list]:
        gmm, events = gmm_m_step(
            stats.emission,
            self.emission.covariance_type,
            self.emission.reg_covar,
            component_class=params.gmm.component_class,
            reseed=self.emission.reseed,
        )
        if not self.estimate_beta and params.beta == 0.0:
            # no interaction: the pseudo-likelihood's maximiser is the mixture's weights
            # (the fit is then the pixel-wise mixture's)
            alpha, beta = np.log(gmm.weights) - np.log(gmm.weights).mean(), 0.0
        else:
            alpha, beta = newton_prior(
                params.alpha, float(params.beta), stats.grad, stats.hess, self.estimate_beta
            )
        return SpatialParams(gmm, alpha, beta), events

    def objective(self, stats: SpatialStats) -> float:
        """:func:`local_free_energy` per unit weight."""
        return stats.energy / stats.weight if stats.weight > 0 else -np.inf

    def grid_posterior(
        self,
        params: SpatialParams,
        block: SpatialBlock,
        labels: np.ndarray | None = None,
        n_classes: int | None = None,
    ) -> np.ndarray:
        """Posterior planes of a block's core: ``(C + 2, *core)`` float64 -- the class
        probabilities of the mean-field ``q``, their entropy and the pixel-wise
        ``log p(x_observed)`` (NaN where nothing is observed). Labelled pixels keep their
        class; pixels with nothing observed take their class from the prior."""
        data = np.asarray(block.data)
        D = data.shape[-1]
        q, _ = self.responsibilities(params, block, labels)
        M = class_membership(params.gmm, n_classes)
        P = (q @ M)[block.core]
        core_shape = P.shape[:-1]
        X = data[block.core].reshape(-1, D)
        logd = self.emission.log_density(params.gmm, X)
        out = np.empty((M.shape[1] + 2, *core_shape))
        out[: M.shape[1]] = np.moveaxis(P, -1, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0).sum(axis=-1)
        out[M.shape[1]] = ent
        out[M.shape[1] + 1] = logd.reshape(core_shape)
        return out

    # ---- rows: the pixel-wise mixture (no neighbours) -----------------------------

    def weighted_log_prob(self, params: SpatialParams, X: np.ndarray) -> np.ndarray:
        return self.emission.weighted_log_prob(params.gmm, X)

    def log_density(self, params: SpatialParams, X: np.ndarray, labels=None) -> np.ndarray:
        return self.emission.log_density(params.gmm, X, labels)

    def class_posterior(self, params: SpatialParams, X: np.ndarray, n_classes=None):
        return self.emission.class_posterior(params.gmm, X, n_classes)

    def params_to_dict(self, params: SpatialParams) -> dict[str, Any]:
        d = self.emission.params_to_dict(params.gmm)
        d["spatial_alpha"] = np.asarray(params.alpha).tolist()
        d["spatial_beta"] = float(params.beta)
        return d

    def params_from_dict(self, d: dict[str, Any]) -> SpatialParams:
        gmm = self.emission.params_from_dict(d)
        alpha = np.asarray(d["spatial_alpha"], dtype=np.float64)
        return SpatialParams(gmm, alpha, float(d["spatial_beta"]))

    def n_parameters(self, params: SpatialParams) -> int:
        return self.emission.n_parameters(params.gmm) + (1 if self.estimate_beta else 0)
