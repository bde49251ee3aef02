"""End to end: the analysis commands and the Python API against exact answers (float64)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import hesscli
from hesscli.cli import app
from tests.cases import mlp_ce
from tests.reference import exact_hessian

runner = CliRunner()


def _exact(tiny):
    from hesscli.loading import problem_from_python

    problem = problem_from_python(tiny.model, "cross_entropy", (tiny.inputs, tiny.targets),
                                  hesscli.config.Settings(dtype="float64"))
    return torch.linalg.eigvalsh(exact_hessian(problem))


def _invoke(tiny, *args):
    result = runner.invoke(app, [*args, str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data,
                                 "--dtype", "float64", "--out", str(tiny.folder / "out"), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_eigs_both_ends_match_exact(tiny):
    lam = _exact(tiny)
    doc = _invoke(tiny, "eigs", "--top-k", "3", "--which", "both")
    r = doc["result"]
    got = dict(zip(zip(r["which"], r["rank"]), r["eigenvalues"]))
    for i in range(3):
        assert got[("largest", i + 1)] == pytest.approx(float(lam[-1 - i]), rel=1e-8)
        assert got[("smallest", i + 1)] == pytest.approx(float(lam[i]), rel=1e-8, abs=1e-12)
    assert all(r["converged"]) and max(r["residuals"]) < 1e-5 * float(lam.abs().max())
    eigs = pd.read_parquet(tiny.folder / "out" / "eigs")
    assert len(eigs) == 6 and set(eigs.which) == {"largest", "smallest"}
    runs = pd.read_parquet(tiny.folder / "out" / "runs")
    assert runs.loc[0, "analysis"] == "eigs" and runs.loc[0, "n_params"] == 43 and runs.loc[0, "status"] == "ok"


def test_cli_exact_trace_and_extremes(tiny):
    lam = _exact(tiny)
    trace = _invoke(tiny, "trace", "--method", "exact")["result"]
    assert trace["estimate"] == pytest.approx(float(lam.sum()), rel=1e-10)
    assert sum(g["estimate"] for g in trace["groups"]) == pytest.approx(trace["estimate"], rel=1e-12)
    ext = _invoke(tiny, "extremes")["result"]
    assert ext["lambda_max"] == pytest.approx(float(lam[-1]), rel=1e-8)
    assert ext["lambda_min"] == pytest.approx(float(lam[0]), rel=1e-8)
    assert ext["condition_number"] == pytest.approx(abs(float(lam[-1] / lam[0])), rel=1e-7)


def test_cli_density_tables_and_plot(tiny):
    doc = _invoke(tiny, "density", "--iters", "12", "--runs", "3", "--grid", "200")
    lam = _exact(tiny)
    nodes = torch.tensor(doc["result"]["nodes"], dtype=torch.float64)
    assert nodes.min() >= lam[0] - 1e-8 and nodes.max() <= lam[-1] + 1e-8
    dens = pd.read_parquet(tiny.folder / "out" / "density")
    grid = torch.tensor(dens.grid.to_numpy())
    assert float(torch.trapezoid(torch.tensor(dens.density.to_numpy()), grid)) == pytest.approx(1, abs=1e-6)
    ritz = pd.read_parquet(tiny.folder / "out" / "ritz")
    assert ritz.groupby("run").weight.sum().to_numpy() == pytest.approx(1.0)
    result = runner.invoke(app, ["plot", str(tiny.folder / "out")])
    assert result.exit_code == 0, result.output
    assert "density.png" in result.output


def test_cli_backend_refusal_is_exit_2(tiny):
    result = runner.invoke(app, ["eigs", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data,
                                 "--backend", "backpack", "--out", str(tiny.folder / "out")])
    assert isinstance(result.exception, hesscli.UnsupportedAnalysis)  # main() maps it to exit 2
    assert result.exception.exit_code == 2 and "backpack cannot run 'eigs'" in str(result.exception)
    assert not (tiny.folder / "out" / "runs").exists()


def test_cli_trace_default_method_is_hutchpp_with_error_bar(tiny):
    r = _invoke(tiny, "trace", "--probes", "30")
    assert r["run"]["method"] == "hutch++" and r["result"]["n_hvp"] == 30
    assert r["result"]["ci_low"] < r["result"]["estimate"] < r["result"]["ci_high"]


def test_python_api_matches_exact_and_leaves_model_alone():
    problem = mlp_ce()
    model = problem.model
    x = torch.cat([b[0] for b in problem.data.batches])
    y = torch.cat([b[1] for b in problem.data.batches])
    lam = torch.linalg.eigvalsh(exact_hessian(problem))
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    e = hesscli.eigs(model, "cross_entropy", (x, y), top_k=2, which="both", dtype="float64")
    assert e.eigenvalues[0] == pytest.approx(float(lam[-1]), rel=1e-8)
    t = hesscli.trace(model, "cross_entropy", (x, y), method="exact", dtype="float64")
    assert t.estimate == pytest.approx(float(lam.sum()), rel=1e-10)
    x_ = hesscli.extremes(model, "cross_entropy", (x, y), dtype="float64")
    assert x_.lambda_min == pytest.approx(float(lam[0]), rel=1e-8)
    d = hesscli.density(model, "cross_entropy", (x, y), iters=10, runs=2, dtype="float64")
    assert d.weights.sum(dim=1) == pytest.approx(torch.ones(2, dtype=torch.float64))
    for n, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n]
    with pytest.raises(hesscli.InputError, match="unknown option"):
        hesscli.trace(model, "cross_entropy", (x, y), probez=3)


def test_version_and_help_list_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("info", "trace", "eigs", "extremes", "density", "scan", "plot"):
        assert cmd in result.output
