"""Benchmark the number of full passes: plain EM vs the default (prefit), and shared restarts.

On the same generated pixels, stored as a zstd-compressed float32 Zarr array and read
back every pass (``cache=False``: the cost of a pass is a real read + decode + E-step):

* plain EM (``prefit=False``) against the default (``prefit="auto"``: EM on the in-memory
  initialisation sample first), from the same initialisation, for two tolerances: full
  passes, wall time, and the final mean log-likelihood per pixel (one extra scoring pass);
* ``n_init=4`` against ``n_init=1``: wall time, full passes and final log-likelihood
  (restarts are initialised in parallel, screened on the shared sample, and share every
  pass until ``select_after``), and ``n_init=4`` with ``select_after=None`` (every
  restart to convergence, as scikit-learn) for the quality of the default.

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


def _fit(X, callback=None, **kw):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(cache=False, **kw).fit(X, callback=callback)
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
    p.add_argument("--skip-passes", action="store_true", help="only the restarts")
    p.add_argument("--skip-exhaustive", action="store_true", help="no select_after=None run")
    args = p.parse_args()

    X, _, _ = make_samples(args.n, args.d, args.k, seed=args.seed, dtype="float32",
                           separation=args.separation)  # fmt: skip
    results: dict = {"n": args.n, "d": args.d, "k": args.k, "passes": [], "restarts": {}}
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        Xz = _zarr_copy(X, Path(tmp) / "x.zarr", args.rows)
        print(f"{args.n:,} px x {args.d} features x {args.k} components, Zarr-backed, "
              f"threaded scheduler, cache=False")  # fmt: skip
        print(f"{'tol':>7} {'variant':<14} {'passes':>6} {'fit s':>7} {'final ll/px':>13}")
        for tol in [] if args.skip_passes else [float(t) for t in args.tols.split(",")]:
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
        variants = [("n_init=1", 1, "auto"), ("n_init=4", 4, "auto")]
        if not args.skip_exhaustive:
            variants.append(("n_init=4, select_after=None", 4, None))
        for name, n_init, select in variants:
            infos: list = []
            gm, s = _fit(Xz, n_components=args.k, tol=1e-3, max_iter=1000,
                         random_state=args.seed, n_init=n_init, select_after=select,
                         callback=infos.append)  # fmt: skip
            passes = max(i.iteration for i in infos)  # shared passes over the data
            ll = gm.score(Xz)
            results["restarts"][name] = {"seconds": s, "passes": passes, "final_ll": ll}
            print(f"{name:<28} {s:6.1f} s, {passes:3d} full passes, final ll/px {ll:.6f}")
        base = results["restarts"]["n_init=1"]
        for name, r in results["restarts"].items():
            if name != "n_init=1" and isinstance(r, dict):
                r["time_ratio"] = r["seconds"] / base["seconds"]
                print(f"{name} / n_init=1 wall time: {r['time_ratio']:.2f}; final ll "
                      f"{r['final_ll'] - base['final_ll']:+.2e} nats/px")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
