"""Model math as pure NumPy block kernels (no Dask, no xarray).

A model is a module here plus an object implementing the engine interface
described in :mod:`daskem.engine`.
"""

from .gmm import GMMModel, GMMParams, GMMStats

__all__ = ["GMMModel", "GMMParams", "GMMStats"]
