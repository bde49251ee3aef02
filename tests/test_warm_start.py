"""Warm starts along a series of checkpoints: Lanczos from the previous Ritz vectors, Hutch++ from
the previous sketch. Checked against exact spectra and traces: the values, bounds and flags stay
those of a cold run (hard spectra, float32, a wrong or stale start), and the carried sketch keeps
the trace unbiased and calibrated while lowering its error."""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from hesscli.algorithms.hutchpp import hutchpp, hutchpp_run
from hesscli.algorithms.lanczos import lanczos_run
from hesscli.cli import app
from hesscli.config import Settings
from hesscli.errors import ConvergenceWarning, InputError
from hesscli.operators.base import DenseOperator
from hesscli.scan import run_scan
from tests.dense import F64, gen

N = 160


def _series(spectrum: torch.Tensor, steps: int, *, drift: float = 0.003, seed: int = 0) -> list[torch.Tensor]:
    """Matrices ``R_t Q diag(λ (1 + t/100)) Qᵀ R_tᵀ`` whose eigenvectors turn slowly (``R_t = exp(t·drift·K)``)."""
    n = len(spectrum)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(100 + seed), dtype=F64)).Q
    K = torch.randn(n, n, generator=gen(200 + seed), dtype=F64)
    K = (K - K.T) / 2
    out = []
    for t in range(steps):
        V = torch.linalg.matrix_exp(t * drift * K) @ Q
        out.append((V * (spectrum * (1 + t / 100))) @ V.T)
    return out


def _hard_spectrum() -> torch.Tensor:
    """Outliers 1e3 above a bulk, a double value among them, a small negative tail."""
    g = gen(7)
    top = torch.tensor([900.0, 400.0, 400.0, 150.0, 90.0, 60.0], dtype=F64)
    bulk = torch.rand(N - 9, generator=g, dtype=F64) * 0.9
    neg = torch.tensor([-3.0, -0.8, -0.5], dtype=F64)
    return torch.cat([top, bulk, neg])


def _check_honest(r, M: torch.Tensor, k: int) -> None:
    """Every finite bound covers the true error of its value, and the converged values are the right ones."""
    true = torch.linalg.eigvalsh(M)
    top, bottom = true.flip(0)[:k].tolist(), true[:1].tolist()
    for value, bound, conv, which, rank in zip(r.eigenvalues, r.error_bounds, r.converged, r.which, r.rank):
        exact = (top if which == "largest" else bottom)[rank - 1]
        if math.isfinite(bound):
            assert abs(value - exact) <= bound * (1 + 1e-6) + 1e-12, (which, rank, value, exact, bound)
        if conv:
            assert abs(value - exact) <= bound * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_warm_lanczos_is_honest_along_a_series_and_spends_fewer_products(dtype):
    series = _series(_hard_spectrum(), 8)
    start, cold_total, warm_total = None, 0, 0
    for M in series:
        A = DenseOperator(M.to(dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            cold = lanczos_run(A, k=5, which="both", k_smallest=1, generator=gen(0)).result
            warm = lanczos_run(A, k=5, which="both", k_smallest=1, generator=gen(0), start=start,
                               return_vectors=True).result
        start = warm.eigenvectors
        _check_honest(cold, M, 5)
        _check_honest(warm, M, 5)
        assert warm.converged == cold.converged
        # the double value shows twice in both runs
        assert sum(abs(v - 400) < 400 * 0.2 for v in warm.eigenvalues[:5]) == 2
        cold_total += cold.n_hvp
        warm_total += warm.n_hvp
    assert warm_total < cold_total, (warm_total, cold_total)


def test_warm_start_that_misses_a_new_outlier_still_finds_it():
    """The previous checkpoint's top vectors know nothing of a direction that became the sharpest:
    the Gaussian share of the start vector reaches it, and the ranks stay right."""
    spectrum = _hard_spectrum()
    M0 = _series(spectrum, 1)[0]
    vals, vecs = torch.linalg.eigh(M0)
    prev = lanczos_run(DenseOperator(M0), k=5, which="both", k_smallest=1, generator=gen(0),
                       return_vectors=True).result
    # a bulk direction becomes the largest curvature
    u = vecs[:, N // 2]
    M1 = M0 + 2000.0 * torch.outer(u, u)
    r = lanczos_run(DenseOperator(M1), k=5, which="both", k_smallest=1, generator=gen(0),
                    start=prev.eigenvectors).result
    _check_honest(r, M1, 5)
    assert all(r.converged)
    assert abs(r.eigenvalues[0] - float(torch.linalg.eigvalsh(M1)[-1])) <= 1e-8 * 2000


def test_a_start_from_the_wrong_end_costs_products_not_correctness():
    M = _series(_hard_spectrum(), 1)[0]
    vecs = torch.linalg.eigh(M).eigenvectors
    r = lanczos_run(DenseOperator(M), k=5, which="both", k_smallest=1, generator=gen(0),
                    start=vecs[:, N // 2:N // 2 + 6]).result
    _check_honest(r, M, 5)
    assert all(r.converged)


def test_unusable_start_is_a_cold_run_and_a_wrong_shape_is_refused():
    M = _series(_hard_spectrum(), 1)[0]
    A = DenseOperator(M)
    cold = lanczos_run(A, k=3, which="largest", generator=gen(0)).result
    nan = lanczos_run(A, k=3, which="largest", generator=gen(0), start=torch.full((N, 2), math.nan, dtype=F64)).result
    assert nan.eigenvalues == cold.eigenvalues and nan.n_hvp == cold.n_hvp
    with pytest.raises(InputError, match="expected \\[160, j\\]"):
        lanczos_run(A, k=3, which="largest", generator=gen(0), start=torch.ones(N + 1, 2, dtype=F64))


def test_a_warm_run_gives_no_quadrature_run():
    M = _series(_hard_spectrum(), 1)[0]
    A = DenseOperator(M)
    cold = lanczos_run(A, k=1, which="both", generator=gen(0), keep_tridiagonal=20)
    warm = lanczos_run(A, k=1, which="both", generator=gen(0), keep_tridiagonal=20,
                       start=torch.linalg.eigh(M).eigenvectors[:, -2:])
    assert cold.alphas is not None and warm.alphas is None


# ------------------------------------------------------------------------------ Hutch++
def _decaying(n: int = 120) -> torch.Tensor:
    return 100.0 * torch.arange(1, n + 1, dtype=F64) ** -1.5 + 0.01


def test_hutchpp_with_a_given_sketch_is_unbiased_and_calibrated():
    """The sketch comes from another (the previous) matrix; the residual probes are fresh, so the
    estimate is unbiased and its interval covers the exact trace at its stated rate."""
    M0, M1 = _series(_decaying(), 2, drift=0.02)
    sketch = hutchpp_run(DenseOperator(M0), n_matvecs=30, generator=gen(99), keep_sketch=True).next_sketch
    assert sketch is not None and sketch.shape == (120, 10)
    exact = float(M1.trace())
    estimates, covered = [], 0
    for seed in range(400):
        r = hutchpp(DenseOperator(M1), n_matvecs=30, generator=gen(seed), sketch=sketch)
        assert r.n_hvp == 30
        estimates.append(r.estimate)
        covered += r.ci_low <= exact <= r.ci_high
    est = torch.tensor(estimates, dtype=F64)
    assert abs(float(est.mean()) - exact) <= 4 * float(est.std()) / math.sqrt(len(estimates))
    assert 0.91 <= covered / len(estimates) <= 0.99


def test_keep_sketch_returns_the_products_of_the_basis():
    M = _series(_decaying(), 1)[0]
    A = DenseOperator(M)
    run = hutchpp_run(A, n_matvecs=30, generator=gen(0), keep_sketch=True)
    assert run.result.n_hvp == 30 and run.next_sketch is not None
    # its columns are A q for an orthonormal basis q of a 10-dimensional space
    Q = torch.linalg.solve(M, run.next_sketch)
    assert torch.allclose(Q.T @ Q, torch.eye(10, dtype=F64), atol=1e-8)


def test_a_sketch_carried_along_a_series_lowers_the_error():
    """One step of subspace iteration per checkpoint: over a slowly changing series the carried
    sketch gives a smaller mean squared error than cold Hutch++ at the same products."""
    series = _series(_decaying(), 6, drift=0.002)
    sketch = None
    for M in series[:-1]:
        sketch = hutchpp_run(DenseOperator(M), n_matvecs=30, generator=gen(1), sketch=sketch,
                             keep_sketch=True).next_sketch
    M = series[-1]
    exact = float(M.trace())
    se_cold = se_warm = 0.0
    for seed in range(200):
        se_cold += (hutchpp(DenseOperator(M), n_matvecs=30, generator=gen(seed)).estimate - exact) ** 2
        se_warm += (hutchpp(DenseOperator(M), n_matvecs=30, generator=gen(seed), sketch=sketch).estimate - exact) ** 2
    assert se_warm < 0.5 * se_cold, (se_warm, se_cold)


def test_a_sketch_of_another_shape_is_a_cold_run():
    M = _series(_decaying(), 1)[0]
    cold = hutchpp(DenseOperator(M), n_matvecs=30, generator=gen(3))
    for shape in ((120, 11), (119, 10), (120, 0)):  # wider than a third of the budget, or another size
        other = hutchpp(DenseOperator(M), n_matvecs=30, generator=gen(3), sketch=torch.ones(*shape, dtype=F64))
        assert other.estimate == cold.estimate and other.stderr == cold.stderr


def test_a_narrower_sketch_serves_and_leaves_the_rest_to_the_residual():
    # a run with --tol may stop its sketch early (adaptive_sketch): what it carries is narrower
    series = _series(_decaying(), 2)
    sketch = hutchpp_run(DenseOperator(series[0]), n_matvecs=30, generator=gen(1), keep_sketch=True).next_sketch
    assert sketch is not None
    A = DenseOperator(series[1])
    run = hutchpp_run(A, n_matvecs=30, generator=gen(3), sketch=sketch[:, :6].clone(), keep_sketch=True)
    # the budget is spent: 6 products for A Q, 24 residual probes (a full-width sketch leaves 20)
    assert run.result.n_hvp == run.result.n_probes == 30
    assert run.next_sketch is not None and run.next_sketch.shape == (120, 6)
    # its columns are A q for an orthonormal basis q of the span of the 6 columns it was given
    Q = torch.linalg.solve(series[1], run.next_sketch)
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=F64), atol=1e-8)
    given = torch.linalg.qr(sketch[:, :6]).Q
    assert torch.allclose(given @ (given.T @ Q), Q, atol=1e-8)
    # unbiased over the residual probes, as with a full-width sketch
    exact = float(series[1].trace())
    est = torch.tensor([hutchpp(A, n_matvecs=30, generator=gen(seed), sketch=sketch[:, :6].clone()).estimate
                        for seed in range(300)], dtype=F64)
    assert abs(float(est.mean()) - exact) <= 4 * float(est.std()) / math.sqrt(len(est))


# ------------------------------------------------------------------------------ scans
MODEL_PY = textwrap.dedent(
    """
    from torch import nn

    def make():
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    """
)


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    """Six checkpoints of one short training run (small steps: the Hessian changes slowly)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "model.py").write_text(MODEL_PY)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 6, generator=g, dtype=F64), torch.randint(0, 3, (60,), generator=g)
    torch.save({"inputs": x, "targets": y}, d / "data.pt")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(6):
        torch.save({"model_state_dict": model.state_dict(), "step": step}, d / f"ckpt_{step:04d}.pt")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return d


def _scan(d: Path, out: Path, **kw) -> pd.DataFrame:
    settings = Settings(model=f"{d / 'model.py'}:make", data=str(d / "data.pt"), dtype="float64", top_k=4,
                        analyses=("trace", "eigs", "extremes"), probes=30, out=out, **kw)
    report = run_scan(d, settings)
    assert all(o.run.status == "ok" for o in report.outcomes)
    return report


def test_scan_warm_starts_agree_with_cold_runs_within_their_bounds(series_dir, tmp_path):
    warm = _scan(series_dir, tmp_path / "warm")
    cold = _scan(series_dir, tmp_path / "cold", warm_start=False)
    def by(report, analysis):
        return {Path(o.run.checkpoint).name: o for o in report.outcomes if o.run.analysis == analysis}
    w_eigs, c_eigs = by(warm, "eigs"), by(cold, "eigs")
    assert len(w_eigs) == 6
    for name, w in w_eigs.items():
        c = c_eigs[name].result
        for a, b, bound in zip(w.result.eigenvalues, c.eigenvalues, w.result.error_bounds):
            assert abs(a - b) <= 2 * max(bound, 1e-10 * abs(b)) + 1e-12
    assert sum(o.run.n_hvp for o in w_eigs.values()) <= sum(o.run.n_hvp for o in c_eigs.values())
    # the first checkpoint starts cold either way; the later traces use the carried sketch
    w_tr, c_tr = by(warm, "trace"), by(cold, "trace")
    first = sorted(w_tr)[0]
    assert w_tr[first].result.estimate == c_tr[first].result.estimate
    assert any(w_tr[n].result.estimate != c_tr[n].result.estimate for n in w_tr if n != first)
    assert all(o.run.n_hvp == 30 for o in w_tr.values())


def test_no_warm_start_flag(series_dir, tmp_path):
    def totals(*flags: str) -> pd.Series:
        out = tmp_path / "-".join(flags or ("default",))
        result = CliRunner().invoke(app, ["scan", str(series_dir), "--model", f"{series_dir / 'model.py'}:make",
                                          "--data", str(series_dir / "data.pt"), "--analyses", "trace",
                                          "--probes", "12", "--dtype", "float64", "--out", str(out), "--quiet",
                                          *flags])
        assert result.exit_code == 0, result.output
        t = pd.read_parquet(out / "trace")
        return t[t.param_group == "all"].sort_values("step").set_index("step").estimate

    warm, cold, again = totals(), totals("--no-warm-start"), totals("--warm-start")
    assert len(cold) == 6 and cold.iloc[0] == warm.iloc[0]
    assert (cold.iloc[1:] != warm.iloc[1:]).all()
    assert (again == warm).all()


def test_warm_starts_hand_items_over_only_for_the_same_size():
    from hesscli.runner import WarmStarts

    warm = WarmStarts()
    item = torch.ones(3, 2)
    warm.put("k", 3, item)
    assert warm.get("k", 4) is None and warm.get("k", 3) is item
    assert warm.take("k", 3) is item  # handed over: the taker may overwrite it
    assert warm.get("k", 3) is None and warm.take("k", 3) is None
    warm.put("k", 3, item)
    assert warm.take("k", 5) is None and warm.get("k", 3) is None  # a stale item is dropped
    warm.put("k", 3, item)
    warm.put("k", 3, None)
    assert warm.get("k", 3) is None
