"""Image stacks in, posterior maps out: the xarray / Zarr side of daskem.

This module owns everything that knows about xarray and Zarr:

* :func:`open_stack` -- a Zarr store, an :class:`xarray.Dataset` or a
  :class:`xarray.DataArray` as a :class:`Stack`: a lazy Dask array of shape
  ``(n_features, *spatial)`` with every kind of nodata turned into NaN, plus the
  source dataset for coordinates and attributes;
* :func:`labels_for_stack` -- training labels (a label map or a point list)
  aligned with :meth:`Stack.rows`, with class names and validation;
* :func:`fit_stack` -- a :class:`~daskem.GaussianMixture` fitted on a stack;
* :func:`posterior` -- the lazy posterior :class:`xarray.Dataset` (class
  probabilities, MAP label, confidence, entropy, log-likelihood) of a stack;
* :func:`write_posterior` / :func:`atomic_to_zarr` -- streamed, atomic Zarr writes.

Layout of the data. A stack's pixels are kept feature-major, ``(D, *spatial)``,
with the spatial chunks of the source and the feature axis in one chunk. Row
views for the estimator (``(n_pixels, D)``) are made block by block: each spatial
block becomes one row chunk (pixels in C order within the block, blocks in C order
of the block grid). That order is *not* the global C order of the map, but it
costs no data movement; :meth:`Stack.to_map` inverts it, and labels are put in the
same order by :func:`labels_for_stack`.

What this module must not do: model math (that is :mod:`daskem.model`), hand-made
Dask graphs (only :mod:`daskem.engine` builds those; here only ``dask.array``
operations such as ``blockwise`` and ``map_blocks`` are used), or create a
``distributed.Client`` (that is :mod:`daskem.cluster`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import inspect
import json
import math
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from . import engine
from ._version import __version__
from .base import checking_labels
from .estimator import GaussianMixture, GaussianMixtureClassifier
from .modelfile import params_to_dict

__all__ = [
    "Stack",
    "assess",
    "atomic_to_zarr",
    "check_nodata",
    "convert",
    "fit_stack",
    "write_cogs",
    "labels_for_stack",
    "open_stack",
    "posterior",
    "select_k",
    "sequence_labels",
    "write_posterior",
]

#: Dimension names recognised as the feature axis of a DataArray, in order.
FEATURE_DIMS = ("band", "variable", "feature")
#: Attributes holding a nodata value of an attribute variable, in order of precedence.
_NODATA_ATTRS = ("nodata", "_FillValue", "missing_value")
#: Attributes holding the "unlabelled" value of a label map, in order of precedence.
_UNLABELLED_ATTRS = ("unlabelled_value", "_FillValue", "missing_value")
#: Float64 values per temporary of the posterior kernel (rows x max(D, K)). Kept at
#: 128 KiB: distributed workers set MALLOC_TRIM_THRESHOLD_, which makes every larger
#: temporary a fresh mmap whose page faults made the kernel ~5x slower on workers.
_POSTERIOR_VALUES = 16384
#: Zarr metadata files; a local directory holding none of them is not a store.
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zmetadata")


# --------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    """A multi-attribute image stack as a lazy feature-major Dask array.

    Attributes
    ----------
    dataset : xarray.Dataset
        The source dataset (for coordinates and attributes; for a DataArray source,
        a dataset holding its coordinates and attributes only).
    variables : tuple of str
        Feature names, in the order of ``data``'s first axis.
    dims : tuple of str
        Spatial dimension names (any number: ``(y, x)``, ``(z, y, x)``,
        ``(time, y, x)`` ...).
    data : dask.array.Array of shape (n_features, *spatial), float32 or float64
        Attribute values with nodata as NaN; the feature axis is one chunk and the
        spatial chunks are the source's.
    path : str or None
        The Zarr store the stack was read from, if any.
    var_attrs : dict
        Attributes of the first attribute variable (e.g. ``grid_mapping``).

    Examples
    --------
    >>> from daskem.synthetic import make_stack
    >>> stack = open_stack(make_stack((64, 96), seed=1), chunks={"y": 32, "x": 48})
    >>> stack.variables, stack.dims, stack.data.shape
    (('attr_0', 'attr_1', 'attr_2', 'attr_3'), ('y', 'x'), (4, 64, 96))
    >>> stack.rows().chunks
    ((1536, 1536, 1536, 1536), (4,))
    """

    dataset: xr.Dataset
    variables: tuple[str, ...]
    dims: tuple[str, ...]
    data: da.Array
    path: str | None = None
    var_attrs: dict | None = None
    #: the time dimension of a time stack (one of ``dims``, one chunk), or None
    time_dim: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape."""
        return tuple(int(n) for n in self.data.shape[1:])

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Spatial chunks (one tuple per spatial dim)."""
        return self.data.chunks[1:]

    @property
    def n_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_pixels(self) -> int:
        return math.prod(self.shape)

    @property
    def row_chunks(self) -> tuple[int, ...]:
        """Rows per chunk of :meth:`rows`: one chunk per spatial block, in C order."""
        return engine.block_rows(self.chunks)

    def rows(self) -> da.Array:
        """The pixels as rows, shape (n_pixels, n_features), made block by block.

        Each spatial block becomes one row chunk (a per-block transpose, no data
        movement between blocks); see the module docstring for the row order.
        """
        return _map_to_rows(self.data)

    def to_map(self, rows: da.Array) -> da.Array:
        """Inverse of :meth:`rows` for per-pixel results.

        Parameters
        ----------
        rows : dask.array.Array of shape (n_pixels,) or (n_pixels, C)
            Row-aligned with :meth:`rows` (rechunked to its row chunks if needed).

        Returns
        -------
        dask.array.Array of shape (*spatial) or (C, *spatial), with the stack's chunks
        """
        if rows.shape[0] != self.n_pixels or rows.ndim not in (1, 2):
            raise ValueError(
                f"expected an array of shape ({self.n_pixels},) or ({self.n_pixels}, C) "
                f"aligned with Stack.rows(), got {rows.shape}"
            )
        row_chunks = self.row_chunks
        if rows.chunks[0] != row_chunks:
            rows = rows.rechunk({0: row_chunks})
        if rows.ndim == 1:
            return da.reshape_blockwise(rows, self.shape, chunks=self.chunks)
        C = int(rows.shape[1])
        rows = rows.rechunk({1: -1})
        out = da.reshape_blockwise(rows, (*self.shape, C), chunks=(*self.chunks, (C,)))
        return out.transpose(self.data.ndim - 1, *range(self.data.ndim - 1))

    def select(self, variables: Sequence[str]) -> Stack:
        """The stack restricted to / reordered as ``variables`` (lazy, per block)."""
        unknown = [v for v in variables if v not in self.variables]
        if unknown or not variables:
            raise ValueError(f"unknown variable(s) {unknown}; the stack has {list(self.variables)}")
        order = [self.variables.index(v) for v in variables]
        return replace(self, variables=tuple(variables), data=self.data[order])

    # ---- time stacks: every pixel one sequence of dates --------------------------

    def _time_axis(self) -> int:
        if self.time_dim is None:
            raise ValueError(
                "this is not a time stack: open it with time_dim=... (the CLI's --time-dim)"
            )
        return self.dims.index(self.time_dim)

    @property
    def pixel_dims(self) -> tuple[str, ...]:
        """The spatial dims without the time dim (all of ``dims`` for other stacks)."""
        return tuple(d for d in self.dims if d != self.time_dim)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return tuple(n for d, n in zip(self.dims, self.shape, strict=True) if d != self.time_dim)

    @property
    def pixel_chunks(self) -> tuple[tuple[int, ...], ...]:
        return tuple(c for d, c in zip(self.dims, self.chunks, strict=True) if d != self.time_dim)

    @property
    def n_times(self) -> int:
        return int(self.shape[self._time_axis()])

    @property
    def n_sequences(self) -> int:
        """Pixels of a time stack (one sequence each)."""
        return math.prod(self.pixel_shape)

    def sequences(self) -> da.Array:
        """The pixels' time series, shape (n_sequences, n_times, n_features).

        One row chunk per pixel block (pixels in C order within the block, blocks in C
        order of the block grid), made by a per-block transpose: the rows of
        :meth:`pixels_to_map` and of labels on the pixel grid are in the same order.
        """
        t = self._time_axis()
        data = self.data
        if len(data.chunks[1 + t]) != 1:
            data = data.rechunk({1 + t: -1})
        pix = [1 + i for i in range(len(self.dims)) if i != t]
        seq = data.transpose(*pix, 1 + t, 0)
        return da.reshape_blockwise(seq, (self.n_sequences, self.n_times, self.n_features))

    def pixels_to_map(self, rows: da.Array) -> da.Array:
        """Per-sequence results (n_sequences,) or (n_sequences, C) as maps on the pixel
        grid, (*pixel) or (C, *pixel) (inverse of the row order of :meth:`sequences`)."""
        shape, chunks = self.pixel_shape, self.pixel_chunks
        row_chunks = engine.block_rows(chunks)
        if rows.chunks[0] != row_chunks:
            rows = rows.rechunk({0: row_chunks})
        if rows.ndim == 1:
            return da.reshape_blockwise(rows, shape, chunks=chunks)
        C = int(rows.shape[1])
        rows = rows.rechunk({1: -1})
        out = da.reshape_blockwise(rows, (*shape, C), chunks=(*chunks, (C,)))
        return out.transpose(len(shape), *range(len(shape)))

    def spatial_coords(self) -> dict[str, xr.Variable]:
        """Coordinates of the source that live on the spatial dims (incl. scalar ones)."""
        return {
            name: c.variable
            for name, c in self.dataset.coords.items()
            if set(c.dims) <= set(self.dims)
        }


def _map_to_rows(data: da.Array) -> da.Array:
    """(D, *spatial) -> (n_pixels, D), one row chunk per spatial block.

    Each block stays feature-major in memory: a (D, *block) chunk is viewed as
    (D, pixels) (free) and handed on transposed, a Fortran-ordered (pixels, D) view, so
    neither this step nor the kernel's feature-major sub-blocks copy across the grain
    (docs/performance.md trap 5).
    """
    D = data.shape[0]
    n = math.prod(data.shape[1:])
    if len(data.chunks[0]) != 1:
        data = data.rechunk({0: -1})
    if data.ndim > 2:
        data = da.reshape_blockwise(data, (D, n))
    return data.T


def _spatial_to_rows(a: da.Array) -> da.Array:
    """(*spatial) -> (n_pixels,), one chunk per spatial block."""
    if a.ndim == 1:
        return a
    return da.reshape_blockwise(a, (math.prod(a.shape),))


def open_stack(
    source: xr.Dataset | xr.DataArray | str | os.PathLike[str],
    variables: Sequence[str] | str | None = None,
    *,
    feature_dim: str | None = None,
    mask: str | xr.DataArray | None = None,
    nodata: float | Mapping[str, float] | None = None,
    chunks: int | Mapping[str, int] | None = None,
    time_dim: str | None = None,
) -> Stack:
    """Open a multi-attribute stack lazily.

    Parameters
    ----------
    source : xarray.Dataset, xarray.DataArray, str or path-like
        * Dataset: each attribute is a data variable on the same spatial dims;
        * DataArray: attributes along a feature dimension (``feature_dim``;
          default the first of ``band``, ``variable``, ``feature`` present; without
          one the array is a single attribute);
        * path or URL of a Zarr store (v2 or v3, consolidated or not), opened with
          :func:`xarray.open_zarr` keeping the store's chunks.
    variables : sequence of str or str, optional
        Attributes to use (Dataset variables, or labels along ``feature_dim``).
        Default for a Dataset: every numeric data variable with the full spatial
        dims (integer ones converted to floating point), except the ``mask``
        variable, label-like variables (CF ``flag_values`` / ``flag_meanings``, an
        ``unlabelled_value``, or integer variables named like labels, classes,
        truth, masks or quality flags) and the variables another one names in its CF
        ``ancillary_variables``, in natural name order (a store lists its arrays in
        no fixed order).
    feature_dim : str, optional
        Feature dimension of a DataArray source.
    mask : str or xarray.DataArray, optional
        Validity mask on the spatial grid (``True`` = valid): a variable name of the
        dataset or a DataArray. Invalid pixels become NaN in every attribute.
    nodata : float or mapping of str to float, optional
        Nodata value of every attribute, or per attribute name. Overrides the
        ``nodata`` / ``_FillValue`` / ``missing_value`` attributes, which are
        otherwise honoured (xarray already decodes ``_FillValue`` of stores it reads).
    chunks : int or mapping of str to int, optional
        Spatial chunks (per dim name; an int for all). Default: the source's Dask
        chunks, or Dask's automatic chunking for in-memory data.
    time_dim : str, optional
        Open a time stack: the attributes live on ``(time_dim, *pixel dims)`` and every
        pixel's dates are one sequence (for :class:`~daskem.GaussianHMM`). The time
        axis is made one chunk (a warning says what that costs when the source is
        chunked along it), and the pixel chunks are shrunk if a block of all dates
        would exceed about 64 MiB. At least 2 dates are needed.

    Returns
    -------
    Stack

    Raises
    ------
    FileNotFoundError
        If a local path does not exist.
    ValueError
        If the path is not a Zarr store, a variable is unknown or not numeric, no
        variable is selected, or the variables are not on the same spatial grid.
    """
    stack = _open_stack(source, variables, feature_dim, mask, nodata, chunks)
    if time_dim is not None:
        stack = _as_time_stack(stack, time_dim)
    return stack


#: bytes of one block of a time stack (all dates, every attribute) at most
_TIME_BLOCK_BYTES = 64 * 2**20


def _as_time_stack(stack: Stack, time_dim: str) -> Stack:
    """``stack`` as a time stack: the time axis one chunk, blocks of bounded size."""
    if time_dim not in stack.dims:
        raise ValueError(
            f"the stack has no dimension {time_dim!r} to use as time (its dims: {list(stack.dims)})"
        )
    if len(stack.dims) < 2:
        raise ValueError(f"a time stack needs pixel dims besides {time_dim!r}, got {stack.dims}")
    t = stack.dims.index(time_dim)
    T = stack.shape[t]
    if T < 2:
        raise ValueError(
            f"a time stack needs at least 2 dates along {time_dim!r}, got {T}: a hidden "
            "Markov model over one date is a mixture (use --method gmm)"
        )
    data = stack.data
    n_time_chunks = len(data.chunks[1 + t])
    chunks = {1 + t: -1}
    pix_axes = [i for i in range(len(stack.dims)) if i != t]
    sizes = {i: max(data.chunks[1 + i]) for i in pix_axes}
    while (
        stack.n_features * T * math.prod(sizes.values()) * data.dtype.itemsize > _TIME_BLOCK_BYTES
        and max(sizes.values()) > 1
    ):
        big = max(sizes, key=lambda i: sizes[i])
        sizes[big] = (sizes[big] + 1) // 2
    for i in pix_axes:
        if sizes[i] != max(data.chunks[1 + i]):
            chunks[1 + i] = sizes[i]
    if n_time_chunks > 1:
        warnings.warn(
            f"the stack is stored in {n_time_chunks} chunks along {time_dim!r}; every pixel's "
            "dates are one sequence, so each pass reads all time chunks of a block together "
            "and rechunks them in memory (extra memory and data movement on every pass). "
            f"Store it with {time_dim!r} in one chunk to avoid this, e.g. "
            f"ds.chunk({{{time_dim!r}: -1}}).to_zarr(...)",
            UserWarning,
            stacklevel=3,
        )
    data = data.rechunk(chunks)
    return replace(stack, data=data, time_dim=time_dim)


def _open_stack(source, variables, feature_dim, mask, nodata, chunks) -> Stack:
    path = None
    if isinstance(source, (list, tuple)) or (
        isinstance(source, (str, os.PathLike)) and _is_many(os.fspath(source))
    ):
        files = _expand_paths(source)
        path = ",".join(files)
        source = _open_rasters(files)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        source = open_path(path)
    if isinstance(source, xr.DataArray):
        stack = _stack_from_dataarray(source, variables, feature_dim, mask, nodata, chunks)
        return replace(stack, path=path)
    if not isinstance(source, xr.Dataset):
        raise TypeError(
            "source must be an xarray.Dataset, an xarray.DataArray, or the path of a Zarr "
            f"store, GeoTIFF or NetCDF/HDF5 file, got {type(source).__name__}"
        )
    ds = source
    mask_name = mask if isinstance(mask, str) else None
    names = _select_variables(ds, variables, mask_name)
    dims = tuple(ds[names[0]].dims)
    _check_same_grid(ds, names, dims)
    arrays = [_dask_data(ds[n].transpose(*dims), chunks) for n in names]
    grid = arrays[0].chunks
    if any(a.chunks != grid for a in arrays[1:]):
        odd = [n for n, a in zip(names, arrays, strict=True) if a.chunks != grid]
        warnings.warn(
            f"variables {odd} are chunked differently from {names[0]!r}; rechunking them to "
            f"its chunk grid {grid}, which costs extra data movement and memory "
            "(store all attributes with the same chunks to avoid it)",
            UserWarning,
            stacklevel=3,
        )
        arrays = [a if a.chunks == grid else a.rechunk(grid) for a in arrays]
    nodata_values = [_nodata_value(n, ds[n].attrs, nodata) for n in names]
    mask_arr = _mask_array(ds, mask, dims, ds.sizes, grid)
    dtype = _float_dtype([a.dtype for a in arrays])
    idx = tuple(range(1, len(dims) + 1))
    args: list[Any] = []
    for a in arrays:
        args += [a, idx]
    if mask_arr is not None:
        args += [mask_arr, idx]
    data = da.blockwise(
        _stack_block,
        (0, *idx),
        *args,
        new_axes={0: len(names)},
        dtype=dtype,
        meta=np.empty((0,) * (len(dims) + 1), dtype),
        nodata=tuple(nodata_values),
        has_mask=mask_arr is not None,
        out_dtype=dtype,
    )
    return Stack(ds, tuple(names), dims, data, path, _var_attrs(ds[names[0]]))


#: file name endings read as GeoTIFF (rioxarray) and as NetCDF/HDF5 (xarray's engines)
RASTER_SUFFIXES = (".tif", ".tiff", ".gtiff", ".vrt")
NETCDF_SUFFIXES = (".nc", ".nc4", ".cdf", ".netcdf", ".h5", ".hdf5", ".he5")
_ACCEPTS = (
    "a Zarr store (directory), a GeoTIFF/COG (.tif, .tiff, .vrt), several single-band "
    "GeoTIFFs (a list, a glob such as 'bands/*.tif', or comma-separated paths) or a "
    "NetCDF/HDF5 file (.nc, .h5)"
)


def _is_many(path: str) -> bool:
    return any(ch in path for ch in "*?[") or ("," in path and not os.path.exists(path))


def _expand_paths(source: Any) -> list[str]:
    """Files of a list, a glob pattern or comma-separated paths, in natural order."""
    import glob

    items = (
        [os.fspath(p) for p in source]
        if isinstance(source, (list, tuple))
        else [p.strip() for p in os.fspath(source).split(",") if p.strip()]
    )
    files: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item), key=_natural_key)
            if not found:
                raise FileNotFoundError(errno.ENOENT, "No file matches", item)
            files.extend(found)
        else:
            files.append(item)
    if not files:
        raise ValueError(f"no input files in {source!r}")
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(errno.ENOENT, "No such file", f)
        if not f.lower().endswith(RASTER_SUFFIXES):
            raise ValueError(
                f"{f!r}: several inputs must be GeoTIFFs (.tif, .tiff, .vrt), one attribute "
                "per band"
            )
    return files


def open_path(path: str) -> xr.Dataset | xr.DataArray:
    """A Zarr store, GeoTIFF or NetCDF/HDF5 file, opened lazily with its CRS kept.

    GeoTIFFs come as a DataArray (band, y, x) whose band labels are the band
    descriptions (else the file name for one band, ``band_1`` ... for several), chunked
    along the file's internal tiles; NetCDF/HDF5 files and Zarr stores as Datasets with
    their grid mapping as a coordinate (``decode_coords="all"``).
    """
    low = path.lower().rstrip("/")
    if low.endswith(RASTER_SUFFIXES):
        return _open_raster(path)
    if low.endswith(NETCDF_SUFFIXES):
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        try:
            return xr.open_dataset(path, chunks={}, decode_coords="all")
        except (OSError, ValueError) as e:
            raise ValueError(
                f"could not open {path!r} as NetCDF/HDF5 ({e}); NetCDF4/HDF5 files need "
                "h5netcdf or netCDF4 (pip install 'daskem[gis]')"
            ) from e
    return _open_zarr(path)


def _rioxarray():
    try:
        import rioxarray
    except ImportError as e:
        raise ImportError(
            "reading and writing GeoTIFFs needs rioxarray and rasterio: pip install 'daskem[gis]'"
        ) from e
    return rioxarray


def _open_raster(path: str) -> xr.DataArray:
    """One GeoTIFF as (band, y, x), lazily, with band names and its CRS."""
    rioxarray = _rioxarray()
    if not os.path.exists(path) and "://" not in path:
        raise FileNotFoundError(errno.ENOENT, "No such file", path)
    try:
        # chunks=True: Dask chunks aligned with the file's internal tiles (rioxarray
        # hands xarray positional chunks, which it deprecates: not the user's concern)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*chunks as dimension-order tuples")
            arr = rioxarray.open_rasterio(path, chunks=True, mask_and_scale=False)
    except Exception as e:  # rasterio raises its own error classes
        raise ValueError(f"could not open {path!r} as a GeoTIFF: {e}") from e
    if isinstance(arr, list):  # subdatasets
        raise ValueError(f"{path!r} holds several subdatasets; open one of them")
    n = arr.sizes.get("band", 1)
    desc = arr.attrs.get("long_name")
    if isinstance(desc, str):
        desc = (desc,)
    stem = Path(path).name.split(".")[0]
    if desc and len(desc) == n and all(desc) and len(set(desc)) == n:
        names = [str(d) for d in desc]
    elif n == 1:
        names = [stem]
    else:
        names = [f"{stem}_band_{i + 1}" for i in range(n)]
    arr = arr.assign_coords(band=names)
    arr.attrs.pop("long_name", None)
    nodata = arr.rio.nodata
    if nodata is not None:
        arr.attrs["nodata"] = nodata
    if arr.rio.crs is not None and "spatial_ref" in arr.coords:
        arr.attrs.setdefault("grid_mapping", "spatial_ref")
    return arr


def _open_rasters(files: list[str]) -> xr.DataArray:
    """Several GeoTIFFs on one grid as one (band, y, x) array, each band an attribute."""
    arrays = [_open_raster(f) for f in files]
    first = arrays[0]
    for f, a in zip(files[1:], arrays[1:], strict=True):
        same = (
            a.sizes["y"] == first.sizes["y"]
            and a.sizes["x"] == first.sizes["x"]
            and a.rio.crs == first.rio.crs
            and np.allclose(tuple(a.rio.transform())[:6], tuple(first.rio.transform())[:6])
        )
        if not same:
            raise ValueError(
                f"{f!r} is not on the grid of {files[0]!r} (size, transform or CRS differ): "
                "resample it onto one grid first (e.g. gdalwarp, rioxarray reproject_match)"
            )
    names = [str(b) for a in arrays for b in a["band"].values]
    if len(set(names)) != len(names):  # e.g. files without band descriptions
        names = [
            Path(f).name.split(".")[0] + ("" if a.sizes["band"] == 1 else f"_{b}")
            for f, a in zip(files, arrays, strict=True)
            for b in a["band"].values
        ]
    dtype = np.result_type(*[a.dtype for a in arrays])
    nodata = {a.attrs.get("nodata") for a in arrays}
    out = xr.concat(
        [a.astype(dtype) for a in arrays], dim="band", coords="minimal", compat="override"
    )
    out = out.assign_coords(band=names)
    out.attrs = dict(first.attrs)
    if len(nodata) > 1:  # per-file nodata: a coordinate along band (NaN: none)
        out.attrs.pop("nodata", None)
        values = [
            np.nan if a.attrs.get("nodata") is None else float(a.attrs["nodata"])
            for a in arrays
            for _ in range(a.sizes["band"])
        ]
        out = out.assign_coords(nodata_value=("band", values))
    return out


def _open_zarr(path: str) -> xr.Dataset:
    if "://" not in path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(errno.ENOENT, "No such Zarr store", path)
        if not p.is_dir() or not any((p / m).exists() for m in _ZARR_MARKERS):
            raise ValueError(
                f"{path!r} is not a Zarr store (found none of {', '.join(_ZARR_MARKERS)}); "
                f"give {_ACCEPTS}"
            )
    errors = []
    for consolidated in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                # decode_coords="all": the grid mapping (e.g. spatial_ref, the CRS) a
                # variable names becomes a coordinate, so posteriors carry it along
                return xr.open_zarr(path, consolidated=consolidated, chunks={}, decode_coords="all")
        except (KeyError, OSError, ValueError, TypeError) as e:  # try the other way
            errors.append(e)
    if all(isinstance(e, FileNotFoundError) for e in errors):
        raise FileNotFoundError(errno.ENOENT, "No such Zarr store", path) from errors[-1]
    raise ValueError(f"could not open {path!r} as a Zarr store: {errors[-1]}") from errors[-1]


def _var_attrs(var: xr.DataArray) -> dict:
    """A variable's attributes, with its ``grid_mapping`` even when xarray decoded it into
    the encoding (``decode_coords="all"``), so outputs can name the CRS variable."""
    attrs = dict(var.attrs)
    gm = var.encoding.get("grid_mapping")
    if gm and "grid_mapping" not in attrs:
        attrs["grid_mapping"] = gm
    return attrs


def _is_label_like(var: xr.DataArray) -> bool:
    return "flag_values" in var.attrs or "flag_meanings" in var.attrs


#: names of integer variables taken for labels, masks or quality flags, not attributes
_NOT_ATTRIBUTE = re.compile(r"(label|class|truth|mask|valid|flag|qa|quality|_id$|^id$)", re.I)


def _is_attribute_dtype(var: xr.DataArray, name: str) -> bool:
    """Floating-point variables, and integer ones (sensor counts, DN) unless they look
    like labels, masks or quality flags (CF flags, an ``unlabelled_value``, or such a
    name)."""
    kind = var.dtype.kind
    if kind == "f":
        return True
    if kind not in "iu":
        return False
    return "unlabelled_value" not in var.attrs and not _NOT_ATTRIBUTE.search(name)


def _select_variables(
    ds: xr.Dataset, variables: Sequence[str] | str | None, mask_name: str | None
) -> list[str]:
    available = [str(n) for n in ds.data_vars]
    if variables is not None:
        names = [variables] if isinstance(variables, str) else [str(v) for v in variables]
        if not names:
            raise ValueError(f"no variables selected; available data variables: {available}")
        unknown = [n for n in names if n not in ds.data_vars]
        if unknown:
            raise ValueError(
                f"unknown variable(s) {unknown}; available data variables: {available}"
            )
        for n in names:
            kind = ds[n].dtype.kind
            if kind not in "iuf":
                raise ValueError(
                    f"variable {n!r} is not numeric (dtype {ds[n].dtype}); attributes must be "
                    "integer or floating-point"
                )
        return names
    # CF ancillary variables (uncertainties, quality flags, reference values) describe
    # another variable: they are not attributes of their own
    ancillary = {
        a
        for v in ds.data_vars.values()
        for a in str(v.attrs.get("ancillary_variables", "")).split()
    }
    # natural name order: a store's listing order is not stable (attr_2 < attr_10)
    candidates = [
        n
        for n in sorted(available, key=_natural_key)
        if n != mask_name
        and n not in ancillary
        and ds[n].ndim > 0
        and _is_attribute_dtype(ds[n], n)
        and not _is_label_like(ds[n])
    ]
    if not candidates:
        raise ValueError(
            "found no numeric data variables to use as attributes "
            f"(data variables: {available}); name them with variables=[...]"
        )
    ndim = max(ds[n].ndim for n in candidates)
    ref = next(n for n in candidates if ds[n].ndim == ndim)
    names = [n for n in candidates if set(ds[n].dims) == set(ds[ref].dims)]
    odd = [n for n in candidates if ds[n].ndim == ndim and n not in names]
    if odd:
        raise ValueError(
            "variables have different spatial dims/shapes: "
            + ", ".join(_describe(ds[n], n) for n in [ref, *odd])
            + "; select the attributes with variables=[...]"
        )
    return names


def _natural_key(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _describe(var: xr.DataArray, name: str) -> str:
    return f"{name} {dict(var.sizes)}"


def _check_same_grid(ds: xr.Dataset, names: list[str], dims: tuple[str, ...]) -> None:
    odd = [n for n in names[1:] if set(ds[n].dims) != set(dims)]
    if odd:
        raise ValueError(
            "variables have different spatial dims/shapes: "
            + ", ".join(_describe(ds[n], n) for n in [names[0], *odd])
        )


def _normalise_chunks(chunks: int | Mapping[str, int] | None, dims: Sequence[str]):
    if chunks is None:
        return None
    if isinstance(chunks, Mapping):
        unknown = set(chunks) - set(dims)
        if unknown:
            raise ValueError(f"chunks refers to unknown dimensions {sorted(unknown)}")
        return {d: chunks.get(d, -1) for d in dims}
    return {d: int(chunks) for d in dims}


def _dask_data(var: xr.DataArray, chunks) -> da.Array:
    """The variable's data as a Dask array (in-memory data is wrapped, not copied)."""
    spec = _normalise_chunks(chunks, var.dims)
    if isinstance(var.data, da.Array):
        return var.data if spec is None else var.data.rechunk(tuple(spec.values()))
    return var.chunk(spec if spec is not None else "auto").data


def _float_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    dt = np.result_type(np.float32, *dtypes)
    return np.dtype(dt if dt.kind == "f" and dt.itemsize >= 4 else np.float64)


def _nodata_value(name: str, attrs: Mapping, nodata) -> float | None:
    if isinstance(nodata, Mapping):
        if name in nodata:
            return nodata[name]
    elif nodata is not None:
        return nodata
    for key in _NODATA_ATTRS:
        if key in attrs:
            value = np.asarray(attrs[key]).ravel()
            if value.size:
                return value[0].item()
    return None


def _mask_array(ds, mask, dims, sizes, grid) -> da.Array | None:
    if mask is None:
        return None
    if (
        isinstance(mask, str)
        and mask not in ds.variables
        and mask.lower().endswith(RASTER_SUFFIXES)
    ):
        m = _open_raster(mask).squeeze("band", drop=True)  # a mask raster: nonzero = valid
        m = (m != 0) & (m != m.attrs.get("nodata", 0))
        m = m.drop_vars([c for c in m.coords if c not in m.dims])
    elif isinstance(mask, str):
        if mask not in ds.variables:
            raise ValueError(
                f"mask variable {mask!r} not found (nor a mask GeoTIFF .tif); available data "
                f"variables: {[str(n) for n in ds.data_vars]}"
            )
        m = ds[mask]
    elif isinstance(mask, xr.DataArray):
        m = mask
    else:
        raise TypeError(f"mask must be a variable name or a DataArray, got {type(mask).__name__}")
    if set(m.dims) != set(dims) or any(m.sizes[d] != sizes[d] for d in dims):
        raise ValueError(
            f"mask {dict(m.sizes)} is not on the stack's grid { ({d: sizes[d] for d in dims}) }"
        )
    if m.dtype.kind not in "biu":
        raise ValueError(f"mask must be boolean (True = valid), got dtype {m.dtype}")
    arr = _dask_data(m.transpose(*dims), None)
    return arr.rechunk(grid) if arr.chunks != grid else arr


def _stack_block(*blocks, nodata, has_mask, out_dtype):
    """Per-block assembly: D attribute blocks (+ mask) -> (D, *block) with NaN for nodata."""
    mask = None
    if has_mask:
        *blocks, mask = blocks
    out = np.empty((len(blocks), *blocks[0].shape), dtype=out_dtype)
    for i, (b, nd) in enumerate(zip(blocks, nodata, strict=True)):
        out[i] = b
        if nd is not None and not (isinstance(nd, float) and math.isnan(nd)):
            out[i][b == nd] = np.nan
    if mask is not None:
        out[:, ~mask.astype(bool)] = np.nan
    return out


def _stack_from_dataarray(arr, variables, feature_dim, mask, nodata, chunks) -> Stack:
    fd = feature_dim
    if fd is None:
        fd = next((d for d in FEATURE_DIMS if d in arr.dims), None)
    elif fd not in arr.dims:
        raise ValueError(f"feature_dim {fd!r} is not a dimension of the DataArray {arr.dims}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(
            f"DataArray {arr.name!r} is not numeric (dtype {arr.dtype}); attributes must be "
            "integer or floating-point"
        )
    if fd is None:
        name = str(arr.name) if arr.name is not None else "feature_0"
        arr = arr.expand_dims("feature")
        arr = arr.assign_coords(feature=[name])
        fd = "feature"
    if fd in arr.coords:
        labels = [str(v) for v in arr[fd].values]
    else:
        labels = [f"{fd}_{i}" for i in range(arr.sizes[fd])]
        arr = arr.assign_coords({fd: labels})
    if variables is not None:
        names = [variables] if isinstance(variables, str) else [str(v) for v in variables]
        if not names:
            raise ValueError(f"no variables selected; available {fd} labels: {labels}")
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise ValueError(f"unknown variable(s) {unknown}; available {fd} labels: {labels}")
        arr = arr.isel({fd: [labels.index(n) for n in names]})
        labels = names
    dims = tuple(d for d in arr.dims if d != fd)
    arr = arr.transpose(fd, *dims)
    spec = _normalise_chunks(chunks, dims)
    data = _dask_data(arr, None if spec is None else {fd: -1, **spec})
    if len(data.chunks[0]) != 1:
        data = data.rechunk({0: -1})
    coords = {k: v.variable for k, v in arr.coords.items() if fd not in v.dims}
    # the array's attributes describe its values (nodata, scaling, units): they stay
    # with the attributes (var_attrs), not with the dataset the outputs inherit
    ds = xr.Dataset(
        coords=coords, attrs={k: v for k, v in arr.attrs.items() if k not in _VALUE_ATTRS}
    )
    # several GeoTIFFs with nodata of their own: a nodata_value coordinate along fd
    per_band = (
        np.asarray(arr["nodata_value"].values, dtype=np.float64)
        if "nodata_value" in arr.coords and arr["nodata_value"].dims == (fd,)
        else None
    )
    nd = [
        _nodata_value(
            n,
            {"nodata": per_band[i]}
            if per_band is not None and np.isfinite(per_band[i])
            else arr.attrs,
            nodata,
        )
        for i, n in enumerate(labels)
    ]
    mask_arr = _mask_array(
        ds, mask, dims, dict(zip(dims, data.shape[1:], strict=True)), data.chunks[1:]
    )
    dtype = _float_dtype([data.dtype])
    if mask_arr is None and data.dtype == dtype and all(v is None for v in nd):
        return Stack(ds, tuple(labels), dims, data, None, _var_attrs(arr))
    idx = tuple(range(data.ndim))
    args: list[Any] = [data, idx]
    if mask_arr is not None:
        args += [mask_arr, idx[1:]]
    data = da.blockwise(
        _nodata_block,
        idx,
        *args,
        dtype=dtype,
        meta=np.empty((0,) * data.ndim, dtype),
        nodata=tuple(nd),
        has_mask=mask_arr is not None,
        out_dtype=dtype,
    )
    return Stack(ds, tuple(labels), dims, data, None, _var_attrs(arr))


def _nodata_block(block, *mask, nodata, has_mask, out_dtype):
    parts = [block[i] for i in range(block.shape[0])]
    return _stack_block(*parts, *mask, nodata=nodata, has_mask=has_mask, out_dtype=out_dtype)


# --------------------------------------------------------------------------- labels


@dataclass
class _Labels:
    """Resolved training labels: a lazy class-id map and what the validation found."""

    map: da.Array  # int32 (*spatial), stack chunks, -1 unlabelled
    class_names: list[str]
    counts: np.ndarray | None  # labelled pixels per class (None: not checked yet)
    n_on_masked: int  # labelled pixels with some missing attribute
    check: _LabelCheck | None = None  # for labels whose check is deferred to the fit


def _keep_rows(rows: da.Array, at_most: int, seed: int) -> np.ndarray:
    """At most ``at_most`` labelled rows per class, drawn at random on the workers (the
    rows of smallest pseudo-random key, a hash of the row and ``seed``: the same draw for
    the same stack, chunks and seed); only their indices come to the client (sorted).
    One read of the labels."""
    nothing = da.zeros((rows.shape[0], 0), chunks=(rows.chunks[0], 0))
    data = engine.ChunkedData(nothing, None, rows)
    return np.sort(engine.prepare(data, usable=None, per_class=at_most, seed=seed).labels.rows)


def _only_rows(block, keep, block_info=None):
    """Labels of a row chunk with every row not in ``keep`` unlabelled."""
    lo = block_info[0]["array-location"][0][0]
    idx = np.arange(lo, lo + block.shape[0])
    return np.where(np.isin(idx, keep), block, -1).astype(block.dtype)


def labels_for_stack(
    stack: Stack,
    labels: str | os.PathLike[str] | xr.DataArray | Mapping | Sequence[Mapping],
    *,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    nan_policy: str = "marginalize",
    class_column: str | None = None,
    max_labels_per_class: int | None = None,
    seed: int = 0,
) -> tuple[da.Array, list[str]]:
    """Training labels aligned with :meth:`Stack.rows`.

    Parameters
    ----------
    stack : Stack
    labels : str, path-like, xarray.DataArray, dict or list of dict
        * the name of a variable of ``stack.dataset`` (a label map);
        * a DataArray on the stack's grid (same dims, sizes and coordinates);
        * a point list: a dict of columns, a list of records, or the path of a CSV
          file, with one column per spatial dim (coordinate values, or indices for a
          dim without coordinate) and ``class`` (an id, or a name from
          ``class_names``). Points are put on the nearest pixel;
        * a vector file of points or polygons (GeoPackage, shapefile, GeoJSON,
          FlatGeobuf: anything GDAL reads, through pyogrio): reprojected to the stack's
          CRS and rasterised on its grid chunk by chunk (a polygon labels the pixels
          whose centre it contains, a point the pixel it falls in); the classes are the
          distinct values of ``class_column`` (default: a column named class, label,
          landcover ... or the only one), their names those values.

        In a map, ``-1`` (or the ``unlabelled_value`` / ``_FillValue`` /
        ``missing_value`` attribute, or NaN) marks unlabelled pixels. CF
        ``flag_values`` map the stored values to class ids ``0 .. n_classes - 1``.
    class_names : sequence of str or mapping of int to str, optional
        Class names by id. Default: from CF ``flag_values`` / ``flag_meanings``,
        else ``class_0``, ``class_1`` ... up to the largest id found.
    nan_policy : {"marginalize", "omit", "raise"}, default "marginalize"
        The fit's policy: a labelled pixel counts if some attribute is observed
        (``"marginalize"``) or only if every one is.
    class_column : str, optional
        The class column of a vector file.
    max_labels_per_class, seed : int, optional
        Keep at most this many labelled pixels of each class, drawn at random with
        ``seed`` (e.g. from large training polygons).

    Returns
    -------
    labels : dask.array.Array of int32, shape (n_pixels,)
        Class id of each row of ``stack.rows()``, ``-1`` for unlabelled.
    class_names : list of str

    Raises
    ------
    ValueError
        If the label map is on a different grid, a point lies outside the grid,
        class ids are out of range, a class has no label, or a class has labels
        only on pixels the fit cannot use (nothing observed; under ``"omit"`` or
        ``"raise"``, any attribute missing).

    Notes
    -----
    Validation is one pass over the label map and the attributes, summarised on the
    workers (:func:`daskem.engine.prepare`): no labelled pixel travels to the client.
    (:func:`fit_stack` checks the labels in the fit's own pass before EM instead.)
    """
    rows, resolved = _stack_labels(
        stack, labels, class_names, nan_policy, class_column, max_labels_per_class, seed
    )
    return rows, resolved.class_names


def _stack_labels(
    stack: Stack,
    labels: Any,
    class_names: Any,
    nan_policy: str,
    class_column: str | None,
    max_labels_per_class: int | None,
    seed: int,
    deferred: bool = False,
) -> tuple[da.Array, _Labels]:
    """:func:`labels_for_stack`'s rows and resolved labels; with ``deferred``, unchecked
    (``_Labels.check`` then takes the summary of the fit's pass before EM)."""
    if max_labels_per_class is not None and int(max_labels_per_class) < 1:
        raise ValueError(f"max_labels_per_class must be >= 1, got {max_labels_per_class}")
    resolved = _resolve_labels(
        stack,
        labels,
        class_names,
        nan_policy=nan_policy,
        class_column=class_column,
        deferred=deferred or max_labels_per_class is not None,
    )
    rows = _spatial_to_rows(resolved.map)
    if max_labels_per_class is not None:
        keep = _keep_rows(rows, int(max_labels_per_class), seed)
        rows = rows.map_blocks(_only_rows, keep, dtype=rows.dtype)
        if not deferred:  # checked now, on the labels kept
            data = engine.ChunkedData(stack.rows(), None, rows)
            rule = "any" if nan_policy == "marginalize" else "all"
            resolved = resolved.check(engine.prepare(data, usable=rule, per_class=1).labels)
    return rows, resolved


def _resolve_labels(
    stack: Stack,
    labels: Any,
    class_names: Sequence[str] | Mapping[int, str] | None,
    *,
    n_classes: int | None = None,
    require_every_class: bool = True,
    nan_policy: str = "marginalize",
    class_column: str | None = None,
    deferred: bool = False,
) -> _Labels:
    """Labels on the stack's grid, checked (a summary computed on the workers), or with
    ``deferred`` unchecked with their check (``_Labels.check``) for the fit's pass."""
    what = "labels"
    if isinstance(labels, str) and labels in stack.dataset.data_vars:
        what = f"label variable {labels!r}"
        labels = stack.dataset[labels]
    if isinstance(labels, xr.DataArray):
        lab_map, names, raw_map, flag_values = _label_map_from_array(stack, labels, class_names)
    elif isinstance(labels, (str, os.PathLike)) and os.fspath(labels).lower().endswith(
        VECTOR_SUFFIXES
    ):
        if not Path(labels).exists():
            raise ValueError(f"labels file {os.fspath(labels)!r} does not exist")
        what = f"vector file {os.fspath(labels)!r}"
        lab_map, names = _label_map_from_vector(stack, os.fspath(labels), class_column)
        raw_map, flag_values = lab_map, None
    elif isinstance(labels, (str, os.PathLike)):
        p = Path(labels)
        if not p.is_file():
            raise ValueError(
                f"labels {os.fspath(labels)!r} is neither a variable of the stack "
                f"(data variables: {[str(n) for n in stack.dataset.data_vars]}) "
                "nor an existing CSV or vector file (.gpkg, .shp, .geojson ...)"
            )
        what = f"point file {os.fspath(labels)!r}"
        lab_map, names = _label_map_from_points(stack, _read_csv(p), class_names, first_line=2)
        raw_map, flag_values = lab_map, None
    elif isinstance(labels, (Mapping, Sequence)):
        what = "point labels"
        lab_map, names = _label_map_from_points(stack, labels, class_names)
        raw_map, flag_values = lab_map, None
    else:
        raise TypeError(
            "labels must be a variable name, a DataArray, a CSV path or a point list, "
            f"got {type(labels).__name__}"
        )

    lab_rows = _spatial_to_rows(lab_map)
    check = _LabelCheck(
        what, names, n_classes, flag_values, lab_map, _spatial_to_rows(raw_map), lab_rows,
        require_every_class, nan_policy,
    )  # fmt: skip
    if deferred:  # checked by the fit, from its pass before EM
        return _Labels(lab_map, names, None, 0, check)
    # summaries computed on the workers (per-chunk reductions): the labelled rows never
    # travel to the client, whatever the density of the labels
    if require_every_class:  # and the attributes, for the labels on masked pixels
        data = engine.ChunkedData(stack.rows(), None, lab_rows)
        rule = "any" if nan_policy == "marginalize" else "all"
        summary = engine.prepare(data, usable=rule, per_class=1).labels
    else:  # posterior clamping: the labels alone
        lo, hi, n = engine.compute(lab_rows.min(), lab_rows.max(), (lab_rows >= 0).sum())
        summary = engine.LabelSummary(int(lo), int(hi), None, None, None, int(n), *([None] * 3))
    return check(summary)


@dataclass
class _LabelCheck:
    """The validation of resolved labels, from the labels' summary
    (:class:`daskem.engine.LabelSummary`: computed on the workers, by the fit's pass
    before EM or by :func:`_resolve_labels`). Calling it returns the :class:`_Labels`
    (class names included) or raises ``ValueError`` naming the problem."""

    what: str
    names: list[str] | None
    n_classes: int | None
    flag_values: np.ndarray | None
    lab_map: da.Array
    raw_rows: da.Array
    lab_rows: da.Array
    require_every_class: bool
    nan_policy: str

    resolved: _Labels | None = None  # what the last call found

    def __call__(self, summary: engine.LabelSummary) -> _Labels:
        return self._check_labels(summary)

    def _check_labels(self, summary: engine.LabelSummary) -> _Labels:
        what, names, lab_rows = self.what, self.names, self.lab_rows
        lo, hi = int(summary.y_min), int(summary.y_max)
        if int(summary.n_rows) == 0 and lo >= -1:
            raise ValueError(f"{what} holds no labelled pixel")
        if names is None:
            top = max(hi, 0) + 1 if self.n_classes is None else self.n_classes
            names = [f"class_{c}" for c in range(max(top, 0))]
        C = len(names) if self.n_classes is None else self.n_classes
        if lo < -1 or hi >= C:  # the error path: the offending values, a few of them
            bad_rows = (lab_rows < -1) | (lab_rows >= C)
            (bad,) = engine.compute(da.unique(self.raw_rows[bad_rows]))
            shown = [v.item() for v in np.asarray(bad)[:10]]
            fv = self.flag_values
            valid = f"[0, {C})" if fv is None else f"flag_values {fv.tolist()}"
            raise ValueError(
                f"{what} holds class ids {shown} outside the valid range {valid}; "
                "use -1 (or the unlabelled_value attribute) for unlabelled pixels"
            )
        lab_map = self.lab_map
        if not self.require_every_class:  # posterior clamping: the range is all it needs
            return _Labels(lab_map, list(names), None, 0)
        counts = _padded(summary.counts, C)
        marginalize = self.nan_policy == "marginalize"
        good = _padded(summary.observed if marginalize else summary.complete, C)
        if int((counts > 0).sum()) < 2:
            raise ValueError(
                f"{what} labels only {int((counts > 0).sum())} class "
                f"({[names[c] for c in np.flatnonzero(counts)]}): a semi-supervised fit needs "
                "labels of at least 2 classes (fit without labels for an unsupervised model)"
            )
        empty = [f"{names[c]!r} (id {c})" for c in range(C) if counts[c] == 0]
        if empty:
            raise ValueError(
                f"class {', '.join(empty)} has no labelled pixels in {what}; label at least "
                "one pixel of every class, or leave the class out of class_names"
            )
        lost = [f"{names[c]!r} (id {c})" for c in range(C) if counts[c] > 0 and good[c] == 0]
        if lost:
            valid = "some attribute is observed" if marginalize else "every attribute is valid"
            raise ValueError(
                f"class {', '.join(lost)} has labels only on masked (NaN) pixels in {what}; "
                f"label pixels where {valid}"
            )
        n_masked = int(counts.sum() - good.sum())
        if n_masked:
            why = "no attribute" if marginalize else "missing attributes (NaN)"
            warnings.warn(
                f"{n_masked} labelled pixels have {why} and are left out of the fit",
                UserWarning,
                stacklevel=3,
            )
        self.resolved = _Labels(lab_map, list(names), counts, n_masked)
        return self.resolved


def _padded(a: np.ndarray | None, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    if a is not None:
        a = np.asarray(a)[:n]
        out[: len(a)] = a
    return out


#: file name endings read as vector label files (pyogrio / GDAL)
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite")
#: class column names looked for when none is given (case-insensitive), in order
_CLASS_COLUMNS = ("class", "classes", "class_id", "classid", "label", "labels", "landcover",
                  "land_cover", "lc", "category", "type", "id")  # fmt: skip


def _stack_crs(stack: Stack) -> Any:
    """The stack's CRS (pyproj) from its grid mapping, or None."""
    try:
        import rioxarray  # noqa: F401
    except ImportError:
        return None
    ds = stack.dataset
    gm = (stack.var_attrs or {}).get("grid_mapping")
    probe = xr.DataArray(np.zeros((1,) * len(stack.dims)), dims=stack.dims)
    if gm and gm in ds.coords:
        probe = probe.assign_coords({gm: ds[gm]})
        probe.attrs["grid_mapping"] = gm
    elif "spatial_ref" in ds.coords:
        probe = probe.assign_coords(spatial_ref=ds["spatial_ref"])
    crs = probe.rio.crs
    return None if crs is None else crs


def _grid_transform(stack: Stack) -> tuple[Any, str, str]:
    """The affine transform of a 2-D stack's regular (y, x) grid, from its coordinates."""
    from affine import Affine

    if len(stack.dims) != 2:
        raise ValueError(f"vector labels need a 2-D map, the stack is on {stack.dims}")
    ydim, xdim = stack.dims
    ds = stack.dataset
    if xdim not in ds.coords or ydim not in ds.coords:
        raise ValueError("vector labels need the stack's x/y coordinates to place them")
    x, y = np.asarray(ds[xdim].values, float), np.asarray(ds[ydim].values, float)
    dx = (x[-1] - x[0]) / max(len(x) - 1, 1) if len(x) > 1 else 1.0
    dy = (y[-1] - y[0]) / max(len(y) - 1, 1) if len(y) > 1 else -1.0
    return Affine(dx, 0.0, x[0] - dx / 2, 0.0, dy, y[0] - dy / 2), ydim, xdim


def _rasterise_block(block_info=None, *, shapes, transform, tree):
    import rasterio.features
    import shapely

    info = block_info[None]
    (y0, y1), (x0, x1) = info["array-location"]
    out_shape = (y1 - y0, x1 - x0)
    t = transform * transform.translation(x0, y0)
    corners = [t * (0, 0), t * (out_shape[1], out_shape[0])]
    box = shapely.box(
        min(c[0] for c in corners), min(c[1] for c in corners),
        max(c[0] for c in corners), max(c[1] for c in corners),
    )  # fmt: skip
    hits = tree.query(box)
    if not len(hits):
        return np.full(out_shape, -1, dtype=np.int32)
    return rasterio.features.rasterize(
        [shapes[i] for i in sorted(hits)],
        out_shape=out_shape,
        transform=t,
        fill=-1,
        dtype="int32",
    )


def _label_map_from_vector(stack: Stack, path: str, class_column: str | None):
    """A label map from a vector file of points/polygons, rasterised chunk by chunk."""
    try:
        import pyogrio
        import shapely
    except ImportError as e:
        raise ImportError(
            "vector label files need pyogrio and shapely: pip install 'daskem[gis]'"
        ) from e
    meta, _, wkb, fields = pyogrio.raw.read(path)
    columns = [str(c) for c in meta["fields"]]
    if class_column is None:
        lower = {c.lower(): c for c in columns}
        class_column = next((lower[c] for c in _CLASS_COLUMNS if c in lower), None)
        if class_column is None and len(columns) == 1:
            class_column = columns[0]
        if class_column is None:
            raise ValueError(
                f"{path}: which column holds the classes? Its columns: {columns} (give "
                "--class-column / class_column=)"
            )
    if class_column not in columns:
        raise ValueError(f"{path}: no column {class_column!r}; its columns: {columns}")
    values = np.asarray(fields[columns.index(class_column)])
    geoms = shapely.from_wkb(wkb)
    keep = ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
    if values.dtype.kind in "fO":
        keep &= np.array([v is not None and v == v for v in values.tolist()], dtype=bool)
    geoms, values = geoms[keep], values[keep]
    if not len(geoms):
        raise ValueError(f"{path}: no feature with a geometry and a class")
    classes = np.unique(values)
    names = [str(v.item() if isinstance(v, np.generic) else v) for v in classes]
    ids = np.searchsorted(classes, values)
    crs = _stack_crs(stack)
    src = meta.get("crs")
    if src and crs is not None:
        from pyproj import CRS, Transformer

        if CRS.from_user_input(src) != CRS.from_user_input(crs.to_wkt()):
            tr = Transformer.from_crs(src, crs.to_wkt(), always_xy=True)
            geoms = shapely.transform(
                geoms, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))
            )
    elif src is None and crs is not None:
        warnings.warn(
            f"{path} declares no CRS: its coordinates are taken to be in the stack's",
            UserWarning,
            stacklevel=4,
        )
    transform, _, _ = _grid_transform(stack)
    ny, nx = stack.shape
    c0, c1 = transform * (0, 0), transform * (nx, ny)
    grid = shapely.box(min(c0[0], c1[0]), min(c0[1], c1[1]), max(c0[0], c1[0]), max(c0[1], c1[1]))
    inside = shapely.intersects(geoms, grid)
    if not inside.all():
        warnings.warn(
            f"{int((~inside).sum())} of the {len(geoms)} features of {path} lie outside the "
            "stack's grid and were skipped",
            UserWarning,
            stacklevel=4,
        )
        geoms, ids = geoms[inside], ids[inside]
    if not len(geoms):
        raise ValueError(f"{path}: every feature lies outside the stack's grid")
    shapes = list(zip(geoms.tolist(), ids.tolist(), strict=True))
    tree = shapely.STRtree(geoms)
    lab_map = da.map_blocks(
        _rasterise_block,
        dtype=np.int32,
        chunks=stack.chunks,
        meta=np.empty((0, 0), np.int32),
        shapes=shapes,
        transform=transform,
        tree=tree,
    )
    return lab_map, names


def _class_names_from(
    attrs: Mapping, class_names: Sequence[str] | Mapping[int, str] | None
) -> tuple[np.ndarray | None, list[str] | None]:
    """(flag_values or None, names or None) from a user mapping or CF flag attributes."""
    flag_values = None
    names = None
    if "flag_values" in attrs:
        flag_values = np.atleast_1d(np.asarray(attrs["flag_values"])).astype(np.int64)
        if "flag_meanings" in attrs:
            meanings = str(attrs["flag_meanings"]).split()
            if len(meanings) == flag_values.size:
                names = meanings
    if class_names is not None:
        names = _names_from_mapping(class_names)
        if flag_values is not None and len(names) != flag_values.size:
            raise ValueError(
                f"class_names has {len(names)} names but the label map's flag_values has "
                f"{flag_values.size} values"
            )
    if flag_values is not None and names is None:
        names = [f"class_{i}" for i in range(flag_values.size)]
    return flag_values, names


def _names_from_mapping(class_names: Sequence[str] | Mapping[int, str]) -> list[str]:
    if isinstance(class_names, Mapping):
        ids = sorted(int(k) for k in class_names)
        if ids != list(range(len(ids))):
            raise ValueError(f"class_names must name the ids 0 .. n_classes - 1, got ids {ids}")
        return [str(class_names[k]) for k in sorted(class_names)]
    if isinstance(class_names, str):
        raise TypeError("class_names must be a sequence of names or a mapping id -> name")
    return [str(n) for n in class_names]


def _unlabelled_value(attrs: Mapping) -> float:
    for key in _UNLABELLED_ATTRS:
        if key in attrs:
            v = np.asarray(attrs[key]).ravel()
            if v.size:
                return v[0].item()
    return -1


def _label_map_from_array(stack: Stack, arr: xr.DataArray, class_names):
    if set(arr.dims) != set(stack.dims) or any(
        arr.sizes[d] != n for d, n in zip(stack.dims, stack.shape, strict=True)
    ):
        raise ValueError(
            f"label map is on a different grid than the stack: label dims {dict(arr.sizes)}, "
            f"stack dims {dict(zip(stack.dims, stack.shape, strict=True))}"
        )
    for d in stack.dims:
        a = arr.coords.get(d)
        b = stack.dataset.coords.get(d)
        if a is None or b is None:
            continue
        av, bv = np.asarray(a.values), np.asarray(b.values)
        same = (
            np.allclose(av, bv, rtol=1e-9, atol=0)
            if av.dtype.kind == "f" and bv.dtype.kind == "f"
            else np.array_equal(av, bv)
        )
        if not same:
            raise ValueError(
                f"label map is on a different grid than the stack: coordinate {d!r} differs"
            )
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"label map must hold integer class ids, got dtype {arr.dtype}")
    flag_values, names = _class_names_from(arr.attrs, class_names)
    unlabelled = _unlabelled_value(arr.attrs)
    raw = _dask_data(arr.transpose(*stack.dims), None)
    if raw.chunks != stack.chunks:
        raw = raw.rechunk(stack.chunks)
    lab_map = raw.map_blocks(
        _normalise_label_block,
        dtype=np.int32,
        unlabelled=unlabelled,
        flag_values=flag_values,
        meta=np.empty((0,) * raw.ndim, np.int32),
    )
    return lab_map, names, raw, flag_values


def _normalise_label_block(block, unlabelled, flag_values):
    """Raw label values -> int32 class ids (-1 unlabelled, -2 not a class id or flag value)."""
    b = np.asarray(block)
    if b.dtype.kind == "f":
        missing = np.isnan(b) | (b == unlabelled)
        b = np.where(missing, 0, b).astype(np.int64)
    else:
        missing = b == unlabelled
        b = b.astype(np.int64)
    if flag_values is not None:
        order = np.argsort(flag_values)
        sv = flag_values[order]
        pos = np.clip(np.searchsorted(sv, b), 0, sv.size - 1)
        known = sv[pos] == b
        b = np.where(known, order[pos], -2)
    out = np.clip(b, -2, np.iinfo(np.int32).max).astype(np.int32)
    out[out < 0] = -2  # negative values other than the unlabelled value are invalid
    out[missing] = -1
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _label_map_from_points(stack: Stack, points, class_names, first_line: int | None = None):
    """``first_line``: the file line of the first record (CSV: 2), so messages name rows
    as a user sees them in the file; None: 0-based positions in the list."""

    def row(i: int) -> str:
        return f"line {i + first_line}" if first_line is not None else f"point {i}"

    if isinstance(points, Mapping):
        cols = {str(k): list(v) for k, v in points.items()}
        n = len(next(iter(cols.values()))) if cols else 0
        records = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    else:
        records = [dict(r) for r in points]
    need = [*stack.dims, "class"]
    if not records:
        raise ValueError("the point list is empty")
    missing = [c for c in need if c not in records[0]]
    if missing:
        raise ValueError(
            f"point labels need the columns {need} (one per spatial dim, and 'class'); "
            f"missing {missing}, got {sorted(records[0])}"
        )
    names = _names_from_mapping(class_names) if class_names is not None else None
    raw_classes = [r["class"] for r in records]
    ids = np.empty(len(records), dtype=np.int64)
    try:
        ints = [int(str(c)) for c in raw_classes]
        if first_line is not None and names is None:
            # a file's own class values (e.g. 1..7) are its classes, named by value
            values = sorted(set(ints))
            names = [str(v) for v in values]
            ids[:] = np.searchsorted(values, ints)
        else:
            ids[:] = ints
    except ValueError:
        if names is None:
            names = sorted({str(c) for c in raw_classes})
        lookup = {n: i for i, n in enumerate(names)}
        for i, c in enumerate(raw_classes):
            if str(c) not in lookup:
                raise ValueError(
                    f"{row(i)}: class {c!r} is not one of the class names {names}"
                ) from None
            ids[i] = lookup[str(c)]
    index = np.empty((len(records), len(stack.dims)), dtype=np.int64)
    off = np.zeros(len(records), dtype=bool)
    for j, d in enumerate(stack.dims):
        values = np.array([float(r[d]) for r in records])
        coord = stack.dataset.coords.get(d)
        size = stack.shape[j]
        index[:, j], out_j = _nearest_index(
            values, None if coord is None else coord.values, size, d
        )
        off |= out_j
    if off.all():
        raise ValueError(f"every one of the {len(records)} points lies outside the grid")
    if off.any():
        where = ", ".join(row(int(i)) for i in np.flatnonzero(off)[:5])
        warnings.warn(
            f"{int(off.sum())} of the {len(records)} points lie outside the grid and were "
            f"skipped ({where}{', ...' if off.sum() > 5 else ''})",
            UserWarning,
            stacklevel=4,
        )
        keep = ~off
        index, ids = index[keep], ids[keep]
        kept = np.flatnonzero(keep)
    else:
        kept = np.arange(len(records))
    flat = np.ravel_multi_index(tuple(index.T), stack.shape)
    order = np.argsort(flat, kind="stable")
    fs, cs = flat[order], ids[order]
    clash = np.flatnonzero((fs[1:] == fs[:-1]) & (cs[1:] != cs[:-1]))
    if clash.size:
        i, k = kept[order[clash[0]]], kept[order[clash[0] + 1]]
        raise ValueError(
            f"{row(int(i))} and {row(int(k))} fall on the same pixel with different classes"
        )
    template = da.zeros(stack.shape, chunks=stack.chunks, dtype=np.int32)
    lab_map = template.map_blocks(
        _points_block,
        index=index,
        ids=ids.astype(np.int32),
        dtype=np.int32,
        meta=np.empty((0,) * len(stack.shape), np.int32),
    )
    return lab_map, names


def _nearest_index(
    values: np.ndarray, coord: np.ndarray | None, size: int, dim: str
) -> tuple[np.ndarray, np.ndarray]:
    """The nearest index along ``dim`` of every value, and which values lie off the grid
    (their index is then 0)."""
    out = np.empty(values.shape, dtype=np.int64)
    if coord is None or coord.ndim != 1 or coord.dtype.kind not in "iuf":
        r = np.rint(np.where(np.isfinite(values), values, -1))
        outside = (r < 0) | (r >= size)
        return np.where(outside, 0, r).astype(np.int64), outside
    c = np.asarray(coord, dtype=np.float64)
    order = np.argsort(c)
    cs = c[order]
    pos = np.clip(np.searchsorted(cs, values), 1, max(cs.size - 1, 1))
    if cs.size == 1:
        out[:] = 0
        half = 0.5
    else:
        left, right = cs[pos - 1], cs[pos]
        pick = np.where(np.abs(values - left) <= np.abs(right - values), pos - 1, pos)
        out[:] = order[pick]
        half = 0.5 * float(np.median(np.diff(cs)))
    outside = (values < cs[0] - half) | (values > cs[-1] + half) | ~np.isfinite(values)
    return np.where(outside, 0, out), outside


def _points_block(block, index, ids, block_info=None):
    """Fill the points that fall in this block; everything else is -1 (unlabelled)."""
    out = np.full(block.shape, -1, dtype=np.int32)
    loc = block_info[0]["array-location"]
    inside = np.ones(len(ids), dtype=bool)
    for j, (lo, hi) in enumerate(loc):
        inside &= (index[:, j] >= lo) & (index[:, j] < hi)
    if inside.any():
        local = tuple(index[inside, j] - loc[j][0] for j in range(len(loc)))
        out[local] = ids[inside]
    return out


# --------------------------------------------------------------------------- fitting


def _default_pattern_weights(cls: type, kwargs: dict[str, Any]) -> None:
    """Mixing weights by pattern of observed attributes for stacks, unless asked otherwise:
    where a stack misses values in clouds, swaths or masks, the pixels of a pattern come
    from the classes under them, not in the scene's proportions (README, "Missing
    attributes and gap-filled maps"). Only for estimators with the option, marginalising
    missing attributes, without ``label_prior``."""
    if kwargs.get("pattern_weights") is not None:
        return
    kwargs.pop("pattern_weights", None)
    if (
        "pattern_weights" in inspect.signature(cls).parameters
        and kwargs.get("nan_policy") == "marginalize"
        and kwargs.get("label_prior") in (None, 0, 0.0)
    ):
        kwargs["pattern_weights"] = True


def fit_stack(
    stack: Stack,
    n_components: int | None = None,
    labels: Any = None,
    *,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    components_per_class: int | Mapping[Any, int] | None = None,
    sample_weight: Any = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    callback: Any = None,
    method: str = "gmm",
    check_nodata_values: bool = True,
    class_column: str | None = None,
    max_labels_per_class: int | None = None,
    **gm_kwargs: Any,
) -> GaussianMixture | GaussianMixtureClassifier:
    """Fit a model on every pixel of a stack.

    Without labels the model's unsupervised estimator (:class:`~daskem.GaussianMixture`
    for ``method="gmm"``); with labels its semi-supervised classifier
    (:class:`~daskem.GaussianMixtureClassifier`). Pixels with some attributes missing
    are fitted through their observed ones (``nan_policy="marginalize"``, EM with
    missing data), with mixing weights of their own for every pattern of observed
    attributes (``pattern_weights=True``, where the estimator has the option and
    ``label_prior`` is not used; pass ``pattern_weights=False`` for one set of weights);
    pixels with none observed are left out. Pass ``nan_policy="omit"`` to leave out
    every pixel with a missing attribute.

    Parameters
    ----------
    stack : Stack
    n_components : int, optional
        Number of mixture components; with labels at least the number of classes
        (default: one per class, or what ``components_per_class`` asks for; further
        components are given to the classes in turn). Required without labels.
    labels : optional
        Training labels, anything :func:`labels_for_stack` accepts.
    class_names : sequence of str or mapping, optional
        See :func:`labels_for_stack`.
    components_per_class : int or mapping, optional
        With labels: components of every class (an int), or per class as a mapping
        from class name (or class id) to a count >= 1; classes not named get 1.
    sample_weight : xarray.DataArray or array, optional
        Per-pixel weights: a DataArray on the stack's grid, an array of the stack's
        spatial shape, or an array of shape (n_pixels,) already in the row order of
        :meth:`Stack.rows`.
    checkpoint_dir, resume, callback
        Passed to the estimator's ``fit``.
    method : str, default "gmm"
        The model kind (:func:`estimator_class`): ``"gmm"`` for the Gaussian mixtures,
        or any other kind registered with :func:`daskem.modelfile.register_estimator`.
    check_nodata_values : bool, default True
        Warn first about values that look like undeclared nodata (:func:`check_nodata`).
    class_column : str, optional
        With a vector label file: the column holding the classes.
    max_labels_per_class : int, optional
        Keep at most this many labelled pixels of each class (drawn with the fit's
        ``random_state``, default 0).
    **gm_kwargs
        Passed to the estimator (e.g. ``covariance_type``, ``label_weight``).

    Returns
    -------
    GaussianMixture or GaussianMixtureClassifier
        Fitted, with ``feature_names_in_`` (the stack's variables) and ``class_names_``
        (given to ``fit``), ``excluded_counts_`` (pixel counts ``{"all_missing",
        "partially_missing", "total"}``, as every estimator has them) and in addition
        ``input_path_`` (the stack's path, for provenance).

    Notes
    -----
    Besides the EM passes, the fit makes one pass over the stack (and the labels)
    before EM: the cache, the initialisation sample and the labels' summary, from which
    the labels are checked (``max_labels_per_class`` adds one read of the label map).
    ``excluded_counts_`` comes from the last pass's
    statistics: ``partially_missing`` pixels are fitted under ``"marginalize"`` and left
    out (counted in ``total``) under ``"omit"``.
    """
    if check_nodata_values:
        check_nodata(stack)
    X = stack.rows()
    y = None
    names: list[str] | None = None
    for key in ("spatial_beta", "neighbourhood", "mean_field_sweeps", "spatial_fit"):
        if gm_kwargs.get(key) is None:
            gm_kwargs.pop(key, None)
    if method == "gmm" and ("spatial_beta" in gm_kwargs or "spatial_fit" in gm_kwargs):
        method = "hmrf"  # a spatial prior was asked for
    spatial = getattr(estimator_class(method), "spatial_input", False)
    if getattr(estimator_class(method), "sequence_input", False):
        if max_labels_per_class is not None or class_column is not None:
            raise ValueError(
                f"method {method!r} takes label maps: max_labels_per_class and "
                "class_column are for pixel labels from vector files"
            )
        return _fit_sequences(
            stack,
            n_components,
            labels,
            method=method,
            class_names=class_names,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            callback=callback,
            sample_weight=sample_weight,
            components_per_class=components_per_class,
            **gm_kwargs,
        )
    if gm_kwargs.get("nan_policy") is None:  # fit through observed attributes if it can
        policies = estimator_class(method, semi_supervised=labels is not None).nan_policies
        gm_kwargs["nan_policy"] = "marginalize" if "marginalize" in policies else "omit"
    _default_pattern_weights(estimator_class(method, semi_supervised=labels is not None), gm_kwargs)
    check = None
    if labels is not None:
        # checked by the fit's pass before EM (no pass of their own), unless the classes
        # must be known by name before it
        y, resolved = _stack_labels(
            stack,
            labels,
            class_names,
            gm_kwargs["nan_policy"],
            class_column,
            max_labels_per_class,
            int(gm_kwargs.get("random_state") or 0),
            deferred=not isinstance(components_per_class, Mapping),
        )
        names, check = resolved.class_names, resolved.check
        C = None if names is None else len(names)
        if C is not None and n_components is not None and n_components < C:
            raise ValueError(
                f"n_components={n_components} is smaller than the number of classes ({C}: "
                f"{names}); every class needs at least one component"
            )
        if components_per_class is not None:
            gm_kwargs["components_per_class"] = _components_per_class_ids(
                components_per_class, names
            )
        gm = estimator_class(method, semi_supervised=True)(n_components, **gm_kwargs)
    else:
        if components_per_class is not None:
            raise ValueError("components_per_class needs labels (a semi-supervised fit)")
        if n_components is None:
            raise ValueError("n_components is required for an unsupervised fit")
        if class_names is not None:
            names = _names_from_mapping(class_names)
            if len(names) != n_components:
                raise ValueError(
                    f"the model has {n_components} classes but {len(names)} class names were given"
                )
        gm = estimator_class(method, semi_supervised=False)(n_components, **gm_kwargs)
    if sample_weight is not None:
        sample_weight = _weights_as_rows(stack, sample_weight)
    fit_kwargs = {
        k: v
        for k, v in (("checkpoint_dir", checkpoint_dir), ("resume", resume), ("callback", callback))
        if v is not None and v is not False
    }
    fit_kwargs["feature_names"] = list(stack.variables)
    if spatial:  # an image (*spatial, D) and maps, in the stack's chunks
        X = da.moveaxis(stack.data, 0, -1)
        y = None if y is None else stack.to_map(y)
        if sample_weight is not None:
            sample_weight = stack.to_map(sample_weight)
    if y is None:
        if names is None:
            names = [f"class_{c}" for c in range(n_components)]
        gm.fit(X, sample_weight=sample_weight, class_names=names, **fit_kwargs)
    elif check is None:
        gm.fit(X, y, sample_weight, class_names=names, **fit_kwargs)
    else:
        with checking_labels(check):
            gm.fit(X, y, sample_weight, class_names=names, **fit_kwargs)
        if names is None:  # the classes were found by the check
            gm._set_names(None, check.resolved.class_names)
    gm.input_path_ = stack.path
    return gm


#: values that mark nodata in many products (integer fill values, ESRI/GDAL defaults)
_SENTINELS = (
    -9999.0,
    -99999.0,
    -32768.0,
    -32767.0,
    65535.0,
    65534.0,
    32767.0,
    -3.4028234663852886e38,
)


def check_nodata(
    stack: Stack, max_blocks: int = 4, share: float = 0.002, warn: bool = True
) -> list[str]:
    """Warn about attributes whose extreme value looks like an undeclared nodata value.

    Reads up to ``max_blocks`` chunks spread over the stack. An attribute is flagged when
    its minimum or maximum is held by at least ``share`` of the sampled pixels and lies
    far outside the other values (more than 20 inter-quartile ranges beyond the
    quartiles), or is one of the usual fill values (-9999, -32768, 65535 ...) and
    repeated. Returns the warnings' messages (each also issued as a ``UserWarning``
    with ``warn``).
    """
    grid = [len(c) for c in stack.chunks]
    n_blocks = math.prod(grid)
    picks = sorted({int(i) for i in np.linspace(0, n_blocks - 1, min(max_blocks, n_blocks))})
    blocks = []
    for flat in picks:
        idx = np.unravel_index(flat, grid)
        sl = tuple(
            slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(stack.chunks, idx, strict=True)
        )
        blocks.append(stack.data[(slice(None), *sl)].reshape(stack.n_features, -1))
    (sample,) = engine.compute(da.concatenate(blocks, axis=1))
    messages = []
    for j, name in enumerate(stack.variables):
        v = np.asarray(sample[j], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size < 100:
            continue
        for value in (v.min(), v.max()):
            hits = v == value
            frac = float(hits.mean())
            rest = v[~hits]
            if frac < share or rest.size < 10:
                continue
            q1, q3 = np.percentile(rest, [25, 75])
            iqr = max(q3 - q1, 1e-12 * max(abs(q1), abs(q3), 1.0))
            far = value < q1 - 20 * iqr or value > q3 + 20 * iqr
            if far or value in _SENTINELS:
                text = f"{value:.10g}"
                messages.append(
                    f"attribute {name!r}: {100 * frac:.1f}% of the sampled pixels hold {text}, "
                    f"far outside its other values ({rest.min():.6g} .. {rest.max():.6g}): "
                    "undeclared nodata? Declare it (--nodata "
                    f"{name}={text}, or open_stack(..., nodata={{{name!r}: {text}}})) or "
                    "it is fitted as data"
                )
                if warn:
                    warnings.warn(messages[-1], UserWarning, stacklevel=2)
    return messages


def write_cogs(
    post: xr.Dataset,
    out_dir: str | os.PathLike[str],
    *,
    colors: Sequence[str] | None = None,
    overwrite: bool = False,
    block: int = 512,
) -> dict[str, Path]:
    """Cloud-Optimised GeoTIFFs of a posterior's maps, written in bounded memory.

    ``label.tif`` (uint8, 255 = no class; a colour table, the class names as GDAL
    category names in ``label.tif.aux.xml`` and in its metadata, ``CLASS_<id>=<name>``),
    ``confidence.tif`` (float32) and ``probability.tif``
    (float32, one band per class, band descriptions = class names): georeferenced from
    the posterior's grid mapping and coordinates, tiled (``block`` pixels), DEFLATE
    compressed, with overviews (nearest for labels, average otherwise). Each is written
    block by block into a temporary tiled GeoTIFF beside the target, given overviews,
    copied to the COG layout by GDAL (streaming) and renamed into place: a killed run
    leaves no partial file under a target name.

    Parameters
    ----------
    post : xarray.Dataset
        A 2-D posterior (:func:`posterior`, or one read back from its Zarr store).
    out_dir : path
        Directory for the three files (created).
    colors : sequence of str, optional
        A colour per class (``#rrggbb`` or a name); default the label's CF
        ``flag_colors``, else :func:`daskem.plot.class_colors`.
    overwrite : bool
        Replace existing files of the same names.
    """
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling

    from .plot import class_colors

    _rioxarray()
    if "probability" not in post or "label" not in post:
        raise ValueError("not a daskem posterior of class maps (probability, label)")
    label = post["label"]
    if label.ndim != 2:
        raise ValueError(
            f"GeoTIFF export takes 2-D maps; this posterior's maps are on {label.dims}"
        )
    names = [str(n) for n in post["class"].values]
    if len(names) > 254:
        raise ValueError(f"{len(names)} classes: a uint8 label GeoTIFF holds at most 254")
    ydim, xdim = label.dims
    out = Path(out_dir)
    targets = {k: out / f"{k}.tif" for k in ("label", "confidence", "probability")}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(errno.EEXIST, "GeoTIFF already exists", existing[0])
    out.mkdir(parents=True, exist_ok=True)
    spatial = post["label"].rio.set_spatial_dims(x_dim=xdim, y_dim=ydim)
    crs = spatial.rio.crs
    if crs is None:
        warnings.warn(
            "the posterior has no CRS (no grid mapping): the GeoTIFFs are not georeferenced "
            "to a coordinate system",
            UserWarning,
            stacklevel=2,
        )
    transform = spatial.rio.transform()
    palette = class_colors(names, colors if colors is not None else label.attrs.get("flag_colors"))
    cmap = {
        i: tuple(int(c[k : k + 2], 16) for k in (1, 3, 5)) + (255,) for i, c in enumerate(palette)
    }
    cmap[255] = (0, 0, 0, 0)
    lab = label.data if hasattr(label.data, "dask") else da.from_array(label.values)
    lab = da.where(lab < 0, 255, lab).astype(np.uint8)[None]
    conf = post["confidence"].transpose(ydim, xdim).data[None].astype(np.float32)
    prob = post["probability"].transpose("class", ydim, xdim).data.astype(np.float32)
    jobs = {
        "label": (lab, 255, Resampling.nearest, None),
        "confidence": (conf, np.nan, Resampling.average, ["confidence"]),
        "probability": (prob, np.nan, Resampling.average, names),
    }
    written = {}
    for key, (arr, nodata, resampling, descriptions) in jobs.items():
        target = targets[key]
        remove_stale_temporaries(target)
        stem = f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
        tiled, cog = out / f"{stem}-tiled.tif", out / f"{stem}.tif"
        arr = da.asarray(arr).rechunk((arr.shape[0], block, block))
        profile = {
            "driver": "GTiff",
            "height": int(arr.shape[1]),
            "width": int(arr.shape[2]),
            "count": int(arr.shape[0]),
            "dtype": np.dtype(arr.dtype).name,
            "crs": crs,
            "transform": transform,
            "nodata": nodata,
            "tiled": True,
            "blockxsize": block,
            "blockysize": block,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        try:
            with rasterio.open(tiled, "w", **profile) as dst:
                y0 = 0
                for ny in arr.chunks[1]:
                    x0 = 0
                    for nx in arr.chunks[2]:
                        (values,) = engine.compute(arr[:, y0 : y0 + ny, x0 : x0 + nx])
                        dst.write(
                            np.asarray(values),
                            window=rasterio.windows.Window(x0, y0, nx, ny),
                        )
                        x0 += nx
                    y0 += ny
                if key == "label":
                    dst.write_colormap(1, cmap)
                    dst.update_tags(
                        1,
                        **{f"CLASS_{i}": n for i, n in enumerate(names)},
                        CLASS_NAMES=json.dumps(names),
                    )
                for i, d in enumerate(descriptions or ()):
                    dst.set_band_description(i + 1, d)
                factors = []
                f = 2
                while max(arr.shape[1:]) / f >= block / 2 and f <= 1024:
                    factors.append(f)
                    f *= 2
                if factors:
                    dst.build_overviews(factors, resampling)
                    dst.update_tags(ns="rio_overview", resampling=resampling.name)
            rasterio.shutil.copy(
                tiled,
                cog,
                driver="COG",
                COMPRESS="DEFLATE",
                BLOCKSIZE=block,
                OVERVIEWS="FORCE_USE_EXISTING" if factors else "NONE",
                BIGTIFF="IF_SAFER",
            )
            if target.exists() and not overwrite:
                raise FileExistsError(errno.EEXIST, "GeoTIFF already exists", str(target))
            os.replace(cog, target)
            if key == "label":  # the class names as GDAL category names (QGIS, gdalinfo)
                from xml.sax.saxutils import escape

                from .modelfile import atomic_write_text

                cats = "".join(f"<Category>{escape(n)}</Category>" for n in names)
                atomic_write_text(
                    target.with_name(target.name + ".aux.xml"),
                    '<PAMDataset><PAMRasterBand band="1"><CategoryNames>'
                    f"{cats}</CategoryNames></PAMRasterBand></PAMDataset>\n",
                )
        finally:
            for p in (tiled, cog):
                if p.exists():
                    p.unlink()
        written[key] = target
    return written


def _posterior_as_stack(post: xr.Dataset) -> Stack:
    """A posterior's grid as a :class:`Stack` (to place truth maps and vector files on it)."""
    label = post["label"]
    attrs = _var_attrs(label)
    return Stack(post, ("label",), tuple(label.dims), da.asarray(label.data)[None], None, attrs)


def _truth_map(post: xr.Dataset, truth: Any, class_column: str | None, what: str):
    """(class ids on the posterior's grid (-1: none), their names) from a truth source."""
    stack = _posterior_as_stack(post)
    if isinstance(truth, (str, os.PathLike)) and os.fspath(truth).lower().endswith(RASTER_SUFFIXES):
        arr = _open_raster(os.fspath(truth)).squeeze("band", drop=True)
        arr = arr.drop_vars([c for c in arr.coords if c not in arr.dims])
        if "nodata" in arr.attrs:
            arr.attrs["unlabelled_value"] = arr.attrs["nodata"]
        truth = arr
    try:
        resolved = _resolve_labels(
            stack, truth, None, require_every_class=False, class_column=class_column
        )
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    # a label raster without CF flags holds plain integer ids (named by their values)
    plain_ids = isinstance(truth, xr.DataArray) and "flag_values" not in truth.attrs
    return resolved.map, list(resolved.class_names), plain_ids


def assess(
    post: xr.Dataset,
    truth: Any,
    *,
    exclude: Any = None,
    class_column: str | None = None,
) -> dict[str, Any]:
    """Accuracy of a posterior's class map against reference labels.

    Parameters
    ----------
    post : xarray.Dataset
        A posterior (:func:`posterior`, or read back from its Zarr store).
    truth : str, path or xarray.DataArray
        Reference labels on the posterior's grid: a label raster (GeoTIFF, or a
        DataArray; CF ``flag_meanings`` name its classes, else class ids ``0..C-1``), or a
        vector file of labelled points/polygons (reprojected and rasterised, its class
        values matched to the posterior's class names).
    exclude : optional
        Pixels not to count (e.g. the training labels), in any form ``truth`` takes:
        every pixel it labels is left out.
    class_column : str, optional
        The class column of a vector ``truth``.

    Returns
    -------
    dict
        ``classes``, ``confusion`` (rows: reference, columns: map), ``overall_accuracy``,
        ``kappa`` (Cohen's), per class ``precision``, ``recall``, ``f1``, ``support``;
        ``n`` pixels compared, ``n_excluded``; ``area`` of each class in the map (pixels,
        and in the CRS's squared units when the grid has coordinates).
    """
    names = [str(n) for n in post["class"].values]
    C = len(names)
    ref, ref_names, plain_ids = _truth_map(post, truth, class_column, "truth")
    if plain_ids and all(n == f"class_{i}" for i, n in enumerate(names)):
        lut = np.arange(len(ref_names))  # plain ids on both sides: the class ids
        if len(ref_names) > C:
            raise ValueError(f"truth holds class ids up to {len(ref_names) - 1}, the map has {C}")
    elif plain_ids:  # plain ids: matched to classes named by their values ("1", "2" ...)
        ids = [str(i) for i in range(len(ref_names))]
        lut = np.array([names.index(i) if i in names else -1 for i in ids])
        # only ids that label something must match
        (present,) = engine.compute(da.unique(da.asarray(ref)[da.asarray(ref) >= 0]))
        missing = [ids[int(i)] for i in np.asarray(present) if lut[int(i)] < 0]
        if missing:
            raise ValueError(
                f"truth holds class ids {missing} that are not the map's classes {names}: "
                "give a truth whose classes are named like the model's (CF flag_meanings, "
                "or a vector file with the same class values)"
            )
    else:
        unknown = [n for n in ref_names if n not in names]
        if unknown:
            raise ValueError(
                f"truth classes {unknown} are not among the map's classes {names}: give a "
                "truth whose classes are named like the model's (CF flag_meanings, or a vector "
                "file with the same class values)"
            )
        lut = np.array([names.index(n) for n in ref_names])
    label = da.asarray(post["label"].data).astype(np.int64)
    ref = da.asarray(ref).astype(np.int64)
    lut_full = np.concatenate([lut, [-1]])
    ref_c = da.map_blocks(lambda r: lut_full[np.where(r >= 0, r, len(lut))], ref, dtype=np.int64)
    valid = (ref_c >= 0) & (label >= 0)
    n_excluded = 0
    if exclude is not None:
        ex, _, _ = _truth_map(post, exclude, class_column, "exclude")
        drop = da.asarray(ex) >= 0
        n_ex = (valid & drop).sum()
        valid = valid & ~drop
    else:
        n_ex = da.zeros((), dtype=np.int64)
    code = da.where(valid, ref_c * C + label, C * C)
    counts, mapped, n_ex = engine.compute(
        da.bincount(code.ravel(), minlength=C * C + 1),
        da.bincount(da.where(label >= 0, label, C).ravel(), minlength=C + 1),
        n_ex,
    )
    n_excluded = int(n_ex)
    cm = np.asarray(counts)[: C * C].reshape(C, C)
    n = int(cm.sum())
    if n == 0:
        raise ValueError("no pixel has both a reference class and a mapped class")
    oa = float(np.trace(cm)) / n
    pe = float((cm.sum(axis=0) * cm.sum(axis=1)).sum()) / n**2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    tp = np.diag(cm).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / cm.sum(axis=0)
        recall = tp / cm.sum(axis=1)
        f1 = 2 * precision * recall / (precision + recall)
    area_px = np.asarray(mapped)[:C]
    unit = None
    pixel_area = None
    try:
        transform, _, _ = _grid_transform(_posterior_as_stack(post))
        pixel_area = abs(transform.a * transform.e)
        unit = "CRS units squared"
    except ValueError:
        pass

    def clean(a):
        return [None if not np.isfinite(v) else float(v) for v in a]

    return {
        "classes": names,
        "confusion": cm.tolist(),
        "confusion_axes": "rows: reference, columns: map",
        "n": n,
        "n_excluded": n_excluded,
        "overall_accuracy": oa,
        "kappa": float(kappa),
        "precision": clean(precision),
        "recall": clean(recall),
        "f1": clean(f1),
        "support": cm.sum(axis=1).tolist(),
        "area_pixels": area_px.tolist(),
        "area": None if pixel_area is None else (area_px * pixel_area).tolist(),
        "area_unit": unit,
    }


def select_k(
    stack: Stack,
    ks: Sequence[int],
    labels: Any = None,
    *,
    criterion: str = "bic",
    method: str = "gmm",
    callback: Any = None,
    class_column: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Choose the number of components of a model of a stack by BIC or AIC.

    Every K of ``ks`` is fitted on every pixel, all in the same passes over the data
    (:func:`daskem.base.select_n_components`); ``kwargs`` go to the estimator of
    ``method`` (e.g. ``covariance_type``). With ``labels`` (anything
    :func:`labels_for_stack` takes) the fits are semi-supervised and K counts
    components, at least the number of classes. Returns that function's dict (``best``,
    ``values``, ``models`` ...).
    """
    from .base import select_n_components

    cls = estimator_class(method, semi_supervised=labels is not None)
    if getattr(cls, "spatial_input", False) or getattr(cls, "sequence_input", False):
        raise ValueError(f"select_k fits pixel-wise models; method {method!r} is not one")
    if kwargs.get("nan_policy") is None:
        kwargs["nan_policy"] = "marginalize" if "marginalize" in cls.nan_policies else "omit"
    _default_pattern_weights(cls, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    y, check = None, None
    if labels is not None:  # checked by the pass before EM
        y, resolved = _stack_labels(
            stack, labels, None, kwargs["nan_policy"], class_column, None, 0, deferred=True
        )
        check = resolved.check
    with checking_labels(check) if check is not None else contextlib.nullcontext():
        out = select_n_components(
            lambda k: cls(k, **kwargs), stack.rows(), ks, y, criterion=criterion, callback=callback
        )
    names = None if check is None else check.resolved.class_names
    for est in out["models"].values():
        est._set_names(list(stack.variables), names)
        est.input_path_ = stack.path
    return out


def convert(
    source: Any,
    out: str | os.PathLike[str],
    *,
    variables: Sequence[str] | None = None,
    nodata: float | Mapping[str, float] | None = None,
    mask: str | xr.DataArray | None = None,
    chunks: int | Mapping[str, int] | None = None,
    time_dim: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stack (GeoTIFFs, NetCDF, Zarr ...: anything :func:`open_stack` reads) to a
    Zarr store for repeated runs, chunk by chunk and atomically.

    Every attribute becomes a float variable on the stack's dims with nodata (and masked
    pixels) as NaN (``_FillValue``), its grid mapping (the CRS variable) kept as a
    coordinate; spatial chunks from ``chunks`` (per dim or one int; default the input's),
    a time dim in one chunk. Returns the store's path.
    """
    stack = open_stack(
        source, variables, nodata=nodata, mask=mask, chunks=chunks, time_dim=time_dim
    )
    gm = (stack.var_attrs or {}).get("grid_mapping")
    src = stack.dataset
    data_vars = {}
    for j, name in enumerate(stack.variables):
        attrs = {
            k: src[name].attrs[k]
            for k in ("long_name", "units", "standard_name")
            if name in src.variables and k in src[name].attrs
        }
        if gm:
            attrs["grid_mapping"] = gm
        data_vars[name] = (stack.dims, stack.data[j], attrs)
    ds = xr.Dataset(
        data_vars,
        coords=stack.spatial_coords(),
        attrs={
            **{k: _plain(v) for k, v in src.attrs.items() if k not in _VALUE_ATTRS},
            "daskem_converted_from": str(stack.path or type(source).__name__),
            "daskem_version": __version__,
        },
    )
    encoding = {name: {"_FillValue": np.nan} for name in stack.variables}
    return atomic_to_zarr(ds, out, overwrite=overwrite, encoding=encoding)


def _fit_sequences(
    stack: Stack,
    n_components: int | None,
    labels: Any,
    *,
    method: str,
    class_names,
    checkpoint_dir,
    resume,
    callback,
    sample_weight,
    components_per_class,
    **kwargs: Any,
):
    """:func:`fit_stack` for models of every pixel's time series (a time stack)."""
    if stack.time_dim is None:
        raise ValueError(
            f"method {method!r} models every pixel's time series: open the stack with "
            "time_dim=... (the CLI's --time-dim)"
        )
    if sample_weight is not None:
        raise ValueError(f"method {method!r} takes no sample_weight")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "max_iter" in kwargs:  # daskem's name for hmmlearn's n_iter
        kwargs["n_iter"] = kwargs.pop("max_iter")
    kwargs.pop("label_weight", None)  # labelled dates are clamped: no weight
    fit_kwargs = {
        k: v
        for k, v in (("checkpoint_dir", checkpoint_dir), ("resume", resume), ("callback", callback))
        if v is not None and v is not False
    }
    if labels is not None:
        # checked by the fit's pass before EM, unless the classes must be known by name
        deferred = not isinstance(components_per_class, Mapping)
        y, got = sequence_labels(stack, labels, class_names=class_names, deferred=deferred)
        check, names = (got, got.names) if deferred else (None, got)
        if names is not None and n_components is not None and n_components < len(names):
            raise ValueError(
                f"n_components={n_components} is smaller than the number of classes "
                f"({len(names)}: {names}); every class needs at least one state"
            )
        if components_per_class is not None:
            kwargs["components_per_class"] = _components_per_class_ids(components_per_class, names)
        gm = estimator_class(method, semi_supervised=True)(n_components, **kwargs)
        with checking_labels(check) if check is not None else contextlib.nullcontext():
            gm.fit(
                stack.sequences(),
                y,
                feature_names=list(stack.variables),
                class_names=names,
                **fit_kwargs,
            )
        if names is None:  # the classes were found by the check
            gm._set_names(None, check.resolved)
        gm.input_path_ = stack.path
        return gm
    if components_per_class is not None:
        raise ValueError("components_per_class needs labels (a semi-supervised fit)")
    if n_components is None:
        raise ValueError("n_components is required for an unsupervised fit")
    names = None
    if class_names is not None:
        names = _names_from_mapping(class_names)
        if len(names) != n_components:
            raise ValueError(
                f"the model has {n_components} states but {len(names)} class names were given"
            )
    if names is None:
        names = [f"state_{k}" for k in range(n_components)]
    gm = estimator_class(method)(n_components, **kwargs)
    gm.fit(stack.sequences(), feature_names=list(stack.variables), class_names=names, **fit_kwargs)
    gm.input_path_ = stack.path
    return gm


def sequence_labels(
    stack: Stack,
    labels: str | xr.DataArray,
    *,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    map_only: bool = False,
    deferred: bool = False,
) -> tuple[da.Array, Any]:
    """Training labels of a time stack, aligned with :meth:`Stack.sequences`.

    Parameters
    ----------
    stack : Stack
        A time stack (``time_dim`` set).
    labels : str or xarray.DataArray
        A label map: the name of a variable of ``stack.dataset`` or a DataArray, on the
        stack's ``(time, *pixel dims)`` (a class per date) or on the pixel dims only (a
        class for every date of the pixel). ``-1`` (or the ``unlabelled_value`` /
        ``_FillValue`` / ``missing_value`` attribute, or NaN) marks unlabelled entries;
        CF ``flag_values`` / ``flag_meanings`` give the class ids and names.
    class_names : optional
        Class names by id (default: from ``flag_meanings``, else ``class_0`` ...).
    map_only : bool
        Return the class ids on the stack's grid and chunks instead (the time axis one
        chunk), unvalidated (``-2`` marks values that are not class ids).
    deferred : bool
        Return the labels unchecked, with their check instead of the class names: a
        callable taking the fit's label summary (:func:`daskem.base.checking_labels`),
        so the labels cost no pass of their own.

    Returns
    -------
    labels : dask.array.Array of int32, shape (n_sequences, n_times)
        Class id of every date of every pixel, ``-1`` unlabelled.
    class_names : list of str

    Raises
    ------
    ValueError
        Labels on other dims, dates or grid than the stack's, values that are not class
        ids (or flag values), or no labelled date at all.
    """
    if stack.time_dim is None:
        raise ValueError("labels per date need a time stack (time_dim=...)")
    if isinstance(labels, str):
        if labels not in stack.dataset.variables:
            raise ValueError(
                f"no label variable {labels!r} in the stack (variables: "
                f"{sorted(map(str, stack.dataset.data_vars))})"
            )
        arr = stack.dataset[labels]
    elif isinstance(labels, xr.DataArray):
        arr = labels
    else:
        raise ValueError(
            "labels of a time stack must be a label-map variable name or a DataArray on "
            "(time, *pixel dims) or the pixel dims"
        )
    tdim, pdims = stack.time_dim, stack.pixel_dims
    if set(arr.dims) not in (set(stack.dims), set(pdims)):
        raise ValueError(
            f"labels on dims {arr.dims}: expected the stack's {stack.dims} (a class per date) "
            f"or {pdims} (every date)"
        )
    sizes = dict(zip(stack.dims, stack.shape, strict=True))
    for d in arr.dims:
        if arr.sizes[d] != sizes[d]:
            what = "dates" if d == tdim else "pixels"
            raise ValueError(
                f"labels have {arr.sizes[d]} {what} along {d!r} but the stack has {sizes[d]}"
            )
        a, b = arr.coords.get(d), stack.dataset.coords.get(d)
        if (
            a is not None
            and b is not None
            and not np.array_equal(np.asarray(a.values), np.asarray(b.values))
        ):
            what = "dates that are not the stack's" if d == tdim else "another grid"
            raise ValueError(f"labels are on {what} (coordinate {d!r} differs)")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"labels must hold integer class ids, got dtype {arr.dtype}")
    flag_values, names = _class_names_from(arr.attrs, class_names)
    unlabelled = _unlabelled_value(arr.attrs)
    if tdim not in arr.dims:
        arr = arr.expand_dims({tdim: stack.n_times})
    raw = _dask_data(arr.transpose(*stack.dims), None).rechunk(stack.chunks)
    t = stack.dims.index(tdim)
    lab = raw.map_blocks(
        _normalise_label_block,
        dtype=np.int32,
        unlabelled=unlabelled,
        flag_values=flag_values,
        meta=np.empty((0,) * raw.ndim, np.int32),
    ).rechunk({t: -1})
    if map_only:
        return lab, names
    pix = [i for i in range(len(stack.dims)) if i != t]
    seq = da.reshape_blockwise(lab.transpose(*pix, t), (stack.n_sequences, stack.n_times))
    check = _SequenceLabelCheck(flag_values, None if names is None else list(names))
    if deferred:  # checked by the fit, from its pass before EM
        return seq, check
    lo, hi = engine.compute(seq.min(), seq.max())
    return seq, check(engine.LabelSummary(int(lo), int(hi), *([None] * 7)))


@dataclass
class _SequenceLabelCheck:
    """The validation of a time stack's labels from their summary (the range of the
    values): returns the class names or raises ``ValueError``."""

    flag_values: np.ndarray | None
    names: list[str] | None
    resolved: list[str] | None = None  # the class names the last call found

    def __call__(self, summary: engine.LabelSummary) -> list[str]:
        return self._check_labels(summary)

    def _check_labels(self, summary: engine.LabelSummary) -> list[str]:
        lo, hi, names = int(summary.y_min), int(summary.y_max), self.names
        if lo < -1:
            fv = self.flag_values
            raise ValueError(
                "labels hold values that are neither -1 (unlabelled) nor a class id"
                + ("" if fv is None else f" among flag_values {fv.tolist()}")
            )
        if hi < 0:
            raise ValueError("the labels label no date (every entry is unlabelled)")
        if names is None:
            names = [f"class_{c}" for c in range(hi + 1)]
        elif hi >= len(names):
            raise ValueError(f"labels hold class id {hi} but there are {len(names)} classes")
        self.resolved = list(names)
        return self.resolved


def estimator_class(method: str = "gmm", *, semi_supervised: bool = False) -> type:
    """The estimator of model kind ``method`` (as model files and ``--method`` name it):
    its semi-supervised classifier, or its unsupervised estimator."""
    from sklearn.base import ClassifierMixin

    from .modelfile import ESTIMATORS, load_plugins

    load_plugins()
    found = [
        cls
        for cls in ESTIMATORS.values()
        if cls.kind == method and issubclass(cls, ClassifierMixin) == semi_supervised
    ]
    if not found:
        kinds = sorted({cls.kind for cls in ESTIMATORS.values()})
        what = "semi-supervised" if semi_supervised else "unsupervised"
        raise ValueError(f"method {method!r} has no {what} estimator; methods: {kinds}")
    return found[0]


def _components_per_class_ids(
    components_per_class: int | Mapping[Any, int] | None, names: list[str]
) -> int | dict[int, int] | None:
    """``components_per_class`` keyed by class id (given by class name or id)."""
    if not isinstance(components_per_class, Mapping):
        return components_per_class
    out = {}
    for key, count in components_per_class.items():
        if isinstance(key, str) and key in names:
            out[names.index(key)] = count
        elif isinstance(key, (int, np.integer)) and 0 <= int(key) < len(names):
            out[int(key)] = count
        else:
            raise ValueError(
                f"components_per_class names class {key!r}, which is not among the classes {names}"
            )
    return out


def _weights_as_rows(stack: Stack, w: Any) -> da.Array:
    if isinstance(w, xr.DataArray):
        if set(w.dims) != set(stack.dims):
            raise ValueError(
                f"sample_weight dims {w.dims} are not the stack's spatial dims {stack.dims}"
            )
        w = w.transpose(*stack.dims).data
    w = w if isinstance(w, da.Array) else da.asarray(np.asarray(w))
    if tuple(w.shape) == stack.shape:
        return _spatial_to_rows(w.rechunk(stack.chunks))
    if tuple(w.shape) == (stack.n_pixels,):
        return w.rechunk({0: stack.row_chunks})
    raise ValueError(
        f"sample_weight must have the stack's spatial shape {stack.shape} or "
        f"({stack.n_pixels},), got {tuple(w.shape)}"
    )


# --------------------------------------------------------------------------- posterior


def _entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """Shannon entropy in nats, ``0 log 0 = 0``, NaN where ``p`` is NaN."""
    with np.errstate(invalid="ignore"):
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=axis)


def _posterior_block(block, *labels, state, n_classes, rows, impute=None):
    """(D, *b) attributes (+ (*b) labels) -> (C + 2 [+ 2 D], *b) float64.

    Planes ``0..C-1`` are class probabilities, ``C`` the entropy, ``C + 1`` the log
    density; with ``impute`` (a row function ``(state, X) -> (n, 2 D)``) then the D
    attributes with gaps filled and the D conditional standard deviations (NaN where the
    value was observed). ``state`` is ``(model, params)``: the model's
    ``class_posterior`` gives the planes. Labelled pixels with any observed attribute are
    clamped to their class.
    """
    model, params = state
    D = block.shape[0]
    spatial = block.shape[1:]
    n = math.prod(spatial)
    X = block.reshape(D, n)
    C = n_classes
    out = np.empty((C + 2 + (2 * D if impute is not None else 0), n))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xb = X[:, s:e].T
        proba, logd = model.class_posterior(params, xb, C)
        out[:C, s:e] = proba.T
        out[C, s:e] = _entropy(proba, axis=1)
        out[C + 1, s:e] = logd
        if impute is not None:
            both = impute(state, xb)
            filled, std = both[:, :D], both[:, D:]
            std[std == 0.0] = np.nan  # observed
            out[C + 2 : C + 2 + D, s:e] = filled.T
            out[C + 2 + D :, s:e] = std.T
    if labels:
        y = labels[0].reshape(n)
        sel = (y >= 0) & (y < C) & np.isfinite(X).any(axis=0)
        if sel.any():
            out[:C, sel] = 0.0
            out[y[sel], np.flatnonzero(sel)] = 1.0
            out[C, sel] = 0.0
    return out.reshape((out.shape[0], *spatial))


def _planes(block, start, stop, dtype):
    return block[start:stop].astype(dtype)


def _plane(block, i, dtype):
    return block[i].astype(dtype)


def _max_plane(block, n_classes):
    return block[:n_classes].max(axis=0).astype(np.float32)


def _nothing_observed_plane(block, i):
    return np.isnan(block[i]).astype(np.int8)


def _label_plane(block, n_classes):
    p = block[:n_classes]
    out = p.argmax(axis=0).astype(np.int16)
    out[np.isnan(p[0])] = -1
    return out


def _jsonable(a: Any) -> Any:
    a = np.asarray(a)
    return a.tolist()


def posterior(
    model: GaussianMixture,
    stack: Stack,
    labels: Any = None,
    *,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    impute: bool = False,
) -> xr.Dataset:
    """The lazy posterior of every pixel of a stack under a fitted mixture.

    Computed as one ``map_blocks`` over the stack's blocks producing, per block, a
    float64 array of the class probabilities, the entropy and the log density; the
    output variables are per-block slices of it, so writing all of them (e.g. with
    :func:`write_posterior`) reads and computes each block once.

    Parameters
    ----------
    model : GaussianMixture
        Fitted (e.g. by :func:`fit_stack`). Class names come from its
        ``class_names_`` if set, else ``class_names``, else ``class_0`` ...
    stack : Stack
        Must have the model's features (``model.feature_names_in_`` if set).
    labels : optional
        Training labels (anything :func:`labels_for_stack` accepts). When given,
        labelled pixels with at least one observed attribute are clamped to their
        class: probability 1, confidence 1, entropy 0, ``label`` = their class, as in
        the semi-supervised fit. ``log_likelihood`` stays the model density. Without
        labels every pixel shows the model posterior ``p(class | x)``.
    class_names : sequence of str or mapping, optional
    impute : bool, default False
        Also return the stack's attributes with their gaps filled (see below), for
        models that can fill them (an ``impute`` method, as the Gaussian mixtures have).

    Returns
    -------
    xarray.Dataset
        Lazy, chunked like the stack, with the stack's spatial coordinates (incl.
        scalar ones such as ``spatial_ref``) and attributes, a ``class`` coordinate,
        and

        * ``probability`` (class, *spatial) float32 -- ``p(class | x_observed)``;
        * ``label`` (*spatial) int16 -- MAP class, ``-1`` where every attribute is
          missing (CF ``flag_values`` / ``flag_meanings``, ``unlabelled_value = -1``);
        * ``confidence`` float32 -- the largest class probability;
        * ``entropy`` float32 -- of the class probabilities, in nats;
        * ``log_likelihood`` float32 -- ``log p(x_observed)`` under the mixture (an
          outlier score; marginal over the observed attributes for partial pixels).

        For models whose pixels see their neighbours (the spatial prior,
        :class:`~daskem.SpatialGaussianMixture`), the class outputs are the mean-field
        ones at the fitted parameters, computed with halos across chunk borders; pixels
        with every attribute missing then take their class from their neighbours and are
        flagged by ``from_prior`` (int8, 1 = no attribute observed).

        Otherwise pixels with every attribute missing are NaN (``label`` -1) in every output;
        pixels with some missing use the exact marginal over the observed ones. The
        model parameters and provenance are in the attributes.

        With ``impute``, for every attribute ``v`` of the stack:

        * ``v`` float32 -- the attribute with each missing value of a pixel that has
          some attribute observed replaced by its conditional mean given the observed
          ones, mixed over the pixel's posterior (:meth:`GaussianMixture.impute`);
          observed values unchanged; NaN where nothing is observed;
        * ``v_std`` float32 -- the conditional standard deviation of each filled value;
          NaN where the value was observed (or nothing is).
    """
    model._check_fitted()
    if getattr(model, "sequence_input", False):
        if impute:
            raise ValueError(f"a {type(model).__name__} does not fill missing attributes")
        return _sequence_posterior(model, stack, class_names, labels)
    impute_rows = getattr(model, "_impute_rows", None)
    if impute and impute_rows is None:
        raise ValueError(
            f"a {type(model).__name__} cannot fill missing attributes (its model has no "
            "gap filling): posterior maps without impute only"
        )
    stack = _check_features(model, stack)
    state = (model._model(), model._fitted_params())
    C = int(model.n_classes_)
    names = getattr(model, "class_names_", None)
    if names is None:
        names = (
            _names_from_mapping(class_names)
            if class_names is not None
            else [f"class_{c}" for c in range(C)]
        )
    names = [str(n) for n in names]
    if len(names) != C:
        raise ValueError(f"the model has {C} classes but {len(names)} class names were given")

    data = stack.data
    args: list[Any] = [data]
    if labels is not None:
        resolved = _resolve_labels(
            stack, labels, class_names, n_classes=C, require_every_class=False
        )
        generic = all(n == f"class_{i}" for i, n in enumerate(resolved.class_names))
        if not generic and resolved.class_names != names[: len(resolved.class_names)]:
            raise ValueError(
                f"the labels' classes {resolved.class_names} differ from the model's "
                f"classes {names}"
            )
        args.append(resolved.map)
    D = stack.n_features
    if impute:
        taken = {"probability", "label", "confidence", "entropy", "log_likelihood", "class"}
        clash = sorted(taken & {n for v in stack.variables for n in (v, f"{v}_std")})
        if clash:
            raise ValueError(
                f"cannot impute: the stack's variables {clash} clash with the posterior's "
                "output names; rename them"
            )
    posterior_map = getattr(model, "posterior_map", None)
    if posterior_map is not None:  # pixels see their neighbours: mean-field maps
        if impute:
            raise ValueError(
                f"a {type(model).__name__} does not fill missing attributes: posterior maps "
                "without impute only"
            )
        planes = posterior_map(
            da.moveaxis(data, 0, -1), args[1] if len(args) > 1 else None, n_classes=C
        )
        stacked = planes.rechunk(((C + 2,), *stack.chunks))
    else:
        stacked = da.map_blocks(
            _posterior_block,
            *args,
            chunks=((C + 2 + (2 * D if impute else 0),), *stack.chunks),
            dtype=np.float64,
            meta=np.empty((0,) * data.ndim, np.float64),
            state=state,
            n_classes=C,
            rows=max(
                256, _POSTERIOR_VALUES // max(stack.n_features, len(model.component_classes_))
            ),
            impute=impute_rows if impute else None,
            name=f"daskem-posterior-{uuid.uuid4().hex[:12]}",
        )
    spatial = stack.chunks
    probability = stacked.map_blocks(
        _planes, 0, C, np.float32, chunks=((C,), *spatial), dtype=np.float32
    )

    def plane(i: int) -> da.Array:
        return stacked.map_blocks(
            _plane, i, np.float32, chunks=spatial, drop_axis=0, dtype=np.float32
        )

    confidence = stacked.map_blocks(_max_plane, C, chunks=spatial, drop_axis=0, dtype=np.float32)
    label = stacked.map_blocks(_label_plane, C, chunks=spatial, drop_axis=0, dtype=np.int16)

    dims = stack.dims
    gm_attrs = (
        {"grid_mapping": stack.var_attrs["grid_mapping"]}
        if stack.var_attrs and ("grid_mapping" in stack.var_attrs)
        else {}
    )
    flag_names = " ".join(n.replace(" ", "_") for n in names)
    data_vars = {
        "probability": (
            ("class", *dims),
            probability,
            {"long_name": "posterior class probability", "units": "1", **gm_attrs},
        ),
        "label": (
            dims,
            label,
            {
                "long_name": "most probable class",
                "flag_values": np.arange(C, dtype=np.int16),
                "flag_meanings": flag_names,
                "unlabelled_value": -1,
                "comment": "-1 where every attribute is missing"
                if posterior_map is None
                else "pixels with every attribute missing take the class their neighbours "
                "give them through the spatial prior (flagged by from_prior)",
                **gm_attrs,
            },
        ),
        "confidence": (
            dims,
            confidence,
            {"long_name": "largest posterior class probability", "units": "1", **gm_attrs},
        ),
        "entropy": (
            dims,
            plane(C),
            {"long_name": "entropy of the class probabilities", "units": "nats", **gm_attrs},
        ),
        "log_likelihood": (
            dims,
            plane(C + 1),
            {
                "long_name": "log density of the observed attributes under the mixture",
                "comment": "low values flag outliers",
                **gm_attrs,
            },
        ),
    }
    if posterior_map is not None:
        data_vars["from_prior"] = (
            dims,
            stacked.map_blocks(_nothing_observed_plane, C + 1, drop_axis=0, dtype=np.int8),
            {
                "long_name": "class from the spatial prior only (no attribute observed)",
                "flag_values": np.array([0, 1], dtype=np.int8),
                "flag_meanings": "observed from_prior",
                **gm_attrs,
            },
        )
    if impute:
        src = stack.dataset
        for j, v in enumerate(stack.variables):
            base = {
                k: src[v].attrs[k]
                for k in ("long_name", "units", "standard_name")
                if v in src.variables and k in src[v].attrs
            }
            name = base.get("long_name", v)
            data_vars[v] = (
                dims,
                plane(C + 2 + j),
                {
                    **base,
                    "long_name": f"{name}, gaps filled",
                    "comment": "missing values replaced by their conditional mean given the "
                    "pixel's observed attributes under the mixture; see "
                    f"{v}_std",
                    **gm_attrs,
                },
            )
            data_vars[f"{v}_std"] = (
                dims,
                plane(C + 2 + D + j),
                {
                    **{k: base[k] for k in ("units",) if k in base},
                    "long_name": f"standard deviation of the filled {name}",
                    "comment": "conditional standard deviation of the filled value; NaN where "
                    "the value was observed",
                    **gm_attrs,
                },
            )
    coords = dict(stack.spatial_coords())
    # object dtype: stored as variable-length strings (specified in Zarr v2 and v3)
    coords["class"] = xr.Variable("class", np.array(names, dtype=object), {"long_name": "class"})
    attrs = dict(stack.dataset.attrs)
    attrs.update(_model_attrs(model, names, stack))
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _check_features(model: Any, stack: Stack) -> Stack:
    """``stack`` with the model's features in the model's order, or a clear error."""
    feature_names = getattr(model, "feature_names_in_", None)
    if (
        feature_names is not None
        and list(feature_names) != list(stack.variables)
        and sorted(feature_names) == sorted(stack.variables)
    ):
        stack = stack.select(list(feature_names))
    if feature_names is not None and list(feature_names) != list(stack.variables):
        raise ValueError(
            f"the model was fitted on features {list(feature_names)} but the stack has "
            f"{list(stack.variables)}"
        )
    if model.n_features_in_ != stack.n_features:
        raise ValueError(
            f"the model was fitted on {model.n_features_in_} features but the stack has "
            f"{stack.n_features}"
        )
    return stack


def _sequence_block(block, *labels, state, t_axis, K):
    """Posterior planes of one block of a time stack: per date the state probabilities
    (K * T, state-major) and the decoded state (T), per pixel the log-likelihood, the
    number of changes and the index of the first change (-1: none)."""
    model, params = state
    D = block.shape[0]
    T = block.shape[1 + t_axis]
    pix = [1 + i for i in range(block.ndim - 1) if i != t_axis]
    sp = tuple(block.shape[i] for i in pix)
    n = math.prod(sp)
    rows = np.ascontiguousarray(block.transpose(*pix, 1 + t_axis, 0)).reshape(n, T * D)
    lab = None
    if labels:  # class ids on (time, *pixel) of this block, as the stack's dims
        lb = np.asarray(labels[0])
        lab = lb.transpose(*[i - 1 for i in pix], t_axis).reshape(n, T).astype(np.int64)
        lab[lab < -1] = -1
    out = np.full((K * T + T + 3, n), np.nan)
    if n:
        gamma, ll = model.posterior(params, rows, lab)
        path, _ = model.decode(params, rows, lab)
        seen = np.isfinite(ll)
        out[: K * T] = gamma.transpose(2, 1, 0).reshape(K * T, n)
        out[K * T : K * T + T] = np.where(seen[None, :], path.T, -1)
        out[K * T + T] = ll
        change = path[:, 1:] != path[:, :-1]
        out[K * T + T + 1] = np.where(seen, change.sum(axis=1), np.nan)
        first = np.where(change.any(axis=1), change.argmax(axis=1) + 1, -1)
        out[K * T + T + 2] = np.where(seen, first, np.nan)
    return out.reshape(K * T + T + 3, *sp)


def _state_probability(block, K, T):
    return block[: K * T].reshape(K, T, *block.shape[1:]).astype(np.float32)


def _date_planes(block, start, T, dtype):
    p = block[start : start + T]
    if np.issubdtype(dtype, np.integer):
        return np.where(np.isnan(p), -1, p).astype(dtype)
    return p.astype(dtype)


def _date_confidence(block, K, T):
    g = block[: K * T].reshape(K, T, *block.shape[1:])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(g, axis=0).astype(np.float32) if K else g[0]


def _first_change(block, i, times):
    idx = block[i]
    ok = np.isfinite(idx) & (idx >= 0)
    j = np.where(ok, idx, 0).astype(np.int64)
    if np.issubdtype(times.dtype, np.datetime64):
        return np.where(ok, times[j], np.datetime64("NaT"))
    if np.issubdtype(times.dtype, np.number):
        return np.where(ok, times[j].astype(np.float64), np.nan)
    return np.where(ok, j, -1).astype(np.int32)


def _sequence_posterior(
    model: Any, stack: Stack, class_names: Any = None, labels: Any = None
) -> xr.Dataset:
    """:func:`posterior` of a model of every pixel's time series (a time stack)."""
    if stack.time_dim is None:
        raise ValueError(
            f"a {type(model).__name__} models every pixel's time series: open the stack with "
            "time_dim=... (the CLI's --time-dim)"
        )
    stack = _check_features(model, stack)
    K = int(len(model.means_))
    T = stack.n_times
    t = stack.dims.index(stack.time_dim)
    params = model._fitted_params()
    seq_model = model._model(n_times=T, variable_length=False)
    names = getattr(model, "class_names_", None)
    if names is None and class_names is not None:
        names = _names_from_mapping(class_names)
    if names is not None and len(names) == int(model.n_classes_):
        # every state named after its class (further states of a class numbered)
        cc = np.asarray(model.component_classes_)
        seen: dict[int, int] = {}
        state_names = []
        for c in cc:
            seen[int(c)] = seen.get(int(c), 0) + 1
            suffix = "" if seen[int(c)] == 1 else f"_{seen[int(c)]}"
            state_names.append(f"{names[int(c)]}{suffix}")
        names = state_names
    elif names is None:
        names = [f"state_{k}" for k in range(K)]
    names = [str(n) for n in names]
    if len(names) != K:
        raise ValueError(f"the model has {K} states but {len(names)} names were given")
    data = stack.data
    if len(data.chunks[1 + t]) != 1:
        data = data.rechunk({1 + t: -1})
    pchunks = stack.pixel_chunks
    P = K * T + T + 3
    extra = []
    if labels is not None:
        lab_map, lab_names = sequence_labels(stack, labels, class_names=None, map_only=True)
        model_names = list(getattr(model, "class_names_", []) or [])
        generic = all(n == f"class_{i}" for i, n in enumerate(lab_names or []))
        if lab_names and model_names and not generic and lab_names != model_names[: len(lab_names)]:
            raise ValueError(
                f"the labels' classes {lab_names} differ from the model's classes {model_names}"
            )
        extra.append(lab_map.rechunk(data.chunks[1:]))
    stacked = da.map_blocks(
        _sequence_block,
        data,
        *extra,
        chunks=((P,), *pchunks),
        drop_axis=1 + t,
        dtype=np.float64,
        meta=np.empty((0,) * (data.ndim - 1), np.float64),
        state=(seq_model, params),
        t_axis=t,
        K=K,
        name=f"daskem-hmm-posterior-{uuid.uuid4().hex[:12]}",
    )
    tdim, pdims = stack.time_dim, stack.pixel_dims
    state_probability = stacked.map_blocks(
        _state_probability,
        K,
        T,
        chunks=((K,), (T,), *pchunks),
        new_axis=1,
        dtype=np.float32,
    )
    state = stacked.map_blocks(
        _date_planes, K * T, T, np.int16, chunks=((T,), *pchunks), dtype=np.int16
    )
    confidence = stacked.map_blocks(
        _date_confidence, K, T, chunks=((T,), *pchunks), dtype=np.float32
    )

    def plane(i: int, dtype) -> da.Array:
        return stacked.map_blocks(_plane, i, dtype, chunks=pchunks, drop_axis=0, dtype=dtype)

    times = np.asarray(stack.dataset[tdim].values) if tdim in stack.dataset.coords else np.arange(T)
    fc_dtype = (
        times.dtype
        if np.issubdtype(times.dtype, np.datetime64)
        else np.float64
        if np.issubdtype(times.dtype, np.number)
        else np.int32
    )
    first_change = stacked.map_blocks(
        _first_change, K * T + T + 2, times, chunks=pchunks, drop_axis=0, dtype=fc_dtype
    )
    gm_attrs = (
        {"grid_mapping": stack.var_attrs["grid_mapping"]}
        if stack.var_attrs and ("grid_mapping" in stack.var_attrs)
        else {}
    )
    flag_names = " ".join(n.replace(" ", "_") for n in names)
    n_changes = stacked.map_blocks(
        _date_planes, K * T + T + 1, 1, np.int16, chunks=((1,), *pchunks), dtype=np.int16
    )[0]
    data_vars = {
        "state_probability": (
            ("states", tdim, *pdims),
            state_probability,
            {"long_name": "posterior state probability at each date", "units": "1", **gm_attrs},
        ),
        "state": (
            (tdim, *pdims),
            state,
            {
                "long_name": "most likely state sequence (Viterbi)",
                "flag_values": np.arange(K, dtype=np.int16),
                "flag_meanings": flag_names,
                "unlabelled_value": -1,
                "comment": "-1 where the pixel has nothing observed on any date",
                **gm_attrs,
            },
        ),
        "confidence": (
            (tdim, *pdims),
            confidence,
            {
                "long_name": "largest posterior state probability at each date",
                "units": "1",
                **gm_attrs,
            },
        ),
        "n_changes": (
            pdims,
            n_changes,
            {
                "long_name": "number of state changes along the Viterbi path",
                "comment": "-1 where the pixel has nothing observed",
                **gm_attrs,
            },
        ),
        "first_change": (
            pdims,
            first_change,
            {
                "long_name": f"first {tdim} at which the Viterbi state differs from the one before",
                "comment": "missing (NaT/NaN, or -1 for an index) where the state never changes",
                **gm_attrs,
            },
        ),
        "log_likelihood": (
            pdims,
            plane(K * T + T, np.float32),
            {
                "long_name": "log-likelihood of the pixel's observed time series under the model",
                "comment": "low values flag unusual series",
                **gm_attrs,
            },
        ),
    }
    coords = dict(stack.spatial_coords())
    # the dim is "states": "state" is the decoded state sequence
    coords["states"] = xr.Variable(
        "states", np.array(names, dtype=object), {"long_name": "hidden state"}
    )
    attrs = dict(stack.dataset.attrs)
    attrs.update(_model_attrs(model, names, stack))
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _finite_or_str(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(x)


def _model_attrs(model: Any, names: list[str], stack: Stack) -> dict[str, Any]:
    """Provenance attributes: the model kind, options and fitted parameters, as JSON
    strings where they are structured (``model_fitted`` holds the model's own fitted
    parameters, e.g. ``weights``/``means``/``covariances`` of a Gaussian mixture)."""
    attrs: dict[str, Any] = {
        "daskem_version": __version__,
        "daskem_date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_kind": model.kind,
        "model_type": type(model).__name__,
        "model_parameters": json.dumps(params_to_dict(model)),
        "model_n_components": int(len(model.component_classes_)),
        "model_feature_names": json.dumps(list(stack.variables)),
        "model_class_names": json.dumps(names),
        "model_component_classes": json.dumps(_jsonable(model.component_classes_)),
        "model_fitted": json.dumps(model._fitted_to_dict()),
        "model_n_iter": int(getattr(model, "n_iter_", 0)),
        "model_converged": int(bool(getattr(model, "converged_", False))),
        "model_lower_bound": _finite_or_str(float(getattr(model, "lower_bound_", np.nan))),
    }
    if stack.path is not None:
        attrs["daskem_input_path"] = str(stack.path)
    training = getattr(model, "input_path_", None)
    if training is not None:
        attrs["model_training_path"] = str(training)
    return attrs


# --------------------------------------------------------------------------- writing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_to_zarr(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    encoding: Mapping[str, Mapping[str, Any]] | None = None,
    zarr_format: int | None = None,
) -> Path:
    """Write a dataset to a local Zarr store atomically (consolidated metadata).

    The store is written to ``.{name}.tmp-{uuid}`` beside the target and renamed
    into place only when complete, so readers never see a half-written store. Dask
    variables are streamed chunk by chunk (the Zarr chunks are the Dask chunks).

    Parameters
    ----------
    ds : xarray.Dataset
    path : str or path-like
        Target directory.
    overwrite : bool, default False
        Replace an existing store: the old one is moved aside only once the new one
        is complete, then deleted.
    encoding : mapping, optional
        Per-variable Zarr encoding.
    zarr_format : {2, 3}, optional
        Default: the zarr library's.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(errno.EEXIST, "Zarr store already exists", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # the writer's process id in the name: a later run can tell a killed run's leftovers
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    kwargs: dict[str, Any] = {"mode": "w-", "encoding": dict(encoding or {}), "consolidated": True}
    if zarr_format is not None:
        kwargs["zarr_format"] = zarr_format
    try:
        with warnings.catch_warnings():
            # Consolidated metadata lets ``xr.open_zarr`` open the store without
            # warnings; zarr 3 warns that it is not (yet) in the v3 spec.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # the chunks are written by one watched compute (engine.compute)
            engine.compute(ds.to_zarr(tmp, compute=False, **kwargs))
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "Zarr store already exists", str(path))
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


#: how old a temporary without a process id (daskem < 0.2) must be to count as stale
_STALE_SECONDS = 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left beside ``path``: ``.{name}.tmp-*`` / ``.{name}.old-*``
    stores of writers that no longer run (their process id is in the name; an older name
    without one counts once it is an hour old). Nothing else is touched; each removal is
    reported with a ``UserWarning``. Returns the removed paths."""
    path = Path(path)
    removed = []
    now = time.time()
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f".{path.name}.{kind}-*"):
            rest = p.name[len(f".{path.name}.{kind}-") :]
            pid, sep, _ = rest.partition("-")
            if sep and pid.isdigit():
                stale = not _pid_alive(int(pid))
            else:
                try:
                    stale = now - p.stat().st_mtime > _STALE_SECONDS
                except OSError:
                    continue
            if stale:
                _remove(p)
                removed.append(p)
                warnings.warn(
                    f"removed {p}, left beside {path} by a write that was killed",
                    UserWarning,
                    stacklevel=3,
                )
    return removed


#: attributes that describe a variable's values, not a dataset
_VALUE_ATTRS = (
    "_FillValue",
    "missing_value",
    "nodata",
    "scale_factor",
    "add_offset",
    "units",
    "long_name",
    "standard_name",
    "valid_range",
    "valid_min",
    "valid_max",
    "grid_mapping",
)


def _plain(value: Any) -> Any:
    """An attribute value as JSON-able Python (numpy scalars and arrays converted)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _zarr_compatible(ds: xr.Dataset) -> xr.Dataset:
    """Rechunk dims whose Dask chunks Zarr cannot store (irregular), with a warning; make
    attributes JSON-able (Zarr stores them as JSON)."""
    ds = ds.copy()
    ds.attrs = {k: _plain(v) for k, v in ds.attrs.items()}
    for var in ds.variables.values():
        var.attrs = {k: _plain(v) for k, v in var.attrs.items()}
    fix: dict[str, int] = {}
    for var in ds.variables.values():
        if var.chunks is None:
            continue
        for d, c in zip(var.dims, var.chunks, strict=True):
            if len(c) > 1 and (len(set(c[:-1])) > 1 or c[-1] > c[0]):
                fix[d] = max(c)
    if fix:
        warnings.warn(
            f"irregular chunks along {sorted(fix)} cannot be stored in Zarr; rechunking to {fix}",
            UserWarning,
            stacklevel=3,
        )
        ds = ds.chunk(fix)
    return ds


def write_posterior(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    zarr_format: int | None = None,
) -> Path:
    """Write a posterior dataset (from :func:`posterior`) to a Zarr store.

    The lazy dataset is streamed chunk by chunk (the map is never held in memory),
    with Zarr chunks equal to the dataset's Dask chunks, atomically (see
    :func:`atomic_to_zarr`) and with one computation, so every input block is read
    once.

    Parameters
    ----------
    ds : xarray.Dataset
    path : str or path-like
    overwrite : bool, default False
        Replace an existing store (swapped out only after the new one is complete).
    zarr_format : {2, 3}, optional

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    """
    ds = _zarr_compatible(ds.drop_encoding())
    return atomic_to_zarr(ds, path, overwrite=overwrite, zarr_format=zarr_format)
