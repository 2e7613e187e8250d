"""The spatial prior's halos: extended blocks equal plain slices of the grid, and a fit
on a stack several times larger than the workers' memory completes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

import daskem
from daskem import SpatialGaussianMixture, engine, hmrf


@pytest.mark.parametrize(
    "shape, chunks, depth",
    [
        ((50, 47), (16, 16), 13),
        ((50, 47), (5, 4), 13),  # chunks below the halo
        ((50, 47), (33, 28), 13),
        ((50, 47), (50, 47), 13),  # one chunk: no halo
        ((50, 47), (7, 30), 0),
        ((20, 21, 19), (6, 7, 8), 4),  # a volume
    ],
)
def test_extended_blocks_are_slices_of_the_grid(shape, chunks, depth):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(*shape, 2)).astype(np.float32)
    w = rng.random(shape)
    g = da.from_array(X, chunks=(*chunks, 2))
    layout = engine.GridLayout(shape, g.chunks[:-1], depth)
    blocks = engine.grid_blocks(layout, g, None, da.from_array(w, chunks=chunks))
    assert len(blocks) == g.numblocks[0] * g.numblocks[1] * (g.numblocks[2] if g.ndim > 3 else 1)
    (computed,) = dask.compute(blocks, scheduler="sync")
    bounds = [np.cumsum((0, *c)) for c in layout.chunks]
    for index, (core, origin, x, none, wb) in zip(
        np.ndindex(*[len(c) for c in layout.chunks]), computed, strict=True
    ):
        assert none is None
        lo = [int(b[i]) for b, i in zip(bounds, index, strict=True)]
        hi = [int(b[i + 1]) for b, i in zip(bounds, index, strict=True)]
        ext = tuple(
            slice(max(0, a - depth), min(n, b + depth))
            for a, b, n in zip(lo, hi, shape, strict=True)
        )
        assert origin == tuple(s.start for s in ext)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, X[ext])
        np.testing.assert_array_equal(wb, w[ext])
        np.testing.assert_array_equal(
            x[core], X[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        )


@pytest.mark.cluster
def test_fit_on_a_stack_three_times_the_workers_memory(monkeypatch):
    """A worker process with a 600 MiB memory limit (spilling to disk off; the compiled
    kernels take ~100 MiB of it) fits the spatial prior on a 1.9 GB stack made lazily
    chunk by chunk: no chunk is held longer than its block needs (a block reads its own
    chunk, and its halo comes from its neighbours' frames, which are small), so the
    worker is never restarted and the memory it reports stays below the limit."""
    distributed = pytest.importorskip("distributed")
    # worker processes import daskem from this tree
    root = str(Path(daskem.__file__).resolve().parents[1])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    )
    limit = 600 * 2**20
    # 114 x 2 chunks of 8 MiB
    Hs, Ws, Ds, c = 14592, 256, 64, (128, 128)
    memory = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause")}
    means = np.zeros((2, Ds))
    means[1] += 0.5
    kw = dict(
        covariance_type="diag",
        spatial_beta=1.0,
        spatial_fit="joint",  # every pass with the prior and its halos
        tol=0.0,
        cache=False,
        means_init=means,
        weights_init=[0.5, 0.5],
        precisions_init=np.ones((2, Ds)),
    )
    # compile the kernels here first: the worker loads them from numba's cache instead of
    # compiling them (~15 s and ~200 MiB once per installation; this test is about data)
    small = np.ones((40, 40, Ds)) + np.arange(40)[:, None, None] % 7 * 0.1
    with dask.config.set(scheduler="sync"):
        SpatialGaussianMixture(2, max_iter=1, **kw).fit(da.from_array(small, chunks=(20, 20, Ds)))
    with (
        dask.config.set(memory),
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            memory_limit=limit,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # cheap to make (the halos make every chunk several times a pass), not constant
        rows = da.arange(Hs, chunks=c[0]).astype(np.float64)[:, None, None] % 7 * 0.1
        cols = da.arange(Ws, chunks=c[1]).astype(np.float64)[None, :, None] % 5 * 0.2
        feats = da.arange(Ds, chunks=Ds).astype(np.float64)[None, None, :] * 0.01
        image = (da.ones((Hs, Ws, Ds), chunks=(*c, Ds)) + rows + cols + feats).rechunk((*c, Ds))
        assert image.nbytes > 3 * limit
        pids = client.run(os.getpid)
        # the workers' memory as they report it to the scheduler (in this process)
        reported: list[int] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                reported.extend(ws.memory.process for ws in cluster.scheduler.workers.values())
                stop.wait(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        gm = SpatialGaussianMixture(2, max_iter=2, **kw).fit(image)
        stop.set()
        watcher.join()
        assert client.run(os.getpid) == pids, "a worker was restarted"
    assert gm.n_iter_ == 2 and np.isfinite(gm.lower_bounds_).all()
    assert reported and max(reported) < 0.9 * limit, max(reported)


@pytest.mark.cluster
def test_kept_frames_give_the_same_fit_on_a_cluster(monkeypatch, caplog):
    """The halos' frames read once and kept on the workers for every pass (they fit in
    the cluster's memory here) give the fit of frames read again by every pass, and
    stay alive across the passes (the pass graphs only name them)."""
    import logging

    distributed = pytest.importorskip("distributed")
    root = str(Path(daskem.__file__).resolve().parents[1])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    )
    rng = np.random.default_rng(0)
    img = rng.standard_normal((120, 150, 3))
    img[:60, :80] += 2.0
    X = da.from_array(img, chunks=(50, 60, 3))
    kw = dict(spatial_beta="auto", spatial_fit="joint", random_state=0, max_iter=4, tol=0.0)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,  # fmt: skip
        distributed.Client(cluster) as client,
    ):
        with caplog.at_level(logging.INFO, logger="daskem"):
            kept = SpatialGaussianMixture(2, **kw).fit(X)
        assert "halo frames in memory" in caplog.text
        # the staged fit's prior stage: the workers keep the blocks' starts between
        # passes, and drop them at its end
        staged = SpatialGaussianMixture(2, **dict(kw, spatial_fit="staged")).fit(X)
        left = client.run(
            lambda: __import__("daskem.model.spatial").model.spatial._START_CACHE.nbytes
        )
        assert list(left.values()) == [0, 0]
        # with a sample of windows first: the windows read once and kept on the workers
        sample = dict(SAMPLE_STAGE_PIXELS=4096, SAMPLE_WINDOW_PIXELS=1024)  # 4 of 32 x 32
        defaults = {k: getattr(hmrf, k) for k in sample}
        for k, v in sample.items():
            monkeypatch.setattr(hmrf, k, v)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="daskem"):
            sampled = SpatialGaussianMixture(2, **dict(kw, spatial_fit="staged")).fit(X)
        assert "on a sample of 4 windows" in caplog.text
        assert "of 4 windows in memory" in caplog.text
        for k, v in defaults.items():
            monkeypatch.setattr(hmrf, k, v)
        monkeypatch.setattr(engine, "FRAME_MEMORY_FRACTION", 0.0)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="daskem"):
            reread = SpatialGaussianMixture(2, **kw).fit(X)
        assert "halo frames" not in caplog.text
    monkeypatch.setattr(hmrf, "START_CACHE_FRACTION", 0.0)
    with dask.config.set(scheduler="threads"):  # no start kept: the same fit
        local = SpatialGaussianMixture(2, **dict(kw, spatial_fit="staged")).fit(X)
    assert staged.spatial_beta_ == local.spatial_beta_ > 0
    np.testing.assert_array_equal(staged.lower_bounds_, local.lower_bounds_)
    for k, v in sample.items():  # windows read by every pass, no start kept: the same fit
        monkeypatch.setattr(hmrf, k, v)
    with dask.config.set(scheduler="threads"):
        local = SpatialGaussianMixture(2, **dict(kw, spatial_fit="staged")).fit(X)
    assert sampled.spatial_beta_ == local.spatial_beta_ > 0
    np.testing.assert_array_equal(sampled.lower_bounds_, local.lower_bounds_)
    assert kept.n_iter_ == reread.n_iter_ == 4
    np.testing.assert_array_equal(kept.means_, reread.means_)
    np.testing.assert_array_equal(kept.lower_bounds_, reread.lower_bounds_)
    assert kept.spatial_beta_ == reread.spatial_beta_


@pytest.mark.parametrize(
    "shape, chunks, depth",
    [((50, 47), (16, 16), 5), ((50, 47), (5, 4), 13), ((20, 21, 19), (6, 7, 8), 2)],
)
def test_frame_bytes_counts_the_frames(shape, chunks, depth):
    """engine.frame_bytes (what keep_frames weighs against the memory) is the size of the
    frames the passes make, over X, the weights and the labels."""
    X = np.zeros((*shape, 3), dtype=np.float32)
    lay = engine.GridLayout(shape, da.from_array(X[..., 0], chunks=chunks).chunks, depth)
    rows = engine.grid_to_rows(da.from_array(X, chunks=(*chunks, 3)), len(shape))
    n = rows.shape[0]
    data = engine.ChunkedData(
        rows, da.ones(n, chunks=rows.chunks[0]), da.zeros(n, dtype=np.int8, chunks=rows.chunks[0]),
        lay,
    )  # fmt: skip
    want = 0
    for a in (X, np.ones(shape), np.zeros(shape, dtype=np.int8)):
        g = da.from_array(a, chunks=chunks + a.shape[len(shape) :])
        for block in g.to_delayed().ravel():
            want += sum(s.nbytes for _, s in engine._frame(block.compute(), depth, len(shape)))
    assert engine.frame_bytes(data) == want
