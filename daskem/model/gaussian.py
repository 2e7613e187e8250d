"""Gaussian building blocks shared by every model: covariance layouts, Cholesky factors,
marginal and conditional Gaussians, as pure NumPy.

Covariances come in scikit-learn's four layouts (:data:`COVARIANCE_TYPES`) and are
parametrised by the upper-triangular Cholesky factors ``P`` of the precisions
(``precision = P @ P.T``), as scikit-learn's ``precisions_cholesky_``.

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

__all__ = [
    "COVARIANCE_TYPES",
    "Conditional",
    "compute_precision_cholesky",
    "conditional",
    "covariance_shape",
    "covariances_from_precision_cholesky",
    "full_covariances",
    "log_det_cholesky",
    "n_covariance_parameters",
    "precisions_from_cholesky",
    "whitening",
]

#: The four covariance layouts of scikit-learn's ``GaussianMixture``.
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def covariance_shape(covariance_type: str, K: int, D: int) -> tuple[int, ...]:
    """Shape of the covariances (and precision Cholesky factors) of ``K`` components."""
    shapes = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}
    if covariance_type not in shapes:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}"
        )
    return shapes[covariance_type]


def n_covariance_parameters(covariance_type: str, K: int, D: int) -> int:
    """Free parameters of the covariances, as scikit-learn counts them."""
    return int(
        {
            "full": K * D * (D + 1) / 2.0,
            "tied": D * (D + 1) / 2.0,
            "diag": K * D,
            "spherical": K,
        }[covariance_type]
    )


def compute_precision_cholesky(
    covariances: np.ndarray, covariance_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors of the precisions from covariances.

    Returns
    -------
    precisions_cholesky : ndarray
        Factors in scikit-learn's layout; rows of failed components are filled
        with the identity so the array stays finite.
    ok : ndarray of bool, shape (K,) (shape (1,) for ``tied``)
        Which components had a positive-definite covariance.
    """
    cov = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        K, D, _ = cov.shape
        out = np.empty_like(cov)
        ok = np.ones(K, dtype=bool)
        eye = np.eye(D)
        for k in range(K):
            try:
                c = np.linalg.cholesky(cov[k])
            except np.linalg.LinAlgError:
                ok[k] = False
                out[k] = eye
                continue
            # solve L Y = I  ->  Y = L^-1; precision cholesky = (L^-1)^T (upper)
            out[k] = _solve_lower(c, eye).T
            if not np.all(np.isfinite(out[k])):
                ok[k] = False
                out[k] = eye
        return out, ok
    if covariance_type == "tied":
        D = cov.shape[0]
        try:
            c = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            return np.eye(D), np.zeros(1, dtype=bool)
        out = _solve_lower(c, np.eye(D)).T
        return out, np.array([np.all(np.isfinite(out))])
    if covariance_type in ("diag", "spherical"):
        good = np.isfinite(cov) & (cov > 0)
        out = np.where(good, 1.0 / np.sqrt(np.where(good, cov, 1.0)), 1.0)
        ok = good if covariance_type == "spherical" else good.all(axis=1)
        return out, ok
    raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")


def _solve_lower(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve ``L X = B`` for lower-triangular ``L`` (forward substitution, D is small)."""
    D = L.shape[0]
    X = np.zeros_like(B, dtype=np.float64)
    for i in range(D):
        X[i] = (B[i] - L[i, :i] @ X[:i]) / L[i, i]
    return X


def precisions_from_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """Precision matrices (or diagonals) from their Cholesky factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def covariances_from_precision_cholesky(prec_chol: np.ndarray, covariance_type: str) -> np.ndarray:
    """Covariances from precision Cholesky factors (used when only precisions are known)."""
    if covariance_type == "full":
        return np.stack([np.linalg.inv(p @ p.T) for p in prec_chol])
    if covariance_type == "tied":
        return np.linalg.inv(prec_chol @ prec_chol.T)
    return 1.0 / prec_chol**2


def log_det_cholesky(prec_chol: np.ndarray, cov_type: str, D: int) -> np.ndarray:
    """``log det`` of the precision Cholesky factors (per component; a scalar for tied)."""
    if cov_type == "full":
        return np.log(np.diagonal(prec_chol, axis1=1, axis2=2)).sum(axis=1)
    if cov_type == "tied":
        return np.log(np.diag(prec_chol)).sum()
    if cov_type == "diag":
        return np.log(prec_chol).sum(axis=1)
    return D * np.log(prec_chol)


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
