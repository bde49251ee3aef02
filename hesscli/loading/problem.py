"""The loaded objects every analysis works on. Plain containers: no logic here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> scalar``: the *mean* loss over the samples of one batch."""


@dataclass
class Dataset:
    """The selected samples, already split into batches and moved to the analysis device.

    Attributes:
        batches: ``[(inputs, targets), ...]``; floating inputs are cast to the analysis dtype.
        n_samples: samples held by this process (sum of batch lengths).
        n_total: samples across all processes (equals ``n_samples`` without torch.distributed).
            The analysed function is ``sum_b len(b) / n_total * loss_fn(model(x_b), y_b)``.
        source: the ``--data`` spec (or ``"<python>"``) for provenance.
        input_shape: shape of one input sample; target_shape: shape of one target.
    """

    batches: list[tuple[Tensor, Tensor]]
    n_samples: int
    n_total: int
    source: str = "<python>"
    input_shape: tuple[int, ...] = ()
    target_shape: tuple[int, ...] = ()
    target_dtype: str = ""


@dataclass
class LoadedModel:
    """A model built from a checkpoint (or handed over from Python)."""

    model: nn.Module
    source: str = "<python>"
    sha256: str = ""
    format: str = "module"  # torchscript | state_dict | safetensors | pickle | module
    step: int | None = None
    epoch: int | None = None
    metadata: dict[str, object] = field(default_factory=dict)


@dataclass
class LossSpec:
    """A loss by name plus its batch-mean function."""

    name: str
    fn: LossFn
    is_classification: bool = False


@dataclass
class Problem:
    """Everything an analysis needs: ``(model, loss, data)`` plus the selected parameters.

    Attributes:
        model: on ``device``/``dtype``, in eval mode.
        loss: the loss spec.
        data: the dataset (batches on ``device``).
        params: selected trainable parameters, ``name -> Parameter`` in model order
            (``--params`` globs applied, frozen parameters excluded).
        frozen: names of parameters excluded because ``requires_grad`` is False.
        device, dtype: where and in what precision the analysis runs.
        checkpoint: where the model came from.
    """

    model: nn.Module
    loss: LossSpec
    data: Dataset
    params: dict[str, Tensor]
    frozen: list[str]
    device: torch.device
    dtype: torch.dtype
    checkpoint: LoadedModel

    @property
    def n_params(self) -> int:
        """Number of scalar parameters the curvature is taken over."""
        return sum(p.numel() for p in self.params.values())
