"""Initialisation of mixture parameters on an in-memory NumPy sample.

The driver draws a reproducible random subsample of rows chunk by chunk
(:func:`daskem.engine.draw_sample`); everything here works on that sample only:
k-means++ seeding, a few weighted Lloyd iterations, random responsibilities,
and turning hard or soft assignments into a first set of parameters with the
same statistics code as the EM pass (:func:`daskem.model.gmm.block_stats`); and, from
the labelled sample alone, the optional class prior of a semi-supervised fit
(:func:`label_prior`).

No Dask, no xarray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gmm import GMMParams, block_stats, m_step

__all__ = [
    "INIT_METHODS",
    "LabelPrior",
    "initial_responsibilities",
    "kmeans",
    "kmeans_plusplus",
    "label_prior",
    "labelled_start",
    "params_from_resp",
]

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data")
KMEANS_ROWS = 20_000


def _sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, k), computed stably enough for seeding."""
    d = (X * X).sum(1)[:, None] - 2.0 * X @ C.T + (C * C).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans_plusplus(
    X: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    sample_weight: np.ndarray | None = None,
    n_local_trials: int | None = None,
    initial_centers: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii), weighted.

    ``initial_centers`` (m, D), if given, are centres already chosen (e.g. class means
    from labels): ``n_clusters`` further seeds are drawn against them.

    Returns the indices of the chosen rows, shape (n_clusters,).
    """
    n = X.shape[0]
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(max(n_clusters, 1)))
    idx: list[int] = []
    if initial_centers is not None and len(initial_centers):
        closest = _sq_dist(X, np.asarray(initial_centers, dtype=np.float64)).min(axis=1)
    else:
        if n_clusters == 0:
            return np.empty(0, dtype=int)
        first = int(rng.choice(n, p=w / w.sum()))
        idx.append(first)
        closest = _sq_dist(X, X[[first]])[:, 0]
    while len(idx) < n_clusters:
        pot = (w * closest).sum()
        if pot <= 0:  # fewer distinct points than clusters: pick any unused row
            rest = np.setdiff1d(np.arange(n), idx)
            idx.append(int(rng.choice(rest)))
            continue
        cand = rng.choice(n, size=n_local_trials, p=w * closest / pot)
        d = _sq_dist(X, X[cand])
        new_closest = np.minimum(closest[:, None], d)
        best = int(np.argmin((w[:, None] * new_closest).sum(0)))
        idx.append(int(cand[best]))
        closest = new_closest[:, best]
    return np.asarray(idx, dtype=int)


def kmeans(
    X: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 20,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding then weighted Lloyd iterations.

    Returns
    -------
    centers : ndarray (n_clusters, D)
    labels : ndarray (n,)
    """
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    centers = X[kmeans_plusplus(X, n_clusters, rng, w)]

    def assign(c):
        return np.argmin(_sq_dist(X, c), axis=1)

    labels = assign(centers)
    scale = float(np.mean(np.var(X, axis=0))) + 1e-300
    wX = w[:, None] * X
    for _ in range(max_iter):
        # weighted cluster sums in one pass: bincount per feature
        mass = np.bincount(labels, weights=w, minlength=n_clusters)
        sums = np.stack(
            [
                np.bincount(labels, weights=wX[:, j], minlength=n_clusters)
                for j in range(X.shape[1])
            ],
            axis=1,
        )
        new = np.where(mass[:, None] > 0, sums / np.where(mass > 0, mass, 1.0)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        labels = assign(centers)
        if shift <= tol * scale:
            break
    return centers, labels


def initial_responsibilities(
    X: np.ndarray,
    n_components: int,
    method: str,
    rng: np.random.Generator,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Responsibilities (n, K) on the sample for an initialisation method.

    * ``"kmeans"``: k-means++ seeding and Lloyd iterations, hard assignment;
    * ``"k-means++"``: k-means++ seeds, each row assigned to its nearest seed;
    * ``"random"``: random responsibilities, normalised per row;
    * ``"random_from_data"``: random rows as centres, nearest-centre assignment.

    Distances are measured on standardised features. Unlike scikit-learn, the last
    two assign every sampled row to a component, so first covariances are estimated
    from data rather than set to ``reg_covar``. ``"kmeans"`` runs on an evenly spaced
    subset of at most ``KMEANS_ROWS`` rows (a start for EM needs no more), then assigns
    every row to its nearest centre.
    """
    n = X.shape[0]
    # distances in standardised units, so attributes in different units weigh alike
    scale = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    if method == "kmeans":
        step = max(1, -(-n // KMEANS_ROWS))
        sw = None if sample_weight is None else sample_weight[::step]
        centers, _ = kmeans(X[::step], n_components, rng, sw)
        labels = np.argmin(_sq_dist(X, centers), axis=1)
    elif method == "k-means++":
        seeds = kmeans_plusplus(X, n_components, rng, sample_weight)
        labels = np.argmin(_sq_dist(X, X[seeds]), axis=1)
    elif method == "random_from_data":
        seeds = rng.choice(n, size=n_components, replace=False)
        labels = np.argmin(_sq_dist(X, X[seeds]), axis=1)
        labels[seeds] = np.arange(n_components)
    elif method == "random":
        resp = rng.uniform(size=(n, n_components))
        return resp / resp.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"init_params must be one of {INIT_METHODS}, got {method!r}")
    resp = np.zeros((n, n_components))
    resp[np.arange(n), labels] = 1.0
    return resp


def params_from_resp(
    X: np.ndarray,
    resp: np.ndarray,
    covariance_type: str,
    reg_covar: float,
    sample_weight: np.ndarray | None = None,
) -> tuple[GMMParams, list[dict]]:
    """Parameters from given responsibilities (an M-step on the sample)."""
    K = resp.shape[1]
    D = X.shape[1]
    # shift the moments by the responsibility-weighted means for accuracy
    w = np.ones(X.shape[0]) if sample_weight is None else sample_weight
    rw = resp * w[:, None]
    mass = rw.sum(0)
    shift = np.where(
        mass[:, None] > 0, rw.T @ X / np.where(mass > 0, mass, 1.0)[:, None], X.mean(0)
    )
    prov = GMMParams(
        weights=np.full(K, 1.0 / K),
        means=shift,
        precisions_cholesky=np.ones(K) if covariance_type == "spherical" else np.ones((K, D)),
        covariance_type=covariance_type,
    )
    stats = block_stats(X, prov, sample_weight, resp=resp)
    return m_step(stats, covariance_type, reg_covar)


def common_covariance(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    Xl: np.ndarray,
    yl: np.ndarray,
    how: str = "auto",
) -> np.ndarray:
    """One covariance matrix (D, D) shared by every component of a labelled start.

    * ``"sample"``: the (weighted) covariance ``S`` of the initialisation sample --
      broad, as it includes the spread between the classes;
    * ``"pooled"``: the pooled within-class covariance ``W`` of the labelled rows (as
      in linear discriminant analysis), with ``nu = m - C`` degrees of freedom for
      ``m`` labelled rows of ``C`` classes; singular when ``nu < D``;
    * ``"auto"`` (the default): ``(nu W + (D + 1) S) / (nu + D + 1)``, the pooled
      within-class covariance shrunk towards the sample covariance as if ``S`` were a
      prior worth ``D + 1`` observations. With a few labels it is close to ``S``
      (always positive-definite); with many, close to ``W``.

    Why ``"auto"``: ``S`` alone makes every component start so broad that the first
    E-step barely separates the classes, and EM then drifts towards the clusters of
    the unlabelled pixels; ``W`` alone is undefined with few labels. On the real
    labelled sets of ``scripts/eval_semisup.py`` (a Landsat scene, four tables; 3 and
    10 labels per class) ``"auto"`` gave a higher mean accuracy than ``"sample"`` in 7
    of 10 cases, the same in 2 and 0.2 points less in one (README, "Semi-supervised
    maps on real data").
    """
    w = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w = w / w.sum()
    xc = X - w @ X
    sample = (xc * w[:, None]).T @ xc
    if how == "sample":
        return sample
    dof = len(Xl) - len(np.unique(yl))
    resid = np.concatenate([Xl[yl == c] - Xl[yl == c].mean(0) for c in np.unique(yl)])
    pooled = resid.T @ resid / max(dof, 1)
    if how == "pooled":
        return pooled
    D = X.shape[1]
    return (dof * pooled + (D + 1) * sample) / (dof + D + 1)


def _covariances_for(cov: np.ndarray, K: int, covariance_type: str, reg_covar: float):
    D = cov.shape[0]
    cov = cov + reg_covar * np.eye(D)
    if covariance_type == "full":
        return np.repeat(cov[None], K, axis=0)
    if covariance_type == "tied":
        return cov
    if covariance_type == "diag":
        return np.repeat(np.diag(cov)[None], K, axis=0)
    return np.full(K, float(np.mean(np.diag(cov))))


def labelled_start(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    Xl: np.ndarray,
    yl: np.ndarray,
    component_class: np.ndarray,
    covariance_type: str,
    reg_covar: float,
    rng: np.random.Generator,
    covariance: str = "auto",
) -> GMMParams:
    """First parameters of a semi-supervised mixture from its labelled rows.

    The rule (the same for every covariance type):

    1. the first component of each class starts at the mean of that class's labelled
       rows (a class with no labelled row has no fixed centre);
    2. every component starts with one common covariance (:func:`common_covariance`,
       ``"auto"`` unless ``covariance`` says otherwise, plus ``reg_covar`` on the
       diagonal, reduced to the covariance type), and all weights are equal;
    3. further components of a class are seeded by k-means++ -- against the class's
       centre -- among the sampled rows nearest (in the Mahalanobis distance of the
       common covariance) to that class's centre; components of classes without
       labelled rows are seeded by k-means++ on all sampled rows against every fixed
       centre.

    With one component per class the start is exactly "class means of the labelled
    rows, common covariance, equal weights", independent of ``rng``; restarts vary
    only the seeded components of step 3.

    Parameters
    ----------
    X : ndarray (n, D)
        The initialisation sample (finite rows).
    sample_weight : ndarray (n,) or None
    Xl : ndarray (m, D)
        The labelled rows; ``yl`` (m,) their class ids.
    component_class : ndarray of int (K,)
        Class of each component.
    """
    from .gmm import compute_precision_cholesky

    K, D = len(component_class), X.shape[1]
    cov = common_covariance(X, sample_weight, Xl, yl, covariance)
    cov = 0.5 * (cov + cov.T)
    means = np.empty((K, D))
    fixed: list[int] = []
    for c in np.unique(component_class):
        rows = yl == c
        if rows.any():
            k = int(np.flatnonzero(component_class == c)[0])
            means[k] = Xl[rows].mean(axis=0)
            fixed.append(k)
    todo = [k for k in range(K) if k not in fixed]
    if todo:
        # whitened units of the common covariance: Euclidean there = Mahalanobis here
        L = np.linalg.cholesky(cov + (reg_covar + 1e-12 * np.trace(cov) / D) * np.eye(D))
        loc = X.mean(axis=0)
        Z = np.linalg.solve(L, (X - loc).T).T
        centres = np.linalg.solve(L, (means[fixed] - loc).T).T
        nearest = np.asarray(fixed)[np.argmin(_sq_dist(Z, centres), axis=1)] if fixed else None
        w = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        for c in np.unique(component_class[todo]):
            extra = [k for k in todo if component_class[k] == c]
            own = [k for k in fixed if component_class[k] == c]
            if own:
                rows = np.flatnonzero(nearest == own[0])
                if len(rows) < 2 * len(extra):  # too few rows near the class: use all
                    rows = np.arange(len(Z))
                against = centres[[fixed.index(k) for k in own]]
            else:
                rows = np.arange(len(Z))
                against = centres if fixed else None
            seeds = kmeans_plusplus(
                Z[rows], len(extra), rng, None if w is None else w[rows], initial_centers=against
            )
            means[extra] = X[rows[seeds]]
    covariances = _covariances_for(cov, K, covariance_type, reg_covar)
    prec_chol, ok = compute_precision_cholesky(covariances, covariance_type)
    if not np.all(ok):
        raise ValueError(
            "the common covariance of the labelled start is not positive-definite: "
            "increase reg_covar or check for constant attributes"
        )
    return GMMParams(
        weights=np.full(K, 1.0 / K),
        means=means,
        precisions_cholesky=prec_chol,
        covariance_type=covariance_type,
        covariances=covariances,
        component_class=np.asarray(component_class),
    )


# --------------------------------------------------------------------------- label prior

#: Shrinkage grid of :func:`label_prior`'s Gaussian classifier (fraction of the target).
LABEL_PRIOR_SHRINKAGE = (0.01, 0.03, 0.1, 0.3, 0.6, 1.0)
#: Labelled rows up to which :func:`label_prior` validates by leave-one-out (beyond:
#: ``LABEL_PRIOR_FOLDS``-fold cross-validation).
LABEL_PRIOR_LOO_ROWS = 300
LABEL_PRIOR_FOLDS = 10
_LOG_FLOOR = -50.0  # a single held-out miss costs at most 50 nats


@dataclass(frozen=True)
class LabelPrior:
    """Class prior of every sample from a Gaussian classifier fitted on the labels alone.

    ``log_prior(X)[i, c] = temperature * log q(c | x_i) - log Z_i``: the classifier's class
    posterior ``q`` (equal class priors), raised to the power ``temperature`` and
    normalised over classes. Rows with nothing observed get a uniform prior; rows with
    some attributes missing use the classifier's marginal Gaussians over the observed
    ones.

    Attributes
    ----------
    classifier : GMMParams
        One full-covariance Gaussian per class (equal weights), in the units of ``X``.
    temperature : float
        Exponent in [0, 1] (0: no information).
    shrinkage : float
        The shrinkage of the class covariances chosen on the labels.
    held_out_log_loss : float
        Mean held-out log-loss of the labels at that shrinkage and temperature (nats).
    """

    classifier: GMMParams
    temperature: float
    shrinkage: float
    held_out_log_loss: float

    def log_prior(self, X: np.ndarray) -> np.ndarray:
        """Log prior probability of each class for each row, shape (n, n_classes)."""
        from .gmm import observed_weighted_log_prob

        C = self.classifier.n_components
        if self.temperature == 0.0:
            return np.full((X.shape[0], C), -np.log(C))
        lq = np.maximum(_log_softmax(observed_weighted_log_prob(X, self.classifier)), _LOG_FLOOR)
        out = _log_softmax(self.temperature * lq)
        return np.where(np.isfinite(out), out, -np.log(C))


def _log_softmax(a: np.ndarray) -> np.ndarray:
    mx = a.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(under="ignore", divide="ignore"):
        return a - (mx + np.log(np.exp(a - mx).sum(axis=1, keepdims=True)))


def _shrunk_class_gaussians(
    Z: np.ndarray, y: np.ndarray, w: np.ndarray, C: int, s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Class means and covariances ``(1 - s) S_c + s tr(S_c)/D I`` (weighted; a class
    with one row uses the pooled within-class trace), plus 1e-6 on the diagonal."""
    D = Z.shape[1]
    means = np.zeros((C, D))
    scatter = np.zeros((C, D, D))
    single = np.zeros(C, dtype=bool)
    for c in range(C):
        rows = y == c
        wc = w[rows] / w[rows].sum()
        means[c] = wc @ Z[rows]
        d = Z[rows] - means[c]
        scatter[c] = (d * wc[:, None]).T @ d
        single[c] = rows.sum() < 2
    pooled = np.trace(scatter[~single].sum(0)) / (D * max(int((~single).sum()), 1))
    covs = np.empty((C, D, D))
    eye = np.eye(D)
    for c in range(C):
        t = pooled if single[c] else np.trace(scatter[c]) / D
        covs[c] = (1.0 - s) * scatter[c] + (s * t + 1e-6) * eye
    return means, covs


def _class_log_posterior(Z: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    C = len(means)
    out = np.empty((len(Z), C))
    for c in range(C):
        L = np.linalg.cholesky(covs[c])
        z = np.linalg.solve(L, (Z - means[c]).T)
        out[:, c] = -0.5 * (z * z).sum(0) - np.log(np.diag(L)).sum()
    return _log_softmax(out)


def label_prior(
    Xl: np.ndarray,
    yl: np.ndarray,
    wl: np.ndarray | None,
    n_classes: int,
    temperature: float | str = "auto",
) -> LabelPrior | None:
    """The per-sample class prior of a semi-supervised fit, from its labelled rows alone.

    A Gaussian classifier is fitted on the labelled rows (standardised by their weighted
    standard deviations): the class means and each class's covariance shrunk towards a
    multiple of the identity, ``(1 - s) S_c + s tr(S_c)/D I``, with ``s`` from
    :data:`LABEL_PRIOR_SHRINKAGE` minimising the held-out log-loss of the labels
    (leave-one-out, or ``LABEL_PRIOR_FOLDS``-fold cross-validation beyond
    ``LABEL_PRIOR_LOO_ROWS`` labelled rows; ties: the larger ``s``). With
    ``temperature="auto"`` its held-out class probabilities are then calibrated by a
    temperature ``t`` in [0, 1] (``q^t``, renormalised), chosen to minimise the same
    held-out log-loss (temperature scaling): an overconfident or unreliable classifier
    gets a small ``t`` and so a weak prior, a reliable one ``t`` near 1.

    Parameters
    ----------
    Xl : ndarray (m, D)
        The labelled rows (finite); ``yl`` (m,) their class ids in ``0 .. n_classes-1``.
    wl : ndarray (m,) or None
        How many labelled rows each row stands for.
    n_classes : int
    temperature : float in [0, 1] or "auto"

    Returns
    -------
    LabelPrior or None
        None when a class has no labelled row (no classifier can be fitted).
    """
    Xl = np.asarray(Xl, dtype=np.float64)
    yl = np.asarray(yl)
    m, D = Xl.shape
    w = np.ones(m) if wl is None else np.asarray(wl, dtype=np.float64)
    counts = np.bincount(yl, minlength=n_classes)
    if m == 0 or np.any(counts[:n_classes] == 0):
        return None
    loc = w @ Xl / w.sum()
    scale = np.sqrt(w @ (Xl - loc) ** 2 / w.sum())
    scale = np.where(scale > 0, scale, 1.0)
    Z = (Xl - loc) / scale
    if m <= LABEL_PRIOR_LOO_ROWS:
        folds = np.arange(m)
    else:  # the labelled sample's order is a hash order: interleaved folds are random
        folds = np.arange(m) % LABEL_PRIOR_FOLDS
    best = (np.inf, LABEL_PRIOR_SHRINKAGE[-1], np.zeros((0, n_classes)), np.zeros(0, int))
    for s in LABEL_PRIOR_SHRINKAGE:
        held, rows = [], []
        for f in np.unique(folds):
            test = folds == f
            train = ~test
            if np.any(np.bincount(yl[train], minlength=n_classes)[:n_classes] == 0):
                continue  # a class would have no labelled row left: skip this fold
            try:
                means, covs = _shrunk_class_gaussians(Z[train], yl[train], w[train], n_classes, s)
                held.append(_class_log_posterior(Z[test], means, covs))
            except np.linalg.LinAlgError:
                held = []
                break
            rows.append(np.flatnonzero(test))
        if not held:
            continue
        lq = np.maximum(np.concatenate(held), _LOG_FLOOR)
        idx = np.concatenate(rows)
        loss = -float(w[idx] @ lq[np.arange(len(idx)), yl[idx]] / w[idx].sum())
        if loss <= best[0]:  # the grid increases: ties go to the larger shrinkage
            best = (loss, s, lq, idx)
    loss, s, lq, idx = best
    if not np.isfinite(loss):
        return None
    if temperature == "auto":
        from scipy.optimize import minimize_scalar

        def held_out(t: float) -> float:
            p = _log_softmax(t * lq)[np.arange(len(idx)), yl[idx]]
            return -float(w[idx] @ p / w[idx].sum())

        t = float(minimize_scalar(held_out, bounds=(0.0, 1.0), method="bounded").x)
        if held_out(0.0) <= held_out(t):
            t = 0.0
        loss = held_out(t)
    else:
        t = float(temperature)
    means, covs = _shrunk_class_gaussians(Z, yl, w, n_classes, s)
    # back to the units of X: x = loc + scale * z
    means = loc + means * scale
    covs = covs * np.outer(scale, scale)[None]
    from .gmm import compute_precision_cholesky

    prec_chol, _ = compute_precision_cholesky(covs, "full")
    classifier = GMMParams(
        weights=np.full(n_classes, 1.0 / n_classes),
        means=means,
        precisions_cholesky=prec_chol,
        covariance_type="full",
        covariances=covs,
    )
    return LabelPrior(classifier, t, float(s), float(loss))
