"""The benchmark plan: which (library, call) rows run on which workload, and the equal-accuracy sweeps.

Every row is measured with :func:`benchmarks.measure.measure` in this process, on the same data,
with ``torch.set_num_threads(2)`` and float32, and scored against the float64 reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from benchmarks import peers
from benchmarks.measure import LoadWindow, Measurement, measure, run_once
from benchmarks.reference import Reference, density_error, rel_err, top_error
from benchmarks.workloads import Workload
from hesscli.operators.empirical import make_operator

logger = logging.getLogger(__name__)

Context = Callable[[], ContextManager[object]]

TOP10_TARGET = 1e-4
"""Relative error target on each of the top-10 eigenvalues (and on λ_min)."""

TRACE_TARGET = 1e-2
"""Relative error target on the trace (median over seeds)."""

TRACE_ERROR_SEEDS = 12
"""Seeds behind the error of each trace row at the equal ~100-product budget. The errors of one
estimator spread over an order of magnitude from seed to seed (W2, Hutch++ at 99 products:
quartiles 8e-4 and 3e-3 over 20 seeds), so a median of 3 can differ 10x between two runs of the
same estimator; the extra seeds are run after the timed ones and only add errors."""


def sdpa_math() -> ContextManager[object]:
    """Force the math kernel of ``scaled_dot_product_attention`` (the only CPU kernel with
    double-backward and forward-mode AD)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@dataclass
class Plan:
    """How much of the suite runs on one workload.

    Attributes:
        repeats: timed repeats after the warm-up.
        full: run every row (False: the reduced W4 plan).
        sweeps: run the equal-accuracy sweeps.
        quick: tiny budgets and caps.
        smoke: only a handful of rows (the machinery test).
        cap_hvp, cap_seconds: caps for runaway solvers.
        remeasure_s: time allowed, after the last row, to measure flagged rows again.
        slow_s: a call whose warm-up takes longer is reported from the warm-up alone.
    """

    repeats: int = 3
    full: bool = True
    sweeps: bool = True
    quick: bool = False
    smoke: bool = False
    cap_hvp: int = 3000
    cap_seconds: float = 150.0
    remeasure_s: float = 120.0
    slow_s: float = 4.0


@dataclass
class Suite:
    """Runs and records the rows of one workload."""

    workload: Workload
    ref: Reference
    plan: Plan
    context: Context = contextlib.nullcontext
    rows: list[dict[str, Any]] = field(default_factory=list)
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    unit: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda msg: None
    _redo: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    _more_seeds: list[tuple[int, Callable[[], peers.Call], int]] = field(default_factory=list)
    _sweep_redo: list[tuple[dict[str, Any], list[Any]]] = field(default_factory=list)

    # ------------------------------------------------------------------ one row
    def measure_row(self, task: str, library: str, call: str, build: Callable[[], peers.Call], *,
                    kind: str = "default", cap: int | None = None, cap_seconds: float | None = None,
                    min_runs: int = 1, record: bool = True, repeats: int | None = None) -> dict[str, Any]:
        """Measure one (library, call) on this workload and score it against the reference."""
        t0 = time.perf_counter()
        reps = self.plan.repeats if repeats is None else min(repeats, self.plan.repeats)
        try:
            fn = build()
        except Exception as e:  # noqa: BLE001 - a library that cannot even be set up is a FAIL row
            row = self._fail_row(task, library, call, kind, f"{type(e).__name__}: {' '.join(str(e).split())[:240]}")
        else:
            m = measure(fn, repeats=reps, min_runs=min(min_runs, max(reps, 1)), slow_s=self.plan.slow_s,
                        cap=cap if cap is not None else self.plan.cap_hvp,
                        cap_seconds=cap_seconds if cap_seconds is not None else self.plan.cap_seconds,
                        retries=0 if self.plan.quick or self.plan.smoke else 1)
            row = self._row(task, library, call, kind, m)
        if record:
            self.rows.append(row)
            self._redo[len(self.rows) - 1] = (task, library, call, build, kind, cap, cap_seconds, min_runs, repeats)
        self.progress(f"{self.workload.name} {task:8s} {library:12s} {call[:60]:60s} {_fmt_row(row)} "
                      f"[{time.perf_counter() - t0:.1f}s]")
        return row

    def more_error_seeds(self, total: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Mark a recorded row to get errors from ``total`` seeds in all (see :meth:`add_error_seeds`);
        returns a function to apply to what :meth:`measure_row` returned."""
        def mark(row: dict[str, Any]) -> dict[str, Any]:
            i = next(i for i, r in enumerate(self.rows) if r is row)
            self._more_seeds.append((i, self._redo[i][3], total))
            return row
        return mark

    def add_error_seeds(self) -> int:
        """Run the marked rows' calls on further seeds (untimed) until each has its ``total`` errors;
        the row's ``error`` becomes the median and ``error_worst`` the largest over all of them.

        Returns:
            Calls run.
        """
        done = 0
        for i, build, total in self._more_seeds:
            r = self.rows[i]
            if r["status"] != "ok" or len(r.get("errors") or []) >= total:
                continue
            call = build()
            seed = 1000
            while len(r["errors"]) < total:
                run = run_once(call, seed, cap=self.plan.cap_hvp, cap_seconds=self.plan.cap_seconds)
                seed, done = seed + 1, done + 1
                if run.error is not None:
                    r["message"] = f"{r.get('message') or ''} seed {run.seed}: {run.error}".strip()
                    break
                err = self.score(r["task"], run.value)
                if err is not None:
                    r["errors"].append(err)
            r["error"], r["error_worst"] = statistics.median(r["errors"]), max(r["errors"])
            r["error_seeds"] = len(r["errors"])
            self.progress(f"{self.workload.name} {r['task']:8s} {r['library']:12s} {r['call'][:60]:60s} error over "
                          f"{len(r['errors'])} seeds: median {r['error']:.2e}")
        return done

    def remeasure_flagged(self, budget_s: float) -> int:
        """Measure flagged rows and flagged sweep points again (cheapest first) within ``budget_s``;
        keep the less contended measurement.

        The expected cost of a flagged row is estimated from its product count and the unit HVP
        time (its own time is inflated by the contention).

        Returns:
            How many measurements were taken again.
        """
        hvp_s = self.unit.get("hvp_autograd_s") or 0.0

        def cost(r: dict[str, Any]) -> float:
            clean = 3.0 * (r.get("n_hvp") or 0) * hvp_s + 0.1
            return min(r["seconds"] or 0.0, clean) * (max(r["runs"], 1) + 1)

        jobs: list[tuple[float, str, Any]] = []
        for i, r in enumerate(self.rows):
            if r.get("flagged") and r["status"] == "ok":
                jobs.append((cost(r), "row", i))
        for j, (result, redo) in enumerate(self._sweep_redo):
            k = self._key_point(result)
            if k is not None and result["points"][k].get("flagged") and redo[k] is not None:
                jobs.append((cost(result["points"][k]), "sweep", (j, k)))
        jobs.sort(key=lambda job: job[0])
        t0, done = time.perf_counter(), 0
        for est, what, ref in jobs:
            if time.perf_counter() - t0 + est > budget_s:
                continue
            if what == "row":
                done += self._remeasure_row(ref)
            else:
                j, k = ref
                result, redo = self._sweep_redo[j]
                kind, payload = redo[k]
                if kind == "row":
                    if payload is None:
                        continue
                    done += self._remeasure_row(payload)  # no-op when already measured again
                    new_point = _point(self.rows[payload], result["points"][k]["point"])
                else:
                    task, library, call, build, kind_, cap, cap_s, min_runs, repeats = payload
                    new = self.measure_row(task, library, call, build, kind=kind_, cap=cap, cap_seconds=cap_s,
                                           min_runs=min_runs, record=False, repeats=repeats)
                    done += 1
                    new_point = _point(new, result["points"][k]["point"])
                    if "error_override" in result["points"][k]:  # PyHessian prefix-curve error
                        new_point["error"] = result["points"][k]["error"]
                        new_point["error_override"] = True
                old = result["points"][k]
                if new_point["status"] == "ok" and (new_point["foreign_load"] or 0) < (old["foreign_load"] or 0):
                    result["points"][k] = new_point
                    if result["met"] or result.get("point") == old["point"]:
                        result.update(seconds=new_point["seconds"], n_hvp=new_point["n_hvp"])
                        if result["met"]:
                            result["error"] = new_point["error"]
                    if not result["met"]:
                        result["seconds"] = max((p["seconds"] or 0.0) for p in result["points"])
        return done

    def _remeasure_row(self, i: int) -> int:
        old = self.rows[i]
        if not old.get("flagged"):
            return 0
        task, library, call, build, kind, cap, cap_seconds, min_runs, repeats = self._redo[i]
        new = self.measure_row(task, library, call, build, kind=kind, cap=cap, cap_seconds=cap_seconds,
                               min_runs=min_runs, record=False, repeats=repeats)
        if new["status"] == "ok" and new["foreign_load"] < old["foreign_load"]:
            new["attempts"] = old["attempts"] + new["attempts"]
            old.clear()
            old.update(new)  # in place: sweeps hold references to rows
        return 1

    def _fail_row(self, task: str, library: str, call: str, kind: str, message: str) -> dict[str, Any]:
        return {"workload": self.workload.name, "task": task, "library": library, "call": call, "kind": kind,
                "status": "FAIL", "message": message, "seconds": None, "runs": 0, "n_hvp": None,
                "reported_hvp": None, "error": None, "error_worst": None, "rss_mb": None,
                "foreign_load": None, "flagged": False, "attempts": 0, "value": None}

    def _row(self, task: str, library: str, call: str, kind: str, m: Measurement) -> dict[str, Any]:
        base = {"workload": self.workload.name, "task": task, "library": library, "call": call, "kind": kind,
                "seconds": m.seconds, "runs": len(m.runs), "n_hvp": m.n_hvp, "rss_mb": m.rss_delta / 2**20,
                "foreign_load": m.foreign_load, "flagged": m.flagged, "attempts": m.attempts}
        if m.error is not None:
            status = "not converged (cap)" if m.error.startswith("not converged") else "FAIL"
            return {**base, "status": status, "message": m.error, "reported_hvp": None, "error": None,
                    "error_worst": None, "value": None}
        errors = [self.score(task, v) for v in m.values]
        reported = [v.get("reported_hvp") for v in m.values if v.get("reported_hvp") is not None]
        finite = [e for e in errors if e is not None]
        return {**base, "status": "ok", "message": _note(m.values),
                "reported_hvp": int(statistics.median(reported)) if reported else None,
                "error": statistics.median(finite) if finite else None,
                "error_worst": max(finite) if finite else None,
                "errors": finite, "value": _value(task, m.values)}

    def score(self, task: str, out: dict[str, Any]) -> float | None:
        """Relative error of one call's output for ``task`` (density: W1 distance / range)."""
        ref = self.ref
        if task == "top-1":
            return top_error(out.get("eigs", []), ref, 1)
        if task == "top-10":
            return top_error(out.get("eigs", []), ref, 10)
        if task == "min-eig":
            small = out.get("small") or []
            return rel_err(min(small), ref.bottom[0]) if small else math.inf
        if task == "scan":  # the top-10 and λ_min served by the same calls
            if not out.get("eigs") or not out.get("small"):
                return math.inf
            return max(top_error(out["eigs"], ref, min(10, len(out["eigs"]))), rel_err(min(out["small"]), ref.bottom[0]))
        if task == "extremes":
            big, small = out.get("eigs") or [], out.get("small") or []
            if not big or not small:
                return math.inf
            return max(rel_err(max(big), ref.top[0]), rel_err(min(small), ref.bottom[0]))
        if task == "trace":
            return rel_err(out["trace"], ref.trace)
        if task == "density":
            return density_error(out["nodes"], out["weights"], ref)
        return None

    # ------------------------------------------------------------------ unit costs
    def unit_costs(self, problem: Any) -> dict[str, Any]:
        """One full-data gradient and one native HVP (``func`` block of 1 and of 16, ``autograd``)."""
        g = torch.Generator().manual_seed(0)
        out: dict[str, Any] = {}
        with self.context():
            op = make_operator(problem, "hessian", hvp="autograd")
            v = torch.randn(op.size, generator=g)
            op.matvec(v)  # process warm-up (first double backward of the process is slow)
            op = make_operator(problem, "hessian", hvp="autograd")
            out["gradient_s"], out["gradient_load"] = _median_time(lambda: op.loss_and_gradient(), 7)
            t_first = time.perf_counter()
            op.matvec(v)  # builds and caches the first-backward graph
            out["hvp_autograd_first_s"] = time.perf_counter() - t_first
            out["hvp_autograd_s"], out["hvp_autograd_load"] = _median_time(lambda: op.matvec(v), 3)
            del op
            opf = make_operator(problem, "hessian", hvp="func")
            try:
                opf.matvec(v)
                out["hvp_func_s"], out["hvp_func_load"] = _median_time(lambda: opf.matvec(v), 3)
                V = torch.randn(opf.size, 16, generator=g)
                opf.matmat(V)
                t16, out["hvp_func16_load"] = _median_time(lambda: opf.matmat(V), 2 if self.plan.full else 1)
                out["hvp_func16_per_vector_s"] = t16 / 16
            except Exception as e:  # noqa: BLE001
                out["hvp_func_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            del opf
        grad = out["gradient_s"]
        for key in ("hvp_autograd_s", "hvp_func_s", "hvp_func16_per_vector_s"):
            if key in out:
                out[key.replace("_s", "_x_grad").replace("_per_vector", "")] = out[key] / grad
        self.unit = out
        self.progress(f"{self.workload.name} unit: gradient {grad * 1e3:.1f} ms; HVP autograd "
                      f"{out['hvp_autograd_s'] * 1e3:.1f} ms ({out['hvp_autograd_s'] / grad:.2f}x); func "
                      f"{out.get('hvp_func_s', math.nan) * 1e3:.1f} ms; func/16 "
                      f"{out.get('hvp_func16_per_vector_s', math.nan) * 1e3:.1f} ms/vector")
        return out

    # ------------------------------------------------------------------ sweeps
    def sweep(self, target_name: str, task: str, library: str, call: str,
              points: list[tuple[str, Callable[[], peers.Call] | dict[str, Any]]], target: float, *,
              min_runs: int = 1, cap: int | None = None, cap_seconds: float | None = None) -> dict[str, Any]:
        """Run ``points`` (cheapest first) until one meets ``target`` (median error over its runs).

        A point may be a row measured already (a dict from :meth:`measure_row`), which is reused.

        Returns:
            ``{"target", "library", "call", "met", "point", "seconds", "n_hvp", "error", "points": [...]}``;
            when no point meets the target, ``seconds`` is the time of the most accurate point and
            ``met`` is False (the ratio against it is a lower bound).
        """
        tried: list[dict[str, Any]] = []
        redo: list[tuple[Any, ...] | None] = []
        chosen: dict[str, Any] | None = None
        for label, build in points:
            if isinstance(build, dict):
                row = build
                idx = next((i for i, r in enumerate(self.rows) if r is build), None)
                redo.append(("row", idx))
            else:
                row = self.measure_row(task, library, f"{call} [{label}]", build, kind="sweep", cap=cap,
                                       cap_seconds=cap_seconds, min_runs=min_runs, record=False)
                redo.append(("build", (task, library, row["call"], build, "sweep", cap, cap_seconds, min_runs, None)))
            tried.append(_point(row, label))
            if row["status"] == "ok" and row["error"] is not None and row["error"] <= target:
                chosen = tried[-1]
                break
        result = self._sweep_result(target_name, task, library, call, target, tried, chosen)
        self.sweeps.append(result)
        self._sweep_redo.append((result, redo))
        return result

    def _key_point(self, result: dict[str, Any]) -> int | None:
        """Index of the point whose time the sweep reports (the chosen one, else the slowest)."""
        pts = result["points"]
        if not pts:
            return None
        if result["met"]:
            return next(i for i, p in enumerate(pts) if p["point"] == result["point"])
        return max(range(len(pts)), key=lambda i: pts[i]["seconds"] or 0.0)

    def _sweep_result(self, target_name: str, task: str, library: str, call: str, target: float,
                      tried: list[dict[str, Any]], chosen: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        if chosen is None:
            ok = [t for t in tried if t["status"] == "ok" and t["error"] is not None]
            best = min(ok, key=lambda t: t["error"]) if ok else (tried[-1] if tried else None)
            last = tried[-1] if tried else None
            # a failed or capped last point still cost its time: the lower bound uses the largest time
            spent = max((t["seconds"] or 0.0) for t in tried) if tried else None
            return {"target": target_name, "task": task, "library": library, "call": call, "goal": target,
                    "met": False, "point": best["point"] if best else None, "seconds": spent,
                    "n_hvp": best["n_hvp"] if best else None, "error": best["error"] if best else None,
                    "last_status": last["status"] if last else None, "points": tried, **extra}
        return {"target": target_name, "task": task, "library": library, "call": call, "goal": target,
                "met": True, "point": chosen["point"], "seconds": chosen["seconds"], "n_hvp": chosen["n_hvp"],
                "error": chosen["error"], "points": tried, **extra}

    def pyhessian_trace_sweep(self, max_probes: int, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
        """PyHessian ``trace(maxIter=n, tol=0)`` for the smallest ``n`` whose median error over ``seeds``
        is within :data:`TRACE_TARGET`.

        ``trace()`` returns its raw samples, and ``trace(maxIter=n)`` draws the same probes as the
        first ``n`` of a longer run with the same seed, so one run of ``max_probes`` per seed gives the
        error of every ``n``; the chosen ``n`` is then timed with the usual protocol.
        """
        import pyhessian as pyh

        model = self.workload.model_copy()
        X, y = self.workload.data()
        curves = []
        t0 = time.perf_counter()
        with self.context():
            for seed in seeds:
                torch.manual_seed(seed)
                peers._clear_grads(model)
                H = pyh.hessian(model, self.workload.criterion(), data=(X, y), cuda=False)
                samples = np.asarray(H.trace(maxIter=max_probes, tol=0.0))
                peers._clear_grads(model)
                del H
                curves.append(np.cumsum(samples) / np.arange(1, samples.size + 1))
        errs = np.median(np.abs(np.stack(curves) - self.ref.trace) / abs(self.ref.trace), axis=0)
        # the smallest n from which the median error stays within the target
        ok = errs <= TRACE_TARGET
        n_star = None
        for n in range(errs.size):
            if ok[n:].all():
                n_star = n + 1
                break
        self.progress(f"{self.workload.name} pyhessian trace prefix curves: {len(seeds)} x {max_probes} probes "
                      f"[{time.perf_counter() - t0:.1f}s]; n* = {n_star}")
        curve = {"n": [int(n) for n in (5, 10, 25, 50, 100, 200, 400, 800, 1600) if n <= errs.size],
                 "median_error": [float(errs[n - 1]) for n in (5, 10, 25, 50, 100, 200, 400, 800, 1600)
                                  if n <= errs.size]}
        n_time = n_star if n_star is not None else max_probes
        row = self.measure_row("trace", "pyhessian", f"trace(maxIter={n_time}, tol=0)",
                               lambda: peers.pyhessian(self.workload, "trace", self.context, maxIter=n_time, tol=0.0),
                               kind="sweep", record=False)
        tried = [_point(row, f"maxIter={n_time}") | {"error": float(errs[n_time - 1]), "error_override": True}]
        final_err = float(errs[-1])
        extrapolated = max_probes * (final_err / TRACE_TARGET) ** 2 if n_star is None else None
        result = self._sweep_result("trace 1%", "trace", "pyhessian", "trace(maxIter=n, tol=0)", TRACE_TARGET,
                                    tried, tried[0] if n_star is not None else None, curve=curve,
                                    extrapolated_probes=extrapolated)
        self.sweeps.append(result)
        build = lambda: peers.pyhessian(self.workload, "trace", self.context, maxIter=n_time, tol=0.0)  # noqa: E731
        self._sweep_redo.append((result, [("build", ("trace", "pyhessian", row["call"], build, "sweep", None, None,
                                                     1, None))]))
        return result


def _point(row: dict[str, Any], label: str) -> dict[str, Any]:
    keys = ("call", "status", "seconds", "n_hvp", "error", "error_worst", "runs", "flagged", "foreign_load", "message")
    return {k: row.get(k) for k in keys} | {"point": label}


def _median_time(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    times = []
    with LoadWindow() as load:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), load.value


def _note(values: list[dict[str, Any]]) -> str:
    conv = [v.get("converged") for v in values if v.get("converged") is not None]
    if conv and not all(conv):
        return "reports not converged" if not any(conv) else "some runs report not converged"
    return ""


def _value(task: str, values: list[dict[str, Any]]) -> float | None:
    """A representative returned value (median over runs) for the tables."""
    try:
        if task in ("top-1", "extremes"):
            return statistics.median(max(v["eigs"]) for v in values)
        if task == "top-10":
            return statistics.median(sorted(v["eigs"])[-10] for v in values if len(v["eigs"]) >= 10)
        if task == "min-eig":
            return statistics.median(min(v["small"]) for v in values)
        if task == "trace":
            return statistics.median(v["trace"] for v in values)
    except (KeyError, ValueError, statistics.StatisticsError):
        return None
    return None


def _fmt_row(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['message'][:80]}"
    err = row["error"]
    return (f"{row['seconds']:.3f}s x{row['runs']} {row['n_hvp']} HVP err "
            f"{'-' if err is None else f'{err:.2e}'} rss {row['rss_mb']:.0f}MB"
            f"{' FLAGGED %.0f%%' % (100 * row['foreign_load']) if row['flagged'] else ''}")


# ----------------------------------------------------------------------------- the plan
def run_workload(workload: Workload, ref: Reference, plan: Plan,
                 progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run every row of the plan on ``workload``; returns ``{"unit", "rows", "sweeps"}``."""
    w = workload
    ctx: Context = sdpa_math if w.name == "W3" else contextlib.nullcontext
    problem = w.problem()
    S = Suite(w, ref, plan, ctx, progress=progress)
    S.unit_costs(problem)
    q = plan.quick
    row = S.measure_row
    nat = lambda analysis, **kw: (lambda: peers.native(problem, analysis, ctx, **kw))  # noqa: E731
    pyh = lambda what, **kw: (lambda: peers.pyhessian(w, what, ctx, **kw))  # noqa: E731
    et = lambda what, **kw: (lambda: peers.eigenthings(w, what, ctx, **kw))  # noqa: E731
    eigsh = lambda **kw: (lambda: peers.curvlinops_eigsh(w, ctx, **kw))  # noqa: E731
    goal_top = max(TOP10_TARGET, 2 * max(ref.floor_top[:10]))
    goal_min = max(TOP10_TARGET, 2 * ref.floor_min)
    full = plan.full

    if plan.smoke:
        row("top-1", "hesscli", "eigs --top-k 1", nat("eigs", top_k=1))
        row("top-1", "pyhessian", "eigenvalues(top_n=1) defaults", pyh("eigenvalues", top_n=1))
        row("top-1", "eigenthings", "lanczos(k=1) defaults", et("lanczos", k=1))
        row("top-1", "curvlinops", "eigsh(k=1, which='LA')", eigsh(k=1, which="LA"))
        row("min-eig", "hesscli", "eigs --top-k 1 --which smallest", nat("eigs", top_k=1, which="smallest"))
        row("trace", "hesscli", "trace --probes 30", nat("trace", probes=30))
        row("trace", "pyhessian", "trace() defaults", pyh("trace"))
        row("trace", "backpack", "DiagHessian -> exact trace", lambda: peers.backpack_diag_trace(w, ctx))
        row("density", "hesscli", "density --runs 1 --iters 20", nat("density", runs=1, iters=20))
        row("density", "pyhessian", "density(iter=20) + torch.eig shim", pyh("density", shim=True, iter=20))
        trio = ("eigs", "extremes", "density")
        row("scan", "hesscli", "eigs + extremes + density, one shared Lanczos run",
            lambda: peers.native_scan(problem, trio, ctx, top_k=3, iters=20, runs=2))
        row("scan", "hesscli", "the same three analyses run separately",
            lambda: peers.native_scan(problem, trio, ctx, shared=False, top_k=3, iters=20, runs=2))
        S.sweep("top-10 1e-4", "top-10", "hesscli", "eigs --top-k 10 --tol t",
                [(f"tol={t:g}", nat("eigs", top_k=10, tol=t)) for t in (1e-2, 1e-6)], goal_top)
        S.pyhessian_trace_sweep(20)
        return {"unit": S.unit, "rows": S.rows, "sweeps": S.sweeps,
                "goals": {"top10": goal_top, "min": goal_min, "trace": TRACE_TARGET}}

    if w.name == "W3":  # the default CPU SDPA kernel has neither double backward nor forward-mode AD
        row("top-1", "hesscli", "eigs --top-k 1, default SDPA kernel (no sdpa_kernel(MATH))",
            lambda: peers.native(problem, "eigs", top_k=1), repeats=0)
        row("top-1", "pyhessian", "eigenvalues(top_n=1), default SDPA kernel",
            lambda: peers.pyhessian(w, "eigenvalues", top_n=1), repeats=0)

    # --- top-1
    row("top-1", "hesscli", "eigs --top-k 1 (defaults: tol 1e-6)", nat("eigs", top_k=1))
    row("top-1", "pyhessian", "eigenvalues(top_n=1) defaults", pyh("eigenvalues", top_n=1))
    row("top-1", "eigenthings", "lanczos(k=1) defaults", et("lanczos", k=1))
    if full:
        row("top-1", "eigenthings", "power_iteration_one defaults", et("power_iteration_one"))
        row("top-1", "curvlinops", "eigsh(k=1, which='LA') defaults (tol=0)", eigsh(k=1, which="LA"))

    # --- top-10
    n10 = row("top-10", "hesscli", "eigs --top-k 10 (defaults: tol 1e-6)", nat("eigs", top_k=10))
    p10 = row("top-10", "pyhessian", "eigenvalues(top_n=10) defaults", pyh("eigenvalues", top_n=10)) if full else None
    e10 = row("top-10", "eigenthings", "lanczos(k=10) defaults", et("lanczos", k=10))
    if full:
        row("top-10", "eigenthings", "lanczos(k=10, max_iter=60) (reorthogonalisation silently off)",
            et("lanczos", k=10, max_iter=60), kind="tuned")
        row("top-10", "eigenthings", "deflated_power_iteration(k=10) defaults", et("deflated_power_iteration", k=10))
        c10 = row("top-10", "curvlinops", "eigsh(k=10, which='LA') defaults (tol=0)", eigsh(k=10, which="LA"))

    # --- smallest eigenvalue
    nmin = row("min-eig", "hesscli", "eigs --top-k 1 --which smallest (defaults)", nat("eigs", top_k=1, which="smallest"))
    row("extremes", "hesscli", "extremes (λ_max and λ_min, defaults)", nat("extremes"))
    row("min-eig", "eigenthings", "lanczos(k=1, which='SA') defaults", et("lanczos", k=1, which="SA"))
    if full:
        row("min-eig", "eigenthings", "lanczos(k=1, which='SA', max_iter=100, reorthogonalize=True)",
            et("lanczos", k=1, which="SA", max_iter=100, reorthogonalize=True), kind="tuned")
        cmin = row("min-eig", "curvlinops", "eigsh(k=1, which='SA') defaults (tol=0)", eigsh(k=1, which="SA"),
                   cap_seconds=60 if not q else 20)

    # --- several analyses of one checkpoint (scan --analyses eigs,extremes,density)
    if full:
        trio = ("eigs", "extremes", "density")
        row("scan", "hesscli", "eigs --top-k 10 + extremes + density, one shared Lanczos run",
            lambda: peers.native_scan(problem, trio, ctx, top_k=10), kind="matched")
        row("scan", "hesscli", "the same three analyses run separately",
            lambda: peers.native_scan(problem, trio, ctx, shared=False, top_k=10), kind="matched")

    # --- trace (≈100 products: the equal-budget comparison)
    budget = 30 if not full else 100
    # the equal-budget rows: errors from TRACE_ERROR_SEEDS seeds
    seeds = S.more_error_seeds(TRACE_ERROR_SEEDS) if full and not q else (lambda r: r)
    seeds(row("trace", "hesscli", f"trace (defaults: Hutch++, {budget} probes)" if full else f"trace --probes {budget}",
              nat("trace", probes=budget), min_runs=3 if full else 1))
    if full:
        if w.n_params <= 5000:
            row("trace", "hesscli", "trace --method exact", nat("trace", method="exact"), kind="matched",
                cap=w.n_params + 1)
    row("trace", "pyhessian", "trace() defaults", pyh("trace"), min_runs=3 if full else 1)
    if full:
        seeds(row("trace", "pyhessian", "trace(maxIter=100, tol=0) (fixed 100 probes)",
                  pyh("trace", maxIter=100, tol=0.0), kind="matched", min_runs=3))
        seeds(row("trace", "eigenthings", "trace() defaults (Hutch++, 99)", et("trace"), min_runs=3))
        seeds(row("trace", "curvlinops", "hutchpp_trace(num_matvecs=99)",
                  lambda: peers.curvlinops_trace(w, "hutchpp_trace", 99, ctx), min_runs=3))
        seeds(row("trace", "curvlinops", "xtrace(num_matvecs=100)",
                  lambda: peers.curvlinops_trace(w, "xtrace", 100, ctx), min_runs=3))
        row("trace", "backpack", "DiagHessian -> exact trace", lambda: peers.backpack_diag_trace(w, ctx))
        seeds(row("trace", "backpack", "HMP Hutchinson (99 probes)", lambda: peers.backpack_hmp_trace(w, 99, ctx),
                  min_runs=3))

    # --- density
    if full:
        row("density", "hesscli", "density (defaults: 5 runs x 80 steps)", nat("density"))
        nd1 = row("density", "hesscli", "density --runs 1 --iters 100 (= PyHessian's budget)",
                  nat("density", runs=1, iters=100), kind="matched")
        nd10 = row("density", "hesscli", "density --runs 10 --iters 80 (= eigenthings' budget)",
                   nat("density", runs=10, iters=80), kind="matched")
        row("density", "pyhessian", "density() defaults (100 steps)", pyh("density"), repeats=0)
        pd = row("density", "pyhessian", "density() + torch.eig shim", pyh("density", shim=True))
        ed = row("density", "eigenthings", "spectral_density() defaults (10 x 80)", et("spectral_density"))
        row("density", "curvlinops", "lanczos_approximate_spectrum(ncv=100)",
            lambda: peers.curvlinops_spectrum(w, 100, ctx), cap_seconds=60 if not q else 20)
    else:
        nd1 = row("density", "hesscli", "density --runs 1 --iters 30", nat("density", runs=1, iters=30), kind="matched")
        pd = row("density", "pyhessian", "density(iter=30) + torch.eig shim", pyh("density", shim=True, iter=30))

    # --- equal-accuracy sweeps
    if plan.sweeps and full:
        tols = [1e-3, 1e-4, 1e-5, 1e-6] if not q else [1e-3, 1e-6]
        more = [200, 400] if not q else []  # what a ConvergenceWarning tells the user to do: raise max_iter
        S.sweep("top-10 1e-4", "top-10", "hesscli", "eigs --top-k 10 --tol t [--max-iter m]",
                [(f"tol={t:g}" + (" (default)" if t == 1e-6 else ""), n10 if t == 1e-6 else nat("eigs", top_k=10, tol=t))
                 for t in tols] + [(f"tol=1e-6, max_iter={m}", nat("eigs", top_k=10, max_iter=m)) for m in more],
                goal_top)
        S.sweep("top-10 1e-4", "top-10", "pyhessian", "eigenvalues(top_n=10, tol=t)",
                [("tol=0.001 (default)", p10)] + [(f"tol={t:g}", pyh("eigenvalues", top_n=10, tol=t))
                                                   for t in ([1e-4, 1e-5] if not q else [1e-4])], goal_top)
        S.sweep("top-10 1e-4", "top-10", "eigenthings", "lanczos(k=10, which='LA', max_iter=m, reorthogonalize=True)",
                [(f"max_iter={m}", et("lanczos", k=10, which="LA", max_iter=m, reorthogonalize=True))
                 for m in ([20, 30, 40, 50, 70, 100] if not q else [20, 40])], goal_top)
        S.sweep("top-10 1e-4", "top-10", "curvlinops", "eigsh(k=10, which='LA', tol=t)",
                [(f"tol={t:g}", eigsh(k=10, which="LA", tol=t)) for t in ([1e-2, 1e-3, 1e-4, 1e-6] if not q else [1e-2])]
                + [("tol=0 (default)", c10)], goal_top)
        S.sweep("λ_min 1e-4", "min-eig", "hesscli", "eigs --top-k 1 --which smallest --tol t [--max-iter m]",
                [(f"tol={t:g}" + (" (default)" if t == 1e-6 else ""),
                  nmin if t == 1e-6 else nat("eigs", top_k=1, which="smallest", tol=t)) for t in tols if t != 1e-5]
                + [(f"tol=1e-4, max_iter={m}", nat("eigs", top_k=1, which="smallest", tol=1e-4, max_iter=m))
                   for m in ([200, 400, 800] if not q else [])], goal_min)
        S.sweep("λ_min 1e-4", "min-eig", "curvlinops", "eigsh(k=1, which='SA', tol=t)",
                [(f"tol={t:g}", eigsh(k=1, which="SA", tol=t)) for t in ([1e-2, 1e-3] if not q else [1e-2])]
                + [("tol=0 (default)", cmin)], goal_min, cap_seconds=60 if not q else 20)
        budgets = [6, 9, 12, 18, 24, 30, 45, 60, 99, 150] if not q else [6, 30]
        S.sweep("trace 1%", "trace", "hesscli", "trace --probes m (Hutch++)",
                [(f"probes={m}", nat("trace", probes=m)) for m in budgets], TRACE_TARGET, min_runs=3)
        S.pyhessian_trace_sweep(300 if not q else 50)
    if plan.remeasure_s > 0:
        n = S.remeasure_flagged(plan.remeasure_s)
        if n:
            progress(f"{w.name}: measured {n} flagged rows again")
    S.add_error_seeds()  # after any remeasurement, which replaces a row's timed runs
    return {"unit": S.unit, "rows": S.rows, "sweeps": S.sweeps,
            "goals": {"top10": goal_top, "min": goal_min, "trace": TRACE_TARGET},
            "density_pairs": {"pyhessian": [nd1.get("call"), pd.get("call")],
                              "eigenthings": [nd10.get("call"), ed.get("call")] if full else None},
            "ctx": "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)" if w.name == "W3" else None,
            "e10": e10.get("call"), "p10": p10.get("call") if p10 else None}
