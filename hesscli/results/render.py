"""Rich rendering for humans and plain JSON for scripts. No computation happens here.

The CLI owns the :class:`rich.console.Console` and passes it in; these functions only
format what the result dataclasses and tables already hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, TextIO

import torch
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hesscli.results.plugins import plugin
from hesscli.results.records import Outcome, RunInfo
from hesscli.results.tables import TOTAL_GROUP, empty_frame, latest_ok_runs

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where frames are made (writing needs none)
    import pandas as pd

__all__ = [
    "render_outcome",
    "outcome_to_json",
    "render_json",
    "render_scan_summary",
    "sparkline",
]

_BARS = "▁▂▃▄▅▆▇█"
_TOP_GROUPS = 8
_DENSITY_WIDTH = 64
_DENSITY_FLOOR = 1e-6


# ----------------------------------------------------------------------------- formatting


def _num(x: float | None, spec: str = ".5g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tick(ok: bool) -> Text:
    return Text("✓", style="green") if ok else Text("✗", style="bold red")


def _missing(x: Any) -> bool:
    """``None``, NaN or ``pd.NA`` (whose truth value is undefined)."""
    if x is None:
        return True
    try:
        return bool(x != x)
    except TypeError:
        return True


def _step(step: Any) -> str:
    return "–" if _missing(step) else str(int(step))


def sparkline(values: Sequence[float | None], *, log: bool = False) -> str:
    """One character per value on the eight-level bar scale ``▁▂▃▄▅▆▇█``.

    Args:
        values: the series; ``None``/NaN (and non-positive values when ``log``) give a space.
        log: scale by ``log10`` (for densities spanning many orders of magnitude).

    Returns:
        A string as long as ``values``.

    Example:
        >>> sparkline([0, 1, 2, 3, 4, 5, 6, 7])
        '▁▂▃▄▅▆▇█'
        >>> sparkline([1, None, 1])
        '▄ ▄'
    """
    mapped: list[float | None] = []
    for v in values:
        if v is None or not math.isfinite(v) or (log and v <= 0):
            mapped.append(None)
        else:
            mapped.append(math.log10(v) if log else float(v))
    finite = [v for v in mapped if v is not None]
    if not finite:
        return " " * len(mapped)
    lo, hi = min(finite), max(finite)
    out = []
    for v in mapped:
        if v is None:
            out.append(" ")
        elif hi == lo:
            out.append(_BARS[3])
        else:
            out.append(_BARS[int((v - lo) / (hi - lo) * (len(_BARS) - 1) + 0.5)])
    return "".join(out)


def _footer(run: RunInfo) -> Text:
    where = [run.checkpoint, f"step {_step(run.step)}", run.backend, run.method, run.curvature, run.device, run.dtype]
    size = [
        f"{run.n_params:,} params",
        f"{run.n_samples:,} samples",
        f"loss {_num(run.loss_value)}",
        f"{run.n_hvp:,} HVPs",
        f"{run.seconds:.3g} s",
    ]
    return Text(" · ".join(where) + "\n" + " · ".join(size), style="dim")


def _kv(rows: Sequence[tuple[str, RenderableType | str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value)
    return grid


num = _num
kv = _kv
tick = _tick
"""Formatting helpers of the analyses' console panels (see ``Analysis.render``)."""


def render_outcome(outcome: Outcome, console: Console) -> None:
    """Print one analysis as a compact panel (or one red line when it failed).

    Args:
        outcome: the analysis to show.
        console: where to print (the CLI's stdout console).
    """
    run = outcome.run
    name = PurePath(run.checkpoint).name or run.checkpoint
    if run.status != "ok" or outcome.result is None:
        line = Text.assemble(
            ("✗ ", "bold red"),
            (f"{run.analysis} failed", "bold red"),
            f" on {run.checkpoint} (step {_step(run.step)}): ",
            (run.error or "no result", "red"),
        )
        console.print(line)
        return
    body = plugin(run.analysis).render(outcome.result)
    title = Text.assemble((run.analysis, "bold"), f" · {name} · step {_step(run.step)}")
    console.print(Panel(Group(body, Text(""), _footer(run)), title=title, title_align="left", expand=False))


# ----------------------------------------------------------------------------- JSON


def _jsonable(x: Any) -> Any:
    """Recursively convert to strict-JSON types; NaN and ±inf become ``None``."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().to("cpu").tolist())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (os.PathLike, PurePath)):
        return os.fspath(x)
    tolist = getattr(x, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return _jsonable(tolist())
    return str(x)


def outcome_to_json(outcome: Outcome) -> dict[str, Any]:
    """A JSON-serialisable view of one outcome.

    Args:
        outcome: the analysis.

    Returns:
        ``{"run": {RunInfo fields}, "result": {result fields} | None, "extra": {...}}``.
        Tensors become (nested) lists, eigenvectors and landscape directions are omitted
        (``--save-vectors`` writes them), and NaN/±inf become ``None`` so the output is strict JSON.

    Example:
        >>> from hesscli.results.records import RunInfo, Outcome, ExtremesResult
        >>> run = RunInfo("r1", "a.pt", "", 5, "extremes", "native", "lanczos", "hessian", "cpu",
        ...               "float64", 0, 10, 4, 0.1, 40, 0.01, "0.1.0", "2.0", "2025-01-01T00:00:00Z")
        >>> d = outcome_to_json(Outcome(run, ExtremesResult(3.0, 0.0, float("inf"), 0.0, 0, 0, True, 40)))
        >>> d["result"]["lambda_max"], d["result"]["condition_number"]
        (3.0, None)
    """
    result: dict[str, Any] | None = None
    if outcome.result is not None:
        result = {
            f.name: _jsonable(getattr(outcome.result, f.name))
            for f in dataclasses.fields(outcome.result)
            if f.name not in ("eigenvectors", "directions")  # vectors go to files (--save-vectors)
        }
    return {"run": _jsonable(outcome.run), "result": result, "extra": _jsonable(dict(outcome.extra))}


def render_json(outcomes: Sequence[Outcome], file: TextIO) -> None:
    """Write outcomes as one strict JSON array (always a list, even for one outcome).

    Args:
        outcomes: analyses to write.
        file: a text stream, e.g. ``sys.stdout``.
    """
    json.dump([outcome_to_json(o) for o in outcomes], file, indent=2, allow_nan=False)
    file.write("\n")


# ----------------------------------------------------------------------------- scan summary


def _short_names(paths: Sequence[str]) -> dict[str, str]:
    """Checkpoint paths relative to their common folder (the bare name for one file)."""
    unique = sorted(set(paths))
    if len(unique) <= 1:
        return {p: PurePath(p).name or p for p in unique}
    try:
        root = os.path.commonpath(unique)
    except ValueError:
        return {p: p for p in unique}
    if root in unique:  # every path is the same file
        root = os.path.dirname(root)
    return {p: os.path.relpath(p, root) if root else p for p in unique}


def _by_run(df: pd.DataFrame | None, run_ids: set[str], mask: Any = None) -> dict[str, pd.Series]:
    if df is None or df.empty:
        return {}
    sel = df[df["run_id"].isin(run_ids)]
    if mask is not None:
        sel = sel[mask(sel)]
    return {str(row["run_id"]): row for _, row in sel.iterrows()}


def _value(row: pd.Series | None, column: str) -> float | None:
    if row is None:
        return None
    v = row[column]
    return None if _missing(v) else float(v)


def render_scan_summary(
    tables: pd.DataFrame | Mapping[str, pd.DataFrame],
    console: Console,
    *,
    trace: pd.DataFrame | None = None,
    eigs: pd.DataFrame | None = None,
    extremes: pd.DataFrame | None = None,
    run_ids: Collection[str] | None = None,
    checkpoints: Collection[str] | None = None,
) -> None:
    """Print one row per checkpoint (ordered by step) with trends, then the failures.

    Numbers come from the newest ok run of each (checkpoint, analysis); the status from
    the newest attempt. λ_max/λ_min come from ``extremes`` when present, else from the
    rank-1 ``eigs`` rows.

    Args:
        tables: the ``runs`` table as :func:`hesscli.results.parquet.read_table` returns it,
            or a mapping of table name -> DataFrame holding ``runs`` and any of ``trace``,
            ``eigs``, ``extremes``.
        console: where to print.
        trace: the ``trace`` table (its ``param_group == "all"`` rows are used); overrides ``tables``.
        eigs: the ``eigs`` table; overrides ``tables``.
        extremes: the ``extremes`` table; overrides ``tables``.
        run_ids: restrict to these runs (e.g. those a scan just wrote); all when ``None``.
        checkpoints: restrict to these checkpoint paths (as in the ``checkpoint`` column).
    """
    import pandas as pd

    if isinstance(tables, pd.DataFrame):
        runs = tables
    else:
        runs = tables["runs"] if "runs" in tables else empty_frame("runs")
        trace = trace if trace is not None else tables.get("trace")
        eigs = eigs if eigs is not None else tables.get("eigs")
        extremes = extremes if extremes is not None else tables.get("extremes")
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(set(run_ids))]
    if checkpoints is not None:
        runs = runs[runs["checkpoint"].isin(set(checkpoints))]
    if runs.empty:
        console.print(Text("no runs to summarise", style="dim"))
        return

    attempts = runs.sort_values("started_at", kind="stable").groupby(["checkpoint", "analysis"], sort=False).tail(1)
    failed = attempts[attempts["status"] != "ok"]
    ok = latest_ok_runs(runs)
    ok_ids = set(ok["run_id"].astype(str))

    trace_rows = _by_run(trace, ok_ids, lambda d: d["param_group"] == TOTAL_GROUP)
    ext_rows = _by_run(extremes, ok_ids)
    top = _by_run(eigs, ok_ids, lambda d: (d["rank"] == 1) & (d["which"] == "largest"))
    bottom = _by_run(eigs, ok_ids, lambda d: (d["rank"] == 1) & (d["which"] == "smallest"))

    ckpt_table = (
        runs[["checkpoint", "step"]]
        .drop_duplicates("checkpoint")
        .sort_values(["step", "checkpoint"], na_position="last", kind="stable")
    )
    names = _short_names(list(ckpt_table["checkpoint"].astype(str)))

    summary: list[dict[str, Any]] = []
    for ckpt, step in zip(ckpt_table["checkpoint"], ckpt_table["step"]):
        mine = ok[ok["checkpoint"] == ckpt]
        ids = dict(zip(mine["analysis"], mine["run_id"].astype(str)))
        t = trace_rows.get(ids.get("trace", ""))
        e = ext_rows.get(ids.get("extremes", ""))
        lmax = _value(e, "lambda_max") if e is not None else _value(top.get(ids.get("eigs", "")), "eigenvalue")
        lmin = _value(e, "lambda_min") if e is not None else _value(bottom.get(ids.get("eigs", "")), "eigenvalue")
        bad = sorted(failed[failed["checkpoint"] == ckpt]["analysis"].astype(str))
        summary.append(
            {
                "step": step,
                "name": names[str(ckpt)],
                "trace": _value(t, "estimate"),
                "stderr": _value(t, "stderr"),
                "lmax": lmax,
                "lmin": lmin,
                "failed": bad,
            }
        )

    table = Table(title="curvature across checkpoints", title_justify="left", show_footer=len(summary) > 1)
    table.add_column("step", justify="right", footer="")
    table.add_column("checkpoint", footer=Text("trend", style="dim"))
    table.add_column("trace ± stderr", justify="right", footer=Text(sparkline([s["trace"] for s in summary]), style="cyan"))
    table.add_column("λ_max", justify="right", footer=Text(sparkline([s["lmax"] for s in summary]), style="cyan"))
    table.add_column("λ_min", justify="right")
    table.add_column("status")
    for s in summary:
        trace_cell = _num(s["trace"])
        if s["trace"] is not None and s["stderr"]:
            trace_cell += f" ± {_num(s['stderr'], '.2g')}"
        status = Text("failed: " + ", ".join(s["failed"]), style="red") if s["failed"] else Text("ok", style="green")
        table.add_row(_step(s["step"]), s["name"], trace_cell, _num(s["lmax"], ".5g"), _num(s["lmin"], ".5g"), status)
    console.print(table)

    n_ckpt = len(summary)
    n_bad = sum(bool(s["failed"]) for s in summary)
    console.print(
        Text(f"{_plural(n_ckpt, 'checkpoint')} · {_plural(len(runs), 'run')} · {n_bad} with failures", style="dim")
    )
    if not failed.empty:
        console.print(Text("failed:", style="bold red"))
        for _, row in failed.sort_values(["step", "checkpoint"], na_position="last", kind="stable").iterrows():
            console.print(
                Text.assemble(
                    ("  ✗ ", "red"),
                    f"{row['checkpoint']} (step {_step(row['step'])}) · {row['analysis']}: ",
                    (str(row["error"]) if not pd.isna(row["error"]) else "no error recorded", "red"),
                )
            )
