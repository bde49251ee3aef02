"""Read a checkpoint file into a model on the CPU, safely.

Formats: state_dicts (bare or nested under a common key) and safetensors files, both with a
``--model`` factory; Hugging Face model folders (built from their ``config.json``, see
:mod:`hesscli.loading.hf`); whole pickled modules and TorchScript archives (both are code) only
with ``--trust-code`` (alias ``--trust-pickle``). Everything else is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hesscli.errors import InputError
from hesscli.loading.model import build_model, load_weights
from hesscli.loading.problem import LoadedModel
from hesscli.loading.specs import one_line, short
from hesscli.options import ProblemSpec

__all__ = ["load_checkpoint", "step_from", "epoch_from", "file_sha256", "torch_load", "NESTED_KEYS"]

logger = logging.getLogger(__name__)

NESTED_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net", "module")
"""Keys under which training loops commonly store the model's weights (searched in this order)."""

_STEP_RE = re.compile(r"(?:^|[^a-z])(?:global_?)?step[=_-]?(\d+)", re.IGNORECASE)
_METRIC_RE = re.compile(r"([A-Za-z][\w/]*)=[-+]?\d*\.?\d+(?:e[-+]?\d+)?$", re.IGNORECASE)
_EPOCH_RE = re.compile(r"(?:^|[^a-z])epoch[=_-]?(\d+)", re.IGNORECASE)
_TRAILING_RE = re.compile(r"(?:^|[_.=-]|(?:iter|iteration|it|ckpt|checkpoint))(\d+)$", re.IGNORECASE)
_PICKLE_RISK = (
    "unpickling it can execute arbitrary code. If you trust where the file came from, pass --trust-code "
    "(alias --trust-pickle)"
)
_TORCHSCRIPT_RISK = (
    "is a TorchScript archive, which is code: loading and running it can read, write or delete files. "
    "If you trust where it came from, pass --trust-code; otherwise save a state_dict and pass --model"
)


# ------------------------------------------------------------------------------------------
# step / epoch metadata
# ------------------------------------------------------------------------------------------


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"[+-]?\d+(\.0*)?", value):
            return None
        value = float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    return None


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _name_step(path: str | Path) -> int | None:
    stem = _stem(path)
    hits = _STEP_RE.findall(stem)
    if hits:
        return int(hits[-1])
    metric = _METRIC_RE.search(stem)
    if metric and not re.fullmatch(r"(?:global_?)?step|iter(?:ation)?|it|ckpt|checkpoint", metric.group(1), re.I):
        return None  # "val_loss=0.32", "acc=97": a metric in the name is never a step
    m = _TRAILING_RE.search(stem)
    epochs = list(_EPOCH_RE.finditer(stem))
    if m and not (epochs and epochs[-1].end() == len(stem)):  # "epoch_3" is an epoch, not a step
        return int(m.group(1))
    return None


def _name_epoch(path: str | Path) -> int | None:
    hits = _EPOCH_RE.findall(_stem(path))
    return int(hits[-1]) if hits else None


def step_from(path: str | Path, metadata: Mapping[str, object] | None) -> int | None:
    """The training step of a checkpoint, used to order a scan.

    Precedence: ``metadata["step"]``, ``metadata["global_step"]``, a step in the file
    name (``step=1500``, ``epoch=3-step=200`` -> 200, ``model_step200``, ``step_200``,
    ``ckpt_000500`` -> 500), ``metadata["epoch"]``, an epoch in the file name
    (``epoch_3`` -> 3).

    Args:
        path: the checkpoint file (only its name is used).
        metadata: top-level scalars of the checkpoint (may be ``None``).

    Returns:
        The step, or ``None`` when nothing gives one.

    Example:
        >>> step_from("runs/epoch=3-step=200.ckpt", None)
        200
        >>> step_from("ckpt_000500.pt", {"epoch": 7})
        500
        >>> step_from("last.pt", {"global_step": 1200, "epoch": 7})
        1200
        >>> step_from("epoch=2-val_loss=0.32.ckpt", None)  # a metric is not a step; the epoch is used
        2
    """
    meta = metadata or {}
    for key in ("step", "global_step"):
        if key in meta and (v := _as_int(meta[key])) is not None:
            return v
    if (v := _name_step(path)) is not None:
        return v
    return epoch_from(path, meta)


def epoch_from(path: str | Path, metadata: Mapping[str, object] | None) -> int | None:
    """The epoch of a checkpoint: ``metadata["epoch"]``, else ``epoch=3``/``epoch_3`` in the name."""
    meta = metadata or {}
    if "epoch" in meta and (v := _as_int(meta["epoch"])) is not None:
        return v
    return _name_epoch(path)


# ------------------------------------------------------------------------------------------
# low-level reading
# ------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sniff(path: Path) -> str:
    """``torchscript`` | ``zip`` (torch.save) | ``safetensors`` | ``other``."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "other"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "zip"
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 27):
        return "safetensors"
    return "other"


def _allowed_globals() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - private helper; naming fewer globals is harmless
        return {"collections.OrderedDict"}


def _pickle_globals(path: Path) -> list[str] | None:
    """Globals a pickle would import, found by reading its opcodes without executing them.

    Returns ``None`` when the bytes are not a well-formed pickle (a corrupt file).
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                data = zf.read(member)
        else:
            data = path.read_bytes()
        found: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
                found.append(f"{'builtins' if module == '__builtin__' else module}.{name}")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
                strings.append(arg)
        allowed = _allowed_globals()
        return list(dict.fromkeys(g for g in found if g not in allowed and not g.startswith("torch._utils.")))
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return None


class ObjectsRefused(InputError):
    """Weights-only loading refused a well-formed file because it pickles Python objects."""


def torch_load(path: Path, *, trust_pickle: bool, what: str, safe_globals: list[Any] | None = None) -> Any:
    """``torch.load`` on the CPU: ``weights_only=True`` unless ``trust_pickle``.

    Args:
        path: the file.
        trust_pickle: allow full unpickling (``--trust-pickle``).
        what: how to name the file in messages (``"checkpoint x.pt"``, ``"--data d.pt"``).
        safe_globals: extra classes allowed in weights-only mode (e.g. ``TensorDataset``).

    Raises:
        InputError: the file is empty, truncated or corrupt, or weights-only loading refuses
            it (the message explains the risk and ``--trust-pickle``).
    """
    if not trust_pickle and _sniff(path) == "torchscript":  # torch.load would hand it to torch.jit.load
        raise InputError(f"{what}: {_TORCHSCRIPT_RISK}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # we explain refusals ourselves
            warnings.filterwarnings("ignore", message=".*dispatching to 'torch.jit.load'")
            if trust_pickle:
                return torch.load(path, map_location="cpu", weights_only=False)
            with torch.serialization.safe_globals(list(safe_globals or [])):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever unpickling raises, the file is the problem
        refused = not trust_pickle and "Weights only load failed" in str(e)
        if refused:
            found = _pickle_globals(path)
            if found is not None:  # a well-formed pickle that needs more than tensors and containers
                named = f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
                raise ObjectsRefused(
                    f"{what}: contains pickled Python objects{named} that safe (weights-only) loading refuses; "
                    f"{_PICKLE_RISK}"
                ) from e
            raise InputError(
                f"{what}: not a PyTorch file (its bytes do not parse as a pickle); it is truncated or corrupt, "
                f"re-save or re-download it"
            ) from e
        if isinstance(e, EOFError) or path.stat().st_size == 0:
            raise InputError(f"{what}: the file is empty or truncated; re-save or re-download it") from e
        if isinstance(e, (ModuleNotFoundError, AttributeError)) and trust_pickle:
            raise InputError(
                f"{what}: unpickling needs code that is not importable here ({one_line(e)}); "
                f"make the defining module importable (run from its folder) or save a state_dict instead"
            ) from e
        raise InputError(
            f"{what}: not a readable PyTorch file, it is truncated or corrupt ({short(e)}); "
            f"re-save or re-download it"
        ) from e


# ------------------------------------------------------------------------------------------
# checkpoint -> model
# ------------------------------------------------------------------------------------------


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _find_weights(obj: object, depth: int = 0) -> tuple[nn.Module | Mapping[str, Tensor] | None, str]:
    """Locate a module or a state_dict inside a loaded object; returns ``(found, key path)``."""
    if isinstance(obj, nn.Module):
        return obj, ""
    if _is_state_dict(obj):
        return obj, ""  # type: ignore[return-value]
    if isinstance(obj, Mapping) and depth < 2:
        for key in NESTED_KEYS:
            if key in obj:
                found, sub = _find_weights(obj[key], depth + 1)
                if found is not None:
                    return found, f"{key}.{sub}" if sub else key
    return None, ""


def _scalar_metadata(obj: object) -> dict[str, object]:
    meta: dict[str, object] = {}
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for k, v in obj.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(k, str) and isinstance(v, (int, float, str, bool)):
                meta[k] = v
    return meta


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj.keys())[:8]]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _weights_without_code(path: Path, what: str, refused: InputError) -> Any:
    """The file read by the restricted unpickler, when that yields a state_dict (a Lightning ``.ckpt`` whose
    ``hyper_parameters`` or callback state hold objects); else the weights-only refusal stands."""
    from hesscli.loading.safepickle import placeholders_in, restricted_load

    try:
        obj = restricted_load(path)
    except Exception:  # noqa: BLE001 - not readable this way either: the refusal explains the file best
        raise refused from None
    found, _ = _find_weights(obj)
    if found is None or isinstance(found, nn.Module):
        raise refused
    names = placeholders_in(obj)
    logger.info("%s: read without running code; not unpickled: %s", what,
                ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    return obj


def load_checkpoint(path: str | Path, settings: ProblemSpec) -> LoadedModel:
    """Read a checkpoint and return its model on the CPU (not yet moved or cast).

    Args:
        path: ``torch.save`` file (state_dict, nested state_dict, or a pickled module with
            ``settings.trust_code``), TorchScript archive (with ``settings.trust_code``),
            ``.safetensors`` file or Hugging Face model folder. A file that pickles objects next
            to its state_dict (a Lightning ``.ckpt`` with objects in ``hyper_parameters``) is read
            without running code: those objects become inert placeholders. A checkpoint's
            ``hyper_parameters`` are keyword arguments of the ``--model`` factory (``--model-arg``
            wins).
        settings: uses ``model``, ``model_args`` and ``trust_code``.

    Returns:
        The model plus provenance: format, sha256, step, epoch and scalar metadata.

    Raises:
        InputError: missing/corrupt file, refused pickle or TorchScript archive, no ``--model``
            for a state_dict, or weights that do not fit the model (names, shapes or dtypes).
    """
    p = Path(path).expanduser()
    what = f"checkpoint {path}"
    if not p.exists():
        raise InputError(f"{what}: file not found; check the path")
    if p.is_dir():
        from hesscli.loading.hf import WEIGHT_FILES, is_hf_folder, load_hf_folder

        if is_hf_folder(p):
            return load_hf_folder(p, settings)
        if (p / "config.json").is_file():
            raise InputError(f"{what}: has config.json but no weights ({', '.join(WEIGHT_FILES)}); point at the "
                             f"folder save_pretrained wrote")
        raise InputError(f"{what}: is a folder, not a file or a Hugging Face model folder (config.json + weights); "
                         f"pass one checkpoint (use 'hesscli scan' for a folder of checkpoints)")
    if p.stat().st_size == 0:
        raise InputError(f"{what}: the file is empty; re-save or re-download it")
    sha = file_sha256(p)
    kind = _sniff(p)
    metadata: dict[str, object] = {}

    if kind == "torchscript":
        if not settings.trust_code:
            raise InputError(f"{what}: {_TORCHSCRIPT_RISK}")
        try:
            model: nn.Module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise InputError(f"{what}: TorchScript archive cannot be loaded ({short(e)}); re-export it") from e
        fmt = "torchscript"
    elif kind == "safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            state: Mapping[str, Tensor] = load_file(str(p), device="cpu")
            with safe_open(str(p), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
        except Exception as e:
            raise InputError(f"{what}: not a readable safetensors file ({short(e)}); re-save it") from e
        if not state:
            raise InputError(f"{what}: the safetensors file holds no tensors")
        if not settings.model and (p.parent / "config.json").is_file():
            raise InputError(f"{what}: part of a Hugging Face model folder; pass the folder {p.parent} (its model is "
                             f"built from config.json), or --model for this file alone")
        model = build_model(settings.model, settings.model_args,
                            needed_by=f"{what} is a safetensors file ({len(state)} tensors)")
        load_weights(model, state, source=str(path), spec=settings.model)
        fmt = "safetensors"
    else:
        try:
            obj = torch_load(p, trust_pickle=settings.trust_code, what=what)
        except ObjectsRefused as refused:
            obj = _weights_without_code(p, what, refused)
        metadata = _scalar_metadata(obj)
        found, key = _find_weights(obj)
        if found is None:
            raise InputError(
                f"{what}: holds {_describe(obj)}, not a state_dict or model; expected a state_dict, a dict with one "
                f"under {'/'.join(NESTED_KEYS)}, or a TorchScript archive"
            )
        if isinstance(found, nn.Module):
            model, fmt = found, "pickle"
            if settings.model:
                logger.info("%s holds a whole module; --model %s is not used", what, settings.model)
        else:
            where = f" under '{key}'" if key else ""
            hparams = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
            model = build_model(settings.model, settings.model_args,
                                needed_by=f"{what} holds a state_dict{where} ({len(found)} tensors)",
                                checkpoint_args=hparams if isinstance(hparams, Mapping) else None)
            load_weights(model, found, source=str(path), spec=settings.model)
            fmt = "state_dict"

    step = step_from(p, metadata)
    epoch = epoch_from(p, metadata)
    logger.debug("loaded %s (%s, step %s)", p, fmt, step)
    return LoadedModel(model=model, source=str(path), sha256=sha, format=fmt, step=step, epoch=epoch,
                       metadata=metadata)
