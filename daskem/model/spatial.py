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
the pixels within ``sweeps * n_colours`` steps only, and its statistics on
``n_colours + 1`` steps more (the simulated field's sweep, then the neighbours;
:func:`halo_depth`), so a chunk
extended by that halo gives exactly the whole-image result for its core pixels: the fit
keeps no per-pixel state between iterations (the memory bound of the pixel-wise fit
holds) and does not depend on the chunking.

**M-step.** Emission parameters: the Gaussian mixture's M-step with ``q`` as
responsibilities (missing attributes through their conditional expectations), which
maximises F at fixed ``q``. Prior parameters: one Newton step on the pseudo-likelihood
``sum_i w_i sum_k t_ik log softmax_k(alpha + beta n_i)`` (Besag 1975) on the *simulated
field* of Celeux, Forbes & Peyrard (2003): a field drawn from ``q`` by fixed per-pixel
uniforms, then one colour sweep in which every pixel draws its class from its posterior
conditional ``∝ p(x_i | k) exp(alpha_k + beta n_ik)`` given its neighbours' current
classes (uniforms of a second stream); ``n_i`` are the neighbours' classes in that
field and ``t_i`` the posterior conditionals at them. The gradient and Hessian are sums
over pixels reduced like every other statistic; ``alpha`` is defined up to a constant,
and the step is solved on the complement of that direction. ``alpha`` is always
estimated; ``beta`` only when asked (``spatial_beta="auto"``), else fixed. The field
drawn from ``q`` alone (pixels independent) is noisier than the posterior's where
classes overlap, which biased ``beta`` low (0.60 for 0.8 at 2 standard deviations
between classes; 0.80 with the sweep, tested).

**Staged fit** (``fit_emissions=False``, the estimators' default ``spatial_fit="staged"``):
the emissions are those of the pixel-wise mixture fitted first and are kept; ``alpha`` is
the log of its weights, and only ``beta`` is fitted, by damped Newton steps on the same
pseudo-likelihood (:func:`prior_step`), until a step is below ``tol``
(:meth:`SpatialGMMModel.converged`). The E-step and the statistics are the same.

Guarantee (tested): at fixed parameters F never decreases through the sweeps, and the
emission M-step never decreases F at fixed ``q``. Restarting the sweeps from the
pixel-wise posterior at each iteration, and the pseudo-likelihood step, are not ascent
steps of F, and F itself moves with ``alpha`` and ``beta`` (its ``log Z`` is dropped).
The objective reported per iteration, on whose change the fit converges, is therefore
:func:`local_free_energy` per unit weight: the free energy of each pixel's mixture with
prior ``softmax(alpha + beta n_i)`` (no partition function needed); it is monitored, not
guaranteed to increase.

**Computation.** A block is split into its ``2 ** ndim`` parity sub-lattices, each stored
class-major and contiguous with a zero border, so a sub-lattice's neighbour sums are sums
of contiguous slices of the others (on 2-D 8-neighbourhoods a separable 3 x 3 box), and
the sweeps, the free energy and the pseudo-likelihood terms run over strips of about
65,536 / K pixels that stay in cache. The log-emissions come from the pixel-wise kernel's
float64 plan (one GEMM on quadratic features, :func:`log_emission_t`); the sweeps and the
per-pixel terms run in float32 for float32 attributes (SIMD ``exp``), in float64
otherwise; every sum over pixels is float64. 2-D blocks run these steps in compiled
loops (:mod:`daskem.model._mf_kernels`: the same layout, a row of a sub-lattice at a
time, the log-densities in their float64 residual form, the emission statistics of a
block with every attribute observed in one pass), 3-D blocks in NumPy. Per-pixel
values are computed element by element in a fixed order (no BLAS or ``einsum`` across
classes), so a pixel's value does not depend on the strip or chunk it is computed in:
float32 stacks are chunking-invariant too, and give the float64 fit to about 1e-5
(tested).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gmm import (
    GMMModel,
    GMMParams,
    GMMStats,
    _fast_plan,
    _full_like,
    _moment_sums,
    _stats_from_shifted_sums,
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
    depends on pixels ``sweeps * n_colours`` steps away, the simulated field of the
    pseudo-likelihood (one colour sweep more) on pixels ``n_colours`` further, and the
    core's statistics use the neighbours' final values (one step more)."""
    return (int(sweeps) + 1) * n_colours(ndim, neighbourhood) + 1


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


# pixel_uniforms' hash (also in daskem.model._mf_kernels._uniform): a multiplier per dim,
# then the splitmix64 finaliser's two multipliers
_HASH_MULT = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9)
_SPLITMIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_STREAM = 0xD6E8FEB86659FD93  # the hash's start is stream * _STREAM (stream 0: 0)


def pixel_uniforms(shape: tuple[int, ...], origin: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) for every pixel, from its global grid index
    only (a hash: the same in any chunk, at every iteration); ``stream`` picks one of
    several independent sets (0: the drawn field, 1: the simulated field)."""
    idx = np.indices(shape, dtype=np.uint64)
    return _uniforms_at([idx[d] + np.uint64(origin[d]) for d in range(len(shape))], stream)


def _uniforms_at(coords: list[np.ndarray], stream: int = 0) -> np.ndarray:
    """:func:`pixel_uniforms` of the pixels at global indices ``coords`` (one uint64
    array per dim, broadcastable)."""
    with np.errstate(over="ignore"):
        h = np.full(
            np.broadcast_shapes(*(c.shape for c in coords)),
            np.uint64(stream) * np.uint64(_STREAM),
            dtype=np.uint64,
        )
        for d, c in enumerate(coords):
            g = c + np.uint64(1)
            h ^= g * np.uint64(_HASH_MULT[d % 3])
            h = (h << np.uint64(31)) | (h >> np.uint64(33))
        # splitmix64 finaliser
        h ^= h >> np.uint64(30)
        h *= np.uint64(_SPLITMIX[0])
        h ^= h >> np.uint64(27)
        h *= np.uint64(_SPLITMIX[1])
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

    Returns
    -------
    ndarray (*grid, K) float64
        Computed in float32 if ``log_emission`` is float32 (:func:`work_dtype`).
    """
    grid = tuple(log_emission.shape[:-1])
    K = log_emission.shape[-1]
    dtype = work_dtype(log_emission.dtype)

    def emission(sub, m):
        E = np.asarray(log_emission[sub], dtype=np.float64).reshape(m, K).T
        return E + np.asarray(alpha, dtype=np.float64)[:, None]

    def ok(sub, m):
        return None if allowed is None else np.asarray(allowed[sub]).reshape(m, K)

    lat = _Lattice(grid, origin, neighbourhood)
    swept = beta != 0.0 and bool(sweeps)
    f = _build_field(emission, ok, membership, beta, active, lat, dtype, swept=swept)
    if beta != 0.0 and sweeps:
        _sweep(f, float(beta), int(sweeps))
    return _field_to_grid(f, K)


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


# --------------------------------------------------------------------------- the kernel
#
# A block is split into its 2 ** ndim parity sub-lattices (pixels whose local index has
# the parities ``start``), each stored class-major and contiguous: ``(C, *counts)`` with
# a zero border of one element on every spatial side. A pixel's neighbour at offset ``o``
# lies on the sub-lattice of parities ``(start + o) % 2``, at the same index shifted by
# ``(start + o) // 2`` (-1, 0 or 1 per dim), so the neighbour sums of a whole sub-lattice
# are sums of contiguous slices of the others (no strided views, no masks), and every
# reduction over the classes runs across K contiguous planes. Sub-lattices are processed
# in strips of about _STRIP / K pixels so their temporaries stay in cache.
#
# q_ik = G_ik exp(beta N_ik) / S_i with G_ik = exp(L_ik - max_k L_ik), L the pixel-wise
# logits log p(x_i | k) + alpha_k (-inf where not allowed): max_k G_ik = 1, so while
# beta times the number of neighbours stays below _EXP_LIMIT no per-pixel maximum is
# needed in the sweeps (else they take the log-sum-exp route). Blocks of float32
# attributes are swept in float32 (SIMD exp); sums over pixels are float64.

# elements (pixels x components) per strip of a sub-lattice: its temporaries stay in cache
_STRIP = 65536
# columns per GEMM on quadratic features (a float64 feature block of D = 8 stays in L2)
_GEMM_COLS = 2048
# largest beta * (number of neighbours) swept without a per-pixel maximum, per dtype
_EXP_LIMIT = {np.dtype(np.float32): 60.0, np.dtype(np.float64): 600.0}


class _StartCache:
    """Pixel-wise starts of blocks kept by a process between passes (compiled loops).

    In a staged fit's prior stage the emissions and ``alpha`` are fixed and only
    ``beta`` changes, so every pass would compute the same log-densities and pixel-wise
    start of a block again (a quarter of a pass with diagonal covariances, over a third
    with full ones). What a start is made from is kept: the exponentials ``G`` and
    ``max L`` of the logits and the pixels' activity (:data:`_START_KEPT`), under a key
    of the block (origin, shape, a checksum of its attributes, labels and weights) and
    of the parameters it was made with, while the entries take at most the budget the
    model gives (the estimator gives one only when all of a stage's starts fit:
    ``hmrf.START_CACHE_FRACTION``). When a new entry does not fit, entries made with
    other parameters are dropped, and if it still does not fit it is not kept (the
    blocks kept first stay, rather than each pass evicting what the next one needs).
    The sweeps and statistics only read those arrays, so they are shared with the field
    that made them and with every field given them, not copied; a field given them
    makes its start from ``G`` (:func:`~daskem.model._mf_kernels.start_from_g`), the
    same values as from the logits. So a fit is the same, bit for bit, with or without
    the cache.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # key (its first item the parameters' digest) -> the kept arrays
        self.entries: dict[tuple, dict] = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _size(arrays: dict) -> int:
        return sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))

    def get(self, key: tuple) -> dict | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def put(self, key: tuple, arrays: dict, budget: int) -> None:
        size = self._size(arrays)
        with self.lock:
            if key in self.entries:
                return
            if self.nbytes + size > budget:  # entries of other parameters go first
                for k in [k for k in self.entries if k[0] != key[0]]:
                    self.nbytes -= self._size(self.entries.pop(k))
            if self.nbytes + size > budget:
                return
            self.entries[key] = dict(arrays)
            self.nbytes += size

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.nbytes = 0
            self.hits = self.misses = 0


_START_CACHE = _StartCache()
# the stacked arrays a kept start holds: those the sweeps and statistics only read, from
# which the rest of the start is made again (shared, not copied)
_START_KEPT = ("G", "maxL", "act", "counts", "nbr")


def start_bytes(pixels: int, n_components: int, dtype: Any) -> int:
    """Bytes the kept starts of blocks of ``pixels`` pixels in all (halos included) take
    (:class:`_StartCache`: ``G``, the activity and the float64 ``max L``)."""
    s = work_dtype(dtype).itemsize
    return int(pixels) * (s * (int(n_components) + 1) + 8)


def clear_start_cache() -> None:
    """Drop every start this process keeps (:class:`_StartCache`), at the end of a
    staged fit's prior stage."""
    _START_CACHE.clear()


def _params_fingerprint(params: SpatialParams) -> bytes:
    """A digest of the emission parameters and ``alpha`` (what a block's start depends on)."""
    gmm = params.gmm
    h = hashlib.blake2b(digest_size=16)
    h.update(gmm.covariance_type.encode())
    for a in (gmm.means, gmm.precisions_cholesky, gmm.weights, params.alpha):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    if gmm.component_class is not None:
        h.update(np.ascontiguousarray(gmm.component_class, dtype=np.int64).tobytes())
    return h.digest()


def _checksum(a: np.ndarray | None) -> str:
    """A block's array in a start's key: its sum (one pass over it, in its own float
    dtype; NaN if it holds a NaN: the block's origin and shape are in the key too)."""
    return (
        "-"
        if a is None
        else repr(float(np.sum(a, dtype=a.dtype if a.dtype.kind == "f" else np.int64)))
    )


def work_dtype(dtype: Any) -> np.dtype:
    """Arithmetic of the sweeps for attributes of ``dtype``: float32 for float32 data,
    else float64 (sums over pixels are float64 either way)."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float32 else np.dtype(np.float64)


class _Lattice:
    """The parity sub-lattices of a block and how their neighbours map onto each other.

    Attributes
    ----------
    starts : list of tuple
        Local parities of each sub-lattice (its pixels are ``[a::2, b::2, ...]``), in
        colour order.
    counts : list of tuple
        Its shape.
    views : list of list of (int, tuple)
        Per sub-lattice, per neighbour offset: the neighbour's sub-lattice and the index
        shift.
    """

    def __init__(self, grid: tuple[int, ...], origin: tuple[int, ...], neighbourhood: int):
        ndim = len(grid)
        self.grid = tuple(int(n) for n in grid)
        self.n_neighbours = len(neighbour_offsets(ndim, neighbourhood))
        self.strip = _STRIP // 8  # pixels per strip (set per number of components)
        subs = []
        for colour, lattices in enumerate(_colour_lattices(self.grid, origin, neighbourhood)):
            for start in lattices:
                subs.append((colour, start))
        self.colours = [c for c, _ in subs]
        self.starts = [s for _, s in subs]
        self.counts = [
            tuple((n - a + 1) // 2 for n, a in zip(self.grid, s, strict=True)) for s in self.starts
        ]
        index = {s: j for j, s in enumerate(self.starts)}
        self.views = []
        for start in self.starts:
            v = []
            for o in neighbour_offsets(ndim, neighbourhood):
                par = tuple((a + d) % 2 for a, d in zip(start, o, strict=True))
                shift = tuple((a + d - p) // 2 for a, d, p in zip(start, o, par, strict=True))
                v.append((index[par], shift))
            self.views.append(v)
        # 2-D 8-neighbourhood: the neighbour sums as a 3 x 3 box (see neighbours)
        self.box = None
        if ndim == 2 and self.n_neighbours == 8:
            self.box = [
                (index[(1 - a, b)], index[(a, 1 - b)], index[(1 - a, 1 - b)])
                for a, b in self.starts
            ]

    def sub(self, j: int) -> tuple[slice, ...]:
        """Slices of sub-lattice ``j`` in the block."""
        return tuple(slice(a, None, 2) for a in self.starts[j])

    def core_range(self, j: int, core: tuple[slice, ...]) -> tuple[slice, ...]:
        """Index ranges of sub-lattice ``j`` inside the block's ``core``."""
        return tuple(
            slice((c.start - a + 1) // 2, (c.stop - a + 1) // 2)
            for c, a in zip(core, self.starts[j], strict=True)
        )

    def strips(self, j: int, ranges: tuple[slice, ...] | None = None):
        """Row ranges (first dim) of sub-lattice ``j`` within ``ranges`` (default: all)."""
        cnt = self.counts[j]
        if ranges is None:
            ranges = tuple(slice(0, n) for n in cnt)
        if any(r.stop <= r.start for r in ranges):
            return []
        inner = math.prod(r.stop - r.start for r in ranges[1:])
        step = max(1, self.strip // max(1, inner))
        r = ranges[0]
        return [(a, min(r.stop, a + step)) for a in range(r.start, r.stop, step)]

    def neighbours(self, j: int, F: list[np.ndarray], rows, rest: tuple[slice, ...], out, ws):
        """``out`` = sum of the neighbours' values of sub-lattice ``j``'s pixels
        ``[rows, *rest]`` in the bordered arrays ``F`` (leading class axis); ``ws`` a
        :class:`_Workspace` for a temporary.

        Each pixel's sum is the same sequence of additions whatever the strip. On 2-D
        8-neighbourhoods the sum is separable: the three pixels of the row above and of
        the row below (two from the diagonal sub-lattice, one from the vertical one)
        are summed once per row for both rows that use them, then the two horizontal
        neighbours are added: 5 additions per pixel instead of 7."""
        r0, r1 = rows
        if self.box is not None:
            jv, jh, jd = self.box[j]
            a, b = self.starts[j]
            (c,) = rest

            def cols(h):
                return slice(1 + c.start + h, 1 + c.stop + h)

            up = slice(r0 + a, r1 + a + 1)  # source rows r0 + a - 1 .. r1 + a (bordered)
            T = ws.get("box", (out.shape[0], r1 - r0 + 1, c.stop - c.start), out.dtype)
            np.add(F[jd][:, up, cols(b - 1)], F[jd][:, up, cols(b)], out=T)
            T += F[jv][:, up, cols(0)]
            np.add(T[:, :-1], T[:, 1:], out=out)
            own = slice(1 + r0, 1 + r1)
            out += F[jh][:, own, cols(b - 1)]
            out += F[jh][:, own, cols(b)]
            return out
        v = []
        for jj, s in self.views[j]:
            idx = (slice(None), slice(1 + s[0] + r0, 1 + s[0] + r1)) + tuple(
                slice(1 + d + r.start, 1 + d + r.stop) for d, r in zip(s[1:], rest, strict=True)
            )
            v.append(F[jj][idx])
        np.add(v[0], v[1], out=out)
        for a in v[2:]:
            out += a
        return out


class _Workspace:
    """Reused strip buffers, by name (grown, never shrunk)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = math.prod(shape)
        key = (name, dtype.str)
        flat = self._flat.get(key)
        if flat is None or flat.size < n:
            flat = self._flat[key] = np.empty(max(n, 1), dtype=dtype)
        return flat[:n].reshape(shape)


def _lead_sum(A: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` = the sum of ``A`` over its leading axis, element by element in a fixed
    order (so a pixel's value does not depend on the strip it is computed in)."""
    np.copyto(out, A[0])
    for a in A[1:]:
        out += a
    return out


def _lead_dot(b: np.ndarray, A: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``out = sum_c b[c] * A[c]`` element by element in a fixed order (no BLAS)."""
    np.multiply(A[0], b[0], out=out)
    for c in range(1, A.shape[0]):
        np.multiply(A[c], b[c], out=tmp)
        out += tmp
    return out


@dataclass
class _Field:
    """The mean-field state of one block, per sub-lattice (see the comment above)."""

    lat: _Lattice
    dtype: np.dtype
    cc: np.ndarray | None  # (K,) class of each component; None: component k is class k
    groups: list[list[int]] | None  # per class, its components (None with ``cc``)
    n_classes: int
    Q: list[np.ndarray]  # bordered (C, *counts + 2): class probabilities
    q: list[np.ndarray] | None  # (K, *counts): component probabilities (None: Q's inner)
    G: list[np.ndarray]  # (K, *counts): exp(L - max L), or L - max L on the log route
    maxL: list[np.ndarray]  # (*counts) float64: max_k L
    act: list[np.ndarray | None]  # (*counts) 0/1 in ``dtype`` (None: all active)
    lnS: list[np.ndarray]  # (*counts): log normaliser of the pixel's last update
    qN: list[np.ndarray]  # (*counts): sum_c Q_c N_c of the pixel's last update
    log_route: bool
    ws: _Workspace = field(default_factory=lambda: _Workspace())
    core: tuple[slice, ...] | None = None
    #: 2-D blocks: the same arrays stacked over the sub-lattices, for the compiled loops
    #: (:mod:`daskem.model._mf_kernels`); the lists above are views of them
    stacked: dict[str, np.ndarray] | None = None
    #: the pixel-wise start sets ``lnS`` (False when sweeps follow, which set it)
    start_lnS: bool = True

    def class_sums(self, T: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Class sums ``out`` (C, ...) of component values ``T`` (K, ...)."""
        if self.groups is None:
            np.copyto(out, T)
            return out
        for c, ks in enumerate(self.groups):
            if not ks:
                out[c] = 0.0
                continue
            np.copyto(out[c], T[ks[0]])
            for k in ks[1:]:
                out[c] += T[k]
        return out

    def inner(self, j: int, rows=None, rest=None) -> tuple[slice, ...]:
        cnt = self.lat.counts[j]
        r0, r1 = rows if rows is not None else (0, cnt[0])
        rest = rest if rest is not None else tuple(slice(0, n) for n in cnt[1:])
        return (slice(None), slice(1 + r0, 1 + r1)) + tuple(
            slice(1 + r.start, 1 + r.stop) for r in rest
        )

    def comp(self, j: int, rows, rest) -> np.ndarray:
        """Component probabilities of pixels ``[rows, *rest]`` of sub-lattice ``j``."""
        if self.q is None:
            return self.Q[j][self.inner(j, rows, rest)]
        return self.q[j][(slice(None), slice(*rows), *rest)]


#: run 2-D blocks through the compiled loops (:mod:`daskem.model._mf_kernels`); False:
#: the NumPy kernel (3-D blocks always take it)
USE_COMPILED = True


_KERNELS: list = []  # [the compiled kernels' module, or None if numba cannot be imported]


def _compiled(lat: _Lattice) -> bool:
    if not (USE_COMPILED and len(lat.grid) == 2):
        return False
    if not _KERNELS:
        try:
            _mf_kernels = importlib.import_module(f"{__package__}._mf_kernels")
        except ImportError as e:  # e.g. a NumPy newer than the installed numba supports
            warnings.warn(
                f"the spatial prior's compiled loops are unavailable ({e}); using the "
                "NumPy kernel, 2-4x slower",
                RuntimeWarning,
                stacklevel=2,
            )
            _mf_kernels = None
        _KERNELS.append(_mf_kernels)
    return _KERNELS[0] is not None


def _uninitialised(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty``: the compiled loops' arrays whose every entry is written before it is
    read (a test fills them with NaN instead to check that)."""
    return np.empty(shape, dtype=dtype)


def _zero_outside(a: np.ndarray, counts, border: int = 0) -> np.ndarray:
    """``a`` (J, [planes,] rows, cols), stacked 2-D sub-lattices, with everything but
    each sub-lattice's pixels (``counts[j]`` rows and columns after ``border`` zero rows
    and columns) set to zero: its border and the padding up to the largest sub-lattice.
    The pixels themselves are left as they are (the start writes every one of them)."""
    for j, (n0, n1) in enumerate(counts):
        v = a[j]
        v[..., :border, :] = 0
        v[..., border + n0 :, :] = 0
        v[..., border : border + n0, :border] = 0
        v[..., border : border + n0, border + n1 :] = 0
    return a


def _stacked_arrays(
    lat: _Lattice, K: int, C: int, identity: bool, dtype, kept: dict | None = None
) -> dict:
    """The field's per-sub-lattice arrays stacked over the sub-lattices (sized to the
    largest; the rest is zero, like the borders: :func:`_zero_outside`; every pixel of
    a sub-lattice is written by its start); those of :data:`_START_KEPT` taken from
    ``kept`` if given (a kept start)."""
    J = len(lat.counts)
    big = tuple(max(c[d] for c in lat.counts) for d in range(len(lat.grid)))
    counts = lat.counts
    st = {
        "Q": _zero_outside(_uninitialised((J, C, *(n + 2 for n in big)), dtype), counts, 1),
        "q": None if identity else _zero_outside(_uninitialised((J, K, *big), dtype), counts),
        "lnS": _zero_outside(_uninitialised((J, *big), dtype), counts),
        "qN": np.zeros((J, *big), dtype=dtype),  # read before any sweep sets it
    }
    if kept is not None:
        st.update((k, kept[k]) for k in _START_KEPT)
        return st
    st.update(
        G=_zero_outside(_uninitialised((J, K, *big), dtype), counts),
        act=_zero_outside(_uninitialised((J, *big), dtype), counts),
        maxL=_zero_outside(_uninitialised((J, *big), np.float64), counts),
        counts=np.array(lat.counts, dtype=np.int64).reshape(J, len(lat.grid)),
        nbr=np.array(
            [[(jj, *shift) for jj, shift in v] for v in lat.views], dtype=np.int64
        ).reshape(J, lat.n_neighbours, 1 + len(lat.grid)),
    )
    return st


def _stacked_q(f: _Field) -> np.ndarray:
    """The stacked component probabilities, or an empty array when components are
    classes (the compiled loops then read ``Q``)."""
    q = f.stacked["q"]
    return q if q is not None else np.empty((0, 0, 0, 0), dtype=f.dtype)


def _build_field(
    emission,
    allowed,
    M: np.ndarray,
    beta: float,
    active: np.ndarray | None,
    lat: _Lattice,
    dtype: np.dtype,
    initial=None,
    swept: bool = False,
    start_cache: tuple[tuple, int] | None = None,
) -> _Field:
    """The pixel-wise start ``q_ik ∝ p(x_i | k) exp(alpha_k)`` of a block, per sub-lattice.

    ``emission(sl, m)`` gives the pixel-wise logits ``log p(x | k) + alpha_k`` (K, m)
    float64 of the ``m`` pixels of the block's slices ``sl`` (``log p`` = 0 where nothing
    is observed; the array is consumed),
    ``allowed(sl, m)`` the components they may take (m, K) or None; ``M`` is the (K, C)
    class membership. The pixels are taken in strips of each sub-lattice. ``initial(sl, m)``,
    if given, is the ``q`` (K, m) to start from instead (a carried ``q``; the normaliser
    bookkeeping then only holds after a sweep). ``swept``: sweeps follow (which set the
    normalisers: the start may skip them). ``start_cache``: the key and byte budget under
    which the compiled loops' start is kept in (or taken from) the process's
    :class:`_StartCache`.
    """
    K, C = M.shape
    lat.strip = max(1024, _STRIP // max(K, C))
    identity = C == K and np.array_equal(M, np.eye(K))
    cc = None if identity else np.argmax(M, axis=1)
    groups = None if identity else [np.flatnonzero(M[:, c]).tolist() for c in range(C)]
    log_route = beta * lat.n_neighbours > _EXP_LIMIT[dtype]
    f = _Field(
        lat, dtype, cc, groups, C, [], None if identity else [], [], [], [], [], [], log_route
    )
    cached = None
    if _compiled(lat):
        if start_cache is not None and initial is None:
            cached = _START_CACHE.get(start_cache[0])
        f.stacked = st = _stacked_arrays(lat, K, C, identity, dtype, cached)
        f.start_lnS = not swept
    for j, cnt in enumerate(lat.counts):
        act = None
        if active is not None:
            a = np.asarray(active[lat.sub(j)])
            if not a.all():
                act = a.astype(dtype)
        f.act.append(act)
        if f.stacked is not None:
            inner = tuple(slice(0, n) for n in cnt)
            f.maxL.append(st["maxL"][(j, *inner)])
            f.G.append(st["G"][(j, slice(None), *inner)])
            f.Q.append(st["Q"][(j, slice(None), *(slice(0, n + 2) for n in cnt))])
            if not identity:
                f.q.append(st["q"][(j, slice(None), *inner)])
            f.lnS.append(st["lnS"][(j, *inner)])
            f.qN.append(st["qN"][(j, *inner)])
            # every pixel of a fully active sub-lattice is active (the array is dropped
            # below if all are)
            if cached is None:
                st["act"][(j, *inner)] = 1.0 if act is None else act
            continue
        f.maxL.append(np.empty(cnt))
        f.G.append(np.empty((K, *cnt), dtype=dtype))
        f.Q.append(np.zeros((C, *(n + 2 for n in cnt)), dtype=dtype))
        if not identity:
            f.q.append(np.empty((K, *cnt), dtype=dtype))
        f.lnS.append(np.empty(cnt, dtype=dtype))
        f.qN.append(np.zeros(cnt, dtype=dtype))
    if f.stacked is not None and all(a is None for a in f.act):
        f.stacked["act"] = np.empty((0, 0, 0), dtype=dtype)
    if cached is not None:  # the start from the kept G
        for j, cnt in enumerate(lat.counts):
            _compiled_start_from_g(f, j, cnt)
        return f
    for j, cnt in enumerate(lat.counts):
        act = f.act[j]
        rest = tuple(slice(0, n) for n in cnt[1:])
        start = lat.starts[j]
        for rows in lat.strips(j):
            sl = (slice(start[0] + 2 * rows[0], start[0] + 2 * rows[1], 2),) + tuple(
                slice(a, None, 2) for a in start[1:]
            )
            shape = (rows[1] - rows[0], *cnt[1:])
            m = math.prod(shape)
            L = emission(sl, m)
            ok = allowed(sl, m)
            if f.stacked is not None:
                _compiled_start(f, j, rows, shape, L, ok)
            else:
                _numpy_start(f, j, rows, rest, shape, L, ok)
            if initial is not None:  # a carried q replaces the pixel-wise start
                T = f.ws.get("T", (K, *shape), dtype)
                np.copyto(T, initial(sl, m).reshape(K, *shape), casting="same_kind")
                if act is not None:
                    T *= act[slice(*rows)]
                Qv = f.Q[j][f.inner(j, rows, rest)]
                if f.cc is None:
                    np.copyto(Qv, T)
                else:
                    f.q[j][:, slice(*rows)] = T
                    np.copyto(Qv, f.class_sums(T, f.ws.get("QT", (C, *shape), dtype)))
    if start_cache is not None and f.stacked is not None and initial is None:
        _START_CACHE.put(start_cache[0], {k: f.stacked[k] for k in _START_KEPT}, start_cache[1])
    return f


def _numpy_start(f: _Field, j: int, rows, rest, shape, L: np.ndarray, ok) -> None:
    """The NumPy kernel's pixel-wise start of a strip of sub-lattice ``j`` from its logits
    ``L`` (K, m) and allowed components ``ok`` (m, K) or None."""
    K = L.shape[0]
    log_route = f.log_route
    if ok is not None:
        L[~ok.T] = -np.inf
    mx = L.max(axis=0)
    mx[~np.isfinite(mx)] = 0.0
    f.maxL[j][slice(*rows)] = mx.reshape(shape)
    G = f.G[j][:, slice(*rows)]
    np.subtract(L.reshape(K, *shape), mx.reshape(shape), out=G, casting="same_kind")
    if not log_route:
        with np.errstate(under="ignore"):
            np.exp(G, out=G)
    _update(f, j, rows, rest, None, 0.0, True)


def _compiled_start(f: _Field, j: int, rows, shape, L: np.ndarray, ok) -> None:
    """:func:`_numpy_start` by the compiled loops."""
    st = f.stacked
    K = L.shape[0]
    w = shape[1]
    q = _stacked_q(f)
    cc = f.cc if f.cc is not None else np.arange(K)
    _KERNELS[0].start_rows(
        np.ascontiguousarray(L, dtype=np.float64),
        np.empty((0, 0), dtype=bool) if ok is None else np.ascontiguousarray(ok),
        j, rows[0], w, bool(f.log_route), cc.astype(np.int64), st["G"], st["maxL"], st["Q"],
        q, st["act"], st["lnS"], f.ws.get("E", (K, w), f.dtype),
        f.ws.get("I", (K, w), np.int32), f.ws.get("inv", (w,), f.dtype), bool(f.start_lnS),
    )  # fmt: skip


def _compiled_start_from_g(f: _Field, j: int, cnt: tuple[int, ...]) -> None:
    """The start of sub-lattice ``j`` (``cnt`` pixels) from its kept ``G``
    (:class:`_StartCache`), as :func:`_compiled_start` made it from the logits."""
    st = f.stacked
    K = st["G"].shape[1]
    w = cnt[1]
    cc = f.cc if f.cc is not None else np.arange(K)
    _KERNELS[0].start_from_g(
        j, cnt[0], w, bool(f.log_route), cc.astype(np.int64), st["G"], st["Q"],
        _stacked_q(f), st["act"], st["lnS"], f.ws.get("E", (K, w), f.dtype),
        f.ws.get("I", (K, w), np.int32), f.ws.get("inv", (w,), f.dtype), bool(f.start_lnS),
    )  # fmt: skip


def _update(f: _Field, j: int, rows, rest, N: np.ndarray | None, beta: float, last: bool):
    """Set ``q`` of pixels ``[rows, *rest]`` of sub-lattice ``j`` from the neighbour sums
    ``N`` (C, ...) of the classes (None: the pixel-wise start). Every operation is
    element-wise, in a fixed order."""
    sl = (slice(None), slice(*rows), *rest)
    G = f.G[j][sl]
    shape = G.shape[1:]
    T = f.ws.get("T", G.shape, f.dtype)
    if N is None:
        if f.log_route:
            np.exp(G, out=T)
        else:
            np.copyto(T, G)
    else:
        np.multiply(N if f.cc is None else N[f.cc], f.dtype.type(beta), out=T)
        if f.log_route:
            T += G
            top = T.max(axis=0)
            T -= top
        np.exp(T, out=T)
        if not f.log_route:
            T *= G
    S = _lead_sum(T, f.ws.get("S", shape, f.dtype))
    # max_k G = 1 for a pixel with an allowed component, so S >= 1 there; S = 0 (nothing
    # allowed) gives q = 0 rather than NaN
    np.maximum(S, f.dtype.type(1e-30), out=S)
    if last:
        lnS = f.lnS[j][sl[1:]]
        np.log(S, out=lnS)
        if f.log_route and N is not None:
            lnS += top
    act = f.act[j]
    if act is None:
        np.reciprocal(S, out=S)
    else:
        np.divide(act[sl[1:]], S, out=S)
    Qv = f.Q[j][f.inner(j, rows, rest)]
    if f.cc is None:
        for k in range(T.shape[0]):  # class by class: a strided out with a broadcast S
            np.multiply(T[k], S, out=Qv[k])  # would make NumPy loop over the classes
            _floor_q(Qv[k])
        QT = Qv
    else:
        qv = f.q[j][sl]
        np.multiply(T, S, out=qv)
        _floor_q(qv)
        QT = f.class_sums(qv, f.ws.get("QT", (f.n_classes, *shape), f.dtype))
        np.copyto(Qv, QT)
    if last and N is not None:
        _lead_dot_arrays(QT, N, f.qN[j][sl[1:]], f.ws.get("tmp", shape, f.dtype))


def _floor_q(q: np.ndarray) -> None:
    """Probabilities below the square root of the dtype's smallest normal number set to 0,
    in place (as the compiled kernel's ``_normalise_store``): they change no sum, and
    products of two of them (neighbour sums times probabilities, the pseudo-likelihood's
    terms) would be subnormal numbers, whose arithmetic is many times slower on x86
    (float32 sweeps on a stack of well-separated classes: about a third of their time;
    docs/performance.md, trap 4)."""
    np.multiply(q, q >= np.sqrt(np.finfo(q.dtype).tiny), out=q)


def _lead_dot_arrays(A: np.ndarray, B: np.ndarray, out: np.ndarray, tmp: np.ndarray):
    """``out = sum_c A[c] * B[c]`` element by element in a fixed order."""
    np.multiply(A[0], B[0], out=out)
    for c in range(1, A.shape[0]):
        np.multiply(A[c], B[c], out=tmp)
        out += tmp
    return out


def _sweep(f: _Field, beta: float, sweeps: int) -> None:
    """``sweeps`` colour sweeps of the mean-field update over the whole block."""
    lat = f.lat
    if f.stacked is not None:
        st = f.stacked
        K = st["G"].shape[1]
        width = st["G"].shape[-1]
        q = _stacked_q(f)
        cc = f.cc if f.cc is not None else np.arange(K)
        _KERNELS[0].sweep_2d(
            st["Q"], st["G"], st["act"], st["lnS"], st["qN"], q, cc.astype(np.int64),
            st["nbr"], st["counts"], float(beta), int(sweeps), bool(f.log_route),
            np.empty((K, width), dtype=f.dtype), np.empty((K, width), dtype=np.int32),
            np.empty((f.n_classes, width), dtype=f.dtype), np.empty(width, dtype=f.dtype),
            np.empty(width, dtype=f.dtype),
        )  # fmt: skip
        return
    for s in range(sweeps):
        last = s == sweeps - 1
        for j, cnt in enumerate(lat.counts):
            rest = tuple(slice(0, n) for n in cnt[1:])
            for rows in lat.strips(j):
                shape = (f.n_classes, rows[1] - rows[0], *cnt[1:])
                N = lat.neighbours(j, f.Q, rows, rest, f.ws.get("N", shape, f.dtype), f.ws)
                _update(f, j, rows, rest, N, beta, last)


def _field_to_grid(f: _Field, K: int) -> np.ndarray:
    """``q`` of the whole block, shape ``(*grid, K)`` float64."""
    lat = f.lat
    q = np.zeros((*lat.grid, K))
    for j, cnt in enumerate(lat.counts):
        if not all(cnt):
            continue
        rows = (0, cnt[0])
        rest = tuple(slice(0, n) for n in cnt[1:])
        q[lat.sub(j)] = np.moveaxis(f.comp(j, rows, rest), 0, -1)
    return q


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


def log_emission_t(gmm: GMMParams, X: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """:func:`log_emission` of rows ``X`` (m, D) plus ``offset`` (K,), class-major: (K, m)
    float64.

    By the pixel-wise kernel's float64 plan (:mod:`daskem.model.gmm`), in sub-blocks of
    _GEMM_COLS rows: one GEMM of the expanded quadratic form for the components it
    bounds (every log-density within 1e-8), the exact residual form for the others;
    rows beyond the radius where a component's bound holds, or with missing attributes,
    by :func:`log_emission`. Every step is float64, so a pixel's value does not depend
    on the block around it beyond float64 rounding.
    """
    X = np.asarray(X)
    m, D = X.shape
    K = gmm.n_components
    weights = np.asarray(gmm.weights, dtype=np.float64)
    offset = np.zeros(K) if offset is None else np.asarray(offset, dtype=np.float64)
    plan = _fast_plan(gmm, np.dtype(np.float64), None) if np.all(weights > 0) else None
    if plan is None or m == 0:
        return np.ascontiguousarray(log_emission(gmm, X).T) + offset[:, None]
    const = offset - np.log(weights)
    A = np.empty_like(plan.A)
    A[plan.order] = plan.A  # natural order; the residual-form rows are zero
    A[:, 0] += const
    nq = plan.n_quad
    res = plan.order[nq:]
    inv_scale = None if plan.scale is None else (1.0 / plan.scale)[:, None]
    out = np.empty((K, m))
    bad = []
    for s in range(0, m, _GEMM_COLS):
        e = min(m, s + _GEMM_COLS)
        xT = X[s:e].T
        xc = xT - plan.shift[:, None]
        if inv_scale is not None:
            xc *= inv_scale
        phi = _quad_features(xc, plan.full)
        o = out[:, s:e]
        np.matmul(A, phi, out=o)
        for j, k in enumerate(res):  # components outside the bound: exact residual form
            y = plan.PT_res[j] @ (xT - plan.mu_res[j][:, None])
            o[k] = plan.c_res[j] + const[k] - 0.5 * np.einsum("dm,dm->m", y, y)
        r2 = phi[1 + D : 1 + 2 * D].sum(axis=0)
        with np.errstate(invalid="ignore"):
            ok = r2 <= plan.r2min
            if not ok.all():  # beyond a component's radius, or not finite
                far = np.flatnonzero(~ok)
                r = r2[far]
                trouble = (r > plan.r2max[:, None]).any(axis=0) | ~(r <= plan.r2safe)
                bad.append(s + far[trouble])
    bad = np.concatenate(bad) if bad else np.empty(0, dtype=np.intp)
    if bad.size:
        out[:, bad] = log_emission(gmm, X[bad]).T + offset[:, None]
    return out


def grid_emission(gmm: GMMParams, offset: np.ndarray):
    """``emission(X)``: :func:`log_emission_t` of the pixels of a grid block ``X`` (h, w,
    D) by the compiled residual form (:func:`~daskem.model._mf_kernels.log_gauss_diag`
    for diagonal and spherical covariances, :func:`~daskem.model._mf_kernels.log_gauss_full`
    for full and tied ones; every step float64, each pixel's sums in a fixed order);
    pixels with missing attributes by :func:`log_emission`. The factors are prepared
    once, for every strip of a block."""
    K, D = gmm.means.shape
    prec = np.asarray(gmm.precisions_cholesky, dtype=np.float64)
    cov = gmm.covariance_type
    if cov == "spherical":
        prec = np.repeat(prec[:, None], D, axis=1)
    elif cov == "tied":
        prec = np.repeat(prec[None], K, axis=0)
    prec = np.ascontiguousarray(prec)
    full = cov in ("full", "tied")
    tri = full and not np.any(np.tril(prec, -1))  # upper triangular: half the products
    if full and not tri:
        log_det = np.linalg.slogdet(prec)[1]
    else:
        log_det = np.log(np.abs(np.diagonal(prec, axis1=1, axis2=2)) if full else prec).sum(1)
    offset = np.asarray(offset, dtype=np.float64)
    const = log_det - 0.5 * D * np.log(2 * np.pi) + offset
    means = np.ascontiguousarray(gmm.means, dtype=np.float64)
    kernels = _KERNELS[0]

    def emission(X: np.ndarray) -> np.ndarray:
        h, w, _ = X.shape
        out = np.empty((K, h * w))
        cbuf = np.empty((D, max(w, 1)))
        tot = np.empty(max(w, 1))
        if full:
            ybuf = np.empty(max(w, 1))
            n_bad = kernels.log_gauss_full(X, means, prec, const, out, cbuf, ybuf, tri, tot)
        else:
            n_bad = kernels.log_gauss_diag(X, means, prec, const, out, cbuf, tot)
        if n_bad:  # missing attributes (or values beyond float64)
            with np.errstate(invalid="ignore"):
                bad = np.flatnonzero(~np.isfinite(out.sum(axis=0)))
            out[:, bad] = log_emission(gmm, X.reshape(h * w, D)[bad]).T + offset[:, None]
        return out

    return emission


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


def _drawn_field(f: _Field, origin: tuple[int, ...], active: np.ndarray | None) -> list:
    """One draw of the class field from ``q`` (one-hot, bordered like ``f.Q``), by each
    pixel's fixed uniform (:func:`pixel_uniforms`): the first class whose cumulative
    probability reaches it (the last if rounding leaves every one below); inactive
    pixels draw nothing."""
    lat, C = f.lat, f.n_classes
    out = []
    for j, cnt in enumerate(lat.counts):
        Z = np.zeros((C, *(n + 2 for n in cnt)), dtype=f.dtype)
        out.append(Z)
        if not all(cnt):
            continue
        u = _uniforms_at(_sub_coords(lat, j, origin))
        Q = f.Q[j][f.inner(j)]
        Zi = Z[f.inner(j)]
        cum = np.zeros(cnt, dtype=f.dtype)  # as np.cumsum over the classes adds them
        # a copy: the buffers are swapped and written below (never the caller's mask)
        below = np.ones(cnt, dtype=bool) if active is None else np.array(active[lat.sub(j)])
        lt = np.empty(cnt, dtype=bool)
        for c in range(C - 1):
            cum += Q[c]
            np.less(cum, u, out=lt)
            lt &= below  # below: every class before c stays under u (and active)
            np.greater(below, lt, out=Zi[c], casting="unsafe")  # below and not lt
            below, lt = lt, below
        np.copyto(Zi[C - 1], below)
    return out


def _sub_coords(lat: _Lattice, j: int, origin: tuple[int, ...]) -> list[np.ndarray]:
    """Global indices of sub-lattice ``j``'s pixels, one broadcastable array per dim."""
    cnt = lat.counts[j]
    ndim = len(cnt)
    coords = []
    for d, (a, n) in enumerate(zip(lat.starts[j], cnt, strict=True)):
        g = np.uint64(int(origin[d]) + a) + np.uint64(2) * np.arange(n, dtype=np.uint64)
        coords.append(g.reshape((n,) + (1,) * (ndim - 1 - d)))
    return coords


def _conditional(f: _Field, G: np.ndarray, N: np.ndarray, beta: float):
    """The posterior conditionals of pixels given their neighbours' class counts ``N``
    (C, ...): ``E_k ∝ G_k exp(beta N_class(k))`` unnormalised (K, ...) and
    their sum (``G`` as ``f.G``; on the log route the max is taken out first), in the
    compiled kernel's order of operations."""
    b = f.dtype.type(beta)
    Nk = N if f.cc is None else N[f.cc]
    with np.errstate(under="ignore", over="ignore"):
        if f.log_route:
            E = G + b * Nk
            E -= E.max(axis=0)
            np.exp(E, out=E)
        else:
            E = G * np.exp(b * Nk)
    return E, _lead_sum(E, np.empty(E.shape[1:], dtype=E.dtype))


def _simulated_field(f: _Field, Z: list, origin: tuple[int, ...], active, beta: float) -> None:
    """One colour sweep of the simulated field (Celeux, Forbes & Peyrard 2003) over the
    drawn field ``Z``: each pixel, colour after colour, draws its class from its
    posterior conditional given its neighbours' current classes
    (:func:`_conditional`), by its fixed uniform of stream 1 (:func:`pixel_uniforms`);
    inactive pixels keep no class."""
    lat, C, dt = f.lat, f.n_classes, f.dtype
    for j, cnt in enumerate(lat.counts):
        if not all(cnt):
            continue
        rest = tuple(slice(0, n) for n in cnt[1:])
        N = lat.neighbours(j, Z, (0, cnt[0]), rest, np.empty((C, *cnt), dtype=dt), f.ws)
        E, S = _conditional(f, f.G[j], N, beta)
        TC = f.class_sums(E, np.empty((C, *cnt), dtype=dt))
        ut = (_uniforms_at(_sub_coords(lat, j, origin), 1) * S).astype(dt)
        cum = np.zeros(cnt, dtype=dt)
        pick = np.zeros(cnt, dtype=np.intp)
        for c in range(C - 1):
            cum += TC[c]
            pick += cum < ut
        Zi = Z[j][f.inner(j)]
        Zi[...] = 0.0
        keep = np.ones(cnt, dtype=bool) if active is None else np.asarray(active[lat.sub(j)])
        idx = np.nonzero(keep)
        Zi[(pick[idx], *idx)] = 1.0


def _shift(gmm: GMMParams) -> np.ndarray:
    """The common shift of the statistics GEMM: the components' weighted mean."""
    w = np.asarray(gmm.weights, dtype=np.float64)
    means = np.asarray(gmm.means, dtype=np.float64)
    if not (w > 0).any():
        return means.mean(axis=0)
    return (w[:, None] * means).sum(axis=0) / w.sum()


def _quad_features(xc: np.ndarray, full: bool, out: np.ndarray | None = None) -> np.ndarray:
    """``[1, x, x^2, x_a x_b (a < b)]`` of feature-major rows ``xc`` (D, m), float64
    (into ``out`` if given)."""
    D, m = xc.shape
    M = 1 + D + D * (D + 1) // 2 if full else 1 + 2 * D
    phi = np.empty((M, m)) if out is None else out
    phi[0] = 1.0
    phi[1 : 1 + D] = xc
    np.square(xc, out=phi[1 + D : 1 + 2 * D])
    if full:
        o = 1 + 2 * D
        for a in range(D - 1):
            np.multiply(xc[a], xc[a + 1 :], out=phi[o : o + D - 1 - a])
            o += D - 1 - a
    return phi


def _gmm_stats_from_sums(
    acc: np.ndarray, shift: np.ndarray, gmm: GMMParams, weight: float, count: int
) -> GMMStats:
    """GMMStats from the statistics GEMM's sums ``acc`` (K, M) about ``shift``."""
    K, D = gmm.means.shape
    S0, S1, S2 = _moment_sums(acc, D, acc.shape[1] > 1 + 2 * D)
    means = np.asarray(gmm.means, dtype=np.float64)
    mean, m2 = _stats_from_shifted_sums(S0, S1, S2, shift, means)
    n_worst = max(16, K)
    return GMMStats(
        n=S0, mean=mean, m2=m2, weight=weight, count=count, n_worst=n_worst,
        worst_score=np.empty(0), worst_rows=np.empty((0, D)),
    )  # fmt: skip


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
    # solved on the complement of the null direction (alpha + constant), explicitly: the
    # minimum-norm step, without relying on the Hessian's rounding to reveal that direction
    U = np.zeros((n, n - 1))
    U[:K, : K - 1] = np.linalg.svd(np.eye(K) - 1.0 / K)[0][:, : K - 1]
    if estimate_beta:
        U[K, K - 1] = 1.0
    step = U @ np.linalg.lstsq(U.T @ H @ U, U.T @ g, rcond=1e-10)[0]
    big = np.abs(step).max() if step.size else 0.0
    if big > _MAX_STEP:
        step *= _MAX_STEP / big
    a = alpha + step[:K]
    a = a - a.mean()
    b = max(0.0, beta + float(step[K])) if estimate_beta else beta
    return a, b


def prior_step(
    params: SpatialParams, grad: np.ndarray, hess: np.ndarray, estimate_beta: bool
) -> SpatialParams:
    """The M-step of a staged fit's second stage: the emissions kept, ``alpha`` the log of
    their weights (centred), and, if estimated, ``beta`` by one damped Newton step on the
    pseudo-likelihood at that ``alpha``."""
    gmm = params.gmm
    lw = np.log(gmm.weights)
    alpha = lw - lw.mean()
    beta = float(params.beta)
    if estimate_beta:
        K = alpha.shape[0]
        g, h = float(grad[K]), float(hess[K, K])
        step = -g / h if h < 0 else math.copysign(_MAX_STEP, g)
        beta = max(0.0, beta + float(np.clip(step, -_MAX_STEP, _MAX_STEP)))
    return SpatialParams(gmm, alpha, beta)


def _prior_terms_strip(
    f, j, rows, rest, shape, qK, wj, actj, Z, alpha, a_dt, b_dt, amax, beta, need_pl,
    estimate_beta, alpha_terms, g, H, energy, weight,
):  # fmt: skip
    """The NumPy kernel's prior terms of a strip of sub-lattice ``j``'s core: the local
    free energy and weight (returned, added to ``energy`` and ``weight``) and the
    pseudo-likelihood's gradient and Hessian (added to ``g`` and ``H``; only ``beta``'s
    terms unless ``alpha_terms``)."""
    lat, ws, dt, cc, C = f.lat, f.ws, f.dtype, f.cc, f.n_classes
    K = qK.shape[0]
    m = qK.shape[1]
    sl = (slice(*rows), *rest)
    beta_dt = dt.type(beta)
    QC = qK if cc is None else f.class_sums(qK, ws.get("QC", (C, m), dt))
    N = lat.neighbours(j, f.Q, rows, rest, ws.get("Nc", (C, *shape), dt), ws)
    N = N.reshape(C, m)
    tmp = ws.get("tmp", (m,), dt)
    # the local free energy of each pixel (module docstring), from the normaliser
    # of its last update: log q_ik = L_ik - max_k L_ik + beta N'_ik - lnS_i
    qN = _lead_dot_arrays(QC, N, ws.get("qN", (m,), dt), tmp)
    if f.log_route:
        lg = alpha[:, None] + beta * (N if cc is None else N[cc]).astype(np.float64)
        top = lg.max(axis=0)
        logZ = np.log(_lead_sum(np.exp(lg - top), np.empty(m))) + top
    else:
        eN = np.multiply(N, beta_dt, out=ws.get("eN", (C, m), dt))
        np.exp(eN, out=eN)
        den = _lead_dot(b_dt, eN, ws.get("den", (m,), dt), tmp)
        logZ = np.log(den).astype(np.float64)
        logZ += amax
    e = f.maxL[j][sl].reshape(m) + f.lnS[j][sl].reshape(m)
    e -= logZ
    e += beta * (qN.astype(np.float64) - f.qN[j][sl].reshape(m))
    if actj is not None:
        e[~actj] = 0.0
    energy += float(wj @ e)
    weight += float(wj.sum())
    if need_pl:  # the pseudo-likelihood's gradient and Hessian
        Ns = lat.neighbours(j, Z, rows, rest, ws.get("Ns", (C, *shape), dt), ws)
        Ns = Ns.reshape(C, m)
        if f.log_route:
            lp = alpha[:, None] + beta * (Ns if cc is None else Ns[cc]).astype(np.float64)
            lp -= lp.max(axis=0)
            np.exp(lp, out=lp)
            p = (lp / _lead_sum(lp, np.empty(m))).astype(dt)
        else:
            eNs = np.multiply(Ns, beta_dt, out=ws.get("eNs", (C, m), dt))
            np.exp(eNs, out=eNs)
            den = _lead_dot(b_dt, eNs, ws.get("den", (m,), dt), tmp)
            np.reciprocal(den, out=den)
            p = ws.get("p", (K, m), dt)
            np.multiply(eNs if cc is None else eNs[cc], den, out=p)
            p *= a_dt[:, None]
        # the targets: the posterior conditionals at the simulated field's neighbours
        G = f.G[j][(slice(None), slice(*rows), *rest)].reshape(K, m)
        E, S = _conditional(f, G, Ns, beta)
        T = E.astype(np.float64) / S.astype(np.float64)
        if alpha_terms:
            wp = np.multiply(p, wj, out=ws.get("wp", (K, m), np.float64))
            swp = wp.sum(axis=1)
            g[:K] += T @ wj - swp
            H[:K, :K] -= np.diag(swp) - wp @ p.T.astype(np.float64)
        if estimate_beta:
            PC = p if cc is None else f.class_sums(p, ws.get("PC", (C, m), dt))
            nbar = _lead_dot_arrays(PC, Ns, ws.get("nbar", (m,), dt), tmp)
            tN = (T * (Ns if cc is None else Ns[cc])).sum(axis=0)
            g[K] += float(wj @ (tN - nbar))
            dN = np.subtract(Ns, nbar, out=ws.get("dN", (C, m), dt))
            # sum_c P_c (Ns_c - nbar)^2: the local variance, without cancellation
            sq = np.multiply(dN, dN, out=ws.get("sq", (C, m), dt))
            v = _lead_dot_arrays(PC, sq, ws.get("v", (m,), dt), tmp)
            H[K, K] -= float(wj @ v.astype(np.float64))
            if alpha_terms:
                hab = (wp * (dN if cc is None else dN[cc])).sum(axis=1)
                H[:K, K] -= hab
                H[K, :K] -= hab
    return energy, weight


def _core_ranges(lat: _Lattice, core: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each sub-lattice's local parities (J, 2) and its core's row and column ranges
    (J, 4), for the compiled loops."""
    J = len(lat.counts)
    starts = np.array(lat.starts, dtype=np.int64).reshape(J, 2)
    ranges = np.zeros((J, 4), dtype=np.int64)
    for j in range(J):
        cr = lat.core_range(j, core)
        ranges[j] = (cr[0].start, max(cr[0].start, cr[0].stop), cr[1].start, cr[1].stop)
    return starts, ranges


def _compiled_prior_terms(
    f, alpha, a_dt, b_dt, amax, beta, w64, starts, ranges, origin, need_pl, estimate_beta,
    alpha_terms, g, H,
):  # fmt: skip
    """The prior terms of a block's core (as :func:`_prior_terms_strip` sums them) by the
    compiled loops of :mod:`daskem.model._mf_kernels` (``w64`` the block's float64
    weights, ``starts`` and ``ranges`` from :func:`_core_ranges`)."""
    st = f.stacked
    Z = _zero_outside(_uninitialised(st["Q"].shape, st["Q"].dtype), st["counts"], 1)
    K = alpha.shape[0]
    cc = (f.cc if f.cc is not None else np.arange(K)).astype(np.int64)
    if need_pl:
        origin = np.asarray(origin, dtype=np.int64)
        _KERNELS[0].drawn_field_2d(st["Q"], st["act"], st["counts"], starts, origin, Z)
        _KERNELS[0].simulated_field_2d(
            Z, st["G"], st["act"], cc, st["q"] is not None, st["nbr"], st["counts"], starts,
            origin, float(beta), bool(f.log_route),
        )  # fmt: skip
    energy, weight = _KERNELS[0].stats_2d(
        st["Q"], _stacked_q(f), cc, Z, st["G"], st["maxL"], st["lnS"], st["qN"], w64,
        st["act"], st["nbr"], st["counts"], starts, ranges, alpha, a_dt, b_dt, float(amax),
        float(beta), bool(f.log_route), bool(need_pl), bool(estimate_beta), bool(alpha_terms),
        g, H,
    )  # fmt: skip
    return float(energy), float(weight)


def _block_statistics(
    f: _Field,
    params: SpatialParams,
    data: np.ndarray,
    w: np.ndarray,
    active: np.ndarray | None,
    core: tuple[slice, ...],
    origin: tuple[int, ...],
    estimate_beta: bool,
    emissions: bool = True,
) -> SpatialStats:
    """The statistics of a block's core from its swept field ``f`` (without the emission
    statistics, left zero, and the pseudo-likelihood's terms in ``alpha``, when
    ``emissions`` is False: a staged fit's prior stage, which fits ``beta`` alone).

    Per strip of each sub-lattice: the local free energy, the pseudo-likelihood's
    gradient and Hessian, and the emission statistics (one float64 GEMM on quadratic
    features about a common shift; partly observed pixels through
    :func:`~daskem.model.missing.resp_stats`). Per-pixel values are computed element by
    element in the sweeps' dtype, every sum over pixels in float64.
    """
    gmm = params.gmm
    K, D = gmm.means.shape
    C = f.n_classes
    alpha = np.asarray(params.alpha, dtype=np.float64)
    beta = float(params.beta)
    dt, cc, lat, ws = f.dtype, f.cc, f.lat, f.ws
    need_pl = estimate_beta or beta != 0.0
    Z = None
    if need_pl and f.stacked is None:
        Z = _drawn_field(f, origin, active)
        _simulated_field(f, Z, origin, active, beta)
    # the prior's normaliser: sum_k exp(alpha_k + beta N_class(k)) = sum_c b_c exp(beta N_c)
    amax = float(alpha.max())
    a = np.exp(alpha - amax)
    b = np.zeros(C)
    np.add.at(b, np.arange(K) if cc is None else cc, a)
    a_dt, b_dt = a.astype(dt), b.astype(dt)
    full = _full_like(gmm.covariance_type, K)
    shift = _shift(gmm)
    acc = np.zeros((K, 1 + D + D * (D + 1) // 2 if full else 1 + 2 * D))
    energy = weight = w_used = 0.0
    count = n_excluded = n_empty = n_partial_rows = 0
    g = np.zeros(K + 1)
    H = np.zeros((K + 1, K + 1))
    partial = None
    with np.errstate(invalid="ignore", over="ignore"):
        complete_block = bool(np.isfinite(np.sum(data[core])))
    compiled = f.stacked is not None
    if compiled:  # the prior's terms by the compiled loops, the rest below
        starts, ranges = _core_ranges(lat, core)
        w64 = np.asarray(w, dtype=np.float64)
        energy, weight = _compiled_prior_terms(
            f, alpha, a_dt, b_dt, amax, beta, w64, starts, ranges, origin, need_pl,
            estimate_beta, emissions, g, H,
        )  # fmt: skip
        if complete_block:  # the emission statistics in one compiled pass too
            if emissions:
                _KERNELS[0].emission_sums_2d(
                    f.stacked["Q"], _stacked_q(f), data, w64, starts, ranges, shift, full, acc
                )
            wc = w[core]
            used = None if active is None else active[core]
            wu = wc if used is None else wc[used]
            n = int(wc.size)
            n_excl = 0 if used is None else n - int(np.count_nonzero(used))
            if n and used is None and not any(wc.strides):  # one weight for all (no weights)
                v = float(wc.flat[0])
                w_sum, w_count = v * n, n if v != 0.0 else 0
            else:
                w_sum, w_count = float(wu.sum()), int(np.count_nonzero(wu))
            if not estimate_beta:
                g[K] = 0.0
            return SpatialStats(
                _gmm_stats_from_sums(acc, shift, gmm, w_sum, w_count),
                energy, weight, g, H, n_excluded=n_excl, n_empty=0, n_partial=0,
            )  # fmt: skip
    for j in range(len(lat.counts)):
        cr = lat.core_range(j, core)
        sub = lat.sub(j)
        for rows in lat.strips(j, cr):
            rest = cr[1:]
            sl = (slice(*rows), *rest)
            shape = (rows[1] - rows[0], *(r.stop - r.start for r in rest))
            m = math.prod(shape)
            qK = ws.get("qK", (K, *shape), dt)
            np.copyto(qK, f.comp(j, rows, rest))
            qK = qK.reshape(K, m)
            wj = w[sub][sl].reshape(m)
            actj = None if active is None else active[sub][sl].reshape(m)
            R = np.multiply(qK, wj, out=ws.get("R", (K, m), np.float64))
            if not compiled:
                energy, weight = _prior_terms_strip(
                    f, j, rows, rest, shape, qK, wj, actj, Z, alpha, a_dt, b_dt, amax,
                    beta, need_pl, estimate_beta, emissions, g, H, energy, weight,
                )  # fmt: skip
            # the emission statistics with q as responsibilities
            xv = data[sub][sl]
            xT = np.moveaxis(xv, -1, 0).reshape(D, m)
            complete_all = complete_block
            if not complete_all:
                with np.errstate(invalid="ignore", over="ignore"):
                    complete_all = bool(np.isfinite(xT.sum()))
            if complete_all:
                used = None if actj is None else actj
                seen_n = m
            else:
                fin = np.isfinite(xT)
                complete = fin.all(axis=0)
                seen = complete | fin.any(axis=0)
                seen_n = int(seen.sum())
                used = complete if actj is None else complete & actj
            n_empty += m - seen_n
            if actj is None:
                n_excluded += m - seen_n
            else:
                n_excluded += m - int((actj if complete_all else seen & actj).sum())
            wu = wj if used is None else wj[used]
            w_used += float(wu.sum())
            count += int(np.count_nonzero(wu))
            if not emissions:
                if not complete_all:
                    n_partial_rows += int(np.count_nonzero(~complete & seen & (wj > 0)))
                continue
            xc = ws.get("xc", (D, m), np.float64)
            np.subtract(xT, shift[:, None], out=xc)
            if used is not None and not complete_all:
                xc[:, ~used] = 0.0
                R[:, ~used] = 0.0
                rest_rows = np.flatnonzero(~complete & seen & (wj > 0))
                if rest_rows.size:  # partly observed: conditional expectations
                    part = resp_stats(
                        xT[:, rest_rows].T,
                        qK[:, rest_rows].T.astype(np.float64),
                        gmm,
                        wj[rest_rows],
                    )
                    partial = part if partial is None else partial + part
            for s in range(0, m, _GEMM_COLS):
                e = min(m, s + _GEMM_COLS)
                phi = ws.get("phi", (acc.shape[1], e - s), np.float64)
                acc += R[:, s:e] @ _quad_features(xc[:, s:e], full, phi).T
    emission = _gmm_stats_from_sums(acc, shift, gmm, w_used, count)
    if partial is not None:
        emission = emission + partial
    if not estimate_beta:
        g[K] = 0.0
    return SpatialStats(
        emission,
        energy,
        weight,
        g,
        H,
        n_excluded=n_excluded,
        n_empty=n_empty,
        n_partial=emission.n_partial if emissions else n_partial_rows,
    )


@dataclass(frozen=True)
class SpatialGMMModel:
    """The hidden Markov random field mixture for the EM engine (blocks are
    :class:`SpatialBlock`; ``sample_weight`` and ``labels`` are grid-shaped like
    ``block.data[..., 0]``)."""

    emission: GMMModel
    neighbourhood: int = 8
    sweeps: int = 3
    estimate_beta: bool = False
    #: False: the emissions are kept (those of the pixel-wise mixture, the first stage
    #: of a staged fit), ``alpha`` is their weights' log and only ``beta`` is fitted
    fit_emissions: bool = True
    #: bytes of blocks' pixel-wise starts a process may keep between the passes of a
    #: staged fit's prior stage (:class:`_StartCache`; 0: none)
    start_cache_bytes: int = 0

    # ---- the EM iteration --------------------------------------------------------

    def _field(
        self,
        params: SpatialParams,
        data: np.ndarray,
        origin: tuple[int, ...],
        labels: np.ndarray | None,
        active: np.ndarray | None,
        q_start: np.ndarray | None = None,
    ) -> _Field:
        """The mean-field state of a block after the sweeps (from ``q_start`` (*ext, K) if
        given, else from the pixel-wise posterior)."""
        gmm = params.gmm
        D = data.shape[-1]
        lab = None if labels is None else np.asarray(labels)

        lat = _Lattice(data.shape[:-1], origin, self.neighbourhood)
        direct = grid_emission(gmm, params.alpha) if _compiled(lat) else None

        def emission(sub, m):
            if direct is not None:
                return direct(data[sub])
            return log_emission_t(gmm, data[sub].reshape(m, D), params.alpha)

        def ok(sub, m):
            return None if lab is None else _allowed(lab[sub], gmm)

        beta = float(params.beta)
        dtype = work_dtype(data.dtype)
        M = class_membership(gmm)
        start = None
        if q_start is not None and beta != 0.0 and self.sweeps:
            K = gmm.n_components

            def start(sub, m):
                return np.asarray(q_start[sub]).reshape(m, K).T

        swept = beta != 0.0 and bool(self.sweeps)
        cache = None
        # a start does not depend on beta: the stage's first pass (at beta = 0 after the
        # pixel-wise stage, with no sweeps) keeps the starts its passes with the prior use
        if self.start_cache_bytes > 0 and not self.fit_emissions and start is None:
            key = (
                _params_fingerprint(params), tuple(origin), data.shape, data.dtype.str,
                _checksum(data), _checksum(lab), _checksum(active), int(self.neighbourhood),
                bool(beta * lat.n_neighbours > _EXP_LIMIT[dtype]),
            )  # fmt: skip
            cache = (key, int(self.start_cache_bytes))
        f = _build_field(emission, ok, M, beta, active, lat, dtype, start, swept, cache)
        if beta != 0.0 and self.sweeps:
            _sweep(f, beta, int(self.sweeps))
        return f

    def responsibilities(
        self,
        params: SpatialParams,
        block: SpatialBlock,
        labels: np.ndarray | None = None,
        active: np.ndarray | None = None,
    ) -> np.ndarray:
        """Mean-field ``q`` of a block, shape (*ext, K) float64 (swept in float32 for
        float32 attributes, :func:`work_dtype`)."""
        data = np.asarray(block.data)
        f = self._field(params, data, block.origin, labels, active)
        return _field_to_grid(f, params.n_components)

    def block_stats(
        self,
        params: SpatialParams,
        block: SpatialBlock,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> SpatialStats:
        return self._stats(params, block, sample_weight, labels)[0]

    def block_stats_carried(
        self,
        params: SpatialParams,
        block: SpatialBlock,
        q_start: np.ndarray | None,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> tuple[SpatialStats, np.ndarray]:
        """Prototype of the E-step with ``q`` carried between iterations (not yet used
        by the engine, which keeps no per-pixel state).

        The sweeps start from ``q_start`` (*ext, K), the previous iteration's final
        ``q`` over the extended block (None: the pixel-wise posterior, the first
        iteration), instead of the pixel-wise posterior. Returns the statistics and the
        new ``q`` of the core, (*core, K) in :func:`work_dtype`, for the next
        iteration. With the whole image's ``q`` kept between iterations the halo is
        still :func:`halo_depth` of the sweeps per iteration: one sweep per iteration
        needs ``n_colours + 1`` pixels instead of ``3 * n_colours + 1`` for three. At
        fixed ``alpha`` and ``beta`` the iteration is a coordinate ascent of F (sweeps,
        then the emission M-step at fixed ``q``; tested).
        """
        stats, f = self._stats(params, block, sample_weight, labels, q_start)
        q = _field_to_grid(f, params.n_components)[f.core]
        return stats, q.astype(f.dtype)

    def _stats(self, params, block, sample_weight, labels, q_start=None):
        data = np.asarray(block.data)
        grid = data.shape[:-1]
        active = None
        if sample_weight is None:
            w = np.broadcast_to(np.float64(1.0), grid)
        else:
            w = np.asarray(sample_weight, np.float64)
            active = np.isfinite(w) & (w > 0)
            w = np.where(active, w, 0.0)
            if active.all():
                active = None
        if labels is not None and self.emission.label_weight != 1.0:
            w = np.where(np.asarray(labels) >= 0, w * self.emission.label_weight, w)
        f = self._field(params, data, block.origin, labels, active, q_start)
        core = tuple(slice(*c.indices(n)[:2]) for c, n in zip(block.core, grid, strict=True))
        f.core = core
        beta_terms = self.estimate_beta
        stats = _block_statistics(
            f, params, data, w, active, core, block.origin, beta_terms, self.fit_emissions
        )
        return stats, f

    def m_step(self, stats: SpatialStats, params: SpatialParams) -> tuple[SpatialParams, list]:
        if not self.fit_emissions:
            return prior_step(params, stats.grad, stats.hess, self.estimate_beta), []
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

    def converged(self, change: float, tol: float, old: SpatialParams, new: SpatialParams) -> bool:
        """EM's rule, ``|change| < tol`` of the objective; the prior stage of a staged fit
        (``fit_emissions=False``), which fits ``beta`` alone, stops when its step is
        below ``tol``."""
        if self.fit_emissions or not self.estimate_beta:
            return abs(change) < tol
        return abs(float(new.beta) - float(old.beta)) < tol

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
        q = self.responsibilities(params, block, labels)
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
