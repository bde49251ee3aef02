"""Typer options generated from the option declarations (:mod:`hesscli.options`, :mod:`hesscli.analyses`).

Every option defaults to ``None`` ("not given"), so ``hesscli.toml`` values and the
built-in defaults apply unless the user passes the flag (see :func:`hesscli.config.resolve`).
A command's function signature is built here; its body receives the values keyed by
option key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from hesscli.options import RUNTIME, EngineOptions, OptionInfo, ProblemSpec, RunOptions, declared

__all__ = ["CheckpointArg", "ConfigOpt", "Spec", "problem_options", "engine_options", "run_options",
           "analysis_options", "make_command"]

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint file: state_dict (.pt/.pth/.ckpt) or .safetensors with --model; a TorchScript archive "
        "or a pickled module with --trust-code; or a Hugging Face model folder (config.json + weights).",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Settings file (TOML). Default: ./hesscli.toml when present (which cannot "
                 "switch on --trust-code).", metavar="FILE", rich_help_panel=RUNTIME, show_default=False),
]

_PY_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One command-line option: the parameter name the command receives, its key and its Typer annotation."""

    param: str
    key: str
    annotation: Any


def _typer_type(type_text: str) -> Any:
    base = type_text.replace(" ", "").replace("|None", "").replace("Optional[", "").rstrip("]")
    if base.startswith(("tuple", "dict", "list")):
        return list[str]
    return _PY_TYPES[base]


def _spec(key: str, f: dataclasses.Field[Any], meta: OptionInfo, *, local: bool = True) -> Spec:
    """``local``: offered under the field's own name too (``trace --tol`` as well as ``--trace-tol``)."""
    names = [f.name, key] if local else [key]
    flags = list(dict.fromkeys("--" + n.replace("_", "-") for n in names))
    if str(f.type).startswith("dict"):  # repeatable KEY=VALUE, spelled in the singular
        flags = [x for x in meta.flags if x.startswith("--")]
    else:
        flags += [x for x in meta.flags if x not in flags]
    param = flags[0][2:].replace("-", "_") if str(f.type).startswith("dict") else key
    if meta.negatable:
        flags = [f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:]]
    option = typer.Option(*flags, help=meta.help, metavar=meta.metavar, rich_help_panel=meta.panel,
                          show_default=False)
    return Spec(param, key, Annotated[_typer_type(str(f.type)) | None, option])


def _group(cls: type, keys: Iterable[str] | None = None, *, local: bool = True) -> list[Spec]:
    wanted = set(keys) if keys is not None else None
    return [_spec(key, f, meta, local=local) for key, f, meta in declared(cls)
            if meta.cli and (wanted is None or key in wanted)]


def problem_options() -> list[Spec]:
    """Checkpoint, model, data, loss, parameters, device, dtype, seed, batch size."""
    return _group(ProblemSpec)


def engine_options(keys: Iterable[str] = ("backend", "curvature", "hvp", "max_memory")) -> list[Spec]:
    return _group(EngineOptions, keys)


def run_options(keys: Iterable[str] = ("out", "json", "quiet", "debug", "threads")) -> list[Spec]:
    return _group(RunOptions, keys)


def analysis_options(options_cls: type, *, local: bool = True) -> list[Spec]:
    """An analysis's own options: ``--<name>`` and ``--<key>`` on its command, ``--<key>`` on scan."""
    return _group(options_cls, local=local)


def make_command(body: Callable[..., Any], specs: list[Spec], *, name: str, doc: str,
                 arguments: list[inspect.Parameter]) -> Callable[..., Any]:
    """A function Typer can register: ``arguments`` positional, then the options (``--config`` added).

    ``body(*arguments, values)`` receives the option values keyed by option key (``None``: not
    given) plus ``config``, ``model_arg`` and ``forward_arg`` as the flags spell them.
    """
    seen: dict[str, Spec] = {}
    for s in specs:
        seen.setdefault(s.param, s)
    params = [inspect.Parameter(s.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=s.annotation)
              for s in seen.values()]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt))

    @functools.wraps(body)
    def command(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in [*seen, "config"]}
        return body(*args, **kwargs, values=values)

    command.__signature__ = inspect.Signature([*arguments, *params])  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.__name__ = command.__qualname__ = f"{name}_command"
    command.__doc__ = doc
    return command


def checkpoint_argument() -> inspect.Parameter:
    return inspect.Parameter("checkpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=CheckpointArg)
