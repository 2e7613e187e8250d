"""Time-stack maps against the baselines a user would try, on synthetic time stacks.

For several seeds of :func:`daskem.synthetic.make_time_stack` (classes that change at
known dates, clouds hiding whole dates), compares the per-date class maps and the change
dates of:

* ``hmm``: :class:`daskem.GaussianHMM` (unsupervised, states matched to classes by the
  assignment that agrees most with the truth, which favours it slightly);
* ``gmm per date``: :class:`daskem.GaussianMixture` fitted on every pixel-date, each date
  classified on its own (states matched the same way);
* ``hmm semi``: :class:`daskem.GaussianHMMClassifier` from the stack's few labelled dates
  (no matching: its states are the labelled classes);
* ``qda`` (shrunk covariances), ``naive bayes`` and ``random forest`` trained on the
  same labelled dates, each date classified on its own (cloudy dates: no class; QDA is
  left out of a seed where a class has too few labelled dates for it).

Accuracy counts the pixel-dates with something observed; a change is the first date
whose class differs from the date before among observed dates.

    python scripts/eval_hmm.py --seeds 3 --json eval-hmm.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np


def _match(pred: np.ndarray, truth: np.ndarray, K: int, C: int) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    ok = pred >= 0
    M = np.zeros((K, C))
    np.add.at(M, (pred[ok], truth[ok]), 1)
    r, c = linear_sum_assignment(-M)
    lut = np.full(K, -1)
    lut[r] = c
    return np.where(ok, lut[np.where(ok, pred, 0)], -1)


def _first_change(cls: np.ndarray) -> np.ndarray:
    """Index of the first date whose class differs from the last observed one (-1: none)."""
    T = cls.shape[0]
    last = np.full(cls.shape[1:], -1)
    first = np.full(cls.shape[1:], -1)
    for t in range(T):
        c = cls[t]
        seen = c >= 0
        change = seen & (last >= 0) & (c != last) & (first < 0)
        first[change] = t
        last = np.where(seen, c, last)
    return first


def _scores(pred: np.ndarray, truth: np.ndarray, observed: np.ndarray, true_change: np.ndarray):
    acc = float(np.mean(pred[observed] == truth[observed]))
    fc = _first_change(np.where(observed, pred, -1))
    changed = true_change >= 0
    return {
        "accuracy": acc,
        "change_within_one_date": float(np.mean(np.abs(fc[changed] - true_change[changed]) <= 1)),
        "false_change": float(np.mean(fc[~changed] >= 0)),
    }


def evaluate(seed: int, size: int, dates: int, classes: int, labels: int = 3) -> dict:
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.naive_bayes import GaussianNB

    from daskem import GaussianHMM, GaussianMixture
    from daskem.hmm import GaussianHMMClassifier
    from daskem.synthetic import make_time_stack

    ds = make_time_stack(
        (size, size), n_dates=dates, n_classes=classes, seed=seed, labels_per_class=labels
    )
    names = [v for v in ds.data_vars if str(v).startswith("attr_")]
    X = np.stack([ds[v].values for v in names], axis=-1).astype(np.float64)  # (T, y, x, D)
    T, D = X.shape[0], X.shape[-1]
    seqs = X.reshape(T, -1, D).transpose(1, 0, 2)  # (pixels, T, D)
    truth = ds["true_class"].values.reshape(T, -1)
    labels = ds["labels"].values.reshape(T, -1)
    true_change = ds["true_change"].values.reshape(-1)
    observed = np.isfinite(X).any(axis=-1).reshape(T, -1)
    out = {"seed": seed, "labelled_dates": int((labels >= 0).sum())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hmm = GaussianHMM(classes, covariance_type="full", n_iter=100, tol=1.0, random_state=seed)
        hmm.fit(seqs)
        states = hmm.predict(seqs).T  # (T, pixels)
        out["hmm"] = _scores(_match(states, truth, classes, classes), truth, observed, true_change)
        flat = seqs.reshape(-1, D)
        gmm = GaussianMixture(classes, random_state=seed, nan_policy="marginalize").fit(flat)
        seen = np.isfinite(flat).any(axis=1)
        pg = np.full(len(flat), -1)
        pg[seen] = np.argmax(gmm.class_posterior(flat[seen])[0], axis=1)
        pg = pg.reshape(-1, T).T
        out["gmm per date"] = _scores(
            _match(pg, truth, classes, classes), truth, observed, true_change
        )
        y = labels.T  # (pixels, T)
        semi = GaussianHMMClassifier(covariance_type="full", n_iter=100, tol=1.0, random_state=seed)
        semi.fit(seqs, y)
        ps = semi.predict(seqs).T
        out["hmm semi"] = _scores(ps, truth, observed, true_change)
        lab = (labels >= 0) & observed & np.isfinite(X).all(axis=-1).reshape(T, -1)
        Xl = X.reshape(T, -1, D)[lab]
        yl = labels[lab]
        complete = np.isfinite(X).all(axis=-1).reshape(T, -1)
        for name, clf in (
            # a handful of labels per class: shrunk covariances (the svd solver needs more
            # labelled samples than attributes per class)
            ("qda", QuadraticDiscriminantAnalysis(solver="eigen", shrinkage=0.5)),
            ("naive bayes", GaussianNB()),
            ("random forest", RandomForestClassifier(200, random_state=seed)),
        ):
            try:
                clf.fit(Xl, yl)
            except np.linalg.LinAlgError:  # a class with too few labelled dates
                out[name] = None
                continue
            pred = np.full((T, truth.shape[1]), -1)
            pred[complete] = clf.predict(X.reshape(T, -1, D)[complete])
            out[name] = _scores(pred, truth, complete, true_change)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--dates", type=int, default=12)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--labels", type=int, default=3, help="labelled pixels per class (2 dates)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    runs = [
        evaluate(s, args.size, args.dates, args.classes, args.labels) for s in range(args.seeds)
    ]
    methods = list(dict.fromkeys(k for r in runs for k in r if isinstance(r[k], dict)))
    print(
        f"{args.seeds} synthetic time stacks {args.size} x {args.size}, {args.dates} dates, "
        f"{args.classes} classes; labelled dates: {[r['labelled_dates'] for r in runs]}"
    )
    print(f"{'method':16s} {'accuracy':>18s} {'change +-1 date':>18s} {'false change':>16s}")
    summary = {}
    for m in methods:
        done = [r[m] for r in runs if r.get(m)]
        vals = {k: [d[k] for d in done] for k in done[0]}
        summary[m] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in vals.items()}
        a, c, f = (summary[m][k] for k in ("accuracy", "change_within_one_date", "false_change"))
        print(
            f"{m:16s} {a[0]:10.3f} ± {a[1]:.3f} {c[0]:10.3f} ± {c[1]:.3f} {f[0]:8.3f} ± {f[1]:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
