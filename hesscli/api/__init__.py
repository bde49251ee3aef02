"""Analyses as functions.

Two entry points:

* :func:`analyse` runs one analysis on a loaded :class:`~hesscli.loading.problem.Problem` and
  returns an :class:`~hesscli.results.records.Outcome` (provenance + result), which the CLI,
  ``scan`` and :class:`~hesscli.monitor.CurvatureMonitor` write to the tables;
* one function per registered analysis -- :func:`trace`, :func:`eigs`, :func:`extremes`,
  :func:`density`, ... -- taking ``(model, loss, data, **options)`` straight from Python and
  returning the result dataclass (generated from :data:`hesscli.analyses.REGISTRY`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import hesscli
from hesscli.analyses import NAMES, REGISTRY, get
from hesscli.backends import get_backend
from hesscli.backends.base import Backend, Reduce
from hesscli.config import Settings
from hesscli.errors import InputError, UnsupportedAnalysis
from hesscli.loading.problem import Problem
from hesscli.results.fileops import path_text
from hesscli.results.records import Outcome, RunInfo

__all__ = ["ANALYSES", "analyse", "failed_outcome", "options_key", "loss_value", "check_supported",
           "check_fits", "expected_products", *NAMES]

ANALYSES = NAMES


def options_key(analysis: str, settings: Any) -> str:
    """Canonical JSON of everything that changes the numbers of ``analysis`` (scan ``--resume`` key)."""
    a = get(analysis)
    return a.resume_key(settings.problem, settings.engine, a.options(settings))


def expected_products(analysis: str, settings: Any, n_params: int) -> int:
    """A budget for progress bars (iterative methods may stop earlier)."""
    a = get(analysis)
    return a.expected_products(a.options(settings), n_params)


def check_supported(backend: Backend, analysis: str, settings: Any) -> None:
    """Refuse, before any work, what the backend cannot do (exit 2 with what it can)."""
    a = get(analysis)
    a.check(backend, a.defaults_for(backend, a.options(settings)), settings.curvature)


def check_fits(backend: Backend, problem: Problem) -> None:
    """Backends that call ``model(x)`` on tensors and weigh batches by sample count refuse other problems."""
    if not backend.capabilities.calls_model_on_tensors_only:
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


def _run_info(problem: Problem | None, analysis: str, settings: Any, *, checkpoint: str, sha256: str,
              step: int | None, started: datetime, seconds: float, n_hvp: int, loss: float | None,
              status: str = "ok", error: str | None = None, backend: Backend | None = None,
              options: Any = None) -> RunInfo:
    a = get(analysis)
    if options is None:
        options = a.options(settings)
    return RunInfo(
        run_id=uuid.uuid4().hex,
        checkpoint=path_text(checkpoint),  # names that are not UTF-8 keep their bytes as \xNN
        checkpoint_sha256=sha256,
        step=step,
        analysis=analysis,
        backend=settings.backend,
        method=a.method(backend, options),
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
        options=a.resume_key(settings.problem, settings.engine, options),
    )


def analyse(problem: Problem, analysis: str, settings: Any, *, reduce: Reduce | None = None,
            on_matvecs: Callable[[int], None] | None = None, backend: Backend | None = None,
            shared: Any = None) -> Outcome:
    """Run one analysis on a loaded problem and return provenance plus result.

    Args:
        problem: what to analyse (model in eval mode, data, loss, selected parameters).
        analysis: a registered analysis (``trace`` | ``eigs`` | ``extremes`` | ``density`` | ...).
        settings: resolved options (:class:`~hesscli.config.Settings`); the analysis reads its own.
        reduce: all-reduce for products under torch.distributed (``None`` in one process).
        on_matvecs: progress callback receiving the running product count.
        backend: a backend instance (built from ``settings.engine`` when omitted); it must have
            been built for the same engine options.
        shared: the checkpoint's :class:`~hesscli.runner.SharedRuns`, letting one Lanczos run
            serve several analyses (see :class:`~hesscli.runner.CheckpointRunner`).

    Returns:
        The :class:`Outcome`; probes come from ``torch.Generator().manual_seed(settings.seed)``, so
        the same seed gives the same numbers on every checkpoint, rank and device.

    Raises:
        InputError: an unknown analysis or something the backend cannot do (before any product).
    """
    if analysis not in REGISTRY:
        raise InputError(f"unknown analysis {analysis!r}; choose from {', '.join(REGISTRY)}")
    a = REGISTRY[analysis]
    if backend is None:
        backend = get_backend(settings.engine, reduce=reduce, on_matvecs=on_matvecs)
    elif backend.engine.backend != settings.backend or backend.engine.curvature != settings.curvature:
        raise ValueError(f"backend built for {backend.engine}, settings ask for {settings.engine}")
    options = a.defaults_for(backend, a.options(settings))
    a.check(backend, options, settings.curvature)
    check_fits(backend, problem)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    result = a.run(backend, problem, options, generator, shared)
    seconds = time.perf_counter() - t0
    ck = problem.checkpoint
    run = _run_info(problem, analysis, settings, checkpoint=ck.source, sha256=ck.sha256, step=ck.step,
                    started=started, seconds=seconds, n_hvp=result.n_hvp, loss=loss_value(problem, reduce),
                    backend=backend, options=options)
    return Outcome(run=run, result=result)


def failed_outcome(checkpoint: str, analysis: str, settings: Any, error: BaseException | str, *,
                   sha256: str = "", step: int | None = None, problem: Problem | None = None,
                   backend: Backend | None = None) -> Outcome:
    """A ``status=failed`` runs row carrying the error text (a scan records it and carries on)."""
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    a = get(analysis)
    options = a.options(settings)
    if backend is not None:
        options = a.defaults_for(backend, options)
    run = _run_info(problem, analysis, settings, checkpoint=checkpoint, sha256=sha256, step=step,
                    started=datetime.now(UTC), seconds=0.0, n_hvp=0, loss=None, status="failed",
                    error=text, backend=backend, options=options)
    return Outcome(run=run, result=None)


def settings_for_python(options: dict[str, Any]) -> Settings:
    """Settings from the keyword options of the Python functions (any option key)."""
    names = {f.name for f in dataclasses.fields(Settings)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    if options.get("threads") is not None:  # a process-wide setting: the caller owns it
        raise InputError(f"threads={options['threads']!r}: the Python API leaves torch's threads to the caller; "
                         "call torch.set_num_threads(N) before the analysis instead")
    if "params" in options and isinstance(options["params"], str):
        options["params"] = (options["params"],)
    return Settings(**options)


def _own_names(analysis: str, options: dict[str, Any]) -> dict[str, Any]:
    """The analysis's own option names (``tol`` of ``trace``, as its docstring lists them) under
    their settings keys (``trace_tol``): ``hesscli.trace(..., tol=0.01)`` is trace's tolerance, as
    ``hesscli trace --tol`` is, not the eigenvalue tolerance of the other analyses."""
    from hesscli.options import declared

    out = dict(options)
    for key, field, _ in declared(REGISTRY[analysis].Options):
        if key != field.name and field.name in out:
            if key in out:
                raise InputError(f"{field.name}= and {key}= are the same option of {analysis}: pass one of them")
            out[key] = out.pop(field.name)
    return out


def _python(analysis: str, model: nn.Module, loss: Any, data: Any, options: dict[str, Any]) -> Any:
    from hesscli.loading import problem_from_python

    settings = settings_for_python(_own_names(analysis, options))
    problem = problem_from_python(model, loss, data, settings)  # a private copy: ``model`` stays as it is
    return analyse(problem, analysis, settings).result


_FACADE_DOC = """{summary}

    Args:
        model: any ``nn.Module``; it is analysed as a private copy in eval mode and never changed
            (dtype, values, ``requires_grad``, ``.grad`` and train/eval mode stay as they were).
        loss: a loss name (``"cross_entropy"``, ``"mse"``, ...) or ``callable(outputs, targets)``.
        data: ``(inputs, targets)`` tensors, a torch ``Dataset`` or a ``DataLoader``.
        **options: this analysis's options ({own}) and any problem or engine option
            (``dtype``, ``seed``, ``params``, ``curvature``, ``backend``, ...).

    Returns:
        ``{result}``.
{example}"""


def _facade(name: str) -> Callable[..., Any]:
    a = REGISTRY[name]

    def run(model: nn.Module, loss: Any, data: Any, **options: Any) -> Any:
        return _python(name, model, loss, data, options)

    own = ", ".join(f"``{f.name}``" for f in dataclasses.fields(a.Options))
    run.__name__ = run.__qualname__ = name
    run.__doc__ = _FACADE_DOC.format(summary=a.summary, own=own, result=a.result_type.split(":")[1],
                                     example=a.python_example)
    return run


for _name in NAMES:
    globals()[_name] = _facade(_name)
del _name

if TYPE_CHECKING:  # what type checkers see of the generated functions of the built-in analyses
    from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult

    def trace(model: nn.Module, loss: Any, data: Any, **options: Any) -> TraceResult: ...
    def eigs(model: nn.Module, loss: Any, data: Any, **options: Any) -> EigsResult: ...
    def extremes(model: nn.Module, loss: Any, data: Any, **options: Any) -> ExtremesResult: ...
    def density(model: nn.Module, loss: Any, data: Any, **options: Any) -> DensityResult: ...
