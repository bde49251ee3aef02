"""Read a ``torch.save`` file without executing code: unknown globals become inert placeholders.

Training frameworks store more than weights next to the ``state_dict``: Lightning keeps the
module's ``hyper_parameters`` (often config objects, ``argparse.Namespace``, enums, callables),
loop state and callback state. ``torch.load(weights_only=True)`` refuses the whole file for any
of them. This unpickler resolves only the globals that weights-only loading allows (tensors,
storages, containers, dtypes) and replaces every other global by a :class:`Placeholder`
subclass that records the name and arguments it was given and does nothing else, so no
constructor, ``__reduce__`` target or ``__setstate__`` of the file's choosing ever runs.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

__all__ = ["Placeholder", "restricted_load", "placeholders_in"]

_SAFE_BUILTINS = frozenset({
    "builtins.set", "builtins.frozenset", "builtins.tuple", "builtins.list", "builtins.dict", "builtins.slice",
    "builtins.complex", "builtins.range", "builtins.bytearray", "builtins.bytes", "builtins.str", "builtins.int",
    "builtins.float", "builtins.bool",
    "collections.OrderedDict", "collections.defaultdict",
})


def _allowed() -> frozenset[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private helper; fewer names only means more placeholders
        names = set()
    return frozenset(names | _SAFE_BUILTINS)


class Placeholder:
    """Stands in for an object of a class (or the result of a call) that was not unpickled.

    Attributes:
        qualname: the global the file named (``"mypkg.config.TrainConfig"``), on the class.
        args, kwargs: what the pickle passed when it called the global.
        state: what the pickle passed to ``__setstate__``.
    """

    qualname = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<not unpickled: {self.qualname}>"


def _placeholder(module: str, name: str) -> type[Placeholder]:
    return type(name, (Placeholder,), {"qualname": f"{module}.{name}", "__module__": "hesscli.placeholder"})


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never imports anything outside the allowed set."""

    allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle's hook
        if f"{module}.{name}" in self.allowed:
            return super().find_class(module, name)
        return _placeholder(module, name)


def _pickle_module() -> types.ModuleType:
    mod = types.ModuleType("hesscli_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.loads = pickle.loads  # type: ignore[attr-defined]  # never called by torch.load
    mod.__version__ = pickle.format_version  # type: ignore[attr-defined]
    return mod


def restricted_load(path: str | Path) -> Any:
    """``torch.load`` with every global outside weights-only loading's allow-list made a placeholder.

    Tensors, parameters and containers load as usual; nothing the file names is imported or run.
    """
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module())


def placeholders_in(obj: Any, *, depth: int = 6) -> list[str]:
    """Qualified names of the placeholders inside ``obj`` (dicts, lists, tuples), once each."""
    found: list[str] = []

    def walk(o: Any, d: int) -> None:
        if isinstance(o, Placeholder):
            found.append(type(o).qualname)
        elif d > 0 and isinstance(o, dict):
            for v in o.values():
                walk(v, d - 1)
        elif d > 0 and isinstance(o, (list, tuple)):
            for v in o:
                walk(v, d - 1)

    walk(obj, depth)
    return list(dict.fromkeys(found))
