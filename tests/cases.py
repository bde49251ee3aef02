"""Seeded tiny problems (float64, <= ~200 parameters) built straight from tensors.

``CASES`` maps a readable id to a factory ``(batch_size) -> Problem``.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hesscli.loading.problem import Dataset, LoadedModel, LossSpec, Problem

DTYPE = torch.float64


def _ce(o, t):
    return F.cross_entropy(o, t)


def _mse(o, t):
    return ((o - t) ** 2).mean()


CE = LossSpec("cross_entropy", _ce, is_classification=True)
MSE = LossSpec("mse", _mse)


def make_problem(model: nn.Module, loss: LossSpec, inputs, targets, *, batch_size: int = 7,
                 params: tuple[str, ...] = ()) -> Problem:
    """Problem from tensors: model to float64 + eval, batches of ``batch_size`` (last one ragged)."""
    model = model.to(DTYPE).eval()
    inputs = inputs.to(DTYPE)
    if targets.is_floating_point():
        targets = targets.to(DTYPE)
    batches = [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    n = len(inputs)
    data = Dataset(batches=batches, n_samples=n, n_total=n, source="<test>")
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if params:
        trainable = {k: p for k, p in trainable.items() if any(fnmatch.fnmatch(k, g) for g in params)}
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    return Problem(model=model, loss=loss, data=data, params=trainable, frozen=frozen,
                   device=torch.device("cpu"), dtype=DTYPE, checkpoint=LoadedModel(model=model))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_ce(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(23, 5, generator=_gen(1))
    y = torch.randint(0, 3, (23,), generator=_gen(2))
    return make_problem(model, CE, x, y, batch_size=batch_size, params=params)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = F.max_pool2d(h, 2)
        return self.fc(h.flatten(1))


def cnn_bn_ce(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running statistics, as after training
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2]))
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0]))
    x = torch.randn(17, 1, 4, 4, generator=_gen(3))
    y = torch.randint(0, 3, (17,), generator=_gen(4))
    return make_problem(model, CE, x, y, batch_size=batch_size, params=params)


def mlp_mse(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(19, 4, generator=_gen(5))
    y = torch.randn(19, 2, generator=_gen(6))
    return make_problem(model, MSE, x, y, batch_size=batch_size, params=params)


def linreg(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    """Linear regression + MSE: the Hessian is ``2/N [X 1]^T [X 1]`` (closed form)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(21, 4, generator=_gen(7))
    y = torch.randn(21, 1, generator=_gen(8))
    return make_problem(model, MSE, x, y, batch_size=batch_size, params=params)


def frozen_mlp(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    x = torch.randn(23, 5, generator=_gen(9))
    y = torch.randint(0, 3, (23,), generator=_gen(10))
    return make_problem(model, CE, x, y, batch_size=batch_size, params=params)


class TiedAutoencoder(nn.Module):
    """``dec.weight`` *is* ``enc.weight``: one parameter used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def tied_ae(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    torch.manual_seed(0)
    model = TiedAutoencoder()
    x = torch.randn(15, 4, generator=_gen(11))
    return make_problem(model, MSE, x, x.clone(), batch_size=batch_size, params=params)


CASES: dict[str, Callable[..., Problem]] = {
    "mlp-ce": mlp_ce,
    "cnn-bn-ce": cnn_bn_ce,
    "mlp-mse": mlp_mse,
    "linreg-mse": linreg,
    "frozen-mlp": frozen_mlp,
    "tied-ae": tied_ae,
}


class TinyTransformer(nn.Module):
    """Embedding + one self-attention encoder layer (LayerNorm, MLP) + mean-pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.emb(x)).mean(1))


def attention_ce(batch_size: int = 4, params: tuple[str, ...] = ()) -> Problem:
    """Double backward / forward-over-reverse through scaled-dot-product attention."""
    torch.manual_seed(0)
    x = torch.randint(0, 5, (11, 4), generator=_gen(12))
    y = torch.randint(0, 3, (11,), generator=_gen(13))
    problem = make_problem(TinyTransformer(), CE, x.double(), y, batch_size=batch_size, params=params)
    problem.data.batches = [(b[0].long(), b[1]) for b in problem.data.batches]
    return problem
