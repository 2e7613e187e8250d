"""daskem: out-of-core, Dask-distributed Expectation-Maximization for image stacks."""

from ._version import __version__
from .estimator import ConvergenceWarning, GaussianMixture, GaussianMixtureClassifier

__all__ = [
    "ConvergenceWarning",
    "GaussianMixture",
    "GaussianMixtureClassifier",
    "__version__",
]
