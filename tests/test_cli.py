"""The ``daskem`` command line: commands, bad inputs, exit codes, crashes, resumes.

Every compute command runs on one shared in-process cluster (``--scheduler``), so no
test pays a cluster start-up, except the Ctrl-C test, which checks that the embedded
cluster it started is shut down. Subprocess tests (SIGKILL) use the same scheduler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from daskem import __version__, cli
from daskem import io as daskem_io
from daskem.synthetic import make_stack, write_stack

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::UserWarning")]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Input stacks and a fitted model + posterior, made once."""
    root = tmp_path_factory.mktemp("cli-data")
    stack = root / "stack.zarr"
    write_stack(make_stack((128, 128), seed=1), stack, chunks=32)
    three = root / "three.zarr"
    write_stack(make_stack((64, 64), n_features=3, seed=2), three, chunks=32)
    # every pixel misses one attribute (attr_0 on even columns, attr_1 on odd ones)
    partial = root / "partial.zarr"
    ds = make_stack((64, 64), n_features=3, nan_fraction=0.0, seed=3)
    odd = (np.arange(64) % 2 == 1)[None, :]
    ds["attr_0"] = ds["attr_0"].where(odd)
    ds["attr_1"] = ds["attr_1"].where(~odd)
    write_stack(ds, partial, chunks=32)
    return {"root": root, "stack": stack, "three": three, "partial": partial}


def invoke(*args: str, **kw):
    return CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture(scope="module")
def fitted(data, scheduler):
    root = data["root"]
    model = root / "model.json"
    log = root / "fit.jsonl"
    r = invoke(
        "fit", data["stack"], "--labels", "labels", "-k", 4, "--model", model,
        "--scheduler", scheduler, "--log-json", log, "--checkpoint", root / "ckpt",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    post = root / "posterior.zarr"
    r2 = invoke("predict", data["stack"], "--model", model, "--out", post, "--scheduler", scheduler)
    assert r2.exit_code == 0, r2.output
    return {
        **data,
        "model": model,
        "log": log,
        "posterior": post,
        "ckpt": root / "ckpt",
        "fit_output": r.output,
    }


def _tree(path: Path) -> dict[str, str]:
    """Relative file path -> content hash of a directory tree."""
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- basics


def test_help_and_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output
    for cmd in ("fit", "predict", "run", "demo", "inspect", "plot"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0, cmd
        assert "Usage: daskem " + cmd in r.output
    out = subprocess.run(
        [sys.executable, "-m", "daskem", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in out.stdout


def test_fit_progress_log_json_and_provenance(fitted):
    lines = [json.loads(x) for x in fitted["log"].read_text().splitlines()]
    its = [x for x in lines if x["event"] == "iteration"]
    assert its and [x["iteration"] for x in its] == list(range(1, len(its) + 1))
    assert set(its[0]) >= {"lower_bound", "change", "seconds", "samples_per_second"}
    assert its[0]["change"] is None  # +inf on the first iteration is not JSON
    assert lines[-1]["event"] == "summary" and lines[-1]["status"] == "ok"
    assert lines[-1]["n_iter"] == len(its)
    # one progress line per iteration, with the log-likelihood and the throughput
    assert fitted["fit_output"].count("log-lik/px") == len(its)
    assert "px/s" in fitted["fit_output"]

    doc = json.loads(fitted["model"].read_text())
    prov = doc["provenance"]
    assert prov["daskem_version"] == __version__ and "created" in prov
    assert prov["input"] == os.path.abspath(fitted["stack"])
    assert prov["argv"][:2] == ["daskem", "fit"]
    assert prov["options"]["n_components"] == 4 and prov["labels"] == "labels"
    assert doc["features"] == ["attr_0", "attr_1", "attr_2", "attr_3"]
    assert doc["classes"] == ["water", "forest", "urban", "grassland"]

    post = xr.open_zarr(fitted["posterior"])
    assert set(post.data_vars) >= {"probability", "label", "confidence"}
    assert post["label"].shape == (128, 128)


def test_run_fit_then_predict(data, scheduler, tmp_path):
    r = invoke(
        "run", data["stack"], "--labels", "labels", "-k", 4, "--covariance", "diag",
        "--model", tmp_path / "m.json", "--out", tmp_path / "p.zarr", "--scheduler", scheduler,
        "--quiet",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "log-lik/px" not in r.output  # --quiet
    assert json.loads((tmp_path / "m.json").read_text())["parameters"]["covariance_type"] == "diag"
    assert xr.open_zarr(tmp_path / "p.zarr")["probability"].sizes["class"] == 4


def test_run_impute_fits_partial_pixels_and_fills_them(data, scheduler, tmp_path):
    """Every pixel of ``partial`` misses one attribute: the default policy fits them all
    through their observed attributes, and --impute writes the attributes with the gaps
    filled plus their standard deviations, only where a value was missing."""
    out = tmp_path / "p.zarr"
    r = invoke(
        "run", data["partial"], "-k", 3, "--model", tmp_path / "m.json", "--out", out,
        "--impute", "--scheduler", scheduler, "--quiet",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "m.json").read_text())
    assert (
        doc["parameters"]["nan_policy"]
        == doc["provenance"]["options"]["nan_policy"]
        == "marginalize"
    )
    post = xr.open_zarr(out).compute()
    src = xr.open_zarr(data["partial"]).compute()
    for v in ("attr_0", "attr_1", "attr_2"):
        gap = np.isnan(src[v].values)
        assert np.isfinite(post[v].values).all()
        np.testing.assert_array_equal(post[v].values[~gap], src[v].values[~gap])
        assert np.isfinite(post[f"{v}_std"].values[gap]).all()
        assert np.isnan(post[f"{v}_std"].values[~gap]).all()
    assert np.isfinite(post["probability"].values).all()


# ----------------------------------------------------------------------------- bad inputs

# (id, arguments, pinned message). {stack}, {three}, {model}, {posterior}, {scheduler},
# {tmp} are filled in; every case must exit with code 2 and write nothing into {tmp}.
BAD_INPUTS = [
    (
        "missing-stack",
        "fit {tmp}/nope.zarr -k 4 --model {tmp}/m.json",
        "STACK {tmp}/nope.zarr: No such Zarr store",
    ),
    ("not-a-zarr-store", "fit {root} -k 4 --model {tmp}/m.json", "is not a Zarr store"),
    (
        "unknown-variable",
        "fit {stack} --vars attr_0,bogus -k 4 --model {tmp}/m.json",
        "--vars: unknown variable(s) ['bogus']",
    ),
    (
        "model-stack-mismatch",
        "predict {three} --model {model} --out {tmp}/p.zarr",
        "lacks ['attr_3']",
    ),
    (
        "vars-not-the-model-features",
        "predict {stack} --model {model} --vars attr_0,attr_1 --out {tmp}/p.zarr",
        "missing ['attr_2', 'attr_3'], extra []",
    ),
    ("corrupt-model", "predict {stack} --model {bad_json} --out {tmp}/p.zarr", "not valid JSON"),
    (
        "not-a-model",
        "predict {stack} --model {other_json} --out {tmp}/p.zarr",
        "not a daskem model file",
    ),
    (
        "labels-file-bad-row",
        "fit {stack} --labels {bad_csv} -k 4 --model {tmp}/m.json --scheduler {scheduler}",
        "labels only 1 class (['water']): a semi-supervised fit needs labels of at least 2",
    ),
    (
        "labels-unknown",
        "fit {stack} --labels nolabels -k 4 --model {tmp}/m.json --scheduler {scheduler}",
        "is neither a variable of the stack",
    ),
    (
        "k-below-classes",
        "fit {stack} --labels labels -k 2 --model {tmp}/m.json --scheduler {scheduler}",
        "-k/--n-components: n_components=2 is smaller than the number of classes (4",
    ),
    (
        "model-exists",
        "fit {stack} -k 4 --model {model}",
        "--model {model} exists; add --overwrite",
    ),
    (
        "posterior-exists",
        "predict {stack} --model {model} --out {posterior}",
        "--out {posterior} exists; add --overwrite",
    ),
    (
        "out-is-input",
        "predict {stack} --model {model} --out {stack} --overwrite",
        "is the input STACK",
    ),
    (
        "resume-without-checkpoint",
        "fit {stack} -k 4 --resume --model {tmp}/m.json --scheduler {scheduler}",
        "--resume needs --checkpoint",
    ),
    (
        "checkpoint-exists",
        "fit {stack} -k 4 --checkpoint {ckpt} --model {tmp}/m.json",
        "--checkpoint {ckpt} holds the checkpoint of an earlier fit; add --resume",
    ),
    ("bad-tol", "fit {stack} -k 4 --tol -1 --model {tmp}/m.json", "Invalid value for '--tol'"),
    (
        "workers-with-scheduler",
        "fit {stack} -k 4 --workers 2 --model {tmp}/m.json --scheduler {scheduler}",
        "--workers size the embedded cluster",
    ),
    ("missing-k", "fit {stack} --model {tmp}/m.json", "-k/--n-components is required without"),
    (
        "bad-label-weight",
        "fit {stack} --labels labels --label-weight 0 --model {tmp}/m.json",
        "Invalid value for '--label-weight'",
    ),
    (
        "bad-label-prior",
        "fit {stack} --labels labels --label-prior 2 --model {tmp}/m.json",
        "--label-prior 2: give auto or a number in [0, 1]",
    ),
    (
        "label-prior-without-labels",
        "fit {stack} -k 4 --label-prior auto --model {tmp}/m.json",
        "--label-prior: for semi-supervised Gaussian mixtures",
    ),
    (
        "components-per-class-unknown",
        "fit {stack} --labels labels --components-per-class lava=2 --model {tmp}/m.json "
        "--scheduler {scheduler}",
        "--components-per-class: components_per_class names class 'lava', which is not",
    ),
    (
        "components-per-class-zero",
        "fit {stack} --labels labels --components-per-class 0 --model {tmp}/m.json",
        "--components-per-class 0: '0' is not an integer >= 1",
    ),
    (
        "components-over-k",
        "fit {stack} --labels labels -k 4 --components-per-class 2 --model {tmp}/m.json "
        "--scheduler {scheduler}",
        "--components-per-class: components_per_class asks for 8 components but n_components=4",
    ),
    (
        "components-without-labels",
        "fit {stack} -k 4 --components-per-class 2 --model {tmp}/m.json",
        "--components-per-class needs --labels",
    ),
    ("bad-covariance", "fit {stack} -k 4 --covariance blob --model {tmp}/m.json", "'blob'"),
    ("bad-precision", "fit {stack} -k 4 --precision half --model {tmp}/m.json", "'half'"),
    (
        "bad-nan-policy",
        "fit {stack} -k 4 --nan-policy drop --model {tmp}/m.json",
        "Invalid value for '--nan-policy': 'drop' is not one of 'marginalize', 'omit'",
    ),
    (
        "pattern-weights-omit",
        "fit {stack} -k 4 --pattern-weights --nan-policy omit --model {tmp}/m.json",
        "--pattern-weights: needs --nan-policy marginalize",
    ),
    (
        "pattern-weights-hmrf",
        "fit {stack} -k 4 --pattern-weights --spatial-beta 1 --model {tmp}/m.json",
        "--pattern-weights: an option of --method gmm, not of --method hmrf",
    ),
    (
        "omit-every-pixel-partial",
        "fit {partial} -k 3 --nan-policy omit --model {tmp}/m.json --scheduler {scheduler}",
        "have every attribute observed, fewer than n_components=3: with nan_policy='omit'",
    ),
    ("inspect-missing", "inspect {tmp}/nothing", "PATH {tmp}/nothing does not exist"),
    ("plot-not-posterior", "plot {stack} --out {tmp}/plots", "not a daskem posterior"),
    (
        "hmm-without-time-dim",
        "fit {stack} --method hmm -k 3 --model {tmp}/m.json",
        "--method hmm models every pixel's time series: add --time-dim DIM",
    ),
    (
        "time-dim-without-hmm",
        "fit {stack} -k 3 --time-dim time --model {tmp}/m.json",
        "--time-dim: only for --method hmm (time stacks), not --method gmm",
    ),
    (
        "time-dim-unknown",
        "fit {stack} --method hmm -k 3 --time-dim time --model {tmp}/m.json",
        "--time-dim time: the stack has no dimension 'time' to use as time (its dims: ['y', 'x'])",
    ),
]


def test_pattern_weights_fit_and_inspect(data, scheduler, tmp_path):
    model = tmp_path / "m.json"
    r = invoke(
        "fit", data["stack"], "-k", 4, "--max-iter", 5, "--model", model,
        "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = invoke("inspect", model)
    assert r.exit_code == 0, r.output
    assert "weights by pattern of observed attributes" in r.output  # the default
    assert "attr_0,attr_1,attr_2,attr_3:" in r.output  # the complete pixels' weights
    plain = tmp_path / "plain.json"
    r = invoke(
        "fit", data["stack"], "-k", 4, "--max-iter", 5, "--no-pattern-weights", "--model",
        plain, "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "weights by pattern" not in invoke("inspect", plain).output


@pytest.mark.parametrize(
    "args, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_exits_2(fitted, scheduler, tmp_path, args, message):
    inputs = tmp_path.parent / (tmp_path.name + "-inputs")
    inputs.mkdir()
    (inputs / "bad.json").write_text('{"schema": "daskem.model", "fitted": [1, 2')
    (inputs / "other.json").write_text('{"hello": "world"}')
    (inputs / "bad.csv").write_text("y,x,class\n5099995,500005,water\n0,0,forest\n")
    fill = {
        "tmp": tmp_path,
        "root": fitted["root"],
        "stack": fitted["stack"],
        "three": fitted["three"],
        "partial": fitted["partial"],
        "model": fitted["model"],
        "posterior": fitted["posterior"],
        "ckpt": fitted["ckpt"],
        "scheduler": scheduler,
        "bad_json": inputs / "bad.json",
        "other_json": inputs / "other.json",
        "bad_csv": inputs / "bad.csv",
    }
    before = _tree(fitted["root"])
    r = invoke(*args.format(**fill).split())
    assert r.exit_code == 2, r.output
    assert message.format(**fill) in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert _tree(fitted["root"]) == before  # inputs untouched


# ----------------------------------------------------------------------------- exit codes


def test_ctrl_c_exits_130_and_shuts_the_cluster_down(data, tmp_path, monkeypatch):
    from daskem import cluster

    clients = []
    real_connect = cluster.connect

    @contextlib.contextmanager
    def recording_connect(*a, **kw):
        with real_connect(*a, **kw) as client:
            clients.append(client)
            yield client

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "connect", recording_connect)
    monkeypatch.setattr(daskem_io, "fit_stack", interrupted)
    r = invoke(
        "fit", data["stack"], "-k", 4, "--model", tmp_path / "m.json",
        "--workers", 1, "--threads-per-worker", 1, "--log-json", tmp_path / "log.jsonl",
    )  # fmt: skip
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output
    assert clients and clients[0].status == "closed"
    assert clients[0].cluster is None or clients[0].cluster.status.name == "closed"
    assert not (tmp_path / "m.json").exists()
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "interrupted" and last["exit_code"] == 130


def test_unexpected_error_exits_1_with_one_line(data, scheduler, tmp_path, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(daskem_io, "fit_stack", boom)
    args = ["fit", data["stack"], "-k", 4, "--model", tmp_path / "m.json", "--scheduler", scheduler]
    r = invoke(*args)
    assert r.exit_code == 1
    assert "Error: RuntimeError: disk on fire (--debug for the traceback)" in r.output
    assert "Traceback" not in r.output
    r = invoke(*args, "--debug")
    assert r.exit_code == 1 and "Traceback" in r.output


# ----------------------------------------------------------------------------- crashes


def _daskem(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daskem", *[str(a) for a in args]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read().decode()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def test_fit_killed_then_resumed_equals_uninterrupted(data, scheduler, tmp_path):
    fit = [
        "fit", data["stack"], "-k", 4, "--tol", "1e-8", "--max-iter", 15, "--seed", 3,
        "--scheduler", scheduler, "--quiet",
    ]  # fmt: skip
    ckpt = tmp_path / "ckpt"
    killed = tmp_path / "killed.json"
    log = tmp_path / "log.jsonl"
    proc = _daskem(*fit, "--model", killed, "--checkpoint", ckpt, "--log-json", log)

    def iterations() -> int:
        # the checkpoint is saved before the iteration is reported
        try:
            lines = [json.loads(x) for x in log.read_text().splitlines()]
        except (OSError, ValueError):
            return 0
        return max([x["iteration"] for x in lines if x["event"] == "iteration"], default=0)

    _kill_when(proc, lambda: iterations() >= 2)
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists()
    assert (ckpt / "checkpoint.json").is_file()
    assert 2 <= iterations() < 15

    r = invoke(*fit, "--model", killed, "--checkpoint", ckpt, "--resume")
    assert r.exit_code == 0, r.output
    r = invoke(*fit, "--model", tmp_path / "straight.json")
    assert r.exit_code == 0, r.output
    a = json.loads(killed.read_text())["fitted"]
    b = json.loads((tmp_path / "straight.json").read_text())["fitted"]
    assert a["n_iter"] >= 6
    for key in ("weights", "means", "covariances", "lower_bounds", "n_iter"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def big_stack(data):
    path = data["root"] / "big.zarr"
    write_stack(make_stack((512, 512), seed=4), path, chunks=32)
    return path


@pytest.mark.parametrize("previous", [False, True], ids=["new", "overwrite"])
def test_predict_killed_mid_write_leaves_target_alone(fitted, big_stack, scheduler, previous,
                                                      tmp_path):  # fmt: skip
    out = tmp_path / "posterior.zarr"
    before = None
    if previous:
        import shutil

        shutil.copytree(fitted["posterior"], out)
        before = _tree(out)
    proc = _daskem(
        "predict", big_stack, "--model", fitted["model"], "--out", out, "--overwrite",
        "--scheduler", scheduler,
    )  # fmt: skip

    def writing() -> bool:  # the temporary store beside the target holds computed chunks
        return any(
            f.is_file()
            for tmp in tmp_path.glob(".posterior.zarr.tmp-*")
            for f in (tmp / "probability").rglob("*")
            if f.name != "zarr.json"
        )

    _kill_when(proc, writing)
    if previous:
        assert _tree(out) == before  # the previous store is intact
        xr.open_zarr(out).load()
    else:
        assert not out.exists()


# ----------------------------------------------------------------------------- demo, inspect, plot


def test_demo_small(scheduler, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--size", 96, "--chunk", 32, "--out", out, "--scheduler", scheduler]
    r = invoke(*args, "--log-json", tmp_path / "demo.jsonl")
    assert r.exit_code == 0, r.output
    for name in ("stack.zarr", "model.json", "posterior.zarr"):
        assert (out / name).exists()
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in pngs] == [
        "class_map.png", "confidence.png", "loglik.png", "probabilities.png"
    ]  # fmt: skip
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert "accuracy vs ground truth: " in r.output
    summary = json.loads((tmp_path / "demo.jsonl").read_text().splitlines()[-1])
    assert summary["status"] == "ok" and summary["accuracy"] > 0.6
    r = invoke(*args)
    assert r.exit_code == 2 and "add --overwrite" in r.output
    r = invoke(*args, "--overwrite", "--quiet")
    assert r.exit_code == 0, r.output


def test_fit_single_precision_is_recorded_and_close(fitted, scheduler, tmp_path):
    model = tmp_path / "single.json"
    r = invoke(
        "fit", fitted["stack"], "--labels", "labels", "-k", 4, "--model", model,
        "--precision", "single", "--scheduler", scheduler,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(model.read_text())
    auto = json.loads(fitted["model"].read_text())
    assert doc["provenance"]["options"]["precision"] == "single"
    assert auto["provenance"]["options"]["precision"] == "auto"
    np.testing.assert_allclose(
        doc["fitted"]["means"], auto["fitted"]["means"], rtol=1e-3, atol=1e-3
    )
    assert doc["fitted"]["means"] != auto["fitted"]["means"]  # float32 stack: other arithmetic


def test_inspect_stack_model_posterior(fitted):
    r = invoke("inspect", fitted["stack"])
    assert r.exit_code == 0, r.output
    assert "stack: " in r.output and "y: 128, x: 128" in r.output
    assert "attr_0: float32 (y, x) chunks 32 x 32" in r.output
    assert "chunks: y 32, x 32; attributes: attr_0, attr_1, attr_2, attr_3" in r.output
    assert "labels/classes: water, forest, urban, grassland" in r.output

    r = invoke("inspect", fitted["model"])
    assert r.exit_code == 0, r.output
    assert "4 components, full covariance" in r.output
    assert "classes (4): water, forest, urban, grassland" in r.output
    assert "argv: daskem fit" in r.output and "daskem_version: " in r.output

    r = invoke("inspect", fitted["posterior"])
    assert r.exit_code == 0, r.output
    assert "posterior: " in r.output and "classes (4): water, forest, urban, grassland" in r.output
    assert "fit: " in r.output and "trained on: " in r.output


def test_plot_writes_pngs(fitted, tmp_path):
    r = invoke("plot", fitted["posterior"], "--out", tmp_path, "--model", fitted["model"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["class_map.png", "confidence.png", "loglik.png", "probabilities.png"]
    r = invoke("plot", fitted["posterior"], "--out", tmp_path / "nomodel")
    assert r.exit_code == 0 and not (tmp_path / "nomodel" / "loglik.png").exists()


def test_downsample_is_bounded_and_takes_the_first_slice():
    import dask.array as da

    from daskem import plot

    C, Z, Y, X = 3, 2, 2500, 1100
    p = da.random.random((C, Z, Y, X), chunks=(C, 1, 500, 500)).astype("float32")
    p = p / p.sum(axis=0)
    ds = xr.Dataset(
        {"probability": (("class", "z", "y", "x"), p), "confidence": (("z", "y", "x"), p.max(0))},
        coords={"class": ["a", "b", "c"], "z": [10.0, 20.0]},
    )
    small = plot.downsample(ds, max_size=100)
    assert small["label"].dims == ("y", "x")
    assert small.sizes["y"] <= 100 and small.sizes["x"] <= 100
    assert small.attrs["coarsen_factors"] == {"y": 25, "x": 20}  # divisors of the 500 chunks
    assert small.attrs["leading"] == {"z": 10.0}
    expect = ds["confidence"].isel(z=0, y=slice(0, 25), x=slice(0, 20)).mean().values
    np.testing.assert_allclose(small["confidence"].values[0, 0], expect, rtol=1e-5)
    assert plot.coarsen_factor(100_000, 256, 1000) == 128
    assert plot.coarsen_factor(100_000, 64, 1000) == 128


def test_label_prior_reaches_the_classifier(data, scheduler, tmp_path):
    means = {}
    for prior in ("0", "1"):
        model = tmp_path / f"m{prior}.json"
        r = invoke(
            "fit", data["stack"], "--labels", "labels", "--label-prior", prior, "--model",
            model, "--scheduler", scheduler, "--quiet", "--seed", "0",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        saved = json.loads(model.read_text())
        assert saved["provenance"]["options"]["label_prior"] == prior
        means[prior] = np.asarray(saved["fitted"]["means"])
    # the labels' classifier weighs every pixel's classes: another fixed point
    assert not np.allclose(means["0"], means["1"], rtol=1e-6)
