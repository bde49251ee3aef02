"""Backend registry: ``--backend NAME`` -> an object implementing :class:`~hesscli.backends.base.Backend`.

Third-party libraries are imported only when their backend is selected, so ``import hesscli``
and the native engine work without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from hesscli.errors import BackendUnavailable, InputError

REGISTRY: dict[str, str] = {
    "native": "hesscli.backends.native:NativeBackend",
    "pyhessian": "hesscli.backends.pyhessian:PyHessianBackend",
    "eigenthings": "hesscli.backends.eigenthings:EigenthingsBackend",
    "backpack": "hesscli.backends.backpack:BackpackBackend",
}

PACKAGES = {"pyhessian": "pyhessian", "eigenthings": "eigenthings", "backpack": "backpack"}


def get_backend(name: str, **kwargs: Any) -> Any:
    """Instantiate backend ``name``.

    Raises:
        InputError: unknown name.
        BackendUnavailable: its third-party package is not installed (the message says how to install it).
    """
    if name not in REGISTRY:
        raise InputError(f"--backend {name!r}: unknown backend; choose one of {', '.join(REGISTRY)}")
    module_name, cls_name = REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("hesscli"):
            raise BackendUnavailable(f"--backend {name!r} is not available in this build of hesscli") from e
        raise BackendUnavailable(
            f"--backend {name!r} needs the package {e.name!r}: pip install 'hesscli[{PACKAGES.get(name, name)}]'"
        ) from e
    return getattr(module, cls_name)(**kwargs)
