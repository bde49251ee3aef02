"""The analysis commands, generated from :data:`hesscli.analyses.REGISTRY`, plus ``scan`` and ``plot``.

Each command is thin: flags -> settings -> load the problem -> run -> write and render.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hesscli.analyses import REGISTRY, Analysis
from hesscli.cli import options as o
from hesscli.cli import session
from hesscli.cli.app import app
from hesscli.cli.common import console, err_console, settings_from
from hesscli.errors import HesscliError


def run_single(analysis: Analysis, checkpoint: Path, values: dict[str, Any]) -> None:
    """Shared body of every analysis command."""
    from hesscli.api import analyse
    from hesscli.loading import load_problem
    from hesscli.results.parquet import write_outcomes
    from hesscli.results.render import outcome_to_json, render_outcome
    from hesscli.results.tables import save_eigenvectors

    settings = settings_from(analysis.name, **values)
    analysis.validate(analysis.options(settings))
    ctx, settings = session.start(settings)
    problem = load_problem(checkpoint, settings.problem, ctx)
    if ctx.is_main:
        bn = "batch" if settings.batchnorm == "batch" else "running"
        tokens = f" ({problem.data.n_units:,} {problem.loss.unit})" if problem.loss.unit != "samples" else ""
        session.note(settings, f"{problem.model.__class__.__name__} in eval mode (BatchNorm {bn} statistics, dropout "
                               f"off); {problem.n_params:,} parameters, {problem.data.n_total:,} samples{tokens}, "
                               f"{problem.device}, {str(problem.dtype).replace('torch.', '')}, backend {settings.backend}")
    reduce = ctx.all_reduce_sum if ctx.active else None
    total = analysis.expected_products(analysis.options(settings), problem.n_params)
    with session.sigterm_as_interrupt(), session.product_progress(settings, analysis.name, total, ctx.is_main,
                                                                          analysis.progress_unit) as tick:
        outcome = analyse(problem, analysis.name, settings, reduce=reduce, on_matvecs=tick)
    if not ctx.is_main:
        return
    saved = None
    try:
        write_outcomes(settings.out, [outcome])
        if getattr(settings, "save_vectors", False):
            saved = save_eigenvectors(settings.out, outcome)
    except HesscliError as e:  # keep the result: printed as JSON, and say so
        session.keep_unsaved([outcome], settings, str(e))
    if settings.json:
        payload = outcome_to_json(outcome)
        if saved is not None:
            payload["eigenvectors_path"] = str(saved)
        typer.echo(json.dumps(payload))
    elif not settings.quiet:
        render_outcome(outcome, console())
        err_console().print(f"[dim]tables written under {settings.out}/[/dim]")


def _help(summary: str, example: str, description: str = "") -> str:
    text = summary + (f"\n\n{description}" if description else "")
    return f"{text}\n\nExample:\n\n    {example}"


def _register(analysis: Analysis) -> None:
    specs = [*o.problem_options(), *o.engine_options(("backend", "curvature", *analysis.engine_options)),
             *o.run_options(), *o.analysis_options(analysis.Options)]

    def body(checkpoint: Path, *, values: dict[str, Any]) -> None:
        run_single(analysis, checkpoint, values)

    app.command(analysis.name)(o.make_command(body, specs, name=analysis.name, arguments=[o.checkpoint_argument()],
                                              doc=_help(analysis.summary, analysis.example, analysis.description)))


for _analysis in REGISTRY.values():
    _register(_analysis)


# ----------------------------------------------------------------------------- scan
def _scan_specs() -> list[o.Spec]:
    analysis_specs = [s for a in REGISTRY.values() if a.in_scan for s in o.analysis_options(a.Options, local=False)]
    analyses = o.Spec("analyses", "analyses", Annotated[str | None, typer.Option(
        "--analyses", help=f"Comma-separated: {','.join(a.name for a in REGISTRY.values() if a.in_scan)} "
        "(default trace,eigs,extremes,density).", metavar="LIST", show_default=False)])
    return [*o.problem_options(), *o.engine_options(), *o.run_options(("out", "json", "quiet", "debug", "threads")),
            analyses, *o.run_options(("glob", "resume", "shard", "warm_start")), *analysis_specs]


def _scan_body(target: str, *, values: dict[str, Any]) -> None:
    from hesscli.cli.scan_view import run_scan_command

    code = run_scan_command(target, settings_from("scan", **values))
    if code:
        raise typer.Exit(code)


app.command("scan")(o.make_command(
    _scan_body, _scan_specs(), name="scan",
    arguments=[inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[str, typer.Argument(
        help="Folder of checkpoints (files, or model folders such as a Trainer's checkpoint-N/), or a glob such as "
             "'runs/exp1/*.pt'.", show_default=False)])],
    doc=_help("Every checkpoint of a training run, in step order: resumable, shardable, one failure never stops the "
              "rest.", "hesscli scan runs/exp1/ --analyses trace,eigs,density --shard 1/4",
              "Exit code 1 when some checkpoint failed (the others are complete; failures are rows in `runs`). "
              "Each analysis's options are spelled by their key here (trace's --tol is --trace-tol).")))


# ----------------------------------------------------------------------------- plot
@app.command("plot")
def plot_cmd(
    out: Annotated[Path, typer.Argument(help="Results folder written by hesscli (default ./hesscli-results).")] = Path("hesscli-results"),
    to: Annotated[Path | None, typer.Option("--to", help="Where to write the PNGs (default OUT/plots).")] = None,
    debug: Annotated[bool | None, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = None,
) -> None:
    """PNG figures: spectral density per checkpoint, top eigenvalues, curvature against step, loss landscapes.

    Example:

        hesscli plot hesscli-results/ --to figures/
    """
    from hesscli.results.plots import make_plots

    for path in make_plots(out, to):
        console().print(str(path))
