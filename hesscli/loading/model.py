"""Model factories (``--model SPEC`` + ``--model-arg key=value``) and strict weight loading."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hesscli.config import parse_model_args
from hesscli.errors import InputError
from hesscli.loading.specs import load_callable, one_line

__all__ = ["build_model", "load_weights", "parse_model_args", "STRIPPED_PREFIXES"]

logger = logging.getLogger(__name__)

STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.")
"""Key prefixes added by DataParallel/DDP, Lightning-style wrappers and ``torch.compile``."""

_SHOWN = 4


def _from_checkpoint(factory: Any, spec: str, checkpoint_args: Mapping[str, Any] | None,
                     given: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``hyper_parameters`` that the factory accepts and ``--model-arg`` does not set."""
    if not checkpoint_args:
        return {}
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = {p.name: p for p in params
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    kwargs = {str(k): v for k, v in checkpoint_args.items()
              if (open_ended or str(k) in named) and str(k) not in given}
    from hesscli.loading.safepickle import placeholders_in

    objects = {k: found for k, v in kwargs.items() if (found := placeholders_in({k: v}))}
    required = {k: v for k, v in objects.items() if k in named and named[k].default is inspect.Parameter.empty}
    if required:
        shown = ", ".join(f"{k} ({v[0]})" for k, v in list(required.items())[:3])
        raise InputError(
            f"--model {spec}: the checkpoint's hyper_parameters hold pickled objects that hesscli does not unpickle: "
            f"{shown}; pass them with --model-arg KEY=VALUE, or pass --trust-pickle if you trust the file"
        )
    for k, v in objects.items():  # the factory's own default stands in; strict weight loading checks the fit
        logger.info("--model %s: hyper_parameter %s holds a pickled %s that is not unpickled; using the default",
                    spec, k, v[0])
        kwargs.pop(k)
    return kwargs


def build_model(spec: str | None, model_args: Mapping[str, Any] | None = None, *, needed_by: str = "",
                checkpoint_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory named by ``spec`` with ``model_args`` as keyword arguments.

    Args:
        spec: ``pkg.module:callable`` or ``path/to/file.py:callable`` (a class or a function).
        model_args: keyword arguments, e.g. from ``--model-arg hidden=64``.
        needed_by: what needs the model (``"checkpoint x.pt holds a state_dict"``), used
            when ``spec`` is missing.
        checkpoint_args: keyword arguments stored in the checkpoint (Lightning's
            ``hyper_parameters``); those the factory accepts are used, ``model_args`` win.

    Returns:
        The freshly built module (random weights, on the CPU).

    Raises:
        InputError: no spec, the factory cannot be imported, raises, or returns a non-module.
    """
    if not spec:
        reason = f"{needed_by} but" if needed_by else "the checkpoint needs a model and"
        raise InputError(
            f"{reason} no --model was given: pass --model pkg.module:callable or --model path/to/file.py:callable "
            f"(the class or function that builds the network), or set model in hesscli.toml"
        )
    factory = load_callable(spec, "--model")
    kwargs = {**_from_checkpoint(factory, spec, checkpoint_args, model_args or {}), **dict(model_args or {})}
    name = getattr(factory, "__name__", spec)
    try:
        model = factory(**kwargs)
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise InputError(f"--model {spec}: {name}({shown}) raised {one_line(e)}; check --model-arg") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec}: {name}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _strip_candidates(keys: list[str]) -> list[tuple[str, list[str]]]:
    """All ways of peeling shared wrapper prefixes off ``keys``, least stripped first."""
    out = [("", keys)]
    frontier = [("", keys)]
    while frontier:
        stripped, ks = frontier.pop()
        for prefix in STRIPPED_PREFIXES:
            if ks and all(k.startswith(prefix) for k in ks):
                cand = (stripped + prefix, [k[len(prefix):] for k in ks])
                out.append(cand)
                frontier.append(cand)
    return out


def _listing(names: list[str]) -> str:
    head = ", ".join(names[:_SHOWN])
    return head + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _dtype_kind(dtype: torch.dtype) -> str:
    """``bool`` | ``complex`` | ``float`` | ``int``: loading across kinds changes what a tensor means
    (an integer counter saved as float64), while a precision change within a kind is a cast."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_weights(model: nn.Module, state: Mapping[str, Any], *, source: str, spec: str | None = None) -> str:
    """Load ``state`` into ``model`` strictly, peeling ``module.``/``model.``/``_orig_mod.`` if needed.

    Args:
        model: the freshly built module.
        state: the checkpoint's state_dict.
        source: the checkpoint path, for messages.
        spec: the ``--model`` spec, for messages.

    Returns:
        The prefix that was stripped (``""`` when none).

    Raises:
        InputError: missing or unexpected keys, shape mismatches, or tensors whose dtype is of
            another kind than the model's (a float tensor for an integer buffer, ...); a few of
            each are named. Precision differences within a kind (float16 weights for a
            float32 model) are cast as ``load_state_dict`` does.
    """
    expected = model.state_dict()
    keys = list(state.keys())
    best: tuple[int, str, list[str]] | None = None
    for stripped, cand in _strip_candidates(keys):
        score = len(set(cand) & set(expected))
        if best is None or score > best[0]:
            best = (score, stripped, cand)
    assert best is not None
    _, stripped, new_keys = best
    renamed = {nk: state[k] for k, nk in zip(keys, new_keys)}

    missing = [k for k in expected if k not in renamed]
    unexpected = [k for k in renamed if k not in expected]
    mismatched = [
        f"{k} checkpoint {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in renamed.items()
        if k in expected and isinstance(v, Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    mistyped = [
        f"{k} checkpoint {_dtype_name(v.dtype)} vs model {_dtype_name(expected[k].dtype)}"
        for k, v in renamed.items()
        if k in expected and isinstance(v, Tensor) and _dtype_kind(v.dtype) != _dtype_kind(expected[k].dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if mistyped:
        problems.append(f"dtype mismatch: {_listing(mistyped)}")
    model_name = type(model).__name__
    if problems:
        raise InputError(
            f"checkpoint {source}: weights do not fit {model_name} from --model {spec}: {'; '.join(problems)}; "
            f"check --model and --model-arg"
        )
    try:
        model.load_state_dict(renamed, strict=True)
    except Exception as e:  # e.g. a non-tensor value or a dtype that cannot be copied
        raise InputError(f"checkpoint {source}: loading into {model_name} failed: {one_line(e)}") from e
    if stripped:
        logger.debug("stripped key prefix %r from %s", stripped, source)
    return stripped
