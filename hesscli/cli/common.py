"""Glue shared by the commands: flags -> Settings, the two consoles, logging, JSON output."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from hesscli.config import Settings, find_config, parse_model_args, resolve
from hesscli.results.fileops import path_text
from hesscli.threads import apply_threads

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

    Prints ``config: FILE`` on stderr when a config file is read (not with ``--quiet``/``--json``)
    and a ``warning:`` line for each trust setting ignored in an implicitly found ``hesscli.toml``.

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
    # logging from the flags alone first, so that what resolving says reaches stderr
    setup_logging(quiet=bool(flag_values.get("quiet") or flag_values.get("json")), debug=bool(flag_values.get("debug")))
    config_path = find_config(Path(config) if config is not None else None)
    ignored: list[str] = []
    settings = resolve(flag_values, config_path if config is not None else None, command=command, ignored=ignored)
    from_config = {f"--{key}" for key in ("model", "data", "loss")
                   if config_path is not None and flag_values.get(key) is None and getattr(settings, key) is not None}
    setup_logging(quiet=settings.quiet or settings.json, debug=settings.debug,
                  code_from=(path_text(config_path), from_config) if from_config and config_path else None)
    quiet = settings.quiet or settings.json
    if config_path is not None and not quiet:
        typer.echo(f"config: {path_text(config_path)}{'' if config is not None else ' (found in the working folder)'}",
                   err=True)
    for line in ignored:  # a security note: shown even with --quiet
        typer.echo(f"warning: {path_text(line)}", err=True)
    apply_threads(settings.threads)
    return settings


def setup_logging(*, quiet: bool = False, debug: bool = False,
                  code_from: tuple[str, set[str]] | None = None) -> None:
    """Send the ``hesscli`` loggers to stderr through Rich (WARNING when quiet, DEBUG with --debug).

    ``code_from = (config file, options)``: the ``--model``/``--data``/``--loss`` callables that
    the config file names; importing each is announced in one line (``hesscli.code`` logger).
    """
    logger = logging.getLogger("hesscli")
    for h in list(logger.handlers):
        if h.get_name() == _HANDLER_NAME:
            logger.removeHandler(h)
    handler = RichHandler(console=err_console(), show_time=False, show_path=debug, markup=False)
    handler.set_name(_HANDLER_NAME)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    # "which file is imported as code" notices: one plain line each
    code = logging.getLogger("hesscli.code")
    for h in list(code.handlers):
        if h.get_name() == _HANDLER_NAME:
            code.removeHandler(h)
    plain = logging.StreamHandler(_Stderr())
    plain.setFormatter(logging.Formatter("%(message)s (named in %(config)s)"))
    plain.set_name(_HANDLER_NAME)
    config, options = code_from or ("", set())

    def named_in_config(record: logging.LogRecord) -> bool:
        record.config = config
        return getattr(record, "option", None) in options

    plain.addFilter(named_in_config)
    code.addHandler(plain)
    code.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    code.propagate = False


class _Stderr:
    """Write to whatever ``sys.stderr`` is at the time (test runners swap it), printable text only."""

    def write(self, text: str) -> int:
        import sys

        return sys.stderr.write(path_text(text))

    def flush(self) -> None:
        import sys

        sys.stderr.flush()


def print_json(data: Any) -> None:
    """Write ``data`` as JSON to stdout, unwrapped (safe to pipe into ``jq``)."""
    typer.echo(json.dumps(data, indent=2, default=str))
