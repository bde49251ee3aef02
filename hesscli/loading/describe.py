"""Loss, accuracy and gradient of a loaded problem over its whole dataset (``hesscli info``)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from hesscli.loading.build import model_name
from hesscli.loading.problem import Problem
from hesscli.results.info import InfoResult, ParamInfo

__all__ = ["evaluate", "describe"]


def _n_correct(name: str, out: Tensor, y: Tensor) -> Tensor:
    """Correct predictions in one batch (per-element mean for multi-output BCE)."""
    if name == "bce_with_logits":
        y = y.reshape(out.shape)
        hits = ((out > 0) == (y > 0.5)).to(torch.float64)
        return hits.reshape(len(out), -1).mean(dim=1).sum()
    pred = out.argmax(dim=1)
    truth = y.argmax(dim=1) if y.is_floating_point() and y.shape == out.shape else y.reshape(pred.shape)
    return (pred == truth).to(torch.float64).reshape(len(out), -1).mean(dim=1).sum()


def _all_reduce(t: Tensor) -> Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _pass(problem: Problem, *, with_grad: bool) -> tuple[float, float | None, list[Tensor] | None]:
    """Mean loss, accuracy and (optionally) the mean-loss gradient over all batches."""
    loss, data = problem.loss, problem.data
    params = list(problem.params.values())
    totals = torch.zeros(2, dtype=torch.float64, device=problem.device)  # [sum of loss * n, n correct]
    grads = [torch.zeros_like(p) for p in params] if with_grad else None
    weights = data.weights if len(data.weights) == len(data.batches) else [len(y) / data.n_total for _, y in data.batches]
    for (x, y), weight in zip(data.batches, weights):
        with torch.set_grad_enabled(with_grad):
            out = problem.output(x)
            value = loss.fn(out, y)
        if grads is not None:
            parts = torch.autograd.grad(value * weight, params, allow_unused=True)
            for g, part in zip(grads, parts):
                if part is not None:
                    g.add_(part)
        with torch.no_grad():
            totals[0] += value.detach().to(torch.float64) * weight * data.n_total
            if loss.is_classification:
                totals[1] += _n_correct(loss.name, out.detach(), y)
    _all_reduce(totals)
    if grads is not None:
        for g in grads:
            _all_reduce(g)
    mean = float(totals[0]) / data.n_total
    acc = float(totals[1]) / data.n_total if loss.is_classification else None
    return mean, acc, grads


def evaluate(problem: Problem) -> tuple[float, float | None]:
    """Mean loss over the dataset and, for classification losses, the accuracy.

    The mean is over samples (``sum_b len(b) * loss_b / n_total``), so it does not depend
    on the batch size. Under ``torch.distributed`` the sums are all-reduced.

    Args:
        problem: the loaded problem.

    Returns:
        ``(mean_loss, accuracy)``; accuracy is ``None`` for non-classification losses.
    """
    mean, acc, _ = _pass(problem, with_grad=False)
    return mean, acc


def describe(problem: Problem) -> InfoResult:
    """Summarise a problem for ``hesscli info``: model, parameters, data, loss, accuracy, gradient norm.

    The gradient is taken with ``torch.autograd.grad`` (``.grad`` of the parameters is not
    touched) of the mean loss over the whole dataset, with respect to the selected parameters.

    Args:
        problem: the loaded problem.

    Returns:
        The summary.
    """
    mean, acc, grads = _pass(problem, with_grad=True)
    assert grads is not None
    grad_norm = float(torch.sqrt(cast(Tensor, sum((g.to(torch.float64) ** 2).sum() for g in grads)))) if grads else 0.0
    selected = set(problem.params)
    params = tuple(
        ParamInfo(name=n, shape=tuple(p.shape), numel=p.numel(), trainable=bool(p.requires_grad), selected=n in selected)
        for n, p in problem.model.named_parameters()
    )
    ck, data = problem.checkpoint, problem.data
    return InfoResult(
        checkpoint=ck.source,
        checkpoint_sha256=ck.sha256,
        format=ck.format,
        step=ck.step,
        epoch=ck.epoch,
        model_class=model_name(problem.model),
        n_params_total=sum(p.numel for p in params),
        n_trainable=sum(p.numel for p in params if p.trainable),
        n_frozen=sum(p.numel for p in params if not p.trainable),
        n_selected=problem.n_params,
        parameters=params,
        data_source=data.source,
        n_samples=data.n_samples,
        n_total=data.n_total,
        n_batches=len(data.batches),
        batch_size=max((len(y) for _, y in data.batches), default=0),
        input_shape=tuple(data.input_shape),
        target_shape=tuple(data.target_shape),
        target_dtype=data.target_dtype,
        loss=problem.loss.name,
        loss_value=mean,
        accuracy=acc,
        grad_norm=grad_norm,
        device=str(problem.device),
        dtype=str(problem.dtype).removeprefix("torch."),
        torch_version=torch.__version__,
    )
