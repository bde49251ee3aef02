"""The Python API never changes the caller's model: dtype, values, requires_grad, .grad, mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hesscli
from hesscli.monitor import CurvatureMonitor

F64 = torch.float64


class Net(nn.Module):
    """BatchNorm (running statistics mutate in train mode), dropout, a tied weight and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(6, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x))))))


def make(dtype: torch.dtype, *, train: bool = True, with_grads: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = Net().to(dtype)
    with torch.no_grad():  # weights that float32 cannot represent exactly
        for p in net.parameters():
            p.add_(torch.randn(p.shape, dtype=dtype) * 1e-9)
    net.train(train)
    if train:
        net.bn.eval()  # mixed modes, as with frozen BatchNorm statistics during fine-tuning
    if with_grads:
        for i, p in enumerate(net.parameters()):
            if p.requires_grad and i % 2 == 0:
                p.grad = torch.full_like(p, 0.125 * (i + 1))
    return net


def data(dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g, dtype=dtype), torch.randint(0, 3, (32,), generator=g)


def snapshot(net: nn.Module) -> dict[str, object]:
    """Everything the caller could observe, copied bit for bit."""
    return {
        "params": {n: (p.detach().clone(), p.dtype, p.device, p.requires_grad, type(p))
                   for n, p in net.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
        "buffers": {n: (b.clone(), b.dtype) for n, b in net.named_buffers()},
        "modes": {n: m.training for n, m in net.named_modules()},
        "objects": [id(p) for p in net.parameters()],
    }


def assert_unchanged(before: dict, net: nn.Module) -> None:
    after = snapshot(net)
    assert after["objects"] == before["objects"]
    assert after["modes"] == before["modes"]
    for name, (value, dtype, device, rg, kind) in before["params"].items():
        v2, d2, dev2, rg2, k2 = after["params"][name]
        assert (d2, dev2, rg2, k2) == (dtype, device, rg, kind), name
        assert torch.equal(v2, value), name  # bit-identical
    for name, g in before["grads"].items():
        g2 = after["grads"][name]
        assert (g is None) == (g2 is None), name
        assert g is None or (g2.dtype == g.dtype and torch.equal(g2, g)), name
    for name, (value, dtype) in before["buffers"].items():
        v2, d2 = after["buffers"][name]
        assert d2 == dtype and torch.equal(v2, value), name


CASES = [
    pytest.param(F64, {}, id="float64-model-default-dtype"),
    pytest.param(torch.float32, {"dtype": "float64"}, id="float32-model-float64-analysis"),
    pytest.param(F64, {"dtype": "float64"}, id="float64-model-float64-analysis"),
    pytest.param(torch.float32, {}, id="float32-model-default-dtype"),
    pytest.param(F64, {"params": ("fc2.*",)}, id="float64-model-params-subset"),
    pytest.param(torch.float32, {"dtype": "float64", "params": ("fc1.weight", "bn.*")}, id="float32-params-float64"),
]


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
@pytest.mark.parametrize("model_dtype, options", CASES)
def test_analyses_leave_the_model_bit_identical(model_dtype, options, train):
    net = make(model_dtype, train=train)
    before = snapshot(net)
    x, y = data(model_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hesscli.trace(net, "cross_entropy", (x, y), method="hutchinson", probes=6, **options)
        hesscli.eigs(net, "cross_entropy", (x, y), top_k=2, max_iter=20, **options)
        hesscli.extremes(net, "cross_entropy", (x, y), max_iter=20, **options)
        hesscli.density(net, "cross_entropy", (x, y), iters=5, runs=2, **options)
    assert_unchanged(before, net)


def test_analysis_runs_in_the_requested_dtype_on_a_copy():
    # The numbers are those of a float64 analysis of the float32 model's weights, while the
    # model itself stays float32.
    net = make(torch.float32, train=False, with_grads=False)
    x, y = data(F64)
    ref = make(torch.float32, train=False, with_grads=False).double()
    r = hesscli.trace(net, "cross_entropy", (x, y), method="exact", dtype="float64")
    r_ref = hesscli.trace(ref, "cross_entropy", (x, y), method="exact", dtype="float64")
    assert r.estimate == r_ref.estimate
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_tied_weights_stay_tied_in_the_copy():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 3, bias=False)
            self.dec = nn.Linear(3, 3, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.tanh(self.enc(x)))

    torch.manual_seed(0)
    net = Tied().double()
    x, y = data(F64)
    x = x[:, :3]
    before = snapshot(net)
    r = hesscli.trace(net, "cross_entropy", (x, y % 3), method="exact")
    assert r.n_probes == 9  # one shared 3x3 weight, not two
    assert_unchanged(before, net)


@pytest.mark.parametrize("backend", ["native", "pyhessian", "eigenthings", "backpack"])
def test_backends_leave_the_model_bit_identical(backend):
    pytest.importorskip({"native": "torch", "pyhessian": "pyhessian", "eigenthings": "hessian_eigenthings",
                         "backpack": "backpack"}[backend])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64).train()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(net)
    x, y = data(F64)
    method = "exact" if backend == "backpack" else "hutchinson"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hesscli.trace(net, "cross_entropy", (x, y), backend=backend, method=method, probes=4)
    assert_unchanged(before, net)


def test_curvature_monitor_leaves_the_model_bit_identical(tmp_path):
    net = make(F64, train=True)
    x, y = data(F64)
    monitor = CurvatureMonitor("cross_entropy", (x, y), analyses=("trace", "eigs"), every=2, out=tmp_path,
                               probes=6, top_k=2, max_iter=20)
    before = snapshot(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = monitor.step(net, 4)
    assert len(outcomes) == 2
    assert_unchanged(before, net)
    # float32 analysis (the default) of a float64 model: the rows say so, the model does not change
    assert {o.run.dtype for o in outcomes} == {"float32"}


def test_torchscript_and_parametrized_models_are_left_alone():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)).train()
    normed = nn.Sequential(weight_norm(nn.Linear(4, 5, dtype=F64)), nn.Tanh(), nn.Linear(5, 3, dtype=F64)).train()
    x, y = data(F64)
    for net in (scripted, normed):
        before = snapshot(net)
        r = hesscli.trace(net, "cross_entropy", (x, y), method="exact")
        r64 = hesscli.trace(net, "cross_entropy", (x, y), method="exact", dtype="float64")
        assert r.estimate == pytest.approx(r64.estimate, rel=1e-4)
        assert_unchanged(before, net)


def test_the_copy_shares_storage_only_when_no_cast_is_needed():
    from hesscli.config import Settings
    from hesscli.loading import problem_from_python

    net = make(F64, train=True)
    x, y = data(F64)
    same = problem_from_python(net, "cross_entropy", (x, y), Settings(dtype="float64")).model
    cast = problem_from_python(net, "cross_entropy", (x, y), Settings(dtype="float32")).model
    for (name, p), p_same, p_cast in zip(net.named_parameters(), same.parameters(), cast.parameters()):
        assert p_same is not p and p_same.data_ptr() == p.data_ptr(), name  # no memory spent
        assert p_same.grad is None and p_same.requires_grad == p.requires_grad, name
        assert p_cast.dtype == torch.float32 and p_cast.data_ptr() != p.data_ptr(), name
    for b_same, b in zip(same.buffers(), net.buffers()):
        assert b_same.data_ptr() != b.data_ptr()  # buffers are always copied
    assert not same.training and net.training and not net.bn.training and net.fc1.training
