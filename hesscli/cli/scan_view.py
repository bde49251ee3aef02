"""The ``scan`` command's presentation: per-checkpoint progress, summary over steps, exit code."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from hesscli.cli import session
from hesscli.cli.common import console, err_console
from hesscli.config import Settings
from hesscli.errors import HesscliError
from hesscli.results.fileops import path_text


def run_scan_command(target: str, settings: Settings) -> int:
    """Run a scan, writing each checkpoint's rows as soon as it is done. Returns the exit code."""
    from hesscli.results.parquet import read_table, write_outcomes
    from hesscli.results.render import outcome_to_json, render_scan_summary
    from hesscli.results.tables import eigenvectors_to_save, save_eigenvectors
    from hesscli.scan import run_scan

    ctx, settings = session.start(settings)
    show = ctx.is_main and session.shows(settings)
    unsaved: list = []
    failure: list[str] = []

    class _Stop(Exception):
        """Writing failed: the scan stops (nothing more could be saved)."""

    def write(outcomes: list) -> None:
        if ctx.is_main and outcomes:
            try:
                write_outcomes(settings.out, outcomes)
                if settings.save_vectors:
                    for outcome in outcomes:
                        if eigenvectors_to_save(outcome) is not None:
                            save_eigenvectors(settings.out, outcome)
            except HesscliError as e:
                unsaved.extend(outcomes)
                failure.append(str(e))
                raise _Stop from e

    progress = session.progress_bar(enabled=show)
    with session.sigterm_as_interrupt(), progress:
        task = progress.add_task("scan", total=None)

        def on_checkpoint(i: int, n: int, entry) -> None:
            progress.update(task, total=n, completed=i,
                            description=f"scan {path_text(entry.path.name)} "
                                        f"(step {entry.step if entry.step is not None else '?'})")

        try:
            report = run_scan(target, settings, write=write, on_checkpoint=on_checkpoint,
                              reduce=ctx.all_reduce_sum if ctx.active else None, rank=ctx.rank,
                              world_size=ctx.world_size)
        except _Stop:
            progress.stop()
            session.keep_unsaved(unsaved, settings, failure[0] + "; the scan stopped")
        progress.update(task, completed=len(report.checkpoints))
    if not ctx.is_main:
        return 1 if report.failures else 0
    if settings.json:
        typer.echo(json.dumps({
            "checkpoints": [{"path": path_text(e.path), "step": e.step} for e in report.checkpoints],
            "outcomes": [outcome_to_json(o) for o in report.outcomes],
            "skipped": [{"checkpoint": c, "analysis": a} for c, a in report.skipped],
            "duplicates": [{"checkpoint": c, "same_content_as": k} for c, k in report.duplicates],
            "claimed_elsewhere": [{"checkpoint": c, "analysis": a} for c, a in report.claimed],
            "failed": [{"checkpoint": o.run.checkpoint, "analysis": o.run.analysis, "error": o.run.error}
                       for o in report.failures],
        }))
    elif not settings.quiet:
        names = {path_text(e.path) for e in report.checkpoints}
        tables = {name: read_table(settings.out, name) for name in ("runs", "trace", "extremes", "eigs")}
        render_scan_summary(tables, console(), checkpoints=names)
        for dup, same in report.duplicates:
            err_console().print(f"[dim]{escape(dup)}: same content as {escape(same)}, analysed once (skipped)[/dim]",
                                markup=True, highlight=False)
        if report.claimed:
            err_console().print(f"[dim]{len(report.claimed)} (checkpoint, analysis) pairs left to another scan "
                                f"running into {path_text(settings.out)}/ right now[/dim]")
        if report.skipped:
            err_console().print(f"[dim]{len(report.skipped)} (checkpoint, analysis) pairs already done: skipped "
                                f"(--no-resume recomputes)[/dim]")
        err_console().print(f"[dim]tables written under {settings.out}/[/dim]")
    if report.failures:
        failed = sorted({o.run.checkpoint for o in report.failures})
        typer.echo(f"error: {len(failed)} checkpoint(s) failed: {', '.join(failed)} "  # one line, never wrapped
                   f"(details in {path_text(settings.out)}/runs, column 'error')", err=True)
        return 1
    return 0
