"""Mixing weights by pattern of observed attributes (``pattern_weights=True``).

Parity of the EM iterations with an independent dense reference is tested in
``tests/test_missing_reference.py``, the CLI in ``tests/test_cli.py``; here: the
estimator's options, model files, checkpoints, chunking, the stack path, and what the
option is for (a stack whose clouds fall on some classes more than others).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from daskem import GaussianMixture, GaussianMixtureClassifier
from daskem.io import fit_stack, open_stack
from daskem.modelfile import load_model, save_model
from daskem.synthetic import make_stack

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

NAMES = [f"attr_{k}" for k in range(4)]


@pytest.fixture(scope="module")
def cloudy():
    """A stack where clouds hide 1-3 of 4 attributes on ~30 % of the pixels."""
    ds = make_stack((96, 96), n_classes=3, n_features=4, clouds=0.3, seed=3)
    X = np.stack([ds[v].values.ravel() for v in NAMES], axis=1).astype(np.float64)
    return ds, X


def _gm(**kw):
    kw = {"nan_policy": "marginalize", "pattern_weights": True, "random_state": 0, **kw}
    return GaussianMixture(3, **kw)


def test_fitted_attributes_and_rows_of_unseen_patterns(cloudy):
    _, X = cloudy
    gm = _gm(max_iter=20, tol=0).fit(X)
    P = gm.patterns_.shape[0]
    assert gm.patterns_.dtype == bool and gm.patterns_.shape == (P, 4) and P > 2
    assert gm.pattern_weights_.shape == (P, 3)
    np.testing.assert_allclose(gm.pattern_weights_.sum(axis=1), 1.0)
    # the patterns with at least 10 rows per component have weights of their own
    obs = np.isfinite(X)
    keys, counts = np.unique(obs[obs.any(axis=1)], axis=0, return_counts=True)
    assert counts.min() < 30 <= counts.max()  # both kinds are there
    assert {p.tobytes() for p in gm.patterns_} == {k.tobytes() for k in keys[counts >= 30]}
    # a pattern not met in the fit takes weights_
    row = X[np.isfinite(X).all(axis=1)][:1].copy()
    assert any(p.all() for p in gm.patterns_)
    plain = GaussianMixture(3, covariance_type="full")
    for a in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        setattr(plain, a, getattr(gm, a))
    plain.n_features_in_, plain.component_classes_, plain.n_classes_ = 4, gm.component_classes_, 3
    plain.nan_policy = "marginalize"
    row[0, 1] = np.nan
    never = np.array([[True, False, True, True]])
    keep = ~(gm.patterns_ == never).all(axis=1)
    gm.patterns_, gm.pattern_weights_ = gm.patterns_[keep], gm.pattern_weights_[keep]
    np.testing.assert_allclose(gm.score_samples(row), plain.score_samples(row), rtol=1e-12)
    # the BIC counts K - 1 free weights per pattern
    assert gm._model().n_parameters(gm._fitted_params()) == (
        plain._model().n_parameters(plain._fitted_params()) + (len(gm.patterns_) - 1) * 2
    )


def test_model_file_round_trip_and_checkpoint_resume(cloudy, tmp_path):
    _, X = cloudy
    gm = _gm(max_iter=12, tol=0).fit(X)
    path = save_model(gm, tmp_path / "m.json")
    back = load_model(path)
    assert back.pattern_weights is True
    np.testing.assert_array_equal(back.patterns_, gm.patterns_)
    np.testing.assert_allclose(back.pattern_weights_, gm.pattern_weights_, rtol=0, atol=0)
    np.testing.assert_allclose(back.predict_proba(X), gm.predict_proba(X), rtol=0, atol=0)
    np.testing.assert_allclose(back.impute(X), gm.impute(X), rtol=0, atol=0)
    # a fit interrupted after 5 iterations and resumed ends where the whole fit does
    ck = tmp_path / "ckpt"

    def stop(info):
        if info.iteration == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _gm(max_iter=12, tol=0).fit(X, checkpoint_dir=ck, callback=stop)
    resumed = _gm(max_iter=12, tol=0).fit(X, checkpoint_dir=ck, resume=True)
    np.testing.assert_allclose(resumed.means_, gm.means_, rtol=1e-12)
    np.testing.assert_allclose(resumed.pattern_weights_, gm.pattern_weights_, rtol=1e-12)
    # a checkpoint of a fit with one set of weights does not resume with weights by pattern
    plain = tmp_path / "plain"
    with pytest.raises(KeyboardInterrupt):
        GaussianMixture(3, nan_policy="marginalize", max_iter=12, tol=0, random_state=0).fit(
            X, checkpoint_dir=plain, callback=stop
        )
    with pytest.raises(Exception, match="pattern_weights"):
        _gm(max_iter=12, tol=0).fit(X, checkpoint_dir=plain, resume=True)
    # nor the other way round
    with pytest.raises(Exception, match="pattern_weights: True -> None"):
        GaussianMixture(3, nan_policy="marginalize", max_iter=12, tol=0, random_state=0).fit(
            X, checkpoint_dir=ck, resume=True
        )


def test_chunking_invariance(cloudy):
    _, X = cloudy
    a = _gm(max_iter=8, tol=0).fit(X)
    b = _gm(max_iter=8, tol=0).fit(da.from_array(X, chunks=(1111, 4)))
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-10)
    np.testing.assert_allclose(b.pattern_weights_, a.pattern_weights_, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nan_policy": "omit"}, "pattern_weights=True needs nan_policy='marginalize'"),
        ({"nan_policy": "raise"}, "pattern_weights=True needs nan_policy='marginalize'"),
        ({"pattern_weights": "yes"}, "pattern_weights must be True or False"),
    ],
)
def test_bad_options(cloudy, kwargs, message):
    _, X = cloudy
    with pytest.raises(ValueError, match=message):
        _gm(**kwargs).fit(np.nan_to_num(X) if kwargs.get("nan_policy") == "raise" else X)


def test_classifier_refuses_label_prior(cloudy):
    ds, X = cloudy
    y = ds["labels"].values.ravel()
    with pytest.raises(
        ValueError, match="pattern_weights=True cannot be combined with label_prior"
    ):
        GaussianMixtureClassifier(
            nan_policy="marginalize", pattern_weights=True, label_prior="auto"
        ).fit(X, y)


def test_fit_stack_default(cloudy):
    """Stacks get weights by pattern unless the call says otherwise."""
    ds, _ = cloudy
    stack = open_stack(ds, variables=NAMES)
    gm = fit_stack(stack, 3, max_iter=5)
    assert gm.pattern_weights is True and gm.patterns_.shape[1] == 4
    for kw in ({"pattern_weights": False}, {"nan_policy": "omit"}):
        gm = fit_stack(stack, 3, max_iter=5, **kw)
        assert not gm.pattern_weights and not hasattr(gm, "patterns_")
    gm = fit_stack(stack, labels="labels", max_iter=3, label_prior=1.0)
    assert not gm.pattern_weights  # the label prior has no weights by pattern
    gm = fit_stack(stack, labels="labels", max_iter=3)
    assert gm.pattern_weights is True


def test_clouds_over_some_classes_pull_the_shared_weights_fit(cloudy):
    """The case the option is for: clouds over one class only. With one set of weights,
    a cloudy pixel whose observed attributes do not tell the classes apart is shared
    out by the global proportions; with weights by pattern it goes to the class under
    the clouds, and the other classes' means stay clean."""
    rng = np.random.default_rng(0)
    n = 30000
    means = np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [0.0, 2.5, 0.0]])
    z = rng.choice(3, size=n, p=[0.4, 0.3, 0.3])
    X = means[z] + rng.standard_normal((n, 3))
    X[:, 2] += 3.0 * (z == 0)  # attribute 2 separates class 0 from the others
    # clouds hide attribute 2 on 60 % of class 0 and on no other pixel
    hide = (z == 0) & (rng.random(n) < 0.6)
    Xm = X.copy()
    Xm[hide, 2] = np.nan
    true = np.array([X[z == k].mean(axis=0) for k in range(3)])
    err = {}
    for pw in (False, True):
        gm = GaussianMixture(
            3,
            nan_policy="marginalize",
            pattern_weights=pw,
            means_init=true,
            tol=1e-8,
            max_iter=1000,
        ).fit(Xm)
        err[pw] = np.sqrt(((gm.means_ - true) ** 2).sum(axis=1)).max()
    assert err[True] < 0.5 * err[False], err


def test_complete_data_give_the_plain_fit_bit_for_bit(cloudy):
    _, X = cloudy
    Xc = X[np.isfinite(X).all(axis=1)]
    a = _gm(max_iter=6, tol=0).fit(Xc)
    b = GaussianMixture(3, nan_policy="marginalize", random_state=0, max_iter=6, tol=0).fit(Xc)
    assert not hasattr(a, "patterns_")
    for attr in ("weights_", "means_", "covariances_", "lower_bounds_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
