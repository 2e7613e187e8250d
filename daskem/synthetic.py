"""Synthetic multi-attribute maps and Gaussian-mixture samples.

Pure NumPy + xarray generators used by the tests and the demo:

* :func:`make_stack` builds an in-memory :class:`xarray.Dataset` holding a
  multi-attribute image (2-D ``(y, x)``, 3-D ``(z, y, x)`` or 4-D
  ``(t, z, y, x)``) made of spatially coherent classes, with ground truth,
  a few sparse training labels and NaN holes.
* :func:`write_stack` writes such a dataset atomically to a Zarr store.
* :func:`make_samples` draws a plain tabular Gaussian-mixture sample.

The generators build no Dask arrays (the returned objects are NumPy-backed);
the atomic write itself is :func:`daskem.io.atomic_to_zarr`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .io import atomic_to_zarr

__all__ = [
    "make_stack",
    "make_time_stack",
    "write_stack",
    "make_samples",
    "UNLABELLED",
    "CLASS_NAMES",
]

#: Value of the ``labels`` variable for pixels without a training label.
UNLABELLED = -1

#: Human-readable class names used when ``n_classes <= 8``.
CLASS_NAMES = (
    "water",
    "forest",
    "urban",
    "grassland",
    "cropland",
    "bare_soil",
    "wetland",
    "snow",
)

# Dimension names, assigned from the last axis backwards.
_DIMS = ("t", "z", "y", "x")

# Per-attribute (long_name, units, offset, scale) applied to the latent
# standardised features so that attributes live on different physical scales.
_ATTRIBUTES = (
    ("surface reflectance", "1", 0.25, 0.04),
    ("backscatter", "dB", -12.0, 2.0),
    ("elevation", "m", 350.0, 40.0),
    ("brightness temperature", "K", 290.0, 3.0),
)

_X0 = 500_000.0  # easting of the grid's west edge (m)
_Y0 = 5_100_000.0  # northing of the grid's north edge (m)
_RES = 10.0  # pixel size (m)
_EPSG = 32633

# Spawn key of the random stream of the clouds (independent of the main stream,
# so that ``clouds=0`` leaves every other variable unchanged).
_CLOUD_STREAM = 0xC10D


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _random_rotation(rng: np.random.Generator, n: int) -> np.ndarray:
    """Haar-distributed random orthogonal ``n x n`` matrix."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _class_means(rng: np.random.Generator, n_classes: int, n_features: int, separation: float):
    """Class means whose nearest-neighbour distance is about ``separation``."""
    if n_classes == 1:
        return np.zeros((1, n_features))
    if n_classes <= n_features + 1:
        # Regular simplex: every pairwise distance equals ``separation``.
        centred = np.eye(n_classes) - 1.0 / n_classes
        _, _, vt = np.linalg.svd(centred)
        coords = centred @ vt[: n_classes - 1].T * (separation / np.sqrt(2.0))
        padded = np.zeros((n_classes, n_features))
        padded[:, : n_classes - 1] = coords
        return padded @ _random_rotation(rng, n_features).T
    # More classes than a simplex can hold: random points scaled so that the
    # mean nearest-neighbour distance is ``separation``.
    points = rng.standard_normal((n_classes, n_features))
    dist = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(axis=1).mean()
    return (points - points.mean(axis=0)) * (separation / nearest)


def _class_covariances(rng: np.random.Generator, n_classes: int, n_features: int) -> np.ndarray:
    """Random correlated covariances (random rotation times random scales)."""
    covs = np.empty((n_classes, n_features, n_features))
    for c in range(n_classes):
        rot = _random_rotation(rng, n_features)
        scales = rng.uniform(0.6, 1.4, size=n_features)
        covs[c] = (rot * scales**2) @ rot.T
        covs[c] = 0.5 * (covs[c] + covs[c].T)
    return covs


def _draw(rng: np.random.Generator, labels: np.ndarray, means: np.ndarray, covs: np.ndarray):
    """Draw one sample per entry of ``labels`` from the matching Gaussian."""
    out = np.empty((labels.size, means.shape[1]))
    for c in range(means.shape[0]):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        chol = np.linalg.cholesky(covs[c])
        out[idx] = means[c] + rng.standard_normal((idx.size, means.shape[1])) @ chol.T
    return out


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian random field: white noise low-passed by an FFT Gaussian filter.

    The filter is periodic (wraps around the edges).  The result is
    standardised to zero mean and unit variance.
    """
    noise = rng.standard_normal(shape)
    if sigma > 0:
        spectrum = np.fft.rfftn(noise)
        transfer = np.ones(spectrum.shape)
        for axis, n in enumerate(shape):
            freqs = np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)
            g = np.exp(-2.0 * (np.pi * sigma * freqs) ** 2)
            bshape = [1] * len(shape)
            bshape[axis] = g.size
            transfer = transfer * g.reshape(bshape)
        noise = np.fft.irfftn(spectrum * transfer, s=shape, axes=tuple(range(len(shape))))
    std = noise.std()
    return (noise - noise.mean()) / (std if std > 0 else 1.0)


def _class_map(
    rng: np.random.Generator, shape: tuple[int, ...], n_classes: int, smoothness: float
) -> np.ndarray:
    """Spatially coherent class map: argmax over smoothed random fields.

    Classes that end up (almost) absent are given an offset so that they win
    about ``1 / n_classes`` of the pixels where they are closest to winning.
    """
    fields = np.stack([_smooth_field(rng, shape, smoothness) for _ in range(n_classes)])
    flat = fields.reshape(n_classes, -1)
    n_pixels = flat.shape[1]
    min_count = max(1, n_pixels // (20 * n_classes))
    offsets = np.zeros(n_classes)
    for _ in range(4 * n_classes):
        cls = np.argmax(flat + offsets[:, None], axis=0)
        counts = np.bincount(cls, minlength=n_classes)
        small = np.flatnonzero(counts < min_count)
        if small.size == 0:
            break
        c = small[0]
        shifted = flat + offsets[:, None]
        others = np.delete(shifted, c, axis=0).max(axis=0)
        margin = others - shifted[c]
        offsets[c] += np.quantile(margin, 1.0 / n_classes) + 1e-9
    cls = np.argmax(flat + offsets[:, None], axis=0)
    return cls.reshape(shape).astype(np.int16)


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], fraction: float, n_blobs: int = 8):
    """Yield random blob-shaped (disk / ball) regions until they cover ``~fraction``.

    Each item is ``(box, inside)``: a tuple of slices into the grid and the
    boolean disk / ball inside that box.  Blobs are drawn until their union
    covers at least ``fraction`` of the grid; the radius is chosen so that
    roughly ``n_blobs`` blobs reach the target per 2-D slice.  The caller may draw
    from ``rng`` between items (the sequence stays deterministic).
    """
    if fraction <= 0:
        return
    covered_mask = np.zeros(shape, dtype=bool)
    n_total = covered_mask.size
    ny, nx = shape[-2:]
    radius = max(1.5, float(np.sqrt(fraction * ny * nx / (float(n_blobs) * np.pi))))
    radii = np.array([max(1.0, min(radius, n / 4.0)) for n in shape[:-2]] + [radius, radius])
    target = fraction * n_total
    covered = 0
    for _ in range(100_000):
        if covered >= target:
            break
        centre = np.array([rng.uniform(0, n) for n in shape])
        r = radii * rng.uniform(0.6, 1.4)
        lo = np.maximum(np.floor(centre - r), 0).astype(int)
        hi = np.minimum(np.ceil(centre + r) + 1, shape).astype(int)
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        dist2 = sum(((g + 0.5 - c0) / r0) ** 2 for g, c0, r0 in zip(grids, centre, r, strict=True))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        inside = dist2 <= 1.0
        before = covered_mask[box].sum()
        covered_mask[box] |= inside
        covered += int(covered_mask[box].sum() - before)
        yield box, inside


def _hole_mask(rng: np.random.Generator, shape: tuple[int, ...], fraction: float) -> np.ndarray:
    """Boolean mask of blob-shaped (disk / ball) holes covering ``~fraction``."""
    mask = np.zeros(shape, dtype=bool)
    for box, inside in _blobs(rng, shape, fraction):
        mask[box] |= inside
    return mask


def _cloud_mask(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    fraction: float,
    n_features: int,
    missing: np.ndarray,
    n_blobs: int = 8,
) -> np.ndarray:
    """Attributes hidden by clouds: boolean ``(*shape, n_features)``.

    Blobs (:func:`_blobs`) cover ``~fraction`` of the pixels; each blob hides a
    random non-empty proper subset of the attributes (size uniform in
    ``1 .. n_features - 1``, then a uniform subset of that size) and
    overlapping blobs hide the union of their subsets.  ``missing`` (same
    shape as the result) flags values that are NaN before cloud masking.

    Where the union, together with ``missing``, would leave a pixel without
    any attribute, one hidden attribute is made visible again: the first, in a
    random attribute order drawn for the last blob laid over the pixel (that
    blob's own visible attributes first), among the hidden attributes that
    have a value (any hidden attribute in an all-NaN pixel).  So a pixel with
    at least one value keeps one, and no pixel has all attributes hidden.
    """
    hidden = np.zeros((*shape, n_features), dtype=bool)
    top = np.full(shape, -1, dtype=np.int64)  # index of the last blob over each pixel
    ranks = []  # per blob: rank of each attribute in its "keep visible" order
    for b, (box, inside) in enumerate(_blobs(rng, shape, fraction, n_blobs)):
        n_hide = int(rng.integers(1, n_features))
        subset = np.zeros(n_features, dtype=bool)
        subset[rng.choice(n_features, size=n_hide, replace=False)] = True
        perm = rng.permutation(n_features)
        order = np.concatenate([perm[~subset[perm]], perm[subset[perm]]])
        rank = np.empty(n_features, dtype=np.int64)
        rank[order] = np.arange(n_features)
        ranks.append(rank)
        hidden_box = hidden[box]
        hidden_box |= inside[..., None] & subset
        top[box][inside] = b
    if not ranks:
        return hidden
    flat = hidden.reshape(-1, n_features)
    flat_missing = missing.reshape(-1, n_features)
    no_value = flat_missing.all(axis=1)
    fix = np.flatnonzero(flat.all(axis=1) | ((flat | flat_missing).all(axis=1) & ~no_value))
    if fix.size:
        h = flat[fix]
        # Candidates: hidden attributes with a value; in all-NaN pixels, any hidden one.
        cand = h & (~flat_missing[fix] | no_value[fix, None])
        pixel_ranks = np.stack(ranks)[top.reshape(-1)[fix]]
        keep = np.argmin(np.where(cand, pixel_ranks, n_features), axis=1)
        h[np.arange(fix.size), keep] = False
        flat[fix] = h
    return hidden


def _coords(shape: tuple[int, ...], dims: tuple[str, ...]) -> dict[str, xr.Variable]:
    coords: dict[str, xr.Variable] = {}
    for dim, n in zip(dims, shape, strict=True):
        idx = np.arange(n, dtype=np.float64) + 0.5
        if dim == "x":
            coords[dim] = xr.Variable(
                dim,
                _X0 + _RES * idx,
                {
                    "standard_name": "projection_x_coordinate",
                    "long_name": "easting (pixel centre)",
                    "units": "m",
                    "axis": "X",
                },
            )
        elif dim == "y":
            coords[dim] = xr.Variable(
                dim,
                _Y0 - _RES * idx,
                {
                    "standard_name": "projection_y_coordinate",
                    "long_name": "northing (pixel centre)",
                    "units": "m",
                    "axis": "Y",
                },
            )
        elif dim == "z":
            coords[dim] = xr.Variable(
                dim,
                _RES * np.arange(n, dtype=np.float64),
                {"long_name": "depth of slice", "units": "m", "positive": "down", "axis": "Z"},
            )
        else:  # "t": a plain float index (no time units, to avoid CF time decoding)
            coords[dim] = xr.Variable(
                dim, np.arange(n, dtype=np.float64), {"long_name": "acquisition index"}
            )
    coords["spatial_ref"] = xr.Variable(
        (),
        np.int64(0),
        {
            "grid_mapping_name": "transverse_mercator",
            "spatial_ref": f"EPSG:{_EPSG}",
            "epsg": _EPSG,
            "longitude_of_central_meridian": 15.0,
            "latitude_of_projection_origin": 0.0,
            "scale_factor_at_central_meridian": 0.9996,
            "false_easting": 500000.0,
            "false_northing": 0.0,
        },
    )
    return coords


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def make_stack(
    shape: Sequence[int] = (256, 256),
    n_classes: int = 4,
    n_features: int = 4,
    labels_per_class: int = 5,
    nan_fraction: float = 0.02,
    separation: float = 3.0,
    smoothness: float = 12.0,
    dtype: str | np.dtype = "float32",
    seed: int | None = 0,
    modes_per_class: int = 1,
    clouds: float = 0.0,
    cloud_blobs: int = 8,
) -> xr.Dataset:
    """Make a synthetic multi-attribute map with spatially coherent classes.

    Each class occupies coherent regions: ``n_classes`` independent Gaussian
    random fields are smoothed with a periodic FFT Gaussian filter of width
    ``smoothness`` pixels and every pixel takes the class of the largest
    field.  Each class has its own mean vector and random correlated
    covariance (random rotation and scales), and the features of a pixel are
    drawn from its class Gaussian, then mapped affinely per attribute onto a
    physical-looking scale.

    Parameters
    ----------
    shape : sequence of int, default (256, 256)
        Grid shape with 2 to 4 axes.  Dimensions are named from the last axis
        backwards ``x``, ``y``, ``z``, ``t`` (so 2-D is ``(y, x)`` and 3-D is
        ``(z, y, x)``).
    n_classes : int, default 4
        Number of classes (``>= 1``).
    n_features : int, default 4
        Number of attributes ``attr_0 ... attr_{n_features - 1}`` (``>= 1``).
    labels_per_class : int, default 5
        Number of labelled pixels per class in ``labels`` (``>= 0``).
    nan_fraction : float, default 0.02
        Approximate fraction of pixels inside blob-shaped holes where every
        attribute is NaN.  About ``nan_fraction / 4`` further pixels have a
        single random attribute set to NaN (only when ``n_features >= 2``).
    separation : float, default 3.0
        Distance between nearest class means, in units of the within-class
        standard deviation (before the per-attribute affine mapping).
        Classes are separable but overlapping for values around 3.
    smoothness : float, default 12.0
        Width (standard deviation, pixels) of the Gaussian filter that sets
        the size of the class regions; ``0`` gives salt-and-pepper classes.
    dtype : str or numpy dtype, default "float32"
        Floating dtype of the attribute variables.
    seed : int or None, default 0
        Seed of :func:`numpy.random.default_rng`; equal seeds give identical
        datasets.
    modes_per_class : int, default 1
        Kinds of pixels per class: each class is made of this many sub-classes, each
        with its own regions, mean and covariance (e.g. "urban" = roofs + roads), so
        a class is multi-modal for ``modes_per_class > 1``. ``1`` gives exactly the
        dataset of earlier versions.
    clouds : float, default 0.0
        Approximate fraction of pixels that are *partly* missing under
        spatially correlated blobs ("clouds"), for testing EM with missing
        attributes.  Must be in ``[0, 0.9]``; ``> 0`` requires
        ``n_features >= 2``.  Cloud blobs have the shape and size of the NaN
        holes (about eight per 2-D slice reach the target) and are drawn from
        their own random stream, so every other variable is the same as for
        ``clouds=0`` -- except ``labels``, drawn among the pixels left fully
        finite.  Each blob hides a random non-empty proper subset of the
        attributes (``1 .. n_features - 1`` of them, chosen per blob) in the
        pixels it covers; overlapping blobs hide the union of their subsets.
        Where that union, together with values already NaN (``nan_fraction``),
        would leave a pixel without any attribute, one of the hidden
        attributes stays visible: the first, in a random attribute order drawn
        for the last blob laid over the pixel (that blob's own visible
        attributes first), that has a value.  So clouds never make a pixel
        all-NaN, and at most ``n_features - 1`` attributes of a pixel are
        hidden by clouds.  ``0`` gives exactly the dataset of earlier
        versions.
    cloud_blobs : int, default 8
        About how many cloud blobs per 2-D slice reach ``clouds`` (their radius follows):
        8 gives blobs larger than the class regions of the default ``smoothness``, so
        the cloudy pixels come from a few regions; more give smaller blobs spread over
        every class.

    Returns
    -------
    xarray.Dataset
        NumPy-backed dataset with

        * ``attr_0 ... attr_{D-1}`` (``dtype``; attrs ``long_name``,
          ``units``, ``grid_mapping="spatial_ref"``);
        * ``truth`` (int16): ground-truth class ``0 .. n_classes - 1``;
        * ``labels`` (int16): ``-1`` (:data:`UNLABELLED`) everywhere except
          ``labels_per_class`` random pixels per class, all chosen among
          pixels where every attribute is finite.  CF attrs ``flag_values``
          and ``flag_meanings``; ``unlabelled_value = -1``;
        * only when ``clouds > 0``: ``attr_k_true`` (``dtype``) for every
          attribute ``attr_k`` with cloud-hidden pixels, its values before
          cloud masking (``attr_k`` as it is with ``clouds=0``: NaN only
          where ``nan_fraction`` made it NaN), for scoring gap filling; and
          ``cloud_hidden`` (int16): the number of attributes hidden by clouds
          in each pixel (``0 .. n_features - 1``; counted also where the value
          was already NaN).  ``attr_k`` carries CF ``ancillary_variables``
          naming them;
        * coordinates ``x``, ``y`` (``z``, ``t``) as float64 pixel centres
          (x = 500000 + 10 (i + 0.5) m, y decreasing) and a scalar
          ``spatial_ref`` grid-mapping variable (EPSG:32633).

        Dataset attrs hold ``title``, ``source``, the generating parameters,
        ``class_names``, ``true_means`` (``(n_classes * modes_per_class) x
        n_features`` nested list in data units; sub-class ``j`` belongs to class
        ``j // modes_per_class``) and ``true_covariances``; ``clouds`` is
        recorded only when ``> 0`` (so that default datasets are unchanged).

    Raises
    ------
    ValueError
        If an argument is out of range, or the grid is too small to hold
        ``labels_per_class`` fully finite pixels of every class.

    Notes
    -----
    The hidden attributes name ``attr_k_true`` and ``cloud_hidden`` in their CF
    ``ancillary_variables``, so :func:`daskem.io.open_stack` does not take them as
    attributes (``cloud_hidden``, an integer variable, would not be taken anyway).

    The unlabelled value is recorded as ``unlabelled_value`` rather than the
    CF ``missing_value`` / ``_FillValue``: xarray masks those on decoding,
    which would turn ``labels`` into a float variable after a Zarr round trip.
    """
    shape = tuple(int(n) for n in shape)
    if not 2 <= len(shape) <= 4:
        raise ValueError(f"shape must have 2 to 4 axes, got {shape}")
    if min(shape) < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    if modes_per_class < 1:
        raise ValueError(f"modes_per_class must be >= 1, got {modes_per_class}")
    if n_classes < 1 or n_features < 1 or labels_per_class < 0:
        raise ValueError("n_classes and n_features must be >= 1, labels_per_class >= 0")
    if not 0.0 <= nan_fraction < 0.8:
        raise ValueError(f"nan_fraction must be in [0, 0.8), got {nan_fraction}")
    if smoothness < 0 or separation < 0:
        raise ValueError("smoothness and separation must be >= 0")
    clouds = float(clouds)
    if not 0.0 <= clouds <= 0.9:
        raise ValueError(f"clouds must be in [0, 0.9], got {clouds}")
    blobs_ok = isinstance(cloud_blobs, (int, np.integer)) and not isinstance(cloud_blobs, bool)
    if not blobs_ok or cloud_blobs < 1:
        raise ValueError(f"cloud_blobs must be an integer >= 1, got {cloud_blobs!r}")
    if clouds > 0 and n_features < 2:
        raise ValueError(
            f"clouds > 0 needs n_features >= 2 (clouds hide some attributes of a pixel, "
            f"never all), got n_features={n_features}"
        )
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")

    rng = np.random.default_rng(seed)
    dims = _DIMS[-len(shape) :]
    n_pixels = int(np.prod(shape))

    # Class parameters in standardised (latent) units.
    n_modes = n_classes * modes_per_class
    means = _class_means(rng, n_modes, n_features, separation)
    covs = _class_covariances(rng, n_modes, n_features)

    # Spatially coherent (sub-)classes and per-pixel features.
    modes = _class_map(rng, shape, n_modes, smoothness)
    latent = _draw(rng, modes.ravel(), means, covs)
    truth = (modes // modes_per_class).astype(modes.dtype)

    # Per-attribute affine mapping onto physical-looking scales.
    meta = [_ATTRIBUTES[k % len(_ATTRIBUTES)] for k in range(n_features)]
    offset = np.array([m[2] * (1 + k // len(_ATTRIBUTES)) for k, m in enumerate(meta)])
    scale = np.array([m[3] for m in meta])
    values = latent * scale + offset
    true_means = means * scale + offset
    true_covs = covs * np.outer(scale, scale)

    # Missing data: blob holes (all attributes) + scattered single attributes.
    holes = _hole_mask(rng, shape, nan_fraction).ravel()
    values[holes] = np.nan
    if n_features >= 2 and nan_fraction > 0:
        candidates = np.flatnonzero(~holes)
        n_partial = min(candidates.size, int(round(nan_fraction / 4.0 * n_pixels)))
        picked = rng.choice(candidates, size=n_partial, replace=False)
        values[picked, rng.integers(0, n_features, size=n_partial)] = np.nan
    values = values.astype(dtype)

    # Clouds: blobs hiding some attributes, from their own random stream.
    cloud_hidden = None
    if clouds > 0:
        cloud_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_CLOUD_STREAM,)))
        hidden = _cloud_mask(
            cloud_rng,
            shape,
            clouds,
            n_features,
            np.isnan(values).reshape(*shape, n_features),
            int(cloud_blobs),
        ).reshape(n_pixels, n_features)
        values_true = values
        values = np.where(hidden, np.array(np.nan, dtype), values_true)
        cloud_hidden = hidden.sum(axis=1, dtype=np.int16)

    # Sparse training labels on fully finite pixels.
    finite = np.isfinite(values).all(axis=1)
    labels = np.full(n_pixels, UNLABELLED, dtype=np.int16)
    flat_truth = truth.ravel()
    for c in range(n_classes):
        pool = np.flatnonzero(finite & (flat_truth == c))
        if pool.size < labels_per_class:
            raise ValueError(
                f"class {c} has only {pool.size} fully finite pixels, fewer than "
                f"labels_per_class={labels_per_class}; use a larger shape or smaller smoothness"
            )
        labels[rng.choice(pool, size=labels_per_class, replace=False)] = c

    names = (
        list(CLASS_NAMES[:n_classes])
        if n_classes <= len(CLASS_NAMES)
        else [f"class_{c}" for c in range(n_classes)]
    )
    flag_values = np.arange(n_classes, dtype=np.int16)
    flag_meanings = " ".join(names)

    data_vars: dict[str, xr.Variable] = {}
    for k, (long_name, units, _, _) in enumerate(meta):
        data_vars[f"attr_{k}"] = xr.Variable(
            dims,
            values[:, k].reshape(shape),
            {"long_name": long_name, "units": units, "grid_mapping": "spatial_ref"},
        )
    if cloud_hidden is not None:
        for k, (long_name, units, _, _) in enumerate(meta):
            if not hidden[:, k].any():
                continue
            data_vars[f"attr_{k}"].attrs["ancillary_variables"] = f"attr_{k}_true cloud_hidden"
            data_vars[f"attr_{k}_true"] = xr.Variable(
                dims,
                values_true[:, k].reshape(shape),
                {
                    "long_name": f"{long_name}: value before cloud masking",
                    "units": units,
                    "comment": "for evaluating gap filling",
                    "grid_mapping": "spatial_ref",
                },
            )
    data_vars["truth"] = xr.Variable(
        dims,
        truth,
        {
            "long_name": "ground-truth class",
            "flag_values": flag_values,
            "flag_meanings": flag_meanings,
            "grid_mapping": "spatial_ref",
        },
    )
    data_vars["labels"] = xr.Variable(
        dims,
        labels.reshape(shape),
        {
            "long_name": "training labels",
            "flag_values": flag_values,
            "flag_meanings": flag_meanings,
            "unlabelled_value": UNLABELLED,
            "comment": f"{UNLABELLED} marks unlabelled pixels",
            "grid_mapping": "spatial_ref",
        },
    )
    if cloud_hidden is not None:
        data_vars["cloud_hidden"] = xr.Variable(
            dims,
            cloud_hidden.reshape(shape),
            {
                "long_name": "number of attributes hidden by clouds",
                "units": "1",
                "valid_range": np.array([0, n_features - 1], dtype=np.int16),
                "comment": "for evaluating gap filling; 0 = clear",
                "grid_mapping": "spatial_ref",
            },
        )

    attrs: dict[str, Any] = {
        "title": "daskem synthetic multi-attribute stack",
        "source": "daskem.synthetic.make_stack",
        "Conventions": "CF-1.8",
        "shape": list(shape),
        "n_classes": int(n_classes),
        "n_features": int(n_features),
        "labels_per_class": int(labels_per_class),
        "nan_fraction": float(nan_fraction),
        "separation": float(separation),
        "smoothness": float(smoothness),
        "dtype": dtype.name,
        "class_names": names,
        "modes_per_class": int(modes_per_class),
        "true_means": true_means.tolist(),
        "true_covariances": true_covs.tolist(),
    }
    if clouds > 0:
        attrs["clouds"] = clouds
    if seed is not None:
        attrs["seed"] = int(seed)
    return xr.Dataset(data_vars, coords=_coords(shape, dims), attrs=attrs)


def _chunk_encoding(ds: xr.Dataset, chunks: int | Mapping[str, int | None] | None):
    """Map ``chunks`` to a ``{dim: size}`` dict over the dataset's dims."""
    if chunks is None:
        return None
    if isinstance(chunks, Mapping):
        unknown = set(chunks) - set(ds.dims)
        if unknown:
            raise ValueError(f"chunks refers to unknown dimensions {sorted(unknown)}")
        spec = dict(chunks)
    else:
        spec = {dim: int(chunks) for dim in ds.dims}
    out: dict[str, int] = {}
    for dim, size in ds.sizes.items():
        c = spec.get(dim)
        out[dim] = size if c is None or c == -1 else max(1, min(int(c), size))
    return out


def make_time_stack(
    shape: Sequence[int] = (128, 128),
    n_dates: int = 12,
    n_classes: int = 4,
    n_features: int = 3,
    *,
    change_fraction: float = 0.3,
    separation: float = 4.0,
    smoothness: float = 8.0,
    cloud_fraction: float = 0.1,
    labels_per_class: int = 3,
    start_date: str = "2024-01-01",
    days_between: int = 16,
    seed: int = 0,
) -> xr.Dataset:
    """A synthetic time stack: spatially coherent classes that change at known dates.

    Every pixel follows a class path over ``n_dates`` dates: a smooth class map at the
    first date; then blob-shaped patches covering about ``change_fraction`` of the grid
    each switch to another class at a date of their own (1 .. ``n_dates - 1``; later
    patches laid over earlier ones win, so a few pixels change twice). Each date's
    attributes are drawn from the Gaussian of the pixel's class at that date (classes'
    means about ``separation`` standard deviations apart), and blob-shaped clouds
    covering about ``cloud_fraction`` of every date hide all attributes (NaN).

    Parameters
    ----------
    shape : (ny, nx)
    n_dates, n_classes, n_features : int
    change_fraction, cloud_fraction : float
    separation, smoothness : float
    labels_per_class : int
        Pixels per class whose class is given at 2 random dates (``labels``).
    start_date : str
        Date of the first acquisition; the others follow every ``days_between`` days.
    seed : int

    Returns
    -------
    xarray.Dataset
        ``attr_0`` ... on ``(time, y, x)`` (float32, NaN under clouds, CF
        ``grid_mapping="spatial_ref"``), ``true_class`` (time, y, x) int16,
        ``true_change`` (y, x) int16 -- the index of the first date whose class
        differs from the date before (-1: never), ``labels`` (time, y, x) int16
        (sparse, -1 elsewhere), coordinates ``time`` (datetime64), ``y``, ``x`` and
        ``spatial_ref``; the class means, covariances and names in the attributes.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (ny, nx), got {tuple(shape)}")
    if n_dates < 2:
        raise ValueError(f"n_dates must be >= 2, got {n_dates}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    T, K, D = int(n_dates), int(n_classes), int(n_features)
    means = _class_means(rng, K, D, separation)
    covs = _class_covariances(rng, K, D)
    base = _class_map(rng, shape, K, smoothness)
    truth = np.repeat(base[None], T, axis=0)
    for box, inside in _blobs(rng, shape, change_fraction):
        date = int(rng.integers(1, T))
        old = truth[date - 1][box][inside]
        new = (old + rng.integers(1, K, size=old.shape)).astype(np.int16) % K
        # one new class per patch: the most common draw, kept different from each old one
        target = np.int16(np.bincount(new, minlength=K).argmax())
        new = np.where(old == target, (target + 1) % K, target).astype(np.int16)
        for t in range(date, T):
            sub = truth[t][box]
            sub[inside] = new
    change = truth[1:] != truth[:-1]
    true_change = np.where(change.any(axis=0), change.argmax(axis=0) + 1, -1).astype(np.int16)
    values = _draw(rng, truth.reshape(-1), means, covs).reshape(T, *shape, D)
    for t in range(T):
        cloud = _hole_mask(rng, shape, cloud_fraction)
        values[t][cloud] = np.nan
    labels = np.full((T, *shape), UNLABELLED, dtype=np.int16)
    for c in range(K):
        where = np.flatnonzero(truth.reshape(T, -1)[0] == c)
        pix = rng.choice(where, size=min(labels_per_class, where.size), replace=False)
        for p in pix:
            for t in rng.choice(T, size=min(2, T), replace=False):
                if truth.reshape(T, -1)[t, p] == c:
                    labels.reshape(T, -1)[t, p] = c
    coords = _coords(shape, ("y", "x"))
    coords["time"] = xr.Variable(
        "time",
        np.datetime64(start_date, "ns") + np.arange(T) * np.timedelta64(days_between, "D"),
        {"long_name": "acquisition date"},
    )
    names = list(CLASS_NAMES[:K]) if K <= len(CLASS_NAMES) else [f"class_{c}" for c in range(K)]
    flag = {"flag_values": np.arange(K, dtype=np.int16), "flag_meanings": " ".join(names)}
    dims = ("time", "y", "x")
    data_vars = {
        f"attr_{j}": xr.Variable(
            dims,
            values[..., j].astype(np.float32),
            {"long_name": f"synthetic attribute {j}", "units": "1", "grid_mapping": "spatial_ref"},
        )
        for j in range(D)
    }
    data_vars["true_class"] = xr.Variable(
        dims, truth, {"long_name": "true class at each date", **flag}
    )
    data_vars["true_change"] = xr.Variable(
        ("y", "x"),
        true_change,
        {"long_name": "index of the first date whose class changed", "missing_value": -1},
    )
    data_vars["labels"] = xr.Variable(
        dims,
        labels,
        {"long_name": "training labels", "unlabelled_value": UNLABELLED, **flag},
    )
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "title": "daskem synthetic time stack",
            "class_names": names,
            "class_means": means.ravel().tolist(),
            "n_features": D,
            "seed": seed,
        },
    )


def write_stack(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    chunks: int | Mapping[str, int | None] | None = None,
    zarr_format: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a dataset to a local Zarr store atomically.

    The store is written to a temporary directory beside the target
    (``.{name}.tmp-{uuid}``) and renamed into place only once complete, so a
    reader never sees a half-written store.

    Parameters
    ----------
    ds : xarray.Dataset
        Dataset to write, e.g. from :func:`make_stack`.  Any encoding
        inherited from a previous read is dropped.
    path : str or path-like
        Target directory of the Zarr store (local filesystem).
    chunks : int or mapping of str to int, optional
        Chunk sizes of the data variables.  An int applies to every
        dimension; a mapping gives a size per dimension name, with dimensions
        left out (or given ``None`` / ``-1``) kept whole.  ``None`` uses the
        Dask chunks of a Dask-backed dataset, else Zarr's default.
    zarr_format : {2, 3}, optional
        Zarr format version; ``None`` uses the zarr library's default.
        Metadata is always consolidated.
    overwrite : bool, default False
        Replace an existing store.  The old store is moved aside, the new one
        renamed in, and only then the old one deleted.

    Returns
    -------
    pathlib.Path
        The path of the written store.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    """
    ds = ds.drop_encoding()
    sizes = _chunk_encoding(ds, chunks)
    encoding: dict[str, dict[str, Any]] = {}
    if sizes is not None:
        if ds.chunks:  # Dask-backed: rechunk so Dask and Zarr chunks agree
            ds = ds.chunk(sizes)
        else:
            for name, var in ds.data_vars.items():
                if var.ndim:
                    encoding[name] = {"chunks": tuple(sizes[d] for d in var.dims)}

    return atomic_to_zarr(ds, path, overwrite=overwrite, encoding=encoding, zarr_format=zarr_format)


def make_samples(
    n_samples: int,
    n_features: int,
    n_components: int,
    seed: int | None = 0,
    dtype: str | np.dtype = "float64",
    separation: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw a tabular sample from a random Gaussian mixture.

    Components have equal weights, means whose nearest-neighbour distance is
    about ``separation`` within-component standard deviations, and random
    correlated covariances.

    Parameters
    ----------
    n_samples : int
        Number of rows.
    n_features : int
        Number of columns.
    n_components : int
        Number of mixture components.
    seed : int or None, default 0
        Seed of :func:`numpy.random.default_rng`.
    dtype : str or numpy dtype, default "float64"
        Floating dtype of ``X``.
    separation : float, default 3.0
        Distance between nearest component means in standard deviations.

    Returns
    -------
    X : numpy.ndarray, shape (n_samples, n_features)
        The sample, of dtype ``dtype``.
    y : numpy.ndarray of int64, shape (n_samples,)
        Component of each row; components are as balanced as possible
        (each appears ``n_samples // n_components`` or one more times).
    means : numpy.ndarray of float64, shape (n_components, n_features)
        True component means.
    """
    if n_samples < 0 or n_features < 1 or n_components < 1:
        raise ValueError("need n_samples >= 0, n_features >= 1 and n_components >= 1")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    rng = np.random.default_rng(seed)
    means = _class_means(rng, n_components, n_features, separation)
    covs = _class_covariances(rng, n_components, n_features)
    y = rng.permutation(np.arange(n_samples, dtype=np.int64) % n_components)
    X = _draw(rng, y, means, covs).astype(dtype)
    return X, y, means
