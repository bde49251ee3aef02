"""What an analysis declares: its options, result, tables, console view, cost and backend needs.

Everything else -- the CLI command and its options, the ``hesscli.toml`` section, scan's
``--analyses`` choice and resume key, the Python function ``hesscli.<name>`` -- is generated
from these declarations (see ``docs/architecture.md``). Importing an analysis module must not
import torch: heavy imports go inside the methods.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from hesscli.errors import UnsupportedAnalysis
from hesscli.options import EngineOptions, ProblemSpec, declared, project

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import torch
    from rich.console import RenderableType

    from hesscli.backends.base import Backend
    from hesscli.loading.problem import Problem
    from hesscli.results.records import RunInfo
    from hesscli.runner import SharedRuns

__all__ = ["Analysis", "RESUME_PROBLEM_KEYS", "columns"]

RESUME_PROBLEM_KEYS: tuple[str, ...] = ("backend", "curvature", "params", "loss", "data", "max_samples", "dtype",
                                        "seed")
"""Problem and engine options that change every analysis's numbers (part of every resume key)."""


class Analysis(ABC):
    """Base class of an analysis plug-in; one instance per analysis in :data:`hesscli.analyses.REGISTRY`.

    Class attributes:
        name: the command name and the ``runs.analysis`` value.
        Options: a frozen dataclass of :func:`hesscli.options.option` fields.
        summary: one line for ``hesscli --help`` and the command's help.
        description: more of the command's help (optional).
        example: a command line shown under the command's help.
        python_example: a doctest shown in the docstring of ``hesscli.<name>`` (optional).
        tables: the tables its results fill, in write order.
        result_type: ``module:Class`` of its result dataclass.
        engine_options: the engine options its command offers besides ``--backend``/``--curvature``.
        in_scan: offered by ``hesscli scan --analyses``.
        progress_unit: what the progress bar counts.
        default_method: ``runs.method`` when no backend says otherwise.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    summary: ClassVar[str]
    description: ClassVar[str] = ""
    example: ClassVar[str]
    python_example: ClassVar[str] = ""
    tables: ClassVar[tuple[str, ...]]
    result_type: ClassVar[str]
    engine_options: ClassVar[tuple[str, ...]] = ("hvp", "max_memory")
    in_scan: ClassVar[bool] = True
    progress_unit: ClassVar[str] = "products"

    # ------------------------------------------------------------------ options
    def options(self, settings: Any) -> Any:
        """This analysis's options, taken from resolved settings (or any object holding their keys)."""
        return project(self.Options, settings)

    def defaults_for(self, backend: Backend, options: Any) -> Any:
        """Options with the backend's own defaults filled in (e.g. the trace method)."""
        return options

    def resume_key(self, spec: ProblemSpec, engine: EngineOptions, options: Any) -> str:
        """Canonical JSON of everything that changes this analysis's numbers (scan ``--resume`` key)."""
        values: dict[str, Any] = {k: getattr(spec, k) for k in RESUME_PROBLEM_KEYS if hasattr(spec, k)}
        values.update({k: getattr(engine, k) for k in RESUME_PROBLEM_KEYS if hasattr(engine, k)})
        for key, f, meta in declared(self.Options):
            if meta.resume:
                values[key] = getattr(options, f.name)
        values["params"] = list(values["params"])
        values["analysis"] = self.name
        return json.dumps(values, sort_keys=True, default=str)

    # ------------------------------------------------------------------ backend
    def validate(self, options: Any) -> None:
        """Refuse combinations of options that cannot go together, before anything is loaded
        (single values are checked where they are declared). By default every combination is valid."""
        return None

    def check(self, backend: Backend, options: Any, curvature: str) -> None:
        """Refuse, before any work, what ``backend`` cannot do for these options (exit 2 with what it can)."""
        caps = backend.capabilities
        if self.name not in caps.analyses:
            raise UnsupportedAnalysis(
                f"--backend {backend.name} cannot run '{self.name}'; it supports: {', '.join(caps.analyses)}")
        if curvature not in caps.curvatures:
            raise UnsupportedAnalysis(
                f"--backend {backend.name} cannot use --curvature {curvature}; it supports: {', '.join(caps.curvatures)}")

    def method(self, backend: Backend | None, options: Any) -> str:
        """The method this run really uses (``runs.method``): the backend's own algorithm."""
        if backend is not None and self.name in backend.capabilities.analyses:
            return backend.capabilities.analyses[self.name][0]
        return self.default_method

    default_method: ClassVar[str] = ""

    def run(self, backend: Backend, problem: Problem, options: Any, generator: torch.Generator,
            shared: SharedRuns | None = None) -> Any:
        """Compute the result: by default the backend's method of the same name (given the
        checkpoint's shared runs when the backend can use them)."""
        method = getattr(backend, self.name)
        if shared is not None and getattr(backend, "shares_runs", False):
            return method(problem, options, generator, shared=shared)
        return method(problem, options, generator)

    @abstractmethod
    def expected_products(self, options: Any, n_params: int) -> int:
        """A budget for progress bars (iterative methods may stop earlier)."""
        ...

    # ------------------------------------------------------------------ results
    @abstractmethod
    def schemas(self) -> dict[str, pa.Schema]:
        """Arrow schema of each table in :attr:`tables` (without the ``run_id, checkpoint, step`` key)."""
        ...

    @abstractmethod
    def rows(self, run: RunInfo, result: Any) -> dict[str, list[dict[str, Any]]]:
        """Table rows of one result."""
        ...

    @abstractmethod
    def render(self, result: Any) -> RenderableType:
        """The body of the console panel of one result."""
        ...

    def __repr__(self) -> str:
        return f"<analysis {self.name}>"


def columns(**types: type) -> pa.Schema:
    """An Arrow schema from ``name=type`` pairs (``str``, ``float``, ``int``, ``bool``), in order; every
    column nullable. The ``run_id, checkpoint, step`` key is added by the results layer."""
    import pyarrow as pa

    arrow = {str: pa.string(), float: pa.float64(), int: pa.int64(), bool: pa.bool_()}
    return pa.schema([pa.field(name, arrow[t]) for name, t in types.items()])
