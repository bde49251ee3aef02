"""One Lanczos run serving several analyses of one checkpoint (``hesscli scan``), against exact Hessians."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hesscli.api import analyse
from hesscli.backends.native import NativeBackend
from hesscli.config import Settings
from hesscli.runner import SharedRuns

from tests.cases import cnn_bn_ce, mlp_ce
from tests.reference import exact_hessian


def _plan(problem, analyses, settings) -> SharedRuns:
    return SharedRuns(problem, {a: settings.options(a) for a in analyses})


def _settings(**kw) -> Settings:
    base = dict(dtype="float64", seed=3, top_k=3, iters=12, runs=3)
    base.update(kw)
    return Settings(**base)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", [mlp_ce, cnn_bn_ce], ids=["mlp-ce", "cnn-bn-ce"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigs_extremes_density_share_one_run(case, which, k):
    """``extremes`` always comes from the eigs run, and the eigs run's converged eigenpairs are
    deflated from the density."""
    problem = case()
    true = torch.linalg.eigvalsh(exact_hessian(problem))
    scale = float(true.abs().max())
    settings = _settings(which=which, top_k=k)
    backend = NativeBackend()
    shared = _plan(problem, ["eigs", "extremes", "density"], settings)
    eigs = analyse(problem, "eigs", settings, backend=backend, shared=shared).result
    ext = analyse(problem, "extremes", settings, backend=backend, shared=shared).result
    dens = analyse(problem, "density", settings, backend=backend, shared=shared).result

    wanted = true.flip(0)[:k] if which == "largest" else true[:k]
    assert eigs.which == (which,) * k and all(eigs.converged)
    assert torch.allclose(torch.tensor(eigs.eigenvalues, dtype=torch.float64), wanted, atol=1e-8 * scale)
    # extremes came from the eigs run: no product of its own, the exact ends all the same
    assert ext.n_hvp == 0 and ext.converged
    assert abs(ext.lambda_max - float(true[-1])) <= 1e-8 * scale and abs(ext.lambda_min - float(true[0])) <= 1e-8 * scale
    # the eigs run's converged pairs (k wanted + the other end's extreme) are deflated from the density
    assert dens.n_hvp == settings.runs * settings.iters and dens.deflated == k + 1
    assert dens.nodes.shape == (3, 12 + dens.deflated)
    assert torch.allclose(dens.weights.sum(1), torch.ones(3, dtype=torch.float64))

    # the same analyses one by one (no plan): same eigenvalues and extremes to the tolerance
    alone = NativeBackend()
    sep_ext = analyse(problem, "extremes", settings, backend=alone).result
    assert sep_ext.n_hvp > 0
    assert abs(sep_ext.lambda_min - ext.lambda_min) <= 1e-8 * scale
    # and each run's measure is a valid quadrature of the Hessian: its first moment lies inside the spectrum
    for run in range(settings.runs):
        mean = float((dens.nodes[run] * dens.weights[run]).sum())
        assert float(true[0]) <= mean <= float(true[-1])


@pytest.mark.parametrize("case", [mlp_ce, cnn_bn_ce], ids=["mlp-ce", "cnn-bn-ce"])
def test_extremes_density_share_the_first_slq_run(case):
    """Without eigs, the single-vector extremes run gives its first ``iters`` steps as the first SLQ run."""
    problem = case()
    true = torch.linalg.eigvalsh(exact_hessian(problem))
    settings = _settings()
    shared = _plan(problem, ["extremes", "density"], settings)
    backend = NativeBackend()
    ext = analyse(problem, "extremes", settings, backend=backend, shared=shared).result
    dens = analyse(problem, "density", settings, backend=backend, shared=shared).result
    assert ext.n_hvp >= settings.iters
    assert dens.n_hvp == (settings.runs - 1) * settings.iters and dens.deflated == 0
    fewer = analyse(problem, "density", dataclasses.replace(settings, runs=2), backend=NativeBackend()).result
    assert torch.allclose(dens.nodes[1:], fewer.nodes, atol=1e-12)
    assert torch.allclose(dens.weights[1:], fewer.weights)
    # the shared first run is a valid Gauss quadrature of the Hessian: its first moment is
    # v0ᵀ H v0 for a unit vector, inside the spectrum
    first_mean = float((dens.nodes[0] * dens.weights[0]).sum())
    assert float(true[0]) <= first_mean <= float(true[-1])


def test_no_plan_no_sharing_and_other_problems_are_not_served():
    problem, other = mlp_ce(), mlp_ce()
    settings = _settings()
    backend = NativeBackend()
    shared = _plan(problem, ["eigs", "extremes"], settings)
    analyse(problem, "eigs", settings, backend=backend, shared=shared)
    ext = analyse(other, "extremes", settings, backend=backend, shared=shared).result  # another checkpoint: its own run
    assert ext.n_hvp > 0
    # a different tolerance is not served from the shared run either
    shared = _plan(problem, ["eigs", "extremes"], settings)
    analyse(problem, "eigs", settings, backend=backend, shared=shared)
    assert analyse(problem, "extremes", dataclasses.replace(settings, tol=1e-4), backend=backend,
                   shared=shared).result.n_hvp > 0


def test_analyses_of_one_problem_share_the_operator():
    problem = mlp_ce()
    backend = NativeBackend()
    settings = _settings()
    analyse(problem, "trace", settings, backend=backend)
    first = backend.last_operator
    analyse(problem, "eigs", settings, backend=backend)
    assert backend.last_operator is first
    analyse(mlp_ce(), "eigs", settings, backend=backend)
    assert backend.last_operator is not first
