"""Scan a training run: every checkpoint of a folder, in step order, resumable, shardable,
with each checkpoint's failure isolated.

The dataset and loss are loaded and moved to the device once per scan; every checkpoint of a
scan uses the same seed, hence the same probe vectors (common random numbers), so trends across
steps are not estimator noise.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hesscli.config import Settings
from hesscli.errors import InputError
from hesscli.results.fileops import path_text
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
    sha256: str | None = None  # None: not read yet, or unreadable


@dataclass
class ScanReport:
    """What a scan did: outcomes it wrote, work it skipped, failures.

    ``skipped`` holds (checkpoint, analysis) pairs already done; ``claimed`` those another
    live process was computing; ``duplicates`` (checkpoint, same content as) pairs of files
    not analysed because another file of the scan has the same bytes.
    """

    checkpoints: list[CheckpointEntry]
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, analysis)
    claimed: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, analysis)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint, kept checkpoint)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.run.status != "ok"]


def _match_parts(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether the path segments ``parts`` match the pattern segments (``**`` = any number of folders)."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_parts(parts[i:], rest) for i in range(len(parts) + 1))
    if not parts:
        return False
    if parts[0].startswith(".") and not head.startswith("."):
        return False  # like glob: wildcards do not match hidden names
    return fnmatch.fnmatchcase(parts[0], head) and _match_parts(parts[1:], rest)


def _walk_files(root: Path) -> list[Path]:
    """Every file under ``root``, following links to folders but entering each real folder once
    (a link loop cannot repeat or explode the listing)."""
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for child in children:
            path = Path(child.path)
            try:
                if child.is_dir():
                    stack.append(path)
                elif child.is_file():
                    found.append(path)
            except OSError:
                continue
    return found


def _glob(root: Path, pattern: str) -> list[Path]:
    """``root.glob(pattern)`` for files, safe under link loops when the pattern has ``**``."""
    if "**" not in pattern:
        return [p for p in root.glob(pattern) if p.is_file()]
    segments = [s for s in Path(pattern).parts if s not in ("", ".")]
    static: list[str] = []
    for seg in segments:  # walk from the deepest folder without wildcards
        if any(c in seg for c in "*?["):
            break
        static.append(seg)
    base = root.joinpath(*static) if static else root
    rest = segments[len(static):]
    if not base.is_dir():
        return []
    out = []
    for path in _walk_files(base):
        rel = path.relative_to(base).parts
        if _match_parts(rel, rest):
            out.append(path)
    return out


def find_checkpoints(target: str | Path, pattern: str = "*", exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Checkpoint files under a folder (matching ``pattern``) or matching a glob.

    Hugging Face model folders count as one checkpoint each: the folder itself, and its
    subfolders that hold ``config.json`` + weights (a Trainer's ``checkpoint-N/``).
    ``exclude`` names files that are never checkpoints (the ``--data`` file when it sits in the
    same folder). A file reached twice (through a link to a folder or to the file, or a link
    loop under ``**``) is listed once, under its first name.

    Raises:
        InputError: nothing found.
    """
    from hesscli.loading.hf import is_hf_folder

    target_s = str(target)
    if Path(target_s).is_dir():
        root = Path(target_s)
        paths = _glob(root, pattern)
        found = [p for p in root.glob(pattern) if p.is_dir()] if "**" not in pattern else []
        if pattern == "*":
            paths = [p for p in paths if p.suffix.lower() in CHECKPOINT_SUFFIXES and not _trainer_file(p)]
        folders = [p for p in found if p.is_dir() and is_hf_folder(p)]  # a Trainer's checkpoint-N/
        if is_hf_folder(root):  # a model folder itself (its weights are not separate checkpoints)
            paths = [root]
        paths += folders
    elif Path(target_s).is_file():
        paths = [Path(target_s)]
    else:
        anchor, has_glob = [], False
        for seg in Path(target_s).parts:
            if any(c in seg for c in "*?["):
                has_glob = True
                break
            anchor.append(seg)
        if has_glob and "**" in target_s:
            root = Path(*anchor) if anchor else Path(".")
            rel = str(Path(target_s).relative_to(root)) if anchor else target_s
            paths = _glob(root, rel)
        else:
            paths = [Path(p) for p in globlib.glob(target_s, recursive=True) if Path(p).is_file() or is_hf_folder(p)]
    skip = {Path(e).resolve() for e in exclude}
    unique: dict[Path, Path] = {}
    for p in sorted(paths, key=lambda q: (len(q.parts), str(q))):
        real = p.resolve()
        if real not in skip and real not in unique:
            unique[real] = p
    paths = list(unique.values())
    if not paths:
        raise InputError(
            f"{path_text(target_s)}: no checkpoint files found (looked for {', '.join(CHECKPOINT_SUFFIXES)} and model "
            f"folders with config.json"
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
        with warnings.catch_warnings():  # TorchScript archives: weights-only loading refuses them
            warnings.simplefilter("ignore")
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


def dedupe_checkpoints(entries: Sequence[CheckpointEntry]) -> tuple[list[CheckpointEntry], list[tuple[CheckpointEntry, CheckpointEntry]]]:
    """Keep one file per checkpoint content (sha256): the same bytes are analysed once per scan.

    Of files with the same bytes (``last.ckpt`` next to ``epoch=3-step=200.ckpt``), the one
    whose name gives a step is kept, else the shortest name. Files that cannot be read are
    kept (their analysis reports the error).

    Args:
        entries: ordered checkpoints.

    Returns:
        ``(kept, duplicates)``: the kept entries in their order, with ``sha256`` filled in, and
        ``(duplicate, kept entry)`` pairs.
    """
    from hesscli.loading import step_from

    hashed: list[CheckpointEntry] = []
    for e in entries:
        try:
            hashed.append(CheckpointEntry(e.path, e.step, sha256_of(e.path)))
        except OSError:
            hashed.append(e)
    groups: dict[str, list[CheckpointEntry]] = {}
    for e in hashed:
        if e.sha256 is not None:
            groups.setdefault(e.sha256, []).append(e)
    keep: dict[str, CheckpointEntry] = {
        sha: min(group, key=lambda e: (step_from(e.path.name, None) is None, len(e.path.name), e.path.name))
        for sha, group in groups.items()
    }
    kept = [e for e in hashed if e.sha256 is None or keep[e.sha256] is e]
    duplicates = [(e, keep[e.sha256]) for e in hashed if e.sha256 is not None and keep[e.sha256] is not e]
    return kept, duplicates


class _Done:
    """The resume keys of ``ok`` runs in ``out/runs``, re-read incrementally (new part files only)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.keys: set[tuple[str, str, str]] = set()
        self._seen: set[Path] = set()

    def refresh(self) -> set[tuple[str, str, str]]:
        """Add the keys of ``runs`` part files not read yet; returns every key seen so far.

        Raises:
            InputError: a part file is unreadable or its column types differ from the table's.
        """
        from hesscli.results.parquet import part_files, read_parts

        new = [p for p in part_files(self.out, "runs") if p not in self._seen]
        if new:
            runs = read_parts(self.out, "runs", new)
            self._seen.update(new)
            if not runs.empty:
                ok = runs[runs["status"] == "ok"]
                self.keys |= set(zip(ok["checkpoint_sha256"], ok["analysis"], ok["options"]))
        return self.keys


def completed_runs(out: Path) -> set[tuple[str, str, str]]:
    """``(checkpoint_sha256, analysis, options)`` of every ``ok`` run already in ``out/runs``."""
    return set(_Done(out).refresh())


def _agree(todo: list[str], analyses: Sequence[str], rank: int, reduce: Callable[[torch.Tensor], torch.Tensor],
           device: torch.device) -> list[str]:
    """Under torch.distributed, every rank takes rank 0's decision of what to compute."""
    flags = torch.tensor([1.0 if (rank == 0 and a in todo) else 0.0 for a in analyses], device=device)
    flags = reduce(flags)
    return [a for a, f in zip(analyses, flags.tolist()) if f > 0.5]


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

    Files with the same content are analysed once (``report.duplicates``). With
    ``settings.resume`` and a ``write`` callback, each piece of work is claimed under
    ``settings.out`` first (:mod:`hesscli.results.claims`), so scans running at the same time
    into one ``--out`` split the work and store each result once (``report.claimed`` lists
    what another live process was doing).

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
    from hesscli.distributed import DistContext
    from hesscli.loading import ProblemLoader
    from hesscli.results.claims import claim, release
    from hesscli.runner import CheckpointRunner

    runner = CheckpointRunner(settings, list(analyses or settings.analyses), reduce=reduce, on_matvecs=on_matvecs)
    names = runner.names
    exclude = [settings.data] if settings.data and Path(settings.data).is_file() else []
    kept, duplicates = dedupe_checkpoints(order_checkpoints(find_checkpoints(target, settings.glob, exclude)))
    entries = take_shard(kept, settings.shard)
    mine = {id(e) for e in entries}
    report = ScanReport(checkpoints=entries,
                        duplicates=[(path_text(d.path), path_text(k.path)) for d, k in duplicates if id(k) in mine])
    for dup, same in report.duplicates:
        logger.info("%s has the same content as %s: analysed once", dup, same)
    loader = ProblemLoader(settings.problem, DistContext(rank, world_size)).prepare()  # bad data stops here, once
    done_index = _Done(settings.out)
    done = done_index.refresh() if settings.resume else set()
    use_claims = settings.resume and write is not None and rank == 0

    for index, entry in enumerate(entries):
        if on_checkpoint is not None:
            on_checkpoint(index, len(entries), entry)
        name = path_text(entry.path)
        try:
            sha = entry.sha256 or sha256_of(entry.path)
        except OSError as e:
            outcomes = runner.failed(name, names, f"cannot read {name}: {e.strerror or e}", step=entry.step)
            report.outcomes.extend(outcomes)
            if write is not None:
                write(outcomes)
            continue
        keys = runner.resume_keys(sha)
        todo = [a for a in names if keys[a] not in done]
        report.skipped.extend((name, a) for a in names if a not in todo)
        claims: dict[str, Path] = {}
        try:
            if use_claims and todo:
                for a in todo:
                    held = claim(settings.out, keys[a])
                    if held is None:
                        report.claimed.append((name, a))
                    else:
                        claims[a] = held
                if claims:  # another process may have finished some since this scan looked
                    done = done_index.refresh()
                    report.skipped.extend((name, a) for a in claims if keys[a] in done)
                todo = [a for a in todo if a in claims and keys[a] not in done]
            if reduce is not None and world_size > 1:
                todo = _agree(todo, names, rank, reduce, loader.device)
            if not todo:
                continue
            try:
                problem = loader.load(entry.path, step=entry.step)
            except Exception as e:  # noqa: BLE001 - isolate any failure of one checkpoint
                logger.debug("loading %s failed", name, exc_info=True)
                outcomes = runner.failed(name, todo, e, sha256=sha, step=entry.step)
            else:
                outcomes = runner.run(problem, todo)
            report.outcomes.extend(outcomes)
            if write is not None:
                write(outcomes)
        finally:
            for held in claims.values():
                release(held)
    return report
