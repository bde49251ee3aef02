"""hesscli: loss-curvature analysis of trained PyTorch models.

Public API: analyses on ``(model, loss, data)`` returning result dataclasses, the
training-loop monitor, and the error hierarchy. ``hesscli.lightning.CurvatureCallback``
(imported explicitly; needs Lightning) wraps the monitor for a Lightning ``Trainer``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

import hesscli.analyses  # noqa: E402,F401  (registers the analyses; imports no torch)
from hesscli.errors import (  # noqa: E402
    AnalysisError,
    BackendUnavailable,
    ConvergenceWarning,
    HesscliError,
    InputError,
    ResultsNotSaved,
    UnsupportedAnalysis,
)

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.api import density, eigs, extremes, trace
    from hesscli.monitor import CurvatureMonitor
    from hesscli.results.records import (
        DensityResult,
        EigsResult,
        ExtremesResult,
        GroupTrace,
        Outcome,
        RunInfo,
        TraceResult,
    )

_LAZY = {
    **{name: "hesscli.api" for name in hesscli.analyses.NAMES},  # hesscli.trace(...), hesscli.eigs(...), ...
    "CurvatureMonitor": "hesscli.monitor",
    **{name: "hesscli.results.records" for name in ("TraceResult", "GroupTrace", "EigsResult", "ExtremesResult",
                                                    "DensityResult", "RunInfo", "Outcome")},
}


def __getattr__(name: str) -> Any:
    """Import the engine on first use, so ``hesscli --help`` does not pay for torch."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hesscli' has no attribute {name!r}")

__all__ = [
    "__version__",
    # analyses
    "trace",
    "eigs",
    "extremes",
    "density",
    "CurvatureMonitor",
    # results
    "TraceResult",
    "GroupTrace",
    "EigsResult",
    "ExtremesResult",
    "DensityResult",
    "RunInfo",
    "Outcome",
    # errors
    "HesscliError",
    "InputError",
    "AnalysisError",
    "BackendUnavailable",
    "UnsupportedAnalysis",
    "ResultsNotSaved",
    "ConvergenceWarning",
]
