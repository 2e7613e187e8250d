"""The ``daskem`` command line: parses options, calls the library, reports.

Commands: ``fit``, ``predict``, ``run`` (fit then predict), ``demo``, ``inspect`` and
``plot``; ``daskem COMMAND --help`` for each. The work is done by :mod:`daskem.io`
(stacks, labels, fitting, posterior, atomic Zarr writes), :mod:`daskem.modelfile`
(model JSON), :mod:`daskem.plot` (quicklooks) and :mod:`daskem.cluster` (where it
runs: an embedded ``LocalCluster`` by default, or ``--scheduler`` /
``--scheduler-file``). This module holds no numerics and makes no ``Client`` itself.

Output: progress (one line per EM iteration, posterior-writing progress, the Dask
dashboard link) goes to stderr and is silenced by ``--quiet``; results (paths,
summaries) go to stdout. ``--log-json FILE`` writes one JSON object per EM iteration
and a final summary, one per line.

Exit codes: 0 success; 2 bad input or usage (the message names the problem and the
option or file); 130 interrupted (Ctrl-C; the cluster is shut down first); 1 any
other error, reported in one line (``--debug`` prints the traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .model.gaussian import COVARIANCE_TYPES

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: Exceptions that mean "the input is wrong" (bad path, store, variable, model file,
#: labels, option value, existing output): one line, exit code 2. ``ModelFileError``
#: is a ``ValueError``. ``KeyError`` is bad input only where the CLI reads user input
#: (see :func:`_reading`); anywhere else it is an unexpected error (exit code 1).
BAD_INPUT: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
)

PRECISIONS = ("auto", "single")


class BadInput(click.ClickException):
    """Bad input or usage: printed as ``Error: <message>``, exit code 2."""

    exit_code = EXIT_BAD_INPUT


def _message(e: BaseException) -> str:
    """One readable line for an exception (OSError without the ``[Errno n]`` noise)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {os.fspath(e.filename)}"
    if isinstance(e, KeyError) and e.args:
        return f"not found: {e.args[0]!r}"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n"))


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Report bad-input errors raised while reading ``what`` (an option or a file)."""
    try:
        yield
    except (*BAD_INPUT, KeyError) as e:
        raise BadInput(f"{what}: {_message(e)}") from e


# ----------------------------------------------------------------------------- reporting


class Reporter:
    """Progress on stderr (unless quiet), results on stdout, JSON lines to a log file."""

    def __init__(self, quiet: bool = False, log_json: str | None = None, command: str = ""):
        self.quiet = quiet
        self.log_path = log_json
        self.command = command
        self._log = None
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()

    def progress(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)

    def result(self, msg: str) -> None:
        click.echo(msg)

    def record(self, obj: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        with self._lock:
            if self._log is None:
                Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115
            self._log.write(json.dumps(_json_safe(obj), allow_nan=False) + "\n")
            self._log.flush()

    def iteration(self, info: Any) -> None:
        """Fit callback: one line and one JSON record per EM iteration."""
        change = "-" if not math.isfinite(info.change) else f"{info.change:+.3e}"
        beta = getattr(info.params, "beta", None)  # a spatial prior's interaction strength
        self.progress(
            f"iter {info.iteration:3d}  log-lik/px {info.lower_bound:12.6f}  "
            f"change {change:>10}  {info.seconds:6.2f} s/pass  "
            f"{info.samples_per_second:,.0f} px/s" + ("" if beta is None else f"  beta {beta:.4f}")
        )
        record = {
            "event": "iteration",
            "iteration": info.iteration,
            "lower_bound": info.lower_bound,
            "change": info.change,
            "seconds": info.seconds,
            "n_samples": info.n_samples,
            "samples_per_second": info.samples_per_second,
            "converged": info.converged,
        }
        if beta is not None:
            record["spatial_beta"] = float(beta)
        self.record(record)

    def summary(self, **fields: Any) -> None:
        self.record(
            {
                "event": "summary",
                "command": self.command,
                "seconds": time.perf_counter() - self.t0,
                **fields,
            }
        )

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _json_safe(v.item())
    return v


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


# ----------------------------------------------------------------------------- options


def _common_options(f: Callable) -> Callable:
    f = click.option(
        "--debug", is_flag=True, help="On an unexpected error, print the full traceback."
    )(f)
    f = click.option(
        "--log-json",
        type=click.Path(dir_okay=False),
        help="Write JSON lines to FILE: one object per EM iteration and a final summary.",
    )(f)
    f = click.option(
        "-q", "--quiet", is_flag=True, help="No progress output (results and errors only)."
    )(f)
    return f


def _cluster_options(f: Callable) -> Callable:
    opts = [
        click.option(
            "--scheduler",
            metavar="ADDRESS",
            help="Address of a running Dask scheduler (tcp://host:8786). Default: the "
            "Dask config 'scheduler-address' if set, else an embedded LocalCluster.",
        ),
        click.option(
            "--scheduler-file",
            type=click.Path(dir_okay=False),
            help="Scheduler file written by `dask scheduler --scheduler-file`.",
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=1),
            help="Embedded cluster: worker processes (default: one per core).",
        ),
        click.option(
            "--threads-per-worker",
            type=click.IntRange(min=1),
            help="Embedded cluster: threads per worker (default: cores / workers).",
        ),
        click.option(
            "--memory-limit",
            metavar="SIZE",
            help="Embedded cluster: memory limit per worker, e.g. 4GiB (default: auto).",
        ),
        click.option(
            "--worker-timeout",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="Give up (exit 1) when no Dask worker has been connected for this long "
            "during a pass (default: wait, saying so, until workers come back or Ctrl-C), "
            "or every worker has been paused at its memory limit this long (default 60 s).",
        ),
        click.option(
            "--tls-ca-file",
            type=click.Path(dir_okay=False),
            help="CA certificate (PEM) of a tls:// scheduler (or Dask's TLS config).",
        ),
        click.option(
            "--tls-cert",
            type=click.Path(dir_okay=False),
            help="Client certificate (PEM) for a tls:// scheduler.",
        ),
        click.option(
            "--tls-key",
            type=click.Path(dir_okay=False),
            help="Client private key (PEM) for a tls:// scheduler.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


class _Opt(click.Option):
    """An option that belongs to a section of ``--help`` (e.g. one model's options)."""

    def __init__(self, *args: Any, group: str = "", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.group = group


class _Command(click.Command):
    """``--help`` lists options by section: data, the fit of any method, each method's
    own options, where it runs, output."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {g: [] for g in (_DATA, _ANY, _GMM, _HMRF)}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                group = getattr(param, "group", "") or "Output, cluster and other options"
                sections.setdefault(group, []).append(record)
        for group, records in sections.items():
            if records:
                with formatter.section(group):
                    formatter.write_dl(records)


_DATA = "Data and labels"
_ANY = "Fit (any --method)"
_GMM = "Options of --method gmm (Gaussian mixtures)"
_HMRF = "Spatial prior (--method hmrf: a Gaussian mixture whose neighbouring pixels share classes)"
#: the options that belong to the Gaussian mixtures, by parameter name
_GMM_OPTIONS = ("components_per_class", "label_weight", "label_prior", "covariance", "precision")


def _fit_options(f: Callable) -> Callable:
    opts = [
        click.option(
            "--method",
            default="gmm",
            show_default=True,
            metavar="KIND",
            cls=_Opt,
            group=_ANY,
            help="The model: 'gmm' (Gaussian mixtures), or a kind a plugin registers "
            "(entry point group 'daskem.models').",
        ),
        click.option(
            "--param",
            "params",
            multiple=True,
            metavar="NAME=VALUE",
            cls=_Opt,
            group=_ANY,
            help="A constructor parameter of the method's estimator (repeatable; VALUE is "
            "read as JSON when it parses, else as a string), for options without a flag.",
        ),
        click.option(
            "--vars",
            "variables",
            metavar="A,B,C",
            cls=_Opt,
            group=_DATA,
            help="Attribute variables to use, comma-separated (default: every numeric "
            "variable of the stack but labels, masks and quality flags).",
        ),
        click.option(
            "--labels",
            metavar="VAR|FILE",
            cls=_Opt,
            group=_DATA,
            help="Training labels: a label-map variable of the stack (-1 = unlabelled), a "
            "vector file of points or polygons (.gpkg, .shp, .geojson; any CRS), or a CSV "
            "file with one column per spatial dim and 'class'. Makes the fit "
            "semi-supervised.",
        ),
        click.option(
            "--class-column",
            "class_column",
            metavar="NAME",
            cls=_Opt,
            group=_DATA,
            help="With --labels FILE.gpkg|.shp|.geojson: the column holding the classes "
            "(default: one named class, label, landcover ..., or the only one).",
        ),
        click.option(
            "--max-labels-per-class",
            "max_labels_per_class",
            type=click.IntRange(min=1),
            metavar="N",
            cls=_Opt,
            group=_DATA,
            help="With --labels: keep at most N labelled pixels of each class, drawn at "
            "random with --seed (e.g. from large polygons).",
        ),
        click.option(
            "--nodata",
            metavar="V|NAME=V,...",
            cls=_Opt,
            group=_DATA,
            help="Nodata value of every attribute (V) or per attribute (NAME=V,...); those "
            "values become missing. Overrides nodata/_FillValue attributes of the input.",
        ),
        click.option(
            "--mask",
            metavar="VAR|FILE.tif",
            cls=_Opt,
            group=_DATA,
            help="Valid-pixel mask: a variable of the stack or a GeoTIFF on its grid "
            "(nonzero = valid); masked pixels are missing.",
        ),
        click.option(
            "--time-dim",
            "time_dim",
            metavar="DIM",
            cls=_Opt,
            group=_DATA,
            help="A time stack: the dimension of the dates (e.g. time). Every pixel's dates "
            "are one sequence; needed by --method hmm (hidden Markov models).",
        ),
        click.option(
            "-k",
            "--n-components",
            "n_components",
            type=click.IntRange(min=1),
            metavar="K",
            cls=_Opt,
            group=_ANY,
            help="Number of mixture components (hidden states for --method hmm). Required "
            "without --labels; with --labels at least the number of classes (default: one "
            "per class, or what --components-per-class asks for).",
        ),
        click.option(
            "--components-per-class",
            "components_per_class",
            metavar="N|CLASS=N,...",
            cls=_Opt,
            group=_GMM,
            help="With --labels: components of every class (N), or of named classes "
            "(e.g. urban=3,forest=2; others get 1). For classes made of several kinds of "
            "pixels.",
        ),
        click.option(
            "--label-weight",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            cls=_Opt,
            group=_GMM,
            help="With --labels: how many unlabelled pixels a labelled pixel counts for in "
            "the fit (> 0).",
        ),
        click.option(
            "--pattern-weights/--no-pattern-weights",
            "pattern_weights",
            default=None,
            cls=_Opt,
            group=_GMM,
            help="Every pattern of observed attributes has class proportions of its own "
            "(default with --nan-policy marginalize, without --label-prior): gaps such as "
            "clouds fall on some classes more than others. --no-pattern-weights: one set "
            "of proportions. See the README.",
        ),
        click.option(
            "--label-prior",
            default="0",
            show_default=True,
            metavar="auto|T",
            cls=_Opt,
            group=_GMM,
            help="With --labels: weigh every pixel's classes by a classifier of the labels "
            "alone, its probabilities to the power T in [0, 1] (auto: T by leave-one-out on "
            "the labels; 0: plain semi-supervised EM). Can help with very few labels per "
            "class; see the README.",
        ),
        click.option(
            "--covariance",
            type=click.Choice(COVARIANCE_TYPES),
            default="full",
            show_default=True,
            cls=_Opt,
            group=_GMM,
            help="Covariance type of the components (of the states for --method hmm).",
        ),
        click.option(
            "--spatial-beta",
            "spatial_beta",
            metavar="auto|B",
            cls=_Opt,
            group=_HMRF,
            help="Strength of the prior that neighbouring pixels share a class: a number "
            ">= 0, or 'auto' to estimate it from the data. Selects --method hmrf (mean-field "
            "EM; the gmm options apply too).",
        ),
        click.option(
            "--spatial-fit",
            "spatial_fit",
            type=click.Choice(("staged", "joint")),
            default=None,
            cls=_Opt,
            group=_HMRF,
            help="staged (default): the pixel-wise mixture, then the prior at its emissions "
            "(beta estimated there for 'auto'); joint: every parameter by mean-field EM "
            "(emissions fitted to the smoothed classes).",
        ),
        click.option(
            "--neighbourhood",
            type=click.Choice(("4", "8", "6", "26")),
            default=None,
            cls=_Opt,
            group=_HMRF,
            help="Neighbours of a pixel: 4 or 8 on 2-D maps (default 8), 6 or 26 on 3-D volumes.",
        ),
        click.option(
            "--nan-policy",
            type=click.Choice(("marginalize", "omit")),
            default=None,
            cls=_Opt,
            group=_ANY,
            help="Pixels with some attributes missing: fit them through their observed "
            "attributes (EM with missing data; the default where the method can), or leave "
            "them out. Pixels with none observed are always left out.",
        ),
        click.option(
            "--tol",
            type=click.FloatRange(min=0),
            default=1e-3,
            show_default=True,
            cls=_Opt,
            group=_ANY,
            help="Stop when the mean log-likelihood per pixel changes by less than this.",
        ),
        click.option(
            "--max-iter",
            type=click.IntRange(min=0),
            default=100,
            show_default=True,
            cls=_Opt,
            group=_ANY,
            help="EM iterations at most.",
        ),
        click.option(
            "--n-init",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            cls=_Opt,
            group=_ANY,
            help="Initialisations to try.",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            cls=_Opt,
            group=_ANY,
            help="Random seed.",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default="auto",
            show_default=True,
            cls=_Opt,
            group=_GMM,
            help="E-step arithmetic for float32 stacks: 'auto' matches a float64 fit to "
            "~1e-9; 'single' is a plain float32 kernel, up to ~1.7x faster, parameters within "
            "~1e-4.",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(file_okay=False),
            cls=_Opt,
            group=_ANY,
            help="Save the EM state to DIR after every iteration (atomically).",
        ),
        click.option(
            "--resume",
            is_flag=True,
            cls=_Opt,
            group=_ANY,
            help="Continue from the checkpoint in --checkpoint DIR (same data and options); "
            "the result equals an uninterrupted fit.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _impute_option(f: Callable) -> Callable:
    return click.option(
        "--impute",
        is_flag=True,
        help="Also write the stack's attributes with gaps filled (each missing value "
        "replaced by its expected value given the pixel's observed attributes) and, per "
        "attribute, NAME_std: the standard deviation of each filled value (NaN where "
        "observed).",
    )(f)


def _parse_vars(variables: str | None) -> list[str] | None:
    if variables is None:
        return None
    names = [v.strip() for v in variables.split(",") if v.strip()]
    if not names:
        raise BadInput("--vars: give at least one variable name (comma-separated)")
    return names


# ----------------------------------------------------------------------------- errors


def _command(name: str) -> Callable:
    """Wrap a command: reporter, warnings as one-liners, exceptions to exit codes."""

    def deco(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            debug = kw.pop("debug", False)
            rep = Reporter(kw.pop("quiet", False), kw.pop("log_json", None), name)
            code = EXIT_OK
            stages = _StageLines(rep)
            logger = logging.getLogger("daskem")
            level = logger.level
            logger.addHandler(stages)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
            try:
                with warnings.catch_warnings():
                    warnings.showwarning = _show_warning
                    return f(rep, *args, **kw)
            except click.exceptions.Exit as e:
                code = e.exit_code
                raise
            except click.ClickException as e:
                code = e.exit_code
                rep.summary(status="error", exit_code=code, error=e.format_message())
                if debug:
                    traceback.print_exc()
                raise
            except KeyboardInterrupt:
                code = EXIT_INTERRUPTED
                click.echo("interrupted", err=True)
                rep.summary(status="interrupted", exit_code=code)
                raise click.exceptions.Exit(code) from None
            except BAD_INPUT as e:
                if _lost_cluster(e):  # e.g. distributed's ValueError once its client closed
                    code = EXIT_ERROR
                    _fail(rep, e, debug)
                code = EXIT_BAD_INPUT
                if debug:
                    traceback.print_exc()
                rep.summary(status="error", exit_code=code, error=_message(e))
                raise BadInput(_message(e)) from e
            except Exception as e:
                code = EXIT_ERROR
                _fail(rep, e, debug)
            finally:
                logger.removeHandler(stages)
                logger.setLevel(level)
                rep.close()

        return wrapper

    return deco


def _fail(rep: Reporter, e: BaseException, debug: bool) -> None:
    """An unexpected error (exit 1): one line, the lost-cluster advice where it applies."""
    if debug:
        traceback.print_exc()
    msg = f"{type(e).__name__}: {_message(e)}"
    if _lost_cluster(e):
        msg = (
            "lost the connection to the Dask scheduler or its workers "
            f"({type(e).__name__}). Restart the cluster and run the same command "
            "again; with --checkpoint DIR --resume a fit continues from its last "
            "completed iteration."
        )
    click.echo(f"Error: {msg}" + ("" if debug else " (--debug for the traceback)"), err=True)
    rep.summary(status="error", exit_code=EXIT_ERROR, error=msg)
    raise click.exceptions.Exit(EXIT_ERROR) from None


class _StageLines(logging.Handler):
    """The fit's stages before the passes (the sample, each restart's start, the prefit,
    the screening of restarts) as progress lines and --log-json records; the per-pass
    lines come from the iteration callback instead."""

    STAGES = ("_fit", "_prepare_pass", "_initialise", "_initial_params", "_prefit", "_screen")

    def __init__(self, rep: Reporter) -> None:
        super().__init__(logging.INFO)
        self.rep = rep

    def emit(self, record: logging.LogRecord) -> None:
        if record.funcName not in self.STAGES:
            return
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not worth failing a command
            return
        self.rep.progress(message)
        self.rep.record({"event": "stage", "message": message})


class _Group(click.Group):
    """Keeps the raw arguments (for the provenance of model files)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["daskem.argv"] = ["daskem", *args]
        return super().parse_args(ctx, args)


def _argv() -> list[str]:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and "daskem.argv" in ctx.meta:
        return list(ctx.meta["daskem.argv"])
    return list(sys.argv)


# ----------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def _cluster(
    rep: Reporter,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    tls_ca_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    worker_timeout: float | None = None,
) -> Iterator[Any]:
    """The Dask client of a command (see :func:`daskem.cluster.connect`), its passes
    watched (:func:`daskem.engine.watch_cluster`): lost workers, waiting for workers and
    workers paused at their memory limit are reported on stderr."""
    import dask

    from .cluster import connect
    from .engine import watch_cluster

    if scheduler and scheduler_file:
        raise BadInput("give either --scheduler or --scheduler-file, not both")
    sizing = {
        "--workers": workers,
        "--threads-per-worker": threads_per_worker,
        "--memory-limit": memory_limit,
    }
    given = [k for k, v in sizing.items() if v is not None]
    if given and (scheduler or scheduler_file):
        raise BadInput(
            f"{', '.join(given)} size the embedded cluster; they cannot be combined with "
            "--scheduler / --scheduler-file (size that cluster where it is started)"
        )
    tls = {"--tls-ca-file": tls_ca_file, "--tls-cert": tls_cert, "--tls-key": tls_key}
    if any(v is not None for v in tls.values()):
        missing = [k for k, v in tls.items() if v is None]
        if missing:
            raise BadInput(f"TLS needs {', '.join(missing)} too")
        for option, path in tls.items():
            if not Path(path).is_file():
                raise BadInput(f"{option}: {path} does not exist")
        if not (scheduler or scheduler_file):
            raise BadInput("--tls-* options need --scheduler or --scheduler-file")
    if scheduler_file and not Path(scheduler_file).is_file():
        raise BadInput(f"--scheduler-file: {scheduler_file} does not exist")
    if not scheduler and not scheduler_file and not given:
        scheduler = dask.config.get("scheduler-address", None)
    _check_tls(scheduler, scheduler_file, tls_ca_file is not None)
    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(
                connect(
                    scheduler,
                    scheduler_file=scheduler_file,
                    n_workers=workers,
                    threads_per_worker=threads_per_worker,
                    memory_limit=memory_limit if memory_limit is not None else "auto",
                    tls_ca_file=tls_ca_file,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                )
            )
        except Exception as e:
            reason = _tls_failure(e)
            if reason is None:
                raise
            where = scheduler or f"--scheduler-file {scheduler_file}"
            raise BadInput(
                f"TLS with the scheduler at {where} failed: {reason}. Give --tls-ca-file the "
                "CA that signed the scheduler's certificate, and --tls-cert / --tls-key a "
                "certificate signed by the CA the scheduler trusts (the files its workers use)"
            ) from e
        info = client.scheduler_info()
        n = len(info.get("workers", {}))
        threads = sum(w.get("nthreads", 0) for w in info.get("workers", {}).values())
        kind = (
            "scheduler " + client.scheduler.address
            if scheduler or scheduler_file
            else "embedded cluster"
        )
        rep.progress(f"dask: {kind}, {n} workers, {threads} threads")
        link = client.dashboard_link
        if not _has_bokeh():
            link += " (the dashboard page needs bokeh>=3.1: pip install 'bokeh>=3.1')"
        if str(client.scheduler.address).startswith("tls://"):
            link += " (plain HTTP, outside TLS: reach it through an SSH tunnel or port-forward)"
        rep.progress(f"dask dashboard: {link}")
        hint = (
            "a fit run with --checkpoint DIR continues from its last completed iteration "
            "with --resume"
        )

        def report(message: str) -> None:
            rep.progress(message)
            rep.record({"event": "cluster", "message": message})

        paused = 60.0 if worker_timeout is None else worker_timeout
        try:
            with watch_cluster(
                report, worker_timeout=worker_timeout, paused_timeout=paused, resume_hint=hint
            ):
                yield client
        except KeyboardInterrupt:
            # Ctrl-C: the cluster is shut down next; what its event loop and workers log
            # while tasks are cancelled ("Task exception was never retrieved", AllExit,
            # closed comms) is noise to the user, who asked for it
            for name in ("asyncio", "distributed", "tornado"):
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)
            raise


def _has_bokeh() -> bool:
    """Whether this environment can serve Dask's dashboard (bokeh >= 3.1)."""
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("bokeh").split(".")[:2])
    except Exception:  # not installed, or an unusual version string
        return False
    return (major, minor) >= (3, 1)


def _scheduler_address(scheduler: str | None, scheduler_file: str | None) -> str | None:
    if scheduler:
        return str(scheduler)
    if scheduler_file:
        try:
            return str(json.loads(Path(scheduler_file).read_text())["address"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # connect() reports an unreadable file
    return None


def _check_tls(scheduler: str | None, scheduler_file: str | None, certificates: bool) -> None:
    """A tls:// scheduler needs certificates; certificates need a tls:// scheduler."""
    import dask

    address = _scheduler_address(scheduler, scheduler_file)
    if address is None:
        return
    where = f"--scheduler {address}" if scheduler else f"--scheduler-file {scheduler_file}"
    tls_address = address.startswith("tls://")
    configured = dask.config.get("distributed.comm.tls.ca-file", None) is not None
    if tls_address and not certificates and not configured:
        raise BadInput(
            f"{where}: the scheduler speaks TLS; give --tls-ca-file, --tls-cert and "
            "--tls-key (the files its workers use), or set Dask's distributed.comm.tls "
            "configuration"
        )
    if certificates and not tls_address:
        raise BadInput(
            f"--tls-* options need a tls:// scheduler, but the scheduler is {address}: give "
            "its tls:// address, or drop the --tls-* options"
        )


def _tls_failure(e: BaseException) -> str | None:
    """The reason of a failed TLS handshake in ``e``'s chain, or None if it is not one."""
    import ssl

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return getattr(seen, "verify_message", None) or seen.reason or str(seen)
        if "TLS certificate does not match" in str(seen):
            return "the certificates do not match"
        seen = seen.__cause__ or seen.__context__
    return None


# ----------------------------------------------------------------------------- steps


def _check_fit_options(
    rep: Reporter, opts: dict[str, Any], overwrite: bool, labels: str | None
) -> None:
    """Model and checkpoint options, checked before any work."""
    from . import io
    from .modelfile import load_checkpoint

    method = _method(opts)
    try:
        io.estimator_class(method, semi_supervised=labels is not None)
    except ValueError as e:
        raise BadInput(f"--method {method}: {e}") from e
    _parse_params(opts.get("params", ()))
    _spatial_options(opts)
    sequences = _sequence_method(method)
    if sequences and not opts.get("time_dim"):
        raise BadInput(
            f"--method {method} models every pixel's time series: add --time-dim DIM (the "
            "stack's time dimension)"
        )
    if opts.get("time_dim") and not sequences:
        raise BadInput(f"--time-dim: only for --method hmm (time stacks), not --method {method}")
    if method not in ("gmm", "hmrf"):
        ctx = click.get_current_context(silent=True)
        allowed = ("covariance", "components_per_class") if sequences else ()
        given = [
            name
            for name in _GMM_OPTIONS
            if name not in allowed
            if ctx is not None
            and name in ctx.params
            and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            flags = ", ".join("--" + g.replace("_", "-") for g in given)
            raise BadInput(f"{flags}: options of --method gmm, not of --method {method}")
    if labels is None and opts["n_components"] is None:
        raise BadInput("-k/--n-components is required without --labels")
    if labels is None and opts.get("components_per_class") is not None:
        raise BadInput("--components-per-class needs --labels (a semi-supervised fit)")
    if labels is not None:
        _parse_components_per_class(opts.get("components_per_class"))
    prior = _parse_label_prior(opts.get("label_prior"))
    if prior != 0.0 and (labels is None or method != "gmm"):
        raise BadInput(
            "--label-prior: for semi-supervised Gaussian mixtures (--labels, --method gmm)"
        )
    if opts.get("pattern_weights") is not None:
        if method != "gmm":
            raise BadInput(
                f"--pattern-weights: an option of --method gmm, not of --method {method}"
            )
        if opts["pattern_weights"] and opts.get("nan_policy") == "omit":
            raise BadInput(
                "--pattern-weights: needs --nan-policy marginalize (pixels with some "
                "attributes missing in the fit), not omit"
            )
        if opts["pattern_weights"] and prior != 0.0:
            raise BadInput("--pattern-weights: cannot be combined with --label-prior")

    ckpt = opts["checkpoint"]
    if opts["resume"] and not ckpt:
        raise BadInput("--resume needs --checkpoint DIR (where the interrupted fit saved)")
    if not ckpt:
        return
    if Path(ckpt).exists() and not Path(ckpt).is_dir():
        raise BadInput(f"--checkpoint {ckpt} is not a directory")
    with _reading(f"--checkpoint {ckpt}"):
        found = load_checkpoint(ckpt)
    if found is None and opts["resume"]:
        rep.progress(f"--resume: no checkpoint found in {ckpt}, starting a new fit")
    elif found is not None and opts["resume"]:
        done = [int(c.get("n_iter", 0)) for c in found.get("candidates") or [] if c]
        rep.progress(
            f"--resume: resuming from iteration {max(done) if done else 0} of the checkpoint "
            f"in {ckpt}"
        )
    elif found is not None and not opts["resume"] and not overwrite:
        raise BadInput(
            f"--checkpoint {ckpt} holds the checkpoint of an earlier fit; add --resume to "
            "continue it, or --overwrite to start over"
        )


def _sequence_method(method: str) -> bool:
    """Whether ``method``'s estimator models every pixel's time series."""
    from . import io

    try:
        return bool(getattr(io.estimator_class(method), "sequence_input", False))
    except ValueError:
        return False


def _method(opts: dict[str, Any]) -> str:
    """--method, or hmrf when --spatial-beta / --neighbourhood ask for a spatial prior."""
    method = opts.get("method", "gmm")
    spatial = any(opts.get(k) is not None for k in ("spatial_beta", "neighbourhood", "spatial_fit"))
    if spatial and method == "gmm":
        return "hmrf"
    if spatial and method != "hmrf":
        raise BadInput(
            f"--spatial-beta/--spatial-fit/--neighbourhood: options of --method hmrf, not {method}"
        )
    return method


def _spatial_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The spatial prior's estimator parameters from --spatial-beta / --neighbourhood."""
    out: dict[str, Any] = {}
    beta = opts.get("spatial_beta")
    if beta is not None:
        if beta == "auto":
            out["spatial_beta"] = "auto"
        else:
            try:
                value = float(beta)
            except ValueError:
                value = float("nan")
            if not (value >= 0 and value < float("inf")):
                raise BadInput(f"--spatial-beta {beta}: expected 'auto' or a number >= 0")
            out["spatial_beta"] = value
    if opts.get("neighbourhood") is not None:
        out["neighbourhood"] = int(opts["neighbourhood"])
    if opts.get("spatial_fit") is not None:
        out["spatial_fit"] = opts["spatial_fit"]
    return out


def _check_output(path: Path, option: str, overwrite: bool) -> None:
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise BadInput(f"{option} {path} exists; add --overwrite to replace it")


def _parse_named(text: str, option: str, value: Callable[[str], Any], shape: str) -> Any:
    """``V`` (for all) or ``NAME=V,NAME=V`` (per name), each ``V`` through ``value``."""
    if "=" not in text:
        return value(text.strip())
    out: dict[str, Any] = {}
    for item in text.split(","):
        name, sep, v = item.partition("=")
        if not sep or not name.strip():
            raise BadInput(f"{option} {text}: expected {shape}")
        out[name.strip()] = value(v.strip())
    return out


def _parse_nodata(text: str | None) -> float | dict[str, float] | None:
    """``--nodata``: ``V`` for every attribute or ``NAME=V,NAME=V``."""
    if text is None:
        return None

    def number(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            raise BadInput(f"--nodata {text}: {v!r} is not a number") from None

    return _parse_named(text, "--nodata", number, "V or NAME=V,NAME=V")


def _open_stack(
    path: str,
    variables: list[str] | None,
    time_dim: str | None = None,
    *,
    nodata: str | None = None,
    mask: str | None = None,
) -> Any:
    from . import io

    what = "--vars" if variables else f"STACK {path}"
    nd = _parse_nodata(nodata)
    try:
        stack = io.open_stack(path, variables, nodata=nd, mask=mask)
    except FileNotFoundError as e:
        raise BadInput(f"STACK {path}: {_message(e)}") from e
    except (*BAD_INPUT, KeyError) as e:
        if mask is not None and _raised_in(e, "_mask_array"):
            raise BadInput(f"--mask {mask}: {_message(e)}") from e
        raise BadInput(f"{what}: {_message(e)}") from e
    if isinstance(nd, dict):
        unknown = sorted(set(nd) - set(stack.variables))
        if unknown:
            raise BadInput(
                f"--nodata {nodata}: {unknown} are not attributes of the stack "
                f"{list(stack.variables)}"
            )
    if time_dim is None:
        return stack
    try:
        return io._as_time_stack(stack, time_dim)
    except ValueError as e:
        raise BadInput(f"--time-dim {time_dim}: {_message(e)}") from e


def _describe_stack(stack: Any) -> str:
    dims = ", ".join(f"{d}: {n}" for d, n in zip(stack.dims, stack.shape, strict=True))
    chunks = " x ".join(str(c[0]) for c in stack.chunks)
    if getattr(stack, "time_dim", None) is not None:
        what = f"{stack.n_sequences:,} pixels x {stack.n_times} dates"
    else:
        what = f"{stack.n_pixels:,} pixels"
    return (
        f"({dims}; chunks {chunks}; {what}; "
        f"{stack.n_features} attributes: {', '.join(stack.variables)})"
    )


def _fit(rep: Reporter, stack: Any, *, labels: str | None, opts: dict[str, Any]) -> Any:
    """Fit a model on an opened stack with per-iteration progress; returns it."""
    from . import io

    how = f"semi-supervised from --labels {labels}" if labels else "unsupervised"
    method = _method(opts)
    how += "" if method == "gmm" else f", --method {method}"
    k, cpc = opts["n_components"], opts.get("components_per_class")
    if k is not None:
        what = f"{k} components"
    else:
        what = f"components per class: {cpc}" if cpc else "one component per class"
    if method in ("gmm", "hmrf"):
        what += f" ({opts['covariance']} covariance)"
    for message in io.check_nodata(stack, warn=False):
        rep.progress(f"warning: {message}")
    rep.progress(f"fitting {what}, {how}")
    t = time.perf_counter()
    extra: dict[str, Any] = {
        "tol": opts["tol"],
        "max_iter": opts["max_iter"],
        "n_init": opts["n_init"],
        "random_state": opts["seed"],
        "nan_policy": opts.get("nan_policy"),
    }
    if method in ("gmm", "hmrf"):
        extra.update(covariance_type=opts["covariance"], precision=opts["precision"])
        if labels is not None:
            extra["components_per_class"] = _parse_components_per_class(
                opts.get("components_per_class")
            )
            extra["label_weight"] = opts.get("label_weight", 1.0)
            prior = _parse_label_prior(opts.get("label_prior"))
            if prior != 0.0:
                extra["label_prior"] = prior
    if opts.get("pattern_weights") is not None:  # else the stack's default (io.fit_stack)
        extra["pattern_weights"] = bool(opts["pattern_weights"])  # _check_fit_options
    if method == "hmrf":
        extra.update(_spatial_options(opts))
    callback = rep.iteration
    per_pixel = 1.0
    if _sequence_method(method):
        # the CLI's --tol and log-lik lines are per pixel; the HMM's objective is a total
        per_pixel = float(stack.n_sequences)
        extra.update(covariance_type=opts["covariance"], tol=opts["tol"] * per_pixel)
        extra["n_iter"] = extra.pop("max_iter")
        if labels is not None:
            extra["components_per_class"] = _parse_components_per_class(
                opts.get("components_per_class")
            )

        def callback(info: Any) -> None:
            rep.iteration(
                dataclasses.replace(
                    info, lower_bound=info.lower_bound / per_pixel, change=info.change / per_pixel
                )
            )

    extra.update(_parse_params(opts.get("params", ())))  # --param NAME=VALUE wins
    try:
        gm = io.fit_stack(
            stack,
            opts["n_components"],
            labels,
            method=method,
            checkpoint_dir=opts["checkpoint"],
            resume=opts["resume"],
            callback=callback,
            check_nodata_values=False,  # said above
            class_column=opts.get("class_column"),
            max_labels_per_class=opts.get("max_labels_per_class"),
            **extra,
        )
    except (*BAD_INPUT, KeyError) as e:
        if labels is not None and _label_error(e):
            raise BadInput(f"--labels {labels}: {_message(e)}") from e
        if str(e).startswith("n_components="):
            raise BadInput(f"-k/--n-components: {_message(e)}") from e
        if str(e).startswith("components_per_class"):
            raise BadInput(f"--components-per-class: {_message(e)}") from e
        raise
    seconds = time.perf_counter() - t
    state = "converged" if gm.converged_ else "did not converge"
    rep.progress(
        f"fit: {state} after {gm.n_iter_} iterations, mean log-likelihood "
        f"{gm.lower_bound_ / per_pixel:.6f} per pixel, {seconds:.1f} s"
    )
    gm.fit_seconds_ = seconds
    _report_pixels(rep, gm, stack)
    return gm


def _report_pixels(rep: Reporter, gm: Any, stack: Any) -> None:
    """Pixels used and left out of the fit, and why (stderr and --log-json)."""
    counts = getattr(gm, "excluded_counts_", None)
    if not counts:
        return
    sequences = getattr(stack, "time_dim", None) is not None
    total = stack.n_sequences if sequences else stack.n_pixels
    unit = "pixels (time series)" if sequences else "pixels"
    left = int(counts["total"])
    used = total - left
    partial = int(counts["partially_missing"])
    why = []
    if counts["all_missing"]:
        why.append(f"{counts['all_missing']:,} with nothing observed (nodata or masked)")
    if left - counts["all_missing"] > 0:
        why.append(
            f"{left - counts['all_missing']:,} with some attribute missing (--nan-policy omit)"
        )
    text = f"{unit}: {used:,} of {total:,} used"
    if partial and gm.nan_policy == "marginalize":
        text += f" ({partial:,} of them with some value missing, fitted through the observed ones)"
    if left:
        text += f"; {left:,} ({100 * left / max(total, 1):.1f}%) left out: " + ", ".join(why)
    rep.progress(text)
    rep.record(
        {
            "event": "pixels",
            "total": total,
            "used": used,
            "left_out": left,
            "nothing_observed": int(counts["all_missing"]),
            "partly_missing": partial,
            "nan_policy": gm.nan_policy,
        }
    )


def _parse_params(items: Any) -> list[tuple[str, Any]]:
    """``--param NAME=VALUE`` pairs, values read as JSON when they parse."""
    out = []
    for item in items or ():
        name, sep, value = str(item).partition("=")
        if not sep or not name.isidentifier():
            raise BadInput(f"--param {item}: expected NAME=VALUE with NAME a parameter name")
        try:
            out.append((name, json.loads(value)))
        except json.JSONDecodeError:
            out.append((name, value))
    return out


def _parse_label_prior(text: str | None) -> float | str:
    """``--label-prior``: "auto" or a temperature in [0, 1]."""
    if text is None or str(text).strip().lower() == "auto":
        return 0.0 if text is None else "auto"
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise BadInput(f"--label-prior {text}: give auto or a number in [0, 1]")
    return t


def _parse_components_per_class(text: str | None) -> int | dict[str, int] | None:
    """``--components-per-class``: ``N`` or ``CLASS=N,CLASS=N``."""
    if text is None:
        return None
    option = "--components-per-class"

    def count(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise BadInput(f"{option} {text}: {value!r} is not an integer >= 1")
        return n

    return _parse_named(text, option, count, "N or CLASS=N,CLASS=N")


#: where the labels are read and checked: an error raised there is about --labels
_LABEL_FUNCTIONS = ("_resolve_labels", "_check_labels", "labels_for_stack", "sequence_labels")


def _label_error(e: BaseException) -> bool:
    """Whether ``e`` was raised reading or checking the labels (to name --labels)."""
    return any(_raised_in(e, f) for f in _LABEL_FUNCTIONS)


def _raised_in(e: BaseException, function: str) -> bool:
    """Whether ``e`` was raised inside a call of ``function`` (to name the option)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def _save_model(rep: Reporter, gm: Any, path: Path, stack: Any, labels, opts) -> None:
    from .modelfile import save_model

    provenance = {
        "command": "daskem " + rep.command,
        "argv": _argv(),
        "input": os.path.abspath(stack.path) if stack.path else None,
        "variables": list(stack.variables),
        "labels": labels,
        "options": {
            "method": _method(opts),
            "params": dict(_parse_params(opts.get("params", ()))),
            "n_components": opts["n_components"],
            "components_per_class": opts.get("components_per_class"),
            "label_weight": opts.get("label_weight", 1.0),
            "label_prior": opts.get("label_prior", "0"),
            "pattern_weights": opts.get("pattern_weights"),
            "covariance_type": opts["covariance"],
            "tol": opts["tol"],
            "max_iter": opts["max_iter"],
            "n_init": opts["n_init"],
            "seed": opts["seed"],
            "precision": opts["precision"],
            "nan_policy": gm.nan_policy,
            "checkpoint": opts["checkpoint"],
            "resume": opts["resume"],
            "time_dim": opts.get("time_dim"),
        },
        "excluded_pixels": getattr(gm, "excluded_counts_", None),
        "fit_seconds": round(float(getattr(gm, "fit_seconds_", float("nan"))), 3),
    }
    save_model(
        gm,
        path,
        feature_names=list(stack.variables),
        class_names=list(gm.class_names_),
        provenance=provenance,
    )
    rep.result(f"model: {path}")


class _WriteProgress:
    """A periodic progress line while a Zarr store is written beside its target.

    Counts the chunk files in the temporary store (``.{name}.tmp-*``) that
    :func:`daskem.io.write_posterior` fills before renaming it into place, so it works
    with any scheduler, local or distributed.
    """

    _META = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}

    def __init__(self, rep: Reporter, target: Path, total: int, interval: float = 2.0):
        self.rep, self.target, self.total, self.interval = rep, target, total, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.time()

    def _count(self) -> int:
        tmps = [
            p
            for p in self.target.parent.glob(f".{self.target.name}.tmp-*")
            if p.stat().st_mtime >= self.t0 - 1
        ]
        n = 0
        for tmp in tmps:
            for _, _, files in os.walk(tmp):
                n += sum(1 for f in files if f not in self._META)
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                t = time.perf_counter()
                n = min(self._count(), self.total)
                # counting must stay cheap next to the write, even for huge stores
                self.interval = max(self.interval, 20 * (time.perf_counter() - t))
                pct = 100.0 * n / max(self.total, 1)
                self.rep.progress(
                    f"writing {self.target.name}: {pct:3.0f}% ({n}/{self.total} chunks), "
                    f"{time.time() - self.t0:.0f} s"
                )

    def __enter__(self) -> _WriteProgress:
        if not self.rep.quiet:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _n_chunks(ds: Any) -> int:
    total = 0
    for var in ds.variables.values():
        chunks = var.chunks
        total += math.prod(len(c) for c in chunks) if chunks else 1
    return total


def _predict(
    rep: Reporter,
    model: Any,
    stack: Any,
    out: Path,
    *,
    labels: str | None,
    overwrite: bool,
    impute: bool = False,
) -> Any:
    """Posterior of a stack written atomically to ``out``; returns the lazy dataset."""
    from . import io

    post = io.posterior(model, stack, labels, impute=impute)
    rep.progress(f"writing the posterior to {out} ({_n_chunks(post)} chunks)")
    t = time.perf_counter()
    with _WriteProgress(rep, out, _n_chunks(post)):
        io.write_posterior(post, out, overwrite=overwrite)
    rep.progress(f"posterior written in {time.perf_counter() - t:.1f} s")
    rep.result(f"posterior: {out}")
    return post


def _model_time_dim(model: Any, time_dim: str | None) -> str | None:
    """The time dim to open a stack with for ``model``: --time-dim, else the one it was
    fitted with (models of time series only)."""
    if not getattr(model, "sequence_input", False):
        if time_dim is not None:
            raise BadInput(
                f"--time-dim: the model is a {type(model).__name__}, not a time-series model"
            )
        return None
    if time_dim is not None:
        return time_dim
    options = (getattr(model, "provenance_", None) or {}).get("options") or {}
    return options.get("time_dim") or "time"


def _stack_for_model(
    path: str,
    model: Any,
    model_path: str,
    variables: list[str] | None,
    time_dim: str | None = None,
    nodata: str | None = None,
    mask: str | None = None,
):
    """Open a stack with the model's features, naming missing/extra ones if they differ."""
    time_dim = _model_time_dim(model, time_dim)
    features = [str(f) for f in model.feature_names_in_]
    if variables is not None and set(variables) != set(features):
        missing = [f for f in features if f not in variables]
        extra = [v for v in variables if v not in features]
        raise BadInput(
            f"--vars {','.join(variables)} do not match the features of --model {model_path} "
            f"{features}: missing {missing}, extra {extra}"
        )
    try:
        return _open_stack(path, features, time_dim, nodata=nodata, mask=mask)
    except BadInput as e:
        if not isinstance(e.__cause__, ValueError) or "unknown variable" not in str(e.__cause__):
            raise
        try:
            probe = _open_stack(path, None)
        except BadInput:
            raise e from None
        have = set(str(v) for v in probe.dataset.data_vars)
        missing = [f for f in features if f not in have]
        extra = [v for v in probe.variables if v not in features]
        raise BadInput(
            f"--model {model_path} was fitted on features {features}, but STACK {path} lacks "
            f"{missing}" + (f" (its other attributes: {extra})" if extra else "")
        ) from None


def _load_model(path: str) -> Any:
    from .modelfile import load_model

    with _reading(f"--model {path}"):
        gm = load_model(path)
    if getattr(gm, "input_path_", None) is None:  # recorded in the posterior's attributes
        gm.input_path_ = (getattr(gm, "provenance_", None) or {}).get("input")
    return gm


# ----------------------------------------------------------------------------- commands


@click.group("daskem", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="daskem")
def cli() -> None:
    """Out-of-core Gaussian-mixture EM for tiled image stacks, on Dask.

    \b
    Typical use:
      daskem demo --out demo-out
      daskem fit stack.zarr --labels labels -k 4 --model model.json
      daskem predict stack.zarr --model model.json --out posterior.zarr
      daskem plot posterior.zarr --model model.json --out plots
      daskem inspect model.json

    Runs on an embedded local Dask cluster unless --scheduler / --scheduler-file (or
    the Dask config's scheduler-address) names a running one. Exit codes: 0 ok,
    2 bad input, 130 interrupted, 1 other errors.
    """


@cli.command(cls=_Command)
@click.argument("stack", metavar="STACK")
@_fit_options
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    required=True,
    help="Model JSON file to write.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --model file (and start over a checkpoint in --checkpoint).",
)
@_cluster_options
@_common_options
@_command("fit")
def fit(rep: Reporter, stack, model_path, overwrite, labels, variables, **kw) -> None:
    """Fit a model (--method; default a Gaussian mixture) on every pixel of STACK; write --model.

    STACK is a Zarr store of attribute maps on one grid, a multi-band GeoTIFF, several
    single-band GeoTIFFs ('bands/*.tif' quoted, or comma-separated paths) or a NetCDF/HDF5
    file (GeoTIFFs need: pip install 'daskem[gis]').
    """
    cluster_kw, opts = _split(kw)
    model_file = Path(model_path)
    _check_output(model_file, "--model", overwrite)
    _check_fit_options(rep, opts, overwrite, labels)
    st = _open_stack(
        stack,
        _parse_vars(variables),
        opts.get("time_dim"),
        nodata=opts.get("nodata"),
        mask=opts.get("mask"),
    )
    rep.progress(f"stack: {stack} {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        gm = _fit(rep, st, labels=labels, opts=opts)
        _check_output(model_file, "--model", overwrite)
        _save_model(rep, gm, model_file, st, labels, opts)
    rep.summary(
        status="ok",
        model=str(model_file),
        n_iter=gm.n_iter_,
        converged=gm.converged_,
        lower_bound=gm.lower_bound_,
    )


_CLUSTER_KEYS = (
    "scheduler",
    "scheduler_file",
    "workers",
    "threads_per_worker",
    "memory_limit",
    "tls_ca_file",
    "tls_cert",
    "tls_key",
    "worker_timeout",
)


def _split(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster_kw = {k: kw.pop(k) for k in _CLUSTER_KEYS if k in kw}
    return cluster_kw, kw


@cli.command()
@click.argument("stack", metavar="STACK")
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    required=True,
    help="Model JSON written by `daskem fit`.",
)
@click.option(
    "--out",
    type=click.Path(),
    required=True,
    help="Posterior Zarr store to write (probability, label, confidence, entropy, log_likelihood).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@click.option(
    "--vars",
    "variables",
    metavar="A,B,C",
    help="Attribute variables (default: the model's features; if given, they must be them).",
)
@click.option(
    "--labels",
    metavar="VAR|FILE",
    help="Clamp these labelled pixels to their class (as in a semi-supervised fit).",
)
@click.option(
    "--time-dim",
    "time_dim",
    metavar="DIM",
    help="Time-series models (--method hmm): the stack's time dimension (default: the one "
    "the model was fitted with).",
)
@click.option(
    "--nodata",
    metavar="V|NAME=V,...",
    help="Nodata value of every attribute, or per attribute (as for fit).",
)
@click.option(
    "--mask",
    metavar="VAR|FILE.tif",
    help="Valid-pixel mask (as for fit); masked pixels get no class.",
)
@_impute_option
@_cluster_options
@_common_options
@_command("predict")
def predict(
    rep: Reporter,
    stack,
    model_path,
    out,
    overwrite,
    variables,
    labels,
    time_dim,
    nodata,
    mask,
    impute,
    **kw,
) -> None:
    """Posterior maps of STACK under --model, to --out.

    Writes a Zarr store with the class probabilities, the most probable class
    (label), its probability (confidence), the entropy and the log-likelihood.
    """
    cluster_kw, _ = _split(kw)
    out_path = Path(out)
    _check_output(out_path, "--out", overwrite)
    _check_not_input(out_path, stack)
    model = _load_model(model_path)
    if impute and getattr(model, "_impute_rows", None) is None:
        raise BadInput(
            f"--impute: the model in {model_path} ({type(model).__name__}) cannot fill "
            "missing attributes; predict without --impute"
        )
    st = _stack_for_model(
        stack, model, model_path, _parse_vars(variables), time_dim, nodata=nodata, mask=mask
    )
    rep.progress(f"stack: {stack} {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        _predict(rep, model, st, out_path, labels=labels, overwrite=overwrite, impute=impute)
    rep.summary(status="ok", posterior=str(out_path))


def _check_not_input(out: Path, stack: str) -> None:
    with contextlib.suppress(OSError):
        if Path(stack).exists() and out.resolve() == Path(stack).resolve():
            raise BadInput(f"--out {out} is the input STACK; choose another path")


@cli.command(cls=_Command)
@click.argument("stack", metavar="STACK")
@_fit_options
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    required=True,
    help="Model JSON file to write.",
)
@click.option("--out", type=click.Path(), required=True, help="Posterior Zarr store to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --model and --out.")
@_impute_option
@_cluster_options
@_common_options
@_command("run")
def run(rep: Reporter, stack, model_path, out, overwrite, labels, variables, impute, **kw) -> None:
    """Fit on STACK, then write its posterior (fit + predict).

    With --labels, the labelled pixels are also clamped to their class in the
    posterior.
    """
    cluster_kw, opts = _split(kw)
    model_file, out_path = Path(model_path), Path(out)
    _check_output(model_file, "--model", overwrite)
    _check_output(out_path, "--out", overwrite)
    _check_not_input(out_path, stack)
    _check_fit_options(rep, opts, overwrite, labels)
    st = _open_stack(
        stack,
        _parse_vars(variables),
        opts.get("time_dim"),
        nodata=opts.get("nodata"),
        mask=opts.get("mask"),
    )
    rep.progress(f"stack: {stack} {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        gm = _fit(rep, st, labels=labels, opts=opts)
        _save_model(rep, gm, model_file, st, labels, opts)
        _predict(rep, gm, st, out_path, labels=labels, overwrite=overwrite, impute=impute)
    rep.summary(
        status="ok",
        model=str(model_file),
        posterior=str(out_path),
        n_iter=gm.n_iter_,
        converged=gm.converged_,
        lower_bound=gm.lower_bound_,
    )


def _parse_colors(text: str | None, names: list[str]) -> list[str] | None:
    """``--colors``: ``c0,c1,...`` in class order or ``NAME=COLOR,...`` (others default)."""
    if text is None:
        return None
    from .plot import class_colors

    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if all("=" not in t for t in items):
            if len(items) != len(names):
                raise BadInput(
                    f"--colors {text}: {len(items)} colours for {len(names)} classes {names}"
                )
            return class_colors(names, items)
        colors = class_colors(names)
        for t in items:
            name, _, color = t.partition("=")
            if name.strip() not in names:
                raise BadInput(f"--colors {text}: {name.strip()!r} is not a class of {names}")
            colors[names.index(name.strip())] = color.strip()
        return class_colors(names, colors)
    except ValueError as e:
        raise BadInput(f"--colors {text}: {_message(e)}") from e


@cli.command()
@click.argument("posterior", metavar="POSTERIOR")
@click.option(
    "--out", type=click.Path(file_okay=False), required=True, help="Directory for the GeoTIFFs."
)
@click.option(
    "--colors",
    metavar="C,C,...|NAME=C,...",
    help="Class colours (#rrggbb or names), in class order or by class name (default: "
    "the posterior's flag_colors, else a stable colour per class name).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing GeoTIFFs in --out.")
@click.option(
    "--block", type=click.IntRange(min=16), default=512, show_default=True, help="Tile size."
)
@_cluster_options
@_common_options
@_command("export")
def export(rep: Reporter, posterior, out, colors, overwrite, block, **kw) -> None:
    """Cloud-Optimised GeoTIFFs of a POSTERIOR store (2-D maps) into --out.

    Writes label.tif (colour table, class names in its metadata), confidence.tif and
    probability.tif (a band per class named after it): tiled, compressed, with
    overviews, georeferenced from the posterior, block by block and atomically.
    Needs: pip install 'daskem[gis]'.
    """
    from . import io

    cluster_kw, _ = _split(kw)
    with _reading(f"POSTERIOR {posterior}"):
        ds = io._open_zarr(posterior)
    if "probability" not in ds or "label" not in ds:
        raise BadInput(f"POSTERIOR {posterior}: not a daskem posterior of class maps")
    names = [str(n) for n in ds["class"].values]
    palette = _parse_colors(colors, names)
    targets = [Path(out) / f"{k}.tif" for k in ("label", "confidence", "probability")]
    for t in targets:
        _check_output(t, "--out", overwrite)
    with _cluster(rep, **cluster_kw):
        try:
            written = io.write_cogs(ds, out, colors=palette, overwrite=overwrite, block=block)
        except ValueError as e:
            raise BadInput(f"POSTERIOR {posterior}: {_message(e)}") from e
    for p in written.values():
        rep.result(str(p))
    rep.summary(status="ok", geotiffs=[str(p) for p in written.values()])


@cli.command()
@click.argument("posterior", metavar="POSTERIOR")
@click.option(
    "--truth",
    required=True,
    metavar="FILE|STACK.zarr:VAR",
    help="Reference labels: a label GeoTIFF, a vector file of labelled points/polygons, or "
    "a label variable of a Zarr stack (STACK.zarr:VAR), on the posterior's grid.",
)
@click.option(
    "--exclude-labels",
    "exclude",
    metavar="FILE|STACK.zarr:VAR",
    help="Leave out the pixels these labels mark (e.g. the training labels).",
)
@click.option(
    "--class-column", "class_column", metavar="NAME", help="Class column of vector files."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Directory for assess.json, assess.txt and confusion.png.",
)
@_common_options
@_command("assess")
def assess_cmd(rep: Reporter, posterior, truth, exclude, class_column, out) -> None:
    """Accuracy of a POSTERIOR's class map against reference labels.

    Prints and writes the confusion matrix, overall accuracy, Cohen's kappa, per-class
    precision / recall / F1 and the area of each class.
    """
    from . import io

    with _reading(f"POSTERIOR {posterior}"):
        post = io._open_zarr(posterior)
    if "label" not in post or "class" not in post.coords:
        raise BadInput(f"POSTERIOR {posterior}: not a daskem posterior of class maps")

    def source(text: str | None, option: str) -> Any:
        if text is None:
            return None
        store, sep, var = text.rpartition(":")
        if sep and store and Path(store).is_dir():
            with _reading(f"{option} {text}"):
                ds = io._open_zarr(store)
            if var not in ds:
                raise BadInput(f"{option} {text}: no variable {var!r} in {store}")
            return ds[var]
        if not Path(text).exists():
            raise BadInput(f"{option} {text}: no such file (or STACK.zarr:VAR)")
        return text

    try:
        res = io.assess(
            post,
            source(truth, "--truth"),
            exclude=source(exclude, "--exclude-labels"),
            class_column=class_column,
        )
    except (*BAD_INPUT, KeyError) as e:
        raise BadInput(f"--truth {truth}: {_message(e)}") from e
    text = _assess_text(res)
    rep.result(text)
    if out:
        from .modelfile import atomic_write_text
        from .plot import plot_confusion

        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "assess.json", json.dumps(res, indent=1) + "\n")
        atomic_write_text(d / "assess.txt", text + "\n")
        plot_confusion(res, d / "confusion.png")
        rep.result(f"written: {d / 'assess.json'}, {d / 'assess.txt'}, {d / 'confusion.png'}")
    rep.summary(
        status="ok",
        overall_accuracy=res["overall_accuracy"],
        kappa=res["kappa"],
        n=res["n"],
    )


def _assess_text(res: dict) -> str:
    names = res["classes"]
    w = max(8, *(len(n) for n in names))
    lines = [
        f"pixels compared: {res['n']:,}"
        + (f" ({res['n_excluded']:,} excluded)" if res["n_excluded"] else ""),
        f"overall accuracy: {res['overall_accuracy']:.4f}   kappa: {res['kappa']:.4f}",
        "confusion (rows: reference, columns: map):",
        " " * (w + 2) + " ".join(f"{n[:w]:>{w}}" for n in names),
    ]
    for n, row in zip(names, res["confusion"], strict=True):
        lines.append(f"{n[:w]:>{w}}  " + " ".join(f"{v:>{w}}" for v in row))
    lines.append(
        f"{'class':>{w}}  {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9} {'area':>12}"
    )
    area = res["area"] or res["area_pixels"]
    for i, n in enumerate(names):

        def f(v):
            return "-" if v is None else f"{v:.4f}"

        lines.append(
            f"{n[:w]:>{w}}  {f(res['precision'][i]):>9} {f(res['recall'][i]):>9} "
            f"{f(res['f1'][i]):>9} {res['support'][i]:>9} {area[i]:>12.6g}"
        )
    lines.append(f"area in {res['area_unit'] or 'pixels'}")
    return "\n".join(lines)


def _parse_ks(text: str) -> list[int]:
    """``-k 2..12`` or ``-k 2,4,8``."""
    try:
        if ".." in text:
            lo, hi = (int(v) for v in text.split("..", 1))
            ks = list(range(lo, hi + 1))
        else:
            ks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"-k {text}: expected a range LO..HI or numbers A,B,C") from None
    if not ks or min(ks) < 1:
        raise BadInput(f"-k {text}: expected numbers of components >= 1")
    return ks


@cli.command("select")
@click.argument("stack", metavar="STACK")
@click.option("-k", "ks", required=True, metavar="LO..HI|A,B,C", help="Numbers of components.")
@click.option("--criterion", type=click.Choice(("bic", "aic")), default="bic", show_default=True)
@click.option(
    "--covariance", type=click.Choice(COVARIANCE_TYPES), default="full", show_default=True
)
@click.option("--vars", "variables", metavar="A,B,C", help="Attribute variables to use.")
@click.option(
    "--labels",
    metavar="VAR|FILE",
    help="Semi-supervised fits (K counts components, at least one per class).",
)
@click.option("--class-column", "class_column", metavar="NAME", help="Class column of --labels.")
@click.option("--nodata", metavar="V|NAME=V,...", help="Nodata value(s).")
@click.option("--mask", metavar="VAR|FILE.tif", help="Valid-pixel mask.")
@click.option("--tol", type=click.FloatRange(min=0), default=1e-3, show_default=True)
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Directory for select.json and select.png."
)
@_cluster_options
@_common_options
@_command("select")
def select_cmd(
    rep: Reporter, stack, ks, criterion, covariance, variables, labels, class_column, nodata,
    mask, tol, max_iter, seed, out, **kw,
) -> None:  # fmt: skip
    """Choose the number of components K for STACK by BIC or AIC.

    Fits a Gaussian mixture for every K on every pixel, all K in the same passes over
    the data, prints the criterion per K and names the best; --out writes select.json
    and select.png (the criterion against K).
    """
    from . import io

    cluster_kw, _ = _split(kw)
    k_list = _parse_ks(ks)
    st = _open_stack(stack, _parse_vars(variables), nodata=nodata, mask=mask)
    rep.progress(f"stack: {stack} {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        t = time.perf_counter()
        try:
            res = io.select_k(
                st, k_list, labels, criterion=criterion, covariance_type=covariance, tol=tol,
                max_iter=max_iter, random_state=seed, callback=None, class_column=class_column,
            )  # fmt: skip
        except (*BAD_INPUT, KeyError) as e:
            if labels is not None and _label_error(e):
                raise BadInput(f"--labels {labels}: {_message(e)}") from e
            if str(e).startswith("K = "):
                raise BadInput(f"-k {ks}: {_message(e)}") from e
            raise
    rep.progress(
        f"fitted K = {', '.join(map(str, res['ks']))} in {res['passes']} passes over the data, "
        f"{time.perf_counter() - t:.1f} s"
    )
    lines = [f"{'K':>4} {criterion.upper():>16} {'log-likelihood':>16} {'parameters':>10}"]
    for k, v, ll, p in zip(
        res["ks"], res["values"], res["log_likelihood"], res["n_parameters"], strict=True
    ):
        mark = "  <- best" if k == res["best"] else ""
        lines.append(f"{k:>4} {v:>16.6g} {ll:>16.6g} {p:>10}{mark}")
    rep.result("\n".join(lines))
    rep.result(f"best K by {criterion.upper()}: {res['best']}")
    if out:
        from .modelfile import atomic_write_text
        from .plot import plot_selection

        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        doc = {k: v for k, v in res.items() if k != "models"}
        atomic_write_text(d / "select.json", json.dumps(doc, indent=1) + "\n")
        plot_selection(doc, d / "select.png")
        rep.result(f"written: {d / 'select.json'}, {d / 'select.png'}")
    rep.summary(status="ok", best=res["best"], passes=res["passes"])


@cli.command()
@click.argument("inputs", metavar="INPUTS")
@click.option("--out", type=click.Path(), required=True, help="Zarr store to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@click.option("--vars", "variables", metavar="A,B,C", help="Attributes to keep (default: all).")
@click.option("--nodata", metavar="V|NAME=V,...", help="Nodata value(s), written as NaN.")
@click.option("--mask", metavar="VAR|FILE.tif", help="Valid-pixel mask; masked pixels become NaN.")
@click.option(
    "--chunk",
    type=click.IntRange(min=16),
    help="Chunk side of the spatial dims (default: the input's chunks).",
)
@click.option("--time-dim", "time_dim", metavar="DIM", help="A time stack: its dates, one chunk.")
@_cluster_options
@_common_options
@_command("convert")
def convert(
    rep: Reporter, inputs, out, overwrite, variables, nodata, mask, chunk, time_dim, **kw
) -> None:
    """Write INPUTS as a Zarr stack for repeated runs (chunked, compressed, atomic).

    INPUTS is anything fit reads: a multi-band GeoTIFF, several single-band GeoTIFFs
    ('bands/*.tif' quoted, or comma-separated), a NetCDF/HDF5 file or a Zarr store. Every
    attribute is written as a float variable with nodata and masked pixels as NaN, the
    CRS kept; memory stays bounded (chunk by chunk).
    """
    from . import io

    cluster_kw, _ = _split(kw)
    out_path = Path(out)
    _check_output(out_path, "--out", overwrite)
    _check_not_input(out_path, inputs)
    st = _open_stack(inputs, _parse_vars(variables), time_dim, nodata=nodata, mask=mask)
    rep.progress(f"input: {inputs} {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        t = time.perf_counter()
        for message in io.check_nodata(st, warn=False):
            rep.progress(f"warning: {message}")
        io.convert(
            inputs,
            out_path,
            variables=_parse_vars(variables),
            nodata=_parse_nodata(nodata),
            mask=mask,
            chunks=chunk,
            time_dim=time_dim,
            overwrite=overwrite,
        )
    rep.progress(f"written in {time.perf_counter() - t:.1f} s")
    rep.result(f"stack: {out_path}")
    rep.summary(status="ok", stack=str(out_path), variables=list(st.variables))


@cli.command()
@click.option(
    "--size",
    type=click.IntRange(min=32),
    default=1024,
    show_default=True,
    help="Side of the generated map in pixels.",
)
@click.option(
    "--chunk", type=click.IntRange(min=8), default=256, show_default=True, help="Chunk side."
)
@click.option("--classes", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option(
    "--modes-per-class",
    type=click.IntRange(1, 4),
    default=1,
    show_default=True,
    help="Kinds of pixels per generated class (>1: multi-modal classes, like 'urban' = "
    "roofs + roads).",
)
@click.option(
    "--components-per-class",
    type=click.IntRange(1, 8),
    default=1,
    show_default=True,
    help="Mixture components fitted per class (try the --modes-per-class value).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="demo-out",
    show_default=True,
    help="Directory for stack.zarr, model.json, posterior.zarr and plots/.",
)
@click.option("--overwrite", is_flag=True, help="Replace the outputs of a previous demo.")
@click.option(
    "--time",
    "time_stack",
    is_flag=True,
    help="A time stack instead: classes that change at known dates, fitted by a hidden "
    "Markov model over every pixel's series (--method hmm); reports state accuracy and "
    "change dates against the truth.",
)
@click.option(
    "--dates",
    type=click.IntRange(min=2),
    default=12,
    show_default=True,
    help="With --time: dates of the generated time stack.",
)
@_cluster_options
@_common_options
@_command("demo")
def demo(
    rep: Reporter,
    size,
    chunk,
    classes,
    modes_per_class,
    components_per_class,
    seed,
    out,
    overwrite,
    time_stack,
    dates,
    **kw,
) -> None:
    """Generate a tiled synthetic stack and classify it end to end.

    Writes a synthetic attribute stack with a few labelled pixels per class, fits a
    semi-supervised Gaussian mixture over every pixel, writes the posterior and
    quicklook PNGs, and prints the accuracy against the known ground truth.
    """
    from . import io
    from .synthetic import make_stack, write_stack

    cluster_kw, _ = _split(kw)
    out_dir = Path(out)
    paths = {
        "stack": out_dir / "stack.zarr",
        "model": out_dir / "model.json",
        "posterior": out_dir / "posterior.zarr",
    }
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise BadInput(
            f"--out {out_dir} holds a previous demo ({', '.join(existing)}); add --overwrite"
        )
    if time_stack:
        _time_demo(rep, size, chunk, classes, dates, seed, paths, out_dir, overwrite, cluster_kw)
        return
    opts = _demo_options(seed, n_components=None, components_per_class=str(components_per_class))
    t = time.perf_counter()
    ds = make_stack((size, size), n_classes=classes, seed=seed, modes_per_class=modes_per_class)
    write_stack(ds, paths["stack"], chunks=chunk, overwrite=overwrite)
    rep.progress(f"generated {paths['stack']} in {time.perf_counter() - t:.1f} s")
    rep.result(f"stack: {paths['stack']}")
    st = io.open_stack(paths["stack"])
    rep.progress(f"stack: {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        gm = _fit(rep, st, labels="labels", opts=opts)
        _save_model(rep, gm, paths["model"], st, "labels", opts)
        post = _predict(rep, gm, st, paths["posterior"], labels="labels", overwrite=overwrite)
        acc = _accuracy(paths["posterior"], st.dataset["truth"])
        pngs = _quicklooks(rep, paths["posterior"], out_dir / "plots", gm)
    del post
    rep.result(f"plots: {', '.join(str(p) for p in pngs.values())}")
    rep.result(f"accuracy vs ground truth: {acc['accuracy']:.3f} on {acc['n']:,} pixels")
    rep.result(
        f"mean confidence: {acc['confidence_correct']:.3f} where right, "
        f"{acc['confidence_wrong']:.3f} where wrong"
    )
    total = time.perf_counter() - rep.t0
    rep.result(f"demo finished in {total:.1f} s")
    rep.summary(
        status="ok",
        **acc,
        n_iter=gm.n_iter_,
        converged=gm.converged_,
        lower_bound=gm.lower_bound_,
        **{k: str(p) for k, p in paths.items()},
        plots=[str(p) for p in pngs.values()],
    )


def _demo_options(seed: int, **given: Any) -> dict[str, Any]:
    """The fit options of a demo: the command line's defaults, and ``given``."""
    return {
        "n_components": None,
        "components_per_class": None,
        "label_weight": 1.0,
        "label_prior": "0",
        "covariance": "full",
        "tol": 1e-3,
        "max_iter": 100,
        "n_init": 1,
        "seed": seed,
        "precision": "auto",
        "checkpoint": None,
        "resume": False,
        "nan_policy": None,
        **given,
    }


def _time_demo(rep, size, chunk, classes, dates, seed, paths, out_dir, overwrite, cluster_kw):
    """``daskem demo --time``: a synthetic time stack, a hidden Markov model fitted on every
    pixel's series, its posterior, PNGs, and the states and change dates against the truth."""
    from . import io
    from .synthetic import make_time_stack, write_stack

    opts = _demo_options(seed, method="hmm", time_dim="time", n_components=classes)
    t = time.perf_counter()
    ds = make_time_stack((size, size), n_dates=dates, n_classes=classes, seed=seed)
    write_stack(
        ds, paths["stack"], chunks={"time": -1, "y": chunk, "x": chunk}, overwrite=overwrite
    )
    rep.progress(f"generated {paths['stack']} in {time.perf_counter() - t:.1f} s")
    rep.result(f"stack: {paths['stack']}")
    st = io.open_stack(paths["stack"], time_dim="time")
    rep.progress(f"stack: {_describe_stack(st)}")
    with _cluster(rep, **cluster_kw):
        gm = _fit(rep, st, labels=None, opts=opts)
        _save_model(rep, gm, paths["model"], st, None, opts)
        _predict(rep, gm, st, paths["posterior"], labels=None, overwrite=overwrite)
        post = io._open_zarr(str(paths["posterior"]))
        scores = _time_scores(post, st.dataset)
        pngs = _time_quicklooks(post, out_dir / "plots", gm)
    rep.result(f"plots: {', '.join(str(p) for p in pngs.values())}")
    rep.result(
        f"states vs ground truth (states matched to classes): {scores['state_accuracy']:.3f} "
        f"of {scores['n']:,} pixel-dates"
    )
    rep.result(
        f"changed pixels: {scores['change_detected']:.3f} detected, "
        f"{scores['change_within_one_date']:.3f} with the change date within one date; "
        f"unchanged pixels flagged as changed: {scores['false_change']:.3f}"
    )
    rep.result(f"demo finished in {time.perf_counter() - rep.t0:.1f} s")
    rep.summary(
        status="ok",
        **scores,
        n_iter=gm.n_iter_,
        converged=gm.converged_,
        **{k: str(p) for k, p in paths.items()},
        plots=[str(p) for p in pngs.values()],
    )


def _time_scores(post: Any, truth_ds: Any) -> dict[str, float]:
    """State accuracy (states matched one-to-one to the true classes by the assignment
    that agrees most) and change-date agreement of a time-stack posterior."""
    import dask
    import dask.array as da
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    state = da.asarray(post["state"].data)
    truth = da.asarray(truth_ds["true_class"].data).rechunk(state.chunks)
    K = int(post.sizes["states"])
    C = len(truth_ds.attrs.get("class_names", ())) or K
    code = da.where(state >= 0, state.astype("int64") * C + truth.astype("int64"), K * C)
    counts, first, true_change = dask.compute(
        da.bincount(code.ravel(), minlength=K * C + 1),
        post["first_change"].data,
        truth_ds["true_change"].data,
    )
    counts = np.asarray(counts)[: K * C]
    M = counts.reshape(K, C)
    rows, cols = linear_sum_assignment(-M)
    n = int(M.sum())
    times = np.asarray(truth_ds["time"].values)
    idx = np.full(first.shape, -1)
    ok = ~np.isnat(first) if np.issubdtype(first.dtype, np.datetime64) else np.isfinite(first)
    idx[ok] = np.searchsorted(times, first[ok])
    changed = true_change >= 0
    nan = float("nan")
    return {
        "n": n,
        "state_accuracy": float(M[rows, cols].sum()) / n if n else nan,
        "change_detected": float((idx[changed] >= 0).mean()) if changed.any() else nan,
        "change_within_one_date": float((np.abs(idx[changed] - true_change[changed]) <= 1).mean())
        if changed.any()
        else nan,
        "false_change": float((idx[~changed] >= 0).mean()) if (~changed).any() else nan,
    }


def _time_quicklooks(ds: Any, out: Any, model: Any, *, date=None, max_size=1000) -> dict:
    """Time-stack PNGs; the EM curve per pixel (the HMM's objective is a total)."""
    from . import plot

    lb = None
    if model is not None:
        n = math.prod(ds.sizes[d] for d in ds["first_change"].dims)
        lb = [v / n for v in model.lower_bounds_]
    return plot.time_quicklooks(
        ds,
        out,
        date=date,
        transmat=None if model is None else model.transmat_,
        lower_bounds=lb,
        max_size=max_size,
    )


def _accuracy(posterior_path: Path, truth: Any) -> dict[str, float]:
    """Share of pixels with data whose MAP class is the true class, and the mean
    confidence of the right and of the wrong ones."""
    import dask

    from .io import _open_zarr

    post = _open_zarr(str(posterior_path))
    label, conf = post["label"], post["confidence"]
    valid = label >= 0
    hit = (label == truth) & valid
    miss = (label != truth) & valid
    n, n_hit, c_hit, c_miss = dask.compute(
        valid.sum(), hit.sum(), conf.where(hit).sum(), conf.where(miss).sum()
    )
    n, n_hit = int(n), int(n_hit)
    nan = float("nan")
    return {
        "n": n,
        "accuracy": n_hit / n if n else nan,
        "confidence_correct": float(c_hit) / n_hit if n_hit else nan,
        "confidence_wrong": float(c_miss) / (n - n_hit) if n > n_hit else nan,
    }


def _quicklooks(rep: Reporter, posterior_path: Path, out_dir: Path, model: Any | None) -> dict:
    from . import plot
    from .io import _open_zarr

    ds = _open_zarr(str(posterior_path))
    with _reading(f"POSTERIOR {posterior_path}"):
        plot.check_posterior(ds)
    pngs = plot.quicklooks(
        ds,
        out_dir,
        lower_bounds=None if model is None else list(model.lower_bounds_),
        tol=None if model is None else float(model.tol),
    )
    rep.progress(f"wrote {len(pngs)} PNGs to {out_dir}")
    return pngs


@cli.command("plot")
@click.argument("posterior", metavar="POSTERIOR")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Directory for the PNGs (created; existing PNGs of the same name are replaced).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    help="Model JSON: adds the log-likelihood-per-iteration curve (loglik.png).",
)
@click.option(
    "--max-size",
    type=click.IntRange(min=16),
    default=1000,
    show_default=True,
    help="Largest side of the map images, in (block-averaged) pixels.",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Compute the downsampled maps on this running Dask scheduler (default: local threads).",
)
@click.option(
    "--date",
    metavar="INDEX|DATE",
    help="Time-stack posteriors: the date of the state map, an index or a date (nearest; "
    "default the last).",
)
@click.option(
    "--colors",
    metavar="C,C,...|NAME=C,...",
    help="Class colours (#rrggbb or names) in class order or by name (default: the "
    "posterior's flag_colors, else a stable colour per class name, as export uses).",
)
@_common_options
@_command("plot")
def plot_cmd(rep: Reporter, posterior, out, model_path, max_size, scheduler, date, colors) -> None:
    """Quicklook PNGs of a POSTERIOR store.

    Writes class_map.png (most probable class, with a legend), confidence.png,
    probabilities.png (one panel per class) and, with --model, loglik.png.

    Maps are block-averaged (xarray coarsen) to at most --max-size pixels per side
    before anything is loaded, so any map size plots in bounded memory. 3-D stacks
    are shown at the first index of their leading dims.
    """
    from . import plot
    from .io import _open_zarr

    model = _load_model(model_path) if model_path else None
    with _reading(f"POSTERIOR {posterior}"):
        ds = _open_zarr(posterior)
        if not plot.is_time_posterior(ds):
            plot.check_posterior(ds)
    if colors is not None:
        var, dim = ("state", "states") if plot.is_time_posterior(ds) else ("label", "class")
        palette = _parse_colors(colors, [str(n) for n in ds[dim].values])
        ds[var].attrs["flag_colors"] = " ".join(palette)
    if plot.is_time_posterior(ds):
        ctx = _cluster(rep, scheduler) if scheduler else contextlib.nullcontext()
        try:
            with ctx:
                pngs = _time_quicklooks(ds, out, model, date=date, max_size=max_size)
        except ValueError as e:
            if "date" in str(e):
                raise BadInput(f"--date {date}: {_message(e)}") from e
            raise
        for p in pngs.values():
            rep.result(str(p))
        rep.summary(status="ok", plots=[str(p) for p in pngs.values()])
        return
    if date is not None:
        raise BadInput("--date: only for the posterior of a time stack (--method hmm)")
    ctx = _cluster(rep, scheduler) if scheduler else contextlib.nullcontext()
    with ctx:
        pngs = plot.quicklooks(
            ds,
            out,
            lower_bounds=None if model is None else list(model.lower_bounds_),
            tol=None if model is None else float(model.tol),
            max_size=max_size,
        )
    for p in pngs.values():
        rep.result(str(p))
    rep.summary(status="ok", plots=[str(p) for p in pngs.values()])


@cli.command()
@click.argument("path", metavar="PATH")
@_common_options
@_command("inspect")
def inspect(rep: Reporter, path) -> None:
    """Summarise a stack, model or posterior.

    PATH is a stack (Zarr store), a model (JSON) or a posterior (Zarr store).
    """
    from . import io

    p = Path(path)
    if not p.exists() and not io._is_many(path):
        raise BadInput(f"PATH {path} does not exist")
    low = path.lower()
    if io._is_many(path) or low.endswith(io.RASTER_SUFFIXES + io.NETCDF_SUFFIXES):
        with _reading(f"PATH {path}"):
            rep.result(_inspect_stack(path, _as_dataset(io, path)))
        return
    if p.is_file():
        if not low.endswith(".json"):
            raise BadInput(
                f"PATH {path}: daskem inspect reads model files (.json) and {io._ACCEPTS}"
            )
        rep.result(_inspect_model(path))
        return

    with _reading(f"PATH {path}"):
        ds = io._open_zarr(path)
    posterior = "probability" in ds.data_vars or "state_probability" in ds.data_vars
    if posterior and "model_class_names" in ds.attrs:
        rep.result(_inspect_posterior(path, ds))
    else:
        rep.result(_inspect_stack(path, ds))


def _fmt_dims(ds: Any) -> str:
    return ", ".join(f"{d}: {n}" for d, n in ds.sizes.items())


def _fmt_chunks(var: Any) -> str:
    if var.chunks is None:
        return "-"
    return " x ".join(str(c[0]) for c in var.chunks)


def _coord_lines(ds: Any) -> list[str]:
    lines = []
    for name, c in ds.coords.items():
        if c.ndim == 1 and c.size and c.dtype.kind in "iuf":
            units = c.attrs.get("units", "")
            lines.append(f"  {name}: {c.values[0]:.10g} .. {c.values[-1]:.10g} {units}".rstrip())
        elif c.ndim == 1 and c.size:
            lines.append(f"  {name}: {', '.join(str(v) for v in c.values[:12])}")
    return lines


def _as_dataset(io: Any, path: str) -> Any:
    """A GeoTIFF / several GeoTIFFs as a Dataset of one variable per band (for inspect)."""
    src = io._open_rasters(io._expand_paths(path)) if io._is_many(path) else io.open_path(path)
    if hasattr(src, "data_vars"):
        return src
    ds = src.to_dataset(dim="band").drop_vars("nodata_value", errors="ignore")
    for name in ds.data_vars:
        ds[name].attrs = {k: v for k, v in src.attrs.items() if k in ("nodata", "units")}
        if "nodata_value" in src.coords:
            value = float(src["nodata_value"].sel(band=name))
            ds[name].attrs["nodata"] = value if value == value else None
        if "spatial_ref" in ds.coords:
            ds[name].attrs["grid_mapping"] = "spatial_ref"
    return ds


def _crs_line(ds: Any) -> str | None:
    """The CRS of a dataset's grid mapping, if any."""
    for name, c in ds.coords.items():
        wkt = c.attrs.get("crs_wkt") or c.attrs.get("spatial_ref")
        if wkt or "grid_mapping_name" in c.attrs:
            try:
                from pyproj import CRS

                crs = CRS.from_user_input(wkt) if wkt else CRS.from_cf(dict(c.attrs))
                text = crs.to_string()
            except Exception:  # pyproj missing or an unusual definition
                text = str(wkt or c.attrs.get("grid_mapping_name"))[:80]
            return f"crs: {text} (grid mapping {name!r})"
    return None


def _inspect_stack(path: str, ds: Any) -> str:
    from .io import open_stack

    lines = [f"stack: {path}", f"dims: {_fmt_dims(ds)}"]
    crs = _crs_line(ds)
    lines.append(crs or "crs: none (no grid mapping variable)")
    try:
        st = open_stack(path)
        attrs = list(st.variables)
        chunks = ", ".join(f"{d} {c[0]}" for d, c in zip(st.dims, st.chunks, strict=True))
        lines.append(f"chunks: {chunks}; attributes: {', '.join(attrs)}")
    except (*BAD_INPUT, KeyError) as e:
        attrs = []
        lines.append(f"(no default attribute selection: {_message(e)})")
    lines.append("variables:")
    for name, var in ds.data_vars.items():
        role = "attribute" if name in attrs else ""
        if "flag_meanings" in var.attrs:
            role = "labels/classes: " + ", ".join(str(var.attrs["flag_meanings"]).split())
        desc = var.attrs.get("long_name", "")
        units = var.attrs.get("units", "")
        nodata = next(
            (
                var.attrs.get(k, var.encoding.get(k))
                for k in ("nodata", "_FillValue", "missing_value")
                if var.attrs.get(k, var.encoding.get(k)) is not None
            ),
            None,
        )
        lines.append(
            f"  {name}: {var.dtype} ({', '.join(var.dims)}) chunks {_fmt_chunks(var)}"
            + (f"  {desc}" if desc else "")
            + (f" [{units}]" if units else "")
            + f"  nodata {nodata if nodata is not None else 'none declared'}"
            + (f"  <{role}>" if role else "")
        )
    coords = _coord_lines(ds)
    if coords:
        lines.append("coordinates:")
        lines.extend(coords)
    for key in ("title", "source", "history"):
        if key in ds.attrs:
            lines.append(f"{key}: {ds.attrs[key]}")
    return "\n".join(lines)


def _inspect_posterior(path: str, ds: Any) -> str:
    a = ds.attrs
    dim = "states" if "states" in ds.coords else "class"
    classes = [str(c) for c in ds[dim].values] if dim in ds.coords else []
    lines = [
        f"posterior: {path}",
        f"dims: {_fmt_dims(ds)}",
        f"chunks: {_fmt_chunks(ds['confidence'])}",
        f"{'states' if dim == 'states' else 'classes'} ({len(classes)}): {', '.join(classes)}",
        "variables:",
    ]
    for name, var in ds.data_vars.items():
        lines.append(
            f"  {name}: {var.dtype} ({', '.join(var.dims)})  {var.attrs.get('long_name', '')}"
        )
    params = json.loads(a.get("model_parameters", "{}"))
    cov = params.get("covariance_type", a.get("model_covariance_type"))
    lines.append(
        f"model: {a.get('model_kind', 'gmm')} ({a.get('model_type', '?')}), "
        f"{a.get('model_n_components', '?')} components"
        + (f", {cov} covariance" if cov else "")
        + f", features {', '.join(json.loads(a.get('model_feature_names', '[]')))}"
    )
    state = "converged" if a.get("model_converged") else "did not converge"
    lb = a.get("model_lower_bound", "?")
    lb = f"{lb:.6f}" if isinstance(lb, float) else lb
    per = "of all the data" if a.get("model_kind") == "hmm" else "per pixel"
    lines.append(
        f"fit: {state} after {a.get('model_n_iter', '?')} iterations, "
        f"{'log-likelihood' if per != 'per pixel' else 'mean log-likelihood'} {lb} {per}"
    )
    for key, label in (
        ("daskem_input_path", "input"),
        ("model_training_path", "trained on"),
        ("daskem_date_created", "created"),
        ("daskem_version", "daskem"),
    ):
        if key in a:
            lines.append(f"{label}: {a[key]}")
    return "\n".join(lines)


def _inspect_model(path: str) -> str:
    gm = _load_model(path)
    names = list(gm.class_names_)
    options, components = gm._summary()
    lines = [
        f"model: {path}",
        f"kind: {gm.kind} ({type(gm).__name__}), {len(gm.component_classes_)} components"
        + (f", {options}" if options else ""),
        f"features ({gm.n_features_in_}): {', '.join(str(f) for f in gm.feature_names_in_)}",
        f"classes ({len(names)}): {', '.join(names)}",
        f"fit: {'converged' if gm.converged_ else 'did not converge'} after {gm.n_iter_} "
        f"iterations (tol {gm.tol:g}, max_iter {gm.max_iter}); "
        + (
            f"log-likelihood {gm.lower_bound_:.6f} of all the data (tol applies to it)"
            if getattr(gm, "sequence_input", False)
            else f"mean log-likelihood {gm.lower_bound_:.6f} per pixel"
        ),
        *components,
    ]
    prov = dict(getattr(gm, "provenance_", {}) or {})
    if prov:
        lines.append("provenance:")
        for key, value in prov.items():
            if isinstance(value, list) and key == "argv":
                value = " ".join(str(v) for v in value)
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _lost_cluster(e: BaseException) -> bool:
    """Whether ``e`` means the scheduler (or the connection to it) went away."""
    text = f"{type(e).__name__} {e}"
    return any(
        marker in text
        for marker in (
            "scheduler-connection-lost",
            "CommClosedError",
            "Client lost the connection",
            "StreamClosedError",
            # a pass's tasks cancelled "for reason: unknown": the scheduler went away
            # before the client noticed (seen when the scheduler is SIGKILLed mid-pass);
            # daskem never cancels its own tasks, and Ctrl-C is handled before this
            "CancelledError",
            # the client gave up reconnecting and closed itself before the next compute
            "No clients found",
        )
    )


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point (``daskem``)."""
    return cli.main(args=argv, prog_name="daskem")
