"""Results: dataclasses -> tidy tables -> Parquet datasets, Rich/JSON rendering, plots.

This package imports nothing from the rest of the engine: the analyses register their tables,
rows and console views here (:mod:`hesscli.results.plugins`). Everything loads on first use,
so importing a result class does not pull in pandas, pyarrow, Rich or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.results.parquet import read_table, write_outcomes
    from hesscli.results.plots import make_plots
    from hesscli.results.records import (
        DensityResult,
        EigsResult,
        ExtremesResult,
        GroupTrace,
        Outcome,
        RunInfo,
        TraceResult,
    )
    from hesscli.results.render import outcome_to_json, render_json, render_outcome, render_scan_summary
    from hesscli.results.tables import (
        TABLES,
        latest_ok_runs,
        outcome_rows,
        outcomes_to_frames,
        save_eigenvectors,
    )

_LAZY = {
    # records
    **{name: "records" for name in ("RunInfo", "GroupTrace", "TraceResult", "EigsResult", "ExtremesResult",
                                    "DensityResult", "Outcome")},
    # tables
    "TABLES": "tables",
    "outcome_rows": "tables",
    "outcomes_to_frames": "tables",
    "latest_ok_runs": "tables",
    "save_eigenvectors": "tables",
    # parquet
    "write_outcomes": "parquet",
    "read_table": "parquet",
    # rendering
    "render_outcome": "render",
    "outcome_to_json": "render",
    "render_json": "render",
    "render_scan_summary": "render",
    # plots
    "make_plots": "plots",
}

__all__ = [
    # records
    "RunInfo",
    "GroupTrace",
    "TraceResult",
    "EigsResult",
    "ExtremesResult",
    "DensityResult",
    "Outcome",
    # tables
    "TABLES",
    "outcome_rows",
    "outcomes_to_frames",
    "latest_ok_runs",
    "save_eigenvectors",
    # parquet
    "write_outcomes",
    "read_table",
    # rendering
    "render_outcome",
    "outcome_to_json",
    "render_json",
    "render_scan_summary",
    # plots
    "make_plots",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hesscli.results' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hesscli.results.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
