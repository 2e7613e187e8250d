"""The EM engine over Dask: one map-reduce graph per iteration.

This is the only module that builds Dask graphs. It knows nothing about
Gaussian mixtures: it drives any *model* object that provides the four
operations below, over data given as row-chunked Dask arrays.

What a model must provide
-------------------------
``block_stats(params, X, sample_weight=None, labels=None) -> stats``
    Pure NumPy: the fused E-step and sufficient statistics of one block of rows
    (``X`` of shape (n, D), ``sample_weight`` (n,) or None, ``labels`` (n,) of int or
    None). Must accept ``n == 0``. The returned record must be small (independent of
    ``n``) and support an associative ``stats_a + stats_b``: the engine reduces them
    in a tree of arbitrary shape.
``m_step(stats, params) -> (new_params, events)``
    Pure NumPy, runs on the client: new parameters from the reduced statistics, and a
    list of dicts describing anything notable (e.g. re-seeded components). It may raise
    ``ValueError`` for unusable statistics (e.g. non-finite input).
``objective(stats) -> float``
    The objective at the parameters the statistics were computed with, *per unit of
    sample weight* (the mean log-likelihood per sample for a mixture). EM guarantees
    it never decreases; convergence is tested on its change.
``params``
    Any picklable object. It is put into each iteration's graph once, as a single
    task that every block task depends on, so it travels to each worker once per
    iteration rather than once per block.

An iteration computes ``stats = sum_blocks block_stats(params_t, block)``,
``objective(stats)`` (the objective at ``params_t``), and ``params_{t+1} = m_step(stats)``,
with exactly one ``dask.compute``. This matches scikit-learn's bookkeeping: the lower
bound reported after an iteration is the one of the parameters before its M-step.

Optionally, ``to_vector(params) -> ndarray`` and ``from_vector(vector, like) -> params |
None`` (None: not a valid parameter set) let :func:`fit_em_local` extrapolate EM steps
(SQUAREM) on in-memory samples.

Other public helpers: :func:`prepare` (everything a fit needs before EM in one pass:
the cache, a reproducible random sample drawn chunk-wise, and a bounded summary of the
labels reduced on the workers), :func:`draw_sample` (the sample alone) and
:func:`map_rows` (apply a row-wise NumPy function to every block, lazily, with the
parameters shipped once).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dask
import dask.array as da
import numpy as np
from dask import delayed

__all__ = [
    "ChunkedData",
    "EMModel",
    "EMResult",
    "IterationInfo",
    "WorkerMemoryError",
    "as_chunked",
    "cache_data",
    "cluster_memory",
    "draw_sample",
    "em_pass",
    "fit_em",
    "fit_em_local",
    "fit_em_many",
    "frame_bytes",
    "keep_frames",
    "LabelSummary",
    "Prepared",
    "prepare",
    "row_keys",
    "Start",
    "map_rows",
    "pass_graph",
    "relabel",
]

logger = logging.getLogger("daskem")


class WorkerMemoryError(RuntimeError):
    """Workers kept dying while computing a pass (typically out of memory)."""


class EMModel(Protocol):
    """The interface the engine drives (see the module docstring)."""

    def block_stats(self, params: Any, X: np.ndarray, sample_weight=None, labels=None) -> Any: ...

    def m_step(self, stats: Any, params: Any) -> tuple[Any, list[dict]]: ...

    def objective(self, stats: Any) -> float: ...


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class GridLayout:
    """How row chunks tile a grid, for models whose blocks see their neighbours.

    Row chunk ``b`` holds the pixels of spatial block ``b`` (blocks in C order, pixels in
    C order within a block), as :meth:`daskem.io.Stack.rows` makes them. Each pass block
    is the spatial block extended by ``depth`` pixels on every side (less at the grid's
    edges).
    """

    shape: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    depth: int

    @property
    def row_chunks(self) -> tuple[int, ...]:
        return block_rows(self.chunks)


def block_rows(chunks: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Pixels of every block of a grid chunked as ``chunks``, blocks in C order (the row
    chunks of its row view)."""
    sizes = np.ones(1, dtype=np.int64)
    for c in chunks:
        sizes = np.outer(sizes, np.asarray(c, dtype=np.int64)).ravel()
    return tuple(int(n) for n in sizes)


def _spatial_block(data, core, origin):
    from .model.spatial import SpatialBlock

    return SpatialBlock(np.asarray(data), core, origin)


def grid_blocks(
    layout: GridLayout,
    *grids: da.Array | None,
    kept: list | None = None,
) -> list[tuple]:
    """Per spatial block: ``(core, origin, *extended blocks)`` of each grid (or None).

    ``grids`` have the layout's spatial dims first (and any trailing dims in one chunk).
    Each extended block is one ``Delayed``: the block's own chunk, read by its own task,
    and its halo cut from its neighbours' *frames*. A chunk's frame (:func:`_frame`) is
    made by one more task that reads the chunk and keeps the slabs of width ``depth``
    along its faces, which is all its neighbours need. So every chunk is read twice per
    pass (not once per block its halo reaches, up to ``3 ** ndim`` times), and what
    waits in memory for the neighbours is frames, not chunks (a frame is about
    ``4 * depth / side`` of a 2-D chunk; chunks that do not hold a frame's worth of
    interior are their own frame). With ``kept`` (a list), the frames are instead read
    once now and kept in (cluster) memory for every pass; ``kept`` receives the persisted
    arrays, which the caller must hold as long as it uses the blocks (their ``Delayed``
    only name them).
    """
    bounds = [np.cumsum((0,) + c) for c in layout.chunks]
    h = int(layout.depth)
    ndim = len(layout.chunks)
    counts = [len(c) for c in layout.chunks]
    own, frames = [], []
    for g in grids:
        if g is None:
            own.append(None)
            frames.append(None)
            continue
        own.append(np.array(g.to_delayed(optimize_graph=True), dtype=object).reshape(counts))
        if h == 0:  # no halo, no frames
            frames.append(None)
            continue
        # a separately named copy of the graph: the frame's task reads the chunk itself
        fr = g.map_blocks(
            _frame,
            h,
            ndim,
            dtype=g.dtype,
            meta=np.empty((0,) * g.ndim, g.dtype),
            **({} if kept is None else {"name": f"daskem-frames-{uuid.uuid4().hex[:12]}"}),
        )
        if kept is not None:  # read once, kept for every pass (fresh key names, as cache_data)
            fr = fr.persist()
            kept.append(fr)  # the Delayed below only name the persisted results
        frames.append(np.array(fr.to_delayed(optimize_graph=True), dtype=object).reshape(counts))
    out = []
    for index in np.ndindex(*counts):
        lo = [int(b[i]) for b, i in zip(bounds, index, strict=True)]
        hi = [int(b[i + 1]) for b, i in zip(bounds, index, strict=True)]
        elo = [max(0, a - h) for a in lo]
        ehi = [min(n, b + h) for b, n in zip(hi, layout.shape, strict=True)]
        core = tuple(slice(a - e, b - e) for a, b, e in zip(lo, hi, elo, strict=True))
        # the chunks the extended block reaches, per dim
        reach = [
            range(int(np.searchsorted(b, e0, side="right")) - 1, int(np.searchsorted(b, e1)))
            for b, e0, e1 in zip(bounds, elo, ehi, strict=True)
        ]
        others = [n for n in itertools.product(*reach) if n != index]
        origins = [tuple(int(b[i]) for b, i in zip(bounds, n, strict=True)) for n in others]
        blocks = []
        for g, o, f in zip(grids, own, frames, strict=True):
            if g is None:
                blocks.append(None)
                continue
            if not others:  # the block is its chunk
                blocks.append(o[index])
                continue
            blocks.append(
                delayed(_assemble, pure=True)(
                    o[index],
                    tuple(lo),
                    [f[n] for n in others],
                    origins,
                    tuple(elo),
                    tuple(ehi),
                )  # fmt: skip
            )
        out.append((core, tuple(elo), *blocks))
    return out


def _frame(x: np.ndarray, h: int, ndim: int) -> tuple:
    """The slabs of width ``h`` along every face of a chunk ``x`` (spatial dims first), as
    ``((offset, slab), ...)`` copies (so the chunk itself is not kept); the whole chunk
    if it is not wider than ``2 h`` along some dim."""
    shape = x.shape[:ndim]
    if any(n <= 2 * h for n in shape):
        return (((0,) * ndim, np.array(x)),)
    out = []
    for d in range(ndim):
        for start in (0, shape[d] - h):
            sl = [slice(None)] * ndim
            sl[d] = slice(start, start + h)
            off = [0] * ndim
            off[d] = start
            out.append((tuple(off), np.array(x[tuple(sl)])))
    return tuple(out)


def _assemble(own, own_lo, frames, origins, elo, ehi) -> np.ndarray:
    """The extended block ``[elo, ehi)`` from its own chunk (at ``own_lo``) and the frames
    of the other chunks it reaches (chunks at ``origins``)."""
    own = np.asarray(own)
    ndim = len(elo)
    shape = tuple(b - a for a, b in zip(elo, ehi, strict=True))
    out = np.empty(shape + own.shape[ndim:], own.dtype)
    pieces = [(own_lo, own)] + [
        (tuple(c + o for c, o in zip(origin, off, strict=True)), slab)
        for origin, frame in zip(origins, frames, strict=True)
        for off, slab in frame
    ]
    for lo, a in pieces:
        src, dst = [], []
        for d in range(ndim):
            s0, s1 = max(lo[d], elo[d]), min(lo[d] + a.shape[d], ehi[d])
            if s1 <= s0:
                break
            src.append(slice(s0 - lo[d], s1 - lo[d]))
            dst.append(slice(s0 - elo[d], s1 - elo[d]))
        else:
            out[tuple(dst)] = a[tuple(src)]
    return out


def rows_to_grid(a: da.Array, layout: GridLayout) -> da.Array:
    """Row-chunked ``(n, ...)`` -> ``(*shape, ...)`` per block (the inverse of the row view)."""
    if a.chunks[0] != layout.row_chunks:
        a = a.rechunk({0: layout.row_chunks})
    trailing = a.shape[1:]
    if trailing:
        a = a.rechunk({i: -1 for i in range(1, a.ndim)})
    return da.reshape_blockwise(
        a, (*layout.shape, *trailing), chunks=(*layout.chunks, *((n,) for n in trailing))
    )


def grid_to_rows(g: da.Array, ndim: int) -> da.Array:
    """``(*spatial, ...)`` with ``ndim`` spatial dims -> row chunks, one per spatial block."""
    n = math.prod(g.shape[:ndim])
    trailing = g.shape[ndim:]
    if any(len(c) != 1 for c in g.chunks[ndim:]):
        g = g.rechunk({i: -1 for i in range(ndim, g.ndim)})
    if ndim == 1 and not trailing:
        return g
    return da.reshape_blockwise(g, (n, *trailing))


@dataclass
class ChunkedData:
    """Row-aligned Dask arrays prepared for repeated passes.

    The per-chunk ``Delayed`` handles are built once and reused by every iteration's
    graph, so building an iteration costs O(number of chunks) small tasks.

    Attributes
    ----------
    X : dask.array.Array of shape (n, D), one chunk along the feature axis
    sample_weight, labels : dask.array.Array of shape (n,) or None
    layout : GridLayout or None
        For models with neighbours (:mod:`daskem.model.spatial`): the passes then hand
        the model :class:`~daskem.model.spatial.SpatialBlock` s (grid blocks with a halo)
        and grid-shaped weights and labels instead of row chunks.
    keep_frames : bool
        With a layout: the frames the blocks' halos are cut from (:func:`grid_blocks`)
        are read once and kept in (cluster) memory for every pass, instead of read again
        by every pass (:func:`keep_frames` decides).
    """

    X: da.Array
    sample_weight: da.Array | None = None
    labels: da.Array | None = None
    layout: GridLayout | None = None
    keep_frames: bool = False
    _blocks: list[tuple] = field(default_factory=list, repr=False)
    _kept: list = field(default_factory=list, repr=False)
    _pass_blocks: list[tuple] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        X = self.X
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
        if len(X.chunks[1]) != 1:
            X = X.rechunk({1: -1})
        row_chunks = X.chunks[0]
        arrays = [X]
        for name, a in (("sample_weight", self.sample_weight), ("labels", self.labels)):
            if a is not None:
                # labels may be (n, L): one per date of a sequence row (daskem.model.hmm)
                two_d = name == "labels" and a.ndim == 2 and self.layout is None
                if a.shape[0] != X.shape[0] or (a.ndim != 1 and not two_d):
                    raise ValueError(
                        f"expected an array of shape ({X.shape[0]},) aligned with X, got {a.shape}"
                    )
                if a.chunks[0] != row_chunks or (two_d and len(a.chunks[1]) != 1):
                    a = a.rechunk({0: row_chunks, **({1: -1} if two_d else {})})
            arrays.append(a)
        self.X, self.sample_weight, self.labels = arrays
        xs = self.X.to_delayed(optimize_graph=True).ravel()
        ws = (
            self.sample_weight.to_delayed(optimize_graph=True).ravel()
            if self.sample_weight is not None
            else [None] * len(xs)
        )
        ys = (
            self.labels.to_delayed(optimize_graph=True).ravel()
            if self.labels is not None
            else [None] * len(xs)
        )
        self._blocks = list(zip(xs, ws, ys, strict=True))
        self._pass_blocks = self._blocks
        if self.layout is not None:
            lay = self.layout
            if self.X.chunks[0] != lay.row_chunks:
                raise ValueError("the row chunks do not match the grid layout")
            grids = [
                None if a is None else rows_to_grid(a, lay)
                for a in (self.X, self.sample_weight, self.labels)
            ]
            self._pass_blocks = [
                (delayed(_spatial_block, pure=True)(x, core, origin), w, y)
                for core, origin, x, w, y in grid_blocks(
                    lay, *grids, kept=self._kept if self.keep_frames else None
                )
            ]

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    def window_subset(
        self,
        windows: Sequence[tuple[Sequence[int], Sequence[int]]],
        keep: bool | None = None,
    ) -> ChunkedData:
        """A copy whose passes visit only these windows of the grid, each ``(lo, hi)`` in
        pixels (a box ``[lo, hi)``), with its halo as a block has in a full pass.

        Each window is one block whatever the chunking (it is cut from the chunks it
        reaches), so what a pass over the windows computes does not depend on the
        chunking. ``keep``: the windows are read once and kept in (cluster) memory for
        the copy's passes, held by the copy alone (None: when they take at most
        :data:`FRAME_MEMORY_FRACTION` of :func:`cluster_memory`); else every pass reads
        each window from the chunks it reaches (up to four chunks for a window smaller
        than a chunk).
        """
        lay = self.layout
        if lay is None:
            raise ValueError("windows need a grid layout")
        h = int(lay.depth)
        grids = [
            None if a is None else rows_to_grid(a, lay)
            for a in (self.X, self.sample_weight, self.labels)
        ]
        cuts, places = [], []
        for lo, hi in windows:
            lo, hi = [int(v) for v in lo], [int(v) for v in hi]
            if not all(0 <= a < b <= n for a, b, n in zip(lo, hi, lay.shape, strict=True)):
                raise ValueError(f"window {lo}-{hi} is not inside the grid {lay.shape}")
            elo = [max(0, a - h) for a in lo]
            ehi = [min(n, b + h) for b, n in zip(hi, lay.shape, strict=True)]
            box = tuple(slice(a, b) for a, b in zip(elo, ehi, strict=True))
            core = tuple(slice(a - e, b - e) for a, b, e in zip(lo, hi, elo, strict=True))
            cuts.append([None if g is None else g[box].rechunk(-1) for g in grids])
            places.append((core, tuple(elo)))
        arrays = [a for cut in cuts for a in cut if a is not None]
        nbytes = sum(int(a.nbytes) for a in arrays)
        if keep is None:
            keep = nbytes <= FRAME_MEMORY_FRACTION * cluster_memory()
        kept: list = []
        if keep and arrays:
            # read once, under fresh key names (as cache_data); the copy holds them
            tag = uuid.uuid4().hex[:12]
            kept = list(
                dask.persist(
                    *(
                        a.map_blocks(_identity, dtype=a.dtype, name=f"daskem-window-{i}-{tag}")
                        for i, a in enumerate(arrays)
                    )
                )
            )
            logger.info(
                "keeping %.3g GB of %d windows in memory for their passes", nbytes / 1e9, len(cuts)
            )
            it = iter(kept)
            cuts = [[None if a is None else next(it) for a in cut] for cut in cuts]
        blocks = []
        for cut, (core, origin) in zip(cuts, places, strict=True):
            x, wt, y = (
                None if a is None else a.to_delayed(optimize_graph=True).ravel()[0] for a in cut
            )
            blocks.append((delayed(_spatial_block, pure=True)(x, core, origin), wt, y))
        out = copy.copy(self)
        out._pass_blocks = blocks
        out._kept = list(self._kept) + kept  # the Delayed above only name them
        return out

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_chunks(self) -> int:
        return len(self._blocks)

    @property
    def row_chunks(self) -> tuple[int, ...]:
        return self.X.chunks[0]


def as_chunked(
    X: Any,
    sample_weight: Any = None,
    labels: Any = None,
    chunk_size: int | str = "auto",
) -> ChunkedData:
    """Wrap NumPy or Dask inputs as :class:`ChunkedData` (NumPy is split into row chunks).

    NumPy input is sent once to the workers of an active ``distributed`` client (and
    kept there for the passes) rather than travelling inside every iteration's graph.
    Dask input is left as it is: its chunks are read by the workers on every pass.
    ``chunk_size="auto"``: :func:`auto_chunk_rows`.
    """
    client = _distributed_client()
    if chunk_size == "auto":
        Xa = X if isinstance(X, da.Array) else np.asarray(X)
        row_bytes = Xa.dtype.itemsize * int(np.prod(Xa.shape[1:]))
        chunk_size = auto_chunk_rows(Xa.shape[0], row_bytes, _parallelism(client))

    def wrap(a, ndim):
        if a is None:
            return None
        if isinstance(a, da.Array):
            return a
        a = np.asarray(a)
        chunks = (chunk_size,) + (-1,) * (max(ndim, a.ndim) - 1)  # labels may be (n, T)
        arr = da.from_array(a, chunks=chunks)
        return arr.persist() if client is not None else arr

    return ChunkedData(wrap(X, 2), wrap(sample_weight, 1), wrap(labels, 1))


AUTO_CHUNK_BYTES = 32 * 2**20


def auto_chunk_rows(n: int, row_bytes: int, parallelism: int) -> int:
    """Rows per chunk for in-memory input: chunks of at most about 32 MiB (a scheduled task
    costs about 1 ms on a distributed cluster, docs/performance.md trap 8), at least two per
    thread that can run them, their number a multiple of the threads (so every thread
    gets the same work in a pass), and never below 4,096 rows."""
    par = max(parallelism, 1)
    n_chunks = max(2 * par, -(-n * max(row_bytes, 1) // AUTO_CHUNK_BYTES))
    n_chunks = -(-n_chunks // par) * par
    return int(max(4096, -(-n // n_chunks)))


def _parallelism(client) -> int:
    if client is not None:
        with contextlib.suppress(Exception):
            return int(sum(client.nthreads().values())) or 1
    return os.cpu_count() or 1


def _memory_limits() -> list[int]:
    """Each worker's memory limit (0: none) on the active distributed cluster; for the
    local schedulers one entry, this process's available memory."""
    client = _distributed_client()
    if client is not None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return [int(w.get("memory_limit") or 0) for w in workers]
    try:
        import psutil

        return [int(psutil.virtual_memory().available)]
    except ImportError:  # pragma: no cover
        return [0]


def cluster_memory() -> int:
    """Bytes of memory the active scheduler's workers may use (this process's available
    memory for the local schedulers)."""
    return sum(_memory_limits())


def process_memory() -> int:
    """Bytes of memory one process running block tasks may use: the smallest worker
    memory limit of the active distributed cluster (0 if a worker has none), this
    process's available memory for the local schedulers."""
    return min(_memory_limits(), default=0)


def run_on_workers(fn: Callable[[], Any]) -> None:
    """Call ``fn()`` (a module-level function) in this process and in every worker of the
    active distributed cluster, if any (e.g. to free what the model kept in them)."""
    fn()
    client = _distributed_client()
    if client is not None:
        client.run(fn)


def cache_data(data: ChunkedData, cache: bool | str = "auto", fraction: float = 0.5) -> ChunkedData:
    """Read the data once and keep it in (cluster) memory for the following passes.

    ``cache="auto"`` caches when the arrays take less than ``fraction`` of
    :func:`cluster_memory`; ``True`` always, ``False`` never (every pass streams the
    chunks from their source again). Cached row chunks of ``X`` are stored feature-major
    (Fortran-ordered), the layout the kernels read, so no pass transposes them again.
    """
    arrays = [a for a in (data.X, data.sample_weight, data.labels) if a is not None]
    nbytes = sum(a.nbytes for a in arrays)
    if cache == "auto":
        cache = nbytes < fraction * cluster_memory()
    if not cache:
        return data
    logger.info("caching %.3g GB of input in memory for the passes", nbytes / 1e9)
    tag = uuid.uuid4().hex[:12]
    # Persist under fresh key names: keys of the source graph held in memory would clash
    # with the same keys rebuilt differently by later graphs (e.g. the posterior's).
    X, w, y = (
        None
        if a is None
        else a.map_blocks(
            _feature_major if i == 0 else _identity, dtype=a.dtype, name=f"daskem-cache-{i}-{tag}"
        ).persist()
        for i, a in enumerate((data.X, data.sample_weight, data.labels))
    )
    return ChunkedData(X, w, y, data.layout)


#: the halos' frames are kept in memory between passes when they take at most this
#: fraction of :func:`cluster_memory` (:func:`keep_frames`)
FRAME_MEMORY_FRACTION = 0.125


def frame_bytes(data: ChunkedData) -> int:
    """Bytes of all the frames of ``data``'s grid blocks (:func:`_frame`: slabs of the
    halo's depth along every face of a chunk, or the whole chunk if it is not wider than
    twice the depth along some dim), over ``X``, the weights and the labels."""
    lay = data.layout
    if lay is None or int(lay.depth) == 0:
        return 0
    h = int(lay.depth)
    cells = 0
    for index in np.ndindex(*(len(c) for c in lay.chunks)):
        shape = [int(c[i]) for c, i in zip(lay.chunks, index, strict=True)]
        n = math.prod(shape)
        if any(m <= 2 * h for m in shape):
            cells += n
        else:
            cells += sum(2 * h * (n // m) for m in shape)
    per_cell = sum(
        a.dtype.itemsize * math.prod(a.shape[1:])
        for a in (data.X, data.sample_weight, data.labels)
        if a is not None
    )
    return int(cells * per_cell)


def keep_frames(data: ChunkedData, fraction: float | None = None) -> ChunkedData:
    """``data`` with its halos' frames read once and kept in (cluster) memory for every
    pass, when they take at most ``fraction`` (default :data:`FRAME_MEMORY_FRACTION`)
    of :func:`cluster_memory`; else ``data`` as it is (every pass reads each chunk
    twice: for its own block, and for its neighbours' halos).

    The frames are a few percent of the data for chunks much wider than the halo
    (about ``2 * ndim * depth / side``: 6.6 % for 1,024 x 1,024 chunks and 17-pixel
    halos), so with them kept a pass over a stack streamed from its store reads every
    chunk once, as a pixel-wise pass does.
    """
    if data.layout is None or data.keep_frames or int(data.layout.depth) == 0:
        return data
    nbytes = frame_bytes(data)
    frac = FRAME_MEMORY_FRACTION if fraction is None else fraction
    if nbytes > frac * cluster_memory():
        return data
    logger.info("keeping %.3g GB of halo frames in memory for the passes", nbytes / 1e9)
    return ChunkedData(data.X, data.sample_weight, data.labels, data.layout, keep_frames=True)


def _feature_major(block):
    """A cached chunk: feature-major, and a read-only view (nothing writes into cached data,
    and the kernels may keep what they derive from a read-only block while it lives)."""
    out = (block if block.flags.f_contiguous else np.asfortranarray(block)).view()
    out.flags.writeable = False
    return out


def _identity(block):
    return block


# --------------------------------------------------------------------------- passes


_BLAS_CONTROLLER: Any = None


def _one_blas_thread() -> None:
    """Make sure BLAS runs one thread in this process while block tasks run here.

    Distributed workers start with ``OMP/OPENBLAS/MKL_NUM_THREADS=1`` (the default
    ``distributed.nanny.pre-spawn-environ``), but a worker started with other settings
    would run every small GEMM of the kernel on oversubscribed BLAS threads, 3-40x slower
    (docs/performance.md trap 1). Local schedulers already run inside :func:`_local_blas_limit`
    (so nothing changes there); in a worker process the limit is set once and kept.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER = ThreadpoolController().select(user_api="blas")
        except Exception:  # pragma: no cover - threadpoolctl missing or unusable
            _BLAS_CONTROLLER = False
    if _BLAS_CONTROLLER and any(lib.num_threads > 1 for lib in _BLAS_CONTROLLER.lib_controllers):
        _BLAS_CONTROLLER.limit(limits=1)


def _block_task(model, candidates, x, w, y):
    _one_blas_thread()
    # every candidate's statistics from the same chunk, read once
    return tuple(model.block_stats(p, x, w, y) for p in candidates)


def _combine(*stats):
    out = list(stats[0])
    for s in stats[1:]:
        out = [a + b for a, b in zip(out, s, strict=True)]
    return tuple(out)


def _tree(leaves: Sequence, split_every: int, name: str):
    level = list(leaves)
    depth = 0
    while len(level) > 1:
        level = [
            delayed(_combine, pure=True)(
                *level[i : i + split_every], dask_key_name=(f"{name}-combine-{depth}", j)
            )
            for j, i in enumerate(range(0, len(level), split_every))
        ]
        depth += 1
    return level[0]


def pass_graph(model: EMModel, data: ChunkedData, candidates: Sequence[Any], split_every: int = 16):
    """The ``Delayed`` of one pass: ``block_stats`` on every chunk, tree-reduced.

    ``candidates`` is a sequence of parameter sets (e.g. the ``n_init`` restarts) that
    are all evaluated on each chunk while it is in memory; the result is a tuple of
    reduced statistics, one per candidate. The candidates and the model are single tasks
    every block task depends on, so they travel once per pass; the data enters only
    through the chunks' own tasks.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    name = f"daskem-pass-{uuid.uuid4().hex[:12]}"
    p = delayed(tuple(candidates), traverse=False, name=f"{name}-params")
    m = delayed(model, traverse=False, name=f"{name}-model")
    leaves = [
        delayed(_block_task, pure=True)(m, p, x, w, y, dask_key_name=(f"{name}-stats", i))
        for i, (x, w, y) in enumerate(data._pass_blocks)
    ]
    return _tree(leaves, split_every, name)


def em_pass(
    model: EMModel, data: ChunkedData, candidates: Sequence[Any], split_every: int = 16
) -> tuple:
    """One pass over the data with exactly one ``dask.compute``.

    Returns the reduced statistics of each candidate parameter set, as a tuple.
    """
    graph = pass_graph(model, data, candidates, split_every)
    try:
        stats = _compute(graph)
    except Exception as e:
        if type(e).__name__ == "KilledWorker":
            raise WorkerMemoryError(
                "Dask workers died repeatedly while computing the statistics of a chunk "
                f"({e}). This usually means a chunk's working set does not fit in a "
                "worker's memory: raise the worker memory limit (--memory-limit, "
                "distributed.worker.memory settings) or use smaller chunks (chunk_size, or "
                "rechunk the stack); see the worker logs for the cause."
            ) from e
        raise
    return stats


# --------------------------------------------------------------------------- cluster health


class ClusterUnavailable(RuntimeError):
    """No Dask worker was connected for longer than the allowed time."""


class WorkersPaused(WorkerMemoryError):
    """Every worker stayed paused at its memory limit for longer than the allowed time."""


@dataclass
class HealthWatch:
    """What :func:`watch_cluster` reports and when it gives up.

    ``report(message)`` receives one line per event: a worker lost, no worker connected
    (once per wait), every worker paused at its memory limit (once per episode).
    """

    report: Callable[[str], None]
    worker_timeout: float | None = None
    paused_timeout: float = 60.0
    poll: float = 2.0
    resume_hint: str = ""
    watcher: Any = field(default=None, repr=False)  # kept across passes


_WATCH: contextvars.ContextVar[HealthWatch | None] = contextvars.ContextVar(
    "daskem_watch", default=None
)


@contextlib.contextmanager
def watch_cluster(
    report: Callable[[str], None],
    *,
    worker_timeout: float | None = None,
    paused_timeout: float = 60.0,
    poll: float = 2.0,
    resume_hint: str = "",
):
    """Within this context, passes on a ``distributed`` cluster watch its workers.

    A pass polls the scheduler every ``poll`` seconds while it runs: lost workers are
    reported; with no worker connected the pass waits (reported once) and, after
    ``worker_timeout`` seconds (None: forever), raises :class:`ClusterUnavailable`; with
    every worker paused at its memory limit for ``paused_timeout`` seconds it raises
    :class:`WorkersPaused`. The pass's tasks are cancelled on the way out.
    """
    token = _WATCH.set(HealthWatch(report, worker_timeout, paused_timeout, poll, resume_hint))
    try:
        yield
    finally:
        _WATCH.reset(token)


class _Watcher:
    def __init__(self, client, settings: HealthWatch) -> None:
        self.client, self.s = client, settings
        self.known: set[str] | None = None
        self.empty_since: float | None = None
        self.paused_since: float | None = None

    def check(self) -> None:
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        now = time.monotonic()
        current = set(workers)
        if self.known is not None:
            for addr in sorted(self.known - current):
                self.s.report(f"worker {addr} left the cluster ({len(current)} connected)")
        self.known = current
        if not workers:
            if self.empty_since is None:
                self.empty_since = now
                limit = self.s.worker_timeout
                self.s.report(
                    "waiting for workers (0 connected) -- Ctrl-C to stop"
                    + (f", giving up after {limit:g} s" if limit is not None else "")
                    + (f"; {self.s.resume_hint}" if self.s.resume_hint else "")
                )
            if self.s.worker_timeout is not None and now - self.empty_since > self.s.worker_timeout:
                raise ClusterUnavailable(
                    f"no Dask worker connected for {self.s.worker_timeout:g} s: start workers "
                    "(or check why they died: their logs)"
                    + (f"; {self.s.resume_hint}" if self.s.resume_hint else "")
                )
            return
        if self.empty_since is not None:
            self.s.report(f"{len(workers)} worker(s) connected again")
        self.empty_since = None
        paused = [w for w in workers.values() if w.get("status") == "paused"]
        if len(paused) < len(workers):
            self.paused_since = None
            return
        if self.paused_since is None:
            self.paused_since = now
            self.s.report(_paused_message(paused, "paused"))
        elif now - self.paused_since > self.s.paused_timeout:
            raise WorkersPaused(_paused_message(paused, "stopped: workers stayed paused"))


def _paused_message(paused: list[dict], what: str) -> str:
    limits = sorted({int(w.get("memory_limit") or 0) for w in paused})
    shown = ", ".join(f"{n / 2**20:.0f} MiB" for n in limits if n) or "unknown"
    return (
        f"{what}: every worker is at its memory limit ({shown} per worker), so no task "
        "runs. Give workers more memory (--memory-limit, or the memory of the workers you "
        "start) or use smaller chunks (rechunk the stack, chunk_size)"
    )


def compute(*collections):
    """``dask.compute(*collections)``; under :func:`watch_cluster` on a ``distributed``
    cluster, through watched futures (same results)."""
    settings = _WATCH.get()
    client = _distributed_client() if settings is not None else None
    if client is None:
        return dask.compute(*collections)
    from distributed import wait

    if settings.watcher is None or settings.watcher.client is not client:
        settings.watcher = _Watcher(client, settings)
    watcher = settings.watcher
    watcher.check()  # workers lost since the last compute
    # nested lists of Delayed (as dask.compute takes them) become one Delayed each
    items = [c if dask.is_dask_collection(c) else delayed(c) for c in collections]
    futures = client.compute(items)
    try:
        while True:
            try:
                wait(futures, timeout=settings.poll)
                break
            except TimeoutError:
                watcher.check()
        return tuple(client.gather(futures))
    except BaseException:
        client.cancel(futures)
        raise


def _compute(graph):
    (out,) = compute(graph)
    return out


@dataclass
class IterationInfo:
    """What the engine reports after each iteration (to ``callback`` and the log)."""

    iteration: int
    lower_bound: float
    change: float
    seconds: float
    n_samples: int
    params: Any
    events: list[dict]
    converged: bool = False
    history: list[float] = field(default_factory=list)
    stats: Any = None
    candidate: int = 0
    stopped: bool = False

    @property
    def samples_per_second(self) -> float:
        return self.n_samples / self.seconds if self.seconds > 0 else math.inf


@dataclass
class EMResult:
    """Outcome of :func:`fit_em`."""

    params: Any
    lower_bound: float
    lower_bounds: list[float]
    n_iter: int
    converged: bool
    events: list[dict]
    stats: Any = None
    stopped: bool = False  # left behind by a better candidate (``select_after``)


def _distributed_client():
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return get_client()
    except ValueError:
        return None


def _local_blas_limit():
    """Pin BLAS to one thread while local threads run block tasks (distributed
    workers already set ``OMP/OPENBLAS/MKL_NUM_THREADS=1`` in their environment)."""
    if _distributed_client() is not None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def blas_one_thread():
    """Pin BLAS to one thread in this process (small GEMMs on an in-memory sample)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


@dataclass
class Start:
    """Where a candidate starts: its parameters and, to resume, its past iterations."""

    params: Any
    prev_lower_bound: float = -np.inf
    iteration: int = 0
    history: Sequence[float] = ()


def fit_em(
    model: EMModel,
    data: ChunkedData,
    params: Any,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    split_every: int = 16,
    prev_lower_bound: float = -np.inf,
    callback: Callable[[IterationInfo], None] | None = None,
    start_iteration: int = 0,
    history: Sequence[float] = (),
) -> EMResult:
    """Run EM from ``params`` until the change of the objective is below ``tol``.

    Parameters
    ----------
    model : EMModel
    data : ChunkedData
    params : object
        Initial parameters.
    tol : float
        Convergence threshold on the change of ``model.objective`` (per sample).
    max_iter : int
        Maximum number of iterations (passes over the data).
    split_every : int
        Fan-in of the reduction tree.
    prev_lower_bound : float
        Objective before the first iteration (``-inf`` for a fresh start; the last
        value for a warm start, as scikit-learn does).
    callback : callable, optional
        Called with an :class:`IterationInfo` after each iteration (e.g. to write a
        checkpoint); may raise to stop.
    start_iteration, history : int, sequence of float
        To resume a run from a checkpoint: the number of iterations already done and
        their objective values. Iterations are numbered on from ``start_iteration`` and
        ``max_iter`` counts them all, so a resumed run ends exactly where an
        uninterrupted one would.

    Returns
    -------
    EMResult
    """
    start = Start(params, prev_lower_bound, start_iteration, history)
    return fit_em_many(
        model,
        data,
        [start],
        tol=tol,
        max_iter=max_iter,
        split_every=split_every,
        callback=callback,
    )[0]


def fit_em_many(
    model: EMModel,
    data: ChunkedData,
    starts: Sequence[Start],
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    split_every: int = 16,
    callback: Callable[[IterationInfo], None] | None = None,
    select_after: int | None = None,
) -> list[EMResult]:
    """Run EM for several candidates at once, sharing every pass over the data.

    Each pass evaluates all still-running candidates on each chunk while it is in
    memory (one compute per pass); a candidate stops when it converges or reaches
    ``max_iter``. Every candidate follows exactly the path it would follow alone.

    Parameters
    ----------
    starts : sequence of Start
        Initial parameters (and resume state) of each candidate.
    select_after : int, optional
        Once every candidate has done this many iterations, only the one with the
        highest objective goes on; the others end with ``stopped=True``. EM never
        lowers the objective, so the survivor ends at least as high as any of them.
        None: every candidate runs to the end.
    callback : callable, optional
        Called with an :class:`IterationInfo` (its ``candidate`` field set) for every
        candidate after every pass.

    Returns
    -------
    list of EMResult, one per candidate, in order.
    """
    params = [s.params for s in starts]
    lower = [float(s.prev_lower_bound) for s in starts]
    hist = [list(s.history) for s in starts]
    n_iter = [int(s.iteration) for s in starts]
    events: list[list[dict]] = [[] for _ in starts]
    converged = [False] * len(starts)
    last_stats: list[Any] = [None] * len(starts)
    done = [n >= max_iter for n in n_iter]
    stopped = [False] * len(starts)
    with _local_blas_limit():
        while not all(done):
            active = [i for i, d in enumerate(done) if not d]
            t0 = time.perf_counter()
            stats_all = em_pass(model, data, [params[i] for i in active], split_every)
            seconds = time.perf_counter() - t0
            changes = {}
            for i, stats in zip(active, stats_all, strict=True):
                n_iter[i] += 1
                prev, before = lower[i], params[i]
                lower[i] = float(model.objective(stats))
                params[i], new_events = model.m_step(stats, params[i])
                for e in new_events:
                    e["iteration"] = n_iter[i]
                events[i].extend(new_events)
                hist[i].append(lower[i])
                changes[i] = (lower[i] - prev, new_events)
                converged[i] = (
                    _converged(model, changes[i][0], tol, before, params[i]) and not new_events
                )
                last_stats[i] = stats
                done[i] = converged[i] or n_iter[i] >= max_iter
            _select(select_after, n_iter, lower, done, stopped)
            for i, stats in zip(active, stats_all, strict=True):
                change, new_events = changes[i]
                info = IterationInfo(
                    n_iter[i],
                    lower[i],
                    change,
                    seconds,
                    data.n_samples,
                    params[i],
                    new_events,
                    converged[i],
                    list(hist[i]),
                    stats,
                    i,
                    stopped[i],
                )
                logger.info(
                    "iteration %d%s: mean log-likelihood %.8g, change %.3g, %.2f s, %.3g samples/s",
                    n_iter[i],
                    f" (candidate {i})" if len(starts) > 1 else "",
                    lower[i],
                    change,
                    seconds,
                    info.samples_per_second,
                )
                if callback is not None:
                    callback(info)
    return [
        EMResult(
            params[i],
            lower[i],
            hist[i],
            n_iter[i],
            converged[i],
            events[i],
            last_stats[i],
            stopped[i],
        )
        for i in range(len(starts))
    ]


def _converged(model: EMModel, change: float, tol: float, old=None, new=None) -> bool:
    """Whether a change of the objective ends EM: ``|change| < tol``, or for models with
    priors whose objective is the likelihood alone (``stop_on_decrease``, hmmlearn's
    rule) ``change < tol``; models that define ``converged(change, tol, old, new)`` (the
    parameters before and after the M-step) decide themselves."""
    rule = getattr(model, "converged", None)
    if rule is not None and old is not None:
        return bool(rule(change, tol, old, new))
    if getattr(model, "stop_on_decrease", False):
        return change < tol
    return abs(change) < tol


def _select(select_after, n_iter, lower, done, stopped) -> None:
    """Stop every running candidate but the best once all have ``select_after`` passes."""
    if select_after is None:
        return
    alive = [i for i in range(len(n_iter)) if not stopped[i]]
    if len(alive) < 2 or min(n_iter[i] for i in alive) < select_after:
        return
    best = max(alive, key=lambda i: (lower[i], -i))  # ties: the first
    for i in alive:
        if i != best and not done[i]:
            done[i] = stopped[i] = True


def fit_em_local(
    model: EMModel,
    X: np.ndarray,
    params: Any,
    sample_weight: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    tol: float = 1e-4,
    max_iter: int = 500,
    accelerate: bool = False,
) -> EMResult:
    """EM on an in-memory NumPy block with the model's own kernel (no Dask).

    Used to prefit on a random sample before the passes over the full data.
    ``accelerate=True`` (models with ``to_vector``/``from_vector``) extrapolates pairs
    of EM steps with SQUAREM (Varadhan & Roland 2008, scheme S3), keeping an
    extrapolated point only if its objective beats the last EM step's, so the objective
    still never decreases; ``max_iter`` then counts E-steps.
    """
    if accelerate and hasattr(model, "to_vector") and hasattr(model, "from_vector"):
        return _fit_em_local_squarem(model, X, params, sample_weight, labels, tol, max_iter)
    lower = -np.inf
    history: list[float] = []
    events: list[dict] = []
    converged = False
    n_iter = 0
    stats = None
    with blas_one_thread():
        for n_iter in range(1, max_iter + 1):
            stats = model.block_stats(params, X, sample_weight, labels)
            prev, lower = lower, float(model.objective(stats))
            params, new = model.m_step(stats, params)
            events.extend(dict(e, iteration=n_iter) for e in new)
            history.append(lower)
            converged = _converged(model, lower - prev, tol) and not new
            if converged:
                break
    return EMResult(params, lower, history, n_iter, converged, events, stats)


def _squarem_point(model, p0, p1, p2):
    """SQUAREM (S3) extrapolation from two EM steps p0 -> p1 -> p2 (None: no better point)."""
    t0, t1, t2 = model.to_vector(p0), model.to_vector(p1), model.to_vector(p2)
    r, v = t1 - t0, t2 - 2.0 * t1 + t0
    nv = float(np.linalg.norm(v))
    if not nv > 0:
        return None
    alpha = -float(np.linalg.norm(r)) / nv
    if not alpha < -1.0:  # alpha = -1 gives p2 itself
        return None
    return model.from_vector(t0 - 2.0 * alpha * r + alpha * alpha * v, p2)


def _fit_em_local_squarem(model, X, params, w, labels, tol, max_iter) -> EMResult:
    history: list[float] = []  # objective at every accepted E-step point: non-decreasing
    events: list[dict] = []
    n_e = 0
    stats = None

    def em(p):  # E-step at p (its objective) and the M-step from it
        nonlocal n_e, stats
        n_e += 1
        stats = model.block_stats(p, X, w, labels)
        new, ev = model.m_step(stats, p)
        return new, float(model.objective(stats)), [dict(e, iteration=n_e) for e in ev]

    converged = False
    prev = -np.inf

    def step(p):  # a plain EM step, recorded; also says whether to stop
        nonlocal params, prev, converged
        new, lower, ev = em(p)
        history.append(lower)
        events.extend(ev)
        converged = _converged(model, lower - prev, tol) and not ev
        params, prev = new, lower
        return new, lower, bool(ev), converged or n_e >= max_iter

    p0 = params
    with blas_one_thread():
        while n_e < max_iter:
            p1, _, ev0, stop = step(p0)
            if stop:
                break
            p2, l1, ev1, stop = step(p1)
            if stop:
                break
            ext = None if ev0 or ev1 else _squarem_point(model, p0, p1, p2)
            p0 = p2
            if ext is not None:
                p3, l_ext, ev3 = em(ext)
                if l_ext > l1 and not ev3:  # else the extrapolation is dropped
                    history.append(l_ext)
                    params, prev, p0 = p3, l_ext, p3
    return EMResult(
        params, history[-1] if history else -np.inf, history, n_e, converged, events, stats
    )


# --------------------------------------------------------------------------- sampling


def _relabel_block(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    out = np.full(y.shape, -1, dtype=np.int64)
    lab = y != -1
    out[lab] = np.searchsorted(classes, y[lab])
    return out


def relabel(data: ChunkedData, classes: np.ndarray) -> ChunkedData:
    """The same data with its labels replaced, lazily, by their index in ``classes``.

    ``classes`` is sorted and holds every label value but ``-1`` (unlabelled), which
    stays ``-1``.
    """
    if data.labels is None:
        raise ValueError("the data has no labels")
    labels = data.labels.map_blocks(
        _relabel_block,
        np.asarray(classes),
        dtype=np.int64,
        meta=np.empty((0,) * data.labels.ndim, np.int64),
    )
    return ChunkedData(data.X, data.sample_weight, labels, data.layout)


def draw_sample(
    data: ChunkedData, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Draw ``size`` distinct random rows (all rows if fewer), chunk-wise.

    The row indices are drawn on the client from ``seed`` alone, so the sample does
    not depend on the chunking; each chunk task returns only its selected rows.
    (:func:`prepare` draws the same sample in the pass that also reads the labels and
    fills the cache.)

    Returns
    -------
    X, sample_weight, labels : ndarrays (``None`` where the data has none), in row order
    """
    return prepare(data, sample_size=size, seed=seed, summarise_labels=False).sample


#: labelled rows per class that :func:`prepare` brings to the client at most
LABEL_SAMPLE_PER_CLASS = 5_000


@dataclass
class LabelSummary:
    """What the preparatory pass learns about the labels, small whatever their density.

    Attributes
    ----------
    y_min, y_max : int
        Smallest and largest label value anywhere (``-1`` if there is none).
    counts : ndarray of int64 (y_max + 1,)
        Labels of each class id (rows; label entries for per-date labels of shape (n, L)).
    observed, complete : ndarray of int64 (y_max + 1,)
        Labelled rows of each class with some / every attribute observed (row labels).
    n_rows : int
        Rows that carry a label.
    X, y, rows : ndarrays
        A random sample of the labelled rows that the pass's ``usable`` rule keeps: every
        such row of a class with at most ``per_class`` of them, else ``per_class`` drawn
        at random (the rows of smallest pseudo-random key, a hash of the row's position
        in the data, or its pixel in the grid, and the seed: the same draw for any
        chunking). In row order; ``rows``: their positions (rows of the data, or grid
        pixels in C order with a grid layout).
    weight : ndarray of float64
        How many usable labelled rows each sampled row stands for: 1 where its class was
        kept whole, else the class's usable rows over its sampled ones (for per-date
        labels, the labelled rows over the sampled rows).
    capped : bool
        Whether some class was sampled rather than kept whole.
    """

    y_min: int
    y_max: int
    counts: np.ndarray
    observed: np.ndarray
    complete: np.ndarray
    n_rows: int
    X: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    capped: bool = False
    rows: np.ndarray | None = None


@dataclass
class Prepared:
    """The outcome of :func:`prepare`."""

    data: ChunkedData
    sample: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None
    labels: LabelSummary | None


def _hash_unit(ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random number in [0, 1) per id (splitmix64 of ``id + seed``)."""
    z = (ids.astype(np.uint64) + np.uint64(seed % 2**64)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def row_keys(start: int, n: int, seed: int) -> np.ndarray:
    """The pseudo-random keys of rows ``start .. start + n - 1`` (:func:`_hash_unit`)."""
    return _hash_unit(np.arange(start, start + n, dtype=np.uint64), seed)


def _chunk_ids(spec: tuple, n: int) -> np.ndarray:
    """Position of each row of a chunk: its row in the data (``("rows", start)``) or its
    pixel in the grid's C order (``("grid", block start, block shape, grid shape)``)."""
    if spec[0] == "rows":
        return np.arange(spec[1], spec[1] + n, dtype=np.uint64)
    _, lo, shape, grid = spec
    idx = np.indices(shape).reshape(len(shape), -1) + np.asarray(lo, dtype=np.int64)[:, None]
    return np.ravel_multi_index(idx, grid).astype(np.uint64)


def _pad_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    out = a.copy()
    out[: len(b)] += b
    return out


class _PrepPart:
    """One chunk's (or a subtree's) share of :func:`prepare`: associative ``+``."""

    def __init__(self, cap: int, sample=(), lo=None, hi=None, counts=None, observed=None,
                 complete=None, n_rows=0, picks=None):  # fmt: skip
        self.cap = cap
        self.sample = list(sample)  # (chunk index, X, w, y) per chunk with sampled rows
        self.lo, self.hi = lo, hi
        z = np.zeros(0, dtype=np.int64)
        self.counts = z if counts is None else counts
        self.observed = z if observed is None else observed
        self.complete = z if complete is None else complete
        self.n_rows = n_rows
        self.picks = {} if picks is None else picks  # class -> (keys, ids, X, y)

    def __add__(self, other: _PrepPart) -> _PrepPart:
        picks = dict(self.picks)
        for c, theirs in other.picks.items():
            mine = picks.get(c)
            if mine is None:
                picks[c] = theirs
                continue
            joined = tuple(np.concatenate([a, b]) for a, b in zip(mine, theirs, strict=True))
            picks[c] = _smallest_keys(joined, self.cap)
        ext = [v for v in (self.lo, other.lo) if v is not None]
        ext_hi = [v for v in (self.hi, other.hi) if v is not None]
        return _PrepPart(
            self.cap,
            self.sample + other.sample,
            min(ext) if ext else None,
            max(ext_hi) if ext_hi else None,
            _pad_add(self.counts, other.counts),
            _pad_add(self.observed, other.observed),
            _pad_add(self.complete, other.complete),
            self.n_rows + other.n_rows,
            picks,
        )


def _smallest_keys(pick: tuple, cap: int) -> tuple:
    keys = pick[0]
    if len(keys) <= cap:
        return pick
    keep = np.argpartition(keys, cap - 1)[:cap]
    return tuple(a[keep] for a in pick)


def _prep_block(x, w, y, index, sel, spec, seed, rule, cap, summarise):
    """A chunk's :class:`_PrepPart`: its sampled rows, and a summary of its labels with
    at most ``cap`` usable labelled rows per class (those of smallest key)."""
    part = _PrepPart(cap)
    if sel is not None and len(sel):
        part.sample = [
            (index, np.asarray(x)[sel], None if w is None else np.asarray(w)[sel],
             None if y is None else np.asarray(y)[sel])
        ]  # fmt: skip
    if y is None or not summarise:
        return (part,)
    y = np.asarray(y)
    if y.size == 0:
        return (part,)
    part.lo, part.hi = int(y.min()), int(y.max())
    valid = y >= 0
    if not valid.any():
        return (part,)
    part.counts = np.bincount(y[valid])
    rows = valid if y.ndim == 1 else valid.any(axis=1)
    part.n_rows = int(rows.sum())
    x = np.asarray(x)
    if y.ndim == 1:
        finite = np.isfinite(x)
        seen, full = finite.any(axis=1), finite.all(axis=1)
        part.observed = np.bincount(y[valid & seen])
        part.complete = np.bincount(y[valid & full])
        eligible = {"any": valid & seen, "all": valid & full}.get(rule, valid)
        members = [(int(c), np.flatnonzero(eligible & (y == c))) for c in np.unique(y[eligible])]
    else:
        part.observed = part.complete = part.counts
        members = [(int(c), np.flatnonzero((y == c).any(axis=1))) for c in np.unique(y[valid])]
    if not members:
        return (part,)
    ids = _chunk_ids(spec, len(y))
    keys = _hash_unit(ids, seed)
    for c, r in members:
        kr = keys[r]
        if len(r) > cap:
            r = r[np.argpartition(kr, cap - 1)[:cap]]
            kr = keys[r]
        part.picks[c] = (kr, ids[r], x[r], y[r])
    return (part,)


def _chunk_specs(data: ChunkedData) -> list[tuple]:
    if data.layout is None:
        starts = np.cumsum((0,) + tuple(data.row_chunks))[:-1]
        return [("rows", int(s)) for s in starts]
    lay = data.layout
    bounds = [np.cumsum((0,) + tuple(c)) for c in lay.chunks]
    return [
        (
            "grid",
            tuple(int(b[i]) for b, i in zip(bounds, index, strict=True)),
            tuple(int(c[i]) for c, i in zip(lay.chunks, index, strict=True)),
            tuple(lay.shape),
        )
        for index in np.ndindex(*[len(c) for c in lay.chunks])
    ]


def prepare(
    data: ChunkedData,
    *,
    cache: bool | str = False,
    sample_size: int = 0,
    seed: int = 0,
    summarise_labels: bool = True,
    usable: str | None = "any",
    per_class: int = LABEL_SAMPLE_PER_CLASS,
    split_every: int = 16,
) -> Prepared:
    """Everything a fit needs before EM, in one pass over the data.

    In one read of every chunk: the cache is filled (:func:`cache_data`, when
    ``cache`` asks for it; the other tasks then read the cached chunks), ``sample_size``
    random rows are drawn (as :func:`draw_sample`), and the labels are summarised on
    the workers (:class:`LabelSummary`: counts per class and a bounded random sample of
    the labelled rows, tree-reduced), so no labelled row beyond the sample and no row
    index travels to the client or into a graph, whatever the density of the labels.

    Parameters
    ----------
    data : ChunkedData
    cache : bool or "auto"
        As :func:`cache_data`.
    sample_size, seed : int
        Rows to draw (0: none) and the seed of the draw and of the labelled sample.
    summarise_labels : bool
        Summarise ``data.labels`` (if any).
    usable : {"any", "all", None}
        Which labelled rows the labelled sample may hold: with some attribute observed,
        with every attribute observed, or any (row labels of shape (n,) only).
    per_class : int
        Labelled rows per class in the sample at most.
    """
    data = cache_data(data, cache)
    n = data.n_samples
    order = None
    sels: list[np.ndarray | None] = [None] * data.n_chunks
    if sample_size > 0 and n > 0:
        rng = np.random.default_rng(seed)
        if sample_size >= n:
            idx = np.arange(n)
        else:
            idx = np.sort(rng.choice(n, size=sample_size, replace=False))
        if data.layout is not None:
            # ``idx`` are pixels of the grid in C order: the sample (and its order) does
            # not depend on the chunking
            idx, order = _grid_rows(data.layout, idx)
        bounds = np.cumsum((0,) + tuple(data.row_chunks))
        cuts = np.searchsorted(idx, bounds)
        sels = [idx[a:b] - lo for a, b, lo in zip(cuts[:-1], cuts[1:], bounds[:-1], strict=True)]
    with_labels = summarise_labels and data.labels is not None
    specs = _chunk_specs(data)
    name = f"daskem-prepare-{uuid.uuid4().hex[:12]}"
    leaves = [
        delayed(_prep_block, pure=True)(
            x,
            w if sels[i] is not None and len(sels[i]) else None,
            y if (with_labels or (sels[i] is not None and len(sels[i]))) else None,
            i,
            sels[i],
            specs[i],
            int(seed),
            usable,
            int(per_class),
            with_labels,
            dask_key_name=(f"{name}-chunk", i),
        )
        for i, (x, w, y) in enumerate(data._blocks)
        if with_labels or (sels[i] is not None and len(sels[i]))
    ]
    part = _compute(_tree(leaves, split_every, name))[0] if leaves else _PrepPart(per_class)
    sample = None
    if sample_size > 0:
        chunks = sorted(part.sample, key=lambda c: c[0])
        if not chunks:
            sample = (np.empty((0, data.n_features)), None, None)
        else:
            X = np.concatenate([c[1] for c in chunks])
            w = None if data.sample_weight is None else np.concatenate([c[2] for c in chunks])
            y = None if data.labels is None else np.concatenate([c[3] for c in chunks])
            if order is not None:  # back to the grid's C order
                X = X[order]
                w = None if w is None else w[order]
                y = None if y is None else y[order]
            sample = (X, w, y)
    labels = _label_summary(part, data, usable) if with_labels else None
    return Prepared(data, sample, labels)


def _label_summary(part: _PrepPart, data: ChunkedData, usable: str | None) -> LabelSummary:
    L = data.labels
    tail = L.shape[1:]
    empty_x = np.empty((0, data.n_features))
    if not part.picks:
        return LabelSummary(
            -1 if part.lo is None else part.lo,
            -1 if part.hi is None else part.hi,
            part.counts, part.observed, part.complete, part.n_rows,
            empty_x, np.empty((0, *tail), dtype=np.int64), np.empty(0), False,
            np.empty(0, dtype=np.int64),
        )  # fmt: skip
    classes = sorted(part.picks)
    ids = np.concatenate([part.picks[c][1] for c in classes])
    X = np.concatenate([part.picks[c][2] for c in classes])
    y = np.concatenate([part.picks[c][3] for c in classes])
    capped = False
    if L.ndim == 1:
        pool = {"any": part.observed, "all": part.complete}.get(usable, part.counts)
        weight = np.concatenate(
            [np.full(len(part.picks[c][0]), pool[c] / len(part.picks[c][0])) for c in classes]
        )
        capped = bool((weight > 1).any())
    # a row of per-date labels may be drawn for several classes: once is enough
    ids, first = np.unique(ids, return_index=True)
    X, y = X[first], y[first]
    if L.ndim != 1:
        capped = len(ids) < part.n_rows
        weight = np.full(len(ids), part.n_rows / max(len(ids), 1))
    else:
        weight = weight[first]
    return LabelSummary(
        part.lo, part.hi, part.counts, part.observed, part.complete, part.n_rows,
        X, y, weight, capped, ids.astype(np.int64),
    )  # fmt: skip


def _grid_rows(layout: GridLayout, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (sorted) of the row view holding grid pixels ``pixels`` (C-order indices), and
    the permutation that puts rows taken in that sorted order back in ``pixels``' order."""
    coords = np.unravel_index(pixels, layout.shape)
    nblocks = [len(c) for c in layout.chunks]
    blk, local, shape = [], [], []
    for d, c in enumerate(layout.chunks):
        starts = np.cumsum((0,) + tuple(c))
        b = np.searchsorted(starts, coords[d], side="right") - 1
        blk.append(b)
        local.append(coords[d] - starts[b])
        shape.append(np.asarray(c)[b])
    block_id = np.ravel_multi_index(blk, nblocks)
    flat_local = np.zeros(len(pixels), dtype=np.int64)
    for d in range(len(layout.shape)):
        flat_local = flat_local * shape[d] + local[d]
    offsets = np.cumsum((0,) + layout.row_chunks)
    rows = offsets[block_id] + flat_local
    sort = np.argsort(rows, kind="stable")
    order = np.empty_like(sort)
    order[sort] = np.arange(len(sort))
    return rows[sort], order


# --------------------------------------------------------------------------- lazy maps


def map_rows(
    func: Callable[..., np.ndarray],
    params: Any,
    X: da.Array,
    *extra: da.Array | None,
    n_out: int | None,
    dtype: Any = np.float64,
) -> da.Array:
    """Lazily apply ``func(params, block, *extra_blocks)`` to every row chunk of ``X``.

    ``func`` returns an array of shape (n_block,) if ``n_out`` is None, else
    (n_block, n_out). ``extra`` are row-aligned 1-D arrays (or None, passed as None).
    ``params`` is one task of the graph, shipped once.
    """
    if len(X.chunks[1]) != 1:
        X = X.rechunk({1: -1})
    args: list[Any] = [func, None, delayed(params, traverse=False, name=_params_name()), None]
    args += [X, "ij"]
    for e in extra:
        args += [None, None] if e is None else [e.rechunk({0: X.chunks[0]}), "i"]
    if n_out is None:
        return da.blockwise(
            _apply_rows, "i", *args, dtype=dtype, concatenate=True, meta=np.empty((0,), dtype)
        )
    return da.blockwise(
        _apply_rows,
        "ik",
        *args,
        new_axes={"k": n_out},
        dtype=dtype,
        concatenate=True,
        meta=np.empty((0, 0), dtype),
    )


def _apply_rows(func, params, block, *extra):
    return func(params, block, *extra)


def _apply_grid(func, params, core, origin, *blocks):
    return func(params, core, origin, *blocks)


def map_grid(
    func: Callable[..., np.ndarray],
    params: Any,
    layout: GridLayout,
    *grids: da.Array | None,
    n_out: int,
    dtype: Any = np.float64,
) -> da.Array:
    """Lazily apply ``func(params, core, origin, *extended_blocks)`` to every spatial block
    with its halo (:func:`grid_blocks`); ``func`` returns ``(n_out, *core_shape)``.

    The result has shape ``(n_out, *layout.shape)`` and the layout's chunks.
    """
    p = delayed(params, traverse=False, name=_params_name())
    name = f"daskem-grid-{uuid.uuid4().hex[:12]}"
    pieces = []
    for i, (core, origin, *blocks) in enumerate(grid_blocks(layout, *grids)):
        shape = tuple(s.stop - s.start for s in core)
        task = delayed(_apply_grid, pure=True)(
            func, p, core, origin, *blocks, dask_key_name=(name, i)
        )
        pieces.append(da.from_delayed(task, (n_out, *shape), dtype=dtype))
    counts = [len(c) for c in layout.chunks]
    nested = np.empty(counts, dtype=object)
    for idx, piece in zip(np.ndindex(*counts), pieces, strict=True):
        nested[idx] = piece
    # nested lists of depth 1 + ndim: the output axis is a single block
    return da.block([nested.tolist()])


def _params_name() -> str:
    return f"daskem-params-{uuid.uuid4().hex[:12]}"
