"""Hutch++: Hutchinson's estimator with the dominant subspace deflated exactly.

Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation"
(SOSA; arXiv 2010.09649). A sketch ``A S`` finds an orthonormal basis ``Q`` of the
dominant range of ``A``; ``tr(Qᵀ A Q)`` is computed exactly and Hutchinson's estimator
only has to cover what ``Q`` misses. For spectra that decay (Hessians of trained
networks) the error shrinks like ``1/m`` in the number of products ``m`` instead of
``1/sqrt(m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hesscli.algorithms.hutchinson import (
    GroupSums,
    _check_confidence,
    _check_count,
    _check_tol,
    hutchinson,
    trace_result,
    two_stage,
)
from hesscli.algorithms.sampling import check_generator, probes
from hesscli.operators.base import CurvatureOperator
from hesscli.results.records import TraceResult

__all__ = ["hutchpp", "hutchpp_run", "HutchppRun", "orthonormalise_", "orth_chunk_bytes", "adaptive_sketch"]


def hutchpp(
    A: CurvatureOperator,
    *,
    n_matvecs: int,
    generator: torch.Generator,
    block_size: int = 16,
    confidence: float = 0.95,
    sketch: Tensor | None = None,
    tol: float | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` with Hutch++ under a budget of ``n_matvecs`` products.

    The budget is split as in Meyer et al. (2021, Algorithm 1): ``s = m // 3`` Rademacher
    sketch vectors ``S``, ``s`` products with the basis ``Q = orth(A S)`` (fewer when ``s``
    exceeds the size), and the rest (about ``m / 3``) Rademacher probes ``G`` for the
    residual. The estimate is
    ``tr(Qᵀ A Q) + mean_z zᵀ (I - P) A (I - P) z`` with ``P = QQᵀ``; both terms are unbiased
    given ``Q``, and the standard error and the skewness-corrected t interval
    (:func:`~hesscli.algorithms.hutchinson.summarise`) come from the residual samples
    (given ``Q`` the residual is the only random term). Probes are projected *before* the
    product, as in Meyer et al.: projecting only afterwards (``zᵀ (I - P) A z``) is unbiased
    too, but lets the large eigen-directions held by ``Q`` leak into every sample through
    ``(I - P) A P``, which on Hessians of trained networks costs several times the error.
    Per-group traces come from the same products: with the diagonal mask ``D_g``,
    ``tr(D_g A) = tr(D_g P A) + tr(D_g (I - P) A P) + tr(D_g (I - P) A (I - P))``; the first two
    are exact from ``Q`` and ``AQ`` (rows of ``Q ∘ AQ`` and of ``Q ∘ W``, ``W = (I - P) A Q``,
    whose total ``tr(Qᵀ W)`` is 0), and the mean of ``z_gᵀ ((I - P) A (I - P) z)_g`` is unbiased
    for the third. Group estimates sum to the total.

    With fewer than 3 products there is no room for a sketch and the call falls back to
    :func:`hesscli.algorithms.hutchinson.hutchinson` with the same budget.

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``groups``, ``matmat``).
        n_matvecs: Product budget ``m``; exactly ``m`` products are spent.
        generator: Seeded CPU generator (sketch first, then residual probes).
        block_size: Most columns per ``matmat`` call (default 16, as for
            :func:`~hesscli.algorithms.hutchinson.hutchinson`). Memory is ``m / 3`` vectors (the
            sketch, orthonormalised in place into ``Q``: :func:`orthonormalise_`) plus a few blocks.
        confidence: Coverage of the interval.
        sketch: ``[size, m // 3]``: a sketch from elsewhere in place of ``A S`` (see
            :func:`hutchpp_run`); ``None`` (default) multiplies a fresh ``S``.
        tol: Optional target for ``stderr / |trace|``. The sketch grows only while it pays
            (:func:`adaptive_sketch`: at most ``m / 3`` vectors, as without ``tol``, fewer where
            the spectrum decays fast or the target is loose); the residual probes are then
            planned in two stages, as
            :func:`~hesscli.algorithms.hutchinson.hutchinson` plans its probes with ``tol``: a
            pilot of residual probes (set aside) fixes how many fresh ones the target needs, and
            the estimate uses those alone, so it stays exactly unbiased. At most the budget is
            spent; where the target needs more, the rest of the budget is used, a
            :class:`~hesscli.errors.ConvergenceWarning` is issued and ``converged`` is ``False``.

    Returns:
        :class:`TraceResult` with ``method="hutch++"``; ``n_probes`` counts the vectors
        multiplied, like ``n_hvp`` (``m`` without ``tol``).

    Raises:
        InputError: For a non-positive budget or block size, a bad ``confidence`` or ``tol``, or a
            non-CPU generator.

    Example:
        >>> from hesscli.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64)))
        >>> r = hutchpp(A, n_matvecs=9, generator=torch.Generator().manual_seed(0))
        >>> round(r.estimate, 6), r.n_hvp
        (101.01, 9)
    """
    return hutchpp_run(A, n_matvecs=n_matvecs, generator=generator, block_size=block_size, confidence=confidence,
                       sketch=sketch, tol=tol).result


@dataclass(frozen=True)
class HutchppRun:
    """A Hutch++ estimate and, on request, the products ``A Q`` of its basis: a sketch for the
    next, slightly different operator (:func:`hutchpp_run`)."""

    result: TraceResult
    next_sketch: Tensor | None = None


def hutchpp_run(
    A: CurvatureOperator,
    *,
    n_matvecs: int,
    generator: torch.Generator,
    block_size: int = 16,
    confidence: float = 0.95,
    sketch: Tensor | None = None,
    keep_sketch: bool = False,
    tol: float | None = None,
) -> HutchppRun:
    """:func:`hutchpp`, with a sketch carried from one operator to the next (a series of checkpoints).

    With ``sketch`` (``[size, s]``, ``1 <= s <= n_matvecs // 3``, e.g. the ``next_sketch`` of the
    previous checkpoint's run, narrower where its sketch stopped early under ``tol``),
    ``Q = orth(sketch)`` replaces ``orth(A S)``: the ``s`` sketch products are not spent, and the
    residual gets ``n_matvecs - s`` probes instead of about ``m / 3``. A sketch already on the
    operator's device and dtype is overwritten by ``Q`` (no copy is made): the caller hands it
    over. The estimate stays unbiased, since the residual probes are drawn independently of ``Q``
    (``S``, ``n_matvecs // 3`` columns, is still drawn and dropped, so the residual probes are
    those of a cold run without ``tol``: common random numbers along a series). With
    ``keep_sketch``, the run returns ``A Q`` (products it makes anyway, ``s`` more vectors of
    memory): carried along a series, ``Q`` then takes one step of subspace iteration per
    checkpoint and approaches the dominant eigenvectors, so the residual holds less of the trace
    and its probes more of the budget. A sketch of another size, wider than ``n_matvecs // 3``,
    or not finite, is ignored (a cold run). With ``tol``, a carried sketch leaves more of the
    budget to the residual and a better ``Q`` leaves it less variance, so the target costs fewer
    products along a series.

    Returns:
        :class:`HutchppRun`.

    Raises:
        InputError: As :func:`hutchpp`.
    """
    _check_count("n_matvecs", n_matvecs)
    _check_count("block_size", block_size)
    _check_confidence(confidence)
    _check_tol(tol)
    check_generator(generator)
    if n_matvecs < 3:
        return HutchppRun(hutchinson(A, n_probes=n_matvecs, generator=generator, block_size=block_size,
                                     confidence=confidence, tol=tol))
    groups = GroupSums(A)
    before = A.n_matvecs
    n, s = A.size, n_matvecs // 3

    def draw(b: int) -> Tensor:
        return probes(n, b, generator=generator, dtype=A.dtype, device=A.device)

    if sketch is not None and (sketch.dim() != 2 or sketch.shape[0] != n or not 1 <= sketch.shape[1] <= s
                               or not bool(torch.isfinite(sketch).all())):
        sketch = None  # of another run or unusable: a cold run
    warm = sketch is not None
    # Sketch: Y = A S, drawn and multiplied block by block (drawn only, when a sketch is given:
    # that sketch is then orthonormalised in place, when it is already on A's device and dtype).
    # Column-major, so that each block of columns of Q multiplied below is contiguous. With tol,
    # a cold sketch grows only as long as it pays (adaptive_sketch).
    if warm:
        assert sketch is not None
        Y = sketch.to(device=A.device, dtype=A.dtype)
        for c in range(0, s, block_size):
            draw(min(block_size, s - c))
    elif tol is not None:
        Y = adaptive_sketch(A, draw, s, tol, block_size)
    else:
        Y = torch.empty(s, n, dtype=A.dtype, device=A.device).T
        for c in range(0, s, block_size):
            b = min(block_size, s - c)
            Y[:, c:c + b] = A.matmat(draw(b))
    del sketch
    sketched = 0 if warm else Y.shape[1]
    Q = orthonormalise_(Y)  # [n, min(n, s)] in Y's memory (a copy only for a rank-deficient sketch)
    del Y
    n_residual = n_matvecs - Q.shape[1] - sketched
    AQ = torch.empty_like(Q) if keep_sketch else None

    # Exact part: the diagonal of P A + (I - P) A P with P = QQᵀ, whose trace is tr(Qᵀ A Q); per
    # group, rows of Q ∘ AQ plus rows of Q ∘ W with W = (I - P) A Q.
    # Streamed a block of columns at a time (only Q is held whole): Q ∘ AQ + Q ∘ W =
    # Q ∘ (2 AQ - Q (Qᵀ AQ)), and column c of Qᵀ AQ needs only column c of AQ.
    exact: Tensor | None = None
    for c in range(0, Q.shape[1], block_size):
        Qc = Q[:, c:c + block_size]
        AQc = A.matmat(Qc)
        if AQ is not None:
            AQ[:, c:c + block_size] = AQc
        C = Q.T @ AQc  # before AQc is changed in place
        AQc.mul_(2).addmm_(Q, C, alpha=-1).mul_(Qc)  # in place: no temporary block
        part = groups(AQc).sum(1)
        exact = part if exact is None else exact + part
        del AQc

    # Residual: zᵀ D_g (I - P) A (I - P) z for fresh probes z; the products are of projected probes,
    # so the large eigen-directions that Q holds cannot leak into the samples.
    def residual(count: int) -> Tensor:
        blocks = []
        for c in range(0, count, block_size):
            b = min(block_size, count - c)
            G = draw(b)
            R = A.matmat(torch.addmm(G, Q, Q.T @ G, alpha=-1))  # (I - P) G, then A (I - P) G
            R.addmm_(Q, Q.T @ R, alpha=-1)  # in place
            blocks.append(groups(G.mul_(R)))
            del R, G
        return torch.cat(blocks, dim=1).cpu()

    assert exact is not None  # Q has at least one column
    if tol is None:
        samples, pilot, converged = residual(n_residual), 0, True
    else:
        samples, pilot, converged = two_stage(residual, n_residual, tol, confidence, offset=float(exact[-1]),
                                              spent=n_matvecs - n_residual, name="Hutch++")
    result = trace_result(
        samples, groups, confidence, offset=exact, method="hutch++",
        n_probes=n_matvecs - n_residual + pilot + samples.shape[1], n_hvp=A.n_matvecs - before, converged=converged,
    )
    return HutchppRun(result, AQ)


SKETCH_STEP = 8
"""Sketch vectors added at a time by :func:`adaptive_sketch`."""

GRAM_CUT = 1e-13
"""Eigenvalues of the sketch's float64 Gram matrix below this share of the largest are rounding
noise of the Gram matrix (not of the sketch: products of float32 numbers are exact in float64),
and their directions are left out of the basis when :func:`adaptive_sketch` measures it."""


def adaptive_sketch(A: CurvatureOperator, draw: Callable[[int], Tensor], s_max: int, tol: float,
                    block_size: int) -> Tensor:
    """Hutch++'s sketch ``Y = A S`` for a target ``stderr / |tr(A)| <= tol``, grown
    :data:`SKETCH_STEP` vectors at a time while it pays (returns ``[size, s]``, ``s <= s_max``,
    a column-major view of storage for ``s_max`` columns).

    A sketch of ``s`` vectors costs ``2 s`` products (``A S`` and ``A Q``); what it buys is a
    residual ``(I - P) A (I - P)`` with less variance per probe. After each step the fresh
    vectors measure what the basis so far leaves: ``||(I - P) A s||²`` over a Rademacher ``s``
    has mean ``||(I - P) A||_F²``, computed from the float64 Gram matrix of the sketch (directions
    below :data:`GRAM_CUT` count as missing, which can only make the estimate larger). A residual probe's variance is at most ``2 ||(I - P) A||_F²``
    (Rademacher probes), so the target needs at most ``2 ||(I - P) A||_F² / (tol · t)²`` probes,
    with ``t`` the Hutchinson estimate of the trace from the sketch vectors themselves
    (``sᵀ A s``). The sketch stops growing once that is no more than the ``2 s`` products it has
    cost: a budget split in proportion to what each part needs, as in Hutch++'s own thirds, and
    like the adaptive variants of Persson, Cortinovis & Kressner (2022, SIAM J. Matrix Anal.
    Appl. 43(3)), which grow the sketch until its marginal products stop paying. Both estimates
    are of the residual *before* the last step's vectors joined the basis, so the rule errs
    towards a larger sketch; a spectrum that decays fast stops after a few steps, a flat one
    grows to ``s_max`` (the sketch of a run without ``tol``).

    The decision uses the sketch alone: the residual probes drawn afterwards are independent of
    it, so the estimate stays unbiased given ``Q``.
    """
    n = A.size
    Y = torch.empty(s_max, n, dtype=A.dtype, device=A.device).T
    gram = torch.zeros(s_max, s_max, dtype=torch.float64)
    rows = _orth_rows(n, s_max)
    quad = 0.0  # sum of sᵀ A s over the sketch vectors: s times a Hutchinson estimate of the trace
    s = 0
    while s < s_max:
        g = min(SKETCH_STEP, s_max - s)
        for c in range(s, s + g, block_size):
            b = min(block_size, s + g - c)
            S = draw(b)
            Y[:, c:c + b] = A.matmat(S)
            quad += float(S.mul_(Y[:, c:c + b]).sum(dtype=torch.float64))
            del S
        new = torch.zeros(s + g, g, dtype=torch.float64, device=A.device)
        for r in range(0, n, rows):
            new.addmm_(Y[r:r + rows, :s + g].to(torch.float64).T, Y[r:r + rows, s:s + g].to(torch.float64))
        new = new.cpu()
        gram[:s + g, s:s + g] = new
        gram[s:s + g, :s] = new[:s].T
        energy = float(new[s:].diagonal().sum())  # ||A S_new||_F²
        if s:
            mu, U = torch.linalg.eigh(gram[:s, :s])
            keep = mu > GRAM_CUT * float(mu.max())
            energy -= float(((U[:, keep].T @ new[:s]) ** 2 / mu[keep, None]).sum())  # minus ||P A S_new||_F²
        residual = max(energy, 0.0) / g  # ||(I - P) A||_F² of the basis before this step
        s += g
        t = abs(quad / s)
        planned = 2 * residual / (tol * t) ** 2 if t > 0 else math.inf
        if planned <= 2 * s:
            break
    return Y[:, :s]


ORTH_CHUNK_BYTES = 1 << 25
"""Most float64 working memory of :func:`orthonormalise_`, which takes the rows of its matrix a
chunk at a time."""

ORTH_MAX_COND = 1e6
"""Largest condition number of a sketch that :func:`orthonormalise_` orthonormalises in place
(estimated from its Cholesky factor); a worse one is rank-deficient for the purpose and goes to
Householder QR."""


def _orth_rows(n: int, s: int) -> int:
    """Rows per chunk of :func:`orthonormalise_`: two float64 chunks (the rows and their product)
    within :data:`ORTH_CHUNK_BYTES`, and at most a sixteenth of the rows, so that a small model
    does not hold a float64 copy of its sketch either."""
    return max(1, min(ORTH_CHUNK_BYTES // (16 * max(1, s)), -(-n // 16)))


def orth_chunk_bytes(n: int, s: int) -> int:
    """Working memory of :func:`orthonormalise_` on an ``[n, s]`` sketch besides the sketch itself:
    its float64 chunks, whatever the sketch's dtype (Householder QR's copy where it falls back is
    not counted: that sketch has lower rank than its width, a small model's)."""
    return 16 * s * _orth_rows(n, s) if 0 < s <= n else 0


def orthonormalise_(Y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``Y`` (``[n, s]``), written over ``Y``.

    CholeskyQR2 (Yamamoto, Nakatsukasa, Yanagisawa & Fukaya 2015) with the Gram matrix ``YᵀY``
    accumulated in float64 a chunk of rows at a time: ``R = chol(YᵀY)ᵀ``, ``Y ← Y R⁻¹`` row chunk
    by row chunk, twice. The first pass leaves ``Y`` well conditioned (its loss of
    orthogonality is about ``eps64 · cond(Y)²``), the second brings it to the rounding of ``Y``'s
    dtype, as Householder QR does. Memory is ``Y`` plus at most :data:`ORTH_CHUNK_BYTES` (and
    an eighth of ``Y``'s float64 size), where
    ``torch.linalg.qr`` holds a second copy of ``Y`` (on an 11M-parameter model with the default
    33 sketch vectors, 1.4 GB in float32). The basis spans the same space as Householder's, with
    columns that may differ in sign and rotation within it, which Hutch++ does not depend on.

    A sketch whose condition number exceeds :data:`ORTH_MAX_COND` (an operator of lower rank
    than the sketch, or ``s > n``) is handed to ``torch.linalg.qr`` unchanged, which completes the
    basis with arbitrary orthonormal directions (then ``Y`` is left as it was and a new tensor
    returned).

    Returns:
        ``Y`` itself, orthonormal (``[n, s]``), or a new ``[n, min(n, s)]`` tensor from
        ``torch.linalg.qr``.
    """
    n, s = Y.shape
    if s == 0 or s > n:
        return torch.linalg.qr(Y).Q
    rows = _orth_rows(n, s)
    for _ in range(2):
        G = torch.zeros(s, s, dtype=torch.float64, device=Y.device)
        for r in range(0, n, rows):
            Yr = Y[r:r + rows].to(torch.float64)
            G.addmm_(Yr.T, Yr)
        G = G.cpu()
        L, info = torch.linalg.cholesky_ex(G)
        d = L.diagonal()
        if int(info) != 0 or not bool(torch.isfinite(L).all()) or float(d.min()) <= float(d.max()) / ORTH_MAX_COND:
            return torch.linalg.qr(Y).Q  # Y spans the same space as before this pass
        Rinv = torch.linalg.solve_triangular(L.T, torch.eye(s, dtype=torch.float64), upper=True).to(Y.device)
        for r in range(0, n, rows):
            Y[r:r + rows] = Y[r:r + rows].to(torch.float64) @ Rinv
    return Y
