"""Stochastic Lanczos quadrature and broadening on dense matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import wasserstein_distance

from hesscli.algorithms import broaden, probes, slq
from hesscli.errors import InputError
from hesscli.operators.base import DenseOperator
from tests.dense import F64, gen, symmetric

# A bulk on [-0.5, 1.5] plus outliers on both sides, like a Hessian with negative curvature.
SPECTRUM = torch.cat([
    torch.rand(390, generator=gen(5), dtype=F64) * 2 - 0.5,
    torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, -1.5, -2.0, -3.0], dtype=F64),
])
RUNS, ITERS = 10, 40


@pytest.fixture(scope="module")
def case():
    M = symmetric(SPECTRUM, 2)
    A = DenseOperator(M)
    return M, A, slq(A, iters=ITERS, runs=RUNS, generator=gen())


def test_shapes_dtypes_and_product_count(case):
    _, A, r = case
    assert r.nodes.shape == r.weights.shape == r.alphas.shape == (RUNS, ITERS)
    assert r.betas.shape == (RUNS, ITERS - 1)
    for t in (r.nodes, r.weights, r.alphas, r.betas, r.grid, r.density):
        assert t.dtype == F64 and t.device.type == "cpu"
    assert r.n_hvp == RUNS * ITERS == A.n_matvecs


def test_density_integrates_to_one_on_an_even_grid(case):
    _, _, r = case
    assert r.grid.shape == r.density.shape == (1000,)
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-12)
    steps = r.grid.diff()
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)
    assert bool((r.density >= 0).all())
    assert r.grid[0] < r.nodes.min() and r.grid[-1] > r.nodes.max()


def test_nodes_lie_in_the_spectrum_and_weights_sum_to_one(case):
    _, _, r = case
    span = float(SPECTRUM.max() - SPECTRUM.min())
    assert float(r.nodes.min()) >= float(SPECTRUM.min()) - 1e-10 * span
    assert float(r.nodes.max()) <= float(SPECTRUM.max()) + 1e-10 * span
    assert torch.allclose(r.weights.sum(1), torch.ones(RUNS, dtype=F64), atol=1e-12)
    assert bool((r.weights >= 0).all())


def test_nodes_and_weights_are_the_quadrature_of_the_tridiagonal(case):
    _, _, r = case
    for run in range(RUNS):
        T = torch.diag(r.alphas[run]) + torch.diag(r.betas[run], 1) + torch.diag(r.betas[run], -1)
        theta, S = torch.linalg.eigh(T)
        assert torch.allclose(theta, r.nodes[run], atol=1e-12)
        assert torch.allclose(S[0] ** 2, r.weights[run], atol=1e-12)


def test_quadrature_trace_matches_the_probes_and_the_mean_eigenvalue(case):
    M, _, r = case
    n = M.shape[0]
    per_run = (r.weights * r.nodes).sum(1)
    z = probes(n, RUNS, generator=gen(), dtype=F64, device="cpu")  # the start vectors slq drew
    assert torch.allclose(per_run, (z * (M @ z)).sum(0) / n, rtol=1e-10)
    # Var(zᵀ M z) = 2 Σ_{i≠j} M_ij² for Rademacher z.
    se = math.sqrt(2 * float((M**2).sum() - (M.diagonal() ** 2).sum()) / RUNS) / n
    assert abs(float(per_run.mean()) - float(SPECTRUM.mean())) < 4 * se


def test_slq_measure_is_close_to_the_true_spectrum(case):
    _, _, r = case
    w1 = wasserstein_distance(r.nodes.flatten().numpy(), SPECTRUM.numpy(), r.weights.flatten().numpy())
    assert w1 < 0.01 * float(SPECTRUM.max() - SPECTRUM.min())


def test_density_has_mass_where_the_spectrum_is(case):
    _, _, r = case
    in_bulk = (r.grid >= -0.5) & (r.grid <= 1.5)
    mass = float(torch.trapezoid(r.density * in_bulk, r.grid))
    assert mass == pytest.approx(390 / 400, abs=0.1)


def test_broaden_reproduces_the_density(case):
    _, _, r = case
    x, p, sigma = broaden(r.nodes, r.weights)
    assert torch.equal(x, r.grid) and torch.equal(p, r.density) and sigma == r.sigma
    span = 1.1 * float(r.nodes.max() - r.nodes.min())  # the node range with its 5% margins
    assert sigma == pytest.approx(span / ((ITERS - 1) * math.sqrt(8 * math.log(3))), rel=1e-12)
    x2, p2, s2 = broaden(r.nodes, r.weights, sigma=0.05, grid=300)
    assert s2 == 0.05 and x2.shape == (300,)
    assert float(torch.trapezoid(p2, x2)) == pytest.approx(1.0, abs=1e-12)


def test_explicit_sigma_is_used():
    A = DenseOperator(symmetric(torch.linspace(0.0, 1.0, 30)))
    r = slq(A, iters=8, runs=2, generator=gen(), sigma=0.02, grid=50)
    assert r.sigma == 0.02 and r.grid.shape == (50,)


def test_same_seed_and_block_size_do_not_change_the_result(case):
    M, _, r = case
    A = DenseOperator(M)
    again = slq(A, iters=ITERS, runs=RUNS, generator=gen())
    assert torch.equal(again.nodes, r.nodes) and torch.equal(again.density, r.density)
    for block in (1, 3):
        other = slq(A, iters=ITERS, runs=RUNS, generator=gen(), block_size=block)
        assert torch.allclose(other.nodes, r.nodes, atol=1e-10)
        assert torch.allclose(other.weights, r.weights, atol=1e-10)
    assert A.n_matvecs == 3 * RUNS * ITERS


class Recording(DenseOperator):
    """A dense operator that records the width of every product."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix)
        self.widths: list[int] = []

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.widths.append(V.shape[1])
        return super()._matmat(V)


@pytest.mark.parametrize("together", [1, 3, RUNS])
def test_runs_in_groups_are_the_same_runs(case, together):
    """Groups of runs one after the other: the same start vectors, the same quadratures (each
    run is independent), products of one column per run of the group."""
    M, _, r = case
    A = Recording(M)
    grouped = slq(A, iters=ITERS, runs=RUNS, generator=gen(), together=together)
    assert torch.allclose(grouped.nodes, r.nodes, atol=1e-10) and torch.allclose(grouped.weights, r.weights, atol=1e-10)
    assert grouped.n_hvp == RUNS * ITERS
    sizes = [min(together, RUNS - r0) for r0 in range(0, RUNS, together)]
    assert A.widths == [w for w in sizes for _ in range(ITERS)]


def test_runs_in_groups_with_deflation_and_a_first_run():
    M = symmetric(SPECTRUM, 2)
    vals, vecs = torch.linalg.eigh(M)
    top = (vals[-3:], vecs[:, -3:])
    a = slq(DenseOperator(M), iters=15, runs=4, generator=gen(1), deflate=top)
    b = slq(DenseOperator(M), iters=15, runs=4, generator=gen(1), deflate=top, together=1)
    assert torch.allclose(a.nodes, b.nodes, atol=1e-10) and torch.allclose(a.weights, b.weights, atol=1e-10)
    first = (a.alphas[0, :15], a.betas[0, :14])
    c = slq(DenseOperator(M), iters=15, runs=4, generator=gen(2), first_run=first)
    d = slq(DenseOperator(M), iters=15, runs=4, generator=gen(2), first_run=first, together=2)
    assert c.n_hvp == d.n_hvp == 45 and torch.allclose(c.nodes, d.nodes, atol=1e-10)


def test_breakdown_stops_runs_early_and_pads_with_zero_weight():
    eigs = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 5.0], dtype=F64)
    A = DenseOperator(symmetric(eigs, 8))
    r = slq(A, iters=10, runs=3, generator=gen())
    assert r.n_hvp == 3 * 3 == A.n_matvecs  # three distinct eigenvalues: three steps per run
    assert torch.allclose(r.nodes[:, :3], torch.tensor([1.0, 2.0, 5.0], dtype=F64).expand(3, 3), atol=1e-12)
    assert torch.equal(r.weights[:, 3:], torch.zeros(3, 7, dtype=F64))
    assert torch.equal(r.betas[:, 2:], torch.zeros(3, 7, dtype=F64))
    assert torch.allclose(r.weights.sum(1), torch.ones(3, dtype=F64), atol=1e-12)
    assert bool((r.nodes <= 5.0 + 1e-12).all())
    # The padded tridiagonal keeps the same quadrature.
    for run in range(3):
        T = torch.diag(r.alphas[run]) + torch.diag(r.betas[run], 1) + torch.diag(r.betas[run], -1)
        assert torch.allclose(torch.linalg.eigvalsh(T), torch.sort(r.nodes[run]).values, atol=1e-12)


def test_float32_operator():
    M = symmetric(SPECTRUM, 2)
    r = slq(DenseOperator(M.float()), iters=20, runs=3, generator=gen())
    assert r.nodes.dtype == F64
    assert float(r.nodes.max()) <= 12.0 * (1 + 1e-5) and float(r.nodes.min()) >= -3.0 * (1 + 1e-5)
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iters": 0}, "iters=0"),
        ({"runs": 0}, "runs=0"),
        ({"sigma": 0.0}, "sigma=0.0"),
        ({"grid": 1}, "grid=1"),
        ({"block_size": 0}, "block_size=0"),
        ({"together": 0}, "together=0"),
        ({"together": 1.5}, "together=1.5"),
    ],
)
def test_slq_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        slq(DenseOperator(torch.eye(4, dtype=F64)), generator=gen(), **kwargs)


def test_broaden_rejects_mismatched_shapes():
    with pytest.raises(InputError, match="must be matching"):
        broaden(torch.zeros(2, 3), torch.zeros(3, 2))


def test_broaden_a_point_mass():
    x, p, _ = broaden(torch.tensor([2.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert float(x[int(p.argmax())]) == pytest.approx(2.0, abs=float(x[1] - x[0]))
    assert float(torch.trapezoid(p, x)) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- moments of the smoothed density

# A Hessian-like spectrum: a bulk around zero, a few large outliers, some negative curvature; its
# mean (0.13) is small next to its range, so a density cut off at the grid's edge shows at once.
SKEWED = torch.cat([
    torch.rand(290, generator=gen(11), dtype=F64) * 1.0 - 0.4,
    torch.tensor([4.0, 7.0, 11.0, -1.0], dtype=F64),
])


def _moments(r) -> tuple[list[float], list[float]]:
    """Zeroth to second moments of the smoothed density (trapezoid on its grid) and of the
    quadrature (run average of Σ w θ^k, plus σ² for the second: the Gaussians' own variance)."""
    smooth = [float(torch.trapezoid(r.density * r.grid**k, r.grid)) for k in range(3)]
    quad = [float((r.weights * r.nodes**k).sum(1).mean()) for k in range(3)]
    quad[2] += r.sigma**2
    return smooth, quad


@pytest.mark.parametrize("iters", [4, 10, 20, 80])
def test_smoothed_density_has_the_moments_of_the_quadrature(iters):
    r = slq(DenseOperator(symmetric(SKEWED, 4)), iters=iters, runs=3, generator=gen(1))
    smooth, quad = _moments(r)
    scale = float(r.nodes.max() - r.nodes.min()) + r.sigma
    assert smooth[0] == pytest.approx(1.0, abs=1e-12)
    assert abs(smooth[1] - quad[1]) <= 1e-7 * scale, (smooth, quad)
    assert abs(smooth[2] - quad[2]) <= 1e-7 * scale**2, (smooth, quad)
    # the quadrature's mean is the mean eigenvalue up to the start vectors' noise
    assert abs(quad[1] - float(SKEWED.mean())) < 0.1 * float(SKEWED.std())


@pytest.mark.parametrize("iters", [4, 10, 80])
def test_smoothed_density_is_the_gaussian_mixture_before_renormalising(iters):
    # The renormalisation to a unit integral must be a no-op up to rounding: the grid holds all of
    # every Gaussian, so the mixture's mass on the grid is already 1.
    r = slq(DenseOperator(symmetric(SKEWED, 4)), iters=iters, runs=3, generator=gen(2))
    z = (r.grid.unsqueeze(0).unsqueeze(0) - r.nodes.unsqueeze(2)) / r.sigma  # [runs, M, grid]
    mixture = (r.weights.unsqueeze(2) * torch.exp(-0.5 * z * z)).sum(1).mean(0) / (r.sigma * math.sqrt(2 * math.pi))
    assert torch.allclose(r.density, mixture, rtol=1e-7, atol=1e-9 * float(mixture.max()))
    reach = (float(r.nodes.min() - r.grid[0]), float(r.grid[-1] - r.nodes.max()))
    assert min(reach) >= 6 * r.sigma * (1 - 1e-12)


def test_broaden_covers_a_sigma_wider_than_the_spectrum():
    nodes = torch.tensor([[0.0, 1.0, 10.0]], dtype=F64)
    weights = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    x, p, sigma = broaden(nodes, weights, sigma=25.0, grid=2000)
    assert sigma == 25.0
    assert float(x[0]) <= -6 * 25.0 and float(x[-1]) >= 10.0 + 6 * 25.0
    mean = float(torch.trapezoid(p * x, x))
    second = float(torch.trapezoid(p * x * x, x))
    assert mean == pytest.approx(2.3, rel=1e-7)  # 0.3·1 + 0.2·10
    assert second == pytest.approx(0.3 + 0.2 * 100 + 25.0**2, rel=1e-7)


def test_broaden_keeps_the_padding_when_sigma_is_narrow():
    nodes = torch.linspace(-1.0, 3.0, 80, dtype=F64)
    x, _, sigma = broaden(nodes, torch.full((80,), 1 / 80, dtype=F64))
    assert 6 * sigma < 0.05 * 4.0
    assert float(x[0]) == pytest.approx(-1.0 - 0.05 * 4.0, rel=1e-12)
    assert float(x[-1]) == pytest.approx(3.0 + 0.05 * 4.0, rel=1e-12)
