"""Honest eigenvalues on hard spectra: every value flagged converged is within its tolerance of the
truth, and every reported error bound covers the truth, on float32 spectra with large outliers,
repeated eigenvalues, clusters and exact zeros (dense float64 truth, ``torch.linalg.eigvalsh``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import hesscli
from hesscli.algorithms import lanczos_eigs
from hesscli.algorithms.lanczos import breakdown_tol, lanczos_run
from hesscli.algorithms.slq import slq
from hesscli.errors import ConvergenceWarning
from hesscli.operators.base import DenseOperator

from tests.dense import F64, gen, symmetric


def linreg_hessian(scale: float, n: int = 256, d: int = 40, seed: int = 0) -> torch.Tensor:
    """Mean-MSE linear regression with a bias, first feature scaled: ``H = 2/N [X 1]ᵀ[X 1]``,
    λ_max ≈ 2·scale², the rest of the spectrum 0.8–3.8."""
    X = torch.randn(n, d, generator=gen(seed), dtype=F64)
    X[:, 0] *= scale
    X = torch.cat([X, torch.ones(n, 1, dtype=F64)], 1)
    return 2 / n * X.T @ X


def kron_hessian(k: int, n: int = 100, d: int = 30, seed: int = 1) -> torch.Tensor:
    """Multi-output linear regression, mean MSE over N·K outputs: ``2/(NK) kron(I_K, XᵀX)``, every
    eigenvalue ``K`` times."""
    X = torch.randn(n, d, generator=gen(seed), dtype=F64)
    return 2 / (n * k) * torch.kron(torch.eye(k, dtype=F64), X.T @ X)


def truth_of(eigs: torch.Tensor, k: int, which: str) -> torch.Tensor:
    s = torch.sort(eigs).values
    top = s.flip(0)[:k] if which in ("largest", "both") else s[:0]
    bottom = s[:k] if which in ("smallest", "both") else s[:0]
    return torch.cat([top, bottom])


def assert_honest(r, truth: torch.Tensor, tol: float) -> None:
    """Each reported bound covers the truth; each converged value is within ``tol·|λ|`` of it, or,
    marked at the floor, within its bound of zero."""
    got = torch.tensor(r.eigenvalues, dtype=F64)
    bound = torch.tensor(r.error_bounds, dtype=F64)
    err = (got - truth).abs()
    slack = 4 * torch.finfo(F64).eps * float(truth.abs().max())  # the dense truth's own rounding
    assert bool((err <= bound + slack).all()), (err, bound)
    for e, t, g, b, conv, zero in zip(err.tolist(), truth.tolist(), got.tolist(), bound.tolist(), r.converged,
                                      r.at_floor):
        if conv and not zero:
            assert e <= tol * abs(t) + slack, (g, t, e, b)
        if conv and zero:
            assert abs(g) <= b and abs(t) <= 2 * b


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------- float32 outliers
@pytest.mark.parametrize("scale", [10.0, 100.0, 300.0, 1000.0, 3000.0, 30000.0],
                         ids=lambda s: f"ratio=1e{round(math.log10(2 * s * s / 3))}")
@pytest.mark.parametrize("which", ["both", "smallest", "largest"])
def test_float32_outliers_never_flag_a_wrong_value(scale, which):
    """λ_max / bulk from 1e2 to 1e9 in float32: no false invariant-subspace stop, no wrong value
    flagged converged; values float32 cannot resolve say so."""
    H = linreg_hessian(scale)
    eigs = torch.linalg.eigvalsh(H)
    for tol in (1e-4, 1e-6):
        r = quiet(lanczos_eigs, DenseOperator(H.float()), k=3, which=which, tol=tol, generator=gen(2))
        assert_honest(r, truth_of(eigs, 3, which), tol)


def test_float32_outlier_example_reports_the_bulk_honestly():
    """The reported case: λ_max ≈ 1.8e5 over a bulk at 0.84-3.8. Before, λ_min came out as 2.1
    (147 % off) flagged converged after 2 products."""
    H = linreg_hessian(300.0)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    with pytest.warns(ConvergenceWarning, match="float32"):
        r = lanczos_eigs(DenseOperator(H.float()), k=1, which="both", generator=gen(0))
    assert r.n_hvp > 6  # no stop after a couple of products
    assert abs(r.eigenvalues[1] - lam_min) <= r.error_bounds[1]
    assert abs(r.eigenvalues[1] - lam_min) <= 0.05 * lam_min  # the bulk is found, to float32's floor
    assert r.converged == (True, False)  # λ_max to 1e-4; λ_min is below float32's resolution here
    r64 = lanczos_eigs(DenseOperator(H), k=1, which="both", generator=gen(0), tol=1e-8)
    assert all(r64.converged) and abs(r64.eigenvalues[1] - lam_min) <= 1e-8 * lam_min


def test_float32_outliers_through_a_model():
    """The same problem as an ``nn.Linear`` model with MSE through the CLI's operator path: the
    reported bounds cover the exact eigenvalues, and the condition number is never flagged from a
    wrong λ_min."""
    torch.manual_seed(0)
    X = torch.randn(256, 40, generator=gen(0), dtype=F64)
    X[:, 0] *= 300.0
    y = torch.randn(256, 1, generator=gen(5), dtype=F64)
    model = nn.Linear(40, 1).double()
    H = 2 / 256 * torch.cat([X, torch.ones(256, 1, dtype=F64)], 1).T @ torch.cat([X, torch.ones(256, 1, dtype=F64)], 1)
    eigs = torch.linalg.eigvalsh(H)
    r = quiet(hesscli.eigs, model, "mse", (X.float(), y.float()), top_k=3, which="both", dtype="float32")
    assert_honest(r, truth_of(eigs, 3, "both"), 1e-4)
    e = quiet(hesscli.extremes, model, "mse", (X.float(), y.float()), dtype="float32")
    assert abs(e.lambda_min - float(eigs[0])) <= 0.05 * float(eigs[0])
    assert not e.converged  # λ_min = 0.84 is below float32's resolution next to λ_max = 1.8e5
    e64 = hesscli.extremes(model, "mse", (X, y), dtype="float64", tol=1e-8)
    assert e64.converged and e64.lambda_min == pytest.approx(float(eigs[0]), rel=1e-9)
    assert e64.condition_number == pytest.approx(float(eigs[-1] / eigs[0]), rel=1e-8)


@pytest.mark.parametrize("scale", [30.0, 100.0, 300.0])
def test_float32_density_keeps_the_bulk(scale):
    """SLQ does not stop on a false invariant subspace: the bulk 6e2-6e4× below the outlier keeps
    its nodes and its weight (a bulk 1e6× below is at float32's rounding level)."""
    H = linreg_hessian(scale)
    eigs = torch.linalg.eigvalsh(H)
    r = slq(DenseOperator(H.float()), iters=20, runs=3, generator=gen(0))
    bulk_hi = float(eigs[-2]) * 1.05 + 1e-3 * float(eigs[-1])
    for run in range(3):
        in_bulk = r.weights[run][r.nodes[run] <= bulk_hi]
        assert int((in_bulk > 1e-8).sum()) >= 10  # before: 1-2 nodes
        mass = float(in_bulk.sum())
        assert 0.7 <= mass <= 1.0  # 40 of 41 eigenvalues; one Gaussian start vector
    assert breakdown_tol(torch.float32) < 1e-6  # far below a 1e-5 coupling to a bulk 1e5× down


# ---------------------------------------------------------------------------------------- multiplicities
@pytest.mark.parametrize("mult", [2, 3, 4])
def test_repeated_eigenvalues_come_with_their_multiplicity(mult):
    H = kron_hessian(mult)
    eigs = torch.linalg.eigvalsh(H)
    k = 2 * mult + 1
    r = lanczos_eigs(DenseOperator(H), k=k, generator=gen(0), max_iter=800)
    truth = truth_of(eigs, k, "largest")
    got = torch.tensor(r.eigenvalues, dtype=F64)
    assert torch.allclose(got, truth, rtol=1e-8, atol=0), (got, truth)
    assert all(r.converged)
    assert_honest(r, truth, 1e-10)
    small = lanczos_eigs(DenseOperator(H), k=mult + 1, which="smallest", generator=gen(1), max_iter=800)
    assert torch.allclose(torch.tensor(small.eigenvalues, dtype=F64), truth_of(eigs, mult + 1, "smallest"),
                          rtol=1e-8, atol=0)


def test_repeated_top_eigenvalues_of_the_reported_case():
    """``eigs --top-k 5`` on kron(I_3, XᵀX): before, 6.12, 5.37, 3.25, … all flagged converged."""
    H = kron_hessian(3)
    eigs = torch.linalg.eigvalsh(H)
    r = lanczos_eigs(DenseOperator(H), k=5, generator=gen(0))
    top = eigs.flip(0)
    assert torch.allclose(torch.tensor(r.eigenvalues, dtype=F64), top[:5], rtol=1e-8, atol=0)
    assert r.eigenvalues[0] == pytest.approx(r.eigenvalues[2], rel=1e-10)  # three copies
    assert r.eigenvalues[3] == pytest.approx(r.eigenvalues[4], rel=1e-10)  # and two of the next


@pytest.mark.parametrize("seed", range(4))
def test_multiplicities_and_clusters_mixed(seed):
    """Copies (2-4) next to clusters of distinct values and a Hessian-like bulk, both ends."""
    g = gen(50 + seed)
    eigs = torch.cat([torch.tensor([9.0] * 2 + [7.0] * 3 + [5.0, 4.999, 4.998] + [-2.0] * 4, dtype=F64),
                      torch.randn(300, generator=g, dtype=F64) * 0.1])
    A = DenseOperator(symmetric(eigs, seed))
    r = lanczos_eigs(A, k=7, which="both", generator=gen(seed), max_iter=2000)
    truth = truth_of(eigs, 7, "both")
    assert_honest(r, truth, 1e-10)
    assert all(r.converged)
    assert torch.allclose(torch.tensor(r.eigenvalues, dtype=F64), truth, rtol=1e-8, atol=1e-8)


def test_unresolved_copies_are_flagged_not_converged():
    """A budget too small to check for further copies: the values that copies could displace are
    not flagged converged (a flag never comes from "the run stopped")."""
    H = kron_hessian(4)
    eigs = torch.linalg.eigvalsh(H)
    with pytest.warns(ConvergenceWarning):
        r = lanczos_eigs(DenseOperator(H), k=6, generator=gen(0), max_iter=30)
    assert_honest(r, truth_of(eigs, 6, "largest"), 1e-10)
    assert not all(r.converged)
    assert math.isinf(r.error_bounds[-1])  # which eigenvalue it is, is not known


# ---------------------------------------------------------------------------------------- flags and floors
@pytest.mark.parametrize("seed", range(5))
def test_flags_come_from_bounds_after_invariant_subspaces(seed):
    """Low-rank and few-valued spectra (exhausted Krylov spaces, the old "locked" pairs): every
    flag holds against the truth, and every true residual is within the reported one."""
    g = gen(seed)
    U = torch.randn(120, 5, generator=g, dtype=F64)
    M = U @ torch.diag(torch.tensor([4.0, 4.0, 2.0, 1.0, -1.0], dtype=F64)) @ U.T
    eigs = torch.linalg.eigvalsh(M)
    for which in ("largest", "smallest", "both"):
        r = quiet(lanczos_eigs, DenseOperator(M), k=3, which=which, generator=gen(seed), return_vectors=True)
        assert_honest(r, truth_of(eigs, 3, which), 1e-10)
        V, lam = r.eigenvectors, torch.tensor(r.eigenvalues, dtype=F64)
        true_res = torch.linalg.vector_norm(M @ V - V * lam, dim=0)
        assert bool((true_res <= torch.tensor(r.residuals, dtype=F64) * (1 + 1e-6) + 1e-14).all())


def test_float64_zero_eigenvalues_are_at_the_floor():
    """A PSD matrix with exact zeros (fewer samples than parameters): the smallest values are
    reported as zero within a floor of the order of eps·||A||, not to 1e-17."""
    X = torch.randn(20, 60, generator=gen(7), dtype=F64)
    H = 2 / 20 * X.T @ X
    norm = float(torch.linalg.eigvalsh(H)[-1])
    r = lanczos_eigs(DenseOperator(H), k=3, which="smallest", generator=gen(0))
    eps = torch.finfo(F64).eps
    assert all(r.at_floor) and all(r.converged)
    for value, bound in zip(r.eigenvalues, r.error_bounds):
        assert abs(value) <= bound
        assert eps * norm <= bound <= 1e4 * eps * norm
    assert eps * norm <= r.floor <= 1e4 * eps * norm
    top = lanczos_eigs(DenseOperator(H), k=2, generator=gen(0))
    assert not any(top.at_floor) and all(top.converged)


def test_eigs_table_and_console_say_which_values_are_at_the_floor(tmp_path):
    """The ``eigs`` table carries each value's error bound and an ``at_floor`` mark."""
    import pandas as pd

    from hesscli.results.tables import outcome_rows

    X = torch.randn(20, 60, generator=gen(7), dtype=F64)
    model = nn.Linear(60, 1, bias=False).double()
    y = torch.randn(20, 1, generator=gen(8), dtype=F64)
    r = hesscli.eigs(model, "mse", (X, y), top_k=2, which="both", dtype="float64")
    assert r.at_floor == (False, False, True, True)
    from hesscli.api import failed_outcome  # noqa: F401  (the public API the CLI writes from)
    from hesscli.results.records import Outcome, RunInfo

    run = RunInfo(run_id="r", checkpoint="c", checkpoint_sha256="", step=None, analysis="eigs", backend="native",
                  method="lanczos", curvature="hessian", device="cpu", dtype="float64", seed=0, n_params=60,
                  n_samples=20, loss_value=0.0, n_hvp=r.n_hvp, seconds=0.0, hesscli_version="", torch_version="",
                  started_at="")
    rows = pd.DataFrame(outcome_rows(Outcome(run, r))["eigs"])
    assert list(rows["at_floor"]) == [False, False, True, True]
    assert bool((rows["error_bound"] >= (rows["eigenvalue"].abs())).iloc[2:].all())


def test_a_single_vector_run_still_serves_the_density():
    H = linreg_hessian(10.0)
    run = lanczos_run(DenseOperator(H), k=1, which="both", generator=gen(0), keep_tridiagonal=12)
    assert run.alphas is not None and run.alphas.shape == (12,)
    block = lanczos_run(DenseOperator(H), k=2, which="both", generator=gen(0), keep_tridiagonal=12)
    assert block.alphas is None  # a block run's steps are no single-vector quadrature
