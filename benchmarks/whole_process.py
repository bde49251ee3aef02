"""Whole processes, as a user runs them: ``hesscli eigs --top-k 10`` against a PyHessian script.

``python -m benchmarks.whole_process [--workloads W2,W4] [--repeats 3]``

Each run is a fresh Python process started from the shell's point of view: interpreter start,
imports, reading the checkpoint and the data, building the model, every product and writing
the result. Both sides get the same files (a state_dict, a ``.pt`` data file, the workload's
model factory) and their defaults:

* hesscli: ``hesscli eigs CKPT --model factory.py:make --data data.pt --top-k 10 --json`` (float32,
  default ``--tol``, ``--threads`` default);
* PyHessian: ``hessian(model, CrossEntropyLoss(), data=(X, y), cuda=False).eigenvalues(top_n=10)``
  (its defaults: ``maxIter=100``, ``tol=1e-3``), products counted by wrapping its
  ``hessian_vector_product``.

The error is the largest relative error of the ten values against a float64 reference (block
Lanczos in float64 to ``tol=1e-10``, every value converged). Seconds are the median wall time of the repeats,
measured alternately (hesscli, PyHessian, hesscli, ...) so that a change of machine load
hits both. The result is a Markdown section (``benchmarks/out/whole_process.md``) that
``benchmarks.run`` puts into RESULTS.md, and the rows in ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workloads import OUT_DIR, load_workload

ROOT = Path(__file__).resolve().parents[1]
SECTION = OUT_DIR / "whole_process.md"

PYHESSIAN_SCRIPT = r"""
import json, sys, warnings
import torch
from torch import nn
import pyhessian
from benchmarks.workloads import SPECS

name, ckpt, data = sys.argv[1:4]
module = sys.modules["pyhessian.hessian"]
count = [0]
hvp = module.hessian_vector_product
def counted(*args):
    count[0] += 1
    return hvp(*args)
module.hessian_vector_product = counted
torch.manual_seed(0)
model = SPECS[name].build_model()
model.load_state_dict(torch.load(ckpt, weights_only=True))
model.eval()
d = torch.load(data, weights_only=True)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    H = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(d["inputs"], d["targets"]), cuda=False)
    values, _ = H.eigenvalues(top_n=10)
print(json.dumps({"eigs": [float(v) for v in values], "n_hvp": count[0]}))
"""

FACTORY = "from benchmarks.workloads import SPECS\n\n\ndef make():\n    return SPECS[{name!r}].build_model()\n"


def prepare(name: str, folder: Path) -> dict[str, Any]:
    """Write the workload as a user has it: checkpoint, data file and model factory."""
    w = load_workload(name)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(w.model.state_dict(), folder / "ckpt.pt")
    torch.save({"inputs": w.inputs, "targets": w.targets}, folder / "data.pt")
    (folder / "factory.py").write_text(FACTORY.format(name=name))
    return {"workload": w, "top": top10_reference(w), "folder": folder}


def top10_reference(w: Any) -> list[float]:
    """The ten largest eigenvalues in float64: float64 block Lanczos to ``tol=1e-10`` (every value
    converged, its error bound far below the float32 errors measured here), cached."""
    path = OUT_DIR / f"top10_{w.name}_{w.key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from hesscli.api import analyse
    from hesscli.config import Settings

    r = analyse(w.problem(torch.float64), "eigs", Settings(top_k=10, dtype="float64", tol=1e-10)).result
    if not all(r.converged):
        raise RuntimeError(f"{w.name}: the float64 reference did not converge; raise max_iter")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(r.eigenvalues)))
    return list(r.eigenvalues)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(cmd: list[str], cwd: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def hesscli_cmd(name: str, folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "hesscli", "eigs", str(folder / "ckpt.pt"), "--model",
            f"{folder / 'factory.py'}:make", "--data", str(folder / "data.pt"), "--top-k", "10", "--json",
            "--quiet", "--out", str(out)]


def pyhessian_cmd(name: str, folder: Path) -> list[str]:
    return [sys.executable, "-c", PYHESSIAN_SCRIPT, name, str(folder / "ckpt.pt"), str(folder / "data.pt")]


def max_rel_error(values: list[float], top: list[float]) -> float:
    got = sorted(values, reverse=True)[: len(top)]
    return max(abs(g - t) / abs(t) for g, t in zip(got, top))


def run(workloads: list[str], repeats: int) -> list[dict[str, Any]]:
    """Measure every workload; returns one row per (workload, library)."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hesscli-whole-") as tmp:
        for name in workloads:
            prep = prepare(name, Path(tmp) / name)
            folder, top = prep["folder"], prep["top"]
            times: dict[str, list[float]] = {"hesscli": [], "pyhessian": []}
            last: dict[str, dict[str, Any]] = {}
            for i in range(repeats):
                out = Path(tmp) / f"out-{name}-{i}"
                t, doc = _timed(hesscli_cmd(name, folder, out), folder)
                times["hesscli"].append(t)
                last["hesscli"] = {"eigs": doc["result"]["eigenvalues"], "n_hvp": doc["run"]["n_hvp"],
                                   "converged": sum(doc["result"]["converged"])}
                t, doc = _timed(pyhessian_cmd(name, folder), folder)
                times["pyhessian"].append(t)
                last["pyhessian"] = doc
            for lib in ("hesscli", "pyhessian"):
                rows.append({"workload": name, "library": lib, "n_params": prep["workload"].n_params,
                             "seconds": statistics.median(times[lib]), "all_seconds": times[lib],
                             "n_hvp": last[lib]["n_hvp"], "error": max_rel_error(last[lib]["eigs"], top),
                             "converged": last[lib].get("converged")})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The RESULTS.md section of the whole-process rows."""
    lines = [
        "## Whole processes: `hesscli eigs --top-k 10` against a PyHessian script",
        "",
        "A fresh process each time (start-up, imports, loading the checkpoint and data, every product, "
        "writing): median wall seconds of alternating runs (runs in brackets); products; largest relative "
        "error of the ten values against a float64 reference. Both at their defaults in float32 "
        "(`python -m benchmarks.whole_process`). Target: 5× (not met; see below).",
        "",
        "| workload | parameters | hesscli s | products | max rel. error | PyHessian s | products | max rel. error "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["workload"], r["library"]): r for r in rows}
    for name in dict.fromkeys(r["workload"] for r in rows):
        h, p = by[(name, "hesscli")], by[(name, "pyhessian")]
        lines.append(f"| {name} | {h['n_params']:,} | {h['seconds']:.2f} ({len(h['all_seconds'])}) | {h['n_hvp']} | "
                     f"{h['error']:.1e} | {p['seconds']:.2f} ({len(p['all_seconds'])}) | {p['n_hvp']} | "
                     f"{p['error']:.1e} | {p['seconds'] / h['seconds']:.1f}× |")
    lines += ["", WHY]
    return "\n".join(lines) + "\n"


WHY = (
    "Why the target is not met: the time per product is the same in both (W4, the whole process divided by its "
    "products: 1.25 s against 1.29 s; data in 512-sample chunks against one batch), so the speed-up is the product count (36 against 123, with 400× smaller errors) "
    "diluted by what both pay once: about 2 s of interpreter, torch and library start-up and the first graph. On "
    "W2 that fixed part is half of hesscli's time. Ten of hesscli's products measure the float32 rounding floor "
    "along each Ritz vector, which makes its error bounds hold (see README, What the flags mean); fewer "
    "products per converged value (a warm start across a scan, one block product for the ten checks) are the "
    "next steps."
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W2,W4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = run([w.strip() for w in args.workloads.split(",") if w.strip()], args.repeats)
    SECTION.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    SECTION.write_text(text)
    (OUT_DIR / "whole_process.json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
