"""Append-only Parquet dataset directories under ``--out``.

Layout: ``OUT/<table>/part-<UTC timestamp>-<id>.parquet``, one part file per table per
call of :func:`write_outcomes`, each with the fixed schema of :data:`TABLES`. Readers
(pandas, pyarrow, DuckDB, Polars) skip names starting with ``.`` or ``_``.

One call of :func:`write_outcomes` is one transaction over several tables:

1. a journal entry ``OUT/.journal/<id>.prepare`` names the writer (host, pid);
2. every part file is written under a hidden name (``.part-….parquet.tmp``) in its
   table folder and flushed to disk;
3. the entry is renamed to ``<id>.commit`` (atomic): from here on the run is complete;
4. each hidden part is renamed to its final name (atomic, ``runs`` last);
5. the entry is removed.

A process killed between any two of these steps leaves an entry whose writer is gone.
:func:`recover`, run before each run starts writing, finishes such a transaction when
it reached step 3 (the hidden parts are renamed into place: nothing complete is lost or
computed again) and removes its hidden parts otherwise (nothing of it was visible). Only
entries whose writer is dead are touched, so a concurrent writer's fresh parts are safe.
Between such a crash and the next run, a plain reader may see the analysis rows of the
interrupted transaction without their ``runs`` row; never a duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from hesscli.errors import InputError
from hesscli.results.fileops import (
    check_destination,
    fault_point,
    fsync_dir,
    owner_is_dead,
    owner_record,
    path_text,
    read_owner,
    write_synced,
)
from hesscli.results.records import Outcome
from hesscli.results.tables import ANALYSIS_TABLES, TABLES, collect_rows, empty_frame, table_to_frame

if TYPE_CHECKING:  # pragma: no cover - pandas is imported where frames are made (writing needs none)
    import pandas as pd

__all__ = ["write_outcomes", "read_table", "read_parts", "part_files", "prepare_out", "recover", "check_schemas",
           "JOURNAL"]

logger = logging.getLogger(__name__)

_WRITE_ORDER = (*ANALYSIS_TABLES, "runs")

JOURNAL = ".journal"
"""Folder under ``--out`` holding the entries of transactions in progress."""

STALE_AFTER = 600.0
"""Seconds after which a journal entry from another host is taken to be abandoned
(writing the parts of one run takes well under a second)."""


def _final_name(txid: str) -> str:
    return f"part-{txid}.parquet"


def _tmp_name(txid: str) -> str:
    return f".{_final_name(txid)}.tmp"


def _write_tmp(folder: Path, txid: str, table: pa.Table) -> Path:
    fault_point(f"write {folder.name} part")
    return write_synced(folder / _tmp_name(txid), lambda fh: pq.write_table(table, fh))


def write_outcomes(out: Path, outcomes: Sequence[Outcome]) -> list[Path]:
    """Append outcomes to the Parquet tables under ``out``, all tables in one transaction.

    Each table that receives rows gets one new part file; ``runs`` is renamed into place last.

    Args:
        out: the results directory (``--out``); created when missing.
        outcomes: analyses to record (failed ones add only a ``runs`` row).

    Returns:
        The part files written, in write order (``runs`` last); empty when no outcomes.

    Raises:
        InputError: ``out`` (or a table folder in it) cannot be created or written; nothing
            of these outcomes is then visible.

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
    tables = {name: pa.Table.from_pylist(rows[name], schema=TABLES[name]) for name in _WRITE_ORDER if name in rows}
    if not tables:
        return []
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    txid = f"{stamp}-{uuid.uuid4().hex}"
    journal = out / JOURNAL
    prepare, commit = journal / f"{txid}.prepare", journal / f"{txid}.commit"
    tmps: dict[str, Path] = {}
    committed = False
    current = f"the {next(iter(tables))} table"
    try:
        fault_point("journal prepare")
        _create_entry(journal, prepare)
        for name, table in tables.items():
            current = f"the {name} table"
            tmps[name] = _write_tmp(out / name, txid, table)
        fault_point("journal commit")
        os.rename(prepare, commit)  # the commit point
        fsync_dir(journal)
        committed = True
    except OSError as e:
        _discard(tmps.values(), prepare)
        _remove_if_empty(journal)
        raise InputError(
            f"--out {path_text(out)}: cannot write {current} ({e.strerror or e}"
            f"{f': {path_text(e.filename)}' if e.filename else ''}); choose a writable directory with --out"
        ) from e
    except BaseException:
        if not committed:
            _discard(tmps.values(), prepare)
        raise
    # Committed: the rows are stored. Renaming them into place is finished by ``recover``
    # if this process stops here.
    written = [_publish(out / name, txid) for name in tables]
    for folder in {p.parent for p in written}:
        fsync_dir(folder)
    fault_point("journal done")
    commit.unlink(missing_ok=True)
    _remove_if_empty(journal)
    for path in written:
        logger.debug("wrote %s", path)
    return written


def _create_entry(journal: Path, entry: Path) -> None:
    """Create a journal entry naming this process (the folder may be removed by another writer
    between ``mkdir`` and ``open``: then try again)."""
    for attempt in range(5):
        journal.mkdir(parents=True, exist_ok=True)
        try:
            with open(entry, "x") as fh:
                fh.write(json.dumps(owner_record()))
                fh.flush()
                os.fsync(fh.fileno())
            return
        except FileNotFoundError:
            if attempt == 4:
                raise


def _discard(tmps, entry: Path) -> None:  # noqa: ANN001
    """Best-effort removal of an unfinished transaction's hidden parts and journal entry."""
    for path in (*tmps, entry):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another writer) or already gone
        pass


def _publish(folder: Path, txid: str) -> Path:
    final = folder / _final_name(txid)
    fault_point(f"publish {folder.name} part")
    try:
        os.replace(folder / _tmp_name(txid), final)
    except FileNotFoundError:
        if not final.exists():  # pragma: no cover - published by a recovering process only when we were dead
            raise
    return final


def _table_folders(out: Path) -> list[Path]:
    return [out / name for name in TABLES if (out / name).is_dir()]


def recover(out: Path, *, stale_after: float = STALE_AFTER) -> list[str]:
    """Finish or undo the transactions of writers that died mid-write (see the module docstring).

    Args:
        out: the results directory.
        stale_after: age (seconds) after which an entry whose writer cannot be checked
            (another host) is taken over.

    Returns:
        What was done, one line per transaction (for the log).
    """
    out = Path(out)
    journal = out / JOURNAL
    if not journal.is_dir():
        return []
    done: list[str] = []
    for entry in sorted(journal.iterdir()):
        txid, _, state = entry.name.rpartition(".")
        if state not in ("prepare", "commit") or not txid:
            continue
        try:
            age = time.time() - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if not owner_is_dead(read_owner(entry), age=age, stale_after=stale_after):
            continue
        folders = _table_folders(out)
        if state == "commit":
            for folder in folders:
                if (folder / _tmp_name(txid)).exists():
                    _publish(folder, txid)
            done.append(f"finished writing the rows of an interrupted run ({txid})")
        else:
            for folder in folders:
                fault_point("discard part")
                (folder / _tmp_name(txid)).unlink(missing_ok=True)
            done.append(f"discarded the unfinished rows of an interrupted run ({txid})")
        fault_point("journal cleanup")
        entry.unlink(missing_ok=True)
    _remove_if_empty(journal)
    for line in done:
        logger.info("%s: %s", path_text(out), line)
    return done


def prepare_out(out: Path) -> list[str]:
    """Make ``out`` ready before any work: writable, interrupted writes settled, tables readable.

    Args:
        out: the results directory (``--out``).

    Returns:
        One line per interrupted transaction finished or undone (see :func:`recover`).

    Raises:
        InputError: ``out`` is a file, not writable or full, or a part file's column types
            differ from its table's (the message names the file to move away).
    """
    check_destination(Path(out))
    try:
        done = recover(Path(out))
    except OSError as e:
        raise InputError(f"--out {path_text(out)}: cannot finish an interrupted write ({e.strerror or e}); "
                         f"choose a writable directory with --out") from e
    check_schemas(Path(out))
    return done


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


def _normal_type(t: pa.DataType) -> pa.DataType:
    """Arrow types that read as the same pandas column (string vs large_string, dictionary-encoded)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    return t


def _check_part_schema(path: Path, name: str) -> None:
    expected = TABLES[name]
    try:
        found = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(
            f"{path_text(path)}: not a readable Parquet file ({e}); move this part file out of "
            f"{path_text(path.parent)} (pandas cannot read the {name} table while it is there)"
        ) from e
    for field in found:
        index = expected.get_field_index(field.name)
        if index < 0:
            continue
        want = expected.field(index).type
        if not _normal_type(field.type).equals(_normal_type(want)):
            raise InputError(
                f"{path_text(path)}: column {field.name!r} is {field.type}, but the {name} table stores {want}; "
                f"move this part file out of {path_text(path.parent)} (pandas cannot read the table while it is there)"
            )


def check_schemas(out: Path, names: Sequence[str] | None = None) -> None:
    """Check that every part file of the tables under ``out`` has the table's column types.

    Args:
        out: the results directory.
        names: tables to check (default: all).

    Raises:
        InputError: a part file whose column types differ (named in the message), or one
            that is not Parquet.
    """
    for name in names or TABLES:
        for path in part_files(out, name):
            _check_part_schema(path, name)


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
        InputError: unknown table name, ``out/name`` is not a directory, a part file
            is not readable Parquet, or its column types differ from the table's
            (the message names the part file to move away).
    """
    if name not in TABLES:
        raise InputError(f"table {name!r}: unknown table; choose one of {', '.join(TABLES)}")
    folder = Path(out) / name
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{path_text(folder)}: expected a Parquet dataset directory, found a file; move it away")
    return read_parts(out, name, part_files(out, name))


def read_parts(out: Path, name: str, files: Sequence[Path]) -> pd.DataFrame:
    """Read some part files of one table (see :func:`read_table`), checking their column types.

    Raises:
        InputError: a part file is unreadable or its column types differ from the table's.
    """
    folder = Path(out) / name
    if not files:
        return empty_frame(name)
    for path in files:
        _check_part_schema(path, name)
    try:
        import pyarrow.dataset as pads  # imports pandas: only readers pay for it

        dataset = pads.dataset([str(p) for p in files], schema=TABLES[name], format="parquet")
        table = dataset.to_table()
    except (pa.ArrowException, OSError) as e:
        raise InputError(
            f"{path_text(folder)}: cannot read the {name} table ({e}); remove the unreadable part file"
        ) from e
    return table_to_frame(table)
