"""hesscli: loss-curvature analysis of trained PyTorch models.

Public API: analyses on ``(model, loss, data)`` returning result dataclasses, the
training-loop monitor, and the error hierarchy.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hesscli.api import density, eigs, extremes, trace  # noqa: E402
from hesscli.errors import (  # noqa: E402
    AnalysisError,
    BackendUnavailable,
    ConvergenceWarning,
    HesscliError,
    InputError,
    UnsupportedAnalysis,
)
from hesscli.results.records import (  # noqa: E402
    DensityResult,
    EigsResult,
    ExtremesResult,
    GroupTrace,
    Outcome,
    RunInfo,
    TraceResult,
)

__all__ = [
    "__version__",
    # analyses
    "trace",
    "eigs",
    "extremes",
    "density",
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
    "ConvergenceWarning",
]
