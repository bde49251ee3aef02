"""The native engine: hesscli's own operators and algorithms (default backend, the reference)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

from hesscli.algorithms.exact import exact_trace
from hesscli.algorithms.hutchinson import hutchinson
from hesscli.algorithms.hutchpp import hutchpp
from hesscli.algorithms.lanczos import extremes_of, lanczos_run
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
        self._operator_key: tuple[object, ...] | None = None
        self._planned: tuple[Problem, frozenset[str]] | None = None
        self._shared: dict[str, object] = {}

    def operator(self, problem: Problem, settings: Settings) -> EmpiricalRiskOperator:
        """The curvature operator of ``problem``; analyses of the same problem with the same
        curvature and product path share one (and its cached gradient graph)."""
        key = (id(problem), settings.curvature, settings.hvp)
        if self.last_operator is not None and self._operator_key == key and self.last_operator.problem is problem:
            self.last_operator.on_matvecs = self.on_matvecs
            return self.last_operator
        self.last_operator = None  # free the previous graph before building the next
        op = make_operator(problem, settings.curvature, hvp=settings.hvp, reduce=self.reduce)
        op.on_matvecs = self.on_matvecs
        self.last_operator, self._operator_key = op, key
        return op

    # ------------------------------------------------------------------ shared runs
    def plan(self, problem: Problem, analyses: Iterable[str], settings: Settings) -> None:
        """Announce the analyses about to run on ``problem`` (``hesscli scan`` does), so that
        one Lanczos run serves several of them:

        * ``eigs`` with ``extremes``: one run computes the wanted end(s) and the other end's
          extreme (e.g. the top 10 and λ_min); ``extremes`` then costs no product (its
          ``n_hvp`` is 0) and matches a separate run to the tolerance.
        * ``eigs`` or ``extremes`` with ``density``: when that run takes at least ``--iters``
          steps before any restart, its first ``--iters`` steps are the first SLQ run (a
          Gaussian start vector, as unbiased as a Rademacher one), so ``density`` spends
          ``(runs - 1) · iters`` products.
        """
        self._planned = (problem, frozenset(analyses))
        self._shared = {}

    def _wants(self, problem: Problem, analysis: str) -> bool:
        return self._planned is not None and self._planned[0] is problem and analysis in self._planned[1]

    def _shared_for(self, problem: Problem, name: str, key: object) -> object | None:
        item = self._shared.get(name)
        if item is None or item[0] is not problem or item[1] != key:
            return None
        del self._shared[name]
        return item[2]

    def _lanczos(self, problem: Problem, settings: Settings, generator: torch.Generator, *, k: int, which: str,
                 k_smallest: int | None = None, return_vectors: bool = False):
        op = self.operator(problem, settings)
        density_steps = settings.iters if self._wants(problem, "density") and settings.runs >= 1 else 0
        run = lanczos_run(op, k=k, which=which, k_smallest=k_smallest, tol=settings.tol or None,
                          max_iter=settings.max_iter, generator=generator, return_vectors=return_vectors,
                          keep_tridiagonal=density_steps if density_steps <= op.size else 0)
        if run.alphas is not None:
            self._shared["density"] = (problem, self._density_key(settings), (run.alphas, run.betas))
        return run.result

    @staticmethod
    def _density_key(settings: Settings) -> tuple[object, ...]:
        return (settings.seed, settings.curvature, settings.hvp, settings.iters)

    @staticmethod
    def _extremes_key(settings: Settings) -> tuple[object, ...]:
        return (settings.seed, settings.curvature, settings.hvp, settings.tol, settings.max_iter)

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
        k, which = settings.top_k, settings.which
        if not self._wants(problem, "extremes") or which == "both":
            r = self._lanczos(problem, settings, generator, k=k, which=which, return_vectors=settings.save_vectors)
            if which == "both" and self._wants(problem, "extremes"):
                self._shared["extremes"] = (problem, self._extremes_key(settings), extremes_of(r, n_hvp=0))
            return r
        # one run for the wanted end and the other end's extreme
        k_top, k_bottom = (k, 1) if which == "largest" else (1, k)
        r = self._lanczos(problem, settings, generator, k=k_top, which="both", k_smallest=k_bottom,
                          return_vectors=settings.save_vectors)
        self._shared["extremes"] = (problem, self._extremes_key(settings), extremes_of(r, n_hvp=0))
        keep = [i for i, w in enumerate(r.which) if w == which]
        return dataclasses.replace(
            r, eigenvalues=tuple(r.eigenvalues[i] for i in keep), residuals=tuple(r.residuals[i] for i in keep),
            converged=tuple(r.converged[i] for i in keep), which=tuple(r.which[i] for i in keep),
            rank=tuple(r.rank[i] for i in keep),
            eigenvectors=None if r.eigenvectors is None else r.eigenvectors[:, keep])

    def extremes(self, problem: Problem, settings: Settings, generator: torch.Generator) -> ExtremesResult:
        shared = self._shared_for(problem, "extremes", self._extremes_key(settings))
        if shared is not None:
            return shared  # type: ignore[return-value]
        return extremes_of(self._lanczos(problem, settings, generator, k=1, which="both"))

    def density(self, problem: Problem, settings: Settings, generator: torch.Generator) -> DensityResult:
        op = self.operator(problem, settings)
        first = self._shared_for(problem, "density", self._density_key(settings))
        return slq(op, iters=settings.iters, runs=settings.runs, generator=generator, sigma=settings.sigma,
                   grid=settings.grid, first_run=first)  # type: ignore[arg-type]
