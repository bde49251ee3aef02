"""Spectral density with and without the deflation of resolved outliers, at equal products.

``python -m benchmarks.density_deflation [W1 W2] [--seeds 5]`` prints a Markdown table. Every row
is float32 on the CPU, scored by the Wasserstein-1 distance of the returned spectral measure to
the float64 reference (:func:`benchmarks.reference.density_error`: divided by ``λ_max - λ_min``;
exact for W1), median over seeds, and the products actually spent (median):

* ``density`` alone (5 runs x 80 steps, the defaults);
* ``eigs --top-k 10`` + ``density`` as ``hesscli scan`` runs them (shared runs: the block
  eigensolver run's converged eigenpairs are deflated from the density);
* ``density`` alone and PyHessian's ``density`` with the fewest runs of 80 steps that spend at
  least that scan's total products (equal products or more);
* ``eigs --top-k 1`` + ``density``: the single-vector run's first 80 steps serving as the first
  SLQ run (the shared path for that case before deflation; the run goes on to 80 steps, so 4
  fresh runs make about the same total) against deflating its one eigenpair (the eigensolver
  stops when it has converged) and 5 runs of the deflated operator, the shared path now.
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.peers import native, native_result, pyhessian
from benchmarks.reference import density_error, load_reference
from benchmarks.workloads import load_workload
from hesscli.algorithms.lanczos import lanczos_eigs, lanczos_run
from hesscli.algorithms.slq import slq
from hesscli.api import analyse
from hesscli.backends.native import NativeBackend, _resolved_pairs
from hesscli.config import Settings
from hesscli.runner import SharedRuns

ITERS, RUNS = 80, 5


def scan(problem: Any, top_k: int, runs: int = RUNS, iters: int = ITERS) -> Callable[[int], dict[str, Any]]:
    """``eigs --top-k`` then ``density`` (``runs`` x ``iters``) with the checkpoint's shared runs."""
    def call(seed: int) -> dict[str, Any]:
        settings = Settings(seed=seed, top_k=top_k, iters=iters, runs=runs)
        backend = NativeBackend()
        plan = SharedRuns(problem, {a: settings.options(a) for a in ("eigs", "density")})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eigs = analyse(problem, "eigs", settings, backend=backend, shared=plan).result
            dens = analyse(problem, "density", settings, backend=backend, shared=plan).result
        out = native_result(dens)
        out.update(products=eigs.n_hvp + dens.n_hvp, deflated=dens.deflated, density_hvp=dens.n_hvp)
        return out
    return call


def top1_first_run(problem: Any) -> Callable[[int], dict[str, Any]]:
    """``eigs --top-k 1`` run on to ``ITERS`` steps, its first steps serving as the first SLQ run."""
    def call(seed: int) -> dict[str, Any]:
        backend = NativeBackend()
        op = backend.operator(problem)
        g = torch.Generator().manual_seed(seed)
        run = lanczos_run(op, k=1, which="largest", generator=g, keep_tridiagonal=ITERS)
        first = None if run.alphas is None else (run.alphas, run.betas)
        dens = slq(op, iters=ITERS, runs=RUNS, generator=g, first_run=first)
        out = native_result(dens)
        out.update(products=run.result.n_hvp + dens.n_hvp, deflated=dens.deflated, density_hvp=dens.n_hvp)
        return out
    return call


def top1_deflated(problem: Any) -> Callable[[int], dict[str, Any]]:
    """``eigs --top-k 1`` keeping its vector, then SLQ of the deflated operator with ``RUNS`` runs."""
    def call(seed: int) -> dict[str, Any]:
        backend = NativeBackend()
        op = backend.operator(problem)
        g = torch.Generator().manual_seed(seed)
        eigs = lanczos_eigs(op, k=1, which="largest", generator=g, return_vectors=True)
        dens = slq(op, iters=ITERS, runs=RUNS, generator=g, deflate=_resolved_pairs(eigs, op.size))
        out = native_result(dens)
        out.update(products=eigs.n_hvp + dens.n_hvp, deflated=dens.deflated, density_hvp=dens.n_hvp)
        return out
    return call


def measure(name: str, seeds: int, top1: bool = True) -> list[tuple[str, str, float, float, str]]:
    w = load_workload(name)
    ref = load_reference(w)
    problem = w.problem(torch.float32)
    rows: list[tuple[str, str, float, float, str]] = []

    def row(label: str, how: str, call: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
        outs = [call(s) for s in range(seeds)]
        errs = [density_error(o["nodes"], o["weights"], ref) for o in outs]
        prods = [o.get("products", o.get("reported_hvp", 0)) for o in outs]
        note = f"deflated {statistics.median(o['deflated'] for o in outs):g}" if "deflated" in outs[0] else ""
        rows.append((label, how, statistics.median(prods), statistics.median(errs), note))
        print(f"{name} {label}: products {prods} errors {[f'{e:.2e}' for e in errs]} {note}", flush=True)
        return outs

    row("density alone", f"{RUNS} runs x {ITERS}", native(problem, "density", runs=RUNS, iters=ITERS))
    outs = row("eigs top-10 + deflated density", f"scan, density {RUNS} x {ITERS}", scan(problem, 10))
    total = statistics.median(o["products"] for o in outs)
    equal = max(1, math.ceil(total / ITERS))  # at least as many products as the deflated scan
    row("density alone, equal products", f"{equal} runs x {ITERS}", native(problem, "density", runs=equal, iters=ITERS))
    for o in (pyhessian(w, "density", shim=True, iter=ITERS, n_v=equal),):
        def counted(seed: int, o: Callable[[int], dict[str, Any]] = o) -> dict[str, Any]:
            return {**o(seed), "products": equal * ITERS}
        row("PyHessian density, equal products", f"density(iter={ITERS}, n_v={equal})", counted)
    if top1:
        row("eigs top-1 + density, first run shared", f"density {RUNS - 1} fresh runs", top1_first_run(problem))
        row("eigs top-1 + deflated density", f"density {RUNS} runs of P H P", top1_deflated(problem))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["W1", "W2"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-top1", action="store_true", help="skip the eigs --top-k 1 rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = ["| workload | run | how | products (median) | W1 error / range (median) | note |",
             "|---|---|---|---:|---:|---|"]
    for name in args.workloads:
        for label, how, prods, err, note in measure(name, args.seeds, not args.no_top1):
            table.append(f"| {name} | {label} | {how} | {prods:.0f} | {err:.2e} | {note} |")
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
