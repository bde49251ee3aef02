"""``landscape``: the mean loss (and accuracy) on a 1-D or 2-D grid around the checkpoint.

Directions are unit Hessian (or GGN) eigenvectors of the largest eigenvalues (computed in the
same run, or read from an earlier ``--save-vectors`` file) or seeded Gaussian directions,
filter-normalised as in Li et al. 2018 (common random numbers: the same seed gives the same
raw directions on every checkpoint of a scan). See :mod:`hesscli.algorithms.landscape`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hesscli.analyses.base import Analysis, columns
from hesscli.analyses.eigs import lanczos_budget, lanczos_max_iter, lanczos_tol, save_vectors
from hesscli.errors import InputError, UnsupportedAnalysis
from hesscli.options import ANALYSIS, option

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import torch
    from rich.console import RenderableType

    from hesscli.backends.base import Backend
    from hesscli.loading.problem import Problem
    from hesscli.results.records import LandscapeResult, RunInfo
    from hesscli.runner import SharedRuns


@dataclass(frozen=True)
class LandscapeOptions:
    directions: str = option("random", choices=("random", "eigs"), metavar="random|eigs", panel=ANALYSIS, help=(
        "random (default): seeded Gaussian directions, normalised per --normalize | eigs: unit Hessian (GGN) "
        "eigenvectors of the largest eigenvalues (computed in this run, or read with --vectors)."))
    dims: int = option(1, choices=(1, 2), metavar="1|2", panel=ANALYSIS,
                       help="1 (default): a line along each direction | 2: the plane of two directions.")
    steps: int = option(21, minimum=2, metavar="N", panel=ANALYSIS,
                        help="Grid points per axis over [-span, span]. Default 21.")
    span: float = option(1.0, positive=True, minimum=0.0, metavar="S", panel=ANALYSIS,
                         help="Half-width of the grid in units of the direction. Default 1.")
    normalize: str | None = option(None, choices=("filter", "layer", "none"), metavar="filter|layer|none",
                                   panel=ANALYSIS, help=(
        "Random directions: filter (default, Li et al. 2018: each filter scaled to the weights' filter norm) | "
        "layer (each tensor to the weights' norm) | none. Eigenvectors are unit vectors and are not rescaled."))
    ignore: str | None = option(None, choices=("bias-bn",), metavar="bias-bn", panel=ANALYSIS, help=(
        "bias-bn: leave biases and BatchNorm/LayerNorm parameters (tensors of at most one dimension) "
        "unperturbed."))
    vectors: str | None = option(None, metavar="FILE", panel=ANALYSIS, help=(
        "--directions eigs: read the eigenvectors from a file written by eigs --save-vectors (OUT/vectors/"
        "RUN_ID.pt) instead of computing them."))
    tol: float | None = lanczos_tol()
    max_iter: int | None = lanczos_max_iter()
    save_vectors: bool = save_vectors()


def n_points(options: LandscapeOptions) -> int:
    """Grid points evaluated, the centre included."""
    return int(options.steps ** options.dims) + 1


class Landscape(Analysis):
    name = "landscape"
    Options = LandscapeOptions
    summary = "Loss (and accuracy) on a 1-D or 2-D grid along Hessian eigenvectors or filter-normalised random directions."
    description = ("One forward pass over the data per grid point, several points batched per call. "
                   "`hesscli plot` draws landscape_1d.png and landscape_2d.png.")
    example = "hesscli landscape ckpt.pt --directions eigs --dims 2 --steps 21 --span 0.5"
    tables = ("landscape",)
    result_type = "hesscli.results.records:LandscapeResult"
    default_method = "grid"
    in_scan = True
    progress_unit = "products + grid points"

    def method(self, backend: Backend | None, options: LandscapeOptions) -> str:
        return f"grid-{options.directions}"

    def validate(self, options: LandscapeOptions) -> None:
        if options.vectors is not None and options.directions != "eigs":
            raise InputError("--vectors reads eigenvectors: use it with --directions eigs")
        if options.directions == "eigs" and (options.normalize is not None or options.ignore is not None):
            raise InputError("--normalize and --ignore rescale random directions; eigenvectors are unit vectors: "
                             "drop them or use --directions random")

    def check(self, backend: Backend, options: LandscapeOptions, curvature: str) -> None:
        self.validate(options)
        if options.directions == "eigs" and options.vectors is None:
            caps = backend.capabilities
            if "eigs" not in caps.analyses or "largest" not in caps.whiches:
                raise UnsupportedAnalysis(f"--backend {backend.name} cannot compute the eigenvectors of "
                                          "landscape --directions eigs; use --backend native or --directions random")
            if curvature not in caps.curvatures:
                raise UnsupportedAnalysis(f"--backend {backend.name} cannot use --curvature {curvature}; it "
                                          f"supports: {', '.join(caps.curvatures)}")

    def expected_products(self, options: LandscapeOptions, n_params: int) -> int:
        eigs = lanczos_budget(options.dims, options.max_iter, n_params) if self._computes_eigs(options) else 0
        return eigs + n_points(options)

    @staticmethod
    def _computes_eigs(options: LandscapeOptions) -> bool:
        return options.directions == "eigs" and options.vectors is None

    # ------------------------------------------------------------------ computing
    def _eigenvectors(self, backend: Backend, problem: Problem, options: LandscapeOptions,
                      generator: torch.Generator) -> tuple[torch.Tensor, tuple[float, ...] | None, int]:
        """``([k, P] unit directions, their eigenvalues, products spent)``."""
        import torch

        if options.vectors is not None:
            try:
                saved = torch.load(options.vectors, map_location="cpu", weights_only=True)
                vectors, values = saved["eigenvectors"], saved["eigenvalues"]
            except (OSError, RuntimeError, KeyError, TypeError) as e:
                raise InputError(f"--vectors {options.vectors}: not a file written by --save-vectors ({e})") from e
            largest = [i for i, w in enumerate(saved.get("which", ())) if w == "largest"][: options.dims]
            if vectors.ndim != 2 or vectors.shape[0] != problem.n_params or len(largest) < options.dims:
                raise InputError(f"--vectors {options.vectors}: holds {len(largest)} eigenvectors of the largest "
                                 f"eigenvalues of length {vectors.shape[0] if vectors.ndim == 2 else '?'}; this "
                                 f"problem needs {options.dims} of length {problem.n_params} (eigs --which largest "
                                 f"or both, --top-k {options.dims} or more, the same --params)")
            d = vectors[:, largest].T.to(problem.device, problem.dtype)
            d = d / d.norm(dim=1, keepdim=True)
            curvatures, n_hvp = self._curvatures(backend, problem, d, [float(values[i]) for i in largest],
                                                 str(saved.get("checkpoint", "")))
            return d, curvatures, n_hvp
        from hesscli.analyses.eigs import EigsOptions

        wanted = EigsOptions(top_k=options.dims, which="largest", tol=options.tol, max_iter=options.max_iter,
                             save_vectors=True)
        r = backend.eigs(problem, wanted, generator)
        if r.eigenvectors is None:  # pragma: no cover - every backend returns vectors when asked
            raise UnsupportedAnalysis(f"--backend {backend.name} returned no eigenvectors")
        d = r.eigenvectors.T.to(problem.device, problem.dtype)
        return d / d.norm(dim=1, keepdim=True), tuple(r.eigenvalues), int(r.n_hvp)

    @staticmethod
    def _curvatures(backend: Backend, problem: Problem, d: torch.Tensor, saved: list[float],
                    source: str) -> tuple[tuple[float, ...] | None, int]:
        """The curvature ``dᵀ H d`` along each read direction at *this* checkpoint (the native
        engine: one product each), so the quadratic model is this checkpoint's; other backends keep
        the saved eigenvalues only when the file was computed from this checkpoint."""
        from hesscli.results.fileops import path_text

        operator = getattr(backend, "operator", None)
        if backend.name == "native" and operator is not None:
            Hd = operator(problem).matmat(d.T)
            return tuple(float(v) for v in (d.T * Hd).sum(0)), int(d.shape[0])
        return (tuple(saved) if source == path_text(problem.checkpoint.source) else None), 0

    def run(self, backend: Backend, problem: Problem, options: LandscapeOptions, generator: torch.Generator,
            shared: SharedRuns | None = None) -> LandscapeResult:
        import torch

        from hesscli.algorithms.landscape import evaluate_grid, grid, random_directions

        on_matvecs = getattr(backend, "on_matvecs", None)
        if options.directions == "eigs":
            directions, eigenvalues, n_hvp = self._eigenvectors(backend, problem, options, generator)
            normalize = "none"
        else:
            normalize = options.normalize or "filter"
            directions = torch.stack(random_directions(problem.params, options.dims, generator,
                                                       normalize=normalize, ignore=options.ignore))
            eigenvalues, n_hvp = None, 0
        alphas, betas = grid(options.span, options.steps, options.dims)

        def progress(n: int) -> None:
            if on_matvecs is not None:
                on_matvecs(n_hvp + n)

        result = evaluate_grid(problem, directions, alphas, betas, reduce=getattr(backend, "reduce", None),
                               on_progress=progress, direction_kind=options.directions, normalize=normalize,
                               eigenvalues=eigenvalues)
        return dataclasses.replace(result, n_hvp=n_hvp)

    # ------------------------------------------------------------------ results
    def schemas(self) -> dict[str, pa.Schema]:
        return {"landscape": columns(direction_kind=str, normalize=str, direction=int, alpha=float, beta=float,
                                     loss=float, accuracy=float, center_loss=float, eigenvalue_1=float,
                                     eigenvalue_2=float, n_forward=int)}


    def rows(self, run: RunInfo, r: LandscapeResult) -> dict[str, list[dict[str, Any]]]:
        from hesscli.results.landscape_plots import landscape_rows

        rows = landscape_rows(r, run_id=run.run_id, checkpoint=run.checkpoint, step=run.step)
        return {"landscape": [{**row, "n_forward": int(r.n_forward)} for row in rows]}

    def render(self, r: LandscapeResult) -> RenderableType:
        import torch
        from rich.text import Text

        from hesscli.results.render import kv, num, sparkline

        loss = r.loss.detach().to("cpu", torch.float64)
        lines: list[tuple[str, RenderableType | str]] = [
            ("directions", f"{r.direction_kind}" + (f" ({r.normalize})" if r.direction_kind == "random" else "")
             + (" · λ = " + ", ".join(num(v, ".4g") for v in r.eigenvalues) if r.eigenvalues else "")),
            ("grid", f"{r.dims}-D · {len(r.alphas)} steps over [{num(float(r.alphas[0]))}, {num(float(r.alphas[-1]))}]"
             f" · {r.n_forward:,} forward passes" + (f" · {r.n_hvp:,} HVPs" if r.n_hvp else "")),
            ("loss at θ", Text(num(r.center_loss, ".6g"), style="bold cyan")),
        ]
        if r.center_accuracy is not None:
            lines.append(("accuracy at θ", f"{r.center_accuracy:.2%}"))
        if r.dims == 1:
            for i, row in enumerate(loss):
                values = [float(v) for v in row]
                label = f"loss along d{i + 1}" if r.loss.shape[0] > 1 else "loss along d"
                lines.append((label, Text(sparkline(values), style="cyan")
                              + Text(f"  [{num(min(values))}, {num(max(values))}]", style="dim")))
        else:
            finite = [float(v) for v in loss.reshape(-1) if math.isfinite(float(v))]
            if finite:
                lines.append(("loss range", f"[{num(min(finite))}, {num(max(finite))}]"))
        return kv(lines)
