"""The native engine: hesscli's own operators and algorithms (default backend, the reference)."""

from __future__ import annotations

from typing import Callable

import torch

from hesscli.algorithms.exact import exact_trace
from hesscli.algorithms.hutchinson import hutchinson
from hesscli.algorithms.hutchpp import hutchpp
from hesscli.algorithms.lanczos import extremes, lanczos_eigs
from hesscli.algorithms.slq import slq
from hesscli.backends.base import Capabilities
from hesscli.config import Settings
from hesscli.errors import InputError
from hesscli.loading.problem import Problem
from hesscli.operators.empirical import EmpiricalRiskOperator, make_operator
from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult

EXACT_TRACE_MAX_PARAMS = 50_000
"""``trace --method exact`` needs one product per parameter; above this it is refused."""


class NativeBackend:
    """Exact Hessian/GGN products over the full dataset, Lanczos, Hutchinson/Hutch++, SLQ."""

    name = "native"
    capabilities = Capabilities(
        analyses={
            "trace": ("hutch++", "hutchinson", "exact"),  # first = default
            "eigs": ("lanczos",),
            "extremes": ("lanczos",),
            "density": ("slq",),
        },
        curvatures=("hessian", "ggn"),
        whiches=("largest", "smallest", "both"),
    )

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_matvecs: Callable[[int], None] | None = None) -> None:
        self.reduce = reduce
        self.on_matvecs = on_matvecs
        self.last_operator: EmpiricalRiskOperator | None = None

    def operator(self, problem: Problem, settings: Settings) -> EmpiricalRiskOperator:
        op = make_operator(problem, settings.curvature, hvp=settings.hvp, reduce=self.reduce)
        op.on_matvecs = self.on_matvecs
        self.last_operator = op
        return op

    def trace(self, problem: Problem, settings: Settings, generator: torch.Generator) -> TraceResult:
        op = self.operator(problem, settings)
        if settings.method == "exact":
            if op.size > EXACT_TRACE_MAX_PARAMS:
                raise InputError(
                    f"trace --method exact needs one product per parameter ({op.size:,} here, limit "
                    f"{EXACT_TRACE_MAX_PARAMS:,}); use --method hutch++ (default) or restrict with --params GLOB"
                )
            return exact_trace(op)
        if settings.method == "hutchinson":
            return hutchinson(op, n_probes=settings.probes, generator=generator, tol=settings.trace_tol)
        if settings.method == "hutch++":
            return hutchpp(op, n_matvecs=settings.probes, generator=generator)
        raise InputError(f"--method {settings.method!r}: expected one of hutchinson, hutch++, exact")

    def eigs(self, problem: Problem, settings: Settings, generator: torch.Generator) -> EigsResult:
        op = self.operator(problem, settings)
        return lanczos_eigs(op, k=settings.top_k, which=settings.which, tol=settings.tol or 1e-6,
                            max_iter=settings.max_iter, generator=generator,
                            return_vectors=settings.save_vectors)

    def extremes(self, problem: Problem, settings: Settings, generator: torch.Generator) -> ExtremesResult:
        op = self.operator(problem, settings)
        return extremes(op, tol=settings.tol or 1e-6, max_iter=settings.max_iter, generator=generator)

    def density(self, problem: Problem, settings: Settings, generator: torch.Generator) -> DensityResult:
        op = self.operator(problem, settings)
        return slq(op, iters=settings.iters, runs=settings.runs, generator=generator, sigma=settings.sigma,
                   grid=settings.grid)
