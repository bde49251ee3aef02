"""Trace estimators on dense matrices with known spectra: probes, Hutchinson, Hutch++, exact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hesscli.algorithms import dense_matrix, exact_trace, hutchinson, hutchpp, probes
from hesscli.errors import ConvergenceWarning, InputError
from hesscli.operators.base import DenseOperator

from tests.dense import F64, gen, symmetric


GROUPS = {"w1": slice(0, 10), "b1": slice(10, 14), "w2": slice(14, 40)}


def grouped_operator(seed: int = 0) -> tuple[DenseOperator, torch.Tensor]:
    M = symmetric(torch.linspace(-2.0, 6.0, 40), seed)
    return DenseOperator(M, groups=GROUPS), M


def block_traces(M: torch.Tensor) -> dict[str, float]:
    return {name: float(M[sl, sl].diagonal().sum()) for name, sl in GROUPS.items()}


# ---------------------------------------------------------------- probes


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_probes_do_not_depend_on_how_they_are_split(distribution):
    whole = probes(50, 7, generator=gen(3), dtype=F64, device="cpu", distribution=distribution)
    g = gen(3)
    parts = [probes(50, b, generator=g, dtype=F64, device="cpu", distribution=distribution) for b in (2, 4, 1)]
    assert whole.shape == (50, 7)
    assert torch.equal(whole, torch.cat(parts, dim=1))


def test_probes_rademacher_entries_and_dtype():
    z = probes(1000, 3, generator=gen(), dtype=torch.float32, device="cpu")
    assert z.dtype == torch.float32
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 0.1  # 3000 fair signs: sd of the mean is 0.018


def test_probes_normal_moments():
    z = probes(20000, 2, generator=gen(), dtype=F64, device="cpu", distribution="normal")
    assert abs(float(z.mean())) < 0.03 and abs(float(z.var()) - 1) < 0.05


def test_probes_reject_bad_input():
    with pytest.raises(InputError, match="distribution='uniform'"):
        probes(3, 1, generator=gen(), dtype=F64, device="cpu", distribution="uniform")
    with pytest.raises(InputError, match="torch.Generator"):
        probes(3, 1, generator=0, dtype=F64, device="cpu")


# ---------------------------------------------------------------- Hutchinson


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    d = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=F64)
    r = hutchinson(DenseOperator(torch.diag(d)), n_probes=20, generator=gen())
    assert r.estimate == pytest.approx(float(d.sum()), abs=1e-14)
    assert r.stderr == pytest.approx(0.0, abs=1e-14)
    assert r.method == "hutchinson" and r.n_probes == 20 and r.converged


def test_hutchinson_confidence_interval_is_calibrated():
    eigs = torch.linspace(-1.0, 3.0, 30)
    A, truth = DenseOperator(symmetric(eigs)), float(eigs.sum())
    seeds = range(250)
    covered = sum(r.ci_low <= truth <= r.ci_high for r in (hutchinson(A, n_probes=20, generator=gen(s)) for s in seeds))
    assert 0.90 <= covered / len(seeds) <= 0.99


def test_hutchinson_interval_is_student_t_around_the_mean():
    from scipy.stats import t

    A, _ = grouped_operator()
    r = hutchinson(A, n_probes=12, generator=gen(), confidence=0.9)
    half = float(t.ppf(0.95, 11)) * r.stderr
    assert r.ci_low == pytest.approx(r.estimate - half) and r.ci_high == pytest.approx(r.estimate + half)


def test_hutchinson_stderr_is_sample_std_over_sqrt_n():
    A, M = grouped_operator()
    Z = probes(40, 24, generator=gen(5), dtype=F64, device="cpu")
    samples = (Z * (M @ Z)).sum(0)
    r = hutchinson(A, n_probes=24, generator=gen(5), block_size=5)
    assert r.estimate == pytest.approx(float(samples.mean()), rel=1e-12)
    assert r.stderr == pytest.approx(float(samples.std()) / math.sqrt(24), rel=1e-10)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_group_traces_are_unbiased_and_sum_to_total(distribution):
    A, M = grouped_operator()
    truth = block_traces(M)
    for seed in range(4):
        r = hutchinson(A, n_probes=300, generator=gen(seed), distribution=distribution, block_size=64)
        assert [g.name for g in r.groups] == list(GROUPS)
        assert sum(g.estimate for g in r.groups) == pytest.approx(r.estimate, rel=1e-12, abs=1e-12)
        for g in r.groups:
            assert abs(g.estimate - truth[g.name]) < 4 * g.stderr, (seed, g)
            assert g.ci_low < g.estimate < g.ci_high
        assert abs(r.estimate - float(M.trace())) < 4 * r.stderr


def test_hutchinson_single_group_reports_no_groups():
    r = hutchinson(DenseOperator(symmetric([1.0, 2.0, 3.0])), n_probes=4, generator=gen())
    assert r.groups == ()


def test_hutchinson_tol_stops_early_and_reaches_target():
    A = DenseOperator(symmetric(torch.linspace(1.0, 3.0, 40)))
    r = hutchinson(A, n_probes=5000, generator=gen(), tol=0.01, block_size=8)
    assert r.converged
    assert 16 <= r.n_probes < 5000 and r.n_probes % 8 == 0
    assert r.stderr <= 0.01 * abs(r.estimate)
    assert r.n_hvp == r.n_probes


def test_hutchinson_tol_needs_two_blocks_and_ten_probes():
    A = DenseOperator(torch.eye(5, dtype=F64) * 2)  # zero variance: tol met at the first check
    assert hutchinson(A, n_probes=100, generator=gen(), tol=0.1, block_size=4).n_probes == 12
    assert hutchinson(A, n_probes=100, generator=gen(), tol=0.1, block_size=16).n_probes == 32


def test_hutchinson_tol_not_reached_warns_and_flags():
    A = DenseOperator(symmetric(torch.linspace(-1.0, 1.2, 40)))
    with pytest.warns(ConvergenceWarning, match="above tol"):
        r = hutchinson(A, n_probes=40, generator=gen(), tol=1e-6)
    assert not r.converged and r.n_probes == 40 and r.n_hvp == 40


def test_hutchinson_block_size_and_seed():
    A, _ = grouped_operator()
    runs = [hutchinson(A, n_probes=37, generator=gen(7), block_size=b) for b in (1, 5, 64)]
    for r in runs[1:]:
        assert r.estimate == pytest.approx(runs[0].estimate, rel=1e-12)
        assert r.stderr == pytest.approx(runs[0].stderr, rel=1e-10)
    again = hutchinson(A, n_probes=37, generator=gen(7), block_size=5)
    assert again == runs[1]
    assert hutchinson(A, n_probes=37, generator=gen(8)).estimate != runs[0].estimate


def test_hutchinson_counts_products():
    A, _ = grouped_operator()
    A.n_matvecs = 11
    r = hutchinson(A, n_probes=23, generator=gen(), block_size=4)
    assert r.n_hvp == 23 and A.n_matvecs == 34


def test_hutchinson_single_probe_has_infinite_error_bar():
    r = hutchinson(DenseOperator(symmetric([1.0, 2.0])), n_probes=1, generator=gen())
    assert math.isinf(r.stderr) and r.ci_low == -math.inf and r.ci_high == math.inf


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_probes": 0}, "n_probes=0"),
        ({"n_probes": 4, "block_size": 0}, "block_size=0"),
        ({"n_probes": 4, "tol": -1.0}, "tol=-1.0"),
        ({"n_probes": 4, "confidence": 1.5}, "confidence=1.5"),
    ],
)
def test_hutchinson_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        hutchinson(DenseOperator(torch.eye(3, dtype=F64)), generator=gen(), **kwargs)


# ---------------------------------------------------------------- Hutch++


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    eigs = [5.0, -2.0, 1.0, 0.25]
    r = hutchpp(DenseOperator(symmetric(eigs)), n_matvecs=15, generator=gen())
    assert r.estimate == pytest.approx(sum(eigs), abs=1e-12)
    assert r.stderr == pytest.approx(0.0, abs=1e-12)
    assert r.method == "hutch++" and r.n_hvp == 15 and r.n_probes == 15


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    eigs = 1.0 / torch.arange(1, 201, dtype=F64) ** 2
    A, truth = DenseOperator(symmetric(eigs, 1)), float(eigs.sum())
    seeds = range(20)
    err_h = sum(abs(hutchinson(A, n_probes=60, generator=gen(s)).estimate - truth) for s in seeds)
    err_pp = sum(abs(hutchpp(A, n_matvecs=60, generator=gen(s)).estimate - truth) for s in seeds)
    assert err_pp < 0.2 * err_h


def test_hutchpp_interval_is_calibrated():
    eigs = 1.0 / torch.arange(1, 61, dtype=F64)
    A, truth = DenseOperator(symmetric(eigs, 2)), float(eigs.sum())
    seeds = range(200)
    covered = sum(r.ci_low <= truth <= r.ci_high for r in (hutchpp(A, n_matvecs=30, generator=gen(s)) for s in seeds))
    assert 0.88 <= covered / len(seeds) <= 0.995


def test_hutchpp_group_traces_are_unbiased_and_sum_to_total():
    A, M = grouped_operator(3)
    truth = block_traces(M)
    for seed in range(4):
        r = hutchpp(A, n_matvecs=60, generator=gen(seed))
        assert [g.name for g in r.groups] == list(GROUPS)
        assert sum(g.estimate for g in r.groups) == pytest.approx(r.estimate, rel=1e-12, abs=1e-12)
        for g in r.groups:
            assert abs(g.estimate - truth[g.name]) < 4 * g.stderr, (seed, g)
        assert abs(r.estimate - float(M.trace())) < 4 * r.stderr


@pytest.mark.parametrize("m", [3, 4, 10, 11, 50])
def test_hutchpp_spends_exactly_its_budget(m):
    A, _ = grouped_operator()
    r = hutchpp(A, n_matvecs=m, generator=gen(), block_size=4)
    assert r.n_hvp == m == A.n_matvecs


def test_hutchpp_small_budget_falls_back_to_hutchinson():
    A, _ = grouped_operator()
    r = hutchpp(A, n_matvecs=2, generator=gen(4))
    assert r.method == "hutchinson" and r.n_hvp == 2
    assert r == hutchinson(DenseOperator(A.matrix, groups=GROUPS), n_probes=2, generator=gen(4))


def test_hutchpp_block_size_and_seed():
    A, _ = grouped_operator()
    a = hutchpp(A, n_matvecs=40, generator=gen(9), block_size=3)
    b = hutchpp(A, n_matvecs=40, generator=gen(9), block_size=64)
    assert a.estimate == pytest.approx(b.estimate, rel=1e-10)
    assert a.stderr == pytest.approx(b.stderr, rel=1e-8)
    assert hutchpp(A, n_matvecs=40, generator=gen(9), block_size=3) == a


# ---------------------------------------------------------------- exact


def test_exact_trace_and_groups():
    A, M = grouped_operator()
    r = exact_trace(A, block_size=7)
    assert r.estimate == pytest.approx(float(M.trace()), rel=1e-12, abs=1e-12)
    assert r.stderr == 0 and r.ci_low == r.ci_high == r.estimate
    assert r.method == "exact" and r.n_probes == 40 and r.n_hvp == 40 == A.n_matvecs
    truth = block_traces(M)
    assert {g.name: g.estimate for g in r.groups} == pytest.approx(truth, rel=1e-12)
    assert sum(g.estimate for g in r.groups) == pytest.approx(r.estimate, rel=1e-12)


def test_exact_trace_with_groups_that_do_not_cover_the_vector():
    M = symmetric(torch.linspace(1.0, 2.0, 10))
    A = DenseOperator(M, groups={"a": slice(0, 3), "b": slice(5, 8)})
    r = exact_trace(A)
    assert r.estimate == pytest.approx(float(M.trace()), rel=1e-12)
    assert r.groups[1].estimate == pytest.approx(float(M.diagonal()[5:8].sum()), rel=1e-12)


def test_dense_matrix_recovers_the_matrix():
    M = symmetric(torch.linspace(-1.0, 1.0, 13))
    A = DenseOperator(M)
    D = dense_matrix(A, block_size=4)
    assert torch.allclose(D, M, atol=1e-14) and torch.equal(D, D.T)
    assert A.n_matvecs == 13


def test_exact_trace_float32_operator():
    M = symmetric(torch.linspace(0.5, 1.5, 20))
    r = exact_trace(DenseOperator(M.float()))
    assert r.estimate == pytest.approx(float(M.trace()), rel=1e-6)


def test_algorithms_do_not_depend_on_torch_nn():
    import hesscli.algorithms as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "torch.nn" not in text and "from torch import nn" not in text, path.name
