"""Curvature logging from a Lightning ``Trainer``: :class:`CurvatureCallback` wraps :class:`CurvatureMonitor`.

Rows go to the same Parquet tables that ``hesscli scan`` writes, labelled ``{name}@step={N}``
with the trainer's ``global_step``, so a log written during training and a scan of the saved
``.ckpt`` files are read and plotted the same way. Needs ``lightning`` or ``pytorch-lightning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hesscli.errors import InputError
from hesscli.monitor import CurvatureMonitor
from hesscli.results.records import Outcome

try:  # the unified package first; the standalone one has the same Callback API
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on which package is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("hesscli.lightning needs Lightning: pip install lightning (or pytorch-lightning)") from e

__all__ = ["CurvatureCallback"]


class CurvatureCallback(Callback):  # type: ignore[misc]
    """Measure curvature of the LightningModule every ``every`` optimizer steps.

    Args:
        loss: loss name (``"cross_entropy"``, ``"causal_lm"``, ...) or ``callable(outputs, targets)``.
        data: the fixed dataset whose mean loss is analysed (``(inputs, targets)``, a Dataset or a
            DataLoader, dict samples included); keep it the same across steps.
        analyses: any of ``trace``, ``eigs``, ``extremes``, ``density``.
        every: measure when ``trainer.global_step % every == 0`` (after that optimizer step).
        at_end: also measure when training ends (unless that step was just measured).
        out: results folder.
        name: label written to the ``checkpoint`` column.
        **options: any :class:`~hesscli.config.Settings` field (``probes``, ``top_k``, ``seed``, ...).

    Example:
        >>> trainer = Trainer(callbacks=[CurvatureCallback("cross_entropy", (X, y), every=100)])  # doctest: +SKIP
    """

    def __init__(self, loss: Any, data: Any, *, analyses: Sequence[str] = ("trace", "eigs"), every: int = 500,
                 at_end: bool = True, out: str | Path = "hesscli-results", name: str = "train",
                 **options: Any) -> None:
        super().__init__()
        self.monitor = CurvatureMonitor(loss, data, analyses=analyses, every=every, out=out, name=name, **options)
        self.at_end = at_end
        self._last: int | None = None

    @property
    def history(self) -> list[Outcome]:
        """Every outcome written so far."""
        return self.monitor.history

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        if getattr(trainer, "world_size", 1) > 1:
            raise InputError("CurvatureCallback measures in one process; with several training processes run "
                             "'torchrun -m hesscli scan' on the saved checkpoints instead")

    def _measure(self, pl_module: Any, step: int) -> None:
        if step == self._last:
            return  # gradient accumulation: several batches end on the same optimizer step
        self._last = step
        self.monitor.measure(pl_module, step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step > 0 and step % self.monitor.every == 0:
            self._measure(pl_module, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.at_end:
            self._measure(pl_module, int(trainer.global_step))
