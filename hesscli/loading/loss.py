"""Losses by name (``--loss``), each the batch mean, twice differentiable by autograd and ``torch.func``.

The named losses are written out by hand rather than calling ``torch.nn.functional``:
``F.mse_loss`` has no working forward-over-reverse derivative (pytorch#123996), and plain
tensor arithmetic keeps every loss usable with ``torch.func.jvp(torch.func.grad(...))``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesscli.errors import InputError
from hesscli.loading.problem import LossFn, LossSpec
from hesscli.loading.specs import load_callable

__all__ = ["load_loss", "LOSSES", "CLASSIFICATION_LOSSES", "check_targets"]

HUBER_DELTA = 1.0
"""Huber threshold, as ``torch.nn.HuberLoss``'s default."""


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _class_targets(outputs: Tensor, targets: Tensor, name: str) -> Tensor:
    """Check integer class targets against ``[B, C, *]`` outputs; return them as int64."""
    if outputs.ndim < 2:
        raise ValueError(f"{name} needs outputs of shape [batch, classes, ...], got {_shape(outputs)}")
    expected = outputs.shape[:1] + outputs.shape[2:]
    if targets.shape != expected:
        if targets.ndim == outputs.ndim and targets.shape[1] == 1 and targets.shape[:1] + targets.shape[2:] == expected:
            targets = targets.squeeze(1)
        else:
            raise ValueError(
                f"{name} needs integer class targets of shape {list(expected)} for outputs {_shape(outputs)}, "
                f"got {_shape(targets)}"
            )
    return targets.long()


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean softmax cross-entropy; integer class targets ``[B, *]`` or probabilities shaped like ``outputs``."""
    logp = torch.log_softmax(outputs, dim=1) if outputs.ndim >= 2 else None
    if logp is None:
        raise ValueError(f"cross_entropy needs outputs of shape [batch, classes, ...], got {_shape(outputs)}")
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise ValueError(
                f"cross_entropy needs integer class targets or class probabilities shaped like the outputs "
                f"{_shape(outputs)}; got {targets.dtype} targets of shape {_shape(targets)} "
                f"(use --loss mse for regression)"
            )
        return -(targets.to(logp.dtype) * logp).sum(dim=1).mean()
    idx = _class_targets(outputs, targets, "cross_entropy")
    return -logp.gather(1, idx.unsqueeze(1)).mean()


def nll(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of log-probabilities ``outputs`` ``[B, C, *]`` at integer targets."""
    if targets.is_floating_point():
        raise ValueError(f"nll needs integer class targets, got {targets.dtype} targets of shape {_shape(targets)}")
    idx = _class_targets(outputs, targets, "nll")
    return -outputs.gather(1, idx.unsqueeze(1)).mean()


def _regression_targets(outputs: Tensor, targets: Tensor, name: str) -> Tensor:
    """Targets shaped and typed like ``outputs`` (one-hot for integer class targets)."""
    if not targets.is_floating_point() and outputs.ndim == 2 and targets.ndim == 1 and targets.shape[0] == outputs.shape[0]:
        classes = torch.arange(outputs.shape[1], device=targets.device)
        return (targets.unsqueeze(1) == classes).to(outputs.dtype)  # one-hot without a host sync
    if targets.shape != outputs.shape:
        if targets.numel() == outputs.numel() and targets.shape[:1] == outputs.shape[:1]:
            targets = targets.reshape(outputs.shape)
        else:
            raise ValueError(f"{name} needs targets shaped like the outputs {_shape(outputs)}, got {_shape(targets)}")
    return targets.to(outputs.dtype)


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over all elements, ``((outputs - targets) ** 2).mean()``."""
    t = _regression_targets(outputs, targets, "mse")
    return ((outputs - t) ** 2).mean()


def huber(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean Huber loss with ``delta = 1`` (quadratic below, linear above)."""
    d = outputs - _regression_targets(outputs, targets, "huber")
    a = d.abs()
    return torch.where(a <= HUBER_DELTA, 0.5 * d * d, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)).mean()


def bce_with_logits(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy on logits: ``softplus(x) - x * y``, targets in [0, 1]."""
    if targets.shape != outputs.shape:
        if targets.numel() == outputs.numel() and targets.shape[:1] == outputs.shape[:1]:
            targets = targets.reshape(outputs.shape)
        else:
            raise ValueError(
                f"bce_with_logits needs targets shaped like the outputs {_shape(outputs)}, got {_shape(targets)}"
            )
    y = targets.to(outputs.dtype)
    return (F.softplus(outputs) - outputs * y).mean()


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "bce_with_logits": bce_with_logits,
    "nll": nll,
    "huber": huber,
}
"""Named losses accepted by ``--loss``."""

CLASSIFICATION_LOSSES = frozenset({"cross_entropy", "nll", "bce_with_logits"})


def load_loss(spec: str) -> LossSpec:
    """Resolve ``--loss``: a name from :data:`LOSSES` or a ``pkg.module:callable`` / ``file.py:callable``.

    A callable spec takes ``(outputs, targets)`` and returns the batch-mean loss; a
    ``torch.nn.Module`` class (``torch.nn:SmoothL1Loss``) is instantiated without arguments.

    Args:
        spec: the loss name or callable spec (``-`` and ``_`` are interchangeable in names).

    Returns:
        The loss spec.

    Raises:
        InputError: unknown name, or a callable spec that cannot be imported.

    Example:
        >>> load_loss("mse").fn(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item()
        2.5
    """
    name = spec.strip().lower().replace("-", "_")
    if name in LOSSES:
        return LossSpec(name=name, fn=LOSSES[name], is_classification=name in CLASSIFICATION_LOSSES)
    if ":" not in spec:
        raise InputError(
            f"--loss {spec!r}: unknown loss; use one of {', '.join(LOSSES)} or pkg.module:callable / "
            f"file.py:callable taking (outputs, targets)"
        )
    fn: Callable[..., Tensor] = load_callable(spec, "--loss")
    if inspect.isclass(fn) and issubclass(fn, nn.Module):
        try:
            fn = fn()
        except Exception as e:
            raise InputError(f"--loss {spec}: {fn.__name__}() cannot be built without arguments ({e})") from e
    return LossSpec(name=spec, fn=fn, is_classification=False)


def check_targets(loss: LossSpec, outputs: Tensor, targets: Tensor) -> str | None:
    """Data-dependent target checks that a loss cannot do cheaply per batch.

    Returns a description of the problem, or ``None`` when the targets are fine. Only
    integer class targets are checked (range ``0..C-1``): for ``cross_entropy``/``nll`` an
    out-of-range index would otherwise be an opaque indexing error (a device-side assert on
    CUDA), and ``mse``/``huber`` would silently one-hot it to a row of zeros.
    """
    one_hot = loss.name in ("mse", "huber") and outputs.ndim == 2 and targets.ndim == 1
    if (loss.name in ("cross_entropy", "nll") or one_hot) and not targets.is_floating_point() and outputs.ndim >= 2:
        n_classes = outputs.shape[1]
        if targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= n_classes:
                return f"class targets range {lo}..{hi} but the model outputs {n_classes} classes (0..{n_classes - 1})"
    return None
