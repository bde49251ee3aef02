"""How the model is called on a batch, and which of its outputs the loss sees.

Tensor inputs are passed positionally, ``model(x)``; dict inputs (``input_ids``,
``attention_mask``, ...) as keyword arguments, ``model(**inputs)``. ``--forward-arg KEY=VALUE``
adds fixed keyword arguments to every call. A model that returns a ``ModelOutput``, a dict or
a tuple is reduced to one tensor: ``logits`` (the first element of a tuple) unless
``--output KEY`` names another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from hesscli.errors import InputError

__all__ = ["Inputs", "ModelCall", "DEFAULT_OUTPUT", "batch_len"]

Inputs = Tensor | Mapping[str, Tensor]
"""One batch of model inputs: a tensor, or a dict of tensors sharing the leading batch dimension."""

DEFAULT_OUTPUT = "logits"
"""The output a ``ModelOutput``/dict is reduced to when ``--output`` is not given."""


def batch_len(inputs: Inputs) -> int:
    """Number of samples in one batch of inputs (the leading dimension)."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values()))) if inputs else 0
    return len(inputs)


@dataclass(frozen=True)
class ModelCall:
    """Calls ``model`` on a batch and returns the tensor the loss needs.

    Attributes:
        forward_args: fixed keyword arguments of every call (``--forward-arg``).
        output: key of a ``ModelOutput``/dict output or index of a tuple output (``--output``);
            ``None`` means ``logits`` / the first element.
    """

    forward_args: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None

    def __call__(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """``model(inputs)`` or ``model(**inputs)``, plus the fixed arguments, reduced to one tensor."""
        if isinstance(inputs, Mapping):
            return self.select(model(**inputs, **self.forward_args))
        return self.select(model(inputs, **self.forward_args))

    def functional(self, model: nn.Module, tensors: Mapping[str, Tensor], inputs: Inputs) -> Tensor:
        """The same call with parameters and buffers replaced by ``tensors`` (``torch.func.functional_call``)."""
        if isinstance(inputs, Mapping):
            out = functional_call(model, dict(tensors), (), {**inputs, **self.forward_args})
        else:
            out = functional_call(model, dict(tensors), (inputs,), dict(self.forward_args) or None)
        return self.select(out)

    def select(self, out: Any) -> Tensor:
        """Reduce a model's output to the tensor the loss sees.

        Raises:
            InputError: the output has no such key/index, or is not a tensor.

        Example:
            >>> import torch
            >>> ModelCall().select({"loss": None, "logits": torch.zeros(2, 3)}).shape
            torch.Size([2, 3])
            >>> ModelCall(output="1").select((torch.zeros(1), torch.ones(2))).tolist()
            [1.0, 1.0]
        """
        if isinstance(out, Tensor):
            if self.output is not None and self.output not in (DEFAULT_OUTPUT, "0"):
                raise InputError(f"--output {self.output}: the model returns a single tensor, not a dict or tuple; "
                                 f"drop --output")
            return out
        if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict of its non-None fields
            key = self.output or DEFAULT_OUTPUT
            keys = [str(k) for k, v in out.items() if v is not None]
            value = out.get(key)
            if value is None:
                how = f"--output {self.output}" if self.output else f"the model's output has no {key!r} and no --output"
                raise InputError(f"{how}: the model returns {type(out).__name__} with {keys}; pass --output KEY "
                                 f"(one of them) to choose the tensor the loss sees")
            if not isinstance(value, Tensor):
                raise InputError(f"--output {key}: the model's {key!r} is a {type(value).__name__}, not a tensor")
            return value
        if isinstance(out, (tuple, list)):
            spec = self.output or "0"
            if not spec.lstrip("-").isdigit():
                raise InputError(f"--output {spec}: the model returns a {type(out).__name__} of {len(out)}; pass an "
                                 f"index (--output 0)")
            i = int(spec)
            if not -len(out) <= i < len(out):
                raise InputError(f"--output {spec}: the model returns a {type(out).__name__} of only {len(out)}")
            value = out[i]
            if not isinstance(value, Tensor):
                raise InputError(f"--output {spec}: element {i} of the model's output is a {type(value).__name__}, "
                                 f"not a tensor; pass --output INDEX of a tensor")
            return value
        raise InputError(f"the model returns a {type(out).__name__}; the loss needs a tensor (or a ModelOutput, "
                         f"dict or tuple holding one)")
