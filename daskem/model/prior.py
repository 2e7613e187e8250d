"""EM with a per-row class prior from the labels (the classifier's ``label_prior``).

Pure NumPy, like every model here: the E-step and sufficient statistics of a block when
each row's mixing proportions are ``pi_k q(c_k | x)^t`` normalised, ``q`` a Gaussian
classifier of the labelled rows alone (:func:`daskem.model.init.label_prior`). The
objective is the log-likelihood of a mixture whose proportions vary by row, so EM never
lowers it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .gmm import (
    GMMModel,
    GMMParams,
    GMMStats,
    _allowed_components,
    _block_stats_reference,
    _normalise,
    observed_weighted_log_prob,
)
from .init import LabelPrior
from .missing import MissingGMMModel, resp_stats
from .stats import merge_lowest

__all__ = ["LabelPriorMissingModel", "LabelPriorModel", "prior_block_stats"]


def prior_block_stats(
    params: GMMParams,
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    labels: np.ndarray | None,
    prior: LabelPrior,
    marginalize: bool,
    n_worst: int = 16,
) -> GMMStats:
    """E-step and statistics of a block with a per-row class prior (the label prior).

    Row ``i``'s responsibilities are ``pi_k p(c_k | i) N(x_i | k)`` normalised (clamped
    to its class's components if labelled), with ``p(c | i)`` from ``prior``; the
    objective adds ``log sum_k pi_k p(c_k | i) N(x_i | k)`` of every row (weighted). It is
    the log-likelihood of a mixture whose mixing proportions vary by row, so EM still
    never lowers it.
    """
    X = np.asarray(X)
    n = X.shape[0]
    cc = np.asarray(params.component_class)
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    wlp = observed_weighted_log_prob(X, params) + prior.log_prior(X)[:, cc]
    valid = ~np.isnan(wlp[:, 0]) if n else np.zeros(0, dtype=bool)
    if not marginalize:
        valid &= np.isfinite(X).all(axis=1)
    wlp[~valid] = 0.0
    log_norm, log_resp = _normalise(wlp, _allowed_components(labels, params))
    with np.errstate(under="ignore"):
        resp = np.exp(log_resp)
    resp[~valid] = 0.0
    if marginalize:
        out = resp_stats(X, resp, params, w, n_worst=n_worst)
    else:
        out = _block_stats_reference(X, params, w, resp=resp, n_worst=n_worst)
    used = valid & (w > 0)
    out.loglik = float(w[used] @ log_norm[used])
    if used.any():
        sc = log_norm[used]
        take = min(max(n_worst, params.n_components), sc.shape[0])
        idx = np.argpartition(sc, take - 1)[:take]
        rows = np.where(np.isfinite(X[used][idx]), X[used][idx], params.means.mean(0))
        out.worst_score, out.worst_rows = merge_lowest(
            np.empty(0), np.empty((0, X.shape[1])), sc[idx], rows, out.n_worst
        )
    return out


class LabelPriorModel(GMMModel):
    """:class:`~daskem.model.gmm.GMMModel` whose E-step weighs each row's components by
    a class prior from the labels (:func:`daskem.model.init.label_prior`)."""

    def __init__(self, *args: Any, prior: LabelPrior, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "prior", prior)

    def _block_stats(self, params, X, sample_weight, labels) -> GMMStats:
        return prior_block_stats(params, X, sample_weight, labels, self.prior, False)


class LabelPriorMissingModel(MissingGMMModel):
    """:class:`LabelPriorModel` with missing attributes marginalised."""

    def __init__(self, *args: Any, prior: LabelPrior, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "prior", prior)

    def _block_stats(self, params, X, sample_weight, labels) -> GMMStats:
        return prior_block_stats(params, X, sample_weight, labels, self.prior, True)
