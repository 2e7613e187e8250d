"""The Gaussian mixture with a Potts prior (hidden Markov random field, mean-field EM).

The reference below is an independent whole-image NumPy/SciPy implementation of the
iteration documented in :mod:`daskem.model.spatial` at a fixed ``beta`` (it does not use
``daskem.model``): pixel-wise start, colour sweeps, the mixture's M-step on ``q`` and one
Newton step of the pseudo-likelihood in ``alpha``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import daskem
from daskem import (
    ConvergenceWarning,
    GaussianMixture,
    SpatialGaussianMixture,
    SpatialGaussianMixtureClassifier,
)
from daskem.model.gmm import GMMModel
from daskem.model.spatial import (
    SpatialBlock,
    SpatialGMMModel,
    SpatialParams,
    colour_map,
    free_energy,
    mean_field,
    neighbour_offsets,
    neighbour_sum,
    pixel_uniforms,
)
from daskem.modelfile import model_from_dict, model_to_dict
from daskem.synthetic import make_stack

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


# --------------------------------------------------------------------------- reference


def ref_neighbours(P, nb):
    """Sum of the neighbours' values, zero outside the image (padding + shifted views)."""
    H, W, C = P.shape
    pad = np.zeros((H + 2, W + 2, C))
    pad[1:-1, 1:-1] = P
    out = np.zeros_like(P)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy, dx) == (0, 0) or (nb == 4 and dy and dx):
                continue
            out += pad[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
    return out


def ref_iteration(X, w, mu, cov, alpha, beta, nb, sweeps, reg=1e-6):
    """One iteration on a complete 2-D image (K = C, one component per class)."""
    H, W, D = X.shape
    K = len(w)
    E = np.stack(
        [multivariate_normal(mu[k], cov[k]).logpdf(X.reshape(-1, D)) for k in range(K)], -1
    ).reshape(H, W, K)
    lg = E + alpha
    q = np.exp(lg - logsumexp(lg, axis=-1, keepdims=True))
    yy, xx = np.indices((H, W))
    colours = (yy % 2) + 2 * (xx % 2) if nb == 8 else (yy + xx) % 2
    for _ in range(sweeps):
        for c in range(4 if nb == 8 else 2):
            s = colours == c
            lg2 = lg + beta * ref_neighbours(q, nb)
            new = np.exp(lg2 - logsumexp(lg2, axis=-1, keepdims=True))
            q[s] = new[s]
    N = ref_neighbours(q, nb)
    ent = np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0)
    log_prior = alpha + beta * N - logsumexp(alpha + beta * N, axis=-1, keepdims=True)
    F = (q * (E + log_prior) - ent).sum() / (H * W)
    r = q.reshape(-1, K)
    x = X.reshape(-1, D)
    nk = r.sum(0) + 10 * np.finfo(float).eps
    mu2 = r.T @ x / nk[:, None]
    cov2 = np.stack(
        [((x - mu2[k]) * r[:, [k]]).T @ (x - mu2[k]) / nk[k] + reg * np.eye(D) for k in range(K)]
    )
    w2 = nk / nk.sum()
    # pseudo-likelihood Newton step in alpha (minimum-norm, capped at 1, centred), with the
    # neighbours of the simulated field: a field drawn from q by the pixels' fixed
    # uniforms, then one colour sweep drawing each pixel from its posterior conditional
    # given its neighbours' current classes (fixed uniforms of stream 1); the targets are
    # the posterior conditionals at the final neighbours
    u = pixel_uniforms((H, W), (0, 0))
    z = (np.cumsum(q, axis=-1) < u[..., None]).sum(-1)
    Z = np.eye(K)[np.minimum(z, K - 1)]
    u1 = pixel_uniforms((H, W), (0, 0), stream=1)
    for c in range(4 if nb == 8 else 2):
        s = colours == c
        lt = lg + beta * ref_neighbours(Z, nb)
        pt = np.exp(lt - logsumexp(lt, axis=-1, keepdims=True))
        zc = (np.cumsum(pt, axis=-1) < u1[..., None]).sum(-1)
        Z[s] = np.eye(K)[np.minimum(zc, K - 1)][s]
    n = ref_neighbours(Z, nb).reshape(-1, K)
    p = np.exp(alpha + beta * n - logsumexp(alpha + beta * n, axis=1, keepdims=True))
    lt = lg.reshape(-1, K) + beta * n
    t = np.exp(lt - logsumexp(lt, axis=1, keepdims=True))
    g = (t - p).sum(0)
    Hs = sum(np.diag(pi) - np.outer(pi, pi) for pi in p)
    step = np.linalg.lstsq(Hs, g, rcond=1e-10)[0]
    if np.abs(step).max() > 1:
        step /= np.abs(step).max()
    a2 = alpha + step
    return w2, mu2, cov2, a2 - a2.mean(), F, q


def _image(seed=0, shape=(40, 52), sep=2.0):
    ds = make_stack(shape, n_classes=3, n_features=3, seed=seed, separation=sep, nan_fraction=0)
    X = np.stack([ds[f"attr_{k}"].values for k in range(3)], -1).astype(np.float64)
    return X, ds


def _start(X, K=3, seed=0):
    gm = GaussianMixture(K, random_state=seed, max_iter=3).fit(X.reshape(-1, X.shape[-1]))
    return gm.weights_, gm.means_, gm.covariances_


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("nb", [4, 8])
def test_matches_whole_image_reference(nb):
    X, _ = _image()
    w, mu, cov = _start(X)
    beta, n_iter = 0.8, 4
    sg = SpatialGaussianMixture(
        3,
        spatial_beta=beta,
        spatial_fit="joint",
        neighbourhood=nb,
        mean_field_sweeps=2,
        weights_init=w,
        means_init=mu,
        precisions_init=np.linalg.inv(cov),
        max_iter=n_iter,
        tol=0,
        chunk_size=13 * 17,
    ).fit(X)
    alpha = np.log(w) - np.log(w).mean()
    history = []
    for _ in range(n_iter):
        w, mu, cov, alpha, F, _ = ref_iteration(X, w, mu, cov, alpha, beta, nb, 2)
        history.append(F)
    np.testing.assert_allclose(sg.lower_bounds_, history, rtol=1e-10)
    np.testing.assert_allclose(sg.weights_, w, rtol=1e-9)
    np.testing.assert_allclose(sg.means_, mu, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sg.covariances_, cov, rtol=1e-8)
    np.testing.assert_allclose(sg.spatial_alpha_, alpha, atol=1e-9)
    # the posterior: sweeps at the fitted parameters
    _, _, _, _, _, q = ref_iteration(
        X, sg.weights_, sg.means_, sg.covariances_, sg.spatial_alpha_, beta, nb, 2
    )
    np.testing.assert_allclose(sg.predict_proba(X), q, atol=1e-10)


def test_free_energy_never_decreases_through_sweeps_and_m_step():
    rng = np.random.default_rng(1)
    X, _ = _image(seed=2)
    w, mu, cov = _start(X)
    gm = GaussianMixture(3, random_state=0, max_iter=2).fit(X.reshape(-1, 3))
    model = SpatialGMMModel(GMMModel("full", 1e-6), neighbourhood=8, sweeps=1)
    from daskem.model.gmm import class_membership
    from daskem.model.spatial import log_emission

    params = gm._fitted_params()
    E = log_emission(params, X.reshape(-1, 3)).reshape(*X.shape[:2], 3)
    M = class_membership(params)
    for beta in (0.3, 1.5, 4.0):
        alpha = rng.normal(size=3)
        Fs = [
            free_energy(
                mean_field(
                    E, alpha, beta, M, allowed=None, neighbourhood=8, origin=(0, 0), sweeps=s
                ),
                E,
                alpha,
                beta,
                M,
                8,
            )
            for s in range(6)
        ]
        assert np.all(np.diff(Fs) >= -1e-9 * abs(Fs[0])), Fs
    # the emission M-step at fixed q (and alpha, beta) does not lower F
    sp = SpatialParams(params, np.zeros(3), 1.0)
    blk = SpatialBlock(X, (slice(None), slice(None)), (0, 0))
    stats = model.block_stats(sp, blk)
    new, _ = model.m_step(stats, sp)
    q = model.responsibilities(sp, blk)
    E2 = log_emission(new.gmm, X.reshape(-1, 3)).reshape(E.shape)
    assert free_energy(q, E2, sp.alpha, 1.0, M, 8) >= free_energy(q, E, sp.alpha, 1.0, M, 8)


def ref_mean_field(E, alpha, beta, M, nb, sweeps):
    """Whole-image colour sweeps with several components per class (membership M)."""
    H, W, K = E.shape
    lg = E + alpha
    q = np.exp(lg - logsumexp(lg, axis=-1, keepdims=True))
    yy, xx = np.indices((H, W))
    colours = (yy % 2) + 2 * (xx % 2) if nb == 8 else (yy + xx) % 2
    for _ in range(sweeps):
        for c in range(4 if nb == 8 else 2):
            s = colours == c
            lg2 = lg + beta * ref_neighbours(q @ M, nb) @ M.T
            q[s] = np.exp(lg2 - logsumexp(lg2, axis=-1, keepdims=True))[s]
    return q


@pytest.mark.parametrize("nb", [4, 8])
@pytest.mark.parametrize("beta", [0.7, 120.0])  # 120: the sweeps' log-sum-exp route
def test_mean_field_matches_reference_with_classes_of_several_components(nb, beta):
    rng = np.random.default_rng(11)
    E = rng.normal(scale=3.0, size=(23, 18, 5))
    alpha = rng.normal(size=5)
    M = np.eye(3)[[0, 2, 0, 1, 2]]  # components 0, 2 -> class 0; 3 -> 1; 1, 4 -> 2
    ref = ref_mean_field(E, alpha, beta, M, nb, 3)
    q = mean_field(E, alpha, beta, M, allowed=None, neighbourhood=nb, origin=(0, 0), sweeps=3)
    np.testing.assert_allclose(q, ref, atol=1e-12)
    # float32 emissions are swept in float32: the same iteration to float32 rounding, which
    # beta amplifies (the logits carry beta * N)
    q32 = mean_field(
        E.astype(np.float32), alpha, beta, M, allowed=None, neighbourhood=nb,
        origin=(0, 0), sweeps=3,
    )  # fmt: skip
    ref32 = ref_mean_field(E.astype(np.float32).astype(float), alpha, beta, M, nb, 3)
    np.testing.assert_allclose(q32, ref32, atol=2e-5 * max(1.0, beta))


@pytest.mark.parametrize("components_per_class", [1, 2])
def test_log_sum_exp_route_gives_the_same_statistics(monkeypatch, components_per_class):
    """Large beta * (number of neighbours) takes the per-pixel log-sum-exp route in the
    sweeps and the statistics; where both routes are safe they agree."""
    from daskem.model import spatial

    X, ds = _image(seed=8, shape=(29, 24))
    y = ds["labels"].values.astype(int)
    sg = SpatialGaussianMixtureClassifier(
        components_per_class=components_per_class, random_state=0, max_iter=2
    ).fit(X, y)
    params = sg._fitted_params()
    model = SpatialGMMModel(GMMModel("full", 1e-6), neighbourhood=8, sweeps=2, estimate_beta=True)
    blk = SpatialBlock(X, (slice(3, 25), slice(2, 20)), (0, 0))
    sp = SpatialParams(params.gmm, params.alpha, 4.0)
    fast = model.block_stats(sp, blk, labels=y)
    monkeypatch.setitem(spatial._EXP_LIMIT, np.dtype(np.float64), 0.0)
    slow = model.block_stats(sp, blk, labels=y)
    assert slow.energy == pytest.approx(fast.energy, rel=1e-12)
    np.testing.assert_allclose(slow.grad, fast.grad, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(slow.hess, fast.hess, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(slow.emission.mean, fast.emission.mean, rtol=1e-12)


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("nb", [4, 8])
def test_compiled_kernel_matches_the_numpy_kernel(monkeypatch, nb, dtype, cov):
    """2-D blocks run through the compiled loops (daskem.model._mf_kernels); the NumPy
    kernel (3-D blocks) gives the same q and statistics: classes of several components,
    labels, pixels of zero weight, missing attributes, both exp routes, emissions or not,
    an off-centre core; log-densities by the compiled residual form against the NumPy
    kernel's GEMM of quadratic features."""
    from daskem.model import spatial

    X, ds = _image(seed=8, shape=(29, 24))
    X = X.astype(dtype)
    X[3, 4, 1] = np.nan  # a partly observed pixel
    X[10, 10] = np.nan  # nothing observed
    y = ds["labels"].values.astype(int)
    sg = SpatialGaussianMixtureClassifier(
        components_per_class=2, covariance_type=cov, random_state=0, max_iter=2
    )
    params = sg.fit(X.astype(np.float64), y)._fitted_params()
    w = np.ones(X.shape[:2])
    w[5:9, 4:7] = 0.0
    w[20:, 15:] = 0.5
    blk = SpatialBlock(X, (slice(3, 25), slice(2, 20)), (5, 2))
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    for beta, emissions in ((0.7, True), (0.7, False), (12.0, False)):
        model = SpatialGMMModel(
            GMMModel(cov, 1e-6), neighbourhood=nb, sweeps=2, estimate_beta=True,
            fit_emissions=emissions,
        )  # fmt: skip
        sp = SpatialParams(params.gmm, params.alpha, beta)
        if beta > 10:  # the log-sum-exp route
            monkeypatch.setitem(spatial._EXP_LIMIT, np.dtype(dtype), 0.0)
        out = {}
        for compiled in (True, False):
            monkeypatch.setattr(spatial, "USE_COMPILED", compiled)
            stats = model.block_stats(sp, blk, sample_weight=w, labels=y)
            q = model.responsibilities(sp, blk, labels=y, active=w > 0)
            out[compiled] = stats, q
        (a, qa), (b, qb) = out[True], out[False]
        np.testing.assert_allclose(qa, qb, **tol)
        # one pixel without weight: the other parity sub-lattices are fully active
        w1 = np.ones(X.shape[:2])
        w1[9, 7] = 0.0
        q1 = {}
        for compiled in (True, False):
            monkeypatch.setattr(spatial, "USE_COMPILED", compiled)
            q1[compiled] = model.responsibilities(sp, blk, labels=y, active=w1 > 0)
        np.testing.assert_allclose(q1[True], q1[False], **tol)
        assert np.allclose(q1[True].sum(-1)[w1 > 0], 1.0, atol=1e-5)
        assert a.energy == pytest.approx(b.energy, rel=tol["rtol"])
        assert a.weight == b.weight
        np.testing.assert_allclose(a.grad, b.grad, **tol)
        np.testing.assert_allclose(a.hess, b.hess, **tol)
        np.testing.assert_allclose(a.emission.n, b.emission.n, **tol)
        np.testing.assert_allclose(a.emission.mean, b.emission.mean, **tol)
        assert (a.n_excluded, a.n_empty, a.n_partial) == (b.n_excluded, b.n_empty, b.n_partial)


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_compiled_log_densities(cov):
    """The compiled residual-form log-densities of a grid block equal scipy's, for every
    covariance type, a precision factor that is not triangular (rotated: the same
    precision), and pixels with missing attributes (marginal over the observed ones)."""
    from daskem.model.spatial import _compiled, _Lattice, grid_emission

    assert _compiled(_Lattice((4, 4), (0, 0), 8))
    X, _ = _image(seed=3, shape=(9, 7))
    X[2, 3, 0] = np.nan
    X[4, 4] = np.nan
    gm = daskem.GaussianMixture(3, covariance_type=cov, random_state=0, max_iter=3)
    rows = X.reshape(-1, 3)
    params = gm.fit(rows[np.isfinite(rows).all(1)])._fitted_params()
    offset = np.array([0.1, -0.2, 0.3])
    rot = [False, True] if cov in ("full", "tied") else [False]
    for rotate in rot:
        p = params
        if rotate:
            Qm = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
            p = dataclasses.replace(p, precisions_cholesky=p.precisions_cholesky @ Qm)
        out = grid_emission(p, offset)(X).reshape(3, 9, 7)
        for k in range(3):
            cov_k = gm.covariances_ if cov == "tied" else gm.covariances_[k]
            if cov == "diag":
                cov_k = np.diag(cov_k)
            elif cov == "spherical":
                cov_k = cov_k * np.eye(3)
            ref = multivariate_normal(gm.means_[k], cov_k).logpdf(np.nan_to_num(X)) + offset[k]
            ok = np.isfinite(X).all(-1)
            np.testing.assert_allclose(out[k][ok], ref[ok], rtol=1e-10)
            obs = [1, 2]
            marg = multivariate_normal(gm.means_[k][obs], cov_k[np.ix_(obs, obs)])
            ref23 = marg.logpdf(X[2, 3, obs])
            assert out[k, 2, 3] == pytest.approx(ref23 + offset[k], rel=1e-10)
            assert out[k, 4, 4] == pytest.approx(offset[k])


def test_numpy_kernel_when_numba_cannot_be_imported(monkeypatch):
    """Without importable compiled loops (numba missing, or too old for the NumPy) the
    fit warns once and runs the NumPy kernel, with the same result."""
    import sys

    from daskem.model import spatial

    X, _ = _image(seed=8, shape=(20, 18))
    kw = dict(spatial_beta=0.8, random_state=0, max_iter=2, tol=0)
    compiled = SpatialGaussianMixture(3, **kw).fit(X)
    monkeypatch.setattr(spatial, "_KERNELS", [])
    monkeypatch.setitem(sys.modules, "daskem.model._mf_kernels", None)
    with pytest.warns(RuntimeWarning, match="compiled loops are unavailable"):
        plain = SpatialGaussianMixture(3, **kw).fit(X)
    assert spatial._KERNELS == [None]
    np.testing.assert_allclose(plain.means_, compiled.means_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(plain.predict_proba(X), compiled.predict_proba(X), atol=1e-8)


def test_colouring_separates_neighbours():
    for nb in (4, 8):
        col = colour_map((9, 11), (3, 4), nb)
        for o in neighbour_offsets(2, nb):
            P = (col[..., None] == np.arange(col.max() + 1)).astype(float)
            N = neighbour_sum(P, [o])
            assert not np.any(N[np.arange(9)[:, None], np.arange(11)[None], col] > 0)
    col3 = colour_map((4, 5, 6), (1, 0, 2), 26)
    assert col3.max() == 7


def test_beta_zero_is_the_pixelwise_mixture():
    X, _ = _image(seed=4)
    w, mu, cov = _start(X)
    kw = dict(weights_init=w, means_init=mu, precisions_init=np.linalg.inv(cov), max_iter=20)
    sg = SpatialGaussianMixture(3, spatial_beta=0, tol=1e-6, **kw).fit(X)
    gm = GaussianMixture(3, nan_policy="marginalize", tol=1e-6, **kw).fit(X.reshape(-1, 3))
    assert sg.n_iter_ == gm.n_iter_
    np.testing.assert_allclose(sg.means_, gm.means_, rtol=1e-9)
    np.testing.assert_allclose(sg.covariances_, gm.covariances_, rtol=1e-8)
    np.testing.assert_allclose(sg.weights_, gm.weights_, rtol=1e-9)
    np.testing.assert_allclose(
        sg.predict_proba(X).reshape(-1, 3), gm.predict_proba(X.reshape(-1, 3)), atol=1e-9
    )


@pytest.mark.parametrize("beta", [1.2, "auto"])
def test_staged_fit_keeps_the_pixelwise_emissions(beta):
    """spatial_fit="staged": stage 1 is the beta=0 fit; stage 2 keeps its emissions,
    sets alpha to their weights' log and (for "auto") fits beta alone, stopping on its
    step; a fixed beta needs no second stage."""
    X, ds = _image(seed=4)
    X[5:9, 3:10, 1] = np.nan  # partly observed pixels: counted alike in both stages
    y = ds["labels"].values.astype(int)
    kw = dict(random_state=0, tol=1e-3, max_iter=50)
    pw = SpatialGaussianMixtureClassifier(spatial_beta=0.0, **kw).fit(X, y)
    st = SpatialGaussianMixtureClassifier(spatial_beta=beta, **kw).fit(X, y)
    np.testing.assert_array_equal(st.means_, pw.means_)
    np.testing.assert_array_equal(st.covariances_, pw.covariances_)
    np.testing.assert_array_equal(st.weights_, pw.weights_)
    lw = np.log(pw.weights_)
    np.testing.assert_allclose(st.spatial_alpha_, lw - lw.mean(), rtol=1e-12)
    assert (st.n_partial_, st.n_excluded_) == (pw.n_partial_, pw.n_excluded_)
    assert pw.n_partial_ >= 28
    if beta == "auto":
        assert st.n_iter_ > pw.n_iter_ and st.converged_
        assert 0.2 < st.spatial_beta_ < 3.0
        # the last step of beta was below tol (the stage's stopping rule)
        seen = []
        SpatialGaussianMixtureClassifier(spatial_beta=beta, **kw).fit(
            X, y, callback=lambda info: seen.append(float(info.params.beta))
        )
        assert abs(seen[-1] - seen[-2]) < 1e-3 and seen[-1] == st.spatial_beta_
    else:
        assert st.n_iter_ == pw.n_iter_ and st.spatial_beta_ == beta
    # the posterior runs the sweeps at the fitted beta: it differs from the pixel-wise one
    assert (st.predict(X) != pw.predict(X)).any()


def test_prior_stage_starts_on_a_sample_of_windows(monkeypatch, caplog):
    """On a large image the staged fit's prior stage estimates beta on a random sample of
    windows first, then converges over every block from there: the fixed point on all
    the data (within tol), in fewer passes over it, and the same fit whatever the
    chunking (the windows are placed in pixels and each is one block)."""
    import logging

    from daskem import hmrf

    rng = np.random.default_rng(1)
    z = _potts((96, 96), 3, 0.8, 4, rng, sweeps=60)
    means = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    img = means[z] + rng.standard_normal((*z.shape, 2))
    X = da.from_array(img, chunks=(16, 16, 2))
    kw = dict(neighbourhood=4, random_state=0, tol=1e-4, max_iter=60)
    monkeypatch.setattr(hmrf, "SAMPLE_STAGE_PIXELS", 10**9)  # no sample stage
    whole = SpatialGaussianMixture(3, **kw).fit(X)
    monkeypatch.setattr(hmrf, "SAMPLE_STAGE_PIXELS", 1024)
    monkeypatch.setattr(hmrf, "SAMPLE_WINDOW_PIXELS", 256)  # 4 windows of 16 x 16
    with caplog.at_level(logging.INFO, logger="daskem"):
        sampled = SpatialGaussianMixture(3, **kw).fit(X)
    assert "on a sample of 4 windows (1024 of 9216 pixels)" in caplog.text
    # the windows were read once and kept for the sample's passes; read every pass
    # instead (and no frames kept), the fit is the same, bit for bit
    assert "of 4 windows in memory" in caplog.text
    from daskem import engine

    kept_fraction = engine.FRAME_MEMORY_FRACTION
    monkeypatch.setattr(engine, "FRAME_MEMORY_FRACTION", 0.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="daskem"):
        read = SpatialGaussianMixture(3, **kw).fit(X)
    assert "windows in memory" not in caplog.text
    assert read.spatial_beta_ == sampled.spatial_beta_
    np.testing.assert_array_equal(read.lower_bounds_, sampled.lower_bounds_)
    monkeypatch.setattr(engine, "FRAME_MEMORY_FRACTION", kept_fraction)
    assert whole.converged_ and sampled.converged_
    assert sampled.spatial_beta_ == pytest.approx(whole.spatial_beta_, abs=5e-3)
    assert sampled.n_iter_ < whole.n_iter_
    np.testing.assert_array_equal(sampled.means_, whole.means_)  # the pixel-wise stage
    agree = (sampled.predict(X) == whole.predict(X)).mean()
    assert agree > 0.999
    # other chunkings (windows across chunk borders, chunks below the halo): same fit
    fits = [sampled] + [
        SpatialGaussianMixture(3, **kw).fit(da.from_array(img, chunks=(*c, 2)))
        for c in [(96, 96), (20, 13)]
    ]
    _assert_same_fits(fits, img)


def test_sample_windows_spread_over_the_image_without_overlap(monkeypatch):
    from daskem import hmrf

    monkeypatch.setattr(hmrf, "SAMPLE_STAGE_PIXELS", 16 * 400)
    monkeypatch.setattr(hmrf, "SAMPLE_WINDOW_PIXELS", 400)
    for shape, side in [((200, 300), (20, 20)), ((10, 3000), (10, 40)), ((40, 50, 60), (8, 8, 7))]:
        wins = hmrf.sample_windows(shape, np.random.default_rng(0))
        assert wins == hmrf.sample_windows(shape, np.random.default_rng(0))  # reproducible
        assert len(wins) == 16
        cover = np.zeros(shape, dtype=int)
        for lo, hi in wins:
            assert tuple(b - a for a, b in zip(lo, hi, strict=True)) == side
            assert all(0 <= a and b <= n for a, b, n in zip(lo, hi, shape, strict=True))
            cover[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] += 1
        assert cover.max() == 1
    # no sample when it would hold more than a quarter of the pixels
    assert hmrf.sample_windows((100, 200), np.random.default_rng(0)) == []


# --------------------------------------------------------------------------- chunking


def _assert_same_fits(fits, X):
    """The fits (of one image in several chunkings) agree to 1e-10, and so do their
    posterior maps (computed in yet another chunking); returns the first's map."""
    ref = fits[0]
    proba = np.asarray(ref.predict_proba(X))
    for other in fits[1:]:
        np.testing.assert_allclose(other.means_, ref.means_, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(other.covariances_, ref.covariances_, rtol=1e-10)
        assert other.spatial_beta_ == pytest.approx(ref.spatial_beta_, rel=1e-10)
        p = other.predict_proba(da.from_array(X, chunks=(11, 9, 3))).compute()
        np.testing.assert_allclose(p, proba, atol=1e-10)
    return proba


def test_same_fit_and_posterior_for_any_chunking():
    X, ds = _image(shape=(33, 28))
    X[3:9, 5:12] = np.nan  # a hole: classes from the prior
    X[20:30, 10:20, 1] = np.nan  # a band missing over a patch
    y = ds["labels"].values.astype(int).copy()
    y[4, 6] = 0  # a label in the hole
    fits = []
    for chunks in [(33, 28), (16, 16), (7, 30), (5, 4)]:  # (5, 4): chunks below the halo
        img = da.from_array(X, chunks=(*chunks, 3))
        fits.append(
            SpatialGaussianMixtureClassifier(
                spatial_beta="auto", random_state=0, max_iter=5, tol=0, neighbourhood=8
            ).fit(img, da.from_array(y, chunks=chunks))
        )
    proba = _assert_same_fits(fits, X)
    # the hole gets classes from the prior
    assert np.isfinite(proba[3:9, 5:12]).all()


def test_float32_stack_is_chunking_invariant_and_close_to_float64():
    """float32 attributes: emissions in float64, sweeps in float32 element by element,
    sums in float64, so the fit does not depend on the chunking either."""
    X, ds = _image(shape=(33, 28))
    X[3:9, 5:12] = np.nan
    X[20:30, 10:20, 1] = np.nan
    X32 = X.astype(np.float32)
    y = ds["labels"].values.astype(int)
    kw = dict(spatial_beta="auto", random_state=0, max_iter=5, tol=0, neighbourhood=8)
    fits = [
        SpatialGaussianMixtureClassifier(components_per_class=2, **kw).fit(
            da.from_array(X32, chunks=(*chunks, 3)), da.from_array(y, chunks=chunks)
        )
        for chunks in [(33, 28), (7, 30), (5, 4)]
    ]
    ref = fits[0]
    proba = _assert_same_fits(fits, X32)
    f64 = SpatialGaussianMixtureClassifier(components_per_class=2, **kw).fit(
        X32.astype(np.float64), y
    )
    np.testing.assert_allclose(f64.means_, ref.means_, atol=1e-4)
    assert f64.spatial_beta_ == pytest.approx(ref.spatial_beta_, abs=1e-4)
    np.testing.assert_allclose(f64.predict_proba(X32.astype(np.float64)), proba, atol=1e-4)


def test_carried_q_prototype_is_chunking_invariant_and_ascends():
    """The prototype of q kept between iterations (one sweep each): the same iteration on
    halo blocks (halo of one sweep) as on the whole image, and at fixed alpha and beta F
    never decreases through the emission M-step and the sweeps."""
    from daskem.model.spatial import halo_depth, log_emission

    X, _ = _image(seed=6, shape=(31, 26))
    w, mu, cov = _start(X)
    gm = GaussianMixture(3, random_state=0, max_iter=2).fit(X.reshape(-1, 3))
    model = SpatialGMMModel(GMMModel("full", 1e-6), neighbourhood=8, sweeps=1)
    H, W, _ = X.shape
    h = halo_depth(2, 8, 1)
    alpha, beta = np.log(gm.weights_) - np.log(gm.weights_).mean(), 2.0
    M = np.eye(3)

    def run(chunks):
        gmm, q, out = gm._fitted_params(), None, []
        for _ in range(4):
            sp = SpatialParams(gmm, alpha, beta)
            total, q_new = None, np.empty((H, W, 3))
            for y0 in range(0, H, chunks[0]):
                for x0 in range(0, W, chunks[1]):
                    y1, x1 = min(H, y0 + chunks[0]), min(W, x0 + chunks[1])
                    e0, e1 = max(0, y0 - h), max(0, x0 - h)
                    ext = (slice(e0, min(H, y1 + h)), slice(e1, min(W, x1 + h)))
                    core = (slice(y0 - e0, y1 - e0), slice(x0 - e1, x1 - e1))
                    blk = SpatialBlock(X[ext], core, (e0, e1))
                    st, qc = model.block_stats_carried(sp, blk, None if q is None else q[ext])
                    q_new[y0:y1, x0:x1] = qc
                    total = st if total is None else total + st
            q = q_new
            F_before = free_energy(q, log_emission(gmm, X.reshape(-1, 3)).reshape(H, W, 3),
                                   alpha, beta, M, 8)  # fmt: skip
            gmm, _ = model.emission.m_step(total.emission, gmm)
            F_after = free_energy(q, log_emission(gmm, X.reshape(-1, 3)).reshape(H, W, 3),
                                  alpha, beta, M, 8)  # fmt: skip
            out.append((total.energy, gmm.means.copy(), q.copy(), F_before, F_after))
        return out

    whole, tiled = run((H, W)), run((7, 9))
    for (e_a, m_a, q_a, *_), (e_b, m_b, q_b, *_) in zip(whole, tiled, strict=True):
        assert e_b == pytest.approx(e_a, rel=1e-10)
        np.testing.assert_allclose(m_b, m_a, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(q_b, q_a, atol=1e-10)
    Fs = [F for *_, fb, fa in whole for F in (fb, fa)]
    assert np.all(np.diff(Fs) >= -1e-9 * abs(Fs[0])), Fs


def test_sample_weights_zero_patches_and_chunking():
    """Pixels of zero weight are not part of the field (q = 0, no neighbours); fractional
    weights scale their statistics; the fit does not depend on the chunking."""
    X, _ = _image(seed=9, shape=(30, 27))
    w = np.ones(X.shape[:2])
    w[5:12, 4:9] = 0.0
    w[20:, 15:] = 0.5
    fits = [
        SpatialGaussianMixture(3, spatial_beta="auto", random_state=0, max_iter=4, tol=0).fit(
            da.from_array(X, chunks=(*c, 3)), sample_weight=da.from_array(w, chunks=c)
        )
        for c in ((30, 27), (7, 9))
    ]
    np.testing.assert_allclose(fits[1].means_, fits[0].means_, rtol=1e-10, atol=1e-10)
    assert fits[1].spatial_beta_ == pytest.approx(fits[0].spatial_beta_, rel=1e-10)
    np.testing.assert_allclose(fits[1].lower_bounds_, fits[0].lower_bounds_, rtol=1e-10)
    assert np.all(np.isfinite(fits[0].lower_bounds_))
    # zero weight is not the same as weight one: the statistics see the weights
    unweighted = SpatialGaussianMixture(
        3, spatial_beta="auto", random_state=0, max_iter=4, tol=0
    ).fit(X)
    assert np.abs(unweighted.means_ - fits[0].means_).max() > 1e-6


# --------------------------------------------------------------------------- quality


def _accuracy(pred, truth, match):
    if not match:
        return float((pred == truth).mean())
    K = int(max(pred.max(), truth.max())) + 1
    C = np.zeros((K, K))
    np.add.at(C, (pred.ravel(), truth.ravel()), 1)
    r, c = linear_sum_assignment(-C)
    return C[r, c].sum() / C.sum()


@pytest.mark.parametrize("fit", ["staged", "joint"])
def test_prior_beats_pixelwise_on_synthetic_maps(fit):
    ds = make_stack((128, 128), n_classes=4, n_features=4, seed=3, separation=2.0, nan_fraction=0)
    X = np.stack([ds[f"attr_{k}"].values for k in range(4)], -1).astype(np.float64)
    t, y = ds["truth"].values, ds["labels"].values.astype(int)
    gm = daskem.GaussianMixtureClassifier(random_state=0).fit(X.reshape(-1, 4), y.ravel())
    sg = SpatialGaussianMixtureClassifier(random_state=0, spatial_fit=fit).fit(X, y)
    pw = gm.predict_proba(X.reshape(-1, 4)).reshape(*t.shape, 4)
    sp = sg.predict_proba(X)
    acc_pw, acc_sp = _accuracy(pw.argmax(-1), t, False), _accuracy(sp.argmax(-1), t, False)
    assert acc_sp > acc_pw + 0.1, (acc_pw, acc_sp)
    # isolated wrong pixels (at most 2 of 8 neighbours share their label) all but vanish,
    # and the few left are less confident than the pixel-wise map's
    iso = {}
    for name, P in (("pw", pw), ("sp", sp)):
        lab = P.argmax(-1)
        same = (neighbour_sum(np.eye(4)[lab], neighbour_offsets(2, 8)) * np.eye(4)[lab]).sum(-1)
        sel = (lab != t) & (same <= 2)
        iso[name] = (int(sel.sum()), float(P.max(-1)[sel].mean()) if sel.any() else 0.0)
    assert iso["sp"][0] < 0.05 * iso["pw"][0], iso
    if fit == "joint":  # the staged fit's few left keep about their pixel-wise confidence
        assert iso["sp"][1] < iso["pw"][1], iso
    # where the pixel-wise map is wrong in isolation, the map with the prior gives that
    # wrong label little probability (0.58 pixel-wise; 0.014 staged, 0.013 joint)
    lab = pw.argmax(-1)
    same = (neighbour_sum(np.eye(4)[lab], neighbour_offsets(2, 8)) * np.eye(4)[lab]).sum(-1)
    sel = (lab != t) & (same <= 2)
    p_pw = np.take_along_axis(pw, lab[..., None], -1)[..., 0][sel].mean()
    p_sp = np.take_along_axis(sp, lab[..., None], -1)[..., 0][sel].mean()
    assert p_pw > 0.5 and p_sp < 0.1, (p_pw, p_sp)
    # unsupervised too
    u_pw = GaussianMixture(4, random_state=0).fit(X.reshape(-1, 4)).predict(X.reshape(-1, 4))
    u_sp = SpatialGaussianMixture(4, random_state=0, spatial_fit=fit).fit(X).predict(X)
    assert _accuracy(u_sp, t, True) > _accuracy(u_pw.reshape(t.shape), t, True) + 0.1


def _potts(shape, K, beta, nb, rng, sweeps=200):
    """A Gibbs sample of the Potts field (colour sweeps)."""
    z = rng.integers(0, K, size=shape)
    col = colour_map(shape, (0, 0), nb)
    for _ in range(sweeps):
        for c in range(int(col.max()) + 1):
            s = col == c
            N = ref_neighbours(np.eye(K)[z], nb)[s]
            p = np.exp(beta * N - logsumexp(beta * N, axis=1, keepdims=True))
            z[s] = (p.cumsum(1) < rng.random(s.sum())[:, None]).sum(1)
    return z


@pytest.mark.parametrize(
    ("nb", "beta", "fit", "sep"),
    [
        (4, 0.4, "staged", 3.5),
        (4, 0.8, "staged", 3.5),
        (8, 0.3, "staged", 3.5),
        (4, 0.8, "joint", 3.5),
        # overlapping classes: the field drawn from q alone gave 0.60 and 0.24 here
        (4, 0.8, "staged", 2.0),
        (8, 0.3, "staged", 2.0),
    ],
)
def test_auto_beta_recovers_the_true_beta(nb, beta, fit, sep):
    """beta by pseudo-likelihood on the simulated field, on Gibbs samples of the Potts
    field of known beta (3 classes, 2 attributes ``sep`` standard deviations apart)."""
    rng = np.random.default_rng(0)
    z = _potts((120, 120), 3, beta, nb, rng)
    means = np.array([[0.0, 0.0], [sep, 0.0], [0.0, sep]])
    X = means[z] + rng.standard_normal((*z.shape, 2))
    sg = SpatialGaussianMixture(3, neighbourhood=nb, spatial_fit=fit, random_state=0, tol=1e-6)
    sg.fit(X)
    assert sg.spatial_beta_ == pytest.approx(beta, abs=0.06)


# --------------------------------------------------------------------------- API


def test_model_file_round_trip_and_summary():
    X, ds = _image()
    y = ds["labels"].values.astype(int)
    sg = SpatialGaussianMixtureClassifier(random_state=0, max_iter=5).fit(X, y)
    doc = model_to_dict(sg)
    assert doc["model"] == "hmrf"
    back = model_from_dict(doc)
    assert type(back) is SpatialGaussianMixtureClassifier
    assert back.spatial_beta_ == sg.spatial_beta_
    np.testing.assert_array_equal(back.predict_proba(X), sg.predict_proba(X))
    assert "spatial prior: beta" in sg._summary()[0]


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        ({"spatial_beta": -1.0}, (10, 10, 2), "spatial_beta"),
        ({"spatial_beta": "big"}, (10, 10, 2), "spatial_beta"),
        ({"neighbourhood": 6}, (10, 10, 2), "neighbourhood"),
        ({"neighbourhood": 8}, (4, 10, 10, 2), "neighbourhood"),
        ({"mean_field_sweeps": 0}, (10, 10, 2), "mean_field_sweeps"),
        ({"spatial_fit": "both"}, (10, 10, 2), "spatial_fit"),
        ({}, (100, 2), "spatial dims"),
    ],
)
def test_bad_input(kwargs, shape, match):
    X = np.random.default_rng(0).normal(size=shape)
    with pytest.raises(ValueError, match=match):
        SpatialGaussianMixture(2, **kwargs).fit(X)


# --------------------------------------------------------------------------- stacks, CLI


def test_fit_stack_posterior_and_cli(tmp_path):
    import xarray as xr
    from click.testing import CliRunner

    from daskem import cli
    from daskem.io import fit_stack, open_stack, posterior
    from daskem.synthetic import write_stack

    ds = make_stack((96, 80), n_classes=3, n_features=3, seed=7, separation=2.0)
    store = tmp_path / "s.zarr"
    write_stack(ds, store, chunks=32)
    stack = open_stack(store)
    gm = fit_stack(stack, labels="labels", spatial_beta="auto", neighbourhood=4, random_state=0)
    assert isinstance(gm, SpatialGaussianMixtureClassifier) and gm.neighbourhood == 4
    post = posterior(gm, stack, labels="labels").compute()
    truth = ds["truth"].values
    pixelwise = fit_stack(stack, labels="labels", random_state=0)
    post0 = posterior(pixelwise, stack).compute()
    assert (post.label.values == truth).mean() > (post0.label.values == truth).mean() + 0.1
    # pixels with nothing observed get their class from the prior (pixel-wise: -1)
    hole = np.isnan(ds["attr_0"].values) & np.isnan(ds["attr_1"].values)
    assert hole.any() and (post.label.values[hole] >= 0).all()
    assert np.isnan(post.log_likelihood.values[hole]).all()
    np.testing.assert_array_equal(
        post.from_prior.values,
        np.isnan(ds[["attr_0", "attr_1", "attr_2"]].to_array().values).all(0),
    )
    assert post.attrs["model_kind"] == "hmrf"

    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        r = invoke(
            "run",
            store,
            "--labels",
            "labels",
            "--spatial-beta",
            "1.5",
            "--spatial-fit",
            "joint",
            "--neighbourhood",
            "8",
            "--model",
            tmp_path / "m.json",
            "--out",
            tmp_path / "p.zarr",
            "--scheduler",
            address,
        )
        assert r.exit_code == 0, r.output
        assert "beta 1.5000" in r.output  # reported per iteration
        r = invoke("inspect", tmp_path / "m.json")
        assert "spatial prior: beta 1.5 (fixed), 8-neighbourhood" in r.output
        p = xr.open_zarr(tmp_path / "p.zarr")
        assert float((p.label.values == truth).mean()) > 0.9
        for bad, msg in (
            (["--spatial-beta", "-2"], "--spatial-beta -2"),
            (["--spatial-beta", "x"], "--spatial-beta x"),
            (["--neighbourhood", "26"], "neighbourhood"),
            (["--spatial-beta", "1", "--method", "other"], "--spatial-beta"),
            (["--spatial-fit", "both"], "--spatial-fit"),
            (["--spatial-fit", "joint", "--method", "hmm"], "--spatial-fit"),
        ):
            r = invoke(
                "fit",
                store,
                "--labels",
                "labels",
                *bad,
                "--model",
                tmp_path / "bad.json",
                "--scheduler",
                address,
            )
            assert r.exit_code == 2 and msg in r.output, r.output
            assert not (tmp_path / "bad.json").exists()


def test_volume_fit_is_chunking_invariant():
    """3-D volumes (6- and 26-neighbourhoods): the same fit for two chunkings."""
    rng = np.random.default_rng(3)
    z = (np.indices((12, 14, 16)).sum(0) // 9) % 2
    X = np.stack([z * 2.5, z * -1.5], -1) + rng.standard_normal((12, 14, 16, 2))
    for nb in (6, 26):
        fits = [
            SpatialGaussianMixture(
                2, neighbourhood=nb, mean_field_sweeps=1, random_state=0, max_iter=4, tol=0
            ).fit(da.from_array(X, chunks=(*c, 2)))
            for c in ((12, 14, 16), (5, 7, 9))
        ]
        np.testing.assert_allclose(fits[1].means_, fits[0].means_, rtol=1e-10, atol=1e-10)
        assert fits[1].spatial_beta_ == pytest.approx(fits[0].spatial_beta_, rel=1e-10)
        acc = (fits[0].predict(X) == z).mean()
        assert max(acc, 1 - acc) > 0.95


@pytest.mark.parametrize(("fit", "stop_at", "n_iter"), [("joint", 3, 6), ("staged", 3, 12)])
def test_checkpoint_resume_gives_the_uninterrupted_fit(tmp_path, fit, stop_at, n_iter):
    X, ds = _image(seed=5)
    y = ds["labels"].values.astype(int)
    kw = dict(spatial_beta="auto", spatial_fit=fit, random_state=0, max_iter=6, tol=0)
    full = SpatialGaussianMixtureClassifier(**kw).fit(X, y)

    class Stop(Exception):
        pass

    seen = []

    def stop_after_3(info):
        seen.append(float(info.params.beta))
        if info.iteration == stop_at and (fit == "joint" or len(seen) > 6):
            raise Stop  # the staged fit: in its second stage

    with pytest.raises(Stop):
        SpatialGaussianMixtureClassifier(**kw).fit(
            X, y, checkpoint_dir=tmp_path, callback=stop_after_3
        )
    resumed = SpatialGaussianMixtureClassifier(**kw).fit(X, y, checkpoint_dir=tmp_path, resume=True)
    assert resumed.n_iter_ == full.n_iter_ == n_iter
    np.testing.assert_allclose(resumed.means_, full.means_, rtol=1e-12)
    assert resumed.spatial_beta_ == pytest.approx(full.spatial_beta_, rel=1e-12)
    np.testing.assert_allclose(resumed.lower_bounds_, full.lower_bounds_, rtol=1e-12)


@pytest.mark.parametrize("policy", ["omit", "raise"])
def test_nan_policies_other_than_marginalize_are_refused(policy):
    """The mean-field E-step fits partly observed pixels through their observed
    attributes whatever the policy: "omit" and "raise" were silently the same fit."""
    X = np.random.default_rng(0).normal(size=(20, 15, 3))
    X[3:6, 4:8, 0] = np.nan
    with pytest.raises(ValueError, match=r"nan_policy must be one of \('marginalize',\)"):
        SpatialGaussianMixture(2, nan_policy=policy, spatial_beta=1.0).fit(X)


@pytest.mark.parametrize("fit", ["staged", "joint"])
def test_fit_warnings_name_the_callers_line(fit):
    X = np.random.default_rng(0).normal(size=(30, 30, 2))
    with pytest.warns(ConvergenceWarning) as record:
        SpatialGaussianMixture(2, max_iter=1, spatial_fit=fit).fit(X)
    assert {Path(w.filename).name for w in record} == {Path(__file__).name}


@pytest.mark.parametrize("compiled", [True, False])
def test_no_subnormal_probabilities_on_well_separated_classes(monkeypatch, compiled):
    """Class probabilities too small to matter are 0, not subnormal numbers (whose
    arithmetic is many times slower on x86): classes 13 sd apart, whose pixel-wise
    probabilities of the other class are ~1e-37 in float32 before the prior scales them
    down further."""
    from daskem.model import spatial

    monkeypatch.setattr(spatial, "USE_COMPILED", compiled)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, 40, 1)).astype(np.float32)
    img[:, 20:] += 13.0
    gm = SpatialGaussianMixture(
        2, spatial_beta=1.0, covariance_type="spherical", means_init=[[0.0], [13.0]],
        weights_init=[0.5, 0.5], precisions_init=[1.0, 1.0], max_iter=1, neighbourhood=8,
    ).fit(img)  # fmt: skip
    p = np.asarray(gm.predict_proba(img))
    floor = np.sqrt(np.finfo(np.float32).tiny)
    assert ((p == 0) | (p >= floor)).all(), p[(p > 0) & (p < floor)][:5]
    assert (p == 0).any() and (p.argmax(-1) == (np.arange(40) >= 20)[None, :]).all()


# --------------------------------------------------------------------------- start cache


def test_prior_stage_keeps_block_starts_between_passes(monkeypatch):
    """The staged fit's prior stage (emissions and alpha fixed) takes each block's
    pixel-wise start from the process's cache after its first pass: the same fit, bit
    for bit, as without the cache, and the cache is empty after the fit."""
    from daskem import hmrf
    from daskem.model import spatial

    X, _ = _image(seed=4, shape=(60, 70))
    y = np.full(X.shape[:2], -1)
    y[5, 5], y[50, 60] = 0, 1
    image = da.from_array(X.astype(np.float32), chunks=(25, 30, 3))  # 9 blocks
    seen = []

    def spy():
        seen.append((spatial._START_CACHE.hits, spatial._START_CACHE.misses))
        spatial.clear_start_cache()

    monkeypatch.setattr(hmrf, "clear_start_cache", spy)
    kw = dict(spatial_beta="auto", random_state=0, max_iter=5, tol=0.0)
    with dask.config.set(scheduler="threads"):
        cached = SpatialGaussianMixtureClassifier(3, **kw).fit(image, y)
        # tol 0: 5 passes in the prior stage; the first (at beta = 0, no sweeps) keeps the
        # starts, the 4 with the prior take them
        assert seen[0] == (9 * 4, 9), seen
        assert spatial._START_CACHE.nbytes == 0 and not spatial._START_CACHE.entries
        # starts that do not all fit in the budget are not kept at all
        monkeypatch.setattr(hmrf, "start_bytes", lambda *a: 2**62)
        SpatialGaussianMixtureClassifier(3, **kw).fit(image, y)
        assert seen[1] == (0, 0), seen
        monkeypatch.undo()
        monkeypatch.setattr(hmrf, "clear_start_cache", spy)
        monkeypatch.setattr(hmrf, "START_CACHE_FRACTION", 0.0)
        plain = SpatialGaussianMixtureClassifier(3, **kw).fit(image, y)
    assert seen[2] == (0, 0)  # no budget: the cache was never asked
    assert cached.spatial_beta_ == plain.spatial_beta_ and cached.spatial_beta_ > 0
    np.testing.assert_array_equal(cached.lower_bounds_, plain.lower_bounds_)
    np.testing.assert_array_equal(cached.means_, plain.means_)
    np.testing.assert_array_equal(cached.predict_proba(image), plain.predict_proba(image))


def test_start_cache_keeps_within_its_budget():
    """Entries stay within the budget: entries of other parameters go first, an entry
    that still does not fit is not kept (those kept stay); what is kept is shared (the
    arrays a field only reads), not copied."""
    from daskem.model.spatial import _StartCache

    cache = _StartCache()
    a = {"G": np.ones(100), "act": None}  # 800 bytes
    cache.put((b"p1", 0), a, budget=2000)
    assert cache.get((b"p1", 0))["G"] is a["G"] and cache.get((b"p1", 0))["act"] is None
    cache.put((b"p1", 1), {"G": np.ones(100)}, budget=2000)
    cache.put((b"p1", 2), {"G": np.ones(100)}, budget=2000)  # no room, same parameters
    assert set(cache.entries) == {(b"p1", 0), (b"p1", 1)} and cache.nbytes == 1600
    cache.put((b"p2", 0), {"G": np.ones(100)}, budget=2000)  # the other parameters go
    assert set(cache.entries) == {(b"p2", 0)} and cache.nbytes == 800
    cache.put((b"p2", 1), {"G": np.ones(300)}, budget=2000)  # too big even alone now
    assert set(cache.entries) == {(b"p2", 0)}
    assert cache.get((b"p3", 0)) is None
    assert (cache.hits, cache.misses) == (2, 1)
    cache.clear()
    assert cache.nbytes == 0 and not cache.entries


def _two_labels_fit(shape, groups: bool, **kw):
    """A float32 image, one labelled pixel of each of two classes, and a classifier
    fitted on it (class 0 of two components with ``groups``)."""
    X, _ = _image(seed=2, shape=shape)
    X = X.astype(np.float32)
    y = np.full(X.shape[:2], -1)
    y[3, 4], y[30, 40] = 0, 1
    est = SpatialGaussianMixtureClassifier(
        3 if groups else 2, components_per_class={0: 2} if groups else None,
        random_state=0, **kw,
    ).fit(X, y)  # fmt: skip
    return X, y, est


@pytest.mark.parametrize(
    ("beta", "groups", "weights"),
    [(0.8, False, False), (12.0, False, True), (0.8, True, True), (12.0, True, False)],
)
def test_kept_start_gives_the_computed_start(beta, groups, weights):
    """A block's start made from its kept ``G`` (:func:`_mf_kernels.start_from_g`) equals
    the one made from the logits, bit for bit: on both ``exp`` routes (``beta`` 12 with 8
    neighbours is the log route in float32), with classes of several components, labels
    and pixels of weight 0."""
    from daskem.model import spatial

    X, y, est = _two_labels_fit((36, 44), groups, spatial_beta=0.0)
    est._prior_stage = True
    model = est._model()
    params = est._fitted_params()
    params = SpatialParams(params.gmm, params.alpha, beta)
    block = SpatialBlock(X, (slice(3, 33), slice(2, 40)), (5, 7))
    w = np.ones(X.shape[:2])
    if weights:
        w[10:14, 20:30] = 0.0
    plain = model.block_stats(params, block, w, y)
    kept = dataclasses.replace(model, start_cache_bytes=2**30)
    spatial.clear_start_cache()
    try:
        runs = [kept.block_stats(params, block, w, y) for _ in range(3)]
        assert (spatial._START_CACHE.misses, spatial._START_CACHE.hits) == (1, 2)
    finally:
        spatial.clear_start_cache()
    for s in runs:
        assert s.energy == plain.energy and s.weight == plain.weight
        np.testing.assert_array_equal(s.grad, plain.grad)
        np.testing.assert_array_equal(s.hess, plain.hess)


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize(("fit_emissions", "beta0"), [(False, False), (True, False), (True, True)])
def test_no_unwritten_entry_of_the_compiled_arrays_is_read(
    monkeypatch, groups, fit_emissions, beta0
):
    """The compiled loops' arrays are allocated without zeroing (all but their borders
    and padding, :func:`spatial._zero_outside`): filled with NaN instead, every
    statistic and the posterior stay the same, bit for bit -- for sub-lattices of unequal
    sizes (odd block sides), classes of several components, labels, pixels of weight 0,
    ``beta`` estimated (the drawn and simulated fields) or 0 and given (neither, no
    sweeps), with and without a kept start."""
    pytest.importorskip("daskem.model._mf_kernels")
    from daskem.model import spatial

    X, y, est = _two_labels_fit((37, 45), groups, spatial_beta="auto", max_iter=3)
    if not fit_emissions:
        est._prior_stage = True
    model = dataclasses.replace(est._model(), start_cache_bytes=2**30)
    params = est._fitted_params()
    assert params.beta > 0
    if beta0:
        model = dataclasses.replace(model, estimate_beta=False)
        params = SpatialParams(params.gmm, params.alpha, 0.0)
    block = SpatialBlock(X, (slice(3, 34), slice(2, 43)), (5, 7))
    w = np.ones(X.shape[:2])
    w[10:14, 20:29] = 0.0

    def run():
        spatial.clear_start_cache()
        try:
            stats = [model.block_stats(params, block, w, y) for _ in range(2)]  # kept: 2nd
        finally:
            spatial.clear_start_cache()
        return stats, model.responsibilities(params, block, y)

    plain = run()
    monkeypatch.setattr(
        spatial, "_uninitialised", lambda shape, dtype: np.full(shape, np.nan, dtype=dtype)
    )
    filled = run()
    for a, b in zip(plain[0], filled[0], strict=True):
        assert a.energy == b.energy and a.weight == b.weight
        np.testing.assert_array_equal(a.grad, b.grad)
        np.testing.assert_array_equal(a.hess, b.hess)
        for name in ("n", "mean", "m2"):
            np.testing.assert_array_equal(getattr(a.emission, name), getattr(b.emission, name))
    np.testing.assert_array_equal(plain[1], filled[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_count_exp_table_equals_the_kernel_exp(dtype):
    """The drawn field's neighbour counts are whole numbers: their ``exp(beta n)`` looked
    up in a table equals the compiled kernel's ``exp`` of ``beta * n``, bit for bit."""
    mk = pytest.importorskip("daskem.model._mf_kernels")
    for beta in (0.0, 0.37, 1.0, 2.9756, 7.4):
        b = dtype(beta)
        tab = mk._count_exp_table(b, 8)
        E = (b * np.arange(9, dtype=dtype))[None, :].copy()
        mk._exp_rows(E, np.empty(E.shape, np.int32), 9)
        np.testing.assert_array_equal(tab, E[0])
        N = np.array([[0.0, 3.0, 8.0], [1.0, 2.0, 5.0]], dtype=dtype)
        out = np.empty_like(N)
        mk._count_exps(N, tab, 3, out)
        np.testing.assert_array_equal(out, tab[N.astype(int)])


@pytest.mark.parametrize("nb", [4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("log_route", "groups"), [(False, False), (True, False), (False, True)])
def test_banded_sweeps_equal_the_plain_loop(nb, dtype, log_route, groups):
    """The compiled sweeps run their stages (sweep, sub-lattice) in bands of rows, each
    a few rows behind the one before it (for the cache): every row sees the neighbours a
    plain loop over sweeps, sub-lattices and rows gives it, so the values are the same,
    bit for bit."""
    mk = pytest.importorskip("daskem.model._mf_kernels")
    from daskem.model.spatial import _Lattice, _stacked_arrays

    K, C = (4, 2) if groups else (3, 3)
    cc = np.array([0, 0, 1, 1] if groups else [0, 1, 2], dtype=np.int64)
    lat = _Lattice((37, 45), (3, 5), nb)
    st = _stacked_arrays(lat, K, C, not groups, dtype)
    rng = np.random.default_rng(nb)
    for j, (h, w) in enumerate(lat.counts):
        L = rng.normal(0.0, 3.0, (K, h, w))
        L -= L.max(axis=0)
        st["G"][j, :, :h, :w] = L if log_route else np.exp(L)
        p = rng.dirichlet(np.ones(C), (h, w))
        st["Q"][j, :, 1 : 1 + h, 1 : 1 + w] = np.moveaxis(p, -1, 0)
    q = st["q"] if groups else np.empty((0, 0, 0, 0), dtype=dtype)
    act = np.empty((0, 0, 0), dtype=dtype)
    width = st["G"].shape[-1]
    beta, sweeps = (9.0 if log_route else 1.3), 3

    def scratch():
        return (
            np.empty((K, width), dtype=dtype), np.empty((K, width), dtype=np.int32),
            np.empty((C, width), dtype=dtype), np.empty(width, dtype=dtype),
            np.empty(width, dtype=dtype),
        )  # fmt: skip

    runs = []
    for banded in (True, False):
        Q, lnS, qN, qq = st["Q"].copy(), st["lnS"].copy(), st["qN"].copy(), q.copy()
        if banded:
            mk.sweep_2d(
                Q, st["G"], act, lnS, qN, qq, cc, st["nbr"], st["counts"], beta, sweeps,
                log_route, *scratch(),
            )  # fmt: skip
        else:
            E, I, N, S, inv = scratch()  # noqa: E741
            for s in range(sweeps):
                for j, (h, w) in enumerate(lat.counts):
                    for r in range(h):
                        mk._sweep_row(
                            Q, st["G"], act, lnS, qN, qq, cc, st["nbr"], j, r, w,
                            Q.dtype.type(beta), s == sweeps - 1, log_route, E, I, N, S, inv,
                        )  # fmt: skip
        runs.append((Q, lnS, qN, qq))
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0], st["Q"])  # the sweeps changed q
    # the simulated field's colour sweep, by bands too
    Q = runs[0][0]
    starts = np.array(lat.starts, dtype=np.int64).reshape(-1, 2)
    origin = np.array([3, 5], dtype=np.int64)
    fields = []
    for banded in (True, False):
        Z = np.zeros_like(Q)
        mk.drawn_field_2d(Q, act, st["counts"], starts, origin, Z)
        if banded:
            mk.simulated_field_2d(
                Z, st["G"], act, cc, groups, st["nbr"], st["counts"], starts, origin, beta,
                log_route,
            )  # fmt: skip
        else:
            E, I, N, S, _ = scratch()  # noqa: E741
            u, cum, pick = np.empty(width, dtype), np.empty(width, dtype), np.empty(width, int)
            tab = mk._count_exp_table(Q.dtype.type(beta), st["nbr"].shape[1])
            for j, (h, w) in enumerate(lat.counts):
                for r in range(h):
                    mk._simulated_row(
                        Z, st["G"], act, cc, groups, st["nbr"], w, starts, origin, beta,
                        log_route, j, r, False, E, I, N, S, u, cum, pick, tab,
                    )  # fmt: skip
        fields.append(Z)
    np.testing.assert_array_equal(fields[0], fields[1])
