"""``density``: eigenvalue spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hesscli.analyses.base import Analysis, columns
from hesscli.options import ANALYSIS, option

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import torch
    from rich.console import RenderableType

    from hesscli.results.records import DensityResult, RunInfo

SPARK_WIDTH = 64
"""Characters of the console sparkline."""
FLOOR = 1e-6
"""Below this fraction of the peak the density counts as empty (as on the plots' log axis)."""


@dataclass(frozen=True)
class DensityOptions:
    iters: int = option(80, minimum=2, metavar="M", panel=ANALYSIS, help="Lanczos steps per SLQ run. Default 80.")
    runs: int = option(5, minimum=1, metavar="R", panel=ANALYSIS,
                       help="Independent SLQ runs (random starts). Default 5.")
    sigma: float | None = option(None, minimum=0.0, positive=True, metavar="S", panel=ANALYSIS,
                                 help="Gaussian broadening of the density (default: from the spectrum's range).")
    grid: int = option(1000, minimum=10, metavar="N", panel=ANALYSIS, help="Density grid points. Default 1000.")


def _pooled_max(values: list[float], width: int) -> list[float]:
    """Downsample to ``width`` bins keeping each bin's maximum (isolated outliers stay visible)."""
    n = len(values)
    if n <= width:
        return values
    bins = []
    for b in range(width):
        lo, hi = b * n // width, (b + 1) * n // width
        chunk = [v for v in values[lo:max(hi, lo + 1)] if math.isfinite(v)]
        bins.append(max(chunk) if chunk else math.nan)
    return bins


def _axis(lo: float, hi: float, width: int) -> str:
    """A label line under a sparkline: min at the left, 0 where it falls, max at the right."""
    from hesscli.results.render import num

    left, right = num(lo, ".3g"), num(hi, ".3g")
    line = [" "] * width
    line[: len(left)] = left
    line[width - len(right) :] = right
    if lo < 0 < hi and hi > lo:
        pos = int((0 - lo) / (hi - lo) * (width - 1))
        if len(left) + 1 < pos < width - len(right) - 1:
            line[pos] = "0"
    return "".join(line)


def _matrix(x: torch.Tensor) -> list[list[float]]:
    """``[runs, n]`` (or ``[n]`` for a single run) tensor -> nested float lists."""
    import torch

    t = x.detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    return [[float(v) for v in row] for row in t.tolist()]


class Density(Analysis):
    name = "density"
    Options = DensityOptions
    summary = "Eigenvalue spectral density by stochastic Lanczos quadrature; raw Ritz nodes/weights saved too."
    example = "hesscli density ckpt.pt --iters 80 --runs 5"
    tables = ("density", "ritz")
    result_type = "hesscli.results.records:DensityResult"
    default_method = "slq"

    def expected_products(self, options: DensityOptions, n_params: int) -> int:
        return options.iters * options.runs

    def schemas(self) -> dict[str, pa.Schema]:
        return {"density": columns(grid=float, density=float, sigma=float),
                "ritz": columns(run=int, index=int, node=float, weight=float, alpha=float, beta=float)}


    def rows(self, run: RunInfo, r: DensityResult) -> dict[str, list[dict[str, Any]]]:
        """The broadened curve (``density``) and the nodes, weights and Lanczos coefficients of every
        SLQ run (``ritz``; ``beta`` is null on each run's last index; after deflation each run's
        last ``deflated`` rows are the deflated eigenvalues, weight ``1/n``, ``alpha`` and ``beta`` null)."""
        from hesscli.results.tables import floats, key_columns

        grid, density = floats(r.grid), floats(r.density)
        if len(grid) != len(density):
            raise ValueError(f"density of run {run.run_id}: grid has {len(grid)} points, density {len(density)}")
        key = key_columns(run)
        curve = [{**key, "grid": x, "density": y, "sigma": float(r.sigma)} for x, y in zip(grid, density)]
        nodes, weights, alphas, betas = _matrix(r.nodes), _matrix(r.weights), _matrix(r.alphas), _matrix(r.betas)
        ritz: list[dict[str, Any]] = []
        for i_run, (run_nodes, run_weights) in enumerate(zip(nodes, weights, strict=True)):
            run_alphas = alphas[i_run] if i_run < len(alphas) else []
            run_betas = betas[i_run] if i_run < len(betas) else []
            for index, (node, weight) in enumerate(zip(run_nodes, run_weights, strict=True)):
                ritz.append({**key, "run": i_run, "index": index, "node": node, "weight": weight,
                             "alpha": run_alphas[index] if index < len(run_alphas) else None,
                             "beta": run_betas[index] if index < len(run_betas) else None})
        return {"density": curve, "ritz": ritz}

    def render(self, r: DensityResult) -> RenderableType:
        import torch
        from rich.text import Text

        from hesscli.results.render import kv, num, sparkline

        grid = r.grid.detach().to("cpu", torch.float64).reshape(-1).tolist()
        dens = r.density.detach().to("cpu", torch.float64).reshape(-1).tolist()
        nodes = r.nodes if r.nodes.ndim == 2 else r.nodes.reshape(1, -1)
        deflated = int(getattr(r, "deflated", 0))
        n_runs, n_iters = int(nodes.shape[0]), int(nodes.shape[1]) - deflated
        lo, hi = (grid[0], grid[-1]) if grid else (math.nan, math.nan)
        peak = max((v for v in dens if math.isfinite(v)), default=0.0)
        pooled = [v if v >= peak * FLOOR else math.nan for v in _pooled_max(dens, SPARK_WIDTH)]
        width = len(pooled)
        return kv([
            ("log density", Text(sparkline(pooled, log=True), style="cyan")),  # blank below 1e-6 of the peak
            ("λ", Text(_axis(lo, hi, width), style="dim")),
            ("range", f"[{num(lo)}, {num(hi)}]"),
            ("σ", num(r.sigma, ".3g")),
            ("SLQ", f"{n_runs} runs × {n_iters} iters · {r.n_hvp:,} HVPs"
                    + (f" · {deflated} resolved eigenvalues deflated" if deflated else "")),
        ])
