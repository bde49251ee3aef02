"""Curvature products against exact dense Hessians / GGNs on tiny float64 problems."""

from __future__ import annotations

import pytest
import torch

from hesscli.operators.empirical import GGNOperator, HessianOperator, make_operator
from tests.cases import CASES, attention_ce, linreg, mlp_ce
from tests.reference import exact_ggn, exact_hessian, exact_loss

PATHS = ["func", "autograd"]


def _block(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hessian_products_match_exact(case, path):
    problem = CASES[case]()
    op = HessianOperator(problem, hvp=path, block_size=3)
    H = exact_hessian(problem)
    V = _block(op.size, 5)
    assert torch.allclose(op @ V, H @ V, rtol=1e-10, atol=1e-12)
    assert torch.allclose(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 6


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ggn_products_match_exact(case, path):
    problem = CASES[case]()
    op = GGNOperator(problem, hvp=path, block_size=4)
    G = exact_ggn(problem)
    V = _block(op.size, 5, seed=1)
    assert torch.allclose(op @ V, G @ V, rtol=1e-10, atol=1e-12)


def test_linear_regression_closed_form():
    problem = linreg()
    op = make_operator(problem, "hessian")
    x = torch.cat([b[0] for b in problem.data.batches])
    X1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    H = 2 / len(x) * X1.T @ X1
    assert torch.allclose(op @ torch.eye(op.size, dtype=torch.float64), H, atol=1e-12)
    # for a linear model with MSE the GGN equals the Hessian
    assert torch.allclose(make_operator(problem, "ggn") @ torch.eye(op.size, dtype=torch.float64), H, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_batch_size_invariance(path):
    ref = HessianOperator(mlp_ce(batch_size=23), hvp=path)
    V = _block(ref.size, 3)
    expected = ref @ V
    for bs in (1, 4, 7, 10):
        assert torch.allclose(HessianOperator(mlp_ce(batch_size=bs), hvp=path) @ V, expected, rtol=1e-10, atol=1e-13)


def test_params_subset_is_the_diagonal_block():
    full = mlp_ce()
    sub = mlp_ce(params=("2.*",))
    H = exact_hessian(full)
    names = list(full.params)
    sizes = [p.numel() for p in full.params.values()]
    start = sum(s for n, s in zip(names, sizes) if not n.startswith("2."))
    op = HessianOperator(sub)
    assert list(op.groups) == ["2.weight", "2.bias"]
    I = torch.eye(op.size, dtype=torch.float64)
    assert torch.allclose(op @ I, H[start:, start:], atol=1e-12)


def test_frozen_parameters_are_excluded():
    problem = CASES["frozen-mlp"]()
    assert "0.weight" not in problem.params and problem.frozen == ["0.weight"]
    assert HessianOperator(problem).size == sum(p.numel() for p in problem.params.values())


def test_cached_graph_reused_across_products_and_exact():
    problem = mlp_ce(batch_size=7)
    op = HessianOperator(problem, hvp="autograd", cache_graph=True)
    H = exact_hessian(problem)
    for seed in range(3):
        v = _block(op.size, 1, seed)
        assert torch.allclose(op @ v, H @ v, atol=1e-12)
    assert op._graphs is not None and len(op._graphs) == len(problem.data.batches)


def test_products_leave_model_untouched():
    problem = mlp_ce()
    before = {n: p.detach().clone() for n, p in problem.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in problem.model.named_parameters()}
    for path in PATHS:
        HessianOperator(problem, hvp=path) @ _block(sum(p.numel() for p in before.values()), 2)
    for n, p in problem.model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n] and torch.equal(p.detach(), before[n])


def test_loss_and_gradient():
    problem = mlp_ce()
    op = HessianOperator(problem)
    loss, g = op.loss_and_gradient()
    assert loss == pytest.approx(exact_loss(problem), rel=1e-12)
    assert g.shape == (op.size,)


def test_torchscript_model_uses_double_backward():
    problem = mlp_ce()
    H = exact_hessian(problem)
    problem.model = torch.jit.script(problem.model)
    problem.params = dict(problem.model.named_parameters())
    op = HessianOperator(problem, hvp="auto")
    assert op.path_for(4) == "autograd"
    V = _block(op.size, 2)
    assert torch.allclose(op @ V, H @ V, atol=1e-12)


def test_reduce_hook_is_applied():
    problem = mlp_ce()
    op = HessianOperator(problem, reduce=lambda t: 2 * t)
    V = _block(op.size, 2)
    assert torch.allclose(op @ V, 2 * (exact_hessian(problem) @ V), atol=1e-12)


def test_auto_path_on_cpu_with_a_cached_graph_is_double_backward():
    problem = mlp_ce()
    op = make_operator(problem, "hessian", hvp="auto")
    assert op.cache_graph and op.path_for(1) == "autograd" and op.path_for(16) == "autograd"
    V = _block(op.size, 6)
    assert torch.allclose(op @ V, exact_hessian(problem) @ V, rtol=1e-10, atol=1e-12)
    assert op.tuning == {} and op.block_path is None  # nothing was measured


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_auto_path_measures_both_and_stays_exact(curvature):
    problem = mlp_ce()
    # without a cached graph (many batches) the Hessian path is measured, as GGN always is
    op = make_operator(problem, curvature, hvp="auto", cache_graph=False)
    dense = (exact_hessian if curvature == "hessian" else exact_ggn)(problem)
    V = _block(op.size, 6)
    assert op.path_for(1) == "autograd" and op.path_for(6) == "tune"
    assert torch.allclose(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    assert set(op.tuning) == {"autograd", "func"} and op.block_path in ("autograd", "func")
    assert op.path_for(6) == op.block_path
    assert torch.allclose(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 12


@pytest.mark.parametrize("path", ["func", "autograd", "auto"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_attention_model_products_are_exact(path, curvature):
    """Fused attention kernels lack forward AD and double backward; the operator uses the math kernel."""
    problem = attention_ce()
    op = make_operator(problem, curvature, hvp=path)
    dense = (exact_hessian if curvature == "hessian" else exact_ggn)(problem)
    V = _block(op.size, 6)
    assert torch.allclose(op @ V, dense @ V, rtol=1e-9, atol=1e-11)
