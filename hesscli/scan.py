"""Scan a training run: every checkpoint of a folder, in step order, resumable, shardable,
with each checkpoint's failure isolated.

The dataset and loss are loaded and moved to the device once per scan; every checkpoint of a
scan uses the same seed, hence the same probe vectors (common random numbers), so trends across
steps are not estimator noise.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from hesscli.api import analyse, check_supported, failed_outcome, options_key, with_backend_defaults
from hesscli.config import Settings
from hesscli.errors import HesscliError, InputError
from hesscli.results.records import Outcome

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


TRAINER_FILES = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")
"""Files a Hugging Face Trainer writes next to its weights that hold no model."""


def _trainer_file(path: Path) -> bool:
    return bool(TRAINER_FILES.match(path.name))


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint of a scan, with the step used to order it (``None`` sorts last, by name)."""

    path: Path
    step: int | None


@dataclass
class ScanReport:
    """What a scan did: outcomes it wrote, checkpoints it skipped (already done), failures."""

    checkpoints: list[CheckpointEntry]
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, analysis)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.run.status != "ok"]


def find_checkpoints(target: str | Path, pattern: str = "*", exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Checkpoint files under a folder (matching ``pattern``) or matching a glob.

    Hugging Face model folders count as one checkpoint each: the folder itself, and its
    subfolders that hold ``config.json`` + weights (a Trainer's ``checkpoint-N/``).
    ``exclude`` names files that are never checkpoints (the ``--data`` file when it sits in the
    same folder).

    Raises:
        InputError: nothing found.
    """
    from hesscli.loading.hf import is_hf_folder

    target_s = str(target)
    if Path(target_s).is_dir():
        root = Path(target_s)
        found = list(root.glob(pattern))
        paths = [p for p in found if p.is_file()]
        if pattern == "*":
            paths = [p for p in paths if p.suffix.lower() in CHECKPOINT_SUFFIXES and not _trainer_file(p)]
        folders = [p for p in found if p.is_dir() and is_hf_folder(p)]  # a Trainer's checkpoint-N/
        if is_hf_folder(root):  # a model folder itself (its weights are not separate checkpoints)
            paths = [root]
        paths += folders
    elif Path(target_s).is_file():
        paths = [Path(target_s)]
    else:
        paths = [Path(p) for p in globlib.glob(target_s, recursive=True) if Path(p).is_file() or is_hf_folder(p)]
    skip = {Path(e).resolve() for e in exclude}
    paths = [p for p in paths if p.resolve() not in skip]
    if not paths:
        raise InputError(
            f"{target_s}: no checkpoint files found (looked for {', '.join(CHECKPOINT_SUFFIXES)} and model folders "
            f"with config.json"
            f"{'' if pattern == '*' else f' matching --glob {pattern!r}'}); point at a folder of checkpoints or a glob"
        )
    return sorted(paths)


def _metadata_step(path: Path) -> int | None:
    """Step from the checkpoint's own metadata, read without building a model (weights only)."""
    if path.is_dir():
        from hesscli.loading.hf import folder_step

        return folder_step(path)
    if path.suffix == ".safetensors":
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here; the analysis will report it properly
        return None
    if isinstance(obj, dict):
        for key in ("step", "global_step"):
            value = obj.get(key)
            if isinstance(value, (int,)) and not isinstance(value, bool):
                return int(value)
    return None


def order_checkpoints(paths: Sequence[Path]) -> list[CheckpointEntry]:
    """Order by step: checkpoint metadata (``step``, ``global_step``; ``trainer_state.json`` of a model
    folder) first, then the file or folder name (``step=1500``, ``epoch=3-step=200``, ``ckpt_000500``,
    ``model_step200``, ``epoch_3``, ``checkpoint-500``); checkpoints without a step go last, by name."""
    from hesscli.loading import step_from

    entries = []
    for p in paths:
        step = _metadata_step(p)
        if step is None:
            step = step_from(p, None)
        entries.append(CheckpointEntry(p, step))
    return sorted(entries, key=lambda e: (e.step is None, e.step if e.step is not None else 0, e.path.name))


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` (1-based: shard I of N, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` with
    ``--array=1-N``) -> ``(I, N)``."""
    m = _SHARD.match(spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise InputError(f"--shard {spec!r} must look like I/N with 1 <= I <= N, e.g. --shard 2/4")
    return int(m.group(1)), int(m.group(2))


def take_shard(entries: Sequence[CheckpointEntry], spec: str | None) -> list[CheckpointEntry]:
    """The ``I``-th (1-based) of ``N`` disjoint, deterministic parts of the ordered list (round robin, so
    every shard spans the whole run); together the shards cover every checkpoint exactly once."""
    if not spec:
        return list(entries)
    i, n = parse_shard(spec)
    return [e for k, e in enumerate(entries) if k % n == i - 1]


def sha256_of(path: Path) -> str:
    if path.is_dir():
        from hesscli.loading.hf import folder_sha256

        return folder_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def completed_runs(out: Path) -> set[tuple[str, str, str]]:
    """``(checkpoint_sha256, analysis, options)`` of every ``ok`` run already in ``out/runs``."""
    from hesscli.results.parquet import read_table

    runs = read_table(out, "runs")
    if runs.empty:
        return set()
    ok = runs[runs["status"] == "ok"]
    return set(zip(ok["checkpoint_sha256"], ok["analysis"], ok["options"]))


def run_scan(
    target: str | Path,
    settings: Settings,
    *,
    analyses: Sequence[str] | None = None,
    write: Callable[[list[Outcome]], None] | None = None,
    on_checkpoint: Callable[[int, int, CheckpointEntry], None] | None = None,
    on_matvecs: Callable[[int], None] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ScanReport:
    """Analyse every checkpoint of ``target``; one bad checkpoint never stops the rest.

    Args:
        target: a folder (filtered by ``settings.glob``) or a glob.
        settings: resolved options; ``settings.resume`` skips (checkpoint content, analysis,
            options) combinations that already have an ``ok`` run in ``settings.out``.
        analyses: defaults to ``settings.analyses``.
        write: called with each checkpoint's outcomes as soon as they are done (the CLI writes
            them to Parquet there, so an interruption loses at most the current checkpoint).
        on_checkpoint: progress callback ``(index, total, entry)`` before each checkpoint.
        on_matvecs: product-count callback for a per-analysis progress bar.
        reduce, rank, world_size: torch.distributed data parallelism (see ``hesscli.distributed``).

    Raises:
        InputError: bad scan-level input (no checkpoints, bad data/loss spec, bad --shard) before
            any checkpoint is analysed.
    """
    from hesscli.backends import get_backend
    from hesscli.loading import build_problem, load_checkpoint, load_data, load_loss, resolve_device, resolve_dtype

    analyses = list(analyses or settings.analyses)
    for a in analyses:
        if a not in ("trace", "eigs", "extremes", "density"):
            raise InputError(f"--analyses: unknown analysis {a!r}; choose from trace, eigs, extremes, density")
    exclude = [settings.data] if settings.data and Path(settings.data).is_file() else []
    entries = take_shard(order_checkpoints(find_checkpoints(target, settings.glob, exclude)), settings.shard)
    report = ScanReport(checkpoints=entries)
    device, dtype = resolve_device(settings.device), resolve_dtype(settings.dtype)
    loss = load_loss(settings.loss)
    data = load_data(settings, device=device, dtype=dtype, rank=rank, world_size=world_size)
    kwargs: dict[str, object] = {"on_matvecs": on_matvecs}
    if reduce is not None:
        kwargs["reduce"] = reduce
    backend = get_backend(settings.backend, **kwargs)
    for a in analyses:  # refuse what the backend cannot do before touching any checkpoint
        check_supported(backend, a, with_backend_defaults(backend, a, settings))
    done = completed_runs(settings.out) if settings.resume else set()

    for index, entry in enumerate(entries):
        if on_checkpoint is not None:
            on_checkpoint(index, len(entries), entry)
        name = str(entry.path)
        try:
            sha = sha256_of(entry.path)
        except OSError as e:
            outcomes = [failed_outcome(name, a, settings, f"cannot read {name}: {e.strerror or e}", step=entry.step)
                        for a in analyses]
            report.outcomes.extend(outcomes)
            if write is not None:
                write(outcomes)
            continue
        todo = [a for a in analyses if (sha, a, options_key(a, with_backend_defaults(backend, a, settings))) not in done]
        report.skipped.extend((name, a) for a in analyses if a not in todo)
        if not todo:
            continue
        outcomes: list[Outcome] = []
        try:
            loaded = load_checkpoint(entry.path, settings)
            if loaded.step is None:
                loaded.step = entry.step
            problem = build_problem(loaded, data, loss, settings, device=device, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - isolate any failure of one checkpoint
            logger.debug("loading %s failed", name, exc_info=True)
            msg = str(e) if isinstance(e, HesscliError) else f"{type(e).__name__}: {e}"
            outcomes = [failed_outcome(name, a, settings, msg, sha256=sha, step=entry.step) for a in todo]
        else:
            if hasattr(backend, "plan"):  # lets one Lanczos run serve several analyses
                backend.plan(problem, todo, settings)
            for a in todo:
                try:
                    outcomes.append(analyse(problem, a, settings, reduce=reduce, backend=backend))
                except Exception as e:  # noqa: BLE001
                    logger.debug("%s on %s failed", a, name, exc_info=True)
                    msg = str(e) if isinstance(e, HesscliError) else f"{type(e).__name__}: {e}"
                    outcomes.append(failed_outcome(name, a, settings, msg, sha256=sha, step=problem.checkpoint.step,
                                                   problem=problem))
        report.outcomes.extend(outcomes)
        if write is not None:
            write(outcomes)
    return report
