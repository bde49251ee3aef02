"""Lanczos eigensolver: blocks, full reorthogonalisation, thick restart, honest stopping.

The basis is kept orthonormal by classical Gram–Schmidt applied twice ("twice is
enough": Giraud, Langou & Rozložník 2005). Every product ``A v`` is projected on the whole
basis, so ``H = Vᵀ A V`` is the Rayleigh–Ritz matrix of the basis (not only its tridiagonal
part) and the residual of a unit Ritz vector ``y = V s`` is ``||R s||``, where ``A V = V H + F R``
ties the basis to the next block ``F`` (Parlett 1998, "The Symmetric Eigenvalue Problem",
§13.1; Golub & Underwood 1977 for blocks). When the basis holds ``ncv`` vectors the method
restarts thickly (Wu & Simon 2000, SIMAX 22): the wanted Ritz vectors (plus a buffer next to
them) are kept, the next block continues the iteration, and memory stays at ``ncv`` vectors.

**Blocks find repeated eigenvalues.** A Krylov space grown from ``b`` random vectors holds at
most ``b`` independent eigenvectors of one eigenvalue. The run starts with ``b = 2`` when an
end wants two or more values (``b = 1`` for one value at each end: a copy of the extreme value
does not change it); whenever a wanted eigenvalue strictly beyond the ``k``-th shows as many
copies as the block has vectors, one more fresh random vector joins the block and the run goes
on for as many block steps as the values took to converge, so that a further copy would have
time to converge too; it stops when such a check finds no new copy. A column of the next
block that vanishes (an invariant subspace, ``β`` at the level of rounding) is replaced by a
fresh random vector orthogonal to everything so far; its coupling is dropped and counted in the
error bounds.

**Flags come from bounds that hold in the arithmetic used.** A computed product carries a
rounding error ``E v``; no Ritz value is better than ``δ ≈ ||E||`` (the *arithmetic floor*).
``δ`` is measured during the run: in exact arithmetic a product ``A v`` of a block has no
component on basis vectors two or more blocks back, so the size of those components is a
direct sample of the rounding error (:meth:`_BlockLanczos.floor`); ``δ`` is never taken below
``4·eps·||A||``. Each eigenvalue's error bound is ``min(r, δ + r²/gap)`` with ``r`` the residual
estimate plus ``δ`` plus the dropped couplings (:func:`floor_bounds`). A value is flagged
converged when that bound is at most ``tol·|θ|`` (relative), or, for a value that cannot be told
apart from zero (``|θ| <= bound``), when the bound is within ``2δ`` ("zero within the floor",
``at_floor``). A value whose relative tolerance lies below the floor (a small float32 eigenvalue
next to outliers 1e4× larger) stops the run once its bound reaches ``2δ`` and is reported with
that bound and ``converged = False``.

Projected eigenproblems are solved in float64 with ``torch.linalg.eigh`` on the CPU.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from hesscli.algorithms.sampling import check_generator, probes
from hesscli.errors import ConvergenceWarning, InputError
from hesscli.operators.base import CurvatureOperator
from hesscli.results.records import EigsResult, ExtremesResult

__all__ = ["WHICH", "DEFAULT_MAX_ITER", "BLOCK", "breakdown_tol", "default_ncv", "default_tol", "error_bounds",
           "floor_bounds", "residual_flags", "lanczos_eigs", "lanczos_run", "LanczosRun", "extremes", "extremes_of"]

logger = logging.getLogger(__name__)

WHICH = ("largest", "smallest", "both")
"""Ends of the spectrum: algebraically largest, algebraically smallest (most negative), both."""

DEFAULT_MAX_ITER = 200
"""Floor of the default product budget (``max(200, 20 · k_total)``): the iteration stops as soon
as the wanted values converge, so the budget only bounds a hard case (the negative end of a
Hessian, whose small eigenvalues sit next to a dense cluster around zero, often needs 100–200)."""

BLOCK = 2
"""Start block size: two random vectors, so an eigenvalue of multiplicity two shows as two
copies (and a third copy is then looked for, see the module docstring)."""

WARM_RANDOM = 0.3
"""Share (in norm) of a fresh Gaussian direction in a warm start vector: the rest points along
the previous problem's Ritz vectors (:func:`lanczos_run`, ``start``)."""

FLOOR_EPS = 4.0
"""The arithmetic floor ``δ`` is at least ``FLOOR_EPS · eps · ||A||``."""

FLOOR_SAFETY = 3.0
"""The rounding error measured along a Ritz vector (one product) is multiplied by this."""

FLOOR_PESSIMISTIC = 1000.0
"""Rounding error of one product, in ``eps · ||A||``, assumed without measuring it (three times the
largest measured on the benchmark workloads); a Ritz vector is checked with a fresh product only
when this could matter for its tolerance."""


def breakdown_tol(dtype: torch.dtype) -> float:
    """Relative size ``β / ||A||`` below which a Lanczos vector counts as rounding noise: ``8·eps``.

    An exhausted Krylov space leaves a remainder of the size of the product's rounding error, a
    few ``eps · ||A||``; anything larger is a coupling to a part of the spectrum not yet seen (in
    float32 a bulk of eigenvalues 1e5× below an outlier has couplings of ``1e-5 · ||A||``, which
    must not be taken for an invariant subspace, as the ``eps^(2/3)`` rule once did). Taking noise
    for a coupling is harmless (the next vector is then some direction orthogonal to everything
    so far), so the threshold sits just above the noise, not well above it. A dropped coupling
    is counted in the error bounds.

    Example:
        >>> breakdown_tol(torch.float64) == 8 * torch.finfo(torch.float64).eps
        True
    """
    return 8 * torch.finfo(dtype).eps


_RESTART_CHUNK = 1 << 22
"""Elements of scratch memory per chunk when the basis is rotated in place at a restart."""

_FIRST_ROWS = 16
"""Rows of the basis allocated at the start (it doubles as needed, up to ``ncv``)."""

NCV_MAX = 100
"""Default basis size: restarts cost convergence (a restarted Krylov space forgets the
polynomial it was building), so the default keeps up to this many vectors..."""

NCV_BYTES = 2 << 30
"""...as long as they fit in this much memory (2 GiB); larger models get fewer, and never fewer
than ``max(2 k + 20, 40)``."""


def default_tol(dtype: torch.dtype) -> float:
    """Default relative eigenvalue tolerance: ``1e-4`` in float32 (and narrower types), what a
    float32 product along a network's top curvature directions resolves (about 1e-5 of the
    eigenvalue, measured); ``1e-10`` in float64.

    Example:
        >>> default_tol(torch.float32), default_tol(torch.float64)
        (0.0001, 1e-10)
    """
    return 1e-10 if torch.finfo(dtype).bits >= 64 else 1e-4


def default_ncv(n: int, k_total: int, itemsize: int) -> int:
    """Default basis size for ``k_total`` wanted values of an operator of size ``n``.

    ``max(2 k_total + 20, m)`` capped at ``n``, where ``m`` is :data:`NCV_MAX` when that many
    vectors fit in :data:`NCV_BYTES`, else as many as fit (at least 40, ARPACK's advice of
    ``ncv >= 2k`` plus room to progress between restarts).

    Example:
        >>> default_ncv(10_000, 1, 4), default_ncv(10_000, 60, 4), default_ncv(100_000_000, 1, 4)
        (100, 140, 40)
    """
    fits = NCV_BYTES // max(1, n * itemsize)
    return min(max(2 * k_total + 20, min(NCV_MAX, max(40, fits))), n)


def error_bounds(theta: Tensor, res: Tensor) -> Tensor:
    """Eigenvalue error bounds ``min(r_i, r_i² / gap_i)`` of Ritz values ``theta`` with residuals ``res``.

    A unit Ritz vector with residual ``r`` has an eigenvalue within ``r`` of its Ritz value;
    when the nearest other eigenvalue is ``gap`` away, within ``r² / gap`` (Kato–Temple;
    Parlett 1998, §11.7). The gap is estimated from the other Ritz values, each moved
    towards ``θ_i`` by its own residual: ``gap_i = min_j |θ_j - θ_i| - r_j`` (no gap bound when
    that is not positive, e.g. inside a cluster). For the extreme Ritz values of a Krylov
    space this is the usual estimate; an eigenvalue the space has not detected at all
    between ``θ_i`` and its neighbours would make the gap smaller than estimated (the block
    steps of :func:`lanczos_run` are there to detect repeated ones).

    Example:
        >>> b = error_bounds(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1e-3, 1e-2], dtype=torch.float64))
        >>> [f"{x:.4e}" for x in b.tolist()]  # 1e-3² / (1 - 1e-2), 1e-2² / (1 - 1e-3)
        ['1.0101e-06', '1.0010e-04']
    """
    return floor_bounds(theta, res, 0.0)


def floor_bounds(theta: Tensor, res: Tensor, delta: float | Tensor) -> Tensor:
    """Error bounds ``min(r_i, δ + r_i² / gap_i)`` of Ritz values computed with products that carry
    a rounding error of at most ``δ`` (``res`` already includes ``δ``).

    The Ritz value is the Rayleigh quotient of the perturbed operator; the true Rayleigh
    quotient differs by at most ``δ``, and Kato–Temple applies to the latter. With ``δ = 0`` this
    is :func:`error_bounds`.

    Example:
        >>> t = torch.tensor([0.0, 5.0], dtype=torch.float64)
        >>> floor_bounds(t, torch.tensor([0.1, 0.1], dtype=torch.float64), 0.05).tolist()  # 0.05 + 0.01 / 4.9
        [0.05204081632653061, 0.05204081632653061]
    """
    m = theta.numel()
    if m < 2:
        return res.clone()
    order = torch.argsort(theta)
    t, r = theta[order], res[order]
    d = delta[order] if isinstance(delta, Tensor) else delta
    inf = torch.full((1,), math.inf, dtype=t.dtype)
    left = torch.cat([inf, (t[1:] - t[:-1]) - r[:-1]])
    right = torch.cat([(t[1:] - t[:-1]) - r[1:], inf])
    gap = torch.minimum(left, right)
    kato = d + r * r / gap.clamp(min=torch.finfo(t.dtype).tiny)
    bound_s = torch.where(gap > 0, torch.minimum(r, kato), r)
    bound = torch.empty_like(bound_s)
    bound[order] = bound_s
    return bound


def residual_flags(values: Tensor, residuals: Tensor, tol: float, dtype: torch.dtype,
                   norm: float) -> tuple[Tensor, Tensor, Tensor]:
    """Error bounds and flags of eigenpairs whose residuals ``||A v - λ v||`` were computed with a
    fresh product each (the peer backends' check): a residual bounds the error of its value
    (no gap is assumed), plus the floor ``FLOOR_EPS · eps · norm`` for the rounding of ``λ``.

    Returns:
        ``(bounds, converged, at_floor)``: converged when the bound is within ``tol · |λ|``, or,
        for a value within its bound of zero, when the residual is at the floor.

    Example:
        >>> b, c, z = residual_flags(torch.tensor([2.0, 1e-20], dtype=torch.float64),
        ...                          torch.tensor([1e-9, 1e-17], dtype=torch.float64), 1e-6, torch.float64, 2.0)
        >>> c.tolist(), z.tolist()
        ([True, True], [False, True])
    """
    delta = FLOOR_EPS * torch.finfo(dtype).eps * norm
    bounds = residuals.to(torch.float64) + delta
    lam = values.to(torch.float64)
    at_floor = lam.abs() <= bounds
    converged = (bounds <= tol * lam.abs()) | (at_floor & (residuals <= 2 * delta))
    return bounds, converged, at_floor


class _BlockLanczos:
    """Block Lanczos process over ``V`` (``[ncv, n]`` rows) with thick restart.

    ``V[:m]`` is the basis whose products are done and ``H[:m, :m] = Vᵀ A V`` its projected
    matrix. ``F`` (``[b, n]`` rows, orthonormal, orthogonal to ``V``) is the next block and
    ``R`` (``[b, m]``, float64) its coupling: ``A V[:m]ᵀ = V[:m]ᵀ H + Fᵀ R`` up to the dropped
    couplings (their norm is at most ``sqrt(dropped2)``) and rounding.
    """

    def __init__(self, A: CurvatureOperator, generator: torch.Generator, ncv: int, block: int,
                 warm: Tensor | None = None) -> None:
        self.A, self.generator, self.n, self.ncv = A, generator, A.size, ncv
        self.warm = None if warm is None else warm.to(device=A.device, dtype=A.dtype)  # unit vector mixed into the first fresh vector (a warm start), then dropped
        self.eps = torch.finfo(A.dtype).eps
        # the basis grows by doubling up to ``ncv`` rows: a run that converges early never
        # touches the memory of a large ``ncv``
        self.V = torch.zeros(min(ncv, _FIRST_ROWS), self.n, dtype=A.dtype, device=A.device)
        self.H = torch.zeros(ncv, ncv, dtype=torch.float64)
        self.m = 0
        self.nblk = 0  # blocks appended so far; the next block gets this number
        self.F = torch.zeros(0, self.n, dtype=A.dtype, device=A.device)
        self.R = torch.zeros(0, 0, dtype=torch.float64)
        self.dropped2 = 0.0
        self.anorm = 0.0
        self.plain = True  # single vector, no restart, no breakdown: H[:m, :m] is the Lanczos matrix
        self.vanished = False
        self.exhausted = False
        self.grow(block)

    @property
    def b(self) -> int:
        return self.F.shape[0]

    def _orthogonalise(self, w: Tensor, rows: Tensor) -> None:
        """Classical Gram–Schmidt of ``w`` (``[n]`` or ``[n, c]``) against ``rows``, twice."""
        if rows.shape[0] == 0:
            return
        w -= rows.T @ (rows @ w)
        w -= rows.T @ (rows @ w)

    def _fresh(self) -> Tensor | None:
        """A Gaussian unit vector orthogonal to ``V[:m]`` and ``F``, or ``None`` if none is left."""
        if self.m + self.b >= self.n:
            return None
        v = probes(self.n, 1, generator=self.generator, dtype=self.A.dtype, device=self.A.device,
                   distribution="normal").squeeze(1)
        if self.warm is not None:  # the Gaussian draw is made anyway: later draws stay those of a cold run
            v = WARM_RANDOM * v / torch.linalg.vector_norm(v) + math.sqrt(1 - WARM_RANDOM**2) * self.warm
            self.warm = None
        scale = float(torch.linalg.vector_norm(v))
        for rows in (self.V[: self.m], self.F):
            self._orthogonalise(v, rows)
        norm = float(torch.linalg.vector_norm(v))
        if norm <= math.sqrt(self.eps) * scale:
            return None
        return v / norm

    def grow(self, count: int) -> int:
        """Add up to ``count`` fresh random vectors to the next block; returns how many were added."""
        added = 0
        for _ in range(count):
            f = self._fresh()
            if f is None:
                break
            self.F = torch.cat([self.F, f.unsqueeze(0)])
            self.R = torch.cat([self.R, torch.zeros(1, self.m, dtype=torch.float64)])
            added += 1
        if added and self.m:
            self.plain = False
        if self.b == 0:
            self.exhausted = True
        return added

    def floor(self, theta: Tensor | None = None) -> float:
        """The arithmetic floor assumed while iterating: ``FLOOR_EPS · eps · ||A||`` (the rounding
        of one product of a dense matrix; a network's products can be worse along their top
        curvature directions, which the final check of :func:`_verify` measures)."""
        anorm = max(self.anorm, float(theta.abs().max()) if theta is not None and theta.numel() else 0.0)
        return FLOOR_EPS * self.eps * anorm

    def predicted(self, coeffs: Tensor) -> Tensor:
        """``A V[:m]ᵀ coeffs`` as the Lanczos relation gives it, ``V H c + F R c`` (``[n, k]``)."""
        c = coeffs.to(torch.float64)
        out = self.V[: self.m].T @ (self.H[: self.m, : self.m] @ c).to(device=self.V.device, dtype=self.V.dtype)
        if self.b:
            out += self.F.T @ (self.R @ c).to(device=self.V.device, dtype=self.V.dtype)
        return out

    def step(self) -> int:
        """One block of products: extend ``H`` by ``b`` columns and compute the next block.

        Returns the products done."""
        m, b = self.m, self.b
        need = m + b
        if need > self.V.shape[0]:
            grown = torch.zeros(min(self.ncv, max(2 * self.V.shape[0], need)), self.n, dtype=self.V.dtype,
                                device=self.V.device)
            grown[:m] = self.V[:m]
            self.V = grown
        self.V[m:need] = self.F
        W = self.A.matmat(self.F.T).to(self.A.dtype)  # [n, b]
        Vm = self.V[:need]
        h1 = Vm @ W
        W -= Vm.T @ h1
        h2 = Vm @ W
        W -= Vm.T @ h2
        norms = torch.linalg.vector_norm(W, dim=0)
        host = torch.cat([(h1 + h2).reshape(-1), norms]).to(torch.float64).cpu()  # one sync per block
        C = host[: need * b].reshape(need, b)
        self.H[:need, m:need] = C
        self.H[m:need, :m] = C[:m].T
        diag = C[m:need]
        self.H[m:need, m:need] = (diag + diag.T) / 2
        self.anorm = max(self.anorm, float(torch.linalg.vector_norm(C, dim=0).max()))
        self.nblk += 1
        self.m = need

        # the next block: orthonormalise the remainders column by column; a column at the
        # level of rounding noise is dropped (its coupling counted) and replaced
        tiny = breakdown_tol(self.A.dtype) * self.anorm
        Q = torch.zeros(b, self.n, dtype=self.A.dtype, device=self.A.device)
        B = torch.zeros(b, b, dtype=torch.float64)
        nq = 0
        for j in range(b):
            w = W[:, j]
            if nq:
                c1 = Q[:nq] @ w
                w -= Q[:nq].T @ c1
                c2 = Q[:nq] @ w
                w -= Q[:nq].T @ c2
                B[:nq, j] = (c1 + c2).to(torch.float64).cpu()
                beta = float(torch.linalg.vector_norm(w))
            else:
                beta = float(host[need * b + j])
            if beta <= tiny:
                self.dropped2 += beta * beta
                logger.debug("Lanczos: block column %d vanished (β = %.3g) after %d basis vectors", j, beta, need)
                continue
            if beta < 1e-2 * float(torch.linalg.vector_norm(C[:, j])):  # lost digits: once more
                w -= Vm.T @ (Vm @ w)
                if nq:
                    w -= Q[:nq].T @ (Q[:nq] @ w)
            Q[nq] = w / torch.linalg.vector_norm(w)
            B[nq, j] = beta
            nq += 1
        self.vanished = nq == 0  # the space reached from the block is invariant: all of it is seen
        self.F = Q[:nq].clone()
        self.R = torch.zeros(nq, need, dtype=torch.float64)
        self.R[:, m:need] = B[:nq]
        if nq < b:
            self.plain = False
            self.grow(b - nq)
        if self.m >= self.n:
            self.exhausted = True
        return b

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``[m]``, coefficient matrix ``[m, m]`` and residual estimates ``[m]``
        (``||R s||`` plus the dropped couplings)."""
        theta, S = torch.linalg.eigh(self.H[: self.m, : self.m])
        if self.b:
            res = torch.linalg.vector_norm(self.R @ S, dim=0)
        else:
            res = torch.zeros(self.m, dtype=torch.float64)
        return theta, S, res + math.sqrt(self.dropped2)

    def vectors(self, coeffs: Tensor) -> Tensor:
        """Ritz vectors ``V[:m]ᵀ coeffs`` as ``[n, k]``."""
        return self.V[: self.m].T @ coeffs.to(device=self.V.device, dtype=self.V.dtype)

    def restart(self, keep: list[int], theta: Tensor, S: Tensor) -> None:
        """Thick restart: rotate the kept Ritz vectors into ``V[:n_keep]`` in place, then continue."""
        m, n_keep = self.m, len(keep)
        C = S[:, keep].to(device=self.V.device, dtype=self.V.dtype)
        chunk = max(1, _RESTART_CHUNK // m)
        for c in range(0, self.n, chunk):
            self.V[:n_keep, c:c + chunk] = C.T @ self.V[:m, c:c + chunk]
        self.H.zero_()
        self.H[:n_keep, :n_keep] = torch.diag(theta[keep])
        self.R = self.R @ S[:, keep]
        self.m = n_keep
        self.plain = False
        logger.debug("Lanczos: thick restart keeping %d Ritz vectors", n_keep)


def _ends(theta: Tensor, n_top: int, n_bottom: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n_top`` largest (descending) and ``n_bottom`` smallest (ascending) values."""
    order = torch.argsort(theta).tolist()
    return order[::-1][:n_top], order[:n_bottom]


def _keep(theta: Tensor, n_top: int, n_bottom: int, n_keep: int) -> list[int]:
    """Indices of the ``n_keep`` Ritz vectors kept at a restart: the wanted ones plus their neighbours
    (the extra room is shared between the ends in proportion to what each end wants)."""
    order = torch.argsort(theta).tolist()
    if not n_bottom:
        return order[::-1][:n_keep]
    if not n_top:
        return order[:n_keep]
    extra = n_keep - n_top - n_bottom
    more_bottom = extra * n_bottom // (n_top + n_bottom)
    return order[::-1][: n_keep - n_bottom - more_bottom] + order[: n_bottom + more_bottom]


def _suspects(theta: Tensor, bound: Tensor, ends: tuple[list[int], list[int]], block: int,
              slack: Tensor, settled: Tensor) -> list[float | None]:
    """Per end: the value of the outermost wanted cluster that lies strictly beyond the ``k``-th
    wanted value and shows at least ``block`` copies (so it may have more, unseen ones), or ``None``.

    A copy is a settled Ritz value (``settled``) within the two error bounds plus ``slack`` (the
    tolerance) of it. More copies of the ``k``-th value itself would not change the wanted values
    (a tie).
    """
    out: list[float | None] = []
    for idx in ends:
        found = None
        if idx:
            kth = idx[-1]
            for i in idx:
                near = (theta - theta[i]).abs() <= bound + bound[i] + slack[i]
                if bool(near[kth]):
                    break  # tied with the k-th value, and so is every later one
                if int((near & settled).sum()) >= block:
                    found = float(theta[i])
                    break
        out.append(found)
    return out


@dataclass(frozen=True)
class LanczosRun:
    """A Lanczos run's eigenvalues plus, on request, the tridiagonal matrix of its first steps.

    Attributes:
        result: the :class:`EigsResult`.
        alphas, betas: diagonal ``[s]`` and off-diagonal ``[s - 1]`` (float64, CPU) of the
            Lanczos matrix ``T_s`` of the first ``s = keep_tridiagonal`` steps from the Gaussian
            start vector, before any restart: exactly one stochastic Lanczos quadrature run
            (:func:`hesscli.algorithms.slq.slq`, ``first_run``). ``None`` when not asked for or
            when the run stopped, restarted or met an invariant subspace before ``s`` steps.
    """

    result: EigsResult
    alphas: Tensor | None = None
    betas: Tensor | None = None


def lanczos_eigs(
    A: CurvatureOperator,
    *,
    k: int,
    which: str = "largest",
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator,
    ncv: int | None = None,
    return_vectors: bool = False,
    k_smallest: int | None = None,
) -> EigsResult:
    """Compute ``k`` eigenvalues at one or both ends of the spectrum of a symmetric ``A``.

    Block Lanczos with full reorthogonalisation and thick restart; see the module docstring
    for how blocks find repeated eigenvalues and how the flags are made. Each reported value
    comes with an error bound that holds in the arithmetic used, ``min(r, δ + r²/gap)`` with the
    residual ``r`` and the measured arithmetic floor ``δ`` (:func:`floor_bounds`), and is flagged
    converged when that bound is at most ``tol·|θ|``, or, for a value within its bound of zero,
    at most ``2δ`` (``at_floor``). The iteration stops as soon as every wanted value has
    converged or reached the floor (more products could not improve it), and, where a wanted
    value showed as many copies as the block has vectors, after a block grown by one fresh
    vector has had as many steps as the values took to converge.

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``matmat``).
        k: Eigenvalues wanted (from each end when ``which="both"``).
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic, i.e. most negative) or
            ``"both"``.
        tol: Relative tolerance on each eigenvalue's error bound. Default
            :func:`default_tol`: ``1e-6`` for float32 operators, ``1e-10`` for float64.
        max_iter: Product budget. Default ``max(200, 20 · k_total)`` (:data:`DEFAULT_MAX_ITER`),
            or ``size`` when the whole space fits in ``ncv`` vectors (the result is then exact).
        generator: Seeded CPU generator (Gaussian start block, fresh vectors).
        ncv: Most basis vectors held (memory bound). Default :func:`default_ncv`: up to 100
            vectors within 2 GiB, never fewer than ``max(2 · k_total + 20, 40)``, capped at
            ``size``; ``k_total`` is ``2k`` for ``"both"``. The basis is allocated as it grows.
            At least ``k_total + 2``; raised to ``k_total + 2·(b + 2) + 2`` for a start block of ``b`` vectors
            (room for the block to grow by two).
        return_vectors: Also return the unit Ritz vectors.
        k_smallest: With ``which="both"``, how many of the smallest to compute (default ``k``):
            one run then serves, e.g., the top 10 and ``λ_min`` together.

    Returns:
        :class:`EigsResult`: largest first for ``"largest"``, smallest first for
        ``"smallest"``, and for ``"both"`` the ``k`` largest (largest first) followed by the
        ``k`` smallest (smallest first), with ``residuals`` (estimates of ``||A y - θ y||``
        including the floor), ``error_bounds``, ``converged`` and ``at_floor``. ``n_iter`` and
        ``n_hvp`` are the products used; ``eigenvectors`` is ``[size, entries]`` when
        ``return_vectors``. A :class:`ConvergenceWarning` says which values missed the
        tolerance and why (budget, arithmetic floor, unresolved multiplicity).

    Raises:
        InputError: For an unknown ``which``, ``k`` outside ``1..size``, a non-positive
            ``tol``, ``ncv`` or ``max_iter`` too small, or a non-CPU generator.

    Example:
        >>> from hesscli.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(-3.0, 7.0, dtype=torch.float64)))
        >>> r = lanczos_eigs(A, k=2, which="both", generator=torch.Generator().manual_seed(0))
        >>> [round(x, 8) for x in r.eigenvalues], r.which
        ([6.0, 5.0, -3.0, -2.0], ('largest', 'largest', 'smallest', 'smallest'))
    """
    return lanczos_run(A, k=k, which=which, tol=tol, max_iter=max_iter, generator=generator, ncv=ncv,
                       return_vectors=return_vectors, k_smallest=k_smallest).result


def lanczos_run(
    A: CurvatureOperator,
    *,
    k: int,
    which: str = "largest",
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator,
    ncv: int | None = None,
    return_vectors: bool = False,
    k_smallest: int | None = None,
    keep_tridiagonal: int = 0,
    block: int | None = None,
    start: Tensor | None = None,
) -> LanczosRun:
    """:func:`lanczos_eigs`, also returning the Lanczos matrix of the first ``keep_tridiagonal``
    steps (see :class:`LanczosRun`), so that one run can serve a spectral density too. Only a
    single-vector run (one value wanted at each end) can: a block run's steps are no
    single-vector quadrature, so ``keep_tridiagonal`` is then ignored. When the wanted
    values converge sooner, the run goes on to ``keep_tridiagonal`` steps (if that fits in
    ``ncv`` and ``max_iter``): those steps would be spent by the density run anyway.

    ``block`` sets the start block size (default :data:`BLOCK` when an end wants two or more
    values, else 1: a single extreme value is not changed by a copy of itself).

    ``start`` (``[size, j]``) warm-starts the run from approximate eigenvectors, e.g. the Ritz
    vectors of the previous checkpoint of a training run, whose Hessian differs a little: the
    first start vector is ``sqrt(1 - ρ²) · w + ρ · g`` with ``w`` the normalised sum of the
    orthonormalised columns, ``g`` a unit Gaussian vector and ``ρ =`` :data:`WARM_RANDOM`. Its
    components along the new wanted eigenvectors are about ``1/sqrt(j)`` instead of the
    ``1/sqrt(size)`` of a random vector, so they converge in fewer steps, while the Gaussian part
    keeps ``ρ`` of a cold start's reach into directions the old vectors miss. Nothing else
    changes: the flags and bounds are measured on this run as on a cold one, and the other
    fresh vectors (the rest of the block, replacements) are the cold run's draws. A warm run's
    first steps are no stochastic quadrature, so ``keep_tridiagonal`` is then ignored.

    Raises:
        InputError: As :func:`lanczos_eigs`, for ``k_smallest`` without ``which="both"``, and for
            a ``start`` whose rows are not ``size``.
    """
    if which not in WHICH:
        raise InputError(f"which={which!r}: unknown spectrum end; use one of {', '.join(WHICH)}")
    n = A.size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise InputError(f"k={k!r}: expected between 1 and the operator size {n}; ask for fewer eigenvalues")
    if k_smallest is not None:
        if which != "both":
            raise InputError(f"k_smallest={k_smallest!r} needs which='both'")
        if isinstance(k_smallest, bool) or not isinstance(k_smallest, int) or not 1 <= k_smallest <= n:
            raise InputError(f"k_smallest={k_smallest!r}: expected between 1 and the operator size {n}")
    n_top = k if which in ("largest", "both") else 0
    n_bottom = (k if k_smallest is None else k_smallest) if which in ("smallest", "both") else 0
    if tol is None:
        tol = default_tol(A.dtype)
    if not tol > 0:
        raise InputError(f"tol={tol}: expected a positive relative tolerance such as 1e-6")
    check_generator(generator)
    k_total = min(n_top + n_bottom, n)
    ncv = default_ncv(n, k_total, A.dtype.itemsize) if ncv is None else min(ncv, n)
    if ncv < n and ncv < k_total + 2:
        raise InputError(
            f"ncv={ncv}: too few basis vectors for {k_total} wanted eigenvalues; use ncv >= {k_total + 2}"
        )
    if max_iter is None:
        max_iter = n if ncv >= n else max(DEFAULT_MAX_ITER, 20 * k_total)
    if max_iter < k_total:
        raise InputError(
            f"max_iter={max_iter}: fewer products than the {k_total} wanted eigenvalues; use max_iter >= {k_total}"
        )
    if block is None:
        block = BLOCK if max(n_top, n_bottom) >= 2 else 1
    if ncv < n:  # room for the block next to the kept Ritz vectors at a restart
        ncv = min(n, max(ncv, k_total + 2 * (block + 2) + 2))
    max_block = max(1, (ncv - k_total - 2) // 2) if ncv < n else n
    if block > 1:
        keep_tridiagonal = 0  # a block run's first steps are no single-vector quadrature
    warm = _warm_vector(start, n) if start is not None else None
    if warm is not None:
        keep_tridiagonal = 0
    start_block = max(1, min(block, max_block))

    before = A.n_matvecs
    lz = _BlockLanczos(A, generator, ncv, start_block, warm=warm)
    used = 0
    tridiagonal: tuple[Tensor, Tensor] | None = None
    settled_at: int | None = None  # block steps when every wanted value first settled
    grown_at = 0  # block step at which the running check for further copies began
    check: list[float] | None = None  # the wanted values when that check began
    resolved = False  # a check found no further copy
    history = _History(n_top, n_bottom)
    state: _State | None = None
    while not lz.exhausted and used + lz.b <= max_iter:
        if lz.m + lz.b > ncv:
            theta, S, _ = lz.ritz()
            n_keep = max(k_total, min(ncv - lz.b - 1, k_total + (ncv - k_total) // 2))
            lz.restart(_keep(theta, n_top, n_bottom, n_keep), theta, S)
        used += lz.step()
        state = None
        if lz.vanished:
            grown_at = -lz.nblk  # what the block can reach is all seen: a running check is complete
        if lz.plain and keep_tridiagonal and lz.m == keep_tridiagonal:
            T = lz.H[:lz.m, :lz.m]
            tridiagonal = (T.diagonal().clone(), T.diagonal(1).clone())
        if lz.m < k_total or lz.exhausted:
            continue
        state = _assess(lz, history, n_top, n_bottom, tol)
        if not bool(state.settled[state.idx].all()):
            continue
        if settled_at is None:
            settled_at = lz.nblk
        if lz.nblk < grown_at + settled_at:
            continue  # the vectors added last have not had the steps the values needed
        if check is not None:  # a check for further copies is complete
            resolved = state.same_values(check, tol)
            check = None
        if not resolved and any(x is not None for x in state.suspects(lz.b, tol)):
            # a wanted value shows as many copies as the block has vectors: look for more with
            # one more fresh vector, or, where the block cannot grow, with the fresh vectors
            # that replaced a vanished block
            if (lz.b < max_block and lz.grow(1)) or lz.vanished:
                check, grown_at = state.values(), lz.nblk
                logger.debug("Lanczos: looking for further copies with a block of %d", lz.b)
                continue
        if lz.plain and tridiagonal is None and lz.m < keep_tridiagonal <= ncv and used + 1 <= max_iter:
            continue  # a few more steps make the density's first run (and only sharpen these values)
        break

    if state is None:
        state = _assess(lz, history, n_top, n_bottom, tol)
    if bool(state.settled[state.idx].any()) and lz.m < n:  # measure the floor along the values
        errors, true_res, checked = _verify(lz, state, tol)
        state = _assess(lz, None, n_top, n_bottom, tol, trust=state.trust, measured=(errors, true_res))
        used += checked
    theta, bound, idx, top, bottom = state.theta, state.bound, state.idx, state.top, state.bottom
    converged, limited = state.converged, state.settled & ~state.converged
    # copies that may be missing: the values ranked after such a cluster are not certain
    unresolved: list[float | None] = [None, None]
    exact = lz.m >= n
    if not exact and check is not None:  # the check for further copies did not finish
        unresolved = [float(theta[top[0]]) if top else None, float(theta[bottom[0]]) if bottom else None]
    elif not exact and not resolved:  # copies located roughly (1 %) count too: the run may have stopped early
        unresolved = state.suspects(lz.b, tol, located=state.settled | (state.bound <= 1e-2 * theta.abs()))
    rank_ok = torch.ones(lz.m, dtype=torch.bool)
    for ids, value, sign in ((top, unresolved[0], 1.0), (bottom, unresolved[1], -1.0)):
        if value is not None:
            for i in ids:
                if sign * (float(theta[i]) - value) < 0:
                    rank_ok[i] = False
    flags = converged & rank_ok
    bound = torch.where(rank_ok, bound, torch.full_like(bound, math.inf))  # which eigenvalue it is: unknown
    _warn(theta, bound, idx, flags, converged, limited, rank_ok, used, tol, state.delta, A.dtype)
    result = EigsResult(
        eigenvalues=tuple(float(x) for x in theta[idx]),
        residuals=tuple(float(x) for x in state.res[idx]),
        converged=tuple(bool(x) for x in flags[idx]),
        which=("largest",) * len(top) + ("smallest",) * len(bottom),
        rank=tuple(range(1, len(top) + 1)) + tuple(range(1, len(bottom) + 1)),
        n_hvp=A.n_matvecs - before,
        n_iter=used,
        eigenvectors=lz.vectors(state.S[:, idx]) if return_vectors else None,
        error_bounds=tuple(float(x) for x in bound[idx]),
        at_floor=tuple(bool(x) for x in state.at_floor[idx]),
        floor=float(state.delta[idx].max()) if idx else None,
    )
    if tridiagonal is None:
        return LanczosRun(result)
    return LanczosRun(result, alphas=tridiagonal[0], betas=tridiagonal[1])


def _warm_vector(start: Tensor, n: int) -> Tensor | None:
    """The unit sum of the orthonormalised columns of ``start`` (``[n, j]``), or ``None`` when they
    span nothing (all zero or not finite)."""
    if start.dim() == 1:
        start = start.unsqueeze(1)
    if start.dim() != 2 or start.shape[0] != n:
        raise InputError(f"start vectors of shape {tuple(start.shape)}: expected [{n}, j] (one column per vector)")
    if not bool(torch.isfinite(start).all()):
        return None
    Q = torch.linalg.qr(start.to(torch.float64)).Q
    w = Q.sum(dim=1)
    norm = float(torch.linalg.vector_norm(w))
    if not norm > 0:
        return None
    return w / norm


class _History:
    """The wanted Ritz values and their gap (Kato–Temple) bounds at the last checks, by position
    from each end.

    Extreme Ritz values move monotonically towards the eigenvalues as the basis grows (Cauchy
    interlacing; a thick restart keeps the Ritz vectors it needs), so a valid gap bound at one
    check also bounds the move to the next. A gap estimated from Ritz values is only trusted
    for a position whose last :data:`TRUST_STEPS` moves stayed within the previous bounds: a
    small basis that has not yet met the eigenvalues next to a Ritz value (a float32 bulk far
    below an outlier, two products in) shows large moves and is bounded by its residual alone.
    """

    def __init__(self, n_top: int, n_bottom: int) -> None:
        self.sizes = (n_top, n_bottom)
        self.past: list[tuple[list[float], list[float]]] = []  # per check: values, gap bounds

    def trusted(self, values: list[float], gap_bounds: list[float], delta: float) -> list[bool]:
        ok = [len(self.past) >= TRUST_STEPS] * len(values)
        now = (values, gap_bounds)
        seq = self.past[-TRUST_STEPS:] + [now]
        for (v0, b0), (v1, _) in zip(seq[:-1], seq[1:]):
            for p in range(len(values)):
                if p >= len(v0) or p >= len(v1) or abs(v1[p] - v0[p]) > b0[p] + delta:
                    ok[p] = False
        self.past = (self.past + [now])[-TRUST_STEPS:]
        return ok


TRUST_STEPS = 2
"""Checks in a row whose moves a Ritz value's gap bound must have covered before it is used."""


@dataclass
class _State:
    """The assessment of the wanted Ritz values after a block step."""

    theta: Tensor
    S: Tensor
    res: Tensor  # residual estimates, floor included
    bound: Tensor  # error bounds used for the flags
    delta: Tensor  # the floor per Ritz value
    top: list[int]
    bottom: list[int]
    converged: Tensor
    settled: Tensor  # converged, or at the floor (more products cannot improve it)
    at_floor: Tensor
    trust: list[bool]

    @property
    def idx(self) -> list[int]:
        return self.top + self.bottom

    def values(self) -> list[float]:
        return [float(self.theta[i]) for i in self.idx]

    def same_values(self, before: list[float], tol: float) -> bool:
        """Whether the wanted values equal ``before`` within their bounds and the tolerance."""
        now = self.values()
        if len(now) != len(before):
            return False
        return all(abs(a - b) <= float(self.bound[i]) + max(tol * abs(a), 2 * float(self.delta[i]))
                   for a, b, i in zip(now, before, self.idx))

    def suspects(self, block: int, tol: float, located: Tensor | None = None) -> list[float | None]:
        slack = torch.maximum(tol * self.theta.abs(), 2 * self.delta)
        return _suspects(self.theta, self.bound, (self.top, self.bottom), block, slack,
                         self.settled if located is None else located)


def _assess(lz: _BlockLanczos, history: _History | None, n_top: int, n_bottom: int, tol: float, *,
            trust: list[bool] | None = None, measured: tuple[Tensor, Tensor] | None = None) -> _State:
    """Ritz values, error bounds and flags of the current basis (see the module docstring).

    While iterating, the floor is :meth:`_BlockLanczos.floor` and a value counts as settled at
    half its tolerance (the other half is left for the measured floor). ``measured`` holds, for
    the wanted values, the product errors and the residuals measured by :func:`_verify`; the
    bounds then use them and the tolerance itself.
    """
    theta, S, res = lz.ritz()
    delta_run = lz.floor(theta)
    top, bottom = _ends(theta, n_top, n_bottom)
    idx = top + bottom
    delta = torch.full_like(theta, delta_run)
    share = 0.5
    if measured is not None:
        errors, true_res = measured
        delta[idx] = torch.clamp(FLOOR_SAFETY * errors, min=delta_run)
        res = res.clone()
        res[idx] = torch.maximum(res[idx], true_res)
        share = 1.0
    plain = res
    res = res + delta
    gap = floor_bounds(theta, res, delta)
    if trust is None:
        assert history is not None
        trust = history.trusted([float(theta[i]) for i in idx], [float(gap[i]) for i in idx], delta_run)
    bound = gap.clone()
    for i, ok in zip(idx, trust):
        if not ok:
            bound[i] = res[i]
    at_floor = theta.abs() <= bound
    converged = (bound <= share * tol * theta.abs()) | (at_floor & (bound <= 2 * delta))
    settled = converged | (bound <= 2 * delta) | (plain <= delta)
    return _State(theta, S, res, bound, delta, top, bottom, converged, settled, at_floor, trust)


def _verify(lz: _BlockLanczos, state: _State, tol: float) -> tuple[Tensor, Tensor, int]:
    """Products of the wanted Ritz vectors, done afresh: per vector, the rounding error of a
    product along it, ``||fl(A y) - (A y)_Lanczos||``, and its residual ``||fl(A y) - θ y||``.

    The Lanczos relation predicts ``A y`` exactly in exact arithmetic; what a fresh product adds
    is its own rounding error along ``y``, the quantity the floor must cover (a float32 product
    along a network's top curvature direction was measured 57 and 309 ``eps · ||A||`` off on the
    benchmark CNN and transformer). A vector is only checked when even
    :data:`FLOOR_PESSIMISTIC` ``· eps · ||A||`` would exceed half its tolerance (float64 runs
    seldom need a check); the others are given that pessimistic floor.

    Returns:
        ``(errors, residuals, products)`` over the wanted values; ``errors`` are divided by
        :data:`FLOOR_SAFETY` for the unchecked values, ``residuals`` are 0 for them.
    """
    idx = state.idx
    theta = state.theta[idx]
    anorm = max(lz.anorm, float(state.theta.abs().max()))
    pessimistic = FLOOR_PESSIMISTIC * lz.eps * anorm
    errors = torch.full((len(idx),), pessimistic / FLOOR_SAFETY, dtype=torch.float64)
    true_res = torch.zeros(len(idx), dtype=torch.float64)
    need = [p for p in range(len(idx)) if pessimistic > 0.5 * tol * float(theta[p].abs())]
    if need:
        coeffs = state.S[:, [idx[p] for p in need]]
        Y = lz.vectors(coeffs)
        AY = lz.A.matmat(Y).to(Y.dtype)
        errors[need] = torch.linalg.vector_norm(AY - lz.predicted(coeffs), dim=0).to(torch.float64).cpu()
        th = theta[need].to(device=Y.device, dtype=Y.dtype)
        true_res[need] = torch.linalg.vector_norm(AY - Y * th, dim=0).to(torch.float64).cpu()
    return errors, true_res, len(need)


def _warn(theta: Tensor, bound: Tensor, idx: list[int], flags: Tensor, converged: Tensor, limited: Tensor,
          rank_ok: Tensor, used: int, tol: float, delta: Tensor, dtype: torch.dtype) -> None:
    """One :class:`ConvergenceWarning` naming why wanted values are not flagged converged."""
    if bool(flags[idx].all()):
        return
    bad = [i for i in idx if not bool(flags[i])]
    reasons = []
    floor_hit = [i for i in bad if bool(limited[i])]
    if floor_hit:
        worst = max(floor_hit, key=lambda i: float(bound[i] / theta[i].abs().clamp(min=1e-300)))
        name = str(dtype).replace("torch.", "")
        reasons.append(
            f"{len(floor_hit)} cannot be resolved to tol={tol} in {name} (e.g. {float(theta[worst]):.6g} "
            f"± {float(bound[worst]):.2g}: products along it are exact only to about {float(delta[worst]):.2g}"
            + ("; use --dtype float64" if torch.finfo(dtype).bits < 64 else "") + ")")
    missing = [i for i in bad if bool(converged[i]) and not bool(rank_ok[i])]
    if missing:
        reasons.append(f"{len(missing)} may be displaced by further copies of a repeated eigenvalue")
    budget = [i for i in bad if not bool(converged[i]) and not bool(limited[i])]
    if budget:
        worst_rel = float((bound[budget] / (tol * theta[budget].abs()).clamp(min=1e-300)).max() * tol)
        reasons.append(f"{len(budget)} missed tol={tol} within {used} products (worst relative error bound "
                       f"{worst_rel:.3g}); raise max_iter or loosen tol")
    warnings.warn(f"Lanczos: {len(idx) - len(bad)} of {len(idx)} eigenvalues converged; " + "; ".join(reasons),
                  ConvergenceWarning, stacklevel=3)


def extremes(
    A: CurvatureOperator,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    generator: torch.Generator,
) -> ExtremesResult:
    """Both ends of the spectrum from one Lanczos run (``which="both"``, ``k=1``).

    Args:
        A: Symmetric operator.
        tol: Relative eigenvalue tolerance (see :func:`lanczos_eigs`).
        max_iter: Product budget (default as in :func:`lanczos_eigs` with ``k_total = 2``).
        generator: Seeded CPU generator.

    Returns:
        :class:`ExtremesResult`: ``lambda_max``, ``lambda_min``, the condition number
        ``|λ_max| / |λ_min|`` (``inf`` when ``λ_min == 0``) and ``negative_ratio`` =
        ``|λ_min| / λ_max`` when ``λ_min < 0`` (``inf`` if also ``λ_max <= 0``), else 0.

    Raises:
        InputError: As :func:`lanczos_eigs`.

    Example:
        >>> from hesscli.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([4.0, 1.0, -2.0], dtype=torch.float64)))
        >>> r = extremes(A, generator=torch.Generator().manual_seed(0))
        >>> round(r.lambda_max, 8), round(r.lambda_min, 8), round(r.negative_ratio, 8)
        (4.0, -2.0, 0.5)
    """
    return extremes_of(lanczos_eigs(A, k=1, which="both", tol=tol, max_iter=max_iter, generator=generator))


def extremes_of(r: EigsResult, n_hvp: int | None = None) -> ExtremesResult:
    """The :class:`ExtremesResult` of a ``which="both"`` run: its first (largest) and last
    (smallest) values. ``n_hvp`` overrides the product count (0 when the run served another
    analysis first).

    Example:
        >>> r = EigsResult((4.0, 3.0, -2.0), (0.0,) * 3, (True,) * 3, ("largest", "largest", "smallest"),
        ...                (1, 2, 1), 7, 7)
        >>> e = extremes_of(r, n_hvp=0)
        >>> e.lambda_max, e.lambda_min, e.n_hvp
        (4.0, -2.0, 0)
    """
    i_max = r.which.index("largest")
    i_min = r.which.index("smallest")
    lam_max, lam_min = r.eigenvalues[i_max], r.eigenvalues[i_min]
    condition = abs(lam_max) / abs(lam_min) if lam_min != 0 else math.inf
    if lam_min >= 0:
        ratio = 0.0
    else:
        ratio = abs(lam_min) / lam_max if lam_max > 0 else math.inf
    return ExtremesResult(
        lambda_max=lam_max,
        lambda_min=lam_min,
        condition_number=condition,
        negative_ratio=ratio,
        residual_max=r.residuals[i_max],
        residual_min=r.residuals[i_min],
        converged=r.converged[i_max] and r.converged[i_min],
        n_hvp=r.n_hvp if n_hvp is None else n_hvp,
    )
