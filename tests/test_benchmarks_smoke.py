"""The benchmark suite's machinery on a tiny workload (1 repeat), so ``make bench`` cannot rot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.reference import wasserstein
from benchmarks.run import run_suite


def _row(results: dict, task: str, library: str, prefix: str) -> dict:
    rows = [r for r in results["workloads"]["tiny"]["rows"]
            if r["task"] == task and r["library"] == library and r["call"].startswith(prefix)]
    assert len(rows) == 1, (task, library, prefix)
    return rows[0]


def test_suite_runs_every_library_counts_products_and_writes_the_report(tmp_path):
    out_json, out_md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    results = run_suite(["tiny"], repeats=1, smoke=True, out_json=out_json, out_md=out_md,
                        cache_dir=tmp_path / "cache", threads=1)

    assert json.loads(out_json.read_text())["workloads"]["tiny"]["info"]["n_params"] == 610
    ref = results["workloads"]["tiny"]["reference"]
    assert ref["method"].startswith("exact")

    # hesscli: accurate against the exact float64 Hessian, and its own n_hvp matches the wrapper's count
    top1 = _row(results, "top-1", "hesscli", "eigs --top-k 1")
    assert top1["status"] == "ok" and top1["error"] < 1e-4
    assert top1["reported_hvp"] is None or top1["reported_hvp"] == top1["n_hvp"]
    assert _row(results, "min-eig", "hesscli", "eigs --top-k 1 --which smallest")["error"] < 1e-3
    density = _row(results, "density", "hesscli", "density --runs 1 --iters 20")
    assert density["n_hvp"] == 20 and density["error"] < 0.05

    # one Lanczos run serving eigs, extremes and an SLQ run: fewer products, the same accuracy
    shared = _row(results, "scan", "hesscli", "eigs + extremes + density, one shared")
    separate = _row(results, "scan", "hesscli", "the same three analyses run separately")
    assert shared["n_hvp"] < separate["n_hvp"] and shared["n_hvp"] == shared["reported_hvp"]
    assert shared["error"] < 1e-3 and separate["error"] < 1e-3

    # the counting wrappers see every peer's products
    assert _row(results, "density", "pyhessian", "density(iter=20)")["n_hvp"] == 20  # one HVP per step
    assert _row(results, "top-1", "eigenthings", "lanczos(k=1)")["n_hvp"] == 2  # max_iter = min(2k, n-1)
    assert _row(results, "top-1", "curvlinops", "eigsh")["n_hvp"] > 2  # + 2 determinism-check products
    assert _row(results, "top-1", "pyhessian", "eigenvalues")["n_hvp"] >= 2
    assert _row(results, "trace", "backpack", "DiagHessian")["error"] < 1e-4  # exact diagonal

    sweeps = {s["library"]: s for s in results["workloads"]["tiny"]["sweeps"]}
    assert sweeps["hesscli"]["met"] and sweeps["hesscli"]["error"] <= sweeps["hesscli"]["goal"]
    assert len(sweeps["pyhessian"]["curve"]["n"]) >= 2

    text = out_md.read_text()
    for needle in ("## Targets", "## Unit costs", "## tiny:", "| top-1 | hesscli |", "| trace | backpack |"):
        assert needle in text


def test_wasserstein_distance_of_simple_measures():
    assert wasserstein(np.array([0.0]), np.array([1.0]), np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert wasserstein(np.array([0.0, 1.0]), np.array([0.5, 0.5]), np.array([0.5]), np.array([2.0])) == pytest.approx(0.5)
    assert wasserstein(np.array([2.0, 0.0]), np.array([1.0, 3.0]), np.array([0.0, 2.0]), np.array([3.0, 1.0])) == 0.0
