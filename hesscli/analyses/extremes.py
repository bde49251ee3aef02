"""``extremes``: λ_max, λ_min, condition number and negative ratio from one Lanczos run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hesscli.analyses.base import Analysis, columns
from hesscli.analyses.eigs import lanczos_budget, lanczos_max_iter, lanczos_tol
from hesscli.errors import UnsupportedAnalysis

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from rich.console import RenderableType

    from hesscli.backends.base import Backend
    from hesscli.results.records import ExtremesResult, RunInfo


@dataclass(frozen=True)
class ExtremesOptions:
    tol: float | None = lanczos_tol()
    max_iter: int | None = lanczos_max_iter()


class Extremes(Analysis):
    name = "extremes"
    Options = ExtremesOptions
    summary = "λ_max, λ_min (negative when the Hessian is indefinite), condition number, negative ratio."
    example = "hesscli extremes ckpt.pt --dtype float64"
    tables = ("extremes",)
    result_type = "hesscli.results.records:ExtremesResult"
    default_method = "lanczos"

    def check(self, backend: Backend, options: ExtremesOptions, curvature: str) -> None:
        super().check(backend, options, curvature)
        if "smallest" not in backend.capabilities.whiches:
            raise UnsupportedAnalysis(
                f"--backend {backend.name} cannot compute the smallest eigenvalue needed by 'extremes'")

    def expected_products(self, options: ExtremesOptions, n_params: int) -> int:
        return lanczos_budget(2, options.max_iter, n_params)

    def schemas(self) -> dict[str, pa.Schema]:
        return {"extremes": columns(lambda_max=float, lambda_min=float, condition_number=float,
                                    negative_ratio=float, residual_max=float, residual_min=float, converged=bool)}


    def rows(self, run: RunInfo, r: ExtremesResult) -> dict[str, list[dict[str, Any]]]:
        from hesscli.results.tables import key_columns

        return {"extremes": [{
            **key_columns(run), "lambda_max": float(r.lambda_max), "lambda_min": float(r.lambda_min),
            "condition_number": float(r.condition_number), "negative_ratio": float(r.negative_ratio),
            "residual_max": float(r.residual_max), "residual_min": float(r.residual_min),
            "converged": bool(r.converged)}]}

    def render(self, r: ExtremesResult) -> RenderableType:
        from rich.text import Text

        from hesscli.results.render import kv, num, tick

        return kv([
            ("λ_max", Text.assemble((num(r.lambda_max, ".6g"), "bold cyan"), f"  (residual {num(r.residual_max, '.2e')})")),
            ("λ_min", Text.assemble((num(r.lambda_min, ".6g"), "bold cyan"), f"  (residual {num(r.residual_min, '.2e')})")),
            ("condition number", num(r.condition_number)),
            ("negative ratio", num(r.negative_ratio, ".4g")),
            ("converged", tick(r.converged)),
            ("HVPs", f"{r.n_hvp:,}"),
        ])
