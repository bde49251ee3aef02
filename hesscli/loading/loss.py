"""Losses by name (``--loss``), each the batch mean, twice differentiable by autograd and ``torch.func``.

The named losses are written out by hand rather than calling ``torch.nn.functional``:
``F.mse_loss`` has no working forward-over-reverse derivative (pytorch#123996), and plain
tensor arithmetic keeps every loss usable with ``torch.func.jvp(torch.func.grad(...))``.
"""

from __future__ import annotations

import inspect
import math  # noqa: F401  (used by the doctests)
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesscli.errors import InputError
from hesscli.loading.problem import LossFn, LossSpec
from hesscli.loading.specs import load_callable

__all__ = ["load_loss", "LOSSES", "CLASSIFICATION_LOSSES", "TOKEN_LOSSES", "IGNORE_INDEX", "check_targets",
           "ACCURACIES", "accuracy_fn"]

IGNORE_INDEX = -100
"""Token label that is left out of token losses (the Hugging Face and PyTorch convention)."""

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


def _token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the tokens whose label is not :data:`IGNORE_INDEX`; class dimension last.

    A batch without any counted token gives 0 (its weight in the dataset mean is 0 too).
    """
    keep = labels != IGNORE_INDEX
    idx = torch.where(keep, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return -(logp * keep.to(logp.dtype)).sum() / keep.sum().clamp(min=1).to(logp.dtype)


def _token_labels(outputs: Tensor, targets: Tensor, name: str, what: str) -> None:
    if outputs.ndim < 2:
        raise ValueError(f"{name} needs {what}, got outputs of shape {_shape(outputs)}")
    if targets.is_floating_point() or targets.shape != outputs.shape[:-1]:
        raise ValueError(
            f"{name} needs integer token labels of shape {list(outputs.shape[:-1])} for logits {_shape(outputs)}, "
            f"got {str(targets.dtype).removeprefix('torch.')} labels of shape {_shape(targets)}"
        )


def causal_lm(outputs: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy: logits ``[B, T, V]`` at position t predict label t+1 of ``[B, T]``.

    Labels equal to -100 (padding, prompt tokens) are left out; the result is the mean over
    the counted tokens of the batch.

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> round(causal_lm(logits, torch.tensor([[1, 2, -100]])).item(), 6) == round(math.log(4), 6)
        True
    """
    if outputs.ndim != 3:
        raise ValueError(f"causal_lm needs logits of shape [batch, sequence, vocabulary], got {_shape(outputs)}")
    _token_labels(outputs, targets, "causal_lm", "logits of shape [batch, sequence, vocabulary]")
    return _token_mean(outputs[:, :-1], targets[:, 1:])


def token_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every token, class dimension last (masked LM, token classification).

    Logits ``[B, T, C]`` against labels ``[B, T]``; labels equal to -100 are left out.
    """
    _token_labels(outputs, targets, "token_cross_entropy", "logits of shape [batch, ..., classes]")
    return _token_mean(outputs, targets)


def _count_causal(targets: Tensor) -> Tensor:
    return (targets[:, 1:] != IGNORE_INDEX).sum()


def _count_tokens(targets: Tensor) -> Tensor:
    return (targets != IGNORE_INDEX).sum()


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "bce_with_logits": bce_with_logits,
    "nll": nll,
    "huber": huber,
    "causal_lm": causal_lm,
    "token_cross_entropy": token_cross_entropy,
}
"""Named losses accepted by ``--loss``."""

CLASSIFICATION_LOSSES = frozenset({"cross_entropy", "nll", "bce_with_logits"})

TOKEN_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "causal_lm": _count_causal,
    "token_cross_entropy": _count_tokens,
}
"""Token losses and how many tokens of a batch's labels they average over."""


def _class_accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of positions whose arg-max class (dimension 1) is the target class (or the arg-max of
    class-probability targets), for ``cross_entropy`` and ``nll``."""
    if targets.is_floating_point() and targets.shape == outputs.shape:
        truth = targets.argmax(dim=1)
    else:
        truth = _class_targets(outputs, targets, "accuracy")
    return (outputs.argmax(dim=1) == truth).to(torch.float64).mean()


def _binary_accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of logits on the side of 0 their target is on (``> 0`` against ``> 0.5``), over all elements."""
    return ((outputs > 0) == (targets.reshape(outputs.shape) > 0.5)).to(torch.float64).mean()


def _token_hits(logits: Tensor, labels: Tensor) -> Tensor:
    keep = labels != IGNORE_INDEX
    hits = (logits.argmax(dim=-1) == labels) & keep
    return hits.to(torch.float64).sum() / keep.sum().clamp(min=1).to(torch.float64)


def _causal_accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of counted next tokens predicted by the arg-max of the logits one position earlier."""
    return _token_hits(outputs[:, :-1], targets[:, 1:])


def _token_accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of counted tokens whose arg-max logit (class dimension last) is the label."""
    return _token_hits(outputs, targets)


ACCURACIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": _class_accuracy,
    "nll": _class_accuracy,
    "bce_with_logits": _binary_accuracy,
    "causal_lm": _causal_accuracy,
    "token_cross_entropy": _token_accuracy,
}
"""Batch accuracy of the named losses that have classes: ``accuracy(outputs, targets)`` is the float64
fraction of correct predictions averaged over the same terms as the batch-mean loss (samples, or
positions and elements within them, or counted tokens), so batch weights turn it into the dataset
accuracy exactly as they turn batch losses into the dataset mean loss."""


def accuracy_fn(loss: LossSpec) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The batch accuracy of ``loss``, or ``None`` when the loss has no classes.

    A loss has classes when it is one of the named classification losses (``cross_entropy``,
    ``nll``, ``bce_with_logits``) or token losses (``causal_lm``, ``token_cross_entropy``); a
    callable loss (``pkg.module:callable``, or one handed over from Python) never does.

    Example:
        >>> acc = accuracy_fn(load_loss("cross_entropy"))
        >>> float(acc(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])))
        0.5
        >>> accuracy_fn(load_loss("mse")) is None
        True
    """
    if loss.name in ACCURACIES and (loss.is_classification or loss.count is not None):
        return ACCURACIES[loss.name]
    return None


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
        return LossSpec(name=name, fn=LOSSES[name], is_classification=name in CLASSIFICATION_LOSSES,
                        count=TOKEN_LOSSES.get(name), unit="tokens" if name in TOKEN_LOSSES else "samples")
    if ":" not in spec:
        raise InputError(
            f"--loss {spec!r}: unknown loss; use one of {', '.join(LOSSES)} or pkg.module:callable / "
            f"file.py:callable taking (outputs, targets)"
        )
    obj = load_callable(spec, "--loss")
    fn: LossFn = obj
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        try:
            fn = obj()
        except Exception as e:
            raise InputError(f"--loss {spec}: {obj.__name__}() cannot be built without arguments ({e})") from e
    return LossSpec(name=spec, fn=fn, is_classification=False)


def check_targets(loss: LossSpec, outputs: Tensor, targets: Tensor) -> str | None:
    """Data-dependent target checks that a loss cannot do cheaply per batch.

    Returns a description of the problem, or ``None`` when the targets are fine. Only
    integer class targets are checked (range ``0..C-1``): for ``cross_entropy``/``nll`` an
    out-of-range index would otherwise be an opaque indexing error (a device-side assert on
    CUDA), and ``mse``/``huber`` would silently one-hot it to a row of zeros.
    """
    if loss.name in TOKEN_LOSSES and not targets.is_floating_point() and outputs.ndim >= 2 and targets.numel():
        n_classes = outputs.shape[-1]
        kept = targets[targets != IGNORE_INDEX]
        if kept.numel():
            lo, hi = int(kept.min()), int(kept.max())
            if lo < 0 or hi >= n_classes:
                return (f"token labels range {lo}..{hi} but the model outputs {n_classes} logits per token "
                        f"(0..{n_classes - 1}; -100 marks tokens left out)")
        return None
    if (loss.name in ("cross_entropy", "nll") and outputs.ndim == 3 and not targets.is_floating_point()
            and targets.shape == outputs.shape[:2]):
        return (f"the model outputs per-token logits {_shape(outputs)} [batch, sequence, vocabulary] and the targets "
                f"are token labels {_shape(targets)}, but {loss.name} reads dimension 1 ({outputs.shape[1]}) as the "
                f"classes; use --loss causal_lm (next-token prediction) or --loss token_cross_entropy (a label per "
                f"token)")
    one_hot = loss.name in ("mse", "huber") and outputs.ndim == 2 and targets.ndim == 1
    if (loss.name in ("cross_entropy", "nll") or one_hot) and not targets.is_floating_point() and outputs.ndim >= 2:
        n_classes = outputs.shape[1]
        if targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= n_classes:
                return f"class targets range {lo}..{hi} but the model outputs {n_classes} classes (0..{n_classes - 1})"
    return None
