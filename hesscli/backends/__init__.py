"""Backend registry: ``--backend NAME`` -> an object implementing :class:`~hesscli.backends.base.Backend`.

Third-party libraries are imported only when their backend is selected, so ``import hesscli``
and the native engine work without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from hesscli.errors import BackendUnavailable, InputError, UnsupportedAnalysis
from hesscli.options import EngineOptions

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.backends.base import Backend, Reduce

REGISTRY: dict[str, str] = {
    "native": "hesscli.backends.native:NativeBackend",
    "pyhessian": "hesscli.backends.pyhessian:PyHessianBackend",
    "eigenthings": "hesscli.backends.eigenthings:EigenthingsBackend",
    "backpack": "hesscli.backends.backpack:BackpackBackend",
}

PACKAGES = {"pyhessian": "pyhessian", "eigenthings": "eigenthings", "backpack": "backpack"}
"""Backend name -> the extra that installs its library (``pip install 'hesscli[NAME]'``)."""


def get_backend(engine: str | EngineOptions = "native", *, reduce: Reduce | None = None,
                on_matvecs: Callable[[int], None] | None = None) -> Backend:
    """Build the backend of ``engine`` (a name, or engine options with curvature and product path).

    Args:
        engine: ``"native"`` | ``"pyhessian"`` | ``"eigenthings"`` | ``"backpack"``, or
            :class:`~hesscli.options.EngineOptions` (a name alone means the default curvature).
        reduce: all-reduce for products under torch.distributed (``None`` in one process).
        on_matvecs: progress callback receiving the running product count.

    Raises:
        InputError: unknown name.
        UnsupportedAnalysis: ``max_memory`` with a backend other than ``native``.
        BackendUnavailable: its third-party package is not installed (the message says how to install it).
    """
    if isinstance(engine, str):
        engine = EngineOptions(backend=engine)
    name = engine.backend
    if name not in REGISTRY:
        raise InputError(f"--backend {name!r}: unknown backend; choose one of {', '.join(REGISTRY)}")
    if engine.max_memory is not None and name != "native":
        raise UnsupportedAnalysis(
            f"--max-memory {engine.max_memory} sizes the native backend's products; --backend {name} sizes its own: "
            "drop --max-memory or use --backend native")
    module_name, cls_name = REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("hesscli"):
            raise BackendUnavailable(f"--backend {name!r} is not available in this build of hesscli") from e
        raise BackendUnavailable(
            f"--backend {name!r} needs the package {e.name!r}: pip install 'hesscli[{PACKAGES.get(name, name)}]'"
        ) from e
    return cast("Backend", getattr(module, cls_name)(engine, reduce=reduce, on_matvecs=on_matvecs))
