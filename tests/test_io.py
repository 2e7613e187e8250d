"""Stacks in, posterior maps out: daskem.io on synthetic stacks (small maps, K = 3..4)."""

import itertools
import json
import math
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from daskem.cluster import peak_rss
from daskem.io import (
    Stack,
    fit_stack,
    labels_for_stack,
    open_stack,
    posterior,
    write_posterior,
)
from daskem.model.gmm import log_responsibilities
from daskem.synthetic import make_stack, write_stack

SHAPE = (96, 128)
CHUNKS = {"y": 48, "x": 64}
K = 3


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def ds():
    return make_stack(SHAPE, n_classes=K, n_features=4, labels_per_class=5, seed=0)


@pytest.fixture(scope="module")
def stack(ds):
    return open_stack(ds, chunks=CHUNKS)


def _fit(stack, labels=None, **kw):
    kw.setdefault("random_state", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with dask.config.set(scheduler="synchronous"):
            return fit_stack(stack, kw.pop("n_components", K), labels, **kw)


@pytest.fixture(scope="module")
def semi(stack):
    return _fit(stack, "labels")


def _best_accuracy(pred, truth, n):
    ok = pred >= 0
    return max(
        np.mean(np.asarray(perm)[pred[ok]] == truth[ok])
        for perm in itertools.permutations(range(n))
    )


# --------------------------------------------------------------------------- stacks


def test_open_stack_selects_attributes_and_rows_are_blockwise(ds, stack):
    assert stack.variables == ("attr_0", "attr_1", "attr_2", "attr_3")  # not truth/labels
    assert stack.dims == ("y", "x")
    assert stack.data.chunks == ((4,), (48, 48), (64, 64))
    rows = stack.rows()
    assert rows.chunks == ((48 * 64,) * 4, (4,))
    # block (i, j) of the map is row chunk 2 i + j, pixels in C order within the block
    values = np.stack([ds[v].values for v in stack.variables])
    expect = np.concatenate(
        [
            values[:, i * 48 : (i + 1) * 48, j * 64 : (j + 1) * 64].reshape(4, -1).T
            for i in range(2)
            for j in range(2)
        ]
    )
    np.testing.assert_array_equal(rows.compute(), expect)
    # the row view is per block: no layer depends on more than one input block
    assert all(len(deps) <= 1 for deps in _block_deps(rows).values())
    np.testing.assert_array_equal(stack.to_map(rows[:, 2]).compute(), values[2])
    np.testing.assert_array_equal(stack.to_map(rows).compute(), values)


def _block_deps(x):
    graph = dict(x.__dask_graph__())
    keys = set(graph)
    return {k: [d for d in graph[k].dependencies if d in keys] for k in x.__dask_keys__()[0]}


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [True, False])
def test_open_stack_from_zarr_keeps_store_chunks(tmp_path, ds, zarr_format, consolidated):
    path = tmp_path / "s.zarr"
    enc = {v: {"chunks": (32, 64)} for v in ds.data_vars}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        ds.to_zarr(path, zarr_format=zarr_format, consolidated=consolidated, encoding=enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warnings either
        st = open_stack(path)
    assert st.path == str(path)
    assert st.chunks == ((32, 32, 32), (64, 64))
    np.testing.assert_array_equal(st.data.compute(), open_stack(ds).data.compute())


def test_open_stack_dataarray_with_feature_dim(ds, stack):
    arr = ds[list(stack.variables)].to_dataarray("band").chunk({"y": 48, "x": 64})
    st = open_stack(arr)
    assert st.variables == stack.variables and st.dims == ("y", "x")
    np.testing.assert_array_equal(st.data.compute(), stack.data.compute())
    assert "spatial_ref" in st.dataset.coords
    st2 = open_stack(arr.rename(band="feature"), ["attr_2", "attr_0"])
    assert st2.variables == ("attr_2", "attr_0")
    np.testing.assert_array_equal(st2.data[0].compute(), ds.attr_2.values)


def test_nodata_attr_mask_and_explicit_nodata():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 8)).astype("float32")
    a[0, 0] = -9999.0
    b = rng.integers(1, 100, size=(6, 8)).astype("uint16")
    b[1, 1] = 0
    valid = np.ones((6, 8), bool)
    valid[2, 2] = False
    src = xr.Dataset(
        {
            "a": (("y", "x"), a, {"nodata": -9999.0}),
            "b": (("y", "x"), b, {"_FillValue": 0}),
            "valid": (("y", "x"), valid),
        }
    )
    st = open_stack(src, ["a", "b"], mask="valid")
    out = st.data.compute()
    assert out.dtype == np.float32
    assert np.isnan(out[0, 0, 0]) and np.isnan(out[1, 1, 1]) and np.isnan(out[:, 2, 2]).all()
    assert np.isfinite(out).sum() == 2 * 48 - 2 - 2
    # default selection: numeric variables (the integer band converted to float), the
    # mask variable excluded
    assert open_stack(src, mask="valid").variables == ("a", "b")
    # explicit nodata overrides the attrs
    out = open_stack(src, ["a"], nodata={"a": a[3, 3].item()}).data.compute()
    assert np.isnan(out[0, 3, 3]) and out[0, 0, 0] == -9999.0


def test_differently_chunked_variables_are_rechunked_with_a_warning(ds):
    src = ds.copy()
    src["attr_0"] = src.attr_0.chunk({"y": 48, "x": 64})
    src["attr_1"] = src.attr_1.chunk({"y": 32, "x": 128})
    with pytest.warns(UserWarning, match="chunked differently.*costs"):
        st = open_stack(src, ["attr_0", "attr_1"])
    assert st.chunks == ((48, 48), (64, 64))


def test_three_d_stack_round_trip(tmp_path):
    src = make_stack((4, 40, 48), n_classes=3, n_features=3, seed=2)
    path = write_stack(src, tmp_path / "cube.zarr", chunks={"z": 2, "y": 20, "x": 24})
    st = open_stack(path)
    assert st.dims == ("z", "y", "x") and st.chunks == ((2, 2), (20, 20), (24, 24))
    gm = _fit(st, "labels")
    post = posterior(gm, st)
    assert post.probability.dims == ("class", "z", "y", "x")
    assert post.label.chunks == ((2, 2), (20, 20), (24, 24))
    assert post.attrs["daskem_input_path"] == str(path)
    out = write_posterior(post, tmp_path / "post.zarr")
    _assert_round_trip(post, out, src)


def _assert_round_trip(post, path, src):
    mem = post.compute()
    back = xr.open_zarr(path).compute()
    xr.testing.assert_allclose(back, mem)
    assert back.label.dtype == np.int16 and back.probability.dtype == np.float32
    assert "_FillValue" not in back.label.attrs and back.label.attrs["unlabelled_value"] == -1
    assert list(back["class"].values) == list(mem["class"].values)
    for name in ("x", "y", "spatial_ref"):
        assert back[name].attrs == src[name].attrs
        np.testing.assert_array_equal(back[name].values, src[name].values)
    assert back.probability.attrs["grid_mapping"] == "spatial_ref"
    for key in ("title", "Conventions", "daskem_version", "model_n_iter", "model_lower_bound"):
        assert back.attrs[key] == mem.attrs[key]


def test_posterior_dataset_with_crs_round_trips(tmp_path, ds, stack, semi):
    post = posterior(semi, stack)
    assert post.probability.chunks[1:] == stack.chunks
    assert list(post["class"].values) == ["water", "forest", "urban"]
    assert post.label.attrs["flag_meanings"] == "water forest urban"
    np.testing.assert_array_equal(post.label.attrs["flag_values"], [0, 1, 2])
    assert post.spatial_ref.attrs["spatial_ref"] == "EPSG:32633"
    assert post.attrs["model_kind"] == "gmm"
    assert np.asarray(json.loads(post.attrs["model_fitted"])["means"]).shape == (K, 4)
    assert json.loads(post.attrs["model_feature_names"]) == list(stack.variables)
    assert post.attrs["model_converged"] in (0, 1)
    path = write_posterior(post, tmp_path / "post.zarr", zarr_format=2)
    _assert_round_trip(post, path, ds)


def test_write_posterior_reads_each_block_once(tmp_path, ds, semi):
    reads = []

    def count(block, block_info=None):
        reads.append(block_info[0]["chunk-location"])
        return block

    src = ds.chunk(CHUNKS)
    src["attr_0"] = src.attr_0.copy(data=src.attr_0.data.map_blocks(count, dtype="float32"))
    st = open_stack(src)
    write_posterior(posterior(semi, st), tmp_path / "p.zarr")
    assert sorted(reads) == [(i, j) for i in range(2) for j in range(2)]


def test_write_posterior_is_atomic_and_refuses_to_overwrite(tmp_path, stack, semi):
    post = posterior(semi, stack)
    target = tmp_path / "post.zarr"
    write_posterior(post, target)
    with pytest.raises(FileExistsError, match="post.zarr"):
        write_posterior(post, target)
    post2 = post.assign_attrs(run=2)
    write_posterior(post2, target, overwrite=True)
    assert xr.open_zarr(target).attrs["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["post.zarr"]


# --------------------------------------------------------------------------- fitting


def test_semi_supervised_beats_unsupervised_and_confidence_tracks_errors(ds, stack, semi):
    truth = ds.truth.values
    unsup = _fit(stack)
    acc_unsup = _best_accuracy(posterior(unsup, stack).label.values, truth, K)
    post = posterior(semi, stack).compute()
    pred = post.label.values
    acc_semi = np.mean((pred == truth)[pred >= 0])  # no permutation: classes are named
    # the unsupervised figure matches components to classes with the truth (an oracle);
    # on these well-separated classes both fits reach the same optimum to within tol
    assert acc_semi >= acc_unsup - 0.002
    assert acc_semi > 0.8
    conf = post.confidence.values
    right = (pred == truth) & (pred >= 0)
    wrong = (pred != truth) & (pred >= 0)
    assert wrong.sum() > 10
    assert conf[wrong].mean() < conf[right].mean() - 0.1


def test_label_clamping_is_exact(ds, stack, semi):
    y, names = labels_for_stack(stack, "labels")
    assert names == ["water", "forest", "urban"] and y.dtype == np.int32
    y = y.compute()
    lab = y >= 0
    X = stack.rows().compute()[lab]
    _, log_resp = log_responsibilities(X, semi._fitted_params(), y[lab])
    np.testing.assert_array_equal(np.exp(log_resp)[np.arange(lab.sum()), y[lab]], 1.0)
    # posterior(..., labels) clamps labelled pixels; without labels it is p(class | x)
    clamped = posterior(semi, stack, labels="labels").compute()
    free = posterior(semi, stack).compute()
    where = ds.labels.values >= 0
    cls = ds.labels.values[where]
    p = clamped.probability.values[:, where]
    np.testing.assert_array_equal(p[cls, np.arange(cls.size)], 1.0)
    assert p.sum(axis=0) == pytest.approx(1.0)
    np.testing.assert_array_equal(clamped.label.values[where], cls)
    np.testing.assert_array_equal(clamped.confidence.values[where], 1.0)
    np.testing.assert_array_equal(clamped.entropy.values[where], 0.0)
    np.testing.assert_array_equal(clamped.log_likelihood, free.log_likelihood)
    assert (free.confidence.values[where] < 1.0).any()
    other = ~where
    np.testing.assert_array_equal(
        clamped.probability.values[:, other], free.probability.values[:, other]
    )


def test_point_labels_match_the_label_map(tmp_path, ds, stack):
    y_map, names = labels_for_stack(stack, "labels")
    iy, ix = np.nonzero(ds.labels.values >= 0)
    records = [
        {
            "y": float(ds.y[i]) + 3.0,
            "x": float(ds.x[j]) - 4.0,
            "class": names[ds.labels.values[i, j]],
        }
        for i, j in zip(iy, ix, strict=True)
    ]
    y_pts, names_pts = labels_for_stack(stack, records, class_names=names)
    assert names_pts == names
    np.testing.assert_array_equal(y_pts.compute(), y_map.compute())
    csv = tmp_path / "points.csv"
    csv.write_text(
        "y,x,class\n"
        + "".join(
            f"{ds.y.values[i]},{ds.x.values[j]},{int(ds.labels.values[i, j])}\n"
            for i, j in zip(iy, ix, strict=True)
        )
    )
    y_csv, names_csv = labels_for_stack(stack, csv)
    np.testing.assert_array_equal(y_csv.compute(), y_map.compute())
    assert names_csv == ["0", "1", "2"]  # a file's own class values name its classes
    # ... whatever they are: ids 1, 3, 7 are three classes, not eight with five empty
    csv.write_text(
        "y,x,class\n"
        + "".join(
            f"{ds.y.values[i]},{ds.x.values[j]},{[1, 3, 7][int(ds.labels.values[i, j])]}\n"
            for i, j in zip(iy, ix, strict=True)
        )
    )
    y_csv, names_csv = labels_for_stack(stack, csv)
    assert names_csv == ["1", "3", "7"]
    np.testing.assert_array_equal(y_csv.compute(), y_map.compute())


def test_nan_pixels(ds, stack, semi):
    values = np.stack([ds[v].values for v in stack.variables])
    n_nan = np.isnan(values).sum(axis=0)
    empty, partial = n_nan == values.shape[0], (n_nan > 0) & (n_nan < values.shape[0])
    assert empty.sum() > 0 and partial.sum() > 0
    assert semi.excluded_counts_ == {
        "all_missing": int(empty.sum()),
        "partially_missing": int(partial.sum()),
        "total": int(empty.sum()),  # partly missing pixels are fitted (marginalised)
    }
    assert semi.nan_policy == "marginalize" and semi.n_partial_ == partial.sum()
    assert semi.n_excluded_ == semi.excluded_counts_["total"] == semi.n_empty_
    post = posterior(semi, stack).compute()
    for name in ("confidence", "entropy", "log_likelihood"):
        assert np.isnan(post[name].values[empty]).all(), name
        assert np.isfinite(post[name].values[~empty]).all(), name
    assert np.isnan(post.probability.values[:, empty]).all()
    assert (post.label.values[empty] == -1).all() and (post.label.values[~empty] >= 0).all()
    p = post.probability.values[:, partial]
    assert np.isfinite(p).all() and p.sum(axis=0) == pytest.approx(1.0, abs=1e-5)


def test_fit_stack_forwards_weights_and_callback(ds, stack):
    seen = []
    w = xr.ones_like(ds.attr_0).where(ds.y > ds.y[48], 0.0)  # weight only the south half
    gm = _fit(stack, sample_weight=w, callback=seen.append, max_iter=3)
    assert len(seen) == gm.n_iter_
    south = open_stack(ds.isel(y=slice(49, None)))
    ref = _fit(south, max_iter=3)
    np.testing.assert_allclose(np.sort(gm.means_[:, 0]), np.sort(ref.means_[:, 0]), rtol=0.05)


def test_fit_stack_records_names(stack, semi):
    assert list(semi.feature_names_in_) == list(stack.variables)
    assert semi.class_names_ == ["water", "forest", "urban"]
    assert semi.n_classes_ == K
    gm4 = _fit(stack, "labels", n_components=4)
    assert list(gm4.component_classes_) == [0, 1, 2, 0]
    assert posterior(gm4, stack).probability.shape[0] == K


# --------------------------------------------------------------------------- errors


def test_error_variables_on_different_grids(ds):
    bad = ds.assign(other=(("y2", "x"), np.zeros((50, SHAPE[1]), "float32")))
    with pytest.raises(ValueError, match=r"different spatial dims/shapes: .*other \{'y2': 50"):
        open_stack(bad, ["attr_0", "other"])
    with pytest.raises(ValueError, match="different spatial dims/shapes"):
        open_stack(bad)


def test_error_unknown_missing_and_non_numeric_variables(ds):
    with pytest.raises(ValueError, match=r"unknown variable\(s\) \['nope'\]; available .*attr_0"):
        open_stack(ds, ["attr_0", "nope"])
    with pytest.raises(ValueError, match="no variables selected"):
        open_stack(ds, [])
    with pytest.raises(ValueError, match="found no numeric data variables"):
        open_stack(ds[["labels", "truth"]])
    with pytest.raises(ValueError, match="'name' is not numeric"):
        open_stack(ds.assign(name=(("y", "x"), np.full(SHAPE, "a"))), ["attr_0", "name"])


def test_error_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such Zarr store.*missing.zarr"):
        open_stack(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'.*plain' is not a Zarr store"):
        open_stack(tmp_path / "plain")
    with pytest.raises(ValueError, match="is not a Zarr store"):
        open_stack(tmp_path / "plain" / "data.txt")


def test_error_label_map_on_a_different_grid(ds, stack):
    with pytest.raises(ValueError, match="label map is on a different grid.*coordinate 'x'"):
        labels_for_stack(stack, ds.labels.assign_coords(x=ds.x + 5.0))
    with pytest.raises(ValueError, match="label map is on a different grid"):
        labels_for_stack(stack, ds.labels.isel(y=slice(0, 50)))


def _with_labels(ds, values):
    lab = ds.labels.copy(data=values.astype("int16"))
    return lab


def test_error_class_ids_out_of_range(ds, stack):
    v = ds.labels.values.copy()
    iy, ix = np.nonzero(v == 1)
    v[iy[0], ix[0]] = 7
    v[iy[1], ix[1]] = -5
    with pytest.raises(
        ValueError,
        match=r"class ids \[-5, 7\] outside the valid range flag_values \[0, 1, 2\]",
    ):
        labels_for_stack(stack, _with_labels(ds, v))
    plain = _with_labels(ds, v).drop_attrs()
    with pytest.raises(ValueError, match=r"class ids \[-5, 7\] outside the valid range \[0, 3\)"):
        labels_for_stack(stack, plain, class_names=["a", "b", "c"])


def test_error_class_without_labels(ds, stack):
    v = ds.labels.values.copy()
    v[v == 2] = -1
    with pytest.raises(ValueError, match=r"class 'urban' \(id 2\) has no labelled pixels"):
        labels_for_stack(stack, _with_labels(ds, v))


def test_error_labels_only_on_masked_pixels(ds, stack):
    v = ds.labels.values.copy()
    v[v == 0] = -1
    values = np.stack([ds[n].values for n in stack.variables])
    iy, ix = np.nonzero(np.isnan(values).all(axis=0))
    v[iy[:3], ix[:3]] = 0
    with pytest.raises(ValueError, match=r"class 'water' \(id 0\) has labels only on masked"):
        labels_for_stack(stack, _with_labels(ds, v))
    # a few labels on masked pixels besides valid ones: left out with a warning
    v = ds.labels.values.copy()
    v[iy[:2], ix[:2]] = 1
    with pytest.warns(UserWarning, match="2 labelled pixels have no attribute and are left"):
        y, _ = labels_for_stack(stack, _with_labels(ds, v))
    assert (y.compute() >= 0).sum() == 3 * 5 + 2
    # a class labelled only on partly observed pixels: usable when they are marginalised
    partial = np.isnan(values).any(axis=0) & np.isfinite(values).any(axis=0)
    py, px = np.nonzero(partial)
    v = ds.labels.values.copy()
    v[v == 0] = -1
    v[py[:3], px[:3]] = 0
    y, _ = labels_for_stack(stack, _with_labels(ds, v))
    assert (y.compute() == 0).sum() == 3
    with pytest.raises(ValueError, match="label pixels where every attribute is valid"):
        labels_for_stack(stack, _with_labels(ds, v), nan_policy="omit")


def test_points_outside_the_grid_are_skipped_and_counted(stack, ds, tmp_path):
    pts = {
        "y": [float(ds.y[3]), float(ds.y[0]) + 50.0, float(ds.y[5])],
        "x": [float(ds.x[3])] * 3,
        "class": [0, 0, 1],
    }
    with pytest.warns(UserWarning, match=r"1 of the 3 points lie outside the grid .*\(point 1\)"):
        y, _ = labels_for_stack(stack, pts, class_names=["a", "b"])
    assert (y.compute() >= 0).sum() == 2
    # a CSV's rows are numbered as lines of the file (the header is line 1)
    csv = tmp_path / "p.csv"
    csv.write_text(
        "y,x,class\n" + "\n".join(f"{a},{b},{c}" for a, b, c in zip(*pts.values(), strict=True))
    )
    with pytest.warns(UserWarning, match=r"\(line 3\)"):
        labels_for_stack(stack, str(csv), class_names=["a", "b"])
    with pytest.raises(ValueError, match="every one of the 1 points lies outside the grid"):
        labels_for_stack(stack, {"y": [0.0], "x": [0.0], "class": [0]}, class_names=["a", "b"])


def test_error_fewer_components_than_classes(stack):
    with pytest.raises(ValueError, match=r"n_components=2 is smaller than the number of classes"):
        fit_stack(stack, 2, "labels")


# --------------------------------------------------------------------------- scale


def _generate(block_info=None, seed=0):
    """Deterministic float32 attribute block: three classes in 64-px checker stripes."""
    info = block_info[None]
    (y0, y1), (x0, x1) = info["array-location"]
    rng = np.random.default_rng([seed, *info["chunk-location"]])
    out = rng.random(info["chunk-shape"], dtype=np.float32)
    cls = (np.arange(y0, y1)[:, None] // 64 + np.arange(x0, x1)[None, :] // 64) % 3
    out += np.float32(4) * cls
    return out


def _import_daskem() -> int:
    import daskem.io  # noqa: F401  (what the write imports: xarray, zarr, daskem)

    return peak_rss()


@pytest.mark.cluster
def test_posterior_of_a_stack_larger_than_worker_memory(tmp_path):
    """32 attributes x 3072 x 1664 px float32 = 624 MiB, 84 blocks of 8 MiB, written by one
    single-threaded worker process whose memory grows by a fraction of that: the posterior
    streams chunk by chunk. (The worker's imports alone take 150-170 MiB, so the bound is
    on the growth beyond them; pausing is off so that an overrun fails instead of
    hanging, and the worker is terminated above 95 % of its limit.)"""
    distributed = pytest.importorskip("distributed")
    D, ny, nx = 32, 3072, 1664
    chunks = da.core.normalize_chunks((256, 256), (ny, nx))
    src = xr.Dataset(
        {
            f"a{i}": (
                ("y", "x"),
                da.map_blocks(_generate, chunks=chunks, dtype=np.float32, seed=i),
            )
            for i in range(D)
        },
        coords={"y": np.arange(ny) * 10.0, "x": np.arange(nx) * 10.0},
    )
    st = open_stack(src)
    growth_bound = 128 * 2**20
    assert st.data.nbytes >= 3 * growth_bound
    assert st.data.blocks[0, 0, 0].nbytes == 8 * 2**20
    with dask.config.set(scheduler="synchronous"):
        sample = st.rows()[: 256 * 256 * 2].compute()
    from daskem import GaussianMixture

    gm = GaussianMixture(3, covariance_type="diag", random_state=0).fit(sample)
    post = posterior(gm, st)
    t0 = time.perf_counter()
    with (
        dask.config.set({"scheduler": None, "distributed.worker.memory.pause": False}),
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            memory_limit="600MiB",
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert dask.base.get_scheduler() == client.get
        (base,) = client.run(_import_daskem).values()
        path = write_posterior(post, tmp_path / "big.zarr")
        (peak,) = client.run(peak_rss).values()
    seconds = time.perf_counter() - t0
    growth = peak - base
    assert growth < growth_bound, f"worker grew by {growth / 2**20:.0f} MiB"
    back = xr.open_zarr(path)
    assert back.label.shape == (ny, nx) and back.probability.chunks[1:] == st.chunks
    lab = back.label[:512, :512].values
    assert (lab >= 0).all() and len(np.unique(lab)) == 3
    print(
        f"{st.data.nbytes / 2**20:.0f} MiB written in {seconds:.1f} s; worker peak "
        f"{peak / 2**20:.0f} MiB, {growth / 2**20:.0f} MiB above its imports ({base / 2**20:.0f})"
    )


def test_stack_is_a_dataclass_with_shapes(stack):
    assert isinstance(stack, Stack)
    assert stack.shape == SHAPE and stack.n_pixels == math.prod(SHAPE) and stack.n_features == 4
