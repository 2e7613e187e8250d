"""The estimator machinery shared by every model: fitting, restarts, checkpoints, rows.

:class:`EMEstimator` is a scikit-learn ``BaseEstimator`` that fits any model of
:mod:`daskem.model` (an object with the :class:`daskem.model.base.EMModel` interface)
on NumPy or Dask arrays of shape (n_samples, n_features), with one pass over the data
per EM iteration (:mod:`daskem.engine`): restarts (``n_init``) from one shared sample,
screening of restarts on that sample, a prefit on it, shared passes for the restarts
left, checkpoints after every iteration and exact resumption, and row-wise prediction
of NumPy or Dask input. A model's estimator subclasses it and supplies:

* ``_model()`` -- the model object for the estimator's options;
* ``_initial_params(data, seed, labelled, sample)`` -- a start, from the shared sample;
* ``_set_params(params)`` / ``_fitted_params(component_class=None)`` -- fitted
  parameters to scikit-learn attributes and back;
* ``_check_parameters(n_features, K)`` -- validation of its own options (calling
  :meth:`EMEstimator._check_common` for the shared ones);
* optionally ``_fingerprint_extra()``, ``_user_init_complete()``, ``_setup_labels`` and
  ``_fixed_start`` (semi-supervised fits), and for model files
  ``_fitted_to_dict()`` / ``_fitted_from_dict()`` and the class attribute ``kind``.

Its constructor parameters used here: ``n_components``, ``tol``, ``max_iter``,
``n_init``, ``random_state``, ``warm_start``, ``verbose``, ``verbose_interval``,
``chunk_size``, ``split_every``, ``init_sample_size``, ``cache``, ``prefit``,
``select_after`` and ``nan_policy``.

This module builds no Dask graph itself (it calls :mod:`daskem.engine`) and does not
know xarray.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from . import engine
from .modelfile import ModelFileError, load_checkpoint, save_checkpoint

__all__ = [
    "NAN_POLICIES",
    "ClassLabelsMixin",
    "ConvergenceWarning",
    "EMEstimator",
    "select_n_components",
]

logger = logging.getLogger("daskem")

_LABEL_CHECK: contextvars.ContextVar[Callable[[engine.LabelSummary], Any] | None] = (
    contextvars.ContextVar("daskem_label_check", default=None)
)


@contextlib.contextmanager
def checking_labels(check: Callable[[engine.LabelSummary], Any]) -> Iterator[None]:
    """Within this context, fits call ``check(summary)`` with the summary of their labels
    from the pass before EM (:class:`daskem.engine.LabelSummary`), before anything else
    looks at them: a caller that knows more about the labels than the estimator (their
    source, class names, the valid ids) refuses bad labels without a pass of its own.
    ``check`` raises ``ValueError`` to refuse them."""
    token = _LABEL_CHECK.set(check)
    try:
        yield
    finally:
        _LABEL_CHECK.reset(token)


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


# ---- row-wise kernels used lazily on Dask blocks (module level so they pickle); ----
# ---- ``state`` is (model, params)                                                ----


def _rows_score(state, X: np.ndarray) -> np.ndarray:
    model, params = state
    return model.log_density(params, X)


def _rows_proba(state, X: np.ndarray) -> np.ndarray:
    model, params = state
    wlp = model.weighted_log_prob(params, X)
    with np.errstate(under="ignore", invalid="ignore"):
        return np.exp(wlp - _logsumexp_rows(wlp)[:, None])


def _rows_class_posterior(state, X: np.ndarray) -> np.ndarray:
    model, params, n_classes = state
    proba, logd = model.class_posterior(params, X, n_classes)
    return np.concatenate([proba, logd[:, None]], axis=1)


def _count(result: engine.EMResult, name: str) -> int:
    """A row count of the statistics of the last pass (0 if the model keeps none)."""
    if result.stats is not None:
        return int(getattr(result.stats, name, 0))
    return int(getattr(result, name, 0))


def _n_excluded(result: engine.EMResult) -> int:
    return _count(result, "n_excluded")


def _n_partial(result: engine.EMResult) -> int:
    return _count(result, "n_partial")


def _n_empty(result: engine.EMResult) -> int:
    return _count(result, "n_empty")


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` (1-D) padded with zeros to length ``n``."""
    a = np.asarray(a)
    return a if len(a) >= n else np.concatenate([a, np.zeros(n - len(a), a.dtype)])


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


#: How rows with non-finite values are treated when fitting: refused, left out, or used
#: through their observed attributes (EM with missing data, :mod:`daskem.model.missing`).
NAN_POLICIES = ("raise", "omit", "marginalize")
PREFIT_MIN_ROWS = 5_000  # smallest coarse stage of the prefit


def _store_params(estimator: Any, params: dict[str, Any]) -> None:
    """Store ``__init__``'s arguments unchanged, as scikit-learn's contract asks."""
    for name, value in params.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


class EMEstimator(BaseEstimator):
    """Fitting and prediction machinery shared by every model (see the module docstring)."""

    #: the model kind, as model files and ``daskem fit --method`` name it
    kind: str = ""
    #: a fitted attribute: present once fitted (or loaded)
    _fitted_marker = "lower_bound_"
    #: the ``nan_policy`` values the model supports ("marginalize" needs EM with missing
    #: data in its kernel)
    nan_policies: tuple[str, ...] = ("raise", "omit")
    # the layout of the fit in progress (set by ``_fit``): number of components and the
    # class of each (None: unsupervised, ``n_components`` components)
    _n_comp: int | None = None
    #: rows ``fit`` needs at least (a model whose rows are sequences needs one)
    _min_fit_rows = 2
    #: the shape of a row's labels (``()``: one class id per row; a sequence model's
    #: rows have one per date)
    _label_tail: tuple[int, ...] = ()
    _component_class: np.ndarray | None = None

    # ------------------------------------------------------------------ hooks

    def _model(self) -> Any:
        raise NotImplementedError

    def _row_model(self) -> Any:
        """The model fitted on rows of an in-memory sample (prefit); a model whose pixels
        see their neighbours gives its pixel-wise version."""
        return self._model()

    def _initial_params(self, data, seed: int, labelled=None, sample=None) -> Any:
        raise NotImplementedError

    def _set_params(self, params: Any) -> None:
        raise NotImplementedError

    def _fitted_params(self, component_class=None) -> Any:
        raise NotImplementedError

    @property
    def excluded_counts_(self) -> dict[str, int]:
        """Rows by what was missing, from the statistics of the last pass.

        ``all_missing``: nothing observed (always left out); ``partially_missing``: some
        attribute missing (fitted through the observed ones under ``"marginalize"``,
        left out under ``"omit"``); ``total``: rows left out of the fit.
        """
        partial = (
            self.n_partial_
            if self.nan_policy == "marginalize"
            else (self.n_excluded_ - self.n_empty_)
        )
        return {
            "all_missing": int(self.n_empty_),
            "partially_missing": int(partial),
            "total": int(self.n_excluded_),
        }

    def _set_names(self, feature_names: Any, class_names: Any) -> None:
        """``feature_names_in_`` and ``class_names_`` from ``fit``'s arguments, checked."""
        if feature_names is not None:
            names = np.asarray([str(f) for f in feature_names], dtype=object)
            if names.shape != (self.n_features_in_,):
                raise ValueError(
                    f"feature_names has {len(names)} names for {self.n_features_in_} features"
                )
            self.feature_names_in_ = names
            self._names_declared = True
        if class_names is not None:
            names = [str(c) for c in class_names]
            if len(names) != self.n_classes_:
                raise ValueError(
                    f"the model has {self.n_classes_} classes but {len(names)} class names "
                    f"were given: {names}"
                )
            self.class_names_ = names

    def _summary(self) -> tuple[str, list[str]]:
        """For ``daskem inspect``: the model's main options in one line, and lines
        describing its components."""
        names = list(getattr(self, "class_names_", []))
        lines = ["components (class):"]
        for k, c in enumerate(np.asarray(self.component_classes_)):
            lines.append(f"  {k}: {names[int(c)] if names else int(c)}")
        return "", lines

    def _n_components_fitted(self) -> int:
        return len(self.component_classes_)

    def _check_common(self) -> None:
        """The shared constructor parameters."""
        for name, lo in (("tol", 0.0),):
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
        self._check_nan_policy()
        sa = self.select_after
        if not (sa is None or sa == "auto" or (isinstance(sa, numbers.Integral) and sa >= 1)):
            raise ValueError(f"select_after must be an integer >= 1, None or 'auto', got {sa!r}")

    def _result_to_json(self, r: engine.EMResult) -> dict[str, Any]:
        return {
            "params": self._model().params_to_dict(r.params),
            "lower_bound": float(r.lower_bound),
            "lower_bounds": [float(v) for v in r.lower_bounds],
            "n_iter": int(r.n_iter),
            "converged": bool(r.converged),
            "stopped": bool(r.stopped),
            "events": [
                {k: (float(v) if k == "mass" else v) for k, v in e.items()} for e in r.events
            ],
            "n_excluded": _n_excluded(r),
            "n_partial": _n_partial(r),
            "n_empty": _n_empty(r),
        }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = self.nan_policy != "raise"
        return tags

    def _validate_X(self, X: Any, *, for_fit: bool, allow_missing: bool = False) -> Any:
        """``X`` checked and converted to a float NumPy or Dask array.

        NumPy-like input goes through scikit-learn's ``validate_data`` (dtype, shape,
        sparse, finiteness, ``n_features_in_`` and ``feature_names_in_``); Dask input is
        checked for shape and dtype only, without computing anything.
        """
        if not for_fit:
            self._check_fitted()
        # names declared by fit(feature_names=...) (a stack's variables) or a model file
        # name the attributes, not DataFrame columns: arrays without names are fine
        hidden = None
        if not for_fit and getattr(self, "_names_declared", False) and not hasattr(X, "columns"):
            hidden = self.__dict__.pop("feature_names_in_", None)
        try:
            return self._validate_X_inner(X, for_fit=for_fit, allow_missing=allow_missing)
        finally:
            if hidden is not None:
                self.feature_names_in_ = hidden

    def _validate_X_inner(self, X: Any, *, for_fit: bool, allow_missing: bool) -> Any:
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
                ensure_min_samples=self._min_fit_rows if for_fit else 1,
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
            want = (n, *self._label_tail)
            if yy.shape != want:
                raise ValueError(f"y must have shape {want} to match X, got {yy.shape}")
            if not np.issubdtype(yy.dtype, np.integer):
                raise ValueError(f"y must hold integer class ids (-1 = unlabelled), got {yy.dtype}")
            y = yy
        cs = self.chunk_size
        if not (cs == "auto" or (isinstance(cs, numbers.Integral) and cs >= 1)):
            raise ValueError(f"chunk_size must be an integer >= 1 or 'auto', got {cs!r}")
        return engine.as_chunked(X, sample_weight, y, chunk_size=cs)

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_marker):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' first."
            )

    def _check_nan_policy(self) -> None:
        if self.nan_policy not in self.nan_policies:
            raise ValueError(
                f"nan_policy must be one of {self.nan_policies} for a {type(self).__name__}, "
                f"got {self.nan_policy!r}"
            )

    def _setup_labels(
        self, data: engine.ChunkedData, summary: engine.LabelSummary | None = None
    ) -> tuple[engine.ChunkedData, tuple | None, np.ndarray | None]:
        """Data with class ids, the labelled sample ``(X, y, weight)`` and each
        component's class, from the preparatory pass's label ``summary``.

        The unsupervised mixture has none of these; the classifier overrides this.
        """
        return data, None, None

    def _label_rule(self) -> str | None:
        """Which labelled rows the labelled sample may hold (:func:`engine.prepare`)."""
        return "any" if self.nan_policy == "marginalize" else "all"

    def _fixed_start(self, component_class: np.ndarray | None) -> bool:
        """Whether every restart would get the same start (so one is enough)."""
        return False

    def _labelled_rows(
        self, summary: engine.LabelSummary
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labelled sample ``(X, y, weight)`` of the summary, validated.

        Every labelled row of a class is in the sample up to
        :data:`engine.LABEL_SAMPLE_PER_CLASS`, beyond that a random sample whose rows
        stand for ``weight`` labelled rows each.
        """
        if int(summary.y_min) < -1:
            raise ValueError(
                f"y holds {int(summary.y_min)}: use -1 for unlabelled and ids >= 0 for classes"
            )
        counts = np.asarray(summary.counts)
        if self.nan_policy == "raise" and int(summary.complete.sum()) < int(summary.n_rows):
            raise ValueError(
                "Some labelled rows of X contain non-finite values; use "
                "nan_policy='marginalize' or 'omit'"
            )
        usable = summary.observed if self.nan_policy == "marginalize" else summary.complete
        if int(counts.sum()) and not int(usable.sum()) and self.nan_policy == "marginalize":
            raise ValueError("Every labelled row of X has every attribute missing")
        lost = [int(c) for c in np.flatnonzero((counts > 0) & (_pad(usable, len(counts)) == 0))]
        if lost:
            marginalize = self.nan_policy == "marginalize"
            where = "with nothing observed" if marginalize else "with missing values"
            raise ValueError(
                f"Every label of class(es) {lost} is on a row {where} (masked pixels): "
                "label valid pixels"
            )
        Xl, yl, wl = summary.X, np.asarray(summary.y), np.asarray(summary.weight, np.float64)
        if self.nan_policy == "marginalize":
            Xl = _fill_by_class(Xl, yl)
        return np.asarray(Xl, dtype=np.float64), yl, wl

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

    def _initialise(self, data, seeds, labelled, sample) -> list[Any]:
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

    def _screen(self, candidates: list[Any], sample, n_total: int = 1, labelled=None) -> list[bool]:
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
        model = self._model()
        ll = np.stack([model.log_density(p, Xs) for p in candidates])
        mean = ll @ w
        share, lab = 1.0, np.zeros(len(candidates))
        if labelled is not None and len(labelled[0]):
            Xl, yl, wl = labelled
            # the labelled sample stands for sum(wl) labelled rows
            lw = float(getattr(self, "label_weight", 1.0)) * float(wl.sum())
            share = n_total / (n_total + lw)
            lab = np.array([model.log_density(p, Xl, yl) @ wl / wl.sum() for p in candidates])
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
        """Whether the user gave every initial parameter (no sample is then drawn)."""
        return False

    def _use_prefit(self, n_samples: int) -> bool:
        if self.prefit == "auto":
            return n_samples > 2 * self.init_sample_size
        return bool(self.prefit)

    def _prefit_tol(self, n_rows: int) -> float:
        """The prefit's tolerance on a sample of ``n_rows`` rows (the objective is a mean
        per row: a tenth of ``tol``)."""
        return 0.1 * float(self.tol)

    def _check_n_samples(self, n: int, K: int) -> None:
        """Refuse data with too few rows for ``K`` components."""
        if n < K:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = {K}, n_samples = {n}"
            )

    def _prefit(self, params: Any, Xs, ws, labelled) -> Any:
        """EM to convergence on the in-memory sample (no pass over the full data).

        Starting the full passes near the optimum saves most of them; the full passes
        then run plain EM from there, so the final model is a plain-EM fixed point.
        """
        model = self._row_model()
        logger.info(
            "prefit: EM on the %d sampled rows before the passes over all the data", len(Xs)
        )
        iterations = []
        # coarse to fine: most iterations on every 16th, then every 4th sampled row, so
        # the last stage on the whole sample starts close to its optimum
        for stride in (16, 4, 1):
            if stride > 1 and len(Xs) // stride < max(PREFIT_MIN_ROWS, 50 * self._n_comp):
                continue
            Xt, wt, yt = Xs[::stride], None if ws is None else ws[::stride], None
            if labelled is not None and labelled[0].shape[0]:  # the labelled sample, always
                Xl, yl, wl = labelled
                yt = np.concatenate([np.full((len(Xt), *np.shape(yl)[1:]), -1), yl])
                if wt is not None or (wl != 1.0).any():
                    wt = np.concatenate([np.ones(len(Xt)) if wt is None else wt, wl])
                Xt = np.concatenate([Xt, Xl])
            result = engine.fit_em_local(
                model,
                Xt,
                params,
                wt,
                yt,
                tol=self._prefit_tol(len(Xt)),
                max_iter=500,
                accelerate=True,
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

    def _prepare_pass(
        self, data: engine.ChunkedData, seed: int, with_sample: bool
    ) -> tuple[engine.ChunkedData, tuple | None, np.ndarray | None, tuple | None]:
        """The one pass over the data before EM (:func:`engine.prepare`): fills the
        cache, draws the start's sample (one sample serves every restart) and
        summarises the labels. Returns the (cached, relabelled) data, the labelled
        sample, each component's class and the sample."""
        what = []
        if with_sample:
            n = min(self.init_sample_size, data.n_samples)
            what.append(f"drawing {n} sampled rows for the start")
        if data.labels is not None:
            what.append("summarising the labels")
        if what:
            logger.info("one pass over the data before EM: %s", ", ".join(what))
        prep = engine.prepare(
            data,
            cache=self.cache if self.max_iter > 0 else False,
            sample_size=self.init_sample_size if with_sample else 0,
            seed=seed,
            usable=self._label_rule(),
            split_every=int(self.split_every),
        )
        check = _LABEL_CHECK.get()
        if check is not None and prep.labels is not None:
            check(prep.labels)
        data, labelled, component_class = self._setup_labels(prep.data, prep.labels)
        return data, labelled, component_class, prep.sample

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
        self._check_nan_policy()  # before the pass, whose labelled sample depends on it
        data = self._prepare(X, sample_weight, y, for_fit=True)
        if data.labels is None:  # K is known: refuse bad parameters before any pass
            self._check_parameters(data.n_features, self.n_components)
            self._check_n_samples(data.n_samples, self.n_components)
        do_init = not (self.warm_start and hasattr(self, "converged_"))
        rng = _check_random_state(self.random_state)
        # one seed per initialisation, drawn up front so a resumed run draws the same ones
        n_seeds = self.n_init if do_init else 1
        seeds = [int(rng.randint(np.iinfo(np.int32).max)) for _ in range(n_seeds)]
        data, labelled, component_class, sample = self._prepare_pass(
            data, seeds[0], do_init and not self._user_init_complete()
        )
        if self.max_iter > 0:  # halos of grid blocks: their frames read once if they fit
            data = engine.keep_frames(data)
        K = self.n_components if component_class is None else len(component_class)
        self._check_parameters(data.n_features, K)
        self._check_n_samples(data.n_samples, K)
        self._n_comp, self._component_class = K, component_class
        n_classes = K if component_class is None else int(component_class.max()) + 1

        n_init = len(seeds)
        if labelled is not None and self._fixed_start(component_class):
            n_init = 1  # every restart would start from the same labelled start
            seeds = seeds[:1]
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
                    saved[init] = self._result_to_json(finished[init])
        if self.max_iter == 0:
            for init, st in starts.items():
                finished[init] = engine.EMResult(st.params, -np.inf, [], 0, False, [])
        elif starts:
            resumed = {i for i in starts if saved[i] is not None}
            starts = self._sample_stage(model, data, starts, resumed)
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
                stacklevel=3 + getattr(self, "_extra_frames", 0),
            )
        self._store_result(best, data.n_features, K, component_class, n_classes)
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=3 + getattr(self, "_extra_frames", 0),
            )
        return data

    def _sample_stage(
        self,
        model: Any,
        data: engine.ChunkedData,
        starts: dict[int, engine.Start],
        resumed: set[int],
    ) -> dict[int, engine.Start]:
        """The starts of the passes over all the data, from ``starts`` (``resumed``: those
        restored from a checkpoint). A model may first run EM from them on a sample of
        the data's blocks (the spatial prior's ``beta``, :mod:`daskem.hmrf`); none here."""
        return starts

    def _store_result(self, best, n_features, K, component_class, n_classes) -> None:
        """The fitted attributes from the result of EM."""
        self._set_params(best.params)
        self.converged_ = bool(best.converged)
        self.n_iter_ = int(best.n_iter)
        self.lower_bound_ = float(best.lower_bound)
        self.lower_bounds_ = np.asarray(best.lower_bounds, dtype=np.float64)
        self.reseeds_ = list(best.events)
        self.n_features_in_ = n_features
        self.n_excluded_ = _n_excluded(best)
        self.n_partial_ = _n_partial(best)
        self.n_empty_ = _n_empty(best)
        self.component_classes_ = (
            np.arange(K) if component_class is None else np.asarray(component_class)
        )
        self.n_classes_ = n_classes

    def _fingerprint(self, data: engine.ChunkedData) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        rs = self.random_state
        return {
            "n_samples": data.n_samples,
            "n_features": data.n_features,
            "n_components": int(self._n_comp),
            "tol": float(self.tol),
            "max_iter": int(self.max_iter),
            "n_init": int(self.n_init),
            "random_state": int(rs) if isinstance(rs, numbers.Integral) else None,
            "labelled": data.labels is not None,
            "weighted": data.sample_weight is not None,
            "select_after": self._select_after(data.n_samples),
            "component_classes": None
            if self._component_class is None
            else [int(c) for c in self._component_class],
            "nan_policy": self.nan_policy,
            **self._fingerprint_extra(),
        }

    def _fingerprint_extra(self) -> dict[str, Any]:
        """Model options that must match for a checkpoint to be resumed."""
        return {}

    def _read_checkpoint(self, directory: Any, fingerprint: dict) -> dict | None:
        ckpt = load_checkpoint(directory)
        if ckpt is None:
            return None
        old = ckpt.get("fingerprint", {})
        # every key of either side: an option recorded only when set (so that checkpoints
        # of earlier versions still resume) must not be dropped by the resuming fit either
        diff = sorted(k for k in {*fingerprint, *old} if old.get(k) != fingerprint.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff)
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
                states[init] = self._result_to_json(current)
                save_checkpoint(checkpoint_dir, {"fingerprint": fingerprint, "candidates": states})
            if verbose_cb is not None:
                verbose_cb(info)
            if user_cb is not None:
                user_cb(info)

        return cb

    def _result_from_json(self, d: dict) -> engine.EMResult:
        res = engine.EMResult(
            self._model().params_from_dict(d["params"]),
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

    def _rows(self, func, X: Any, n_out: int | None, dtype, allow_missing: bool = False, extra=()):
        """``func((model, params, *extra), block)`` over the rows of NumPy or Dask ``X``."""
        data_X = self._validate_X(X, for_fit=False, allow_missing=allow_missing)
        params = (self._model(), self._fitted_params(), *extra)
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
            _rows_class_posterior,
            X,
            self.n_classes_ + 1,
            np.float64,
            allow_missing=True,
            extra=(int(self.n_classes_),),
        )
        return both[:, :-1], both[:, -1]

    def score_samples(self, X: Any):
        """Log-likelihood ``log p(x)`` of each sample, shape (n_samples,)."""
        return self._rows(_rows_score, X, None, np.float64)

    def component_proba(self, X: Any):
        """Posterior probability of each component, shape (n_samples, n_components)."""
        self._check_fitted()
        return self._rows(_rows_proba, X, int(self._n_components_fitted()), np.float64)

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
        return int(self._model().n_parameters(self._fitted_params()))

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Mean (weighted) log-likelihood per sample of ``X``; ``y`` is ignored."""
        return self._mean_log_likelihood(X, sample_weight)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        n = np.shape(X)[0] if not isinstance(X, da.Array) else X.shape[0]
        return -2 * self._mean_log_likelihood(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        n = np.shape(X)[0] if not isinstance(X, da.Array) else X.shape[0]
        return -2 * self._mean_log_likelihood(X) * n + 2 * self._n_parameters()


class ClassLabelsMixin:
    """Class ids from ``y`` and the class of every component, for semi-supervised
    estimators (``classes_``; the options ``n_components`` and ``components_per_class``).
    """

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


def select_n_components(
    make: Any,
    X: Any,
    ks: Any,
    y: Any = None,
    *,
    criterion: str = "bic",
    callback: Any = None,
) -> dict[str, Any]:
    """Fit a model for every number of components in ``ks``, sharing every pass over
    the data, and pick one by an information criterion.

    ``make(K)`` returns an unfitted estimator (e.g. ``lambda k: GaussianMixture(k)``);
    all of them must have the same options but ``n_components``. With ``y`` (class ids,
    -1 unlabelled) they are semi-supervised classifiers: K counts components, at least
    one per class, the further ones given to the classes in turn. One random sample
    serves every start (and its prefit); the passes evaluate every K still running on
    each chunk while it is in memory (:func:`daskem.engine.fit_em_many`), so the number
    of passes is that of the slowest K, not the sum.

    Returns
    -------
    dict
        ``models`` (fitted estimators, by K), ``ks``, the criterion's ``values`` (lower
        is better), ``log_likelihood`` (total), ``n_parameters``, ``n`` (rows used),
        ``best`` (the K with the lowest value) and ``passes`` over the data.
    """
    if criterion not in ("bic", "aic"):
        raise ValueError(f"criterion must be 'bic' or 'aic', got {criterion!r}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"the numbers of components must be integers >= 1, got {ks}")
    models = {k: make(k) for k in ks}
    first = models[ks[0]]
    layouts: dict[int, Any] = dict.fromkeys(ks)
    seed = int(_check_random_state(first.random_state).randint(np.iinfo(np.int32).max))
    if y is not None:
        y = first._encode_y(y) if not isinstance(y, da.Array) else y
        data = first._prepare(X, None, y, for_fit=True)
    else:
        data = first._prepare(X, None, None, for_fit=True)
        for k, est in models.items():  # refused before any pass
            est._check_parameters(data.n_features, k)
            est._check_n_samples(data.n_samples, k)
    # one pass: the cache, the sample every start is drawn from, the labels' summary
    first._classes_from_data = isinstance(y, da.Array)
    try:
        data, labelled, _, sample = first._prepare_pass(data, seed, True)
    finally:
        first.__dict__.pop("_classes_from_data", None)
    if y is not None:
        C = len(first.classes_)
        if ks[0] < C:
            raise ValueError(
                f"K = {ks[0]} is smaller than the number of classes ({C}): every class "
                "needs a component"
            )
        for k, est in models.items():
            est.classes_ = first.classes_
            layouts[k] = est._layout(first.classes_)
    for k, est in models.items():
        est._check_parameters(data.n_features, k)
        est._check_n_samples(data.n_samples, k)
    starts = []
    for k in ks:
        est = models[k]
        est._n_comp, est._component_class = k, layouts[k]
        starts.append(engine.Start(est._initial_params(data, seed, labelled, sample)))
    results = engine.fit_em_many(
        first._model(),
        data,
        starts,
        tol=float(first.tol),
        max_iter=int(first.max_iter),
        split_every=int(first.split_every),
        callback=callback,
    )
    values, lls, n_params, ns = [], [], [], []
    for k, res in zip(ks, results, strict=True):
        est = models[k]
        cc = layouts[k]
        est._store_result(res, data.n_features, k, cc, k if cc is None else int(cc.max()) + 1)
        stats = res.stats
        n = int(getattr(stats, "count", data.n_samples))
        weight = float(getattr(stats, "weight", n)) or float(n)
        total = float(res.lower_bound) * weight
        p = int(est._n_parameters())
        penalty = p * np.log(max(n, 1)) if criterion == "bic" else 2.0 * p
        values.append(-2.0 * total + penalty)
        lls.append(total)
        n_params.append(p)
        ns.append(n)
    best = ks[int(np.argmin(values))]
    return {
        "ks": ks,
        "criterion": criterion,
        "values": values,
        "log_likelihood": lls,
        "n_parameters": n_params,
        "n": ns,
        "best": best,
        "passes": max(int(r.n_iter) for r in results),
        "n_iter": [int(r.n_iter) for r in results],
        "converged": [bool(r.converged) for r in results],
        "models": models,
    }
