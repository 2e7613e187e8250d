"""Cost of one block's E-step with the spatial prior against the pixel-wise one.

A one-off measurement below the engine (no Dask, no Zarr, one thread): one block of
``--side`` x ``--side`` pixels (default 1,000 x 1,000, 8 float32 attributes, K = 8,
spatially coherent classes), the statistics of

* the pixel-wise mixture (``GMMModel.block_stats``);
* a pass of the staged fit's prior stage (emissions kept, ``beta`` estimated) with 1, 2,
  3 (the default) and 6 mean-field sweeps from the pixel-wise start;
* the default pass (3 sweeps) with the block's pixel-wise start kept from the previous
  pass (``start_cache_bytes``: what the staged fit's prior stage does, memory permitting);
* the prior stage's pass with 1 sweep from a ``q`` carried over from the previous pass
  (``SpatialGMMModel.block_stats_carried``, which the engine does not use);
* a pass of the joint fit (``spatial_fit="joint"``: the emissions' statistics too, from
  the pixel-wise start).

It answers how much of a pass the sweeps are, so whether carrying ``q`` between passes
(one sweep a pass instead of three) would bring a pass within 2x of a pixel-wise one.
Medians over ``--repeats`` interleaved calls, after two warm-up calls each::

    python scripts/bench_spatial_block.py --cov diag
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=1000, help="block side in pixels")
    p.add_argument("-k", type=int, default=8, help="components")
    p.add_argument("-d", type=int, default=8, help="attributes")
    p.add_argument("--cov", default="diag", choices=["full", "diag", "tied", "spherical"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.side < 64 or args.k < 2 or args.d < 1 or args.repeats < 1:
        p.error("need --side >= 64, -k >= 2, -d >= 1 and --repeats >= 1")

    from daskem import SpatialGaussianMixture
    from daskem.model.spatial import SpatialBlock

    rng = np.random.default_rng(0)
    K, D, side = args.k, args.d, args.side
    truth = np.add.outer(np.arange(side) // 50, np.arange(side) // 70) % K
    means = rng.normal(0.0, 2.0, (K, D))
    X = (means[truth] + rng.normal(size=(side, side, D))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = SpatialGaussianMixture(
            K, covariance_type=args.cov, spatial_beta="auto", max_iter=5, random_state=0
        ).fit(X)
    params = est._fitted_params()
    est._prior_stage = True  # the model of the staged fit's prior stage
    staged = est._model()
    del est._prior_stage
    joint = est._model()
    block = SpatialBlock(X, (slice(0, side), slice(0, side)), (0, 0))
    rows = X.reshape(-1, D)
    _, q = dataclasses.replace(staged, sweeps=1).block_stats_carried(params, block, None)

    calls = {"pixel-wise": lambda: staged.emission.block_stats(params.gmm, rows)}
    for s in (1, 2, 3, 6):
        m = dataclasses.replace(staged, sweeps=s)
        calls[f"prior stage, {s} sweep(s) from the pixel-wise start"] = lambda m=m: m.block_stats(
            params, block
        )
    kept = dataclasses.replace(staged, start_cache_bytes=2**31)
    calls["prior stage, 3 sweeps, the start kept"] = lambda: kept.block_stats(params, block)
    carried = dataclasses.replace(staged, sweeps=1)
    calls["prior stage, 1 sweep from a carried q"] = lambda: carried.block_stats_carried(
        params, block, q
    )
    calls["joint fit's pass (emissions refitted), 3 sweeps"] = lambda: joint.block_stats(
        params, block
    )
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
        fn()
    for _ in range(args.repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["pixel-wise"])
    print(
        f"{side} x {side} px, K = {K}, D = {D}, {args.cov} covariances, beta "
        f"{params.beta:.3g}; medians of {args.repeats} calls, one thread"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<52} {1e3 * med:7.1f} ms  {med / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
