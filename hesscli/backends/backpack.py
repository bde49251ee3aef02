"""BackPACK (Dangel, Kunstner & Hennig 2020, ICLR) behind ``--backend backpack``.

BackPACK extends the backward pass of supported layers to propagate second-order
information. ``DiagHessian`` gives the *exact* diagonal of the Hessian and
``DiagGGNExact`` the exact diagonal of the GGN, so ``trace --method exact`` is their sum,
with the trace of every parameter tensor for free. There are no products (``n_hvp`` is
0): the cost is one extended backward pass per batch.

What BackPACK needs, and what the adapter checks before any work:

* every operation between the parameters and the loss is an ``nn.Module`` BackPACK knows
  (it keeps each module's input and output; functions such as ``torch.tanh`` called in a
  ``forward`` are invisible to it). Custom container modules are converted with
  BackPACK's ``torch.fx`` converter; any function call left afterwards is refused;
* each layer class has a BackPACK extension (``DiagHessian`` has none for BatchNorm;
  ``DiagGGNExact`` has);
* each module runs once per forward and no parameter is shared between modules (the
  diagonal would miss the cross terms);
* the loss is ``cross_entropy``, ``mse`` or ``bce_with_logits``, reproduced by the
  matching ``torch.nn`` loss module (checked numerically on the first batch).

The model is deep-copied before ``extend`` (which registers hooks), so the user's model
is never modified.
"""

from __future__ import annotations

import importlib
import logging
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hesscli.backends.base import Capabilities
from hesscli.backends.peer import PeerBackend
from hesscli.errors import UnsupportedAnalysis
from hesscli.loading.problem import Problem
from hesscli.results.records import GroupTrace, TraceResult

if TYPE_CHECKING:  # pragma: no cover
    from hesscli.analyses.trace import TraceOptions

__all__ = ["BackpackBackend", "LOSS_MODULES"]

logger = logging.getLogger(__name__)

LOSS_MODULES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
"""hesscli loss name -> the ``torch.nn`` loss module BackPACK extends (mean reduction)."""

_EXTENSIONS = {"hessian": ("DiagHessian", "diag_h"), "ggn": ("DiagGGNExact", "diag_ggn_exact")}
"""curvature -> (BackPACK extension class, attribute it stores on each parameter)."""

_LIBRARY_ERRORS = (NotImplementedError, AssertionError, ValueError)
"""What BackPACK raises for an unsupported layer, loss setting or graph."""


class BackpackBackend(PeerBackend):
    """Exact Hessian or GGN trace from BackPACK's diagonal extensions.

    BackPACK is exact but only for supported layers: every operation must be a torch.nn
    module with a BackPACK extension (``DiagHessian`` has none for BatchNorm; use
    ``--curvature ggn``). It computes the diagonal, so only ``trace --method exact`` is
    available (with per-parameter traces). ``on_matvecs`` receives the number of batches
    done (BackPACK makes no products, one extended backward pass per batch).
    """

    name = "backpack"
    library = "backpack"
    capabilities = Capabilities(
        analyses={"trace": ("exact",)},
        curvatures=("hessian", "ggn"),
        whiches=(),
    )

    # ----------------------------------------------------------------- analyses

    def trace(self, problem: Problem, options: TraceOptions, generator: torch.Generator) -> TraceResult:
        """Exact trace: the sum of BackPACK's Hessian (or GGN) diagonal over the selected parameters.

        Batch ``b``'s diagonal (of its batch-mean loss) is weighted by ``n_b / N`` and
        accumulated in float64, so the result is the diagonal of the dataset-mean loss
        whatever the batch size. ``options`` and ``generator`` are unused (the method is
        ``exact``; nothing is random).

        Returns:
            :class:`TraceResult` with ``method="exact"``, ``stderr=0``, ``n_probes`` = the
            number of parameters, ``n_hvp=0`` and per-parameter traces (more than one
            parameter tensor).

        Raises:
            UnsupportedAnalysis: A loss, layer or model structure BackPACK cannot handle (the
                message names it and what to use).
        """
        diagonal = self.diagonal(problem)
        sums = {name: float(d.sum()) for name, d in diagonal.items()}
        total = sum(sums.values())
        groups: tuple[GroupTrace, ...] = ()
        if len(sums) > 1:
            groups = tuple(GroupTrace(name, v, 0.0, v, v) for name, v in sums.items())
        return TraceResult(estimate=total, stderr=0.0, ci_low=total, ci_high=total, n_probes=problem.n_params,
                           method="exact", n_hvp=0, groups=groups)

    def diagonal(self, problem: Problem) -> dict[str, Tensor]:
        """The exact curvature diagonal (``engine.curvature``) of the dataset-mean loss, per selected parameter.

        One forward and one extended backward pass per batch on a private copy of the model:
        ``hessian`` uses ``DiagHessian``, ``ggn`` ``DiagGGNExact``.

        Returns:
            ``name -> float64 tensor`` shaped like the parameter, in ``problem.params`` order.

        Raises:
            UnsupportedAnalysis: See :meth:`trace`.
        """
        bp = self.lib
        curvature = self.engine.curvature
        extensions = importlib.import_module("backpack.extensions")
        ext_name, savefield = _EXTENSIONS[curvature]
        extension = getattr(extensions, ext_name)()
        loss_module = self._loss_module(problem)
        batches = self.batches(problem)
        if isinstance(problem.model, torch.jit.ScriptModule):
            raise UnsupportedAnalysis(
                "--backend backpack cannot extend a TorchScript model (it hooks torch.nn modules); "
                "load the model from a state_dict with --model, or use --backend native"
            )

        model = self.private_model(problem)
        selected = set(problem.params)
        by_id = {id(p): name for name, p in model.named_parameters() if name in selected}
        _check_shared(model)
        model = self._prepare(model, extension, ext_name, curvature)
        bp.extend(loss_module)

        n_total = problem.data.n_total
        out: dict[str, Tensor] = {}
        params = [p for p in model.parameters() if id(p) in by_id]
        passes = self.counter()
        with warnings.catch_warnings(), torch.enable_grad():
            # BackPACK's full backward hooks fire on modules whose inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for i, (x, y) in enumerate(batches):
                outputs = model(x)
                targets = _targets(problem.loss.name, outputs, y)
                loss = loss_module(outputs, targets)
                if i == 0:
                    _check_loss(problem, loss_module, outputs, y, loss)
                try:
                    with bp.backpack(extension):
                        loss.backward()
                except _LIBRARY_ERRORS as e:
                    raise UnsupportedAnalysis(
                        f"--backend backpack: BackPACK {ext_name} failed on this model ({_one_line(e)}); "
                        "use --backend native"
                    ) from e
                w = y.shape[0] / n_total
                for p in params:
                    d = getattr(p, savefield, None)
                    if d is None:
                        raise UnsupportedAnalysis(
                            f"--backend backpack: BackPACK {ext_name} produced nothing for parameter "
                            f"{by_id[id(p)]!r} (is it used in the forward?); use --backend native"
                        )
                    name = by_id[id(p)]
                    out[name] = out.get(name, 0) + w * d.detach().to(torch.float64)
                    delattr(p, savefield)
                    p.grad = None
                passes.add()
        logger.debug("BackPACK %s: %d extended backward passes", ext_name, len(batches))
        missing = [n for n in problem.params if n not in out]
        if missing:
            raise UnsupportedAnalysis(
                f"--backend backpack: no {ext_name} for parameter(s) {', '.join(missing)}; use --backend native"
            )
        return {name: out[name] for name in problem.params}

    # ----------------------------------------------------------------- checks

    def _loss_module(self, problem: Problem) -> nn.Module:
        name = problem.loss.name
        if name not in LOSS_MODULES:
            raise UnsupportedAnalysis(
                f"--backend backpack cannot use --loss {name}; it supports: {', '.join(LOSS_MODULES)} "
                "(use --backend native for other losses)"
            )
        return LOSS_MODULES[name]()

    def _prepare(self, model: nn.Module, extension: Any, ext_name: str, curvature: str) -> nn.Module:
        """Check layer support and the graph, convert custom containers, and ``extend`` the copy."""
        bp = self.lib
        from backpack.utils.module_classification import is_no_op

        supported = _module_classes(extension)
        ggn_supported = _module_classes(importlib.import_module("backpack.extensions").DiagGGNExact())
        needs_converter = any(not is_no_op(m) and next(m.children(), None) is not None for m in model.modules())
        if needs_converter:
            _check_layers(model, supported, ggn_supported, ext_name, curvature)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the converter warns about the nodes we refuse below
                    model = bp.extend(model, use_converter=True)
            except Exception as e:  # torch.fx tracing fails on data-dependent control flow and more
                raise UnsupportedAnalysis(
                    f"--backend backpack could not convert {type(model).__name__} into BackPACK layers with "
                    f"torch.fx ({_one_line(e)}); use --backend native"
                ) from e
            _check_graph(model)
        _check_layers(model, supported, ggn_supported, ext_name, curvature)
        if not needs_converter:
            bp.extend(model)
        return model


def _module_classes(extension: Any) -> set[type] | None:
    """Layer classes an extension handles (BackPACK keeps them in a private mapping)."""
    mapping = getattr(extension, "_BackpropExtension__module_extensions", None)
    return set(mapping) if isinstance(mapping, dict) else None


def _check_layers(model: nn.Module, supported: set[type] | None, ggn_supported: set[type] | None,
                  ext_name: str, curvature: str) -> None:
    """Refuse leaf layers without a BackPACK extension (BackPACK matches the exact class)."""
    if supported is None:  # unknown BackPACK internals: let BackPACK itself report
        return
    from backpack.utils.module_classification import is_no_op

    for name, module in model.named_modules():
        if is_no_op(module) or next(module.children(), None) is not None:
            continue
        cls = type(module)
        if cls in supported:
            continue
        hint = "use --backend native"
        if curvature == "hessian" and ggn_supported is not None and cls in ggn_supported:
            hint = "use --curvature ggn (BackPACK's DiagGGNExact supports it) or --backend native"
        where = f" ('{name}')" if name else ""
        raise UnsupportedAnalysis(
            f"--backend backpack: {cls.__name__}{where} is not supported by BackPACK {ext_name}; {hint}"
        )


def _check_graph(model: nn.Module) -> None:
    """After conversion, every node must be a module call and each module must run once."""
    from backpack.custom_module.graph_utils import BackpackTracer

    graph = BackpackTracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
            continue
        raise UnsupportedAnalysis(
            f"--backend backpack: the forward uses {_describe(node)}, which BackPACK cannot follow (it only "
            "sees torch.nn modules); write it as a module (e.g. nn.Tanh(), nn.MaxPool2d(2)) or use --backend native"
        )
    repeated = sorted(t for t, c in calls.items() if c > 1)
    if repeated:
        raise UnsupportedAnalysis(
            f"--backend backpack: module(s) {', '.join(repeated)} run more than once per forward, which "
            "BackPACK's diagonal does not support; use --backend native"
        )


def _describe(node: Any) -> str:
    """A readable name for a non-module ``torch.fx`` node: ``torch.tanh``, ``Tensor.relu``, ..."""
    if node.op == "call_method":
        return f"the method Tensor.{node.target}"
    if node.op == "get_attr":
        return f"the attribute '{node.target}' directly"
    name = getattr(node.target, "__name__", str(node.target))
    module = getattr(node.target, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"the function {module + '.' if module else ''}{name}"


def _check_shared(model: nn.Module) -> None:
    """Refuse shared parameters and reused layers.

    A parameter used by several modules gets per-module diagonals that miss the cross terms;
    a layer object that appears twice keeps only its last input and output, which BackPACK
    would use for both calls.
    """
    from backpack.utils.module_classification import is_no_op

    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_no_op(module) or next(module.children(), None) is not None:
            continue
        if id(module) in seen:
            raise UnsupportedAnalysis(
                f"--backend backpack: layer '{name}' is the same module as '{seen[id(module)]}' (used twice); "
                "BackPACK keeps one input per layer; use --backend native"
            )
        seen[id(module)] = name
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and p.requires_grad:
            raise UnsupportedAnalysis(
                f"--backend backpack: parameter '{name}' is the same tensor as '{first[id(p)]}'; BackPACK's "
                "diagonal misses the cross terms of shared weights; use --backend native"
            )
        first.setdefault(id(p), name)


def _targets(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Targets in the form the ``torch.nn`` loss module expects (as hesscli's named losses accept them)."""
    if loss == "cross_entropy":
        if not targets.is_floating_point() and targets.ndim == outputs.ndim and targets.shape[1:2] == (1,):
            targets = targets.squeeze(1)
        return targets.long() if not targets.is_floating_point() else targets.to(outputs.dtype)
    if loss == "mse" and not targets.is_floating_point() and outputs.ndim == 2 and targets.ndim == 1:
        return torch.nn.functional.one_hot(targets.long(), outputs.shape[1]).to(outputs.dtype)
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    return targets.to(outputs.dtype)


def _check_loss(problem: Problem, module: nn.Module, outputs: Tensor, targets: Tensor, value: Tensor) -> None:
    """The ``torch.nn`` module must reproduce the analysed loss (a custom definition would not)."""
    with torch.no_grad():
        expected = problem.loss.fn(outputs, targets)
    value = value.detach()
    if not torch.allclose(value, expected.detach().to(value.dtype), rtol=1e-5, atol=1e-7):
        raise UnsupportedAnalysis(
            f"--backend backpack: torch.nn.{type(module).__name__} gives {float(value):.6g} on the first batch "
            f"but --loss {problem.loss.name} gives {float(expected):.6g}; use --backend native"
        )


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
