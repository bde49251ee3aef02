"""A training run as a series of checkpoints: what ``hesscli scan`` spends per checkpoint.

``python -m benchmarks.scan_series [--checkpoints 20] [--every 2] [--lr 3e-4] [--ref-every 5] [--no-peers]``

The series: the W2 CNN (103,818 parameters, 1,797 digits) as trained for the suite, then
``--every`` more full-batch Adam steps (``--lr``) between checkpoints, ``--checkpoints`` of them:
late training, where the Hessian changes a little from one checkpoint to the next. Each
checkpoint gets ``--analyses trace,eigs,extremes,density`` at the defaults (float32: Hutch++
with 100 products, the top 10 with λ_min from one Lanczos run to ``tol`` 1e-4, 5 SLQ runs of 80
steps with the resolved eigenpairs deflated), through :class:`hesscli.runner.CheckpointRunner`
as ``hesscli scan`` runs it:

* **warm** (the default): each checkpoint's Lanczos run starts from the previous checkpoint's
  Ritz vectors, Hutch++ from its sketch products;
* **cold** (``--no-warm-start``): every checkpoint from scratch, and cold Hutch++ with twice the
  products (the accuracy the warm sketch is measured against);
* **peers** on the checkpoints with a reference: PyHessian ``eigenvalues(top_n=10)``,
  ``trace()`` and ``density()`` with its defaults, and hessian-eigenthings
  ``lanczos(k=1, which="SA")`` for λ_min (PyHessian has none), products counted.

Errors are against a float64 reference of every ``--ref-every``-th checkpoint (the last of each
group of that many: float64 Lanczos until the top-10
and λ_min residuals are below ``1e-8·|θ|``, its ``tr(T)`` plus 100 Hutchinson probes on the
complement; :mod:`benchmarks.reference`, cached): the largest relative error of the top 10 and
of λ_min, the relative trace error, and the density's Wasserstein distance to the reference
run's spectral measure over ``λ_max - λ_min``. Writes ``benchmarks/out/scan_series.md`` (a
section of RESULTS.md) and prints the rows as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import peers
from benchmarks.measure import COUNTER, LoadWindow
from benchmarks.reference import Reference, density_error, load_reference, rel_err, top_error
from benchmarks.workloads import OUT_DIR, Workload, load_workload

SECTION = OUT_DIR / "scan_series.md"
ANALYSES = ("trace", "eigs", "extremes", "density")


def make_series(n: int, every: int, lr: float) -> list[tuple[int, Workload]]:
    """``n`` checkpoints of W2, ``every`` full-batch Adam steps apart (cached like the workloads)."""
    base = load_workload("W2")
    model = base.model_copy()
    X, y = base.data()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(0)
    out = []
    for i in range(n):
        step = i * every
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            logits = m(X)
        w = Workload(name=f"W2s{step}", title=f"W2 + {step} Adam steps", model=m, inputs=base.inputs,
                     targets=base.targets, loss=base.loss, train_loss=float(F.cross_entropy(logits, y)),
                     accuracy=float((logits.argmax(1) == y).float().mean()),
                     key=f"{base.key}-series-lr{lr:g}-step{step}")
        out.append((step, w))
        model.train()
        for _ in range(every):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X), y).backward()
            opt.step()
        model.eval()
    return out


def reference(w: Workload) -> Reference:
    return load_reference(w, steps=250, adaptive=True, trace_probes=100, extra_runs=0)


def scan(series: list[tuple[int, Workload]], refs: list[Reference | None], *, warm: bool, probes: int = 100,
         analyses: tuple[str, ...] = ANALYSES, trace_tol: float | None = None) -> list[dict[str, Any]]:
    """Run the analyses on every checkpoint in order, as a scan does; one row per checkpoint."""
    from hesscli.config import Settings
    from hesscli.runner import CheckpointRunner

    settings = Settings(analyses=analyses, warm_start=warm, probes=probes, seed=0, trace_tol=trace_tol)
    runner = CheckpointRunner(settings, analyses)
    rows = []
    for (step, w), ref in zip(series, refs):
        problem = w.problem()
        with warnings.catch_warnings(), LoadWindow() as load:
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            outcomes = runner.run(problem)
            seconds = time.perf_counter() - t0
        by = {o.run.analysis: o for o in outcomes}
        for o in outcomes:
            if o.run.status != "ok":
                raise RuntimeError(f"{o.run.analysis} failed on step {step}: {o.run.error}")
        row: dict[str, Any] = {"step": step, "seconds": seconds, "load": load.value,
                               "n_hvp": {a: by[a].run.n_hvp for a in analyses}}
        if "trace" in by:
            t = by["trace"].result
            row["trace_rel_stderr"] = t.stderr / abs(t.estimate)
            row["trace_converged"] = bool(t.converged)
        if ref is None:
            rows.append(row)
            continue
        if "trace" in by:
            row["trace_error"] = rel_err(by["trace"].result.estimate, ref.trace)
        if "eigs" in by:
            row["top10_error"] = top_error(list(by["eigs"].result.eigenvalues), ref, 10)
            row["top10_converged"] = sum(by["eigs"].result.converged)
        if "extremes" in by:
            row["min_error"] = rel_err(by["extremes"].result.lambda_min, ref.bottom[0])
        if "density" in by:
            d = by["density"].result
            row["density_error"] = density_error(d.nodes.reshape(-1).numpy(), d.weights.reshape(-1).numpy()
                                                 / d.weights.shape[0], ref)
        rows.append(row)
    return rows


def peer_rows(series: list[tuple[int, Workload]], refs: list[Reference | None]) -> list[dict[str, Any]]:
    """PyHessian (top-10, trace, density) and eigenthings (λ_min) on the checkpoints with a reference."""
    peers.install_counters()
    rows = []
    for (step, w), ref in zip(series, refs):
        if ref is None:
            continue
        row: dict[str, Any] = {"step": step, "n_hvp": {}, "seconds": 0.0}
        calls = {
            "eigs": peers.pyhessian(w, "eigenvalues", top_n=10),
            "trace": peers.pyhessian(w, "trace"),
            "density": peers.pyhessian(w, "density", shim=True),
            "extremes": peers.eigenthings(w, "lanczos", k=1, which="SA"),
        }
        with LoadWindow() as load:
            for name, call in calls.items():
                COUNTER.reset()
                t0 = time.perf_counter()
                out = call(0)
                row["seconds"] += time.perf_counter() - t0
                row["n_hvp"][name] = COUNTER.count
                if name == "eigs":
                    row["top10_error"] = top_error(out["eigs"], ref, 10)
                elif name == "trace":
                    row["trace_error"] = rel_err(out["trace"], ref.trace)
                elif name == "density":
                    row["density_error"] = density_error(out["nodes"], out["weights"], ref)
                else:
                    row["min_error"] = rel_err(out["small"][0], ref.bottom[0])
        COUNTER.reset()
        row["load"] = load.value
        rows.append(row)
    return rows


def _median(rows: list[dict[str, Any]], key: str, skip_first: bool = True) -> float:
    vals = [r[key] for r in (rows[1:] if skip_first and len(rows) > 1 else rows) if key in r and r[key] == r[key]]
    return float(statistics.median(vals)) if vals else float("nan")


def _products(rows: list[dict[str, Any]], analysis: str | None = None, skip_first: bool = True) -> float:
    use = rows[1:] if skip_first and len(rows) > 1 else rows
    vals = [sum(r["n_hvp"].values()) if analysis is None else r["n_hvp"].get(analysis, 0) for r in use]
    return float(np.mean(vals))


def markdown(results: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    warm, cold, cold2, peer = results["warm"], results["cold"], results["cold_trace_2x"], results["peers"]
    cfg = results["config"]

    def fmt(x: float) -> str:
        return "-" if x != x else (f"{x:.1e}" if x < 0.01 else f"{x:.3f}")

    L = ["## A series of checkpoints: `hesscli scan --analyses trace,eigs,extremes,density`", ""]
    L.append(f"W2 plus {cfg['every']} full-batch Adam steps (lr {cfg['lr']:g}) between checkpoints, "
             f"{cfg['checkpoints']} checkpoints, float32 defaults, {cfg['threads']} threads; "
             f"`python -m benchmarks.scan_series`. Products and seconds are means per checkpoint over "
             f"checkpoints 2..{cfg['checkpoints']} (the first starts cold either way); errors are medians over "
             f"every {cfg['ref_every']}-th checkpoint (steps {', '.join(map(str, cfg['ref_steps']))}) against its "
             "float64 reference; PyHessian + eigenthings ran on those checkpoints.")
    L.append("")
    L.append("| run | products / checkpoint (trace + eigs + extremes + density) | seconds / checkpoint | "
             "top-10 error | λ_min error | trace error | density W1 error |")
    L.append("|---|---|---|---|---|---|---|")

    def line(name: str, rows: list[dict[str, Any]], skip: bool = True) -> None:
        parts = " + ".join(f"{_products(rows, a, skip):.0f}" for a in ANALYSES)
        L.append(f"| {name} | {_products(rows, None, skip):.0f} ({parts}) | {_median(rows, 'seconds', skip):.2f} | "
                 f"{fmt(_median(rows, 'top10_error', skip))} | {fmt(_median(rows, 'min_error', skip))} | "
                 f"{fmt(_median(rows, 'trace_error', skip))} | {fmt(_median(rows, 'density_error', skip))} |")

    line("hesscli scan (warm starts, default)", warm)
    line("hesscli scan --no-warm-start", cold)
    L.append(f"| hesscli trace --probes {2 * cfg['probes']}, cold | {_products(cold2, 'trace'):.0f} (trace only) | "
             f"{_median(cold2, 'seconds'):.2f} | - | - | {fmt(_median(cold2, 'trace_error'))} | - |")
    if peer:
        line("PyHessian (top-10, trace, density) + eigenthings (λ_min), defaults", peer, skip=False)
    ratio = _products(cold) / _products(warm)
    trace_ratio = _median(cold, "trace_error") / _median(warm, "trace_error")
    L.append("")
    L.append(f"Products per checkpoint, cold / warm: **{ratio:.2f}x** (target ≥ 2x at equal accuracy: not met). "
             f"eigs + extremes: {_products(cold, 'eigs') + _products(cold, 'extremes'):.0f} products cold against "
             f"{_products(warm, 'eigs') + _products(warm, 'extremes'):.0f} warm, at the same tolerance; "
             f"trace error at {cfg['probes']} products: {fmt(_median(warm, 'trace_error'))} warm against "
             f"{fmt(_median(cold, 'trace_error'))} cold ({trace_ratio:.1f}x) and "
             f"{fmt(_median(cold2, 'trace_error'))} cold at {2 * cfg['probes']}. Every checkpoint uses the same seed "
             "(common random numbers), so the trace errors of the scored checkpoints are close to one draw of each "
             "estimator, not a median over draws. The density's SLQ runs "
             f"({_products(warm, 'density'):.0f} of {_products(warm):.0f} products) need fresh random start vectors "
             "to stay unbiased and get no warm start.")
    if peer:
        L.append(f"PyHessian + eigenthings at their defaults spend {_products(peer, None, False) / _products(warm):.2f}x "
                 f"hesscli's products and {_median(peer, 'seconds', False) / _median(warm, 'seconds'):.2f}x its seconds "
                 f"per checkpoint, with {_median(peer, 'top10_error', False) / _median(warm, 'top10_error'):.0f}x the "
                 f"top-10 error, a λ_min off by {100 * _median(peer, 'min_error', False):.0f} %, "
                 f"{_median(peer, 'trace_error', False) / _median(warm, 'trace_error'):.0f}x the trace error and "
                 f"{_median(peer, 'density_error', False) / _median(warm, 'density_error'):.1f}x the density error "
                 "(one SLQ run of 100 steps against five of 80).")
    L.append("")
    return "\n".join(L)


def run(checkpoints: int = 20, every: int = 2, lr: float = 3e-4, ref_every: int = 5, threads: int = 2,
        probes: int = 100, peers_too: bool = True) -> dict[str, Any]:
    torch.set_num_threads(threads)
    series = make_series(checkpoints, every, lr)
    refs = [reference(w) if i % ref_every == ref_every - 1 else None for i, (_, w) in enumerate(series)]
    results: dict[str, Any] = {
        "config": {"checkpoints": checkpoints, "every": every, "lr": lr, "ref_every": ref_every,
                   "ref_steps": [s for (s, _), r in zip(series, refs) if r is not None],
                   "threads": threads, "probes": probes},
        "references": [{"step": s, "top": r.top[:10], "lambda_min": r.bottom[0], "trace": r.trace,
                        "trace_se": r.trace_se} for (s, _), r in zip(series, refs) if r is not None],
    }
    partial = OUT_DIR / "scan_series.partial.json"  # what is measured survives a failure further on
    results["peers"] = peer_rows(series, refs) if peers_too else []
    partial.write_text(json.dumps(results, default=float))
    results["warm"] = scan(series, refs, warm=True, probes=probes)
    partial.write_text(json.dumps(results, default=float))
    results["cold"] = scan(series, refs, warm=False, probes=probes)
    partial.write_text(json.dumps(results, default=float))
    results["cold_trace_2x"] = scan(series, refs, warm=False, probes=2 * probes, analyses=("trace",))
    SECTION.parent.mkdir(parents=True, exist_ok=True)
    SECTION.write_text(markdown(results))
    return results


TOL_ANALYSES = ("trace", "eigs", "extremes")
TOL = 2e-3
TOL_PROBES = 300


def run_tol(checkpoints: int = 20, every: int = 2, lr: float = 3e-4, ref_every: int = 5, threads: int = 2,
            tol: float = TOL, probes: int = TOL_PROBES) -> dict[str, Any]:
    """The same series at a target accuracy: ``--analyses trace,eigs,extremes --trace-tol TOL --probes
    PROBES``, warm and cold. The trace stops at the target (Hutch++'s residual planned from a pilot),
    so the products it spends are the products that accuracy costs; eigs and extremes stop at their
    ``tol`` as in the default rows."""
    torch.set_num_threads(threads)
    series = make_series(checkpoints, every, lr)
    refs = [reference(w) if i % ref_every == ref_every - 1 else None for i, (_, w) in enumerate(series)]
    results: dict[str, Any] = {
        "config": {"checkpoints": checkpoints, "every": every, "lr": lr, "ref_every": ref_every, "threads": threads,
                   "tol": tol, "probes": probes, "analyses": list(TOL_ANALYSES),
                   "ref_steps": [s for (s, _), r in zip(series, refs) if r is not None]},
    }
    for name, warm in (("warm", True), ("cold", False)):
        results[name] = scan(series, refs, warm=warm, probes=probes, analyses=TOL_ANALYSES, trace_tol=tol)
    return results


def markdown_tol(results: dict[str, Any], series: dict[str, Any] | None = None) -> str:
    """The RESULTS.md section of :func:`run_tol`; ``series`` is the default-budget section (:func:`run`),
    whose cold / warm ratio with the density is quoted when given."""
    cfg, warm, cold = results["config"], results["warm"], results["cold"]

    def fmt(x: float) -> str:
        return "-" if x != x else f"{x:.1e}"

    def share(rows: list[dict[str, Any]]) -> str:
        use = [r for r in rows[1:] if "trace_converged" in r]  # runs of an earlier version: scored ones only
        return f"{sum(bool(r['trace_converged']) for r in use)}/{len(use)}"

    def seconds(rows: list[dict[str, Any]]) -> str:
        load = _median(rows, "load")
        return f"{_median(rows, 'seconds'):.2f}" + (f" ⚠ foreign load {100 * load:.0f}%" if load > 0.1 else "")

    L = [f"## The same series at a target accuracy: `--analyses trace,eigs,extremes --trace-tol {cfg['tol']:g} "
         f"--probes {cfg['probes']}`", ""]
    L.append(f"`python -m benchmarks.run --only scan_tol`: the checkpoints of the section above; the trace stops at "
             f"stderr ≤ {cfg['tol']:g}·|trace| (Hutch++ with the residual probes planned from a pilot, at most "
             f"{cfg['probes']} products), eigs and extremes at their default tolerance. Means per checkpoint over "
             f"checkpoints 2..{cfg['checkpoints']}; errors are medians over steps "
             f"{', '.join(map(str, cfg['ref_steps']))} against the float64 references. Seconds are not comparable "
             "where another process loaded the machine (⚠, median share of the machine used by other processes).")
    L.append("")
    L.append("| run | products / checkpoint (trace + eigs + extremes) | seconds / checkpoint | trace target met | "
             "reported stderr / trace | trace error | top-10 error | λ_min error |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, rows in (("warm starts (default)", warm), ("`--no-warm-start`", cold)):
        parts = " + ".join(f"{_products(rows, a):.0f}" for a in TOL_ANALYSES)
        L.append(f"| {name} | {_products(rows):.0f} ({parts}) | {seconds(rows)} | {share(rows)} | "
                 f"{fmt(_median(rows, 'trace_rel_stderr'))} | {fmt(_median(rows, 'trace_error'))} | "
                 f"{fmt(_median(rows, 'top10_error'))} | {fmt(_median(rows, 'min_error'))} |")
    ratio = _products(cold) / _products(warm)
    trace_ratio = _products(cold, "trace") / _products(warm, "trace")
    lanczos = [_products(rows, "eigs") + _products(rows, "extremes") for rows in (cold, warm)]
    with_density = ""
    if series and series.get("warm") and series.get("cold"):
        with_density = (f"; with the density's SLQ runs, which get no warm start, it is the "
                        f"{_products(series['cold']) / _products(series['warm']):.2f}x of the section above")
    L.append("")
    L.append(f"Products per checkpoint at the same targets, cold / warm: **{ratio:.2f}x** (trace {trace_ratio:.2f}x, "
             f"eigs + extremes {lanczos[0] / max(1.0, lanczos[1]):.2f}x; target ≥ 2x: "
             f"{'met' if ratio >= 2 else 'not met'}{with_density}). "
             "A warm Hutch++ skips its sketch (a third of the budget) and its carried basis leaves the residual "
             "less variance; a cold one pays the sketch and its basis before the first residual probe.")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ref-every", type=int, default=5,
                        help="float64 references (and the peers) on every N-th checkpoint")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    results = run(args.checkpoints, args.every, args.lr, args.ref_every, args.threads, peers_too=not args.no_peers)
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
