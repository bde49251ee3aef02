"""Run ``hesscli`` many times cheaply: import once, then fork one process per run.

Each run is a real process (``hesscli.cli.main`` in a forked child, ending with its exit
status), so crashes (``os._exit`` from the fault-injection hook) and concurrency behave as
they do between separate ``hesscli`` commands, without paying the torch import each time.

Usage: ``python tests/forked_cli.py JOB.json``; JOB is one of

* ``{"mode": "crash-loop", "args": [... "{out}" ...], "base": DIR, "max_faults": K}``: for
  N = 1, 2, ...: run with ``HESSCLI_FAULT_AT=N`` into ``DIR/n{N}``, copy what the crash left
  to ``DIR/n{N}-crashed``, then run again without the fault (``--json`` stdout saved to
  ``DIR/n{N}.json``); stops at the first N the run survives (N is past its last file operation).
* ``{"mode": "parallel", "runs": [{"args": [...], "stdout": FILE}, ...]}``: start every run at
  once, wait for all.

``"warmup": [...]`` (optional): arguments of a run made in this process first, into a folder
of its own, so that the forked runs start warm.

Prints a JSON list of ``{"n": N, "crash": status, "rerun": status}`` or ``{"status": status}``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

torch.set_num_threads(1)

import hesscli.api  # noqa: E402,F401  (imported before forking: the children start warm)
import hesscli.backends.native  # noqa: E402,F401
import hesscli.loading  # noqa: E402,F401
import hesscli.results.parquet  # noqa: E402,F401
import hesscli.scan  # noqa: E402,F401
from hesscli.cli import main  # noqa: E402
from hesscli.results.fileops import FAULT_ENV, FAULT_EXIT_CODE  # noqa: E402


def _start(args: list[str], fault: int | None = None, stdout: str | None = None) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        if fault is None:
            os.environ.pop(FAULT_ENV, None)
        else:
            os.environ[FAULT_ENV] = str(fault)
        if stdout:
            fd = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _warm_up(args: list[str]) -> None:
    """One run in this process first (lazy imports, first-call set-up), so that every child starts warm."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(args)
        except SystemExit:
            pass


def main_job(job: dict) -> list[dict]:
    if job.get("warmup"):
        _warm_up(job["warmup"])
    if job["mode"] == "parallel":
        pids = [_start(r["args"], r.get("fault"), r.get("stdout")) for r in job["runs"]]
        return [{"status": _wait(pid)} for pid in pids]
    results = []
    for n in range(1, job["max_faults"] + 1):
        out = os.path.join(job["base"], f"n{n}")
        args = [a.replace("{out}", out) for a in job["args"]]
        crash = _wait(_start(args, fault=n, stdout=os.devnull))
        if os.path.isdir(out):
            shutil.copytree(out, out + "-crashed", symlinks=True)
        rerun = _wait(_start(args, stdout=os.path.join(job["base"], f"n{n}.json")))
        results.append({"n": n, "crash": crash, "rerun": rerun})
        if crash != FAULT_EXIT_CODE:
            break
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    print(json.dumps(main_job(spec)))
