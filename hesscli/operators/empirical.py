"""Curvature of the mean loss over a whole dataset: Hessian and GGN products.

The analysed function is always

.. math:: L(\\theta) = \\sum_b \\frac{n_b}{N} \\ell_b(\\theta),

where :math:`\\ell_b` is the batch-mean loss of batch :math:`b` over its :math:`n_b` loss terms
(samples, or non-ignored tokens for token losses such as ``causal_lm``) and :math:`N` the number
of terms over all batches (and all processes under torch.distributed), so results do not depend
on the batch size and a ragged last batch (or one with more padding) gets its true weight.

Two product paths sit behind one interface (DESIGN.md):

* ``func``: forward-over-reverse with ``torch.func`` (``jvp(grad(f))``), ``vmap``-ed over the
  columns of a block, so a block of ``k`` vectors costs one pass over the data;
* ``autograd``: double backward (``autograd.grad(..., create_graph=True)``), one vector at a time.
  It serves TorchScript modules (``functional_call`` refuses them) and models whose operators
  have no forward-mode AD; when the dataset has few batches, the gradient graph is built once and
  reused for every product, which makes single-vector products (Lanczos) about one backward pass.

``hvp="auto"`` picks per model and device:

* Hessian products on the CPU with a cached gradient graph use ``autograd`` for every block. That
  is a documented rule, from measurements: there a product is one backward pass over the cached
  graph (1.3-2.2x a gradient on the benchmark workloads), while a ``vmap``-ed block of ``jvp(grad)``
  is at best on par per vector on small MLPs and 1.5-3x slower on CNNs and attention (the CPU is
  memory-bound), and it holds a copy of the activations per column (a 16-column block of a
  2,410-parameter MLP on 1,797 samples took 90 MB where the cached graph takes 6 MB).
* Everywhere else (GPUs, where one vector leaves the device idle; many batches, where the graph
  is not cached; GGN products) it measures instead of guessing: single vectors (and blocks of
  fewer than ``MIN_TUNE_BLOCK`` columns) use ``autograd``; the first larger block is split in two
  halves, one computed on each path with a timer, and the path with the lower time per vector
  serves every later block. No product is wasted on the measurement. If ``func`` fails on the
  model (an op without forward-mode AD), ``autograd`` is used for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from hesscli.errors import AnalysisError
from hesscli.loading.problem import Problem
from hesscli.memory import free_memory, is_out_of_memory
from hesscli.operators.base import CurvatureOperator

logger = logging.getLogger(__name__)

Reduce = Callable[[Tensor], Tensor]


def _is_scripted(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


@contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Kernels that support forward-mode AD and double backward, for the duration of a product.

    Fused attention kernels (flash / memory-efficient SDPA) and the ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` inference fast path have neither forward-mode AD nor double
    backward (the fast path even returns wrong derivatives under ``torch.func``); the math
    kernel is plain matmul + softmax and has both.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


MIN_TUNE_BLOCK = 4
"""Blocks smaller than this go through double backward without measuring."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EmpiricalRiskOperator(CurvatureOperator):
    """Shared machinery: parameter flattening, batch weighting, product-path selection.

    Args:
        problem: the loaded problem (model in eval mode, selected parameters, batches).
        hvp: ``auto`` | ``func`` | ``autograd`` (see module docstring).
        block_size: columns per vmapped call on the ``func`` path (bounds memory).
        reduce: called on each local product sum (e.g. an all-reduce under torch.distributed).
        cache_graph: ``auto`` caches gradient graphs when the dataset has at most
            ``max_cached_batches`` batches; ``True``/``False`` force it.

    Attributes:
        max_columns: most columns per product; a wider block is multiplied in consecutive parts
            (``None``: no limit). Set from a memory budget, and lowered when a product runs out
            of memory (see :meth:`_product`; ``oom_columns`` and ``oom_chunk`` keep what the
            retries set).
        chunk: samples per data chunk; batches are split into chunks of at most this many
            samples, each weighted by its share of the loss terms (``None``: the batches as
            loaded). Set with :meth:`set_chunk`.
    """


    def __init__(
        self,
        problem: Problem,
        *,
        hvp: str = "auto",
        block_size: int = 16,
        reduce: Reduce | None = None,
        cache_graph: bool | str = "auto",
        max_cached_batches: int = 4,
    ) -> None:
        if hvp not in ("auto", "func", "autograd"):
            raise ValueError(f"hvp must be auto, func or autograd, got {hvp!r}")
        self.problem = problem
        self.model = problem.model
        self.names = list(problem.params)
        self.params = [problem.params[n] for n in self.names]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        groups, start = {}, 0
        for name, numel in zip(self.names, self.numels):
            groups[name] = slice(start, start + numel)
            start += numel
        super().__init__(start, problem.dtype, problem.device, groups)
        self.block_size = max(1, int(block_size))
        self.reduce = reduce
        self.scripted = _is_scripted(self.model)
        self.hvp = "autograd" if self.scripted else hvp
        n_batches = len(problem.data.batches)
        self.cache_graph = (n_batches <= max_cached_batches) if cache_graph == "auto" else bool(cache_graph)
        self._graphs: list[tuple[Tensor, ...]] | None = None
        self._func_failed = False
        self.max_columns: int | None = None  # wider blocks are multiplied in parts of this many columns
        self.chunk: int | None = None  # samples per data chunk (None: the batches as loaded)
        self.oom_columns: int | None = None  # the limits an out-of-memory retry set (kept for later products)
        self.oom_chunk: int | None = None
        self._batches: list[tuple[Any, Tensor]] = list(problem.data.batches)
        self.block_path: str | None = None  # chosen by measurement in auto mode
        self.tuning: dict[str, float] = {}  # seconds per vector measured on each path
        self.n_total = problem.data.n_total
        data = problem.data
        self._weights = ({id(y): w for (_, y), w in zip(data.batches, data.weights)}
                         if len(data.weights) == len(data.batches) else {})
        if not self.scripted:
            selected = set(self.names)
            self._fixed = {n: p.detach() for n, p in self.model.named_parameters() if n not in selected}
            self._fixed.update({n: b for n, b in self.model.named_buffers()})

    # ------------------------------------------------------------------ helpers
    def _weight(self, targets: Tensor) -> float:
        """The batch's weight in the dataset mean (set when the problem was built; samples otherwise)."""
        w = self._weights.get(id(targets))
        return w if w is not None else targets.shape[0] / self.n_total

    def _split(self, V: Tensor) -> list[Tensor]:
        """``[P, k]`` -> per-parameter ``[k, *shape]`` views."""
        k = V.shape[1]
        return [c.T.reshape(k, *s) for c, s in zip(V.split(self.numels, dim=0), self.shapes)]

    def _flat(self, parts: list[Tensor], k: int) -> Tensor:
        """per-parameter ``[k, *shape]`` -> ``[P, k]``."""
        return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T

    def _model_fn(self, x: Any) -> Callable[..., Tensor]:
        names, fixed, model, call = self.names, self._fixed, self.model, self.problem.call

        def f(*params: Tensor) -> Tensor:
            return call.functional(model, {**fixed, **dict(zip(names, params))}, x)

        return f

    def _finish(self, out: Tensor) -> Tensor:
        return self.reduce(out) if self.reduce is not None else out

    def path_for(self, k: int) -> str:
        """The product path used for a block of ``k`` columns."""
        if self.hvp != "auto":
            return self.hvp
        if self._func_failed or k < MIN_TUNE_BLOCK or self._autograd_by_rule():
            return "autograd"
        return self.block_path or "tune"

    @property
    def batches(self) -> list[tuple[Any, Tensor]]:
        """The ``(inputs, targets)`` chunks a product passes over (the batches, split by :attr:`chunk`)."""
        return self._batches

    def set_chunk(self, chunk: int | None) -> None:
        """Pass over the data in chunks of at most ``chunk`` samples (``None``: the batches as loaded).

        Each chunk of a batch gets the batch's weight times its share of the batch's loss terms
        (samples, or counted tokens), so the analysed function is unchanged; only the order of the
        sums changes. A chunk without a loss term (every token ignored) is left out. Cached
        gradient graphs are dropped (they belong to the old chunks).
        """
        self.chunk = None if chunk is None else max(1, int(chunk))
        self._graphs = None
        batches = self.problem.data.batches
        if self.chunk is None:
            self._batches = list(batches)
            return
        count = self.problem.loss.count
        out: list[tuple[Any, Tensor]] = []
        for x, y in batches:
            size = y.shape[0]
            if size <= self.chunk:
                out.append((x, y))
                continue
            w = self._weight(y)
            terms = float(count(y)) if count is not None else float(size)
            for start in range(0, size, self.chunk):
                xs, ys = _take(x, slice(start, start + self.chunk)), y[start:start + self.chunk]
                if self._weights:  # else the weight falls back to the samples' share, which is right
                    part = float(count(ys)) if count is not None else float(ys.shape[0])
                    if part == 0:  # no loss term (every token ignored): nothing to add, and its mean is 0/0
                        continue
                    self._weights[id(ys)] = w * part / terms
                out.append((xs, ys))
        self._batches = out

    def _matmat(self, V: Tensor) -> Tensor:
        with differentiable_kernels():
            return self._product(V)

    def _product(self, V: Tensor) -> Tensor:
        """``A @ V`` in parts of at most :attr:`max_columns` columns, retried on half when out of memory.

        When a product raises an out-of-memory error, what can be freed is freed and the block is
        multiplied as two halves (and :attr:`max_columns` is lowered so that later blocks do not
        fail again), down to one column; a single column that does not fit is retried on half the
        data chunk, down to one sample. The same columns are multiplied, so the result is the
        same up to the rounding of the split sums, and :attr:`n_matvecs` counts each column once
        (it is counted by :meth:`matmat`, after this returns).

        Raises:
            AnalysisError: when one column on one sample does not fit, under torch.distributed
                (every process must multiply the same blocks) or with per-batch BatchNorm
                statistics when the batch would have to be split.
        """
        k = V.shape[1]
        cap = self.max_columns
        if cap is not None and k > cap:
            return torch.cat([self._product(V[:, c:c + cap]) for c in range(0, k, cap)], dim=1)
        try:
            return self._matmat_any(V)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        free_memory(self.device)  # outside the handler: the failed attempt's frames are gone
        return self._retry(V, reason)

    def _retry(self, V: Tensor, reason: str) -> Tensor:
        k = V.shape[1]
        fix = "set --max-memory below the free memory or lower --batch-size"
        if self.reduce is not None:
            raise AnalysisError(
                f"out of memory in a product of {k} column(s) ({reason}); under torch.distributed every process "
                f"must multiply the same blocks, so it is not retried on a smaller one: {fix}")
        if k > 1:
            half = (k + 1) // 2
            self.max_columns = self.oom_columns = half
            logger.info("out of memory multiplying %d columns (%s): retrying as blocks of at most %d", k, reason, half)
            return self._product(V)
        sizes = [y.shape[0] for _, y in self._batches]
        current = max(sizes) if sizes else 1
        if current <= 1:
            raise AnalysisError(
                f"out of memory multiplying one column on one sample ({reason}); {fix}, or use fewer parameters "
                f"(--params) or a smaller --dtype")
        if self.problem.checkpoint.metadata.get("batchnorm") == "batch":
            raise AnalysisError(
                f"out of memory multiplying one column on a batch of {current} samples ({reason}); --batchnorm batch "
                f"cannot split a batch (its statistics would change): {fix}")
        chunk = (current + 1) // 2
        self.cache_graph = False  # cached graphs hold every chunk at once: splitting would not help
        self.set_chunk(chunk)
        self.oom_chunk = chunk
        self.max_columns = self.oom_columns = 1
        logger.info("out of memory multiplying one column on %d samples (%s): retrying on chunks of %d samples",
                    current, reason, chunk)
        return self._product(V)

    def _matmat_any(self, V: Tensor) -> Tensor:
        path = self.path_for(V.shape[1])
        if path == "tune":
            return self._finish(self._matmat_tuning(V))
        if path == "func":
            try:
                return self._finish(self._matmat_func(V))
            except RuntimeError as e:  # e.g. an op without forward-mode AD
                if self.hvp == "func" or is_out_of_memory(e):
                    raise
                logger.info("torch.func products failed (%s); using double backward", e)
                self._func_failed = True
        return self._finish(self._matmat_autograd(V))

    def _timed(self, fn: Callable[[Tensor], Tensor], V: Tensor) -> tuple[Tensor, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn(V)
        _sync(self.device)
        return out, (time.perf_counter() - t0) / V.shape[1]

    def _matmat_tuning(self, V: Tensor) -> Tensor:
        """Compute a block half on each path, time both, keep the faster path for later blocks."""
        half = V.shape[1] // 2
        if self.cache_graph:  # build the reusable graph first so the timing reflects steady state
            self._prepare_autograd()
        out_a, t_a = self._timed(self._matmat_autograd, V[:, :half])
        try:
            out_f, t_f = self._timed(self._matmat_func, V[:, half:])
        except RuntimeError as e:
            if is_out_of_memory(e):
                raise
            logger.info("torch.func products failed (%s); using double backward", e)
            self._func_failed = True
            self.block_path = "autograd"
            return torch.cat([out_a, self._matmat_autograd(V[:, half:])], dim=1)
        self.tuning = {"autograd": t_a, "func": t_f}
        self.block_path = "func" if t_f < t_a else "autograd"
        logger.debug("product path for blocks: %s (%.3g s/vector autograd, %.3g s/vector func)",
                    self.block_path, t_a, t_f)
        return torch.cat([out_a, out_f], dim=1)

    def _prepare_autograd(self) -> None:
        """Hook: build cached graphs ahead of timing (Hessian path)."""

    def _autograd_by_rule(self) -> bool:
        """Whether ``auto`` uses double backward without measuring (see the module docstring)."""
        return False

    @property
    def one_column_at_a_time(self) -> bool:
        """Whether a block of ``k`` columns costs ``k`` separate products here: double backward over
        cached gradient graphs (the CPU Hessian path) multiplies column by column, so a larger block
        saves no work and only holds more memory."""
        return False

    def _matmat_func(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for start in range(0, V.shape[1], self.block_size):
            block = V[:, start : start + self.block_size]
            k = block.shape[1]
            acc = [torch.zeros(k, *s, dtype=self.dtype, device=self.device) for s in self.shapes]
            for x, y in self._batches:
                parts = self._func_batch(x, y, self._split(block))
                for a, p in zip(acc, parts):
                    a.add_(p)
            out[:, start : start + k] = self._flat(acc, k)
        return out

    def _matmat_autograd(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        tangents = self._split(V)
        acc = [torch.zeros(k, *s, dtype=self.dtype, device=self.device) for s in self.shapes]
        for i, (x, y) in enumerate(self._batches):
            self._autograd_batch(i, x, y, tangents, acc)
        return self._flat(acc, k)

    def _grad_of(self, outputs: tuple[Tensor, ...] | Tensor, inputs: list[Tensor], grad_outputs,
                 retain_graph: bool = True, create_graph: bool = False) -> list[Tensor]:
        gs = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph,
                                 create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs)]

    # ---------------------------------------------------------------- subclass hooks
    def _func_batch(self, x: Tensor, y: Tensor, tangents: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def _autograd_batch(self, i: int, x: Tensor, y: Tensor, tangents: list[Tensor], acc: list[Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ extras
    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Mean loss over the dataset and its flat gradient ``[P]`` (after ``reduce``)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        g = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        with torch.enable_grad(), differentiable_kernels():
            for x, y in self._batches:
                loss = self._weight(y) * self.problem.loss.fn(self.problem.output(x), y)
                gs = self._grad_of(loss, self.params, None, retain_graph=False)
                g += torch.cat([t.reshape(-1) for t in gs])
                loss_sum += loss.detach().to(torch.float64)
        both = self._finish(torch.cat([g.to(torch.float64), loss_sum.reshape(1)]))
        return float(both[-1]), both[:-1].to(self.dtype)


class HessianOperator(EmpiricalRiskOperator):
    """Products with the Hessian of the mean loss over the dataset (exact, symmetric, indefinite)."""


    def _func_batch(self, x: Tensor, y: Tensor, tangents: list[Tensor]) -> list[Tensor]:
        w = self._weight(y)
        model_fn = self._model_fn(x)
        loss_fn = self.problem.loss.fn
        primals = tuple(p.detach() for p in self.params)
        argnums = tuple(range(len(primals)))

        def f(*params: Tensor) -> Tensor:
            return w * loss_fn(model_fn(*params), y)

        g = grad(f, argnums=argnums)

        def hvp(*vs: Tensor) -> tuple[Tensor, ...]:
            return jvp(lambda *p: g(*p), primals, vs)[1]

        return list(vmap(hvp)(*tangents))

    def _autograd_by_rule(self) -> bool:
        return self.cache_graph and self.device.type == "cpu"

    @property
    def one_column_at_a_time(self) -> bool:
        return self.cache_graph and self.path_for(MIN_TUNE_BLOCK) == "autograd"

    def _prepare_autograd(self) -> None:
        for i, (x, y) in enumerate(self._batches):
            self._batch_grads(i, x, y)

    def _batch_grads(self, i: int, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        if self._graphs is not None and i < len(self._graphs):
            return self._graphs[i]
        with torch.enable_grad():
            loss = self._weight(y) * self.problem.loss.fn(self.problem.output(x), y)
            grads = tuple(self._grad_of(loss, self.params, None, create_graph=True))
        if self.cache_graph:
            if self._graphs is None:
                self._graphs = []
            if i == len(self._graphs):
                self._graphs.append(grads)
        return grads

    def _autograd_batch(self, i: int, x: Tensor, y: Tensor, tangents: list[Tensor], acc: list[Tensor]) -> None:
        grads = self._batch_grads(i, x, y)
        live = [j for j, g in enumerate(grads) if g.requires_grad]
        if not live:
            return
        k = tangents[0].shape[0]
        for c in range(k):
            hv = self._grad_of(tuple(grads[j] for j in live), self.params,
                               tuple(tangents[j][c] for j in live), retain_graph=True)
            for a, h in zip(acc, hv):
                a[c].add_(h)


class GGNOperator(EmpiricalRiskOperator):
    """Products with the generalised Gauss–Newton matrix :math:`\\sum_b w_b J_b^T H^{out}_b J_b`
    (exact; positive semi-definite for convex losses)."""


    def _func_batch(self, x: Tensor, y: Tensor, tangents: list[Tensor]) -> list[Tensor]:
        w = self._weight(y)
        model_fn = self._model_fn(x)
        loss_fn = self.problem.loss.fn
        primals = tuple(p.detach() for p in self.params)
        out, vjp_fn = cast(tuple[Tensor, Callable[..., tuple[Tensor, ...]]], vjp(model_fn, *primals))  # no aux
        out = out.detach()
        loss_grad = grad(lambda o: w * loss_fn(o, y))

        def ggnvp(*vs: Tensor) -> tuple[Tensor, ...]:
            jv = jvp(model_fn, primals, vs)[1]
            hjv = jvp(loss_grad, (out,), (jv,))[1]
            return vjp_fn(hjv)

        return list(vmap(ggnvp)(*tangents))

    def _autograd_batch(self, i: int, x: Tensor, y: Tensor, tangents: list[Tensor], acc: list[Tensor]) -> None:
        w = self._weight(y)
        with torch.enable_grad():
            out = self.problem.output(x)
            u = torch.zeros_like(out, requires_grad=True)
            jtu = self._grad_of(out, self.params, u, create_graph=True)
            o = out.detach().requires_grad_(True)
            gl = torch.autograd.grad(w * self.problem.loss.fn(o, y), o, create_graph=True)[0]
            k = tangents[0].shape[0]
            for c in range(k):
                live = [j for j, t in enumerate(jtu) if t.requires_grad]
                if not live:
                    return
                jv = torch.autograd.grad([jtu[j] for j in live], u, [tangents[j][c] for j in live],
                                         retain_graph=True)[0]
                hjv = torch.autograd.grad(gl, o, jv, retain_graph=True)[0]
                gv = self._grad_of(out, self.params, hjv, retain_graph=True)
                for a, h in zip(acc, gv):
                    a[c].add_(h)


def _take(inputs: Any, rows: slice) -> Any:
    """Rows ``rows`` of a batch's inputs (a tensor, or a dict of tensors)."""
    if isinstance(inputs, Mapping):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def make_operator(problem: Problem, curvature: str = "hessian", **kwargs) -> EmpiricalRiskOperator:
    """Build the curvature operator for ``--curvature hessian|ggn``."""
    if curvature == "hessian":
        return HessianOperator(problem, **kwargs)
    if curvature == "ggn":
        return GGNOperator(problem, **kwargs)
    raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
