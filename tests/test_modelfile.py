"""JSON model files and checkpoint/resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daskem import GaussianMixture
from daskem.modelfile import ModelFileError, load_checkpoint, load_model, save_model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(c, 1, (1500, 3)) for c in (0, 2.5, 5)])


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_model_round_trip_is_exact(tmp_path, data, ct):
    gm = GaussianMixture(3, covariance_type=ct, random_state=0).fit(data)
    path = save_model(
        gm, tmp_path / "m.json", feature_names=["a", "b", "c"], provenance={"input": "x.zarr"}
    )
    doc = json.loads(path.read_text())
    assert doc["schema"] == "daskem.model" and doc["schema_version"] == 2
    assert doc["model"] == "gmm" and doc["estimator"] == "GaussianMixture"
    assert doc["provenance"]["input"] == "x.zarr" and "daskem_version" in doc["provenance"]
    back = load_model(path)
    for a in ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bounds_"):
        np.testing.assert_array_equal(getattr(back, a), getattr(gm, a))
    np.testing.assert_array_equal(back.predict_proba(data), gm.predict_proba(data))
    assert list(back.feature_names_in_) == ["a", "b", "c"]
    assert back.n_iter_ == gm.n_iter_ and back.converged_ == gm.converged_
    assert not list(tmp_path.glob(".*tmp"))


def test_load_model_errors(tmp_path, data):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(bad)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelFileError, match="not a daskem model file"):
        load_model(bad)
    gm = GaussianMixture(3, random_state=0).fit(data)
    good = save_model(gm, tmp_path / "m.json")
    doc = json.loads(good.read_text())
    doc["schema_version"] = 99
    bad.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="schema_version 99"):
        load_model(bad)
    doc = json.loads(good.read_text())
    doc["fitted"]["means"] = doc["fitted"]["means"][:2]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="means has shape"):
        load_model(bad)
    doc = json.loads(good.read_text())
    del doc["fitted"]["weights"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="malformed"):
        load_model(bad)


class _Stop(Exception):
    pass


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kill_at", [(0, 2), (1, 1), (1, 4)])
def test_resume_gives_the_uninterrupted_result(tmp_path, data, kill_at):
    """Both restarts share each pass; stop after candidate c's iteration i, resume."""
    kwargs = dict(n_components=3, n_init=2, random_state=1, tol=1e-6, max_iter=30)
    ref = GaussianMixture(**kwargs).fit(data)

    def stop(info):
        if (info.candidate, info.iteration) == kill_at:
            raise _Stop

    with pytest.raises(_Stop):
        GaussianMixture(**kwargs).fit(data, checkpoint_dir=tmp_path, callback=stop)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["candidates"][kill_at[0]]["n_iter"] == kill_at[1]
    gm = GaussianMixture(**kwargs).fit(data, checkpoint_dir=tmp_path, resume=True)
    for a in ("weights_", "means_", "covariances_", "lower_bounds_"):
        np.testing.assert_array_equal(getattr(gm, a), getattr(ref, a))
    assert gm.n_iter_ == ref.n_iter_


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("when", ["selection", "survivor"])
def test_resume_after_restart_selection_gives_the_uninterrupted_result(tmp_path, data, when):
    """select_after=1: the stopped restarts stay stopped on resume."""
    kwargs = dict(n_components=3, n_init=3, random_state=1, tol=1e-6, max_iter=30)
    kwargs.update(select_after=1)
    seen = []
    ref = GaussianMixture(**kwargs).fit(data, callback=seen.append)
    survivor = next(i.candidate for i in seen if i.iteration == 1 and not i.stopped)
    assert sum(i.stopped for i in seen) == 2
    kill_at = (2, 1) if when == "selection" else (survivor, 3)

    def stop(info):
        if (info.candidate, info.iteration) == kill_at:
            raise _Stop

    with pytest.raises(_Stop):
        GaussianMixture(**kwargs).fit(data, checkpoint_dir=tmp_path, callback=stop)
    resumed = []
    gm = GaussianMixture(**kwargs).fit(
        data, checkpoint_dir=tmp_path, resume=True, callback=resumed.append
    )
    assert all(i.candidate == 0 for i in resumed)  # only the survivor runs on
    for a in ("weights_", "means_", "covariances_", "lower_bounds_"):
        np.testing.assert_array_equal(getattr(gm, a), getattr(ref, a))


def test_resume_refuses_a_checkpoint_of_another_fit(tmp_path, data):
    GaussianMixture(3, random_state=0, max_iter=3).fit(data, checkpoint_dir=tmp_path)
    with pytest.raises(ModelFileError, match="n_components: 3 -> 2"):
        GaussianMixture(2, random_state=0, max_iter=3).fit(
            data, checkpoint_dir=tmp_path, resume=True
        )
    with pytest.raises(ValueError, match="checkpoint_dir"):
        GaussianMixture(2).fit(data, resume=True)


DATA = Path(__file__).parent / "data"


def _v1_data():
    rng = np.random.default_rng(0)
    return np.concatenate(
        [rng.normal(0, 1, (100, 3)), rng.normal(4, 1, (100, 3)), rng.normal((0, 4, 0), 1, (100, 3))]
    )


def test_files_of_the_previous_version_load_and_predict_the_same():
    """``tests/data/model_v1_*.json`` were written by daskem at commit 8bdc9e0 (schema
    version 1, before model kinds); the expected predictions are what that version
    gave."""
    X = _v1_data()
    gm = load_model(DATA / "model_v1_mixture.json")
    assert type(gm).__name__ == "GaussianMixture" and gm.kind == "gmm"
    np.testing.assert_allclose(
        gm.predict_proba(X[:5]),
        [
            [1.073789106296905e-14, 5.138882075025916e-05, 0.9999486111792388],
            [2.3107403898188595e-16, 8.299324009308653e-06, 0.9999917006759902],
            [4.335947672497323e-12, 0.0030987926906345543, 0.9969012073050294],
            [6.508643499678428e-22, 1.2686115901754355e-05, 0.9999873138840987],
            [1.8680195874282457e-28, 0.00014780325719028215, 0.9998521967428099],
        ],
        rtol=1e-12,
    )
    clf = load_model(DATA / "model_v1_classifier.json")
    assert type(clf).__name__ == "GaussianMixtureClassifier"
    assert clf.classes_.tolist() == [3, 5, 7]
    assert clf.class_names_ == ["seven", "three", "five"]
    assert clf.predict(X[::50]).tolist() == [7, 7, 3, 3, 5, 5]
