"""Curvature logging from a training loop, into the same tables a post-hoc scan writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from hesscli.api import ANALYSES, analyse
from hesscli.config import Settings
from hesscli.errors import InputError
from hesscli.results.records import Outcome


class CurvatureMonitor:
    """Compute curvature analyses every ``every`` steps of a plain PyTorch loop.

    Rows (with the step) are appended to the Parquet tables under ``out``, exactly as
    ``hesscli scan`` writes them, so a log written during training and a scan of saved
    checkpoints are read and plotted the same way. The model's train/eval mode is restored
    after each measurement; nothing else about it is changed.

    Args:
        loss: loss name (``"cross_entropy"``, ``"mse"``, ...) or ``callable(outputs, targets)``.
        data: ``(inputs, targets)`` tensors, a torch ``Dataset`` or ``DataLoader`` (the fixed
            dataset whose mean loss is analysed; keep it the same across steps).
        analyses: any of ``trace``, ``eigs``, ``extremes``, ``density``.
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
        unknown = [a for a in analyses if a not in ANALYSES]
        if unknown:
            raise InputError(f"analyses: unknown {unknown}; choose from {', '.join(ANALYSES)}")
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        fields = {f.name for f in dataclasses.fields(Settings)}
        bad = sorted(set(options) - fields)
        if bad:
            raise InputError(f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
        self.loss, self.data, self.analyses, self.every, self.name = loss, data, tuple(analyses), every, name
        self.settings = Settings(out=Path(out), **options)
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

        from hesscli.loading.batchnorm import batchnorm_layers

        was_training = model.training
        tracking = [(m, m.track_running_stats) for m in batchnorm_layers(model)]
        try:
            problem = problem_from_python(model, self.loss, self.data, self.settings)
            problem.checkpoint.source = f"{self.name}@step={step}"
            problem.checkpoint.step = step
            outcomes = [analyse(problem, a, self.settings) for a in self.analyses]
        finally:
            model.train(was_training)
            for m, track in tracking:  # --batchnorm batch switches tracking off while it measures
                m.track_running_stats = track
        write_outcomes(self.settings.out, outcomes)
        self.history.extend(outcomes)
        return outcomes
