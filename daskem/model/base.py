"""The protocol every model implements: what the EM engine and the layers above call.

A model is one module of :mod:`daskem.model` (pure NumPy: no Dask, no xarray) defining

* a parameter object (any picklable value, e.g. a frozen dataclass of arrays),
* a statistics record whose ``+`` merges the records of two sets of rows (associative,
  so the engine may reduce blocks in any tree; ``0 + s`` must give ``s`` for ``sum``),
* an object implementing :class:`EMModel` below,

plus a thin estimator on :class:`daskem.base.EMEstimator` that makes starts, turns
fitted parameters into scikit-learn attributes and back, and names the model kind for
model files and the command line. Restarts, screening, prefit, shared passes,
checkpoints, model files, posterior maps and CLI plumbing then come for free.

Rows are ``(n, D)`` float arrays of one block; non-finite values mark missing
attributes. ``labels`` are int arrays, ``-1`` for unlabelled rows, else a class id.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["EMModel"]


@runtime_checkable
class EMModel(Protocol):
    """What :mod:`daskem.engine` and :class:`daskem.base.EMEstimator` call."""

    # ---- the EM iteration (driven by the engine) ---------------------------------

    def block_stats(
        self,
        params: Any,
        X: np.ndarray,
        sample_weight: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> Any:
        """E-step and sufficient statistics of one block (small, mergeable with ``+``).

        The record may carry ``n_excluded`` (rows left out), ``n_partial`` (rows used
        with some attributes missing) and ``n_empty`` (rows with nothing observed); the
        estimator reports them when present.
        """
        ...

    def m_step(self, stats: Any, params: Any) -> tuple[Any, list[dict]]:
        """New parameters from reduced statistics, and events (e.g. re-seedings)."""
        ...

    def objective(self, stats: Any) -> float:
        """The quantity EM does not decrease (per unit of weight), from the statistics."""
        ...

    # ---- rows, for prediction, screening of restarts and posterior maps -----------

    def weighted_log_prob(self, params: Any, X: np.ndarray) -> np.ndarray:
        """``log p(x, component k)`` of every row, shape (n, K); NaN rows where nothing
        is observed."""
        ...

    def log_density(
        self, params: Any, X: np.ndarray, labels: np.ndarray | None = None
    ) -> np.ndarray:
        """``log p(x)`` of every row (labelled rows: ``log p(x, class)``), shape (n,)."""
        ...

    def class_posterior(
        self, params: Any, X: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``p(class | x)`` (n, n_classes) and ``log p(x)`` (n,); NaN where nothing is
        observed."""
        ...

    # ---- parameters as plain values (model files, checkpoints) --------------------

    def params_to_dict(self, params: Any) -> dict[str, Any]:
        """JSON-able values (lists, numbers, strings, None)."""
        ...

    def params_from_dict(self, d: dict[str, Any]) -> Any:
        """The inverse of :meth:`params_to_dict`."""
        ...

    def n_parameters(self, params: Any) -> int:
        """Free parameters, for BIC and AIC."""
        ...
