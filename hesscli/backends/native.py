"""The native engine: hesscli's own operators and algorithms (default backend, the reference)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from hesscli.algorithms.exact import exact_trace
from hesscli.algorithms.hutchinson import hutchinson
from hesscli.algorithms.hutchpp import hutchpp_run, orth_chunk_bytes
from hesscli.algorithms.lanczos import BLOCK, default_ncv, extremes_of, lanczos_run
from hesscli.algorithms.slq import slq
from hesscli.backends.base import Capabilities, Reduce
from hesscli.errors import InputError
from hesscli.loading.problem import Problem
from hesscli.memory import (
    COLUMN_BLOCK,
    DEFAULT_BLOCK,
    HEADROOM,
    VECTORS_PER_COLUMN,
    MemoryPlan,
    activation_bytes,
    format_size,
    parse_size,
    plan_memory,
    resident_bytes,
)
from hesscli.operators.empirical import EmpiricalRiskOperator, make_operator
from hesscli.options import EngineOptions
from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.analyses.density import DensityOptions
    from hesscli.analyses.eigs import EigsOptions
    from hesscli.analyses.extremes import ExtremesOptions
    from hesscli.analyses.trace import TraceOptions
    from hesscli.runner import SharedRuns

logger = logging.getLogger(__name__)

EXACT_TRACE_MAX_PARAMS = 50_000
"""``trace --method exact`` needs one product per parameter; above this it is refused."""


class NativeBackend:
    """Exact Hessian/GGN products over the full dataset, Lanczos, Hutchinson/Hutch++, SLQ.

    Analyses of one checkpoint can share one Lanczos run through a
    :class:`~hesscli.runner.SharedRuns` (``hesscli scan`` and the monitor pass one):

    * ``eigs`` with ``extremes``: one run computes the wanted end(s) and the other end's
      extreme (e.g. the top 10 and λ_min); ``extremes`` then costs no product (its
      ``n_hvp`` is 0) and matches a separate run to the tolerance.
    * ``eigs`` with ``density``: the eigs run keeps its eigenvectors, and its converged
      eigenpairs (either end) are deflated from the density
      (:func:`~hesscli.algorithms.slq.slq`, ``deflate``): they enter as point masses ``1/n`` and
      SLQ (``runs · iters`` products) estimates the narrower rest of the spectrum,
      ``(I - U Uᵀ) H (I - U Uᵀ)``. The result's ``deflated`` says how many, and the ``ritz`` rows
      of those values have a null ``alpha``. This is preferred to the first-run sharing below
      even for a single-vector run: at about equal products the deflated density was closer to
      the exact one (``benchmarks.density_deflation``, W1).
    * ``extremes`` with ``density`` (no eigs planned): when its run is a single-vector run of at least ``--iters`` steps before any restart, its first ``--iters``
      steps are the first SLQ run (a Gaussian start vector, as unbiased as a Rademacher one), so
      ``density`` spends ``(runs - 1) · iters`` products.

    Along a series of checkpoints (a :class:`~hesscli.runner.SharedRuns` with ``warm``), each
    Lanczos run starts from the previous checkpoint's Ritz vectors of the same run (except a run
    whose first steps serve as the first SLQ run, which needs a Gaussian start), and Hutch++
    takes the previous ``A Q`` as its sketch, saving the sketch's ``probes / 3`` products for
    residual probes (:func:`~hesscli.algorithms.hutchpp.hutchpp_run`). What is carried is ``k``
    Ritz vectors per Lanczos run and ``probes / 3`` vectors for Hutch++.

    With ``max_memory`` (``--max-memory``) each analysis sizes its products to the budget
    (:func:`~hesscli.memory.plan_memory`): the operator multiplies at most that many columns at a
    time (and passes over the data in smaller chunks when one column on a batch does not fit),
    and Hutchinson, Hutch++ and SLQ draw their probes in blocks of that size. Probes are drawn
    column by column, so the numbers are those of a run without a budget, up to the rounding of
    differently split sums. The vectors an algorithm keeps count against the budget: Hutch++'s
    basis ``Q`` (``probes / 3`` vectors), the SLQ bases (``runs · iters``), the Lanczos basis and
    what a warm start carries; when they do not fit, the analysis is refused with the number
    that would.
    """

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
        calls_model_on_tensors_only=False,
    )
    shares_runs = True

    def __init__(self, engine: EngineOptions | None = None, *, reduce: Reduce | None = None,
                 on_matvecs: Callable[[int], None] | None = None) -> None:
        self.engine = engine or EngineOptions()
        self.reduce = reduce
        self.on_matvecs = on_matvecs
        self.last_operator: EmpiricalRiskOperator | None = None
        self.max_memory = None if self.engine.max_memory is None else parse_size(self.engine.max_memory)
        self.last_plan: MemoryPlan | None = None
        self._sizes: tuple[int, int, int] | None = None  # resident bytes, activation bytes, batch of last_operator

    def operator(self, problem: Problem) -> EmpiricalRiskOperator:
        """The curvature operator of ``problem``; analyses of the same problem share one (and its
        cached gradient graph)."""
        if self.last_operator is not None and self.last_operator.problem is problem:
            self.last_operator.on_matvecs = self.on_matvecs
            return self.last_operator
        self.last_operator = None  # free the previous graph before building the next
        self._sizes = None
        op = make_operator(problem, self.engine.curvature, hvp=self.engine.hvp, reduce=self.reduce)
        op.on_matvecs = self.on_matvecs
        self.last_operator = op
        return op

    def fit(self, op: EmpiricalRiskOperator, *, held: int = 0, held_what: str = "", fewer: str = "",
            block: int = DEFAULT_BLOCK) -> int:
        """Size the products of the next analysis to ``max_memory``; return its probe block size.

        Without a budget ``block`` is returned, at most :data:`~hesscli.memory.COLUMN_BLOCK` where
        the operator multiplies one column at a time anyway. With one, the operator's
        :attr:`~hesscli.operators.empirical.EmpiricalRiskOperator.max_columns` and data chunk
        are set from :func:`~hesscli.memory.plan_memory`, and the gradient-graph cache is kept
        only when it fits beside the products.

        Args:
            op: the analysis's operator.
            held: bytes the algorithm keeps besides its product blocks.
            held_what: what they are, for the message.
            fewer: how to need less, for the message.
            block: the block the algorithm wants.

        Raises:
            InputError: when the budget cannot hold the model, the data, ``held`` and one column.
        """
        if op.one_column_at_a_time:  # a block saves no work there: only memory
            block = min(block, COLUMN_BLOCK)
        if self.max_memory is None:
            return block
        resident, per_sample, batch = self._measure(op)
        itemsize = torch.empty((), dtype=op.dtype).element_size()
        problem = op.problem
        can_chunk = problem.checkpoint.metadata.get("batchnorm") != "batch"
        budget = self.max_memory
        label = str(self.engine.max_memory)

        def attempt(extra: int) -> MemoryPlan:
            return plan_memory(budget, n=op.size, itemsize=itemsize, per_sample=per_sample, batch=batch,
                               resident=resident, held=held + extra, held_what=held_what, fewer=fewer,
                               block=block, can_chunk=can_chunk, label=label)

        cache = problem.data.n_samples * per_sample if op.cache_graph else 0
        plan = attempt(0)
        if cache:
            try:
                with_cache: MemoryPlan | None = attempt(cache)
            except InputError:
                with_cache = None
            if with_cache is not None and with_cache.chunk is None:
                plan = with_cache
            else:
                op.cache_graph = False
                op._graphs = None
                logger.info("--max-memory %s: the gradient graphs of all %d samples (%s) do not fit beside the "
                            "products; they are rebuilt for every product", label,
                            problem.data.n_samples, format_size(cache))
        # what an out-of-memory retry learnt stays: the plan only ever lowers it
        op.max_columns = plan.block_size if op.oom_columns is None else min(plan.block_size, op.oom_columns)
        chunk = plan.chunk if op.oom_chunk is None else min(plan.chunk or op.oom_chunk, op.oom_chunk)
        if chunk != op.chunk:
            op.set_chunk(chunk)
        self.last_plan = plan
        logger.info("--max-memory %s: %d column(s) per product%s (%s of activations per sample and column)",
                    label, plan.block_size,
                    f", chunks of {plan.chunk} samples" if plan.chunk is not None else "", format_size(per_sample))
        return plan.block_size

    def _measure(self, op: EmpiricalRiskOperator) -> tuple[int, int, int]:
        """``(resident bytes, activation bytes per sample and column, largest batch)`` of the operator's
        problem, measured once per problem; under torch.distributed the largest over the processes,
        so that every process makes the same plan (they must multiply the same blocks)."""
        if self._sizes is None:
            problem = op.problem
            sizes = [resident_bytes(problem), activation_bytes(problem),
                     max((y.shape[0] for _, y in problem.data.batches), default=1)]
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                t = torch.tensor(sizes, dtype=torch.float64, device=problem.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                sizes = [int(v) for v in t.tolist()]
            self._sizes = (sizes[0], sizes[1], sizes[2])
        return self._sizes

    def _fitting(self, op: EmpiricalRiskOperator, per_unit: int) -> int:
        """How many units of ``per_unit`` bytes fit beside one column on one sample (at least 0)."""
        assert self.max_memory is not None
        resident, per_sample, _ = self._measure(op)
        one = self._vectors(op, VECTORS_PER_COLUMN) + per_sample
        return max(0, (int(self.max_memory * HEADROOM) - resident - one) // max(1, per_unit))

    def _vectors(self, op: EmpiricalRiskOperator, count: int) -> int:
        """Bytes of ``count`` vectors of the operator's size and dtype."""
        return count * op.size * torch.empty((), dtype=op.dtype).element_size()

    # ------------------------------------------------------------------ shared runs
    def _lanczos(self, problem: Problem, options: EigsOptions | ExtremesOptions, generator: torch.Generator, *,
                 k: int, which: str, k_smallest: int | None = None, return_vectors: bool = False,
                 shared: SharedRuns | None = None, deflate: bool = False) -> EigsResult:
        op = self.operator(problem)
        density = shared.planned("density", problem) if shared is not None else None
        density_steps = density.iters if density is not None and density.runs >= 1 else 0
        deflating = deflate and density_steps > 0  # the vectors are kept for the density
        # an eigs run deflates its converged pairs from the density; another run (extremes) gives its
        # first steps as the first SLQ run when it is a single-vector run
        keep = density_steps if not deflating and density_steps <= op.size else 0
        warm = shared.warm if shared is not None else None
        warm_key = ("lanczos", which, k, k_smallest, self.engine.curvature)
        # a warm start saves a few steps; the first SLQ run (a Gaussian start) saves ``iters`` products
        start = warm.get(warm_key, op.size) if warm is not None and not keep else None
        if self.max_memory is not None:
            n_bottom = k if k_smallest is None else k_smallest
            k_total = min(k + n_bottom if which == "both" else k, op.size)
            # the basis, the start block beside it, the Ritz vectors formed at a restart (and a warm start's)
            basis = (default_ncv(op.size, k_total, torch.empty((), dtype=op.dtype).element_size()) + 2 * BLOCK
                     + k_total * (2 if warm is not None else 1))
            self.fit(op, held=self._vectors(op, basis), held_what=f"the Lanczos basis ({basis} vectors)",
                     fewer="ask for fewer eigenvalues (--top-k)")
        run = lanczos_run(op, k=k, which=which, k_smallest=k_smallest, tol=options.tol or None,
                          max_iter=options.max_iter, generator=generator, start=start,
                          return_vectors=return_vectors or deflating or warm is not None, keep_tridiagonal=keep)
        r = run.result
        if warm is not None:
            warm.put(warm_key, op.size, r.eigenvectors)
        if shared is not None and density_steps:
            pairs = _resolved_pairs(r, op.size) if deflating else None
            if pairs is not None:
                shared.put("density", problem, DEFLATE, pairs)
            elif run.alphas is not None:  # a single-vector run: its first steps are an SLQ run
                shared.put("density", problem, density_steps, (run.alphas, run.betas))
        if not return_vectors and r.eigenvectors is not None:
            r = dataclasses.replace(r, eigenvectors=None)
        return r

    def trace(self, problem: Problem, options: TraceOptions, generator: torch.Generator, *,
              shared: SharedRuns | None = None) -> TraceResult:
        op = self.operator(problem)
        if options.method == "exact":
            if op.size > EXACT_TRACE_MAX_PARAMS:
                raise InputError(
                    f"trace --method exact needs one product per parameter ({op.size:,} here, limit "
                    f"{EXACT_TRACE_MAX_PARAMS:,}); use --method hutch++ (default) or restrict with --params GLOB"
                )
            block = self.fit(op, block=64)
            return exact_trace(op, block_size=block)
        if options.method == "hutchinson":
            block = self.fit(op)
            return hutchinson(op, n_probes=options.probes, generator=generator, tol=options.tol, block_size=block)
        if options.method == "hutch++":
            warm = shared.warm if shared is not None else None
            key = ("hutch++", options.probes, self.engine.curvature)
            s = min(options.probes // 3, op.size)
            # the sketch, orthonormalised in place into Q (plus its float64 chunks), and carried
            # along a series, A Q for the next checkpoint (the previous one's is taken over as Q)
            held = s + (s if warm is not None else 0)
            fewer = ""
            if self.max_memory is not None:  # per vector of Q: `held / s` vectors, and its share of the chunks
                fits = 3 * self._fitting(op, self._vectors(op, held // max(1, s)) + op.size + 16)
                fewer = (f"use at most --probes {fits} ({options.probes} asked)" if fits >= 3 else
                         "use --method hutchinson (no basis)")
            block = self.fit(op, held=self._vectors(op, held) + orth_chunk_bytes(op.size, s),
                             held_what=f"Hutch++'s sketch basis Q ({s} vectors" +
                             (f", {held} with the products A Q kept for the next checkpoint)" if held > s else ")"),
                             fewer=fewer)
            run = hutchpp_run(op, n_matvecs=options.probes, generator=generator, keep_sketch=warm is not None,
                              sketch=warm.take(key, op.size) if warm is not None else None, block_size=block,
                              tol=options.tol)
            if warm is not None:
                warm.put(key, op.size, run.next_sketch)
            return run.result
        raise InputError(f"--method {options.method!r}: expected one of hutchinson, hutch++, exact")

    def eigs(self, problem: Problem, options: EigsOptions, generator: torch.Generator, *,
             shared: SharedRuns | None = None) -> EigsResult:
        k, which = options.top_k, options.which
        extremes = shared.planned("extremes", problem) if shared is not None else None
        key = (options.tol, options.max_iter)
        if extremes is None or which == "both":
            r = self._lanczos(problem, options, generator, k=k, which=which, return_vectors=options.save_vectors,
                              shared=shared, deflate=True)
            if which == "both" and extremes is not None and shared is not None:
                shared.put("extremes", problem, key, extremes_of(r, n_hvp=0))
            return r
        # one run for the wanted end and the other end's extreme
        k_top, k_bottom = (k, 1) if which == "largest" else (1, k)
        r = self._lanczos(problem, options, generator, k=k_top, which="both", k_smallest=k_bottom,
                          return_vectors=options.save_vectors, shared=shared, deflate=True)
        if shared is not None:
            shared.put("extremes", problem, key, extremes_of(r, n_hvp=0))
        keep = [i for i, w in enumerate(r.which) if w == which]
        return dataclasses.replace(
            r, eigenvalues=tuple(r.eigenvalues[i] for i in keep), residuals=tuple(r.residuals[i] for i in keep),
            converged=tuple(r.converged[i] for i in keep), which=tuple(r.which[i] for i in keep),
            rank=tuple(r.rank[i] for i in keep),
            error_bounds=tuple(r.error_bounds[i] for i in keep) if len(r.error_bounds) == len(r.which) else (),
            at_floor=tuple(r.at_floor[i] for i in keep) if len(r.at_floor) == len(r.which) else (),
            eigenvectors=None if r.eigenvectors is None else r.eigenvectors[:, keep])

    def extremes(self, problem: Problem, options: ExtremesOptions, generator: torch.Generator, *,
                 shared: SharedRuns | None = None) -> ExtremesResult:
        if shared is not None:
            done = shared.take("extremes", problem, (options.tol, options.max_iter))
            if done is not None:
                return done  # type: ignore[no-any-return]
        return extremes_of(self._lanczos(problem, options, generator, k=1, which="both", shared=shared))

    def density(self, problem: Problem, options: DensityOptions, generator: torch.Generator, *,
                shared: SharedRuns | None = None) -> DensityResult:
        op = self.operator(problem)
        first = deflate = None
        if shared is not None:
            deflate = shared.take("density", problem, DEFLATE)
            first = shared.take("density", problem, options.iters) if deflate is None else None
        block: int | None = None
        # where products multiply one column at a time, the runs go one after the other: the
        # same products, one run's basis held instead of all of them
        together = 1 if op.one_column_at_a_time else None
        if self.max_memory is not None:
            runs = options.runs - (1 if first is not None else 0)
            extra = 0 if deflate is None else int(deflate[1].shape[1])

            def plan(group: int) -> int:  # group: runs whose bases are held at once (0: all shared)
                return self.fit(op, held=self._vectors(op, group * options.iters + extra + group),
                                held_what=f"the SLQ bases ({group} run(s) x {options.iters} steps held at a time)",
                                fewer="use fewer --iters" + ("" if group <= 1 else " or --runs"), block=max(1, group))

            block = plan(runs if together is None else min(together, runs))
            if together is not None and runs > 1 and not op.one_column_at_a_time:
                # the graph cache did not fit beside the products: each product now rebuilds the
                # graphs, which runs advanced together share, so they go together if their bases fit
                try:
                    block, together = plan(runs), None
                except InputError:
                    logger.info("--max-memory %s: the SLQ runs go one after the other (the bases of %d runs "
                                "do not fit), each rebuilding the gradient graphs", self.engine.max_memory, runs)
        return slq(op, iters=options.iters, runs=options.runs, generator=generator, sigma=options.sigma,
                   grid=options.grid, first_run=first, deflate=deflate, block_size=block, together=together)


DEFLATE = "deflate"
"""The :class:`~hesscli.runner.SharedRuns` key under which an ``eigs`` run leaves its resolved
eigenpairs for ``density`` (seed and curvature are the runner's, the same for both)."""


def _resolved_pairs(r: EigsResult, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values [k], vectors [n, k])`` of the converged eigenpairs of an eigs run (either end), or
    ``None`` when there are none (or all ``n``: nothing would be left to estimate). An
    unconverged Ritz pair is no eigenpair and is never deflated (see ``slq``'s ``deflate``);
    a converged one's residual ``r`` is at most about ``sqrt(tol · |λ| · gap)``, and deflating it
    moves the eigenvalues of the rest by at most ``r``."""
    if r.eigenvectors is None:
        return None
    keep = [i for i, ok in enumerate(r.converged) if ok and math.isfinite(r.eigenvalues[i])]
    if not keep or len(keep) >= n:
        return None
    values = torch.tensor([r.eigenvalues[i] for i in keep], dtype=torch.float64)
    return values, r.eigenvectors[:, keep]
