"""One checkpoint's analyses, one after another: the step ``hesscli scan`` and the monitor share.

A :class:`CheckpointRunner` builds the backend and checks what it can do once, before any
checkpoint; :meth:`CheckpointRunner.run` then analyses one loaded problem, letting one Lanczos
run serve several analyses (:class:`SharedRuns`) and turning any analysis's failure into a
``failed`` runs row so the others still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from hesscli.analyses import get
from hesscli.backends import get_backend
from hesscli.backends.base import Backend, Reduce
from hesscli.errors import HesscliError
from hesscli.loading.problem import Problem
from hesscli.results.records import Outcome

__all__ = ["WarmStarts", "SharedRuns", "CheckpointRunner", "error_text"]

logger = logging.getLogger(__name__)


class WarmStarts:
    """What one checkpoint's runs leave for the same runs on the next checkpoint of a series.

    A scan (or the monitor) analyses checkpoints of one training run whose Hessians change
    slowly; a backend that can use them (the native one) starts each checkpoint's Lanczos run
    from the previous checkpoint's Ritz vectors and its Hutch++ sketch from the previous
    products ``A Q``. Items are kept under a key naming the run (the analysis and the options
    that shape it) and are only handed out for an operator of the same size; anything else
    starts cold. Warm starts change where a run starts, never what it reports: bounds and
    flags are measured on each checkpoint as in a cold run.
    """

    def __init__(self) -> None:
        self._items: dict[object, Any] = {}

    def get(self, key: object, size: int) -> Any:
        """What the last run under ``key`` left, when it was for an operator of ``size``, else ``None``."""
        item = self._items.get(key)
        return item[1] if item is not None and item[0] == size else None

    def take(self, key: object, size: int) -> Any:
        """:meth:`get`, handing the item over (it is forgotten here: the taker may overwrite it)."""
        value = self.get(key, size)
        self._items.pop(key, None)
        return value

    def put(self, key: object, size: int, value: Any) -> None:
        """Leave ``value`` (or forget ``key`` when ``None``) for the next checkpoint."""
        if value is None:
            self._items.pop(key, None)
        else:
            self._items[key] = (size, value)


class SharedRuns:
    """Work one analysis of a problem leaves for another analysis of the same problem.

    Made for one problem (one checkpoint) and the analyses about to run on it, with their
    options; a backend that can share (the native one) reads what is planned and puts and
    takes results under a key that must match (e.g. the same ``tol``), so nothing is served
    to another problem or to different options.
    """

    def __init__(self, problem: Problem, planned: dict[str, Any], warm: WarmStarts | None = None) -> None:
        self.problem = problem
        self.warm = warm  # what the previous checkpoint of a series left (None: start cold)
        self._planned = dict(planned)
        self._items: dict[str, tuple[object, object]] = {}

    def planned(self, analysis: str, problem: Problem) -> Any:
        """The options of ``analysis`` when it is about to run on ``problem``, else ``None``."""
        return self._planned.get(analysis) if problem is self.problem else None

    def put(self, analysis: str, problem: Problem, key: object, value: object) -> None:
        """Leave ``value`` for ``analysis`` (only when it is planned on this problem)."""
        if self.planned(analysis, problem) is not None:
            self._items[analysis] = (key, value)

    def take(self, analysis: str, problem: Problem, key: object) -> Any:
        """What was left for ``analysis`` under ``key`` (once), else ``None``."""
        item = self._items.get(analysis)
        if problem is not self.problem or item is None or item[0] != key:
            return None
        del self._items[analysis]
        return item[1]


def error_text(error: BaseException) -> str:
    """The one line a failed run records: hesscli's own message, else the exception type and text."""
    return str(error) if isinstance(error, HesscliError) else f"{type(error).__name__}: {error}"


class CheckpointRunner:
    """Runs the selected analyses on one checkpoint after another with one backend.

    Args:
        settings: resolved settings (each analysis reads its own options).
        analyses: names of registered analyses, in the order they run.
        reduce: all-reduce for products under torch.distributed.
        on_matvecs: product-count callback.

    Checkpoints are analysed as a series: unless ``settings.warm_start`` is off, each one's
    Lanczos and Hutch++ runs start from what the previous checkpoint's left (:class:`WarmStarts`).

    Raises:
        InputError: an unknown analysis or something the backend cannot do (before any work).
        BackendUnavailable: the backend's library is missing.
    """

    def __init__(self, settings: Any, analyses: Sequence[str], *, reduce: Reduce | None = None,
                 on_matvecs: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.analyses = [get(a) for a in analyses]
        self.reduce = reduce
        self.backend: Backend = get_backend(settings.engine, reduce=reduce, on_matvecs=on_matvecs)
        self.options = {a.name: a.defaults_for(self.backend, a.options(settings)) for a in self.analyses}
        self.warm = WarmStarts() if getattr(settings, "warm_start", True) else None
        for a in self.analyses:  # refuse what the backend cannot do before touching any checkpoint
            a.validate(self.options[a.name])
            a.check(self.backend, self.options[a.name], settings.curvature)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.analyses]

    def resume_keys(self, sha256: str) -> dict[str, tuple[str, str, str]]:
        """``(checkpoint content, analysis, options)`` of each analysis: what ``--resume`` matches."""
        spec, engine = self.settings.problem, self.settings.engine
        return {a.name: (sha256, a.name, a.resume_key(spec, engine, self.options[a.name])) for a in self.analyses}

    def failed(self, checkpoint: str, analyses: Sequence[str], error: BaseException | str, *, sha256: str = "",
               step: int | None = None, problem: Problem | None = None) -> list[Outcome]:
        """``failed`` runs rows for ``analyses`` of a checkpoint that could not be analysed."""
        from hesscli.api import failed_outcome

        text = error if isinstance(error, str) else error_text(error)
        return [failed_outcome(checkpoint, a, self.settings, text, sha256=sha256, step=step, problem=problem,
                               backend=self.backend) for a in analyses]

    def run(self, problem: Problem, analyses: Sequence[str] | None = None) -> list[Outcome]:
        """Analyse one loaded checkpoint; an analysis that fails becomes a ``failed`` row.

        Args:
            problem: the checkpoint, loaded.
            analyses: a subset of the runner's analyses (default: all of them), in its order.
        """
        from hesscli.api import analyse

        todo = [a for a in self.names if analyses is None or a in analyses]
        shared = SharedRuns(problem, {a: self.options[a] for a in todo}, warm=self.warm)
        outcomes: list[Outcome] = []
        ck = problem.checkpoint
        for name in todo:
            try:
                outcomes.append(analyse(problem, name, self.settings, reduce=self.reduce, backend=self.backend,
                                        shared=shared))
            except Exception as e:  # noqa: BLE001 - one analysis never stops the others
                logger.debug("%s on %s failed", name, ck.source, exc_info=True)
                outcomes += self.failed(ck.source, [name], e, sha256=ck.sha256, step=ck.step, problem=problem)
        return outcomes
