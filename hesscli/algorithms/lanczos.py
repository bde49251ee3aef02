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

import torch
from torch import Tensor

from hesscli.algorithms.sampling import check_generator, probes
from hesscli.errors import ConvergenceWarning, InputError
from hesscli.operators.base import CurvatureOperator
from hesscli.results.records import EigsResult, ExtremesResult

__all__ = ["WHICH", "breakdown_tol", "lanczos_eigs", "extremes"]

logger = logging.getLogger(__name__)

WHICH = ("largest", "smallest", "both")
"""Ends of the spectrum: algebraically largest, algebraically smallest (most negative), both."""


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
        self.V = torch.zeros(ncv, self.n, dtype=A.dtype, device=A.device)
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

    def converged(self, res: Tensor, threshold: Tensor) -> Tensor:
        """Per Ritz pair: residual within threshold, or inside an invariant subspace."""
        ok = res <= threshold
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


def _ends(theta: Tensor, which: str, k: int) -> tuple[list[int], list[int]]:
    """Indices of the ``k`` largest (descending) and ``k`` smallest (ascending) wanted values."""
    order = torch.argsort(theta).tolist()
    top = order[::-1][:k] if which in ("largest", "both") else []
    bottom = order[:k] if which in ("smallest", "both") else []
    return top, bottom


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


def _keep(theta: Tensor, which: str, k: int, l: int) -> list[int]:
    """Indices of the ``l`` Ritz vectors kept at a restart: the wanted ones plus their neighbours."""
    order = torch.argsort(theta).tolist()
    if which == "largest":
        return order[::-1][:l]
    if which == "smallest":
        return order[:l]
    extra = l - 2 * k
    n_top, n_bottom = k + extra - extra // 2, k + extra // 2
    return order[::-1][:n_top] + order[:n_bottom]


def lanczos_eigs(
    A: CurvatureOperator,
    *,
    k: int,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    generator: torch.Generator,
    ncv: int | None = None,
    return_vectors: bool = False,
) -> EigsResult:
    """Compute ``k`` eigenvalues at one or both ends of the spectrum of a symmetric ``A``.

    Ritz pair ``i`` has converged when its residual ``||A y_i - θ_i y_i||`` (the estimate
    ``|β_m s_{m,i}|``, exact under full reorthogonalisation) is at most
    ``tol · max(|θ_i|, sqrt(eps) · max_j |θ_j|)``: relative to the eigenvalue, with an absolute
    floor for eigenvalues near zero (``eps`` of ``A.dtype``). The test is cheap (an
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
        tol: Relative residual tolerance. Default ``1e-6``: near float32 precision, so the
            same default works for float32 Hessians; a residual ``r`` bounds the eigenvalue
            error by ``r`` and, for an eigenvalue separated by ``gap``, by ``r² / gap``.
        max_iter: Product budget. Default ``max(100, 20 · k_total)`` (PyHessian's 100 products
            per eigenvalue as a floor; restarted Lanczos typically needs a few times ``k``
            products), or ``size`` when the whole space fits in ``ncv`` vectors (the result
            is then exact).
        generator: Seeded CPU generator (Gaussian start vector, and fresh vectors after an
            invariant subspace).
        ncv: Most basis vectors held (memory bound). Default ``max(2 · k_total + 20, 40)``,
            capped at ``size``, following ARPACK's advice of ``ncv >= 2k`` plus room for the
            iteration to progress between restarts; ``k_total`` is ``2k`` for ``"both"``. At
            least ``k_total + 2``. A restart keeps ``k_total + (ncv - k_total) // 2`` Ritz
            vectors (at most ``ncv - 2``).
        return_vectors: Also return the unit Ritz vectors.

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
    if which not in WHICH:
        raise InputError(f"which={which!r}: unknown spectrum end; use one of {', '.join(WHICH)}")
    n = A.size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise InputError(f"k={k!r}: expected between 1 and the operator size {n}; ask for fewer eigenvalues")
    if not tol > 0:
        raise InputError(f"tol={tol}: expected a positive relative residual tolerance such as 1e-6")
    check_generator(generator)
    k_total = min(2 * k, n) if which == "both" else k
    ncv = min(max(2 * k_total + 20, 40) if ncv is None else ncv, n)
    if ncv < n and ncv < k_total + 2:
        raise InputError(
            f"ncv={ncv}: too few basis vectors for {k_total} wanted eigenvalues; use ncv >= {k_total + 2}"
        )
    if max_iter is None:
        max_iter = n if ncv >= n else max(100, 20 * k_total)
    if max_iter < k_total:
        raise InputError(
            f"max_iter={max_iter}: fewer products than the {k_total} wanted eigenvalues; use max_iter >= {k_total}"
        )
    n_keep = min(ncv - 2, k_total + (ncv - k_total) // 2)

    before = A.n_matvecs
    lz = _Lanczos(A, generator, ncv)
    used = 0
    while True:
        lz.step()
        used += 1
        theta, S, res = lz.ritz()
        threshold = _threshold(theta, tol, lz.eps)
        ok = lz.converged(res, threshold)
        done = lz.exhausted
        if not done and lz.m >= k_total:
            top, bottom = _ends(theta, which, k)
            done = bool(ok[top + bottom].all())
            if done and lz.start > 0:  # the active block's extremes too
                ends = _ends(theta[lz.start:], which, 1)
                done = bool(ok[[lz.start + i for i in ends[0] + ends[1]]].all())
            if done and lz.broke:
                done = not _more_copies(theta, threshold, lz.start, top, bottom)
        if done or used >= max_iter:
            break
        if lz.m == ncv:
            lz.restart(_keep(theta, which, k, n_keep), theta, S)
        if lz.broke:
            lz.new_block()
            if lz.exhausted:
                break

    theta, S, res = lz.ritz()
    threshold = _threshold(theta, tol, lz.eps)
    top, bottom = _ends(theta, which, k)
    idx = top + bottom
    converged = lz.converged(res, threshold)[idx]
    if not bool(converged.all()):
        worst = float((res[idx] * tol / threshold[idx]).max())
        warnings.warn(
            f"Lanczos: {int(converged.sum())} of {len(idx)} eigenvalues converged within {used} products "
            f"(worst relative residual {worst:.3g} > tol={tol}); raise max_iter or loosen tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigsResult(
        eigenvalues=tuple(float(x) for x in theta[idx]),
        residuals=tuple(float(x) for x in res[idx]),
        converged=tuple(bool(x) for x in converged),
        which=("largest",) * len(top) + ("smallest",) * len(bottom),
        rank=tuple(range(1, len(top) + 1)) + tuple(range(1, len(bottom) + 1)),
        n_hvp=A.n_matvecs - before,
        n_iter=used,
        eigenvectors=lz.vectors(S[:, idx]) if return_vectors else None,
    )


def extremes(
    A: CurvatureOperator,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    generator: torch.Generator,
) -> ExtremesResult:
    """Both ends of the spectrum from one Lanczos run (``which="both"``, ``k=1``).

    Args:
        A: Symmetric operator.
        tol: Relative residual tolerance (see :func:`lanczos_eigs`).
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
    r = lanczos_eigs(A, k=1, which="both", tol=tol, max_iter=max_iter, generator=generator)
    lam_max, lam_min = r.eigenvalues
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
        residual_max=r.residuals[0],
        residual_min=r.residuals[1],
        converged=all(r.converged),
        n_hvp=r.n_hvp,
    )
