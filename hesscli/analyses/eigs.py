"""``eigs``: largest / smallest eigenvalues (block Lanczos) with error bounds and convergence flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hesscli.analyses.base import Analysis, columns
from hesscli.errors import UnsupportedAnalysis
from hesscli.options import ANALYSIS, option

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from rich.console import RenderableType

    from hesscli.backends.base import Backend
    from hesscli.results.records import EigsResult, RunInfo


def lanczos_tol() -> Any:
    """``tol`` of the Lanczos analyses (eigs, extremes): one key, one meaning."""
    return option(None, minimum=0.0, metavar="REL", panel=ANALYSIS, help=(
        "Lanczos (eigs, extremes, landscape --directions eigs): relative error bound on each eigenvalue (default "
        "1e-4 in float32, 1e-10 in float64; see README, What the flags mean)."))


def lanczos_max_iter() -> Any:
    """``max_iter`` of the Lanczos analyses (eigs, extremes)."""
    return option(None, minimum=1, metavar="N", panel=ANALYSIS,
                  help="Most Lanczos products. Default max(200, 20k); stops earlier once converged.")


def save_vectors() -> Any:
    """``--save-vectors``: the vectors a result was computed from, saved under OUT/vectors/."""
    return option(False, negatable=True, resume=False, panel=ANALYSIS,
                  help="Save the vectors (eigenvectors, directions) to OUT/vectors/<run_id>.pt.")


def lanczos_budget(k: int, max_iter: int | None, n_params: int) -> int:
    from hesscli.algorithms.lanczos import DEFAULT_MAX_ITER

    return min(n_params, max_iter or max(DEFAULT_MAX_ITER, 20 * k))


@dataclass(frozen=True)
class EigsOptions:
    top_k: int = option(10, minimum=1, flags=("-k",), metavar="K", panel=ANALYSIS,
                        help="Number of eigenvalues per end. Default 10.")
    which: str = option("largest", choices=("largest", "smallest", "both"), metavar="largest|smallest|both",
                        panel=ANALYSIS, help="largest (default) | smallest | both.")
    tol: float | None = lanczos_tol()
    max_iter: int | None = lanczos_max_iter()
    save_vectors: bool = save_vectors()


class Eigs(Analysis):
    name = "eigs"
    Options = EigsOptions
    summary = "Largest / smallest eigenvalues (Lanczos, full reorthogonalisation) with residuals and convergence flags."
    example = "hesscli eigs ckpt.pt --top-k 10 --which both"
    tables = ("eigs",)
    result_type = "hesscli.results.records:EigsResult"
    default_method = "lanczos"

    def check(self, backend: Backend, options: EigsOptions, curvature: str) -> None:
        super().check(backend, options, curvature)
        wanted = ("largest", "smallest") if options.which == "both" else (options.which,)
        if any(w not in backend.capabilities.whiches for w in wanted):
            raise UnsupportedAnalysis(f"--backend {backend.name} cannot compute --which {options.which}; it supports: "
                                      f"{', '.join(backend.capabilities.whiches)}")

    def expected_products(self, options: EigsOptions, n_params: int) -> int:
        k = options.top_k * (2 if options.which == "both" else 1)
        return lanczos_budget(k, options.max_iter, n_params)

    def schemas(self) -> dict[str, pa.Schema]:
        return {"eigs": columns(rank=int, which=str, eigenvalue=float, residual=float, converged=bool,
                                error_bound=float, at_floor=bool)}


    def rows(self, run: RunInfo, r: EigsResult) -> dict[str, list[dict[str, Any]]]:
        from hesscli.results.tables import key_columns

        n = len(r.eigenvalues)
        bounds = r.error_bounds if len(r.error_bounds) == n else (None,) * n
        floors = r.at_floor if len(r.at_floor) == n else (None,) * n
        return {"eigs": [
            {**key_columns(run), "rank": int(rank), "which": which, "eigenvalue": float(value),
             "residual": float(residual), "converged": bool(conv),
             "error_bound": None if bound is None else float(bound),
             "at_floor": None if at_floor is None else bool(at_floor)}
            for value, residual, conv, which, rank, bound, at_floor in zip(
                r.eigenvalues, r.residuals, r.converged, r.which, r.rank, bounds, floors, strict=True)
        ]}

    def render(self, r: EigsResult) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from hesscli.results.render import num, tick

        table = Table(box=None, header_style="bold")
        table.add_column("rank", justify="right")
        table.add_column("which")
        table.add_column("eigenvalue", justify="right", style="cyan")
        table.add_column("± bound", justify="right")
        table.add_column("residual", justify="right")
        table.add_column("converged", justify="center")
        n = len(r.eigenvalues)
        bounds = r.error_bounds if len(r.error_bounds) == n else (None,) * n
        floors = r.at_floor if len(r.at_floor) == n else (False,) * n
        for value, residual, conv, which, rank, bound, at_floor in zip(
                r.eigenvalues, r.residuals, r.converged, r.which, r.rank, bounds, floors):
            shown = Text(f"≈0 ({num(value, '.2g')})", style="dim") if at_floor else num(value, ".6g")
            table.add_row(str(rank), which, shown, "—" if bound is None else num(bound, ".1e"),
                          num(residual, ".2e"), tick(bool(conv)))
        n_conv = sum(bool(c) for c in r.converged)
        note = Text(f"{n_conv}/{len(r.converged)} converged · {r.n_iter} iterations · {r.n_hvp:,} HVPs",
                    style="dim" if n_conv == len(r.converged) else "yellow")
        return Group(table, note)
