"""Run a worker on two (or more) spawned processes over gloo and collect what each rank reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def spawn_ranks(worker: Callable[..., None], tmp_path: Path, *args: Any, world: int = 2) -> dict[int, Any]:
    """Start ``worker(rank, world, init, *args, queue)`` on ``world`` spawned processes (file
    rendezvous in ``tmp_path``); each puts ``(rank, result)`` on the queue. Returns the results
    by rank and checks that every process exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=worker, args=(r, world, init, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
