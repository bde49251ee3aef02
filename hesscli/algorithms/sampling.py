"""Random probe vectors drawn from an explicit CPU generator.

Every random number hesscli uses comes from a seeded CPU :class:`torch.Generator`: the
numbers are drawn on the CPU in the operator dtype and then moved to the operator device,
so the same seed gives the same probes on CPU and CUDA. Columns are drawn one at a time,
so the first ``k`` columns of ``probes(n, k + j)`` equal ``probes(n, k)`` from the same
generator state: splitting probes into blocks never changes which numbers are used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hesscli.errors import InputError

__all__ = ["DISTRIBUTIONS", "probes", "check_generator"]

DISTRIBUTIONS = ("rademacher", "normal")
"""Probe distributions: ``rademacher`` (entries ±1) and ``normal`` (standard Gaussian)."""

_ALIASES = {"gaussian": "normal"}


def check_generator(generator: object) -> torch.Generator:
    """Return ``generator`` if it is a CPU :class:`torch.Generator`, else raise.

    Args:
        generator: The object passed as ``generator=``.

    Returns:
        The same generator.

    Raises:
        InputError: If it is not a ``torch.Generator`` on the CPU.
    """
    if not isinstance(generator, torch.Generator):
        raise InputError(
            f"generator: expected a torch.Generator, got {type(generator).__name__}; "
            "pass torch.Generator().manual_seed(seed)"
        )
    if generator.device.type != "cpu":
        raise InputError(
            f"generator: expected a CPU torch.Generator, got one on {generator.device}; "
            "pass torch.Generator().manual_seed(seed) (probes are drawn on the CPU, then moved)"
        )
    return generator


def probes(
    n: int,
    k: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
    distribution: str = "rademacher",
) -> Tensor:
    """Draw ``k`` random probe vectors of length ``n``.

    Both distributions have zero mean and identity covariance, so ``E[z zᵀ] = I`` and
    ``E[zᵀ A z] = tr(A)`` (Hutchinson 1989). Rademacher probes minimise the variance of
    that estimate among such distributions (Hutchinson 1989; Avron & Toledo 2011).

    Args:
        n: Length of each vector.
        k: Number of vectors (columns).
        generator: Seeded CPU generator; advanced by ``n * k`` draws.
        dtype: Floating dtype of the result (the numbers are drawn in this dtype).
        device: Device the result is moved to after drawing on the CPU.
        distribution: ``"rademacher"`` (default) or ``"normal"``.

    Returns:
        Tensor ``[n, k]`` on ``device``.

    Raises:
        InputError: For an unknown distribution, negative sizes or a non-CPU generator.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = probes(4, 2, generator=g, dtype=torch.float64, device="cpu")
        >>> z.shape, bool((z.abs() == 1).all())
        (torch.Size([4, 2]), True)
    """
    check_generator(generator)
    name = _ALIASES.get(distribution, distribution)
    if name not in DISTRIBUTIONS:
        raise InputError(
            f"distribution={distribution!r}: unknown probe distribution; use one of {', '.join(DISTRIBUTIONS)}"
        )
    if n < 0 or k < 0:
        raise InputError(f"probes: sizes must be non-negative, got n={n}, k={k}")
    out = torch.empty(k, n, dtype=dtype)
    for j in range(k):
        if name == "rademacher":
            torch.randint(0, 2, (n,), generator=generator, dtype=dtype, out=out[j])
        else:
            torch.randn(n, generator=generator, dtype=dtype, out=out[j])
    if name == "rademacher":
        out.mul_(2).sub_(1)
    return out.T.contiguous().to(device)
