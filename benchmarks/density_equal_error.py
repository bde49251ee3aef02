"""Spectral density at equal accuracy: products each library needs for the same Wasserstein error.

``python -m benchmarks.density_equal_error [W1 W2] [--seeds 3] [--runs 1,2,4,8]``

Every method is swept over the number of SLQ runs of 80 steps (``--runs``), float32 on the CPU,
``--seeds`` seeds each; the error is the Wasserstein-1 distance of the returned spectral measure
to the float64 reference (:func:`benchmarks.reference.density_error`, divided by
``λ_max - λ_min``; exact on W1), median over seeds, and the products are those spent (median):

* hesscli ``density`` alone (``runs`` x 80);
* hesscli ``eigs --top-k 10`` + ``density`` as ``hesscli scan`` runs them: the eigs run's
  converged eigenpairs deflated from the density; its products count;
* PyHessian ``density(iter=80, n_v=runs)``;
* hessian-eigenthings ``spectral_density(num_runs=runs, lanczos_steps=80)``.

The target error is PyHessian's at its defaults (``density()``: one run of 100 steps) and, as a
second target, eigenthings' at its defaults (10 runs of 80 steps). For each method the
products to reach a target are read off the sweep, interpolated in log-log between the two
budgets around it (``>`` the largest budget when none reaches it). Writes
``benchmarks/out/density_equal_error.md`` (a section of RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.density_deflation import scan
from benchmarks.measure import COUNTER
from benchmarks.peers import eigenthings, install_counters, native, pyhessian
from benchmarks.reference import density_error, load_reference
from benchmarks.workloads import OUT_DIR, load_workload

SECTION = OUT_DIR / "density_equal_error.md"
ITERS = 80


def _row(call: Callable[[int], dict[str, Any]], ref: Any, seeds: int) -> tuple[float, float]:
    """(median products, median error) over ``seeds``."""
    prods, errs = [], []
    for s in range(seeds):
        COUNTER.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call(s)
        prods.append(out.get("products") or out.get("reported_hvp") or COUNTER.count)
        errs.append(density_error(out["nodes"], out["weights"], ref))
    COUNTER.reset()
    return float(statistics.median(prods)), float(statistics.median(errs))


def products_for(curve: list[tuple[float, float]], target: float) -> tuple[float, bool]:
    """Products at which the (products, error) curve first reaches ``target`` (log-log
    interpolation), and whether it does within the sweep."""
    pts = sorted(curve)
    if pts and pts[0][1] <= target:
        return pts[0][0], True
    for (p0, e0), (p1, e1) in zip(pts, pts[1:]):
        if e1 <= target < e0:
            t = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0))), True
    return (pts[-1][0] if pts else math.nan), False


def measure(name: str, seeds: int, runs: list[int]) -> dict[str, Any]:
    install_counters()
    w = load_workload(name)
    ref = load_reference(w)
    problem = w.problem(torch.float32)
    curves: dict[str, list[tuple[float, float]]] = {}
    methods: dict[str, Callable[[int], Callable[[int], dict[str, Any]]]] = {
        "hesscli density": lambda r: native(problem, "density", runs=r, iters=ITERS),
        "hesscli eigs top-10 + deflated density": lambda r: _scan_runs(problem, r),
        "PyHessian density": lambda r: pyhessian(w, "density", shim=True, iter=ITERS, n_v=r),
        "eigenthings spectral_density": lambda r: eigenthings(w, "spectral_density", num_runs=r,
                                                              lanczos_steps=ITERS),
    }
    for label, make in methods.items():
        curves[label] = []
        for r in runs:
            p, e = _row(make(r), ref, seeds)
            curves[label].append((p, e))
            print(f"{name} {label} runs={r}: products {p:.0f} error {e:.2e}", flush=True)
    targets = {
        "PyHessian density() defaults (1 x 100)": _row(pyhessian(w, "density", shim=True), ref, seeds),
        "eigenthings spectral_density() defaults (10 x 80)": _row(eigenthings(w, "spectral_density"), ref, seeds),
    }
    return {"workload": name, "seeds": seeds, "runs": runs, "curves": curves, "targets": targets}


def _scan_runs(problem: Any, runs: int) -> Callable[[int], dict[str, Any]]:
    import benchmarks.density_deflation as dd

    def call(seed: int) -> dict[str, Any]:
        old = dd.RUNS
        dd.RUNS = runs
        try:
            return scan(problem, 10)(seed)
        finally:
            dd.RUNS = old
    return call


def markdown(results: list[dict[str, Any]]) -> str:
    L = ["## Spectral density at equal accuracy", "",
         f"`python -m benchmarks.density_equal_error`: each method swept over SLQ runs of {ITERS} steps, float32; "
         "the Wasserstein-1 error over λ_max − λ_min against the float64 reference (median over seeds) and the "
         "products spent. Products to reach a target error are interpolated on the sweep (log-log).", ""]
    for res in results:
        L.append(f"**{res['workload']}** (runs swept: {', '.join(map(str, res['runs']))}; {res['seeds']} seeds)")
        L.append("")
        L.append("| method | " + " | ".join(f"{r} run{'s' if r > 1 else ''}" for r in res["runs"]) + " |")
        L.append("|---|" + "---|" * len(res["runs"]))
        for label, curve in res["curves"].items():
            L.append(f"| {label} | " + " | ".join(f"{e:.2e} ({p:.0f})" for p, e in curve) + " |")
        L.append("")
        L.append("| target (its error, products) | " + " | ".join(res["curves"]) + " | hesscli scan vs best peer |")
        L.append("|---|" + "---|" * (len(res["curves"]) + 1))
        for tlabel, (tp, te) in res["targets"].items():
            cells, need = [], {}
            for label, curve in res["curves"].items():
                p, ok = products_for(curve, te)
                need[label] = p if ok else math.inf
                cells.append(f"{p:.0f}" if ok else f"> {p:.0f}")
            ours = need["hesscli eigs top-10 + deflated density"]
            peers = min(need["PyHessian density"], need["eigenthings spectral_density"], tp)
            ratio = "-" if not math.isfinite(ours) else (f"{peers / ours:.1f}x" if math.isfinite(peers) else "∞")
            L.append(f"| {tlabel} ({te:.2e}, {tp:.0f}) | " + " | ".join(cells) + f" | {ratio} |")
        L.append("")
    return "\n".join(L)


def run(workloads: list[str], seeds: int = 3, runs: list[int] | None = None) -> list[dict[str, Any]]:
    results = [measure(name, seeds, runs or [1, 2, 4, 8]) for name in workloads]
    SECTION.parent.mkdir(parents=True, exist_ok=True)
    SECTION.write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["W1", "W2"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", default="1,2,4,8")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results = run(args.workloads, args.seeds, [int(r) for r in args.runs.split(",")])
    print(markdown(results))


if __name__ == "__main__":
    main()
