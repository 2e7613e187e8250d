"""Real archives in: GeoTIFF / NetCDF / Zarr with their CRS, integer bands, nodata, masks."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from daskem import cli
from daskem.io import check_nodata, fit_stack, open_stack, posterior, write_posterior

rasterio = pytest.importorskip("rasterio")
rioxarray = pytest.importorskip("rioxarray")
from rasterio.transform import from_origin  # noqa: E402

CRS = "EPSG:32633"
TRANSFORM = from_origin(500_000, 4_000_000, 30, 30)


@pytest.fixture(scope="module")
def scheduler():
    """One in-process cluster for the module's commands (an embedded one each is slower)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)


def _bands(n=90, m=110, seed=0):
    """Three bands of two well-separated classes (a left and a right half)."""
    rng = np.random.default_rng(seed)
    cls = (np.arange(m)[None, :] >= m // 2).astype(int) * np.ones((n, 1), int)
    out = []
    for b in range(3):
        out.append(200.0 + 80.0 * cls * (b + 1) + rng.normal(scale=5, size=(n, m)))
    return out, cls


def _write_tif(path, arrays, dtype, nodata=None, descriptions=None):
    n, m = arrays[0].shape
    with rasterio.open(
        path, "w", driver="GTiff", height=n, width=m, count=len(arrays), dtype=dtype,
        crs=CRS, transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
    ) as f:  # fmt: skip
        for i, a in enumerate(arrays):
            f.write(a.astype(dtype), i + 1)
            if descriptions:
                f.set_band_description(i + 1, descriptions[i])


@pytest.fixture
def tifs(tmp_path):
    bands, cls = _bands()
    b0 = bands[0].copy()
    b0[:, :4] = -9999  # declared nodata on the west border
    _write_tif(tmp_path / "B1.tif", [b0], "int16", nodata=-9999, descriptions=["red"])
    _write_tif(tmp_path / "B2.tif", [bands[1]], "float32", descriptions=["nir"])
    _write_tif(tmp_path / "B3.tif", [bands[2]], "uint16", descriptions=["swir"])
    _write_tif(tmp_path / "multi.tif", bands, "float32")
    return tmp_path, cls


def test_several_geotiffs_are_one_stack_with_crs_and_nodata(tifs):
    root, cls = tifs
    stack = open_stack(str(root / "B*.tif"))
    assert stack.variables == ("red", "nir", "swir")  # band descriptions
    assert stack.data.dtype.kind == "f"  # int16 and uint16 bands are used, as floats
    red = stack.data[0].compute()
    assert np.isnan(red[:, :4]).all() and np.isfinite(red[:, 4:]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fit_stack(stack, 2, max_iter=20, random_state=0)
    post = posterior(gm, stack)
    assert post["label"].rio.crs == CRS
    assert tuple(post.rio.transform())[:6] == tuple(TRANSFORM)[:6]
    label = post["label"].values
    assert (label[:, :4] >= 0).all()  # red missing there: classified from nir and swir
    # the two halves are the two classes
    agree = np.mean(label[:, 4:] == label[0, 4] * (1 - cls[:, 4:]) + (1 - label[0, 4]) * cls[:, 4:])
    assert agree > 0.99


def test_multiband_geotiff_and_band_names(tifs):
    root, _ = tifs
    stack = open_stack(str(root / "multi.tif"))
    assert stack.variables == ("multi_band_1", "multi_band_2", "multi_band_3")
    assert stack.dataset["spatial_ref"].attrs  # the CRS travels as a coordinate


def test_crs_survives_a_zarr_store_written_from_rioxarray(tmp_path):
    bands, _ = _bands()
    ds = xr.Dataset(
        {f"b{i}": (("y", "x"), a.astype("float32")) for i, a in enumerate(bands)},
        coords={
            "y": 4_000_000 - 30 * (np.arange(90) + 0.5),
            "x": 500_000 + 30 * (np.arange(110) + 0.5),
        },
    ).rio.write_crs(CRS)
    # as many stores have it: spatial_ref a plain variable, named by grid_mapping
    ds.reset_coords("spatial_ref").to_zarr(tmp_path / "s.zarr")
    stack = open_stack(tmp_path / "s.zarr")
    assert "spatial_ref" in stack.dataset.coords
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fit_stack(stack, 2, max_iter=5)
    write_posterior(posterior(gm, stack), tmp_path / "p.zarr")
    back = xr.open_zarr(tmp_path / "p.zarr", decode_coords="all")
    assert back["label"].rio.crs == CRS
    assert tuple(back.rio.transform())[:6] == tuple(TRANSFORM)[:6]
    # and on to COGs from the Zarr posterior
    from daskem.io import write_cogs

    cogs = write_cogs(back, tmp_path / "cogs", block=32)
    with rasterio.open(cogs["probability"]) as f:
        assert f.crs == CRS and tuple(f.transform)[:6] == tuple(TRANSFORM)[:6]
        assert np.isnan(f.nodata)
    # written as the CF grid_mapping attribute (decoded into the encoding on reading)
    assert back["label"].encoding["grid_mapping"] == "spatial_ref"


def test_netcdf_input(tmp_path):
    bands, _ = _bands()
    ds = xr.Dataset({f"b{i}": (("y", "x"), a) for i, a in enumerate(bands)})
    ds.to_netcdf(tmp_path / "s.nc", engine="scipy")
    stack = open_stack(str(tmp_path / "s.nc"))
    assert stack.variables == ("b0", "b1", "b2")
    assert stack.data.chunks is not None


def test_integer_bands_are_attributes_but_labels_are_not(tmp_path):
    bands, cls = _bands()
    ds = xr.Dataset(
        {
            "dn": (("y", "x"), bands[0].astype("int16")),
            "refl": (("y", "x"), bands[1].astype("float32")),
            "class_map": (("y", "x"), cls.astype("int16")),
            "qa_flags": (("y", "x"), np.zeros_like(cls, dtype="uint8")),
        }
    )
    assert open_stack(ds).variables == ("dn", "refl")


def test_undeclared_nodata_is_named(tmp_path, scheduler):
    bands, _ = _bands()
    b = bands[1].copy()
    b[:, :6] = -99999.0
    ds = xr.Dataset({"b0": (("y", "x"), bands[0]), "b1": (("y", "x"), b)}).chunk(45)
    with pytest.warns(UserWarning, match=r"'b1'.*-99999.*--nodata b1=-99999"):
        messages = check_nodata(open_stack(ds))
    assert len(messages) == 1
    assert check_nodata(open_stack(ds, nodata={"b1": -99999.0})) == []
    # the CLI says it at fit time (and fits on, as asked)
    ds.to_zarr(tmp_path / "s.zarr")
    r = invoke(
        "fit",
        tmp_path / "s.zarr",
        "-k",
        2,
        "--model",
        tmp_path / "m.json",
        "--scheduler",
        scheduler,
    )
    assert r.exit_code == 0, r.output
    assert "undeclared nodata? Declare it (--nodata b1=-99999" in " ".join(r.output.split())


def test_cli_on_geotiffs_with_mask_and_nodata(tifs, tmp_path, scheduler):
    root, _ = tifs
    mask = np.ones((90, 110), "uint8")
    mask[:30] = 0
    _write_tif(root / "mask.tif", [mask], "uint8")
    model, post, log = tmp_path / "m.json", tmp_path / "p.zarr", tmp_path / "log.jsonl"
    r = invoke(
        "run", root / "B*.tif", "-k", 2, "--model", model, "--out", post, "--scheduler", scheduler,
        "--mask", root / "mask.tif", "--nodata", "nir=-1", "--log-json", log,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "drawing 9900 sampled rows for the start" in r.output  # the stages are said
    # the masked rows are left out; the nodata border of red is fitted through nir and swir
    assert "pixels: 6,600 of 9,900 used (240 of them with some value missing" in r.output
    rec = [json.loads(x) for x in log.read_text().splitlines() if '"pixels"' in x][0]
    assert rec["left_out"] == 3300 and rec["nothing_observed"] == 3300
    assert rec["partly_missing"] == 240
    ds = xr.open_zarr(post, decode_coords="all")
    assert ds["label"].rio.crs == CRS
    assert (ds["label"].values[:30] == -1).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodata", "bogus=1"], "--nodata bogus=1: ['bogus'] are not attributes of the stack"),
        (["--nodata", "x"], "--nodata x: 'x' is not a number"),
        (["--mask", "nomask"], "--mask nomask: mask variable 'nomask' not found"),
    ],
)
def test_cli_bad_nodata_and_mask(tifs, tmp_path, args, message):
    root, _ = tifs
    r = invoke("fit", root / "B*.tif", "-k", 2, "--model", tmp_path / "m.json", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "m.json").exists()


def test_inspect_geotiffs_and_unsupported_files(tifs, tmp_path):
    root, _ = tifs
    r = invoke("inspect", root / "B*.tif")
    assert r.exit_code == 0, r.output
    assert "crs: EPSG:32633" in r.output
    assert "red: float32" in r.output or "red: int16" in r.output
    assert "nodata -9999" in r.output
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    r = invoke("inspect", tmp_path / "x.png")
    assert r.exit_code == 2
    assert "daskem inspect reads model files (.json) and a Zarr store" in r.output
    r = invoke("fit", tmp_path / "x.png", "-k", 2, "--model", tmp_path / "m.json")
    assert r.exit_code == 2 and "GeoTIFF/COG (.tif" in r.output


def test_convert_geotiffs_to_zarr_keeps_crs_and_nodata(tifs, tmp_path, scheduler):
    root, _ = tifs
    out = tmp_path / "stack.zarr"
    r = invoke("convert", root / "B*.tif", "--out", out, "--chunk", 32, "--scheduler", scheduler)
    assert r.exit_code == 0, r.output
    ds = xr.open_zarr(out, decode_coords="all")
    assert ds["red"].rio.crs == CRS
    assert tuple(ds.rio.transform())[:6] == tuple(TRANSFORM)[:6]
    assert ds["red"].chunks[0][0] == 32
    assert np.isnan(ds["red"].values[:, :4]).all()  # nodata as NaN
    b = open_stack(str(root / "B*.tif"))
    a = open_stack(out, list(b.variables))  # a store lists its variables by name
    np.testing.assert_array_equal(a.data.compute(), b.data.compute())
    r = invoke("convert", root / "B*.tif", "--out", out)
    assert r.exit_code == 2 and "exists; add --overwrite" in r.output


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    import subprocess
    import sys

    from daskem.io import atomic_to_zarr

    # a writer that died: its process id is in the name
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / f".p.zarr.tmp-{proc.stdout.strip()}-abc"
    dead.mkdir()
    (dead / "chunk").write_bytes(b"x" * 100)
    alive = tmp_path / f".p.zarr.tmp-{__import__('os').getpid()}-def"  # this process: running
    alive.mkdir()
    other = tmp_path / ".q.zarr.tmp-1-ghi"  # another target's: not ours to touch
    other.mkdir()
    with pytest.warns(UserWarning, match="left beside .*p.zarr by a write that was killed"):
        atomic_to_zarr(xr.Dataset({"v": ("x", np.arange(3.0))}), tmp_path / "p.zarr")
    assert not dead.exists() and alive.exists() and other.exists()
    assert (tmp_path / "p.zarr").is_dir()


def test_export_cogs_georeferenced_with_names_and_colours(tifs, tmp_path, scheduler):
    root, _ = tifs
    model, post = tmp_path / "m.json", tmp_path / "p.zarr"
    r = invoke(
        "run", root / "B*.tif", "-k", 2, "--model", model, "--out", post, "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "cogs"
    r = invoke(
        "export",
        post,
        "--out",
        out,
        "--colors",
        "class_1=#ff0000",
        "--block",
        64,
        "--scheduler",
        scheduler,
    )
    assert r.exit_code == 0, r.output
    ds = xr.open_zarr(post)
    with rasterio.open(out / "label.tif") as f:
        assert f.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert f.crs == CRS and tuple(f.transform)[:6] == tuple(TRANSFORM)[:6]
        assert f.colormap(1)[1] == (255, 0, 0, 255)
        assert json.loads(f.tags(1)["CLASS_NAMES"]) == ["class_0", "class_1"]
        assert f.overviews(1) == [2]
        label = f.read(1)
    np.testing.assert_array_equal(label, np.where(ds["label"].values < 0, 255, ds["label"].values))
    # GDAL's category names (what QGIS shows in the legend), beside the file
    aux = (out / "label.tif.aux.xml").read_text()
    assert "<Category>class_0</Category><Category>class_1</Category>" in aux
    with rasterio.open(out / "probability.tif") as f:
        assert f.count == 2 and f.descriptions == ("class_0", "class_1")
        np.testing.assert_allclose(f.read(2), ds["probability"].values[1], rtol=1e-6)
    # the same class keeps its colour whatever the run: by name, not by order
    from daskem.plot import class_colors

    assert class_colors(["water", "lava"])[0] == class_colors(["lava", "snow", "water"])[2]
    r = invoke("export", post, "--out", out)
    assert r.exit_code == 2 and "exists; add --overwrite" in r.output
    r = invoke("export", post, "--out", tmp_path / "c2", "--colors", "red")
    assert r.exit_code == 2 and "1 colours for 2 classes" in r.output


def _write_vector(path, geoms, values, crs, column="class_id"):
    import pyogrio
    import shapely

    kind = "Polygon" if geoms[0].geom_type == "Polygon" else "Point"
    pyogrio.raw.write(
        str(path), geometry=shapely.to_wkb(np.asarray(geoms)), field_data=[np.asarray(values)],
        fields=[column], crs=crs, geometry_type=kind, driver="GPKG",
    )  # fmt: skip


def _to_lonlat(x, y):
    from pyproj import Transformer

    return Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(x, y)


def test_vector_labels_in_another_crs(tifs, tmp_path, scheduler):
    import shapely

    root, cls = tifs
    # polygons in lon/lat around the centres of the left and right halves; ids 1 and 2
    polys, values = [], []
    for col, value in ((20, 1), (80, 2)):
        x0, y0 = TRANSFORM * (col, 30)
        x1, y1 = TRANSFORM * (col + 10, 40)
        lon, lat = _to_lonlat([x0, x1, x1, x0], [y0, y0, y1, y1])
        polys.append(shapely.Polygon(list(zip(lon, lat, strict=True))))
        values.append(value)
    _write_vector(tmp_path / "areas.gpkg", polys, values, "EPSG:4326")
    stack = open_stack(str(root / "B*.tif"))
    from daskem.io import labels_for_stack

    y, names = labels_for_stack(stack, str(tmp_path / "areas.gpkg"))
    assert names == ["1", "2"]  # the file's own class values
    lab = stack.to_map(y).compute()
    assert 80 <= (lab == 0).sum() <= 120 and 80 <= (lab == 1).sum() <= 120
    assert set(cls[lab == 0]) == {0} and set(cls[lab == 1]) == {1}
    # points, one off the grid: skipped and counted
    px = [TRANSFORM * (c + 0.5, r + 0.5) for c, r in ((10, 10), (100, 50), (500, 500))]
    lon, lat = _to_lonlat([p[0] for p in px], [p[1] for p in px])
    pts = [shapely.Point(a, b) for a, b in zip(lon, lat, strict=True)]
    _write_vector(tmp_path / "pts.gpkg", pts, ["water", "forest", "water"], "EPSG:4326", "class")
    with pytest.warns(UserWarning, match="1 of the 3 features .* lie outside the stack's grid"):
        y, names = labels_for_stack(stack, str(tmp_path / "pts.gpkg"))
    lab = stack.to_map(y).compute()
    assert names == ["forest", "water"]
    assert lab[10, 10] == 1 and lab[50, 100] == 0 and (lab >= 0).sum() == 2
    # the CLI: a semi-supervised run from the polygons
    r = invoke(
        "run", root / "B*.tif", "--labels", tmp_path / "areas.gpkg", "--model",
        tmp_path / "m.json", "--out", tmp_path / "p.zarr", "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    post = xr.open_zarr(tmp_path / "p.zarr")
    assert list(post["class"].values) == ["1", "2"]
    assert np.mean(post["label"].values[:, 8:] == cls[:, 8:]) > 0.99
    # one class only: refused, nothing written
    _write_vector(tmp_path / "one.gpkg", polys[:1], [1], "EPSG:4326")
    r = invoke(
        "fit", root / "B*.tif", "--labels", tmp_path / "one.gpkg", "--model", tmp_path / "o.json"
    )
    assert r.exit_code == 2 and "labels only 1 class" in r.output
    assert not (tmp_path / "o.json").exists()


def test_assess_matches_scikit_learn(tmp_path, scheduler):
    from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_recall_fscore_support

    from daskem.io import assess
    from daskem.synthetic import make_stack, write_stack

    ds = make_stack((96, 96), seed=4)
    write_stack(ds, tmp_path / "s.zarr", chunks=48)
    model, post = tmp_path / "m.json", tmp_path / "p.zarr"
    r = invoke(
        "run", tmp_path / "s.zarr", "--labels", "labels", "--model", model, "--out", post,
        "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    p = xr.open_zarr(post)
    res = assess(p, ds["truth"], exclude=ds["labels"])
    truth, label, lab = ds["truth"].values, p["label"].values, ds["labels"].values
    ok = (label >= 0) & (truth >= 0) & (lab < 0)
    C = p.sizes["class"]
    np.testing.assert_array_equal(
        res["confusion"], confusion_matrix(truth[ok], label[ok], labels=range(C))
    )
    assert res["kappa"] == pytest.approx(cohen_kappa_score(truth[ok], label[ok]), abs=1e-12)
    prec, rec, f1, _ = precision_recall_fscore_support(truth[ok], label[ok], labels=range(C))
    np.testing.assert_allclose(res["recall"], rec)
    assert res["n_excluded"] == int(((label >= 0) & (truth >= 0) & (lab >= 0)).sum())
    assert res["area_pixels"] == np.bincount(label[label >= 0], minlength=C).tolist()
    out = tmp_path / "assess"
    r = invoke(
        "assess", post, "--truth", f"{tmp_path / 's.zarr'}:truth",
        "--exclude-labels", f"{tmp_path / 's.zarr'}:labels", "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"overall accuracy: {res['overall_accuracy']:.4f}" in r.output
    assert json.loads((out / "assess.json").read_text())["confusion"] == res["confusion"]
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    r = invoke("assess", post, "--truth", tmp_path / "nothing.tif")
    assert r.exit_code == 2 and "no such file" in r.output


def test_select_k_shares_passes_and_finds_the_true_k(tmp_path, monkeypatch, scheduler):
    import dask.array as da

    from daskem import GaussianMixture, engine
    from daskem.base import select_n_components

    rng = np.random.default_rng(0)
    means = rng.normal(scale=6, size=(4, 3))
    X = np.concatenate([rng.normal(size=(15_000, 3)) + m for m in means])
    Xd = da.from_array(X, chunks=15_000)
    passes = []
    real = engine.em_pass

    def counting(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "em_pass", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = select_n_components(lambda k: GaussianMixture(k, random_state=0), Xd, range(2, 9))
        n_select = len(passes)
        passes.clear()
        GaussianMixture(8, random_state=0).fit(Xd)
        n_single = len(passes)
    assert res["best"] == 4
    assert n_select == res["passes"] and n_select <= 1.5 * n_single, (n_select, n_single)
    # the CLI on a stack: a table, the best K, select.json and select.png
    ds = xr.Dataset({f"a{j}": (("y", "x"), X[:, j].reshape(200, 300)) for j in range(3)}).chunk(
        {"y": 100}
    )
    ds.to_zarr(tmp_path / "s.zarr")
    r = invoke(
        "select",
        tmp_path / "s.zarr",
        "-k",
        "2..6",
        "--out",
        tmp_path / "sel",
        "--scheduler",
        scheduler,
    )
    assert r.exit_code == 0, r.output
    assert "best K by BIC: 4" in r.output
    assert json.loads((tmp_path / "sel" / "select.json").read_text())["best"] == 4
    assert (tmp_path / "sel" / "select.png").read_bytes()[:4] == b"\x89PNG"
    r = invoke("select", tmp_path / "s.zarr", "-k", "two")
    assert r.exit_code == 2 and "expected a range" in r.output


def test_max_labels_per_class_draws_from_the_polygons(tifs, tmp_path):
    import shapely

    from daskem.io import labels_for_stack

    root, _ = tifs
    polys = []
    for col in (10, 70):
        x0, y0 = TRANSFORM * (col, 10)
        x1, y1 = TRANSFORM * (col + 20, 40)
        polys.append(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    _write_vector(tmp_path / "a.gpkg", polys, ["dark", "bright"], CRS, "class")
    stack = open_stack(str(root / "B*.tif"))
    full, _ = labels_for_stack(stack, str(tmp_path / "a.gpkg"))
    some, _ = labels_for_stack(stack, str(tmp_path / "a.gpkg"), max_labels_per_class=25, seed=3)
    again, _ = labels_for_stack(stack, str(tmp_path / "a.gpkg"), max_labels_per_class=25, seed=3)
    a, b = full.compute(), some.compute()
    assert np.bincount(a[a >= 0]).tolist() == [600, 600]
    assert np.bincount(b[b >= 0]).tolist() == [25, 25]
    assert np.all(a[b >= 0] == b[b >= 0])  # a subset of the polygons' pixels, same classes
    np.testing.assert_array_equal(b, again.compute())  # the seed decides


def test_select_k_semi_supervised_counts_components_per_class():
    from daskem.io import select_k
    from daskem.synthetic import make_stack

    ds = make_stack((96, 96), n_classes=3, seed=2)
    stack = open_stack(ds.chunk({"y": 48, "x": 48}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = select_k(stack, [3, 4, 6], "labels", max_iter=30)
        assert res["models"][6].component_classes_.tolist() == [0, 1, 2, 0, 1, 2]
        assert list(res["models"][3].class_names_) == list(
            ds["labels"].attrs["flag_meanings"].split()
        )
        with pytest.raises(ValueError, match="K = 2 is smaller than the number of classes"):
            select_k(stack, [2, 3], "labels")


def test_resume_says_what_it_does(tifs, tmp_path, scheduler):
    root, _ = tifs
    args = ["fit", root / "B*.tif", "-k", 2, "--model", tmp_path / "m.json",
            "--scheduler", scheduler, "--checkpoint", tmp_path / "ck", "--resume",
            "--max-iter", 3]  # fmt: skip
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert f"--resume: no checkpoint found in {tmp_path / 'ck'}, starting a new fit" in r.output
    r = invoke(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    n_iter = json.loads((tmp_path / "m.json").read_text())["fitted"]["n_iter"]
    assert f"--resume: resuming from iteration {n_iter} of the checkpoint" in r.output
