"""Benchmark the number of full passes: plain EM vs the default (prefit), and shared restarts.

On the same generated pixels, stored as a zstd-compressed float32 Zarr array and read
back every pass (``cache=False``: the cost of a pass is a real read + decode + E-step):

* plain EM (``prefit=False``) against the default (``prefit="auto"``: EM on the in-memory
  initialisation sample first), from the same initialisation, for two tolerances: full
  passes, wall time, and the final mean log-likelihood per pixel (one extra scoring pass);
* ``n_init=4`` against ``n_init=1``: wall time (the restarts share every pass).

    python scripts/bench_passes.py                  # 2 M pixels x 8 x 8, a few minutes
    python scripts/bench_passes.py --n 500000 --json passes.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from daskem import GaussianMixture
from daskem.synthetic import make_samples


def _zarr_copy(X: np.ndarray, path: Path, rows: int) -> da.Array:
    import zarr

    try:
        from zarr.codecs import ZstdCodec

        z = zarr.create_array(
            str(path), shape=X.shape, chunks=(rows, X.shape[1]), dtype=X.dtype,
            compressors=[ZstdCodec(level=3)],
        )  # fmt: skip
    except (ImportError, AttributeError):  # zarr 2
        z = zarr.open(str(path), mode="w", shape=X.shape, chunks=(rows, X.shape[1]), dtype=X.dtype)
    z[:] = X
    return da.from_zarr(str(path))


def _fit(X, **kw):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(cache=False, **kw).fit(X)
    fit_s = time.perf_counter() - t
    return gm, fit_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--separation", type=float, default=2.0)
    p.add_argument("--rows", type=int, default=131_072, help="Zarr chunk rows")
    p.add_argument("--tols", default="1e-3,1e-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    X, _, _ = make_samples(args.n, args.d, args.k, seed=args.seed, dtype="float32",
                           separation=args.separation)  # fmt: skip
    results: dict = {"n": args.n, "d": args.d, "k": args.k, "passes": [], "restarts": {}}
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        Xz = _zarr_copy(X, Path(tmp) / "x.zarr", args.rows)
        print(f"{args.n:,} px x {args.d} features x {args.k} components, Zarr-backed, "
              f"threaded scheduler, cache=False")  # fmt: skip
        print(f"{'tol':>7} {'variant':<14} {'passes':>6} {'fit s':>7} {'final ll/px':>13}")
        for tol in [float(t) for t in args.tols.split(",")]:
            row = {"tol": tol}
            for name, prefit in (("plain EM", False), ("prefit", "auto")):
                gm, s = _fit(Xz, n_components=args.k, tol=tol, max_iter=1000,
                             random_state=args.seed, prefit=prefit)  # fmt: skip
                ll = gm.score(Xz)
                row[name] = {"passes": gm.n_iter_, "seconds": s, "final_ll": ll}
                print(f"{tol:>7.0e} {name:<14} {gm.n_iter_:>6} {s:>7.1f} {ll:>13.6f}")
            row["pass_ratio"] = row["prefit"]["passes"] / row["plain EM"]["passes"]
            row["ll_gain"] = row["prefit"]["final_ll"] - row["plain EM"]["final_ll"]
            print(f"{'':>7} prefit/plain passes {row['pass_ratio']:.3f}, "
                  f"ll gain {row['ll_gain']:+.2e} nats/px")  # fmt: skip
            results["passes"].append(row)
        for n_init in (1, 4):
            gm, s = _fit(Xz, n_components=args.k, tol=1e-3, max_iter=1000,
                         random_state=args.seed, n_init=n_init)  # fmt: skip
            results["restarts"][n_init] = {"seconds": s, "passes": gm.n_iter_}
            print(f"n_init={n_init}: {s:.1f} s (best candidate {gm.n_iter_} passes)")
        r = results["restarts"][4]["seconds"] / results["restarts"][1]["seconds"]
        results["restarts"]["ratio"] = r
        print(f"n_init=4 / n_init=1 wall time: {r:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
