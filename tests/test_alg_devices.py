"""The algorithms give the same numbers on CUDA as on the CPU (probes come from a CPU generator)."""

from __future__ import annotations

import pytest
import torch

from hesscli.algorithms import exact_trace, hutchinson, hutchpp, lanczos_eigs, slq
from hesscli.operators.base import DenseOperator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def operators() -> tuple[DenseOperator, DenseOperator]:
    eigs = torch.cat([torch.linspace(-2.0, 3.0, 60, dtype=F64), torch.tensor([6.0, 7.0, -4.0], dtype=F64)])
    Q, _ = torch.linalg.qr(torch.randn(63, 63, generator=gen(1), dtype=F64))
    M = (Q * eigs) @ Q.T
    groups = {"a": slice(0, 20), "b": slice(20, 63)}
    return DenseOperator(M, groups=groups), DenseOperator(M.cuda(), groups=groups)


def test_trace_estimators_agree():
    cpu, gpu = operators()
    for fn, kwargs in ((hutchinson, {"n_probes": 20}), (hutchpp, {"n_matvecs": 30}), (exact_trace, {})):
        extra = {} if fn is exact_trace else {"generator": gen(3)}
        a, b = fn(cpu, **kwargs, **extra), fn(gpu, **kwargs, **{k: gen(3) for k in extra})
        assert b.estimate == pytest.approx(a.estimate, rel=1e-10)
        assert [g.estimate for g in b.groups] == pytest.approx([g.estimate for g in a.groups], rel=1e-10)
        assert b.n_hvp == a.n_hvp


def test_lanczos_and_slq_agree():
    cpu, gpu = operators()
    a = lanczos_eigs(cpu, k=2, which="both", generator=gen(), return_vectors=True)
    b = lanczos_eigs(gpu, k=2, which="both", generator=gen(), return_vectors=True)
    assert b.eigenvalues == pytest.approx(a.eigenvalues, rel=1e-10)
    assert b.eigenvectors.device.type == "cuda"
    s_cpu = slq(cpu, iters=15, runs=3, generator=gen())
    s_gpu = slq(gpu, iters=15, runs=3, generator=gen(), block_size=2)
    assert torch.allclose(s_gpu.nodes, s_cpu.nodes, atol=1e-9)
    assert s_gpu.density.device.type == "cpu"
