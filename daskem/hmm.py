"""Hidden Markov models over many sequences: :class:`GaussianHMM`, fitted out of core.

The estimator has hmmlearn's (0.3.x) names and semantics -- ``fit(X, lengths)`` on
concatenated sequences, ``startprob_``, ``transmat_``, ``means_``, ``covars_``,
``monitor_``, ``score``, ``score_samples``, ``predict``, ``predict_proba``, ``decode``,
``sample`` -- so a script can switch by changing its import. It also takes sequences as
a 3-D array ``(n_sequences, n_times, n_features)`` (NumPy or Dask), which is what a time
stack gives (every pixel one sequence, :func:`daskem.io.fit_stack`); then every EM
iteration is one pass over the chunks (:mod:`daskem.engine`), with the restarts,
screening, prefit on a sample, checkpoints and model files every daskem estimator has.
Missing values (NaN) are allowed: a date with nothing observed has no emission term, a
partly observed date uses the marginal Gaussian.

Differences from hmmlearn, all on purpose:

* ``init_params`` starts are drawn from a sample of the sequences (``init_sample_size``):
  means by k-means on its dates, covariances from their covariance (plus ``min_covar``)
  as hmmlearn does, and -- instead of hmmlearn's random Dirichlet draws --
  ``startprob_`` and ``transmat_`` from the k-means labels of the sampled sequences
  (counts plus one), which starts EM near persistent states, as time stacks have.
* ``implementation`` is accepted for compatibility; both values run the same scaled
  forward-backward, vectorised over sequences (they agree to rounding).
* ``n_init`` restarts, ``nan_policy``, ``chunk_size`` and the other daskem options.

This module builds no Dask graph itself (it calls :mod:`daskem.engine`).
"""

from __future__ import annotations

import numbers
import sys
from collections import deque
from typing import Any

import dask.array as da
import numpy as np
from sklearn.base import ClassifierMixin

from . import engine
from .base import ClassLabelsMixin, EMEstimator, _check_random_state, _store_params
from .model.hmm import COVARIANCE_TYPES, HMMModel, HMMParams
from .model.hmm import n_parameters as hmm_n_parameters
from .model.init import _sq_dist, kmeans, kmeans_plusplus
from .modelfile import register_estimator

__all__ = ["ConvergenceMonitor", "GaussianHMM", "GaussianHMMClassifier"]

_ATTRS = {"s": "startprob_", "t": "transmat_", "m": "means_", "c": "_covars_"}


class ConvergenceMonitor:
    """The log-likelihood of every EM iteration, as hmmlearn's ``monitor_`` has it.

    Attributes
    ----------
    history : deque of float
        Total log-likelihood of the data at the start of every iteration.
    iter : int
        Iterations done.
    converged : bool
        hmmlearn's test: ``iter == n_iter`` or the last gain is below ``tol``.
    """

    def __init__(self, tol: float, n_iter: int, verbose: bool) -> None:
        self.tol = tol
        self.n_iter = n_iter
        self.verbose = verbose
        self.history: deque[float] = deque()
        self.iter = 0

    def __repr__(self) -> str:
        return (
            f"ConvergenceMonitor(history={list(self.history)!r}, iter={self.iter}, "
            f"n_iter={self.n_iter}, tol={self.tol}, verbose={self.verbose})"
        )

    @property
    def converged(self) -> bool:
        return self.iter == self.n_iter or (
            len(self.history) >= 2 and self.history[-1] - self.history[-2] < self.tol
        )


def _distribute_covariance(cv: np.ndarray, covariance_type: str, K: int) -> np.ndarray:
    """One covariance matrix as every state's covariance, in hmmlearn's layout."""
    if covariance_type == "spherical":
        return np.full(K, float(np.mean(np.diag(cv))))
    if covariance_type == "diag":
        return np.tile(np.diag(cv), (K, 1))
    if covariance_type == "tied":
        return cv.copy()
    return np.tile(cv, (K, 1, 1))


def _check_covars(covars: np.ndarray, covariance_type: str, K: int, D: int) -> np.ndarray:
    shape = {"spherical": (K,), "diag": (K, D), "full": (K, D, D), "tied": (D, D)}[covariance_type]
    c = np.asarray(covars, dtype=np.float64)
    if covariance_type == "spherical" and c.shape == (K, D):  # hmmlearn's tiled form
        c = c[:, 0]
    if covariance_type == "tied" and c.shape == (K, D, D):  # hmmlearn's covars_ of tied
        c = c[0]
    if c.shape != shape:
        raise ValueError(
            f"covars for covariance_type={covariance_type!r} must have shape {shape}, got {c.shape}"
        )
    if not np.all(np.isfinite(c)):
        raise ValueError("covars must be finite")
    mats = c if covariance_type == "full" else c[None] if covariance_type == "tied" else None
    if mats is None:
        if np.any(c <= 0):
            raise ValueError(f"{covariance_type!r} covars must be positive")
    else:
        for m in mats:
            if not np.allclose(m, m.T) or np.any(np.linalg.eigvalsh(m) <= 0):
                raise ValueError(f"{covariance_type!r} covars must be symmetric, positive-definite")
    return c


def _rows_log_density(state, X: np.ndarray) -> np.ndarray:
    model, params = state
    return model.log_density(params, X)


def _rows_posterior(state, X: np.ndarray) -> np.ndarray:
    """Per sequence: ``p(z_t = k | x)`` (T*K), the Viterbi path (T) and ``log p(x)``."""
    model, params = state
    gamma, ll = model.posterior(params, X)
    path, _ = model.decode(params, X)
    n = X.shape[0]
    return np.concatenate([gamma.reshape(n, -1), path.astype(np.float64), ll[:, None]], axis=1)


@register_estimator
class GaussianHMM(EMEstimator):
    """Hidden Markov model with Gaussian emissions, fitted by EM over many sequences.

    Parameters
    ----------
    n_components : int
        Number of states.
    covariance_type : {"spherical", "diag", "full", "tied"}
        As in hmmlearn: one variance per state, a diagonal per state, a full matrix per
        state, or one full matrix shared by the states.
    min_covar : float
        Added to the diagonal of the starting covariance (hmmlearn's use).
    startprob_prior, transmat_prior : float or array
        Dirichlet priors of ``startprob_`` (K,) and of every row of ``transmat_`` (K, K).
    means_prior, means_weight : float or array
        Normal prior of ``means_`` (mean and its weight, (K, D) or broadcastable).
    covars_prior, covars_weight : float or array
        Inverse-gamma (``spherical``, ``diag``) or inverse-Wishart (``full``, ``tied``)
        prior of ``covars_``.
    algorithm : {"viterbi", "map"}
        The decoder of :meth:`predict` and :meth:`decode`.
    random_state : int, RandomState or None
    n_iter : int
        Maximum number of EM iterations (passes over the data).
    tol : float
        EM stops when the gain of the total log-likelihood is below ``tol``.
    verbose : bool
        Print every iteration's log-likelihood and gain to stderr (hmmlearn's format).
    params, init_params : str
        Which parameters EM updates (``params``) and which are set from the data before
        fitting (``init_params``): any of ``"s"`` (startprob), ``"t"`` (transmat), ``"m"``
        (means), ``"c"`` (covars). Parameters not in ``init_params`` must be set as
        attributes before :meth:`fit`.
    implementation : {"log", "scaling"}
        Accepted for compatibility (both run the same scaled forward-backward).
    n_init : int
        Restarts from different k-means seeds; the best on the data is kept.
    chunk_size, split_every, init_sample_size, cache, prefit, select_after
        As for :class:`daskem.GaussianMixture` (``chunk_size`` and ``init_sample_size``
        count sequences).
    nan_policy : {"marginalize", "raise"}
        Missing values (NaN) are modelled (``"marginalize"``: missing dates have no
        emission term, partly observed dates use the marginal Gaussian) or refused.

    Attributes
    ----------
    startprob_ : ndarray (n_components,)
    transmat_ : ndarray (n_components, n_components)
    means_ : ndarray (n_components, n_features)
    covars_ : ndarray (n_components, n_features, n_features)
        Full matrices for every covariance type, as hmmlearn returns them.
    monitor_ : ConvergenceMonitor
    n_features : int
    converged_, n_iter_, lower_bound_, lower_bounds_
        daskem's record of the fit (``lower_bound_``: the last total log-likelihood).
    """

    kind = "hmm"
    _fitted_marker = "means_"
    nan_policies = ("marginalize", "raise")
    #: fit/predict take sequences (n_sequences, n_times, n_features); io passes them so
    sequence_input = True
    warm_start = False
    verbose_interval = 1
    _min_fit_rows = 1

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: str = "diag",
        min_covar: float = 1e-3,
        startprob_prior: Any = 1.0,
        transmat_prior: Any = 1.0,
        means_prior: Any = 0,
        means_weight: Any = 0,
        covars_prior: Any = 1e-2,
        covars_weight: Any = 1,
        algorithm: str = "viterbi",
        random_state: Any = None,
        n_iter: int = 10,
        tol: float = 1e-2,
        verbose: bool = False,
        params: str = "stmc",
        init_params: str = "stmc",
        implementation: str = "log",
        *,
        n_init: int = 1,
        chunk_size: int | str = "auto",
        split_every: int = 16,
        init_sample_size: int = 20_000,
        cache: bool | str = "auto",
        prefit: bool | str = "auto",
        select_after: int | str | None = "auto",
        nan_policy: str = "marginalize",
    ) -> None:
        _store_params(self, locals())

    # ------------------------------------------------------------------ options

    @property
    def max_iter(self) -> int:
        """hmmlearn's ``n_iter`` under the name the daskem machinery uses."""
        return self.n_iter

    def _check_parameters(self, n_features: int, K: int | None = None) -> None:
        K = self.n_components if K is None else K
        if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {K!r}")
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(
                f"covariance_type must be one of {COVARIANCE_TYPES}, got {self.covariance_type!r}"
            )
        if self.algorithm not in ("viterbi", "map"):
            raise ValueError(f"algorithm must be 'viterbi' or 'map', got {self.algorithm!r}")
        if self.implementation not in ("log", "scaling"):
            raise ValueError(
                f"implementation must be 'log' or 'scaling', got {self.implementation!r}"
            )
        for name in ("params", "init_params"):
            v = getattr(self, name)
            if not isinstance(v, str) or set(v) - set("stmc"):
                raise ValueError(f"{name} must be a string of the letters 's', 't', 'm', 'c'")
        if not isinstance(self.min_covar, numbers.Real) or self.min_covar < 0:
            raise ValueError(f"min_covar must be a number >= 0, got {self.min_covar!r}")
        self._check_common()

    def _model(self, n_times: int | None = None, variable_length: bool | None = None) -> HMMModel:
        T, D, var = getattr(self, "_seq_layout", (1, getattr(self, "n_features", 1), False))
        return HMMModel(
            T if n_times is None else n_times,
            D,
            self.covariance_type,
            variable_length=var if variable_length is None else variable_length,
            startprob_prior=self.startprob_prior,
            transmat_prior=self.transmat_prior,
            means_prior=self.means_prior,
            means_weight=self.means_weight,
            covars_prior=self.covars_prior,
            covars_weight=self.covars_weight,
            params=self.params,
        )

    def _fingerprint_extra(self) -> dict[str, Any]:
        def plain(v):
            return np.asarray(v, dtype=np.float64).tolist()

        return {
            "covariance_type": self.covariance_type,
            "params": self.params,
            "init_params": self.init_params,
            "min_covar": float(self.min_covar),
            "priors": [
                plain(getattr(self, n))
                for n in (
                    "startprob_prior",
                    "transmat_prior",
                    "means_prior",
                    "means_weight",
                    "covars_prior",
                    "covars_weight",
                )
            ],
            "sequence_layout": list(self._seq_layout),
        }

    # ------------------------------------------------------------------ sequences

    def _sequence_rows(self, X: Any, lengths: Any, *, for_fit: bool) -> tuple[Any, int, int, bool]:
        """``X`` (+ ``lengths``) as one row per sequence: ``(rows, T, D, variable_length)``."""
        if isinstance(X, da.Array) or np.ndim(X) == 3:
            if lengths is not None:
                raise ValueError(
                    "lengths is for 2-D input (concatenated sequences); 3-D input is already "
                    "(n_sequences, n_times, n_features)"
                )
            if X.ndim != 3:
                raise ValueError(
                    "Dask input must be sequences of shape (n_sequences, n_times, "
                    f"n_features), got shape {X.shape}"
                )
            if not isinstance(X, da.Array):
                X = np.asarray(X)
                if not np.issubdtype(X.dtype, np.floating):
                    X = X.astype(np.float64)
            elif X.dtype not in (np.float32, np.float64):
                X = X.astype(np.float64)
            n, T, D = (int(s) for s in X.shape)
            if n < 1 or T < 1 or D < 1:
                raise ValueError(f"X has no data: shape {X.shape}")
            rows = X.reshape(n, T * D)
            return rows, T, D, False
        X = np.asarray(X)
        if X.ndim == 1:
            raise ValueError(
                f"Expected a 2-D array (n_samples, n_features), got a 1-D array of shape "
                f"{X.shape}; reshape a single feature with X.reshape(-1, 1)"
            )
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features) or 3-D, got shape {X.shape}")
        if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise ValueError(f"X must be numeric, got dtype {X.dtype}")
        X = np.asarray(X, dtype=np.float64)
        N, D = X.shape
        if N == 0 or D == 0:
            raise ValueError(f"X has no data: shape {X.shape}")
        if lengths is None:
            lens = np.array([N])
        else:
            raw = np.asarray(lengths)
            if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
                raise ValueError(f"lengths must be a 1-D array of integers, got {lengths!r}")
            lens = raw.astype(np.int64)
            if np.any(lens < 1):
                raise ValueError("every sequence length must be >= 1")
            if int(lens.sum()) != N:
                raise ValueError(
                    f"lengths sum to {int(lens.sum())} but X has {N} samples: they must match"
                )
        T = int(lens.max())
        if np.all(lens == T):
            return X.reshape(len(lens), T * D), T, D, False
        rows = np.zeros((len(lens), 1 + T * D))
        rows[:, 0] = lens
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        for i, (s, L) in enumerate(zip(starts, lens, strict=True)):
            rows[i, 1 : 1 + L * D] = X[s : s + L].ravel()
        return rows, T, D, True

    @staticmethod
    def _tabular(X: Any) -> bool:
        return not isinstance(X, da.Array) and np.ndim(X) == 2

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        X: Any,
        lengths: Any = None,
        *,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
        feature_names: Any = None,
        class_names: Any = None,
    ) -> GaussianHMM:
        """Estimate the parameters by EM (one pass over the sequences per iteration).

        Parameters
        ----------
        X : array-like (n_samples, n_features) or (n_sequences, n_times, n_features)
            Concatenated sequences (with ``lengths``, as hmmlearn), or a 3-D NumPy or Dask
            array of equally long sequences (e.g. every pixel of a time stack). NaN marks
            missing values.
        lengths : array-like of int, optional
            Lengths of the concatenated sequences (2-D ``X``); their sum must be
            ``n_samples``. None: one sequence.
        checkpoint_dir, resume, callback, feature_names
            As in :meth:`daskem.GaussianMixture.fit`.
        class_names : sequence of str, optional
            A name for every state (``class_names_``; posterior maps use them).

        Returns
        -------
        self
        """
        rows, T, D, var = self._sequence_rows(X, lengths, for_fit=True)
        self._seq_layout = (T, D, var)
        self._check_parameters(D)
        self._check_user_params(D)
        self._fit(rows, None, None, checkpoint_dir, resume, callback)
        self._fitted(D, feature_names, class_names)
        return self

    def _fitted(self, D: int, feature_names: Any, class_names: Any) -> None:
        """After ``_fit`` on sequence rows: attributes per attribute (not per row) and
        hmmlearn's ``monitor_``."""
        self.n_features_in_ = D
        self.n_features = D
        self.__dict__.pop("feature_names_in_", None)
        monitor = ConvergenceMonitor(self.tol, self.n_iter, self.verbose)
        monitor.history.extend(float(v) for v in self.lower_bounds_)
        monitor.iter = int(self.n_iter_)
        self.monitor_ = monitor
        self._set_names(feature_names, class_names)

    def _check_user_params(self, D: int) -> None:
        """Parameters not in ``init_params`` must be set (hmmlearn's rule), with valid shapes."""
        K = self.n_components
        for code, attr in _ATTRS.items():
            if code not in self.init_params and not hasattr(self, attr):
                name = "covars_" if attr == "_covars_" else attr
                raise ValueError(
                    f"init_params={self.init_params!r} leaves out {code!r}, so {name} must be "
                    "set before fit"
                )
        if "s" not in self.init_params:
            sp = np.asarray(self.startprob_, dtype=np.float64)
            if sp.shape != (K,) or np.any(sp < 0) or not np.isclose(sp.sum(), 1.0):
                raise ValueError(f"startprob_ must be {K} probabilities summing to 1")
        if "t" not in self.init_params:
            tm = np.asarray(self.transmat_, dtype=np.float64)
            if tm.shape != (K, K) or np.any(tm < 0) or not np.allclose(tm.sum(axis=1), 1.0):
                raise ValueError(f"transmat_ must be ({K}, {K}) with rows summing to 1")
        if "m" not in self.init_params and np.shape(self.means_) != (K, D):
            raise ValueError(f"means_ must have shape ({K}, {D}), got {np.shape(self.means_)}")
        if "c" not in self.init_params:
            self._covars_ = _check_covars(self._covars_, self.covariance_type, K, D)

    def _user_init_complete(self) -> bool:
        return not (set(self.init_params) & set("stmc"))

    def _check_n_samples(self, n: int, K: int) -> None:
        pass  # every sequence has many dates: one sequence can fit any number of states

    def _prefit_tol(self, n_rows: int) -> float:
        # the objective is a total: stop the prefit when the mean gain per sequence is
        # below 1e-4 nats (or below tol if that is larger)
        return max(1e-4 * n_rows, 0.1 * float(self.tol))

    def _initial_params(self, data: engine.ChunkedData, seed: int, labelled=None, sample=None):
        K, ct = self.n_components, self.covariance_type
        T, D, var = self._seq_layout
        model = self._model()
        have = {code: getattr(self, attr, None) for code, attr in _ATTRS.items()}
        if self._user_init_complete():
            return HMMParams(
                np.asarray(have["s"], dtype=np.float64),
                np.asarray(have["t"], dtype=np.float64),
                np.asarray(have["m"], dtype=np.float64),
                np.asarray(have["c"], dtype=np.float64),
                ct,
            )
        if sample is None:
            sample = engine.draw_sample(data, self.init_sample_size, seed)
        rows, ws, _ = sample
        seqs = model.sequences(rows)
        w = np.ones(len(rows)) if ws is None else np.asarray(ws, dtype=np.float64)
        dates = seqs.X.reshape(-1, D)
        wd = np.repeat(w, T)
        complete = np.isfinite(dates).all(axis=1) & (wd > 0)
        if complete.sum() < K:
            raise ValueError(
                f"Only {int(complete.sum())} dates with every attribute observed were drawn "
                f"for initialisation but n_components={K}: increase init_sample_size or "
                "use fewer components"
            )
        gen = np.random.default_rng(seed)
        centres, lab = kmeans(dates[complete], K, gen, wd[complete])
        labels = np.full(len(dates), -1)
        labels[complete] = lab
        labels = labels.reshape(-1, T)
        if "s" in self.init_params:
            first = labels[:, 0][labels[:, 0] >= 0]
            start = np.bincount(first, minlength=K) + 1.0
            have["s"] = start / start.sum()
        if "t" in self.init_params:
            a, b = labels[:, :-1].ravel(), labels[:, 1:].ravel()
            ok = (a >= 0) & (b >= 0)
            counts = np.ones((K, K)) + np.bincount(a[ok] * K + b[ok], minlength=K * K).reshape(K, K)
            have["t"] = counts / counts.sum(axis=1, keepdims=True)
        if "m" in self.init_params:
            have["m"] = centres
        if "c" in self.init_params:
            xs = dates[complete]
            cv = np.atleast_2d(np.cov(xs.T, aweights=wd[complete])) + self.min_covar * np.eye(D)
            have["c"] = _distribute_covariance(cv, ct, K)
        params = HMMParams(
            np.asarray(have["s"], dtype=np.float64),
            np.asarray(have["t"], dtype=np.float64),
            np.asarray(have["m"], dtype=np.float64),
            np.asarray(have["c"], dtype=np.float64),
            ct,
        )
        if self._use_prefit(data.n_samples):
            params = self._prefit(params, rows, ws, labelled)
        return params

    def _set_params(self, params: HMMParams) -> None:
        self.startprob_ = np.asarray(params.startprob, dtype=np.float64)
        self.transmat_ = np.asarray(params.transmat, dtype=np.float64)
        self.means_ = np.asarray(params.means, dtype=np.float64)
        self._covars_ = np.asarray(params.covars, dtype=np.float64)

    def _fitted_params(self, component_class=None) -> HMMParams:
        cc = getattr(self, "component_classes_", None)
        K = len(self.means_)
        sc = None if cc is None or np.array_equal(cc, np.arange(K)) else np.asarray(cc)
        return HMMParams(
            np.asarray(self.startprob_, dtype=np.float64),
            np.asarray(self.transmat_, dtype=np.float64),
            np.asarray(self.means_, dtype=np.float64),
            np.asarray(self._covars_, dtype=np.float64),
            self.covariance_type,
            sc if component_class is None else np.asarray(component_class),
        )

    @property
    def covars_(self) -> np.ndarray:
        """Covariance matrix of every state, (n_components, n_features, n_features)."""
        c = np.asarray(self._covars_, dtype=np.float64)
        K = len(self.means_)
        ct = self.covariance_type
        if ct == "full":
            return c
        if ct == "diag":
            return np.stack([np.diag(v) for v in c])
        if ct == "tied":
            return np.tile(c, (K, 1, 1))
        D = np.shape(self.means_)[1]
        return c.reshape(K, -1)[:, :1, None] * np.eye(D)[None]

    @covars_.setter
    def covars_(self, value: Any) -> None:
        self._covars_ = np.array(value, dtype=np.float64, copy=True)

    def _verbose_callback(self, t_init: float):
        if not self.verbose:
            return None
        prev = [np.nan]

        def cb(info: engine.IterationInfo) -> None:
            delta = info.lower_bound - prev[0] if np.isfinite(prev[0]) else np.nan
            print(
                f"{info.iteration:>10d} {info.lower_bound:>16.8f} {delta:>+16.8f}", file=sys.stderr
            )
            prev[0] = info.lower_bound

        return cb

    # ------------------------------------------------------------------ model files

    def _summary(self) -> tuple[str, list[str]]:
        lines = ["states (start probability, stay probability):"]
        for k in range(len(self.means_)):
            lines.append(f"  {k}: {self.startprob_[k]:.4f}  {self.transmat_[k, k]:.4f}")
        return f"{self.covariance_type} covariance", lines

    def _n_components_fitted(self) -> int:
        return int(len(self.means_))

    def _fitted_to_dict(self) -> dict[str, Any]:
        return {
            "covariance_type": self.covariance_type,
            "startprob": self.startprob_.tolist(),
            "transmat": self.transmat_.tolist(),
            "means": self.means_.tolist(),
            "covars": np.asarray(self._covars_).tolist(),
        }

    def _fitted_from_dict(self, fitted: dict[str, Any], K: int, D: int) -> None:
        ct = fitted["covariance_type"]
        if ct != self.covariance_type:
            raise ValueError(f"covariance_type {ct!r} does not match the parameters")
        start = np.asarray(fitted["startprob"], dtype=np.float64)
        trans = np.asarray(fitted["transmat"], dtype=np.float64)
        means = np.asarray(fitted["means"], dtype=np.float64)
        for name, arr, shape in (
            ("startprob", start, (K,)),
            ("transmat", trans, (K, K)),
            ("means", means, (K, D)),
        ):
            if arr.shape != shape:
                raise ValueError(f"fitted {name} has shape {arr.shape}, expected {shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"fitted {name} contains non-finite values")
        self.startprob_, self.transmat_, self.means_ = start, trans, means
        self._covars_ = _check_covars(fitted["covars"], ct, K, D)
        self.n_features = D

    # ------------------------------------------------------------------ prediction

    def _pred_rows(self, X: Any, lengths: Any) -> tuple[Any, HMMModel, np.ndarray | None]:
        """Rows of ``X`` for prediction, the model for their layout, and the lengths."""
        self._check_fitted()
        rows, T, D, var = self._sequence_rows(X, lengths, for_fit=False)
        if D != self.n_features_in_:
            raise ValueError(
                f"X has {D} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        if self.nan_policy == "raise" and not isinstance(rows, da.Array):
            body = rows[:, 1:] if var else rows
            if var:
                body = body.copy()
                lens = rows[:, 0].astype(int)
                body.reshape(len(rows), T, D)[np.arange(T)[None, :] >= lens[:, None]] = 0.0
            if not np.isfinite(body).all():
                raise ValueError("Input X contains NaN or inf (nan_policy='raise')")
        model = HMMModel(T, D, self.covariance_type, variable_length=var, params=self.params)
        lens = None
        if self._tabular(X):
            lens = rows[:, 0].astype(np.int64) if var else np.full(len(rows), T)
        return rows, model, lens

    @staticmethod
    def _unpad(a: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Per-date values (n_seq, T, ...) of padded sequences, concatenated (n_samples, ...)."""
        return np.concatenate([a[i, :L] for i, L in enumerate(lens)])

    def score(self, X: Any, lengths: Any = None) -> float:
        """Total log-likelihood ``log p(X)`` of the sequences (hmmlearn's ``score``)."""
        rows, model, _ = self._pred_rows(X, lengths)
        params = self._fitted_params()
        if isinstance(rows, da.Array):
            ll = engine.map_rows(_rows_log_density, (model, params), rows, n_out=None)
            (total,) = engine.compute(da.nansum(ll))
            return float(total)
        return float(np.nansum(model.log_density(params, rows)))

    def score_samples(self, X: Any, lengths: Any = None) -> tuple[float, Any]:
        """``log p(X)`` and the state posteriors: (n_samples, K) for 2-D input,
        (n_sequences, n_times, K) for 3-D input (lazy for Dask)."""
        rows, model, lens = self._pred_rows(X, lengths)
        params = self._fitted_params()
        K = len(self.means_)
        if isinstance(rows, da.Array):
            T = model.n_times
            out = engine.map_rows(_rows_posterior, (model, params), rows, n_out=T * K + T + 1)
            gamma = out[:, : T * K].reshape(rows.shape[0], T, K)
            return float(engine.compute(da.nansum(out[:, -1]))[0]), gamma
        gamma, ll = model.posterior(params, rows)
        total = float(np.nansum(ll))
        if lens is not None:
            return total, self._unpad(gamma, lens)
        return total, gamma

    def predict_proba(self, X: Any, lengths: Any = None) -> Any:
        """Posterior probability of every state at every date (see :meth:`score_samples`)."""
        return self.score_samples(X, lengths)[1]

    def decode(self, X: Any, lengths: Any = None, algorithm: str | None = None):
        """The most likely states: ``(log_prob, state_sequence)`` as hmmlearn returns them.

        ``algorithm="viterbi"``: the jointly most likely path and ``log p(X, path)``;
        ``"map"``: the most likely state of every date and the sum of those posteriors'
        maxima (hmmlearn's value).
        """
        algorithm = self.algorithm if algorithm is None else algorithm
        if algorithm not in ("viterbi", "map"):
            raise ValueError(f"algorithm must be 'viterbi' or 'map', got {algorithm!r}")
        rows, model, lens = self._pred_rows(X, lengths)
        params = self._fitted_params()
        if isinstance(rows, da.Array):
            raise ValueError("decode takes NumPy input; for Dask input use daskem.io.posterior")
        if algorithm == "viterbi":
            paths, logp = model.decode(params, rows)
            value = float(logp.sum())
        else:
            gamma, _ = model.posterior(params, rows)
            paths = gamma.argmax(axis=2)
            best = gamma.max(axis=2)
            value = float(self._unpad(best, lens).sum() if lens is not None else best.sum())
        states = self._unpad(paths, lens) if lens is not None else paths
        return value, states

    def predict(self, X: Any, lengths: Any = None) -> np.ndarray:
        """The most likely state of every date (by ``algorithm``)."""
        return self.decode(X, lengths)[1]

    def sample(self, n_samples: int = 1, random_state: Any = None, currstate: int | None = None):
        """Draw one sequence of ``n_samples`` dates: ``(X, state_sequence)``."""
        self._check_fitted()
        rng = _check_random_state(self.random_state if random_state is None else random_state)
        K = len(self.means_)
        cov = self.covars_
        states = np.empty(n_samples, dtype=np.int64)
        X = np.empty((n_samples, np.shape(self.means_)[1]))
        state = (
            int(rng.choice(K, p=self.startprob_ / self.startprob_.sum()))
            if currstate is None
            else int(currstate)
        )
        for t in range(n_samples):
            if t:
                state = int(rng.choice(K, p=self.transmat_[state]))
            states[t] = state
            X[t] = rng.multivariate_normal(self.means_[state], cov[state])
        return X, states

    def _n_parameters(self) -> int:
        return hmm_n_parameters(self._fitted_params(), "stmc")

    def bic(self, X: Any, lengths: Any = None) -> float:
        """Bayesian information criterion (lower is better), hmmlearn's definition."""
        n = int(np.shape(X)[0] * (np.shape(X)[1] if np.ndim(X) == 3 else 1))
        return -2 * self.score(X, lengths) + self._n_parameters() * np.log(n)

    def aic(self, X: Any, lengths: Any = None) -> float:
        """Akaike information criterion (lower is better)."""
        return -2 * self.score(X, lengths) + 2 * self._n_parameters()


def _class_of_states(state_class: np.ndarray) -> np.ndarray:
    """One-hot (K, C) matrix: the class owning each state."""
    sc = np.asarray(state_class)
    M = np.zeros((len(sc), int(sc.max()) + 1))
    M[np.arange(len(sc)), sc] = 1.0
    return M


@register_estimator
class GaussianHMMClassifier(ClassifierMixin, ClassLabelsMixin, GaussianHMM):
    """Semi-supervised hidden Markov model: labelled dates pin their state's class.

    :class:`GaussianHMM` whose states belong to classes (one per class by default; more
    with ``n_components`` / ``components_per_class``, given to the classes in turn, as
    the mixture classifier does). A labelled date's state is restricted to its class's
    states in every E-step (the posterior of the other states is 0 there), so the states
    keep the meaning the labels give them; everything else is EM over all sequences.

    Parameters
    ----------
    n_components : int or None
        Number of states (default: one per class).
    components_per_class : int or mapping, optional
        States of every class, or per class label.
    **kwargs
        As :class:`GaussianHMM` (except ``init_params``: the start comes from the labels:
        each class's first state starts at the mean of its labelled dates).

    Attributes
    ----------
    classes_ : ndarray
        The class labels (``y`` values other than -1).
    component_classes_ : ndarray (n_components,)
        The class index of every state.
    """

    def __init__(
        self,
        n_components: int | None = None,
        covariance_type: str = "diag",
        min_covar: float = 1e-3,
        startprob_prior: Any = 1.0,
        transmat_prior: Any = 1.0,
        means_prior: Any = 0,
        means_weight: Any = 0,
        covars_prior: Any = 1e-2,
        covars_weight: Any = 1,
        algorithm: str = "viterbi",
        random_state: Any = None,
        n_iter: int = 10,
        tol: float = 1e-2,
        verbose: bool = False,
        params: str = "stmc",
        init_params: str = "stmc",
        implementation: str = "log",
        *,
        components_per_class: Any = None,
        n_init: int = 1,
        chunk_size: int | str = "auto",
        split_every: int = 16,
        init_sample_size: int = 20_000,
        cache: bool | str = "auto",
        prefit: bool | str = "auto",
        select_after: int | str | None = "auto",
        nan_policy: str = "marginalize",
    ) -> None:
        _store_params(self, locals())

    def _labels_for(self, y: Any, rows: Any, T: int, lengths: Any) -> Any:
        """``y`` as class ids per date of each row, (n_sequences, T), -1 unlabelled."""
        n = rows.shape[0]
        if y is None:
            raise ValueError(
                "GaussianHMMClassifier requires y (the class of labelled dates, -1 for "
                "unlabelled); use GaussianHMM for an unsupervised fit"
            )
        if isinstance(y, da.Array):
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"a Dask y must hold integer class ids, got {y.dtype}")
            if y.shape == (n,):
                y = da.repeat(y[:, None], T, axis=1)
            if y.shape != (n, T):
                raise ValueError(
                    f"y must have shape ({n}, {T}) (a class per date) or ({n},) (every date), "
                    f"got {y.shape}: labels on dates the sequences do not have?"
                )
            self._classes_from_data = True
            return y
        y = np.asarray(y)
        if lengths is not None or (y.ndim == 1 and self._tabular_fit):
            total = int(np.sum(lengths)) if lengths is not None else T
            if y.shape != (total,):
                raise ValueError(
                    f"y must have one entry per sample of X ({total}), got shape {y.shape}"
                )
            flat = self._encode_y(y)
            out = np.full((n, T), -1, dtype=np.int64)
            lens = [T] if lengths is None else list(lengths)
            s = 0
            for i, L in enumerate(lens):
                out[i, :L] = flat[s : s + L]
                s += L
            return out
        if y.shape == (n,):
            y = np.repeat(y[:, None], T, axis=1)
        if y.shape != (n, T):
            raise ValueError(
                f"y must have shape ({n}, {T}) (a class per date) or ({n},) (every date), got "
                f"{y.shape}: labels on dates the sequences do not have?"
            )
        return self._encode_y(y.ravel()).reshape(n, T)

    def fit(
        self,
        X: Any,
        y: Any = None,
        lengths: Any = None,
        *,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
        feature_names: Any = None,
        class_names: Any = None,
    ) -> GaussianHMMClassifier:
        """Fit by semi-supervised EM.

        Parameters
        ----------
        X : array-like (n_samples, n_features) with ``lengths``, or (n_sequences,
            n_times, n_features) (NumPy or Dask)
        y : array-like
            The class of labelled dates, ``-1`` elsewhere: (n_samples,) for 2-D ``X``;
            (n_sequences, n_times) or (n_sequences,) (every date) for 3-D ``X``.
        lengths, checkpoint_dir, resume, callback, feature_names
            As in :meth:`GaussianHMM.fit`.
        class_names : sequence of str, optional
            A name for each class (in the order of ``classes_``).
        """
        rows, T, D, var = self._sequence_rows(X, lengths, for_fit=True)
        self._tabular_fit = self._tabular(X)
        self._classes_from_data = False
        try:
            labels = self._labels_for(y, rows, T, lengths)
            self._seq_layout = (T, D, var)
            self._label_tail = (T,)
            self._check_parameters(D)
            self._fit(rows, labels, None, checkpoint_dir, resume, callback)
        finally:
            for name in ("_tabular_fit", "_classes_from_data", "_label_tail"):
                self.__dict__.pop(name, None)
        self._fitted(D, feature_names, class_names)
        return self

    def _check_parameters(self, n_features: int, K: int | None = None) -> None:
        K = self.n_components if K is None else K
        if K is not None and (isinstance(K, bool) or not isinstance(K, numbers.Integral)):
            raise ValueError(f"n_components must be None or an integer >= 1, got {K!r}")
        super()._check_parameters(n_features, K if K is not None else 1)

    def _label_rule(self) -> None:
        return None  # a row is a whole sequence: missing dates are part of the model

    def _setup_labels(self, data: engine.ChunkedData, summary: engine.LabelSummary):
        if int(summary.y_min) < -1:
            raise ValueError(
                f"y holds {int(summary.y_min)}: use -1 for unlabelled and ids >= 0 for classes"
            )
        Xl, yl = summary.X, np.asarray(summary.y)
        if self._classes_from_data:
            classes = np.flatnonzero(np.asarray(summary.counts) > 0)
            self._check_classes(classes)
            if not np.array_equal(classes, np.arange(len(classes))):
                data = engine.relabel(data, classes)
                yl = np.where(yl >= 0, np.searchsorted(classes, yl), -1)
            self.classes_ = classes
        labelled = (np.asarray(Xl, dtype=np.float64), yl, np.asarray(summary.weight, np.float64))
        return data, labelled, self._layout(self.classes_)

    def _fixed_start(self, component_class: np.ndarray) -> bool:
        return len(component_class) == len(np.unique(component_class))

    def _user_init_complete(self) -> bool:
        return False

    def _initial_params(self, data: engine.ChunkedData, seed: int, labelled=None, sample=None):
        K, ct = self._n_comp, self.covariance_type
        cc = np.asarray(self._component_class)
        C = int(cc.max()) + 1
        T, D, _ = self._seq_layout
        model = self._model()
        Xl, yl, _ = labelled
        lab = model.sequences(Xl).X.reshape(-1, D)
        ylf = np.asarray(yl).reshape(-1)
        ok = np.isfinite(lab).all(axis=1)
        centres = np.empty((C, D))
        for c in range(C):
            rows = ok & (ylf == c)
            if not rows.any():
                raise ValueError(
                    f"class {self.classes_[c]!r} has no labelled date with every attribute "
                    "observed: label dates with data"
                )
            centres[c] = lab[rows].mean(axis=0)
        if sample is None:
            sample = engine.draw_sample(data, self.init_sample_size, seed)
        rows_s, ws, _ = sample
        dates = model.sequences(rows_s).X.reshape(-1, D)
        complete = np.isfinite(dates).all(axis=1)
        pool = np.concatenate([dates[complete], lab[ok]])
        gen = np.random.default_rng(seed)
        means = np.empty((K, D))
        means[:C] = centres
        if K > C:  # further states: k-means++ seeds against the class means
            extra = kmeans_plusplus(pool, K - C, gen, initial_centers=centres)
            means[C:] = pool[extra]
        # (the layout's first C states are the classes 0 .. C-1, the further ones follow)
        # counts of nearest-state labels of the sampled sequences for startprob/transmat,
        # restricted to each labelled date's class
        d = _sq_dist(dates, means)
        d[~complete] = np.inf
        near = np.where(complete, d.argmin(axis=1), -1).reshape(-1, T)
        start = np.bincount(near[:, 0][near[:, 0] >= 0], minlength=K) + 1.0
        a, b = near[:, :-1].ravel(), near[:, 1:].ravel()
        okt = (a >= 0) & (b >= 0)
        counts = np.ones((K, K)) + np.bincount(a[okt] * K + b[okt], minlength=K * K).reshape(K, K)
        cv = np.atleast_2d(np.cov(pool.T)) + self.min_covar * np.eye(D)
        params = HMMParams(
            start / start.sum(),
            counts / counts.sum(axis=1, keepdims=True),
            means,
            _distribute_covariance(cv, ct, K),
            ct,
            cc,
        )
        if self._use_prefit(data.n_samples):
            params = self._prefit(params, rows_s, ws, labelled)
        return params

    # ------------------------------------------------------------------ prediction

    def predict_proba(self, X: Any, lengths: Any = None) -> Any:
        """Probability of every class at every date (its states' posteriors summed)."""
        gamma = self.score_samples(X, lengths)[1]
        return gamma @ _class_of_states(self.component_classes_)

    def predict(self, X: Any, lengths: Any = None) -> np.ndarray:
        """The class of the most likely state of every date (by ``algorithm``)."""
        states = self.decode(X, lengths)[1]
        return np.asarray(self.classes_)[np.asarray(self.component_classes_)[states]]
