"""Fit a stack larger than memory and report seconds per pass and peak memory of every process.

    python scripts/make_big_stack.py /tmp/big.zarr --gb 36      # bigger than this machine's RAM
    python scripts/bench_big.py /tmp/big.zarr -k 6 --json big.json
    python scripts/bench_big.py /tmp/big.zarr -k 4 --spatial-beta auto   # with the spatial prior
    python scripts/bench_big.py /tmp/ts.zarr -k 6 --time-dim time        # a hidden Markov model

Runs on an embedded ``LocalCluster`` (2 single-threaded workers with a memory limit) so
that peak memory is bounded by construction and measured per process: the client (this
process), the scheduler and each worker (``VmHWM``, their peak resident set).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from daskem import io
from daskem.cluster import connect, peak_rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stack", type=Path)
    p.add_argument("-k", type=int, default=6)
    p.add_argument("--covariance", default="full")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="1.5GiB")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--verbose", action="store_true", help="print every daskem log record (DEBUG), timed"
    )
    p.add_argument(
        "--spatial-beta", help="fit with the spatial prior: 'auto' or a number (default: none)"
    )
    p.add_argument("--neighbourhood", type=int, default=8)
    p.add_argument(
        "--spatial-fit", choices=("staged", "joint"), default="staged", help="(default staged)"
    )
    p.add_argument(
        "--time-dim", help="a time stack: fit a hidden Markov model over every pixel's dates"
    )
    p.add_argument(
        "--task-stream",
        type=Path,
        help="write every task's worker, key and start/stop times (seconds from the fit's "
        "start) to this JSON file, to find what a slow pass waited for",
    )
    args = p.parse_args()
    spatial = {}
    if args.spatial_beta is not None:
        beta = args.spatial_beta if args.spatial_beta == "auto" else float(args.spatial_beta)
        spatial = {
            "spatial_beta": beta,
            "neighbourhood": args.neighbourhood,
            "spatial_fit": args.spatial_fit,
        }

    notes: list[str] = []  # the fit's stages (e.g. the prior stage's sample of windows)

    class _Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = f"{time.perf_counter() - t0:.0f} s: {record.getMessage()}"
            notes.append(msg)
            print(msg, flush=True)

    hmrf_log = logging.getLogger("daskem" if args.verbose else "daskem.hmrf")
    hmrf_log.addHandler(_Notes(logging.DEBUG if args.verbose else logging.INFO))
    hmrf_log.setLevel(logging.DEBUG if args.verbose else logging.INFO)

    passes: list[dict] = []
    scale = [1.0]  # a hidden Markov model's objective is a total: per pixel here

    def on_iteration(info) -> None:
        ll = info.lower_bound / scale[0]
        beta = getattr(info.params, "beta", None)
        stage = 1
        if passes and info.iteration <= passes[-1]["iteration"]:
            stage = passes[-1]["stage"] + 1  # a staged spatial fit's second stage
        elif passes:
            stage = passes[-1]["stage"]
        passes.append(
            {"iteration": info.iteration, "seconds": info.seconds, "ll": ll, "stage": stage}
        )
        if beta is not None:
            passes[-1]["beta"] = float(beta)
        print(
            f"pass {info.iteration} (stage {stage}): {info.seconds:.1f} s, "
            f"{info.samples_per_second / 1e6:.2f} M px/s, ll/px {ll:.6f}"
            + ("" if beta is None else f", beta {beta:.4f}"),
            flush=True,
        )

    t0 = time.perf_counter()
    with connect(
        n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit
    ) as client:
        stack = io.open_stack(args.stack, time_dim=args.time_dim)
        gb = stack.data.nbytes / 1e9
        what = (
            f"{stack.n_sequences:,} pixels x {stack.n_times} dates"
            if args.time_dim
            else f"{stack.n_pixels:,} pixels"
        )
        print(f"{what} x {stack.n_features} attributes = {gb:.1f} GB "
              f"(float32), chunks {' x '.join(str(c[0]) for c in stack.chunks)}")  # fmt: skip
        t_fit = time.perf_counter()
        stream = None
        if args.task_stream:
            from distributed import get_task_stream

            stream = get_task_stream(client)
            stream.__enter__()
            t_stream = time.time()
        if args.time_dim:  # the HMM's tol is on the total log-likelihood: per pixel here
            per_pixel = scale[0] = stack.n_sequences
            gm = io.fit_stack(
                stack, args.k, method="hmm", covariance_type=args.covariance,
                tol=args.tol * per_pixel, n_iter=args.max_iter, random_state=0,
                callback=on_iteration,
            )  # fmt: skip
        else:
            gm = io.fit_stack(
                stack, args.k, covariance_type=args.covariance, tol=args.tol,
                max_iter=args.max_iter, random_state=0, callback=on_iteration, **spatial,
            )  # fmt: skip
        fit_s = time.perf_counter() - t_fit
        if stream is not None:
            stream.__exit__(None, None, None)
            tasks = [
                {
                    "worker": t["worker"],
                    "key": str(t["key"]),
                    "startstops": [
                        {
                            "action": ss["action"],
                            "start": round(ss["start"] - t_stream, 4),
                            "stop": round(ss["stop"] - t_stream, 4),
                        }
                        for ss in t["startstops"]
                    ],
                }
                for t in stream.data
            ]
            args.task_stream.write_text(json.dumps({"fit_start": 0.0, "tasks": tasks}))
            print(f"wrote {len(tasks)} tasks' times to {args.task_stream}", flush=True)
        workers = client.run(peak_rss)
        scheduler = client.run_on_scheduler(peak_rss)
        scheduler_pid = client.run_on_scheduler(os.getpid)
    total_s = time.perf_counter() - t0
    client_peak = peak_rss()
    if scheduler_pid == os.getpid():  # LocalCluster's scheduler lives in this process
        peaks = {"client + scheduler": client_peak, **workers}
    else:
        peaks = {"client": client_peak, "scheduler": scheduler, **workers}
    out = {
        "stack": str(args.stack),
        "gigabytes": gb,
        "pixels": stack.n_pixels,
        "passes": passes,
        "notes": notes,
        "n_iter": gm.n_iter_,
        "converged": gm.converged_,
        "fit_seconds": fit_s,
        "total_seconds": total_s,
        "seconds_per_pass_median": sorted(x["seconds"] for x in passes)[len(passes) // 2],
        "peak_rss_bytes": peaks,
        "peak_rss_total_gb": sum(peaks.values()) / 1e9,
        "memory_limit_per_worker": args.memory_limit,
        "spatial": {**spatial, "fitted_beta": getattr(gm, "spatial_beta_", None)} or None,
    }
    for stage in sorted({x["stage"] for x in passes}):
        t = sorted(x["seconds"] for x in passes if x["stage"] == stage)
        out[f"seconds_per_pass_median_stage{stage}"] = t[len(t) // 2]
        print(f"stage {stage}: {len(t)} passes, median {t[len(t) // 2]:.1f} s per pass")
    median = out["seconds_per_pass_median"]
    print(f"fit {fit_s:.0f} s ({gm.n_iter_} passes, converged={gm.converged_}), "
          f"total {total_s:.0f} s, median {median:.1f} s per pass")  # fmt: skip
    for name, b in peaks.items():
        print(f"peak RSS {name}: {b / 2**20:.0f} MiB")
    print(f"peak RSS all processes: {out['peak_rss_total_gb']:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
