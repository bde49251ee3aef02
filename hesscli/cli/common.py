"""Glue shared by the commands: flags -> Settings, the two consoles, logging, JSON output."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from hesscli.config import Settings, parse_model_args, resolve

__all__ = ["settings_from", "console", "err_console", "setup_logging", "print_json"]

_HANDLER_NAME = "hesscli-cli"


def console() -> Console:
    """Console on stdout: results."""
    return Console(highlight=False)


def err_console() -> Console:
    """Console on stderr: progress, notes and logs."""
    return Console(stderr=True, highlight=False)


def settings_from(command: str, **flag_values: Any) -> Settings:
    """Resolve a command's :class:`Settings` from its flags (``None`` = not given).

    ``config`` (``--config FILE``) selects the settings file and ``model_arg``
    (``--model-arg KEY=VALUE``, repeatable) is parsed into ``model_args``; every other
    keyword is a :class:`Settings` field. Also configures logging for the command.

    Args:
        command: the command name, selecting its ``[command]`` table in ``hesscli.toml``.
        **flag_values: the command's option values.

    Returns:
        The resolved settings.

    Raises:
        InputError: a bad config file or option value.
    """
    config = flag_values.pop("config", None)
    model_arg = flag_values.pop("model_arg", None)
    if model_arg:
        flag_values["model_args"] = parse_model_args(model_arg)
    forward_arg = flag_values.pop("forward_arg", None)
    if forward_arg:
        flag_values["forward_args"] = parse_model_args(forward_arg, source="--forward-arg")
    settings = resolve(flag_values, Path(config) if config is not None else None, command=command)
    setup_logging(quiet=settings.quiet or settings.json, debug=settings.debug)
    return settings


def setup_logging(*, quiet: bool = False, debug: bool = False) -> None:
    """Send the ``hesscli`` loggers to stderr through Rich (WARNING when quiet, DEBUG with --debug)."""
    logger = logging.getLogger("hesscli")
    for h in list(logger.handlers):
        if h.get_name() == _HANDLER_NAME:
            logger.removeHandler(h)
    handler = RichHandler(console=err_console(), show_time=False, show_path=debug, markup=False)
    handler.set_name(_HANDLER_NAME)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout, unwrapped (safe to pipe into ``jq``)."""
    typer.echo(json.dumps(data, indent=2, default=str))
