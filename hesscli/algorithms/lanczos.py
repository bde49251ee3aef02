"""Lanczos eigensolver: full reorthogonalisation, thick restart, residual-based stopping.

The basis is kept orthonormal by classical Gram–Schmidt applied twice ("twice is
enough": Giraud, Langou & Rozložník 2005), so the projected matrix ``H = Vᵀ A V`` is
exact up to rounding and the Ritz residual of a unit Ritz vector ``y = V s`` is
``||A y - θ y|| = |β_m s_m|`` (Parlett 1998, "The Symmetric Eigenvalue Problem", §13.1).
When the basis holds ``ncv`` vectors the method restarts thickly (Wu & Simon 2000,
"Thick-restart Lanczos method for large symmetric eigenvalue problems", SIMAX 22): the
wanted Ritz vectors (plus a buffer next to them) are kept, the last residual vector
continues the iteration, and memory stays at ``ncv`` vectors however many products run.

An exact invariant subspace (``β ≈ 0``, see :func:`breakdown_tol`) is handled without
loss: its Ritz pairs are locked as eigenpairs, and the iteration continues from a fresh random vector
orthogonal to everything found, so eigenvalues that the start vector could not reach
(repeated eigenvalues, deficient start vectors) are still found. When the basis spans the
whole space the results are exact.

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

__all__ = ["WHICH", "DEFAULT_MAX_ITER", "breakdown_tol", "default_ncv", "default_tol", "error_bounds", "lanczos_eigs",
           "lanczos_run", "LanczosRun", "extremes", "extremes_of"]

logger = logging.getLogger(__name__)

WHICH = ("largest", "smallest", "both")
"""Ends of the spectrum: algebraically largest, algebraically smallest (most negative), both."""

DEFAULT_MAX_ITER = 200
"""Floor of the default product budget (``max(200, 20 · k_total)``): the iteration stops as soon
as the wanted values converge, so the budget only bounds a hard case (the negative end of a
Hessian, whose small eigenvalues sit next to a dense cluster around zero, often needs 100–200)."""


def breakdown_tol(dtype: torch.dtype) -> float:
    """Relative size ``β / ||A||`` below which a Krylov space counts as invariant: ``eps^(2/3)``.

    An exhausted Krylov space leaves a rounding residual of ``eps · ||A||`` times a factor
    that grows with the size and the number of basis vectors; ``eps^(2/3)`` (the "tiny"
    scale of ARPACK's convergence test; 4e-11 in float64, 5e-6 in float32) sits well above
    that noise and well below couplings that matter. Dropping a coupling this small moves
    no eigenvalue by more than ``eps^(2/3) · ||A||``.
    """
    return torch.finfo(dtype).eps ** (2 / 3)


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
    """Default relative eigenvalue tolerance: ``1e-6`` in float32 (and narrower types), near what
    a float32 product resolves; ``1e-10`` in float64.

    Example:
        >>> default_tol(torch.float32), default_tol(torch.float64)
        (1e-06, 1e-10)
    """
    return 1e-10 if torch.finfo(dtype).bits >= 64 else 1e-6


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
    between ``θ_i`` and its neighbours would make the gap smaller than estimated.

    Example:
        >>> b = error_bounds(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([1e-3, 1e-2], dtype=torch.float64))
        >>> [f"{x:.4e}" for x in b.tolist()]  # 1e-3² / (1 - 1e-2), 1e-2² / (1 - 1e-3)
        ['1.0101e-06', '1.0010e-04']
    """
    m = theta.numel()
    if m < 2:
        return res.clone()
    order = torch.argsort(theta)
    t, r = theta[order], res[order]
    inf = torch.full((1,), math.inf, dtype=t.dtype)
    left = torch.cat([inf, (t[1:] - t[:-1]) - r[:-1]])
    right = torch.cat([(t[1:] - t[:-1]) - r[1:], inf])
    gap = torch.minimum(left, right)
    bound_s = torch.where(gap > 0, torch.minimum(r, r * r / gap.clamp(min=torch.finfo(t.dtype).tiny)), r)
    bound = torch.empty_like(bound_s)
    bound[order] = bound_s
    return bound


class _Lanczos:
    """Lanczos process over ``V`` (``[ncv, n]`` rows) with locking and thick restart.

    ``V[:m]`` is the basis whose products are done, ``H[:m, :m]`` its projected matrix
    and ``f`` the next unit vector, coupled to the basis by ``beta``. ``V[:start]`` spans an
    invariant subspace (locked, exact up to the couplings dropped at breakdowns, at most
    ``dropped``); ``V[start:m]`` is the active Krylov block.
    """

    def __init__(self, A: CurvatureOperator, generator: torch.Generator, ncv: int) -> None:
        self.A, self.generator, self.n, self.ncv = A, generator, A.size, ncv
        self.eps = torch.finfo(A.dtype).eps
        # the basis grows by doubling up to ``ncv`` rows: a run that converges early never
        # touches the memory of a large ``ncv``
        self.V = torch.zeros(min(ncv, _FIRST_ROWS), self.n, dtype=A.dtype, device=A.device)
        self.H = torch.zeros(ncv, ncv, dtype=torch.float64)
        self.m = 0
        self.start = 0
        self.beta = 0.0
        self.dropped = 0.0
        self.anorm = 0.0
        self.broke = False
        self.exhausted = False
        self.f = self._fresh()

    def _orthogonalise(self, w: Tensor, m: int) -> Tensor:
        """Classical Gram–Schmidt against ``V[:m]``, twice; returns the coefficients."""
        Vm = self.V[:m]
        h = Vm @ w
        w -= Vm.T @ h
        h2 = Vm @ w
        w -= Vm.T @ h2
        return h + h2

    def _fresh(self) -> Tensor | None:
        """A Gaussian unit vector orthogonal to ``V[:m]``, or ``None`` if none is left."""
        v = probes(self.n, 1, generator=self.generator, dtype=self.A.dtype, device=self.A.device,
                   distribution="normal").squeeze(1)
        scale = float(torch.linalg.vector_norm(v))
        if self.m:
            self._orthogonalise(v, self.m)
        norm = float(torch.linalg.vector_norm(v))
        if norm <= math.sqrt(self.eps) * scale:
            return None
        return v / norm

    def step(self) -> None:
        """One product: extend ``H`` by a column and compute the next vector."""
        m = self.m
        if m == self.V.shape[0]:
            grown = torch.zeros(min(self.ncv, 2 * m), self.n, dtype=self.V.dtype, device=self.V.device)
            grown[:m] = self.V
            self.V = grown
        self.V[m] = self.f
        w = self.A.matmat(self.V[m].unsqueeze(1)).squeeze(1).to(self.A.dtype)
        h = self._orthogonalise(w, m + 1)
        beta = torch.linalg.vector_norm(w)
        host = torch.cat([h, beta.reshape(1)]).to(torch.float64).cpu()  # one sync per product
        col, beta_val = host[: m + 1].clone(), float(host[m + 1])
        col[: self.start] = 0.0  # coupling to the locked invariant subspace is rounding noise
        self.H[: m + 1, m] = col
        self.H[m, : m + 1] = col
        self.anorm = max(self.anorm, float(torch.linalg.vector_norm(host)))
        self.m = m + 1
        self.exhausted = self.m >= self.n
        self.broke = self.exhausted or beta_val <= breakdown_tol(self.A.dtype) * self.anorm
        self.beta = beta_val
        if self.broke:
            self.f = None
            logger.debug("Lanczos: invariant subspace of dimension %d after product %d", self.m - self.start, self.m)
        else:
            self.f = w / beta

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``[m]``, coefficient matrix ``[m, m]`` and residual estimates ``[m]``.

        The locked block ``[:start]`` and the active block are decomposed separately; locked
        pairs have residual at most ``dropped``, active pairs ``|β s_last|``.
        """
        m, s = self.m, self.start
        theta_l, S_l = torch.linalg.eigh(self.H[:s, :s])
        theta_a, S_a = torch.linalg.eigh(self.H[s:m, s:m])
        S = torch.zeros(m, m, dtype=torch.float64)
        S[:s, :s] = S_l
        S[s:, s:] = S_a
        res = torch.full((m,), self.dropped, dtype=torch.float64)
        if m > s:
            res[s:] = (self.beta * S_a[-1]).abs()
        return torch.cat([theta_l, theta_a]), S, res

    def converged(self, theta: Tensor, res: Tensor, threshold: Tensor) -> Tensor:
        """Per Ritz pair: eigenvalue error bound (:func:`error_bounds`) within threshold, or
        inside an invariant subspace."""
        ok = error_bounds(theta, res) <= threshold
        ok[: self.m if self.broke else self.start] = True
        return ok

    def new_block(self) -> None:
        """After an invariant subspace: lock it and continue from a fresh orthogonal vector."""
        self.start = self.m
        self.dropped, self.beta = max(self.dropped, self.beta), 0.0
        self.f = self._fresh()
        if self.f is None:
            self.exhausted = True

    def vectors(self, coeffs: Tensor) -> Tensor:
        """Ritz vectors ``V[:m]ᵀ coeffs`` as ``[n, k]``."""
        return self.V[: self.m].T @ coeffs.to(device=self.V.device, dtype=self.V.dtype)

    def restart(self, keep: list[int], theta: Tensor, S: Tensor) -> None:
        """Thick restart: rotate the kept Ritz vectors into ``V[:l]`` in place, then continue."""
        if self.broke:  # everything found so far is invariant
            order, n_locked = keep, len(keep)
        else:
            locked = [i for i in keep if i < self.start]
            order, n_locked = locked + [i for i in keep if i >= self.start], len(locked)
        m, l = self.m, len(order)
        C = S[:, order].to(device=self.V.device, dtype=self.V.dtype)
        chunk = max(1, _RESTART_CHUNK // m)
        for c in range(0, self.n, chunk):
            self.V[:l, c:c + chunk] = C.T @ self.V[:m, c:c + chunk]
        self.H.zero_()
        self.H[:l, :l] = torch.diag(theta[order])
        self.m, self.start = l, n_locked
        logger.debug("Lanczos: thick restart keeping %d Ritz vectors (%d locked)", l, n_locked)


def _threshold(theta: Tensor, tol: float, eps: float) -> Tensor:
    """Residual threshold ``tol · max(|θ_i|, sqrt(eps) · max_j |θ_j|)`` per Ritz value."""
    return tol * torch.clamp(theta.abs(), min=math.sqrt(eps) * float(theta.abs().max()))


def _ends(theta: Tensor, n_top: int, n_bottom: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n_top`` largest (descending) and ``n_bottom`` smallest (ascending) values."""
    order = torch.argsort(theta).tolist()
    return order[::-1][:n_top], order[:n_bottom]


def _more_copies(theta: Tensor, threshold: Tensor, start: int, top: list[int], bottom: list[int]) -> bool:
    """Whether the complement of a just-completed invariant block may hold wanted values.

    A Krylov block from a random vector in an invariant subspace ``C`` reaches every
    distinct eigenvalue of ``A`` on ``C`` once, so the block's largest Ritz value is the
    largest eigenvalue of ``A`` on ``C`` and the complement of the block holds nothing
    larger. Another copy can only change the wanted values if the block's extreme lies
    strictly beyond the ``k``-th wanted value (a tie adds a copy of a value already there).
    """
    block = theta[start:]
    if top:
        hi, kth = float(block.max()), top[-1]
        if hi > float(theta[kth]) + float(threshold[kth]):
            return True
    if bottom:
        lo, kth = float(block.min()), bottom[-1]
        if lo < float(theta[kth]) - float(threshold[kth]):
            return True
    return False


def _keep(theta: Tensor, n_top: int, n_bottom: int, l: int) -> list[int]:
    """Indices of the ``l`` Ritz vectors kept at a restart: the wanted ones plus their neighbours
    (the extra room is shared between the ends in proportion to what each end wants)."""
    order = torch.argsort(theta).tolist()
    if not n_bottom:
        return order[::-1][:l]
    if not n_top:
        return order[:l]
    extra = l - n_top - n_bottom
    more_bottom = extra * n_bottom // (n_top + n_bottom)
    return order[::-1][: l - n_bottom - more_bottom] + order[: n_bottom + more_bottom]


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

    Ritz pair ``i`` has converged when the error bound of its eigenvalue,
    ``min(r_i, r_i² / gap_i)`` (:func:`error_bounds`; ``r_i = ||A y_i - θ_i y_i||``, the estimate
    ``|β_m s_{m,i}|``, exact under full reorthogonalisation), is at most
    ``tol · max(|θ_i|, sqrt(eps) · max_j |θ_j|)``: relative to the eigenvalue, with an absolute
    floor for eigenvalues near zero (``eps`` of ``A.dtype``). The gap term is what lets a
    small eigenvalue next to a dense cluster (the negative end of a Hessian) stop once its
    value is accurate, instead of running until a float32 residual reaches ``tol · |θ|``,
    which it may never do; the residuals themselves are reported. The test is cheap (an
    eigendecomposition of the small projected matrix, next to a product that passes over a
    dataset), so it runs after every product and the iteration stops as soon as every
    wanted pair has converged.

    When the Krylov space becomes invariant (``β <= eps^(2/3) · ||A||``, see
    :func:`breakdown_tol`), its Ritz pairs are locked as converged (their residual is then
    bounded by the dropped coupling) and the iteration continues in the complement from a
    fresh random vector, until that block's extreme Ritz values have converged too and can
    no longer change the wanted values. This finds the copies of a repeated eigenvalue when
    the spectrum has few distinct values (an exhausted Krylov space). A single-vector
    method cannot see a second copy of an eigenvalue before its Krylov space is exhausted,
    so in a spectrum with many distinct values an exactly repeated eigenvalue may be
    reported fewer times; clusters of distinct values are resolved.

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``matmat``).
        k: Eigenvalues wanted (from each end when ``which="both"``).
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic, i.e. most negative) or
            ``"both"``.
        tol: Relative tolerance on each eigenvalue's error bound. Default
            :func:`default_tol`: ``1e-6`` for float32 operators (near what a float32 product
            resolves), ``1e-10`` for float64.
        max_iter: Product budget. Default ``max(200, 20 · k_total)`` (:data:`DEFAULT_MAX_ITER`;
            the run stops earlier as soon as the wanted values converge), or ``size`` when the
            whole space fits in ``ncv`` vectors (the result is then exact).
        generator: Seeded CPU generator (Gaussian start vector, and fresh vectors after an
            invariant subspace).
        ncv: Most basis vectors held (memory bound). Default :func:`default_ncv`: up to 100
            vectors within 2 GiB, never fewer than ``max(2 · k_total + 20, 40)`` (ARPACK's
            advice of ``ncv >= 2k`` plus room for the iteration to progress between
            restarts), capped at ``size``; ``k_total`` is ``2k`` for ``"both"``. The basis is
            allocated as it grows, so a run that converges in a few products holds a few
            vectors. At least ``k_total + 2``. A restart keeps ``k_total + (ncv - k_total) // 2`` Ritz
            vectors (at most ``ncv - 2``).
        return_vectors: Also return the unit Ritz vectors.
        k_smallest: With ``which="both"``, how many of the smallest to compute (default ``k``):
            one run then serves, e.g., the top 10 and ``λ_min`` together.

    Returns:
        :class:`EigsResult`: largest first for ``"largest"``, smallest first for
        ``"smallest"``, and for ``"both"`` the ``k`` largest (largest first) followed by the
        ``k`` smallest (smallest first). ``n_iter`` and ``n_hvp`` are the products used;
        ``eigenvectors`` is ``[size, entries]`` when ``return_vectors``. Pairs that miss the
        tolerance within ``max_iter`` have ``converged=False`` and a
        :class:`ConvergenceWarning` is issued.

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
) -> LanczosRun:
    """:func:`lanczos_eigs`, also returning the Lanczos matrix of the first ``keep_tridiagonal``
    steps (see :class:`LanczosRun`), so that one run can serve a spectral density too. When the
    wanted values converge sooner, the run goes on to ``keep_tridiagonal`` steps (if that fits
    in ``ncv`` and ``max_iter``): those steps would be spent by the density run anyway.

    Raises:
        InputError: As :func:`lanczos_eigs`, and for ``k_smallest`` without ``which="both"``.
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
    n_keep = min(ncv - 2, k_total + (ncv - k_total) // 2)

    before = A.n_matvecs
    lz = _Lanczos(A, generator, ncv)
    used = 0
    tridiagonal: tuple[Tensor, Tensor] | None = None
    plain = True  # no restart and no invariant subspace yet: H[:m, :m] is the Lanczos matrix T_m
    while True:
        lz.step()
        used += 1
        if plain and keep_tridiagonal and lz.m == keep_tridiagonal and not lz.broke:
            T = lz.H[:lz.m, :lz.m]
            tridiagonal = (T.diagonal().clone(), T.diagonal(1).clone())
        theta, S, res = lz.ritz()
        threshold = _threshold(theta, tol, lz.eps)
        ok = lz.converged(theta, res, threshold)
        done = lz.exhausted
        if not done and lz.m >= k_total:
            top, bottom = _ends(theta, n_top, n_bottom)
            done = bool(ok[top + bottom].all())
            if done and lz.start > 0:  # the active block's extremes too
                ends = _ends(theta[lz.start:], min(n_top, 1), min(n_bottom, 1))
                done = bool(ok[[lz.start + i for i in ends[0] + ends[1]]].all())
            if done and lz.broke:
                done = not _more_copies(theta, threshold, lz.start, top, bottom)
        if done and plain and tridiagonal is None and lz.m < keep_tridiagonal <= ncv and not lz.broke:
            done = False  # a few more steps make the density's first run (and only sharpen these values)
        if done or used >= max_iter:
            break
        if lz.m == ncv:
            lz.restart(_keep(theta, n_top, n_bottom, n_keep), theta, S)
            plain = False
        if lz.broke:
            plain = False
            lz.new_block()
            if lz.exhausted:
                break

    theta, S, res = lz.ritz()
    threshold = _threshold(theta, tol, lz.eps)
    top, bottom = _ends(theta, n_top, n_bottom)
    idx = top + bottom
    converged = lz.converged(theta, res, threshold)[idx]
    if not bool(converged.all()):
        worst = float((error_bounds(theta, res)[idx] * tol / threshold[idx]).max())
        warnings.warn(
            f"Lanczos: {int(converged.sum())} of {len(idx)} eigenvalues converged within {used} products "
            f"(worst relative error bound {worst:.3g} > tol={tol}); raise max_iter or loosen tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    result = EigsResult(
        eigenvalues=tuple(float(x) for x in theta[idx]),
        residuals=tuple(float(x) for x in res[idx]),
        converged=tuple(bool(x) for x in converged),
        which=("largest",) * len(top) + ("smallest",) * len(bottom),
        rank=tuple(range(1, len(top) + 1)) + tuple(range(1, len(bottom) + 1)),
        n_hvp=A.n_matvecs - before,
        n_iter=used,
        eigenvectors=lz.vectors(S[:, idx]) if return_vectors else None,
    )
    if tridiagonal is None:
        return LanczosRun(result)
    return LanczosRun(result, alphas=tridiagonal[0], betas=tridiagonal[1])


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
