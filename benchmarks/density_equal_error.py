"""Spectral density at equal accuracy: products each library needs for the same Wasserstein error.

``python -m benchmarks.density_equal_error [W1 W2] [--seeds 3] [--budgets 1x40,1x80,2x80,4x80,8x80]``

Every method is swept over SLQ budgets, runs x steps (``--budgets``), float32 on the CPU,
``--seeds`` seeds each; the error is the Wasserstein-1 distance of the returned spectral measure
to the float64 reference (:func:`benchmarks.reference.density_error`, divided by
``λ_max - λ_min``; exact on W1), median over seeds, and the products are those spent (median):

* hesscli ``density`` alone;
* hesscli ``eigs --top-k 10`` + ``density`` as ``hesscli scan`` runs them: the eigs run's
  converged eigenpairs deflated from the density; its products count;
* PyHessian ``density(iter=steps, n_v=runs)``;
* hessian-eigenthings ``spectral_density(num_runs=runs, lanczos_steps=steps)``.

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
BUDGETS = ((1, 40), (1, 80), (2, 80), (4, 80), (8, 80))


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


def measure(name: str, seeds: int, budgets: list[tuple[int, int]]) -> dict[str, Any]:
    install_counters()
    w = load_workload(name)
    ref = load_reference(w)
    problem = w.problem(torch.float32)
    curves: dict[str, list[tuple[float, float]]] = {}
    methods: dict[str, Callable[[int, int], Callable[[int], dict[str, Any]]]] = {
        "hesscli density": lambda r, m: native(problem, "density", runs=r, iters=m),
        "hesscli eigs top-10 + deflated density": lambda r, m: scan(problem, 10, r, m),
        "PyHessian density": lambda r, m: pyhessian(w, "density", shim=True, iter=m, n_v=r),
        "eigenthings spectral_density": lambda r, m: eigenthings(w, "spectral_density", num_runs=r,
                                                                 lanczos_steps=m),
    }
    for label, make in methods.items():
        curves[label] = []
        for r, m in budgets:
            p, e = _row(make(r, m), ref, seeds)
            curves[label].append((p, e))
            print(f"{name} {label} {r}x{m}: products {p:.0f} error {e:.2e}", flush=True)
    targets = {
        "PyHessian density() defaults (1 x 100)": _row(pyhessian(w, "density", shim=True), ref, seeds),
        "eigenthings spectral_density() defaults (10 x 80)": _row(eigenthings(w, "spectral_density"), ref, seeds),
    }
    return {"workload": name, "seeds": seeds, "budgets": [f"{r}x{m}" for r, m in budgets], "curves": curves,
            "targets": targets}


def markdown(results: list[dict[str, Any]]) -> str:
    L = ["## Spectral density at equal accuracy", "",
         "`python -m benchmarks.density_equal_error`: each method swept over SLQ budgets (runs x steps), float32; "
         "the Wasserstein-1 error over λ_max − λ_min against the float64 reference (median over seeds) and the "
         "products spent. Products to reach a target error are interpolated on the sweep (log-log).", ""]
    for res in results:
        L.append(f"**{res['workload']}** (error (products) per budget, runs x steps; {res['seeds']} seeds)")
        L.append("")
        L.append("| method | " + " | ".join(res["budgets"]) + " |")
        L.append("|---|" + "---|" * len(res["budgets"]))
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


def run(workloads: list[str], seeds: int = 3, budgets: list[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    results = [measure(name, seeds, budgets or list(BUDGETS)) for name in workloads]
    SECTION.parent.mkdir(parents=True, exist_ok=True)
    SECTION.write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["W1", "W2"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default=",".join(f"{r}x{m}" for r, m in BUDGETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    budgets = [(int(r), int(m)) for r, m in (b.split("x") for b in args.budgets.split(","))]
    results = run(args.workloads, args.seeds, budgets)
    print(markdown(results))


if __name__ == "__main__":
    main()
