"""Append-only Parquet dataset directories under ``--out``.

Layout: ``OUT/<table>/part-<UTC timestamp>-<uuid>.parquet``, one part file per table per
call of :func:`write_outcomes`, each with the fixed schema of :data:`TABLES`. A part file
is written under a hidden temporary name (``.part-….parquet.tmp``) in the same directory,
flushed to disk, then renamed with :func:`os.replace`, which is atomic. Readers
(pandas, pyarrow, DuckDB, Polars) skip names starting with ``.`` or ``_``, so they see
either the whole part file or nothing: concurrent shards never interleave, a crash
never leaves a half-written table, and nothing already written is touched.

The ``runs`` part is renamed last, so an ok ``runs`` row implies its analysis rows exist.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from hesscli.errors import InputError
from hesscli.results.records import Outcome
from hesscli.results.tables import ANALYSIS_TABLES, TABLES, collect_rows, empty_frame, table_to_frame

__all__ = ["write_outcomes", "read_table", "part_files"]

logger = logging.getLogger(__name__)

_WRITE_ORDER = (*ANALYSIS_TABLES, "runs")


def _part_name() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"part-{stamp}-{uuid.uuid4().hex}.parquet"


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort; not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_part(folder: Path, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = _part_name()
    final, tmp = folder / name, folder / f".{name}.tmp"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return final


def write_outcomes(out: Path, outcomes: Sequence[Outcome]) -> list[Path]:
    """Append outcomes to the Parquet tables under ``out``.

    Each table that receives rows gets one new part file; ``runs`` is written last.

    Args:
        out: the results directory (``--out``); created when missing.
        outcomes: analyses to record (failed ones add only a ``runs`` row).

    Returns:
        The part files written, in write order (``runs`` last); empty when no outcomes.

    Raises:
        InputError: ``out`` (or a table folder in it) cannot be created or written.

    Example:
        >>> import tempfile
        >>> from hesscli.results.records import RunInfo, Outcome, ExtremesResult
        >>> run = RunInfo("r1", "a.pt", "", 5, "extremes", "native", "lanczos", "hessian", "cpu",
        ...               "float64", 0, 10, 4, 0.1, 40, 0.01, "0.1.0", "2.0", "2025-01-01T00:00:00Z")
        >>> res = ExtremesResult(3.0, -1.0, 3.0, 1 / 3, 1e-8, 1e-8, True, 40)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     paths = write_outcomes(Path(d), [Outcome(run, res)])
        ...     [p.parent.name for p in paths], read_table(Path(d), "extremes")["lambda_min"].tolist()
        (['extremes', 'runs'], [-1.0])
    """
    out = Path(out)
    rows = collect_rows(outcomes)
    written: list[Path] = []
    for name in _WRITE_ORDER:
        if name not in rows:
            continue
        table = pa.Table.from_pylist(rows[name], schema=TABLES[name])
        try:
            path = _write_part(out / name, table)
        except OSError as e:
            raise InputError(
                f"--out {out}: cannot write the {name} table ({e.strerror or e}: {e.filename or out / name}); "
                "choose a writable directory with --out"
            ) from e
        logger.debug("wrote %d %s rows to %s", table.num_rows, name, path)
        written.append(path)
    return written


def part_files(out: Path, name: str) -> list[Path]:
    """The complete part files of one table, oldest first (temporary files excluded).

    Args:
        out: the results directory.
        name: a table name.

    Returns:
        Sorted paths; empty when the table does not exist yet.
    """
    folder = Path(out) / name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))


def read_table(out: Path, name: str) -> pd.DataFrame:
    """Read one table (all part files) as a DataFrame.

    Same rows as ``pd.read_parquet(out / name)``, but integer columns are nullable
    ``Int64`` (so ``step`` stays an integer when some steps are unknown), and a missing
    table gives an empty DataFrame with the right columns instead of an error.

    Args:
        out: the results directory.
        name: one of ``runs``, ``trace``, ``eigs``, ``extremes``, ``density``, ``ritz``.

    Returns:
        The rows of every part file, in the order the parts were written.

    Raises:
        InputError: unknown table name, ``out/name`` is not a directory, or a part file
            is not readable Parquet.
    """
    if name not in TABLES:
        raise InputError(f"table {name!r}: unknown table; choose one of {', '.join(TABLES)}")
    folder = Path(out) / name
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: expected a Parquet dataset directory, found a file; move it away")
    files = part_files(out, name)
    if not files:
        return empty_frame(name)
    try:
        dataset = pads.dataset([str(p) for p in files], schema=TABLES[name], format="parquet")
        table = dataset.to_table()
    except (pa.ArrowException, OSError) as e:
        raise InputError(
            f"{folder}: cannot read the {name} table ({e}); remove the unreadable part file"
        ) from e
    return table_to_frame(table)
