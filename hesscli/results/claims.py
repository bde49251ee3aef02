"""Claims: which process is computing which (checkpoint content, analysis, options) under ``--out``.

Two scans started on the same folder with the same ``--out`` split the work: before a
scan analyses a checkpoint it creates ``OUT/.claims/<key hash>.claim`` with ``O_EXCL``
(atomic on local and network file systems), holding its host and pid. A scan that finds
a claim held by a live process leaves that work to it; a claim whose process is gone
(same host: the pid no longer exists; another host: older than
:data:`STALE_AFTER`) is taken over, under a lock so that two scans never both take it.
A claim is released once the rows of its work are written (or the work failed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from hesscli.results.fileops import fault_point, owner_is_dead, owner_record, read_owner

__all__ = ["CLAIMS", "STALE_AFTER", "claim", "release", "claim_path"]

CLAIMS = ".claims"
"""Folder under ``--out`` holding the claims."""

STALE_AFTER = 6 * 3600.0
"""Seconds after which a claim from another host is taken to be abandoned (this host's
claims are checked by pid). Long enough for the slowest analysis of one checkpoint."""


def claim_path(out: Path, key: tuple[str, ...]) -> Path:
    """Where the claim of ``key`` lives."""
    digest = hashlib.sha256(json.dumps(list(key)).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return Path(out) / CLAIMS / f"{digest}.claim"


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _create(path: Path) -> bool:
    fault_point("claim")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(owner_record()))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _stale(path: Path, stale_after: float) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return owner_is_dead(read_owner(path), age=age, stale_after=stale_after)


def claim(out: Path, key: tuple[str, ...], *, stale_after: float = STALE_AFTER) -> Path | None:
    """Claim ``key`` for this process.

    Args:
        out: the results directory.
        key: the resume key ``(checkpoint sha256, analysis, options)``.
        stale_after: age after which another host's claim is taken over.

    Returns:
        The claim file (pass it to :func:`release`), or ``None`` when a live process holds it.

    Raises:
        OSError: the claims folder cannot be written.
    """
    path = claim_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path):
        return path
    with _lock(path.parent):
        if not _stale(path, stale_after):
            return None
        fault_point("take over claim")
        path.unlink(missing_ok=True)
        return path if _create(path) else None


def release(path: Path | None) -> None:
    """Remove a claim made by :func:`claim` (``None`` is ignored)."""
    if path is None:
        return
    fault_point("release claim")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
