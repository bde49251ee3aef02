"""The analyses: one module each, found through :data:`REGISTRY`.

Adding an analysis is adding a module here and a line below (see ``docs/architecture.md``);
the CLI command, the config section, scan's choice and resume key and the Python function
``hesscli.<name>`` follow from its declarations. Importing this package does not import torch.
"""

from __future__ import annotations

from hesscli.analyses.base import Analysis
from hesscli.analyses.density import Density
from hesscli.analyses.eigs import Eigs
from hesscli.analyses.extremes import Extremes
from hesscli.analyses.landscape import Landscape
from hesscli.analyses.trace import Trace
from hesscli.errors import InputError
from hesscli.results.plugins import register

__all__ = ["Analysis", "REGISTRY", "NAMES", "get"]

REGISTRY: dict[str, Analysis] = {a.name: a for a in (Trace(), Eigs(), Extremes(), Density(), Landscape())}
"""Analysis name -> its plug-in, in the order commands and tables are listed."""

NAMES: tuple[str, ...] = tuple(REGISTRY)

for _analysis in REGISTRY.values():  # the results layer learns the tables and views of each
    register(_analysis)


def get(name: str) -> Analysis:
    """The analysis called ``name``.

    Raises:
        InputError: no such analysis (the message lists them).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown analysis {name!r}; choose from {', '.join(REGISTRY)}") from None
