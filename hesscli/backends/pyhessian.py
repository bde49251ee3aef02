"""PyHessian (Yao, Gholami, Keutzer & Mahoney 2020, arXiv 1912.07145) behind ``--backend pyhessian``.

The adapter drives the released ``pyhessian`` 0.1 wheel: its ``hessian`` class, its
double-backward Hessian-vector products, its power iteration and its stochastic Lanczos
quadrature. Four defects of that wheel are worked around here, each documented where
it is handled:

* ``trace()`` stops as soon as the running mean is negative: its stopping test divides by
  the signed running mean, so the relative change is negative and "below tol" after two
  probes. Upstream fixed this in git (commit ``1a42737``, ``abs()`` around the
  denominator) but never released it; :class:`_Engine` overrides ``trace`` with the fixed
  test and otherwise the same loop.
* ``density()`` calls ``torch.eig``, which PyTorch removed; :func:`torch_eig_shim`
  supplies it for the duration of the call, built on ``torch.linalg.eigh`` (the matrix is
  a symmetric tridiagonal).
* Its ``normalization`` divides by ``||v|| + 1e-6``, which biases every Lanczos node and
  power-iteration value by a relative ``1e-6 / ||v||`` (6% when the curvature is around
  1e-4); :func:`_exact_normalization` divides by the norm itself while PyHessian runs.
* Its constructor calls ``backward(create_graph=True)`` and leaves graph-carrying
  ``.grad`` on the model, and it allocates vectors in the *default* dtype. The adapter
  works on a deep copy of the model (the user's model is never touched) and runs with
  the problem's dtype as the default dtype.

PyHessian computes the Hessian only (no GGN) and its eigenvalues are the largest in
*magnitude* (power iteration), so a dominant negative eigenvalue is returned before a
smaller positive one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hesscli.backends.base import Capabilities
from hesscli.backends.peer import Counter, PeerBackend, measured_residuals, patched, seed_from
from hesscli.errors import ConvergenceWarning, UnsupportedAnalysis
from hesscli.loading.problem import Problem
from hesscli.results.records import DensityResult, EigsResult, GroupTrace, TraceResult

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.analyses.density import DensityOptions
    from hesscli.analyses.eigs import EigsOptions
    from hesscli.analyses.trace import TraceOptions

__all__ = ["PyHessianBackend", "torch_eig_shim"]

logger = logging.getLogger(__name__)

DEFAULT_TOL = 1e-3
"""PyHessian's own default tolerance for ``trace()`` and ``eigenvalues()``."""

DEFAULT_MAX_ITER = 100
"""PyHessian's own default number of power iterations per eigenvalue."""

_SEED_BOUND = 2**62


# --------------------------------------------------------------------------- compatibility


@contextlib.contextmanager
def torch_eig_shim() -> Iterator[list[Tensor]]:
    """Temporarily provide the removed ``torch.eig`` for PyHessian 0.1's ``density()``.

    ``torch.eig(T, eigenvectors=True)`` returned ``(values [n, 2], vectors [n, n])``, the
    eigenvalues as (real, imaginary) columns. PyHessian only ever passes the symmetric
    tridiagonal Lanczos matrix, so the shim uses ``torch.linalg.eigh`` (in float64, then
    exact real eigenvalues with a zero imaginary column), which is the right solver for
    that matrix; general ``eig`` is not. The previous ``torch.eig`` is restored on exit.

    Yields:
        A list that receives, in call order, a float64 CPU copy of every matrix the shim
        decomposed (for SLQ these are the Lanczos tridiagonals, so ``alpha``/``beta`` can
        be read off them).

    Example:
        >>> T = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> with torch_eig_shim() as seen:
        ...     values, vectors = torch.eig(T, eigenvectors=True)
        >>> values[:, 0].tolist(), len(seen)
        ([1.0, 3.0], 1)
    """
    captured: list[Tensor] = []

    def eig(input: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
        matrix = input.detach().to(torch.float64)
        captured.append(matrix.cpu())
        evals, evecs = torch.linalg.eigh((matrix + matrix.T) / 2)
        values = torch.stack([evals, torch.zeros_like(evals)], dim=1)
        if not eigenvectors:
            evecs = evecs.new_empty(0)
        return values, evecs

    with patched(torch, "eig", eig):
        yield captured


@contextlib.contextmanager
def _exact_normalization(module: Any) -> Iterator[None]:
    """Normalise vectors by their norm, not PyHessian's ``norm + 1e-6``.

    PyHessian's ``normalization`` divides by ``||v|| + 1e-6``, so its Lanczos and power
    iteration vectors are short by a relative ``1e-6 / ||v||``: SLQ nodes and eigenvalues
    are biased by that much, which is 6% when the curvature is around 1e-4. The exact
    version keeps the guard against a zero vector.
    """
    utils: Any = importlib.import_module("pyhessian.utils")
    group_product = utils.group_product

    def normalization(v: list[Tensor]) -> list[Tensor]:
        norm = float(group_product(v, v)) ** 0.5
        return [x / norm for x in v] if norm > 0 else list(v)

    # orthnormal() looks it up in utils
    with patched(utils, "normalization", normalization), patched(module, "normalization", normalization):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` the default while PyHessian allocates its vectors (``torch.zeros(size)``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (used by PyHessian's ``randn``/``randint_like``) from ``generator``.

    The global CPU (and, on CUDA, the device's) RNG state is restored on exit, so the
    user's random streams are untouched.
    """
    seed = seed_from(generator, _SEED_BOUND)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """PyHessian moves data with ``.cuda()``/``.to('cuda')``: make that the problem's GPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


class _LossModule(nn.Module):
    """``criterion(outputs, targets)`` as an ``nn.Module``, the form PyHessian expects."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.fn(outputs, targets)


@functools.cache
def _engine_class(module: Any) -> type:
    """The PyHessian ``hessian`` class extended with product counting and the fixed trace."""
    group_product = module.group_product

    class _Engine(module.hessian):  # type: ignore[misc, name-defined]
        """``pyhessian.hessian`` that counts products and stops ``trace()`` correctly.

        Products over a dataloader go through :meth:`dataloader_hv_product` (counted
        here, on ``self.counter``); single-batch products go through the module-level
        ``hessian_vector_product``, counted by :func:`_counting_products`.
        """

        counter: Counter

        def dataloader_hv_product(self, v: list[Tensor]) -> tuple[float, list[Tensor]]:
            out = super().dataloader_hv_product(v)
            self.counter.add()
            return out

        def hv(self, v: list[Tensor]) -> list[Tensor]:
            """One Hessian-vector product on PyHessian's own product path."""
            if self.full_dataset:
                return list(self.dataloader_hv_product(v)[1])
            return list(module.hessian_vector_product(self.gradsH, self.params, v))

        def trace(self, maxIter: int = 100, tol: float = 1e-3,  # noqa: N803 (PyHessian's names)
                  generator: torch.Generator | None = None) -> list[list[float]]:
            """PyHessian 0.1's Hutchinson loop with the git fix of its stopping test.

            Same probes (Rademacher), same running-mean rule ``|mean_i - mean_{i-1}| /
            (|mean_{i-1}| + 1e-6) < tol``; the released wheel lacks the ``abs()`` in the
            denominator, so a negative running mean stopped it after two probes.
            Probes are drawn from ``generator`` (on the CPU, then moved).

            Returns:
                Per probe, ``[v_gᵀ (Hv)_g for each parameter g]`` (their sum is PyHessian's sample).
            """
            samples: list[list[float]] = []
            running = 0.0
            for _ in range(maxIter):
                self.model.zero_grad()
                v = [
                    (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64) * 2 - 1)
                    .to(device=p.device, dtype=p.dtype)
                    for p in self.params
                ]
                Hv = self.hv(v)
                samples.append([float(group_product([h], [x])) for h, x in zip(Hv, v)])
                mean = sum(sum(s) for s in samples) / len(samples)
                if abs(mean - running) / (abs(running) + 1e-6) < tol:
                    break
                running = mean
            return samples

    return _Engine


@contextlib.contextmanager
def _counting_products(module: Any, counter: Counter) -> Iterator[None]:
    """Count the single-batch products, which PyHessian makes through a module-level function."""
    with patched(module, "hessian_vector_product", counter.counted(module.hessian_vector_product)):
        yield


def _flat(vectors: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in vectors])


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [c.reshape(p.shape) for c, p in zip(flat.split([p.numel() for p in like]), like)]


class PyHessianBackend(PeerBackend):
    """Hessian trace (Hutchinson), top-k eigenvalues (power iteration) and SLQ density via PyHessian.

    Products are PyHessian's double-backward HVPs over the whole dataset: a single batch
    builds the gradient graph once and reuses it; several batches use PyHessian's
    dataloader mode, which weights each batch by its size, so every product is exactly
    that of the dataset-mean loss. ``n_hvp`` counts them.

    PyHessian eigenvalues are the largest in *magnitude* (power iteration with deflation): a
    dominant negative eigenvalue is returned among the ``largest``. PyHessian stops trace
    and power iteration on the relative change of a running value (``trace --tol`` /
    ``eigs --tol``, default 1e-3), not on an error target; residuals are measured afterwards.
    """

    name = "pyhessian"
    library = "pyhessian.hessian"  # the package re-exports the class ``hessian`` under the submodule's name
    capabilities = Capabilities(
        analyses={"trace": ("hutchinson",), "eigs": ("power",), "density": ("slq",)},
        curvatures=("hessian",),
        whiches=("largest",),
    )

    # ----------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _engine(self, problem: Problem, generator: torch.Generator) -> Iterator[Any]:
        """A counting PyHessian ``hessian`` on a private copy of the model, inside every context it needs.

        Its products are counted on ``engine.counter``.
        """
        device = problem.device
        if device.type not in ("cpu", "cuda"):
            raise UnsupportedAnalysis(f"--backend pyhessian runs on cpu or cuda only, got --device {device}")
        model = self.private_model(problem)
        self.same_parameters([n for n, p in model.named_parameters() if p.requires_grad], problem)
        batches = self.batches(problem)
        cls = _engine_class(self.lib)
        criterion = _LossModule(problem.loss.fn)
        cuda = device.type == "cuda"
        with _on_device(device), _default_dtype(problem.dtype), torch.enable_grad(), _seeded(generator, device), \
                warnings.catch_warnings():
            # PyHessian's backward(create_graph=True) triggers torch's reference-cycle warning; the
            # cycle lives on the private copy and is broken below.
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            if len(batches) == 1:
                engine = cls(model, criterion, data=batches[0], cuda=cuda)
            else:
                engine = cls(model, criterion, dataloader=batches, cuda=cuda)
            engine.counter = self.counter()
            try:
                with _counting_products(self.lib, engine.counter), _exact_normalization(self.lib):
                    yield engine
            finally:
                for p in model.parameters():  # break the graph cycle that backward(create_graph=True) left
                    p.grad = None

    # ----------------------------------------------------------------- analyses

    def trace(self, problem: Problem, options: TraceOptions, generator: torch.Generator) -> TraceResult:
        """Hutchinson trace with PyHessian's running-mean stop (fixed for negative traces).

        ``options.probes`` is PyHessian's ``maxIter`` and ``options.tol`` (``trace --tol``,
        default 1e-3) its tolerance on the relative change of the running mean between
        probes (PyHessian's rule, not hesscli's relative-stderr target). The per-probe
        samples become an estimate, a standard error and a skewness-corrected t 95% interval
        (:func:`~hesscli.algorithms.hutchinson.summarise`); per-parameter traces come from the
        same probes.

        Returns:
            :class:`TraceResult` with ``method="hutchinson"``; ``converged`` is False (with
            a :class:`ConvergenceWarning`) when the probe budget ran out before PyHessian's
            stopping rule fired.
        """
        from hesscli.algorithms.hutchinson import summarise

        tol = options.tol if options.tol is not None else DEFAULT_TOL
        with self._engine(problem, generator) as engine:
            samples = engine.trace(maxIter=options.probes, tol=tol, generator=generator)
            n_hvp = engine.counter.n
        per_param = torch.tensor(samples, dtype=torch.float64).T  # [groups, n]
        total = per_param.sum(0)
        converged = len(samples) < options.probes or _stopped(total, tol)
        if not converged:
            warnings.warn(
                f"PyHessian trace: the running mean still moved by more than tol={tol} after {options.probes} "
                "probes; raise --probes",
                ConvergenceWarning,
                stacklevel=2,
            )
        estimate, stderr, lo, hi = summarise(total, 0.95)
        groups: tuple[GroupTrace, ...] = ()
        if len(problem.params) > 1:
            groups = tuple(GroupTrace(name, *summarise(row, 0.95)) for name, row in zip(problem.params, per_param))
        return TraceResult(estimate=estimate, stderr=stderr, ci_low=lo, ci_high=hi, n_probes=len(samples),
                           method="hutchinson", n_hvp=n_hvp, groups=groups, converged=converged)

    def eigs(self, problem: Problem, options: EigsOptions, generator: torch.Generator) -> EigsResult:
        """Top-k eigenvalues by PyHessian's power iteration with deflation.

        ``options.max_iter`` (default 100) is PyHessian's ``maxIter`` *per eigenvalue* and
        ``options.tol`` (default 1e-3) its tolerance on the relative change of the
        eigenvalue. PyHessian's values lag its vectors by one iteration, so one more product
        per returned (unit) vector gives its Rayleigh quotient (reported) and the residual
        ``||Hv - λv||``; flags and error bounds follow
        :func:`~hesscli.algorithms.lanczos.residual_flags`.

        Returns:
            :class:`EigsResult` ordered by decreasing magnitude (PyHessian's target),
            labelled ``largest``; ``n_iter`` and ``n_hvp`` count every product.

        Raises:
            InputError: ``--top-k`` outside ``1..n_params``.
        """
        k = options.top_k
        self.check_top_k(k, problem.n_params)
        tol = options.tol if options.tol is not None else DEFAULT_TOL
        max_iter = options.max_iter or DEFAULT_MAX_ITER
        with self._engine(problem, generator) as engine:
            _, vectors = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
            V = torch.stack([_flat(v) for v in vectors], dim=1).to(problem.dtype)
            lam, res, V = measured_residuals(lambda x: _flat(engine.hv(_split(x, engine.params))), V)
            n_hvp = engine.counter.n
        order = torch.argsort(lam.abs(), descending=True)
        lam, res, V = lam[order], res[order], V[:, order]
        if (lam < 0).any():
            logger.warning("PyHessian returned negative eigenvalue(s) among the largest in magnitude: %s",
                           [round(float(x), 6) for x in lam[lam < 0]])
        return self.eigs_result(
            lam, res, tol=tol, dtype=problem.dtype, norm=float(lam.abs().max()), which=("largest",) * k,
            rank=tuple(range(1, k + 1)), n_hvp=n_hvp, n_iter=n_hvp, vectors=V if options.save_vectors else None,
            method="PyHessian power iteration",
            advice=f"at most {max_iter} iterations per eigenvalue; raise --max-iter or lower --tol")

    def density(self, problem: Problem, options: DensityOptions, generator: torch.Generator) -> DensityResult:
        """Spectral density by PyHessian's SLQ (``density(iter, n_v)``), broadened like the native one.

        ``options.iters`` Lanczos steps (capped at the number of parameters, beyond which
        Lanczos has nothing left to find) and ``options.runs`` runs. PyHessian's removed
        ``torch.eig`` call is served by :func:`torch_eig_shim`, which also hands back the
        tridiagonals (``alphas``/``betas``).

        Returns:
            :class:`DensityResult` (float64 nodes, weights, alphas, betas ``[runs, iters]``).
        """
        iters = min(options.iters, problem.n_params)
        with self._engine(problem, generator) as engine, torch_eig_shim() as tridiagonals:
            nodes, weights = engine.density(iter=iters, n_v=options.runs)
            n_hvp = engine.counter.n
        T = torch.stack(tridiagonals)
        return self.density_result(
            torch.tensor(nodes, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64),
            torch.diagonal(T, dim1=1, dim2=2).clone(), torch.diagonal(T, offset=1, dim1=1, dim2=2).clone(),
            options, n_hvp)


def _stopped(total: Tensor, tol: float) -> bool:
    """Whether PyHessian's (fixed) stopping rule held at the last probe."""
    if total.numel() < 2:
        return False
    previous = float(total[:-1].mean())
    return abs(float(total.mean()) - previous) / (abs(previous) + 1e-6) < tol
