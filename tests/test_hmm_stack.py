"""Time stacks: open, fit a hidden Markov model over every pixel, posterior maps, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from daskem import cli
from daskem.io import fit_stack, open_stack, posterior
from daskem.synthetic import make_time_stack, write_stack


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def scene():
    return make_time_stack((64, 96), n_dates=10, n_classes=3, seed=3)


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)


def _scores(post, ds):
    from scipy.optimize import linear_sum_assignment

    state = post["state"].values
    truth = ds["true_class"].values
    K = post.sizes["states"]
    M = np.zeros((K, K))
    np.add.at(M, (state[state >= 0], truth[state >= 0]), 1)
    r, c = linear_sum_assignment(-M)
    acc = M[r, c].sum() / M.sum()
    first = post["first_change"].values
    idx = np.full(first.shape, -1)
    ok = ~np.isnat(first)
    idx[ok] = np.searchsorted(ds["time"].values, first[ok])
    tc = ds["true_change"].values
    changed = tc >= 0
    within = np.mean(np.abs(idx[changed] - tc[changed]) <= 1)
    false = np.mean(idx[~changed] >= 0)
    return acc, within, false


def test_time_stack_fit_and_posterior(scene):
    stack = open_stack(scene.chunk({"y": 32, "x": 48}), time_dim="time")
    assert stack.variables == ("attr_0", "attr_1", "attr_2")
    assert stack.n_times == 10 and stack.n_sequences == 64 * 96
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fit_stack(
            stack, 3, method="hmm", covariance_type="full", n_iter=100, tol=1.0, random_state=0
        )
    post = posterior(gm, stack)
    assert post["state_probability"].dims == ("states", "time", "y", "x")
    assert post["state"].dims == ("time", "y", "x") and post["state"].dtype == np.int16
    assert post["first_change"].dtype.kind == "M"  # a date, like the time coordinate
    assert post["state"].attrs["grid_mapping"] == "spatial_ref"
    assert "spatial_ref" in post.coords
    post = post.compute()
    np.testing.assert_allclose(post["state_probability"].sum("states"), 1.0, atol=1e-5)
    conf = post["confidence"].values
    np.testing.assert_allclose(conf, post["state_probability"].max("states").values)
    acc, within, false = _scores(post, scene)
    assert acc > 0.97, acc
    assert within > 0.85, within
    assert false < 0.03, false
    # n_changes agrees with the decoded path
    s = post["state"].values
    np.testing.assert_array_equal(post["n_changes"].values, (s[1:] != s[:-1]).sum(axis=0))


def test_posterior_is_chunk_invariant(scene):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = open_stack(scene.chunk({"y": 16, "x": 96}), time_dim="time")
        gm = fit_stack(a, 3, method="hmm", n_iter=3, random_state=0)
    b = open_stack(scene.chunk({"y": 64, "x": 40}), time_dim="time")
    pa, pb = posterior(gm, a).compute(), posterior(gm, b).compute()
    for name in ("state_probability", "confidence", "log_likelihood"):
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-6)
    for name in ("state", "n_changes", "first_change"):
        np.testing.assert_array_equal(pa[name], pb[name])


def test_time_chunked_store_warns_and_works(scene):
    with pytest.warns(UserWarning, match="chunks along 'time'"):
        stack = open_stack(scene.chunk({"time": 3, "y": 32, "x": 48}), time_dim="time")
    assert len(stack.data.chunks[1]) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"time_dim": "date"}, "no dimension 'date'"),
        ({"time_dim": "time", "one_date": True}, "at least 2 dates"),
    ],
)
def test_bad_time_stacks(scene, kwargs, match):
    ds = scene.isel(time=[0]) if kwargs.pop("one_date", False) else scene
    with pytest.raises(ValueError, match=match):
        open_stack(ds, **kwargs)


def test_hmm_needs_a_time_stack(scene):
    stack = open_stack(scene.isel(time=0))
    with pytest.raises(ValueError, match="time_dim"):
        fit_stack(stack, 3, method="hmm")


def test_cli_run_predict_plot(tmp_path, scene, scheduler):
    store = tmp_path / "ts.zarr"
    write_stack(scene, store, chunks={"time": -1, "y": 32, "x": 48})
    model, post, log = tmp_path / "m.json", tmp_path / "post.zarr", tmp_path / "log.jsonl"
    r = invoke(
        "run", store, "--method", "hmm", "--time-dim", "time", "-k", 3, "--model", model,
        "--out", post, "--scheduler", scheduler, "--log-json", log,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "log-lik/px" in r.output
    doc = json.loads(model.read_text())
    assert doc["model"] == "hmm" and doc["provenance"]["options"]["time_dim"] == "time"
    ds = xr.open_zarr(post)
    assert set(ds.data_vars) >= {"state_probability", "state", "confidence", "first_change"}
    # a per-pixel log-likelihood in the log, as for every method
    records = [json.loads(line) for line in log.read_text().splitlines()]
    it = [rec for rec in records if rec["event"] == "iteration"]
    assert it and -100 < it[-1]["lower_bound"] < 0
    # predict takes the time dim from the model
    post2 = tmp_path / "post2.zarr"
    r = invoke("predict", store, "--model", model, "--out", post2, "--scheduler", scheduler)
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(xr.open_zarr(post2)["state"], ds["state"])
    r = invoke("plot", post, "--model", model, "--out", tmp_path / "plots", "--date", "2024-03-01")
    assert r.exit_code == 0, r.output
    for name in ("state_map", "change_date", "transmat", "loglik"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "hmm", "-k", "3"], "add --time-dim"),
        (["-k", "3", "--time-dim", "time"], "only for --method hmm"),
        (["--method", "hmm", "-k", "3", "--time-dim", "date"], "no dimension 'date'"),
    ],
)
def test_cli_bad_input_writes_nothing(tmp_path, scene, args, message):
    store = tmp_path / "ts.zarr"
    write_stack(scene, store, chunks={"time": -1, "y": 32, "x": 48})
    model = tmp_path / "m.json"
    r = invoke("fit", store, *args, "--model", model)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not model.exists()


def test_cli_one_date_is_refused(tmp_path, scene):
    store = tmp_path / "one.zarr"
    write_stack(scene.isel(time=[0]), store)
    r = invoke(
        "fit",
        store,
        "--method",
        "hmm",
        "-k",
        2,
        "--time-dim",
        "time",
        "--model",
        tmp_path / "m.json",
    )
    assert r.exit_code == 2 and "at least 2 dates" in r.output
    assert not (tmp_path / "m.json").exists()


def test_semi_supervised_time_stack_maps_states_to_classes(scene):
    stack = open_stack(scene.chunk({"y": 32, "x": 48}), time_dim="time")
    assert (scene["labels"].values >= 0).sum() < 20  # a handful of labelled dates
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fit_stack(
            stack, None, "labels", method="hmm", covariance_type="full", n_iter=100, tol=1.0
        )
    assert list(gm.class_names_) == ["water", "forest", "urban"]
    post = posterior(gm, stack).compute()
    assert list(post["states"].values) == ["water", "forest", "urban"]
    # no matching of states to classes needed: state k is class k
    acc = np.mean(post["state"].values == scene["true_class"].values)
    assert acc > 0.97, acc


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ds: ds["labels"].isel(time=slice(0, 5)), "labels have 5 dates"),
        (
            lambda ds: ds["labels"].assign_coords(time=ds["time"].values + np.timedelta64(1, "D")),
            "dates that are not the stack's",
        ),
        (lambda ds: ds["labels"].isel(x=0), "expected the stack's"),
        (lambda ds: xr.full_like(ds["labels"], -1), "label no date"),
    ],
)
def test_bad_time_stack_labels(scene, make, match):
    stack = open_stack(scene, time_dim="time")
    with pytest.raises(ValueError, match=match):
        fit_stack(stack, None, make(scene), method="hmm")


def test_cli_semi_supervised_run_clamps_labelled_dates(tmp_path, scene, scheduler):
    store = tmp_path / "ts.zarr"
    write_stack(scene, store, chunks={"time": -1, "y": 32, "x": 48})
    model, post = tmp_path / "m.json", tmp_path / "post.zarr"
    r = invoke(
        "run", store, "--method", "hmm", "--time-dim", "time", "--labels", "labels",
        "--model", model, "--out", post, "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ds = xr.open_zarr(post)
    assert list(ds["states"].values) == ["water", "forest", "urban"]
    lab = scene["labels"].values
    state = ds["state"].values
    np.testing.assert_array_equal(state[lab >= 0], lab[lab >= 0])
    assert np.mean(state == scene["true_class"].values) > 0.97


def test_cli_bad_time_labels_name_the_option(tmp_path, scene, scheduler):
    ds = scene.copy()
    ds["bad_labels"] = ds["labels"].isel(x=0)
    store = tmp_path / "ts.zarr"
    write_stack(ds, store, chunks={"time": -1, "y": 32, "x": 48})
    model = tmp_path / "m.json"
    for var, message in (
        ("bad_labels", "--labels bad_labels: labels on dims ('time', 'y'): expected"),
        ("nolab", "--labels nolab: no label variable 'nolab' in the stack"),
    ):
        r = invoke(
            "fit", store, "--method", "hmm", "--time-dim", "time", "--labels", var,
            "--model", model, "--scheduler", scheduler,
        )  # fmt: skip
        assert r.exit_code == 2, r.output
        assert message in r.output
        assert not model.exists()


def test_fit_is_the_same_on_a_distributed_cluster(scene, scheduler):
    import dask
    from distributed import Client

    from daskem import GaussianHMM

    X = np.stack([scene[f"attr_{j}"].values for j in range(3)], axis=-1)
    seqs = X.reshape(10, -1, 3).transpose(1, 0, 2)
    import dask.array as da

    kw = dict(n_components=3, covariance_type="diag", n_iter=4, tol=0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dask.config.set(scheduler="threads"):
            a = GaussianHMM(**kw).fit(da.from_array(seqs, chunks=(1000, 10, 3)))
        with Client(scheduler):
            b = GaussianHMM(**kw).fit(da.from_array(seqs, chunks=(2048, 10, 3)))
    np.testing.assert_allclose(b.monitor_.history, a.monitor_.history, rtol=1e-12)
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-9)


def test_time_stack_with_two_leading_pixel_dims_and_time_last(scene):
    # (z, y, x, time): time anywhere, any number of pixel dims
    ds = xr.concat([scene, scene], dim="z").transpose("z", "y", "x", "time")
    stack = open_stack(ds[["attr_0", "attr_1", "attr_2"]], time_dim="time")
    assert stack.pixel_dims == ("z", "y", "x") and stack.n_sequences == 2 * 64 * 96
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fit_stack(stack, 3, method="hmm", n_iter=20, random_state=0)
    post = posterior(gm, stack).compute()
    assert post["state"].dims == ("time", "z", "y", "x")
    np.testing.assert_array_equal(post["state"].isel(z=0), post["state"].isel(z=1))
