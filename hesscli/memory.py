"""A memory budget for the products: ``--max-memory SIZE``.

Three pieces, used by the native backend (:mod:`hesscli.backends.native`) and the operators
(:mod:`hesscli.operators.empirical`):

* :func:`parse_size` reads ``2GB``, ``500MiB``, ``1.5G`` or plain bytes;
* :func:`plan_memory` chooses the probe columns per product (and, when even one column on a
  whole batch does not fit, a smaller data chunk) from the budget, the parameter count, the
  dtype's item size, the bytes the algorithm keeps (Hutch++'s basis ``Q``, a Lanczos basis) and
  the activation bytes of one sample (:func:`activation_bytes`);
* :func:`is_out_of_memory` / :func:`free_memory` let a product that runs out of memory anyway
  be retried on half the block (see ``EmpiricalRiskOperator``).

The budget covers what the analysis holds on its device: the model's parameters and buffers,
the data, the algorithm's vectors and the products' activations. It does not cover the Python
process itself (the interpreter and torch's libraries, a few hundred MB of host memory). It
never changes which numbers are drawn: probes are drawn column by column
(:mod:`hesscli.algorithms.sampling`), so a smaller block multiplies the same vectors.

Importing this module does not import torch.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hesscli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hesscli.loading.problem import Problem

logger = logging.getLogger(__name__)

__all__ = ["parse_size", "format_size", "MemoryPlan", "plan_memory", "activation_bytes", "resident_bytes",
           "is_out_of_memory", "free_memory", "DEFAULT_BLOCK", "COLUMN_BLOCK", "VECTORS_PER_COLUMN", "ACTIVATION_FACTOR", "HEADROOM"]

DEFAULT_BLOCK = 16
"""Probe columns per product without a budget (the algorithms' default); a budget only lowers it."""

COLUMN_BLOCK = 4
"""Probe columns per product where the operator multiplies one column at a time anyway
(:attr:`~hesscli.operators.empirical.EmpiricalRiskOperator.one_column_at_a_time`: the CPU
Hessian over cached gradient graphs). A block there saves no product work, so it is kept small:
on the W2 benchmark CNN a 100-product Hutch++ trace peaked at 98-103 MB of RSS growth with blocks
of 4 against 115-121 MB with blocks of 16, for 6% more time (Q is read once per block)."""

VECTORS_PER_COLUMN = 4
"""Parameter-sized vectors one product column holds: the probe, the result, the accumulator and
the per-parameter tangent views' copies (``[size, k]`` in, ``[size, k]`` out, ``[k, *shape]``
accumulators, and the flattened result)."""

ACTIVATION_FACTOR = 4
"""CPU rule: a product column on one sample holds about 4 times what the sample's forward pass
saves for backward (those tensors, the gradient graph built on them with ``create_graph``, and
the tangent pass through both). A conservative rule, not a measurement; on CUDA the bytes are
measured (:func:`activation_bytes`)."""

HEADROOM = 0.8
"""Products are planned to 80% of the budget: the rest is for what the sizing does not count (the
allocator's fragmentation, small tensors, the loss and its gradient)."""

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SI = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)(b?)|(b?))\s*$", re.IGNORECASE)


def parse_size(value: object, where: str = "--max-memory") -> int:
    """Bytes of a memory size such as ``2GB``, ``500MiB``, ``1.5G`` or ``1000000``.

    ``KB``/``MB``/``GB``/``TB`` are powers of 1000; ``KiB``/``MiB``/``GiB``/``TiB`` and the bare
    letters ``K``/``M``/``G``/``T`` (as in ``ulimit``, Slurm's ``--mem`` and Docker) are powers
    of 1024; a plain number (or ``B``) is bytes. Case and spaces do not matter. Fractions are
    rounded down to a whole byte.

    Args:
        value: the size, as text or a number of bytes.
        where: the option or config key, for the message.

    Returns:
        The size in bytes (at least 1).

    Raises:
        InputError: for anything else, with the accepted forms.

    Example:
        >>> parse_size("2GB"), parse_size("500MiB"), parse_size("1.5G"), parse_size(4096)
        (2000000000, 524288000, 1610612736, 4096)
    """
    def bad(why: str) -> InputError:
        return InputError(f"{where} {value!r}: {why}; expected a size such as 2GB, 500MiB, 1.5G or a number of bytes")

    if isinstance(value, bool):
        raise bad("not a size")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1:
            raise bad("must be a positive number of bytes")
        return int(value)
    if not isinstance(value, str):
        raise bad("not a size")
    m = _SIZE_RE.match(value)
    if not m:
        raise bad("not a size")
    number, letter, binary, _, _ = m.groups()
    letter = (letter or "").lower()
    scale = _UNITS[letter] if (binary or not m.group(4)) else _SI[letter]
    size = int(float(number) * scale)
    if size < 1:
        raise bad("must be at least 1 byte")
    return size


def format_size(n: float) -> str:
    """``n`` bytes for messages: ``1.5 GiB``, ``512 MiB``, ``10 KiB``, ``100 B``."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    """How products are sized to a budget.

    Attributes:
        budget: the budget in bytes.
        block_size: probe columns per product (at most :data:`DEFAULT_BLOCK`).
        chunk: samples per data chunk when a whole batch does not fit one column (``None``:
            the batches as loaded).
        per_column: bytes one product column takes on a batch (``chunk`` samples when set).
        available: bytes left for products after the resident and held bytes.
    """

    budget: int
    block_size: int
    chunk: int | None
    per_column: int
    available: int


def plan_memory(budget: int, *, n: int, itemsize: int, per_sample: int, batch: int, resident: int = 0,
                held: int = 0, held_what: str = "", fewer: str = "", block: int = DEFAULT_BLOCK,
                can_chunk: bool = True, label: str | None = None) -> MemoryPlan:
    """Choose the columns per product and the data chunk that fit ``budget``.

    One product column costs ``VECTORS_PER_COLUMN · n · itemsize`` (its vectors) plus
    ``samples · per_sample`` (the activations of one pass over a batch of ``samples``). What is
    left of :data:`HEADROOM` of the budget after ``resident`` (model and data) and ``held`` (the
    algorithm's own vectors) is divided by that cost: the block is as many columns as fit, at
    most ``block``.
    When not even one column fits on a whole batch, the data is taken in chunks of as many
    samples as fit, one column at a time.

    Args:
        budget: bytes allowed.
        n: parameters (the length of one vector).
        itemsize: bytes per number (4 for float32).
        per_sample: activation bytes of one column on one sample.
        batch: samples in the largest batch.
        resident: bytes already held by the model and the data.
        held: bytes the algorithm keeps besides the product blocks (a basis).
        held_what: what ``held`` is, for the message (``"Hutch++'s basis Q (100 vectors)"``).
        fewer: how to hold less, for the message (``"use fewer --probes"``).
        block: the largest block wanted.
        can_chunk: whether batches may be split (not with per-batch statistics).
        label: the budget as the user wrote it, for the message (default: ``budget`` in KiB/MiB/GiB).

    Returns:
        The :class:`MemoryPlan`.

    Raises:
        InputError: when the budget cannot hold the model, the data and the algorithm's vectors
            plus one column on one sample.

    Example:
        >>> p = plan_memory(10**9, n=1_000_000, itemsize=4, per_sample=10_000, batch=512)
        >>> p.block_size, p.chunk
        (16, None)
        >>> plan_memory(60_000_000, n=1_000_000, itemsize=4, per_sample=10_000, batch=512).block_size
        2
    """
    shown = f"{label} ({format_size(budget)})" if label and label != format_size(budget) else format_size(budget)
    vectors = VECTORS_PER_COLUMN * n * itemsize
    available = int(budget * HEADROOM) - resident - held
    need_one = vectors + per_sample
    if available < need_one:  # the smallest budget that would do
        least = math.ceil((resident + held + need_one) / HEADROOM)
        parts = [f"the model and data take {format_size(resident)}"]
        if held:
            parts.append(f"{held_what or 'the algorithm'} {format_size(held)}")
        hint = f"{fewer} or " if fewer and held else ""
        raise InputError(
            f"--max-memory {shown} is too small: {', '.join(parts)}, and one product needs "
            f"{format_size(need_one)} more ({n:,} parameters); {hint}raise --max-memory to at least "
            f"{format_size(least)}")
    per_column = vectors + batch * per_sample
    columns = available // per_column
    if columns >= 1:
        return MemoryPlan(budget, int(min(block, columns)), None, per_column, available)
    chunk = max(1, int((available - vectors) // max(1, per_sample)))
    if not can_chunk:
        raise InputError(
            f"--max-memory {shown}: one product column on a batch of {batch} samples needs "
            f"{format_size(per_column)} and {format_size(available)} is left, and --batchnorm batch cannot split "
            f"a batch (its statistics would change); lower --batch-size to at most {chunk} or raise --max-memory")
    return MemoryPlan(budget, 1, chunk, vectors + chunk * per_sample, available)


# ----------------------------------------------------------------------------- measuring
def _take(inputs: Any, count: int) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v[:count] for k, v in inputs.items()}
    return inputs[:count]


def _tensor_bytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def resident_bytes(problem: Problem) -> int:
    """Bytes the model (parameters and buffers) and the data hold on the analysis device."""
    model = problem.model
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if t.device == problem.device)
    for x, y in problem.data.batches:
        held += _tensor_bytes(x) + _tensor_bytes(y)
    return held


def activation_bytes(problem: Problem, samples: int = 8) -> int:
    """Activation bytes of one product column on one sample.

    On CUDA it is measured: the peak allocated memory (``torch.cuda.max_memory_allocated``)
    during one Hessian-vector product by double backward on the first ``samples`` samples of the
    first batch, less the memory allocated before and the parameter-sized vectors, divided by the
    samples. On the CPU, where no allocator keeps a peak, it is :data:`ACTIVATION_FACTOR` times
    the bytes the forward pass on those samples saves for backward (counted with
    ``torch.autograd.graph.saved_tensors_hooks``, parameters and buffers left out; at least the
    output): a rule, not a measurement (RSS moves in pages and is shared with everything else the
    process does).

    Args:
        problem: the loaded problem.
        samples: samples measured (fewer when the first batch is smaller).

    Returns:
        Bytes per sample per column (at least 1).
    """
    import torch

    x, y = problem.data.batches[0]
    count = max(1, min(samples, len(y)))
    xs, ys = _take(x, count), y[:count]
    params = list(problem.params.values())
    n = sum(p.numel() for p in params)
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    device = problem.device
    if device.type == "cuda":
        try:
            return _measured(problem, xs, ys, count, n * itemsize)
        except RuntimeError as e:  # e.g. no double backward through an op: fall back to the rule
            logger.info("could not measure the activation memory of a product (%s); using the CPU rule", e)
    skip = {p.data_ptr() for p in [*problem.model.parameters(), *problem.model.buffers()]}
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        ptr = t.data_ptr() if t.layout == torch.strided else id(t)
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            saved += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = problem.output(xs)
    saved = max(saved, _tensor_bytes(out))
    del out
    return max(1, math.ceil(ACTIVATION_FACTOR * saved / count))


def _measured(problem: Problem, xs: Any, ys: Any, count: int, vector: int) -> int:
    """Peak CUDA bytes of one double-backward product on ``count`` samples, per sample, less the
    parameter-sized vectors (the gradient, the tangent and the result)."""
    import torch

    from hesscli.operators.empirical import differentiable_kernels

    device = problem.device
    params = list(problem.params.values())
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.enable_grad(), differentiable_kernels():
        loss = problem.loss.fn(problem.output(xs), ys)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [(g, p) for g, p in zip(grads, params) if g is not None and g.requires_grad]
        if live:
            torch.autograd.grad([g for g, _ in live], [p for _, p in live],
                                [torch.ones_like(g) for g, _ in live], allow_unused=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del loss, grads, live
    return max(1, math.ceil((peak - 3 * vector) / count))


# ----------------------------------------------------------------------------- out of memory
_OOM_TEXT = ("out of memory", "can't allocate memory", "defaultcpuallocator: can't allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says an allocation failed: ``torch.cuda.OutOfMemoryError``, ``MemoryError``,
    or a ``RuntimeError`` whose message says "out of memory" / the CPU allocator "can't allocate"."""
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        return any(t in text for t in _OOM_TEXT)
    return False


def free_memory(device: torch.device) -> None:
    """Free what can be freed after a failed allocation: collect garbage and, on CUDA, return the
    cached blocks to the driver (``torch.cuda.empty_cache``)."""
    import torch

    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
