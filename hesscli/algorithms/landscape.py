"""Loss landscapes: the mean loss (and accuracy) on a grid ``θ + α·d₁ (+ β·d₂)`` around a checkpoint.

The loss at every grid point is the function every other analysis works on,

.. math:: L(\\theta) = \\sum_b w_b \\, \\ell_b(\\theta), \\qquad w_b = n_b / N,

the batch means :math:`\\ell_b` weighted by their share of the loss terms (samples, or counted
tokens for token losses), summed in float64 over all batches and, under torch.distributed, all
ranks: at ``α = β = 0`` it is :func:`hesscli.api.loss_value`.

Directions are flat vectors over the problem's selected parameters, in the order of
``problem.params`` (the layout of Hessian eigenvectors: ``EigsResult.eigenvectors`` is
``[P, k]``, so pass its transpose). Unselected parameters and buffers never move.

Random directions follow Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"
(NeurIPS), and their reference implementation (``net_plotter.py`` of
tomgoldstein/loss-landscape): a Gaussian direction is rescaled

* ``filter``: per filter, ``d[i] ← d[i] · ‖θ[i]‖ / (‖d[i]‖ + 1e-10)``, where a filter is a slice
  along the first dimension (an output channel ``d[i]`` of a conv weight ``(out, in, kh, kw)``,
  a row of a linear weight ``(out, in)``, an embedding row);
* ``layer``: per parameter tensor, ``d ← d · ‖θ‖ / ‖d‖``;
* ``none``: left as drawn.

Parameters with at most one dimension (biases, BatchNorm and LayerNorm weights and biases,
scalars) follow the reference convention in ``filter`` and ``layer`` mode: with
``ignore="bias-bn"`` the direction is zero there (they stay at θ); without it the direction
*is* the parameter (``d ← θ``, so a step α scales them by ``1 + α``). In ``none`` mode
``ignore="bias-bn"`` zeroes them too, and they are otherwise left as drawn.

Cost: one forward pass over the data per grid point (plus one for the centre). Several points
share one forward: their parameter sets are stacked and the model is called once through
``torch.func.functional_call`` under ``torch.vmap``. Models that ``vmap`` cannot batch (data-
dependent control flow, ``.item()``, in-place updates of running statistics) fall back to one
point at a time; the numbers are the same up to rounding. The model is never changed.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from hesscli.algorithms.sampling import check_generator
from hesscli.errors import HesscliError, InputError
from hesscli.loading.loss import accuracy_fn
from hesscli.loading.problem import Problem
from hesscli.operators.empirical import differentiable_kernels
from hesscli.results.records import LandscapeResult

__all__ = [
    "NORMALIZE",
    "IGNORE",
    "DIRECTION_KINDS",
    "LandscapeResult",
    "random_directions",
    "normalize_direction",
    "grid",
    "evaluate_grid",
]

logger = logging.getLogger(__name__)

NORMALIZE = ("filter", "layer", "none")
"""Direction normalisations: per filter (Li et al. 2018), per parameter tensor, or none."""

IGNORE = ("bias-bn",)
"""``ignore=`` values: ``bias-bn`` sets the direction to zero on parameters with at most one dimension."""

DIRECTION_KINDS = ("eigs", "random", "given")
"""Where directions come from: Hessian eigenvectors, seeded random draws, or the caller."""

FILTER_EPS = 1e-10
"""Added to each filter norm of the direction in ``filter`` mode, as in the reference implementation."""

DEFAULT_CHUNK = 16
"""Grid points per vmapped forward when ``chunk`` is not given ..."""

CHUNK_BYTES = 1 << 30
"""... fewer when the stacked parameter copies of 16 points would exceed 1 GiB. Out-of-memory errors
halve the chunk and retry it."""

Reduce = Callable[[Tensor], Tensor]
ParamsLike = Mapping[str, Tensor] | Sequence[Tensor] | Sequence[Sequence[int]]

_IGNORE_ALIASES = {"biasbn": "bias-bn", "bias_bn": "bias-bn"}


# ----------------------------------------------------------------------------- directions


def _check_mode(mode: str, ignore: str | None) -> tuple[str, str | None]:
    if mode not in NORMALIZE:
        raise InputError(f"normalize={mode!r}: unknown normalisation; use one of {', '.join(NORMALIZE)}")
    if ignore is not None:
        ignore = _IGNORE_ALIASES.get(ignore, ignore)
        if ignore not in IGNORE:
            raise InputError(f"ignore={ignore!r}: unknown; use {' or '.join(IGNORE)} or leave it unset")
    return mode, ignore


def _param_list(params: ParamsLike, names: Sequence[str] | None) -> tuple[list[str], list[Tensor | None],
                                                                         list[torch.Size]]:
    """Names, tensors (``None`` for bare shapes) and shapes of ``params``."""
    if isinstance(params, Mapping):
        keys = [str(k) for k in params]
        if names is not None and list(names) != keys:
            raise InputError("names: given together with a mapping of parameters, they must be its keys in order")
        names = keys
        items: list[Any] = list(params.values())
    else:
        items = list(params)
    is_tensor = [isinstance(t, Tensor) for t in items]
    if any(is_tensor) and not all(is_tensor):
        raise InputError("params: pass either parameter tensors or shapes, not a mixture")
    tensors: list[Tensor | None] = [t if isinstance(t, Tensor) else None for t in items]
    shapes = [t.shape if isinstance(t, Tensor) else torch.Size(t) for t in items]
    if names is None:
        names = [f"param[{i}]" for i in range(len(shapes))]
    elif len(names) != len(shapes):
        raise InputError(f"names: {len(names)} names for {len(shapes)} parameters")
    return list(names), tensors, shapes


def _normalize_piece(d: Tensor, w: Tensor | None, mode: str, ignore: str | None, name: str) -> Tensor:
    """Normalise one parameter tensor's slice ``d`` of a direction against the weights ``w`` (float64, CPU)."""
    if d.dim() <= 1:
        if ignore == "bias-bn":
            return torch.zeros_like(d)
        if mode == "none":
            return d
        if w is None:
            raise InputError(f"normalize={mode}: {name} needs the parameter values, not only its shape")
        return w.clone()
    if mode == "none":
        return d
    if w is None:
        raise InputError(f"normalize={mode}: {name} needs the parameter values, not only its shape")
    if mode == "filter":
        d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = w_norm / (d_norm + FILTER_EPS)
        return d * scale.reshape(-1, *([1] * (d.dim() - 1)))
    return d * (w.norm() / d.norm())


def normalize_direction(direction: Tensor, params: ParamsLike, names: Sequence[str] | None = None,
                        mode: str = "filter", ignore: str | None = None) -> Tensor:
    """Rescale a flat direction against the parameters it moves (see the module docstring).

    The arithmetic is done in float64 on the CPU, one parameter tensor at a time, so the result
    does not depend on the device, and is cast back to the direction's dtype and device.

    Args:
        direction: ``[P]`` flat direction over ``params``, in their order.
        params: the parameters (``problem.params``, a mapping ``name -> tensor``, or a sequence of
            tensors); bare shapes only with ``mode="none"``.
        names: parameter names for messages (taken from ``params`` when it is a mapping).
        mode: ``filter`` | ``layer`` | ``none``.
        ignore: ``"bias-bn"`` to zero the direction on parameters with at most one dimension;
            ``None`` keeps them (they then follow ``θ``, see the module docstring).

    Returns:
        A new ``[P]`` tensor with the dtype and device of ``direction``.

    Raises:
        InputError: an unknown mode or ``ignore``, or a direction whose length is not the
            parameters' total size.

    Example:
        >>> w = {"fc.weight": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "fc.bias": torch.tensor([1.0, -2.0])}
        >>> d = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 5.0])
        >>> normalize_direction(d, w, mode="filter", ignore="bias-bn").tolist()
        [5.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    """
    mode, ignore = _check_mode(mode, ignore)
    names_, tensors, shapes = _param_list(params, names)
    numels = [math.prod(s) for s in shapes]
    if direction.dim() != 1 or direction.numel() != sum(numels):
        raise InputError(f"direction: expected a flat vector of {sum(numels)} entries (the selected parameters), "
                         f"got shape {list(direction.shape)}")
    pieces = []
    for piece, w, shape, name in zip(direction.split(numels), tensors, shapes, names_):
        d = piece.detach().to("cpu", torch.float64).reshape(shape)
        w64 = w.detach().to("cpu", torch.float64) if w is not None else None
        pieces.append(_normalize_piece(d, w64, mode, ignore, name).reshape(-1))
    return torch.cat(pieces).to(dtype=direction.dtype, device=direction.device) if pieces else direction.clone()


def random_directions(params: ParamsLike, n: int, generator: torch.Generator, *, normalize: str = "filter",
                      ignore: str | None = None, names: Sequence[str] | None = None,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[Tensor]:
    """``n`` seeded Gaussian directions over ``params``, normalised (see the module docstring).

    Every entry is drawn in float64 on the CPU from ``generator``, direction after direction and,
    within a direction, parameter tensor after parameter tensor in the given order; normalised
    in float64 on the CPU; then cast to the parameters' dtype and moved to their device. The
    same seed therefore gives the same directions on every checkpoint whose selected parameters
    have the same shapes, on every device, and the first direction of ``n = 2`` is the direction
    of ``n = 1``.

    Args:
        params: the parameters to move (``problem.params``, or a sequence of tensors), or their
            shapes (only with ``normalize="none"``).
        n: number of directions (1 for a line, 2 for a plane).
        generator: a seeded CPU ``torch.Generator`` (advanced by ``n · P`` draws).
        normalize: ``filter`` | ``layer`` | ``none``.
        ignore: ``"bias-bn"`` or ``None``.
        names: parameter names for messages (taken from ``params`` when it is a mapping).
        dtype, device: of the result; default the first parameter's (float32/CPU for shapes).

    Returns:
        A list of ``n`` flat ``[P]`` tensors (stack them for :func:`evaluate_grid`).

    Raises:
        InputError: a non-CPU generator, ``n < 1``, an unknown mode, or shapes with a mode that
            needs the parameter values.

    Example:
        >>> w = {"w": torch.ones(3, 2), "b": torch.zeros(3)}
        >>> d1 = random_directions(w, 1, torch.Generator().manual_seed(0), ignore="bias-bn")[0]
        >>> d2 = random_directions(w, 2, torch.Generator().manual_seed(0), ignore="bias-bn")[0]
        >>> torch.equal(d1, d2), d1[6:].tolist()
        (True, [0.0, 0.0, 0.0])
    """
    check_generator(generator)
    normalize, ignore = _check_mode(normalize, ignore)
    if n < 1:
        raise InputError(f"random_directions: n must be at least 1, got {n}")
    names_, tensors, shapes = _param_list(params, names)
    first = next((t for t in tensors if t is not None), None)
    out_dtype = dtype or (first.dtype if first is not None else torch.get_default_dtype())
    out_device = torch.device(device) if device is not None else (first.device if first is not None else
                                                                    torch.device("cpu"))
    directions = []
    for _ in range(n):
        pieces = []
        for w, shape, name in zip(tensors, shapes, names_):
            d = torch.randn(shape, generator=generator, dtype=torch.float64)
            w64 = w.detach().to("cpu", torch.float64) if w is not None else None
            pieces.append(_normalize_piece(d, w64, normalize, ignore, name).reshape(-1))
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)
        directions.append(flat.to(dtype=out_dtype, device=out_device))
    return directions


def grid(span: float, steps: int, dims: int = 1) -> tuple[Tensor, Tensor | None]:
    """Step sizes ``torch.linspace(-span, span, steps)`` (float64) for each axis.

    An odd ``steps`` puts the centre (``0``) on the grid.

    Args:
        span: half-width of the grid (positive, finite).
        steps: points per axis (at least 2).
        dims: 1 (``alphas`` only) or 2 (``alphas`` and ``betas``, equal).

    Returns:
        ``(alphas, betas)``; ``betas`` is ``None`` when ``dims == 1``.

    Raises:
        InputError: a non-positive span, fewer than 2 steps, or dims other than 1 and 2.

    Example:
        >>> alphas, betas = grid(1.0, 5)
        >>> alphas.tolist(), betas
        ([-1.0, -0.5, 0.0, 0.5, 1.0], None)
    """
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise InputError(f"span must be a positive number, got {span!r}")
    if int(steps) != steps or steps < 2:
        raise InputError(f"steps must be an integer of at least 2, got {steps!r}")
    if dims not in (1, 2):
        raise InputError(f"dims must be 1 or 2, got {dims!r}")
    alphas = torch.linspace(-float(span), float(span), int(steps), dtype=torch.float64)
    return alphas, (alphas.clone() if dims == 2 else None)


# ----------------------------------------------------------------------------- evaluation


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return "out of memory" in text or "can't allocate memory" in text


class _Evaluator:
    """Sums ``w_b · loss_b`` (and ``w_b · accuracy_b``) of parameter points over the local batches."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.model = problem.model
        self.call = problem.call
        self.loss_fn = problem.loss.fn
        self.acc_fn = accuracy_fn(problem.loss)
        self.names = list(problem.params)
        params = [problem.params[k].detach() for k in self.names]
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.theta = (torch.cat([p.reshape(-1) for p in params]) if params
                      else torch.zeros(0, dtype=problem.dtype, device=problem.device))
        data = problem.data
        self.batches = data.batches
        self.weights = (list(data.weights) if len(data.weights) == len(data.batches)
                        else [len(y) / data.n_total for _, y in data.batches])
        self.scripted = isinstance(self.model, torch.jit.ScriptModule)
        self.vmap_ok = not self.scripted
        self._copy: Any = None
        if not self.scripted:
            selected = set(self.names)
            self.fixed = {k: p.detach() for k, p in self.model.named_parameters() if k not in selected}
            self.fixed.update(dict(self.model.named_buffers()))

    def points(self, coefs: Tensor, directions: Tensor) -> list[Tensor]:
        """Per-parameter ``[c, *shape]`` values of ``θ + Σ_j coefs[:, j] · d_j`` (the same arithmetic on
        every path, so the vmapped and looped evaluations see identical points)."""
        c = coefs.shape[0]
        flat = self.theta.unsqueeze(0).repeat(c, 1)
        for j in range(directions.shape[0]):
            col = coefs[:, j].to(dtype=flat.dtype, device=flat.device).unsqueeze(1)
            flat.add_(col * directions[j].unsqueeze(0))
        return [part.reshape(c, *s) for part, s in zip(flat.split(self.numels, dim=1), self.shapes)]

    def _measure(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = self.loss_fn(out, y)
        acc = self.acc_fn(out, y) if self.acc_fn is not None else torch.zeros((), dtype=torch.float64)
        return loss, acc

    def sums_vmap(self, parts: list[Tensor]) -> tuple[Tensor, Tensor]:
        c = parts[0].shape[0] if parts else 1
        loss_sum = torch.zeros(c, dtype=torch.float64, device=self.theta.device)
        acc_sum = torch.zeros(c, dtype=torch.float64, device=self.theta.device)
        for (x, y), w in zip(self.batches, self.weights):
            def f(*ps: Tensor, x: Any = x, y: Tensor = y) -> tuple[Tensor, Tensor]:
                out = self.call.functional(self.model, {**self.fixed, **dict(zip(self.names, ps))}, x)
                return self._measure(out, y)

            with differentiable_kernels():
                loss, acc = vmap(f)(*parts)
            loss_sum += w * loss.to(torch.float64)
            acc_sum += w * acc.to(device=acc_sum.device, dtype=torch.float64)
        return loss_sum, acc_sum

    def sums_one(self, values: list[Tensor]) -> tuple[Tensor, Tensor]:
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.theta.device)
        acc_sum = torch.zeros((), dtype=torch.float64, device=self.theta.device)
        if self.scripted:
            model = self._scripted_copy()
            own = dict(model.named_parameters())
            for k, v in zip(self.names, values):
                own[k].copy_(v)
        for (x, y), w in zip(self.batches, self.weights):
            if self.scripted:
                out = self.call(model, x)
            else:
                out = self.call.functional(self.model, {**self.fixed, **dict(zip(self.names, values))}, x)
            loss, acc = self._measure(out, y)
            loss_sum += w * loss.to(torch.float64)
            acc_sum += w * acc.to(device=acc_sum.device, dtype=torch.float64)
        return loss_sum, acc_sum

    def _scripted_copy(self) -> Any:
        """TorchScript modules refuse ``functional_call``: their points are set on a private copy."""
        if self._copy is None:
            self._copy = copy.deepcopy(self.model)
        return self._copy


def _as_directions(directions: Tensor | Sequence[Tensor], problem: Problem) -> Tensor:
    if isinstance(directions, Tensor):
        d = directions.unsqueeze(0) if directions.dim() == 1 else directions
    else:
        items = list(directions)
        if not items:
            raise InputError("directions: need at least one direction")
        d = torch.stack([torch.as_tensor(v).reshape(-1) for v in items])
    if d.dim() != 2 or d.shape[0] < 1 or d.shape[1] != problem.n_params:
        raise InputError(f"directions: expected [k, {problem.n_params}] (flat vectors over the selected parameters), "
                         f"got shape {list(d.shape)}")
    d = d.detach().to(dtype=problem.dtype, device=problem.device)
    if not bool(torch.isfinite(d).all()):
        raise InputError("directions: some entries are not finite")
    return d


def _as_steps(values: Tensor | Sequence[float], what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().to("cpu").reshape(-1)
    if t.numel() < 1 or not bool(torch.isfinite(t).all()):
        raise InputError(f"{what}: need at least one finite step size")
    return t


@torch.no_grad()
def evaluate_grid(problem: Problem, directions: Tensor | Sequence[Tensor], alphas: Tensor | Sequence[float],
                  betas: Tensor | Sequence[float] | None = None, *, reduce: Reduce | None = None,
                  on_progress: Callable[[int], None] | None = None, chunk: int | None = None,
                  direction_kind: str = "given", normalize: str = "none",
                  eigenvalues: Sequence[float] | None = None) -> LandscapeResult:
    """Mean loss (and accuracy) at every point of a grid around the problem's parameters.

    1-D (``betas`` is ``None``): each of the ``k`` directions is walked on its own,
    ``θ + α·d_i`` for every ``α`` in ``alphas``. 2-D: exactly two directions,
    ``θ + α·d₁ + β·d₂`` for every pair. The centre θ is evaluated too (``center_loss``).
    Each point costs one forward pass over the data; up to ``chunk`` points share one vmapped
    forward (stacked parameter sets through ``torch.func.functional_call``), the rest is summed
    in float64 like :func:`hesscli.api.loss_value`. The model, its parameters and buffers are not
    changed (TorchScript modules, which ``functional_call`` refuses, are evaluated on a private
    copy, one point at a time).

    Args:
        problem: model (eval mode), data, loss and selected parameters.
        directions: ``[k, P]`` tensor (or ``k`` flat ``[P]`` vectors, or one ``[P]`` vector) over
            the selected parameters in ``problem.params`` order; ``k == 2`` in 2-D.
        alphas: step sizes along the first direction (each direction in 1-D); see :func:`grid`.
        betas: step sizes along the second direction, or ``None`` for 1-D.
        reduce: all-reduce (sum) for torch.distributed data parallelism: each rank holds a shard
            of the batches with weights over the global count; it is called once, on the
            concatenated local float64 sums, and must return the sums over all ranks.
        on_progress: called with the running number of points evaluated (the centre included),
            which ends at ``n_forward``.
        chunk: most points per vmapped forward; ``1`` evaluates one point at a time without
            ``vmap``; ``None`` picks ``DEFAULT_CHUNK`` (fewer for models with over
            ``CHUNK_BYTES / 16`` bytes of parameters). A chunk that runs out of memory is halved
            and retried; one that ``vmap`` cannot batch is retried point by point, and so is
            every later chunk.
        direction_kind: recorded in the result: ``eigs`` | ``random`` | ``given``.
        normalize: recorded in the result: the normalisation the directions went through.
        eigenvalues: recorded in the result: the eigenvalue of each direction (``eigs``).

    Returns:
        The :class:`LandscapeResult` (grids on the CPU, float64).

    Raises:
        InputError: directions that do not fit the parameters, a 2-D grid without exactly two
            directions, empty or non-finite step sizes, a bad ``chunk`` or ``direction_kind``,
            or eigenvalues that do not match the directions.
    """
    d = _as_directions(directions, problem)
    k = d.shape[0]
    a = _as_steps(alphas, "alphas")
    b = _as_steps(betas, "betas") if betas is not None else None
    if b is not None and k != 2:
        raise InputError(f"a 2-D grid needs exactly 2 directions, got {k}")
    if direction_kind not in DIRECTION_KINDS:
        raise InputError(f"direction_kind={direction_kind!r}: use one of {', '.join(DIRECTION_KINDS)}")
    if normalize not in NORMALIZE:
        raise InputError(f"normalize={normalize!r}: use one of {', '.join(NORMALIZE)}")
    eigs = tuple(float(v) for v in eigenvalues) if eigenvalues is not None else None
    if eigs is not None and len(eigs) != k:
        raise InputError(f"eigenvalues: {len(eigs)} values for {k} directions")
    if chunk is not None and (int(chunk) != chunk or chunk < 1):
        raise InputError(f"chunk must be a positive integer, got {chunk!r}")

    # Coefficients of every point: the centre first, then the grid in row-major order.
    if b is None:
        coefs = torch.zeros(1 + k * a.numel(), k, dtype=torch.float64)
        for i in range(k):
            coefs[1 + i * a.numel(): 1 + (i + 1) * a.numel(), i] = a
    else:
        aa, bb = torch.meshgrid(a, b, indexing="ij")
        coefs = torch.cat([torch.zeros(1, 2, dtype=torch.float64),
                           torch.stack([aa.reshape(-1), bb.reshape(-1)], dim=1)])
    n_points = coefs.shape[0]

    ev = _Evaluator(problem)
    if chunk is None:
        per_point = max(1, problem.n_params * ev.theta.element_size())
        chunk = max(1, min(DEFAULT_CHUNK, CHUNK_BYTES // per_point))
    size = int(chunk)
    loss_sums = torch.zeros(n_points, dtype=torch.float64, device=ev.theta.device)
    acc_sums = torch.zeros(n_points, dtype=torch.float64, device=ev.theta.device)
    done = 0
    while done < n_points:
        c = min(size, n_points - done)
        parts = ev.points(coefs[done: done + c], d)
        if c > 1 and ev.vmap_ok:
            try:
                ls, acs = ev.sums_vmap(parts)
            except HesscliError:
                raise
            except (RuntimeError, NotImplementedError) as e:
                del parts
                if _is_oom(e):
                    size = max(1, c // 2)
                    logger.info("landscape: %d points per forward ran out of memory; trying %d", c, size)
                    continue
                logger.info("landscape: torch.vmap cannot batch this model (%s); evaluating one point at a time",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                ev.vmap_ok = False
                continue
            loss_sums[done: done + c] = ls
            acc_sums[done: done + c] = acs
            done += c
            if on_progress is not None:
                on_progress(done)
            continue
        for r in range(c):
            ls, acs = ev.sums_one([p[r] for p in parts])
            loss_sums[done] = ls
            acc_sums[done] = acs
            done += 1
            if on_progress is not None:
                on_progress(done)

    both = torch.cat([loss_sums, acc_sums])
    if reduce is not None:
        both = reduce(both)
    both = both.to("cpu", torch.float64)
    loss_all, acc_all = both[:n_points], both[n_points:]
    shape = (k, a.numel()) if b is None else (a.numel(), b.numel())
    has_acc = ev.acc_fn is not None
    return LandscapeResult(
        alphas=a,
        betas=b,
        loss=loss_all[1:].reshape(shape).clone(),
        accuracy=acc_all[1:].reshape(shape).clone() if has_acc else None,
        direction_kind=direction_kind,
        normalize=normalize,
        eigenvalues=eigs,
        directions=d,
        n_forward=n_points,
        center_loss=float(loss_all[0]),
        center_accuracy=float(acc_all[0]) if has_acc else None,
    )
