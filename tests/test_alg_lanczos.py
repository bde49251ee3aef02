"""Lanczos eigensolver and extremes on dense matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from hesscli.algorithms import extremes, lanczos_eigs
from hesscli.errors import ConvergenceWarning, InputError
from hesscli.operators.base import DenseOperator

from tests.dense import F64, gen, symmetric


# An indefinite spectrum: a bulk in [-3, 5] and separated outliers at both ends.
INDEFINITE = torch.cat([
    torch.linspace(-3.0, 5.0, 290, dtype=F64),
    torch.tensor([8.0, 9.0, 10.0, 11.0, 12.0, -5.0, -6.0, -7.0, -8.0, -9.0], dtype=F64),
])


def expected(eigs: torch.Tensor, k: int, which: str) -> list[float]:
    s = torch.sort(eigs).values
    top = s.flip(0)[:k].tolist() if which in ("largest", "both") else []
    bottom = s[:k].tolist() if which in ("smallest", "both") else []
    return top + bottom


def assert_close(values, truth, rel=1e-6):
    """Within ``rel`` of the truth (the default ``tol`` bounds each eigenvalue's relative error)."""
    assert len(values) == len(truth)
    for v, t in zip(values, truth):
        assert abs(v - t) <= rel * max(abs(t), 1e-12), (values, truth)


@pytest.mark.parametrize("ncv", [None, 12], ids=["ncv=default", "ncv=12"])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_eigenvalues_at_each_end(which, ncv):
    A = DenseOperator(symmetric(INDEFINITE))
    r = lanczos_eigs(A, k=5, which=which, generator=gen(), ncv=ncv)
    assert_close(r.eigenvalues, expected(INDEFINITE, 5, which))
    assert all(r.converged)
    ends = {"largest": ["largest"] * 5, "smallest": ["smallest"] * 5, "both": ["largest"] * 5 + ["smallest"] * 5}
    assert list(r.which) == ends[which]
    assert list(r.rank) == list(range(1, 6)) * (2 if which == "both" else 1)
    assert r.n_iter == r.n_hvp == A.n_matvecs
    if ncv == 12:
        assert r.n_iter > 12  # the basis was restarted, not grown


@pytest.mark.parametrize("which", ["largest", "both"])
def test_residual_estimates_match_true_residuals(which):
    M = symmetric(INDEFINITE, 1)
    tol = 1e-6
    r = lanczos_eigs(DenseOperator(M), k=4, which=which, tol=tol, generator=gen(1), ncv=14, return_vectors=True)
    V, lam = r.eigenvectors, torch.tensor(r.eigenvalues, dtype=F64)
    assert V.shape == (300, len(lam))
    true = torch.linalg.vector_norm(M @ V - V * lam, dim=0)
    est = torch.tensor(r.residuals, dtype=F64)
    assert torch.allclose(est, true, rtol=1e-6, atol=1e-11)
    truth = torch.tensor(expected(INDEFINITE, 4, which), dtype=F64)
    assert bool(((lam - truth).abs() <= tol * truth.abs()).all())  # the tolerance is on the eigenvalues
    assert bool(((lam - truth).abs() <= est).all())  # and each residual bounds its error
    assert torch.allclose(V.T @ V, torch.eye(len(lam), dtype=F64), atol=1e-10)


def test_thick_restart_converges_to_the_same_values():
    eigs = torch.linspace(0.0, 1.0, 400, dtype=F64) ** 3 * 10 - 1
    A = DenseOperator(symmetric(eigs, 2))
    full = lanczos_eigs(A, k=6, generator=gen(), ncv=200)
    restarted = lanczos_eigs(A, k=6, generator=gen(), ncv=16, max_iter=600)
    assert restarted.n_iter > 16 and all(restarted.converged)
    assert_close(restarted.eigenvalues, full.eigenvalues, rel=2e-6)
    assert_close(restarted.eigenvalues, expected(eigs, 6, "largest"))


def test_clustered_eigenvalues():
    eigs = torch.cat([torch.tensor([10.0, 9.99, 9.98], dtype=F64), torch.linspace(-1.0, 1.0, 200, dtype=F64)])
    r = lanczos_eigs(DenseOperator(symmetric(eigs, 3)), k=3, generator=gen())
    assert_close(r.eigenvalues, [10.0, 9.99, 9.98])


def test_repeated_eigenvalues_are_found_with_their_multiplicity():
    eigs = torch.tensor([5.0] * 4 + [2.0] * 3 + [-1.0] * 193, dtype=F64)
    A = DenseOperator(symmetric(eigs, 4))
    r = lanczos_eigs(A, k=5, generator=gen())
    assert_close(r.eigenvalues, [5.0, 5.0, 5.0, 5.0, 2.0])
    assert all(r.converged) and r.n_iter < 30
    small = lanczos_eigs(A, k=3, which="smallest", generator=gen(), ncv=8, return_vectors=True)
    assert_close(small.eigenvalues, [-1.0, -1.0, -1.0])
    V = small.eigenvectors
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=F64), atol=1e-10)  # three independent copies


def test_invariant_subspace_of_a_low_rank_matrix_is_exact():
    U = torch.randn(100, 2, generator=gen(3), dtype=F64)
    M = U @ U.T
    r = lanczos_eigs(DenseOperator(M), k=2, generator=gen(), return_vectors=True)
    assert_close(r.eigenvalues, torch.linalg.eigvalsh(M).flip(0)[:2].tolist(), rel=1e-12)
    assert all(r.converged) and r.n_iter <= 6
    V, lam = r.eigenvectors, torch.tensor(r.eigenvalues, dtype=F64)
    true = torch.linalg.vector_norm(M @ V - V * lam, dim=0)
    assert max(r.residuals) <= 1e-12 * r.eigenvalues[0] and float(true.max()) <= 1e-12 * r.eigenvalues[0]


def test_small_operator_runs_to_an_exact_answer():
    eigs = torch.tensor([3.0, 1.0, -2.0, 0.5, 7.0], dtype=F64)
    A = DenseOperator(symmetric(eigs, 5))
    r = lanczos_eigs(A, k=3, which="both", generator=gen())
    assert_close(r.eigenvalues, [7.0, 3.0, 1.0, -2.0, 0.5, 1.0], rel=1e-12)
    assert r.n_iter <= 5 and all(r.converged)
    one = lanczos_eigs(DenseOperator(torch.tensor([[-4.0]], dtype=F64)), k=1, which="both", generator=gen())
    assert one.eigenvalues == (-4.0, -4.0) and one.n_iter == 1


def test_budget_exhausted_warns_and_flags():
    A = DenseOperator(symmetric(INDEFINITE))
    with pytest.warns(ConvergenceWarning, match="raise max_iter"):
        r = lanczos_eigs(A, k=3, max_iter=6, generator=gen())
    assert r.n_iter == 6 == A.n_matvecs and not all(r.converged)
    assert len(r.eigenvalues) == 3


def test_same_seed_same_result_and_counter():
    A = DenseOperator(symmetric(INDEFINITE))
    A.n_matvecs = 5
    a = lanczos_eigs(A, k=3, which="both", generator=gen(11), ncv=10)
    b = lanczos_eigs(A, k=3, which="both", generator=gen(11), ncv=10)
    assert a == b
    assert A.n_matvecs == 5 + a.n_hvp + b.n_hvp


def test_float32_operator():
    A = DenseOperator(symmetric(INDEFINITE).float())
    r = lanczos_eigs(A, k=3, which="both", generator=gen(), return_vectors=True)
    assert_close(r.eigenvalues, expected(INDEFINITE, 3, "both"), rel=1e-5)
    assert r.eigenvectors.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k=0"),
        ({"k": 9}, "k=9"),
        ({"k": 2, "which": "LM"}, "which='LM'"),
        ({"k": 2, "tol": 0.0}, "tol=0.0"),
        ({"k": 2, "which": "both", "ncv": 5}, "ncv=5"),
        ({"k": 3, "max_iter": 2}, "max_iter=2"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        lanczos_eigs(DenseOperator(torch.eye(8, dtype=F64)), generator=gen(), **kwargs)


def test_extremes_on_an_indefinite_matrix():
    A = DenseOperator(symmetric(INDEFINITE))
    r = extremes(A, generator=gen())
    assert r.lambda_max == pytest.approx(12.0, rel=1e-8)
    assert r.lambda_min == pytest.approx(-9.0, rel=1e-8)
    assert r.condition_number == pytest.approx(12.0 / 9.0, rel=1e-8)
    assert r.negative_ratio == pytest.approx(9.0 / 12.0, rel=1e-8)
    assert r.converged and r.n_hvp == A.n_matvecs
    assert r.residual_max <= 1e-6 * 12 and r.residual_min <= 1e-6 * 9


def test_extremes_of_definite_and_zero_matrices():
    psd = extremes(DenseOperator(symmetric(torch.linspace(0.5, 4.0, 30), 6)), generator=gen())
    assert psd.negative_ratio == 0.0 and psd.condition_number == pytest.approx(8.0, rel=1e-8)
    nd = extremes(DenseOperator(symmetric(torch.linspace(-4.0, -1.0, 30), 7)), generator=gen())
    assert nd.negative_ratio == math.inf and nd.condition_number == pytest.approx(0.25, rel=1e-8)
    zero = extremes(DenseOperator(torch.zeros(3, 3, dtype=F64)), generator=gen())
    assert (zero.lambda_max, zero.lambda_min) == (0.0, 0.0)
    assert zero.condition_number == math.inf and zero.negative_ratio == 0.0 and zero.converged


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
def test_converged_values_meet_the_tolerance(seed, tol):
    """Calibration: a value reported converged is within ``tol·|λ|`` of the true eigenvalue, on
    Hessian-like spectra (a dense bulk near zero, outliers at both ends), with restarts too."""
    g = gen(100 + seed)
    eigs = torch.cat([torch.randn(380, generator=g, dtype=F64) * 0.05,
                      torch.rand(15, generator=g, dtype=F64) * 5 + 1, -torch.rand(5, generator=g, dtype=F64) * 0.3])
    A = DenseOperator(symmetric(eigs, seed))
    true = torch.sort(eigs).values
    for ncv in (None, 20):
        r = lanczos_eigs(A, k=3, which="both", tol=tol, max_iter=2000, generator=gen(seed), ncv=ncv)
        assert all(r.converged)
        got = torch.tensor(r.eigenvalues, dtype=F64)
        truth = torch.cat([true.flip(0)[:3], true[:3]])
        floor = math.sqrt(torch.finfo(F64).eps) * float(true.abs().max())
        assert bool(((got - truth).abs() <= tol * torch.clamp(truth.abs(), min=floor)).all()), (ncv, got - truth)


def test_small_eigenvalue_next_to_a_cluster_stops_on_its_error_bound():
    """The negative end of a Hessian: λ_min = -1e-3 next to a dense cluster around 0, λ_max = 1.

    A residual test ``r <= tol·|θ|`` asks for r <= 1e-9 here; the eigenvalue is accurate long
    before (error ~ r² / gap), and the run stops then."""
    eigs = torch.cat([torch.tensor([1.0, 0.7, 0.5, -1e-3], dtype=F64),
                      torch.linspace(-2e-4, 2e-4, 296, dtype=F64)])
    A = DenseOperator(symmetric(eigs, 9))
    r = lanczos_eigs(A, k=1, which="smallest", tol=1e-6, generator=gen(3))
    assert r.converged == (True,)
    assert abs(r.eigenvalues[0] + 1e-3) <= 1e-6 * 1e-3
    assert r.residuals[0] > 1e-6 * 1e-3  # the residual alone would not have stopped it
    assert r.n_hvp < 200


@pytest.mark.parametrize("ncv", [None, 16])
def test_one_run_serves_unequal_ends(ncv):
    """``k_smallest``: the top 5 and λ_min from one run, as exact as two separate runs."""
    from hesscli.algorithms.lanczos import extremes_of, lanczos_run

    A = DenseOperator(symmetric(INDEFINITE))
    run = lanczos_run(A, k=5, which="both", k_smallest=1, generator=gen(), ncv=ncv, max_iter=1000)
    r = run.result
    assert r.which == ("largest",) * 5 + ("smallest",) and all(r.converged)
    assert_close(r.eigenvalues, expected(INDEFINITE, 5, "largest") + [-9.0])
    e = extremes_of(r, n_hvp=0)
    assert (e.lambda_max, e.lambda_min, e.n_hvp) == (r.eigenvalues[0], r.eigenvalues[-1], 0)
    with pytest.raises(InputError, match="k_smallest"):
        lanczos_run(A, k=2, which="largest", k_smallest=1, generator=gen())


def test_kept_tridiagonal_is_the_lanczos_matrix_of_the_start_vector():
    """The first ``s`` steps of an eigensolver run are a plain Lanczos run: same T_s as SLQ builds
    from the same unit start vector, whose quadrature reproduces the moments ``v₀ᵀ Aʲ v₀``."""
    from hesscli.algorithms.lanczos import lanczos_run

    M = symmetric(INDEFINITE, 2)
    run = lanczos_run(DenseOperator(M), k=1, which="smallest", generator=gen(5), keep_tridiagonal=12)
    assert run.result.n_iter > 12 and run.alphas.shape == (12,) and run.betas.shape == (11,)
    v0 = torch.randn(300, generator=gen(5), dtype=F64)  # the run's Gaussian start vector
    v0 /= v0.norm()
    T = torch.diag(run.alphas) + torch.diag(run.betas, 1) + torch.diag(run.betas, -1)
    theta, S = torch.linalg.eigh(T)
    w = S[0] ** 2
    for j in range(1, 2 * 12):  # Gauss quadrature with 12 nodes is exact up to degree 23
        moment = float(v0 @ torch.linalg.matrix_power(M, j) @ v0)
        assert math.isclose(float((w * theta**j).sum()), moment, rel_tol=1e-8, abs_tol=1e-8 * 12.0**j)
    longer = lanczos_run(DenseOperator(M), k=1, generator=gen(5), keep_tridiagonal=60)
    plain = lanczos_eigs(DenseOperator(M), k=1, generator=gen(5))
    assert plain.n_iter < 60 and longer.result.n_iter == 60 and longer.alphas.shape == (60,)  # went on for it
    assert torch.allclose(longer.alphas[:12], run.alphas)  # the same Krylov process
    assert abs(longer.result.eigenvalues[0] - 12.0) <= 1e-10 * 12
    short = lanczos_run(DenseOperator(M), k=1, generator=gen(5), keep_tridiagonal=400)
    assert short.alphas is None  # 400 steps do not fit in the basis (ncv 100): not kept
