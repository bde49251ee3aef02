"""``pkg.module:callable`` and ``path/to/file.py:callable`` specs, shared by --model, --data and --loss."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hesscli.errors import InputError

__all__ = ["split_spec", "load_callable", "one_line", "short", "build_mismatch"]

logger = logging.getLogger(__name__)
code_logger = logging.getLogger("hesscli.code")
"""Says which file each ``--model``/``--data``/``--loss`` callable is imported from (INFO)."""

_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception))\s*:\s*(.+)$")
_FILE_MODULES: dict[tuple[str, int], Any] = {}


def one_line(exc: BaseException) -> str:
    """Condense an exception to ``Type: message`` on one line.

    TorchScript errors carry a whole interpreter traceback; the useful part is their last
    ``SomethingError: ...`` line, which is what this keeps.
    """
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        hits = [m for m in (_ERROR_LINE.match(ln) for ln in lines) if m]
        if hits:
            last = hits[-1]
            return f"{last.group(1)}: {last.group(3).strip()}"
        text = lines[0].strip()
    elif lines:
        text = lines[0].strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def short(exc: BaseException, limit: int = 160) -> str:
    """:func:`one_line`, cut to its first sentence and at most ``limit`` characters."""
    text = one_line(exc)
    head, sep, _ = text.partition(". ")
    text = head + ("." if sep else "")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def split_spec(spec: str, option: str) -> tuple[str, str, bool]:
    """Split ``target:attr`` into ``(target, attr, is_file)``.

    Raises:
        InputError: ``spec`` has no ``:`` or an empty part.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise InputError(
            f"{option} {spec!r}: expected pkg.module:callable or path/to/file.py:callable"
        )
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    return target, attr, is_file


def build_mismatch(exc: BaseException) -> str | None:
    """Explain an import failure caused by a torchvision built for another torch, or ``None``.

    The torchvision wheel that pip picks next to a CPU-only torch is a CUDA build whose compiled
    operators do not load (``operator torchvision::nms does not exist``); anything importing
    torchvision (timm, many model zoos) then fails with that message.
    """
    text = str(exc)
    about_torchvision = "torchvision" in text.lower()
    compiled_ops_failed = any(s in text for s in ("does not exist", "custom C++ ops", "undefined symbol"))
    if not (about_torchvision and compiled_ops_failed):
        return None
    import torch

    try:
        from importlib.metadata import version

        tv = version("torchvision")
    except Exception:  # noqa: BLE001 - only for the message
        tv = "?"
    return (f"torchvision {tv} was built for another torch than the installed {torch.__version__} (its compiled "
            f"operators do not load: {one_line(exc)[:120]}); install the torchvision build made for this torch "
            f"(for a CPU-only torch, the CPU wheel from the PyTorch package index) or uninstall torchvision")


def _import_file(path: Path, option: str, spec: str) -> Any:
    """Import a Python file under a private module name (cached by path and mtime)."""
    if not path.is_file():
        raise InputError(f"{option} {spec!r}: file {path} not found; check the path")
    resolved = path.resolve()
    key = (str(resolved), resolved.stat().st_mtime_ns)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"_hesscli_user_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:  # pragma: no cover - .py files always have a loader
        raise InputError(f"{option} {spec!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    if folder not in sys.path:  # sibling imports (``from layers import Block``) keep working
        sys.path.insert(0, folder)
    sys.modules[name] = module
    code_logger.info("%s %s: importing (running) %s", option, spec, resolved, extra={"option": option})
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise InputError(f"{option} {spec!r}: importing {path} failed: {build_mismatch(e) or one_line(e)}") from e
    _FILE_MODULES[key] = module
    return module


def _import_module(target: str, option: str, spec: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # console scripts do not put the cwd on sys.path
        sys.path.append(cwd)
    known = target in sys.modules
    try:
        module = importlib.import_module(target)
        if not known:
            code_logger.info("%s %s: importing (running) %s", option, spec,
                             getattr(module, "__file__", None) or target, extra={"option": option})
        return module
    except ModuleNotFoundError as e:
        raise InputError(
            f"{option} {spec!r}: cannot import module {target!r} ({e}); install it, run from its folder, "
            f"or use path/to/file.py:callable"
        ) from e
    except Exception as e:
        raise InputError(f"{option} {spec!r}: importing {target!r} failed: {build_mismatch(e) or one_line(e)}") from e


def load_callable(spec: str, option: str) -> Callable[..., Any]:
    """Import the callable named by ``spec``.

    Args:
        spec: ``pkg.module:callable`` or ``path/to/file.py:callable``; the callable part may be
            dotted (``models:Net.from_config``).
        option: the option being resolved (``--model``), for error messages.

    Returns:
        The callable object (a function or a class).

    Raises:
        InputError: the file or module cannot be imported, the name is missing or not callable.
    """
    target, attr, is_file = split_spec(spec, option)
    module = _import_file(Path(target).expanduser(), option, spec) if is_file else _import_module(target, option, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise InputError(f"{option} {spec!r}: {target} has no attribute {attr!r}; callables there: {shown or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{option} {spec!r}: {attr} is a {type(obj).__name__}, not a callable")
    logger.debug("loaded %s from %s", attr, target)
    return obj
