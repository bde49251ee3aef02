"""Analyses as functions.

Two entry points:

* :func:`analyse` runs one analysis on a loaded :class:`~hesscli.loading.problem.Problem` and
  returns an :class:`~hesscli.results.records.Outcome` (provenance + result), which the CLI,
  ``scan`` and :class:`~hesscli.monitor.CurvatureMonitor` write to the tables;
* :func:`trace`, :func:`eigs`, :func:`extremes`, :func:`density` take ``(model, loss, data)``
  straight from Python and return the result dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import torch
from torch import nn

import hesscli
from hesscli.algorithms.lanczos import DEFAULT_MAX_ITER
from hesscli.backends import get_backend
from hesscli.config import Settings
from hesscli.errors import InputError, UnsupportedAnalysis
from hesscli.loading.problem import Problem
from hesscli.results.fileops import path_text
from hesscli.results.records import (
    DensityResult,
    EigsResult,
    ExtremesResult,
    Outcome,
    RunInfo,
    TraceResult,
)

__all__ = ["ANALYSES", "analyse", "failed_outcome", "options_key", "loss_value", "trace", "eigs",
           "extremes", "density", "expected_products"]

ANALYSES = ("trace", "eigs", "extremes", "density")

Reduce = Callable[[torch.Tensor], torch.Tensor]

_OPTION_FIELDS = {
    "trace": ("method", "probes", "trace_tol"),
    "eigs": ("top_k", "which", "tol", "max_iter"),
    "extremes": ("tol", "max_iter"),
    "density": ("iters", "runs", "sigma", "grid"),
}
_COMMON_FIELDS = ("backend", "curvature", "params", "loss", "data", "max_samples", "dtype", "seed")


def options_key(analysis: str, settings: Settings) -> str:
    """Canonical JSON of everything that changes the numbers of ``analysis`` (scan ``--resume`` key)."""
    keys = _COMMON_FIELDS + _OPTION_FIELDS[analysis]
    values = {k: getattr(settings, k) for k in keys}
    values["params"] = list(values["params"])
    values["analysis"] = analysis
    return json.dumps(values, sort_keys=True, default=str)


def method_of(analysis: str, settings: Settings, backend: Any | None = None) -> str:
    """The method an analysis really uses: the trace method, else the backend's own algorithm
    (its ``capabilities.analyses[analysis][0]``, e.g. PyHessian's power iteration)."""
    if analysis == "trace":
        return settings.method or "default"
    if backend is not None and analysis in backend.capabilities.analyses:
        return backend.capabilities.analyses[analysis][0]
    return {"eigs": "lanczos", "extremes": "lanczos", "density": "slq"}[analysis]


def with_backend_defaults(backend: Any, analysis: str, settings: Settings) -> Settings:
    """``--method`` left unset means the backend's own default trace method: the first it lists
    (native and eigenthings: ``hutch++``; PyHessian: ``hutchinson``; BackPACK: ``exact``)."""
    methods = backend.capabilities.analyses.get("trace", ())
    if analysis == "trace" and methods and settings.method is None:
        return dataclasses.replace(settings, method=methods[0])
    return settings


def expected_products(analysis: str, settings: Settings, n_params: int) -> int:
    """A budget for progress bars (iterative methods may stop earlier)."""
    if analysis == "trace":
        return n_params if settings.method == "exact" else settings.probes
    if analysis == "density":
        return settings.iters * settings.runs
    k = settings.top_k * (2 if settings.which == "both" else 1) if analysis == "eigs" else 2
    return min(n_params, settings.max_iter or max(DEFAULT_MAX_ITER, 20 * k))


def check_supported(backend: Any, analysis: str, settings: Settings) -> None:
    """Refuse, before any work, what the backend cannot do (exit 2 with what it can)."""
    caps = backend.capabilities
    name = backend.name
    if analysis not in caps.analyses:
        raise UnsupportedAnalysis(
            f"--backend {name} cannot run '{analysis}'; it supports: {', '.join(caps.analyses)}"
        )
    if analysis == "trace" and settings.method not in caps.analyses["trace"]:
        raise UnsupportedAnalysis(
            f"--backend {name} has no trace --method {settings.method}; it supports: "
            f"{', '.join(caps.analyses['trace'])}"
        )
    if settings.curvature not in caps.curvatures:
        raise UnsupportedAnalysis(
            f"--backend {name} cannot use --curvature {settings.curvature}; it supports: {', '.join(caps.curvatures)}"
        )
    if analysis == "eigs":
        wanted = ("largest", "smallest") if settings.which == "both" else (settings.which,)
        missing = [w for w in wanted if w not in caps.whiches]
        if missing:
            raise UnsupportedAnalysis(
                f"--backend {name} cannot compute --which {settings.which}; it supports: {', '.join(caps.whiches)}"
            )
    if analysis == "extremes" and "smallest" not in caps.whiches:
        raise UnsupportedAnalysis(f"--backend {name} cannot compute the smallest eigenvalue needed by 'extremes'")


def _check_backend_fits(backend: Any, problem: Problem) -> None:
    """Third-party backends call ``model(x)`` on tensors and weight batches by sample count only."""
    if getattr(backend, "name", "native") == "native":
        return
    data, loss = problem.data, problem.loss
    if data.input_keys or problem.call.forward_args or problem.call.output is not None:
        how = f"on dict inputs ({', '.join(data.input_keys)})" if data.input_keys else "with --forward-arg/--output"
        raise UnsupportedAnalysis(f"--backend {backend.name} cannot call the model {how}; use --backend native")
    if loss.count is not None:
        raise UnsupportedAnalysis(
            f"--backend {backend.name} weights batches by samples, not by the {loss.unit} that --loss {loss.name} "
            f"averages over; use --backend native"
        )


@torch.no_grad()
def loss_value(problem: Problem, reduce: Reduce | None = None) -> float:
    """Mean loss over the dataset (all ranks)."""
    total = torch.zeros((), dtype=torch.float64, device=problem.device)
    data = problem.data
    weights = data.weights if len(data.weights) == len(data.batches) else [len(y) / data.n_total for _, y in data.batches]
    for (x, y), w in zip(data.batches, weights):
        total += w * problem.loss.fn(problem.output(x), y).to(torch.float64)
    if reduce is not None:
        total = reduce(total.reshape(1)).reshape(())
    return float(total)


def _run_info(problem: Problem | None, analysis: str, settings: Settings, *, checkpoint: str, sha256: str,
              step: int | None, started: datetime, seconds: float, n_hvp: int, loss: float | None,
              status: str = "ok", error: str | None = None, backend: Any | None = None) -> RunInfo:
    return RunInfo(
        run_id=uuid.uuid4().hex,
        checkpoint=path_text(checkpoint),  # names that are not UTF-8 keep their bytes as \xNN
        checkpoint_sha256=sha256,
        step=step,
        analysis=analysis,
        backend=settings.backend,
        method=method_of(analysis, settings, backend),
        curvature=settings.curvature,
        device=str(problem.device) if problem is not None else settings.device,
        dtype=str(problem.dtype).replace("torch.", "") if problem is not None else settings.dtype,
        seed=settings.seed,
        n_params=problem.n_params if problem is not None else 0,
        n_samples=problem.data.n_total if problem is not None else 0,
        loss_value=loss,
        n_hvp=n_hvp,
        seconds=seconds,
        hesscli_version=hesscli.__version__,
        torch_version=torch.__version__,
        started_at=started.isoformat(timespec="seconds"),
        status=status,
        error=error,
        options=options_key(analysis, settings),
    )


def analyse(problem: Problem, analysis: str, settings: Settings, *, reduce: Reduce | None = None,
            on_matvecs: Callable[[int], None] | None = None, backend: Any | None = None) -> Outcome:
    """Run one analysis on a loaded problem and return provenance plus result.

    Args:
        problem: what to analyse (model in eval mode, data, loss, selected parameters).
        analysis: ``trace`` | ``eigs`` | ``extremes`` | ``density``.
        settings: resolved options (method, probes, top_k, seed, ...).
        reduce: all-reduce for products under torch.distributed (``None`` in one process).
        on_matvecs: progress callback receiving the running product count.
        backend: a backend instance (built from ``settings.backend`` when omitted).

    Returns:
        The :class:`Outcome`; probes come from ``torch.Generator().manual_seed(settings.seed)``, so
        the same seed gives the same numbers on every checkpoint, rank and device.

    Raises:
        InputError: an unknown analysis or something the backend cannot do (before any product).
    """
    if analysis not in ANALYSES:
        raise InputError(f"unknown analysis {analysis!r}; choose from {', '.join(ANALYSES)}")
    if backend is None:
        kwargs: dict[str, Any] = {"on_matvecs": on_matvecs}
        if reduce is not None:
            kwargs["reduce"] = reduce
        backend = get_backend(settings.backend, **kwargs)
    settings = with_backend_defaults(backend, analysis, settings)
    check_supported(backend, analysis, settings)
    _check_backend_fits(backend, problem)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    result = getattr(backend, analysis)(problem, settings, generator)
    seconds = time.perf_counter() - t0
    ck = problem.checkpoint
    run = _run_info(problem, analysis, settings, checkpoint=ck.source, sha256=ck.sha256, step=ck.step,
                    started=started, seconds=seconds, n_hvp=result.n_hvp, loss=loss_value(problem, reduce),
                    backend=backend)
    return Outcome(run=run, result=result)


def failed_outcome(checkpoint: str, analysis: str, settings: Settings, error: BaseException | str, *,
                   sha256: str = "", step: int | None = None, problem: Problem | None = None) -> Outcome:
    """A ``status=failed`` runs row carrying the error text (a scan records it and carries on)."""
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    run = _run_info(problem, analysis, settings, checkpoint=checkpoint, sha256=sha256, step=step,
                    started=datetime.now(timezone.utc), seconds=0.0, n_hvp=0, loss=None, status="failed",
                    error=text)
    return Outcome(run=run, result=None)


def _settings(options: dict[str, Any]) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    if options.get("threads") is not None:  # a process-wide setting: the caller owns it
        raise InputError(f"threads={options['threads']!r}: the Python API leaves torch's threads to the caller; "
                         "call torch.set_num_threads(N) before the analysis instead")
    if "params" in options and isinstance(options["params"], str):
        options["params"] = (options["params"],)
    return Settings(**options)


def _python(analysis: str, model: nn.Module, loss: Any, data: Any, options: dict[str, Any]):
    from hesscli.loading import problem_from_python

    settings = _settings(options)
    problem = problem_from_python(model, loss, data, settings)  # a private copy: ``model`` stays as it is
    return analyse(problem, analysis, settings).result


def trace(model: nn.Module, loss: Any, data: Any, **options: Any) -> TraceResult:
    """Trace of the Hessian (or GGN) of the mean loss of ``model`` over ``data``.

    Args:
        model: any ``nn.Module``; it is analysed as a private copy in eval mode and never changed
            (dtype, values, ``requires_grad``, ``.grad`` and train/eval mode stay as they were).
        loss: a loss name (``"cross_entropy"``, ``"mse"``, ...) or ``callable(outputs, targets)``.
        data: ``(inputs, targets)`` tensors, a torch ``Dataset`` or a ``DataLoader``.
        **options: any :class:`~hesscli.config.Settings` field, e.g. ``method="hutchinson"``,
            ``probes=200``, ``curvature="ggn"``, ``params=("fc.*",)``, ``seed=1``.

    Example:
        >>> import torch, hesscli
        >>> X = torch.randn(32, 3, dtype=torch.float64); y = torch.randn(32, 1, dtype=torch.float64)
        >>> r = hesscli.trace(torch.nn.Linear(3, 1), "mse", (X, y), method="exact", dtype="float64")
        >>> round(r.estimate, 6) == round(float(2 * ((X**2).sum() / 32 + 1)), 6)
        True
    """
    return _python("trace", model, loss, data, options)  # type: ignore[return-value]


def eigs(model: nn.Module, loss: Any, data: Any, **options: Any) -> EigsResult:
    """Top-k (``which="largest"``), bottom-k (``"smallest"``) or both ends of the spectrum (Lanczos)."""
    return _python("eigs", model, loss, data, options)  # type: ignore[return-value]


def extremes(model: nn.Module, loss: Any, data: Any, **options: Any) -> ExtremesResult:
    """λ_max, λ_min, condition number and negative ratio from one Lanczos run."""
    return _python("extremes", model, loss, data, options)  # type: ignore[return-value]


def density(model: nn.Module, loss: Any, data: Any, **options: Any) -> DensityResult:
    """Spectral density by stochastic Lanczos quadrature (``runs`` x ``iters`` products)."""
    return _python("density", model, loss, data, options)  # type: ignore[return-value]
