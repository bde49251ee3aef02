"""The backend protocol: every backend runs the same analyses on a :class:`Problem`.

The native engine is the default and the reference; the others are adapters around
third-party libraries (imported inside the adapter, never at module import time) that share
:class:`hesscli.backends.peer.PeerBackend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hesscli.loading.problem import Problem
    from hesscli.options import EngineOptions

Reduce = Callable[["torch.Tensor"], "torch.Tensor"]
"""All-reduce (sum) of a tensor over the ranks of a torch.distributed run."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Checked once, by each analysis's ``check``, before any work starts.

    Attributes:
        analyses: analysis name -> methods it supports, its default first (e.g. ``{"trace": ("hutchinson",)}``).
        curvatures: ``("hessian",)`` or ``("hessian", "ggn")``.
        whiches: eigenvalue ends it can compute (``largest``, ``smallest``).
        calls_model_on_tensors_only: calls ``model(x)`` on tensors and weights batches by sample
            count only (no dict inputs, forward arguments, output selection or token-weighted losses).
    """

    analyses: dict[str, tuple[str, ...]]
    curvatures: tuple[str, ...] = ("hessian",)
    whiches: tuple[str, ...] = ("largest",)
    calls_model_on_tensors_only: bool = True


class Backend(Protocol):
    """One engine behind ``--backend NAME``, built with the engine options (curvature, product path).

    Each analysis method receives the loaded problem, that analysis's own options (see
    :mod:`hesscli.analyses`) and a seeded CPU ``torch.Generator`` (probes are drawn on the CPU,
    then moved to the device, so the same seed gives the same numbers on CPU and CUDA).
    """

    name: str
    capabilities: Capabilities
    engine: EngineOptions

    def trace(self, problem: Problem, options: Any, generator: torch.Generator) -> Any: ...

    def eigs(self, problem: Problem, options: Any, generator: torch.Generator) -> Any: ...

    def extremes(self, problem: Problem, options: Any, generator: torch.Generator) -> Any: ...

    def density(self, problem: Problem, options: Any, generator: torch.Generator) -> Any: ...
