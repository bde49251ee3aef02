"""Symmetric linear operators that the algorithms multiply with.

An algorithm only needs ``size``, ``dtype``, ``device`` and ``matmat``; it never sees a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from hesscli.errors import AnalysisError


class CurvatureOperator:
    """Base class: a symmetric ``size x size`` matrix available through products.

    Subclasses implement :meth:`_matmat` on a ``[size, k]`` block. The public
    :meth:`matmat` checks shapes, dtype and device, and counts products in
    :attr:`n_matvecs` (one per column; this feeds the ``n_hvp`` column).

    Attributes:
        on_matvecs: optional callback receiving the running product count after each
            :meth:`matmat` (progress bars).
        groups: ``name -> slice`` of the flat vector for each parameter tensor
            (used for per-parameter-tensor traces). Dense operators have one group.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device,
                 groups: Mapping[str, slice] | None = None) -> None:
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.groups: dict[str, slice] = dict(groups) if groups else {"all": slice(0, self.size)}
        self.n_matvecs = 0
        self.on_matvecs: Callable[[int], None] | None = None

    def describe(self) -> str:
        """What the operator is, for messages."""
        return f"{type(self).__name__}, {self.size:,} parameters"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for ``V`` of shape ``[size, k]`` (or ``[size]``)."""
        squeeze = V.ndim == 1
        if squeeze:
            V = V.unsqueeze(1)
        if V.ndim != 2 or V.shape[0] != self.size:
            raise ValueError(f"expected a tensor of shape ({self.size},) or ({self.size}, k), got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat(V) if V.shape[1] else V.clone()
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(V).all()):  # V checked only on a failure
            raise AnalysisError(
                f"curvature products are not finite (NaN or Inf) at this point ({self.describe()}): the loss's "
                "second derivatives overflow or are undefined here (e.g. |x|^p with p < 2 at 0, sqrt at 0); "
                "check the model and loss, or try --dtype float64")
        self.n_matvecs += V.shape[1]
        if self.on_matvecs is not None:
            self.on_matvecs(self.n_matvecs)
        return out.squeeze(1) if squeeze else out

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for ``v`` of shape ``[size]``."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matmat(V)

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class DenseOperator(CurvatureOperator):
    """An explicit symmetric matrix: for tests, tiny models and ``exact`` methods."""

    def __init__(self, matrix: Tensor, groups: Mapping[str, slice] | None = None) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device, groups)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V
