"""What the third-party adapters share: :class:`PeerBackend`.

The peers (``pyhessian``, ``eigenthings``, ``backpack``) each drive a library on the
problem; this base holds what does not depend on the library:

* importing the library only when the backend is built, with the install hint when it is
  missing, and the refusal of torch.distributed runs (the peers run in one process);
* the private copy of the model they work on (the user's model is never touched);
* product counting with progress reports (:class:`Counter`);
* the measured residuals ``||Hv - λv||`` of returned vectors and the flags that follow from
  them (:func:`~hesscli.algorithms.lanczos.residual_flags`), and the assembly of
  :class:`EigsResult`, :class:`ExtremesResult` (:func:`~hesscli.algorithms.lanczos.extremes_of`)
  and :class:`DensityResult` (broadened with :func:`~hesscli.algorithms.slq.broaden`, so
  ``--sigma`` and ``--grid`` mean the same as for the native engine).

Capability checks are not repeated here: each analysis's ``check`` refuses what a backend
cannot do before any work starts.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from hesscli.algorithms.lanczos import extremes_of, residual_flags
from hesscli.backends import PACKAGES
from hesscli.backends.base import Capabilities, Reduce
from hesscli.errors import BackendUnavailable, ConvergenceWarning, InputError, UnsupportedAnalysis
from hesscli.options import EngineOptions
from hesscli.results.records import DensityResult, EigsResult, ExtremesResult

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.analyses.density import DensityOptions
    from hesscli.loading.problem import Problem

__all__ = ["PeerBackend", "Counter", "measured_residuals", "patched", "seed_from"]


class Counter:
    """Counts products (or passes) and reports the running count to ``on_matvecs``."""

    def __init__(self, on_matvecs: Callable[[int], None] | None = None) -> None:
        self.n = 0
        self.on_matvecs = on_matvecs

    def add(self, count: int = 1) -> None:
        self.n += count
        if self.on_matvecs is not None:
            self.on_matvecs(self.n)

    def counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` that counts one product per call."""

        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.add()
            return out

        return call


def measured_residuals(matvec: Callable[[Tensor], Tensor], vectors: Tensor,
                       values: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """True residuals of the columns of ``vectors`` (``[n, k]``), one product each.

    Args:
        matvec: the curvature product of a flat vector.
        vectors: the returned vectors, one per column (normalised here).
        values: their eigenvalues; ``None``: the Rayleigh quotients of the unit vectors.

    Returns:
        ``(values, residuals, unit_vectors)``: float64 CPU values and ``||H v - λ v||``, and the
        unit vectors in the dtype and on the device of ``vectors``.
    """
    V = vectors / torch.linalg.vector_norm(vectors, dim=0, keepdim=True)
    HV = torch.stack([matvec(V[:, i].contiguous()) for i in range(V.shape[1])], dim=1)
    lam = (V * HV).sum(0) if values is None else values
    res = torch.linalg.vector_norm(HV - V * lam.to(V.dtype), dim=0)
    return lam.to(torch.float64).cpu(), res.to(torch.float64).cpu(), V


class PeerBackend:
    """Base of the adapters around a third-party library.

    Subclasses set :attr:`name`, :attr:`capabilities` and :attr:`library` (the module
    imported when the backend is built, available as ``self.lib``).

    Args:
        engine: curvature and product path (a peer uses ``curvature`` only).
        reduce: all-reduce of products under torch.distributed; the peers run their library
            in one process, so anything but ``None`` is refused.
        on_matvecs: progress callback receiving the running product count.

    Raises:
        BackendUnavailable: the library is not installed (the message says how to install it).
        UnsupportedAnalysis: ``reduce`` is given (torch.distributed run).
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    library: ClassVar[str]

    def __init__(self, engine: EngineOptions | None = None, *, reduce: Reduce | None = None,
                 on_matvecs: Callable[[int], None] | None = None) -> None:
        if reduce is not None:
            raise UnsupportedAnalysis(f"--backend {self.name} cannot run under torch.distributed; "
                                      "use --backend native")
        self.engine = engine or EngineOptions(backend=self.name)
        self.on_matvecs = on_matvecs
        try:
            self.lib: ModuleType = importlib.import_module(self.library)
        except ImportError as e:
            extra = PACKAGES.get(self.name, self.name)
            raise BackendUnavailable(f"backend '{self.name}' needs: pip install 'hesscli[{extra}]'") from e

    # ----------------------------------------------------------------- problem

    def counter(self) -> Counter:
        """A fresh product count for one analysis, reporting to ``on_matvecs``."""
        return Counter(self.on_matvecs)

    @staticmethod
    def batches(problem: Problem) -> list[tuple[Any, Tensor]]:
        """The problem's batches (refusing an empty dataset)."""
        if not problem.data.batches:
            raise InputError("--data: the dataset has no batches; nothing to analyse")
        return problem.data.batches

    @staticmethod
    def private_model(problem: Problem) -> nn.Module:
        """A deep copy of the model with no ``.grad`` in which only the selected parameters are trainable.

        The libraries call ``backward`` on it, register hooks or leave graph-carrying gradients;
        none of that reaches the user's model.
        """
        model = copy.deepcopy(problem.model)
        selected = set(problem.params)
        for name, p in model.named_parameters():
            p.grad = None
            if name not in selected:
                p.requires_grad_(False)
        return model

    def same_parameters(self, names: Sequence[str], problem: Problem) -> None:
        """Refuse when the library's parameters are not the selected ones in the same order
        (flat vectors would be laid out differently)."""
        names = list(names)
        if names != list(problem.params):
            raise UnsupportedAnalysis(
                f"--backend {self.name} sees the parameters {names[:3]}..., hesscli selected "
                f"{list(problem.params)[:3]}...; use --backend native"
            )

    @staticmethod
    def check_top_k(k: int, n: int) -> None:
        if not 1 <= k <= n:
            raise InputError(f"--top-k {k}: expected between 1 and the {n} parameters analysed; ask for fewer")

    # ----------------------------------------------------------------- results

    def eigs_result(self, lam: Tensor, res: Tensor, *, tol: float, dtype: torch.dtype, norm: float,
                    which: tuple[str, ...], rank: tuple[int, ...], n_hvp: int, n_iter: int,
                    vectors: Tensor | None, method: str, advice: str) -> EigsResult:
        """An :class:`EigsResult` from measured residuals, with a :class:`ConvergenceWarning` when
        some values are not converged.

        Args:
            lam, res: float64 eigenvalues and their residuals ``||Hv - λv||``.
            tol: relative tolerance of ``converged``.
            dtype: the products' dtype (its rounding sets the floor).
            norm: the scale of the operator (the largest ``|λ|`` known).
            which, rank: each value's end and position from that end.
            n_hvp, n_iter: products spent in all, and by the eigensolver.
            vectors: ``[n, k]`` unit vectors to return (``None``: not asked for).
            method: the library's algorithm, for the warning (``"PyHessian power iteration"``).
            advice: what to change when values are not converged.
        """
        bounds, converged, at_floor = residual_flags(lam, res, tol, dtype, norm)
        if not bool(converged.all()):
            warnings.warn(
                f"{method}: {int(converged.sum())} of {lam.numel()} eigenvalues converged (residual bound within "
                f"tol={tol}) after {n_iter} products; {advice}",
                ConvergenceWarning,
                stacklevel=3,
            )
        return EigsResult(
            eigenvalues=tuple(float(x) for x in lam),
            residuals=tuple(float(x) for x in res),
            converged=tuple(bool(x) for x in converged),
            which=which,
            rank=rank,
            n_hvp=n_hvp,
            n_iter=n_iter,
            eigenvectors=vectors,
            error_bounds=tuple(float(x) for x in bounds),
            at_floor=tuple(bool(x) for x in at_floor),
        )

    def extremes_result(self, lam: Tensor, res: Tensor, **kwargs: Any) -> ExtremesResult:
        """:class:`ExtremesResult` of ``(λ_max, λ_min)`` and their residuals (``kwargs`` as :meth:`eigs_result`)."""
        r = self.eigs_result(lam, res, which=("largest", "smallest"), rank=(1, 1), vectors=None, **kwargs)
        return extremes_of(r)

    @staticmethod
    def density_result(nodes: Tensor, weights: Tensor, alphas: Tensor, betas: Tensor, options: DensityOptions,
                       n_hvp: int) -> DensityResult:
        """A :class:`DensityResult` of the library's raw quadrature (float64 ``[runs, iters]``),
        broadened as the native engine does."""
        from hesscli.algorithms.slq import broaden

        grid, density, sigma = broaden(nodes, weights, sigma=options.sigma, grid=options.grid)
        return DensityResult(grid=grid, density=density, nodes=nodes, weights=weights, alphas=alphas,
                             betas=betas, sigma=sigma, n_hvp=n_hvp)


def seed_from(generator: torch.Generator, bound: int) -> int:
    """An integer seed in ``[0, bound)`` for a library's own generators, drawn from the analysis generator."""
    return int(torch.randint(0, bound, (1,), generator=generator))


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name`` to ``value`` while the block runs; the previous value (or its absence)
    is restored afterwards. The adapters correct or observe a library this way."""
    missing = object()
    previous = getattr(owner, name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)
