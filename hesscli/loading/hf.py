"""Hugging Face model folders as checkpoints: ``config.json`` + weights, built through ``transformers``.

A folder written by ``save_pretrained`` (or a Trainer's ``checkpoint-N/``) holds ``config.json``
and ``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``, or ``pytorch_model.bin``. The model class is the one named in
``config.json``'s ``architectures`` unless ``--model`` names one
(``transformers:AutoModelForCausalLM``); weights are read from the folder only (never the
network), ``.bin`` files with ``weights_only=True``. Tied weights (a language-model head sharing
the embedding matrix) are one parameter, as ``named_parameters()`` lists them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hesscli.errors import InputError
from hesscli.loading.problem import LoadedModel
from hesscli.loading.specs import load_callable, one_line, short
from hesscli.options import ProblemSpec

__all__ = ["WEIGHT_FILES", "is_hf_folder", "folder_step", "load_hf_folder", "folder_sha256"]

logger = logging.getLogger(__name__)

WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files that mark a folder as holding Hugging Face weights (one of them is enough)."""

TRAINER_STATE = "trainer_state.json"
"""Written by ``transformers.Trainer`` next to the weights of each ``checkpoint-N/``."""


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with ``config.json`` and Hugging Face weights."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / name).is_file() for name in WEIGHT_FILES)


def _trainer_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def folder_step(folder: str | Path) -> int | None:
    """The step of a model folder: ``trainer_state.json``'s ``global_step``, else the folder name
    (``checkpoint-500`` -> 500).

    Example:
        >>> folder_step("out/checkpoint-1500")
        1500
    """
    from hesscli.loading.checkpoint import step_from

    state = _trainer_state(Path(folder))
    return step_from(Path(folder), {k: state[k] for k in ("global_step",) if k in state})


def _weight_files(folder: Path) -> list[Path]:
    files = [folder / "config.json"]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            files.append(folder / index)
            try:
                shards = sorted(set(json.loads((folder / index).read_text()).get("weight_map", {}).values()))
            except (OSError, ValueError):
                shards = []
            files.extend(folder / s for s in shards)
            return files
    files.extend(folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file())
    return files


def folder_sha256(folder: str | Path) -> str:
    """Hex sha256 over ``config.json`` and the weight files of a model folder (names and bytes)."""
    h = hashlib.sha256()
    for f in _weight_files(Path(folder)):
        h.update(f.name.encode() + b"\0")
        if f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _import_transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError as e:
        raise InputError(f"{what}: a Hugging Face model folder; building its model needs transformers: "
                         f"pip install 'hesscli[hf]'") from e
    except Exception as e:  # noqa: BLE001 - e.g. a broken torchvision that transformers imports
        raise InputError(f"{what}: transformers cannot be imported here ({short(e)}); repair or reinstall it") from e
    return transformers


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or per-key load reports from transformers while hesscli loads a folder."""
    log = transformers.utils.logging
    verbosity = log.get_verbosity()
    bars = log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _model_class(spec: str | None, config: Any, transformers: Any, what: str) -> Any:
    if spec:
        cls = load_callable(spec, "--model")
        if not hasattr(cls, "from_pretrained"):
            raise InputError(
                f"--model {spec}: {what} is a Hugging Face model folder, which needs a transformers model class "
                f"(e.g. transformers:AutoModelForCausalLM); {getattr(cls, '__name__', spec)} has no from_pretrained"
            )
        return cls
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise InputError(f"{what}: config.json names no architectures; pass --model transformers:AutoModelForCausalLM "
                         f"(or the model class that fits the weights)")
    arch = getattr(transformers, names[0], None)
    if arch is None:
        raise InputError(f"{what}: config.json names architecture {names[0]!r}, which transformers "
                         f"{transformers.__version__} does not have; pass --model pkg.module:ModelClass "
                         f"(custom code from the folder is never run)")
    return arch


def load_hf_folder(path: str | Path, settings: ProblemSpec) -> LoadedModel:
    """Build the model of a Hugging Face folder from ``config.json`` and load its weights (local only).

    Args:
        path: the folder.
        settings: ``model`` (a transformers class spec, optional) and ``model_args`` (passed to
            ``from_pretrained``, e.g. ``num_labels=3``).

    Returns:
        The model on the CPU in eval mode, format ``hf``, with the step from ``trainer_state.json``
        or the folder name.

    Raises:
        InputError: transformers missing, an unreadable config, an unknown class, or weights that
            do not fit (missing or mis-shaped keys: those would be random, not the checkpoint).
    """
    p = Path(path)
    what = f"checkpoint {path}"
    transformers = _import_transformers(what)
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a bad config.json, an unknown model_type
            raise InputError(f"{what}: config.json cannot be read by transformers {transformers.__version__} "
                             f"({short(e)})") from e
        cls = _model_class(settings.model, config, transformers, what)
        name = getattr(cls, "__name__", str(settings.model))
        kwargs = dict(settings.model_args)
        if "weights_only" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters:
            kwargs["weights_only"] = not settings.trust_code  # pytorch_model.bin: tensors only unless trusted
        try:
            model, info = cls.from_pretrained(str(p), config=config, local_files_only=True,
                                              output_loading_info=True, **kwargs)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever from_pretrained raises, the folder or class is the problem
            raise InputError(f"{what}: {name}.from_pretrained failed: {one_line(e)[:300]}; check the folder and "
                             f"--model") from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in (info.get("mismatched_keys") or [])]
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if mismatched:
            parts.append(f"shape mismatch: {', '.join(mismatched[:4])}{' ...' if len(mismatched) > 4 else ''}")
        raise InputError(f"{what}: the weights do not fit {type(model).__name__} ({'; '.join(parts)}); they would be "
                         f"left random. Check --model (e.g. transformers:AutoModelForCausalLM) and --model-arg")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.info("%s: %d weights not used by %s (%s)", what, len(unexpected), type(model).__name__,
                    ", ".join(unexpected[:4]))
    model.eval()
    state = _trainer_state(p)
    metadata: dict[str, object] = {k: v for k, v in state.items() if k in ("global_step", "epoch")
                                   and isinstance(v, (int, float))}
    metadata["architecture"] = type(model).__name__
    epoch = state.get("epoch")
    return LoadedModel(model=model, source=str(path), sha256=folder_sha256(p), format="hf", step=folder_step(p),
                       epoch=int(epoch) if isinstance(epoch, (int, float)) else None, metadata=metadata)
