"""hessian-eigenthings (v1, Golmant et al.) behind ``--backend eigenthings``.

The adapter builds the library's ``HessianOperator`` (double-backward HVPs) or
``GGNOperator`` (``J^T H_loss J`` with ``torch.func``) over the problem's batches and runs
its own ``lanczos``, ``trace`` (Hutchinson / Hutch++) and ``spectral_density`` (SLQ) on
it. Three behaviours of the 1.0.0a5 release are corrected for:

* **Equal-weight batches.** With ``full_dataset=True`` the operators average the per-batch
  products with *equal* weight, so a ragged last batch (or any uneven split) is over- or
  under-weighted. The adapter scales batch ``b``'s loss by ``n_batches · n_b / N``; the
  equal-weight average of the scaled products is then exactly
  ``sum_b (n_b / N) H_b``, the curvature of the dataset-mean loss.
* **Under-budgeted Lanczos.** ``lanczos`` defaults to ``min(2k, n - 1)`` steps and turns
  reorthogonalisation off above 50 steps. The adapter passes the native engine's budget
  (``--max-iter``, default ``max(200, 20k)``, capped at the number of parameters) and
  forces ``reorthogonalize=True``.
* **Residuals.** The library's residuals are the Ritz estimates ``|β s_m|``; the adapter
  measures ``||Hv - λv||`` for every returned vector with one extra product each and sets
  ``converged`` from it with the native engine's rule.

Random numbers: the library seeds its own CPU generators from an integer; that integer is
drawn from the analysis generator, so results follow ``--seed``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hesscli.algorithms.lanczos import DEFAULT_MAX_ITER, default_tol
from hesscli.backends.base import Capabilities
from hesscli.backends.peer import Counter, PeerBackend, measured_residuals, patched, seed_from
from hesscli.errors import ConvergenceWarning
from hesscli.loading.problem import Problem
from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.analyses.density import DensityOptions
    from hesscli.analyses.eigs import EigsOptions
    from hesscli.analyses.extremes import ExtremesOptions
    from hesscli.analyses.trace import TraceOptions

__all__ = ["EigenthingsBackend"]

RITZ_TOL = 1e-6
"""Tolerance passed to the library's ``lanczos`` (it runs its whole budget; ``converged`` is
hesscli's, from measured residuals)."""

_SEED_BOUND = 2**31 - 1


@contextlib.contextmanager
def _capture_tridiagonals(algorithm: str) -> Iterator[list[Any]]:
    """Record the Lanczos tridiagonals that ``lanczos``/``spectral_density`` build but do not return.

    Args:
        algorithm: ``lanczos`` or ``spectral_density`` (the library module that calls
            ``lanczos_tridiagonal``).

    Yields:
        A list receiving each run's ``LanczosTridiag`` (alphas, betas, basis, ...).
    """
    module: Any = importlib.import_module(f"hessian_eigenthings.algorithms.{algorithm}")
    original = module.lanczos_tridiagonal
    seen: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        td = original(*args, **kwargs)
        seen.append(td)
        return td

    with patched(module, "lanczos_tridiagonal", recording):
        yield seen


class EigenthingsBackend(PeerBackend):
    """Hessian or GGN: Lanczos eigenvalues (both ends), Hutchinson/Hutch++ trace, SLQ density.

    eigenthings Lanczos runs its whole ``--max-iter`` budget (no early stop, no restart) with
    full reorthogonalisation forced on; ``trace --tol`` is not a stopping rule (fixed
    budget), it only sets ``converged``.
    """

    name = "eigenthings"
    library = "hessian_eigenthings"
    capabilities = Capabilities(
        analyses={
            "trace": ("hutch++", "hutchinson"),  # first = default
            "eigs": ("lanczos",),
            "extremes": ("lanczos",),
            "density": ("slq",),
        },
        curvatures=("hessian", "ggn"),
        whiches=("largest", "smallest", "both"),
    )

    # ----------------------------------------------------------------- operator

    def operator(self, problem: Problem) -> tuple[Any, Counter]:
        """The library's curvature operator (``engine.curvature``) over the problem, with exact
        dataset-mean weighting, on a private copy of the model.

        Returns:
            ``(operator, counter)``: an eigenthings ``LambdaOperator`` whose products are
            counted by ``counter`` (``counter.n``).

        Raises:
            InputError: an empty dataset.
        """
        he = self.lib
        batches = self.batches(problem)
        n_batches, n_total = len(batches), problem.data.n_total
        fn = problem.loss.fn
        selected = set(problem.params)
        model = self.private_model(problem)

        def weight(batch: Any) -> float:
            # equal-weight batch average of weight_b * H_b == sum_b (n_b / N) H_b
            return n_batches * batch[1].shape[0] / n_total

        def keep(name: str, _: Any) -> bool:
            return name in selected

        if self.engine.curvature == "ggn":
            op = he.GGNOperator(
                model, batches, lambda model, b: model(b[0]),
                lambda out, b: weight(b) * fn(out, b[1]), param_filter=keep, full_dataset=True,
            )
        else:
            op = he.HessianOperator(
                model, batches, lambda model, b: weight(b) * fn(model(b[0]), b[1]),
                param_filter=keep, full_dataset=True,
            )
        self.same_parameters(he.select_parameters(model, keep), problem)
        counter = self.counter()

        @counter.counted
        def matvec(v: Tensor) -> Tensor:
            with torch.enable_grad():
                return op.matvec(v).detach()  # the GGN path returns a result still tied to the graph

        return he.LambdaOperator(matvec, op.size, device=op.device, dtype=op.dtype), counter

    def _budget(self, max_iter: int | None, n: int, k_total: int) -> int:
        """Lanczos steps: ``--max-iter`` or the native default ``max(200, 20 k)``, capped at ``n``."""
        steps = max_iter or max(DEFAULT_MAX_ITER, 20 * k_total)
        return max(min(steps, n), min(k_total, n))

    def _ritz(self, op: Any, k: int, which: str, steps: int, generator: torch.Generator) -> tuple[Any, float]:
        """One eigenthings ``lanczos`` run with the full budget and reorthogonalisation.

        Returns:
            ``(result, norm)``: the library's result and the largest ``|Ritz value|`` of the
            run (from its tridiagonal), the scale of the absolute floor in ``converged``.
        """
        with _capture_tridiagonals("lanczos") as tridiagonals:
            r = self.lib.lanczos(op, k=k, max_iter=steps, which=which, reorthogonalize=True,
                                 tol=RITZ_TOL, seed=seed_from(generator, _SEED_BOUND))
        td = tridiagonals[-1]
        T = torch.diag(td.alphas.double().cpu())
        if td.betas.numel():
            b = td.betas.double().cpu()[: T.shape[0] - 1]
            T = T + torch.diag(b, 1) + torch.diag(b, -1)
        return r, float(torch.linalg.eigvalsh(T).abs().max())

    # ----------------------------------------------------------------- analyses

    def trace(self, problem: Problem, options: TraceOptions, generator: torch.Generator) -> TraceResult:
        """Hutchinson or Hutch++ via eigenthings' ``trace(method=..., num_matvecs=--probes)``.

        The library's estimate and standard error are kept; the 95% interval is hesscli's
        skewness-corrected t interval (:func:`~hesscli.algorithms.hutchinson.summarise`) on its
        per-sample values (for Hutch++ the residual-phase samples). ``trace --tol``
        (``options.tol``) does not stop the fixed budget: it only sets ``converged``
        (relative standard error within it).

        Returns:
            :class:`TraceResult` (``n_probes`` = vectors multiplied, as ``n_hvp``).
        """
        from hesscli.algorithms.hutchinson import summarise

        method = options.method or self.capabilities.analyses["trace"][0]
        op, counter = self.operator(problem)
        r = self.lib.trace(op, num_matvecs=options.probes, method=method, seed=seed_from(generator, _SEED_BOUND))
        samples = r.samples.detach().to(torch.float64).cpu()
        _, _, lo, hi = summarise(samples, 0.95)
        shift = r.estimate - float(samples.mean())  # Hutch++: the exact low-rank part
        stderr = r.stderr if math.isfinite(r.stderr) else math.inf
        converged = True
        target = options.tol
        if target is not None:
            converged = stderr <= target * abs(r.estimate)
            if not converged:
                warnings.warn(
                    f"eigenthings {method} trace: relative standard error "
                    f"{stderr / abs(r.estimate) if r.estimate else math.inf:.3g} after {counter.n} products is "
                    f"above tol={target}; raise --probes",
                    ConvergenceWarning,
                    stacklevel=2,
                )
        return TraceResult(estimate=float(r.estimate), stderr=stderr, ci_low=lo + shift, ci_high=hi + shift,
                           n_probes=counter.n, method=method, n_hvp=counter.n, converged=converged)

    def eigs(self, problem: Problem, options: EigsOptions, generator: torch.Generator) -> EigsResult:
        """Eigenvalues at one or both ends via eigenthings' ``lanczos`` (``LA`` / ``SA``).

        ``largest`` runs ``which="LA"``, ``smallest`` ``which="SA"``; ``both`` takes the two
        ends of one run's Ritz values (a second run with the same start would repeat the
        same products). Every returned vector gets one extra product for its true
        residual; flags and error bounds follow :func:`~hesscli.algorithms.lanczos.residual_flags`
        (``--tol``, default :func:`~hesscli.algorithms.lanczos.default_tol`).

        Returns:
            :class:`EigsResult` ordered like the native engine's.

        Raises:
            InputError: ``--top-k`` outside ``1..n_params``.
        """
        k, which = options.top_k, options.which
        op, counter = self.operator(problem)
        n = op.size
        self.check_top_k(k, n)
        k_total = min(2 * k, n) if which == "both" else k
        steps = self._budget(options.max_iter, n, k_total)
        if which == "both":
            r, norm = self._ritz(op, steps, "LA", steps, generator)
            m = r.eigenvalues.numel()
            top, bottom = list(range(min(k, m))), list(range(m - 1, m - 1 - min(k, m), -1))
            idx = top + bottom
            labels = ("largest",) * len(top) + ("smallest",) * len(bottom)
            ranks = tuple(range(1, len(top) + 1)) + tuple(range(1, len(bottom) + 1))
            values, vectors = r.eigenvalues[idx], r.eigenvectors[idx]
        else:
            r, norm = self._ritz(op, k, "LA" if which == "largest" else "SA", steps, generator)
            values, vectors = r.eigenvalues, r.eigenvectors
            labels, ranks = (which,) * values.numel(), tuple(range(1, values.numel() + 1))
        n_iter = counter.n
        lam, res, V = measured_residuals(op.matvec, vectors.T, values)
        return self.eigs_result(
            lam, res, tol=options.tol or default_tol(problem.dtype), dtype=problem.dtype, norm=norm, which=labels,
            rank=ranks, n_hvp=counter.n, n_iter=n_iter,
            vectors=vectors.T.contiguous() if options.save_vectors else None,
            method="eigenthings Lanczos", advice="raise --max-iter or loosen --tol")

    def extremes(self, problem: Problem, options: ExtremesOptions, generator: torch.Generator) -> ExtremesResult:
        """λ_max and λ_min: the two ends of one eigenthings ``lanczos`` run (its LA and SA values).

        Returns:
            :class:`ExtremesResult` with true residuals (one extra product per end).
        """
        op, counter = self.operator(problem)
        n = op.size
        steps = self._budget(options.max_iter, n, min(2, n))
        r, norm = self._ritz(op, steps, "LA", steps, generator)
        idx = [0, r.eigenvalues.numel() - 1]
        n_iter = counter.n
        lam, res, _ = measured_residuals(op.matvec, r.eigenvectors[idx].T, r.eigenvalues[idx])
        return self.extremes_result(
            lam, res, tol=options.tol or default_tol(problem.dtype), dtype=problem.dtype, norm=norm,
            n_hvp=counter.n, n_iter=n_iter, method="eigenthings Lanczos", advice="raise --max-iter or loosen --tol")

    def density(self, problem: Problem, options: DensityOptions, generator: torch.Generator) -> DensityResult:
        """SLQ via eigenthings' ``spectral_density(num_runs=--runs, lanczos_steps=--iters)``.

        Steps are capped at the number of parameters (the library refuses more). Its raw
        nodes and weights are re-broadened as the native engine's; the Lanczos tridiagonals
        it builds are recorded for ``alphas``/``betas``. A run that hit an invariant subspace
        early is padded like the native engine's: its largest node repeated with weight 0
        (``alphas`` padded with that node, ``betas`` with 0).

        Returns:
            :class:`DensityResult` (float64 ``[runs, iters]`` nodes, weights and alphas).
        """
        op, counter = self.operator(problem)
        steps = min(options.iters, op.size)
        with _capture_tridiagonals("spectral_density") as tridiagonals:
            r = self.lib.spectral_density(op, num_runs=options.runs, lanczos_steps=steps,
                                          num_grid_points=max(options.grid, 2), sigma=options.sigma,
                                          seed=seed_from(generator, _SEED_BOUND))
        runs = len(tridiagonals)
        nodes = torch.zeros(runs, steps, dtype=torch.float64)
        weights = torch.zeros(runs, steps, dtype=torch.float64)
        alphas = torch.zeros(runs, steps, dtype=torch.float64)
        betas = torch.zeros(runs, max(steps - 1, 0), dtype=torch.float64)
        raw_nodes = r.raw_eigenvalues.detach().to(torch.float64).cpu()
        raw_weights = r.raw_weights.detach().to(torch.float64).cpu()
        for i, td in enumerate(tridiagonals):
            m = td.alphas.numel()
            largest = float(raw_nodes[i, m - 1])  # nodes come sorted; pad as the native engine does:
            nodes[i, :m], nodes[i, m:] = raw_nodes[i, :m], largest  # the largest node, with weight 0,
            weights[i, :m] = raw_weights[i, :m]
            alphas[i, :m], alphas[i, m:] = td.alphas.detach().to(torch.float64).cpu(), largest  # same quadrature
            betas[i, : td.betas.numel()] = td.betas.detach().to(torch.float64).cpu()
        return self.density_result(nodes, weights, alphas, betas, options, counter.n)
