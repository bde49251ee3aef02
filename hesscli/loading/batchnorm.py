"""BatchNorm during an analysis: running statistics (eval mode, the default) or each batch's own.

A briefly trained network's running averages can be far from its batch statistics, so its
eval-mode loss (what ``--batchnorm running`` analyses) can be orders of magnitude above the loss
it was trained on. :func:`running_statistics_gap` measures that on one batch; ``--batchnorm batch``
normalises every batch with its own statistics instead, without ever updating the running
averages (deterministic; the analysed function then depends on how the data is batched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_layers", "use_batch_statistics", "running_statistics_gap", "GAP_RATIO", "GAP_MIN"]

GAP_RATIO = 2.0
"""Warn when the eval-mode loss is more than this many times the batch-statistics loss ..."""
GAP_MIN = 0.1
"""... and more than this above it (tiny losses differ by large ratios for no reason)."""


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` (1d, 2d, 3d, lazy and sync variants)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def use_batch_statistics(model: nn.Module) -> Callable[[], None]:
    """Make every BatchNorm layer normalise with the current batch's statistics, leaving its running
    averages untouched (training mode with ``track_running_stats=False``: nothing is accumulated).

    Returns:
        A function that puts the layers back as they were.
    """
    saved = [(m, m.training, m.track_running_stats) for m in batchnorm_layers(model)]
    for m, _, _ in saved:
        m.train()
        m.track_running_stats = False

    def restore() -> None:
        for m, training, tracking in saved:
            m.train(training)
            m.track_running_stats = tracking

    return restore


@torch.no_grad()
def running_statistics_gap(model: nn.Module, forward: Callable[[Any], torch.Tensor],
                           loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           batch: tuple[Any, torch.Tensor]) -> tuple[float, float] | None:
    """``(eval-mode loss, batch-statistics loss)`` on ``batch`` when the first is far above the second.

    Returns ``None`` when the model has no BatchNorm layer or the two losses are close.
    """
    if not batchnorm_layers(model):
        return None
    x, y = batch
    running = float(loss(forward(x), y))
    restore = use_batch_statistics(model)
    try:
        batch_stats = float(loss(forward(x), y))
    finally:
        restore()
    if running > GAP_RATIO * batch_stats and running - batch_stats > GAP_MIN:
        return running, batch_stats
    return None
