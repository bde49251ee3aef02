"""``--data`` specs -> a :class:`Dataset` of batches on the analysis device.

Specs: a ``.pt`` file holding ``(inputs, targets)``, a dict (``inputs``/``targets``,
``x``/``y``, ``X``/``y``) or a ``TensorDataset``; an ``.npz`` file with the same key names;
``pkg.module:callable`` / ``file.py:callable`` returning a Dataset, DataLoader or
``(inputs, targets)``; ``torchvision:NAME?root=DIR&train=false`` (never downloads).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from hesscli.config import Settings
from hesscli.errors import InputError
from hesscli.loading.checkpoint import torch_load
from hesscli.loading.problem import Dataset
from hesscli.loading.specs import load_callable, one_line, short

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
        raise InputError(f"--data {source}: is a folder; pass a .pt or .npz file or a callable spec")
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
        f"--data {source}: each sample must be an (input, target) pair, got {type(item).__name__}"
        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
    )


def _stack(items: Sequence[tuple[Any, Any]], source: str) -> tuple[Tensor, Tensor]:
    try:
        xs = torch.stack([_as_tensor(x, "an input", source) for x, _ in items])
        ys = torch.stack([_as_tensor(y, "a target", source) for _, y in items])
    except RuntimeError as e:
        raise InputError(f"--data {source}: samples have different shapes ({one_line(e)})") from e
    return xs, ys


def _materialise(obj: Any, source: str, max_samples: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Turn any accepted data object into ``(inputs, targets)`` with the subset applied."""
    if isinstance(obj, TensorDataset):
        if len(obj.tensors) != 2:
            raise InputError(f"--data {source}: TensorDataset holds {len(obj.tensors)} tensors; expected 2")
        obj = obj.tensors
    if isinstance(obj, Mapping):
        obj = _pair_from_mapping(obj, source)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], (tuple, list)):
        inputs, targets = _as_tensor(obj[0], "inputs", source), _as_tensor(obj[1], "targets", source)
        _check_lengths(inputs, targets, source)
        idx = select_indices(len(inputs), max_samples, seed)
        return (inputs, targets) if idx is None else (inputs[idx], targets[idx])
    if isinstance(obj, DataLoader) or isinstance(obj, IterableDataset):
        xs, ys = [], []
        for item in obj:
            x, y = _split_item(item, source)
            x, y = _as_tensor(x, "inputs", source), _as_tensor(y, "targets", source)
            if isinstance(obj, IterableDataset) and not isinstance(obj, DataLoader):
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            _check_lengths(x, y, source)
            xs.append(x)
            ys.append(y)
        if not xs:
            raise InputError(f"--data {source}: the loader yielded no samples; check the dataset")
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
            items = [_split_item(obj[i], source) for i in order]
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"--data {source}: reading a sample failed ({one_line(e)})") from e
        return _stack(items, source)
    raise InputError(
        f"--data {source}: got a {type(obj).__name__}; expected (inputs, targets), a dict with inputs/targets, "
        f"a Dataset or a DataLoader"
    )


def _check_lengths(inputs: Tensor, targets: Tensor, source: str) -> None:
    if inputs.ndim == 0 or targets.ndim == 0:
        raise InputError(f"--data {source}: inputs and targets need a leading sample dimension; got scalars")
    if len(inputs) != len(targets):
        raise InputError(
            f"--data {source}: {len(inputs)} inputs but {len(targets)} targets; they must have the same "
            f"first dimension"
        )


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
    inputs, targets = _materialise(obj, source, max_samples, seed)
    _check_lengths(inputs, targets, source)
    n_total = len(inputs)
    if n_total == 0:
        raise InputError(f"--data {source}: no samples; check the file or --max-samples")
    if world_size > 1:
        if n_total < world_size:
            raise InputError(
                f"--data {source}: {n_total} samples cannot be split across {world_size} processes; use more data"
            )
        start, stop = shard_bounds(n_total, rank, world_size)
        inputs, targets = inputs[start:stop], targets[start:stop]
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    if targets.is_floating_point():
        targets = targets.to(dtype)
    elif targets.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        targets = targets.long()
    inputs, targets = inputs.to(device), targets.to(device)
    batches = list(zip(torch.split(inputs, batch_size), torch.split(targets, batch_size)))
    logger.debug("data %s: %d samples (%d here) in %d batches", source, n_total, len(inputs), len(batches))
    return Dataset(
        batches=batches,
        n_samples=len(inputs),
        n_total=n_total,
        source=source,
        input_shape=tuple(inputs.shape[1:]),
        target_shape=tuple(targets.shape[1:]),
        target_dtype=str(targets.dtype).removeprefix("torch."),
    )


def load_data(
    settings: Settings,
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
        settings: uses ``data``, ``batch_size``, ``max_samples``, ``seed``, ``trust_pickle``.
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
    obj = _read_spec(spec, settings.trust_pickle)
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
    )
