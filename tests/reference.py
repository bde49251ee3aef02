"""Exact dense curvature for tiny problems: the truth every estimate is tested against."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

from hesscli.loading.problem import Problem


def _flat_fns(problem: Problem):
    model = problem.model
    names = list(problem.params)
    shapes = [p.shape for p in problem.params.values()]
    numels = [p.numel() for p in problem.params.values()]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in problem.params}
    fixed.update(dict(model.named_buffers()))
    theta0 = torch.cat([p.detach().reshape(-1) for p in problem.params.values()])

    def unflat(theta: Tensor) -> dict[str, Tensor]:
        return {n: c.reshape(s) for n, c, s in zip(names, theta.split(numels), shapes)}

    def outputs(theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, {**fixed, **unflat(theta)}, (x,))

    return theta0, outputs


def exact_hessian(problem: Problem) -> Tensor:
    """Dense Hessian of the dataset-mean loss w.r.t. the selected parameters, ``[P, P]``."""
    theta0, outputs = _flat_fns(problem)
    n = problem.data.n_total

    def total(theta: Tensor) -> Tensor:
        return sum(y.shape[0] / n * problem.loss.fn(outputs(theta, x), y) for x, y in problem.data.batches)

    # Double backward (torch.autograd.functional), not torch.func: under functorch transforms
    # nn.MultiheadAttention in eval mode takes its inference fast path, whose derivatives are wrong.
    with sdpa_kernel([SDPBackend.MATH]):
        H = torch.autograd.functional.hessian(total, theta0)
    return (H + H.T) / 2


def exact_ggn(problem: Problem) -> Tensor:
    """Dense GGN ``sum_b w_b J_b^T H_out,b J_b`` w.r.t. the selected parameters, ``[P, P]``."""
    theta0, outputs = _flat_fns(problem)
    n = problem.data.n_total
    G = torch.zeros(theta0.numel(), theta0.numel(), dtype=theta0.dtype)
    with sdpa_kernel([SDPBackend.MATH]):
        for x, y in problem.data.batches:
            out = outputs(theta0, x).detach()
            J = torch.autograd.functional.jacobian(lambda t: outputs(t, x), theta0).reshape(out.numel(), -1)
            Hout = hessian(lambda o: problem.loss.fn(o.reshape(out.shape), y))(out.reshape(-1))
            G += y.shape[0] / n * J.T @ Hout @ J
    return (G + G.T) / 2


def exact_loss(problem: Problem) -> float:
    theta0, outputs = _flat_fns(problem)
    n = problem.data.n_total
    return float(sum(y.shape[0] / n * problem.loss.fn(outputs(theta0, x), y) for x, y in problem.data.batches))
