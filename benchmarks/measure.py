"""Timing harness: warm-up, gc + malloc_trim, median of repeats, peak-RSS sampler, contention guard.

The method (see ``/work/shared/BASELINES.md`` §5):

* every call gets a warm-up run (seed 100) preceded by ``gc.collect()`` and glibc ``malloc_trim(0)``;
* if the warm-up took less than ``slow_s`` seconds, ``repeats`` timed runs follow (seeds 0, 1, 2)
  and the median is reported; otherwise the single warm-up run is reported (``runs == 1``);
* a thread samples ``/proc/self/statm`` every 2 ms; the peak RSS increase over the RSS at the
  start of each run is recorded (the largest over all runs);
* contention guard: over each measurement (warm-up plus timed runs), the system's busy CPU time
  (``/proc/stat``, steal included) minus this process's CPU time (``/proc/self/stat``), divided by
  the wall time times the number of CPUs, is the *foreign load*; a measurement with more than
  10 % foreign load is flagged, retried (``retries``), and the least-contended attempt kept.

HVP counting is done by :class:`HVPCounter` plus the patching context managers in
:mod:`benchmarks.peers`; a counter with a ``cap`` raises :class:`CapReached` so runaway solvers
become "not converged (cap)" rows instead of stalling the suite.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

FOREIGN_LOAD_LIMIT = 0.10
"""A run whose foreign CPU load exceeds this fraction of the machine is flagged."""

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HZ = os.sysconf("SC_CLK_TCK")
_NCPU = os.cpu_count() or 1


class CapReached(RuntimeError):
    """Raised by a counted product once a solver exceeds its product or time cap."""


class HVPCounter:
    """Counts Hessian-vector products (one per column) and enforces an optional cap.

    Attributes:
        count: products counted since the last :meth:`reset`.
        cap: raise :class:`CapReached` once ``count`` would exceed this (``None``: no cap).
        deadline: ``time.perf_counter()`` value after which the next product raises.
    """

    def __init__(self) -> None:
        self.count = 0
        self.cap: int | None = None
        self.deadline: float | None = None

    def reset(self, cap: int | None = None, seconds: float | None = None) -> None:
        """Zero the count and set the cap for the next call."""
        self.count = 0
        self.cap = cap
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def add(self, n: int = 1) -> None:
        """Count ``n`` products, raising :class:`CapReached` past the cap or the deadline."""
        if self.cap is not None and self.count + n > self.cap:
            raise CapReached(f"not converged (cap: {self.cap} HVPs)")
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise CapReached(f"not converged (cap: time limit after {self.count} HVPs)")
        self.count += n


COUNTER = HVPCounter()
"""The process-wide counter every patched product reports to."""


def malloc_trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc only; no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def _system_busy_ticks() -> int:
    with open("/proc/stat") as fh:
        parts = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...; steal is time the hypervisor gave away
    user, nice, system, _idle, _iowait, irq, softirq = parts[:7]
    steal = parts[7] if len(parts) > 7 else 0
    return user + nice + system + irq + softirq + steal


def _own_ticks() -> int:
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (all threads)


class _Sampler:
    """Background thread recording the peak RSS every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _Sampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class Run:
    """One timed call."""

    seed: int
    seconds: float
    n_hvp: int
    value: Any
    rss_delta: int
    error: str | None = None


def run_once(call: Callable[[int], Any], seed: int, *, cap: int | None = None,
             cap_seconds: float | None = None) -> Run:
    """Time ``call(seed)`` once, with the counter reset and the peak RSS increase recorded.

    Exceptions are caught and reported in :attr:`Run.error` (``CapReached`` included).
    """
    malloc_trim()
    COUNTER.reset(cap, cap_seconds)
    start_rss = rss_bytes()
    error: str | None = None
    value: Any = None
    with _Sampler() as sampler:
        t0 = time.perf_counter()
        try:
            value = call(seed)
        except CapReached as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - a failing library call becomes a FAIL row
            error = f"{type(e).__name__}: {_one_line(str(e))}"
            logger.debug("call failed:\n%s", traceback.format_exc())
        seconds = time.perf_counter() - t0
    n_hvp = COUNTER.count
    COUNTER.reset()
    return Run(seed=seed, seconds=seconds, n_hvp=n_hvp, value=value,
               rss_delta=max(0, sampler.peak - start_rss), error=error)


class LoadWindow:
    """Foreign CPU load over a window: system busy ticks minus this process's ticks, as a fraction
    of ``wall time x CPUs``. Windows shorter than ``min_seconds`` report 0 (tick resolution is 10 ms)."""

    def __init__(self, min_seconds: float = 0.2) -> None:
        self.min_seconds = min_seconds
        self.value = 0.0

    def __enter__(self) -> LoadWindow:
        self._t0 = time.perf_counter()
        self._busy0, self._own0 = _system_busy_ticks(), _own_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        foreign = ((_system_busy_ticks() - self._busy0) - (_own_ticks() - self._own0)) / _HZ
        self.value = max(0.0, foreign) / (wall * _NCPU) if wall >= self.min_seconds else 0.0


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass
class Measurement:
    """A measured call: the reported runs and their summary.

    Attributes:
        runs: the reported runs (the warm-up alone for slow calls).
        warmup: the warm-up run.
        seconds: median wall time of the reported runs.
        n_hvp: median product count of the reported runs.
        rss_delta: largest peak-RSS increase over the warm-up and the reported runs (bytes).
        foreign_load: foreign CPU load over the whole measurement (warm-up and runs).
        flagged: ``foreign_load`` exceeded :data:`FOREIGN_LOAD_LIMIT`.
        error: the error of the warm-up (the call is then not repeated).
        attempts: how many times the measurement was taken (retries on contention).
    """

    runs: list[Run]
    warmup: Run
    seconds: float
    n_hvp: int
    rss_delta: int
    foreign_load: float
    flagged: bool
    error: str | None
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> list[Any]:
        return [r.value for r in self.runs if r.error is None]


def measure(call: Callable[[int], Any], *, repeats: int = 3, slow_s: float = 6.0, min_runs: int = 1,
            cap: int | None = None, cap_seconds: float | None = None, retries: int = 1,
            warmup_seed: int = 100, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> Measurement:
    """Measure ``call(seed)`` with the warm-up / median-of-repeats protocol.

    Args:
        call: runs the library call for one seed and returns its result (anything).
        repeats: timed runs after the warm-up when the warm-up is faster than ``slow_s``.
        slow_s: warm-ups slower than this are reported alone.
        min_runs: run at least this many timed runs even for slow calls (for accuracy medians).
        cap, cap_seconds: product / time cap passed to the counter.
        retries: extra attempts when the measurement is flagged for contention.
        warmup_seed: seed of the warm-up run.
        seeds: seeds of the timed runs, in order.

    Returns:
        The :class:`Measurement` (the least-contended attempt when retried).
    """
    best: Measurement | None = None
    for attempt in range(1, retries + 2):
        m = _measure_once(call, repeats=repeats, slow_s=slow_s, min_runs=min_runs, cap=cap,
                          cap_seconds=cap_seconds, warmup_seed=warmup_seed, seeds=seeds)
        m.attempts = attempt
        if best is None or m.foreign_load < best.foreign_load:
            best = m
        if not m.flagged or m.error is not None or m.seconds * len(m.runs) > 5 * slow_s or attempt > retries:
            break  # slow calls are measured again at the end of the workload instead
        logger.info("contention %.0f%% (attempt %d); measuring again", 100 * m.foreign_load, attempt)
        time.sleep(2.0)
    assert best is not None
    best.attempts = attempt
    return best


def _measure_once(call: Callable[[int], Any], *, repeats: int, slow_s: float, min_runs: int,
                  cap: int | None, cap_seconds: float | None, warmup_seed: int,
                  seeds: tuple[int, ...]) -> Measurement:
    with LoadWindow() as load:
        warm = run_once(call, warmup_seed, cap=cap, cap_seconds=cap_seconds)
        runs = [warm]
        if warm.error is None and repeats > 0:
            if warm.seconds < slow_s:
                runs = [run_once(call, s, cap=cap, cap_seconds=cap_seconds) for s in seeds[:repeats]]
            elif min_runs > 1:  # slow call: the warm-up counts as one of the reported runs
                runs = [warm] + [run_once(call, s, cap=cap, cap_seconds=cap_seconds) for s in seeds[: min_runs - 1]]
    foreign = load.value
    if warm.error is not None:
        return Measurement(runs=[warm], warmup=warm, seconds=warm.seconds, n_hvp=warm.n_hvp,
                           rss_delta=warm.rss_delta, foreign_load=foreign,
                           flagged=foreign > FOREIGN_LOAD_LIMIT, error=warm.error)
    ok = [r for r in runs if r.error is None] or runs
    return Measurement(
        runs=runs, warmup=warm,
        seconds=statistics.median(r.seconds for r in ok),
        n_hvp=int(statistics.median(r.n_hvp for r in ok)),
        rss_delta=max([warm.rss_delta] + [r.rss_delta for r in runs]),
        foreign_load=foreign, flagged=foreign > FOREIGN_LOAD_LIMIT,
        error=None if any(r.error is None for r in runs) else runs[0].error,
    )


def machine_info() -> dict[str, Any]:
    """CPU model, core count and RAM of this machine (from ``/proc``)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:  # pragma: no cover
        pass
    return {"cpu": model, "cores": _NCPU, "ram_gib": round(mem / 2**30, 1)}
