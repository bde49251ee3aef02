"""Settings resolved once: built-in defaults < ``hesscli.toml`` < command-line flags.

No other module reads ``hesscli.toml`` or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    """Every option of every command, with its default. Field names match the flags
    (``--batch-size`` -> ``batch_size``)."""

    # inputs
    data: str | None = None
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    loss: str = "cross_entropy"
    batch_size: int = 512
    max_samples: int | None = None
    trust_pickle: bool = False
    # curvature
    curvature: str = "hessian"  # hessian | ggn
    params: tuple[str, ...] = ()
    backend: str = "native"  # native | pyhessian | eigenthings | backpack
    hvp: str = "auto"  # auto | func | autograd  (product path of the native engine)
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    # outputs
    out: Path = Path("hesscli-results")
    json: bool = False
    quiet: bool = False
    debug: bool = False
    # trace
    method: str = "hutch++"  # hutchinson | hutch++ | exact
    probes: int = 100
    tol: float | None = None  # trace: relative stderr target; eigs: residual tolerance
    # eigs / extremes
    top_k: int = 10
    which: str = "largest"  # largest | smallest | both
    max_iter: int | None = None
    save_vectors: bool = False
    # density
    iters: int = 80
    runs: int = 5
    sigma: float | None = None
    grid: int = 1000
    # scan
    analyses: tuple[str, ...] = ("trace", "eigs", "extremes", "density")
    glob: str = "*"
    resume: bool = True
    shard: str | None = None  # "I/N"
