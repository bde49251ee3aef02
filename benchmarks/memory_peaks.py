"""Peak memory of ``trace`` and ``density`` at their defaults, hesscli against PyHessian, with glibc's
mmap threshold fixed so that the peak is the peak of live memory.

``python -m benchmarks.memory_peaks [--workloads W2,W3,W4] [--runs 2]``

The workload tables measure memory as the largest peak-RSS increase of a call in a process that
has run other calls before. With glibc's defaults that number depends on what ran before: once a
large block is freed, glibc raises its mmap threshold to that size and keeps later blocks of that
size in its heap, which it seldom returns. On W2 the same ``trace`` call measured 67-86 MB from
one process to the next, and 94-148 MB as a process's first call, for either library.

Here each (workload, analysis, library) runs in a process of its own with
``MALLOC_MMAP_THRESHOLD_=65536``: every block above 64 KiB is mapped on its own and returned when
freed, so RSS follows the live tensors (repeated calls agree to 0.1-2 MB). In that process the
workload is loaded, then one small call of the same kind warms the process up (library imports,
the BLAS threads' buffers, the first double backward: costs paid once per process whatever the
budget), then ``runs`` seeded calls at the library's defaults; reported is the largest peak RSS
increase of those calls over the RSS before each (:func:`benchmarks.measure.run_once`). Times are
not reported: with every large block mapped afresh a product runs about twice as slowly as in a
normal process.

Calls: ``hesscli trace`` (Hutch++, 100 products) and ``hesscli density`` (5 runs x 80 steps)
through the native backend, as ``hesscli`` runs them; PyHessian ``trace()`` (Hutchinson, stops
at its relative tolerance, 20-32 probes) and ``density()`` (one run of 100 steps, with the
``torch.eig`` shim it needs). Prints a Markdown section; :func:`run` returns the rows for
``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

THRESHOLD = 65536
"""``MALLOC_MMAP_THRESHOLD_`` of the measuring processes (bytes)."""

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ("trace", "density")
LIBRARIES = {"trace": ("hesscli", "hesscli-hutchinson", "pyhessian"), "density": ("hesscli", "pyhessian")}
CALLS = {
    ("hesscli", "trace"): "`trace` (defaults: Hutch++, 100 products)",
    ("hesscli-hutchinson", "trace"): "`trace --method hutchinson` (100 products, no basis)",
    ("pyhessian", "trace"): "`trace()` defaults (Hutchinson to tol 1e-3)",
    ("hesscli", "density"): "`density` (defaults: 5 runs x 80 steps)",
    ("pyhessian", "density"): "`density()` defaults (100 steps) + torch.eig shim",
}
RUNS = {"W4": 1}
"""Measured calls per workload where fewer than ``--runs`` (a W4 product takes seconds)."""
SKIP = {("W4", "density"): "5 x 80 products of ~3 s each with this allocator setting: not measured"}


def _calls(workload: Any, library: str, analysis: str) -> tuple[Callable[[int], Any], Callable[[int], Any]]:
    """``(warm-up call, measured call)`` for one library and analysis on ``workload``."""
    from benchmarks import peers

    problem = workload.problem()
    if library.startswith("hesscli"):
        extra = {"method": "hutchinson"} if library == "hesscli-hutchinson" else {}
        small = {"trace": {"probes": 6}, "density": {"runs": 1, "iters": 5}}[analysis]
        return (peers.native(problem, analysis, **small, **extra),
                peers.native(problem, analysis, **extra))
    if analysis == "trace":
        return peers.pyhessian(workload, "trace", maxIter=2, tol=0.0), peers.pyhessian(workload, "trace")
    return (peers.pyhessian(workload, "density", shim=True, iter=5),
            peers.pyhessian(workload, "density", shim=True))


def child(name: str, library: str, analysis: str, runs: int) -> dict[str, Any]:
    """Measure one (workload, library, analysis) in this process (see the module docstring)."""
    import torch

    from benchmarks.measure import run_once
    from benchmarks.suite import sdpa_math
    from benchmarks.workloads import load_workload

    torch.set_num_threads(2)
    workload = load_workload(name)
    context = sdpa_math if name == "W3" else contextlib.nullcontext
    warm, call = _calls(workload, library, analysis)
    with context():
        first = run_once(warm, 100)
        if first.error is not None:
            return {"error": first.error}
        measured = [run_once(call, seed) for seed in range(runs)]
    errors = [r.error for r in measured if r.error is not None]
    return {
        "peak_mb": max(r.rss_delta for r in measured) / 2**20,
        "peaks_mb": [r.rss_delta / 2**20 for r in measured],
        "error": errors[0] if errors else None,
    }


def run(workloads: list[str] | None = None, runs: int = 2, *, log: Callable[[str], None] = print,
        timeout_s: float = 1800.0) -> dict[str, Any]:
    """Measure every (workload, analysis, library) in a process of its own; returns the section."""
    from benchmarks.measure import machine_info

    workloads = workloads or ["W2", "W3", "W4"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(THRESHOLD),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    rows: list[dict[str, Any]] = []
    for name in workloads:
        for analysis in ANALYSES:
            for library in LIBRARIES[analysis]:
                row: dict[str, Any] = {"workload": name, "analysis": analysis, "library": library,
                                       "call": CALLS[(library, analysis)]}
                if (name, analysis) in SKIP:
                    row["skipped"] = SKIP[(name, analysis)]
                    rows.append(row)
                    continue
                n = min(runs, RUNS.get(name, runs))
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "benchmarks.memory_peaks", "--child", name, library, analysis,
                       "--runs", str(n)]
                try:
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                                          cwd=ROOT, check=False)
                    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
                    out = json.loads(lines[-1]) if lines else {
                        "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:240]}
                except subprocess.TimeoutExpired:
                    out = {"error": f"timed out after {timeout_s:.0f} s"}
                row.update(out, seconds=time.perf_counter() - t0)
                rows.append(row)
                log(f"memory {name} {analysis} {library}: " + (f"{row['peak_mb']:.1f} MB" if "peak_mb" in row
                                                               else str(row.get("error"))))
    return {"rows": rows, "threshold": THRESHOLD, "runs": runs, "machine": machine_info()}


def markdown(section: dict[str, Any]) -> str:
    """The section of RESULTS.md."""
    L = ["## Peak memory of trace and density, live memory (fixed mmap threshold)\n",
         f"`python -m benchmarks.run --only memory` (`benchmarks/memory_peaks.py`): each row in a process of "
         f"its own with `MALLOC_MMAP_THRESHOLD_={section['threshold']}`, so that RSS follows the live tensors; "
         "after a small warm-up call of the same kind, the largest peak RSS increase of the measured calls "
         f"(up to {section['runs']} seeds). Float32, 2 threads, defaults of each library.\n",
         "| workload | analysis | hesscli (defaults) | PyHessian (defaults) | hesscli ÷ PyHessian | "
         "hesscli `--method hutchinson` (trace) |", "|---|---|---|---|---|---|"]
    by = {(r["workload"], r["analysis"], r["library"]): r for r in section["rows"]}
    for w in dict.fromkeys(r["workload"] for r in section["rows"]):
        for a in ANALYSES:
            h, p = by.get((w, a, "hesscli")), by.get((w, a, "pyhessian"))
            if h is None or p is None:
                continue
            if h.get("skipped"):
                L.append(f"| {w} | {a} | - | - | {h['skipped']} | - |")
                continue
            ratio = (f"**{h['peak_mb'] / p['peak_mb']:.2f}**" if h.get("peak_mb") and p.get("peak_mb") else "-")
            plain = by.get((w, a, "hesscli-hutchinson"))
            L.append(f"| {w} | {a} | {_cell(h)} | {_cell(p)} | {ratio} | {_cell(plain) if plain else '-'} |")
    L.append("")
    L.append("Calls: " + "; ".join(f"{lib} {CALLS[(lib, a)]}" for a in ANALYSES for lib in LIBRARIES[a]) + ".\n")
    return "\n".join(L)


def _cell(row: dict[str, Any]) -> str:
    if row.get("peak_mb") is None:
        return f"**FAIL**: {row.get('error')}"
    spread = ""
    peaks = row.get("peaks_mb") or []
    if len(peaks) > 1:
        spread = f" ({min(peaks):.1f}-{max(peaks):.1f})"
    return f"{row['peak_mb']:.1f} MB{spread}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W2,W3,W4")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("WORKLOAD", "LIBRARY", "ANALYSIS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, runs=args.runs)))
        return
    section = run(args.workloads.split(","), args.runs)
    print(markdown(section))


if __name__ == "__main__":
    main()
