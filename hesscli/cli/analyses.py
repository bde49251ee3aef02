"""``hesscli trace | eigs | extremes | density | scan | plot``: options -> Settings -> api -> render."""

from __future__ import annotations

import functools
import inspect
import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from hesscli.cli import options as o
from hesscli.cli.app import app
from hesscli.cli.common import console, err_console, settings_from
from hesscli.config import Settings
from hesscli.errors import HesscliError

# ----------------------------------------------------------------------------- shared options
COMMON: dict[str, Any] = {
    "data": o.DataOpt,
    "model": o.ModelOpt,
    "model_arg": o.ModelArgOpt,
    "loss": o.LossOpt,
    "target_key": o.TargetKeyOpt,
    "forward_arg": o.ForwardArgOpt,
    "output": o.OutputOpt,
    "batchnorm": o.BatchnormOpt,
    "batch_size": o.BatchSizeOpt,
    "max_samples": o.MaxSamplesOpt,
    "curvature": o.CurvatureOpt,
    "params": o.ParamsOpt,
    "backend": o.BackendOpt,
    "device": o.DeviceOpt,
    "dtype": o.DtypeOpt,
    "seed": o.SeedOpt,
    "threads": o.ThreadsOpt,
    "out": o.OutOpt,
    "config": o.ConfigOpt,
    "trust_code": o.TrustCodeOpt,
    "json": o.JsonOpt,
    "quiet": o.QuietOpt,
    "debug": o.DebugOpt,
}

MethodOpt = Annotated[Optional[str], typer.Option("--method", help="hutch++ | hutchinson | exact (default: the backend's own; native: hutch++).")]
ProbesOpt = Annotated[Optional[int], typer.Option("--probes", min=1, help="Trace budget: probes (hutchinson) or products (hutch++). Default 100.")]
TolOpt = Annotated[Optional[float], typer.Option("--tol", min=0.0, help="eigs/extremes: relative error bound on each eigenvalue (default 1e-4 in float32, 1e-10 in float64; see README, What the flags mean).")]
TraceTolOpt = Annotated[Optional[float], typer.Option("--tol", min=0.0, help="Target stderr/|trace| (hutchinson): a pilot sample plans the probe count, the estimate averages fresh probes; the --probes budget caps it.")]
ScanTraceTolOpt = Annotated[Optional[float], typer.Option("--trace-tol", min=0.0, help="trace: target stderr/|trace| (hutchinson; probe count planned from a pilot sample).")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Number of eigenvalues per end. Default 10.")]
WhichOpt = Annotated[Optional[str], typer.Option("--which", help="largest (default) | smallest | both.")]
MaxIterOpt = Annotated[Optional[int], typer.Option("--max-iter", min=1, help="Most Lanczos products. Default max(200, 20k); stops earlier once converged.")]
SaveVectorsOpt = Annotated[Optional[bool], typer.Option("--save-vectors/--no-save-vectors", help="Save eigenvectors to OUT/vectors/<run_id>.pt.")]
ItersOpt = Annotated[Optional[int], typer.Option("--iters", min=2, help="Lanczos steps per SLQ run. Default 80.")]
RunsOpt = Annotated[Optional[int], typer.Option("--runs", min=1, help="Independent SLQ runs (random starts). Default 5.")]
SigmaOpt = Annotated[Optional[float], typer.Option("--sigma", min=0.0, help="Gaussian broadening of the density (default: from the spectrum's range).")]
GridOpt = Annotated[Optional[int], typer.Option("--grid", min=10, help="Density grid points. Default 1000.")]
HvpOpt = Annotated[Optional[str], typer.Option("--hvp", help="Native product path: auto (default) | func | autograd.")]
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint file (state_dict or safetensors with --model; TorchScript or a pickled module with --trust-code) or a Hugging Face model folder (config.json + weights).", show_default=False)]


def with_common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Append the common options to a command's signature; the command receives them as ``common``."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "common"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
             for name, ann in COMMON.items()]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        common = {name: kwargs.pop(name, None) for name in COMMON}
        return fn(*args, common=common, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}
    return wrapper


# ----------------------------------------------------------------------------- running
@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm, kill) behaves like Ctrl-C: finished work stays, no partial part file."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _progress(settings: Settings, description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A Rich progress bar with ETA on stderr, counting curvature products."""
    if not enabled or settings.quiet or settings.json:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("products"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, completed=min(n, total))


def _load(checkpoint: Path, settings: Settings, ctx: Any):
    from hesscli.loading import build_problem, load_checkpoint, load_data, load_loss, resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype)
    loss = load_loss(settings.loss)
    loaded = load_checkpoint(checkpoint, settings)
    data = load_data(settings, device=device, dtype=dtype, rank=ctx.rank, world_size=ctx.world_size)
    return build_problem(loaded, data, loss, settings, device=device, dtype=dtype)


def _note(settings: Settings, text: str) -> None:
    if not (settings.quiet or settings.json):
        err_console().print(f"[dim]{text}[/dim]")


def keep_unsaved(outcomes: list, settings: Settings, reason: str) -> None:
    """Results that could not be written: print them as JSON (stdout with ``--json``, else stderr),
    then stop with exit code 1 saying where they are.

    Raises:
        ResultsNotSaved: always.
    """
    from hesscli.errors import ResultsNotSaved
    from hesscli.results.render import outcome_to_json

    payload = [outcome_to_json(o) for o in outcomes]
    text = json.dumps(payload[0] if len(payload) == 1 else payload)
    typer.echo(text, err=not settings.json)
    where = "stdout" if settings.json else "stderr"
    raise ResultsNotSaved(f"{reason.rstrip('.')}; the result was computed but not saved: it is printed above as "
                          f"JSON on {where}, and nothing of it was added to the tables")


def run_single(command: str, checkpoint: Path, common: dict[str, Any], specific: dict[str, Any]) -> None:
    """Shared body of trace/eigs/extremes/density."""
    from hesscli import distributed
    from hesscli.api import analyse, expected_products
    from hesscli.results.parquet import write_outcomes
    from hesscli.results.render import outcome_to_json, render_outcome
    from hesscli.results.tables import save_eigenvectors

    if command == "trace":  # `trace --tol` is the relative-stderr target
        specific = {**specific, "trace_tol": specific.pop("tol", None)}
    settings = settings_from(command, **common, **specific)
    if command == "trace" and settings.trace_tol is None and settings.tol is not None:
        from dataclasses import replace as _replace

        settings = _replace(settings, trace_tol=settings.tol, tol=None)  # `[trace] tol = ...` in hesscli.toml
    ctx = distributed.context(settings.device)
    if ctx.active:
        from dataclasses import replace

        settings = replace(settings, device=distributed.device_for(ctx, settings.device))
    if ctx.is_main:  # a results folder that cannot take the tables is refused before any work
        from hesscli.results.parquet import prepare_out

        prepare_out(settings.out)
    problem = _load(checkpoint, settings, ctx)
    if ctx.is_main:
        bn = "batch" if settings.batchnorm == "batch" else "running"
        tokens = f" ({problem.data.n_units:,} {problem.loss.unit})" if problem.loss.unit != "samples" else ""
        _note(settings, f"{problem.model.__class__.__name__} in eval mode (BatchNorm {bn} statistics, dropout off); "
                        f"{problem.n_params:,} parameters, {problem.data.n_total:,} samples{tokens}, {problem.device}, "
                        f"{str(problem.dtype).replace('torch.', '')}, backend {settings.backend}")
    reduce = ctx.all_reduce_sum if ctx.active else None
    total = expected_products(command, settings, problem.n_params)
    with _sigterm_as_interrupt(), _progress(settings, f"{command}", total, ctx.is_main) as tick:
        outcome = analyse(problem, command, settings, reduce=reduce, on_matvecs=tick)
    if not ctx.is_main:
        return
    try:
        write_outcomes(settings.out, [outcome])
        saved = save_eigenvectors(settings.out, outcome) if settings.save_vectors else None
    except HesscliError as e:  # keep the result: printed as JSON, and say so
        keep_unsaved([outcome], settings, str(e))
    if settings.json:
        payload = outcome_to_json(outcome)
        if saved is not None:
            payload["eigenvectors_path"] = str(saved)
        typer.echo(json.dumps(payload))
    elif not settings.quiet:
        render_outcome(outcome, console())
        err_console().print(f"[dim]tables written under {settings.out}/[/dim]")


# ----------------------------------------------------------------------------- commands
@app.command("trace")
@with_common_options
def trace_cmd(checkpoint: CheckpointArg, *, method: MethodOpt = None, probes: ProbesOpt = None,
              tol: TraceTolOpt = None, hvp: HvpOpt = None, common: dict[str, Any]) -> None:
    """Hessian (or GGN) trace of the mean loss, with standard error and 95% CI, plus per-tensor traces.

    Example:

        hesscli trace ckpt.pt --model model.py:Net --data data.pt --method hutch++ --probes 200
    """
    run_single("trace", checkpoint, common, {"method": method, "probes": probes, "tol": tol, "hvp": hvp})


@app.command("eigs")
@with_common_options
def eigs_cmd(checkpoint: CheckpointArg, *, top_k: TopKOpt = None, which: WhichOpt = None, tol: TolOpt = None,
             max_iter: MaxIterOpt = None, save_vectors: SaveVectorsOpt = None, hvp: HvpOpt = None,
             common: dict[str, Any]) -> None:
    """Largest / smallest eigenvalues (Lanczos, full reorthogonalisation) with residuals and convergence flags.

    Example:

        hesscli eigs ckpt.pt --top-k 10 --which both
    """
    run_single("eigs", checkpoint, common, {"top_k": top_k, "which": which, "tol": tol, "max_iter": max_iter,
                                             "save_vectors": save_vectors, "hvp": hvp})


@app.command("extremes")
@with_common_options
def extremes_cmd(checkpoint: CheckpointArg, *, tol: TolOpt = None, max_iter: MaxIterOpt = None,
                 hvp: HvpOpt = None, common: dict[str, Any]) -> None:
    """λ_max, λ_min (negative when the Hessian is indefinite), condition number, negative ratio.

    Example:

        hesscli extremes ckpt.pt --dtype float64
    """
    run_single("extremes", checkpoint, common, {"tol": tol, "max_iter": max_iter, "hvp": hvp})


@app.command("density")
@with_common_options
def density_cmd(checkpoint: CheckpointArg, *, iters: ItersOpt = None, runs: RunsOpt = None, sigma: SigmaOpt = None,
                grid: GridOpt = None, hvp: HvpOpt = None, common: dict[str, Any]) -> None:
    """Eigenvalue spectral density by stochastic Lanczos quadrature; raw Ritz nodes/weights saved too.

    Example:

        hesscli density ckpt.pt --iters 80 --runs 5
    """
    run_single("density", checkpoint, common, {"iters": iters, "runs": runs, "sigma": sigma, "grid": grid,
                                                "hvp": hvp})


AnalysesOpt = Annotated[Optional[str], typer.Option("--analyses", help="Comma-separated: trace,eigs,extremes,density (default all).")]
GlobOpt = Annotated[Optional[str], typer.Option("--glob", help="File pattern inside the folder, e.g. 'ckpt_*.pt'.")]
ResumeOpt = Annotated[Optional[bool], typer.Option("--resume/--no-resume", help="Skip (checkpoint content, analysis, options) already done (default on).")]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="I/N: take part I (1-based) of N disjoint parts, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=1-N.")]


@app.command("scan")
@with_common_options
def scan_cmd(
    target: Annotated[str, typer.Argument(help="Folder of checkpoints (files, or model folders such as a Trainer's checkpoint-N/), or a glob such as 'runs/exp1/*.pt'.", show_default=False)],
    *,
    analyses: AnalysesOpt = None, glob: GlobOpt = None, resume: ResumeOpt = None, shard: ShardOpt = None,
    method: MethodOpt = None, probes: ProbesOpt = None, trace_tol: ScanTraceTolOpt = None, tol: TolOpt = None,
    top_k: TopKOpt = None,
    which: WhichOpt = None, max_iter: MaxIterOpt = None, iters: ItersOpt = None, runs: RunsOpt = None,
    sigma: SigmaOpt = None, grid: GridOpt = None, hvp: HvpOpt = None, common: dict[str, Any],
) -> None:
    """Every checkpoint of a training run, in step order: resumable, shardable, one failure never stops the rest.

    Exit code 1 when some checkpoint failed (the others are complete; failures are rows in `runs`).

    Example:

        hesscli scan runs/exp1/ --analyses trace,eigs,density --shard 1/4
    """
    from hesscli.cli.scan_view import run_scan_command

    parsed = tuple(a.strip() for a in analyses.split(",") if a.strip()) if analyses else None
    specific = {"analyses": parsed, "glob": glob, "resume": resume, "shard": shard, "method": method,
                "probes": probes, "trace_tol": trace_tol, "tol": tol, "top_k": top_k, "which": which, "max_iter": max_iter,
                "iters": iters, "runs": runs, "sigma": sigma, "grid": grid, "hvp": hvp}
    code = run_scan_command(target, settings_from("scan", **common, **specific))
    if code:
        raise typer.Exit(code)


@app.command("plot")
def plot_cmd(
    out: Annotated[Path, typer.Argument(help="Results folder written by hesscli (default ./hesscli-results).")] = Path("hesscli-results"),
    to: Annotated[Optional[Path], typer.Option("--to", help="Where to write the PNGs (default OUT/plots).")] = None,
    debug: o.DebugOpt = None,
) -> None:
    """PNG figures: spectral density per checkpoint, top eigenvalues, curvature against step.

    Example:

        hesscli plot hesscli-results/ --to figures/
    """
    from hesscli.results.plots import make_plots

    for path in make_plots(out, to):
        console().print(str(path))
