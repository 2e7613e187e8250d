"""daskem: out-of-core, Dask-distributed Expectation-Maximization for image stacks."""

from ._version import __version__
from .estimator import ConvergenceWarning, GaussianMixture, GaussianMixtureClassifier
from .hmm import GaussianHMM
from .hmrf import SpatialGaussianMixture, SpatialGaussianMixtureClassifier

__all__ = [
    "ConvergenceWarning",
    "GaussianHMM",
    "GaussianMixture",
    "GaussianMixtureClassifier",
    "SpatialGaussianMixture",
    "SpatialGaussianMixtureClassifier",
    "__version__",
]
