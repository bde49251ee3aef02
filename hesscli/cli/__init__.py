"""Command-line interface: the Typer ``app`` plus :func:`main`, which maps errors to exit codes.

Exit codes: 0 success; 1 an analysis failed or an unexpected error; 2 bad usage or bad
input; 130 interrupted. Errors are one line on stderr; ``--debug`` anywhere on the command
line re-raises them with the full traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hesscli.threads import prepare_environment

prepare_environment()  # before anything below imports torch: OpenMP reads it once, when it is loaded

import typer  # noqa: E402, I001

from hesscli.cli.app import app  # noqa: E402
from hesscli.errors import HesscliError  # noqa: E402

# Command modules register themselves on ``app`` when imported, in this order.
from hesscli.cli import info  # noqa: E402,F401,I001  (hesscli info)
from hesscli.cli import commands  # noqa: E402,F401,I001  (one command per analysis, scan, plot)

__all__ = ["app", "main"]


def _fail(message: str, code: int) -> None:
    from hesscli.results.fileops import path_text

    text = path_text(" ".join(str(message).split()))  # always one line, always printable
    typer.echo(f"error: {text}", err=True)
    raise SystemExit(code)


def _click_exceptions() -> tuple[Any, Any, Any]:
    """``(ClickException, NoArgsIsHelpError, Abort)`` of the click that Typer uses."""
    try:
        from typer._click import exceptions as ce  # Typer >= 0.16 ships its own click
    except ImportError:  # pragma: no cover - older Typer on top of click
        from click import exceptions as ce  # type: ignore[no-redef]
    abort = getattr(ce, "Abort", None)
    if abort is None:
        from typer.exceptions import Abort as abort  # type: ignore[no-redef]
    return ce.ClickException, ce.NoArgsIsHelpError, abort


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one ``warning:`` line: hesscli's own only; other libraries' go to the debug log."""
    import logging

    from hesscli.results.fileops import path_text

    text = path_text(" ".join(str(message).split()))
    module = str(filename).replace("\\", "/")
    ours = "/hesscli/" in module or category.__module__.startswith("hesscli")
    if ours:
        typer.echo(f"warning: {text}", err=True)
    else:
        logging.getLogger("hesscli.cli").debug("%s (%s, %s:%s)", text, category.__name__, filename, lineno)


_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
                 "NCCL communicator was aborted", "Broken pipe")
"""Fragments of the errors a collective raises on the other ranks when one process of a
``torchrun`` job dies."""


def _peer_failure(error: BaseException) -> bool:
    """Whether ``error`` only says that another rank of a multi-process job went away."""
    import os

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    return world > 1 and any(fragment in str(error) for fragment in _PEER_FAILURE)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI and exit with the contract's exit code (always raises ``SystemExit``).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    import warnings

    click_error, no_args_help, abort = _click_exceptions()
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 must never stop the output
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot change
                pass
    previous_showwarning = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        # Typer parses the options; usage errors come back here as click exceptions and are
        # reported as one line (exit 2) like every other bad input.
        code = app(args=args, prog_name="hesscli", standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted", 130)
    except no_args_help as e:  # `hesscli` alone: the help, as Typer prints it
        e.show()
        raise SystemExit(e.exit_code) from None
    except click_error as e:
        if debug:
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} -h')" if ctx is not None and e.exit_code == 2 else ""  # type: ignore[attr-defined]
        _fail(f"{e.format_message()}{hint}", e.exit_code)  # type: ignore[attr-defined]
    except abort:
        _fail("aborted", 1)
    except HesscliError as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - the contract: one line, exit 1, --debug for the traceback
        if debug:
            raise
        if _peer_failure(e):  # the failing rank prints the one error line; this one only says why it stops
            import os

            typer.echo(f"rank {os.environ.get('RANK', '?')}: stopped because another process of the job failed",
                       err=True)
            raise SystemExit(1) from None
        _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", 1)
    finally:
        warnings.showwarning = previous_showwarning
    raise SystemExit(code if isinstance(code, int) else 0)
