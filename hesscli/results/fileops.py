"""File operations under ``--out``: path text, the destination check, owner liveness, fault injection.

Every operation that changes a file under ``--out`` calls :func:`fault_point` first. With
``HESSCLI_FAULT_AT=N`` in the environment, the N-th such operation of a process does not
happen: the process ends at once (``os._exit``), as a kill or a power cut would end it.
``HESSCLI_FAULT_AT=N:enospc`` raises ``OSError(ENOSPC)`` there instead, as a full disk
would. Tests use this hook to check that a crash between any two operations leaves tables
that read cleanly and that the next run completes without duplicates; it is read here
(not in :mod:`hesscli.config`) because it is a test hook, not a setting.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from hesscli.errors import InputError

__all__ = [
    "write_synced",
    "atomic_write",
    "fsync_dir",
    "FAULT_ENV",
    "fault_point",
    "path_text",
    "check_destination",
    "owner_record",
    "owner_is_dead",
    "MIN_FREE_BYTES",
]

FAULT_ENV = "HESSCLI_FAULT_AT"
"""Environment variable of the fault-injection hook (see the module docstring)."""

FAULT_EXIT_CODE = 86
"""Exit status of a process stopped by the fault-injection hook."""

MIN_FREE_BYTES = 1 << 20
"""Free space ``--out`` must have before a run starts (tables of one run take kilobytes)."""

_ops = 0
_spec: str | None = None


def fault_point(what: str = "") -> None:
    """Count one file operation under ``--out``; the fault-injection hook acts here.

    Args:
        what: the operation about to happen (shown in the ``ENOSPC`` error).

    Raises:
        OSError: ``ENOSPC`` when ``HESSCLI_FAULT_AT=N:enospc`` names this operation.
    """
    global _ops, _spec
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    if spec != _spec:  # a new setting counts from zero
        _spec, _ops = spec, 0
    _ops += 1
    at, _, mode = spec.partition(":")
    try:
        target = int(at)
    except ValueError:
        return
    if _ops == target:
        if mode == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        os._exit(FAULT_EXIT_CODE)


def path_text(path: str | os.PathLike[str] | bytes) -> str:
    """A path as text that can be stored, printed and compared, whatever bytes its name has.

    Names that are valid UTF-8 are returned unchanged. A name the OS gives as bytes that
    are not UTF-8 (Python holds those bytes as lone surrogates) keeps each undecodable
    byte as the four characters ``\\xNN``, so the original bytes can be recovered and the
    text never breaks a Parquet string column or a UTF-8 terminal.

    Args:
        path: a path (``str`` with surrogate escapes, ``bytes`` or ``os.PathLike``).

    Returns:
        Valid (encodable) text.

    Example:
        >>> path_text(b"runs/ckpt_\\xff.pt".decode("utf-8", "surrogateescape"))
        'runs/ckpt_\\\\xff.pt'
        >>> path_text("runs/é.pt")
        'runs/é.pt'
    """
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "backslashreplace")
    try:
        raw.encode("utf-8")
        return raw
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(raw).decode("utf-8", "backslashreplace")
    except UnicodeError:  # surrogates that are not escaped bytes
        return raw.encode("utf-8", "backslashreplace").decode("utf-8")


def owner_record() -> dict[str, Any]:
    """Who holds a journal entry or a claim: host, pid and start time (UTC seconds)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def owner_is_dead(owner: dict[str, Any] | None, *, age: float, stale_after: float) -> bool:
    """Whether the process that wrote ``owner`` (see :func:`owner_record`) is gone.

    On this host the pid is checked; a record from another host (or one that cannot be
    read) counts as dead once it is older than ``stale_after`` seconds.

    Args:
        owner: the record, or ``None`` when it could not be read.
        age: seconds since the record's file was last modified.
        stale_after: age after which a record that cannot be checked is abandoned.

    Returns:
        ``True`` when the record may be taken over.
    """
    if owner is None or not isinstance(owner.get("pid"), int):
        return age > stale_after
    if owner.get("host") == socket.gethostname():
        if owner["pid"] == os.getpid():
            return False
        return not _pid_alive(owner["pid"])
    return age > stale_after


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record stored in ``path`` (``None`` when missing or unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_destination(out: Path) -> None:
    """Refuse, before any work, an ``--out`` that cannot take the tables.

    ``out`` must be a directory (or creatable inside a writable directory) with at least
    :data:`MIN_FREE_BYTES` free. An existing directory is probed by creating and removing a
    hidden file in it; nothing is created when it does not exist yet.

    Args:
        out: the results directory.

    Raises:
        InputError: ``out`` is a file, is not writable, or its disk is full.
    """
    out = Path(out)
    where = f"--out {path_text(out)}"
    if out.exists() and not out.is_dir():
        raise InputError(f"{where}: is a file, not a directory; choose a directory with --out")
    base = out if out.exists() else _nearest_existing(out.parent if out.parent != out else out)
    if not base.is_dir():
        raise InputError(f"{where}: {path_text(base)} is a file, so the folder cannot be created; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{where}: {path_text(base)} is not writable; choose a writable directory with --out")
    try:
        st = os.statvfs(base)
        free = st.f_bavail * st.f_frsize
    except (OSError, AttributeError):  # pragma: no cover - no statvfs on this platform
        free = MIN_FREE_BYTES
    if free < MIN_FREE_BYTES:
        raise InputError(f"{where}: no space left on the disk of {path_text(base)} ({free} bytes free); "
                         f"free some space or choose another --out")
    if out.is_dir():
        probe = out / f".hesscli-probe-{uuid.uuid4().hex}"
        try:
            fault_point("probe")
            with open(probe, "wb") as fh:
                fh.write(b"hesscli")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise InputError(f"{where}: cannot write there ({e.strerror or e}); choose a writable directory "
                             f"with --out") from e
        finally:
            try:
                probe.unlink()
            except OSError:
                pass


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort; not every platform can open a directory)."""
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


def write_synced(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through ``write(fh)`` and flush it to disk; on any failure nothing is left.

    Every file hesscli writes goes through here: Parquet parts (under a hidden name, renamed
    when their transaction is complete) and, through :func:`atomic_write`, saved vectors.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` so that readers see the old file or the whole new one, never a part:
    a hidden temporary file in the same folder, flushed, then renamed over ``path``."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    write_synced(tmp, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
