"""Command line: ``python -m benchmarks.run [--workloads W1,W2,W3,W4] [--repeats 3] [--quick] [--only SECTIONS]``.

Builds the workloads and their float64 references (cached in ``benchmarks/out/``), runs every
library on every workload in this process, then the sections that run in separate processes
(whole processes, a series of checkpoints at default budgets and at a target accuracy, density at equal
accuracy, peak memory with a fixed mmap threshold, big models, thread contention;
not under ``--quick``), writes
``benchmarks/results.json`` and regenerates ``benchmarks/RESULTS.md``.

``--only SECTIONS`` (some of :data:`SECTIONS`: scan_series, scan_tol, density_equal_error, memory,
big_models, contention) runs just those separate sections and replaces them in the existing ``results.json`` (the rest is
kept as it is), then regenerates RESULTS.md. ``--keep-sections`` measures the workloads and whole processes and
keeps the separate sections of the existing results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import peers
from benchmarks.measure import machine_info
from benchmarks.reference import load_reference
from benchmarks.report import write_report
from benchmarks.suite import Plan, run_workload, sdpa_math
from benchmarks.workloads import ALL, OUT_DIR, SPECS, load_workload

logger = logging.getLogger("benchmarks")

HERE = Path(__file__).resolve().parent

PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pyhessian", "hessian-eigenthings",
            "backpack-for-pytorch", "curvlinops-for-pytorch", "hesscli")


def versions() -> dict[str, str]:
    """Installed versions of Python, torch, the peers and hesscli."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def run_suite(workloads: list[str], *, repeats: int = 3, quick: bool = False, out_json: Path = HERE / "results.json",
              out_md: Path = HERE / "RESULTS.md", cache_dir: Path = OUT_DIR, command: str | None = None,
              threads: int = 2, smoke: bool = False, device: str = "cpu",
              keep_sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark on ``workloads`` and write the JSON results and the Markdown report.

    Args:
        workloads: workload names (``W1`` .. ``W4``, ``tiny``).
        repeats: timed repeats after the warm-up (calls whose warm-up exceeds 6 s run once).
        quick: small budgets, 1 repeat, short sweeps (a smoke test of the machinery).
        out_json, out_md: output paths.
        cache_dir: cache of trained weights and references.
        command: the command line recorded in the report.
        threads: ``torch.set_num_threads`` (2, as the baselines; tests use 1).
        smoke: run only a handful of rows per workload (the machinery test).
        keep_sections: entries of separate sections to keep instead of measuring them (``--keep-sections``);
            ``None`` measures every section.
        device: device of the big-model section (``cpu`` | ``cuda``).

    Returns:
        The results dictionary written to ``out_json``.
    """
    torch.set_num_threads(threads)
    peers.install_counters()
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "settings": {"repeats": repeats, "quick": quick, "smoke": smoke, "dtype": "float32", "slow_s": 4.0,
                     "foreign_load_limit": 0.10},
        "workloads": {},
    }
    for name in workloads:
        t0 = time.perf_counter()
        w = load_workload(name, cache_dir=cache_dir)
        context = sdpa_math if name == "W3" else contextlib.nullcontext
        logger.info("%s: %s, %d params, %d samples, loss %.4g, accuracy %.3f (%.1fs)", name, w.title,
                    w.n_params, w.n_samples, w.train_loss, w.accuracy, time.perf_counter() - t0)
        t1 = time.perf_counter()
        ref = load_reference(w, context=context, cache_dir=cache_dir)
        logger.info("%s reference: %s (%.1fs)", name, ref.method, time.perf_counter() - t1)
        full = name != "W4"
        plan = Plan(repeats=1 if quick else (repeats if w.repeats is None else min(repeats, w.repeats)),
                    full=full, sweeps=full, quick=quick, smoke=smoke,
                    cap_hvp=400 if quick else 3000, cap_seconds=20.0 if quick else 150.0,
                    remeasure_s=0.0 if quick or smoke else 120.0)
        t2 = time.perf_counter()
        out = run_workload(w, ref, plan, progress=lambda msg: logger.info("%s", msg))
        results["workloads"][name] = {
            "info": {"title": w.title, "n_params": w.n_params, "n_samples": w.n_samples,
                     "train_loss": w.train_loss, "accuracy": w.accuracy, "full_plan": full,
                     "repeats": plan.repeats},
            "reference": ref.summary(),
            "seconds": time.perf_counter() - t2,
            **out,
        }
        logger.info("%s done in %.0fs", name, time.perf_counter() - t0)
        results["wall_seconds"] = time.perf_counter() - t_start
        _write(results, out_json, out_md)  # partial results survive an interrupted run
    whole = [n for n in ("W2", "W4") if n in workloads]
    if whole and not quick:  # fresh processes, as a user runs them (benchmarks/whole_process.py)
        from benchmarks import whole_process

        results["whole_process"] = whole_process.run(whole, repeats)
    if not quick and not smoke:
        _write(results, out_json, out_md)
        for section in SECTIONS:
            if keep_sections is not None:
                if section in keep_sections:
                    results[section] = keep_sections[section]
                continue
            results[section] = run_section(section, repeats=repeats, device=device)
            _write(results, out_json, out_md)
    results["wall_seconds"] = time.perf_counter() - t_start
    _write(results, out_json, out_md)
    return results


SECTIONS = ("scan_series", "scan_tol", "density_equal_error", "memory", "big_models", "contention")
"""Sections measured in separate processes after the workloads, also runnable alone with ``--only``."""


def run_section(name: str, *, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Measure one separate section (one of :data:`SECTIONS`); returns its ``results.json`` entry."""
    t0 = time.perf_counter()
    if name == "scan_series":
        from benchmarks import scan_series

        out = scan_series.run()
    elif name == "scan_tol":
        from benchmarks import scan_series

        out = scan_series.run_tol()
    elif name == "density_equal_error":
        from benchmarks import density_equal_error

        out = {"workloads": density_equal_error.run(["W1", "W2"])}
    elif name == "memory":
        from benchmarks import memory_peaks

        out = memory_peaks.run(log=logger.info)
    elif name == "big_models":
        from benchmarks import big_models

        out = big_models.run(device=device, repeats=min(repeats, 3), log=logger.info)
    elif name == "contention":
        from benchmarks import contention

        out = contention.run(repeats=min(repeats, 2), log=logger.info)
    else:
        raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    out["generated"] = datetime.now(UTC).isoformat(timespec="seconds")
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def run_only(sections: list[str], *, out_json: Path = HERE / "results.json", out_md: Path = HERE / "RESULTS.md",
             repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Run only ``sections`` and replace them in the existing ``out_json``; regenerate ``out_md``."""
    if not out_json.is_file():
        raise FileNotFoundError(f"{out_json}: no results to update; run the whole suite first")
    results = json.loads(out_json.read_text())
    for name in sections:
        logger.info("section %s", name)
        results[name] = run_section(name, repeats=repeats, device=device)
        _write(results, out_json, out_md)
    return results


def _write(results: dict[str, Any], out_json: Path, out_md: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=1))
    tmp.replace(out_json)
    write_report(json.loads(out_json.read_text()), out_md)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.run``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(ALL),
                        help=f"comma-separated subset of {', '.join(SPECS)} (default: {','.join(ALL)})")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up (default 3)")
    parser.add_argument("--quick", action="store_true", help="small budgets and 1 repeat: a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="results JSON path")
    parser.add_argument("--report", type=Path, default=HERE / "RESULTS.md", help="Markdown report path")
    parser.add_argument("--only", default=None,
                        help=f"run only these separate sections ({', '.join(SECTIONS)}), replacing them in the "
                             "existing results JSON")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the big_models section (default cpu)")
    parser.add_argument("--keep-sections", action="store_true",
                        help=f"measure the workloads and the whole processes, and keep the separate sections "
                             f"({', '.join(SECTIONS)}) of the existing results JSON instead of measuring them again")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0, got {args.repeats}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hesscli").setLevel(logging.WARNING)
    command = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.only is not None:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in only if n not in SECTIONS]
        if bad or not only:
            parser.error(f"--only: unknown {', '.join(bad) or '(nothing)'}; choose from {', '.join(SECTIONS)}")
        run_only(only, out_json=args.out, out_md=args.report, repeats=args.repeats, device=args.device)
        return 0
    keep = None
    if args.keep_sections and args.out.is_file():
        old = json.loads(args.out.read_text())
        keep = {name: old[name] for name in SECTIONS if old.get(name)}
    run_suite(names, repeats=args.repeats, quick=args.quick, out_json=args.out, out_md=args.report, command=command,
              device=args.device, keep_sections=keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
