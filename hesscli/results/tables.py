"""Table names and column schemas in one place, and the rows each result becomes.

Every table is a tidy, long-format Parquet dataset (see DESIGN.md, "Outputs"). Each row
carries ``run_id``, ``checkpoint`` and ``step`` so tables join on ``run_id`` and sort on
``step``. The ``runs`` table has one row per analysis of one checkpoint, ok or failed;
the analysis tables hold the numbers of the ok runs.

Example:
    >>> sorted(TABLES)
    ['density', 'eigs', 'extremes', 'landscape', 'ritz', 'runs', 'trace']
    >>> TABLES["eigs"].names
    ['run_id', 'checkpoint', 'step', 'rank', 'which', 'eigenvalue', 'residual', 'converged', 'error_bound', 'at_floor']
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from hesscli.errors import InputError
from hesscli.results.fileops import atomic_write
from hesscli.results.plugins import PLUGINS
from hesscli.results.records import Outcome, RunInfo

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where frames are made (writing needs none)
    import pandas as pd

__all__ = [
    "TABLES",
    "ANALYSIS_TABLES",
    "TOTAL_GROUP",
    "outcome_rows",
    "collect_rows",
    "outcomes_to_frames",
    "empty_frame",
    "table_to_frame",
    "latest_ok_runs",
    "eigenvectors_to_save",
    "save_eigenvectors",
]

logger = logging.getLogger(__name__)

#: ``param_group`` value of the row holding the trace of the whole (selected) Hessian.
TOTAL_GROUP = "all"

_KEY_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("step", pa.int64()),
]


def _schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema([*_KEY_FIELDS, *fields])


#: Table name -> fixed Arrow schema. Every part file of a table is written with it.
TABLES: dict[str, pa.Schema] = {
    "runs": pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("checkpoint", pa.string(), nullable=False),
            pa.field("checkpoint_sha256", pa.string()),
            pa.field("step", pa.int64()),
            pa.field("analysis", pa.string()),
            pa.field("backend", pa.string()),
            pa.field("method", pa.string()),
            pa.field("curvature", pa.string()),
            pa.field("device", pa.string()),
            pa.field("dtype", pa.string()),
            pa.field("seed", pa.int64()),
            pa.field("n_params", pa.int64()),
            pa.field("n_samples", pa.int64()),
            pa.field("loss_value", pa.float64()),
            pa.field("n_hvp", pa.int64()),
            pa.field("seconds", pa.float64()),
            pa.field("hesscli_version", pa.string()),
            pa.field("torch_version", pa.string()),
            pa.field("started_at", pa.string()),
            pa.field("status", pa.string()),
            pa.field("error", pa.string()),
            pa.field("options", pa.string()),
        ]
    ),
    **{name: _schema(*schema) for a in PLUGINS.values() for name, schema in a.schemas().items()},
}

#: Tables holding analysis numbers, in the order they are written (``runs`` comes last).
ANALYSIS_TABLES: tuple[str, ...] = tuple(name for a in PLUGINS.values() for name in a.tables)


def key_columns(run: RunInfo) -> dict[str, Any]:
    """The columns every analysis table starts with: ``run_id, checkpoint, step``."""
    return {"run_id": run.run_id, "checkpoint": run.checkpoint, "step": run.step}


def floats(x: torch.Tensor | Sequence[float]) -> list[float]:
    """A tensor or sequence as a flat list of Python floats."""
    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.detach().to("cpu", torch.float64).reshape(-1).tolist()]
    return [float(v) for v in x]


def outcome_rows(outcome: Outcome) -> dict[str, list[dict[str, Any]]]:
    """Turn one outcome into table rows.

    Args:
        outcome: one analysis of one checkpoint.

    Returns:
        Table name -> list of row dicts keyed by that table's columns. Always holds
        ``"runs"`` (one row); the analysis tables appear only when the outcome has a
        result (a failed outcome yields only its ``runs`` row). A density result fills
        both ``density`` (the broadened curve) and ``ritz`` (nodes, weights and the
        Lanczos coefficients of every run; ``beta`` is null on each run's last index).

    Example:
        >>> from hesscli.results.records import RunInfo, Outcome
        >>> run = RunInfo("r1", "a.pt", "", 5, "trace", "native", "exact", "hessian", "cpu",
        ...               "float64", 0, 10, 4, 0.1, 10, 0.01, "0.1.0", "2.0", "2025-01-01T00:00:00Z",
        ...               status="failed", error="boom")
        >>> list(outcome_rows(Outcome(run, None)))
        ['runs']
    """
    run = outcome.run
    run_row = dataclasses.asdict(run)
    rows: dict[str, list[dict[str, Any]]] = {}
    if outcome.result is not None:
        analysis = PLUGINS.get(run.analysis)
        if analysis is None:
            raise TypeError(f"outcome of run {run.run_id}: unknown analysis {run.analysis!r}")
        rows.update(analysis.rows(run, outcome.result))
    rows["runs"] = [run_row]
    return rows


def collect_rows(outcomes: Iterable[Outcome]) -> dict[str, list[dict[str, Any]]]:
    """Rows of several outcomes, concatenated per table (tables without rows are absent).

    Args:
        outcomes: analyses to turn into rows.

    Returns:
        Table name -> rows, in :data:`TABLES` order.
    """
    merged: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    for outcome in outcomes:
        for name, rows in outcome_rows(outcome).items():
            merged[name].extend(rows)
    return {name: rows for name, rows in merged.items() if rows}


def _types_mapper(dtype: pa.DataType) -> Any:
    import pandas as pd

    # Integers stay integers when a value is null (``step`` of a checkpoint without one).
    if pa.types.is_integer(dtype):
        return pd.Int64Dtype()
    return None


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow table -> DataFrame, with nullable ``Int64`` integer columns.

    Args:
        table: a table with one of the :data:`TABLES` schemas.

    Returns:
        The DataFrame; ``step`` stays an integer column even when some steps are null.
    """
    return table.to_pandas(types_mapper=_types_mapper)


def empty_frame(name: str) -> pd.DataFrame:
    """An empty DataFrame with the columns and dtypes of table ``name``.

    Args:
        name: one of :data:`TABLES`.

    Returns:
        A zero-row DataFrame.

    Raises:
        InputError: ``name`` is not a table.
    """
    return table_to_frame(_schema_of(name).empty_table())


def _schema_of(name: str) -> pa.Schema:
    try:
        return TABLES[name]
    except KeyError:
        raise InputError(
            f"table {name!r}: unknown table; choose one of {', '.join(TABLES)}"
        ) from None


def outcomes_to_frames(outcomes: Iterable[Outcome]) -> dict[str, pd.DataFrame]:
    """The tables of some outcomes as DataFrames, typed exactly as :func:`read_table` returns them.

    Args:
        outcomes: analyses to tabulate (e.g. those a scan just ran).

    Returns:
        Every table name -> DataFrame (empty, with the right columns, when no rows).
    """
    rows = collect_rows(outcomes)
    return {
        name: table_to_frame(pa.Table.from_pylist(rows[name], schema=schema)) if name in rows else empty_frame(name)
        for name, schema in TABLES.items()
    }


def latest_ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep, for each (checkpoint, analysis), the ok run that started last.

    Reruns of the same checkpoint append new rows; readers that want one number per
    checkpoint use this to pick the newest successful one.

    Args:
        runs: the ``runs`` table (or part of it).

    Returns:
        The selected rows, ordered by step (unknown steps last), checkpoint, analysis.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"run_id": ["a", "b", "c"], "checkpoint": ["x.pt"] * 3,
        ...     "step": [1, 1, 1], "analysis": ["eigs"] * 3, "status": ["ok", "ok", "failed"],
        ...     "started_at": ["2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z", "2025-01-03T00:00:00Z"]})
        >>> latest_ok_runs(df)["run_id"].tolist()
        ['b']
    """
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        return ok.copy()
    latest = ok.sort_values("started_at", kind="stable").groupby(["checkpoint", "analysis"], sort=False).tail(1)
    order = ["step", "checkpoint", "analysis"]
    return latest.sort_values(order, na_position="last", kind="stable").reset_index(drop=True)


def eigenvectors_to_save(outcome: Outcome) -> torch.Tensor | None:
    """The eigenvectors an outcome carries, if any.

    Args:
        outcome: any outcome.

    Returns:
        ``[n_params, k]`` tensor for an eigs result computed with eigenvectors, else ``None``.
    """
    vectors = getattr(outcome.result, "eigenvectors", None)
    return vectors if isinstance(vectors, torch.Tensor) else None


def save_eigenvectors(out_dir: Path, outcome: Outcome) -> Path:
    """Save an eigs outcome's eigenvectors to ``OUT/vectors/<run_id>.pt`` (atomically).

    The file holds a dict loadable with ``torch.load(path, weights_only=True)``:
    ``eigenvectors`` (``[n_params, k]``, column ``j`` belongs to ``eigenvalues[j]``),
    ``eigenvalues``, ``which``, ``rank``, ``run_id``, ``checkpoint``, ``step``.

    Args:
        out_dir: the results directory (``--out``).
        outcome: an eigs outcome computed with eigenvectors.

    Returns:
        The written path.

    Raises:
        InputError: the outcome has no eigenvectors, or the directory is not writable.
    """
    vectors = eigenvectors_to_save(outcome)
    run = outcome.run
    if vectors is None:
        raise InputError(
            f"run {run.run_id} ({run.analysis} of {run.checkpoint}): no eigenvectors to save; "
            "compute them with `hesscli eigs --save-vectors`"
        )
    result: Any = outcome.result
    payload = {
        "eigenvectors": vectors.detach().to("cpu").contiguous(),
        "eigenvalues": torch.tensor(result.eigenvalues or (), dtype=torch.float64),
        "which": list(getattr(result, "which", ("largest",) * len(result.eigenvalues or ()))),
        "rank": list(getattr(result, "rank", range(1, len(result.eigenvalues or ()) + 1))),
        "run_id": run.run_id,
        "checkpoint": run.checkpoint,
        "step": run.step,
    }
    if hasattr(result, "directions"):  # a landscape: its directions as rows, and how they were made
        payload.update(directions=result.directions.detach().to("cpu").contiguous(),
                       direction_kind=result.direction_kind, normalize=result.normalize)
    path = Path(out_dir) / "vectors" / f"{run.run_id}.pt"
    try:
        atomic_write(path, lambda fh: torch.save(payload, fh))
    except OSError as e:
        raise InputError(
            f"--out {out_dir}: cannot write {path} ({e.strerror or e}); choose a writable directory"
        ) from e
    logger.debug("saved %d eigenvectors of run %s to %s", vectors.shape[-1], run.run_id, path)
    return path

