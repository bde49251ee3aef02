"""Assemble a :class:`Problem` (model + loss + data + selected parameters) and validate it once."""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from hesscli import distributed
from hesscli.config import Settings
from hesscli.distributed import DistContext
from hesscli.errors import InputError
from hesscli.loading.batchnorm import batchnorm_layers, running_statistics_gap, use_batch_statistics
from hesscli.loading.checkpoint import load_checkpoint
from hesscli.loading.data import load_data, make_dataset
from hesscli.loading.forward import ModelCall
from hesscli.loading.loss import check_targets, load_loss
from hesscli.loading.problem import Dataset, LoadedModel, LossFn, LossSpec, Problem
from hesscli.loading.specs import one_line
from hesscli.options import ProblemSpec

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "build_problem",
    "load_problem",
    "problem_from_python",
    "model_name",
    "ProblemLoader",
    "private_copy",
    "weigh_batches",
]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
_SHOWN_NAMES = 8


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device.

    Raises:
        InputError: unknown spec, or CUDA (or that CUDA index) is not available here.
    """
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--device {spec!r}: not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InputError(f"--device {spec!r}: unsupported device type {dev.type!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}); "
                         f"use --device cpu or auto")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise InputError(f"--device {spec}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    return dev


def resolve_dtype(spec: str) -> torch.dtype:
    """``float32`` | ``float64`` -> the torch dtype.

    Raises:
        InputError: any other name.
    """
    s = (spec or "").strip().lower()
    if s not in DTYPES:
        raise InputError(f"--dtype {spec!r}: use float32 or float64")
    return DTYPES[s]


def model_name(model: nn.Module) -> str:
    """The user's class name, also for TorchScript modules (their ``original_name``)."""
    return str(getattr(model, "original_name", None) or type(model).__name__)


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _select_params(model: nn.Module, globs: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]]:
    named = list(model.named_parameters())
    frozen = [n for n, p in named if not p.requires_grad]
    trainable: list[tuple[str, Tensor]] = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise InputError(f"model {model_name(model)} has no parameters; nothing to analyse")
    if not trainable:
        raise InputError(
            f"model {model_name(model)}: all {len(named)} parameters are frozen (requires_grad=False); "
            f"nothing to analyse"
        )
    if not globs:
        return dict(trainable), frozen
    names = [n for n, _ in trainable]
    some = ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            hint = " (it matches only frozen parameters)" if any(fnmatch.fnmatchcase(n, g) for n in frozen) else ""
            raise InputError(f"--params {g!r}: matches no trainable parameter{hint}; names are: {some}")
    selected = {n: p for n, p in trainable if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    return selected, frozen


def _check_finite(model: nn.Module, source: str) -> None:
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                where = "model" if source == "<python>" else f"checkpoint {source}"
                raise InputError(f"{where}: {kind} {name} contains {bad}; the weights are diverged or corrupt")


def _tensors(inputs: Any) -> list[tuple[str, Tensor]]:
    if isinstance(inputs, Mapping):
        return [(f"field {k!r}", v) for k, v in inputs.items() if isinstance(v, Tensor)]
    return [("inputs", inputs)]


def _describe_inputs(x: Any) -> str:
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in x.items()) + "}"
    return f"of shape {_shape(x)} ({str(x.dtype).removeprefix('torch.')})"


def _validate(problem: Problem) -> None:
    """One forward on the first batch: inputs fit the model, targets fit the loss, finite loss."""
    model, data, loss = problem.model, problem.data, problem.loss
    if not data.batches:
        raise InputError(f"--data {data.source}: no samples on this process")
    _check_finite(model, problem.checkpoint.source)
    seen = 0
    for x, y in data.batches:
        for what, t in _tensors(x) + [("targets", y)]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = seen + int(torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(dim=1))[0])
                raise InputError(f"--data {data.source}: {what} contain NaN/Inf (first at sample {bad} of the "
                                 f"selection); clean the data")
        seen += len(y)
    x, y = data.batches[0]
    name = model_name(model)
    with torch.no_grad():
        try:
            out = problem.call(model, x)
        except InputError:
            raise
        except Exception as e:
            raise InputError(
                f"--data {data.source}: inputs {_describe_inputs(x)} do not fit {name}: {one_line(e)[:300]}; "
                f"check --data and --model"
            ) from e
        problem_text = None
        for _, yb in data.batches:
            problem_text = check_targets(loss, out, yb)
            if problem_text:
                break
        if problem_text:
            raise InputError(f"--data {data.source} with --loss {loss.name}: {problem_text}; check --data or --loss")
        try:
            value = loss.fn(out, y)
        except Exception as e:
            raise InputError(
                f"--loss {loss.name}: targets of shape {_shape(y)} ({data.target_dtype}) do not fit model outputs "
                f"{_shape(out)}: {one_line(e)[:300]}"
            ) from e
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise InputError(
            f"--loss {loss.name}: returned {_shape(value)}; a loss must return the batch-mean scalar"
        )
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"--loss {loss.name}: the loss on the first batch is {v}; check the loss, the data and "
                         f"the checkpoint")


def weigh_batches(data: Dataset, loss: LossSpec) -> None:
    """Set each batch's weight in the dataset mean: its share of the loss terms of all processes.

    Terms are samples, or the counted (non-ignored) tokens for token losses, so the analysed
    function is the mean over all terms of the whole selection whatever the batch size.

    Raises:
        InputError: a token loss with no token left to count.
    """
    if loss.count is None:
        counts = [float(len(y)) for _, y in data.batches]
        total = float(data.n_total)
    else:
        counts = [float(loss.count(y)) for _, y in data.batches]
        t = torch.tensor(sum(counts), dtype=torch.float64,
                         device=data.batches[0][1].device if data.batches else "cpu")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        total = float(t)
        if total == 0:
            raise InputError(
                f"--data {data.source} with --loss {loss.name}: every token label is -100 (or padding), so no token "
                f"is left to average over; check the labels and attention_mask"
            )
    data.weights = [c / total for c in counts]
    data.n_units = int(total)


def build_problem(
    loaded: LoadedModel,
    data: Dataset,
    loss: LossSpec,
    settings: ProblemSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Problem:
    """Move the model to ``device``/``dtype`` in eval mode, select parameters, and validate.

    BatchNorm layers use their running statistics (``settings.batchnorm == "running"``; a
    warning is logged when that loss is far above the loss with batch statistics) or each
    batch's own statistics (``"batch"``; running averages are never updated).

    Parameters are selected by ``settings.params`` globs (``fnmatch`` on names; all
    trainable ones when empty); parameters with ``requires_grad=False`` are excluded and
    listed in ``Problem.frozen``. Nothing else about the model is changed: ``requires_grad``
    flags and ``.grad`` stay as they were.

    Args:
        loaded: the model and its provenance.
        data: the batches (already on ``device``).
        loss: the loss spec.
        settings: uses ``params``.
        device, dtype: where and in what precision the analysis runs.

    Returns:
        The validated problem.

    Raises:
        InputError: no parameter matches, NaN/Inf weights, inputs that do not fit the model,
            targets that do not fit the loss, or a non-finite loss.
    """
    model = loaded.model
    model.to(device=device, dtype=dtype)
    model.eval()
    params, frozen = _select_params(model, tuple(settings.params))
    call = ModelCall(forward_args=dict(settings.forward_args), output=settings.output)
    weigh_batches(data, loss)
    problem = Problem(model=model, loss=loss, data=data, params=params, frozen=frozen, device=device,
                      dtype=dtype, checkpoint=loaded, call=call)
    _validate(problem)
    if settings.batchnorm == "batch":
        if batchnorm_layers(model):
            use_batch_statistics(model)
            loaded.metadata["batchnorm"] = "batch"
        else:
            logger.info("--batchnorm batch: %s has no BatchNorm layer; nothing changes", model_name(model))
    else:
        gap = running_statistics_gap(model, problem.output, loss.fn, data.batches[0])
        if gap is not None:
            where = "the model" if loaded.source == "<python>" else f"checkpoint {loaded.source}"
            logger.warning(
                "%s: loss %.4g with BatchNorm running statistics (eval mode) but %.4g with batch statistics; "
                "--batchnorm batch analyses the latter", where, gap[0], gap[1])
    return problem


class ProblemLoader:
    """The one path from specs to a :class:`Problem`: single commands, scan and the monitor use it.

    What every checkpoint of a run shares -- device, dtype, loss and data (sharded over the
    ranks of a torch.distributed job) -- is loaded once; :meth:`load` then builds each
    checkpoint's validated problem.

    Args:
        spec: the problem spec (a :class:`~hesscli.options.ProblemSpec` or settings holding its keys).
        ctx: the distributed context (default: :func:`hesscli.distributed.current`).

    Raises:
        InputError: a bad device, dtype or loss (the data is read on first use, or by :meth:`prepare`).
    """

    def __init__(self, spec: ProblemSpec, ctx: DistContext | None = None) -> None:
        self.spec = spec
        self.ctx = ctx or distributed.current()
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype)
        self.loss = load_loss(spec.loss)
        self._data: Dataset | None = None

    @property
    def data(self) -> Dataset:
        """The dataset, read on first use."""
        if self._data is None:
            self._data = load_data(self.spec, device=self.device, dtype=self.dtype, rank=self.ctx.rank,
                                   world_size=self.ctx.world_size)
        return self._data

    def prepare(self) -> ProblemLoader:
        """Read the data now (a scan refuses bad data before any checkpoint)."""
        _ = self.data
        return self

    def load(self, checkpoint: str | Path, *, step: int | None = None) -> Problem:
        """The validated problem of one checkpoint (``step`` when the checkpoint does not say)."""
        loaded = load_checkpoint(checkpoint, self.spec)
        if loaded.step is None:
            loaded.step = step
        return build_problem(loaded, self.data, self.loss, self.spec, device=self.device, dtype=self.dtype)


def load_problem(checkpoint: str | Path, spec: ProblemSpec, ctx: DistContext | None = None) -> Problem:
    """Load everything one analysis of one checkpoint needs (see :class:`ProblemLoader`).

    Raises:
        InputError: any bad input; the message names it and the fix.
    """
    return ProblemLoader(spec, ctx).load(checkpoint)


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def private_copy(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` on ``device``/``dtype`` whose changes never reach ``model``.

    The module tree is copied (each module shallowly, so hooks and plain attributes are
    shared and nothing unpicklable has to be copied); parameters become new ``Parameter``
    objects with the same ``requires_grad`` and no ``.grad``, and buffers are copied. A
    parameter already on ``device``/``dtype`` shares its storage with the original (the
    analyses never write to parameters; they take derivatives with ``torch.autograd.grad``
    and ``torch.func``), so no memory is spent on it; one that needs a cast is cast into the
    copy only. Parameters shared between modules (tied weights) stay shared in the copy.
    TorchScript modules are deep-copied and then moved.

    Args:
        model: the caller's module; it is not changed in any way.
        device: where the analysis runs.
        dtype: the floating dtype of the analysis (floating parameters and buffers are cast).

    Returns:
        The copy, in the same train/eval mode as ``model``.

    Raises:
        InputError: a TorchScript module that cannot be copied.

    Example:
        >>> net = torch.nn.Linear(2, 1).double()
        >>> twin = private_copy(net, torch.device("cpu"), torch.float32)
        >>> twin.weight.dtype, net.weight.dtype, twin.weight is net.weight
        (torch.float32, torch.float64, False)
    """
    if isinstance(model, torch.jit.ScriptModule):
        try:
            twin = copy.deepcopy(model)
        except Exception as e:
            raise InputError(f"model {model_name(model)}: this TorchScript module cannot be copied "
                             f"({one_line(e)[:200]}); hesscli analyses a copy so that your model is never changed") from e
        return twin.to(device=device, dtype=dtype)

    def cast(t: Tensor) -> Tensor:
        return t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    tensors: dict[int, Tensor] = {}
    modules: dict[int, nn.Module] = {}

    def param(p: Tensor) -> Tensor:
        if id(p) not in tensors:
            tensors[id(p)] = nn.Parameter(cast(p), requires_grad=p.requires_grad)
        return tensors[id(p)]

    def buffer(b: Tensor) -> Tensor:  # always a copy: a forward pass may update buffers in place
        if id(b) not in tensors:
            tensors[id(b)] = b.detach().to(device=device, dtype=dtype if b.is_floating_point() else b.dtype, copy=True)
        return tensors[id(b)]

    def tree(m: nn.Module) -> nn.Module:
        if id(m) not in modules:
            # A new __dict__ (not copy.copy: parametrized modules refuse __getstate__); the three
            # dicts below are replaced, the rest (hooks, plain attributes) is shared.
            twin = type(m).__new__(type(m))
            twin.__dict__.update(m.__dict__)
            modules[id(m)] = twin
            twin._parameters = {k: None if v is None else param(v)  # type: ignore[misc]
                                for k, v in m._parameters.items()}
            twin._buffers = {k: None if v is None else buffer(v) for k, v in m._buffers.items()}
            twin._modules = {k: None if v is None else tree(v) for k, v in m._modules.items()}
        return modules[id(m)]

    return tree(model)


def problem_from_python(
    model: nn.Module,
    loss: str | LossFn,
    data: Any,
    settings: ProblemSpec | Settings | None = None,
) -> Problem:
    """Build a problem from Python objects, e.g. inside a training loop.

    The problem holds a private copy of ``model`` (:func:`private_copy`): the caller's model
    is never changed, neither its dtype, device, parameter values, ``requires_grad`` flags,
    ``.grad`` nor train/eval mode. Without ``settings`` the analysis runs where the model is
    (its device and dtype). With ``settings``, ``device="auto"`` still means the model's own
    device, and ``dtype``, ``params``, ``batch_size``, ``max_samples`` and ``seed`` apply. The
    copy is put in eval mode (the model's own mode is recorded in
    ``problem.checkpoint.metadata["was_training"]``).

    Args:
        model: the network.
        loss: a loss name (``"cross_entropy"``) or ``fn(outputs, targets) -> batch-mean loss``.
        data: ``(inputs, targets)`` tensors, a dict with inputs/targets, a torch Dataset,
            a DataLoader, or a :class:`hesscli.loading.problem.Dataset`.
        settings: optional settings (defaults otherwise).

    Returns:
        The validated problem.

    Raises:
        InputError: invalid loss name, data, or a model that does not fit them.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> problem_from_python(net, "cross_entropy", (x, y)).n_params
        8
    """
    own_device, own_dtype = _model_placement(model)
    if settings is None:
        pspec = ProblemSpec()
        device, dtype = own_device, own_dtype
    else:
        pspec = settings.problem if isinstance(settings, Settings) else settings
        device = own_device if pspec.device == "auto" else resolve_device(pspec.device)
        dtype = resolve_dtype(pspec.dtype)
    if isinstance(loss, str):
        spec = load_loss(loss)
    elif callable(loss):
        spec = LossSpec(name=getattr(loss, "__name__", type(loss).__name__), fn=loss, is_classification=False)
    else:
        raise InputError(f"loss must be a loss name or a callable (outputs, targets) -> loss, got {type(loss).__name__}")
    if isinstance(data, Dataset):
        def place(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        dataset = Dataset(
            batches=[({k: place(v) for k, v in x.items()} if isinstance(x, Mapping) else place(x), place(y))
                     for x, y in data.batches],
            n_samples=data.n_samples, n_total=data.n_total, source=data.source, input_shape=data.input_shape,
            target_shape=data.target_shape, target_dtype=data.target_dtype, input_keys=data.input_keys,
        )
    elif isinstance(data, (tuple, list, dict, TorchDataset, DataLoader)):
        ctx = distributed.current()
        dataset = make_dataset(data, source="<python>", batch_size=pspec.batch_size,
                               max_samples=pspec.max_samples, seed=pspec.seed, device=device, dtype=dtype,
                               rank=ctx.rank, world_size=ctx.world_size, target_key=pspec.target_key, loss=spec.name)
    else:
        raise InputError(
            f"data is a {type(data).__name__}; pass (inputs, targets), a torch Dataset, a DataLoader or a "
            f"hesscli Dataset"
        )
    loaded = LoadedModel(model=private_copy(model, device, dtype), source="<python>", format="module",
                         metadata={"was_training": model.training})
    return build_problem(loaded, dataset, spec, pspec, device=device, dtype=dtype)
