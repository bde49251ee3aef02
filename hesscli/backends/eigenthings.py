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
import logging
import math
import warnings
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from hesscli.algorithms.lanczos import DEFAULT_MAX_ITER, default_tol, residual_flags
from hesscli.backends.base import Capabilities
from hesscli.config import Settings
from hesscli.errors import BackendUnavailable, ConvergenceWarning, InputError, UnsupportedAnalysis
from hesscli.loading.problem import Problem
from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult

__all__ = ["EigenthingsBackend"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "backend 'eigenthings' needs: pip install 'hesscli[eigenthings]'"

DEFAULT_TOL = 1e-6
"""Relative residual tolerance for ``converged`` (the native engine's default)."""

_SEED_BOUND = 2**31 - 1


def _import_eigenthings() -> ModuleType:
    """Return the ``hessian_eigenthings`` package, or raise :class:`BackendUnavailable`."""
    try:
        return importlib.import_module("hessian_eigenthings")
    except ImportError as e:
        raise BackendUnavailable(INSTALL_HINT) from e


def _seed(generator: torch.Generator) -> int:
    """An integer seed for the library's own generators, drawn from the analysis generator."""
    return int(torch.randint(0, _SEED_BOUND, (1,), generator=generator))


class _Counted:
    """Wrap an eigenthings operator's ``matvec`` to count products (and report progress)."""

    def __init__(self, op: Any, on_matvecs: Callable[[int], None] | None) -> None:
        self.op = op
        self.n = 0
        self.on_matvecs = on_matvecs

    def __call__(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            out = self.op.matvec(v).detach()  # the GGN path returns a result still tied to the graph
        self.n += 1
        if self.on_matvecs is not None:
            self.on_matvecs(self.n)
        return out


@contextlib.contextmanager
def _capture_tridiagonals(algorithm: str) -> Iterator[list[Any]]:
    """Record the Lanczos tridiagonals that ``lanczos``/``spectral_density`` build but do not return.

    Args:
        algorithm: ``lanczos`` or ``spectral_density`` (the library module that calls
            ``lanczos_tridiagonal``).

    Yields:
        A list receiving each run's ``LanczosTridiag`` (alphas, betas, basis, ...).
    """
    module = importlib.import_module(f"hessian_eigenthings.algorithms.{algorithm}")
    original = module.lanczos_tridiagonal
    seen: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        td = original(*args, **kwargs)
        seen.append(td)
        return td

    module.lanczos_tridiagonal = recording
    try:
        yield seen
    finally:
        module.lanczos_tridiagonal = original


class EigenthingsBackend:
    """Hessian or GGN: Lanczos eigenvalues (both ends), Hutchinson/Hutch++ trace, SLQ density.

    Args:
        reduce: All-reduce of products under torch.distributed; the adapter runs the
            library's single-process operators, so anything but ``None`` is refused.
        on_matvecs: Progress callback receiving the running product count.

    Raises:
        BackendUnavailable: ``hessian-eigenthings`` is not installed.
        UnsupportedAnalysis: ``reduce`` is given (torch.distributed run).
    """

    name = "eigenthings"
    capabilities = Capabilities(
        analyses={
            "trace": ("hutch++", "hutchinson"),  # first = default
            "eigs": ("lanczos",),
            "extremes": ("lanczos",),
            "density": ("slq",),
        },
        curvatures=("hessian", "ggn"),
        whiches=("largest", "smallest", "both"),
        notes=(
            "eigenthings averages batches with equal weight; hesscli rescales each batch's loss so "
            "products are exactly those of the dataset-mean loss",
            "eigenthings Lanczos runs its whole --max-iter budget (no early stop, no restart) with full "
            "reorthogonalisation forced on",
            "trace --tol is not a stopping rule for eigenthings (fixed budget); it only sets 'converged'",
        ),
    )

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None,
                 on_matvecs: Callable[[int], None] | None = None) -> None:
        if reduce is not None:
            raise UnsupportedAnalysis(
                "--backend eigenthings cannot run under torch.distributed in hesscli; use --backend native"
            )
        self._he = _import_eigenthings()
        self.on_matvecs = on_matvecs

    # ----------------------------------------------------------------- operator

    def operator(self, problem: Problem, settings: Settings) -> tuple[Any, _Counted]:
        """The library's curvature operator over the problem, with exact dataset-mean weighting.

        Args:
            problem: The loaded problem.
            settings: Uses ``curvature`` (``hessian`` or ``ggn``).

        Returns:
            ``(operator, counter)``: an eigenthings ``LambdaOperator`` whose products are
            counted by ``counter`` (``counter.n``).

        Raises:
            UnsupportedAnalysis: an unknown curvature.
            InputError: an empty dataset.
        """
        he = self._he
        batches = problem.data.batches
        if not batches:
            raise InputError("--data: the dataset has no batches; nothing to analyse")
        n_batches, n_total = len(batches), problem.data.n_total
        fn = problem.loss.fn
        selected = set(problem.params)

        def weight(batch: Any) -> float:
            # equal-weight batch average of weight_b * H_b == sum_b (n_b / N) H_b
            return n_batches * batch[1].shape[0] / n_total

        def keep(name: str, _: Any) -> bool:
            return name in selected

        if settings.curvature == "hessian":
            op = he.HessianOperator(
                problem.model, batches, lambda model, b: weight(b) * fn(model(b[0]), b[1]),
                param_filter=keep, full_dataset=True,
            )
        elif settings.curvature == "ggn":
            op = he.GGNOperator(
                problem.model, batches, lambda model, b: model(b[0]),
                lambda out, b: weight(b) * fn(out, b[1]), param_filter=keep, full_dataset=True,
            )
        else:
            raise UnsupportedAnalysis(
                f"--backend eigenthings cannot use --curvature {settings.curvature}; it supports: hessian, ggn"
            )
        names = list(he.select_parameters(problem.model, keep))
        if names != list(problem.params):
            raise UnsupportedAnalysis(
                f"--backend eigenthings orders parameters as {names[:3]}..., hesscli as "
                f"{list(problem.params)[:3]}...; use --backend native"
            )
        counter = _Counted(op, self.on_matvecs)
        wrapped = he.LambdaOperator(counter, op.size, device=op.device, dtype=op.dtype)
        return wrapped, counter

    def _matvecs(self, op: Any, V: Tensor) -> Tensor:
        """``H @ V`` column by column (``V`` is ``[n, k]``)."""
        return torch.stack([op.matvec(V[:, i].contiguous()) for i in range(V.shape[1])], dim=1)

    def _budget(self, settings: Settings, n: int, k_total: int) -> int:
        """Lanczos steps: ``--max-iter`` or the native default ``max(200, 20 k)``, capped at ``n``."""
        steps = settings.max_iter or max(DEFAULT_MAX_ITER, 20 * k_total)
        return max(min(steps, n), min(k_total, n))

    def _ritz(self, op: Any, k: int, which: str, steps: int, generator: torch.Generator) -> tuple[Any, float]:
        """One eigenthings ``lanczos`` run with the full budget and reorthogonalisation.

        Returns:
            ``(result, norm)``: the library's result and the largest ``|Ritz value|`` of the
            run (from its tridiagonal), the scale of the absolute floor in ``converged``.
        """
        with _capture_tridiagonals("lanczos") as tridiagonals:
            r = self._he.lanczos(op, k=k, max_iter=steps, which=which, reorthogonalize=True,
                                 tol=DEFAULT_TOL, seed=_seed(generator))
        td = tridiagonals[-1]
        T = torch.diag(td.alphas.double().cpu())
        if td.betas.numel():
            b = td.betas.double().cpu()[: T.shape[0] - 1]
            T = T + torch.diag(b, 1) + torch.diag(b, -1)
        return r, float(torch.linalg.eigvalsh(T).abs().max())

    def _residuals(self, op: Any, values: Tensor, vectors: Tensor) -> Tensor:
        """True residuals ``||H v - λ v||`` of unit ``vectors`` ``[n, k]`` (one product each)."""
        V = vectors / torch.linalg.vector_norm(vectors, dim=0, keepdim=True)
        HV = self._matvecs(op, V)
        return torch.linalg.vector_norm(HV - V * values.to(V.dtype), dim=0).to(torch.float64).cpu()

    # ----------------------------------------------------------------- analyses

    def trace(self, problem: Problem, settings: Settings, generator: torch.Generator) -> TraceResult:
        """Hutchinson or Hutch++ via eigenthings' ``trace(method=..., num_matvecs=--probes)``.

        The library's estimate and standard error are kept; the 95% interval is hesscli's
        skewness-corrected t interval (:func:`~hesscli.algorithms.hutchinson.summarise`) on its
        per-sample values (for Hutch++ the residual-phase samples). ``trace --tol``
        (``settings.trace_tol``) does not stop the fixed budget: it only sets ``converged``
        (relative standard error within it).

        Returns:
            :class:`TraceResult` (``n_probes`` = vectors multiplied, as ``n_hvp``).
        """
        from hesscli.algorithms.hutchinson import summarise

        if settings.method not in ("hutchinson", "hutch++"):
            raise UnsupportedAnalysis(
                f"--backend eigenthings has no trace --method {settings.method}; it supports: hutchinson, hutch++"
            )
        op, counter = self.operator(problem, settings)
        r = self._he.trace(op, num_matvecs=settings.probes, method=settings.method, seed=_seed(generator))
        samples = r.samples.detach().to(torch.float64).cpu()
        _, _, lo, hi = summarise(samples, 0.95)
        shift = r.estimate - float(samples.mean())  # Hutch++: the exact low-rank part
        stderr = r.stderr if math.isfinite(r.stderr) else math.inf
        converged = True
        target = settings.trace_tol
        if target is not None:
            converged = stderr <= target * abs(r.estimate)
            if not converged:
                warnings.warn(
                    f"eigenthings {settings.method} trace: relative standard error "
                    f"{stderr / abs(r.estimate) if r.estimate else math.inf:.3g} after {counter.n} products is "
                    f"above tol={target}; raise --probes",
                    ConvergenceWarning,
                    stacklevel=2,
                )
        return TraceResult(estimate=float(r.estimate), stderr=stderr, ci_low=lo + shift, ci_high=hi + shift,
                           n_probes=counter.n, method=settings.method, n_hvp=counter.n, converged=converged)

    def eigs(self, problem: Problem, settings: Settings, generator: torch.Generator) -> EigsResult:
        """Eigenvalues at one or both ends via eigenthings' ``lanczos`` (``LA`` / ``SA``).

        ``largest`` runs ``which="LA"``, ``smallest`` ``which="SA"``; ``both`` takes the two
        ends of one run's Ritz values (a second run with the same start would repeat the
        same products). Every returned vector gets one extra product for its true
        residual; flags and error bounds follow :func:`~hesscli.algorithms.lanczos.residual_flags`
        (``--tol``, default :func:`~hesscli.algorithms.lanczos.default_tol`).

        Returns:
            :class:`EigsResult` ordered like the native engine's.

        Raises:
            InputError: ``--top-k`` outside ``1..n_params`` or an unknown ``--which``.
        """
        k, which = settings.top_k, settings.which
        if which not in ("largest", "smallest", "both"):
            raise InputError(f"--which {which!r}: use one of largest, smallest, both")
        op, counter = self.operator(problem, settings)
        n = op.size
        if not 1 <= k <= n:
            raise InputError(f"--top-k {k}: expected between 1 and the {n} parameters analysed; ask for fewer")
        k_total = min(2 * k, n) if which == "both" else k
        steps = self._budget(settings, n, k_total)
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
        lam = values.to(torch.float64).cpu()
        res = self._residuals(op, values, vectors.T)
        tol = settings.tol or default_tol(problem.dtype)
        bounds, converged, at_floor = residual_flags(lam, res, tol, problem.dtype, norm)
        if not bool(converged.all()):
            warnings.warn(
                f"eigenthings Lanczos: {int(converged.sum())} of {lam.numel()} eigenvalues converged within "
                f"{n_iter} products (tol={settings.tol or default_tol(problem.dtype)}); raise --max-iter or loosen --tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        return EigsResult(
            eigenvalues=tuple(float(x) for x in lam),
            residuals=tuple(float(x) for x in res),
            converged=tuple(bool(x) for x in converged),
            which=labels,
            rank=ranks,
            n_hvp=counter.n,
            n_iter=n_iter,
            eigenvectors=vectors.T.contiguous() if settings.save_vectors else None,
            error_bounds=tuple(float(x) for x in bounds),
            at_floor=tuple(bool(x) for x in at_floor),
        )

    def extremes(self, problem: Problem, settings: Settings, generator: torch.Generator) -> ExtremesResult:
        """λ_max and λ_min: the two ends of one eigenthings ``lanczos`` run (its LA and SA values).

        Returns:
            :class:`ExtremesResult` with true residuals (one extra product per end).
        """
        op, counter = self.operator(problem, settings)
        n = op.size
        steps = self._budget(settings, n, min(2, n))
        r, norm = self._ritz(op, steps, "LA", steps, generator)
        idx = [0, r.eigenvalues.numel() - 1]
        values, vectors = r.eigenvalues[idx], r.eigenvectors[idx]
        lam = values.to(torch.float64).cpu()
        res = self._residuals(op, values, vectors.T)
        _, converged, _ = residual_flags(lam, res, settings.tol or default_tol(problem.dtype), problem.dtype,
                                         norm)
        if not bool(converged.all()):
            warnings.warn(
                f"eigenthings Lanczos: the extreme eigenvalues did not converge within {steps} products "
                f"(tol={settings.tol or default_tol(problem.dtype)}); raise --max-iter or loosen --tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        lam_max, lam_min = float(lam[0]), float(lam[1])
        condition = abs(lam_max) / abs(lam_min) if lam_min != 0 else math.inf
        if lam_min >= 0:
            ratio = 0.0
        else:
            ratio = abs(lam_min) / lam_max if lam_max > 0 else math.inf
        return ExtremesResult(lambda_max=lam_max, lambda_min=lam_min, condition_number=condition,
                              negative_ratio=ratio, residual_max=float(res[0]), residual_min=float(res[1]),
                              converged=bool(converged.all()), n_hvp=counter.n)

    def density(self, problem: Problem, settings: Settings, generator: torch.Generator) -> DensityResult:
        """SLQ via eigenthings' ``spectral_density(num_runs=--runs, lanczos_steps=--iters)``.

        Steps are capped at the number of parameters (the library refuses more). Its raw
        nodes and weights are re-broadened with :func:`hesscli.algorithms.slq.broaden`, so
        ``--sigma`` and ``--grid`` mean the same as for the native engine; the Lanczos
        tridiagonals it builds are recorded for ``alphas``/``betas``. A run that hit an
        invariant subspace early is padded like the native engine's: its largest node repeated
        with weight 0 (``alphas`` padded with that node, ``betas`` with 0).

        Returns:
            :class:`DensityResult` (float64 ``[runs, iters]`` nodes, weights and alphas).
        """
        from hesscli.algorithms.slq import broaden

        op, counter = self.operator(problem, settings)
        steps = min(settings.iters, op.size)
        with _capture_tridiagonals("spectral_density") as tridiagonals:
            r = self._he.spectral_density(op, num_runs=settings.runs, lanczos_steps=steps,
                                          num_grid_points=max(settings.grid, 2), sigma=settings.sigma,
                                          seed=_seed(generator))
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
        grid, density, sigma = broaden(nodes, weights, sigma=settings.sigma, grid=settings.grid)
        return DensityResult(grid=grid, density=density, nodes=nodes, weights=weights, alphas=alphas,
                             betas=betas, sigma=sigma, n_hvp=counter.n)

    # ----------------------------------------------------------------- helpers

