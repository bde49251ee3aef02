"""Exact trace and dense matrix from products with blocks of unit vectors.

``size`` products: affordable only for small operators (tiny models, ``--params`` subsets,
cross-checks of the stochastic estimators).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from hesscli.algorithms.hutchinson import GroupSums, _check_count
from hesscli.operators.base import CurvatureOperator
from hesscli.results.records import GroupTrace, TraceResult

__all__ = ["exact_trace", "dense_matrix"]


def _unit_blocks(A: CurvatureOperator, block_size: int) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, A @ E)`` for consecutive blocks ``E`` of identity columns."""
    _check_count("block_size", block_size)
    for start in range(0, A.size, block_size):
        b = min(block_size, A.size - start)
        E = torch.zeros(A.size, b, dtype=A.dtype, device=A.device)
        E[torch.arange(start, start + b), torch.arange(b)] = 1
        yield start, A.matmat(E)


def exact_trace(A: CurvatureOperator, *, block_size: int = 64) -> TraceResult:
    """Compute ``tr(A)`` exactly from the diagonal, read off ``A @ E`` for unit blocks ``E``.

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``groups``, ``matmat``).
        block_size: Unit vectors per ``matmat`` call (default 64: the operators this is
            meant for are small, so wider blocks cost little memory).

    Returns:
        :class:`TraceResult` with ``method="exact"``, ``stderr=0``, a collapsed interval,
        ``n_probes = size`` and per-group traces (when there is more than one group) from
        the same diagonal.

    Raises:
        InputError: For a non-positive block size.

    Example:
        >>> from hesscli.operators.base import DenseOperator
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, -5.0]], dtype=torch.float64))
        >>> exact_trace(A).estimate
        -3.0
    """
    groups = GroupSums(A)
    before = A.n_matvecs
    diag = torch.empty(A.size, dtype=torch.float64, device=A.device)
    for start, AE in _unit_blocks(A, block_size):
        diag[start:start + AE.shape[1]] = AE[start:start + AE.shape[1]].diagonal()
    sums = [float(x) for x in groups(diag.unsqueeze(1)).squeeze(1).cpu()]
    group_rows: tuple[GroupTrace, ...] = ()
    if groups.several:
        group_rows = tuple(GroupTrace(name, v, 0.0, v, v) for name, v in zip(groups.names, sums))
    total = sums[-1]
    return TraceResult(
        estimate=total, stderr=0.0, ci_low=total, ci_high=total, n_probes=A.size,
        method="exact", n_hvp=A.n_matvecs - before, groups=group_rows,
    )


def dense_matrix(A: CurvatureOperator, *, block_size: int = 64) -> Tensor:
    """Materialise ``A`` as a dense symmetric matrix, ``(A I + (A I)ᵀ) / 2``.

    Symmetrising removes the rounding asymmetry of the products so that
    ``torch.linalg.eigh`` sees an exactly symmetric matrix.

    Args:
        A: Symmetric operator (``size``, ``dtype``, ``device``, ``matmat``).
        block_size: Unit vectors per ``matmat`` call.

    Returns:
        Tensor ``[size, size]`` in ``A.dtype`` on ``A.device`` (``size`` products).

    Raises:
        InputError: For a non-positive block size.
    """
    M = torch.empty(A.size, A.size, dtype=A.dtype, device=A.device)
    for start, AE in _unit_blocks(A, block_size):
        M[:, start:start + AE.shape[1]] = AE
    return (M + M.T) / 2
