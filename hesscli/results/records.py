"""Result dataclasses. Tables, Parquet and Rich rendering all start from these.

The engine returns them; only ``hesscli.results`` turns them into rows or text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RunInfo:
    """Provenance of one analysis of one checkpoint: one row of the ``runs`` table."""

    run_id: str
    checkpoint: str
    checkpoint_sha256: str
    step: int | None
    analysis: str  # trace | eigs | extremes | density
    backend: str
    method: str
    curvature: str
    device: str
    dtype: str
    seed: int
    n_params: int
    n_samples: int
    loss_value: float | None
    n_hvp: int
    seconds: float
    hesscli_version: str
    torch_version: str
    started_at: str  # ISO 8601, UTC
    status: str = "ok"  # ok | failed
    error: str | None = None
    options: str = ""  # canonical JSON of the analysis options (used by scan --resume)


@dataclass(frozen=True)
class GroupTrace:
    """Trace of the diagonal block of one parameter tensor (``param_group`` rows)."""

    name: str
    estimate: float
    stderr: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class TraceResult:
    """Trace estimate with a standard error and a 95% confidence interval.

    ``stderr`` is 0 and the interval collapses for ``method="exact"``.
    ``groups`` holds per-parameter-tensor traces computed from the same probes.
    """

    estimate: float
    stderr: float
    ci_low: float
    ci_high: float
    n_probes: int
    method: str
    n_hvp: int
    groups: tuple[GroupTrace, ...] = ()
    converged: bool = True  # False when --tol was not reached within the budget


@dataclass(frozen=True)
class EigsResult:
    """Eigenvalues with residual norms ``||Hv - lambda v||``, error bounds and convergence flags.

    Entries are ordered: largest first for ``which="largest"``, smallest first for
    ``"smallest"``; ``which`` says which end each entry belongs to and ``rank`` its
    position from that end (1-based). ``error_bounds[i]`` bounds ``|λ - eigenvalues[i]|``
    (empty when a backend cannot say); ``converged[i]`` means that bound is within the
    relative tolerance, or, with ``at_floor[i]`` (the value cannot be told apart from zero),
    within twice the arithmetic ``floor`` (the rounding error of one product).
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    which: tuple[str, ...]
    rank: tuple[int, ...]
    n_hvp: int
    n_iter: int
    eigenvectors: torch.Tensor | None = None  # [n_params, k] when asked for
    error_bounds: tuple[float, ...] = ()
    at_floor: tuple[bool, ...] = ()
    floor: float | None = None


@dataclass(frozen=True)
class ExtremesResult:
    """The two ends of the spectrum."""

    lambda_max: float
    lambda_min: float
    condition_number: float  # |lambda_max| / |lambda_min| (inf when lambda_min == 0)
    negative_ratio: float  # |lambda_min| / lambda_max when lambda_min < 0, else 0
    residual_max: float
    residual_min: float
    converged: bool
    n_hvp: int


@dataclass(frozen=True)
class DensityResult:
    """Spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid, density: the Gaussian-broadened density on an even grid (integrates to ~1).
        nodes, weights: ``[runs, iters]`` Ritz values and quadrature weights (each run sums to 1).
        alphas, betas: ``[runs, iters]`` / ``[runs, iters-1]`` Lanczos coefficients, so a
            density can be re-smoothed without new products.
        sigma: the broadening used.
        deflated: how many resolved eigenvalues were deflated (0: plain SLQ). When ``k > 0``,
            ``nodes``/``weights`` are ``[runs, iters + k]``, their last ``k`` columns the deflated
            values with weight ``1/n_params`` (rows of the ``ritz`` table with a null ``alpha``),
            see :func:`hesscli.algorithms.slq.slq`.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    alphas: torch.Tensor
    betas: torch.Tensor
    sigma: float
    n_hvp: int
    deflated: int = 0


@dataclass(frozen=True)
class LandscapeResult:
    """Mean loss (and accuracy) on a 1-D or 2-D grid of parameter points.

    Attributes:
        alphas: ``[n_α]`` float64 step sizes along the first direction (each direction in 1-D).
        betas: ``[n_β]`` float64 step sizes along the second direction; ``None`` in 1-D.
        loss: float64 mean loss; ``[k, n_α]`` in 1-D (row ``i`` along direction ``i``, so several
            eigenvectors give one line each), ``[n_α, n_β]`` in 2-D (``loss[i, j]`` at
            ``θ + alphas[i]·d₁ + betas[j]·d₂``). Points where the loss overflows hold ``inf``/``nan``.
        accuracy: float64 fraction of correct predictions, shaped like ``loss``; ``None`` when the
            loss has no classes (:func:`hesscli.loading.loss.accuracy_fn`).
        direction_kind: ``eigs`` | ``random`` | ``given``.
        normalize: the normalisation the directions went through (``filter`` | ``layer`` | ``none``).
        eigenvalues: the eigenvalue of each direction for ``eigs`` directions, else ``None``.
        directions: ``[k, P]`` the directions used, on the problem's device and dtype.
        n_forward: parameter points evaluated, each costing one forward pass over the whole
            dataset (every batch once): the grid points plus one for the centre. It does not depend
            on how points were batched into vmapped calls, nor on the number of batches or ranks.
        center_loss: the mean loss at θ (``α = β = 0``), i.e. :func:`hesscli.api.loss_value`.
        center_accuracy: the accuracy at θ; ``None`` without classes.
        n_hvp: curvature products spent finding the directions (``eigs``), else 0.
    """

    alphas: torch.Tensor
    betas: torch.Tensor | None
    loss: torch.Tensor
    accuracy: torch.Tensor | None
    direction_kind: str
    normalize: str
    eigenvalues: tuple[float, ...] | None
    directions: torch.Tensor
    n_forward: int
    center_loss: float
    center_accuracy: float | None = None
    n_hvp: int = 0

    @property
    def eigenvectors(self) -> torch.Tensor:
        """The directions as columns, ``[P, k]`` (the layout ``--save-vectors`` files use)."""
        return self.directions.T

    @property
    def dims(self) -> int:
        """1 for a line (or one line per direction), 2 for a plane."""
        return 1 if self.betas is None else 2


@dataclass(frozen=True)
class Outcome:
    """One analysis of one checkpoint: provenance plus result (``None`` when it failed)."""

    run: RunInfo
    result: TraceResult | EigsResult | ExtremesResult | DensityResult | LandscapeResult | None
    extra: dict[str, Any] = field(default_factory=dict)
