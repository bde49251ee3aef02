"""Float64 ground truth for every workload, computed independently of hesscli's engine and cached.

* W1 (and ``tiny``): the dense float64 Hessian from ``torch.func`` (``jvp`` of ``jacrev`` on every
  identity column), symmetrised, then ``eigvalsh``: every eigenvalue, the trace and the spectrum
  are exact.
* Larger workloads: float64 Lanczos with full reorthogonalisation (Gram-Schmidt applied twice)
  from a Rademacher start vector, on a plain double-backward HVP over a cached gradient graph.
  ``steps`` products (250 by default), or, with ``adaptive=True``, fewer once the Ritz residual
  estimates of the top-10 and of ``λ_min`` are below ``1e-8 |θ|`` (the residual bounds the eigenvalue
  error); the final residuals are computed explicitly. The trace is ``tr(T_m)`` (exact on the Krylov space) plus Hutchinson on its orthogonal
  complement (``trace_probes`` Rademacher probes projected out of the basis), with its standard
  error. The density reference is the spectral measure of the long run plus ``extra_runs`` SLQ runs.
* The float32 floor: the Rayleigh quotient of each reference Ritz vector through a float32 HVP,
  against the float64 eigenvalue. No float32 library can be more accurate than this.

Results are cached in ``benchmarks/out/ref_<name>_<key>.pt`` (keyed by the workload's weights and
the reference settings).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, jacrev, jvp, vmap

from benchmarks.workloads import OUT_DIR, Workload

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """Ground truth of one workload (float64).

    Attributes:
        top: the largest eigenvalues, descending (at least 10).
        bottom: the smallest eigenvalues, ascending (at least 1).
        trace, trace_se: the trace and its standard error (0 when exact).
        nodes, weights: the reference spectral measure (weights sum to 1).
        method: how it was obtained (one line, for RESULTS.md).
        residual_top, residual_min: largest relative residual ``||H y - θ y|| / |θ|`` of the top-10
            Ritz pairs / of λ_min (0 when exact; a cached reference from the ``|β s_m|`` estimate
            may hold 0 for "below rounding").
        floor_top, floor_min: float32 floor: relative error of float32 Rayleigh quotients of the
            reference eigenvectors (per top eigenvalue, and for λ_min).
        hvp_f32_error: relative error ``||H32 v - H64 v|| / ||H64 v||`` for a random ``v``.
        seconds: time spent computing the reference (0 when read from the cache).
    """

    top: list[float]
    bottom: list[float]
    trace: float
    trace_se: float
    nodes: np.ndarray
    weights: np.ndarray
    method: str
    residual_top: float
    residual_min: float
    floor_top: list[float]
    floor_min: float
    hvp_f32_error: float
    seconds: float = 0.0
    steps: int = 0

    @property
    def spectral_range(self) -> float:
        return self.top[0] - self.bottom[0]

    def summary(self) -> dict[str, object]:
        """JSON-friendly summary (the measure itself is left out)."""
        return {
            "top10": self.top[:10], "lambda_min": self.bottom[0], "trace": self.trace, "trace_se": self.trace_se,
            "method": self.method, "steps": self.steps, "residual_top": self.residual_top,
            "residual_min": self.residual_min, "float32_floor_top10": self.floor_top[:10],
            "float32_floor_min": self.floor_min, "hvp_f32_error": self.hvp_f32_error,
            "n_density_nodes": int(self.nodes.size), "seconds": round(self.seconds, 1),
        }


# ----------------------------------------------------------------------------- products
class PlainHVP:
    """Double-backward HVP on a cached first-backward graph (independent of hesscli's operator).

    Args:
        workload: the workload.
        dtype: float64 for references, float32 for the floor.
        context: a context manager factory every product runs under (the SDPA math kernel on W3).
    """

    def __init__(self, workload: Workload, dtype: torch.dtype,
                 context: Callable[[], ContextManager[object]] = contextlib.nullcontext) -> None:
        self.model = workload.model_copy(dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.dtype = dtype
        self.context = context
        x, y = workload.data(dtype)
        with context(), torch.enable_grad():
            loss = workload.loss.fn(self.model(x), y)
            self.grads = torch.autograd.grad(loss, self.params, create_graph=True)

    def __call__(self, v: Tensor) -> Tensor:
        parts = [c.reshape(s).to(self.dtype) for c, s in zip(v.split(self.numels), self.shapes)]
        with self.context():
            hv = torch.autograd.grad(self.grads, self.params, parts, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).to(torch.float64)


def dense_hessian(workload: Workload, context: Callable[[], ContextManager[object]] = contextlib.nullcontext,
                  chunk: int = 256) -> Tensor:
    """The dense float64 Hessian ``[P, P]`` by ``jvp(jacrev(loss))`` on identity columns."""
    model = workload.model_copy(torch.float64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    theta0 = torch.cat([params[n].reshape(-1) for n in names])
    x, y = workload.data(torch.float64)

    def loss(theta: Tensor) -> Tensor:
        ps = {n: c.reshape(s) for n, c, s in zip(names, theta.split(numels), shapes)}
        return workload.loss.fn(functional_call(model, {**buffers, **ps}, (x,)), y)

    g = jacrev(loss)

    def col(e: Tensor) -> Tensor:
        return jvp(g, (theta0,), (e,))[1]

    P = theta0.numel()
    H = torch.empty(P, P, dtype=torch.float64)
    with context():
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            E = torch.zeros(stop - start, P, dtype=torch.float64)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            H[start:stop] = vmap(col)(E)
    return (H + H.T) / 2


# ----------------------------------------------------------------------------- Lanczos
def lanczos64(hvp: Callable[[Tensor], Tensor], n: int, steps: int, *, start: Tensor,
              adaptive: bool = False, min_steps: int = 100, rtol: float = 1e-8,
              k_top: int = 10) -> tuple[Tensor, Tensor, Tensor, float]:
    """Float64 Lanczos with full reorthogonalisation (twice) from ``start``.

    Returns:
        ``(alphas [m], betas [m-1], V [m, n], beta_m)``.
    """
    V = torch.zeros(steps, n, dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    v = start / start.norm()
    beta = 0.0
    m = 0
    for j in range(steps):
        V[j] = v
        w = hvp(v)
        a = float(w @ v)
        w = w - a * v - (beta * V[j - 1] if j > 0 else 0.0)
        for _ in range(2):
            w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        alphas.append(a)
        beta = float(w.norm())
        m = j + 1
        if beta < 1e-13 * max(abs(x) for x in alphas):
            break
        if adaptive and m >= min_steps and m % 10 == 0:
            theta, S = _tridiag_eigh(alphas, betas)
            res = (beta * S[-1].abs()).numpy()
            th = np.abs(theta.numpy())
            if np.all(res[-k_top:] < rtol * th[-k_top:]) and res[0] < rtol * th[0]:
                break
        if j < steps - 1:
            betas.append(beta)
            v = w / beta
    return (torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas[: m - 1], dtype=torch.float64),
            V[:m], beta)


def _tridiag_eigh(alphas: list[float] | Tensor, betas: list[float] | Tensor) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(alphas, dtype=torch.float64)
    b = torch.as_tensor(betas, dtype=torch.float64)[: a.numel() - 1]
    T = torch.diag(a)
    if b.numel():
        T += torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigh(T)


def rademacher(n: int, seed: int) -> Tensor:
    """A float64 Rademacher vector from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


# ----------------------------------------------------------------------------- references
def compute_reference(workload: Workload, *, steps: int = 250, adaptive: bool = False, trace_probes: int = 100,
                      extra_runs: int = 2, extra_steps: int = 120,
                      context: Callable[[], ContextManager[object]] = contextlib.nullcontext,
                      dense_max: int = 5000) -> Reference:
    """Compute the float64 reference of ``workload`` (no cache; see :func:`load_reference`)."""
    t0 = time.perf_counter()
    h32 = PlainHVP(workload, torch.float32, context)
    if workload.n_params <= dense_max:
        H = dense_hessian(workload, context)
        evals, evecs = torch.linalg.eigh(H)
        top_idx = torch.argsort(evals, descending=True)[:20]
        vecs_top = evecs[:, top_idx]
        vec_min = evecs[:, 0]
        floor_top = [_rq_error(h32, vecs_top[:, i], float(evals[top_idx[i]])) for i in range(vecs_top.shape[1])]
        floor_min = _rq_error(h32, vec_min, float(evals[0]))
        v = rademacher(H.shape[0], 7)
        hv64 = H @ v
        err32 = float((h32(v) - hv64).norm() / hv64.norm())
        ev = evals.numpy()
        return Reference(
            top=[float(x) for x in ev[::-1][:20]], bottom=[float(x) for x in ev[:5]], trace=float(ev.sum()),
            trace_se=0.0, nodes=ev.copy(), weights=np.full(ev.size, 1.0 / ev.size),
            method=f"exact: dense float64 Hessian ({ev.size:,}x{ev.size:,}, torch.func jvp(jacrev)) + eigvalsh",
            residual_top=0.0, residual_min=0.0, floor_top=floor_top, floor_min=floor_min, hvp_f32_error=err32,
            seconds=time.perf_counter() - t0, steps=ev.size)

    h64 = PlainHVP(workload, torch.float64, context)
    n = h64.n
    alphas, betas, V, beta_m = lanczos64(h64, n, steps, start=rademacher(n, 12345), adaptive=adaptive)
    m = alphas.numel()
    theta, S = _tridiag_eigh(alphas, betas)
    scale = float(theta.abs().max())
    top = theta.flip(0)
    ritz_top = V.T @ S[:, -20:].flip(1)  # [n, 20]
    ritz_min = V.T @ S[:, 0]
    # explicit residuals ||H y - θ y|| (the estimate |β s_m| underflows to 0 once converged)
    residual_top = max(float((h64(ritz_top[:, i]) - top[i] * ritz_top[:, i]).norm()) / abs(float(top[i]))
                       for i in range(min(10, m)))
    residual_min = float((h64(ritz_min) - theta[0] * ritz_min).norm()) / abs(float(theta[0]))
    floor_top = [_rq_error(h32, ritz_top[:, i], float(top[i])) for i in range(min(20, m))]
    floor_min = _rq_error(h32, ritz_min, float(theta[0]))
    v = rademacher(n, 7)
    hv64 = h64(v)
    err32 = float((h32(v) - hv64).norm() / hv64.norm())

    # trace: exact on span(V) plus Hutchinson on the complement
    samples = []
    for i in range(trace_probes):
        z = rademacher(n, 1000 + i)
        z = z - V.T @ (V @ z)
        z = z - V.T @ (V @ z)
        samples.append(float(z @ h64(z)))
    tr_krylov = float(alphas.sum())
    s = np.asarray(samples)
    trace = tr_krylov + float(s.mean())
    trace_se = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")

    # density: the long run's measure plus extra SLQ runs, equally weighted per run
    node_list = [theta.numpy()]
    weight_list = [(S[0] ** 2).numpy()]
    del V
    for r in range(extra_runs):
        a, b, _, _ = lanczos64(h64, n, extra_steps, start=rademacher(n, 2000 + r))
        th, Sr = _tridiag_eigh(a, b)
        node_list.append(th.numpy())
        weight_list.append((Sr[0] ** 2).numpy())
    nodes = np.concatenate(node_list)
    weights = np.concatenate([w / w.sum() / len(weight_list) for w in weight_list])
    method = (f"float64 Lanczos, full reorthogonalisation, {m} steps"
              f"{' (stopped when the top-10 and λ_min residual estimates < 1e-8·|θ|)' if adaptive and m < steps else ''}; "
              f"trace = tr(T_{m}) + Hutchinson on the complement ({trace_probes} probes); "
              f"density = that run + {extra_runs} SLQ runs x {extra_steps} steps")
    logger.info("reference %s: %d steps, residual top %.1e, min %.1e (scale %.3g)", workload.name, m,
                residual_top, residual_min, scale)
    return Reference(
        top=[float(x) for x in top[:20]], bottom=[float(x) for x in theta[:5]], trace=trace, trace_se=trace_se,
        nodes=nodes, weights=weights, method=method, residual_top=residual_top, residual_min=residual_min,
        floor_top=floor_top, floor_min=floor_min, hvp_f32_error=err32, seconds=time.perf_counter() - t0, steps=m)


def _rq_error(h32: PlainHVP, vec: Tensor, lam: float) -> float:
    v = vec / vec.norm()
    return abs(float(v @ h32(v)) - lam) / abs(lam)


VERSION = 2
"""Bumped whenever the reference computation changes (it enters the cache key)."""

REFERENCE_SETTINGS: dict[str, dict[str, object]] = {
    "tiny": {},
    "W1": {},
    "W2": {"steps": 250, "trace_probes": 100, "extra_runs": 2},
    "W3": {"steps": 250, "trace_probes": 100, "extra_runs": 2},
    "W4": {"steps": 250, "adaptive": True, "trace_probes": 30, "extra_runs": 0},
}
"""Reference budgets per workload (W4: one product costs seconds, so the run stops on its residuals)."""


def load_reference(workload: Workload, *, context: Callable[[], ContextManager[object]] = contextlib.nullcontext,
                   cache_dir: Path = OUT_DIR, **overrides: object) -> Reference:
    """The cached reference of ``workload``, computed on the first call.

    Args:
        workload: the workload.
        context: context for every product (SDPA math kernel on W3).
        cache_dir: cache folder.
        **overrides: reference settings replacing :data:`REFERENCE_SETTINGS` (they enter the key).

    Returns:
        The :class:`Reference`.
    """
    settings = {**REFERENCE_SETTINGS.get(workload.name, {}), **overrides}
    key = f"{workload.key}_v{VERSION}_" + "_".join(f"{k}{v}" for k, v in sorted(settings.items()))
    path = cache_dir / f"ref_{workload.name}_{key}.pt"
    if path.is_file():
        blob = torch.load(path, weights_only=False)
        blob["seconds"] = 0.0
        return Reference(**blob)
    ref = compute_reference(workload, context=context, **settings)  # type: ignore[arg-type]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(ref.__dict__), tmp)
    tmp.replace(path)
    return ref


# ----------------------------------------------------------------------------- error measures
def rel_err(value: float, truth: float) -> float:
    """``|value - truth| / |truth|``."""
    return abs(value - truth) / abs(truth)


def top_error(values: list[float] | np.ndarray, ref: Reference, k: int) -> float:
    """Largest relative error of the ``k`` largest returned values against the reference top-k.

    Fewer than ``k`` values (or non-finite ones) count as infinite error.
    """
    vals = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if vals.size < k or not np.all(np.isfinite(vals[:k])):
        return math.inf
    truth = np.asarray(ref.top[:k])
    return float(np.max(np.abs(vals[:k] - truth) / np.abs(truth)))


def wasserstein(nodes_a: np.ndarray, weights_a: np.ndarray, nodes_b: np.ndarray, weights_b: np.ndarray) -> float:
    """Wasserstein-1 distance between two discrete measures on the real line (weights normalised)."""
    wa = np.asarray(weights_a, dtype=np.float64)
    wb = np.asarray(weights_b, dtype=np.float64)
    xa = np.asarray(nodes_a, dtype=np.float64)
    xb = np.asarray(nodes_b, dtype=np.float64)
    keep_a, keep_b = np.isfinite(xa) & (wa > 0), np.isfinite(xb) & (wb > 0)
    xa, wa, xb, wb = xa[keep_a], wa[keep_a] / wa[keep_a].sum(), xb[keep_b], wb[keep_b] / wb[keep_b].sum()
    x = np.concatenate([xa, xb])
    w = np.concatenate([wa, -wb])
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    cdf_diff = np.cumsum(w)[:-1]
    return float(np.sum(np.abs(cdf_diff) * np.diff(x)))


def density_error(nodes: np.ndarray, weights: np.ndarray, ref: Reference) -> float:
    """Wasserstein-1 distance to the reference measure, divided by ``λ_max - λ_min``."""
    return wasserstein(nodes, weights, ref.nodes, ref.weights) / ref.spectral_range
