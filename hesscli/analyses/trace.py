"""``trace``: Hessian (or GGN) trace with standard error and 95% CI, plus per-tensor traces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hesscli.analyses.base import Analysis, columns
from hesscli.errors import UnsupportedAnalysis
from hesscli.options import ANALYSIS, option

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from rich.console import RenderableType

    from hesscli.backends.base import Backend
    from hesscli.results.records import RunInfo, TraceResult

TOP_GROUPS = 8
"""Parameter tensors listed in the console panel, largest |trace| first."""


@dataclass(frozen=True)
class TraceOptions:
    method: str | None = option(None, choices=("hutchinson", "hutch++", "exact"), metavar="METHOD", panel=ANALYSIS,
                                help="hutch++ | hutchinson | exact (default: the backend's own; native: hutch++).")
    probes: int = option(100, minimum=1, metavar="N", panel=ANALYSIS,
                         help="Trace budget: probes (hutchinson) or products (hutch++). Default 100.")
    tol: float | None = option(None, key="trace_tol", minimum=0.0, metavar="REL", panel=ANALYSIS, help=(
        "Target stderr/|trace|: a pilot sample plans the probe count (hutch++: its sketch grows only while it "
        "pays for the target, then the residual probes), the estimate averages fresh probes; the --probes budget "
        "caps it. On scan: --trace-tol."))


class Trace(Analysis):
    name = "trace"
    Options = TraceOptions
    summary = "Hessian (or GGN) trace of the mean loss, with standard error and 95% CI, plus per-tensor traces."
    example = "hesscli trace ckpt.pt --model model.py:Net --data data.pt --method hutch++ --probes 200"
    tables = ("trace",)
    result_type = "hesscli.results.records:TraceResult"
    default_method = "default"
    python_example = """
    Example:
        >>> import torch, hesscli
        >>> X = torch.randn(32, 3, dtype=torch.float64); y = torch.randn(32, 1, dtype=torch.float64)
        >>> r = hesscli.trace(torch.nn.Linear(3, 1), "mse", (X, y), method="exact", dtype="float64")
        >>> round(r.estimate, 6) == round(float(2 * ((X**2).sum() / 32 + 1)), 6)
        True
"""

    def defaults_for(self, backend: Backend, options: TraceOptions) -> TraceOptions:
        """``method`` left unset means the backend's own default: the first it lists
        (native and eigenthings: ``hutch++``; PyHessian: ``hutchinson``; BackPACK: ``exact``)."""
        methods = backend.capabilities.analyses.get("trace", ())
        if methods and options.method is None:
            return dataclasses.replace(options, method=methods[0])
        return options

    def check(self, backend: Backend, options: TraceOptions, curvature: str) -> None:
        caps = backend.capabilities
        if self.name in caps.analyses and options.method not in caps.analyses["trace"]:
            raise UnsupportedAnalysis(f"--backend {backend.name} has no trace --method {options.method}; it supports: "
                                      f"{', '.join(caps.analyses['trace'])}")
        super().check(backend, options, curvature)

    def method(self, backend: Backend | None, options: TraceOptions) -> str:
        return options.method or self.default_method

    def expected_products(self, options: TraceOptions, n_params: int) -> int:
        return n_params if options.method == "exact" else options.probes

    def schemas(self) -> dict[str, pa.Schema]:
        return {"trace": columns(param_group=str, estimate=float, stderr=float, ci_low=float, ci_high=float,
                                 n_probes=int, method=str, converged=bool)}


    def rows(self, run: RunInfo, r: TraceResult) -> dict[str, list[dict[str, Any]]]:
        from hesscli.results.tables import TOTAL_GROUP, key_columns

        common = {"n_probes": int(r.n_probes), "method": r.method, "converged": bool(r.converged)}
        groups = [(TOTAL_GROUP, r.estimate, r.stderr, r.ci_low, r.ci_high)]
        groups += [(g.name, g.estimate, g.stderr, g.ci_low, g.ci_high) for g in r.groups]
        return {"trace": [{**key_columns(run), "param_group": name, "estimate": float(est), "stderr": float(se),
                           "ci_low": float(lo), "ci_high": float(hi), **common}
                          for name, est, se, lo, hi in groups]}

    def render(self, r: TraceResult) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from hesscli.results.render import kv, num, tick

        estimate = Text.assemble((num(r.estimate), "bold cyan"))
        if r.stderr:
            estimate.append(f" ± {num(r.stderr, '.2g')}")
        parts: list[RenderableType] = [kv([
            ("trace", estimate),
            ("95% CI", f"[{num(r.ci_low)}, {num(r.ci_high)}]"),
            ("method", f"{r.method} · {r.n_probes:,} probes · {r.n_hvp:,} HVPs"),
            ("converged", tick(r.converged)),
        ])]
        if r.groups:
            ranked = sorted(r.groups, key=lambda g: abs(g.estimate), reverse=True)
            table = Table(box=None, header_style="bold")
            table.add_column("parameter")
            table.add_column("trace", justify="right")
            table.add_column("± stderr", justify="right")
            table.add_column("share", justify="right")
            for g in ranked[:TOP_GROUPS]:
                share = f"{g.estimate / r.estimate:.1%}" if r.estimate else "–"
                table.add_row(g.name, num(g.estimate), num(g.stderr, ".2g"), share)
            parts += [Text(""), Text("per-parameter trace, largest |trace| first", style="bold"), table]
            if len(ranked) > TOP_GROUPS:
                parts.append(Text(f"… and {len(ranked) - TOP_GROUPS} more parameter tensors", style="dim"))
        return Group(*parts)
