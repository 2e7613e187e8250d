"""A new model is one module plus a thin estimator: a Poisson mixture, written only here.

Everything below the two classes is daskem's public machinery: fitting (NumPy and Dask,
restarts, checkpoints), model files, prediction, posterior maps of a stack and the
command line (``--method poisson``), none of which was edited for this model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from scipy.special import gammaln

from daskem import cli
from daskem.base import EMEstimator, _store_params
from daskem.io import fit_stack, open_stack, posterior, write_posterior
from daskem.modelfile import load_model, register_estimator, save_model

# ----------------------------------------------------------------- the model module


@dataclass(frozen=True)
class PoissonParams:
    weights: np.ndarray  # (K,)
    rates: np.ndarray  # (K, D)


@dataclass
class PoissonStats:
    n: np.ndarray  # (K,) responsibility mass
    s: np.ndarray  # (K, D) responsibility-weighted sums
    loglik: float = 0.0
    weight: float = 0.0
    n_excluded: int = 0

    def __add__(self, other: PoissonStats) -> PoissonStats:
        return PoissonStats(
            self.n + other.n,
            self.s + other.s,
            self.loglik + other.loglik,
            self.weight + other.weight,
            self.n_excluded + other.n_excluded,
        )

    def __radd__(self, other):
        return self if other == 0 else NotImplemented


@dataclass(frozen=True)
class PoissonModel:
    """A mixture of independent Poissons (counts per attribute)."""

    def weighted_log_prob(self, params: PoissonParams, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        out = (
            X @ np.log(params.rates).T
            - params.rates.sum(axis=1)
            - gammaln(X + 1).sum(axis=1, keepdims=True)
            + np.log(params.weights)
        )
        out[~np.isfinite(X).all(axis=1)] = np.nan
        return out

    def _normalise(self, wlp):
        top = wlp.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(wlp - top).sum(axis=1)) + top[:, 0]
        return log_norm, np.exp(wlp - log_norm[:, None])

    def block_stats(self, params, X, sample_weight=None, labels=None) -> PoissonStats:
        X = np.asarray(X, dtype=np.float64)
        good = np.isfinite(X).all(axis=1)
        w = np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, float)
        w = np.where(good, w, 0.0)
        log_norm, r = self._normalise(self.weighted_log_prob(params, np.where(good[:, None], X, 0)))
        rw = r * w[:, None]
        return PoissonStats(
            rw.sum(axis=0),
            rw.T @ np.where(good[:, None], X, 0.0),
            float((w * log_norm).sum()),
            float(w.sum()),
            int((~good).sum()),
        )

    def m_step(self, stats: PoissonStats, params: PoissonParams):
        n = stats.n + 1e-10
        return PoissonParams(n / n.sum(), np.maximum(stats.s / n[:, None], 1e-6)), []

    def objective(self, stats: PoissonStats) -> float:
        return stats.loglik / stats.weight

    def log_density(self, params, X, labels=None) -> np.ndarray:
        return self._normalise(self.weighted_log_prob(params, X))[0]

    def class_posterior(self, params, X, n_classes):
        log_norm, r = self._normalise(self.weighted_log_prob(params, X))
        return r, log_norm

    def params_to_dict(self, params: PoissonParams) -> dict:
        return {"weights": params.weights.tolist(), "rates": params.rates.tolist()}

    def params_from_dict(self, d: dict) -> PoissonParams:
        return PoissonParams(np.asarray(d["weights"]), np.asarray(d["rates"]))

    def n_parameters(self, params: PoissonParams) -> int:
        K, D = params.rates.shape
        return K * D + K - 1


# ----------------------------------------------------------------- the thin estimator


@register_estimator
class PoissonMixture(EMEstimator):
    """Fitted attributes ``weights_`` and ``rates_``."""

    kind = "poisson"
    _fitted_marker = "rates_"

    def __init__(
        self,
        n_components: int = 1,
        *,
        tol: float = 1e-4,
        max_iter: int = 100,
        n_init: int = 1,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        chunk_size: Any = "auto",
        split_every: int = 16,
        init_sample_size: int = 10_000,
        nan_policy: str = "omit",
        prefit: Any = False,
        cache: Any = "auto",
        select_after: Any = "auto",
    ) -> None:
        _store_params(self, locals())

    def _model(self) -> PoissonModel:
        return PoissonModel()

    def _check_parameters(self, n_features: int, K: int | None = None) -> None:
        self._check_common()

    def _initial_params(self, data, seed, labelled=None, sample=None) -> PoissonParams:
        Xs, _ = self._start_sample(sample, self._n_comp)
        rng = np.random.default_rng(seed)
        centres = Xs[rng.choice(len(Xs), self._n_comp, replace=False)] + 0.5
        return PoissonParams(np.full(self._n_comp, 1.0 / self._n_comp), centres)

    def _set_params(self, params: PoissonParams) -> None:
        self.weights_, self.rates_ = params.weights, params.rates

    def _fitted_params(self, component_class=None) -> PoissonParams:
        return PoissonParams(self.weights_, self.rates_)

    def _fitted_to_dict(self) -> dict:
        return {"weights": self.weights_.tolist(), "rates": self.rates_.tolist()}

    def _fitted_from_dict(self, fitted: dict, K: int, D: int) -> None:
        self.weights_ = np.asarray(fitted["weights"], dtype=np.float64)
        self.rates_ = np.asarray(fitted["rates"], dtype=np.float64)
        if self.rates_.shape != (K, D):
            raise ValueError(f"fitted rates has shape {self.rates_.shape}, expected {(K, D)}")

    def fit(self, X, y=None, sample_weight=None, **kwargs):
        names = {k: kwargs.pop(k, None) for k in ("feature_names", "class_names")}
        self._fit(X, None, sample_weight, **kwargs)
        self._set_names(names["feature_names"], names["class_names"])
        return self

    def predict(self, X):
        return np.asarray(self.component_proba(X)).argmax(axis=1)


# ----------------------------------------------------------------- the tests


def _counts(shape=(96, 96), seed=0):
    """A count stack: three regions of different Poisson rates over 3 attributes."""
    rng = np.random.default_rng(seed)
    rates = np.array([[2.0, 10.0, 5.0], [12.0, 3.0, 6.0], [6.0, 6.0, 20.0]])
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = (xx * 3 // shape[1]).astype(np.int16)
    truth[yy < shape[0] // 3] = (truth[yy < shape[0] // 3] + 1) % 3
    values = rng.poisson(rates[truth]).astype(np.float32)
    ds = xr.Dataset(
        {f"count_{j}": (("y", "x"), values[..., j]) for j in range(3)},
        coords={"y": np.arange(shape[0]) * 10.0, "x": np.arange(shape[1]) * 10.0},
    )
    ds["truth"] = (("y", "x"), truth, {"flag_values": [0, 1, 2]})
    return ds, rates, truth


def _accuracy(pred, truth):
    from itertools import permutations

    return max(np.mean(np.asarray(p)[pred] == truth) for p in permutations(range(3)))


def test_new_model_fits_numpy_and_dask_and_never_decreases():
    ds, rates, truth = _counts()
    X = np.stack([ds[f"count_{j}"].values.ravel() for j in range(3)], axis=1)
    gm = PoissonMixture(3, random_state=0, n_init=2, tol=1e-8, max_iter=200).fit(X)
    assert gm.converged_ and np.all(np.diff(gm.lower_bounds_) >= -1e-12)
    found = sorted(map(tuple, np.round(gm.rates_, 0)))
    assert found == sorted(map(tuple, rates)), gm.rates_
    with dask.config.set(scheduler="synchronous"):
        gd = PoissonMixture(3, random_state=0, n_init=2, tol=1e-8, max_iter=200).fit(
            da.from_array(X, chunks=(1000, 3))
        )
    np.testing.assert_allclose(gd.rates_, gm.rates_, rtol=1e-9)
    assert _accuracy(gm.predict(X), truth.ravel()) > 0.95
    assert np.isfinite(gm.bic(X)) and gm.score(X) == pytest.approx(gm.lower_bound_, rel=1e-6)


def test_new_model_checkpoints_resume_to_the_same_fit(tmp_path):
    ds, _, _ = _counts(seed=1)
    X = np.stack([ds[f"count_{j}"].values.ravel() for j in range(3)], axis=1)
    kw = dict(n_components=3, random_state=0, tol=0.0, max_iter=12)
    ref = PoissonMixture(**kw).fit(X)

    class Stop(Exception):
        pass

    def stop(info):
        if info.iteration == 5:
            raise Stop

    with pytest.raises(Stop):
        PoissonMixture(**kw).fit(X, checkpoint_dir=tmp_path, callback=stop)
    resumed = PoissonMixture(**kw).fit(X, checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_array_equal(resumed.rates_, ref.rates_)


def test_new_model_saves_loads_and_maps_a_stack(tmp_path):
    ds, _, truth = _counts()
    stack = open_stack(ds, chunks=48)
    with dask.config.set(scheduler="synchronous"):
        gm = fit_stack(stack, 3, method="poisson", random_state=0, tol=1e-8, max_iter=200)
        assert isinstance(gm, PoissonMixture)
        assert list(gm.feature_names_in_) == ["count_0", "count_1", "count_2"]
        path = save_model(gm, tmp_path / "m.json")
        doc = json.loads(path.read_text())
        assert doc["model"] == "poisson" and doc["estimator"] == "PoissonMixture"
        loaded = load_model(path)
        np.testing.assert_array_equal(loaded.rates_, gm.rates_)
        post = posterior(loaded, stack)
        assert post.attrs["model_kind"] == "poisson"
        write_posterior(post, tmp_path / "p.zarr")
    out = xr.open_zarr(tmp_path / "p.zarr")
    assert _accuracy(out["label"].values.ravel(), truth.ravel()) > 0.95
    np.testing.assert_allclose(out["probability"].sum("class").values, 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot fill missing attributes"):
        posterior(loaded, stack, impute=True)


def test_new_model_through_the_command_line(tmp_path):
    from distributed import LocalCluster

    ds, _, truth = _counts()
    ds.to_zarr(tmp_path / "counts.zarr")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        address = cluster.scheduler_address
        r = run(
            "fit", tmp_path / "counts.zarr", "--method", "poisson", "-k", 3,
            "--param", "tol=1e-8", "--param", "max_iter=200",
            "--model", tmp_path / "m.json", "--scheduler", address, "--quiet",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        r = run(
            "predict", tmp_path / "counts.zarr", "--model", tmp_path / "m.json",
            "--out", tmp_path / "p.zarr", "--scheduler", address, "--quiet",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        bad = run(
            "fit", tmp_path / "counts.zarr", "--method", "poisson", "-k", 3,
            "--covariance", "diag", "--model", tmp_path / "x.json",
        )  # fmt: skip
        assert bad.exit_code == 2 and "--covariance: options of --method gmm" in bad.output
        bad = run(
            "fit", tmp_path / "counts.zarr", "--method", "poisson", "-k", 3,
            "--nan-policy", "marginalize", "--model", tmp_path / "x.json",
            "--scheduler", address,
        )  # fmt: skip
        assert bad.exit_code == 2, bad.output
        assert "nan_policy must be one of ('raise', 'omit') for a PoissonMixture" in bad.output
        bad = run(
            "predict", tmp_path / "counts.zarr", "--model", tmp_path / "m.json",
            "--out", tmp_path / "q.zarr", "--impute",
        )  # fmt: skip
        assert bad.exit_code == 2 and "cannot fill missing attributes" in bad.output
        assert not (tmp_path / "x.json").exists() and not (tmp_path / "q.zarr").exists()
    out = xr.open_zarr(tmp_path / "p.zarr")
    assert _accuracy(out["label"].values.ravel(), truth.ravel()) > 0.95
    assert json.loads((tmp_path / "m.json").read_text())["parameters"]["nan_policy"] == "omit"
    r = run("inspect", tmp_path / "m.json")
    assert r.exit_code == 0 and "kind: poisson (PoissonMixture), 3 components" in r.output
