"""Hutchinson's stochastic trace estimator, with an error bar and per-group traces.

For probes ``z`` with ``E[z zᵀ] = I``, ``zᵀ A z`` is an unbiased estimate of ``tr(A)``
(Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines"; variance analysis in Avron & Toledo 2011, "Randomized
algorithms for estimating the trace of an implicit symmetric positive semi-definite
matrix"). The same probes give every diagonal block: ``E[z_gᵀ (A z)_g] = tr(A_gg)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from hesscli.algorithms.sampling import check_generator, probes
from hesscli.errors import ConvergenceWarning, InputError
from hesscli.operators.base import CurvatureOperator
from hesscli.results.records import GroupTrace, TraceResult

__all__ = ["hutchinson", "summarise"]

logger = logging.getLogger(__name__)

PILOT_PROBES = 16
"""With ``tol``: the pilot sample that plans the run starts with 16 probes (one default block)
and grows by as many. It gives the mean and variance the probe count is planned from, and is
then set aside."""

PILOT_REL_STDERR = 0.3
"""With ``tol``: the pilot grows until its own standard error is below 30% of its mean. The plan
divides by the pilot's mean squared, so a pilot that cannot yet tell the trace from zero
would plan wildly (its mean probe count is unbounded); at 30% the pilot costs about
``(0.1 / 0.3)² ≈ 11%`` of the fresh probes at ``tol=0.1`` and less at tighter ``tol``."""

MIN_FRESH_PROBES = 16
"""With ``tol``: the estimate averages at least 16 fresh probes, whatever the pilot says. A
pilot with little spread can come from a skewed spectrum that it did not sample, and the
interval needs enough samples to estimate the skewness (see :func:`summarise`)."""

_MIN_SAMPLES_FOR_SKEWNESS = 5
"""Below 5 samples the skewness estimate costs coverage on symmetric samples (about 1.5 points
at 3 samples) without restoring it on skewed ones, so the plain t interval is used."""


def hutchinson(
    A: CurvatureOperator,
    *,
    n_probes: int,
    generator: torch.Generator,
    tol: float | None = None,
    block_size: int = 16,
    distribution: str = "rademacher",
    confidence: float = 0.95,
) -> TraceResult:
    """Estimate ``tr(A)`` as the mean of ``zᵀ A z`` over random probes ``z``.

    Probes are multiplied in blocks of ``block_size`` columns. The standard error is the
    sample standard deviation over ``sqrt(n)``; the interval is Student-t with ``n - 1``
    degrees of freedom corrected for the skewness of the samples (:func:`summarise`), which
    keeps its coverage when a few eigenvalues dominate the trace. When ``A.groups`` has more
    than one entry, the trace of each diagonal block is estimated from the same probes at no
    extra product, and the group estimates sum to the total.

    With ``tol`` the number of probes is planned in two stages (Stein 1945, "A two-sample
    test for a linear hypothesis whose power is independent of the variance", Ann. Math.
    Statist. 16): a pilot sample (``PILOT_PROBES`` probes, grown by as many until its
    relative standard error is below ``PILOT_REL_STDERR``) gives a mean ``m₀`` and a standard
    deviation ``s₀``, which fix ``N = max(MIN_FRESH_PROBES, ceil((s₀ / (tol · |m₀|))²))``; then
    ``N`` *fresh* probes are drawn and the estimate, standard error and interval come from
    them alone. ``N`` depends only on the pilot, which is independent of the fresh probes, so
    the estimate is exactly unbiased and the interval keeps its coverage. A rule that stops as
    soon as the running standard error looks small enough stops on lucky streaks and biases
    the estimate (by +2% at ``tol=0.1`` on indefinite spectra).

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``groups``, ``matmat``).
        n_probes: Probe budget (one product each), the pilot included.
        generator: Seeded CPU generator for the probes.
        tol: Optional target for ``stderr / |trace|``. The probe count is planned from the
            pilot so that the expected relative standard error is ``tol``; the reported
            ``stderr`` is measured on the fresh probes and scatters around that target (the
            interval, not ``tol``, is the error bar to trust). The pilot costs products that
            the estimate does not use: 16, or about 11% of the fresh ones at ``tol=0.1`` when the
            trace is hard to tell from zero; it never takes more than half the budget. If the
            planned probes do not fit in the budget, the budget is spent on fresh probes, a
            :class:`ConvergenceWarning` is issued and the result has ``converged=False``.
        block_size: Most probe columns per ``matmat`` call. Default 16: enough columns to
            amortise a pass over the data, while the block stays at 16 vectors of memory. It
            never changes the numbers (probes are drawn column by column).
        distribution: ``"rademacher"`` (default, the minimum-variance choice) or ``"normal"``.
        confidence: Coverage of the interval ``[ci_low, ci_high]`` (default the usual 95%).

    Returns:
        :class:`TraceResult` with ``method="hutchinson"``; ``n_probes`` and ``n_hvp`` count every
        probe multiplied (pilot included). With a single probe the error bar is infinite.

    Raises:
        InputError: For a non-positive budget or block size, a bad ``tol``/``confidence``,
            an unknown distribution or a non-CPU generator.

    Example:
        >>> from hesscli.operators.base import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> r = hutchinson(A, n_probes=8, generator=torch.Generator().manual_seed(0))
        >>> r.estimate  # Rademacher probes are exact on a diagonal matrix
        6.0
    """
    _check_count("n_probes", n_probes)
    _check_count("block_size", block_size)
    _check_confidence(confidence)
    _check_tol(tol)
    check_generator(generator)
    groups = GroupSums(A)
    before = A.n_matvecs

    def sample(count: int) -> Tensor:
        """``[G + 1, count]`` float64 CPU samples ``z_gᵀ (A z)_g`` of ``count`` fresh probes."""
        blocks: list[Tensor] = []
        for c in range(0, count, block_size):
            Z = probes(A.size, min(block_size, count - c), generator=generator, dtype=A.dtype, device=A.device,
                       distribution=distribution)
            AZ = A.matmat(Z)
            blocks.append(groups(Z.mul_(AZ)))  # Z is ours: reuse it for z * Az
            del AZ, Z
        return torch.cat(blocks, dim=1).cpu()

    if tol is None:
        samples, pilot, converged = sample(n_probes), 0, True
    else:
        samples, pilot, converged = two_stage(sample, n_probes, tol, confidence, name="Hutchinson")
    return trace_result(
        samples, groups, confidence, offset=None, method="hutchinson",
        n_probes=pilot + samples.shape[1], n_hvp=A.n_matvecs - before, converged=converged,
    )


def two_stage(sample: Callable[[int], Tensor], room: int, tol: float, confidence: float, *,
              offset: float = 0.0, spent: int = 0, name: str) -> tuple[Tensor, int, bool]:
    """Samples for a target ``stderr / |offset + mean| <= tol``, planned in two stages (see :func:`hutchinson`).

    ``sample(count)`` returns ``[G + 1, count]`` samples of fresh probes (the total last). A pilot
    of ``PILOT_PROBES`` (grown by as many while its relative standard error is above
    ``PILOT_REL_STDERR``, never past half of ``room``) plans the count; the plan's fresh samples
    are returned alone. ``offset`` is an exact part of the estimate (Hutch++'s ``tr(Qᵀ A Q)``):
    the target is relative to the whole trace, and ``spent`` the products that part took (for the
    warning's totals). With no room for a pilot, ``room`` samples are drawn and only flagged.

    Returns:
        ``(samples, pilot, converged)``: the samples the estimate uses, the products the pilot
        spent, and whether the target was planned within ``room``.
    """
    pilot = min(PILOT_PROBES, room // 2)
    if pilot < 2:  # no room for a pilot: one sample of fixed size
        samples = sample(room)
        mean, se, _, _ = summarise(samples[-1], confidence)
        total = offset + mean
        converged = se <= tol * abs(total)
        if not converged:
            _warn(name, f"relative standard error {se / abs(total) if total else math.inf:.3g} after {room} "
                        f"probes is above tol={tol} (no room for a pilot sample)")
        return samples, 0, converged
    drawn = sample(pilot)[-1]
    m0, s0 = _mean_std(drawn)  # one sync per pilot block: the plan needs it
    while s0 > PILOT_REL_STDERR * abs(offset + m0) * math.sqrt(pilot) and pilot + PILOT_PROBES <= room // 2:
        drawn = torch.cat([drawn, sample(PILOT_PROBES)[-1]])
        pilot += PILOT_PROBES
        m0, s0 = _mean_std(drawn)
    t0 = offset + m0
    planned: float  # probes; infinite when the trace looks like zero
    if s0 == 0:
        planned = MIN_FRESH_PROBES
    elif t0 == 0:
        planned = math.inf
    else:
        planned = max(MIN_FRESH_PROBES, math.ceil((s0 / (tol * abs(t0))) ** 2))
    fresh = min(planned, room - pilot)
    converged = planned <= room - pilot
    logger.debug("%s tol=%g: pilot of %d probes plans %s fresh probes", name, tol, pilot, planned)
    if not converged:
        need = "an unbounded number of" if math.isinf(planned) else f"{spent + pilot + planned}"
        _warn(name, f"tol={tol} needs {need} probes (planned from a pilot of {pilot}, relative spread "
                    f"{s0 / abs(t0) if t0 else math.inf:.3g} per probe), the budget is {spent + room}; the estimate uses "
                    f"{fresh} fresh probes and is above tol; raise the probe budget or loosen tol")
    return sample(int(fresh)), pilot, converged


def _mean_std(x: Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std(correction=1))


def _warn(name: str, text: str) -> None:
    warnings.warn(f"{name} trace: {text}", ConvergenceWarning, stacklevel=4)


class GroupSums:
    """Column sums of a ``[size, b]`` block over each group of ``A.groups``, as float64.

    Calling it returns ``[G + 1, b]``: one row per group, then the total. When the
    groups partition the vector, the total is the sum of the group rows, so group
    estimates add up to the total exactly (up to float64 rounding).
    """

    def __init__(self, A: CurvatureOperator) -> None:
        self.names = list(A.groups)
        self.slices = [A.groups[name] for name in self.names]
        spans = []
        for name, sl in zip(self.names, self.slices):
            start, stop, step = sl.indices(A.size)
            if step != 1:
                raise InputError(f"operator group {name!r}: expected a contiguous slice, got step {step}")
            spans.append((start, stop))
        spans.sort()
        edges = [0] + [s for span in spans for s in span] + [A.size]
        self.partition = all(edges[i] == edges[i + 1] for i in range(0, len(edges), 2))

    @property
    def several(self) -> bool:
        """Whether per-group results are reported (more than one group)."""
        return len(self.names) > 1

    def __call__(self, P: Tensor) -> Tensor:
        """Return ``[G + 1, b]`` float64 sums of ``P`` over each group's rows and over all rows."""
        rows = [P[sl].sum(0).to(torch.float64) for sl in self.slices]
        total = torch.stack(rows).sum(0) if self.partition else P.sum(0).to(torch.float64)
        return torch.stack([*rows, total])


def summarise(samples: Tensor, confidence: float) -> tuple[float, float, float, float]:
    """Mean, standard error and skewness-corrected t interval of 1-D float64 ``samples``.

    Hutchinson samples ``zᵀ A z`` are skewed whenever a few eigenvalues dominate the trace
    (a quadratic form in a near-Gaussian vector behaves like a weighted sum of ``χ²₁``
    variables, skewness up to ``2√2``), and a Student-t interval then misses the truth far
    more often than it says, almost always from below. The interval here is Hall's (1992,
    "On the removal of skewness by transformation", JRSS B 54) transformation of the
    t statistic ``T = (mean - tr) / stderr``:
    ``g(T) = T + a T² + a² T³ / 3 + b`` with ``a = γ / (3 √n)`` and ``b = γ / (6 √n)``, which
    removes the skewness term of ``T``'s Edgeworth expansion and is monotone, so it inverts in
    closed form. ``γ`` is the sample skewness with the usual small-sample correction
    ``G₁ = g₁ √(n (n - 1)) / (n - 2)``. The interval is
    ``[mean - stderr · g⁻¹(q), mean - stderr · g⁻¹(-q)]`` with ``q`` the Student-t quantile
    (``n - 1`` degrees of freedom). For symmetric samples (``γ = 0``) it is exactly the
    Student-t interval; for right-skewed samples it reaches further up than down.

    Args:
        samples: ``[n]`` independent samples.
        confidence: Interval coverage, e.g. ``0.95``.

    Returns:
        ``(mean, stderr, ci_low, ci_high)``; the error bar is infinite when ``n < 2``, and the
        plain Student-t interval is used for ``n < 5``, where a skewness estimate is mostly
        noise (no interval from so few samples covers skewed spectra at its nominal rate).

    Example:
        >>> m, se, lo, hi = summarise(torch.tensor([1.0, 1.1, 0.9, 1.2, 6.0], dtype=torch.float64), 0.95)
        >>> round(m, 6), hi - m > m - lo  # one large sample: the interval leans upwards
        (2.04, True)
    """
    from scipy.stats import t as student_t

    n = samples.numel()
    mean = float(samples.mean())
    if n < 2:
        return mean, math.inf, -math.inf, math.inf
    se = float(samples.std(correction=1)) / math.sqrt(n)
    q = float(student_t.ppf(0.5 + confidence / 2, n - 1))
    if se == 0 or not math.isfinite(se):
        return mean, se, mean - q * se, mean + q * se
    gamma = 0.0
    if n >= _MIN_SAMPLES_FOR_SKEWNESS:
        d = samples.to(torch.float64) - mean
        m2, m3 = float((d * d).mean()), float((d * d * d).mean())
        gamma = m3 / m2**1.5 * math.sqrt(n * (n - 1)) / (n - 2) if m2 > 0 else 0.0
    a, b = gamma / (3 * math.sqrt(n)), gamma / (6 * math.sqrt(n))
    return mean, se, mean - se * _hall_inverse(q, a, b), mean - se * _hall_inverse(-q, a, b)


def _hall_inverse(u: float, a: float, b: float) -> float:
    """Solve ``t + a t² + a² t³ / 3 + b = u`` for ``t``: ``((1 + 3a (u - b))^(1/3) - 1) / a``."""
    v = u - b
    if abs(a) < 1e-12:
        return v
    x = 3 * a * v
    if x > -1:
        return math.expm1(math.log1p(x) / 3) / a  # accurate when a (u - b) is small
    return (-((-1 - x) ** (1 / 3)) - 1) / a  # the real cube root of a negative number


def trace_result(
    samples: Tensor,
    groups: GroupSums,
    confidence: float,
    *,
    offset: Tensor | None,
    method: str,
    n_probes: int,
    n_hvp: int,
    converged: bool = True,
) -> TraceResult:
    """Build a :class:`TraceResult` from ``[G + 1, n]`` samples plus a deterministic offset.

    Args:
        samples: Per-probe samples, one row per group then the total (float64, CPU).
        groups: The group layout the rows follow.
        confidence: Interval coverage.
        offset: ``[G + 1]`` exact part added to each row's mean (Hutch++), or ``None``.
        method: ``TraceResult.method``.
        n_probes: Vectors multiplied by the operator.
        n_hvp: Products this call spent.
        converged: Whether a requested tolerance was met.

    Returns:
        The result, with per-group traces when there is more than one group.
    """
    shift = [0.0] * samples.shape[0] if offset is None else [float(x) for x in offset.cpu()]
    rows = []
    for i in range(samples.shape[0]):
        mean, se, lo, hi = summarise(samples[i], confidence)
        rows.append((mean + shift[i], se, lo + shift[i], hi + shift[i]))
    group_rows: tuple[GroupTrace, ...] = ()
    if groups.several:
        group_rows = tuple(GroupTrace(name, *row) for name, row in zip(groups.names, rows))
    estimate, se, lo, hi = rows[-1]
    logger.debug("%s trace %.6g ± %.3g from %d vectors", method, estimate, se, n_probes)
    return TraceResult(
        estimate=estimate, stderr=se, ci_low=lo, ci_high=hi, n_probes=n_probes,
        method=method, n_hvp=n_hvp, groups=group_rows, converged=converged,
    )


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}={value!r}: expected a positive integer")


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise InputError(f"confidence={confidence}: expected a coverage strictly between 0 and 1, e.g. 0.95")


def _check_tol(tol: float | None) -> None:
    if tol is not None and not tol > 0:
        raise InputError(f"tol={tol}: expected a positive relative standard error such as 0.01, or None")
