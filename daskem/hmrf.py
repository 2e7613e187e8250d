"""Estimators of the Gaussian mixture with a spatial (Potts) prior, on images.

:class:`SpatialGaussianMixture` (unsupervised) and
:class:`SpatialGaussianMixtureClassifier` (semi-supervised) are the Gaussian mixture
estimators with the hidden Markov random field prior of :mod:`daskem.model.spatial`:
their ``X`` is an image of shape ``(*spatial, n_features)`` (2 or 3 spatial dims, NumPy
or Dask), ``y`` and ``sample_weight`` have the spatial shape, and ``predict`` /
``predict_proba`` return maps. Everything else -- restarts, screening, prefit on a
sample (pixel-wise), checkpoints, model files -- is the mixture's.

This module builds no Dask graph itself (it calls :mod:`daskem.engine`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from . import engine
from .base import _store_params
from .estimator import GaussianMixture, GaussianMixtureClassifier, _take_classes
from .model.spatial import (
    SpatialBlock,
    SpatialGMMModel,
    SpatialParams,
    check_neighbourhood,
    clear_start_cache,
    halo_depth,
    start_bytes,
)
from .modelfile import register_estimator

__all__ = ["SpatialGaussianMixture", "SpatialGaussianMixtureClassifier"]

# pixels of a tile cut from an in-memory image (about 4 M: tiles of 2048 x 2048)
_TILE_PIXELS = 2**22

#: the staged fit's prior stage estimates ``beta`` on a random sample of windows of the
#: image first (this many pixels, in windows of :data:`SAMPLE_WINDOW_PIXELS`), then goes
#: on over every block from there, when the sample holds at most a quarter of the pixels
#: (:func:`sample_windows`)
SAMPLE_STAGE_PIXELS = 2**22
#: pixels of a window of the prior stage's sample (512 x 512 on a 2-D image)
SAMPLE_WINDOW_PIXELS = 2**18
#: each process running the prior stage's blocks keeps their pixel-wise starts between
#: passes in up to this fraction of its memory (:func:`engine.process_memory`; the
#: stage's passes differ in ``beta`` alone; ``daskem.model.spatial._StartCache``)
START_CACHE_FRACTION = 0.125

logger = logging.getLogger(__name__)


class _SampleDone(Exception):
    """Ends the sample's passes of the prior stage (see ``_sample_stage``)."""

    def __init__(self, params: SpatialParams, iteration: int):
        super().__init__()
        self.params, self.iteration = params, iteration


def sample_windows(shape: tuple[int, ...], rng: np.random.Generator) -> list[tuple]:
    """Windows ``(lo, hi)`` of an image of this spatial ``shape`` for the prior stage's
    sample: :data:`SAMPLE_STAGE_PIXELS` in windows of :data:`SAMPLE_WINDOW_PIXELS`.

    A window is a box of about equal sides (as long as the image allows, the other sides
    longer then). The image is cut into a grid of cells that hold a window each; the
    windows are in cells drawn at random, each at a random place in its cell, so they
    do not overlap and spread over the image. Empty when the sample would hold more
    than a quarter of the image's pixels (a pass over every block then costs at most
    four of the sample's).
    """
    total = math.prod(shape)
    n_win = -(-SAMPLE_STAGE_PIXELS // SAMPLE_WINDOW_PIXELS)
    side = [0] * len(shape)
    # the shortest dims first: each takes its share of the pixels the others leave
    left = SAMPLE_WINDOW_PIXELS
    order = np.argsort(shape, kind="stable")
    for j, d in enumerate(order):
        share = math.ceil(left ** (1.0 / (len(shape) - j)))
        side[d] = min(int(shape[d]), max(1, share))
        left = -(-left // side[d])
    window = math.prod(side)
    counts = [n // s for n, s in zip(shape, side, strict=True)]
    n_cells = math.prod(counts)
    if n_win * window * 4 > total or n_cells < n_win:
        return []
    cells = np.sort(rng.choice(n_cells, size=n_win, replace=False))
    out = []
    for c in cells:
        index = np.unravel_index(int(c), counts)
        lo = []
        for i, n, s, k in zip(index, shape, side, counts, strict=True):
            start, stop = (i * n) // k, ((i + 1) * n) // k  # the cell along this dim
            lo.append(start + int(rng.integers(0, stop - start - s + 1)))
        out.append((tuple(lo), tuple(a + s for a, s in zip(lo, side, strict=True))))
    return out


def _grid_posterior(state, core, origin, x, y=None):
    model, params, n_classes = state
    block = SpatialBlock(np.asarray(x), core, origin)
    return model.grid_posterior(params, block, None if y is None else np.asarray(y), n_classes)


class _SpatialMixin:
    """Image input, the spatial model and its parameters, on top of a mixture estimator."""

    kind = "hmrf"
    #: fit/predict take images (*spatial, n_features); io.fit_stack passes them so
    spatial_input = True
    #: the mean-field E-step fits every pixel through its observed attributes (a pixel
    #: with none takes its class from its neighbours): "omit" and "raise" are refused
    #: rather than silently fitted the same way
    nan_policies = ("marginalize",)

    # ------------------------------------------------------------------ options

    def _beta(self) -> float | None:
        """The fixed ``spatial_beta`` or None for ``"auto"`` (validated)."""
        b = self.spatial_beta
        if isinstance(b, str):
            if b != "auto":
                raise ValueError(f"spatial_beta must be a number >= 0 or 'auto', got {b!r}")
            return None
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not np.isfinite(b) or b < 0:
            raise ValueError(f"spatial_beta must be a number >= 0 or 'auto', got {b!r}")
        return float(b)

    def _staged(self) -> bool:
        """Whether the fit is staged (``spatial_fit="staged"``, validated)."""
        if self.spatial_fit not in ("staged", "joint"):
            raise ValueError(f"spatial_fit must be 'staged' or 'joint', got {self.spatial_fit!r}")
        return self.spatial_fit == "staged"

    def _check_spatial(self, ndim: int) -> None:
        self._beta()
        self._staged()
        check_neighbourhood(ndim, self.neighbourhood)
        s = self.mean_field_sweeps
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"mean_field_sweeps must be an integer >= 1, got {s!r}")

    def _depth(self, ndim: int) -> int:
        if self._beta() == 0.0:
            return 0
        return halo_depth(ndim, self.neighbourhood, self.mean_field_sweeps)

    # ------------------------------------------------------------------ images

    def _image(self, X: Any) -> da.Array:
        """``X`` as a Dask image ``(*spatial, D)`` with spatial chunks and one feature chunk."""
        if not isinstance(X, da.Array):
            X = np.asarray(X)
            if X.ndim < 3:
                raise ValueError(
                    f"{type(self).__name__} needs an image of shape (*spatial, n_features) "
                    f"with 2 or 3 spatial dims, got shape {X.shape}"
                )
            side = max(16, int(round(_TILE_PIXELS ** (1.0 / (X.ndim - 1)))))
            cs = self.chunk_size
            if isinstance(cs, numbers.Integral) and not isinstance(cs, bool):
                side = max(1, int(round(int(cs) ** (1.0 / (X.ndim - 1)))))
            X = da.from_array(X, chunks=(side,) * (X.ndim - 1) + (-1,))
        if X.ndim < 3:
            raise ValueError(
                f"{type(self).__name__} needs an image of shape (*spatial, n_features) with "
                f"2 or 3 spatial dims, got shape {X.shape}"
            )
        self._check_spatial(X.ndim - 1)
        if len(X.chunks[-1]) != 1:
            X = X.rechunk({X.ndim - 1: -1})
        return X

    def _map_like(self, a: Any, image: da.Array, name: str) -> da.Array | None:
        if a is None:
            return None
        spatial = image.shape[:-1]
        if not isinstance(a, da.Array):
            a = np.asarray(a)
        if tuple(a.shape) != tuple(spatial):
            raise ValueError(f"{name} must have the image's spatial shape {spatial}, got {a.shape}")
        if isinstance(a, da.Array):
            return a.rechunk(image.chunks[:-1])
        return da.from_array(a, chunks=image.chunks[:-1])

    def _image_layout(self, image: da.Array) -> engine.GridLayout:
        ndim = image.ndim - 1
        return engine.GridLayout(
            tuple(int(n) for n in image.shape[:-1]), image.chunks[:-1], self._depth(ndim)
        )

    def _prepare(self, X, sample_weight=None, y=None, *, for_fit):
        data = super()._prepare(X, sample_weight, y, for_fit=for_fit)
        layout = getattr(self, "_grid_layout", None)
        if for_fit and layout is not None:
            data = engine.ChunkedData(data.X, data.sample_weight, data.labels, layout)
        return data

    def _fit_image(self, X, y, sample_weight, kwargs) -> None:
        image = self._image(X)
        ndim = image.ndim - 1
        w = self._map_like(sample_weight, image, "sample_weight")
        rows = engine.grid_to_rows(image, ndim)
        w_rows = None if w is None else engine.grid_to_rows(w, ndim)
        y_rows = None if y is None else engine.grid_to_rows(y, ndim)
        beta = self._beta()
        if not self._staged() or beta == 0.0:
            self._fit_rows(image, rows, y_rows, w_rows, kwargs)
        else:
            self._fit_staged(image, rows, y_rows, w_rows, kwargs, beta)
        self.spatial_shape_ = tuple(int(n) for n in image.shape[:-1])

    def _fit_rows(self, image, rows, y_rows, w_rows, kwargs, frames: int = 2) -> None:
        """``_fit`` on the image's rows; ``frames``: calls between ``fit`` and here (so that
        the fit's warnings name the user's line)."""
        self._grid_layout, self._extra_frames = self._image_layout(image), frames
        try:
            self._fit(rows, y_rows, w_rows, **kwargs)
        finally:
            del self._grid_layout, self._extra_frames

    def _fit_staged(self, image, rows, y_rows, w_rows, kwargs, beta) -> None:
        """``spatial_fit="staged"``: the pixel-wise mixture, then the prior at its emissions.

        Stage 1 is the fit with ``spatial_beta=0`` (every option applies: restarts,
        prefit, labels). Stage 2 keeps its emissions and weights (``alpha`` their log)
        and, for ``"auto"``, estimates ``beta`` by mean-field EM on the pseudo-likelihood
        from there; a fixed ``beta`` needs no second stage. Checkpoints of the stages go
        to the sub-directories ``pixelwise`` and ``prior`` of ``checkpoint_dir``.
        """
        ckpt = kwargs.get("checkpoint_dir")
        saved = (self.spatial_beta, self.warm_start)
        try:
            self.spatial_beta = 0.0
            if self.warm_start and hasattr(self, "converged_"):  # from the emissions alone
                lw = np.log(self.weights_)
                self.spatial_alpha_, self.spatial_beta_ = lw - lw.mean(), 0.0
            sub = {**kwargs, "checkpoint_dir": None if ckpt is None else Path(ckpt) / "pixelwise"}
            self._fit_rows(image, rows, y_rows, w_rows, sub, frames=3)
            n_iter, converged = self.n_iter_, self.converged_
            if beta is not None:
                self.spatial_beta_ = beta
                return
            self.spatial_beta, self.warm_start = "auto", True
            self._prior_stage = True
            # its passes differ in beta alone: a process keeps the blocks' pixel-wise
            # starts when they all fit in its share of memory
            self._start_cache_budget = int(START_CACHE_FRACTION * engine.process_memory())
            layout = self._image_layout(image)
            ext = math.prod(sum(int(c) + 2 * int(layout.depth) for c in ch) for ch in layout.chunks)
            self._start_cache_bytes = self._start_budget_for(ext, image.dtype)
            sub = {**kwargs, "checkpoint_dir": None if ckpt is None else Path(ckpt) / "prior"}
            try:
                self._fit_rows(image, rows, y_rows, w_rows, sub, frames=3)
            finally:
                engine.run_on_workers(clear_start_cache)
            self.n_iter_ += n_iter
            self.converged_ = bool(self.converged_ and converged)
        finally:
            self.spatial_beta, self.warm_start = saved
            self.__dict__.pop("_prior_stage", None)
            self.__dict__.pop("_start_cache_bytes", None)
            self.__dict__.pop("_start_cache_budget", None)

    def _start_budget_for(self, pixels: int, dtype) -> int:
        """The prior stage's budget for kept starts (:data:`START_CACHE_FRACTION`) if the
        starts of blocks of ``pixels`` pixels in all (halos included) fit in it, else 0."""
        budget = int(getattr(self, "_start_cache_budget", 0))
        return budget if start_bytes(pixels, self.means_.shape[0], dtype) <= budget else 0

    def _sample_stage(self, model, data, starts, resumed):
        """The staged fit's prior stage with ``beta`` estimated: EM on a random sample of
        windows of the image first (:func:`sample_windows`), then the passes over every
        block go on from its ``beta``.

        Each pass of the stage takes one Newton step of the pseudo-likelihood on the
        field simulated at the previous ``beta``, so ``beta`` climbs to its fixed point
        in many small steps (14 passes on a 4 Mpx crop of a 300 Mpx stack, from 0.50 to
        2.99). ``beta`` is one number for the whole image and the sample's statistics
        are sums over the same kind of blocks (each window with its halo), so the
        sample's passes follow nearly the same path at a fraction of the cost. They stop
        by the stage's rule, or once ``beta``'s steps alternate in sign (its noise floor
        on the sample: the simulated field changes with ``beta``), at the mean of the
        last two; they are logged, not counted in ``n_iter_``. The passes over every
        block then converge from there by the stage's own rule, so the result is the
        fixed point on all the data, not the sample's. The windows are placed in pixels,
        whatever the chunking, and each is one block, so the whole fit stays
        independent of the chunking.
        """
        if not getattr(self, "_prior_stage", False) or data.layout is None:
            return starts
        shape = tuple(int(n) for n in data.layout.shape)
        rng = np.random.default_rng(
            self.random_state if isinstance(self.random_state, numbers.Integral) else None
        )
        windows = sample_windows(shape, rng)
        if not windows:
            return starts
        n_px = sum(math.prod(b - a for a, b in zip(lo, hi, strict=True)) for lo, hi in windows)
        total = math.prod(shape)
        sub = data.window_subset(windows)
        # the windows' starts are kept if they all fit (those of every block were not)
        depth = int(data.layout.depth)
        ext = sum(
            math.prod(b - a + 2 * depth for a, b in zip(lo, hi, strict=True)) for lo, hi in windows
        )
        budget = self._start_budget_for(ext, data.X.dtype)
        model = dataclasses.replace(model, start_cache_bytes=budget)
        out = dict(starts)
        for i, st in starts.items():
            if i in resumed:
                continue
            betas = [float(st.params.beta)]

            def on_pass(info, betas=betas):
                betas.append(float(info.params.beta))
                logger.debug(
                    "prior stage on the sample: pass %d, beta %.6g", info.iteration, betas[-1]
                )
                if len(betas) >= 3 and (betas[-1] - betas[-2]) * (betas[-2] - betas[-3]) < 0:
                    raise _SampleDone(info.params, info.iteration)

            try:
                res = engine.fit_em(
                    model,
                    sub,
                    st.params,
                    tol=float(self.tol),
                    max_iter=int(self.max_iter),
                    split_every=int(self.split_every),
                    callback=on_pass,
                )
                params, n, how = res.params, res.n_iter, "" if res.converged else " (not converged)"
            except _SampleDone as done:  # at the sample's noise floor: between the last two
                mid = 0.5 * (betas[-1] + betas[-2])
                params = SpatialParams(done.params.gmm, done.params.alpha, mid)
                n, how = done.iteration, " (its steps alternating in sign)"
            logger.info(
                "prior stage: beta %.4g -> %.4g on a sample of %d windows (%d of %d pixels) "
                "in %d passes%s, then passes over every block",
                betas[0], float(params.beta), len(windows), n_px, total, n, how,
            )  # fmt: skip
            out[i] = engine.Start(params, st.prev_lower_bound, st.iteration, st.history)
        engine.run_on_workers(clear_start_cache)  # the windows' starts: not the blocks'
        return out

    # ------------------------------------------------------------------ the model

    def _model(self) -> SpatialGMMModel:
        return SpatialGMMModel(
            super()._model(),
            neighbourhood=int(self.neighbourhood),
            sweeps=int(self.mean_field_sweeps),
            estimate_beta=self._beta() is None,
            fit_emissions=not getattr(self, "_prior_stage", False),
            start_cache_bytes=int(getattr(self, "_start_cache_bytes", 0)),
        )

    def _row_model(self):
        """The pixel-wise mixture: prefit on a sample (which has no neighbours)."""
        return super()._model()

    def _initial_params(self, data, seed: int, labelled=None, sample=None) -> SpatialParams:
        gmm = super()._initial_params(data, seed, labelled, sample)
        if isinstance(gmm, SpatialParams):
            return gmm
        alpha = np.log(gmm.weights) - np.log(gmm.weights).mean()
        beta = self._beta()
        return SpatialParams(gmm, alpha, 0.0 if beta is None else beta)

    def _set_params(self, params: SpatialParams) -> None:
        super()._set_params(params.gmm)
        self.spatial_alpha_ = np.asarray(params.alpha, dtype=np.float64)
        self.spatial_beta_ = float(params.beta)

    def _fitted_params(self, component_class=None) -> SpatialParams:
        gmm = super()._fitted_params(component_class)
        return SpatialParams(gmm, self.spatial_alpha_, self.spatial_beta_)

    def _fingerprint_extra(self) -> dict[str, Any]:
        return {
            **super()._fingerprint_extra(),
            "spatial_beta": self.spatial_beta,
            "neighbourhood": int(self.neighbourhood),
            "mean_field_sweeps": int(self.mean_field_sweeps),
            "spatial_fit": str(self.spatial_fit),
            "stage": "prior" if getattr(self, "_prior_stage", False) else "all",
        }

    def _summary(self) -> tuple[str, list[str]]:
        options, lines = super()._summary()
        how = "estimated" if self._beta() is None else "fixed"
        options += (
            f", spatial prior: beta {self.spatial_beta_:.4g} ({how}), "
            f"{self.neighbourhood}-neighbourhood, {self.mean_field_sweeps} mean-field sweeps, "
            f"{self.spatial_fit} fit"
        )
        return options, lines

    def _fitted_to_dict(self) -> dict[str, Any]:
        return {
            **super()._fitted_to_dict(),
            "spatial_alpha": self.spatial_alpha_.tolist(),
            "spatial_beta": float(self.spatial_beta_),
        }

    def _fitted_from_dict(self, fitted: dict[str, Any], K: int, D: int) -> None:
        super()._fitted_from_dict(fitted, K, D)
        alpha = np.asarray(fitted["spatial_alpha"], dtype=np.float64)
        if alpha.shape != (K,) or not np.all(np.isfinite(alpha)):
            raise ValueError(f"fitted spatial_alpha must be {K} finite numbers")
        beta = float(fitted["spatial_beta"])
        if not (np.isfinite(beta) and beta >= 0):
            raise ValueError(f"fitted spatial_beta must be a number >= 0, got {beta}")
        self.spatial_alpha_, self.spatial_beta_ = alpha, beta

    # ------------------------------------------------------------------ maps

    def posterior_map(self, X: Any, y: Any = None, n_classes: int | None = None) -> Any:
        """Class probabilities, entropy and log density of every pixel of an image.

        Returns ``(C + 2, *spatial)`` float64 (NumPy for NumPy input, else lazy Dask):
        planes ``0 .. C-1`` the mean-field class probabilities at the fitted parameters
        (``C`` = ``n_classes``, default the model's classes), ``C`` their entropy, ``C +
        1`` the pixel-wise ``log p(x_observed)``. Labelled pixels of ``y`` (class ids,
        -1 unlabelled) keep their class.
        """
        self._check_fitted()
        C = int(self.n_classes_ if n_classes is None else n_classes)
        state = (self._model(), self._fitted_params(), C)
        if not isinstance(X, da.Array):
            Xn = np.asarray(X)
            if Xn.ndim >= 3:
                self._check_spatial(Xn.ndim - 1)
                self._check_features(Xn.shape[-1])
                core = tuple(slice(0, n) for n in Xn.shape[:-1])
                yn = None if y is None else np.asarray(y)
                return _grid_posterior(state, core, (0,) * (Xn.ndim - 1), Xn, yn)
        image = self._image(X)
        self._check_features(image.shape[-1])
        yg = self._map_like(y, image, "y")
        return engine.map_grid(
            _grid_posterior, state, self._image_layout(image), image, yg, n_out=C + 2
        )

    def _check_features(self, D: int) -> None:
        if D != self.n_features_in_:
            raise ValueError(
                f"X has {D} features (last axis), but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )

    def _proba_map(self, X: Any, C: int) -> Any:
        post = self.posterior_map(X, n_classes=C)
        if isinstance(post, da.Array):
            return da.moveaxis(post[:C], 0, -1)
        return np.moveaxis(post[:C], 0, -1)


@register_estimator
class SpatialGaussianMixture(_SpatialMixin, GaussianMixture):
    """Gaussian mixture with a Potts prior between neighbouring pixels (hidden Markov
    random field), fitted on every pixel of an image by mean-field EM.

    The model, its E-step and M-step and their guarantees are described in
    :mod:`daskem.model.spatial`. Each EM pass maps the mean-field sweeps over the image's
    chunks, each extended by a halo of ``(mean_field_sweeps + 1) * n_colours + 1`` pixels,
    so the result does not depend on the chunking and no per-pixel state is kept.

    Parameters
    ----------
    n_components : int, default=1
    spatial_beta : float >= 0 or "auto", default="auto"
        Interaction strength of the prior between neighbouring pixels' classes. ``0``
        gives the pixel-wise Gaussian mixture; ``"auto"`` estimates it (pseudo-likelihood
        with a field drawn from the mean-field posterior, Celeux, Forbes & Peyrard
        2003), starting from 0.
    neighbourhood : int, default=8
        4 or 8 on 2-D images, 6 or 26 on 3-D volumes.
    mean_field_sweeps : int, default=3
        Colour sweeps of the mean-field E-step per iteration.
    spatial_fit : {"staged", "joint"}, default="staged"
        ``"staged"``: the pixel-wise mixture is fitted first (the fit with
        ``spatial_beta=0``); the prior is then fitted at its emissions, ``alpha`` the log
        of its weights and, for ``"auto"``, ``beta`` by mean-field EM on the
        pseudo-likelihood alone (stopping when its step is below ``tol``; ``max_iter``
        bounds each stage; on images of more than 16 M pixels, ``beta`` first on a
        random sample of windows, see :func:`sample_windows`). ``"joint"``: every parameter by
        mean-field EM, the emissions fitted to the smoothed class probabilities. On data
        drawn from the model the joint fit is the more accurate; on real scenes its
        emissions drift towards the smoothed classes (a class of small patches loses its
        pixels to its neighbours) and the staged fit gives the better map (README: "A
        spatial prior").

    The other parameters are :class:`~daskem.GaussianMixture`'s (``chunk_size``: pixels
    per tile of an in-memory image).

    Attributes
    ----------
    spatial_beta_ : float
        The fitted (or given) interaction strength.
    spatial_alpha_ : ndarray (n_components,)
        The prior's per-component field (centred).
    spatial_shape_ : tuple of int
        Spatial shape of the image fitted.

    The others are :class:`~daskem.GaussianMixture`'s; ``weights_`` are the
    components' shares of the map (mean responsibilities; of the pixel-wise fit for
    ``"staged"``), ``lower_bound_`` the objective of :mod:`daskem.model.spatial` per
    pixel (of the last stage), ``n_iter_`` the passes of both stages.
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        spatial_beta: float | str = "auto",
        neighbourhood: int = 8,
        mean_field_sweeps: int = 3,
        spatial_fit: str = "staged",
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        chunk_size: int | str = "auto",
        split_every: int = 16,
        init_sample_size: int = 100_000,
        nan_policy: str = "marginalize",
        prefit: bool | str = "auto",
        cache: bool | str = "auto",
        precision: str = "auto",
        select_after: int | None | str = "auto",
    ) -> None:
        _store_params(self, locals())

    def fit(
        self,
        X: Any,
        y: Any = None,
        sample_weight: Any = None,
        *,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
        feature_names: Any = None,
        class_names: Any = None,
    ) -> SpatialGaussianMixture:
        """Fit on an image ``X`` of shape ``(*spatial, n_features)``; ``y`` is ignored;
        ``sample_weight`` has the spatial shape. The rest as in
        :meth:`GaussianMixture.fit`."""
        kwargs = {"checkpoint_dir": checkpoint_dir, "resume": resume, "callback": callback}
        self._fit_image(X, None, sample_weight, kwargs)
        self._set_names(feature_names, class_names)
        return self

    def predict_proba(self, X: Any):
        """Mean-field posterior of each component, shape ``(*spatial, n_components)``."""
        return self._proba_map(X, self.n_classes_)

    def predict(self, X: Any):
        """Most probable component of each pixel, shape ``(*spatial,)``."""
        return self.predict_proba(X).argmax(axis=-1)

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None):
        return self.fit(X, y, sample_weight).predict(X)


@register_estimator
class SpatialGaussianMixtureClassifier(_SpatialMixin, GaussianMixtureClassifier):
    """Semi-supervised Gaussian mixture classifier with a spatial (Potts) prior, on images.

    :class:`~daskem.GaussianMixtureClassifier` with the prior of
    :class:`SpatialGaussianMixture`: ``y`` is a label map of the image's spatial shape
    (``-1`` unlabelled); labelled pixels keep their class and pass it to their
    neighbours through the prior.

    Parameters
    ----------
    spatial_beta, neighbourhood, mean_field_sweeps, spatial_fit
        As in :class:`SpatialGaussianMixture`.

    The others are :class:`~daskem.GaussianMixtureClassifier`'s.
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        spatial_beta: float | str = "auto",
        neighbourhood: int = 8,
        mean_field_sweeps: int = 3,
        spatial_fit: str = "staged",
        components_per_class: Any = None,
        label_weight: float = 1.0,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        chunk_size: int | str = "auto",
        split_every: int = 16,
        init_sample_size: int = 100_000,
        nan_policy: str = "marginalize",
        prefit: bool | str = "auto",
        cache: bool | str = "auto",
        precision: str = "auto",
        select_after: int | None | str = "auto",
    ) -> None:
        _store_params(self, locals())

    def fit(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        checkpoint_dir: Any = None,
        resume: bool = False,
        callback: Any = None,
        feature_names: Any = None,
        class_names: Any = None,
    ) -> SpatialGaussianMixtureClassifier:
        """Fit on an image ``X`` (*spatial, n_features) with a label map ``y`` (*spatial)
        (any labels, ``-1`` unlabelled; a Dask ``y`` must hold integers)."""
        self._check_classifier_options()
        if y is None:
            self._encode_y(None)  # raises the classifier's error
        if isinstance(y, da.Array):
            self._classes_from_data = True
        else:
            yn = np.asarray(y)
            self._classes_from_data = False
            y = self._encode_y(yn.reshape(-1)).reshape(yn.shape)
        kwargs = {"checkpoint_dir": checkpoint_dir, "resume": resume, "callback": callback}
        try:
            image = self._image(X)
            yg = self._map_like(y, image, "y")
            self._fit_image(image, yg, sample_weight, kwargs)
        finally:
            del self._classes_from_data
        self._set_names(feature_names, class_names)
        return self

    def predict_proba(self, X: Any):
        """Mean-field class probabilities, shape ``(*spatial, n_classes)``."""
        return self._proba_map(X, self.n_classes_)

    def predict(self, X: Any):
        """The most probable class of each pixel (a label of ``classes_``), ``(*spatial,)``."""
        idx = self.predict_proba(X).argmax(axis=-1)
        if isinstance(idx, da.Array):
            return idx.map_blocks(_take_classes, self.classes_, dtype=self.classes_.dtype)
        return self.classes_[idx]
