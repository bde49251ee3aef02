"""Curvature logging from a training loop, into the same tables a post-hoc scan writes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hesscli.analyses import REGISTRY
from hesscli.config import Settings
from hesscli.errors import InputError
from hesscli.results.records import Outcome
from hesscli.runner import CheckpointRunner


class CurvatureMonitor:
    """Compute curvature analyses every ``every`` steps of a plain PyTorch loop.

    Rows (with the step) are appended to the Parquet tables under ``out``, exactly as
    ``hesscli scan`` writes them, so a log written during training and a scan of saved
    checkpoints are read and plotted the same way. The analyses run on a private copy of the
    model (in eval mode and the requested dtype): the model being trained is never changed,
    neither its dtype, parameter values, ``requires_grad``, ``.grad`` nor train/eval mode.

    Args:
        loss: loss name (``"cross_entropy"``, ``"mse"``, ...) or ``callable(outputs, targets)``.
        data: ``(inputs, targets)`` tensors, a torch ``Dataset`` or ``DataLoader`` (the fixed
            dataset whose mean loss is analysed; keep it the same across steps).
        analyses: any registered analyses (``trace``, ``eigs``, ``extremes``, ``density``, ...); one
            Lanczos run serves eigs, extremes and density as in a scan, and an analysis that
            fails is written as a ``failed`` runs row (its error text) without stopping the others.
        every: measure when ``step % every == 0``.
        out: results folder (default ``hesscli-results``).
        name: label written to the ``checkpoint`` column (``"{name}@step={step}"``).
        **options: any :class:`~hesscli.config.Settings` field (``probes``, ``top_k``, ``seed``...).

    Example:
        >>> monitor = CurvatureMonitor("cross_entropy", (X, y), analyses=("trace", "eigs"),
        ...                            every=500, out="hesscli-results", top_k=5)  # doctest: +SKIP
        >>> for step, batch in enumerate(loader):                                  # doctest: +SKIP
        ...     train_step(model, batch)
        ...     monitor.step(model, step)
    """

    def __init__(self, loss: Any, data: Any, *, analyses: Sequence[str] = ("trace", "eigs"), every: int = 500,
                 out: str | Path = "hesscli-results", name: str = "train", **options: Any) -> None:
        unknown = [a for a in analyses if a not in REGISTRY]
        if unknown:
            raise InputError(f"analyses: unknown {unknown}; choose from {', '.join(REGISTRY)}")
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        fields = {f.name for f in dataclasses.fields(Settings)}  # type: ignore[arg-type]
        bad = sorted(set(options) - fields)
        if bad:
            raise InputError(f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
        self.loss, self.data, self.analyses, self.every, self.name = loss, data, tuple(analyses), every, name
        self.settings = Settings(out=Path(out), **options)
        self.runner = CheckpointRunner(self.settings, self.analyses)  # what the backend cannot do fails here
        self.history: list[Outcome] = []

    def step(self, model: nn.Module, step: int, *, force: bool = False) -> list[Outcome]:
        """Measure if ``step`` is due (or ``force``); return the outcomes written (maybe none)."""
        if not force and step % self.every != 0:
            return []
        return self.measure(model, step)

    def measure(self, model: nn.Module, step: int) -> list[Outcome]:
        """Run the analyses now and append their rows to the tables."""
        from hesscli.loading import problem_from_python
        from hesscli.results.parquet import write_outcomes

        problem = problem_from_python(model, self.loss, self.data, self.settings)  # a private copy
        problem.checkpoint.source = f"{self.name}@step={step}"
        problem.checkpoint.step = step
        outcomes = self.runner.run(problem)
        write_outcomes(self.settings.out, outcomes)
        self.history.extend(outcomes)
        return outcomes
