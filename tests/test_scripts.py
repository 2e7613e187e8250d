"""The benchmark and data scripts run end to end on tiny inputs and write what they
promise (JSON with the ratios the README quotes; a Zarr stack daskem can open). They are
deliverables like the package: this keeps them from rotting. No timing is checked."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(*args, timeout=300):
    proc = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_runs_and_reports_the_ratios(tmp_path):
    out = tmp_path / "bench.json"
    text = _run(
        SCRIPTS / "bench.py", "--n", 40_000, "--d", 3, "--k", 3, "--iters", 2,
        "--cov", "full", "--sklearn-n", 20_000, "--skip", "malloc,spark,hmm",
        "--zarr-rows", 8192, "--json", out,
    )  # fmt: skip
    res = json.loads(out.read_text())
    run = res["runs"]["full"]
    for key in ("daskem_threads", "daskem_threads_single", "daskem_zarr_threads", "sklearn"):
        assert run[key]["rate"] > 0, key
    assert run["kernel_1core"]["auto_plan"].endswith("components")
    ratios = run["ratios"]
    assert ratios["daskem_threads / scikit-learn"] > 0
    assert ratios["daskem_threads / (NumPy pass 1 core x 2)"] > 0
    assert ratios["daskem_zarr_threads: dominated by"] in ("read", "compute")
    assert "daskem_zarr_threads pass / (read-only + daskem_threads) pass" in text
    # the cluster's Zarr rows are compared with a read-only pass on the same workers
    assert run["cluster_default"]["read_only"]["rate"] > 0
    key = "daskem_cluster_zarr_default pass / (read-only + daskem_cluster_numpy_default) pass"
    assert ratios[key] > 0


@pytest.mark.slow
def test_bench_hmm_runs_and_reports_the_ratios(tmp_path):
    pytest.importorskip("hmmlearn")
    out = tmp_path / "hmm.json"
    text = _run(
        SCRIPTS / "bench_hmm.py", "--n", 3000, "--t", 6, "--d", 2, "--k", 3, "--iters", 2,
        "--hmmlearn-n", 200, "--cov", "full", "--json", out,
    )  # fmt: skip
    res = json.loads(out.read_text())
    for cov in ("full",):  # one covariance type: one cluster start
        run = res["runs"][cov]
        assert run["kernels_1core"]["same_loglik"], run["kernels_1core"]
        ratios = run["ratios"]
        assert ratios["daskem (2 workers) / hmmlearn (1 process), EM iterations per second"] > 0
        assert ratios["daskem kernel / minimal NumPy forward-backward, 1 core"] > 0
        # no covariance prior: EM's log-likelihood never goes down
        h = run["daskem_cluster"]["history"]
        assert all(b >= a - 1e-6 * abs(a) for a, b in zip(h, h[1:], strict=False))
    assert "minimal NumPy" in text


@pytest.mark.slow
def test_bench_passes_runs_and_compares_with_plain_em(tmp_path):
    out = tmp_path / "passes.json"
    _run(
        SCRIPTS / "bench_passes.py", "--n", 30_000, "--d", 3, "--k", 3, "--rows", 4096,
        "--tols", "1e-3", "--skip-exhaustive", "--json", out,
    )  # fmt: skip
    res = json.loads(out.read_text())
    (row,) = res["passes"]
    assert row["plain EM"]["passes"] >= 1 and row["prefit"]["passes"] >= 1
    assert row["pass_ratio"] == row["prefit"]["passes"] / row["plain EM"]["passes"]
    assert set(res["restarts"]) == {"n_init=1", "n_init=4"}
    assert res["restarts"]["n_init=4"]["time_ratio"] > 0


@pytest.mark.slow
def test_big_stack_generator_and_fit(tmp_path):
    stack = tmp_path / "big.zarr"
    _run(SCRIPTS / "make_big_stack.py", stack, "--side", 256, "--chunk", 128, "--features", 3,
         "--classes", 3, "--workers", 1)  # fmt: skip
    ds = xr.open_zarr(stack)
    assert len(ds.data_vars) >= 3
    out = tmp_path / "big.json"
    stream = tmp_path / "tasks.json"
    _run(SCRIPTS / "bench_big.py", stack, "-k", 3, "--max-iter", 3, "--workers", 1,
         "--memory-limit", "1GiB", "--json", out, "--task-stream", stream)  # fmt: skip
    res = json.loads(out.read_text())
    assert res["pixels"] == 256 * 256
    assert 1 <= res["n_iter"] <= 3 and len(res["passes"]) >= 1
    assert res["peak_rss_total_gb"] > 0
    tasks = json.loads(stream.read_text())["tasks"]
    assert any("daskem-pass" in t["key"] for t in tasks)
    times = [ss for t in tasks for ss in t["startstops"]]
    assert all(0 <= ss["start"] <= ss["stop"] for ss in times)


def test_bench_spatial_block_times_every_variant():
    text = _run(SCRIPTS / "bench_spatial_block.py", "--side", 64, "-k", 3, "-d", 2,
                "--cov", "full", "--repeats", 1)  # fmt: skip
    lines = [line for line in text.splitlines() if line.strip().endswith("x")]
    names = [line.split("  ")[1].strip() for line in lines]
    assert names[0] == "pixel-wise" and lines[0].endswith("1.00x")
    assert len(lines) == 8 and "joint" in names[-1] and "carried q" in names[-2]
    assert "start kept" in names[-3]


def test_eval_spatial_calibration_figures():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from eval_spatial import calibration
    finally:
        sys.path.remove(str(SCRIPTS))
    P = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    truth = np.array([0, 1, 1, 0])
    isolated = np.array([False, True, False, False])
    cal = calibration(P, truth, isolated, pw_label=np.array([0, 0, 1, 0]))
    assert cal["confidence_wrong"] == pytest.approx(0.6)
    assert cal["confidence_right"] == pytest.approx((0.9 + 0.7 + 0.8) / 3)
    # bins (0.5, 0.6]: 0.6 right 0; (0.6, 0.7]: 0.7 right 1; (0.7, 0.8]; (0.8, 0.9]
    assert cal["ece"] == pytest.approx((0.6 + 0.3 + 0.2 + 0.1) / 4)
    assert cal["log_loss"] == pytest.approx(-np.log([0.9, 0.4, 0.7, 0.8]).mean())
    assert cal["p_isolated_pixelwise_errors"] == pytest.approx(0.6)


def test_eval_semisup_runs_on_a_bundled_table(tmp_path):
    """The real-data benchmark on scikit-learn's bundled wine data (the other sets need
    packages the test install does not have; the script skips and names them)."""
    out = tmp_path / "eval.json"
    text = _run(
        SCRIPTS / "eval_semisup.py", "--datasets", "wine", "--seeds", 2, "--labels", 3,
        "--json", out,
    )  # fmt: skip
    assert "daskem default" in text and "reference EM" in text
    res = json.loads(out.read_text())
    accs = [r["accuracy"] for r in res["runs"] if r["method"] == "daskem"]
    assert len(accs) == 2 and all(0.5 < a <= 1 for a in accs)


def test_eval_semisup_diagnostics_compare_objectives(tmp_path):
    out = tmp_path / "eval.json"
    text = _run(
        SCRIPTS / "eval_semisup.py", "--datasets", "wine", "--seeds", 2, "--labels", 3,
        "--methods", "daskem,oracle,likeliest", "--json", out,
    )  # fmt: skip
    assert "(oracle)" in text and "likeliest of 7 starts" in text
    assert "lower objective than the likeliest fit in" in text
    runs = {(r["method"], r["seed"]): r for r in json.loads(out.read_text())["runs"]}
    for seed in (0, 1):
        assert "error" not in runs["oracle", seed] and "error" not in runs["likeliest", seed]
        likeliest = runs["likeliest", seed]
        objectives = likeliest["objectives"]
        assert len(objectives) == 7 and likeliest["lower_bound"] == max(objectives)
        assert objectives[0] == pytest.approx(runs["daskem", seed]["lower_bound"])
        oracle = runs["oracle", seed]
        assert oracle["below_likeliest"] == (oracle["lower_bound"] < likeliest["lower_bound"])


def test_eval_missing_runs(tmp_path):
    """The missing-data benchmark: synthetic cloud stacks and the bundled wine data."""
    out = tmp_path / "missing.json"
    text = _run(SCRIPTS / "eval_missing.py", "--quick", "--datasets", "wine", "--json", out)
    assert "marginalize" in text and "IterativeImputer" in text
    res = json.loads(out.read_text())
    assert len(res["synthetic"]) == 2 and len(res["real"]) == 2
    for r in res["synthetic"]:
        assert 0.2 < r["partly_missing"] < 0.4
        assert r["fill"]["rmse"] < r["mean_fill"]["rmse"]
    for r in res["real"]:
        assert r["daskem"]["rmse"] < r["mean"]["rmse"]


def test_eval_missing_spatial_prior_and_shuffled_clouds(tmp_path):
    """Both policies under the spatial prior and the shuffled-cloud control: every fit
    reported with finite errors, the paired tables printed."""
    out = tmp_path / "missing.json"
    text = _run(
        SCRIPTS / "eval_missing.py", "--quick", "--spatial", "--spatial-iters", 3,
        "--missingness", "shuffled", "--datasets", "none", "--json", out,
    )  # fmt: skip
    assert "Paired per seed: marginalize + spatial prior minus omit + spatial prior" in text
    res = json.loads(out.read_text())
    assert len(res["synthetic"]) == 2
    fits = [f"{p}{s}" for s in ("", "_spatial") for p in ("marginalize", "omit", "complete")]
    for r in res["synthetic"]:
        assert r["missingness"] == "shuffled" and 0.2 < r["partly_missing"] < 0.4
        for fit in fits:
            assert all(0 <= r[fit][k] < 10 for k in ("mean", "cov", "weight")), fit
        assert r["marginalize_spatial"]["beta"] >= 0


def test_eval_missing_shuffled_clouds_move_the_hidden_values():
    """The shuffled control hides as many values of every attribute as the clouds did
    (less the few that land on values already missing), on other pixels."""
    import numpy as np

    sys.path.insert(0, str(SCRIPTS))
    try:
        import eval_missing
    finally:
        sys.path.remove(str(SCRIPTS))
    from daskem.synthetic import make_stack

    names = [f"attr_{k}" for k in range(4)]
    ds = make_stack((96, 96), clouds=0.3, seed=3)
    shuffled = ds.copy(deep=True)
    eval_missing._shuffle_clouds(shuffled, names, np.random.default_rng(0))
    clouded = [v for v in names if f"{v}_true" in ds]
    assert clouded
    for v in names:
        if v not in clouded:
            assert np.array_equal(np.isnan(shuffled[v].values), np.isnan(ds[v].values))
            continue
        value = np.isfinite(ds[f"{v}_true"].values)
        hidden = np.isnan(ds[v].values) & value
        moved = np.isnan(shuffled[v].values) & value
        assert 0.9 * hidden.sum() <= moved.sum() <= hidden.sum()
        assert (moved & hidden).sum() < 0.6 * hidden.sum()


def test_confidence_figures_of_a_calibrated_and_an_overconfident_map():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cc", SCRIPTS / "check_confidence.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    rng = np.random.default_rng(0)
    n = 200_000
    top = rng.uniform(0.5, 1.0, n)  # a 2-class map right with the probability it gives
    P = np.stack([top, 1.0 - top], -1)
    truth = np.where(rng.random(n) < top, 0, 1)
    cal = cc.confidence(P, truth)
    assert cal["ece"] < 0.01
    assert abs(cal["recalibrated_confidence_wrong"] - cal["confidence_wrong"]) < 0.01
    sharp = np.stack([0.5 + 0.5 * np.sqrt(2 * top - 1), 0.5 - 0.5 * np.sqrt(2 * top - 1)], -1)
    over = cc.confidence(sharp, truth)  # same labels and ranking, more confident
    assert over["ece"] > 0.05
    assert over["confidence_wrong"] > over["recalibrated_confidence_wrong"] + 0.05
    assert abs(over["recalibrated_confidence_wrong"] - cal["confidence_wrong"]) < 0.01


def test_check_confidence_runs_with_gibbs(tmp_path):
    out = tmp_path / "conf.json"
    _run(
        SCRIPTS / "check_confidence.py", "--side", 40, "--separations", 3, "--seeds", 3,
        "--gibbs", 3, "--burn-in", 1, "--json", out,
    )  # fmt: skip
    row = json.loads(out.read_text())["rows"][0]
    for name in ("pixel-wise", "staged", "joint", "staged, Gibbs"):
        r = row[name]
        assert 0.0 <= r["accuracy"] <= 1.0, name
        assert 0.0 <= r["ece"] <= 1.0, name
        if r["n_wrong"]:
            assert 0.0 <= r["recalibrated_confidence_wrong"] <= 1.0, name
    assert row["staged"]["beta"] >= 0.0
