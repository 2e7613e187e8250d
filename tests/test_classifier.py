"""The semi-supervised mixture classifier and the scikit-learn contract of both estimators.

* the labelled start: class means, one common covariance, equal weights (exactly, with
  one component per class), and seeded further components that vary between restarts;
* ``label_weight`` = counting each labelled row that many times;
* ``components_per_class`` and the errors that name the option;
* scikit-learn: ``check_estimator``, a ``Pipeline`` and ``GridSearchCV``;
* real data (scikit-learn's bundled wine and iris measurements): a few labels per class
  give at least the accuracy of plain semi-supervised EM from the same kind of start.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.datasets import load_iris, load_wine
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_classifiers_classes, check_estimator

from daskem import GaussianMixture, GaussianMixtureClassifier
from daskem.model.init import labelled_start

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COV_TYPES = ["full", "tied", "diag", "spherical"]


def _blobs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    X = np.concatenate([rng.normal(size=(n, 2)) * [1.0, 0.5] + c for c in centres])
    truth = np.repeat(np.arange(3), n)
    y = np.full(len(X), -1)
    for c in range(3):
        y[c * n : c * n + 3] = c
    return X, y, truth


def _sample_covariance(X):
    Xc = X - X.mean(0)
    return Xc.T @ Xc / len(X)


# ----------------------------------------------------------------------------- the start


@pytest.mark.parametrize("cov", COV_TYPES)
def test_start_with_one_component_per_class_is_class_means_common_cov_equal_weights(cov):
    X, y, _ = _blobs()
    clf = GaussianMixtureClassifier(
        covariance_type=cov, max_iter=0, prefit=False, random_state=0, reg_covar=1e-6
    ).fit(X, y)
    for c in range(3):
        np.testing.assert_allclose(clf.means_[c], X[y == c].mean(0), rtol=1e-12)
    np.testing.assert_allclose(clf.weights_, np.full(3, 1 / 3), rtol=1e-12)
    # the pooled within-class covariance of the labels shrunk to the sample covariance
    # (the whole data here: init_sample_size > n) as a prior worth D + 1 = 3 rows
    lab = y >= 0
    resid = np.concatenate([X[y == c] - X[y == c].mean(0) for c in range(3)])
    nu = lab.sum() - 3
    W = resid.T @ resid / nu
    S = (nu * W + 3 * _sample_covariance(X)) / (nu + 3) + 1e-6 * np.eye(2)
    expected = {
        "full": np.repeat(S[None], 3, axis=0),
        "tied": S,
        "diag": np.repeat(np.diag(S)[None], 3, axis=0),
        "spherical": np.full(3, np.diag(S).mean()),
    }[cov]
    np.testing.assert_allclose(clf.covariances_, expected, rtol=1e-10)


def test_further_components_vary_between_restarts_and_class_centres_do_not():
    X, y, _ = _blobs()
    lab = y >= 0
    cc = np.array([0, 1, 2, 0, 1])
    starts = [
        labelled_start(X, None, X[lab], y[lab], cc, "full", 1e-6, np.random.default_rng(s))
        for s in range(4)
    ]
    for p in starts[1:]:
        np.testing.assert_array_equal(p.means[:3], starts[0].means[:3])
    extra = {tuple(np.round(p.means[3:].ravel(), 9)) for p in starts}
    assert len(extra) > 1
    # a class's further component is seeded among the rows nearest to that class
    for p in starts:
        for k, c in ((3, 0), (4, 1)):
            d = ((p.means[k] - p.means[:3]) ** 2).sum(1)
            assert np.argmin(d) == c


def test_restarts_keep_the_highest_semi_supervised_objective():
    X, y, _ = _blobs()
    kw = dict(components_per_class=2, random_state=3, select_after=None, tol=1e-6)
    one = GaussianMixtureClassifier(n_init=1, **kw).fit(X, y)
    many = GaussianMixtureClassifier(n_init=4, **kw).fit(X, y)
    assert many.lower_bound_ >= one.lower_bound_ - 1e-12
    # one component per class: every restart is the same start, so one is run
    fixed = GaussianMixtureClassifier(n_init=4, random_state=0, tol=1e-6).fit(X, y)
    np.testing.assert_allclose(
        fixed.means_, GaussianMixtureClassifier(random_state=0, tol=1e-6).fit(X, y).means_
    )


# ----------------------------------------------------------------------------- options


def test_label_weight_counts_a_labelled_row_that_many_times():
    X, y, _ = _blobs()
    lab = np.flatnonzero(y >= 0)
    init = dict(
        weights_init=np.full(3, 1 / 3),
        means_init=np.array([[0.5, 0.5], [3.5, 0.5], [0.5, 3.5]]),
        precisions_init=np.repeat(np.eye(2)[None], 3, axis=0),
        max_iter=5,
        tol=0,
    )
    weighted = GaussianMixtureClassifier(label_weight=3.0, **init).fit(X, y)
    Xr = np.concatenate([X, X[lab], X[lab]])
    yr = np.concatenate([y, y[lab], y[lab]])
    repeated = GaussianMixtureClassifier(**init).fit(Xr, yr)
    np.testing.assert_allclose(weighted.means_, repeated.means_, rtol=1e-10)
    np.testing.assert_allclose(weighted.covariances_, repeated.covariances_, rtol=1e-10)
    np.testing.assert_allclose(weighted.lower_bounds_, repeated.lower_bounds_, rtol=1e-10)
    plain = GaussianMixtureClassifier(**init).fit(X, y)
    assert not np.allclose(plain.means_, weighted.means_)


def _numpy_label_prior_em_step(X, y, start, log_prior):
    """One EM step with a per-row class prior, in NumPy: responsibilities proportional to
    ``w_k q(c_k | x) N(x | k)`` (labelled rows clamped), the standard M-step."""
    n, D = X.shape
    K = len(start.weights_)
    logp = np.empty((n, K))
    for k in range(K):
        L = np.linalg.cholesky(start.covariances_[k])
        z = np.linalg.solve(L, (X - start.means_[k]).T)
        logp[:, k] = (
            np.log(start.weights_[k])
            - 0.5 * (z**2).sum(0)
            - np.log(np.diag(L)).sum()
            - 0.5 * D * np.log(2 * np.pi)
        )
    logp += log_prior[:, start.component_classes_]
    lab = y >= 0
    logp[lab] = np.where(start.component_classes_ == y[lab, None], logp[lab], -np.inf)
    norm = logsumexp(logp, axis=1)
    resp = np.exp(logp - norm[:, None])
    nk = resp.sum(0)
    means = resp.T @ X / nk[:, None]
    covs = np.stack(
        [(resp[:, k, None] * (X - means[k])).T @ (X - means[k]) / nk[k] for k in range(K)]
    )
    return nk / n, means, covs + 1e-6 * np.eye(D), norm.mean()


@pytest.mark.parametrize("nan_policy", ["raise", "marginalize"])
def test_label_prior_em_step_matches_numpy(nan_policy):
    from daskem.model.init import label_prior

    X, y, _ = _blobs()
    kw = dict(label_prior=1.0, prefit=False, random_state=0, tol=0, nan_policy=nan_policy)
    start = GaussianMixtureClassifier(max_iter=0, **kw).fit(X, y)
    one = GaussianMixtureClassifier(max_iter=1, **kw).fit(X, y)
    lab = y >= 0
    prior = label_prior(X[lab], y[lab], None, 3, 1.0)
    assert one.label_prior_["temperature"] == 1.0
    assert one.label_prior_["shrinkage"] == prior.shrinkage
    weights, means, covs, objective = _numpy_label_prior_em_step(X, y, start, prior.log_prior(X))
    np.testing.assert_allclose(one.weights_, weights, rtol=1e-10)
    np.testing.assert_allclose(one.means_, means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(one.covariances_, covs, rtol=1e-9)
    np.testing.assert_allclose(one.lower_bound_, objective, rtol=1e-12)
    # without the prior the same step is a different one
    plain = GaussianMixtureClassifier(max_iter=1, **{**kw, "label_prior": 0.0}).fit(X, y)
    assert plain.label_prior_ == {"temperature": 0.0}
    assert not np.allclose(plain.means_, one.means_)


def test_label_prior_temperature_is_zero_for_labels_a_classifier_cannot_predict():
    """Labels that a classifier of the labels alone gets wrong when held out give the
    prior temperature 0: the fit is then plain semi-supervised EM."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 2))
    X[:4] = [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]
    y = np.full(len(X), -1)
    y[:4] = [0, 0, 1, 1]  # each held-out label is nearer the other class's labels
    auto = GaussianMixtureClassifier(label_prior="auto", random_state=0).fit(X, y)
    assert auto.label_prior_ == {"temperature": 0.0}
    plain = GaussianMixtureClassifier(label_prior=0.0, random_state=0).fit(X, y)
    np.testing.assert_array_equal(auto.means_, plain.means_)


def test_label_prior_fit_does_not_depend_on_chunks():
    X, y, _ = _blobs()
    ref = GaussianMixtureClassifier(label_prior="auto", random_state=0).fit(X, y)
    lazy = GaussianMixtureClassifier(label_prior="auto", random_state=0).fit(
        da.from_array(X, chunks=170), da.from_array(y, chunks=170)
    )
    assert lazy.label_prior_ == ref.label_prior_
    np.testing.assert_allclose(lazy.means_, ref.means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lazy.lower_bounds_, ref.lower_bounds_, rtol=1e-10)


def test_label_prior_auto_on_separable_labels():
    X, y, truth = _blobs()
    assert GaussianMixtureClassifier().label_prior == 0.0  # off by default
    clf = GaussianMixtureClassifier(label_prior="auto", random_state=0).fit(X, y)
    assert 0.0 < clf.label_prior_["temperature"] <= 1.0
    assert clf.label_prior_["shrinkage"] in (0.01, 0.03, 0.1, 0.3, 0.6, 1.0)
    assert np.mean(clf.predict(X) == truth) > 0.95


def test_components_per_class_layouts():
    X, y, _ = _blobs()
    ys = np.array(["-"] * len(y), dtype=object)
    ys[:] = -1
    names = np.array(["water", "forest", "urban"], dtype=object)
    ys[y >= 0] = names[y[y >= 0]]
    clf = GaussianMixtureClassifier(components_per_class={"urban": 3}, random_state=0)
    clf.fit(X, ys)
    assert list(clf.classes_) == ["forest", "urban", "water"]
    assert clf.component_classes_.tolist() == [0, 1, 2, 1, 1]
    assert set(clf.predict(X[:5])) <= set(names)
    two = GaussianMixtureClassifier(components_per_class=2, random_state=0).fit(X, y)
    assert two.component_classes_.tolist() == [0, 1, 2, 0, 1, 2]
    rest = GaussianMixtureClassifier(4, random_state=0).fit(X, y)
    assert rest.component_classes_.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(label_weight=0), "label_weight must be a number > 0"),
        (dict(label_weight=-1.0), "label_weight must be a number > 0"),
        (dict(components_per_class={7: 2}), "components_per_class names class 7"),
        (dict(components_per_class=0), "components_per_class must be an integer >= 1"),
        (dict(components_per_class={0: 0}), r"components_per_class\[0\] must be an integer"),
        (dict(n_components=4, components_per_class=2), "asks for 6 components but n_comp"),
        (dict(label_prior=-0.1), "label_prior must be 'auto' or a number in"),
        (dict(label_prior=1.5), "label_prior must be 'auto' or a number in"),
        (dict(label_prior="yes"), "label_prior must be 'auto' or a number in"),
        (dict(label_prior=True), "label_prior must be 'auto' or a number in"),
    ],
)
def test_bad_options_name_the_option(kw, message):
    X, y, _ = _blobs()
    with pytest.raises(ValueError, match=message):
        GaussianMixtureClassifier(**kw).fit(X, y)


def test_labels_are_required_and_of_two_classes():
    X, y, _ = _blobs()
    with pytest.raises(ValueError, match="use daskem.GaussianMixture"):
        GaussianMixtureClassifier().fit(X, np.full(len(X), -1))
    with pytest.raises(ValueError, match="only one class"):
        GaussianMixtureClassifier().fit(X, np.where(y == 0, 0, -1))
    with pytest.raises(ValueError, match="requires y"):
        GaussianMixtureClassifier().fit(X, None)


def test_dask_labels_of_any_integers_match_numpy():
    X, y, _ = _blobs()
    y7 = np.where(y >= 0, 10 * y + 7, -1)  # classes 7, 17, 27
    ref = GaussianMixtureClassifier(random_state=0).fit(X, y7)
    lazy = GaussianMixtureClassifier(random_state=0).fit(
        da.from_array(X, chunks=250), da.from_array(y7, chunks=250)
    )
    assert lazy.classes_.tolist() == [7, 17, 27] == ref.classes_.tolist()
    np.testing.assert_allclose(lazy.means_, ref.means_, rtol=1e-9)
    pred = lazy.predict(da.from_array(X, chunks=250))
    assert isinstance(pred, da.Array)
    np.testing.assert_array_equal(pred.compute(), ref.predict(X))
    np.testing.assert_allclose(lazy.predict_proba(X).sum(1), 1.0)


def test_fully_labelled_is_a_gaussian_discriminant_classifier():
    X, y = load_iris(return_X_y=True)
    clf = GaussianMixtureClassifier(reg_covar=0.0, random_state=0).fit(X, y)
    for c in range(3):
        np.testing.assert_allclose(clf.means_[c], X[y == c].mean(0), rtol=1e-10)
        np.testing.assert_allclose(clf.covariances_[c], np.cov(X[y == c].T, bias=True), rtol=1e-8)
    np.testing.assert_allclose(clf.weights_, np.bincount(y) / len(y), rtol=1e-12)
    assert clf.score(X, y) > 0.95


def test_gaussian_mixture_ignores_y():
    X, y, _ = _blobs()
    a = GaussianMixture(3, random_state=0).fit(X, y)
    b = GaussianMixture(3, random_state=0).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)


# ----------------------------------------------------------------------------- scikit-learn


def test_check_estimator_gaussian_mixture():
    results = check_estimator(GaussianMixture(), on_fail=None)
    failed = [r["check_name"] for r in results if r["status"] == "failed"]
    skipped = [r["check_name"] for r in results if r["status"] == "skipped"]
    assert failed == []
    # scikit-learn's own GaussianMixture skips the same one
    assert skipped == ["check_array_api_input"]


def test_check_estimator_classifier():
    reason = (
        "-1 marks unlabelled samples, so y in {-1, 1} is a one-class problem; scikit-learn "
        "exempts its semi-supervised classifiers from this case by name (run below as one)"
    )
    results = check_estimator(
        GaussianMixtureClassifier(),
        on_fail=None,
        expected_failed_checks={"check_classifiers_classes": reason},
    )
    bad = [r["check_name"] for r in results if r["status"] == "failed"]
    assert bad == []
    assert [r["check_name"] for r in results if r["status"] == "skipped"] == [
        "check_array_api_input"
    ]
    # the same check, as scikit-learn runs it for LabelSpreading / SelfTrainingClassifier
    check_classifiers_classes("SelfTrainingClassifier", GaussianMixtureClassifier())


def test_pipeline_and_grid_search():
    X, y = load_wine(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), GaussianMixture(3, random_state=0)).fit(X)
    assert np.isfinite(pipe.score(X))
    search = GridSearchCV(GaussianMixture(random_state=0), {"n_components": [1, 2, 3]}, cv=3)
    search.fit(X)
    assert search.best_params_["n_components"] in (1, 2, 3)
    clf = make_pipeline(
        StandardScaler(), GaussianMixtureClassifier(covariance_type="diag", random_state=0)
    )
    grid = GridSearchCV(
        clf,
        {"gaussianmixtureclassifier__components_per_class": [1, 2]},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="accuracy",
    ).fit(X, y)
    assert grid.best_score_ > 0.9


# ----------------------------------------------------------------------------- real data


def _plain_semi_supervised_em(X, y, n_classes, tol=1e-3, max_iter=100, reg=1e-6):
    """Independent reference: class means + sample covariance + equal weights, then EM
    with labelled rows clamped to their class (full covariances, NumPy only)."""
    n, D = X.shape
    lab = y >= 0
    means = np.stack([X[y == c].mean(0) for c in range(n_classes)])
    covs = np.repeat((np.cov(X.T, bias=True) + reg * np.eye(D))[None], n_classes, axis=0)
    weights = np.full(n_classes, 1.0 / n_classes)
    prev = -np.inf
    for _ in range(max_iter):
        logp = np.empty((n, n_classes))
        for k in range(n_classes):
            L = np.linalg.cholesky(covs[k])
            z = np.linalg.solve(L, (X - means[k]).T)
            logp[:, k] = (
                np.log(weights[k])
                - 0.5 * (z**2).sum(0)
                - np.log(np.diag(L)).sum()
                - 0.5 * D * np.log(2 * np.pi)
            )
        logp[lab] = np.where(np.arange(n_classes) == y[lab, None], logp[lab], -np.inf)
        norm = logsumexp(logp, axis=1)
        ll = norm.mean()
        resp = np.exp(logp - norm[:, None])
        nk = resp.sum(0)
        weights = nk / n
        means = resp.T @ X / nk[:, None]
        for k in range(n_classes):
            Xc = X - means[k]
            covs[k] = (resp[:, k, None] * Xc).T @ Xc / nk[k] + reg * np.eye(D)
        if ll - prev < tol:
            break
        prev = ll
    return np.argmax(logp, axis=1)


@pytest.mark.parametrize("loader", [load_wine, load_iris], ids=["wine", "iris"])
@pytest.mark.parametrize("per_class", [3, 10])
def test_real_data_at_least_plain_semi_supervised_em(loader, per_class):
    X, truth = loader(return_X_y=True)
    C = truth.max() + 1
    ours, ref = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = np.full(len(X), -1)
        for c in range(C):
            y[rng.choice(np.flatnonzero(truth == c), per_class, replace=False)] = c
        test = y < 0
        clf = GaussianMixtureClassifier(random_state=seed).fit(X, y)
        ours.append(np.mean(clf.predict(X[test]) == truth[test]))
        ref.append(np.mean(_plain_semi_supervised_em(X, y, C)[test] == truth[test]))
    assert np.mean(ours) >= np.mean(ref) - 0.01, (ours, ref)
    assert np.mean(ours) > 0.75


def test_components_per_class_helps_multi_modal_classes():
    """Classes made of two kinds of pixels each (``modes_per_class=2``): two components
    per class map them better than one (as ``daskem demo --modes-per-class 2`` shows)."""
    from daskem import io
    from daskem.synthetic import make_stack

    ds = make_stack((256, 256), modes_per_class=2, seed=1)
    stack = io.open_stack(ds)
    truth = ds.truth.values
    acc = {}
    for cpc in (1, 2):
        model = io.fit_stack(stack, labels="labels", components_per_class=cpc, random_state=0)
        assert len(model.weights_) == 4 * cpc
        label = io.posterior(model, stack)["label"].values
        acc[cpc] = np.mean((label == truth)[label >= 0])
    assert acc[2] > acc[1] + 0.05, acc


def test_modes_per_class_one_is_the_plain_generator():
    from daskem.synthetic import make_stack

    a = make_stack((64, 64), seed=3)
    b = make_stack((64, 64), seed=3, modes_per_class=1)
    np.testing.assert_array_equal(a.attr_0.values, b.attr_0.values)
    two = make_stack((64, 64), seed=3, modes_per_class=2)
    assert set(np.unique(two.truth.values)) == {0, 1, 2, 3}
    assert len(two.attrs["true_means"]) == 8


def test_classifier_model_file_round_trip(tmp_path):
    from daskem.modelfile import load_model, save_model

    X, y, _ = _blobs()
    ys = np.where(y >= 0, np.array(["water", "forest", "urban"], dtype=object)[y], -1)
    clf = GaussianMixtureClassifier(components_per_class=2, label_weight=2.0, random_state=0)
    clf.fit(X, ys)
    path = save_model(clf, tmp_path / "m.json", class_names=list(clf.classes_))
    back = load_model(path)
    assert type(back) is GaussianMixtureClassifier
    assert back.label_weight == 2.0 and back.components_per_class == 2
    assert list(back.classes_) == list(clf.classes_)
    np.testing.assert_array_equal(back.predict(X), clf.predict(X))
    np.testing.assert_array_equal(back.predict_proba(X), clf.predict_proba(X))


def test_checkpoint_of_a_classifier_resumes_only_the_same_fit(tmp_path):
    from daskem.modelfile import ModelFileError

    X, y, _ = _blobs()
    kw = dict(components_per_class=2, random_state=0, max_iter=6, tol=0)

    def stop_after_two(info):
        if info.iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GaussianMixtureClassifier(**kw).fit(X, y, checkpoint_dir=tmp_path, callback=stop_after_two)
    with pytest.raises(ModelFileError, match="label_weight"):
        GaussianMixtureClassifier(**kw, label_weight=2.0).fit(
            X, y, checkpoint_dir=tmp_path, resume=True
        )
    resumed = GaussianMixtureClassifier(**kw).fit(X, y, checkpoint_dir=tmp_path, resume=True)
    full = GaussianMixtureClassifier(**kw).fit(X, y)
    np.testing.assert_array_equal(resumed.means_, full.means_)
    np.testing.assert_array_equal(resumed.lower_bounds_, full.lower_bounds_)
