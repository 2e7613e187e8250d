"""Tests of the synthetic data generators in :mod:`daskem.synthetic`."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import xarray as xr

from daskem.synthetic import UNLABELLED, make_samples, make_stack, write_stack


@pytest.fixture(scope="module")
def stack() -> xr.Dataset:
    return make_stack(shape=(128, 160), n_classes=4, n_features=4, smoothness=8.0, seed=1)


def _features(ds: xr.Dataset) -> np.ndarray:
    return np.stack([ds[f"attr_{k}"].values for k in range(ds.attrs["n_features"])], axis=-1)


def _open(path) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean store opens without warnings
        return xr.open_zarr(path).load()


def test_structure_and_dtypes(stack):
    assert stack.sizes == {"y": 128, "x": 160}
    for k in range(4):
        var = stack[f"attr_{k}"]
        assert var.dims == ("y", "x")
        assert var.dtype == np.float32
        assert {"units", "long_name"} <= set(var.attrs)
        assert var.attrs["grid_mapping"] == "spatial_ref"
    assert stack.truth.dtype == np.int16
    assert stack.labels.dtype == np.int16
    assert stack.x.dtype == np.float64 and stack.y.dtype == np.float64
    assert np.all(np.diff(stack.x.values) > 0)
    assert np.all(np.diff(stack.y.values) < 0)
    assert "spatial_ref" in stack.coords and stack.spatial_ref.ndim == 0
    assert stack.spatial_ref.attrs["epsg"] == 32633
    assert stack.attrs["source"] == "daskem.synthetic.make_stack"
    assert np.asarray(stack.attrs["true_means"]).shape == (4, 4)
    np.testing.assert_array_equal(stack.labels.attrs["flag_values"], np.arange(4))
    assert stack.labels.attrs["flag_meanings"].split() == stack.attrs["class_names"]
    assert stack.labels.attrs["unlabelled_value"] == UNLABELLED


def test_classes_are_coherent_and_all_present(stack):
    truth = stack.truth.values
    assert set(np.unique(truth)) == {0, 1, 2, 3}
    counts = np.bincount(truth.ravel())
    assert counts.min() > 0.05 * truth.size
    same = np.concatenate(
        [(truth[1:] == truth[:-1]).ravel(), (truth[:, 1:] == truth[:, :-1]).ravel()]
    )
    assert same.mean() > 0.8


def test_class_means_are_recoverable(stack):
    X = _features(stack).astype(np.float64)
    truth = stack.truth.values
    finite = np.isfinite(X).all(axis=-1)
    means = np.asarray(stack.attrs["true_means"])
    covs = np.asarray(stack.attrs["true_covariances"])
    for c in range(4):
        emp = X[finite & (truth == c)].mean(axis=0)
        tol = 5 * np.sqrt(np.diag(covs[c]) / (finite & (truth == c)).sum())
        assert np.all(np.abs(emp - means[c]) < tol)


def test_labels(stack):
    labels = stack.labels.values
    X = _features(stack)
    finite = np.isfinite(X).all(axis=-1)
    assert set(np.unique(labels)) == {UNLABELLED, 0, 1, 2, 3}
    for c in range(4):
        assert (labels == c).sum() == 5
    labelled = labels != UNLABELLED
    assert finite[labelled].all()
    np.testing.assert_array_equal(labels[labelled], stack.truth.values[labelled])


def test_nan_pattern(stack):
    X = _features(stack)
    isnan = np.isnan(X)
    full = isnan.all(axis=-1)
    partial = isnan.any(axis=-1) & ~full
    assert 0.01 <= full.mean() <= 0.035  # asked for 0.02
    assert 0.002 <= partial.mean() <= 0.008  # about 0.02 / 4
    assert (isnan[partial].sum(axis=-1) == 1).all()
    # holes are blobs: most all-NaN pixels have an all-NaN 4-neighbour
    nb = np.zeros_like(full)
    nb[1:] |= full[:-1]
    nb[:-1] |= full[1:]
    nb[:, 1:] |= full[:, :-1]
    nb[:, :-1] |= full[:, 1:]
    assert (nb[full]).mean() > 0.9


def test_no_nans_and_dtype():
    ds = make_stack(shape=(48, 40), nan_fraction=0.0, dtype="float64", smoothness=4.0, seed=3)
    X = _features(ds)
    assert X.dtype == np.float64
    assert np.isfinite(X).all()


def test_3d_shape():
    ds = make_stack(shape=(3, 40, 48), n_classes=3, n_features=2, smoothness=4.0, seed=2)
    assert ds.attr_0.dims == ("z", "y", "x")
    assert ds.sizes == {"z": 3, "y": 40, "x": 48}
    assert ds.z.dtype == np.float64
    assert set(np.unique(ds.truth.values)) == {0, 1, 2}
    for c in range(3):
        assert (ds.labels.values == c).sum() == 5


def test_determinism():
    a = make_stack(shape=(40, 40), smoothness=4.0, seed=7)
    b = make_stack(shape=(40, 40), smoothness=4.0, seed=7)
    c = make_stack(shape=(40, 40), smoothness=4.0, seed=8)
    xr.testing.assert_identical(a, b)
    assert not a.attr_0.equals(c.attr_0)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_stack(shape=(10,))
    with pytest.raises(ValueError):
        make_stack(shape=(8, 8), labels_per_class=1000)


def test_write_stack_round_trip(tmp_path, stack):
    path = write_stack(stack, tmp_path / "stack.zarr", chunks={"y": 32, "x": 64})
    assert path == tmp_path / "stack.zarr"
    back = _open(path)
    xr.testing.assert_identical(back, stack)
    assert back.labels.dtype == np.int16
    assert back.spatial_ref.attrs == stack.spatial_ref.attrs
    raw = xr.open_zarr(path)
    assert raw.attr_0.encoding["chunks"] == (32, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.zarr"]


def test_write_stack_int_chunks_and_format2(tmp_path):
    ds = make_stack(shape=(2, 24, 30), n_classes=2, n_features=2, smoothness=3.0, seed=4)
    path = write_stack(ds, tmp_path / "s.zarr", chunks=16, zarr_format=2)
    raw = xr.open_zarr(path)
    assert raw.attr_1.encoding["chunks"] == (2, 16, 16)
    xr.testing.assert_identical(_open(path), ds)


def test_write_stack_refuses_then_overwrites(tmp_path):
    a = make_stack(shape=(24, 24), n_classes=2, smoothness=3.0, seed=5)
    b = make_stack(shape=(24, 24), n_classes=2, smoothness=3.0, seed=6)
    target = tmp_path / "s.zarr"
    write_stack(a, target)
    with pytest.raises(FileExistsError, match="s.zarr"):
        write_stack(b, target)
    xr.testing.assert_identical(_open(target), a)
    write_stack(_open(target), tmp_path / "copy.zarr")  # re-writing a read dataset works
    write_stack(b, target, overwrite=True)
    xr.testing.assert_identical(_open(target), b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.zarr", "s.zarr"]


def test_make_samples():
    X, y, means = make_samples(1000, 3, 4, seed=0, dtype="float32")
    assert X.shape == (1000, 3) and X.dtype == np.float32
    assert y.shape == (1000,) and np.bincount(y).tolist() == [250] * 4
    assert means.shape == (4, 3)
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    np.testing.assert_allclose(d[~np.eye(4, dtype=bool)], 3.0)
    for c in range(4):
        assert np.linalg.norm(X[y == c].mean(axis=0) - means[c]) < 0.4
    X2, y2, m2 = make_samples(1000, 3, 4, seed=0, dtype="float32")
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    # more components than a simplex in 2-D can hold
    X3, y3, m3 = make_samples(50, 2, 6, seed=1)
    assert X3.shape == (50, 2) and m3.shape == (6, 2) and set(y3) == set(range(6))


# ---------------------------------------------------------------------------
# clouds: spatially correlated partial missingness
# ---------------------------------------------------------------------------

# sha256 of the attribute arrays (name, dtype, shape and bytes of attr_0, attr_1, ...)
# and of (truth, labels) of make_stack outputs, computed with the implementation
# before ``clouds`` was added (numpy 2.4.6, xarray 2026.9.0).  Exact float bytes:
# a different NumPy / LAPACK build could in principle change the last bits.
_BASELINE = [
    (
        {},
        "f6c3e4ebc5607ba52c022a382703cf6875b55a01f2e41864219b6a881bc1d0ce",
        "fe86f9763c9b57ac565926575c9951b484cbc63864783a446a71921d353f76d2",
    ),
    (
        {"shape": (24, 32, 40), "n_features": 3, "seed": 5},
        "1f66b3deff709cf58b6e2471e6e0355ac1d17c04340e38388c1ef5385a5d1532",
        "abc863109d53d80808afcda0902261f1ecb48be07bc2610538a360f38f345301",
    ),
    (
        {"shape": (64, 64), "modes_per_class": 2, "dtype": "float64", "seed": 3},
        "896a16ebee8a4be99b459a50182f776bff44f8d5e2da699256695cfad75c3a1a",
        "f3b6c0670237ca6525e311b311ed557641101134dd9ffb33e3fa91e822dd2e8c",
    ),
]


def _sha256(ds: xr.Dataset, names) -> str:
    h = hashlib.sha256()
    for n in names:
        a = np.ascontiguousarray(ds[n].values)
        h.update(n.encode())
        h.update(a.dtype.str.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cloudy() -> xr.Dataset:
    return make_stack(shape=(128, 128), n_features=4, smoothness=8.0, seed=1, clouds=0.3)


@pytest.mark.parametrize(
    ("kwargs", "attr_sha", "label_sha"), _BASELINE, ids=["default", "3d", "modes-f64"]
)
def test_clouds_zero_reproduces_earlier_output(kwargs, attr_sha, label_sha):
    ds = make_stack(**kwargs)
    names = [f"attr_{k}" for k in range(ds.attrs["n_features"])]
    assert _sha256(ds, names) == attr_sha
    assert _sha256(ds, ["truth", "labels"]) == label_sha
    assert "clouds" not in ds.attrs and "cloud_hidden" not in ds
    xr.testing.assert_identical(make_stack(**kwargs, clouds=0.0), ds)
    assert make_stack(**kwargs, clouds=0.0).attrs.keys() == ds.attrs.keys()


def test_clouds_partial_fraction(cloudy):
    X = _features(cloudy)
    isnan = np.isnan(X)
    partial = isnan.any(axis=-1) & ~isnan.all(axis=-1)
    assert 0.2 <= partial.mean() <= 0.4  # asked for 0.3
    hidden = cloudy.cloud_hidden.values
    assert cloudy.cloud_hidden.dtype == np.int16 and cloudy.cloud_hidden.dims == ("y", "x")
    assert 0.2 <= (hidden > 0).mean() <= 0.4
    assert cloudy.attrs["clouds"] == 0.3
    # blobs hide 1, 2 and 3 of the 4 attributes somewhere
    assert set(np.unique(hidden)) == {0, 1, 2, 3}


def test_clouds_never_hide_everything(cloudy):
    base = make_stack(shape=(128, 128), n_features=4, smoothness=8.0, seed=1)
    X, B = _features(cloudy), _features(base)
    hidden = cloudy.cloud_hidden.values
    assert hidden.min() == 0 and hidden.max() <= 3  # at most n_features - 1
    # clouds make no pixel all-NaN: all-NaN pixels are the nan_fraction holes
    np.testing.assert_array_equal(np.isnan(X).all(axis=-1), np.isnan(B).all(axis=-1))
    # every value hidden by clouds is counted in cloud_hidden
    newly = np.isnan(X) & ~np.isnan(B)
    assert (newly.sum(axis=-1) <= hidden).all()
    assert (newly.any(axis=-1) == (hidden > 0))[~np.isnan(B).any(axis=-1)].all()
    # labels stay on fully finite pixels; truth is unchanged
    labelled = cloudy.labels.values != UNLABELLED
    assert np.isfinite(X[labelled]).all() and labelled.sum() == 4 * 5
    xr.testing.assert_identical(cloudy.truth, base.truth)


def test_clouds_are_spatially_correlated(cloudy):
    c = cloudy.cloud_hidden.values > 0
    assert c[:, 1:][c[:, :-1]].mean() > 0.7  # right neighbour of a cloudy pixel
    assert c[1:][c[:-1]].mean() > 0.7  # lower neighbour
    # within a blob the hidden attributes are coherent, not per-pixel noise
    nan = np.isnan(_features(cloudy))
    both = c[:, 1:] & c[:, :-1]
    same = (nan[:, 1:] == nan[:, :-1]).all(axis=-1)
    assert same[both].mean() > 0.8


def test_cloud_blobs_sets_their_number_and_size(cloudy):
    from scipy import ndimage

    kw = dict(shape=(128, 128), n_features=4, smoothness=8.0, seed=1, clouds=0.3)
    xr.testing.assert_identical(make_stack(**kw, cloud_blobs=8), cloudy)
    many = make_stack(**kw, cloud_blobs=64)
    counts = []
    for ds in (cloudy, many):
        c = ds.cloud_hidden.values > 0
        assert 0.2 <= c.mean() <= 0.4
        counts.append(ndimage.label(c)[1])
    assert counts[1] > 3 * counts[0], counts  # many more, smaller clouds
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="cloud_blobs"):
            make_stack(**kw, cloud_blobs=bad)


def test_clouds_true_values(cloudy):
    base = make_stack(shape=(128, 128), n_features=4, smoothness=8.0, seed=1)
    for k in range(4):
        attr, true = cloudy[f"attr_{k}"], cloudy[f"attr_{k}_true"]
        assert true.dims == attr.dims and true.dtype == attr.dtype
        assert true.attrs["comment"] == "for evaluating gap filling"
        assert "value before cloud masking" in true.attrs["long_name"]
        assert attr.attrs["ancillary_variables"] == f"attr_{k}_true cloud_hidden"
        finite = np.isfinite(attr.values)
        np.testing.assert_array_equal(true.values[finite], attr.values[finite])
        # the field before cloud masking is the clouds=0 attribute
        np.testing.assert_array_equal(true.values, base[f"attr_{k}"].values)
        assert (np.isnan(attr.values) & np.isfinite(true.values)).any()


def test_clouds_3d_and_round_trip(tmp_path):
    ds = make_stack(
        shape=(3, 32, 40), n_classes=2, n_features=2, smoothness=4.0, seed=2, clouds=0.4
    )
    base = make_stack(shape=(3, 32, 40), n_classes=2, n_features=2, smoothness=4.0, seed=2)
    X, B = _features(ds), _features(base)
    assert ds.cloud_hidden.dims == ("z", "y", "x") and ds.cloud_hidden.values.max() == 1
    assert 0.3 <= (ds.cloud_hidden.values > 0).mean() <= 0.5
    # with two attributes, clouds hide exactly one; no pixel becomes all-NaN
    np.testing.assert_array_equal(np.isnan(X).all(axis=-1), np.isnan(B).all(axis=-1))
    assert np.isnan(X).any(axis=-1)[ds.cloud_hidden.values > 0].all()
    xr.testing.assert_identical(_open(write_stack(ds, tmp_path / "c.zarr", chunks=16)), ds)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clouds": -0.1}, "clouds"),
        ({"clouds": 0.95}, "clouds"),
        ({"clouds": float("nan")}, "clouds"),
        ({"clouds": 0.3, "n_features": 1}, "clouds.*n_features"),
    ],
)
def test_clouds_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_stack(shape=(32, 32), **kwargs)
