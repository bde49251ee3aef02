"""Dense symmetric matrices with known spectra, for the algorithm tests."""

from __future__ import annotations

import torch

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def symmetric(eigs, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Qᵀ`` with a random orthogonal ``Q``."""
    eigs = torch.as_tensor(eigs, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen(1000 + seed), dtype=F64))
    return (Q * eigs) @ Q.T
