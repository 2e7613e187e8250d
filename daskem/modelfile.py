"""Versioned JSON model files and EM checkpoints (no pickle anywhere).

A model file holds everything needed to predict with a fitted estimator (one of
:data:`ESTIMATORS`, which estimator modules fill with :func:`register_estimator`):
the model kind, constructor parameters, fitted parameters, feature (variable) names,
class names, convergence history and provenance. The fields every EM estimator has are
written here; the model's own fitted parameters come from the estimator
(``_fitted_to_dict`` / ``_fitted_from_dict``), so a new model needs no change here.
This module imports no estimator.
Floats are written with ``repr`` precision, so a save/load round trip is exact.

Every write is atomic: the file is written beside the target under a temporary
name, flushed and fsync'ed, then renamed into place, so a reader (or a crash)
never sees a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, is_classifier

from ._version import __version__

#: The estimators a model file can hold, by the name written in its ``estimator`` field;
#: each estimator module registers its classes (:func:`register_estimator`), so this
#: module imports none of them (no import cycle).
ESTIMATORS: dict[str, type[BaseEstimator]] = {}


def register_estimator(cls: type[BaseEstimator]) -> type[BaseEstimator]:
    """Class decorator: model files may hold fitted ``cls`` instances, and
    :func:`daskem.io.fit_stack` / ``daskem fit --method`` fit them by their ``kind``."""
    ESTIMATORS[cls.__name__] = cls
    return cls


_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Import the modules named by entry points of group ``daskem.models`` (once).

    A package providing a model declares, e.g. in its ``pyproject.toml``::

        [project.entry-points."daskem.models"]
        poisson = "mypackage.poisson"

    and that module registers its estimators with :func:`register_estimator`.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="daskem.models"):
        ep.load()


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "ESTIMATORS",
    "ModelFileError",
    "atomic_write_text",
    "load_checkpoint",
    "load_model",
    "load_plugins",
    "register_estimator",
    "model_to_dict",
    "model_from_dict",
    "save_checkpoint",
    "save_model",
]

SCHEMA = "daskem.model"
SCHEMA_VERSION = 2
#: schema versions :func:`load_model` reads (1: daskem 0.x, Gaussian mixtures only)
READABLE_VERSIONS = (1, 2)
CHECKPOINT_SCHEMA = "daskem.checkpoint"
CHECKPOINT_VERSION = 1


class ModelFileError(ValueError):
    """A model or checkpoint file is missing, corrupt, or does not match."""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def params_to_dict(gm: BaseEstimator) -> dict[str, Any]:
    """Constructor parameters as JSON-able values (``random_state`` only if an int)."""
    out = {}
    for k, v in gm.get_params().items():
        if k == "random_state" and not (v is None or isinstance(v, (int, np.integer))):
            v = None
        out[k] = _jsonable(v)
    return out


def model_to_dict(
    gm: BaseEstimator,
    *,
    feature_names: list[str] | None = None,
    class_names: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document of a fitted model (schema version 2).

    Fields: ``model`` (the model kind, e.g. ``"gmm"``), ``estimator`` (its class),
    ``parameters`` (constructor arguments), ``features``, ``classes`` (names),
    ``fitted`` (what every EM estimator has -- convergence, history, counts, class
    layout -- and the model's own parameters from ``gm._fitted_to_dict()``) and
    ``provenance``.
    """
    gm._check_fitted()
    features = feature_names or getattr(gm, "feature_names_in_", None)
    classes = class_names or getattr(gm, "class_names_", None)
    D = int(gm.n_features_in_)
    n_classes = int(gm.n_classes_)
    prov = {
        "daskem_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    prov.update(provenance or {})
    fitted = {
        **gm._fitted_to_dict(),
        "component_classes": np.asarray(gm.component_classes_).tolist(),
        "converged": bool(gm.converged_),
        "n_iter": int(gm.n_iter_),
        "lower_bound": float(gm.lower_bound_),
        "lower_bounds": np.asarray(gm.lower_bounds_).tolist(),
        "reseeds": _jsonable(list(getattr(gm, "reseeds_", []))),
        "n_excluded": int(getattr(gm, "n_excluded_", 0)),
        "n_partial": int(getattr(gm, "n_partial_", 0)),
        "n_empty": int(getattr(gm, "n_empty_", 0)),
        "classes": _jsonable(gm.classes_) if hasattr(gm, "classes_") else None,
    }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": gm.kind,
        "estimator": type(gm).__name__,
        "parameters": params_to_dict(gm),
        "features": list(features) if features is not None else [f"x{i}" for i in range(D)],
        "classes": list(classes)
        if classes is not None
        else [f"class_{i}" for i in range(n_classes)],
        "fitted": _jsonable(fitted),
        "provenance": _jsonable(prov),
    }


def model_from_dict(doc: Any, source: str = "model") -> BaseEstimator:
    """A fitted estimator (:data:`ESTIMATORS`) from a JSON document, validated.

    Reads schema versions 1 (daskem 0.x: Gaussian mixtures only, no ``model`` field)
    and 2.
    """
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ModelFileError(f"{source}: not a daskem model file (missing schema {SCHEMA!r})")
    load_plugins()
    version = doc.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(
            f"{source}: schema_version {version!r} is not supported (this daskem reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-fit or convert the model"
        )
    try:
        params = dict(doc["parameters"])
        fitted = dict(doc["fitted"])
        features = [str(f) for f in doc["features"]]
        classes = [str(c) for c in doc["classes"]]
        name = doc.get("estimator", "GaussianMixture")
        kind = doc.get("model", "gmm")  # version 1: Gaussian mixtures only
        if name == "GaussianMixture" and "component_classes" in params:
            # files of daskem <= 0.x: semi-supervised fits were GaussianMixture too
            if params.pop("component_classes") is not None:
                name = "GaussianMixtureClassifier"
        if name not in ESTIMATORS or ESTIMATORS[name].kind != kind:
            known = ", ".join(f"{c.kind}/{n}" for n, c in ESTIMATORS.items())
            raise ModelFileError(
                f"{source}: model {kind!r} with estimator {name!r} is not one this daskem "
                f"reads ({known})"
            )
        gm = ESTIMATORS[name](**params)
        cc = np.asarray(fitted["component_classes"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(f"{source}: malformed model file ({type(e).__name__}: {e})") from e
    K, D = int(cc.shape[0]), len(features)
    try:
        gm._fitted_from_dict(fitted, K, D)
    except KeyError as e:
        raise ModelFileError(f"{source}: malformed model file (fitted {e} missing)") from e
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: {e}") from e
    if cc.ndim != 1 or cc.min() < 0 or len(classes) != int(cc.max()) + 1:
        raise ModelFileError(
            f"{source}: component_classes {cc.tolist()} do not match the {len(classes)} classes"
        )
    gm.converged_ = bool(fitted.get("converged", False))
    gm.n_iter_ = int(fitted.get("n_iter", 0))
    gm.lower_bound_ = float(fitted.get("lower_bound", float("nan")))
    gm.lower_bounds_ = np.asarray(fitted.get("lower_bounds", []), dtype=np.float64)
    gm.reseeds_ = list(fitted.get("reseeds", []))
    gm.n_excluded_ = int(fitted.get("n_excluded", 0))
    gm.n_partial_ = int(fitted.get("n_partial", 0))
    gm.n_empty_ = int(fitted.get("n_empty", 0))
    gm.n_features_in_ = D
    gm.component_classes_ = cc
    gm.n_classes_ = len(classes)
    gm._set_names(features, classes)
    if is_classifier(gm):
        saved = fitted.get("classes")
        gm.classes_ = np.asarray(saved if saved is not None else np.arange(len(classes)))
        if gm.classes_.shape != (len(classes),):
            raise ModelFileError(
                f"{source}: {len(gm.classes_)} class labels for {len(classes)} classes"
            )
    gm.provenance_ = dict(doc.get("provenance") or {})
    return gm


def save_model(gm: BaseEstimator, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write a fitted model as JSON, atomically. ``kwargs`` go to :func:`model_to_dict`."""
    doc = model_to_dict(gm, **kwargs)
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def load_model(path: str | os.PathLike) -> BaseEstimator:
    """Read and validate a model file written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from e
    return model_from_dict(doc, source=str(path))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write an EM checkpoint (``checkpoint.json`` in ``directory``)."""
    doc = {"schema": CHECKPOINT_SCHEMA, "schema_version": CHECKPOINT_VERSION, **_jsonable(state)}
    return atomic_write_text(Path(directory) / "checkpoint.json", json.dumps(doc) + "\n")


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None if there is none."""
    path = Path(directory) / "checkpoint.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: corrupt checkpoint ({e})") from e
    if doc.get("schema") != CHECKPOINT_SCHEMA or doc.get("schema_version") != CHECKPOINT_VERSION:
        raise ModelFileError(f"{path}: not a daskem checkpoint of schema {CHECKPOINT_VERSION}")
    return doc
