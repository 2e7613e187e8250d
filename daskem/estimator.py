"""The scikit-learn-style estimators on top of the engine and the model kernels.

:class:`GaussianMixture` has scikit-learn's constructor parameters, fitted
attributes and methods, and fits NumPy or Dask arrays of shape
(n_samples, n_features) -- including arrays far larger than memory -- with one
pass over the data per EM iteration. It optionally takes per-sample weights and,
for semi-supervised fits, labels ``y`` with ``-1`` for unlabelled samples.

This module builds no Dask graph itself (it calls :mod:`daskem.engine`) and
does not know xarray (stacks are converted by :mod:`daskem.io`).
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import dask.array as da
import numpy as np
from sklearn.base import ClassifierMixin, DensityMixin

from . import engine
from .base import (
    NAN_POLICIES,
    ClassLabelsMixin,
    ConvergenceWarning,
    EMEstimator,
    _check_random_state,
    _store_params,
)
from .model.gaussian import covariance_shape
from .model.gmm import (
    COVARIANCE_TYPES,
    PRECISIONS,
    GMMModel,
    GMMParams,
    class_posterior,
    covariances_from_precision_cholesky,
    precisions_from_cholesky,
)
from .model.init import (
    INIT_METHODS,
    initial_responsibilities,
    label_prior,
    labelled_start,
    params_from_resp,
)
from .model.missing import MissingGMMModel, PatternGMMModel
from .model.missing import impute as _impute
from .model.prior import LabelPriorMissingModel, LabelPriorModel
from .modelfile import register_estimator

__all__ = ["NAN_POLICIES", "ConvergenceWarning", "GaussianMixture", "GaussianMixtureClassifier"]

logger = logging.getLogger("daskem")


def _flip_cholesky_upper(precision: np.ndarray) -> np.ndarray:
    """Upper-triangular ``P`` with ``P @ P.T == precision``."""
    flipped = precision[::-1, ::-1]
    L = np.linalg.cholesky(flipped)
    return L[::-1, ::-1]


# ---- row-wise kernels used lazily on Dask blocks (module level so they pickle); ----
# ---- ``state`` is (model, params), see EMEstimator._rows                        ----


def _rows_predict(state, X: np.ndarray) -> np.ndarray:
    model, params = state
    wlp = model.weighted_log_prob(params, X)
    return np.where(np.isnan(wlp[:, 0]), -1, wlp.argmax(axis=1)) if len(wlp) else wlp.argmax(1)


def _rows_impute(state, X: np.ndarray) -> np.ndarray:
    filled, std = _impute(X, state[1], return_std=True)
    return np.concatenate([filled, std], axis=1)


def _rows_class_proba(state, X: np.ndarray) -> np.ndarray:
    return class_posterior(state[1], X)[0]


def _rows_class_index(state, X: np.ndarray) -> np.ndarray:
    return class_posterior(state[1], X)[0].argmax(axis=1)


def _take_classes(idx: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return classes[idx]


class _BaseGaussianMixture(EMEstimator):
    """EM machinery shared by :class:`GaussianMixture` and :class:`GaussianMixtureClassifier`.

    Everything here works on class ids ``0 .. n_classes - 1`` (``-1`` unlabelled) and
    on ``component_class``, the class of each component (None: unsupervised).
    """

    kind = "gmm"
    _fitted_marker = "means_"
    nan_policies = NAN_POLICIES
    #: row function for gap-filled maps (:func:`daskem.io.posterior` with ``impute``)
    _impute_rows = staticmethod(_rows_impute)

    # ------------------------------------------------------------------ validation

    def _check_parameters(self, n_features: int, K: int | None = None) -> None:
        if K is None:
            K = self.n_components
        if not isinstance(K, numbers.Integral) or K < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {K!r}")
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {COVARIANCE_TYPES}, got {self.covariance_type!r}"
            )
        if self.init_params not in INIT_METHODS:
            raise ValueError(f"init_params must be one of {INIT_METHODS}, got {self.init_params!r}")
        self._check_common()
        if not isinstance(self.reg_covar, numbers.Real) or self.reg_covar < 0:
            raise ValueError(f"reg_covar must be a number >= 0.0, got {self.reg_covar!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto' or 'single', got {self.precision!r}")
        D = n_features
        ct = self.covariance_type
        if self.weights_init is not None:
            w = np.asarray(self.weights_init, dtype=np.float64)
            if w.shape != (K,):
                raise ValueError(f"weights_init must have shape ({K},), got {w.shape}")
            if np.any(w < 0) or np.any(w > 1) or not np.isclose(w.sum(), 1.0, atol=1e-6):
                raise ValueError(
                    f"weights_init must be non-negative, <= 1 and sum to 1, got sum {w.sum():.6g}"
                )
        if self.means_init is not None:
            m = np.asarray(self.means_init, dtype=np.float64)
            if m.shape != (K, D):
                raise ValueError(f"means_init must have shape ({K}, {D}), got {m.shape}")
        if self.precisions_init is not None:
            p = np.asarray(self.precisions_init, dtype=np.float64)
            shape = covariance_shape(ct, K, D)
            if p.shape != shape:
                raise ValueError(
                    f"precisions_init for covariance_type={ct!r} must have shape {shape}, "
                    f"got {p.shape}"
                )

    def _precision_cholesky_init(self) -> np.ndarray:
        p = np.asarray(self.precisions_init, dtype=np.float64)
        ct = self.covariance_type
        try:
            if ct == "full":
                return np.stack([_flip_cholesky_upper(pk) for pk in p])
            if ct == "tied":
                return _flip_cholesky_upper(p)
        except np.linalg.LinAlgError:
            raise ValueError("precisions_init must be symmetric positive-definite") from None
        if np.any(p <= 0):
            raise ValueError("precisions_init must be positive")
        return np.sqrt(p)

    # ------------------------------------------------------------------ fitting

    def _check_nan_policy(self) -> None:
        super()._check_nan_policy()
        pw = getattr(self, "pattern_weights", False)
        if not isinstance(pw, (bool, np.bool_)):
            raise ValueError(f"pattern_weights must be True or False, got {pw!r}")
        if pw and self.nan_policy != "marginalize":
            raise ValueError(
                "pattern_weights=True needs nan_policy='marginalize' (weights by pattern of "
                f"observed attributes), got nan_policy={self.nan_policy!r}"
            )
        if pw and getattr(self, "label_prior", 0.0) not in (0, 0.0):
            raise ValueError("pattern_weights=True cannot be combined with label_prior")

    def _model(self) -> GMMModel:
        if self.nan_policy == "marginalize" and getattr(self, "pattern_weights", False):
            cls = PatternGMMModel
        else:
            cls = MissingGMMModel if self.nan_policy == "marginalize" else GMMModel
        return cls(
            self.covariance_type,
            float(self.reg_covar),
            allow_excluded=self.nan_policy == "omit",
            precision=self.precision,
            label_weight=float(getattr(self, "label_weight", 1.0)),
        )

    def _initial_params(
        self, data: engine.ChunkedData, seed: int, labelled=None, sample=None
    ) -> GMMParams:
        K, ct = self._n_comp or self.n_components, self.covariance_type
        component_class = self._component_class
        if self._user_init_complete():
            prec_chol = self._precision_cholesky_init()
            return GMMParams(
                weights=np.asarray(self.weights_init, dtype=np.float64),
                means=np.asarray(self.means_init, dtype=np.float64),
                precisions_cholesky=prec_chol,
                covariance_type=ct,
                covariances=covariances_from_precision_cholesky(prec_chol, ct),
                component_class=component_class,
            )
        gen = np.random.default_rng(seed)
        if sample is None:
            sample = engine.draw_sample(data, self.init_sample_size, seed)
        Xs, ws = self._start_sample(sample, K)
        if Xs.shape[0] < K and self.nan_policy == "omit":
            raise ValueError(
                f"Only {Xs.shape[0]} of the {len(sample[0])} rows drawn for initialisation "
                f"have every attribute observed, fewer than n_components={K}: with "
                "nan_policy='omit' (rows with a missing attribute left out) there is too "
                "little to fit; use nan_policy='marginalize' to fit the rows through their "
                "observed attributes."
            )
        if Xs.shape[0] < K:
            raise ValueError(
                f"Only {Xs.shape[0]} usable rows were drawn for initialisation but "
                f"n_components={K}: increase init_sample_size or use fewer components."
            )
        if labelled is not None:
            params = labelled_start(
                Xs, ws, *labelled[:2], component_class, ct, float(self.reg_covar), gen
            )
        else:
            resp = initial_responsibilities(Xs, K, self.init_params, gen, ws)
            params, _ = params_from_resp(Xs, resp, ct, float(self.reg_covar), ws)
        weights = (
            params.weights
            if self.weights_init is None
            else np.asarray(self.weights_init, dtype=np.float64)
        )
        means = (
            params.means
            if self.means_init is None
            else np.asarray(self.means_init, dtype=np.float64)
        )
        if self.precisions_init is not None:
            prec_chol = self._precision_cholesky_init()
            cov = covariances_from_precision_cholesky(prec_chol, ct)
        else:
            prec_chol, cov = params.precisions_cholesky, params.covariances
        params = GMMParams(weights, means, prec_chol, ct, cov, component_class)
        if self._use_prefit(data.n_samples):
            params = self._prefit(params, Xs, ws, labelled)
        return params

    # ------------------------------------------------------------------ checkpoints

    def _user_init_complete(self) -> bool:
        return (
            self.weights_init is not None
            and self.means_init is not None
            and self.precisions_init is not None
        )

    def _fingerprint_extra(self) -> dict[str, Any]:
        return {
            "covariance_type": self.covariance_type,
            "reg_covar": float(self.reg_covar),
            "init_params": self.init_params,
            "precision": self.precision,
            "label_weight": float(getattr(self, "label_weight", 1.0)),
            # only when set, so that checkpoints of earlier versions still resume
            **({"pattern_weights": True} if getattr(self, "pattern_weights", False) else {}),
        }

    def _n_components_fitted(self) -> int:
        return int(self.means_.shape[0])

    def _summary(self) -> tuple[str, list[str]]:
        names = list(getattr(self, "class_names_", []))
        cc = np.asarray(self.component_classes_)
        options = f"{self.covariance_type} covariance" + (
            f", label weight {self.label_weight:g}" if hasattr(self, "label_weight") else ""
        )
        lines = ["components (weight, class):"]
        for k in range(len(self.weights_)):
            cls = names[int(cc[k])] if names else int(cc[k])
            lines.append(f"  {k}: {self.weights_[k]:.4f}  {cls}")
        if hasattr(self, "patterns_"):
            options += f", weights by pattern of observed attributes ({len(self.patterns_)})"
            feats = list(getattr(self, "feature_names_in_", range(self.patterns_.shape[1])))
            lines.append("weights by pattern (observed attributes: weights):")
            for p, w in zip(self.patterns_, self.pattern_weights_, strict=True):
                seen = ",".join(str(f) for f, o in zip(feats, p, strict=True) if o)
                lines.append(f"  {seen}: " + " ".join(f"{v:.4f}" for v in w))
        return options, lines

    def _fitted_to_dict(self) -> dict[str, Any]:
        """The fitted mixture parameters for a model file."""
        return {
            "covariance_type": self.covariance_type,
            "weights": self.weights_.tolist(),
            "means": self.means_.tolist(),
            "covariances": self.covariances_.tolist(),
            "precisions_cholesky": self.precisions_cholesky_.tolist(),
            **(
                {
                    "patterns": self.patterns_.tolist(),
                    "pattern_weights": self.pattern_weights_.tolist(),
                }
                if hasattr(self, "patterns_")
                else {}
            ),
        }

    def _fitted_from_dict(self, fitted: dict[str, Any], K: int, D: int) -> None:
        """Set the fitted mixture parameters from a model file, checking their shapes."""
        ct = fitted["covariance_type"]
        if ct != self.covariance_type:
            raise ValueError(f"covariance_type {ct!r} does not match the parameters")
        arrays = {
            "weights_": (fitted["weights"], (K,)),
            "means_": (fitted["means"], (K, D)),
            "covariances_": (fitted["covariances"], covariance_shape(ct, K, D)),
            "precisions_cholesky_": (fitted["precisions_cholesky"], covariance_shape(ct, K, D)),
        }
        for name, (value, shape) in arrays.items():
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(
                    f"fitted {name.rstrip('_')} has shape {arr.shape}, expected {shape} for "
                    f"{K} components and {D} features"
                )
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"fitted {name.rstrip('_')} contains non-finite values")
            setattr(self, name, arr)
        self.precisions_ = precisions_from_cholesky(self.precisions_cholesky_, ct)
        if fitted.get("patterns") is not None:
            patterns = np.asarray(fitted["patterns"], dtype=bool)
            weights = np.asarray(fitted["pattern_weights"], dtype=np.float64)
            P = patterns.shape[0] if patterns.ndim == 2 else -1
            if patterns.shape != (P, D) or weights.shape != (P, K):
                raise ValueError(
                    f"fitted patterns / pattern_weights have shapes {patterns.shape} / "
                    f"{weights.shape}, expected (P, {D}) / (P, {K})"
                )
            if not (np.all(np.isfinite(weights)) and np.all(weights >= 0)):
                raise ValueError("fitted pattern_weights must be finite and non-negative")
            self.patterns_, self.pattern_weights_ = patterns, weights

    def _set_params(self, params: GMMParams) -> None:
        ct = self.covariance_type
        self.weights_ = np.asarray(params.weights, dtype=np.float64)
        self.means_ = np.asarray(params.means, dtype=np.float64)
        self.precisions_cholesky_ = np.asarray(params.precisions_cholesky, dtype=np.float64)
        self.covariances_ = (
            np.asarray(params.covariances, dtype=np.float64)
            if params.covariances is not None
            else covariances_from_precision_cholesky(self.precisions_cholesky_, ct)
        )
        self.precisions_ = precisions_from_cholesky(self.precisions_cholesky_, ct)
        if params.pattern_weights is not None:
            self.patterns_ = np.asarray(params.pattern_weights[0], dtype=bool)
            self.pattern_weights_ = np.asarray(params.pattern_weights[1], dtype=np.float64)
        else:
            for name in ("patterns_", "pattern_weights_"):
                if name in self.__dict__:
                    delattr(self, name)

    def _fitted_params(self, component_class=None) -> GMMParams:
        """The fitted parameters as a picklable :class:`~daskem.model.gmm.GMMParams`."""
        self._check_fitted()
        if component_class is None:
            component_class = getattr(self, "component_classes_", None)
        return GMMParams(
            self.weights_,
            self.means_,
            self.precisions_cholesky_,
            self.covariance_type,
            self.covariances_,
            component_class,
            (self.patterns_, self.pattern_weights_) if hasattr(self, "patterns_") else None,
        )

    # ------------------------------------------------------------------ prediction

    def impute(self, X: Any, return_std: bool = False):
        """Fill missing attributes with their expected value given the observed ones.

        Each missing attribute of a row is replaced by its conditional mean given the
        row's observed attributes, mixed over the row's posterior component
        probabilities: ``E[x_m | x_o] = sum_k p(k | x_o) E[x_m | x_o, k]``, with
        ``E[x_m | x_o, k] = mu_k,m + Sigma_k,mo Sigma_k,oo^-1 (x_o - mu_k,o)``. Observed
        values are returned unchanged; rows with nothing observed stay NaN.

        Parameters
        ----------
        X : array-like or dask array of shape (n_samples, n_features)
            Non-finite values (NaN, inf) mark missing attributes.
        return_std : bool, default=False
            Also return the conditional standard deviation of each filled value,
            ``sqrt(Var[x_m | x_o])`` under the mixture (0 where a value was observed).

        Returns
        -------
        X_filled : array of shape (n_samples, n_features), float64
        std : array of shape (n_samples, n_features)
            Only if ``return_std``. NumPy for NumPy input, lazy Dask arrays for Dask input.
        """
        self._check_fitted()
        D = self.means_.shape[1]
        both = self._rows(_rows_impute, X, 2 * D, np.float64, allow_missing=True)
        return (both[:, :D], both[:, D:]) if return_std else both[:, :D]

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw samples from the fitted mixture.

        Returns
        -------
        X : ndarray (n_samples, n_features)
        y : ndarray (n_samples,) of component ids
        """
        self._check_fitted()
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        rng = _check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_)
        D = self.means_.shape[1]
        ct = self.covariance_type
        parts = []
        for k, c in enumerate(counts):
            if ct == "full":
                cov = self.covariances_[k]
            elif ct == "tied":
                cov = self.covariances_
            elif ct == "diag":
                cov = np.diag(self.covariances_[k])
            else:
                cov = np.eye(D) * self.covariances_[k]
            parts.append(rng.multivariate_normal(self.means_[k], cov, int(c)))
        X = np.vstack(parts)
        y = np.concatenate([np.full(c, k, dtype=int) for k, c in enumerate(counts)])
        return X, y


@register_estimator
class GaussianMixture(DensityMixin, _BaseGaussianMixture):
    """Gaussian mixture fitted by EM over NumPy or (out-of-core) Dask arrays.

    Parameters follow :class:`sklearn.mixture.GaussianMixture`; the extra ones
    control how data is chunked and reduced.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components.
    covariance_type : {"full", "tied", "diag", "spherical"}, default="full"
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood per sample.
    reg_covar : float, default=1e-6
        Added to the diagonal of covariances.
    max_iter : int, default=100
        Maximum number of EM iterations (full passes over the data) per initialisation.
    n_init : int, default=1
        Number of initialisations; the one with the best lower bound is kept.
    init_params : {"kmeans", "k-means++", "random", "random_from_data"}, default="kmeans"
        How first parameters are made from a random subsample of ``init_sample_size``
        rows: k-means++ seeding plus Lloyd iterations, k-means++ seeds with nearest-seed
        assignment, random responsibilities, or random rows as centres.
    weights_init, means_init, precisions_init : array-like, optional
        User-given initial parameters (override the corresponding initialised ones).
    random_state : int, RandomState or None
    warm_start : bool, default=False
        Start the next ``fit`` from the current solution (``n_init`` is then 1).
    verbose : int, default=0
    verbose_interval : int, default=10
    chunk_size : int or "auto", default="auto"
        Rows per chunk when NumPy input is wrapped as a Dask array (Dask input keeps
        its chunks). ``"auto"``: chunks of about 32 MiB, at least two per thread of
        the cluster (or of this machine), never below 4,096 rows.
    split_every : int, default=16
        Fan-in of the tree reduction of per-chunk statistics.
    init_sample_size : int, default=100000
        Rows drawn (chunk-wise, reproducibly) for the initialisation.
    prefit : bool or "auto", default="auto"
        Before the passes over the full data, run EM to convergence on the in-memory
        initialisation sample (``init_sample_size`` rows), so that the full passes start
        near the optimum and far fewer are needed. The full passes are plain EM, so the
        result is still a fixed point of EM on all the data. ``"auto"``: when the data
        has more than twice ``init_sample_size`` rows. Not used when all of
        ``weights_init``, ``means_init`` and ``precisions_init`` are given.
    cache : bool or "auto", default="auto"
        Keep Dask input in (cluster) memory after the first read, so later passes do
        not read and decompress it again. ``"auto"``: when it takes less than half the
        memory of the workers (of this machine without a distributed client).
    nan_policy : {"raise", "omit", "marginalize"}, default="raise"
        What a row with a non-finite value (a missing attribute) does to ``fit``:
        ``"raise"`` raises ``ValueError``; ``"omit"`` leaves the row out (counted in
        ``n_excluded_``); ``"marginalize"`` fits it through its observed attributes (EM
        with missing data, Ghahramani & Jordan 1994): its responsibilities come from the
        marginal Gaussians of the observed attributes, its missing ones enter the
        statistics as conditional expectations, and the objective is the observed-data
        log-likelihood. Only rows with nothing observed are left out. Fitted with
        ``"marginalize"``, ``predict``, ``predict_proba`` and ``score_samples`` accept
        missing values too; :meth:`impute` fills them.
    pattern_weights : bool, default=False
        With ``nan_policy="marginalize"``: give every pattern of observed attributes its
        own mixing weights (the components are shared). Use it when whether a value is
        missing depends on the class -- clouds over some land covers more than others,
        a band masked over water -- so the rows of a pattern come from the classes in
        proportions of their own; with one set of weights their responsibilities follow
        the global proportions and pull other classes' means towards them. ``weights_``
        stays the components' share of all rows; ``patterns_`` and ``pattern_weights_``
        hold the per-pattern weights, which ``predict``, ``score_samples`` and
        :meth:`impute` use for rows of those patterns (rows of a pattern not seen in the
        fit take ``weights_``).
    precision : {"auto", "single"}, default="auto"
        Arithmetic of the E-step for float32 data (float64 data is always computed in
        float64). ``"auto"``: float32 only where a rounding-error bound keeps every
        log-density within 1e-3 (else float64), statistics summed in float64: the result
        matches a float64 fit to about 1e-9. ``"single"``: float32 under a looser bound
        (0.1 nats; measured errors 10-40 times smaller) and float32 statistics per
        sub-block of 8,192 rows, summed in float64, as a plain float32 kernel does: up to
        1.7 times faster per pass, with parameters within about 1e-4 of the float64 fit.
    select_after : int, None or "auto", default="auto"
        With ``n_init > 1``: after this many full passes (shared by all restarts), only
        the restart with the highest lower bound goes on; the others stop there. None:
        every restart runs to convergence and the best is kept, as in scikit-learn.
        ``"auto"``: 1 when the restarts were prefitted (each is then already at its
        optimum on the sample, and the first full pass ranks them on all the data),
        else None.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
        (K, D, D) full, (D, D) tied, (K, D) diag, (K,) spherical.
    precisions_ : ndarray
    precisions_cholesky_ : ndarray
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood per sample of the best initialisation (at the parameters
        before the last M-step, as in scikit-learn).
    lower_bounds_ : ndarray
        History of the lower bound, one value per iteration of the best initialisation.
    n_features_in_ : int
    reseeds_ : list of dict
        Components re-seeded because they collapsed: ``iteration``, ``component``,
        ``reason``.
    n_excluded_ : int
        Rows left out of the fit: with ``nan_policy="omit"`` every row with a non-finite
        value, with ``"marginalize"`` the rows with no attribute observed.
    n_partial_ : int
        Rows fitted with some attributes missing (``nan_policy="marginalize"``).
    n_empty_ : int
        Rows with no attribute observed (left out under any ``nan_policy``).
    patterns_ : ndarray of bool, shape (n_patterns, n_features)
        Only with ``pattern_weights=True``: the patterns of observed attributes met in
        the fit (True = observed).
    pattern_weights_ : ndarray of shape (n_patterns, n_components)
        Only with ``pattern_weights=True``: the mixing weights of the rows of each
        pattern.
    component_classes_ : ndarray of int, shape (n_components,)
        ``arange(n_components)``: each component is its own class (see
        :class:`GaussianMixtureClassifier` for classes made of components).
    n_classes_ : int
        ``n_components``.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> from daskem import GaussianMixture
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(-4, 1, (500, 2)), rng.normal(4, 1, (500, 2))])
    >>> gm = GaussianMixture(2, random_state=0).fit(da.from_array(X, chunks=(250, 2)))
    >>> np.sort(gm.means_[:, 0]).round(0)
    array([-4.,  4.])
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        chunk_size: int | str = "auto",
        split_every: int = 16,
        init_sample_size: int = 100_000,
        nan_policy: str = "raise",
        pattern_weights: bool = False,
        prefit: bool | str = "auto",
        cache: bool | str = "auto",
        precision: str = "auto",
        select_after: int | None | str = "auto",
    ) -> None:
        _store_params(self, locals())

    def fit(
        self,
        X: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
        feature_names: Any = None,
        class_names: Any = None,
    ) -> GaussianMixture:
        """Estimate the parameters by EM.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_samples, n_features)
        y : ignored
            Not used, present for API consistency (as in scikit-learn). For a
            semi-supervised fit use :class:`GaussianMixtureClassifier`.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights (quality masks, area weights) entering every statistic.
        checkpoint_dir : path, optional
            Directory where the parameters are saved (atomically, as JSON) after every
            iteration.
        resume : bool, default=False
            Continue from the checkpoint in ``checkpoint_dir`` (if there is one). The
            data and parameters must be those of the interrupted fit (checked); the
            result is exactly the one an uninterrupted fit would have reached.
        callback : callable, optional
            Called with a :class:`daskem.engine.IterationInfo` after every iteration.
        feature_names : sequence of str, optional
            Names of the features (e.g. a stack's variables), stored as
            ``feature_names_in_`` (a DataFrame's columns are used otherwise).
        class_names : sequence of str, optional
            A name for each component (class), stored as ``class_names_``.

        Returns
        -------
        self
        """
        self._fit(X, None, sample_weight, checkpoint_dir, resume, callback)
        self._set_names(feature_names, class_names)
        return self

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Mean log-likelihood per sample (weighted by ``sample_weight`` if given)."""
        # explicit: DensityMixin (first in the MRO) has a placeholder score
        return EMEstimator.score(self, X, y, sample_weight)

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None):
        """Fit, then return the most likely component of each sample."""
        return self.fit(X, y, sample_weight).predict(X)

    def predict_proba(self, X: Any):
        """Posterior probability of each component, shape (n_samples, n_components)."""
        return self.component_proba(X)

    def predict(self, X: Any):
        """Most likely component of each sample, shape (n_samples,)."""
        return self._rows(_rows_predict, X, None, np.int64)


@register_estimator
class GaussianMixtureClassifier(ClassifierMixin, ClassLabelsMixin, _BaseGaussianMixture):
    """Semi-supervised Gaussian mixture classifier fitted by EM over all samples.

    The classifier of the mixture family, as scikit-learn's semi-supervised
    estimators (``LabelSpreading``, ``SelfTrainingClassifier``): ``y`` holds a class
    for the labelled samples and ``-1`` for the unlabelled ones. Each class owns one
    or more Gaussian components; EM fits them on *every* sample (labelled samples have
    their responsibilities clamped to their class's components), so the many
    unlabelled pixels shape the classes that a handful of labels name. With every
    sample labelled it is a Gaussian discriminant classifier (QDA for full
    covariances, LDA-like for tied ones).

    Parameters
    ----------
    n_components : int, optional
        Number of mixture components, at least the number of classes. Default: the
        total asked for by ``components_per_class`` (one per class by default).
        Components beyond that are given to the classes in turn.
    components_per_class : int or mapping, optional
        Components of each class: one int for every class, or a mapping from class
        label (as in ``y``) to a count >= 1 (classes not named get 1). Several
        components let a multi-modal class (``"urban"``, ``"forest"``) be modelled by
        several Gaussians.
    label_weight : float, default=1.0
        How many unlabelled samples a labelled sample counts for, in every statistic
        and in the objective (Nigam et al. 2000's lambda). Values above 1 hold the
        components closer to their labelled samples when a few labels face millions
        of unlabelled pixels and the classes are not Gaussian; 1 is plain EM on the
        joint likelihood.
    label_prior : float in [0, 1] or "auto", default=0.0
        A class prior for every sample from a Gaussian classifier fitted on the
        labelled samples alone (:func:`daskem.model.init.label_prior`: class means,
        class covariances shrunk towards a multiple of the identity by leave-one-out on
        the labels). In every E-step a sample's components are weighted by that
        classifier's class probabilities raised to the power ``t`` (the temperature),
        so the classes stay nearer where their labels put them. 0 (the default): no
        prior, plain semi-supervised EM. A number: that ``t``. ``"auto"``: ``t`` in
        [0, 1] minimising the held-out (leave-one-out) log-loss of the labels
        (temperature scaling). Not the default: it helps with a few labels where the
        classes are not the data's clusters and costs accuracy where they are (see
        Notes and the README, "Semi-supervised maps on real data").
        Its E-step runs the per-component float64 kernel, slower per pass than the
        fused kernel of the plain E-step.

    The other parameters are those of :class:`GaussianMixture` (``covariance_type``,
    ``tol``, ``reg_covar``, ``max_iter``, ``n_init``, ``random_state``, ``chunk_size``,
    ``nan_policy``, ``prefit``, ``precision``, ...). ``init_params`` is not used when
    labels are given: the start is made from them (see Notes).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels, as given in ``y`` (sorted).
    component_classes_ : ndarray of int, shape (n_components,)
        Index into ``classes_`` of the class owning each component.
    n_classes_ : int
    weights_, means_, covariances_, precisions_, precisions_cholesky_, converged_,
    n_iter_, lower_bound_, lower_bounds_, n_features_in_, reseeds_, n_excluded_, n_partial_,
    n_empty_
        As in :class:`GaussianMixture`; the lower bound is the semi-supervised
        objective (log p(x) of unlabelled samples plus ``label_weight`` times
        log p(x, class) of labelled ones, per unit of weight; with the label prior,
        ``p(k)`` of every sample is ``pi_k q(c_k | x)^t`` normalised).
    label_prior_ : dict
        The label prior used: ``temperature`` (0: none), and if one was used its
        ``shrinkage`` and the ``held_out_log_loss`` of the labels (nats per label).

    Notes
    -----
    The start (:func:`daskem.model.init.labelled_start`): the first component of each
    class at the mean of its labelled samples, every component with one common
    covariance (the pooled within-class covariance of the labels, shrunk towards the
    covariance of the initialisation sample as if that were worth ``D + 1`` samples),
    equal weights; further components of a class are
    seeded by k-means++ among the samples nearest to that class. With one component
    per class every restart has this same start, so ``n_init`` is then 1; otherwise
    restarts vary the seeded components and the one with the highest objective is
    kept.

    The label prior (``label_prior > 0``): with a few labels per class, plain
    semi-supervised EM follows the unlabelled samples, and where the classes are not
    the Gaussian clusters of the data a class's component can end on another class's
    pixels -- most often when two classes' labels fall in one data cluster, which EM
    then splits its own way. With the prior, every sample's mixing proportions are
    ``pi_k q(c_k | x)^t`` (normalised), ``q`` the classifier of the labels alone: the
    objective is the log-likelihood of a mixture whose proportions vary by sample, and
    EM never lowers it. ``predict`` and ``predict_proba`` use the fitted mixture alone.
    Measured on real data (README): with 3 labels per class it lifts wine from 78.5 %
    to 92.8 % and the Landsat scene from 42.3 % to 46.7 % (``"auto"``; 53.4 % with
    ``t = 1``), but with 10 labels per class it lowers the scene from 57.4 % to 51.8 %,
    and on well-separated synthetic classes it moves the fit off the likelihood's
    optimum (85.0 % against 90.4 %).

    Examples
    --------
    >>> import numpy as np
    >>> from daskem import GaussianMixtureClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(-3, 1, (500, 2)), rng.normal(3, 1, (500, 2))])
    >>> y = np.full(1000, -1)
    >>> y[[0, 1, 500, 501]] = [0, 0, 1, 1]
    >>> clf = GaussianMixtureClassifier(random_state=0).fit(X, y)
    >>> clf.predict([[-3.0, -3.0], [3.0, 3.0]])
    array([0, 1])
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        components_per_class: Any = None,
        label_weight: float = 1.0,
        label_prior: float | str = 0.0,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        chunk_size: int | str = "auto",
        split_every: int = 16,
        init_sample_size: int = 100_000,
        nan_policy: str = "raise",
        pattern_weights: bool = False,
        prefit: bool | str = "auto",
        cache: bool | str = "auto",
        precision: str = "auto",
        select_after: int | None | str = "auto",
    ) -> None:
        _store_params(self, locals())

    def _check_classifier_options(self) -> None:
        lw = self.label_weight
        if isinstance(lw, bool) or not isinstance(lw, numbers.Real) or not lw > 0:
            raise ValueError(f"label_weight must be a number > 0, got {lw!r}")
        if not np.isfinite(lw):
            raise ValueError(f"label_weight must be finite, got {lw!r}")
        K = self.n_components
        if K is not None and (not isinstance(K, numbers.Integral) or K < 1):
            raise ValueError(f"n_components must be None or an integer >= 1, got {K!r}")
        lp = getattr(self, "label_prior", 0.0)  # a subclass may not have the option
        if not (
            (isinstance(lp, str) and lp == "auto")
            or (isinstance(lp, numbers.Real) and not isinstance(lp, bool) and 0 <= lp <= 1)
        ):
            raise ValueError(f"label_prior must be 'auto' or a number in [0, 1], got {lp!r}")

    def _setup_labels(self, data, summary):
        self._check_classifier_options()
        Xl, yl, wl = self._labelled_rows(summary)
        if getattr(self, "_classes_from_data", False):
            classes = np.flatnonzero(np.asarray(summary.counts) > 0)
            self._check_classes(classes)
            if not np.array_equal(classes, np.arange(len(classes))):
                data = engine.relabel(data, classes)
                yl = np.searchsorted(classes, yl)
            self.classes_ = classes
        elif int(summary.y_max) >= len(self.classes_):
            raise ValueError(
                f"y holds class id {int(summary.y_max)} but the classifier has "
                f"{len(self.classes_)} classes"
            )
        component_class = self._layout(self.classes_)
        self._prior = None
        lp = getattr(self, "label_prior", 0.0)
        if lp == "auto" or float(lp) > 0:
            prior = label_prior(Xl, yl, wl, len(self.classes_), lp)
            if prior is not None and prior.temperature > 0:
                self._prior = prior
        self.label_prior_ = (
            {"temperature": 0.0}
            if self._prior is None
            else {
                "temperature": self._prior.temperature,
                "shrinkage": self._prior.shrinkage,
                "held_out_log_loss": self._prior.held_out_log_loss,
            }
        )
        return data, (Xl, yl, wl), component_class

    def _model(self) -> GMMModel:
        model = super()._model()
        prior = getattr(self, "_prior", None)
        if prior is None:
            return model
        cls = LabelPriorMissingModel if isinstance(model, MissingGMMModel) else LabelPriorModel
        return cls(
            model.covariance_type,
            model.reg_covar,
            allow_excluded=model.allow_excluded,
            precision=model.precision,
            label_weight=model.label_weight,
            prior=prior,
        )

    def _fingerprint_extra(self) -> dict[str, Any]:
        lp = getattr(self, "label_prior", 0.0)
        return {**super()._fingerprint_extra(), "label_prior": lp if lp == "auto" else float(lp)}

    def _fixed_start(self, component_class: np.ndarray) -> bool:
        return len(component_class) == len(np.unique(component_class))

    def fit(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
        feature_names: Any = None,
        class_names: Any = None,
    ) -> GaussianMixtureClassifier:
        """Fit the mixture by semi-supervised EM.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            The class of each labelled sample (any integers or strings) and ``-1`` for
            unlabelled samples. A Dask array must hold integers.
        sample_weight : array-like of shape (n_samples,), optional
        checkpoint_dir, resume, callback, feature_names
            As in :meth:`GaussianMixture.fit`.
        class_names : sequence of str, optional
            A name for each class (in the order of ``classes_``), stored as
            ``class_names_``.

        Returns
        -------
        self
        """
        self._check_classifier_options()
        y = self._encode_y(y)
        self._classes_from_data = isinstance(y, da.Array)
        try:
            self._fit(X, y, sample_weight, checkpoint_dir, resume, callback)
        finally:
            del self._classes_from_data
        self._set_names(feature_names, class_names)
        return self

    def predict_proba(self, X: Any):
        """Probability of each class (its components' posteriors summed), (n_samples, n_classes)."""
        self._check_fitted()
        return self._rows(_rows_class_proba, X, self.n_classes_, np.float64)

    def predict(self, X: Any):
        """The most probable class of each sample, as a label of ``classes_``."""
        idx = self._rows(_rows_class_index, X, None, np.int64)
        if isinstance(idx, da.Array):
            return idx.map_blocks(_take_classes, self.classes_, dtype=self.classes_.dtype)
        return self.classes_[idx]
