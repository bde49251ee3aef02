"""CPU threads of the command line: OpenMP threads that sleep when the machine is busy, and ``--threads N``.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels) whose idle threads
spin for a while, waiting for work, before they sleep. Alone on a machine that is the fastest
choice. On a machine shared with other busy processes the spinning threads take CPU time from the
threads doing the work (and from the other processes), and an analysis slows down by far more than
its share of the cores. With ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep at once, and a
contended run degrades to its fair share. libgomp reads the variable once, when it is loaded (when
torch is first imported), so :func:`prepare_environment` runs before that: the command line calls
it first thing. It sets ``PASSIVE`` when the threads that are runnable right now on the machine
(other processes' threads, from ``/proc/loadavg``) plus this process's threads exceed the CPUs,
and never overrides a wait policy the user chose.

This module imports no torch at import time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping

__all__ = ["WAIT_POLICY", "prepare_environment", "apply_threads", "decision"]

logger = logging.getLogger(__name__)

WAIT_POLICY = "PASSIVE"
"""``OMP_WAIT_POLICY`` the command line sets on a busy machine."""

_decision = "not decided (the command line was not started)"


def decision() -> str:
    """What :func:`prepare_environment` decided, in words (for the debug log)."""
    return _decision


def others_runnable(samples: int = 5, interval_s: float = 0.01) -> int | None:
    """Threads of other processes that are runnable now: the median over ``samples`` readings of the
    running count in ``/proc/loadavg`` (which counts the reading thread too), ``None`` where unknown."""
    counts = []
    try:
        for i in range(samples):
            with open("/proc/loadavg") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]) - 1)
            if i + 1 < samples:
                time.sleep(interval_s)
    except (OSError, ValueError, IndexError):
        return None
    return sorted(counts)[len(counts) // 2]


def _own_threads(env: MutableMapping[str, str]) -> int:
    try:
        return max(1, int(env.get("OMP_NUM_THREADS", "").split(",")[0]))
    except ValueError:
        pass
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def prepare_environment(environ: MutableMapping[str, str] | None = None, *, others: int | None = -1,
                        cpus: int | None = None) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy, unless a wait policy is already set.

    Busy means: the other runnable threads plus this process's threads (``OMP_NUM_THREADS``, else the
    CPUs it may run on) exceed the machine's CPUs. ``GOMP_SPINCOUNT`` (libgomp's own spin setting)
    counts as a choice the user made. Only takes effect before torch (and its OpenMP runtime) is
    first imported.

    Args:
        environ: the environment to change (default ``os.environ``).
        others: runnable threads of other processes (default: read now, :func:`others_runnable`).
        cpus: CPUs of the machine (default ``os.cpu_count()``).

    Returns:
        The decision, in words (also kept for :func:`decision`).
    """
    global _decision
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        _decision = "OpenMP wait policy set by the environment"
        return _decision
    if others == -1:
        others = others_runnable()
    cpus = cpus or os.cpu_count() or 1
    own = _own_threads(env)
    if others is None:
        _decision = "OpenMP's default wait policy (machine load unknown)"
    elif others + own > cpus:
        env["OMP_WAIT_POLICY"] = WAIT_POLICY
        _decision = (f"OMP_WAIT_POLICY={WAIT_POLICY}: {others} other runnable threads + {own} of ours on {cpus} CPUs; "
                     "waiting threads sleep")
    else:
        _decision = f"OpenMP's default wait policy: {others} other runnable threads + {own} of ours on {cpus} CPUs"
    return _decision


def apply_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's kernels (``None``: leave torch's own choice, one per core).

    Args:
        threads: ``--threads N`` (or ``threads`` in ``hesscli.toml``), at least 1.
    """
    import torch

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.debug("%d CPU threads; %s", torch.get_num_threads(), _decision)
