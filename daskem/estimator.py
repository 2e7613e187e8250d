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
import os
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, DensityMixin
from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from . import engine
from .model.gaussian import covariance_shape
from .model.gmm import (
    COVARIANCE_TYPES,
    PRECISIONS,
    GMMModel,
    GMMParams,
    class_posterior,
    covariances_from_precision_cholesky,
    log_responsibilities,
    n_parameters,
    observed_weighted_log_prob,
    precisions_from_cholesky,
)
from .model.init import INIT_METHODS, initial_responsibilities, labelled_start, params_from_resp
from .model.missing import MissingGMMModel
from .model.missing import impute as _impute
from .modelfile import ModelFileError, load_checkpoint, register_estimator, save_checkpoint

__all__ = ["ConvergenceWarning", "GaussianMixture", "GaussianMixtureClassifier"]

logger = logging.getLogger("daskem")


class ConvergenceWarning(_SklearnConvergenceWarning):
    """EM stopped at ``max_iter`` before the change of the lower bound fell below ``tol``."""


def _check_random_state(seed: Any) -> np.random.RandomState:
    if seed is None or isinstance(seed, numbers.Integral):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"random_state must be None, an int or a RandomState, got {seed!r}")


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    mx = a.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return np.log(np.exp(a - mx).sum(axis=1)) + mx[:, 0]


def _flip_cholesky_upper(precision: np.ndarray) -> np.ndarray:
    """Upper-triangular ``P`` with ``P @ P.T == precision``."""
    flipped = precision[::-1, ::-1]
    L = np.linalg.cholesky(flipped)
    return L[::-1, ::-1]


# ---- row-wise kernels used lazily on Dask blocks (module level so they pickle) ----


def _rows_weighted_log_prob(params: GMMParams, X: np.ndarray) -> np.ndarray:
    return observed_weighted_log_prob(X, params)


def _rows_score(params: GMMParams, X: np.ndarray) -> np.ndarray:
    return _logsumexp_rows(observed_weighted_log_prob(X, params))


def _rows_proba(params: GMMParams, X: np.ndarray) -> np.ndarray:
    wlp = observed_weighted_log_prob(X, params)
    with np.errstate(under="ignore", invalid="ignore"):
        return np.exp(wlp - _logsumexp_rows(wlp)[:, None])


def _rows_class_posterior(params: GMMParams, X: np.ndarray) -> np.ndarray:
    proba, logd = class_posterior(params, X)
    return np.concatenate([proba, logd[:, None]], axis=1)


def _rows_predict(params: GMMParams, X: np.ndarray) -> np.ndarray:
    wlp = observed_weighted_log_prob(X, params)
    return np.where(np.isnan(wlp[:, 0]), -1, wlp.argmax(axis=1)) if len(wlp) else wlp.argmax(1)


def _rows_impute(params: GMMParams, X: np.ndarray) -> np.ndarray:
    filled, std = _impute(X, params, return_std=True)
    return np.concatenate([filled, std], axis=1)


def _params_to_json(p: GMMParams) -> dict[str, Any]:
    return {
        "weights": p.weights.tolist(),
        "means": p.means.tolist(),
        "precisions_cholesky": np.asarray(p.precisions_cholesky).tolist(),
        "covariances": None if p.covariances is None else np.asarray(p.covariances).tolist(),
        "component_class": None
        if p.component_class is None
        else np.asarray(p.component_class).tolist(),
    }


def _params_from_json(d: dict[str, Any], covariance_type: str) -> GMMParams:
    def arr(v, dtype=np.float64):
        return None if v is None else np.asarray(v, dtype=dtype)

    return GMMParams(
        arr(d["weights"]),
        arr(d["means"]),
        arr(d["precisions_cholesky"]),
        covariance_type,
        arr(d["covariances"]),
        arr(d["component_class"], np.int64),
    )


def _n_excluded(result: engine.EMResult) -> int:
    if result.stats is not None:
        return int(result.stats.n_excluded)
    return int(getattr(result, "n_excluded", 0))


def _n_partial(result: engine.EMResult) -> int:
    if result.stats is not None:
        return int(result.stats.n_partial)
    return int(getattr(result, "n_partial", 0))


def _n_empty(result: engine.EMResult) -> int:
    if result.stats is not None:
        return int(result.stats.n_empty)
    return int(getattr(result, "n_empty", 0))


def _result_to_json(r: engine.EMResult) -> dict[str, Any]:
    return {
        "params": _params_to_json(r.params),
        "lower_bound": float(r.lower_bound),
        "lower_bounds": [float(v) for v in r.lower_bounds],
        "n_iter": int(r.n_iter),
        "converged": bool(r.converged),
        "stopped": bool(r.stopped),
        "events": [{k: (float(v) if k == "mass" else v) for k, v in e.items()} for e in r.events],
        "n_excluded": _n_excluded(r),
        "n_partial": _n_partial(r),
        "n_empty": _n_empty(r),
    }


def _rows_class_proba(params: GMMParams, X: np.ndarray) -> np.ndarray:
    return class_posterior(params, X)[0]


def _rows_class_index(params: GMMParams, X: np.ndarray) -> np.ndarray:
    return class_posterior(params, X)[0].argmax(axis=1)


def _take_classes(idx: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return classes[idx]


def _fill_by_class(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``X`` with each missing value replaced by its class's mean of that attribute
    (the mean over every row where the class has none observed)."""
    X = np.array(X, dtype=np.float64)
    missing = ~np.isfinite(X)
    if not missing.any():
        return X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        overall = np.nanmean(np.where(missing, np.nan, X), axis=0)
        overall = np.where(np.isfinite(overall), overall, 0.0)
        for c in np.unique(y):
            rows = y == c
            fill = np.nanmean(np.where(missing[rows], np.nan, X[rows]), axis=0)
            fill = np.where(np.isfinite(fill), fill, overall)
            X[rows] = np.where(missing[rows], fill, X[rows])
    return X


def _store_params(estimator: Any, params: dict[str, Any]) -> None:
    """Store ``__init__``'s arguments unchanged, as scikit-learn's contract asks."""
    for name, value in params.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


#: How rows with non-finite values are treated when fitting: refused, left out, or used
#: through their observed attributes (EM with missing data, :mod:`daskem.model.missing`).
NAN_POLICIES = ("raise", "omit", "marginalize")
PREFIT_MIN_ROWS = 5_000  # smallest coarse stage of the prefit


class _BaseGaussianMixture(BaseEstimator):
    """EM machinery shared by :class:`GaussianMixture` and :class:`GaussianMixtureClassifier`.

    Everything here works on class ids ``0 .. n_classes - 1`` (``-1`` unlabelled) and
    on ``component_class``, the class of each component (None: unsupervised).
    """

    # the layout of the fit in progress (set by ``_fit``): number of components and the
    # class of each (None: unsupervised, ``n_components`` components)
    _n_comp: int | None = None
    _component_class: np.ndarray | None = None

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = self.nan_policy != "raise"
        return tags

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
        for name, lo in (("tol", 0.0), ("reg_covar", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or v < lo:
                raise ValueError(f"{name} must be a number >= {lo}, got {v!r}")
        for name, lo in (
            ("max_iter", 0),
            ("n_init", 1),
            ("split_every", 2),
            ("init_sample_size", 1),
        ):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.cache not in ("auto", True, False):
            raise ValueError(f"cache must be True, False or 'auto', got {self.cache!r}")
        if self.prefit not in ("auto", True, False):
            raise ValueError(f"prefit must be True, False or 'auto', got {self.prefit!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        sa = self.select_after
        if not (sa is None or sa == "auto" or (isinstance(sa, numbers.Integral) and sa >= 1)):
            raise ValueError(f"select_after must be an integer >= 1, None or 'auto', got {sa!r}")
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

    def _validate_X(self, X: Any, *, for_fit: bool, allow_missing: bool = False) -> Any:
        """``X`` checked and converted to a float NumPy or Dask array.

        NumPy-like input goes through scikit-learn's ``validate_data`` (dtype, shape,
        sparse, finiteness, ``n_features_in_`` and ``feature_names_in_``); Dask input is
        checked for shape and dtype only, without computing anything.
        """
        if not for_fit:
            self._check_fitted()
        is_dask = isinstance(X, da.Array)
        if is_dask:
            if X.ndim != 2:
                raise ValueError(
                    f"Expected a 2-D array of shape (n_samples, n_features), got shape "
                    f"{X.shape}. Reshape a single feature with X.reshape(-1, 1)."
                )
            if X.dtype not in (np.float32, np.float64):
                if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
                    raise ValueError(f"X must be numeric, got dtype {X.dtype}")
                X = X.astype(np.float64)
            validate_data(self, X, reset=for_fit, skip_check_array=True)
        else:
            X = validate_data(
                self,
                X,
                reset=for_fit,
                dtype=[np.float64, np.float32],
                ensure_all_finite=False,
                ensure_min_samples=2 if for_fit else 1,
            )
            if for_fit and self.nan_policy == "raise" and not np.isfinite(X).all():
                bad = int((~np.isfinite(X)).any(axis=1).sum())
                raise ValueError(
                    f"Input X contains non-finite values (NaN or inf) in {bad} rows. "
                    "Remove them, use nan_policy='marginalize' to fit them through their "
                    "observed attributes, or nan_policy='omit' to leave them out."
                )
            allow_missing = allow_missing or self.nan_policy == "marginalize"
            if not for_fit and not allow_missing and not np.isfinite(X).all():
                raise ValueError(
                    "Input X contains non-finite values (NaN or inf); use class_posterior() "
                    "for samples with missing attributes, or fit with "
                    "nan_policy='marginalize'"
                )
        return X

    def _prepare(
        self, X: Any, sample_weight: Any = None, y: Any = None, *, for_fit: bool
    ) -> engine.ChunkedData:
        """Validated ``X``, weights and class ids as row-chunked data."""
        X = self._validate_X(X, for_fit=for_fit)
        n = X.shape[0]
        if sample_weight is not None:
            sw = (
                sample_weight
                if isinstance(sample_weight, da.Array)
                else np.asarray(sample_weight, dtype=np.float64)
            )
            if sw.shape != (n,):
                raise ValueError(f"sample_weight must have shape ({n},) to match X, got {sw.shape}")
            if isinstance(sw, np.ndarray) and (not np.isfinite(sw).all() or np.any(sw < 0)):
                raise ValueError("sample_weight must be finite and non-negative")
            if isinstance(sw, np.ndarray) and for_fit and n and not np.any(sw > 0):
                raise ValueError("sample_weight is zero for every sample: nothing to fit")
            sample_weight = sw
        if y is not None:
            yy = y if isinstance(y, da.Array) else np.asarray(y)
            if yy.shape != (n,):
                raise ValueError(f"y must have shape ({n},) to match X, got {yy.shape}")
            if not np.issubdtype(yy.dtype, np.integer):
                raise ValueError(f"y must hold integer class ids (-1 = unlabelled), got {yy.dtype}")
            y = yy
        cs = self.chunk_size
        if not (cs == "auto" or (isinstance(cs, numbers.Integral) and cs >= 1)):
            raise ValueError(f"chunk_size must be an integer >= 1 or 'auto', got {cs!r}")
        return engine.as_chunked(X, sample_weight, y, chunk_size=cs)

    def _check_fitted(self) -> None:
        if not hasattr(self, "means_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' first."
            )

    # ------------------------------------------------------------------ fitting

    def _model(self) -> GMMModel:
        cls = MissingGMMModel if self.nan_policy == "marginalize" else GMMModel
        return cls(
            self.covariance_type,
            float(self.reg_covar),
            allow_excluded=self.nan_policy == "omit",
            precision=self.precision,
            label_weight=float(getattr(self, "label_weight", 1.0)),
        )

    def _setup_labels(
        self, data: engine.ChunkedData
    ) -> tuple[engine.ChunkedData, tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
        """Data with class ids, the labelled rows and each component's class.

        The unsupervised mixture has none of these; the classifier overrides this.
        """
        return data, None, None

    def _fixed_start(self, component_class: np.ndarray | None) -> bool:
        """Whether every restart would get the same start (so one is enough)."""
        return False

    def _labelled_rows(self, data: engine.ChunkedData) -> tuple[np.ndarray, np.ndarray]:
        """Every labelled row (X, y), read from the chunks that hold them, validated."""
        Xl, yl, ymin, ymax = engine.labelled_rows(data)
        Xl = np.asarray(Xl, dtype=np.float64)
        yl = np.asarray(yl)
        if int(ymin) < -1:
            raise ValueError(f"y holds {int(ymin)}: use -1 for unlabelled and ids >= 0 for classes")
        finite = np.isfinite(Xl).all(axis=1)
        if not finite.all():
            if self.nan_policy == "raise":
                raise ValueError(
                    "Some labelled rows of X contain non-finite values; use "
                    "nan_policy='marginalize' or 'omit'"
                )
            if self.nan_policy == "marginalize":
                seen = np.isfinite(Xl).any(axis=1)
                Xl, yl = _fill_by_class(Xl[seen], yl[seen]), yl[seen]
                if not len(Xl):
                    raise ValueError("Every labelled row of X has every attribute missing")
                return Xl, yl
            lost = sorted(set(yl[~finite].tolist()) - set(yl[finite].tolist()))
            if lost:
                raise ValueError(
                    f"Every label of class(es) {lost} is on a row with missing values "
                    "(masked pixels): label valid pixels"
                )
            Xl, yl = Xl[finite], yl[finite]
        return Xl, yl

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
                Xs, ws, *labelled, component_class, ct, float(self.reg_covar), gen
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

    def _start_sample(self, sample, K: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The sampled rows a start is computed from (float64, positive weights).

        Rows with every attribute observed; under ``nan_policy="marginalize"``, if fewer
        than ``max(10 K, 100)`` of those were drawn, every row with some attribute
        observed, its missing values filled with the sample's mean of that attribute
        (EM then works from the observed values only).
        """
        Xs, ws, _ = sample
        keep = np.ones(len(Xs), dtype=bool) if ws is None else np.isfinite(ws) & (ws > 0)
        never = ~np.isfinite(Xs[keep]).any(axis=0)
        if self.nan_policy == "marginalize" and keep.any() and never.any():
            names = getattr(self, "feature_names_in_", None)
            which = [str(names[j]) if names is not None else int(j) for j in np.flatnonzero(never)]
            raise ValueError(
                f"Attribute(s) (columns of X) {which} are missing in every one of the "
                f"{int(keep.sum())} rows drawn for initialisation: nothing can be learnt about "
                "them; leave them out"
            )
        finite = np.isfinite(Xs).all(axis=1) & keep
        if self.nan_policy == "marginalize" and finite.sum() < max(10 * K, 100):
            seen = np.isfinite(Xs).any(axis=1) & keep
            Xf = _fill_by_class(np.asarray(Xs[seen], dtype=np.float64), np.zeros(seen.sum(), int))
            return Xf, None if ws is None else ws[seen]
        return np.asarray(Xs[finite], dtype=np.float64), None if ws is None else ws[finite]

    def _initialise(self, data, seeds, labelled, sample) -> list[GMMParams]:
        """First parameters of each restart (one per seed), on the shared sample.

        Restarts are independent (each has its own seed), so they run in a thread per
        core of this machine (NumPy releases the GIL in its loops) with one BLAS thread
        each; the result does not depend on the number of threads.
        """
        if len(seeds) == 1:
            return [self._initial_params(data, seeds[0], labelled, sample)]
        workers = min(len(seeds), os.cpu_count() or 1)
        with engine.blas_one_thread(), ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda s: self._initial_params(data, s, labelled, sample), seeds))

    def _screen(
        self, candidates: list[GMMParams], sample, n_total: int = 1, labelled=None
    ) -> list[bool]:
        """Which prefitted restarts go on to the full passes.

        Every restart was fitted on the same random sample, so the paired difference of
        their per-row log-likelihoods there estimates the difference of their mean
        log-likelihoods on all the data, with standard error ``se``. A restart is left
        out when, even 4 standard errors in its favour, it could not beat the best
        restart on the sample by more than ``tol``: it is worse, or equal to within the
        fit's own tolerance. The best on the sample always goes on.

        With labels, the objective compared is the semi-supervised one: the sample
        stands for the ``n_total`` rows' ``log p(x)``, and every labelled row adds
        ``label_weight * log p(x, class)`` exactly (no sampling error).
        """
        Xs, ws, _ = sample
        if self.nan_policy == "marginalize":  # every row with something observed
            finite = np.isfinite(Xs).any(axis=1)
        else:
            finite = np.isfinite(Xs).all(axis=1)
        if ws is not None:
            finite &= np.isfinite(ws) & (ws > 0)
        Xs = np.asarray(Xs[finite], dtype=np.float64)
        w = np.ones(len(Xs)) if ws is None else np.asarray(ws[finite], dtype=np.float64)
        w = w / w.sum()
        ll = np.stack([_logsumexp_rows(observed_weighted_log_prob(Xs, p)) for p in candidates])
        mean = ll @ w
        share, lab = 1.0, np.zeros(len(candidates))
        if labelled is not None and len(labelled[0]):
            Xl, yl = labelled
            lw = float(getattr(self, "label_weight", 1.0)) * len(Xl)
            share = n_total / (n_total + lw)
            lab = np.array([log_responsibilities(Xl, p, yl)[0].mean() for p in candidates])
        mean = share * mean + (1.0 - share) * lab
        best = int(np.argmax(mean))
        keep = []
        for i in range(len(candidates)):
            d = ll[best] - ll[i]
            diff = float(mean[best] - mean[i])
            d_mean = float(d @ w)
            se = share * float(np.sqrt(max(((d - d_mean) ** 2) @ w, 0.0) * (w @ w)))
            keep.append(i == best or 4.0 * se - diff >= float(self.tol))
        logger.info(
            "restarts screened on %d sampled rows: mean log-likelihoods %s, %d go on",
            len(Xs),
            np.array2string(mean, precision=6),
            sum(keep),
        )
        return keep

    def _select_after(self, n_samples: int) -> int | None:
        if self.select_after != "auto":
            return self.select_after
        prefitted = self._use_prefit(n_samples) and not self._user_init_complete()
        return 1 if prefitted and self.n_init > 1 else None

    def _user_init_complete(self) -> bool:
        return (
            self.weights_init is not None
            and self.means_init is not None
            and self.precisions_init is not None
        )

    def _use_prefit(self, n_samples: int) -> bool:
        if self.prefit == "auto":
            return n_samples > 2 * self.init_sample_size
        return bool(self.prefit)

    def _prefit(self, params: GMMParams, Xs, ws, labelled) -> GMMParams:
        """EM to convergence on the in-memory sample (no pass over the full data).

        Starting the full passes near the optimum saves most of them; the full passes
        then run plain EM from there, so the final model is a plain-EM fixed point.
        """
        model = self._model()
        iterations = []
        # coarse to fine: most iterations on every 16th, then every 4th sampled row, so
        # the last stage on the whole sample starts close to its optimum
        for stride in (16, 4, 1):
            if stride > 1 and len(Xs) // stride < max(PREFIT_MIN_ROWS, 50 * len(params.weights)):
                continue
            Xt, wt, yt = Xs[::stride], None if ws is None else ws[::stride], None
            if labelled is not None and labelled[0].shape[0]:  # every labelled row, always
                Xl, yl = labelled
                yt = np.concatenate([np.full(len(Xt), -1), yl])
                Xt = np.concatenate([Xt, Xl])
                wt = None if wt is None else np.concatenate([wt, np.ones(len(Xl))])
            result = engine.fit_em_local(
                model, Xt, params, wt, yt, tol=0.1 * float(self.tol), max_iter=500, accelerate=True
            )
            params = result.params
            iterations.append(result.n_iter)
        logger.info(
            "prefit on %d sampled rows: %s iterations (stages), mean log-likelihood %.6g",
            len(Xs),
            "+".join(map(str, iterations)),
            result.lower_bound,
        )
        return params

    def _fit(
        self,
        X: Any,
        y: Any,
        sample_weight: Any,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
    ) -> engine.ChunkedData:
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        data = self._prepare(X, sample_weight, y, for_fit=True)
        data, labelled, component_class = self._setup_labels(data)
        K = self.n_components if component_class is None else len(component_class)
        self._check_parameters(data.n_features, K)
        if data.n_samples < K:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {K}, "
                f"n_samples = {data.n_samples}"
            )
        self._n_comp, self._component_class = K, component_class
        n_classes = K if component_class is None else int(component_class.max()) + 1

        if self.max_iter > 0:
            data = engine.cache_data(data, self.cache)
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        n_init = self.n_init if do_init else 1
        if labelled is not None and self._fixed_start(component_class):
            n_init = 1  # every restart would start from the same labelled start
        rng = _check_random_state(self.random_state)
        # one seed per initialisation, drawn up front so a resumed run draws the same ones
        seeds = [int(rng.randint(np.iinfo(np.int32).max)) for _ in range(n_init)]
        model = self._model()
        fingerprint = self._fingerprint(data)
        ckpt = self._read_checkpoint(checkpoint_dir, fingerprint) if resume else None
        saved = (ckpt or {}).get("candidates") or [None] * n_init
        t_fit = time.perf_counter()
        finished: dict[int, engine.EMResult] = {}
        starts: dict[int, engine.Start] = {}
        to_init = []
        for init in range(n_init):
            state = saved[init]
            if state is not None:
                res = self._result_from_json(state)
                if res.converged or res.stopped or res.n_iter >= self.max_iter:
                    finished[init] = res
                else:
                    prev = res.lower_bounds[-1] if res.lower_bounds else -np.inf
                    starts[init] = engine.Start(res.params, prev, res.n_iter, res.lower_bounds)
            elif do_init:
                to_init.append(init)
            else:
                starts[init] = engine.Start(self._fitted_params(component_class), self.lower_bound_)
        if to_init:
            sample = None
            if not self._user_init_complete():
                # one chunk-wise sample serves every restart: a single read of the data
                sample = engine.draw_sample(data, self.init_sample_size, seeds[0])
            if self.verbose:
                for init in to_init:
                    print(f"Initialization {init}")
            first = self._initialise(data, [seeds[i] for i in to_init], labelled, sample)
            keep = [True] * len(first)
            if len(first) > 1 and sample is not None and self._select_after(data.n_samples):
                keep = self._screen(first, sample, data.n_samples, labelled)
            for init, params0, kept in zip(to_init, first, keep, strict=True):
                if kept:
                    starts[init] = engine.Start(params0)
                else:  # recorded as stopped, so a resumed fit does not re-run it
                    finished[init] = engine.EMResult(params0, -np.inf, [], 0, False, [])
                    finished[init].stopped = True
                    saved[init] = _result_to_json(finished[init])
        if self.max_iter == 0:
            for init, st in starts.items():
                finished[init] = engine.EMResult(st.params, -np.inf, [], 0, False, [])
        elif starts:
            order = sorted(starts)
            cb = self._iteration_callback(
                t_fit, checkpoint_dir, fingerprint, order, saved, callback
            )
            results = engine.fit_em_many(
                model,
                data,
                [starts[i] for i in order],
                tol=float(self.tol),
                max_iter=int(self.max_iter),
                split_every=int(self.split_every),
                callback=cb,
                select_after=self._select_after(data.n_samples),
            )
            finished.update(zip(order, results, strict=True))
        best: engine.EMResult | None = None
        for init in range(n_init):
            result = finished[init]
            if self.verbose:
                state = "converged" if result.converged else "did not converge"
                print(f"Initialization {init} {state}. lower bound {result.lower_bound:.5f}")
            if best is None or result.lower_bound > best.lower_bound:
                best = result
        assert best is not None
        for e in best.events:
            warnings.warn(
                f"Component {e['component']} collapsed at iteration {e['iteration']} "
                f"(responsibility mass {e['mass']:.3g}) and was re-seeded: {e['reason']}. "
                "Consider fewer components or a larger reg_covar.",
                UserWarning,
                stacklevel=3,
            )
        self._set_params(best.params)
        self.converged_ = bool(best.converged)
        self.n_iter_ = int(best.n_iter)
        self.lower_bound_ = float(best.lower_bound)
        self.lower_bounds_ = np.asarray(best.lower_bounds, dtype=np.float64)
        self.reseeds_ = list(best.events)
        self.n_features_in_ = data.n_features
        self.n_excluded_ = _n_excluded(best)
        self.n_partial_ = _n_partial(best)
        self.n_empty_ = _n_empty(best)
        self.component_classes_ = (
            np.arange(K) if component_class is None else np.asarray(component_class)
        )
        self.n_classes_ = n_classes
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return data

    # ------------------------------------------------------------------ checkpoints

    def _fingerprint(self, data: engine.ChunkedData) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        rs = self.random_state
        return {
            "n_samples": data.n_samples,
            "n_features": data.n_features,
            "n_components": int(self._n_comp),
            "covariance_type": self.covariance_type,
            "tol": float(self.tol),
            "reg_covar": float(self.reg_covar),
            "max_iter": int(self.max_iter),
            "n_init": int(self.n_init),
            "init_params": self.init_params,
            "random_state": int(rs) if isinstance(rs, numbers.Integral) else None,
            "labelled": data.labels is not None,
            "weighted": data.sample_weight is not None,
            "precision": self.precision,
            "select_after": self._select_after(data.n_samples),
            "component_classes": None
            if self._component_class is None
            else [int(c) for c in self._component_class],
            "label_weight": float(getattr(self, "label_weight", 1.0)),
        }

    def _read_checkpoint(self, directory: Any, fingerprint: dict) -> dict | None:
        ckpt = load_checkpoint(directory)
        if ckpt is None:
            return None
        old = ckpt.get("fingerprint", {})
        diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {fingerprint[k]!r}" for k in diff)
            raise ModelFileError(
                f"checkpoint in {directory} was written for a different fit ({details}); "
                "use another checkpoint directory or drop --resume"
            )
        return ckpt

    def _iteration_callback(self, t_fit, checkpoint_dir, fingerprint, order, saved, user_cb):
        verbose_cb = self._verbose_callback(t_fit)
        if checkpoint_dir is None and verbose_cb is None and user_cb is None:
            return None
        states = list(saved)
        events: dict[int, list[dict]] = {i: [] for i in order}
        for i in order:
            if states[i] is not None:
                events[i] = list(states[i]["events"])

        def cb(info: engine.IterationInfo) -> None:
            init = order[info.candidate]
            events[init].extend(info.events)
            if checkpoint_dir is not None:
                current = engine.EMResult(
                    info.params,
                    info.lower_bound,
                    info.history,
                    info.iteration,
                    info.converged,
                    list(events[init]),
                    info.stats,
                    info.stopped,
                )
                states[init] = _result_to_json(current)
                save_checkpoint(checkpoint_dir, {"fingerprint": fingerprint, "candidates": states})
            if verbose_cb is not None:
                verbose_cb(info)
            if user_cb is not None:
                user_cb(info)

        return cb

    def _result_from_json(self, d: dict) -> engine.EMResult:
        res = engine.EMResult(
            _params_from_json(d["params"], self.covariance_type),
            float(d["lower_bound"]),
            list(d["lower_bounds"]),
            int(d["n_iter"]),
            bool(d["converged"]),
            list(d["events"]),
            stopped=bool(d.get("stopped", False)),
        )
        res.n_excluded = int(d.get("n_excluded", 0))
        res.n_partial = int(d.get("n_partial", 0))
        res.n_empty = int(d.get("n_empty", 0))
        return res

    def _verbose_callback(self, t_init: float):
        if self.verbose < 2:
            return None

        def cb(info: engine.IterationInfo) -> None:
            if info.iteration % self.verbose_interval == 0:
                print(
                    f"  Iteration {info.iteration}\t time lapse "
                    f"{time.perf_counter() - t_init:.5f}s\t ll change {info.change:.5f}"
                )

        return cb

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
        )

    # ------------------------------------------------------------------ prediction

    def _rows(self, func, X: Any, n_out: int | None, dtype, allow_missing: bool = False):
        data_X = self._validate_X(X, for_fit=False, allow_missing=allow_missing)
        params = self._fitted_params()
        if isinstance(data_X, da.Array):
            return engine.map_rows(func, params, data_X, n_out=n_out, dtype=dtype)
        return func(params, data_X)

    def class_posterior(self, X: Any):
        """Class probabilities and log density of each sample, missing values allowed.

        Rows with some non-finite attributes use the exact marginal Gaussian over their
        observed attributes; rows with none observed give NaN.

        Returns
        -------
        proba : array of shape (n_samples, n_classes_)
        log_density : array of shape (n_samples,)
            NumPy for NumPy input, lazy Dask arrays for Dask input.
        """
        self._check_fitted()
        both = self._rows(
            _rows_class_posterior, X, self.n_classes_ + 1, np.float64, allow_missing=True
        )
        return both[:, :-1], both[:, -1]

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

    def score_samples(self, X: Any):
        """Log-likelihood ``log p(x)`` of each sample, shape (n_samples,)."""
        return self._rows(_rows_score, X, None, np.float64)

    def component_proba(self, X: Any):
        """Posterior probability of each component, shape (n_samples, n_components)."""
        self._check_fitted()
        return self._rows(_rows_proba, X, self.means_.shape[0], np.float64)

    def _mean_log_likelihood(self, X: Any, sample_weight: Any = None) -> float:
        s = self.score_samples(X)
        if sample_weight is None:
            out = s.mean()
        else:
            w = (
                sample_weight
                if isinstance(sample_weight, da.Array)
                else np.asarray(sample_weight, dtype=np.float64)
            )
            out = (s * w).sum() / w.sum()
        return float(out.compute() if hasattr(out, "compute") else out)

    def _n_parameters(self) -> int:
        K, D = self.means_.shape
        return n_parameters(K, D, self.covariance_type)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        n = np.shape(X)[0] if not isinstance(X, da.Array) else X.shape[0]
        return -2 * self._mean_log_likelihood(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        n = np.shape(X)[0] if not isinstance(X, da.Array) else X.shape[0]
        return -2 * self._mean_log_likelihood(X) * n + 2 * self._n_parameters()

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

        Returns
        -------
        self
        """
        self._fit(X, None, sample_weight, checkpoint_dir, resume, callback)
        return self

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None):
        """Fit, then return the most likely component of each sample."""
        return self.fit(X, y, sample_weight).predict(X)

    def predict_proba(self, X: Any):
        """Posterior probability of each component, shape (n_samples, n_components)."""
        return self.component_proba(X)

    def predict(self, X: Any):
        """Most likely component of each sample, shape (n_samples,)."""
        return self._rows(_rows_predict, X, None, np.int64)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Mean log-likelihood per sample (weighted by ``sample_weight`` if given)."""
        return self._mean_log_likelihood(X, sample_weight)


@register_estimator
class GaussianMixtureClassifier(ClassifierMixin, _BaseGaussianMixture):
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
        log p(x, class) of labelled ones, per unit of weight).

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

    def _encode_y(self, y: Any) -> Any:
        """Class indices (``-1`` unlabelled) for NumPy-like ``y``; sets ``classes_``."""
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None: "
                "give -1 for unlabelled samples, or use GaussianMixture for an "
                "unsupervised fit"
            )
        if isinstance(y, da.Array):
            return y  # classes are read from the labelled rows during the fit
        y = column_or_1d(y, warn=True)
        if y.dtype.kind in "iuf":
            unlabelled = y == -1
        elif y.dtype.kind == "O":
            unlabelled = np.array(
                [isinstance(v, numbers.Number) and not isinstance(v, bool) and v == -1 for v in y],
                dtype=bool,
            )
        else:
            unlabelled = np.zeros(len(y), dtype=bool)
        labelled = y[~unlabelled]
        if labelled.size:
            check_classification_targets(labelled)
        classes, idx = np.unique(labelled, return_inverse=True)
        self._check_classes(classes)
        out = np.full(len(y), -1, dtype=np.int64)
        out[~unlabelled] = idx
        self.classes_ = classes
        return out

    def _check_classes(self, classes: np.ndarray) -> None:
        if len(classes) == 0:
            raise ValueError(
                "y labels no sample (every entry is -1): a classifier needs some labelled "
                "samples; use daskem.GaussianMixture for an unsupervised fit"
            )
        if len(classes) < 2:
            raise ValueError(
                f"y labels only one class ({classes[0]!r}): a classifier needs labelled "
                "samples of at least 2 classes"
            )

    def _layout(self, classes: np.ndarray) -> np.ndarray:
        """The class index of each component, from n_components and components_per_class."""
        C = len(classes)
        cpc = self.components_per_class
        if cpc is None:
            counts = np.ones(C, dtype=np.int64)
        elif isinstance(cpc, Mapping):
            counts = np.ones(C, dtype=np.int64)
            known = {c.item() if isinstance(c, np.generic) else c: i for i, c in enumerate(classes)}
            for c, n in cpc.items():
                key = c.item() if isinstance(c, np.generic) else c
                if key not in known:
                    raise ValueError(
                        f"components_per_class names class {c!r}, which is not among the "
                        f"labelled classes {list(known)}"
                    )
                if not isinstance(n, numbers.Integral) or n < 1:
                    raise ValueError(
                        f"components_per_class[{c!r}] must be an integer >= 1, got {n!r}"
                    )
                counts[known[key]] = int(n)
        elif isinstance(cpc, numbers.Integral) and not isinstance(cpc, bool) and cpc >= 1:
            counts = np.full(C, int(cpc), dtype=np.int64)
        else:
            raise ValueError(
                "components_per_class must be an integer >= 1 or a mapping from class to "
                f"an integer >= 1, got {cpc!r}"
            )
        total = int(counts.sum())
        K = total if self.n_components is None else int(self.n_components)
        if K < C:
            warnings.warn(
                f"n_components={K} is smaller than the number of classes ({C}): fitting "
                f"{max(C, total)} components, at least one per class",
                UserWarning,
                stacklevel=4,
            )
            K = max(C, total)
        if K < total:
            raise ValueError(
                f"components_per_class asks for {total} components but n_components={K}"
            )
        # one per class first, then each class's further components, then the rest in turn
        layout = list(range(C))
        for c in range(C):
            layout += [c] * (int(counts[c]) - 1)
        layout += [i % C for i in range(K - total)]
        return np.asarray(layout, dtype=np.int64)

    def _setup_labels(self, data):
        self._check_classifier_options()
        Xl, yl = self._labelled_rows(data)
        if getattr(self, "_classes_from_data", False):
            classes = np.unique(yl)
            self._check_classes(classes)
            if not np.array_equal(classes, np.arange(len(classes))):
                data = engine.relabel(data, classes)
                yl = np.searchsorted(classes, yl)
            self.classes_ = classes
        component_class = self._layout(self.classes_)
        return data, (Xl, yl), component_class

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
    ) -> GaussianMixtureClassifier:
        """Fit the mixture by semi-supervised EM.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            The class of each labelled sample (any integers or strings) and ``-1`` for
            unlabelled samples. A Dask array must hold integers.
        sample_weight : array-like of shape (n_samples,), optional
        checkpoint_dir, resume, callback
            As in :meth:`GaussianMixture.fit`.

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
