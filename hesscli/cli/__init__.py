"""Command-line interface: the Typer ``app`` plus :func:`main`, which maps errors to exit codes.

Exit codes: 0 success; 1 an analysis failed or an unexpected error; 2 bad usage or bad
input; 130 interrupted. Errors are one line on stderr; ``--debug`` anywhere on the command
line re-raises them with the full traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from hesscli.cli.app import app
from hesscli.errors import HesscliError

# Command modules register themselves on ``app`` when imported.
from hesscli.cli import info  # noqa: E402,F401  (hesscli info)

# Further command modules (analyses, scan, plot) are imported here, e.g.:
from hesscli.cli import analyses  # noqa: E402,F401  (trace, eigs, extremes, density, scan, plot)

__all__ = ["app", "main"]


def _fail(message: str, code: int) -> None:
    text = " ".join(str(message).split())  # always one line
    typer.echo(f"error: {text}", err=True)
    raise SystemExit(code)


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
    try:
        # Typer/click handle their own usage errors (exit 2), --help, --version and Ctrl-C
        # during the command (exit 130) and exit through SystemExit.
        app(args=args, prog_name="hesscli", standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted", 130)
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
            raise SystemExit(1)
        _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", 1)
    raise SystemExit(0)  # pragma: no cover - standalone mode always exits
