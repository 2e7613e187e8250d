"""Write a synthetic attribute stack of any size to Zarr, chunk by chunk (never in memory).

Each chunk is generated independently from its block index: a coarse random class grid
upsampled to blobs of ``--blob`` pixels (spatially coherent classes), per-class Gaussian
attributes, quantised to 1/100 (like real sensor values, so zstd compresses them
realistically). Used for the larger-than-memory benchmark:

    python scripts/make_big_stack.py /data/big.zarr --side 100000 --features 8     # ~320 GB
    python scripts/make_big_stack.py /tmp/big.zarr --gb 36                          # 36 GB
    python scripts/make_big_stack.py /tmp/ts.zarr --gb 2 --dates 24 --features 6    # time stack

With ``--dates T`` it writes a time stack ``(time, y, x)``: every blob keeps its class
until a date of its own (a third of the blobs never change), then takes another class.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from daskem.cluster import connect


def _block(block_info=None, *, n_features, n_classes, blob, means, scales, seed):
    info = block_info[None]
    _, (y0, y1), (x0, x1) = info["array-location"]
    ny, nx = y1 - y0, x1 - x0
    rng = np.random.default_rng([seed, y0, x0])
    gy, gx = math.ceil(ny / blob) + 1, math.ceil(nx / blob) + 1
    coarse = rng.integers(0, n_classes, size=(gy, gx))
    cls = np.repeat(np.repeat(coarse, blob, axis=0), blob, axis=1)[:ny, :nx]
    out = np.empty((n_features, ny, nx), dtype=np.float32)
    noise = rng.standard_normal((n_features, ny, nx), dtype=np.float32)
    for f in range(n_features):
        out[f] = means[cls, f] + scales[cls, f] * noise[f]
    np.round(out, 2, out=out)
    return out


def _time_block(block_info=None, *, n_features, n_classes, n_dates, blob, means, scales, seed):
    info = block_info[None]
    _, _, (y0, y1), (x0, x1) = info["array-location"]
    ny, nx = y1 - y0, x1 - x0
    rng = np.random.default_rng([seed, y0, x0])
    gy, gx = math.ceil(ny / blob) + 1, math.ceil(nx / blob) + 1
    first = rng.integers(0, n_classes, size=(gy, gx))
    later = (first + rng.integers(1, n_classes, size=(gy, gx))) % n_classes
    when = rng.integers(1, int(1.5 * n_dates), size=(gy, gx))  # >= n_dates: never changes

    def up(a):
        return np.repeat(np.repeat(a, blob, axis=0), blob, axis=1)[:ny, :nx]

    first, later, when = up(first), up(later), up(when)
    out = np.empty((n_features, n_dates, ny, nx), dtype=np.float32)
    for t in range(n_dates):
        cls = np.where(t >= when, later, first)
        noise = rng.standard_normal((n_features, ny, nx), dtype=np.float32)
        for f in range(n_features):
            out[f, t] = means[cls, f] + scales[cls, f] * noise[f]
    np.round(out, 2, out=out)
    return out


def big_time_stack(side, n_features, n_classes, n_dates, chunk, blob, seed):
    """A lazy (feature, time, y, x) float32 dask array and its class means."""
    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(n_classes, n_features)) * 3.0 + 50.0).astype(np.float32)
    scales = rng.uniform(0.6, 1.4, size=(n_classes, n_features)).astype(np.float32)
    arr = da.map_blocks(
        _time_block,
        dtype=np.float32,
        chunks=((n_features,), (n_dates,), *([tuple(_chunks(side, chunk))] * 2)),
        meta=np.empty((0, 0, 0, 0), np.float32),
        n_features=n_features,
        n_classes=n_classes,
        n_dates=n_dates,
        blob=blob,
        means=means,
        scales=scales,
        seed=seed,
    )
    return arr, means


def big_stack(side: int, n_features: int, n_classes: int, chunk: int, blob: int, seed: int):
    """A lazy (feature, y, x) float32 dask array and its class means."""
    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(n_classes, n_features)) * 3.0 + 50.0).astype(np.float32)
    scales = rng.uniform(0.6, 1.4, size=(n_classes, n_features)).astype(np.float32)
    arr = da.map_blocks(
        _block,
        dtype=np.float32,
        chunks=((n_features,), *([tuple(_chunks(side, chunk))] * 2)),
        meta=np.empty((0, 0, 0), np.float32),
        n_features=n_features,
        n_classes=n_classes,
        blob=blob,
        means=means,
        scales=scales,
        seed=seed,
    )
    return arr, means


def _chunks(n: int, c: int) -> list[int]:
    return [c] * (n // c) + ([n % c] if n % c else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--side", type=int, help="map side in pixels")
    p.add_argument("--gb", type=float, help="size in GB (float32) instead of --side")
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--blob", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--dates", type=int, help="write a time stack (time, y, x) of this many dates")
    args = p.parse_args()
    if args.side is None:
        if args.gb is None:
            p.error("give --side or --gb")
        args.side = int(math.sqrt(args.gb * 1e9 / (4 * args.features * (args.dates or 1))))
    if args.out.exists():
        p.error(f"{args.out} exists")
    coords = {
        "y": np.arange(args.side, dtype=np.float64),
        "x": np.arange(args.side, dtype=np.float64),
    }
    if args.dates:
        arr, means = big_time_stack(
            args.side, args.features, args.classes, args.dates, args.chunk, args.blob, args.seed
        )
        dims = ("time", "y", "x")
        coords["time"] = np.datetime64("2024-01-01", "ns") + np.arange(args.dates) * np.timedelta64(
            16, "D"
        )
    else:
        arr, means = big_stack(
            args.side, args.features, args.classes, args.chunk, args.blob, args.seed
        )
        dims = ("y", "x")
    ds = xr.Dataset(
        {f"attr_{f}": (dims, arr[f]) for f in range(args.features)},
        coords=coords,
        attrs={"source": "scripts/make_big_stack.py", "class_means": means.tolist()},
    )
    gb = arr.nbytes / 1e9
    what = f"{args.dates} dates x " if args.dates else ""
    print(
        f"writing {what}{args.side} x {args.side} x {args.features} float32 = {gb:.1f} GB to "
        f"{args.out}"
    )
    t = time.perf_counter()
    # written beside the target and renamed into place: a killed run leaves no half store
    tmp = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    try:
        with connect(n_workers=args.workers):
            ds.to_zarr(tmp, mode="w-", consolidated=True)
        os.rename(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s = time.perf_counter() - t
    on_disk = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e9
    print(f"done in {s:.0f} s ({gb / s:.2f} GB/s); {on_disk:.1f} GB on disk")


if __name__ == "__main__":
    main()
