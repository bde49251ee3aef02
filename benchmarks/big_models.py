"""Hessian products on ~11M-parameter models: HVP ÷ gradient on every product path, torch.compile included.

``python -m benchmarks.big_models [--models resnet18,gpt2] [--device cpu|cuda] [--repeats 3] [--block 2]``

Two models, each built in code (nothing is downloaded), float32, as ``hesscli`` loads them
(:func:`hesscli.loading.problem_from_python`, one batch) and multiplied by hesscli's own
:class:`hesscli.operators.empirical.HessianOperator`:

* **resnet18**: ResNet-18 (BasicBlock, [2, 2, 2, 2], widths 64-512) with the 3x3 stem of 32x32
  inputs (no max-pool), BatchNorm in eval mode, 10 classes: 11.17M parameters; 16 seeded random
  images and labels, cross-entropy.
* **gpt2**: the GPT-2 of :mod:`benchmarks.transformer` (2 layers, width 512, 8 heads, vocabulary
  8192, 128 positions: 10.6M parameters), 8 seeded random sequences of 64 tokens, ``causal_lm``.

Timed (median of ``--repeats`` after a warm-up; CUDA with ``torch.cuda.synchronize``):

* the mean-loss gradient (``loss_and_gradient``);
* ``hvp="autograd"``: double backward over the cached gradient graph (the first product builds
  the graph and is timed apart), one column and a block of ``--block`` columns (per column);
* ``hvp="func"``: ``torch.func`` ``vmap(jvp(grad))``, one column and a block;
* compiled: ``torch.compile`` (mode default) of ``jvp(grad(loss))`` over ``functional_call``, one
  column and the vmapped block; the compilation (first call) is timed apart. A failure is
  recorded with its error.

Each path reports seconds per column, HVP ÷ gradient, and its peak memory above the start (RSS on
the CPU, ``max_memory_allocated`` on CUDA). Every path's product of one seeded vector is compared
with the autograd path's and with a float64 autograd product of the same vector (a float64 copy of
the problem), as relative 2-norm differences.

Each model runs in a fresh process (``run``), so peak memory and compile caches do not carry
over; the JSON rows go into ``results.json`` under ``big_models`` and RESULTS.md renders them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.measure import LoadWindow, _Sampler, machine_info, malloc_trim, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet18", "gpt2")

LAYOUT_NOTE = (
    "With inductor's default `layout_optimization=True` (channels-last convolutions), the compiled "
    "ResNet product corrupts the heap on the CPU (torch {torch}: the process aborts with glibc's "
    "\"double free or corruption\" inside a compiled `convolution_backward`; reproduced on a 2-block "
    "ResNet with the same layout); the ResNet-18 rows therefore compile with "
    "`torch._inductor.config.layout_optimization = False`, which gives products that agree with the eager ones"
)

CURVLINOPS_REFERENCE = (
    "curvlinops reports, on an RTX A6000 (MLP, ResNet-18, ResNet-50, nanoGPT), a compiled HVP at "
    "1.1-2.8 gradients against 4.5-7.9 gradients eager"
)


# ----------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with BasicBlocks for 32x32 inputs: 3x3 stem, stages of ``widths``, global average pool."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512),
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            for j in range(n):
                blocks.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 ([2, 2, 2, 2], widths 64-512) for 32x32 inputs: 11.17M parameters with 10 classes."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def _settle_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics from one forward pass in train mode, so that eval mode is well scaled."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass sets the batch statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def build_problem(name: str, *, batch: int, seq: int = 64, device: str = "cpu", dtype: str = "float32",
                  tiny: bool = False) -> tuple[Any, dict[str, Any]]:
    """The hesscli problem of model ``name`` (``resnet18`` | ``gpt2``) and a description of it.

    ``tiny`` builds a small model of the same kind (for tests: seconds, not minutes).
    """
    from hesscli.config import Settings
    from hesscli.loading import problem_from_python

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    settings = Settings(batch_size=batch, device=device, dtype=dtype)
    if name == "resnet18":
        model = ResNet((1, 1), (4, 8), 10) if tiny else resnet18(10)
        side = 8 if tiny else 32
        x = torch.randn(batch, 3, side, side, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        _settle_batchnorm(model, x)
        problem = problem_from_python(model, "cross_entropy", (x, y), settings)
        what = f"{'tiny ' if tiny else ''}ResNet-18, BatchNorm in eval, {batch} random {side}x{side} images, cross-entropy"
    elif name == "gpt2":
        import transformers

        if tiny:
            cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=seq,
                                          bos_token_id=0, eos_token_id=0)
        else:
            cfg = transformers.GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=8192, n_positions=128,
                                          bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
        problem = problem_from_python(model, "causal_lm", {"input_ids": ids}, settings)
        what = (f"{'tiny ' if tiny else ''}GPT-2 ({cfg.n_layer} layers, width {cfg.n_embd}, vocabulary "
                f"{cfg.vocab_size}), {batch} x {seq} random tokens, causal_lm")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return problem, {"model": name, "what": what, "n_params": problem.n_params, "batch": batch,
                     "seq": seq if name == "gpt2" else None, "tiny": tiny}


# ----------------------------------------------------------------------------- timing
class _Memory:
    """Peak memory above the start of a phase: RSS on the CPU, ``max_memory_allocated`` on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> _Memory:
        malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._sampler = _Sampler().__enter__()
            self._start = self._sampler.peak
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._sampler.__exit__()
            self.peak = max(0, self._sampler.peak - self._start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` calls (at least one)."""
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _paired(fn: Callable[[], Any], gradient: Callable[[], Any], device: torch.device,
            repeats: int) -> tuple[float, float, list[float]]:
    """Alternate a gradient and ``fn``: (median ``fn`` seconds, median gradient seconds, the ``fn`` times)."""
    times, grads = [], []
    for _ in range(max(1, repeats)):
        grads.append(_time(gradient, device, 1)[0])
        times.append(_time(fn, device, 1)[0])
    return statistics.median(times), statistics.median(grads), times


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().to("cpu", torch.float64).reshape(-1), b.detach().to("cpu", torch.float64).reshape(-1)
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64))


def compiled_hvp(op: Any, backend: str = "inductor") -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``torch.compile`` of ``jvp(grad(loss))`` over ``functional_call`` for the operator's (single) batch.

    Returns ``(one, block)``: a flat ``[P]`` vector -> ``[P]`` product, and a ``[P, k]`` block -> ``[P, k]``
    (``vmap`` over the columns).
    """
    from torch.func import grad, jvp, vmap

    problem = op.problem
    (x, y), = problem.data.batches
    model, call, loss_fn = problem.model, problem.call, problem.loss.fn
    fixed = {n: t.detach() for n, t in op._fixed.items()}
    names, shapes, numels = op.names, op.shapes, op.numels
    primals = {n: p.detach() for n, p in zip(names, op.params)}

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(call.functional(model, {**fixed, **params}, x), y)

    def hvp(tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return jvp(grad(loss), (primals,), (tangents,))[1]

    c_one = torch.compile(hvp, backend=backend)
    c_block = torch.compile(vmap(hvp), backend=backend)

    def unflat(v: torch.Tensor, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        parts = v.split(numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(names, parts, shapes)}

    def one(v: torch.Tensor) -> torch.Tensor:
        out = c_one(unflat(v, ()))
        return torch.cat([out[n].reshape(-1) for n in names])

    def block(V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        out = c_block(unflat(V.T.contiguous(), (k,)))
        return torch.cat([out[n].reshape(k, -1) for n in names], dim=1).T

    return one, block


def measure_model(name: str, *, batch: int, seq: int = 64, device: str = "cpu", repeats: int = 3, block: int = 2,
                  compile: bool = True, float64_check: bool = True, tiny: bool = False,
                  layout_optimization: bool | None = None, progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Time the gradient and every product path of model ``name``; returns one JSON-able row.

    Keys: ``gradient_s``; ``paths``: for each of ``autograd``, ``func``, ``compiled``, the seconds per
    column of one column (``one_s``) and of a block (``block_s``), ``first_s`` (the graph build or
    the compilation), the ratios to the gradient, ``peak_mb`` and ``status``/``error``; ``agreement``:
    relative differences between the paths' products of one vector and against float64.
    """
    from hesscli.operators.empirical import HessianOperator, differentiable_kernels

    dev = torch.device(device)
    if layout_optimization is None:  # see LAYOUT_NOTE
        layout_optimization = not (name == "resnet18" and dev.type == "cpu")
    import torch._inductor.config as inductor_config

    inductor_config.layout_optimization = layout_optimization
    problem, row = build_problem(name, batch=batch, seq=seq, device=device, tiny=tiny)
    row.update({"inductor_layout_optimization": layout_optimization, "device": device, "threads": torch.get_num_threads(), "repeats": repeats, "block": block,
                "torch": torch.__version__})
    if dev.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(dev)
    rss_start = rss_bytes()
    gen = torch.Generator().manual_seed(1)
    size = problem.n_params
    v = torch.randn(size, 1, generator=gen).to(dev)
    V = torch.randn(size, block, generator=gen).to(dev)
    paths: dict[str, dict[str, Any]] = {}
    products: dict[str, torch.Tensor] = {}
    t_all = time.perf_counter()

    with LoadWindow() as load:
        gradient = HessianOperator(problem, hvp="autograd").loss_and_gradient  # never builds a cached graph
        gradient()  # warm-up
        with _Memory(dev) as mem:
            row["gradient_s"], row["gradient_all_s"] = _time(gradient, dev, repeats)
        row["gradient_peak_mb"] = mem.peak / 2**20
        progress(f"{name}: gradient {row['gradient_s']:.3f} s")
        op_a = HessianOperator(problem, hvp="autograd")

        def run_path(label: str, first: Callable[[], torch.Tensor], one: Callable[[torch.Tensor], torch.Tensor],
                     blk: Callable[[torch.Tensor], torch.Tensor]) -> None:
            entry: dict[str, Any] = {"status": "ok"}
            try:
                with _Memory(dev) as mem:  # the first product, then one warm-up of each timed call
                    _sync(dev)
                    t0 = time.perf_counter()
                    products[label] = first().reshape(-1)
                    _sync(dev)
                    entry["first_s"] = time.perf_counter() - t0
                    one(v)
                    t0 = time.perf_counter()
                    blk(V)  # a compiled block is a second compilation
                    _sync(dev)
                    entry["block_first_s"] = time.perf_counter() - t0
                entry["peak_mb"] = mem.peak / 2**20
                # each timed product next to a timed gradient, so that a change of load hits both
                entry["one_s"], entry["one_grad_s"], entry["one_all_s"] = _paired(lambda: one(v), gradient, dev, repeats)
                t_block, entry["block_grad_s"], entry["block_all_s"] = _paired(lambda: blk(V), gradient, dev, repeats)
                entry["block_s"] = t_block / block
                entry["one_x_grad"] = entry["one_s"] / entry["one_grad_s"]
                entry["block_x_grad"] = entry["block_s"] / entry["block_grad_s"]
                progress(f"{name}: {label} first {entry['first_s']:.2f} s, one {entry['one_s']:.3f} s "
                         f"({entry['one_x_grad']:.2f}x), block {entry['block_s']:.3f} s/col ({entry['block_x_grad']:.2f}x)")
            except Exception as e:  # noqa: BLE001 - a failing path is a result, recorded with its error
                entry = {"status": "FAIL", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
                progress(f"{name}: {label} failed: {entry['error']}\n{traceback.format_exc()}")
            paths[label] = entry

        run_path("autograd", lambda: op_a.matmat(v), op_a.matmat, op_a.matmat)
        op_a = None  # frees the cached graph
        malloc_trim()

        op = HessianOperator(problem, hvp="func", block_size=block)
        run_path("func", lambda: op.matmat(v), op.matmat, op.matmat)

        if compile:
            def compiled_first() -> torch.Tensor:
                one, blk = compiled_hvp(op)
                compiled_first.fns = (one, blk)  # type: ignore[attr-defined]
                with differentiable_kernels():
                    return one(v[:, 0])

            def c_one(u: torch.Tensor) -> torch.Tensor:
                with differentiable_kernels():
                    return compiled_first.fns[0](u[:, 0])  # type: ignore[attr-defined]

            def c_block(U: torch.Tensor) -> torch.Tensor:
                with differentiable_kernels():
                    return compiled_first.fns[1](U)  # type: ignore[attr-defined]

            run_path("compiled", compiled_first, c_one, c_block)
            if paths["compiled"]["status"] == "ok":
                # the block path's own output, against the eager func path on the same block
                with differentiable_kernels():
                    paths["compiled"]["block_vs_func"] = _rel(compiled_first.fns[1](V), op.matmat(V))  # type: ignore[attr-defined]
        else:
            paths["compiled"] = {"status": "skipped"}
        op = None
    row["foreign_load"] = load.value
    row["paths"] = paths

    agreement: dict[str, float] = {}
    if "autograd" in products:
        for label, p in products.items():
            if label != "autograd":
                agreement[f"{label}_vs_autograd"] = _rel(p, products["autograd"])
    if float64_check and products:
        progress(f"{name}: float64 product")
        p64, _ = build_problem(name, batch=batch, seq=seq, device=device, dtype="float64", tiny=tiny)
        op64 = HessianOperator(p64, hvp="autograd", cache_graph=False)
        ref = op64.matmat(v.to(torch.float64)).reshape(-1)
        for label, p in products.items():
            agreement[f"{label}_vs_float64"] = _rel(p, ref)
        del op64, p64
    row["agreement"] = agreement
    row["peak_rss_mb"] = _peak_rss_mb()
    row["rss_start_mb"] = rss_start / 2**20
    row["seconds"] = time.perf_counter() - t_all
    return row


def _peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover


# ----------------------------------------------------------------------------- driver
PROBE = r"""
import sys, torch
import torch._inductor.config as inductor_config
from benchmarks.big_models import build_problem, compiled_hvp
from hesscli.operators.empirical import HessianOperator, differentiable_kernels
torch.set_num_threads(1)
inductor_config.layout_optimization = sys.argv[1] == "on"
problem, _ = build_problem("resnet18", batch=4, tiny=True)
op = HessianOperator(problem, hvp="autograd")
one, _ = compiled_hvp(op)
v = torch.randn(problem.n_params, generator=torch.Generator().manual_seed(1))
with differentiable_kernels():
    out = one(v)
ref = op.matmat(v[:, None])[:, 0]
print(float((out - ref).norm() / ref.norm()))
"""


def probe_layout(timeout_s: float = 600.0) -> dict[str, Any]:
    """The compiled product of a 2-block ResNet (8x8 inputs) with inductor's layout optimisation on
    and off, each in a fresh process: exit status, the relative difference to the eager product, or
    the end of its error output."""
    out: dict[str, Any] = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for setting in ("on", "off"):
        try:
            proc = subprocess.run([sys.executable, "-c", PROBE, setting], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
            entry: dict[str, Any] = {"returncode": proc.returncode}
            if proc.returncode == 0:
                entry["rel_diff"] = float(proc.stdout.strip().splitlines()[-1])
            else:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                entry["error"] = " ".join((lines[0] if lines else "").split())[:300]
        except subprocess.TimeoutExpired:
            entry = {"returncode": None, "error": f"timed out after {timeout_s:.0f} s"}
        out[setting] = entry
    return out


DEFAULTS = {"resnet18": {"batch": 16}, "gpt2": {"batch": 8, "seq": 64}}


def run(models: tuple[str, ...] = MODELS, *, device: str = "cpu", repeats: int = 3, block: int = 2,
        threads: int = 2, timeout_s: float = 1800.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure each model in a fresh process; returns ``{"rows": [...], "settings": ...}``."""
    rows: list[dict[str, Any]] = []
    for name in models:
        cmd = [sys.executable, "-m", "benchmarks.big_models", "--models", name, "--device", device,
               "--repeats", str(repeats), "--block", str(block), "--threads", str(threads), "--json"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        from hesscli.threads import prepare_environment

        decision = prepare_environment(env)  # what `hesscli` would do on this machine now
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="hesscli-inductor-") as cache:
                env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compilation, every time
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
            for r in json.loads(proc.stdout.strip().splitlines()[-1]):
                rows.append({**r, "wait_policy": decision})
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            rows.append({"model": name, "device": device, "status": "FAIL",
                         "error": " ".join(str(e).split())[-600:]})
        log(f"big_models {name} ({device}) done in {time.perf_counter() - t0:.0f}s")
    layout = probe_layout() if device == "cpu" and "resnet18" in models else None
    return {"rows": rows, "layout_probe": layout, "settings": {"device": device, "repeats": repeats, "block": block, "threads": threads},
            "machine": machine_info()}


# ----------------------------------------------------------------------------- report
def _t(s: Any) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def _cell(entry: dict[str, Any] | None, key: str) -> str:
    if not entry or entry.get("status") != "ok":
        return "FAIL" if entry and entry.get("status") == "FAIL" else "-"
    return f"{_t(entry[key + '_s'])} ({entry[key + '_x_grad']:.2f}x)"


def _policy(decision: str | None) -> str:
    if not decision:
        return "-"
    if "PASSIVE" in decision:
        return "passive (busy machine)"
    if "environment" in decision:
        return "from the environment"
    return "OpenMP default"


def markdown(section: dict[str, Any] | None) -> str:
    """The RESULTS.md section "Big models"."""
    if not section or not section.get("rows"):
        return ""
    rows = section["rows"]
    s = section.get("settings", {})
    L = [
        "## Big models: Hessian products on ~11M parameters, torch.compile included",
        "",
        f"`python -m benchmarks.big_models` (each model in a fresh process; {s.get('threads', '?')} threads on the "
        f"CPU; float32; median of {s.get('repeats', '?')} after a warm-up). Seconds per product column and, in "
        "brackets, HVP ÷ gradient, each product timed alternately with a gradient (the ratio is to the median of "
        "those gradients, so that a change of the machine's load hits both; the gradient column is the median of "
        "the first gradients alone). *first*: the first product, which builds the cached gradient graph (autograd) "
        "or compiles (`torch.compile`, mode default, of `jvp(grad(loss))` over `functional_call`, in a fresh "
        "inductor cache; the vmapped block is compiled separately, in brackets). "
        f"Blocks of {s.get('block', '?')} columns. The OpenMP wait policy is what `hesscli` would choose at the "
        "start of each model's process. Peak: memory above the start "
        "of the path (RSS on the CPU, `max_memory_allocated` on CUDA); the process peak RSS is the whole run.",
        "",
        "| model | device | params | gradient | autograd: first | autograd: 1 column | autograd: block | "
        "func: 1 column | func: block | compiled: first | compiled: 1 column | compiled: block | peak MB "
        "autograd / func / compiled | process peak RSS | foreign load | wait policy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for r in rows:
        if r.get("status") == "FAIL":
            L.append(f"| {r['model']} | {r.get('device', '-')} | - | **FAIL** | " + " | ".join(["-"] * 12) + " |")
            notes.append(f"* {r['model']}: the measurement failed: {r.get('error')}")
            continue
        p = r["paths"]

        def peak(label: str, p: dict[str, Any] = p) -> str:
            e = p.get(label, {})
            return f"{e['peak_mb']:.0f}" if e.get("status") == "ok" else "-"

        first = {k: (_t(p[k]["first_s"]) if p.get(k, {}).get("status") == "ok" else
                     ("FAIL" if p.get(k, {}).get("status") == "FAIL" else "-")) for k in ("autograd", "compiled")}
        if p.get("compiled", {}).get("block_first_s") is not None:
            first["compiled"] += f" ({_t(p['compiled']['block_first_s'])})"
        L.append(f"| {r['model']} ({r['what']}) | {r['device']}{' ' + r['gpu'] if r.get('gpu') else ''} | "
                 f"{r['n_params']:,} | {_t(r['gradient_s'])} | {first['autograd']} | {_cell(p.get('autograd'), 'one')} | "
                 f"{_cell(p.get('autograd'), 'block')} | {_cell(p.get('func'), 'one')} | {_cell(p.get('func'), 'block')} | "
                 f"{first['compiled']} | {_cell(p.get('compiled'), 'one')} | {_cell(p.get('compiled'), 'block')} | "
                 f"{peak('autograd')} / {peak('func')} / {peak('compiled')} | {r['peak_rss_mb']:.0f} MB | "
                 f"{100 * r.get('foreign_load', 0):.0f}% | {_policy(r.get('wait_policy'))} |")
        for label, e in p.items():
            if e.get("status") == "FAIL":
                notes.append(f"* {r['model']} ({r['device']}), {label} path failed: `{e['error']}`")
        a = r.get("agreement", {})
        if a:
            parts = [f"{k.replace('_vs_', ' vs ')} {v:.1e}" for k, v in a.items()]
            if p.get("compiled", {}).get("block_vs_func") is not None:
                parts.append(f"compiled block vs func block {p['compiled']['block_vs_func']:.1e}")
            notes.append(f"* {r['model']} ({r['device']}): relative differences of the products of one seeded vector: "
                         + ", ".join(parts) + ".")
    L += ["", "Agreement (relative 2-norm differences; float64: a float64 autograd product of the same vector on a "
          "float64 copy of the problem):", ""] + notes
    probe = section.get("layout_probe")
    if probe:
        def said(e: dict[str, Any]) -> str:
            if e.get("returncode") == 0:
                return f"runs, relative difference to the eager product {e['rel_diff']:.1e}"
            return f"exit status {e.get('returncode')}: `{e.get('error')}`"

        torch_version = next((r.get("torch") for r in rows if r.get("torch")), "?")
        L += ["", LAYOUT_NOTE.format(torch=torch_version) + ". The check on a 2-block ResNet (8x8 inputs), "
              f"each in a fresh process: layout optimisation on: {said(probe['on'])}; off: {said(probe['off'])}."]
    L += ["", f"For comparison, {CURVLINOPS_REFERENCE}; its gradients and products run on a GPU, these on "
          "the CPU threads named above unless the device column says cuda."]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=2, help="columns of the timed blocks (2-4)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="override the batch (resnet18 16, gpt2 8)")
    parser.add_argument("--seq", type=int, default=64, help="GPT-2 sequence length (default 64)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 product")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line (for run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        batch = args.batch or DEFAULTS[name]["batch"]
        rows.append(measure_model(name, batch=batch, seq=args.seq, device=args.device, repeats=args.repeats,
                                  block=args.block, compile=not args.no_compile, float64_check=not args.no_float64,
                                  progress=lambda msg: print(msg, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(rows))
    else:
        print(markdown({"rows": rows, "settings": {"device": args.device, "repeats": args.repeats,
                                                   "block": args.block, "threads": args.threads}}))


if __name__ == "__main__":
    main()
