"""Eigenvalue flags against a float64 reference on the benchmark workloads.

For ``eigs --top-k 10`` and ``eigs --which smallest --top-k 1`` in float32 at the default
tolerance: products used, largest relative error against a float64 Lanczos reference, how many
values are flagged converged, and whether every stated error bound covers the reference.

Run: ``python -m benchmarks.eigen_flags W1 W2 W3`` (W3 takes a few minutes on 2 cores).
"""

from __future__ import annotations

import sys
import warnings

import torch

from benchmarks.workloads import load_workload
from hesscli.algorithms.lanczos import lanczos_eigs
from hesscli.operators.empirical import make_operator


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")
    for name in names:
        w = load_workload(name)
        p32, p64 = w.problem(torch.float32), w.problem(torch.float64)
        ref = lanczos_eigs(make_operator(p64, "hessian"), k=10, which="both", tol=1e-9, max_iter=3000,
                           generator=torch.Generator().manual_seed(0))
        truth = torch.tensor(ref.eigenvalues, dtype=torch.float64)
        for task, k, which, t in (("top-10", 10, "largest", truth[:10]), ("lambda_min", 1, "smallest", truth[10:11])):
            r = lanczos_eigs(make_operator(p32, "hessian"), k=k, which=which,
                             generator=torch.Generator().manual_seed(0))
            got = torch.tensor(r.eigenvalues, dtype=torch.float64)
            err = float(((got - t).abs() / t.abs()).max())
            covered = bool(((got - t).abs() <= torch.tensor(r.error_bounds, dtype=torch.float64)).all())
            print(f"{name} {task:10s} n_hvp={r.n_hvp:4d} max_rel_err={err:.1e} "
                  f"converged={sum(r.converged)}/{len(r.converged)} bounds_cover={covered}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["W1", "W2"])
