"""RESULTS.md from results.json: machine, versions, per-workload tables, ratios and targets.

``python -m benchmarks.report [results.json] [RESULTS.md]`` regenerates the report without rerunning.
The hand-written analysis in ``benchmarks/ANALYSIS.md`` (profiles, explanations) is appended verbatim.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

TASKS = ("top-1", "top-10", "min-eig", "extremes", "scan", "trace", "density")


# ----------------------------------------------------------------------------- formatting
def _num(x: Any) -> float | None:
    if x is None or x == "inf" or x == "-inf":
        return math.inf if x == "inf" else None
    return float(x)


def fmt_time(s: Any) -> str:
    s = _num(s)
    if s is None:
        return "-"
    if s < 0.01:
        return f"{s * 1e3:.2f} ms"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 100:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def fmt_err(e: Any) -> str:
    e = _num(e)
    if e is None:
        return "-"
    if math.isinf(e):
        return "inf"
    if e < 1e-6:
        return "<1e-6"
    return f"{e:.1e}" if e < 0.01 else f"{e:.3f}"


def fmt_ratio(r: float | None, lower_bound: bool = False) -> str:
    if r is None or not math.isfinite(r):
        return "-"
    return f"{'>' if lower_bound else ''}{r:.1f}x" if r < 100 else f"{'>' if lower_bound else ''}{r:.0f}x"


def _rows(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return results["workloads"][name]["rows"]


def find_row(rows: list[dict[str, Any]], task: str, library: str, prefix: str) -> dict[str, Any] | None:
    """The first row of ``task`` and ``library`` whose call starts with ``prefix``."""
    for r in rows:
        if r["task"] == task and r["library"] == library and r["call"].startswith(prefix):
            return r
    return None


def find_sweep(results: dict[str, Any], name: str, target: str, library: str) -> dict[str, Any] | None:
    for s in results["workloads"][name].get("sweeps", []):
        if s["target"] == target and s["library"] == library:
            return s
    return None


# ----------------------------------------------------------------------------- targets
def _sweep_ratio(peer: dict[str, Any] | None, native: dict[str, Any] | None) -> tuple[float | None, bool, str]:
    """Peer time / native time at the target accuracy; (ratio, is_lower_bound, note)."""
    if peer is None or native is None:
        return None, False, "not measured"
    if not native["met"]:
        return None, False, f"hesscli did not reach {native['goal']:.0e} (best {fmt_err(native['error'])})"
    t_native = _num(native["seconds"])
    t_peer = _num(peer["seconds"])
    if t_native is None or t_peer is None or t_native <= 0:
        return None, False, "no timing"
    if peer["met"]:
        return t_peer / t_native, False, f"{peer['point']}: {fmt_time(t_peer)}, {peer['n_hvp']} HVP"
    why = f"never reached it (best {fmt_err(peer['error'])} at {peer['point']}"
    if peer.get("last_status") and peer["last_status"] != "ok":
        why += f"; last attempt {peer['last_status']}"
    return t_peer / t_native, True, why + ")"


def _equal_budget_note(native: dict[str, Any], peer: dict[str, Any]) -> str:
    """Median errors (quartiles) over each row's seeds, and whether the difference is more than noise:
    the one-sided Mann-Whitney p-value that the lower median comes from the same distribution."""
    a, b = native.get("errors") or [], peer.get("errors") or []
    n_a, n_b = len(a) or native["runs"], len(b) or peer["runs"]
    text = f"hesscli {fmt_err(native['error'])}{_quartiles(a)} vs {fmt_err(peer['error'])}{_quartiles(b)} " \
           f"(medians over {n_a} / {n_b} seeds"
    if len(a) >= 5 and len(b) >= 5:
        from scipy.stats import mannwhitneyu

        lower_first = (a, b) if statistics.median(a) <= statistics.median(b) else (b, a)
        p = float(mannwhitneyu(*lower_first, alternative="less").pvalue)
        text += f"; difference {'significant' if p < 0.05 else 'within seed noise'}, Mann-Whitney p = {p:.2g}"
    return text + ")"


def _quartiles(errors: list[float]) -> str:
    if len(errors) < 5:
        return ""
    q1, _, q3 = statistics.quantiles(errors, n=4)
    return f" [{fmt_err(q1)}-{fmt_err(q3)}]"


def compute_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate every target of the brief on the measured data."""
    out: list[dict[str, Any]] = []
    full = [n for n, w in results["workloads"].items() if w["info"].get("full_plan")]

    def add(target: str, workload: str, peer: str, ratio: float | None, lower: bool, need: float | None,
            note: str, met: bool | None = None) -> None:
        if met is None:
            met = ratio is not None and need is not None and ratio >= need
        out.append({"target": target, "workload": workload, "peer": peer, "ratio": ratio, "lower_bound": lower,
                     "need": need, "met": met, "note": note})

    for name in full:
        nat = find_sweep(results, name, "top-10 1e-4", "hesscli")
        for lib, need in (("pyhessian", 5.0), ("eigenthings", 1.5), ("curvlinops", 1.5)):
            r, lower, note = _sweep_ratio(find_sweep(results, name, "top-10 1e-4", lib), nat)
            add("top-10 to 1e-4", name, lib, r, lower, need, note)
        nat = find_sweep(results, name, "λ_min 1e-4", "hesscli")
        r, lower, note = _sweep_ratio(find_sweep(results, name, "λ_min 1e-4", "curvlinops"), nat)
        add("λ_min to 1e-4", name, "curvlinops eigsh(SA)", r, lower, 10.0, note)
        rows = _rows(results, name)
        wrong = [row for row in rows if row["task"] == "min-eig" and row["library"] != "hesscli"
                 and row["kind"] == "default"]
        for row in wrong:
            bad = row["status"] != "ok" or (row["error"] is not None and row["error"] > 0.01)
            add("λ_min: peers' defaults give a wrong value or none", name, f"{row['library']} {row['call']}", None, False, None,
                f"{row['status']}, error {fmt_err(row['error'])}" if row["status"] == "ok" else row["message"], bad)
        nat = find_sweep(results, name, "trace 1%", "hesscli")
        r, lower, note = _sweep_ratio(find_sweep(results, name, "trace 1%", "pyhessian"), nat)
        add("trace to 1%", name, "pyhessian trace()", r, lower, 3.0, note)
        if name in ("W2", "W3"):
            native = find_row(rows, "trace", "hesscli", "trace (defaults")
            for row in rows:
                if row["task"] != "trace" or row["library"] == "hesscli" or row["status"] != "ok":
                    continue
                if row["n_hvp"] is None or not 90 <= row["n_hvp"] <= 110 or row["kind"] == "sweep":
                    continue
                if native is None or native["error"] is None:
                    continue
                ok = row["error"] is not None and native["error"] < row["error"]
                add("trace at equal HVP budget: lower error", name, f"{row['library']} {row['call']}",
                    None, False, None, _equal_budget_note(native, row), ok)
        for lib, nat_prefix, peer_prefix in (("pyhessian", "density --runs 1 --iters 100", "density() + torch.eig"),
                                             ("eigenthings", "density --runs 10", "spectral_density() defaults")):
            a = find_row(rows, "density", "hesscli", nat_prefix)
            b = find_row(rows, "density", lib, peer_prefix)
            if a and b and a["status"] == "ok" and b["status"] == "ok":
                add("density at equal runs x steps", name, f"{lib} {b['call']}", b["seconds"] / a["seconds"], False,
                    2.0, f"{fmt_time(b['seconds'])} vs {fmt_time(a['seconds'])}; error {fmt_err(b['error'])} vs "
                    f"{fmt_err(a['error'])}")
    for name in full:
        rows = _rows(results, name)
        a = find_row(rows, "scan", "hesscli", "eigs --top-k 10 + extremes + density")
        b = find_row(rows, "scan", "hesscli", "the same three analyses run separately")
        if a and b and a["status"] == "ok" and b["status"] == "ok":
            add("one Lanczos run serving eigs + extremes + density", name, "the three analyses run separately",
                b["seconds"] / a["seconds"], False, None,
                f"{fmt_time(a['seconds'])}, {a['n_hvp']} HVP vs {fmt_time(b['seconds'])}, {b['n_hvp']} HVP; "
                f"error {fmt_err(a['error'])} vs {fmt_err(b['error'])}",
                a["n_hvp"] < b["n_hvp"] and a["seconds"] < b["seconds"])
    for name, w in results["workloads"].items():
        unit = w.get("unit", {})
        if name in ("W2", "W4") and unit:
            ratio = unit.get("hvp_autograd_x_grad")
            add("native HVP <= 2x gradient", name, "autograd path (single vectors: Lanczos, SLQ-1)", ratio, False, None,
                f"gradient {fmt_time(unit.get('gradient_s'))}, HVP {fmt_time(unit.get('hvp_autograd_s'))}",
                ratio is not None and ratio <= 2.0)
            ratio_f = unit.get("hvp_func_x_grad")
            if ratio_f is not None:
                add("native HVP <= 2x gradient", name, "func path, block of 1", ratio_f, False, None,
                    f"HVP {fmt_time(unit.get('hvp_func_s'))}", ratio_f <= 2.0)
            ratio_16 = unit.get("hvp_func16_x_grad")
            if ratio_16 is not None:
                add("native HVP <= 2x gradient", name, "func path, block of 16 (Hutch++, SLQ), per vector", ratio_16,
                    False, None, f"{fmt_time(unit.get('hvp_func16_per_vector_s'))} per vector", ratio_16 <= 2.0)
        rows = w["rows"]
        for task in ("top-1", "top-10", "trace", "density"):
            nat_rows = [r for r in rows if r["task"] == task and r["library"] == "hesscli" and r["status"] == "ok"
                        and r["kind"] == "default"]
            pyh_rows = [r for r in rows if r["task"] == task and r["library"] == "pyhessian" and r["status"] == "ok"
                        and r["kind"] == "default"]
            if task == "density":
                # a density holds its runs x steps Lanczos vectors in every library (full
                # reorthogonalisation): compare at PyHessian's budget (1 run x 100 steps)
                nat_rows = [r for r in rows if r["task"] == task and r["library"] == "hesscli" and r["status"] == "ok"
                            and "PyHessian's budget" in r["call"]] or nat_rows
                pyh_rows = [r for r in rows if r["task"] == task and r["library"] == "pyhessian"
                            and r["status"] == "ok" and "shim" in r["call"]]
            if not nat_rows or not pyh_rows:
                continue
            nat_max = max(nat_rows, key=lambda r: r["rss_mb"])
            pyh = pyh_rows[0]
            add("native peak memory <= PyHessian's", name, f"{task}: {pyh['call']}", None, False, None,
                f"hesscli `{nat_max['call']}` {nat_max['rss_mb']:.0f} MB vs PyHessian {pyh['rss_mb']:.0f} MB "
                "(5% + 5 MB slack)", nat_max["rss_mb"] <= pyh["rss_mb"] * 1.05 + 5)
    return out


# ----------------------------------------------------------------------------- report
def write_report(results: dict[str, Any], path: Path) -> str:
    """Render ``results`` to Markdown and write it to ``path``; returns the text."""
    L: list[str] = []
    m, v = results["machine"], results["versions"]
    L.append("# hesscli benchmark results\n")
    L.append(f"Generated {results['generated']} by `{results['command']}` "
             f"(wall time {fmt_time(results.get('wall_seconds'))}).\n")
    later = [(name, results[name]["generated"]) for name in ("scan_series", "scan_tol", "density_equal_error",
                                                             "memory", "big_models", "contention")
             if isinstance(results.get(name), dict) and results[name].get("generated", "") > str(results["generated"])]
    if later:
        L.append("Sections measured later, alone (`python -m benchmarks.run --only ...` or the section's module; "
                 "the code of that date): "
                 + ", ".join(f"{name} {when}" for name, when in later) + ".\n")
    L.append(f"* **Machine:** {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; torch threads "
             f"{m['torch_threads']}; float32 everywhere (references float64).")
    L.append("* **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()))
    flagged = [r for w in results["workloads"].values() for r in w["rows"] if r.get("flagged")]
    total = sum(len(w["rows"]) for w in results["workloads"].values())
    L.append(f"* **Contention guard:** {len(flagged)} of {total} rows flagged (foreign CPU load > "
             f"{100 * results['settings']['foreign_load_limit']:.0f}% of the machine during the measurement, "
             "after one retry); flagged rows are marked ⚠ with the load.")
    if results["settings"].get("quick"):
        L.append("* **QUICK MODE:** small budgets and one repeat; numbers are a smoke test, not results.")
    L.append("")
    L.append(_method_text())

    targets = compute_targets(results)
    L.append("## Targets\n")
    L.append("| target | workload | against | ratio (peer / hesscli) | needed | met | details |")
    L.append("|---|---|---|---|---|---|---|")
    for t in targets:
        L.append(f"| {t['target']} | {t['workload']} | {t['peer']} | {fmt_ratio(t['ratio'], t['lower_bound'])} | "
                 f"{_need(t['need'])} | {'✅ met' if t['met'] else '❌ not met'} | "
                 f"{t['note']} |")
    n_met = sum(1 for t in targets if t["met"])
    L.append(f"\n{n_met} of {len(targets)} checks met. A ratio with `>` is a lower bound: the peer never reached "
             "the accuracy target, so its time at its most accurate attempt is used.\n")

    L.append("## Unit costs\n")
    L.append("| workload | params | samples | gradient | HVP autograd (cached graph) | first autograd HVP "
             "(builds graph) | HVP func, block of 1 | HVP func, block of 16 (per vector) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, w in results["workloads"].items():
        u, info = w.get("unit", {}), w["info"]
        g = u.get("gradient_s")

        def x(key: str, u: dict[str, Any] = u, g: Any = g) -> str:
            val = u.get(key)
            return "FAIL" if val is None else f"{fmt_time(val)} ({val / g:.2f}x)"

        L.append(f"| {name} | {info['n_params']:,} | {info['n_samples']:,} | {fmt_time(g)} | {x('hvp_autograd_s')} | "
                 f"{x('hvp_autograd_first_s')} | {x('hvp_func_s')} | {x('hvp_func16_per_vector_s')} |")
    L.append("")

    L.append("## References (float64)\n")
    L.append("| workload | model | how | λ1 | λ10 | λ_min | trace | float32 floor λ1 / max top-10 / λ_min | "
             "targets used |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for name, w in results["workloads"].items():
        r, info, goals = w["reference"], w["info"], w.get("goals", {})
        se = f" ± {r['trace_se']:.2g}" if r["trace_se"] else " (exact)"
        L.append(f"| {name} | {info['title']}; {info['n_params']:,} params; loss {info['train_loss']:.2g}, "
                 f"acc {info['accuracy']:.3f} | {r['method']} (max rel. residual top-10 {_res(r['residual_top'])}, "
                 f"λ_min {_res(r['residual_min'])}) | {r['top10'][0]:.6g} | {r['top10'][9]:.6g} | {r['lambda_min']:.6g} | "
                 f"{r['trace']:.6g}{se} | {fmt_err(r['float32_floor_top10'][0])} / "
                 f"{fmt_err(max(r['float32_floor_top10']))} / {fmt_err(r['float32_floor_min'])} | "
                 f"top-10 {fmt_err(goals.get('top10'))}, λ_min {fmt_err(goals.get('min'))} |")
    L.append("\nThe float32 floor is the relative error of a float32 HVP Rayleigh quotient of each reference "
             "eigenvector: no float32 library can be more accurate. Where twice the floor exceeds 1e-4 the accuracy "
             "target is raised to twice the floor (column \"targets used\").\n")

    for name, w in results["workloads"].items():
        info = w["info"]
        L.append(f"## {name}: {info['title']}\n")
        L.append(f"{info['n_params']:,} parameters, {info['n_samples']:,} samples (one batch), train loss "
                 f"{info['train_loss']:.3g}, accuracy {info['accuracy']:.3f}; up to {info['repeats']} timed repeats"
                 f"{'' if info['full_plan'] else ' (reduced plan: one product costs seconds)'}; "
                 f"section time {fmt_time(w.get('seconds'))}."
                 + (f" Every call ran under `{w['ctx']}`." if w.get("ctx") else "") + "\n")
        L.append("| task | library | call | time | runs | HVPs (reported) | ms/HVP | rel. error (worst) | "
                 "peak RSS Δ | |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in w["rows"]:
            L.append(_row_line(r))
        L.append("")
        sweeps = w.get("sweeps", [])
        if sweeps:
            L.append("**Equal accuracy** (cheapest setting whose median error meets the target):\n")
            L.append("| target | library | call | setting | time | HVPs | error | met | settings tried |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for s in sweeps:
                tried = "; ".join(f"{p['point']}: {fmt_err(p['error']) if p['status'] == 'ok' else p['status']}"
                                  for p in s["points"])
                if s.get("curve"):
                    tried = "median error by probes: " + ", ".join(
                        f"{n}: {fmt_err(e)}" for n, e in zip(s["curve"]["n"], s["curve"]["median_error"]))
                    if s.get("extrapolated_probes"):
                        tried += f"; ~{s['extrapolated_probes']:.0f} probes needed (1/√n extrapolation)"
                L.append(f"| {s['target']} (≤ {fmt_err(s['goal'])}) | {s['library']} | {s['call']} | {s['point']} | "
                         f"{fmt_time(s['seconds'])} | {s['n_hvp']} | {fmt_err(s['error'])} | "
                         f"{'yes' if s['met'] else 'no'} | {tried} |")
            L.append("")

    L.append(_ratio_table(results))
    if results.get("whole_process"):
        from benchmarks.whole_process import markdown

        L.append(markdown(results["whole_process"]))
    if results.get("scan_series"):
        from benchmarks.scan_series import markdown as scan_series_markdown

        L.append(scan_series_markdown(results["scan_series"]))
    if results.get("scan_tol"):
        from benchmarks.scan_series import markdown_tol

        L.append(markdown_tol(results["scan_tol"], results.get("scan_series")))
    if results.get("density_equal_error"):
        from benchmarks.density_equal_error import markdown as density_markdown

        L.append(density_markdown(results["density_equal_error"]["workloads"]))
    if results.get("memory"):
        from benchmarks.memory_peaks import markdown as memory_markdown

        L.append(memory_markdown(results["memory"]))
    if results.get("big_models"):
        from benchmarks.big_models import markdown as big_models_markdown

        L.append(big_models_markdown(results["big_models"]))
    if results.get("contention"):
        from benchmarks.contention import markdown as contention_markdown

        L.append(contention_markdown(results["contention"]))
    analysis = HERE / "ANALYSIS.md"
    if analysis.is_file():
        L.append(analysis.read_text())
    text = "\n".join(L).rstrip() + "\n"
    path.write_text(text)
    return text


def _res(r: float) -> str:
    return "0 (exact)" if r == 0 else f"{r:.0e}"


def _need(need: float | None) -> str:
    return "-" if need is None else f"≥ {need:g}x"


def _mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:.0f} MB"


def _row_line(r: dict[str, Any]) -> str:
    flag = f"⚠ {100 * r['foreign_load']:.0f}% load" if r.get("flagged") else ""
    if r["status"] != "ok":
        hvp = f"{r['n_hvp']}" if r.get("n_hvp") else "-"
        return (f"| {r['task']} | {r['library']} | `{r['call']}` | {fmt_time(r['seconds'])} | {r['runs']} | {hvp} | - | "
                f"**{r['status'].upper() if r['status'] == 'FAIL' else r['status']}**: {r['message']} | "
                f"{_mb(r.get('rss_mb'))} | {flag} |")
    hvp = "-" if not r["n_hvp"] else str(r["n_hvp"])
    if r.get("reported_hvp") is not None and r["reported_hvp"] != r["n_hvp"]:
        hvp += f" ({r['reported_hvp']})"
    per = fmt_time(r["seconds"] / r["n_hvp"]).replace(" ", " ") if r["n_hvp"] else "-"
    err = fmt_err(r["error"])
    if r.get("error_worst") is not None and r["runs"] > 1 and _num(r["error_worst"]) and r["error"] is not None \
            and _num(r["error_worst"]) > 1.5 * (_num(r["error"]) or 0) and _num(r["error_worst"]) >= 1e-6:
        err += f" ({fmt_err(r['error_worst'])})"
    note = f" {r['message']}" if r.get("message") else ""
    return (f"| {r['task']} | {r['library']} | `{r['call']}` | {fmt_time(r['seconds'])} | {r['runs']} | {hvp} | {per} | "
            f"{err}{note} | {r['rss_mb']:.0f} MB | {flag} |")


def _ratio_table(results: dict[str, Any]) -> str:
    names = [n for n, w in results["workloads"].items() if w["info"].get("full_plan")]
    if not names:
        return ""
    L = ["## Ratio table (peer time / hesscli time at the same accuracy target)\n",
         "| comparison | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    specs = [("top-10 to 1e-4: PyHessian eigenvalues(top_n=10)", "top-10 1e-4", "pyhessian"),
             ("top-10 to 1e-4: eigenthings lanczos", "top-10 1e-4", "eigenthings"),
             ("top-10 to 1e-4: curvlinops + eigsh", "top-10 1e-4", "curvlinops"),
             ("λ_min to 1e-4: curvlinops + eigsh(SA)", "λ_min 1e-4", "curvlinops"),
             ("trace to 1%: PyHessian trace()", "trace 1%", "pyhessian")]
    for label, target, lib in specs:
        cells = []
        for n in names:
            r, lower, _ = _sweep_ratio(find_sweep(results, n, target, lib), find_sweep(results, n, target, "hesscli"))
            cells.append(fmt_ratio(r, lower))
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def _method_text() -> str:
    return """## Method

* **Same process, same data, same threads, same dtype.** Every library runs in one Python process on the
  workload's whole dataset as one batch, `torch.set_num_threads(2)`, float32; each call builds the
  library's own operator (that cost is included: PyHessian's first backward, curvlinops' determinism
  checks, hesscli's cached graph).
* **Timing.** Each call gets a warm-up run (seed 100) after `gc.collect()` + glibc `malloc_trim(0)`. If the
  warm-up took < 4 s, three timed runs follow (seeds 0, 1, 2) and the median is shown; otherwise the warm-up
  alone is reported (`runs` = 1), except for trace rows, which always get 3 seeds (warm-up included) for their
  error median; the trace rows compared at the equal ~100-product budget get their errors from 12
  seeds (the timed ones plus untimed ones), with quartiles and a Mann-Whitney test of the difference. (BASELINES.md used 6 s; 4 s keeps the whole suite near 30 minutes.)
  Errors are medians over the reported runs, worst seed in parentheses when notably larger.
* **HVP counting** by wrappers: PyHessian `hessian_vector_product` calls; eigenthings `HessianOperator.matvec`
  calls (deflation included); columns through curvlinops `HessianLinearOperator._matmat` (construction checks
  included); columns through hesscli's `EmpiricalRiskOperator._matmat` (hesscli's own `n_hvp` in parentheses
  when it differs); BackPACK HMP probes per block-diagonal application. Caps (3,000 HVPs or 150 s; 60 s for
  `eigsh(which='SA')` and `lanczos_approximate_spectrum`) turn runaway
  solvers into "not converged (cap)" rows.
* **Peak RSS Δ**: a thread samples `/proc/self/statm` every 2 ms; the largest increase over the RSS at the
  start of a run, over the warm-up and the timed runs.
* **Contention guard**: over each measurement, system busy CPU time (`/proc/stat`, steal included) minus this
  process's CPU time, as a share of wall time × CPUs. Above 10 % the measurement is retried once and the
  less contended attempt kept; rows still above are flagged ⚠.
* **Errors** are relative to the float64 reference: λ1; the largest over the 10 top eigenvalues (sorted,
  against the sorted reference); λ_min; the trace; for densities the Wasserstein-1 distance between the
  returned spectral measure (SLQ nodes and weights, or curvlinops' smoothed grid) and the reference measure,
  divided by λ_max − λ_min.
* **Equal accuracy**: each method's tolerance or budget is swept from cheap to expensive and the cheapest
  setting whose median error meets the target is timed; PyHessian's trace uses its raw samples: one run of
  300 probes per seed gives the error of every shorter run with the same seed, and the smallest adequate
  `maxIter` is then timed.
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report [results.json] [RESULTS.md]``."""
    args = sys.argv[1:] if argv is None else argv
    src = Path(args[0]) if args else HERE / "results.json"
    dst = Path(args[1]) if len(args) > 1 else HERE / "RESULTS.md"
    write_report(json.loads(src.read_text()), dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
