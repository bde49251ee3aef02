"""The backend protocol: every backend runs the same analyses on a :class:`Problem`.

The native engine is the default and the reference; the others are adapters around
third-party libraries (imported inside the adapter, never at module import time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hesscli.config import Settings
    from hesscli.loading.problem import Problem
    from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Checked by the api before any work starts.

    Attributes:
        analyses: analysis name -> methods it supports (e.g. ``{"trace": ("hutchinson",)}``).
        curvatures: ``("hessian",)`` or ``("hessian", "ggn")``.
        whiches: eigenvalue ends it can compute (``largest``, ``smallest``).
        exact_hvp: products are exact (not finite differences / block-diagonal).
        notes: human-readable caveats, shown by ``hesscli`` when the backend is used.
    """

    analyses: dict[str, tuple[str, ...]]
    curvatures: tuple[str, ...] = ("hessian",)
    whiches: tuple[str, ...] = ("largest",)
    exact_hvp: bool = True
    supports_params: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


class Backend(Protocol):
    """One engine behind ``--backend NAME``.

    Every method receives the loaded problem, the resolved settings and a seeded
    CPU ``torch.Generator`` (probes are drawn on the CPU, then moved to the device, so
    the same seed gives the same numbers on CPU and CUDA). Methods raise
    :class:`hesscli.errors.UnsupportedAnalysis` for what the backend cannot do.
    """

    name: str
    capabilities: Capabilities

    def trace(self, problem: Problem, settings: Settings, generator: torch.Generator) -> TraceResult: ...

    def eigs(self, problem: Problem, settings: Settings, generator: torch.Generator) -> EigsResult: ...

    def extremes(self, problem: Problem, settings: Settings, generator: torch.Generator) -> ExtremesResult: ...

    def density(self, problem: Problem, settings: Settings, generator: torch.Generator) -> DensityResult: ...
