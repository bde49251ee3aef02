"""One conformance suite for every backend against exact dense curvature on tiny float64 problems.

Every backend runs every analysis variant on every case and curvature through
``hesscli.api.analyse`` (so the api's capability check is part of the test). What a backend
cannot do is declared in :data:`UNSUPPORTED` and asserted to raise ``UnsupportedAnalysis``
(exit code 2) with a message naming the reason; what it can do is checked against the exact
Hessian/GGN of ``tests/reference.py`` to the accuracy declared in :data:`TOLERANCE`.
"""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

from hesscli.api import analyse, check_supported
from hesscli.backends import get_backend
from hesscli.config import Settings
from hesscli.errors import BackendUnavailable, ConvergenceWarning, UnsupportedAnalysis
from hesscli.loading.problem import Problem
from tests.cases import CASES, CE, make_problem, mlp_ce
from tests.reference import exact_ggn, exact_hessian

REPO = Path(__file__).resolve().parents[1]

BACKENDS = ("native", "pyhessian", "eigenthings", "backpack")
CURVATURES = ("hessian", "ggn")
BATCH = 16
"""Batch size of the suite's problems: two batches for most cases, the last one ragged."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread avoids OpenMP overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seq_cnn_bn(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    """A CNN with eval-mode BatchNorm written only with modules (the form BackPACK can follow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0]))
    x = torch.randn(17, 1, 4, 4, generator=torch.Generator().manual_seed(12))
    y = torch.randint(0, 3, (17,), generator=torch.Generator().manual_seed(13))
    return make_problem(model, CE, x, y, batch_size=batch_size, params=params)


def mlp_ce_head(batch_size: int = 7, params: tuple[str, ...] = ()) -> Problem:
    """``--params '2.*'``: the curvature block of the output layer only."""
    return mlp_ce(batch_size=batch_size, params=("2.*",))


ALL_CASES = {**CASES, "seq-cnn-bn": seq_cnn_bn, "mlp-ce-head": mlp_ce_head}

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "trace-exact": ("trace", {"method": "exact"}),
    "trace-hutchinson": ("trace", {"method": "hutchinson", "probes": 24}),
    "trace-hutch++": ("trace", {"method": "hutch++", "probes": 24}),
    "eigs-largest": ("eigs", {"top_k": 3, "which": "largest"}),
    "eigs-smallest": ("eigs", {"top_k": 3, "which": "smallest"}),
    "eigs-both": ("eigs", {"top_k": 2, "which": "both"}),
    "extremes": ("extremes", {}),
    "density": ("density", {"iters": 10, "runs": 8}),
}
"""Analysis variants and their options (small budgets: products are the cost)."""

# --------------------------------------------------------------------------- the declarations

UNSUPPORTED: dict[tuple[str, str, str, str], str] = {
    # (backend, case, variant, curvature) -> fragment of the UnsupportedAnalysis message; "*" matches all
    ("pyhessian", "*", "*", "ggn"): "--curvature ggn",
    ("pyhessian", "*", "trace-exact", "*"): "no trace --method exact",
    ("pyhessian", "*", "trace-hutch++", "*"): "no trace --method hutch++",
    ("pyhessian", "*", "eigs-smallest", "*"): "--which smallest",
    ("pyhessian", "*", "eigs-both", "*"): "--which both",
    ("pyhessian", "*", "extremes", "*"): "cannot run 'extremes'",
    ("eigenthings", "*", "trace-exact", "*"): "no trace --method exact",
    ("backpack", "*", "trace-hutchinson", "*"): "no trace --method hutchinson",
    ("backpack", "*", "trace-hutch++", "*"): "no trace --method hutch++",
    ("backpack", "*", "eigs-largest", "*"): "cannot run 'eigs'",
    ("backpack", "*", "eigs-smallest", "*"): "cannot run 'eigs'",
    ("backpack", "*", "eigs-both", "*"): "cannot run 'eigs'",
    ("backpack", "*", "extremes", "*"): "cannot run 'extremes'",
    ("backpack", "*", "density", "*"): "cannot run 'density'",
    ("backpack", "cnn-bn-ce", "trace-exact", "hessian"): "BatchNorm2d ('bn') is not supported by BackPACK DiagHessian",
    ("backpack", "cnn-bn-ce", "trace-exact", "ggn"): "torch.tanh",
    ("backpack", "seq-cnn-bn", "trace-exact", "hessian"): "BatchNorm2d ('1') is not supported by BackPACK DiagHessian",
    ("backpack", "tied-ae", "trace-exact", "*"): "'dec.weight' is the same tensor as 'enc.weight'",
}
"""What each backend refuses, and why (the message must contain the fragment)."""

TOLERANCE: dict[tuple[str, str], float] = {
    # exact methods: relative error of the trace
    ("native", "trace-exact"): 1e-8,
    ("backpack", "trace-exact"): 1e-8,
    # stochastic traces: |estimate - exact| <= z * stderr (seeded, so reproducible)
    ("native", "trace-hutchinson"): 4.0,
    ("native", "trace-hutch++"): 4.0,
    ("pyhessian", "trace-hutchinson"): 4.0,
    ("eigenthings", "trace-hutchinson"): 4.0,
    ("eigenthings", "trace-hutch++"): 4.0,
    # eigenvalues: error relative to max |λ|
    ("native", "eigs"): 1e-8,
    ("eigenthings", "eigs"): 1e-8,
    ("pyhessian", "eigs"): 0.1,  # power iteration, PyHessian's own tol 1e-3 on the change of λ
    ("native", "extremes"): 1e-8,
    ("eigenthings", "extremes"): 1e-8,
    # density: Wasserstein-1 distance of the SLQ measure to the spectrum, relative to its range
    ("native", "density"): 0.15,
    ("pyhessian", "density"): 0.15,
    ("eigenthings", "density"): 0.15,
}
"""Declared accuracy of each backend and analysis on the tiny cases."""


EIGEN_SEMANTICS: dict[str, str] = {
    "native": "krylov",
    "eigenthings": "krylov",
    "pyhessian": "magnitude",
}
"""How each backend's eigenvalues relate to the true spectrum.

``krylov``: the algebraic ends; a Lanczos process sees each *repeated* eigenvalue once, so on a
degenerate cluster (the null space of a cross-entropy head or of a GGN) it may return the next
distinct eigenvalues instead of further copies. ``magnitude``: the largest ``|λ|`` (power
iteration), labelled ``largest``."""


def declared(backend: str, case: str, variant: str, curvature: str) -> list[str]:
    """The declared refusal message fragments for a combination (empty when it must work)."""
    return [
        fragment
        for (b, c, v, k), fragment in UNSUPPORTED.items()
        if b == backend and c in ("*", case) and v in ("*", variant) and k in ("*", curvature)
    ]


# --------------------------------------------------------------------------- oracles


@functools.lru_cache(maxsize=None)
def _exact(case: str, curvature: str) -> torch.Tensor:
    problem = ALL_CASES[case](batch_size=BATCH)
    return exact_hessian(problem) if curvature == "hessian" else exact_ggn(problem)


def _problem(case: str) -> Problem:
    return ALL_CASES[case](batch_size=BATCH)


def _settings(backend: str, curvature: str, options: dict[str, Any], **extra: Any) -> Settings:
    return Settings(backend=backend, curvature=curvature, dtype="float64", seed=0, **{**options, **extra})


def _option_settings(backend: str, curvature: str, **options: Any) -> Settings:
    return _settings(backend, curvature, options)


def _run(problem: Problem, analysis: str, settings: Settings) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # PyHessian's loose stops are checked on the numbers
        return analyse(problem, analysis, settings).result


def w1(nodes: torch.Tensor, weights: torch.Tensor, spectrum: torch.Tensor) -> float:
    """Wasserstein-1 distance between the run-averaged SLQ measure and the uniform spectral measure."""
    return float(wasserstein_distance(nodes.flatten().numpy(), spectrum.numpy(), weights.flatten().numpy()))


def _check_trace(backend: str, variant: str, r: Any, H: torch.Tensor, problem: Problem) -> None:
    exact = float(torch.trace(H))
    tol = TOLERANCE[(backend, variant)]
    if variant == "trace-exact":
        assert abs(r.estimate - exact) <= tol * abs(exact) + 1e-12, (r.estimate, exact)
        assert r.stderr == 0 and r.ci_low == r.ci_high == r.estimate
        if len(problem.params) > 1:  # per-parameter traces are the exact diagonal blocks
            start = 0
            for g, (name, p) in zip(r.groups, problem.params.items()):
                block = float(torch.diagonal(H)[start:start + p.numel()].sum())
                assert g.name == name and abs(g.estimate - block) <= tol * abs(exact) + 1e-12
                start += p.numel()
    else:
        slack = 1e-10 * abs(exact)
        assert abs(r.estimate - exact) <= tol * r.stderr + slack, (r.estimate, r.stderr, exact)
        assert r.ci_low - slack <= r.estimate <= r.ci_high + slack
        assert r.n_probes >= 2 and r.n_hvp >= r.n_probes
    if r.groups:
        assert math.isclose(sum(g.estimate for g in r.groups), r.estimate, rel_tol=1e-9, abs_tol=1e-12)


def _check_eigs(backend: str, variant: str, r: Any, H: torch.Tensor, settings: Settings) -> None:
    true = torch.linalg.eigvalsh(H)
    scale = float(true.abs().max())
    k, which = settings.top_k, settings.which
    got = torch.tensor(r.eigenvalues, dtype=torch.float64)
    V = r.eigenvectors
    assert V is not None and V.shape == (H.shape[0], len(r.eigenvalues))
    # reported residuals are the true ||Hv - λv|| of the reported unit vectors
    V = V.to(torch.float64)
    assert torch.allclose(torch.linalg.vector_norm(V, dim=0), torch.ones(V.shape[1], dtype=torch.float64), atol=1e-8)
    true_res = torch.linalg.vector_norm(H @ V - V * got, dim=0)
    assert torch.allclose(true_res, torch.tensor(r.residuals, dtype=torch.float64), rtol=1e-5, atol=1e-10 * scale)
    # every value is within its residual of an eigenvalue (Krylov–Bogoliubov), whatever the method
    nearest = (got.unsqueeze(1) - true.unsqueeze(0)).abs().min(1).values
    assert bool((nearest <= true_res + 1e-10 * scale).all())
    tol = TOLERANCE[(backend, "eigs")]
    semantics = EIGEN_SEMANTICS[backend]
    candidates = []
    for spectrum in (true, _distinct(true, 1e-12 * scale)) if semantics == "krylov" else (true,):
        if semantics == "magnitude":
            candidates.append(spectrum[spectrum.abs().argsort(descending=True)][:k])
        elif which == "largest":
            candidates.append(spectrum.flip(0)[:k])
        elif which == "smallest":
            candidates.append(spectrum[:k])
        else:
            candidates.append(torch.cat([spectrum.flip(0)[:k], spectrum[:k]]))
    if which == "both":
        assert r.which == ("largest",) * k + ("smallest",) * k and r.rank == (1, 2, 1, 2)
    else:
        assert r.which == (which,) * k and r.rank == tuple(range(1, k + 1))
    # converged pairs to the declared tolerance; others (a loose stop) within their residual
    converged = torch.tensor(r.converged)
    bound = tol * scale + torch.where(converged, torch.zeros_like(true_res), true_res)
    assert any(
        c.shape == got.shape and bool(((got - c).abs() <= bound).all()) for c in candidates
    ), (got, candidates, r.residuals, r.converged)
    assert r.n_hvp >= r.n_iter > 0
    # where a backend states error bounds (native, and the peers from their measured residuals):
    # each covers the distance to the eigenvalue of its rank, and a converged value is within
    # its relative tolerance
    if r.error_bounds:
        stated = torch.tensor(r.error_bounds, dtype=torch.float64)
        slack = 4 * torch.finfo(torch.float64).eps * scale
        rel = settings.tol or (1e-3 if backend == "pyhessian" else 1e-10)  # each backend's default
        assert any(
            c.shape == got.shape
            and bool(((got - c).abs() <= stated + slack).all())
            and all((abs(g - t) <= rel * abs(t) + slack) or z for g, t, ok, z in
                    zip(got.tolist(), c.tolist(), r.converged, r.at_floor) if ok)
            for c in candidates
        ), (got, candidates, r.error_bounds, r.converged)


def _distinct(values: torch.Tensor, tol: float) -> torch.Tensor:
    """Sorted ``values`` with each cluster closer than ``tol`` kept once."""
    keep = [values[0]]
    for v in values[1:]:
        if v - keep[-1] > tol:
            keep.append(v)
    return torch.stack(keep)


def _check_extremes(backend: str, r: Any, H: torch.Tensor) -> None:
    true = torch.linalg.eigvalsh(H)
    scale = float(true.abs().max())
    tol = TOLERANCE[(backend, "extremes")]
    assert abs(r.lambda_max - float(true[-1])) <= tol * scale
    assert abs(r.lambda_min - float(true[0])) <= tol * scale
    # the reported residuals bound the errors (Krylov–Bogoliubov) and are small
    assert abs(r.lambda_max - float(true[-1])) <= r.residual_max + 1e-10 * scale
    assert abs(r.lambda_min - float(true[0])) <= r.residual_min + 1e-10 * scale
    assert r.residual_max <= 1e-4 * scale and r.residual_min <= 1e-4 * scale
    assert math.isclose(r.condition_number, abs(r.lambda_max) / abs(r.lambda_min), rel_tol=1e-12)
    expected_ratio = abs(r.lambda_min) / r.lambda_max if r.lambda_min < 0 else 0.0
    assert math.isclose(r.negative_ratio, expected_ratio, rel_tol=1e-12)


def _check_density(backend: str, r: Any, H: torch.Tensor) -> None:
    true = torch.linalg.eigvalsh(H)
    spread = float(true[-1] - true[0])
    assert math.isclose(float(torch.trapezoid(r.density, r.grid)), 1.0, rel_tol=1e-6)
    assert torch.allclose(r.weights.sum(1), torch.ones(r.weights.shape[0], dtype=torch.float64), atol=1e-8)
    slack = 1e-8 * spread
    live = r.weights > 0
    assert bool((r.nodes[live] >= true[0] - slack).all() and (r.nodes[live] <= true[-1] + slack).all())
    # the saved tridiagonals reproduce the nodes (so densities can be re-smoothed from them)
    for a, b, nodes in zip(r.alphas, r.betas, r.nodes):
        T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
        assert torch.allclose(torch.linalg.eigvalsh(T), nodes.sort().values, atol=1e-8 * spread)
    assert w1(r.nodes, r.weights, true) <= TOLERANCE[(backend, "density")] * spread
    # each run's quadrature integrates λ exactly: Σ w θ = vᵀHv for its unit Rademacher start
    # vector v = z/√n, an unbiased estimate of tr(H)/n with variance 2(‖H‖_F² - ‖diag H‖²)/n²
    first = (r.weights * r.nodes).sum(1)
    n = H.shape[0]
    stderr = math.sqrt(2 * float((H**2).sum() - (torch.diagonal(H) ** 2).sum()) / first.numel()) / n
    assert abs(float(first.mean()) - float(true.mean())) <= 4 * stderr + 1e-10 * spread
    assert r.n_hvp > 0


# --------------------------------------------------------------------------- the suite


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(ALL_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_conformance(backend: str, case: str, variant: str, curvature: str) -> None:
    analysis, options = VARIANTS[variant]
    extra = {"save_vectors": True} if analysis == "eigs" else {}
    settings = _settings(backend, curvature, options, **extra)
    problem = _problem(case)
    fragments = declared(backend, case, variant, curvature)
    if fragments:  # declared unsupported: refused before any work, with one line saying why
        with pytest.raises(UnsupportedAnalysis) as info:
            _run(problem, analysis, settings)
        message = str(info.value)
        assert any(f in message for f in fragments), (message, fragments)
        assert info.value.exit_code == 2 and "\n" not in message and f"--backend {backend}" in message
        return
    r = _run(problem, analysis, settings)
    H = _exact(case, curvature)
    if analysis == "trace":
        _check_trace(backend, variant, r, H, problem)
    elif analysis == "eigs":
        _check_eigs(backend, variant, r, H, settings)
    elif analysis == "extremes":
        _check_extremes(backend, r, H)
    else:
        _check_density(backend, r, H)


# --------------------------------------------------------------------------- agreement with native


@pytest.mark.parametrize(("backend", "curvature"), [
    ("pyhessian", "hessian"),  # PyHessian has no GGN (asserted in test_conformance)
    ("eigenthings", "hessian"), ("eigenthings", "ggn"),
    ("backpack", "hessian"), ("backpack", "ggn"),
])
def test_agrees_with_native(backend: str, curvature: str) -> None:
    problem = _problem("mlp-ce")
    native_trace = _run(problem, "trace", _option_settings("native", curvature, method="exact"))
    method = {"pyhessian": "hutchinson", "eigenthings": "hutch++", "backpack": "exact"}[backend]
    r = _run(problem, "trace", _option_settings(backend, curvature, method=method, probes=30))
    if method == "exact":
        assert math.isclose(r.estimate, native_trace.estimate, rel_tol=1e-10)
        assert [g.estimate for g in r.groups] == pytest.approx([g.estimate for g in native_trace.groups], rel=1e-10)
    else:
        assert abs(r.estimate - native_trace.estimate) <= 4 * r.stderr + 1e-10
    if backend == "backpack":
        return
    native_eigs = _run(problem, "eigs", _option_settings("native", curvature, top_k=3))
    eigs = _run(problem, "eigs", _option_settings(backend, curvature, top_k=3))
    scale = abs(native_eigs.eigenvalues[0])
    tol = TOLERANCE[(backend, "eigs")]
    assert eigs.eigenvalues == pytest.approx(native_eigs.eigenvalues, abs=tol * scale)
    if backend == "eigenthings":
        native_ext = _run(problem, "extremes", _option_settings("native", curvature))
        ext = _run(problem, "extremes", _option_settings(backend, curvature))
        assert ext.lambda_max == pytest.approx(native_ext.lambda_max, abs=1e-8 * scale)
        assert ext.lambda_min == pytest.approx(native_ext.lambda_min, abs=1e-8 * scale)
    options = {"iters": 12, "runs": 8}
    native_density = _run(problem, "density", _option_settings("native", curvature, **options))
    density = _run(problem, "density", _option_settings(backend, curvature, **options))
    spread = float(native_density.nodes.max() - native_density.nodes.min())
    distance = wasserstein_distance(density.nodes.flatten().numpy(), native_density.nodes.flatten().numpy(),
                                    density.weights.flatten().numpy(), native_density.weights.flatten().numpy())
    assert distance <= TOLERANCE[(backend, "density")] * spread
    assert density.sigma == pytest.approx(native_density.sigma, rel=0.5)  # same broadening rule


# --------------------------------------------------------------------------- side effects, counts


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
                  for n, m in model.named_modules()},
        "attributes": {n: sorted(vars(p)) for n, p in model.named_parameters()},
        "types": {n: type(m) for n, m in model.named_modules()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in ("requires_grad", "grads", "training", "hooks", "attributes", "types"):
        assert a[key] == b[key], key
    for key in ("params", "buffers"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


SMALL = {"trace": {"probes": 4}, "eigs": {"top_k": 1, "max_iter": 6}, "extremes": {"max_iter": 6},
         "density": {"iters": 3, "runs": 2}}


@pytest.mark.parametrize("backend", ["pyhessian", "eigenthings", "backpack"])
def test_user_model_is_unchanged(backend: str) -> None:
    # a frozen parameter and a --params subset: requires_grad flags must survive the copies/filters
    problem = CASES["frozen-mlp"](batch_size=BATCH, params=("2.*",))
    for single in (False, True):
        if single:  # PyHessian's single-batch mode calls backward(create_graph=True) on its model
            problem = CASES["frozen-mlp"](batch_size=1000, params=("2.*",))
        before = _snapshot(problem.model)
        runs = 0
        for analysis, options in SMALL.items():
            method = {"backpack": "exact", "pyhessian": "hutchinson"}.get(backend, "hutch++")
            for curvature in CURVATURES:
                settings = _settings(backend, curvature, {**options, "method": method})
                try:
                    check_supported(get_backend(backend), analysis, settings)
                except UnsupportedAnalysis:
                    continue
                _run(problem, analysis, settings)
                runs += 1
        assert runs == {"pyhessian": 3, "eigenthings": 8, "backpack": 2}[backend]
        _same(before, _snapshot(problem.model))
        assert all(p.grad is None for p in problem.model.parameters())


class _CountingLoss:
    """A loss function that counts its calls (one per batch per product for a full-data HVP)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(outputs, targets)


def _counting(problem: Problem) -> _CountingLoss:
    counter = _CountingLoss(problem.loss.fn)
    problem.loss = type(problem.loss)(problem.loss.name, counter, problem.loss.is_classification)
    return counter


@pytest.mark.parametrize("curvature", CURVATURES)
def test_eigenthings_counts_every_product(curvature: str) -> None:
    seen: list[int] = []
    settings = _settings("eigenthings", curvature, {"method": "hutchinson", "probes": 5, "top_k": 2,
                                                     "iters": 4, "runs": 2})
    backend = get_backend(settings.engine, on_matvecs=seen.append)
    for analysis, expected in (("trace", 5), ("eigs", None), ("extremes", None), ("density", 8)):
        problem = mlp_ce(batch_size=10)  # batches of 10, 10 and 3
        counter = _counting(problem)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            r = getattr(backend, analysis)(problem, settings.options(analysis), torch.Generator().manual_seed(0))
        assert r.n_hvp > 0 and counter.calls == 3 * r.n_hvp  # one pass over the 3 batches per product
        assert seen[-1] == r.n_hvp
        if expected is not None:
            assert r.n_hvp == expected
        if analysis == "eigs":  # Lanczos steps, then one residual product per returned vector
            assert r.n_hvp == r.n_iter + 2 and 2 <= r.n_iter <= min(problem.n_params, 100)


def test_pyhessian_counts_every_product() -> None:
    seen: list[int] = []
    settings = _settings("pyhessian", "hessian", {"method": "hutchinson", "probes": 6, "trace_tol": 1e-12,
                                                   "top_k": 2, "max_iter": 5, "iters": 4, "runs": 2})
    backend = get_backend(settings.engine, on_matvecs=seen.append)
    for batch_size, passes in ((10, 3), (1000, 0)):
        for analysis in ("trace", "eigs", "density"):
            problem = mlp_ce(batch_size=batch_size)
            counter = _counting(problem)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                r = getattr(backend, analysis)(problem, settings.options(analysis),
                                               torch.Generator().manual_seed(0))
            assert seen[-1] == r.n_hvp
            if passes:  # dataloader mode: every product is a pass over the 3 batches
                assert counter.calls == passes * r.n_hvp
            else:  # one batch: PyHessian builds the gradient graph once and reuses it
                assert counter.calls == 1
            if analysis == "trace":
                assert r.n_hvp == r.n_probes == 6
            elif analysis == "eigs":  # at most max_iter power steps per eigenvalue, plus one residual product each
                assert 2 * 2 <= r.n_hvp <= 2 * 5 + 2
            else:  # PyHessian's SLQ runs every step
                assert r.n_hvp == 2 * 4


def test_backpack_makes_no_products() -> None:
    seen: list[int] = []
    problem = mlp_ce(batch_size=10)
    settings = _settings("backpack", "hessian", {"method": "exact"})
    r = get_backend(settings.engine, on_matvecs=seen.append).trace(problem, settings.options("trace"),
                                                                   torch.Generator().manual_seed(0))
    assert r.n_hvp == 0 and r.n_probes == problem.n_params
    assert seen == [1, 2, 3]  # one extended backward pass per batch


# --------------------------------------------------------------------------- the peers' bugs


@pytest.mark.parametrize("curvature", CURVATURES)
def test_eigenthings_ragged_batches_are_weighted_exactly(curvature: str) -> None:
    import hessian_eigenthings as he

    problem = mlp_ce(batch_size=10)  # 10, 10 and a ragged 3
    assert [len(y) for _, y in problem.data.batches] == [10, 10, 3]
    exact = exact_hessian(problem) if curvature == "hessian" else exact_ggn(problem)
    fn = problem.loss.fn
    if curvature == "hessian":  # the library fed naively: equal-weight average of batch-mean curvatures
        naive = he.HessianOperator(problem.model, problem.data.batches, lambda m, b: fn(m(b[0]), b[1]))
    else:
        naive = he.GGNOperator(problem.model, problem.data.batches, lambda m, b: m(b[0]), lambda o, b: fn(o, b[1]))
    backend = get_backend(_settings("eigenthings", curvature, {}).engine)
    ours, _ = backend.operator(problem)
    eye = torch.eye(exact.shape[0], dtype=torch.float64)
    dense_naive = torch.stack([naive.matvec(e) for e in eye], dim=1).detach()
    dense_ours = torch.stack([ours.matvec(e) for e in eye], dim=1)
    assert (dense_naive - exact).norm() > 1e-2 * exact.norm()  # the bias is real on this split
    assert torch.allclose(dense_ours, exact, rtol=1e-10, atol=1e-12)
    r = backend.eigs(problem, _settings("eigenthings", curvature, {"top_k": 3}).options("eigs"),
                     torch.Generator().manual_seed(0))
    assert r.eigenvalues == pytest.approx(torch.linalg.eigvalsh(exact).flip(0)[:3].tolist(), abs=1e-10)


def test_pyhessian_density_needs_and_gets_the_eig_shim() -> None:
    import pyhessian

    from hesscli.backends.pyhessian import torch_eig_shim

    problem = CASES["linreg-mse"](batch_size=BATCH)
    model = _copy_model(problem)
    engine = pyhessian.hessian(model, lambda o, t: problem.loss.fn(o, t), dataloader=problem.data.batches, cuda=False)
    with pytest.raises(RuntimeError, match="torch.eig"):  # the released wheel on current torch
        engine.density(iter=3, n_v=1)
    before = torch.eig
    with torch_eig_shim() as seen:
        nodes, weights = engine.density(iter=3, n_v=1)
    assert torch.eig is before and len(seen) == 1  # restored afterwards
    assert sum(weights[0]) == pytest.approx(1.0)
    T = seen[0]
    assert torch.allclose(torch.linalg.eigvalsh(T), torch.tensor(sorted(nodes[0]), dtype=torch.float64))
    # and through the backend: the full SLQ result against the exact spectrum
    settings = _settings("pyhessian", "hessian", {"iters": 5, "runs": 4})
    r = get_backend(settings.engine).density(problem, settings.options("density"), torch.Generator().manual_seed(0))
    true = torch.linalg.eigvalsh(exact_hessian(problem))
    for nodes_run in r.nodes:  # 5 steps on 5 parameters: every run finds the whole spectrum
        assert torch.allclose(nodes_run.sort().values, true, rtol=1e-10)
    assert math.isclose(float(torch.trapezoid(r.density, r.grid)), 1.0, rel_tol=1e-9)


def _copy_model(problem: Problem) -> nn.Module:
    return copy.deepcopy(problem.model)


def _negative_problem() -> Problem:
    """Linear regression with the *negated* MSE: a negative definite Hessian, trace < 0."""
    problem = CASES["linreg-mse"](batch_size=BATCH)
    fn = problem.loss.fn
    problem.loss = type(problem.loss)("neg_mse", lambda o, t: -fn(o, t))
    return problem


def test_pyhessian_trace_does_not_stop_early_on_a_negative_trace() -> None:
    import pyhessian

    problem = _negative_problem()
    exact = float(torch.trace(exact_hessian(problem)))
    assert exact < 0
    torch.manual_seed(0)
    upstream = pyhessian.hessian(_copy_model(problem), problem.loss.fn, dataloader=problem.data.batches, cuda=False)
    assert len(upstream.trace(maxIter=100, tol=1e-3)) == 2  # the released stopping test gives up at once
    settings = _settings("pyhessian", "hessian", {"method": "hutchinson"})
    r = get_backend(settings.engine).trace(problem, settings.options("trace"), torch.Generator().manual_seed(0))
    assert r.n_probes > 2 and r.estimate < 0
    assert abs(r.estimate - exact) <= 4 * r.stderr


def test_pyhessian_normalisation_is_exact_at_small_curvature() -> None:
    problem = CASES["linreg-mse"](batch_size=BATCH)
    fn = problem.loss.fn
    problem.loss = type(problem.loss)("tiny", lambda o, t: 1e-4 * fn(o, t))  # eigenvalues around 1e-4
    true = torch.linalg.eigvalsh(exact_hessian(problem))
    settings = _settings("pyhessian", "hessian", {"iters": 5, "runs": 1})
    r = get_backend(settings.engine).density(problem, settings.options("density"), torch.Generator().manual_seed(0))
    assert torch.allclose(r.nodes[0].sort().values, true, rtol=1e-9)  # PyHessian's ||v|| + 1e-6 was 6% off


# --------------------------------------------------------------------------- refusals and installs


def test_adapters_import_their_library_only_when_used() -> None:
    code = (
        "import sys\n"
        "for name in ('pyhessian', 'hessian_eigenthings', 'backpack'):\n"
        "    sys.modules[name] = None\n"
        "import hesscli, hesscli.api, hesscli.backends.pyhessian, hesscli.backends.eigenthings, "
        "hesscli.backends.backpack\n"
        "from hesscli.backends import get_backend\n"
        "from hesscli.errors import BackendUnavailable\n"
        "for name in ('pyhessian', 'eigenthings', 'backpack'):\n"
        "    try:\n"
        "        get_backend(name)\n"
        "    except BackendUnavailable as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"backend '{b}' needs: pip install 'hesscli[{b}]'"
                                       for b in ("pyhessian", "eigenthings", "backpack")]


PACKAGES = {"pyhessian": ("pyhessian", "pyhessian"), "eigenthings": ("hessian_eigenthings", "eigenthings"),
            "backpack": ("backpack", "backpack")}


@pytest.mark.parametrize("backend", list(PACKAGES))
def test_missing_package_gives_the_install_hint(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, extra = PACKAGES[backend]
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(BackendUnavailable) as info:
        get_backend(backend)
    assert str(info.value) == f"backend '{backend}' needs: pip install 'hesscli[{extra}]'"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("backend", list(PACKAGES))
def test_distributed_runs_are_refused(backend: str) -> None:
    with pytest.raises(UnsupportedAnalysis, match="torch.distributed"):
        get_backend(backend, reduce=lambda t: t)


def test_backpack_refusals_name_the_problem() -> None:
    settings = _settings("backpack", "hessian", {"method": "exact"})
    backend = get_backend(settings.engine)
    problem = mlp_ce(batch_size=BATCH)
    problem.loss = type(problem.loss)("huber", problem.loss.fn)
    with pytest.raises(UnsupportedAnalysis, match="cannot use --loss huber; it supports: cross_entropy, mse, "
                                                  "bce_with_logits"):
        backend.trace(problem, settings.options("trace"), torch.Generator())
    problem = mlp_ce(batch_size=BATCH)
    problem.loss = type(problem.loss)("cross_entropy", lambda o, t: 2 * _plain_ce(o, t))
    with pytest.raises(UnsupportedAnalysis, match="CrossEntropyLoss gives .* but --loss cross_entropy gives"):
        backend.trace(problem, settings.options("trace"), torch.Generator())
    torch.manual_seed(0)
    act = nn.Tanh()
    reused = make_problem(nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2)), CE,
                          torch.randn(9, 3), torch.randint(0, 2, (9,)))
    with pytest.raises(UnsupportedAnalysis, match="layer '3' is the same module as '1'"):
        backend.trace(reused, settings.options("trace"), torch.Generator())
    with pytest.raises(UnsupportedAnalysis, match="cannot run 'eigs'; it supports: trace"):
        analyse(problem, "eigs", _settings("backpack", "hessian", {}))


def _plain_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets)


class _Blocks(nn.Module):
    """A custom container (BackPACK's converter path) whose forward also calls ``Tensor.flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Linear(8, 4), nn.Sigmoid(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_backpack_converts_custom_containers(curvature: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(13, 1, 4, 4, generator=torch.Generator().manual_seed(14))
    y = torch.randint(0, 3, (13,), generator=torch.Generator().manual_seed(15))
    problem = make_problem(_Blocks(), CE, x, y, batch_size=5)
    exact = exact_hessian(problem) if curvature == "hessian" else exact_ggn(problem)
    settings = _settings("backpack", curvature, {"method": "exact"})
    r = get_backend(settings.engine).trace(problem, settings.options("trace"), torch.Generator())
    assert r.estimate == pytest.approx(float(torch.trace(exact)), rel=1e-10)
    assert [g.name for g in r.groups] == list(problem.params)
