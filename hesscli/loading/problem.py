"""The loaded objects every analysis works on. Plain containers: no logic here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hesscli.loading.forward import ModelCall

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> scalar``: the *mean* loss over the samples of one batch."""


@dataclass
class Dataset:
    """The selected samples, already split into batches and moved to the analysis device.

    Attributes:
        batches: ``[(inputs, targets), ...]``; inputs are a tensor or a dict of tensors
            (``input_ids``, ``attention_mask``, ...) passed as ``model(**inputs)``; floating
            tensors are cast to the analysis dtype.
        n_samples: samples held by this process (sum of batch lengths).
        n_total: samples across all processes (equals ``n_samples`` without torch.distributed).
        weights: each batch's weight ``w_b`` in the analysed function
            ``sum_b w_b * loss_fn(model(x_b), y_b)``: ``n_b / n_units`` where ``n_b`` counts the
            batch's loss terms (samples, or non-ignored tokens for token losses). Filled in
            when the problem is built, since it depends on the loss.
        n_units: loss terms across all processes (samples, or tokens for token losses).
        source: the ``--data`` spec (or ``"<python>"``) for provenance.
        input_shape: shape of one input sample (of ``input_ids`` or the first key for dict
            inputs); target_shape: shape of one target.
        input_keys: the keys of dict inputs (empty for tensor inputs).
    """

    batches: list[tuple[Any, Tensor]]
    n_samples: int
    n_total: int
    source: str = "<python>"
    input_shape: tuple[int, ...] = ()
    target_shape: tuple[int, ...] = ()
    target_dtype: str = ""
    input_keys: tuple[str, ...] = ()
    weights: list[float] = field(default_factory=list)
    n_units: int = 0


@dataclass
class LoadedModel:
    """A model built from a checkpoint (or handed over from Python)."""

    model: nn.Module
    source: str = "<python>"
    sha256: str = ""
    format: str = "module"  # torchscript | state_dict | safetensors | hf | pickle | module
    step: int | None = None
    epoch: int | None = None
    metadata: dict[str, object] = field(default_factory=dict)


@dataclass
class LossSpec:
    """A loss by name plus its batch-mean function.

    Attributes:
        count: for losses that average over something other than samples (tokens), the
            number of terms the batch mean of ``fn`` is over, read from the batch's targets;
            ``None`` means one term per sample.
        unit: what is counted (``samples``, ``tokens``), for messages and summaries.
    """

    name: str
    fn: LossFn
    is_classification: bool = False
    count: Callable[[Tensor], Tensor] | None = None
    unit: str = "samples"


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
        call: how the model is called on a batch and which output the loss sees.
    """

    model: nn.Module
    loss: LossSpec
    data: Dataset
    params: dict[str, Tensor]
    frozen: list[str]
    device: torch.device
    dtype: torch.dtype
    checkpoint: LoadedModel
    call: ModelCall = field(default_factory=ModelCall)

    def output(self, inputs: Any) -> Tensor:
        """The model's output tensor on one batch of inputs (what the loss sees)."""
        return self.call(self.model, inputs)

    @property
    def n_params(self) -> int:
        """Number of scalar parameters the curvature is taken over."""
        return sum(p.numel() for p in self.params.values())
