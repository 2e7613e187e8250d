"""Benchmark the hidden Markov model (GaussianHMM) side by side in one run.

On the same generated sequences (every pixel of a time stack: ``--n`` pixels x ``--t``
dates x ``--d`` attributes, float32, from a sticky K-state HMM) and from the same start,
for diagonal and full covariances:

* daskem ``GaussianHMM`` on the embedded cluster the command line starts
  (:func:`daskem.cluster.connect`: 2 worker processes, one thread each; the sequences
  scattered once, as NumPy input is), EM iterations per second
  (median iteration, ``tol=0``, no covariance prior so EM never stops early);
* hmmlearn 0.3 ``GaussianHMM`` (one process; it has no parallel fit) on the first
  ``--hmmlearn-n`` sequences with ``lengths``, the time of one EM iteration scaled to
  ``--n`` sequences (its cost is linear in the number of sequences);
* the E-step + statistics kernel alone on one core (``HMMModel.block_stats`` on blocks of
  16,384 sequences) against a minimal vectorised NumPy forward-backward written here
  (``(n, T, K)`` arrays, scaled, broadcasting emissions, ``einsum`` statistics): what a
  user writing it by hand in NumPy would get.

Prints the ratios and saves them as JSON. Called by ``scripts/bench.py`` (its ``hmm``
section) or alone::

    python scripts/bench_hmm.py --json bench-hmm.json          # 1 M x 24 x 6, K = 5
    python scripts/bench_hmm.py --n 200000 --json small.json   # quicker
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

MIB = 2**20


def make_sequences(n: int, T: int, D: int, K: int, seed: int = 0):
    """``n`` sequences (n, T, D) float32 of a sticky K-state Gaussian HMM, and its truth."""
    rng = np.random.default_rng(seed)
    A = np.full((K, K), 0.1 / (K - 1))
    np.fill_diagonal(A, 0.9)
    means = rng.normal(scale=3.0, size=(K, D))
    z = np.empty((n, T), dtype=np.int64)
    z[:, 0] = rng.integers(0, K, size=n)
    cum = np.cumsum(A, axis=1)
    for t in range(1, T):
        u = rng.random(n)
        z[:, t] = (u[:, None] > cum[z[:, t - 1]]).sum(axis=1)
    X = means[z].astype(np.float32)
    X += rng.standard_normal(X.shape, dtype=np.float32)
    return X, {"startprob": np.full(K, 1.0 / K), "transmat": A, "means": means}


def start_params(K: int, D: int, cov: str, truth: dict, seed: int = 1) -> dict:
    """A start near (not at) the truth, as attributes of both estimators."""
    rng = np.random.default_rng(seed)
    covars = {
        "diag": np.full((K, D), 1.5),
        "full": np.tile(1.5 * np.eye(D), (K, 1, 1)),
    }[cov]
    A = np.full((K, K), 0.5 / (K - 1))
    np.fill_diagonal(A, 0.5)
    return {
        "startprob_": np.full(K, 1.0 / K),
        "transmat_": A,
        "means_": truth["means"] + rng.normal(scale=0.5, size=truth["means"].shape),
        "covars_": covars,
    }


def _set(model, start: dict):
    for k, v in start.items():
        setattr(model, k, np.array(v, copy=True))
    return model


def run_daskem(X: np.ndarray, K: int, cov: str, start: dict, iters: int) -> dict:
    from daskem import GaussianHMM
    from daskem.cluster import connect

    seconds: list[float] = []

    def cb(info):
        seconds.append(info.seconds)

    # the embedded cluster daskem's command line starts (its worker malloc settings)
    with (
        connect(n_workers=2, threads_per_worker=1, dashboard_address=None),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        m = GaussianHMM(
            K, covariance_type=cov, n_iter=iters, tol=0.0, covars_prior=0.0, init_params=""
        )
        _set(m, start)
        t0 = time.perf_counter()
        m.fit(X, callback=cb)
        total = time.perf_counter() - t0
    steady = float(np.median(seconds))
    return {
        "seconds_per_iteration": seconds,
        "seconds_total": total,
        "iterations_per_second": 1.0 / steady,
        "sequences_per_second": X.shape[0] / steady,
        "history": [float(v) for v in m.monitor_.history],
    }


def run_hmmlearn(X: np.ndarray, K: int, cov: str, start: dict, n_total: int) -> dict | None:
    try:
        from hmmlearn.hmm import GaussianHMM as H
    except ImportError:
        return None
    n, T, D = X.shape
    flat = X.reshape(n * T, D).astype(np.float64)
    times = []
    for iters in (1, 3):
        m = H(K, covariance_type=cov, n_iter=iters, tol=-np.inf, covars_prior=0.0, init_params="")
        _set(m, start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m.fit(flat, [T] * n)
            times.append(time.perf_counter() - t0)
    per_iter = (times[1] - times[0]) / 2  # setup (checks) cancels out
    per_iter = per_iter if per_iter > 0 else times[1] / 3
    rate = n / per_iter
    return {
        "n": n,
        "seconds_per_iteration": per_iter,
        "sequences_per_second": rate,
        "iterations_per_second_scaled": rate / n_total,
    }


# ----------------------------------------------------------------- the minimal NumPy baseline


def minimal_numpy_stats(X: np.ndarray, start: dict, cov: str):
    """A plain vectorised forward-backward and the M-step sums, as one would write it.

    ``X`` (n, T, D) float64; returns (log-likelihood, start, trans, post, obs, obs2)."""
    pi, A = start["startprob_"], start["transmat_"]
    mu = start["means_"]
    K, D = mu.shape
    if cov == "diag":
        var = start["covars_"]
        diff = X[:, :, None, :] - mu  # (n, T, K, D)
        logB = -0.5 * (
            D * np.log(2 * np.pi) + np.log(var).sum(-1) + (diff**2 / var).sum(-1)
        )  # (n, T, K)
    else:
        C = start["covars_"]
        L = np.linalg.cholesky(C)
        diff = X[:, :, None, :] - mu
        sol = np.linalg.solve(L[None, None], diff[..., None])[..., 0]
        logdet = 2 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(-1)
        logB = -0.5 * (D * np.log(2 * np.pi) + logdet + (sol**2).sum(-1))
    n, T, _ = logB.shape
    off = logB.max(axis=2, keepdims=True)
    B = np.exp(logB - off)
    alpha = np.empty_like(B)
    c = np.empty((n, T))
    a = pi * B[:, 0]
    c[:, 0] = a.sum(1)
    alpha[:, 0] = a / c[:, 0, None]
    for t in range(1, T):
        a = (alpha[:, t - 1] @ A) * B[:, t]
        c[:, t] = a.sum(1)
        alpha[:, t] = a / c[:, t, None]
    beta = np.ones_like(B)
    for t in range(T - 2, -1, -1):
        beta[:, t] = (B[:, t + 1] * beta[:, t + 1]) @ A.T / c[:, t + 1, None]
    gamma = alpha * beta
    xi = np.einsum("ntk,kl,ntl->kl", alpha[:, :-1], A, B[:, 1:] * beta[:, 1:] / c[:, 1:, None])
    ll = (np.log(c).sum(1) + off[..., 0].sum(1)).sum()
    post = gamma.sum((0, 1))
    obs = np.einsum("ntk,ntd->kd", gamma, X)
    if cov == "diag":
        obs2 = np.einsum("ntk,ntd->kd", gamma, X * X)
    else:
        obs2 = np.einsum("ntk,ntd,nte->kde", gamma, X, X)
    return ll, gamma[:, 0].sum(0), xi, post, obs, obs2


def run_kernels(X: np.ndarray, K: int, cov: str, start: dict, repeats: int = 3) -> dict:
    from daskem.engine import blas_one_thread
    from daskem.model.hmm import HMMModel, HMMParams

    n, T, D = X.shape
    block = np.asarray(X[: min(n, 16_384)], dtype=np.float64)
    covars = np.asarray(start["covars_"], dtype=np.float64)
    params = HMMParams(start["startprob_"], start["transmat_"], start["means_"], covars, cov)
    model = HMMModel(T, D, cov, covars_prior=0.0)
    rows = block.reshape(len(block), T * D)
    out = {}
    with blas_one_thread():
        for name, fn in (
            ("daskem", lambda: model.block_stats(params, rows)),
            ("minimal_numpy", lambda: minimal_numpy_stats(block, start, cov)),
        ):
            fn()
            best = np.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = fn()
                best = min(best, time.perf_counter() - t0)
            out[name] = {"seconds": best, "sequences_per_second": len(block) / best}
            out[name + "_loglik"] = float(res.loglik if name == "daskem" else res[0])
    out["same_loglik"] = abs(out["daskem_loglik"] - out["minimal_numpy_loglik"]) <= 1e-8 * abs(
        out["minimal_numpy_loglik"]
    )
    return out


def run(n: int, T: int, D: int, K: int, iters: int, hmmlearn_n: int, covs=("diag", "full")):
    X, truth = make_sequences(n, T, D, K)
    print(f"sequences: {n:,} x {T} dates x {D} attributes, float32, {X.nbytes / MIB:.0f} MiB")
    results: dict = {"config": {"n": n, "t": T, "d": D, "k": K, "iters": iters}, "runs": {}}
    for cov in covs:
        start = start_params(K, D, cov, truth)
        r: dict = {}
        r["daskem_cluster"] = run_daskem(X, K, cov, start, iters)
        print(
            f"[{cov}] daskem, 2 workers: "
            f"{r['daskem_cluster']['iterations_per_second']:.3f} it/s "
            f"({r['daskem_cluster']['sequences_per_second']:,.0f} seq/s)",
            flush=True,
        )
        hl = run_hmmlearn(X[:hmmlearn_n], K, cov, start, n)
        if hl is not None:
            r["hmmlearn"] = hl
            print(
                f"[{cov}] hmmlearn on {hl['n']:,}: {hl['sequences_per_second']:,.0f} seq/s, "
                f"{hl['iterations_per_second_scaled']:.4f} it/s scaled to {n:,}",
                flush=True,
            )
        r["kernels_1core"] = run_kernels(X, K, cov, start)
        kr = r["kernels_1core"]
        print(
            f"[{cov}] kernel 1 core: daskem {kr['daskem']['sequences_per_second']:,.0f} seq/s, "
            f"minimal NumPy {kr['minimal_numpy']['sequences_per_second']:,.0f} seq/s "
            f"(same log-likelihood: {kr['same_loglik']})",
            flush=True,
        )
        ratios = {}
        if hl is not None:
            ratios["daskem (2 workers) / hmmlearn (1 process), EM iterations per second"] = (
                r["daskem_cluster"]["iterations_per_second"] / hl["iterations_per_second_scaled"]
            )
        ratios["daskem kernel / minimal NumPy forward-backward, 1 core"] = (
            kr["daskem"]["sequences_per_second"] / kr["minimal_numpy"]["sequences_per_second"]
        )
        r["ratios"] = ratios
        results["runs"][cov] = r
    return results


def report(results: dict) -> None:
    cfg = results["config"]
    print(
        f"\nGaussianHMM: {cfg['n']:,} sequences x {cfg['t']} dates x {cfg['d']} attributes, "
        f"K = {cfg['k']}, {cfg['iters']} iterations"
    )
    for cov, r in results["runs"].items():
        for k, v in r["ratios"].items():
            print(f"  [{cov}] {k:76s} {v:8.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="sequences (pixels)")
    parser.add_argument("--t", type=int, default=24, help="dates")
    parser.add_argument("--d", type=int, default=6, help="attributes")
    parser.add_argument("--k", type=int, default=5, help="states")
    parser.add_argument("--iters", type=int, default=4, help="EM iterations of the daskem fit")
    parser.add_argument("--hmmlearn-n", type=int, default=5_000, help="hmmlearn subset")
    parser.add_argument("--cov", default="diag,full")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    covs = [c for c in args.cov.split(",") if c]
    results = run(args.n, args.t, args.d, args.k, args.iters, args.hmmlearn_n, covs)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
