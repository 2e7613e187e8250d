"""Statistics records with an associative ``+`` and stable moment merges.

This module owns the arithmetic that lets per-chunk statistics be combined in
any reduction tree: weighted counts, centred means and centred second moments
merged pairwise (Chan, Golub & LeVeque), and a bounded "worst explained
samples" reservoir used to re-seed collapsed components.

It knows nothing about Dask or xarray and nothing about any particular model.
"""

from __future__ import annotations

import numpy as np

__all__ = ["merge_centred_moments", "merge_lowest"]


def merge_centred_moments(
    n_a: np.ndarray,
    mean_a: np.ndarray,
    m2_a: np.ndarray,
    n_b: np.ndarray,
    mean_b: np.ndarray,
    m2_b: np.ndarray,
    full: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge two sets of per-group weighted centred moments.

    Parameters
    ----------
    n_a, n_b : ndarray of shape (K,)
        Weighted counts of each group (may be zero).
    mean_a, mean_b : ndarray of shape (K, D)
        Weighted means.
    m2_a, m2_b : ndarray of shape (K, D, D) if ``full`` else (K, D)
        Centred weighted scatter ``sum_i w_i (x_i - mean)(x_i - mean)^T`` (or its diagonal).
    full : bool
        Whether the second moments are full matrices or diagonals.

    Returns
    -------
    n, mean, m2 : ndarray
        The moments of the union, computed without forming ``E[x x^T] - mean mean^T``.
    """
    n = n_a + n_b
    safe = np.where(n > 0, n, 1.0)
    frac_b = np.where(n > 0, n_b / safe, 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b[:, None]
    # n_a * n_b / n, zero where either side is empty
    coef = np.where(n > 0, n_a * n_b / safe, 0.0)
    if full:
        m2 = m2_a + m2_b + coef[:, None, None] * (delta[:, :, None] * delta[:, None, :])
    else:
        m2 = m2_a + m2_b + coef[:, None] * delta * delta
    return n, mean, m2


def merge_lowest(
    score_a: np.ndarray, rows_a: np.ndarray, score_b: np.ndarray, rows_b: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``size`` rows with the lowest score from two candidate sets.

    Ties are broken by the score value then by the row content order of the
    concatenation, so the result is deterministic for a given reduction tree.
    """
    score = np.concatenate([score_a, score_b])
    rows = np.concatenate([rows_a, rows_b], axis=0)
    if score.shape[0] <= size:
        order = np.argsort(score, kind="stable")
    else:
        order = np.argsort(score, kind="stable")[:size]
    return score[order], rows[order]
