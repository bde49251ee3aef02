"""Pure linear algebra on a symmetric operator: trace estimators, eigensolver, spectral density.

Every function takes an operator with ``size``, ``dtype``, ``device``, ``groups`` and
``matmat`` (see :mod:`hesscli.operators.base`), an explicit CPU ``torch.Generator`` for any
randomness, and returns a frozen dataclass of :mod:`hesscli.results.records`. Nothing here
knows about models.
"""

from __future__ import annotations

from hesscli.algorithms.exact import dense_matrix, exact_trace
from hesscli.algorithms.hutchinson import hutchinson
from hesscli.algorithms.hutchpp import hutchpp
from hesscli.algorithms.lanczos import WHICH, extremes, lanczos_eigs
from hesscli.algorithms.sampling import DISTRIBUTIONS, check_generator, probes
from hesscli.algorithms.slq import broaden, default_sigma, slq

__all__ = [
    # sampling
    "DISTRIBUTIONS",
    "check_generator",
    "probes",
    # trace estimation
    "hutchinson",
    "hutchpp",
    "exact_trace",
    "dense_matrix",
    # eigenvalues
    "WHICH",
    "lanczos_eigs",
    "extremes",
    # spectral density
    "slq",
    "broaden",
    "default_sigma",
]
