"""GaussianHMM: hmmlearn parity, the EM guarantee, missing dates, invariance, files."""

from __future__ import annotations

import itertools
import warnings

import dask
import dask.array as da
import numpy as np
import pytest

from daskem import GaussianHMM
from daskem.model.hmm import HMMModel, HMMParams, forward_backward, log_emissions
from daskem.modelfile import load_model, save_model

K, D = 3, 2
START = np.array([0.5, 0.3, 0.2])
TRANS = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
MEANS = np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]])
COVARS = {
    "diag": np.ones((K, D)),
    "spherical": np.ones(K),
    "full": np.tile(np.eye(D), (K, 1, 1)),
    "tied": np.eye(D),
}


def _sequences(lengths, seed=0):
    """Concatenated sequences drawn from a sticky 3-state HMM."""
    rng = np.random.default_rng(seed)
    X = []
    for L in lengths:
        z = rng.choice(K, p=START)
        for _ in range(L):
            X.append(MEANS[z] + rng.normal(scale=0.8, size=D))
            z = rng.choice(K, p=TRANS[z])
    return np.asarray(X)


def _start(model, ct):
    model.startprob_ = START.copy()
    model.transmat_ = TRANS.copy()
    model.means_ = MEANS + 0.5  # EM has some way to go
    model.covars_ = COVARS[ct] * 2.0
    return model


@pytest.mark.parametrize("ct", ["diag", "spherical", "full", "tied"])
@pytest.mark.parametrize("priors", [False, True])
def test_parity_with_hmmlearn(ct, priors):
    hmm = pytest.importorskip("hmmlearn.hmm")
    lengths = [30, 50, 20, 40, 1]
    X = _sequences(lengths)
    kw = dict(n_components=K, covariance_type=ct, n_iter=25, tol=1e-9, init_params="")
    if priors:
        kw.update(
            startprob_prior=2.0,
            transmat_prior=1.5,
            means_prior=0.5,
            means_weight=3.0,
            covars_prior=0.5,
            covars_weight=4.0,
        )
    ref = _start(hmm.GaussianHMM(**kw), ct)
    ours = _start(GaussianHMM(**kw), ct)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.fit(X, lengths)
        ours.fit(X, lengths)
    np.testing.assert_allclose(ours.monitor_.history, ref.monitor_.history, rtol=1e-10, atol=1e-8)
    assert ours.monitor_.iter == ref.monitor_.iter
    for name in ("startprob_", "transmat_", "means_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), atol=1e-6)
    ref_cov = ref.covars_ if ct != "spherical" else ref._covars_[:, 0, None, None] * np.eye(D)
    np.testing.assert_allclose(ours.covars_, ref_cov, atol=1e-6)
    np.testing.assert_allclose(ours.score(X, lengths), ref.score(X, lengths), rtol=1e-10)
    lp, post = ours.score_samples(X, lengths)
    np.testing.assert_allclose(post, ref.score_samples(X, lengths)[1], atol=1e-8)
    for algorithm in ("viterbi", "map"):
        v_ours, s_ours = ours.decode(X, lengths, algorithm=algorithm)
        v_ref, s_ref = ref.decode(X, lengths, algorithm=algorithm)
        np.testing.assert_allclose(v_ours, v_ref, rtol=1e-10)
        np.testing.assert_array_equal(s_ours, s_ref)
    np.testing.assert_allclose(ours.bic(X, lengths), ref.bic(X, lengths), rtol=1e-10)
    np.testing.assert_allclose(ours.aic(X, lengths), ref.aic(X, lengths), rtol=1e-10)


@pytest.mark.parametrize("ct", ["diag", "full"])
def test_log_likelihood_never_decreases(ct):
    X = _sequences([200] * 20, seed=1)
    # maximum likelihood (no covariance prior): EM cannot lower the likelihood
    m = GaussianHMM(
        n_components=4, covariance_type=ct, n_iter=40, tol=0, covars_prior=0, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X, [200] * 20)
    h = np.asarray(m.monitor_.history)
    assert len(h) == 40
    assert np.all(np.diff(h) >= -1e-8 * np.abs(h[1:]))


def _brute_force(params: HMMParams, x: np.ndarray):
    """``log p(x)`` and ``p(z_t | x)`` by enumerating every state path (tiny T)."""
    T = x.shape[0]
    logB = log_emissions(params, x[None])[:, 0]  # time-major (T, n, K)
    paths = list(itertools.product(range(params.n_components), repeat=T))
    logp = []
    for z in paths:
        lp = np.log(params.startprob[z[0]]) + logB[0, z[0]]
        for t in range(1, T):
            lp += np.log(params.transmat[z[t - 1], z[t]]) + logB[t, z[t]]
        logp.append(lp)
    logp = np.asarray(logp)
    total = np.logaddexp.reduce(logp)
    gamma = np.zeros((T, params.n_components))
    for z, lp in zip(paths, logp, strict=True):
        gamma[np.arange(T), z] += np.exp(lp - total)
    return total, gamma


def test_missing_dates_and_attributes_are_marginalised_exactly():
    cov = np.array([[[1.0, 0.5], [0.5, 2.0]], [[1.5, -0.3], [-0.3, 1.0]], [[0.7, 0.0], [0.0, 0.7]]])
    params = HMMParams(START, TRANS, MEANS, cov, "full")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, D)) * 2
    x[1] = np.nan  # a date with nothing observed
    x[3, 0] = np.nan  # a partly observed date
    total, gamma = _brute_force(params, x)
    g, ll, _ = forward_backward(params, log_emissions(params, x[None]))
    np.testing.assert_allclose(ll[0], total, rtol=1e-12)
    np.testing.assert_allclose(g[:, 0], gamma, atol=1e-12)
    # the marginal Gaussian: the partly observed date's term is N(x_1 | mu_1, S_11)
    lb = log_emissions(params, x[None])[:, 0]
    for k in range(K):
        s = cov[k, 1, 1]
        want = -0.5 * (np.log(2 * np.pi * s) + (x[3, 1] - MEANS[k, 1]) ** 2 / s)
        np.testing.assert_allclose(lb[3, k], want, rtol=1e-12)
    assert np.all(lb[1] == 0.0)


def test_missing_values_fit_and_em_guarantee():
    rng = np.random.default_rng(5)
    X = _sequences([24] * 300, seed=5).reshape(300, 24, D)
    X[rng.random((300, 24)) < 0.2] = np.nan  # cloudy dates
    X[..., 1][rng.random((300, 24)) < 0.1] = np.nan  # one band missing
    X[:3] = np.nan  # sequences with nothing observed are left out
    m = GaussianHMM(
        n_components=3, covariance_type="full", n_iter=30, tol=0, covars_prior=0, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X)
    h = np.asarray(m.monitor_.history)
    assert np.all(np.diff(h) >= -1e-8 * np.abs(h[1:]))
    assert m.n_empty_ == 3
    order = np.argsort(m.means_[:, 0])
    np.testing.assert_allclose(m.means_[order], MEANS[np.argsort(MEANS[:, 0])], atol=0.15)
    np.testing.assert_allclose(
        m.transmat_[np.ix_(order, order)],
        TRANS[np.ix_(np.argsort(MEANS[:, 0]), np.argsort(MEANS[:, 0]))],
        atol=0.05,
    )


def test_nan_policy_raise_refuses_missing_values():
    X = _sequences([10, 10]).reshape(2, 10, D)
    X[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        GaussianHMM(n_components=2, nan_policy="raise").fit(X)


def test_chunk_and_scheduler_invariance():
    X = _sequences([16] * 600, seed=7).reshape(600, 16, D)
    X[np.random.default_rng(0).random((600, 16)) < 0.1] = np.nan
    kw = dict(n_components=3, covariance_type="full", n_iter=6, tol=0, random_state=1)
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits.append(GaussianHMM(**kw).fit(X))
        for chunks, scheduler in ((50, "sync"), (137, "threads"), (600, "threads")):
            with dask.config.set(scheduler=scheduler):
                fits.append(GaussianHMM(**kw).fit(da.from_array(X, chunks=(chunks, 16, D))))
    for f in fits[1:]:
        np.testing.assert_allclose(f.monitor_.history, fits[0].monitor_.history, rtol=1e-12)
        for name in ("startprob_", "transmat_", "means_", "covars_"):
            np.testing.assert_allclose(getattr(f, name), getattr(fits[0], name), atol=1e-9)


def test_start_from_the_data_recovers_the_states():
    X = _sequences([30] * 200, seed=2).reshape(200, 30, D)
    m = GaussianHMM(n_components=3, n_iter=50, random_state=0, n_init=2).fit(X)
    assert m.converged_
    order = np.argsort(m.means_[:, 0])
    np.testing.assert_allclose(m.means_[order], MEANS[np.argsort(MEANS[:, 0])], atol=0.15)
    assert np.all(np.diag(m.transmat_) > 0.5)
    path = m.predict(X.reshape(-1, D), [30] * 200)
    assert path.shape == (6000,)


def test_model_file_round_trip(tmp_path):
    X = _sequences([20] * 50, seed=4).reshape(50, 20, D)
    m = GaussianHMM(n_components=3, covariance_type="tied", n_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X)
    path = save_model(m, tmp_path / "hmm.json")
    assert "pickle" not in path.read_text()
    back = load_model(path)
    assert isinstance(back, GaussianHMM)
    for name in ("startprob_", "transmat_", "means_", "covars_"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    flat = X.reshape(-1, D)
    np.testing.assert_array_equal(back.predict(flat, [20] * 50), m.predict(flat, [20] * 50))
    assert back.score(X) == m.score(X)


def test_checkpoint_resume_is_exact(tmp_path):
    X = _sequences([20] * 100, seed=6).reshape(100, 20, D)
    kw = dict(n_components=3, covariance_type="diag", tol=0, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = GaussianHMM(n_iter=8, **kw).fit(X)
        GaussianHMM(n_iter=3, **kw).fit(X, checkpoint_dir=tmp_path)
        # the fingerprint includes n_iter: a longer run resumes only with the same one
        with pytest.raises(Exception, match="different fit"):
            GaussianHMM(n_iter=8, **kw).fit(X, checkpoint_dir=tmp_path, resume=True)
        ckpt = tmp_path / "b"
        calls = []

        def stop(info):
            calls.append(info.iteration)
            if info.iteration == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            GaussianHMM(n_iter=8, **kw).fit(X, checkpoint_dir=ckpt, callback=stop)
        resumed = GaussianHMM(n_iter=8, **kw).fit(X, checkpoint_dir=ckpt, resume=True)
    np.testing.assert_array_equal(resumed.monitor_.history, whole.monitor_.history)
    np.testing.assert_array_equal(resumed.means_, whole.means_)


@pytest.mark.parametrize(
    "X, lengths, match",
    [
        (np.zeros((10, 2)), [3, 3], "lengths sum to 6 but X has 10 samples"),
        (np.zeros((10, 2)), [5, 0, 5], "length must be >= 1"),
        (np.zeros((10, 2)), [2.5, 7.5], "integers"),
        (np.zeros((4, 5, 2)), [2, 2], "lengths is for 2-D input"),
        (np.zeros(10), None, "1-D array"),
    ],
)
def test_bad_input(X, lengths, match):
    with pytest.raises(ValueError, match=match):
        GaussianHMM(n_components=2).fit(X, lengths)


def test_parameters_left_out_of_init_params_must_be_set():
    X = _sequences([10, 10])
    with pytest.raises(ValueError, match="transmat_ must be set"):
        GaussianHMM(n_components=3, init_params="smc").fit(X, [10, 10])
    m = GaussianHMM(n_components=3, init_params="")
    _start(m, "diag")
    m.transmat_ = np.ones((3, 3))
    with pytest.raises(ValueError, match="rows summing to 1"):
        m.fit(X, [10, 10])


def test_sample_and_params_mask():
    m = GaussianHMM(n_components=3, init_params="", params="mc", n_iter=3)
    _start(m, "diag")
    X, Z = m.sample(500, random_state=0)
    assert X.shape == (500, D) and Z.shape == (500,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(X)
    # startprob_ and transmat_ are not in params: they stay as they were
    np.testing.assert_array_equal(m.startprob_, START)
    np.testing.assert_array_equal(m.transmat_, TRANS)


def test_block_stats_merge_is_associative():
    X = _sequences([12] * 90, seed=8).reshape(90, 12 * D)
    model = HMMModel(12, D, "full")
    p = HMMParams(START, TRANS, MEANS, COVARS["full"], "full")
    whole = model.block_stats(p, X)
    parts = model.block_stats(p, X[:31]) + (
        model.block_stats(p, X[31:60]) + model.block_stats(p, X[60:])
    )
    np.testing.assert_allclose(parts.trans, whole.trans, rtol=1e-12)
    np.testing.assert_allclose(parts.emission.m2, whole.emission.m2, rtol=1e-10)
    assert parts.loglik == pytest.approx(whole.loglik, rel=1e-13)


def test_semi_supervised_states_keep_the_labels_meaning():
    from daskem.hmm import GaussianHMMClassifier

    X = _sequences([30] * 200, seed=9).reshape(200, 30, D)
    # the truth by nearest mean (classes well apart), a few labelled dates per class
    truth = np.argmin(((X[..., None, :] - MEANS) ** 2).sum(-1), axis=-1)
    y = np.full((200, 30), -1)
    rng = np.random.default_rng(0)
    for c in range(K):
        seq, t = np.nonzero(truth == c)
        pick = rng.choice(len(seq), size=3, replace=False)
        y[seq[pick], t[pick]] = c + 10  # any class labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = GaussianHMMClassifier(covariance_type="full", n_iter=50, random_state=0).fit(X, y)
    np.testing.assert_array_equal(m.classes_, [10, 11, 12])
    # state k is class k: no label switching, the means where the labels put them
    np.testing.assert_allclose(m.means_, MEANS, atol=0.2)
    pred = m.predict(X)
    assert pred.shape == (200, 30)
    assert np.mean(pred == truth + 10) > 0.97
    proba = m.predict_proba(X)
    np.testing.assert_allclose(proba.sum(-1), 1.0)
    # labelled dates are clamped: their class has probability 1 in the E-step
    model, params = m._model(), m._fitted_params()
    g, _ = model.posterior(params, X.reshape(200, -1), np.where(y >= 0, y - 10, -1))
    lab = y >= 0
    np.testing.assert_allclose(g[lab, (y[lab] - 10)], 1.0)


def test_semi_supervised_tabular_and_bad_labels():
    from daskem.hmm import GaussianHMMClassifier

    lengths = [40, 60]
    X = _sequences(lengths, seed=11)
    y = np.full(100, -1)
    y[[0, 50]] = [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = GaussianHMMClassifier(n_components=3, n_iter=5, random_state=0).fit(X, y, lengths)
    assert m.component_classes_.tolist() == [0, 1, 0]
    assert m.predict(X, lengths).shape == (100,)
    with pytest.raises(ValueError, match="one entry per sample"):
        GaussianHMMClassifier().fit(X, y[:90], lengths)
    with pytest.raises(ValueError, match="dates the sequences do not have"):
        GaussianHMMClassifier().fit(X.reshape(10, 10, D), np.full((10, 12), -1))
    with pytest.raises(ValueError, match="only one class"):
        GaussianHMMClassifier().fit(X.reshape(10, 10, D), np.where(np.arange(10) == 0, 1, -1))
