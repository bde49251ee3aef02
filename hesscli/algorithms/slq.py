"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit start vector ``v``, ``M`` Lanczos steps give a tridiagonal ``T`` whose
eigenvalues ``θ_j`` (nodes) and squared first eigenvector components ``τ_j²`` (weights)
form the ``M``-point Gauss quadrature of the measure ``Σ_i (vᵀ u_i)² δ(λ - λ_i)``. With a
normalised Rademacher ``v`` that measure is, in expectation, the spectral density
``(1/n) Σ_i δ(λ - λ_i)``; averaging several runs and replacing each node by a Gaussian
gives a smooth density (Lin, Saad & Yang 2016, "Approximating spectral densities of large
matrices", SIAM Review 58; Ghorbani, Krishnan & Xiao 2019, "An investigation into neural
net optimization via Hessian eigenvalue density", ICML; Papyan 2020, "Traces of class/
cross-class structure pervade deep learning spectra", JMLR 21).

By default all runs advance together: one ``matmat`` with one column per run (split by
``block_size``) per step, so a step costs one pass over the data for all runs; ``together``
advances them in groups instead, each holding only its own basis (for operators that multiply
one column at a time anyway). Each run is fully reorthogonalised (classical Gram–Schmidt
twice), and its tridiagonal is accumulated and diagonalised in float64.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from hesscli.algorithms.lanczos import breakdown_tol
from hesscli.algorithms.sampling import check_generator, probes
from hesscli.errors import InputError
from hesscli.operators.base import CurvatureOperator
from hesscli.results.records import DensityResult

__all__ = ["slq", "broaden", "default_sigma"]

logger = logging.getLogger(__name__)

KAPPA = 3.0
"""Papyan (2020, Section D.2): adjacent Gaussians, one node spacing apart, fall to ``1/κ``
of their peak halfway between them."""

KERNEL_REACH = 6.0
"""The density grid reaches at least this many ``σ`` beyond the extreme nodes: a Gaussian
keeps 1e-9 of its mass beyond 6σ, so cutting it there moves no moment visibly. With the
default ``σ`` this widens the 5% margin below about 46 Lanczos steps."""


def slq(
    A: CurvatureOperator,
    *,
    iters: int = 80,
    runs: int = 5,
    generator: torch.Generator,
    sigma: float | None = None,
    grid: int = 1000,
    block_size: int | None = None,
    first_run: tuple[Tensor, Tensor] | None = None,
    deflate: tuple[Tensor, Tensor] | None = None,
    together: int | None = None,
) -> DensityResult:
    """Estimate the eigenvalue density of ``A`` by stochastic Lanczos quadrature.

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``matmat``).
        iters: Lanczos steps per run (products per run). Default 80, as in Ghorbani et al.
            (2019) and hessian-eigenthings; ``iters`` nodes resolve features about
            ``range / iters`` wide.
        runs: Independent start vectors. Default 5: the nodes of each run are exact for
            polynomials of degree ``2 · iters - 1``, so the run-to-run variance (of order
            ``1 / sqrt(runs · size)`` for the bulk) is small next to the broadening.
        generator: Seeded CPU generator for the Rademacher start vectors.
        sigma: Gaussian broadening; default :func:`default_sigma`.
        grid: Number of grid points. Default 1000 (curvlinops uses 1024): the default ``σ``
            is about ``range / 210`` for 80 steps, so the grid puts about 4 points per ``σ``.
        block_size: Most runs per ``matmat`` call; default all runs at once.
        first_run: ``(alphas [iters], betas [iters - 1])`` of a Lanczos run already done from a
            random unit start vector (e.g. the first ``iters`` steps of an eigensolver run,
            :func:`hesscli.algorithms.lanczos.lanczos_run`); it is used as run 1 and only
            ``runs - 1`` runs cost products. A normalised Gaussian start vector is uniform on
            the sphere, so its quadrature is as unbiased for the density as a Rademacher one.
            Ignored when ``deflate`` is given (deflation wins): that run is a run of ``A``, not of
            the deflated operator, so all ``runs`` runs then cost products.
        deflate: ``(values [k], vectors [n, k])``: eigenpairs of ``A`` already resolved (e.g. the
            converged top-k of an eigensolver run), ``vectors`` orthonormal columns ``U``. The
            density becomes ``(1/n) Σ_{i≤k} δ(λ - values_i)`` plus ``(n-k)/n`` times the SLQ
            density of the deflated operator ``P A P`` on the complement, ``P = I - U Uᵀ``: the
            start vectors are normal vectors projected with ``P`` (uniform on the unit sphere of
            the complement, so each run's quadrature is unbiased for the complement's density;
            projected Rademacher vectors are not) and every Lanczos vector is reorthogonalised
            against ``U`` as well as the run's basis, so rounding cannot bring ``U`` back. Every
            product is then ``P A P v``. The deflated spectrum is narrower, so at equal ``iters``
            the bulk is resolved better. Only pass eigenpairs with small residuals
            ``||A u - λ u||`` (converged ones): with ``R = A U - U diag(values)``, ``A`` and
            ``U diag(values) Uᵀ + P A P`` differ by the off-diagonal blocks ``R Uᵀ + U Rᵀ``, so
            the measure is off by up to ``||R||``; an unconverged Ritz pair is not an eigenpair,
            its value is not in the spectrum and its vector mixes in the bulk's eigenvectors,
            whose mass would then be counted twice or lost. ``k < n`` is required.
        together: Most runs advanced together (default all). Runs are independent: groups of
            ``together`` runs, one after the other, give the same runs from the same start
            vectors (drawn column by column), and hold ``together · iters`` basis vectors
            instead of ``runs · iters``; a step of a group is one pass over the data for that
            group only. Worth it where a product multiplies one column at a time anyway.

    Returns:
        :class:`DensityResult` with float64 CPU tensors: ``grid``/``density`` (integrating to 1
        on the grid), ``nodes``/``weights`` ``[runs, iters]`` (weights of each run sum to 1),
        ``alphas`` ``[runs, iters]`` and ``betas`` ``[runs, iters - 1]``. A run that meets an
        exact invariant subspace (``β <= 8·eps · ||T||``, rounding noise; see
        :func:`hesscli.algorithms.lanczos.breakdown_tol`; e.g. ``iters > size``) stops early,
        saving its products; its missing nodes repeat its largest node with weight 0, its
        ``alphas`` are padded with that node and its ``betas`` with 0, so the tridiagonal of
        the padded coefficients has the same quadrature. ``n_hvp`` counts the products spent.
        Memory: the ``runs · iters`` Lanczos vectors of size ``size`` (full reorthogonalisation;
        ``together · iters`` with ``together``).
        With ``deflate``, ``nodes``/``weights`` are ``[runs, iters + k]``: in every run, columns
        ``:iters`` are the quadrature of ``P A P`` with weights scaled by ``(n-k)/n`` and columns
        ``iters:`` the ``k`` deflated values with weight ``1/n`` each (each run still sums to 1,
        and so does the mean over runs); ``alphas``/``betas`` are those of ``P A P`` (re-smoothing
        from them alone loses the deflated values: use ``nodes``/``weights``), ``deflated`` is
        ``k``, and the default ``sigma`` is the undeflated one for ``iters`` nodes on the padded
        range of all nodes.

    Raises:
        InputError: For non-positive ``iters``, ``runs``, ``block_size`` or ``sigma``, a grid
            of fewer than 2 points, or a non-CPU generator.

    Example:
        >>> from hesscli.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)))
        >>> r = slq(A, iters=5, runs=2, generator=torch.Generator().manual_seed(0))
        >>> [round(x, 12) for x in r.nodes[0, :2].tolist() + r.weights[0, :2].tolist()], r.n_hvp
        ([1.0, 3.0, 0.666666666667, 0.333333333333], 4)
    """
    for name, value in (("iters", iters), ("runs", runs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name}={value!r}: expected a positive integer")
    for label, optional in (("block_size", block_size), ("together", together)):
        if optional is not None and (isinstance(optional, bool) or not isinstance(optional, int) or optional < 1):
            raise InputError(f"{label}={optional!r}: expected a positive integer or None")
    _check_broadening(sigma, grid)
    check_generator(generator)
    if first_run is not None and (tuple(first_run[0].shape) != (iters,) or tuple(first_run[1].shape) != (iters - 1,)):
        raise InputError(f"first_run: expected alphas [{iters}] and betas [{iters - 1}], got "
                         f"{tuple(first_run[0].shape)} and {tuple(first_run[1].shape)}")
    lock: Tensor | None = None
    values: Tensor | None = None
    if deflate is not None:
        values, lock = _check_deflate(A, deflate)
        if first_run is not None:
            logger.debug("SLQ: first_run ignored, deflation wins (that run is not a run of P A P)")
            first_run = None
    before = A.n_matvecs
    total = runs
    runs = runs - (first_run is not None)  # the runs that cost products
    alphas, betas, length = _lanczos_runs(A, iters, runs, generator, block_size, lock, together)
    if first_run is not None:
        alphas = torch.cat([first_run[0].to(torch.float64).cpu().unsqueeze(0), alphas])
        betas = torch.cat([first_run[1].to(torch.float64).cpu().unsqueeze(0), betas])
        length = [iters] + length

    nodes = torch.empty(total, iters, dtype=torch.float64)
    weights = torch.zeros(total, iters, dtype=torch.float64)
    for r in range(total):
        L = length[r]
        T = torch.diag(alphas[r, :L]) + torch.diag(betas[r, : L - 1], 1) + torch.diag(betas[r, : L - 1], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[r, :L], nodes[r, L:] = theta, theta[-1]
        weights[r, :L] = S[0] ** 2
        alphas[r, L:] = theta[-1]
    k = 0
    if values is not None:
        n, k = A.size, values.numel()
        nodes = torch.cat([nodes, values.unsqueeze(0).expand(total, k)], dim=1)
        weights = torch.cat([weights * ((n - k) / n), torch.full((total, k), 1.0 / n, dtype=torch.float64)], dim=1)
        if sigma is None:  # the width an undeflated run of `iters` nodes would get on this range
            lo, hi = float(nodes.min()), float(nodes.max())
            pad = 0.05 * (hi - lo)
            sigma = default_sigma(lo - pad, hi + pad, iters) if hi > lo else None
    x, density, sigma = broaden(nodes, weights, sigma=sigma, grid=grid)
    return DensityResult(
        grid=x, density=density, nodes=nodes, weights=weights, alphas=alphas, betas=betas,
        sigma=sigma, n_hvp=A.n_matvecs - before, deflated=k,
    )


def _check_deflate(A: CurvatureOperator, deflate: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(values [k] float64 CPU, U [n, k] orthonormal in A's dtype and device)``."""
    values, vectors = deflate
    values = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    k = values.numel()
    if vectors.ndim != 2 or tuple(vectors.shape) != (A.size, k) or not 1 <= k < A.size:
        raise InputError(f"deflate: expected values [k] and vectors [{A.size}, k] with 1 <= k < {A.size}, got "
                         f"{tuple(values.shape)} and {tuple(vectors.shape)}")
    if not bool(torch.isfinite(values).all()) or not bool(torch.isfinite(vectors).all()):
        raise InputError("deflate: values and vectors must be finite")
    U = vectors.detach().to(device=A.device, dtype=A.dtype)
    U, _ = torch.linalg.qr(U)  # orthonormal to working precision (the span is kept)
    return values, U


def _lanczos_runs(A: CurvatureOperator, iters: int, runs: int, generator: torch.Generator,
                  block_size: int | None, lock: Tensor | None = None,
                  together: int | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """``runs`` fully reorthogonalised Lanczos runs from Rademacher vectors, advanced ``together``
    at a time (default all): ``alphas [runs, iters]``, ``betas [runs, iters - 1]`` and the steps
    each run completed.

    With ``lock`` (orthonormal ``[n, k]``), runs of ``P A P``, ``P = I - lock lockᵀ``: normal start
    vectors projected with ``P``, and every new vector orthogonalised against ``lock`` too."""
    if runs == 0:
        return (torch.zeros(0, iters, dtype=torch.float64), torch.zeros(0, max(iters - 1, 0), dtype=torch.float64), [])
    group = runs if together is None else min(together, runs)
    # groups one after the other: each draws its start vectors when it starts, in run order
    parts = [_lanczos_group(A, iters, min(group, runs - r0), generator, block_size, lock)
             for r0 in range(0, runs, group)]
    if len(parts) == 1:
        return parts[0]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            [steps for p in parts for steps in p[2]])


def _lanczos_group(A: CurvatureOperator, iters: int, runs: int, generator: torch.Generator,
                   block_size: int | None, lock: Tensor | None) -> tuple[Tensor, Tensor, list[int]]:
    """:func:`_lanczos_runs` for ``runs`` runs advanced together (one basis ``[runs, iters, n]``)."""
    n, dtype, device = A.size, A.dtype, A.device
    block = runs if block_size is None else block_size
    tiny = breakdown_tol(dtype)

    basis = torch.empty(runs, iters, n, dtype=dtype, device=device)
    if lock is None:
        z = probes(n, runs, generator=generator, dtype=dtype, device=device)
    else:
        z = probes(n, runs, generator=generator, dtype=dtype, device=device, distribution="normal")
        for _ in range(2):
            z -= lock @ (lock.T @ z)
    basis[:, 0] = (z / torch.linalg.vector_norm(z, dim=0)).T
    del z
    alphas = torch.zeros(runs, iters, dtype=torch.float64)
    betas = torch.zeros(runs, max(iters - 1, 0), dtype=torch.float64)
    length = [iters] * runs  # steps each run completed
    anorm = torch.zeros(runs, dtype=torch.float64)
    active = list(range(runs))
    for j in range(iters):
        cols = basis[active, j].T  # [n, a]
        w_active = torch.cat(
            [A.matmat(cols[:, c:c + block]) for c in range(0, len(active), block)], dim=1
        )
        w = torch.zeros(runs, n, dtype=dtype, device=device)
        w[active] = w_active.T.to(dtype)
        del cols, w_active
        Vj = basis[:, : j + 1]  # [runs, j + 1, n]
        if lock is not None:
            w -= (w @ lock) @ lock.T
        h = torch.bmm(Vj, w.unsqueeze(2))
        w -= torch.bmm(Vj.transpose(1, 2), h).squeeze(2)
        if lock is not None:
            w -= (w @ lock) @ lock.T
        h2 = torch.bmm(Vj, w.unsqueeze(2))
        w -= torch.bmm(Vj.transpose(1, 2), h2).squeeze(2)
        alpha = (h + h2)[:, j, 0]
        beta = torch.linalg.vector_norm(w, dim=1)
        host = torch.stack([alpha, beta]).to(torch.float64).cpu()  # one sync per step
        alphas[active, j] = host[0, active]
        if j == iters - 1:
            break
        anorm = torch.maximum(anorm, (host[0] ** 2 + host[1] ** 2).sqrt())
        still = []
        for r in active:
            if host[1, r] <= tiny * anorm[r]:
                length[r] = j + 1
                logger.debug("SLQ run %d: invariant subspace after %d steps", r, j + 1)
            else:
                still.append(r)
        active = still
        if not active:
            break
        betas[active, j] = host[1, active]
        basis[active, j + 1] = w[active] / beta[active].unsqueeze(1)
    return alphas, betas, length


def default_sigma(lo: float, hi: float, n_nodes: int) -> float:
    """Papyan's broadening for ``n_nodes`` quadrature nodes on the interval ``[lo, hi]``.

    Papyan (2020, Algorithm 2 and Section D.2) rescales the spectrum to ``[-1, 1]`` and uses
    ``σ = 2 / ((M - 1) sqrt(8 ln κ))`` with ``κ = 3``: two Gaussians one node spacing
    ``2 / (M - 1)`` apart each fall to a third of their peak halfway between them, so the
    bulk reads as a continuous density while outliers a few spacings away stay separate
    peaks. In the original units this is ``(hi - lo) / ((M - 1) sqrt(8 ln 3))``, about a
    third of the node spacing. Unlike a fixed width such as Ghorbani et al.'s
    ``σ² = 1e-5`` (used by PyHessian), it follows the resolution of the quadrature: fewer
    Lanczos steps give wider bumps instead of a comb of isolated spikes.

    Args:
        lo: Left end of the node interval widened by the padding (the 5% margin).
        hi: Right end.
        n_nodes: Quadrature nodes per run (``iters``).

    Returns:
        The standard deviation of the Gaussian bumps.
    """
    return (hi - lo) / (max(n_nodes - 1, 1) * math.sqrt(8 * math.log(KAPPA)))


def broaden(
    nodes: Tensor,
    weights: Tensor,
    *,
    sigma: float | None = None,
    grid: int = 1000,
    padding: float = 0.05,
) -> tuple[Tensor, Tensor, float]:
    """Turn quadrature nodes and weights into a smooth density on an even grid.

    The density is the average over runs of ``Σ_j w_j N(x; θ_j, σ²)`` on ``grid`` points
    spanning ``[min node, max node]`` widened on each side by ``padding · range`` (Papyan
    2020 uses a 5% margin) or by ``KERNEL_REACH · σ``, whichever is wider, so every Gaussian
    lies on the grid up to a tail of 1e-9 of its mass. Its moments are then those of the
    quadrature: mass 1, mean ``Σ w_j θ_j`` and second moment ``Σ w_j θ_j² + σ²`` (averaged over
    runs). It is renormalised so its trapezoidal integral is exactly 1 (a correction of the
    order of that tail and of the trapezoidal error, both negligible while ``σ`` spans
    several grid steps). Use it to re-smooth saved nodes/weights with another ``sigma`` or
    ``grid`` without new products.

    Args:
        nodes: ``[runs, M]`` or ``[M]`` quadrature nodes.
        weights: Matching weights (each run sums to 1).
        sigma: Gaussian width; default :func:`default_sigma` on the padded interval with ``M``
            nodes.
        grid: Number of grid points (at least 2).
        padding: Relative margin on each side of the node range (at least ``KERNEL_REACH · σ``
            is kept whatever its value).

    Returns:
        ``(grid, density, sigma)``: float64 CPU tensors ``[grid]`` and the width used.

    Raises:
        InputError: For mismatched shapes, a grid of fewer than 2 points, a negative
            padding or a non-positive sigma.

    Example:
        >>> x, p, s = broaden(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), grid=101)
        >>> round(float(torch.trapezoid(p, x)), 12)
        1.0
    """
    _check_broadening(sigma, grid)
    if not padding >= 0:
        raise InputError(f"padding={padding}: expected a non-negative fraction of the node range, e.g. 0.05")
    nodes = nodes.detach().to(device="cpu", dtype=torch.float64)
    weights = weights.detach().to(device="cpu", dtype=torch.float64)
    if nodes.shape != weights.shape or nodes.ndim not in (1, 2) or nodes.numel() == 0:
        raise InputError(
            f"broaden: nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} must be matching "
            "non-empty [runs, M] or [M] tensors"
        )
    if nodes.ndim == 1:
        nodes, weights = nodes.unsqueeze(0), weights.unsqueeze(0)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo
    if width <= 1e-12 * max(abs(lo), abs(hi)):  # a single point mass: give it a visible interval
        width = max(abs(lo), abs(hi)) or 1.0
    if sigma is None:
        sigma = default_sigma(lo - padding * width, hi + padding * width, nodes.shape[1])
    margin = max(padding * width, KERNEL_REACH * sigma)  # the grid holds every node's whole Gaussian
    x = torch.linspace(lo - margin, hi + margin, grid, dtype=torch.float64)
    density = torch.zeros(grid, dtype=torch.float64)
    for run_nodes, run_weights in zip(nodes, weights):  # one run at a time: [M, grid] scratch, not [runs, M, grid]
        z = (x.unsqueeze(0) - run_nodes.unsqueeze(1)) / sigma
        density += run_weights @ torch.exp(-0.5 * z * z)
    density /= nodes.shape[0] * sigma * math.sqrt(2 * math.pi)
    total = float(torch.trapezoid(density, x))
    if total > 0:
        density = density / total
    return x, density, float(sigma)


def _check_broadening(sigma: float | None, grid: int) -> None:
    if sigma is not None and not sigma > 0:
        raise InputError(f"sigma={sigma}: expected a positive Gaussian width, or None for the default")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise InputError(f"grid={grid!r}: expected at least 2 grid points")
