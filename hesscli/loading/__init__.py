"""Turn input specs (checkpoint, ``--model``, ``--data``, ``--loss``) into a validated :class:`Problem`.

The rest of the engine calls exactly these functions.
"""

from __future__ import annotations

from hesscli.loading.build import (
    ProblemLoader,
    build_problem,
    load_problem,
    problem_from_python,
    resolve_device,
    resolve_dtype,
)
from hesscli.loading.checkpoint import epoch_from, load_checkpoint, step_from
from hesscli.loading.data import load_data
from hesscli.loading.describe import describe, evaluate
from hesscli.loading.loss import LOSSES, load_loss
from hesscli.loading.problem import Dataset, LoadedModel, LossFn, LossSpec, Problem

__all__ = [
    # specs -> pieces
    "resolve_device",
    "resolve_dtype",
    "load_loss",
    "load_data",
    "load_checkpoint",
    "step_from",
    "epoch_from",
    "LOSSES",
    # pieces -> problem
    "build_problem",
    "load_problem",
    "ProblemLoader",
    "problem_from_python",
    # summaries
    "evaluate",
    "describe",
    # containers
    "Dataset",
    "LoadedModel",
    "LossFn",
    "LossSpec",
    "Problem",
]
