"""Marginal and conditional Gaussians over a subset of the features, as pure NumPy.

For a Gaussian ``N(mu, Sigma)`` over ``D`` features split into observed ``o`` and
missing ``m`` ones:

* the marginal of ``x_o`` is ``N(mu_o, Sigma_oo)`` (exact);
* the conditional of ``x_m`` given ``x_o`` is ``N(mu_m + A (x_o - mu_o), C)`` with the
  regression matrix ``A = Sigma_mo Sigma_oo^-1`` and the Schur complement
  ``C = Sigma_mm - A Sigma_om``.

Both are computed through the Cholesky factor ``L`` of ``Sigma_oo``: with
``W = L^-1 Sigma_om``, ``A = (L^-T W)^T`` and ``C = Sigma_mm - W^T W``, which keeps
``C`` symmetric positive semi-definite in floating point. Diagonal and spherical
covariances have ``A = 0`` and ``C`` the missing features' variances.

Every function takes the covariances of all ``K`` components in one of the four
layouts of scikit-learn (``full`` (K, D, D), ``tied`` (D, D), ``diag`` (K, D),
``spherical`` (K,)); no Dask, no xarray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Conditional", "conditional", "full_covariances", "whitening"]


def full_covariances(covariances: np.ndarray, covariance_type: str, K: int, D: int) -> np.ndarray:
    """The (K, D, D) covariance matrices of any covariance layout."""
    cov = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        return cov
    if covariance_type == "tied":
        return np.broadcast_to(cov, (K, D, D))
    if covariance_type == "diag":
        return cov[:, :, None] * np.eye(D)[None]
    return np.asarray(cov).reshape(K)[:, None, None] * np.eye(D)[None]


@dataclass(frozen=True)
class Conditional:
    """Conditional Gaussians of the missing features given the observed ones, per component.

    Attributes
    ----------
    observed : ndarray of bool, shape (D,)
    regression : ndarray of shape (K, m, o)
        ``A_k = Sigma_k,mo Sigma_k,oo^-1`` (zeros for diagonal covariances).
    covariance : ndarray of shape (K, m, m)
        ``C_k = Sigma_k,mm - A_k Sigma_k,om``.
    """

    observed: np.ndarray
    regression: np.ndarray
    covariance: np.ndarray

    @property
    def missing(self) -> np.ndarray:
        return ~self.observed

    def mean(self, x_obs: np.ndarray, means: np.ndarray) -> np.ndarray:
        """Conditional means of the missing features, shape (K, n, m), for rows ``x_obs`` (n, o)."""
        obs, mis = self.observed, self.missing
        d = x_obs[None, :, :] - means[:, None, obs]  # (K, n, o)
        return means[:, None, mis] + np.einsum("kno,kmo->knm", d, self.regression)

    def variances(self) -> np.ndarray:
        """Conditional variances of the missing features, shape (K, m)."""
        return np.diagonal(self.covariance, axis1=1, axis2=2)


def conditional(
    covariances: np.ndarray, covariance_type: str, observed: np.ndarray, K: int
) -> Conditional:
    """Conditional Gaussians of the missing features given the ``observed`` ones (bool (D,)).

    All components at once (batched Cholesky factorisations and products).

    Raises
    ------
    numpy.linalg.LinAlgError
        If a component's ``Sigma_oo`` is not positive definite.
    """
    obs = np.asarray(observed, dtype=bool)
    mis = ~obs
    D = obs.shape[0]
    no, nm = int(obs.sum()), int(mis.sum())
    if covariance_type in ("diag", "spherical"):
        var = np.asarray(covariances, dtype=np.float64)
        var = var[:, mis] if covariance_type == "diag" else np.repeat(var.reshape(K, 1), nm, 1)
        cov = var[:, :, None] * np.eye(nm)[None]
        return Conditional(obs, np.zeros((K, nm, no)), cov)
    full = full_covariances(covariances, covariance_type, K, D)
    if covariance_type == "tied":
        full = full[:1]
    whiten, _ = whitening(full, obs)
    W = np.matmul(whiten, full[:, obs][:, :, mis])  # L^-1 Sigma_om, (k, o, m)
    A = np.matmul(np.transpose(W, (0, 2, 1)), whiten)  # Sigma_mo Sigma_oo^-1, (k, m, o)
    C = full[:, mis][:, :, mis] - np.matmul(np.transpose(W, (0, 2, 1)), W)
    C = 0.5 * (C + np.transpose(C, (0, 2, 1)))
    if covariance_type == "tied":
        return Conditional(obs, np.broadcast_to(A, (K, nm, no)), np.broadcast_to(C, (K, nm, nm)))
    return Conditional(obs, A, C)


def whitening(full: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse Cholesky factors of the observed blocks and their log-determinants.

    Parameters
    ----------
    full : ndarray of shape (K, D, D)
        Covariance matrices.
    observed : ndarray of bool, shape (D,)

    Returns
    -------
    whiten : ndarray of shape (K, o, o)
        Lower-triangular ``L_k^-1`` with ``L_k L_k^T = Sigma_k,oo``: ``whiten @ (x_o - mu_o)``
        are independent unit normals.
    log_det : ndarray of shape (K,)
        ``log det whiten = -log det L``.
    """
    obs = np.asarray(observed, dtype=bool)
    L = np.linalg.cholesky(full[:, obs][:, :, obs])
    whiten = np.linalg.inv(L)
    return whiten, -np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
