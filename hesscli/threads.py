"""CPU threads of the command line: OpenMP threads that sleep when they wait, and ``--threads N``.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels) whose idle threads
spin while they wait for work, by default for a while before they sleep. On a machine shared
with other busy processes the spinning threads take CPU time from the threads doing the work
(and from the other processes), so an analysis slows down by more than its share of the cores.
With ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep instead, and a contended run degrades to
its fair share of the machine. libgomp reads the variable once, when it is loaded, i.e. when
torch is first imported: :func:`prepare_environment` must run before that, and the command line
calls it first thing. It never overrides a value the user set.

This module imports no torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["WAIT_POLICY", "prepare_environment", "apply_threads"]

WAIT_POLICY = "PASSIVE"
"""``OMP_WAIT_POLICY`` the command line sets when the environment does not name one."""


def prepare_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets a wait policy.

    ``GOMP_SPINCOUNT`` (libgomp's own spin setting) also counts as a choice the user made. Only
    takes effect when it runs before torch (and its OpenMP runtime) is first imported.

    Args:
        environ: the environment to change (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = WAIT_POLICY


def apply_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's kernels (``None``: leave torch's own choice).

    Args:
        threads: ``--threads N`` (or ``threads`` in ``hesscli.toml``), at least 1.
    """
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
