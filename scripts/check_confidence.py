"""Confidence of the wrong pixels of maps with and without the spatial prior, on synthetic
stacks, and the same Potts posterior's class probabilities by Gibbs sampling.

For each separation and seed: a ``side`` x ``side`` stack of 4 spatially coherent classes
(:func:`daskem.synthetic.make_stack`, 4 attributes, its 5 labelled pixels per class), the
pixel-wise ``GaussianMixtureClassifier`` and ``SpatialGaussianMixtureClassifier`` (staged
and joint, ``spatial_beta="auto"``); per map: accuracy, number of wrong pixels and the
mean confidence (largest class probability) of the wrong and of the right ones, the
expected calibration error (10 bins) and the wrong pixels' mean confidence in the same
map recalibrated by an oracle (each pixel's confidence replaced by an isotonic fit of
the map's correctness on its confidence: the accuracy of the map's pixels as confident
as it), which tells how confident a *calibrated* map with these errors would be. With
``--gibbs N``, the staged fit's Potts posterior is also sampled: N colour sweeps of
Gibbs sampling at its parameters from the mean-field map, after ``--burn-in`` sweeps,
each pixel's class probabilities the mean of its conditionals (Rao-Blackwellised). That
separates the model's posterior from the mean-field approximation of it.

Usage::

    python scripts/check_confidence.py --separations 2,3,4 --seeds 3,4 --gibbs 200
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal


def confidence(P: np.ndarray, truth: np.ndarray) -> dict:
    """Accuracy and the mean confidence of the wrong and right pixels of class
    probabilities ``P`` (..., C) against ``truth``."""
    from sklearn.isotonic import IsotonicRegression

    lab, conf = P.argmax(-1).ravel(), P.max(-1).ravel()
    wrong = lab != np.asarray(truth).ravel()
    # the same map recalibrated: each pixel's confidence replaced by the accuracy of the
    # map's pixels of about its confidence (isotonic in the confidence, fitted on the
    # map's own errors: an oracle calibration that keeps the map's labels and ranking)
    fair = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, ~wrong)
    edges = np.linspace(0.0, 1.0, 11)
    ece = sum(
        s.mean() * abs(conf[s].mean() - (~wrong)[s].mean())
        for s in ((conf > lo) & (conf <= hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True))
        if s.any()
    )
    nan = float("nan")
    return {
        "accuracy": float(1.0 - wrong.mean()),
        "n_wrong": int(wrong.sum()),
        "confidence_wrong": float(conf[wrong].mean()) if wrong.any() else nan,
        "confidence_right": float(conf[~wrong].mean()) if (~wrong).any() else nan,
        "ece": float(ece),
        "recalibrated_confidence_wrong": (
            float(fair.predict(conf[wrong]).mean()) if wrong.any() else nan
        ),
    }


def gibbs_probabilities(
    est, X: np.ndarray, start: np.ndarray, sweeps: int, burn_in: int, seed: int
):
    """Rao-Blackwellised class probabilities of the Potts posterior of the fitted spatial
    estimator ``est`` (full covariances) on image ``X``, by colour sweeps of Gibbs
    sampling started from the labels ``start``."""
    from daskem.model.spatial import colour_map, neighbour_offsets, neighbour_sum

    K = est.means_.shape[0]
    covs = est.covariances_
    L = np.stack(
        [multivariate_normal(est.means_[k], covs[k]).logpdf(X) for k in range(K)], -1
    ) + np.asarray(est.spatial_alpha_)
    beta = float(est.spatial_beta_)
    offsets = neighbour_offsets(2, est.neighbourhood)
    colours = colour_map(X.shape[:2], (0, 0), est.neighbourhood)
    rng = np.random.default_rng(seed)
    z = start.copy()
    acc = np.zeros(L.shape)
    for s in range(burn_in + sweeps):
        for c in range(int(colours.max()) + 1):
            at = colours == c
            lp = L + beta * neighbour_sum(np.eye(K)[z], offsets)
            p = np.exp(lp - logsumexp(lp, axis=-1, keepdims=True))[at]
            if s >= burn_in:
                acc[at] += p
            z[at] = np.minimum((p.cumsum(1) < rng.random(len(p))[:, None]).sum(1), K - 1)
    return acc / sweeps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--separations", default="2,3,4")
    p.add_argument("--seeds", default="3,4")
    p.add_argument("--gibbs", type=int, default=0, help="Gibbs sweeps (0: none)")
    p.add_argument("--burn-in", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.side < 16 or args.gibbs < 0 or args.burn_in < 0:
        p.error("need --side >= 16, --gibbs >= 0 and --burn-in >= 0")

    import daskem
    from daskem.hmrf import SpatialGaussianMixtureClassifier
    from daskem.synthetic import make_stack

    rows = []
    for sep in (float(v) for v in args.separations.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            ds = make_stack(
                (args.side, args.side), n_classes=4, n_features=4, seed=seed,
                separation=sep, nan_fraction=0,
            )  # fmt: skip
            X = np.stack([ds[f"attr_{k}"].values for k in range(4)], -1).astype(np.float64)
            truth, y = ds["truth"].values, ds["labels"].values.astype(int)
            row = {"separation": sep, "seed": seed}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = daskem.GaussianMixtureClassifier(random_state=0).fit(
                    X.reshape(-1, 4), y.ravel()
                )
                row["pixel-wise"] = confidence(
                    gm.predict_proba(X.reshape(-1, 4)).reshape(*truth.shape, -1), truth
                )
                for fit in ("staged", "joint"):
                    sg = SpatialGaussianMixtureClassifier(random_state=0, spatial_fit=fit).fit(X, y)
                    P = np.asarray(sg.predict_proba(X))
                    row[fit] = dict(confidence(P, truth), beta=float(sg.spatial_beta_))
                    if fit == "staged" and args.gibbs:
                        G = gibbs_probabilities(sg, X, P.argmax(-1), args.gibbs, args.burn_in, seed)
                        row["staged, Gibbs"] = confidence(G, truth)
            rows.append(row)
            print(
                f"separation {sep:g}, seed {seed}: "
                + "; ".join(
                    f"{k} acc {v['accuracy']:.3f}, {v['n_wrong']} wrong at "
                    f"{v['confidence_wrong']:.3f} (recalibrated "
                    f"{v['recalibrated_confidence_wrong']:.3f}; right "
                    f"{v['confidence_right']:.3f}; ECE {v['ece']:.3f})"
                    for k, v in row.items()
                    if isinstance(v, dict)
                ),
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
