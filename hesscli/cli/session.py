"""What every running command shares: torchrun set-up, the results folder check, progress bars,
SIGTERM as Ctrl-C, notes on stderr, and results that could not be saved."""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from hesscli.cli.common import err_console


def start(settings: Any) -> tuple[Any, Any]:
    """Join a torchrun job if there is one (this rank's device) and, on rank 0, refuse a results
    folder that cannot take the tables before any work. Returns ``(context, settings)``."""
    from hesscli import distributed

    ctx = distributed.context(settings.device)
    if ctx.active:
        settings = dataclasses.replace(settings, device=distributed.device_for(ctx, settings.device))
    if ctx.is_main:
        from hesscli.results.parquet import prepare_out

        prepare_out(settings.out)
    return ctx, settings


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


def shows(settings: Any) -> bool:
    """Whether progress and notes go to stderr."""
    return not (settings.quiet or settings.json)


def progress_bar(unit: str | None = None, *, enabled: bool = True) -> Any:
    """A transient Rich progress bar with ETA on stderr (``unit`` is printed after the count)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               *([TextColumn(unit)] if unit else []), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err_console(), transient=True, disable=not enabled)


@contextmanager
def product_progress(settings: Any, description: str, total: int, enabled: bool,
                     unit: str = "products") -> Iterator[Callable[[int], None] | None]:
    """A Rich progress bar with ETA on stderr, counting curvature products (or grid points)."""
    if not enabled or not shows(settings):
        yield None
        return
    with progress_bar(unit) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, completed=min(n, total))


def note(settings: Any, text: str) -> None:
    """A dim line on stderr (not with --quiet/--json)."""
    if shows(settings):
        err_console().print(f"[dim]{text}[/dim]")


def keep_unsaved(outcomes: list[Any], settings: Any, reason: str) -> None:
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
