"""A whole ``hesscli eigs`` process on a machine shared with busy processes, under three thread settings.

``python -m benchmarks.contention [--repeats 2] [--budget-s 330] [--run-timeout-s 300]``

``hesscli eigs ckpt_step000400.pt`` in ``sample_checkpoints/`` (the README's thread table: the
sample CNN, default ``--top-k 10``, 36 products) as a fresh process, timed alone and with ``N``
busy single-thread processes (``python -c "while True: pass"``, ``N`` = the CPUs and twice the
CPUs), under:

* **default**: hesscli's automatic policy (``OMP_WAIT_POLICY=PASSIVE`` when the runnable threads
  exceed the CPUs at start; the decision is read from ``--debug``);
* **ACTIVE**: ``OMP_WAIT_POLICY=ACTIVE`` forced (OpenMP threads spin while they wait);
* **--threads 1**: one thread, the automatic policy otherwise.

The settings are interleaved within each repeat so that a change of the machine's load hits all
three; the median of the repeats is reported. Repeats stop early once ``--budget-s`` is spent.
*Foreign load* is the machine's busy CPU time that is neither the measured process nor the busy
processes started here, as a share of the machine, over the run. Prints a Markdown section; ``run``
returns the rows for ``results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import _HZ, _NCPU, _system_busy_ticks, machine_info
from benchmarks.workloads import OUT_DIR

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"
CHECKPOINT = "ckpt_step000400.pt"
SETTINGS = ("default", "active", "threads1")
LABELS = {"default": "hesscli's default (automatic)", "active": "`OMP_WAIT_POLICY=ACTIVE`",
          "threads1": "`--threads 1`"}
SPINNER = "while True: pass"


def _pid_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


def _children_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if setting == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    return env


def _decision(stderr: str) -> str:
    text = " ".join(stderr.split())
    if "OMP_WAIT_POLICY=PASSIVE" in text:
        return "passive"
    if "set by the environment" in text:
        return "environment"
    if "default wait policy" in text:
        return "OpenMP default"
    return "?"


def one_run(setting: str, out: Path, spinners: list[subprocess.Popen], timeout_s: float = 900.0) -> dict[str, Any]:
    """Time one ``hesscli eigs`` process under ``setting``."""
    cmd = [sys.executable, "-m", "hesscli", "eigs", CHECKPOINT, "--json", "--quiet", "--debug", "--out", str(out)]
    if setting == "threads1":
        cmd += ["--threads", "1"]
    busy0, child0 = _system_busy_ticks(), _children_seconds()
    spin0 = sum(_pid_ticks(p.pid) for p in spinners)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=SAMPLES, env=_env(setting), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"setting": setting, "seconds": time.perf_counter() - t0, "status": "FAIL",
                "error": f"still running after {timeout_s:.0f} s (stopped)"}
    wall = time.perf_counter() - t0
    foreign = ((_system_busy_ticks() - busy0) - (sum(_pid_ticks(p.pid) for p in spinners) - spin0)) / _HZ \
        - (_children_seconds() - child0)
    if proc.returncode != 0:
        return {"setting": setting, "seconds": wall, "status": "FAIL", "error": proc.stderr[-600:]}
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    values = [float(v) for v in doc["result"]["eigenvalues"]]
    return {"setting": setting, "seconds": wall, "status": "ok", "decision": _decision(proc.stderr),
            "n_hvp": doc["run"]["n_hvp"], "lambda1": values[0], "eigenvalues": values,
            "cpu_s": _children_seconds() - child0, "foreign_load": max(0.0, foreign) / (wall * _NCPU)}


def reference(cache_dir: Path = OUT_DIR) -> list[float]:
    """The float64 top-10 of the checkpoint (``hesscli eigs --dtype float64 --tol 1e-10``, cached by
    the checkpoint's SHA-256): what each timed run's values are scored against."""
    path = SAMPLES / CHECKPOINT
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    cached = cache_dir / f"contention_ref_{digest}.json"
    if cached.exists():
        return [float(v) for v in json.loads(cached.read_text())]
    with tempfile.TemporaryDirectory(prefix="hesscli-contention-ref-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "hesscli", "eigs", CHECKPOINT, "--dtype", "float64", "--tol",
                               "1e-10", "--json", "--quiet", "--out", tmp], cwd=SAMPLES, env=_env("default"),
                              capture_output=True, text=True, check=True)
    values = [float(v) for v in json.loads(proc.stdout.strip().splitlines()[-1])["result"]["eigenvalues"]]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(values))
    return values


def max_rel_error(values: list[float], ref: list[float]) -> float:
    """Largest relative error of ``values`` (descending, as many as given) against the reference."""
    got = sorted(values, reverse=True)[: len(ref)]
    return max(abs(g - r) / abs(r) for g, r in zip(got, ref))


def run(*, repeats: int = 2, budget_s: float = 330.0, busy: tuple[int, ...] | None = None,
        settings: tuple[str, ...] = SETTINGS, run_timeout_s: float = 300.0, log=print) -> dict[str, Any]:
    """Every (busy processes, setting) pair, ``repeats`` times where the budget allows; a run still going
    after ``run_timeout_s`` is stopped and reported as a lower bound."""
    cpus = os.cpu_count() or 1
    levels = (0, cpus, 2 * cpus) if busy is None else busy
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hesscli-contention-") as tmp:
        for n in levels:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
            spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(n)]
            try:
                time.sleep(1.0 if n else 0.0)  # let the busy processes show in /proc/loadavg
                for i in range(repeats):
                    for s in settings:
                        r = one_run(s, Path(tmp) / f"out-{n}-{s}-{i}", spinners, run_timeout_s)
                        runs[s].append(r)
                        log(f"contention: {n} busy, {s}: {r['seconds']:.1f} s ({r.get('decision', r['status'])})")
                    spent = time.perf_counter() - t_start
                    if i + 1 < repeats and spent > budget_s * (levels.index(n) + 1) / len(levels):
                        break  # over this level's share of the budget: keep time for the busier levels
            finally:
                for p in spinners:
                    p.kill()
                for p in spinners:
                    p.wait()
            for s in settings:
                ok = [r for r in runs[s] if r["status"] == "ok"]
                rows.append({"busy": n, "setting": s, "status": "ok" if ok else "FAIL",
                             "seconds": statistics.median(r["seconds"] for r in ok) if ok else None,
                             "all_seconds": [r["seconds"] for r in runs[s]],
                             "decisions": [r.get("decision") for r in ok],
                             "n_hvp": ok[0]["n_hvp"] if ok else None,
                             "lambda1": [r["lambda1"] for r in ok],
                             "eigenvalues": [r["eigenvalues"] for r in ok],
                             "foreign_load": max((r["foreign_load"] for r in ok), default=None),
                             "error": None if ok else runs[s][0].get("error")})
    return {"rows": rows, "cpus": cpus, "checkpoint": CHECKPOINT, "machine": machine_info(),
            "reference": reference(), "seconds": time.perf_counter() - t_start}


def row_error(row: dict[str, Any], ref: list[float] | None) -> float | None:
    """The largest relative error over a row's runs: of their top-10 against the float64 reference,
    or of λ1 alone for rows measured before the top-10 was kept."""
    if not ref:
        return None
    runs = row.get("eigenvalues") or [[v] for v in row.get("lambda1") or []]
    return max((max_rel_error(v, ref[: len(v)]) for v in runs if v), default=None)


def markdown(section: dict[str, Any] | None) -> str:
    """The RESULTS.md section "Thread contention"."""
    if not section or not section.get("rows"):
        return ""
    rows = section["rows"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    n_hvp = next((r["n_hvp"] for r in rows if r.get("n_hvp")), "?")
    L = [
        "## Thread contention: a whole `hesscli eigs` process next to busy processes",
        "",
        f"`python -m benchmarks.contention`: `hesscli eigs {section.get('checkpoint', CHECKPOINT)}` in "
        f"`sample_checkpoints/` ({n_hvp} products) as a fresh process on {section.get('cpus', '?')} CPUs, with no busy processes added and "
        "with N busy single-thread processes added (`python -c \"while True: pass\"`). Median wall seconds (runs in "
        "brackets); under the default, the policy it chose (passive = it set `OMP_WAIT_POLICY=PASSIVE`). "
        "Settings interleaved within each repeat. Foreign load: the busiest run's CPU use by processes other than "
        "these, as a share of the machine. Error: the largest relative error of any run's values against a float64 "
        "run (`--dtype float64 --tol 1e-10`) of the same checkpoint, per setting.",
        "",
        "| busy processes | " + " | ".join(LABELS.get(s, s) for s in settings) + " | foreign load |",
        "|---|" + "---|" * len(settings) + "---|",
    ]
    ref = section.get("reference")
    for n in dict.fromkeys(r["busy"] for r in rows):
        cells, loads = [], []
        for s in settings:
            r = next((x for x in rows if x["busy"] == n and x["setting"] == s), None)
            if r is None or r["status"] != "ok":
                err = (r or {}).get("error") or ""
                cells.append("-" if r is None else (f"> {min(r['all_seconds']):.0f} s (stopped)"
                                                    if "still running" in err else "FAIL"))
                continue
            runs = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
            chosen = ""
            if s == "default" and r.get("decisions"):
                chosen = " " + "/".join(dict.fromkeys(r["decisions"]))
            err = row_error(r, ref)
            cells.append(f"{r['seconds']:.1f} s ({runs}){chosen}" + (f", error {err:.1e}" if err is not None else ""))
            if r.get("foreign_load") is not None:
                loads.append(r["foreign_load"])
        label = "none added" if n == 0 else f"{n} busy"
        L.append(f"| {label} | " + " | ".join(cells) + f" | {100 * max(loads, default=0):.0f}% |")
    lam = sorted({round(v, 6) for r in rows for v in r.get("lambda1") or []})
    if lam:
        note = ""
        if ref:
            kept = (f"the top-{len(ref)}" if any(r.get("eigenvalues") for r in rows)
                    else "λ1 alone (the only value these runs kept)")
            note = f" (float64: {ref[0]:.9g}); the errors are of {kept}"
        L += ["", f"λ1 over every run: {', '.join(f'{v:.6g}' for v in lam)}{note}."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop repeating once this is spent")
    parser.add_argument("--run-timeout-s", type=float, default=300.0, help="stop a run after this long")
    parser.add_argument("--busy", default=None, help="comma-separated numbers of busy processes (default 0,CPUs,2xCPUs)")
    args = parser.parse_args(argv)
    busy = tuple(int(b) for b in args.busy.split(",")) if args.busy else None
    section = run(repeats=args.repeats, budget_s=args.budget_s, busy=busy, run_timeout_s=args.run_timeout_s,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(markdown(section))


if __name__ == "__main__":
    main()
