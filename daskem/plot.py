"""Quicklook PNGs of a posterior: class map, confidence, class probabilities, EM curve.

This module owns plotting only. Maps are reduced with :meth:`xarray.Dataset.coarsen`
to at most ``max_size`` pixels per side *before* anything is computed, so a
100 000 x 100 000 posterior is plotted in bounded memory: each output pixel is the
mean of a block of input pixels, the class map is the most probable class of the
block-mean probabilities, and only the small result is ever loaded. Stacks with
leading dims (``(z, y, x)``, ``(time, y, x)`` ...) are plotted at the first index of
each leading dim.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot`` state, no
display needed). It reads posterior datasets made by :func:`daskem.io.posterior`
and builds no Dask graphs by hand, fits nothing and makes no ``distributed.Client``.

Examples
--------
>>> import xarray as xr                                          # doctest: +SKIP
>>> from daskem import plot                                      # doctest: +SKIP
>>> post = xr.open_zarr("posterior.zarr")                        # doctest: +SKIP
>>> plot.quicklooks(post, "plots", lower_bounds=gm.lower_bounds_)  # doctest: +SKIP
{'class_map': PosixPath('plots/class_map.png'), ...}
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "check_posterior",
    "coarsen_factor",
    "downsample",
    "plot_class_map",
    "plot_confidence",
    "plot_lower_bounds",
    "plot_probabilities",
    "quicklooks",
    "class_colors",
    "is_time_posterior",
    "plot_confusion",
    "plot_selection",
    "time_quicklooks",
]

#: Colour of pixels without data (every attribute missing).
NODATA_COLOR = "#d9d9d9"
_DPI = 110
#: Bins of the full-resolution confidence histogram (over [0, 1]).
HISTOGRAM_BINS = 50


def coarsen_factor(size: int, chunk: int | None, max_size: int) -> int:
    """Window length that brings ``size`` pixels down to at most ``max_size``.

    Prefers a divisor of the chunk length (or a multiple of it) so that the windows
    never straddle chunks and no rechunking is needed.

    Examples
    --------
    >>> coarsen_factor(100_000, 256, 1000)  # 128 divides the 256-pixel chunks
    128
    >>> coarsen_factor(800, 256, 1000)
    1
    """
    need = max(1, math.ceil(size / max_size))
    if need == 1 or not chunk:
        return need
    if need <= chunk:
        f = next(d for d in range(need, chunk + 1) if chunk % d == 0)
    else:
        f = math.ceil(need / chunk) * chunk
    return f if f <= 2 * need else need


def check_posterior(ds: Any) -> None:
    missing = [v for v in ("probability", "confidence") if v not in ds.data_vars]
    if missing or "class" not in ds["probability"].dims:
        raise ValueError(
            f"not a daskem posterior (missing variables {missing or ['class dim']}; "
            "expected 'probability' (class, ...) and 'confidence' as written by "
            "daskem predict)"
        )


def downsample(ds: Any, max_size: int = 1000) -> Any:
    """A small, in-memory version of a posterior dataset for plotting.

    Parameters
    ----------
    ds : xarray.Dataset
        Posterior with ``probability`` (class, *spatial) and ``confidence`` (*spatial),
        lazy or in memory.
    max_size : int, default 1000
        Largest number of pixels per side of the result.

    Returns
    -------
    xarray.Dataset
        ``probability`` and ``confidence`` block means over windows of
        :func:`coarsen_factor` pixels, and ``label`` (int16, the most probable class
        of the mean probabilities, ``-1`` where a whole window has no data), on the
        last two spatial dims at index 0 of any leading dims; attribute
        ``coarsen_factors`` records the windows and ``leading`` the selection.
        ``confidence_histogram`` counts the *full-resolution* confidence values in
        :data:`HISTOGRAM_BINS` bins over [0, 1] (computed in the same pass).
    """
    check_posterior(ds)
    spatial = [d for d in ds["confidence"].dims]
    if len(spatial) < 2:
        raise ValueError(f"need at least two spatial dims to plot a map, got {spatial}")
    lead, (ydim, xdim) = spatial[:-2], spatial[-2:]
    small = ds[["probability", "confidence"]]
    if lead:
        small = small.isel({d: 0 for d in lead})
    chunks = small["confidence"].chunks
    factors = {}
    for i, d in enumerate((ydim, xdim)):
        chunk = int(chunks[i][0]) if chunks else None
        factors[d] = coarsen_factor(int(small.sizes[d]), chunk, max_size)
    window = {d: f for d, f in factors.items() if f > 1}
    conf = small["confidence"].data
    if window:
        small = small.coarsen(window, boundary="pad").mean()
    # full-resolution histogram of the confidence, in the same pass over the data
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    if hasattr(conf, "dask"):
        import dask
        import dask.array as da

        hist = da.histogram(conf, bins=edges)[0]
        small, counts = dask.compute(small, hist)
    else:
        small = small.compute()
        counts = np.histogram(np.asarray(conf), bins=edges)[0]
    p = small["probability"].transpose("class", ydim, xdim).values
    nodata = np.all(np.isnan(p), axis=0)
    label = np.argmax(np.where(np.isnan(p), -np.inf, p), axis=0).astype(np.int16)
    label[nodata] = -1
    small["label"] = ((ydim, xdim), label)
    small["confidence_histogram"] = (("confidence_bin",), np.asarray(counts, dtype=np.int64))
    small = small.assign_coords(confidence_bin=0.5 * (edges[1:] + edges[:-1]))
    small.attrs = dict(ds.attrs)
    if "label" in ds and "flag_colors" in ds["label"].attrs:
        small.attrs["label_flag_colors"] = ds["label"].attrs["flag_colors"]
    small.attrs["coarsen_factors"] = factors
    small.attrs["leading"] = {d: _scalar(ds[d][0]) if d in ds.coords else 0 for d in lead}
    return small


def _scalar(v: Any) -> Any:
    a = np.asarray(v.values)
    return a.item() if a.ndim == 0 else a


#: conventional colours of common land-cover class names (lower case, ``_`` for spaces)
NAMED_COLORS = {
    "water": "#1f78b4",
    "forest": "#1b7837",
    "trees": "#1b7837",
    "urban": "#e31a1c",
    "built_up": "#e31a1c",
    "grassland": "#b2df8a",
    "grass": "#b2df8a",
    "cropland": "#ffd92f",
    "crops": "#ffd92f",
    "agriculture": "#ffd92f",
    "bare_soil": "#bf812d",
    "bare": "#bf812d",
    "shrubland": "#a6761d",
    "wetland": "#66c2a5",
    "snow": "#f0f0f0",
    "ice": "#d9f0ff",
    "cloud": "#bdbdbd",
    "shadow": "#525252",
}
#: colours for other names: a name always takes the same one (a stable hash of it)
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#8cd17d", "#499894", "#d37295", "#fabfd2", "#b6992d", "#79706e",
    "#86bcb6", "#f1ce63", "#a0cbe8", "#ffbe7d",
)  # fmt: skip


def class_colors(names: Sequence[str], flag_colors: Any = None) -> list[str]:
    """A ``#rrggbb`` colour per class: ``flag_colors`` (a CF attribute: hex colours
    separated by spaces, or a list) where given, else the conventional colour of a known
    land-cover name, else a palette colour picked by a stable hash of the name -- so a
    class has the same colour in every run, PNG and GeoTIFF alike."""
    import zlib

    names = [str(n) for n in names]
    if flag_colors is not None:
        given = flag_colors.split() if isinstance(flag_colors, str) else list(flag_colors)
        if len(given) != len(names):
            raise ValueError(f"{len(given)} colours for {len(names)} classes: {names}")
        return [_hex(c) for c in given]
    out: list[str | None] = [NAMED_COLORS.get(n.lower().replace(" ", "_")) for n in names]
    used = {c for c in out if c}
    for i, n in enumerate(names):
        if out[i] is None:
            k = zlib.crc32(n.encode()) % len(PALETTE)
            for step in range(len(PALETTE)):  # the next free one if taken in this map
                c = PALETTE[(k + step) % len(PALETTE)]
                if c not in used:
                    break
            out[i] = c
            used.add(c)
    return [str(c) for c in out]


def _hex(color: Any) -> str:
    from matplotlib.colors import to_hex

    try:
        return to_hex(color)
    except ValueError as e:
        raise ValueError(f"{color!r} is not a colour (use #rrggbb or a colour name)") from e


def _class_colors(n: int, names: Sequence[str] | None = None, flag_colors: Any = None) -> list:
    return class_colors(
        names if names is not None else [f"class_{i}" for i in range(n)], flag_colors
    )


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _extent(small: Any, ydim: str, xdim: str) -> tuple[list[float] | None, str, str]:
    """imshow extent from 1-D numeric coords (row 0 at the top), and axis labels."""

    def edges(d: str) -> tuple[float, float] | None:
        if d not in small.coords or small[d].ndim != 1 or small[d].dtype.kind not in "iuf":
            return None
        c = np.asarray(small[d].values, dtype=np.float64)
        if c.size == 0 or not np.all(np.isfinite(c)):
            return None
        step = float(c[1] - c[0]) if c.size > 1 else 1.0
        return c[0] - step / 2, c[-1] + step / 2

    ex, ey = edges(xdim), edges(ydim)

    def label(d: str) -> str:
        if d in small.coords and "units" in small[d].attrs:
            return f"{d} [{small[d].attrs['units']}]"
        return d

    if ex is None or ey is None:
        return None, f"{xdim} (index / {small.attrs['coarsen_factors'][xdim]})", ydim
    return [ex[0], ex[1], ey[1], ey[0]], label(xdim), label(ydim)


def _title(small: Any, what: str) -> str:
    factors = small.attrs.get("coarsen_factors", {})
    parts = [what]
    if any(f > 1 for f in factors.values()):
        parts.append("block means " + " x ".join(str(f) for f in factors.values()) + " px")
    lead = small.attrs.get("leading") or {}
    if lead:
        parts.append(", ".join(f"{d}={v}" for d, v in lead.items()))
    return " | ".join(parts)


def _dims(small: Any) -> tuple[str, str]:
    ydim, xdim = small["confidence"].dims
    return ydim, xdim


def _aspect_size(small: Any, extra_width: float = 0.0) -> tuple[float, float]:
    ydim, xdim = _dims(small)
    ny, nx = small.sizes[ydim], small.sizes[xdim]
    width = 7.0
    height = max(3.0, min(9.0, width * ny / max(nx, 1) + 0.8))
    return width + extra_width, height


def plot_class_map(small: Any, path: str | os.PathLike) -> Path:
    """PNG of the most probable class, with a legend of the class names."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ydim, xdim = _dims(small)
    names = [str(n) for n in small["class"].values]
    colors = _class_colors(len(names), names, small.attrs.get("label_flag_colors"))
    label = np.asarray(small["label"].values)
    cmap = ListedColormap([NODATA_COLOR, *colors])
    fig = _figure(*_aspect_size(small, extra_width=2.0))
    ax = fig.add_subplot()
    extent, xl, yl = _extent(small, ydim, xdim)
    ax.imshow(
        label + 1,
        cmap=cmap,
        vmin=-0.5,
        vmax=len(names) + 0.5,
        interpolation="nearest",
        extent=extent,
    )
    counts = np.bincount(label[label >= 0].ravel(), minlength=len(names))
    total = max(int(counts.sum()), 1)
    handles = [
        Patch(color=c, label=f"{n} ({100 * k / total:.0f}%)")
        for n, c, k in zip(names, colors, counts, strict=True)
    ]
    if (label < 0).any():
        handles.append(Patch(color=NODATA_COLOR, label="no data"))
    fig.legend(handles=handles, loc="outside right upper", title="class")
    ax.set(title=_title(small, "most probable class"), xlabel=xl, ylabel=yl)
    _plain_ticks(ax)
    return _save(fig, path)


def plot_confidence(small: Any, path: str | os.PathLike) -> Path:
    """PNG of the confidence (largest class probability) map and its histogram.

    The map runs from 1/n_classes (no information) to 1; the histogram is over every
    full-resolution pixel with data.
    """
    from matplotlib import colormaps

    ydim, xdim = _dims(small)
    C = small.sizes["class"]
    cmap = colormaps["viridis"].with_extremes(bad=NODATA_COLOR)
    width, height = _aspect_size(small, extra_width=4.0)
    fig = _figure(width, height)
    ax, axh = fig.subplots(1, 2, width_ratios=[2.4, 1])
    extent, xl, yl = _extent(small, ydim, xdim)
    im = ax.imshow(
        small["confidence"].values,
        cmap=cmap,
        vmin=1.0 / C,
        vmax=1.0,
        interpolation="nearest",
        extent=extent,
    )
    fig.colorbar(im, ax=ax, label="largest class probability", shrink=0.8)
    ax.set(title=_title(small, "confidence"), xlabel=xl, ylabel=yl)
    _plain_ticks(ax)

    counts = np.asarray(small["confidence_histogram"].values, dtype=np.float64)
    centres = np.asarray(small["confidence_bin"].values)
    total = counts.sum()
    if total > 0:
        share = counts / total
        width_bin = float(centres[1] - centres[0]) if centres.size > 1 else 1.0
        axh.bar(centres, 100 * share, width=width_bin, color=cmap(np.clip(
            (centres - 1.0 / C) / (1 - 1.0 / C), 0, 1)))  # fmt: skip
        cum = np.cumsum(share)
        median = float(centres[np.searchsorted(cum, 0.5)])
        high = 100 * float(share[centres >= 0.9].sum())
        axh.axvline(median, color="k", lw=1, ls="--")
        axh.set_title(f"all {int(total):,} pixels\nmedian {median:.2f}, {high:.0f}% >= 0.9")
    axh.set(xlim=(0, 1), xlabel="largest class probability", ylabel="% of pixels")
    axh.grid(alpha=0.3)
    return _save(fig, path)


def plot_probabilities(small: Any, path: str | os.PathLike, max_cols: int = 4) -> Path:
    """PNG with one panel per class: its posterior probability, 0 to 1."""
    from matplotlib import colormaps

    ydim, xdim = _dims(small)
    names = [str(n) for n in small["class"].values]
    C = len(names)
    ncols = min(C, max_cols)
    nrows = math.ceil(C / ncols)
    ny, nx = small.sizes[ydim], small.sizes[xdim]
    panel = 3.2
    fig = _figure(panel * ncols + 1.0, panel * nrows * min(2.0, max(0.4, ny / nx)) + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False))
    cmap = colormaps["magma"].with_extremes(bad=NODATA_COLOR)
    extent, xl, yl = _extent(small, ydim, xdim)
    prob = small["probability"].transpose("class", ydim, xdim).values
    im = None
    for i, ax in enumerate(axes.ravel()):
        if i >= C:
            ax.set_axis_off()
            continue
        im = ax.imshow(prob[i], cmap=cmap, vmin=0, vmax=1, interpolation="nearest", extent=extent)
        ax.set_title(names[i])
        ax.tick_params(labelsize=7)
        _plain_ticks(ax)
    fig.colorbar(im, ax=axes, label="posterior probability", shrink=0.8)
    fig.suptitle(_title(small, "class probabilities"))
    return _save(fig, path)


def plot_lower_bounds(
    lower_bounds: Sequence[float], path: str | os.PathLike, *, tol: float | None = None
) -> Path:
    """PNG of the mean log-likelihood per pixel at each EM iteration, and its change."""
    lb = np.asarray(lower_bounds, dtype=np.float64)
    if lb.size == 0:
        raise ValueError("the model holds no log-likelihood history (lower_bounds is empty)")
    it = np.arange(1, lb.size + 1)
    fig = _figure(7.0, 5.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(it, lb, marker="o", ms=3)
    ax1.set(ylabel="mean log-likelihood / pixel", title="EM convergence")
    ax1.grid(alpha=0.3)
    if lb.size > 1:
        change = np.abs(np.diff(lb))
        ax2.semilogy(it[1:], np.where(change > 0, change, np.nan), marker="o", ms=3)
        if tol is not None and tol > 0:
            ax2.axhline(tol, color="grey", ls="--", lw=1, label=f"tol = {tol:g}")
            ax2.legend()
    ax2.set(xlabel="iteration", ylabel="|change|")
    ax2.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _plain_ticks(ax: Any) -> None:
    """Coordinates as plain numbers (no ``1e6`` offset above the axis)."""
    ax.ticklabel_format(style="plain", useOffset=False)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def quicklooks(
    ds: Any,
    out_dir: str | os.PathLike,
    *,
    lower_bounds: Sequence[float] | None = None,
    tol: float | None = None,
    max_size: int = 1000,
) -> dict[str, Path]:
    """Write every quicklook PNG of a posterior into ``out_dir``.

    Parameters
    ----------
    ds : xarray.Dataset
        Posterior from :func:`daskem.io.posterior` (lazy is best: only the coarsened
        maps are computed).
    out_dir : path
        Created if needed; files ``class_map.png``, ``confidence.png``,
        ``probabilities.png`` and, with ``lower_bounds``, ``loglik.png``.
    lower_bounds : sequence of float, optional
        The model's log-likelihood history (``GaussianMixture.lower_bounds_``).
    tol : float, optional
        Convergence tolerance, drawn on the change panel.
    max_size : int, default 1000
        Largest side of the map images in data pixels.

    Returns
    -------
    dict of str to pathlib.Path
    """
    out = Path(out_dir)
    small = downsample(ds, max_size=max_size)
    written = {
        "class_map": plot_class_map(small, out / "class_map.png"),
        "confidence": plot_confidence(small, out / "confidence.png"),
        "probabilities": plot_probabilities(small, out / "probabilities.png"),
    }
    if lower_bounds is not None and len(lower_bounds):
        written["loglik"] = plot_lower_bounds(lower_bounds, out / "loglik.png", tol=tol)
    return written


# --------------------------------------------------------------------------- time stacks


def is_time_posterior(ds: Any) -> bool:
    """Whether ``ds`` is the posterior of a time stack (a hidden Markov model)."""
    return all(v in ds.data_vars for v in ("state_probability", "state", "first_change"))


def _stride_pick(da_: Any, max_size: int) -> Any:
    """Every ``f``-th pixel along the last two dims (categorical maps are not averaged)."""
    ydim, xdim = da_.dims[-2:]
    sel = {}
    for d in (ydim, xdim):
        chunk = da_.chunks[da_.dims.index(d)][0] if da_.chunks else None
        f = coarsen_factor(int(da_.sizes[d]), chunk, max_size)
        sel[d] = slice(None, None, f)
    return da_.isel(sel)


def _date_index(ds: Any, date: Any) -> int:
    """Index along time of ``date``: an int index, a date string (nearest), None = last."""
    tdim = ds["state"].dims[0]
    n = int(ds.sizes[tdim])
    if date is None:
        return n - 1
    if isinstance(date, (int, np.integer)) or (
        isinstance(date, str) and date.lstrip("-").isdigit()
    ):
        i = int(date)
        if not -n <= i < n:
            raise ValueError(f"date index {i} is outside the {n} dates")
        return i % n
    times = ds[tdim].values
    if np.issubdtype(times.dtype, np.datetime64):
        try:
            target = np.datetime64(str(date), "ns")
        except ValueError as e:
            raise ValueError(f"date {date!r} is neither an index nor a date ({e})") from None
        return int(np.argmin(np.abs(times.astype("datetime64[ns]") - target)))
    raise ValueError(f"date {date!r}: give an index 0..{n - 1}")


def time_quicklooks(
    ds: Any,
    out_dir: str | os.PathLike,
    *,
    date: Any = None,
    transmat: Any = None,
    lower_bounds: Sequence[float] | None = None,
    tol: float | None = None,
    max_size: int = 1000,
) -> dict[str, Path]:
    """PNGs of a time stack's posterior: the state map at ``date``, the map of the date
    of the first change, the transition matrix and (with ``lower_bounds``) EM's curve.

    Maps are subsampled (every ``f``-th pixel, so states stay states) to at most
    ``max_size`` pixels per side before anything is computed. ``transmat`` defaults to
    the one in the posterior's ``model_fitted`` attribute.
    """
    import json

    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    out = Path(out_dir)
    tdim = ds["state"].dims[0]
    i = _date_index(ds, date)
    names = [str(n) for n in ds["states"].values]
    K = len(names)
    state = np.asarray(_stride_pick(ds["state"].isel({tdim: i}), max_size).values)
    first = _stride_pick(ds["first_change"], max_size)
    ydim, xdim = first.dims[-2:]
    small = first.to_dataset(name="first_change")
    small.attrs["coarsen_factors"] = {
        d: max(1, int(round(ds.sizes[d] / max(small.sizes[d], 1)))) for d in (ydim, xdim)
    }
    extent, xl, yl = _extent(small, ydim, xdim)
    written: dict[str, Path] = {}

    # the state map at the chosen date
    colors = _class_colors(K, names, ds["state"].attrs.get("flag_colors"))
    fig = _figure(9.0, 6.0)
    ax = fig.add_subplot()
    ax.imshow(
        state + 1,
        cmap=ListedColormap([NODATA_COLOR, *colors]),
        vmin=-0.5,
        vmax=K + 0.5,
        interpolation="nearest",
        extent=extent,
    )
    when = np.asarray(ds[tdim].values)[i] if tdim in ds.coords else i
    when = str(when)[:10] if np.issubdtype(np.asarray(when).dtype, np.datetime64) else when
    counts = np.bincount(state[state >= 0].ravel(), minlength=K)
    total = max(int(counts.sum()), 1)
    handles = [
        Patch(color=c, label=f"{n} ({100 * k / total:.0f}%)")
        for n, c, k in zip(names, colors, counts, strict=True)
    ]
    fig.legend(handles=handles, loc="outside right upper", title="state")
    ax.set(title=f"most likely state (Viterbi) at {tdim} = {when}", xlabel=xl, ylabel=yl)
    _plain_ticks(ax)
    written["state_map"] = _save(fig, out / "state_map.png")

    # the date of the first change
    fc = np.asarray(first.values)
    fig = _figure(9.0, 6.0)
    ax = fig.add_subplot()
    if np.issubdtype(fc.dtype, np.datetime64):
        missing = np.isnat(fc)
        days = (
            (fc - fc[~missing].min()).astype("timedelta64[D]").astype(float)
            if (~missing).any()
            else np.zeros(fc.shape)
        )
        values = np.where(missing, np.nan, days)
        origin = str(fc[~missing].min())[:10] if (~missing).any() else ""
        label = f"days after {origin}"
    else:
        values = np.where(np.asarray(fc, dtype=float) < 0, np.nan, np.asarray(fc, dtype=float))
        label = tdim
    ax.set_facecolor(NODATA_COLOR)
    im = ax.imshow(values, cmap="viridis", interpolation="nearest", extent=extent)
    fig.colorbar(im, ax=ax, label=label)
    share = float(np.isfinite(values).mean()) if values.size else 0.0
    ax.set(
        title=f"first change of state ({100 * share:.0f}% of pixels change; grey: never)",
        xlabel=xl,
        ylabel=yl,
    )
    _plain_ticks(ax)
    written["change_date"] = _save(fig, out / "change_date.png")

    # the transition matrix
    if transmat is None:
        fitted = ds.attrs.get("model_fitted")
        if fitted is not None:
            transmat = json.loads(fitted).get("transmat")
    if transmat is not None:
        A = np.asarray(transmat, dtype=np.float64)
        fig = _figure(5.5, 4.8)
        ax = fig.add_subplot()
        im = ax.imshow(A, cmap="Blues", vmin=0, vmax=1)
        for a in range(A.shape[0]):
            for b in range(A.shape[1]):
                ax.text(
                    b,
                    a,
                    f"{A[a, b]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if A[a, b] > 0.6 else "black",
                    fontsize=8,
                )
        ax.set_xticks(range(K), names, rotation=45, ha="right")
        ax.set_yticks(range(K), names)
        ax.set(title="transition matrix p(to | from)", xlabel="to", ylabel="from")
        fig.colorbar(im, ax=ax)
        written["transmat"] = _save(fig, out / "transmat.png")
    if lower_bounds is not None and len(lower_bounds):
        written["loglik"] = plot_lower_bounds(lower_bounds, out / "loglik.png", tol=tol)
    return written


def plot_confusion(result: dict, path: str | os.PathLike) -> Path:
    """PNG of a confusion matrix (:func:`daskem.io.assess`), rows normalised, counts shown."""
    cm = np.asarray(result["confusion"], dtype=float)
    names = result["classes"]
    K = len(names)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = cm / cm.sum(axis=1, keepdims=True)
    fig = _figure(1.2 + 0.6 * K, 1.0 + 0.55 * K)
    ax = fig.add_subplot()
    im = ax.imshow(np.nan_to_num(frac), cmap="Blues", vmin=0, vmax=1)
    for a in range(K):
        for b in range(K):
            ax.text(b, a, f"{int(cm[a, b])}", ha="center", va="center", fontsize=7,
                    color="white" if frac[a, b] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(K), names, rotation=45, ha="right")
    ax.set_yticks(range(K), names)
    ax.set(
        xlabel="map",
        ylabel="reference",
        title=f"accuracy {result['overall_accuracy']:.3f}, kappa {result['kappa']:.3f}",
    )
    fig.colorbar(im, ax=ax, label="share of the reference class")
    return _save(fig, path)


def plot_selection(result: dict, path: str | os.PathLike) -> Path:
    """PNG of an information criterion against the number of components."""
    ks = np.asarray(result["ks"])
    v = np.asarray(result["values"], dtype=float)
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    ax.plot(ks, v, marker="o")
    best = int(result["best"])
    ax.plot([best], [v[list(ks).index(best)]], marker="*", ms=14, color="C3", ls="none",
            label=f"best K = {best}")  # fmt: skip
    ax.set(
        xlabel="number of components K", ylabel=result["criterion"].upper() + " (lower is better)"
    )
    ax.set_xticks(ks)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
