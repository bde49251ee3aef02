"""One builder per (library, call): each returns ``call(seed) -> dict`` for :func:`benchmarks.measure.measure`.

Every call does what a user of that library does (build the library's operator, run its routine)
on the workload's whole dataset as one batch, in float32, and returns the comparable quantities:

* ``eigs``: returned eigenvalues (any order); ``small``: smallest-end eigenvalues;
* ``trace``: the trace estimate;
* ``nodes`` / ``weights``: a spectral measure (weights summing to 1);
* ``reported_hvp``: the library's own product count where it reports one.

HVPs are counted by wrappers installed once by :func:`install_counters` (see BASELINES.md §5):
PyHessian's ``hessian_vector_product``; hessian-eigenthings' ``HessianOperator.matvec`` (deflation
wrappers included); columns through curvlinops' ``HessianLinearOperator._matmat`` (its construction
checks included); columns through hesscli's ``EmpiricalRiskOperator._matmat``; BackPACK HMP
probes per block-diagonal application (counted in the call). Every wrapper reports to
:data:`benchmarks.measure.COUNTER`, whose cap turns runaway solvers into "not converged (cap)".
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.measure import COUNTER
from benchmarks.workloads import Workload
from hesscli.loading.problem import Problem

logger = logging.getLogger(__name__)

Call = Callable[[int], dict[str, Any]]
Context = Callable[[], ContextManager[object]]

_INSTALLED = False


def install_counters() -> None:
    """Wrap every library's HVP entry point so that each product is counted (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import curvlinops
    import hessian_eigenthings.operators.hessian as et_hessian
    import pyhessian  # noqa: F401 - registers pyhessian.hessian in sys.modules

    from hesscli.operators.empirical import EmpiricalRiskOperator

    pyh_module = sys.modules["pyhessian.hessian"]  # the package rebinds the name `hessian` to the class
    pyh_hvp = pyh_module.hessian_vector_product

    def counted_pyh_hvp(gradsH: Any, params: Any, v: Any) -> Any:
        COUNTER.add(1)
        return pyh_hvp(gradsH, params, v)

    pyh_module.hessian_vector_product = counted_pyh_hvp

    et_matvec = et_hessian.HessianOperator.matvec

    def counted_et_matvec(self: Any, v: Tensor) -> Tensor:
        COUNTER.add(1)
        return et_matvec(self, v)

    et_hessian.HessianOperator.matvec = counted_et_matvec  # type: ignore[method-assign]

    cl_matmat = curvlinops.HessianLinearOperator._matmat

    def counted_cl_matmat(self: Any, M: list[Tensor]) -> list[Tensor]:
        COUNTER.add(int(M[0].shape[-1]))
        return cl_matmat(self, M)

    curvlinops.HessianLinearOperator._matmat = counted_cl_matmat  # type: ignore[method-assign]

    native_matmat = EmpiricalRiskOperator._matmat

    def counted_native_matmat(self: Any, V: Tensor) -> Tensor:
        COUNTER.add(int(V.shape[1]))
        return native_matmat(self, V)

    EmpiricalRiskOperator._matmat = counted_native_matmat  # type: ignore[method-assign]
    _INSTALLED = True


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- native
def native(problem: Problem, analysis: str, context: Context = contextlib.nullcontext, **options: Any) -> Call:
    """hesscli's native backend end to end, as ``hesscli <analysis>`` runs it: ``hesscli.api.analyse``
    with ``Settings`` defaults plus ``options`` (this includes the loss value it records).

    Args:
        problem: the workload's problem (float32, whole dataset as one batch).
        analysis: ``trace`` | ``eigs`` | ``extremes`` | ``density``.
        context: context every call runs under.
        **options: :class:`hesscli.config.Settings` fields (``top_k``, ``which``, ``tol``, ``probes``...).
    """
    from hesscli.api import analyse
    from hesscli.backends.native import NativeBackend
    from hesscli.config import Settings

    def call(seed: int) -> dict[str, Any]:
        settings = Settings(seed=seed, **options)
        backend = NativeBackend()  # per call, as in a fresh ``hesscli`` process: its graph is built and counted
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = analyse(problem, analysis, settings, backend=backend)
        return native_result(outcome.result)

    return call


def native_scan(problem: Problem, analyses: tuple[str, ...], context: Context = contextlib.nullcontext, *,
                shared: bool = True, **options: Any) -> Call:
    """Several analyses of one checkpoint as ``hesscli scan --analyses ...`` runs them: with
    ``shared`` the analyses get the checkpoint's shared runs (one Lanczos run serves eigs, extremes and one SLQ run);
    without, each analysis runs on its own. Returns the top-10 and λ_min for scoring."""
    from hesscli.api import analyse
    from hesscli.backends.native import NativeBackend
    from hesscli.config import Settings
    from hesscli.runner import SharedRuns

    def call(seed: int) -> dict[str, Any]:
        settings = Settings(seed=seed, **options)
        backend = NativeBackend()
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = SharedRuns(problem, {a: settings.options(a) for a in analyses}) if shared else None
            results = {a: analyse(problem, a, settings, backend=backend, shared=plan).result for a in analyses}
        out = native_result(results["eigs"])
        if "extremes" in results:
            out["small"] = [results["extremes"].lambda_min]
        out["reported_hvp"] = sum(r.n_hvp for r in results.values())
        return out

    return call


def native_algorithm(problem: Problem, algorithm: str, context: Context = contextlib.nullcontext,
                     hvp: str = "auto", **kwargs: Any) -> Call:
    """A function of ``hesscli.algorithms`` on the native operator (e.g. ``hutchinson`` with ``tol``)."""
    import hesscli.algorithms as algorithms
    from hesscli.operators.empirical import make_operator

    fn = getattr(algorithms, algorithm)

    def call(seed: int) -> dict[str, Any]:
        op = make_operator(problem, "hessian", hvp=hvp)
        generator = torch.Generator().manual_seed(seed)
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn(op, generator=generator, **kwargs)
        return native_result(result)

    return call


def native_result(result: Any) -> dict[str, Any]:
    """The comparable quantities of a hesscli result dataclass."""
    from hesscli.results.records import DensityResult, EigsResult, ExtremesResult, TraceResult

    if isinstance(result, EigsResult):
        big = [v for v, w in zip(result.eigenvalues, result.which) if w == "largest"]
        small = [v for v, w in zip(result.eigenvalues, result.which) if w == "smallest"]
        return {"eigs": big, "small": small, "reported_hvp": result.n_hvp, "converged": all(result.converged)}
    if isinstance(result, ExtremesResult):
        return {"eigs": [result.lambda_max], "small": [result.lambda_min], "reported_hvp": result.n_hvp,
                "converged": result.converged}
    if isinstance(result, TraceResult):
        return {"trace": result.estimate, "stderr": result.stderr, "reported_hvp": result.n_hvp,
                "converged": result.converged}
    if isinstance(result, DensityResult):
        w = result.weights.double()
        w = w / w.sum(dim=1, keepdim=True) / w.shape[0]
        return {"nodes": result.nodes.double().reshape(-1).numpy(), "weights": w.reshape(-1).numpy(),
                "reported_hvp": result.n_hvp}
    raise TypeError(f"unexpected result type {type(result).__name__}")


# ----------------------------------------------------------------------------- PyHessian
def _eig_shim(T: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.eig`` as PyHessian expects it (real parts in column 0), built on ``torch.linalg.eigh``."""
    vals, vecs = torch.linalg.eigh(T)
    return torch.stack([vals, torch.zeros_like(vals)], dim=1), vecs


@contextlib.contextmanager
def torch_eig_shim() -> Any:
    """Temporarily give ``torch.eig`` (removed from torch) back for PyHessian's ``density()``."""
    had, old = hasattr(torch, "eig"), getattr(torch, "eig", None)
    torch.eig = _eig_shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if had:
            torch.eig = old  # type: ignore[attr-defined]
        else:
            del torch.eig  # type: ignore[attr-defined]


def pyhessian(workload: Workload, what: str, context: Context = contextlib.nullcontext, *, cuda: bool = False,
              shim: bool = False, **kwargs: Any) -> Call:
    """``pyhessian.hessian(model, criterion, data=(X, y), cuda=False).<what>(**kwargs)``.

    Args:
        workload: the workload (a private model copy is made; PyHessian writes ``.grad``).
        what: ``eigenvalues`` | ``trace`` | ``density``.
        cuda: PyHessian's ``cuda`` argument (its default ``True`` fails on CPU-only torch).
        shim: run under :func:`torch_eig_shim` (``density`` needs it on torch >= 1.9).
        **kwargs: arguments of the method.
    """
    import pyhessian as pyh

    model = workload.model_copy()
    criterion = workload.criterion()
    X, y = workload.data()

    def call(seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)  # PyHessian draws from the global RNG
        _clear_grads(model)  # its constructor accumulates into stale .grad
        try:
            with context(), (torch_eig_shim() if shim else contextlib.nullcontext()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # backward(create_graph=True) reference-cycle warning
                H = pyh.hessian(model, criterion, data=(X, y), cuda=cuda)
                out = getattr(H, what)(**kwargs)
        finally:
            _clear_grads(model)  # .grad holds the create_graph=True graph
        if what == "eigenvalues":
            return {"eigs": [float(v) for v in out[0]]}
        if what == "trace":
            return {"trace": float(np.mean(out)), "n_samples": len(out)}
        nodes = np.concatenate([np.asarray(r, dtype=np.float64) for r in out[0]])
        weights = np.concatenate([np.asarray(r, dtype=np.float64) / np.sum(r) / len(out[1]) for r in out[1]])
        return {"nodes": nodes, "weights": weights}

    return call


# ----------------------------------------------------------------------------- hessian-eigenthings
def eigenthings(workload: Workload, what: str, context: Context = contextlib.nullcontext, **kwargs: Any) -> Call:
    """``hessian_eigenthings.<what>(HessianOperator(model, [(X, y)], supervised_loss(criterion)), seed=seed, ...)``.

    Args:
        what: ``lanczos`` | ``power_iteration_one`` | ``deflated_power_iteration`` | ``trace`` |
            ``spectral_density``.
        **kwargs: arguments of the routine (defaults when empty).
    """
    import hessian_eigenthings as het

    model = workload.model_copy()
    criterion = workload.criterion()
    X, y = workload.data()
    fn = getattr(het, what)

    def call(seed: int) -> dict[str, Any]:
        op = het.HessianOperator(model, [(X, y)], het.supervised_loss(criterion))
        with context():
            out = fn(op, seed=seed, **kwargs)
        _clear_grads(model)
        if what == "power_iteration_one":
            return {"eigs": [float(out[0])], "converged": bool(out[4])}
        if what in ("lanczos", "deflated_power_iteration"):
            vals = [float(v) for v in out.eigenvalues]
            if kwargs.get("which") == "SA":
                return {"small": sorted(vals), "eigs": [], "converged": bool(out.converged.all())}
            return {"eigs": vals, "converged": bool(out.converged.all())}
        if what == "trace":
            return {"trace": float(out.estimate), "stderr": float(out.stderr)}
        nodes = out.raw_eigenvalues.double().reshape(-1).numpy()
        w = out.raw_weights.double()
        w = (w / w.sum(dim=1, keepdim=True) / w.shape[0]).reshape(-1).numpy()
        return {"nodes": nodes, "weights": w}

    return call


# ----------------------------------------------------------------------------- curvlinops
def curvlinops_operator(workload: Workload, model: nn.Module) -> Any:
    """``HessianLinearOperator(model, criterion, params, [(X, y)])`` with its defaults."""
    from curvlinops import HessianLinearOperator

    X, y = workload.data()
    return HessianLinearOperator(model, workload.criterion(), _params(model), [(X, y)])


def curvlinops_eigsh(workload: Workload, context: Context = contextlib.nullcontext, *, k: int = 1,
                     which: str = "LA", tol: float = 0.0) -> Call:
    """``scipy.sparse.linalg.eigsh(HessianLinearOperator(...).to_scipy(), k, which, tol, v0=seeded)``."""
    from scipy.sparse.linalg import eigsh

    model = workload.model_copy()

    def call(seed: int) -> dict[str, Any]:
        with context():
            A = curvlinops_operator(workload, model)
            v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
            vals = eigsh(A.to_scipy(), k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
        vals = [float(v) for v in vals]
        return {"small": sorted(vals)} if which == "SA" else {"eigs": vals}

    return call


def curvlinops_trace(workload: Workload, estimator: str, num_matvecs: int,
                     context: Context = contextlib.nullcontext) -> Call:
    """``curvlinops.<estimator>(HessianLinearOperator(...), num_matvecs)`` (``hutchpp_trace`` / ``xtrace``)."""
    import curvlinops

    model = workload.model_copy()
    fn = getattr(curvlinops, estimator)

    def call(seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)  # curvlinops draws probes from the global RNG
        with context():
            A = curvlinops_operator(workload, model)
            est = fn(A, num_matvecs)
        return {"trace": float(est)}

    return call


def curvlinops_spectrum(workload: Workload, ncv: int, context: Context = contextlib.nullcontext,
                        **kwargs: Any) -> Call:
    """``curvlinops.lanczos_approximate_spectrum(HessianLinearOperator(...), ncv)`` (Papyan 2020)."""
    import curvlinops

    model = workload.model_copy()

    def call(seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        np.random.seed(seed)
        with context():
            A = curvlinops_operator(workload, model)
            grid, density = curvlinops.lanczos_approximate_spectrum(A, ncv, **kwargs)
        w = density.double().clamp_min(0).numpy()
        return {"nodes": grid.double().numpy(), "weights": w / w.sum()}

    return call


# ----------------------------------------------------------------------------- BackPACK
def backpack_diag_trace(workload: Workload, context: Context = contextlib.nullcontext,
                        dtype: torch.dtype = torch.float32) -> Call:
    """Exact trace as the sum of BackPACK's ``DiagHessian`` (one extended backward)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model = extend(workload.model_copy(dtype))
    lossf = extend(workload.criterion())
    X, y = workload.data(dtype)

    def call(seed: int) -> dict[str, Any]:
        try:
            with context(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # BackPACK's hooks warn when inputs need no gradient
                loss = lossf(model(X), y)
                with backpack(DiagHessian()):
                    loss.backward()
            return {"trace": float(sum(p.diag_h.sum() for p in _params(model)))}
        finally:
            for p in _params(model):
                p.grad = None
                if hasattr(p, "diag_h"):
                    del p.diag_h

    return call


def backpack_hmp_trace(workload: Workload, n_probes: int, context: Context = contextlib.nullcontext) -> Call:
    """Hutchinson on BackPACK's block-diagonal ``HMP`` (its trace equals the full trace)."""
    from backpack import backpack, extend
    from backpack.extensions import HMP

    model = extend(workload.model_copy())
    lossf = extend(workload.criterion())
    X, y = workload.data()

    def call(seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        try:
            with context(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = lossf(model(X), y)
                with backpack(HMP()):
                    loss.backward()
                COUNTER.add(n_probes)  # one block-diagonal application per probe
                total = 0.0
                for p in _params(model):
                    V = torch.randint(0, 2, (n_probes, *p.shape), generator=g).to(p.dtype) * 2 - 1
                    total += float((V * p.hmp(V)).sum().detach()) / n_probes
            return {"trace": total}
        finally:
            for p in _params(model):
                p.grad = None
                if hasattr(p, "hmp"):
                    del p.hmp

    return call
