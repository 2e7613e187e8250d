"""EM with missing attributes: parameter recovery and gap filling, against simple baselines.

Two parts, each printed as a markdown table (mean ± std over seeds):

**Synthetic cloud stacks** (:func:`daskem.synthetic.make_stack` with ``clouds``: blobs of
pixels that miss 1 to D-1 attributes, 20-40 % of the pixels, correlated in space, and a
few all-missing holes). On each stack, with the true parameters known, three
``GaussianMixture(n_classes)`` fits through :func:`daskem.io.fit_stack`:

* ``marginalize`` -- every pixel with an observed attribute (EM with missing data), one
  set of mixing weights (``pattern_weights=False``);
* ``marginalize, weights by pattern`` -- the same with ``pattern_weights=True`` (every
  pattern of observed attributes has its own mixing weights; the default for stacks);
* ``omit`` -- only the pixels with every attribute observed;
* ``complete`` -- the same stack before the clouds hid anything (the best any method
  could do with these pixels; a yardstick, not a method);
* with ``--spatial``, the same three under the spatial prior
  (:class:`~daskem.SpatialGaussianMixture`, ``spatial_beta="auto"``,
  ``spatial_fit="joint"``, whose emissions are fitted with the prior, a fixed
  ``--spatial-iters`` iterations: its objective is monitored, not monotone). Its
  emissions always marginalise, so ``omit`` there is the stack with every attribute of
  the partly missing pixels removed (they keep a class from the prior, no emission).

``--missingness shuffled`` permutes the pixels of the cloud mask (same attributes hidden,
same counts, no longer in blobs over the class regions): a control that separates the
effect of clouds being spatially clustered from that of the patterns themselves. Per
seed, the differences ``marginalize - omit`` of every error are tabulated with the
number of seeds where ``marginalize`` is closer and a paired t-test.

Each fit runs to ``tol=1e-7`` (the default 1e-3 stops early where classes overlap, an
error larger than the ones compared here). Components are matched to the true classes
(Hungarian algorithm on the distance of the means in units of the true standard
deviations). Errors: ``mean`` -- RMS over classes of
the distance between fitted and true mean in true standard deviations; ``cov`` -- mean
over classes of the relative Frobenius error of the covariance in those units;
``weight`` -- largest absolute error of a mixing weight against the class fractions of
the ground truth; ``KL`` -- the Kullback-Leibler divergence of the fitted mixture from
the true one (Monte Carlo over 200 000 draws from the true mixture), which weighs every
parameter by how much it changes the density. Gap filling (``marginalize`` model,
``posterior(..., impute=True)``):
RMSE of the filled values against the hidden truth, per attribute in units of the
attribute's standard deviation and averaged over attributes, against filling with the
attribute's mean; ``cover`` -- fraction of hidden values within ±2 ``*_std``.

**Real data** (the loaders of ``scripts/realdata.py``; data sets whose package is not
installed are skipped and named): in each table (and the Landsat scene's pixels), 30 %
of the rows lose 1-3 random attributes (missing completely at random). Methods filling
them: daskem (``GaussianMixture(n_classes, nan_policy="marginalize").impute``, one
full-covariance component per class, no labels), the attribute's mean, scikit-learn's
``IterativeImputer`` (chained Bayesian ridge regressions, 10 rounds) and ``KNNImputer``
(5 neighbours; tables only: on the scene's pixels it is too slow to be a baseline users
would try). Standardised RMSE as above, and daskem's ±2 std coverage.

Usage::

    python scripts/eval_missing.py                   # 5 seeds, ~3 min on 2 cores
    python scripts/eval_missing.py --seeds 10 --spatial --datasets none
    python scripts/eval_missing.py --seeds 10 --missingness shuffled --datasets none
    python scripts/eval_missing.py --quick           # 2 seeds, small stacks
    python scripts/eval_missing.py --datasets wine --seeds 2 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import dask
import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realdata  # noqa: E402

from daskem import GaussianMixture  # noqa: E402
from daskem.io import fit_stack, open_stack, posterior  # noqa: E402
from daskem.synthetic import make_stack  # noqa: E402

HIDE_FRACTION = 0.3
# parameters are compared at the optimum: EM's default tol (1e-3 of the mean
# log-likelihood) stops early when classes overlap, and that error would swamp the others
TOL = 1e-7
# iterations of every spatial-prior fit (its objective is not monotone: no tol stopping)
SPATIAL_ITERS = 60
FITS = {
    "marginalize": "marginalize",
    "marginalize_pattern": "marginalize, weights by pattern",
    "omit": "omit",
    "complete": "complete (before the clouds)",
    "marginalize_spatial": "marginalize + spatial prior",
    "omit_spatial": "omit + spatial prior",
    "complete_spatial": "complete + spatial prior",
}


def _match(means: np.ndarray, true_means: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Component index matched to each true class."""
    d = (((means[:, None, :] - true_means[None]) / sd) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(d)
    out = np.empty(true_means.shape[0], dtype=int)
    out[cols] = rows
    return out


def _param_errors(gm, true_means, true_covs, true_weights) -> dict[str, float]:
    if hasattr(gm, "patterns_"):
        # weights by pattern: the fitted mixture of all pixels is the one with weights_
        # (score_samples would give complete rows the complete pixels' proportions)
        gm = copy.copy(gm)
        del gm.patterns_, gm.pattern_weights_
    sd = np.sqrt(np.diagonal(true_covs, axis1=1, axis2=2)).mean(axis=0)
    idx = _match(gm.means_, true_means, sd)
    mean_err = np.sqrt(np.mean((((gm.means_[idx] - true_means) / sd) ** 2).sum(-1)))
    scale = np.outer(sd, sd)
    cov = gm.covariances_[idx] / scale
    tc = true_covs / scale
    cov_err = np.mean(
        [np.linalg.norm(cov[k] - tc[k]) / np.linalg.norm(tc[k]) for k in range(len(tc))]
    )
    w_err = np.abs(gm.weights_[idx] - true_weights).max()
    # KL(true mixture || fitted mixture), Monte Carlo over draws from the true mixture
    rng = np.random.default_rng(12345)
    n = 200_000
    z = rng.choice(len(true_weights), size=n, p=true_weights)
    L = np.linalg.cholesky(true_covs)
    x = true_means[z] + np.einsum("nij,nj->ni", L[z], rng.standard_normal((n, sd.size)))
    true_gm = GaussianMixture(len(true_weights), covariance_type="full")
    true_gm.weights_, true_gm.means_, true_gm.covariances_ = true_weights, true_means, true_covs
    true_gm.precisions_cholesky_ = np.linalg.inv(L).transpose(0, 2, 1)
    true_gm.precisions_ = np.linalg.inv(true_covs)
    true_gm.n_features_in_, true_gm.component_classes_ = sd.size, np.arange(len(true_weights))
    true_gm.n_classes_, true_gm.nan_policy = len(true_weights), "raise"
    kl = float(np.mean(true_gm.score_samples(x) - gm.score_samples(x)))
    return {"mean": float(mean_err), "cov": float(cov_err), "weight": float(w_err), "kl": kl}


def _fill_scores(filled, std, hidden, truth, observed_sd) -> dict[str, float]:
    """Standardised RMSE of the filled values (mean over attributes) and ±2 std coverage."""
    rmse, cover = [], []
    for k in range(truth.shape[1]):
        m = hidden[:, k]
        if m.any():
            rmse.append(np.sqrt(np.mean((filled[m, k] - truth[m, k]) ** 2)) / observed_sd[k])
            if std is not None:
                cover.append(np.abs(filled[m, k] - truth[m, k]) <= 2 * std[m, k])
    out = {"rmse": float(np.mean(rmse))}
    if std is not None:
        out["cover"] = float(np.concatenate(cover).mean())
    return out


def _hide_cloud_pixels(ds, names: list[str]) -> None:
    """Every attribute of every partly missing pixel of ``ds`` set to NaN, in place."""
    obs = np.stack([np.isfinite(ds[v].values) for v in names], axis=-1)
    partial = obs.any(axis=-1) & ~obs.all(axis=-1)
    for v in names:
        ds[v] = ds[v].where(~partial)


def _shuffle_clouds(ds, names: list[str], rng: np.random.Generator) -> None:
    """The cloud mask of ``ds`` with its pixels permuted, in place: the same patterns in
    the same numbers, no longer in blobs over the class regions."""
    hidden = np.stack(
        [
            np.isnan(ds[v].values) & np.isfinite(ds[f"{v}_true"].values)
            if f"{v}_true" in ds
            else np.zeros(ds[v].shape, dtype=bool)
            for v in names
        ],
        axis=-1,
    )
    shape = hidden.shape[:-1]
    flat = hidden.reshape(-1, len(names))
    hidden = flat[rng.permutation(flat.shape[0])].reshape(*shape, len(names))
    for k, v in enumerate(names):
        if f"{v}_true" in ds:
            ds[v] = ds[f"{v}_true"].where(~hidden[..., k])


def synthetic_run(
    seed: int,
    shape: tuple[int, int],
    clouds: float,
    n_classes: int,
    missingness: str = "clouds",
    spatial_iters: int = 0,
    cloud_blobs: int = 8,
) -> dict:
    """One stack and its fits.

    Parameters
    ----------
    seed, shape, clouds, n_classes
        The stack (:func:`daskem.synthetic.make_stack`) and the fraction of partly
        missing pixels.
    missingness : {"clouds", "shuffled", "random"}
        ``clouds``: the generator's cloud blobs; ``shuffled``: the same cloud mask with
        its pixels permuted (same patterns and counts, independent of the class map);
        ``random``: one random attribute hidden on a random ``clouds`` fraction of the
        pixels.
    spatial_iters : int
        If > 0, also fit the spatial prior (:class:`~daskem.SpatialGaussianMixture`,
        ``spatial_beta="auto"``, ``spatial_fit="joint"``) for this many iterations under
        each policy.
    """
    ds = make_stack(
        shape,
        n_classes=n_classes,
        n_features=4,
        clouds=0.0 if missingness == "random" else clouds,
        cloud_blobs=cloud_blobs,
        nan_fraction=0.02,
        seed=seed,
    )
    names = [f"attr_{k}" for k in range(4)]
    complete = ds.copy(deep=True)
    if missingness == "random":
        rng = np.random.default_rng(1000 + seed)
        hide = rng.random(shape) < clouds
        which = rng.integers(0, len(names), size=shape)
        for k, v in enumerate(names):
            ds[v] = ds[v].where(~(hide & (which == k)))
    elif missingness == "shuffled":
        _shuffle_clouds(ds, names, np.random.default_rng(2000 + seed))
    for v in names:
        if f"{v}_true" in ds:
            complete[v] = ds[f"{v}_true"]
    true_means = np.asarray(ds.attrs["true_means"])
    true_covs = np.asarray(ds.attrs["true_covariances"])
    t = ds["truth"].values.ravel()
    true_weights = np.bincount(t[t >= 0], minlength=n_classes) / (t >= 0).sum()
    chunks = max(shape) // 2
    stack = open_stack(ds, variables=names, chunks=chunks)
    out: dict = {"seed": seed, "missingness": missingness}
    X = np.stack([ds[v].values.ravel() for v in names], axis=1)
    obs = np.isfinite(X)
    out["partly_missing"] = float((obs.any(1) & ~obs.all(1)).mean())
    complete_stack = open_stack(complete, variables=names, chunks=chunks)
    fits = [
        # one set of weights (fit_stack's default for stacks is weights by pattern)
        ("marginalize", stack, "marginalize", {"pattern_weights": False}),
        ("marginalize_pattern", stack, "marginalize", {"pattern_weights": True}),
        ("omit", stack, "omit", {}),
        ("complete", complete_stack, "omit", {}),
    ]
    if spatial_iters > 0:
        # The spatial prior's objective is monitored, not guaranteed to increase (it
        # wobbles by ~1e-3 per pixel between iterations), so every spatial fit runs the
        # same fixed number of iterations. Its emissions always marginalise missing
        # attributes; "omit" is therefore a stack whose partly missing pixels have
        # nothing observed (no emission term: their class from the prior alone).
        omitted = ds.copy(deep=True)
        _hide_cloud_pixels(omitted, names)
        # the joint fit: its emissions are fitted with the prior (the staged fit's are the
        # pixel-wise mixture's, so its parameter errors would be the pixel-wise ones)
        prior = {
            "spatial_beta": "auto",
            "spatial_fit": "joint",
            "tol": 0.0,
            "max_iter": spatial_iters,
        }
        fits += [
            ("marginalize_spatial", stack, "marginalize", prior),
            (
                "omit_spatial",
                open_stack(omitted, variables=names, chunks=chunks),
                "marginalize",
                prior,
            ),
            ("complete_spatial", complete_stack, "marginalize", prior),
        ]
    for name, st, policy, extra in fits:
        t0 = time.perf_counter()
        kwargs = {"tol": TOL, "max_iter": 2000, **extra}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fixed iteration counts of the spatial fits
            gm = fit_stack(st, n_classes, random_state=seed, nan_policy=policy, **kwargs)
        out[name] = {**_param_errors(gm, true_means, true_covs, true_weights)}
        out[name]["time"] = time.perf_counter() - t0
        if name.endswith("_spatial"):
            out[name]["beta"] = float(gm.spatial_beta_)
        if name in ("marginalize", "marginalize_pattern"):
            post = posterior(gm, stack, impute=True)[[*names, *(f"{v}_std" for v in names)]]
            post = post.compute()
            filled = np.stack([post[v].values.ravel() for v in names], axis=1)
            std = np.stack([post[f"{v}_std"].values.ravel() for v in names], axis=1)
            truth = np.stack([complete[v].values.ravel() for v in names], axis=1)
            hidden = ~obs & np.isfinite(truth) & obs.any(axis=1)[:, None]
            sd = np.nanstd(X, axis=0)
            key = "fill" if name == "marginalize" else "fill_pattern"
            out[key] = _fill_scores(filled, std, hidden, truth, sd)
            mean_fill = np.where(obs, X, np.nanmean(X, axis=0))
            out["mean_fill"] = _fill_scores(mean_fill, None, hidden, truth, sd)
    return out


def _paired(runs: list[dict], a: str, b: str) -> list[str]:
    """Table rows of the per-seed differences ``a - b`` of every error (negative: ``a``
    closer): mean ± sd, seeds where ``a`` is closer, two-sided paired t-test p-value."""
    from scipy.stats import ttest_rel

    rows = []
    for key, label, scale in METRICS:
        x = np.array([scale * r[a][key] for r in runs])
        y = np.array([scale * r[b][key] for r in runs])
        d = x - y
        p = float(ttest_rel(x, y).pvalue) if len(runs) > 1 and np.any(d != d[0]) else float("nan")
        rows.append(f"| {label} | {_ms(d)} | {int((d < 0).sum())} of {len(d)} | {p:.3f} |")
    return rows


METRICS = (
    ("mean", "mean error (sd)", 1.0),
    ("cov", "covariance error (rel.)", 1.0),
    ("weight", "weight error", 1.0),
    ("kl", "KL (1e-3 nats)", 1e3),
)


def _hide(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``HIDE_FRACTION`` of the rows lose 1-3 random attributes (at least one stays)."""
    n, D = X.shape
    Xm = X.copy()
    rows = rng.choice(n, size=int(HIDE_FRACTION * n), replace=False)
    for i in rows:
        k = rng.integers(1, min(3, D - 1) + 1)
        Xm[i, rng.choice(D, size=k, replace=False)] = np.nan
    return Xm


def real_run(name: str, X: np.ndarray, n_classes: int, seed: int, knn: bool) -> dict:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    rng = np.random.default_rng(seed)
    Xm = _hide(X, rng)
    hidden = np.isnan(Xm)
    sd = np.nanstd(Xm, axis=0)
    out: dict = {"data": name, "seed": seed, "n": int(X.shape[0]), "D": int(X.shape[1])}
    t0 = time.perf_counter()
    gm = GaussianMixture(n_classes, nan_policy="marginalize", random_state=seed, max_iter=300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(Xm)
    filled, std = gm.impute(Xm, return_std=True)
    out["daskem"] = {**_fill_scores(filled, std, hidden, X, sd), "time": time.perf_counter() - t0}
    out["mean"] = _fill_scores(np.where(hidden, np.nanmean(Xm, axis=0), Xm), None, hidden, X, sd)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = IterativeImputer(max_iter=10, random_state=seed).fit_transform(Xm)
    out["iterative"] = {**_fill_scores(it, None, hidden, X, sd), "time": time.perf_counter() - t0}
    if knn:
        t0 = time.perf_counter()
        kn = KNNImputer(n_neighbors=5).fit_transform(Xm)
        out["knn"] = {**_fill_scores(kn, None, hidden, X, sd), "time": time.perf_counter() - t0}
    return out


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 128 x 128 stacks")
    ap.add_argument("--clouds", type=float, default=0.3, help="fraction of partly missing pixels")
    ap.add_argument(
        "--cloud-blobs",
        type=int,
        default=8,
        help="about how many cloud blobs cover --clouds (more: smaller blobs; default 8)",
    )
    ap.add_argument(
        "--missingness",
        choices=("clouds", "shuffled", "random"),
        default="clouds",
        help="synthetic part: cloud blobs (correlated in space, hence with the class "
        "regions), the same cloud mask with its pixels permuted (same patterns, independent "
        "of the class map), or one random attribute hidden on random pixels",
    )
    ap.add_argument(
        "--spatial",
        action="store_true",
        help="synthetic part: also fit the spatial prior (spatial_beta='auto') per policy",
    )
    ap.add_argument(
        "--spatial-iters",
        type=int,
        default=SPATIAL_ITERS,
        help="iterations of each spatial fit (its objective is monitored, not monotone)",
    )
    ap.add_argument(
        "--datasets",
        default="wine,penguins,vehicle,satimage,nc_landsat",
        help="real data sets (comma-separated; 'none' for the synthetic part only)",
    )
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--json", type=Path, help="write every run's numbers here")
    args = ap.parse_args(argv)
    seeds = range(2 if args.quick else args.seeds)
    shape = (128, 128) if args.quick else (256, 256)
    result: dict = {"synthetic": [], "real": [], "skipped": []}
    with dask.config.set(scheduler="threads"):
        if not args.no_synthetic:
            for s in seeds:
                result["synthetic"].append(
                    synthetic_run(
                        s,
                        shape,
                        args.clouds,
                        4,
                        args.missingness,
                        args.spatial_iters if args.spatial else 0,
                        args.cloud_blobs,
                    )
                )
    runs = result["synthetic"]
    if runs:
        pm = [r["partly_missing"] for r in runs]
        print(
            f"\nSynthetic stacks ({args.missingness}, {args.cloud_blobs} cloud blobs) "
            f"{shape[0]} x {shape[1]}, 4 classes, "
            "4 attributes, "
            f"{len(runs)} seeds, partly missing pixels {_ms(pm)}\n"
        )
        print("| fit | mean error (sd) | covariance error (rel.) | weight error | KL (1e-3 nats) |")
        print("| --- | --- | --- | --- | --- |")
        fits = [p for p in FITS if p in runs[0]]
        for p in fits:
            e = [r[p] for r in runs]
            print(
                f"| {FITS[p]} | "
                + " | ".join(_ms([s * x[k] for x in e]) for k, _, s in METRICS)
                + " |"
            )
        pairs = [
            ("marginalize", "omit"),
            ("marginalize_pattern", "omit"),
            ("marginalize_pattern", "marginalize"),
        ]
        if "marginalize_spatial" in runs[0]:
            pairs += [("marginalize_spatial", "omit_spatial"), ("marginalize_spatial", "omit")]
            print(f"\nspatial_beta fitted: {_ms([r['marginalize_spatial']['beta'] for r in runs])}")
        for a, b in pairs:
            print(f"\nPaired per seed: {FITS[a]} minus {FITS[b]} (negative: {FITS[a]} closer)\n")
            print(f"| error | difference | seeds where {FITS[a]} is closer | paired t-test p |")
            print("| --- | --- | --- | --- |")
            print("\n".join(_paired(runs, a, b)))
        print("\n| gap filling | RMSE (sd) | ±2 std coverage |")
        print("| --- | --- | --- |")
        print(
            f"| daskem impute | {_ms([r['fill']['rmse'] for r in runs])} "
            f"| {_ms([r['fill']['cover'] for r in runs])} |"
        )
        print(
            f"| daskem impute, weights by pattern | "
            f"{_ms([r['fill_pattern']['rmse'] for r in runs])} "
            f"| {_ms([r['fill_pattern']['cover'] for r in runs])} |"
        )
        print(f"| attribute mean | {_ms([r['mean_fill']['rmse'] for r in runs])} | |")
    names = [] if args.datasets == "none" else args.datasets.split(",")
    for name in names:
        try:
            if name == "nc_landsat":
                scene = realdata.load_nc_landsat()
                X = scene.X.reshape(-1, scene.X.shape[-1])
                C, knn = scene.n_classes, False
            else:
                table = realdata.TABLES[name]()
                X, C, knn = table.X, table.n_classes, True
        except (ImportError, ModuleNotFoundError, KeyError) as e:
            result["skipped"].append(f"{name}: {e}")
            continue
        for s in seeds:
            result["real"].append(real_run(name, np.asarray(X, dtype=np.float64), C, s, knn))
    if result["real"]:
        print(
            f"\nReal data, {int(HIDE_FRACTION * 100)} % of rows missing 1-3 attributes, "
            "RMSE of the filled values (in attribute sd; lower is better)\n"
        )
        print("| data | n x D | daskem | ±2 std coverage | mean | IterativeImputer | KNNImputer |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name in dict.fromkeys(r["data"] for r in result["real"]):
            rs = [r for r in result["real"] if r["data"] == name]
            knn = _ms([r["knn"]["rmse"] for r in rs]) if "knn" in rs[0] else "-"
            print(
                f"| {name} | {rs[0]['n']} x {rs[0]['D']} | {_ms([r['daskem']['rmse'] for r in rs])}"
                f" | {_ms([r['daskem']['cover'] for r in rs])}"
                f" | {_ms([r['mean']['rmse'] for r in rs])}"
                f" | {_ms([r['iterative']['rmse'] for r in rs])} | {knn} |"
            )
    for s in result["skipped"]:
        print(f"skipped {s}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
