"""``--data`` specs -> a :class:`Dataset` of batches on the analysis device.

Specs: a ``.pt`` file holding ``(inputs, targets)``, a dict (``inputs``/``targets``,
``x``/``y``, ``X``/``y``) or a ``TensorDataset``; an ``.npz`` file with the same key names;
``pkg.module:callable`` / ``file.py:callable`` returning a Dataset, DataLoader or
``(inputs, targets)``; ``torchvision:NAME?root=DIR&train=false`` (never downloads).

Samples may also be dicts of fields (``input_ids``, ``attention_mask``, ``labels``, ...): a
``.pt`` dict of equal-length tensors, a folder written by ``datasets``' ``save_to_disk``, or a
callable returning a Dataset/DataLoader of dicts. The target field (``--target-key``, default
``labels``) is held back and the rest become the model's keyword inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from hesscli.errors import InputError
from hesscli.loading.checkpoint import torch_load
from hesscli.loading.forward import batch_len
from hesscli.loading.loss import IGNORE_INDEX
from hesscli.loading.problem import Dataset
from hesscli.loading.specs import build_mismatch, load_callable, one_line, short
from hesscli.options import ProblemSpec

__all__ = ["load_data", "make_dataset", "select_indices", "shard_bounds", "KEY_PAIRS"]

logger = logging.getLogger(__name__)

KEY_PAIRS: tuple[tuple[str, str], ...] = (("inputs", "targets"), ("x", "y"), ("X", "y"), ("X", "Y"))
"""Accepted ``(inputs, targets)`` key names in dict-like data files."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# ------------------------------------------------------------------------------------------
# selection and sharding
# ------------------------------------------------------------------------------------------


def select_indices(n: int, max_samples: int | None, seed: int) -> Tensor | None:
    """Indices of a seeded subset of ``max_samples`` out of ``n`` samples, sorted.

    Uses ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]``.
    Returns ``None`` (keep everything) when ``max_samples`` is ``None`` or ``>= n``.
    """
    if max_samples is None or max_samples >= n:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:max_samples].sort().values


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard; sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ------------------------------------------------------------------------------------------
# reading specs
# ------------------------------------------------------------------------------------------


def _pair_from_mapping(obj: Mapping[str, Any], source: str) -> tuple[Any, Any]:
    for a, b in KEY_PAIRS:
        if a in obj and b in obj:
            return obj[a], obj[b]
    found = sorted(str(k) for k in obj.keys())
    raise InputError(
        f"--data {source}: expected arrays 'inputs' and 'targets' (or x/y, X/y), found {found[:10]}; "
        f"rename the keys when saving"
    )


def _read_file(path: Path, source: str, trust_pickle: bool) -> Any:
    if not path.exists():
        raise InputError(f"--data {source}: file not found; check the path")
    if path.is_dir():
        if _datasets_folder(path):
            return _load_datasets_folder(path, source)
        raise InputError(f"--data {source}: is a folder; pass a .pt or .npz file, a callable spec or a folder "
                         f"written by datasets' save_to_disk")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception as e:
            raise InputError(f"--data {source}: not a readable .npz file ({short(e)}); re-save it") from e
    return torch_load(path, trust_pickle=trust_pickle, what=f"--data {source}", safe_globals=[TensorDataset])


def _torchvision(spec: str) -> TorchDataset:
    name, _, query = spec[len("torchvision:"):].partition("?")
    try:
        import torchvision
        from torchvision import transforms
    except Exception as e:  # a broken install raises RuntimeError/OSError, not only ImportError
        mismatch = build_mismatch(e)
        if mismatch:
            raise InputError(f"--data {spec}: {mismatch}; or save the data as a .pt/.npz file") from e
        raise InputError(
            f"--data {spec}: torchvision could not be imported ({short(e)}); install a torchvision build "
            f"matching torch {torch.__version__}, or save the data as a .pt/.npz file"
        ) from e
    cls = getattr(torchvision.datasets, name, None)
    if not name or cls is None:
        names = [n for n in dir(torchvision.datasets) if n[:1].isupper()]
        raise InputError(f"--data {spec}: unknown torchvision dataset {name!r}; e.g. {', '.join(names[:8])}")
    kwargs: dict[str, Any] = {"root": ".", "download": False, "transform": transforms.ToTensor()}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "root":
            kwargs["root"] = value
        elif key == "train":
            if value.lower() not in _TRUE | _FALSE:
                raise InputError(f"--data {spec}: train={value!r} must be true or false")
            kwargs["train"] = value.lower() in _TRUE
        elif key == "split":
            kwargs["split"] = value
        else:
            raise InputError(f"--data {spec}: unknown option {key!r}; use root=DIR, train=true|false or split=NAME")
    try:
        return cls(**kwargs)
    except Exception as e:
        raise InputError(
            f"--data {spec}: torchvision {name} could not be opened under root {kwargs['root']!r} ({short(e)}); "
            f"hesscli never downloads: fetch the dataset into root first"
        ) from e


def _read_spec(spec: str, trust_pickle: bool) -> Any:
    if spec.startswith("torchvision:"):
        return _torchvision(spec)
    path = Path(spec).expanduser()
    target, sep, _ = spec.rpartition(":")
    if sep and not path.exists() and target:
        fn: Callable[[], Any] = load_callable(spec, "--data")
        try:
            return fn()
        except Exception as e:
            raise InputError(f"--data {spec}: calling it raised {one_line(e)}") from e
    return _read_file(path, spec, trust_pickle)


# ------------------------------------------------------------------------------------------
# materialising (inputs, targets)
# ------------------------------------------------------------------------------------------


def _as_tensor(value: Any, what: str, source: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise InputError(f"--data {source}: {what} is an object array; save numeric arrays")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float, bool, np.number)):
        return torch.as_tensor(value)
    if isinstance(value, (list, tuple)):
        try:
            if value and all(isinstance(v, (Tensor, np.ndarray)) for v in value):
                return torch.stack([_as_tensor(v, what, source) for v in value])
            return torch.as_tensor(value)
        except Exception as e:
            raise InputError(f"--data {source}: {what} cannot be turned into a tensor ({one_line(e)})") from e
    raise InputError(f"--data {source}: {what} is a {type(value).__name__}; expected a tensor or array")


def _split_item(item: Any, source: str) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        return _pair_from_mapping(item, source)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise InputError(
        f"--data {source}: each sample must be an (input, target) pair or a dict of fields, got {type(item).__name__}"
        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
    )


def _stack(items: Sequence[tuple[Any, Any]], source: str) -> tuple[Tensor, Tensor]:
    try:
        xs = torch.stack([_as_tensor(x, "an input", source) for x, _ in items])
        ys = torch.stack([_as_tensor(y, "a target", source) for _, y in items])
    except RuntimeError as e:
        raise InputError(f"--data {source}: samples have different shapes ({one_line(e)})") from e
    return xs, ys


# ------------------------------------------------------------------------------------------
# structured (dict) samples
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fields:
    """How dict samples split into model inputs and the loss target."""

    target_key: str = "labels"
    loss: str | None = None  # the --loss name: token losses mask padding, causal_lm may predict input_ids

    @property
    def token_loss(self) -> bool:
        return self.loss in ("causal_lm", "token_cross_entropy")


def _is_pair_mapping(obj: Mapping[str, Any]) -> bool:
    return any(a in obj and b in obj for a, b in KEY_PAIRS)


def _is_structured(obj: Mapping[str, Any], fields: _Fields) -> bool:
    """A dict of fields (``input_ids``, ``attention_mask``, ``labels``, ...) rather than inputs/targets."""
    return not _is_pair_mapping(obj) and (fields.target_key in obj or "input_ids" in obj)


def _columns_of(items: Sequence[Mapping[str, Any]], source: str, *, stack: bool) -> dict[str, Tensor]:
    """Dict samples (``stack``) or dict batches (concatenated) -> one tensor per key."""
    keys = list(items[0].keys())
    cols: dict[str, Tensor] = {}
    for key in keys:
        try:
            parts = [_as_tensor(item[key], f"field {key!r}", source) for item in items]
        except KeyError:
            missing = next(i for i, item in enumerate(items) if key not in item)
            raise InputError(f"--data {source}: sample {missing} has no field {key!r} that sample 0 has; every "
                             f"sample needs the same fields") from None
        try:
            cols[str(key)] = torch.stack(parts) if stack else torch.cat(parts)
        except RuntimeError as e:
            raise InputError(
                f"--data {source}: field {key!r} has different lengths across samples ({one_line(e)}); pad the "
                f"sequences to one length (with attention_mask 0 and labels -100 on the padding)"
            ) from e
    return cols


def _split_columns(cols: dict[str, Tensor], source: str, fields: _Fields) -> tuple[dict[str, Tensor], Tensor]:
    """Hold back the target key; token losses leave out padding (``attention_mask == 0``) as -100."""
    lengths = {k: (len(v) if v.ndim else -1) for k, v in cols.items()}
    if len(set(lengths.values())) != 1 or -1 in lengths.values():
        shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise InputError(f"--data {source}: the fields must share their first (sample) dimension, got {shown}")
    keys = list(cols)
    inputs = dict(cols)
    if fields.target_key in inputs:
        targets = inputs.pop(fields.target_key)
    elif fields.loss == "causal_lm" and "input_ids" in inputs:
        targets = inputs["input_ids"].clone()  # language modelling of the inputs themselves
    else:
        hint = " (or --loss causal_lm to predict the next token of input_ids)" if "input_ids" in inputs else ""
        raise InputError(
            f"--data {source}: samples are dicts with fields {keys} but no {fields.target_key!r} to use as the loss "
            f"target; pass --target-key FIELD{hint}"
        )
    if not inputs:
        raise InputError(f"--data {source}: only the target field {fields.target_key!r} is there; the model needs "
                         f"inputs too")
    mask = inputs.get("attention_mask")
    if (fields.token_loss and mask is not None and not targets.is_floating_point()
            and tuple(mask.shape) == tuple(targets.shape)):
        targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    return inputs, targets


def _take(inputs: Any, idx: Tensor | slice) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


def _length(inputs: Any) -> int:
    return batch_len(inputs)


def _datasets_folder(path: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    if not path.is_dir():
        return False
    one = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    return one or (path / "dataset_dict.json").is_file()


def _load_datasets_folder(path: Path, source: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"--data {source}: a folder written by datasets' save_to_disk; reading it needs the "
                         f"'datasets' package: pip install datasets") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InputError(f"--data {source}: the datasets folder cannot be read ({short(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(f"--data {source}: holds several splits ({', '.join(ds)}); point at one split's folder "
                         f"({source.rstrip('/')}/{next(iter(ds))})")
    return ds.with_format("torch")


# ------------------------------------------------------------------------------------------
# materialising (inputs, targets)
# ------------------------------------------------------------------------------------------


def _materialise(obj: Any, source: str, max_samples: int | None, seed: int,
                 fields: _Fields = _Fields()) -> tuple[Any, Tensor]:
    """Turn any accepted data object into ``(inputs, targets)`` with the subset applied.

    ``inputs`` is a tensor, or a dict of tensors for dict samples.
    """
    if isinstance(obj, TensorDataset):
        if len(obj.tensors) != 2:
            raise InputError(f"--data {source}: TensorDataset holds {len(obj.tensors)} tensors; expected 2")
        obj = obj.tensors
    if isinstance(obj, Mapping):
        if _is_structured(obj, fields):
            cols = {str(k): _as_tensor(v, f"field {k!r}", source) for k, v in obj.items()}
            inputs_d, targets = _split_columns(cols, source, fields)
            idx = select_indices(len(targets), max_samples, seed)
            return (inputs_d, targets) if idx is None else (_take(inputs_d, idx), targets[idx])
        obj = _pair_from_mapping(obj, source)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], (tuple, list, Mapping)):
        inputs, targets = _as_tensor(obj[0], "inputs", source), _as_tensor(obj[1], "targets", source)
        _check_lengths(inputs, targets, source)
        idx = select_indices(len(inputs), max_samples, seed)
        return (inputs, targets) if idx is None else (inputs[idx], targets[idx])
    if isinstance(obj, DataLoader) or isinstance(obj, IterableDataset):
        batched = isinstance(obj, DataLoader)
        items = list(obj)
        if not items:
            raise InputError(f"--data {source}: the loader yielded no samples; check the dataset")
        if isinstance(items[0], Mapping) and not _is_pair_mapping(items[0]):
            inputs_d, targets = _split_columns(_columns_of(items, source, stack=not batched), source, fields)
            idx = select_indices(len(targets), max_samples, seed)
            return (inputs_d, targets) if idx is None else (_take(inputs_d, idx), targets[idx])
        xs, ys = [], []
        for item in items:
            x, y = _split_item(item, source)
            x, y = _as_tensor(x, "inputs", source), _as_tensor(y, "targets", source)
            if not batched:
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            _check_lengths(x, y, source)
            xs.append(x)
            ys.append(y)
        try:
            inputs, targets = torch.cat(xs), torch.cat(ys)
        except RuntimeError as e:
            raise InputError(f"--data {source}: batches have different shapes ({one_line(e)})") from e
        idx = select_indices(len(inputs), max_samples, seed)
        return (inputs, targets) if idx is None else (inputs[idx], targets[idx])
    if isinstance(obj, TorchDataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        n = len(obj)  # type: ignore[arg-type]
        if n == 0:
            raise InputError(f"--data {source}: the dataset is empty; check the files or the filter")
        idx = select_indices(n, max_samples, seed)
        order = range(n) if idx is None else idx.tolist()
        try:
            raw = [obj[i] for i in order]
        except Exception as e:
            raise InputError(f"--data {source}: reading a sample failed ({one_line(e)})") from e
        if raw and isinstance(raw[0], Mapping) and not _is_pair_mapping(raw[0]):
            return _split_columns(_columns_of(raw, source, stack=True), source, fields)
        items = [_split_item(item, source) for item in raw]
        return _stack(items, source)
    raise InputError(
        f"--data {source}: got a {type(obj).__name__}; expected (inputs, targets), a dict with inputs/targets or of "
        f"fields (input_ids, labels, ...), a Dataset or a DataLoader"
    )


def _check_lengths(inputs: Tensor, targets: Tensor, source: str) -> None:
    if inputs.ndim == 0 or targets.ndim == 0:
        raise InputError(f"--data {source}: inputs and targets need a leading sample dimension; got scalars")
    if len(inputs) != len(targets):
        raise InputError(
            f"--data {source}: {len(inputs)} inputs but {len(targets)} targets; they must have the same "
            f"first dimension"
        )


def _place(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    if t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def make_dataset(
    obj: Any,
    *,
    source: str,
    batch_size: int,
    max_samples: int | None,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
    target_key: str = "labels",
    loss: str | None = None,
) -> Dataset:
    """Build a :class:`Dataset` from an in-memory object (tensors pair, dict, Dataset, DataLoader).

    Args:
        obj: the data; see :func:`load_data` for the accepted forms.
        source: name used in messages and kept as provenance.
        batch_size: chunk size of the batches.
        max_samples: seeded subset size (``None``: all samples).
        seed: subset seed.
        device, dtype: floating inputs and targets are cast to ``dtype``; all moved to ``device`` once.
        rank, world_size: keep this rank's contiguous shard of the selected samples.
        target_key: for dict samples, the field held back as the loss target.
        loss: the loss name; token losses turn labels under ``attention_mask == 0`` into -100, and
            ``causal_lm`` predicts ``input_ids`` when there is no target field.

    Returns:
        The batched dataset; ``n_total`` counts the samples of all ranks.

    Raises:
        InputError: unreadable content, length mismatch, no samples, or bad sizes.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"--max-samples {max_samples}: must be at least 1")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside world size {world_size}")
    inputs, targets = _materialise(obj, source, max_samples, seed, _Fields(target_key, loss))
    if not isinstance(inputs, Mapping):
        _check_lengths(inputs, targets, source)
    n_total = len(targets)
    if n_total == 0:
        raise InputError(f"--data {source}: no samples; check the file or --max-samples")
    if world_size > 1:
        if n_total < world_size:
            raise InputError(
                f"--data {source}: {n_total} samples cannot be split across {world_size} processes; use more data"
            )
        start, stop = shard_bounds(n_total, rank, world_size)
        inputs, targets = _take(inputs, slice(start, stop)), targets[start:stop]
    if not targets.is_floating_point() and targets.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        targets = targets.long()
    targets = _place(targets, device, dtype)
    n_here = len(targets)
    if isinstance(inputs, Mapping):
        inputs = {k: _place(v, device, dtype) for k, v in inputs.items()}
        starts = range(0, n_here, batch_size)
        batches: list[tuple[Any, Tensor]] = [
            ({k: v[s : s + batch_size] for k, v in inputs.items()}, targets[s : s + batch_size]) for s in starts
        ]
        first = inputs.get("input_ids", next(iter(inputs.values())))
        input_shape, input_keys = tuple(first.shape[1:]), tuple(inputs)
    else:
        inputs = _place(inputs, device, dtype)
        batches = list(zip(torch.split(inputs, batch_size), torch.split(targets, batch_size)))
        input_shape, input_keys = tuple(inputs.shape[1:]), ()
    logger.debug("data %s: %d samples (%d here) in %d batches", source, n_total, n_here, len(batches))
    return Dataset(
        batches=batches,
        n_samples=n_here,
        n_total=n_total,
        source=source,
        input_shape=input_shape,
        target_shape=tuple(targets.shape[1:]),
        target_dtype=str(targets.dtype).removeprefix("torch."),
        input_keys=input_keys,
    )


def load_data(
    settings: ProblemSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
) -> Dataset:
    """Read ``settings.data`` and return the selected samples in batches on ``device``.

    ``--max-samples N`` keeps a seeded subset (``settings.seed``; indices sorted),
    ``--batch-size B`` sets the chunk size, floating tensors are cast to ``dtype``, and
    with ``world_size > 1`` rank ``r`` keeps a disjoint contiguous shard of the subset.
    Data files are read with ``weights_only=True`` (``TensorDataset`` allowed) unless
    ``--trust-pickle``.

    Args:
        settings: uses ``data``, ``batch_size``, ``max_samples``, ``seed``, ``trust_code``.
        device, dtype: the analysis device and floating dtype.
        rank, world_size: this process's place among data-parallel processes.

    Returns:
        The dataset.

    Raises:
        InputError: no ``--data``, unreadable or malformed data, or no samples.
    """
    spec = settings.data
    if not spec:
        raise InputError(
            "no data: pass --data SPEC (a .pt/.npz file, pkg.module:callable, file.py:callable or "
            "torchvision:NAME?root=DIR) or set data in hesscli.toml"
        )
    obj = _read_spec(spec, settings.trust_code)
    return make_dataset(
        obj,
        source=spec,
        batch_size=settings.batch_size,
        max_samples=settings.max_samples,
        seed=settings.seed,
        device=device,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        target_key=settings.target_key,
        loss=settings.loss.strip().lower().replace("-", "_"),
    )
