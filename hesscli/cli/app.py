"""The Typer application and its root callback (``--version``, ``--debug``)."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import typer

__all__ = ["app", "version_string"]

app = typer.Typer(
    name="hesscli",
    help=(
        "Loss curvature of trained PyTorch checkpoints: Hessian trace, eigenvalues, spectral density, loss landscapes.\n\n"
        "Exit codes: 0 ok, 1 an analysis failed, 2 bad usage or input. Add --debug for tracebacks."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


def version_string() -> str:
    """``hesscli X (torch Y)``, without importing torch."""
    try:
        from hesscli import __version__ as version
    except ImportError:  # pragma: no cover - running from a partial tree
        try:
            version = metadata.version("hesscli")
        except metadata.PackageNotFoundError:
            version = "unknown"
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - torch is a core dependency
        torch_version = "not installed"
    return f"hesscli {version} (torch {torch_version})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_string())
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = None,
    debug: Annotated[
        bool | None,
        typer.Option("--debug", help="Show full tracebacks instead of one-line errors."),
    ] = None,
) -> None:
    """Loss curvature of trained PyTorch checkpoints: Hessian trace, eigenvalues, spectral density, loss landscapes."""
