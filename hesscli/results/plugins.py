"""Where analyses register their tables, rows and console views (importing this loads nothing heavy).

The results layer stays below the engine: it never imports an analysis; each analysis of
:mod:`hesscli.analyses` registers itself here when that package is imported (``import hesscli``
does), and tables, Parquet writing and rendering look analyses up by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from rich.console import RenderableType

    from hesscli.results.records import RunInfo

__all__ = ["TablePlugin", "PLUGINS", "register", "plugin"]


class TablePlugin(Protocol):
    """What the results layer needs from an analysis."""

    @property
    def name(self) -> str: ...

    @property
    def tables(self) -> tuple[str, ...]: ...

    def schemas(self) -> dict[str, pa.Schema]: ...

    def rows(self, run: RunInfo, result: Any) -> dict[str, list[dict[str, Any]]]: ...

    def render(self, result: Any) -> RenderableType: ...


PLUGINS: dict[str, TablePlugin] = {}
"""Analysis name -> its table plugin, in registration order."""


def register(p: TablePlugin) -> None:
    """Make an analysis's tables known (before :mod:`hesscli.results.tables` is first imported)."""
    PLUGINS[p.name] = p


def plugin(name: str) -> TablePlugin:
    """The plugin of analysis ``name``.

    Raises:
        KeyError: no analysis of that name registered its tables.
    """
    return PLUGINS[name]
