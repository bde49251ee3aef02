"""``--max-memory``: the size parser, block sizing, and the out-of-memory retry on half the block."""

from __future__ import annotations

import logging

import pytest
import torch

from hesscli.analyses.density import DensityOptions
from hesscli.analyses.trace import TraceOptions
from hesscli.backends.native import NativeBackend
from hesscli.cli import main
from hesscli.config import resolve
from hesscli.errors import AnalysisError, InputError
from hesscli.memory import (
    VECTORS_PER_COLUMN,
    activation_bytes,
    is_out_of_memory,
    parse_size,
    plan_memory,
    resident_bytes,
)
from hesscli.operators.empirical import HessianOperator
from hesscli.options import EngineOptions
from tests.cases import mlp_ce
from tests.gloo import spawn_ranks
from tests.reference import exact_hessian

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- parser
@pytest.mark.parametrize(("text", "expected"), [
    ("2GB", 2_000_000_000), ("500MiB", 500 * 2**20), ("1.5G", int(1.5 * 2**30)), ("1000", 1000),
    (" 3 kb ", 3000), ("7B", 7), ("2gib", 2 * 2**30), ("1T", 2**40), (".5M", 2**19), (4096, 4096),
    ("64k", 65536),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "2XB", "-1", "0", "0.1", "nan", "1.5.2G", "G", "2 G B", True, None,
                                  -5, float("inf")])
def test_parse_size_bad(text):
    with pytest.raises(InputError) as ei:
        parse_size(text)
    msg = str(ei.value)
    assert "\n" not in msg and "--max-memory" in msg and "2GB" in msg


def test_config_accepts_sizes_and_bytes_and_refuses_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve({"max-memory": "1.5G"}).engine.max_memory == "1.5G"
    (tmp_path / "hesscli.toml").write_text("max-memory = 2000000\n")
    assert parse_size(resolve({}).engine.max_memory) == 2_000_000
    (tmp_path / "hesscli.toml").write_text('max_memory = "lots"\n')
    with pytest.raises(InputError, match="max-memory"):
        resolve({})
    (tmp_path / "hesscli.toml").unlink()
    assert resolve({}).engine.max_memory is None


def test_cli_bad_size_is_exit_2_with_one_line(tiny, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["trace", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data, "--max-memory", "lots", "-q"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert ei.value.code == 2
    assert len(lines) == 1 and "--max-memory" in lines[0] and "'lots'" in lines[0], err


def test_cli_budget_gives_the_numbers_of_no_budget(tiny, capsys):
    def run(*extra: str) -> str:
        with pytest.raises(SystemExit) as ei:
            main(["trace", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data, "--json",
                  "--out", str(tiny.folder / "out"), "--method", "hutchinson", "--probes", "30", *extra])
        assert ei.value.code == 0
        return capsys.readouterr().out

    import json

    free = json.loads(run())
    tight = json.loads(run("--max-memory", "3KB"))  # one column on chunks of 4 of the 40 samples

    def estimate(doc):
        return doc["result"]["estimate"] if "result" in doc else doc["estimate"]

    assert estimate(tight) == pytest.approx(estimate(free), rel=1e-5)


# ----------------------------------------------------------------------------- sizing
def test_smaller_budgets_pick_smaller_blocks_then_chunks():
    n, per_sample, batch = 100_000, 20_000, 256
    blocks, chunks = [], []
    for budget in (10**9, 10**8, 2 * 10**7, 8 * 10**6, 3 * 10**6):
        p = plan_memory(budget, n=n, itemsize=4, per_sample=per_sample, batch=batch)
        blocks.append(p.block_size)
        chunks.append(p.chunk)
    assert blocks == sorted(blocks, reverse=True) and blocks[0] == 16 and blocks[-1] == 1
    assert chunks[0] is None and chunks[-1] is not None and chunks[-1] < batch
    with pytest.raises(InputError, match="raise --max-memory"):
        plan_memory(10_000, n=n, itemsize=4, per_sample=per_sample, batch=batch)


def test_held_vectors_and_resident_bytes_count():
    kw = dict(n=10_000, itemsize=4, per_sample=1_000, batch=64)
    free = plan_memory(5_000_000, **kw).block_size
    assert plan_memory(5_000_000, held=3_000_000, **kw).block_size < free
    assert plan_memory(5_000_000, resident=3_000_000, **kw).block_size < free


def test_batchnorm_batch_refuses_to_chunk():
    with pytest.raises(InputError, match="--batchnorm batch"):
        plan_memory(200_000, n=1_000, itemsize=4, per_sample=10_000, batch=512, can_chunk=False)


def test_backend_fit_lowers_columns_for_lower_budgets():
    problem = mlp_ce()
    blocks = []
    for budget in ("100MB", "60KB", "40KB"):
        backend = NativeBackend(EngineOptions(max_memory=budget, hvp="func"))  # blocks batch columns there
        op = backend.operator(problem)
        blocks.append(backend.fit(op))
        assert op.max_columns == blocks[-1]
    assert blocks[0] == 16 and blocks == sorted(blocks, reverse=True) and blocks[-1] < 16
    assert activation_bytes(problem) > 0 and resident_bytes(problem) > 0


@pytest.mark.parametrize(("engine", "one_by_one"), [
    ({}, True),  # CPU Hessian: double backward over cached graphs, column by column
    ({"hvp": "autograd"}, True),
    ({"hvp": "func"}, False),  # vmapped blocks: a block is one batched pass
    ({"curvature": "ggn"}, False),  # the GGN's autograd path runs a forward pass per block
])
def test_blocks_stay_small_where_columns_are_multiplied_one_at_a_time(engine, one_by_one):
    from hesscli.memory import COLUMN_BLOCK, DEFAULT_BLOCK

    problem = mlp_ce()
    for budget in (None, "100MB"):
        backend = NativeBackend(EngineOptions(max_memory=budget, **engine))
        op = backend.operator(problem)
        assert op.one_column_at_a_time is one_by_one
        assert backend.fit(op) == (COLUMN_BLOCK if one_by_one else DEFAULT_BLOCK)
    # the numbers do not depend on it: the same trace as with blocks of 16 (float64)
    if one_by_one and not engine:
        from hesscli.algorithms.hutchpp import hutchpp

        op = NativeBackend().operator(problem)
        small = NativeBackend().trace(problem, TraceOptions(method="hutch++", probes=60), _gen())
        big = hutchpp(op, n_matvecs=60, generator=_gen(), block_size=DEFAULT_BLOCK)
        assert small.estimate == pytest.approx(big.estimate, rel=1e-12) and small.stderr == pytest.approx(big.stderr)


def test_hutchpp_basis_too_big_is_refused_with_the_fix():
    problem = mlp_ce()
    n = problem.n_params
    resident = resident_bytes(problem)
    per_sample = activation_bytes(problem)
    one_column = VECTORS_PER_COLUMN * n * 8 + 7 * per_sample
    budget = resident + 2 * one_column  # room for products, not for a basis of 30 vectors held 3 times
    backend = NativeBackend(EngineOptions(max_memory=str(budget)))
    with pytest.raises(InputError) as ei:
        backend.trace(problem, TraceOptions(method="hutch++", probes=90), _gen())
    msg = str(ei.value)
    assert "\n" not in msg and "Q" in msg and "--max-memory" in msg
    import re

    fits = int(re.search(r"use at most --probes (\d+)", msg).group(1))
    assert 3 <= fits < 90
    assert backend.trace(problem, TraceOptions(method="hutch++", probes=fits), _gen()).n_hvp == fits
    # Hutchinson keeps no basis: the same budget works
    assert backend.trace(problem, TraceOptions(method="hutchinson", probes=8), _gen()).n_hvp == 8


def test_hutchpp_basis_is_held_once():
    """Q is formed in the sketch's memory: a budget with room for one basis (and the float64 chunks of
    its orthonormalisation) runs, where a basis held three times (sketch, QR copy, Q) would not fit."""
    from hesscli.algorithms.hutchpp import orth_chunk_bytes
    from hesscli.memory import HEADROOM

    problem = mlp_ce()
    n = problem.n_params
    resident = resident_bytes(problem)
    one_column = VECTORS_PER_COLUMN * n * 8 + activation_bytes(problem)
    basis = 30 * n * 8
    budget = int((resident + one_column + 1.5 * basis + orth_chunk_bytes(n, 30)) / HEADROOM)
    assert budget * HEADROOM < resident + one_column + 3 * basis
    r = NativeBackend(EngineOptions(max_memory=str(budget))).trace(problem, TraceOptions(method="hutch++", probes=90),
                                                                   _gen())
    free = NativeBackend().trace(problem, TraceOptions(method="hutch++", probes=90), _gen())
    assert r.n_hvp == 90 and r.estimate == pytest.approx(free.estimate, rel=1e-10)


def test_density_holds_one_run_at_a_time_where_products_take_one_column():
    """CPU Hessian products over a cached graph: the SLQ runs go one after the other, so a budget
    with room for one run's basis (not five) runs, and gives the density of no budget."""
    from hesscli.memory import HEADROOM

    problem = mlp_ce()
    n = problem.n_params
    resident = resident_bytes(problem)
    per_sample = activation_bytes(problem)
    one_column = VECTORS_PER_COLUMN * n * 8 + per_sample
    cache = problem.data.n_samples * per_sample
    one_run = 21 * n * 8  # 20 steps and a start vector
    budget = int((resident + 2 * one_column + cache + 2 * one_run) / HEADROOM)
    assert budget * HEADROOM < resident + one_column + 5 * one_run
    options = DensityOptions(runs=5, iters=20)
    r = NativeBackend(EngineOptions(max_memory=str(budget))).density(problem, options, _gen())
    free = NativeBackend().density(problem, options, _gen())
    assert r.n_hvp == free.n_hvp == 100
    assert torch.allclose(r.nodes, free.nodes, atol=1e-10) and torch.allclose(r.weights, free.weights, atol=1e-10)


def test_density_runs_go_together_again_when_the_graph_cache_does_not_fit(caplog):
    """Budgets from too small to ample: where the gradient graphs are cached the runs go one after
    the other; where the cache does not fit, products rebuild the graphs, so the runs go together
    when their bases fit, and one after the other (said at INFO) when they do not. The density
    is the same throughout."""
    problem = mlp_ce()
    options = DensityOptions(runs=5, iters=3)
    free = NativeBackend().density(problem, options, _gen())
    seen = set()
    for budget in range(6000, 22000, 128):  # mlp_ce: refused below ~7 kB, graphs cached above ~20 kB
        backend = NativeBackend(EngineOptions(max_memory=str(budget)))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hesscli.backends.native"):
            try:
                r = backend.density(problem, options, _gen())
            except InputError:
                continue
        op = backend.last_operator
        assert op is not None
        seen.add((op.cache_graph, "go one after the other" in caplog.text))
        assert r.n_hvp == 15 and torch.allclose(r.nodes, free.nodes, atol=1e-10), budget
    # (cached, alone): cached graphs; no cache, runs together; no cache, runs alone
    assert {(True, False), (False, False), (False, True)} <= seen, seen


# ----------------------------------------------------------------------------- out-of-memory retry
def _failing(op: HessianOperator, max_columns: int, max_chunk: int | None = None, message: str = OOM) -> list[int]:
    """Make ``op``'s products raise a simulated out-of-memory error on blocks wider than ``max_columns``
    (or chunks larger than ``max_chunk``); returns the widths of the blocks that went through."""
    inner = op._matmat_any
    widths: list[int] = []

    def product(V: torch.Tensor) -> torch.Tensor:
        chunk = max(y.shape[0] for _, y in op.batches)
        if V.shape[1] > max_columns or (max_chunk is not None and chunk > max_chunk):
            torch.empty(1000)  # some allocation in flight when it fails
            raise RuntimeError(message)
        widths.append(V.shape[1])
        return inner(V)

    op._matmat_any = product  # type: ignore[method-assign]
    return widths


@pytest.mark.parametrize("path", ["autograd", "func"])
def test_retry_gives_the_same_hutchpp_trace_and_counts_each_column_once(path, caplog):
    problem = mlp_ce()
    H = exact_hessian(problem)
    options = TraceOptions(method="hutch++", probes=180)  # s = 60 >= 57 parameters: Q spans everything
    engine = EngineOptions(hvp=path)
    ref = NativeBackend(engine).trace(problem, options, _gen())
    backend = NativeBackend(engine)
    widths = _failing(backend.operator(problem), max_columns=3)
    with caplog.at_level(logging.INFO, logger="hesscli.operators.empirical"):
        got = backend.trace(problem, options, _gen())
    assert widths and max(widths) <= 3
    assert got.n_hvp == ref.n_hvp == 180 and backend.last_operator.n_matvecs == 180
    assert got.estimate == pytest.approx(ref.estimate, rel=1e-12, abs=1e-12)
    assert got.estimate == pytest.approx(float(torch.trace(H)), rel=1e-8)
    assert any("out of memory" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_retry_gives_the_same_slq_density():
    problem = mlp_ce()
    options = DensityOptions(iters=12, runs=6, grid=50)
    ref = NativeBackend().density(problem, options, _gen(3))
    backend = NativeBackend()
    widths = _failing(backend.operator(problem), max_columns=2)
    got = backend.density(problem, options, _gen(3))
    assert max(widths) <= 2
    assert got.n_hvp == ref.n_hvp == 72 and backend.last_operator.n_matvecs == 72
    assert torch.allclose(got.alphas, ref.alphas, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got.density, ref.density, rtol=1e-8, atol=1e-10)
    # the quadrature nodes lie within the exact spectrum
    eig = torch.linalg.eigvalsh(exact_hessian(problem))
    assert float(got.nodes.min()) >= float(eig[0]) - 1e-8 and float(got.nodes.max()) <= float(eig[-1]) + 1e-8


@pytest.mark.parametrize("path", ["autograd", "func"])
def test_retry_halves_the_data_chunk_when_one_column_fails(path):
    problem = mlp_ce(batch_size=7)
    H = exact_hessian(problem)
    op = HessianOperator(problem, hvp=path)
    _failing(op, max_columns=1, max_chunk=2)
    V = torch.randn(op.size, 5, generator=_gen(4), dtype=torch.float64)
    out = op @ V
    assert torch.allclose(out, H @ V, rtol=1e-10, atol=1e-12)
    assert op.n_matvecs == 5 and op.chunk == 2 and op.max_columns == 1
    assert sum(y.shape[0] for _, y in op.batches) == 23


def test_chunks_keep_the_weights_of_token_counts():
    """A loss averaged over counted terms (here: targets other than 0): each chunk gets its share."""
    import torch.nn.functional as F

    from hesscli.loading.build import weigh_batches
    from hesscli.loading.problem import LossSpec

    problem = mlp_ce(batch_size=7)
    problem.loss = LossSpec("ce_ignore_0", lambda o, t: F.cross_entropy(o, t, ignore_index=0),
                            count=lambda t: (t != 0).sum(), unit="tokens")
    weigh_batches(problem.data, problem.loss)
    eye = torch.eye(problem.n_params, dtype=torch.float64)[:, :4]
    ref_op = HessianOperator(problem, hvp="autograd")
    ref = ref_op @ eye
    loss_ref, g_ref = ref_op.loss_and_gradient()
    op = HessianOperator(problem, hvp="autograd")
    op.set_chunk(3)
    assert max(y.shape[0] for _, y in op.batches) == 3
    assert torch.allclose(op @ eye, ref, rtol=1e-10, atol=1e-13)
    loss, g = op.loss_and_gradient()
    assert loss == pytest.approx(loss_ref, rel=1e-12) and torch.allclose(g, g_ref, rtol=1e-10, atol=1e-13)


def test_retry_gives_up_with_one_line_naming_the_options():
    op = HessianOperator(mlp_ce(batch_size=7), hvp="autograd")
    _failing(op, max_columns=0, message="DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
    with pytest.raises(AnalysisError) as ei:
        op @ torch.ones(op.size, 2, dtype=torch.float64)
    msg = str(ei.value)
    assert "\n" not in msg and "--max-memory" in msg and "--batch-size" in msg
    assert op.n_matvecs == 0


def test_other_errors_are_not_retried():
    op = HessianOperator(mlp_ce(), hvp="autograd")
    _failing(op, max_columns=1, message="mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        op @ torch.ones(op.size, 4, dtype=torch.float64)


def test_under_distributed_the_retry_is_refused():
    op = HessianOperator(mlp_ce(), hvp="autograd", reduce=lambda t: t)
    _failing(op, max_columns=1)
    with pytest.raises(AnalysisError, match="torch.distributed"):
        op @ torch.ones(op.size, 4, dtype=torch.float64)


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1024 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ----------------------------------------------------------------------------- torch.distributed
DIST_SETTINGS = {
    "trace": {"method": "hutchinson", "probes": 12, "dtype": "float64", "seed": 3},
    "density": {"iters": 12, "runs": 3, "dtype": "float64", "seed": 3},
}
DIST_BUDGETS = {"trace": "6000", "density": "28000"}
"""Bytes that leave one column on chunks of a few samples (beside the SLQ bases for density)."""


def _dist_worker(rank: int, world: int, init: str, queue) -> None:
    import torch.distributed as dist

    from hesscli.api import analyse
    from hesscli.config import Settings
    from hesscli.distributed import DistContext
    from hesscli.loading.problem import Dataset

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        problem = mlp_ce()
        x = torch.cat([b[0] for b in problem.data.batches])
        y = torch.cat([b[1] for b in problem.data.batches])
        lo, hi = len(x) * rank // world, len(x) * (rank + 1) // world  # 11 and 12 samples
        xs, ys = x[lo:hi], y[lo:hi]
        problem.data = Dataset(batches=[(xs[i:i + 7], ys[i:i + 7]) for i in range(0, len(xs), 7)],
                               n_samples=len(xs), n_total=len(x))
        ctx = DistContext(rank, world)
        out: dict[str, object] = {}
        try:
            for analysis, options in DIST_SETTINGS.items():
                result = analyse(problem, analysis, Settings(**options, max_memory=DIST_BUDGETS[analysis]),
                                 reduce=ctx.all_reduce_sum).result
                out[analysis] = [result.estimate] if analysis == "trace" else result.alphas.flatten().tolist()
        except Exception as e:  # reported by the test rather than hanging it
            out = {"error": repr(e)}
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_processes_plan_alike_and_match_one_without_budget(tmp_path):
    from hesscli.api import analyse
    from hesscli.config import Settings

    single = mlp_ce()
    expected = {}
    for analysis, options in DIST_SETTINGS.items():
        r = analyse(single, analysis, Settings(**options)).result
        expected[analysis] = [r.estimate] if analysis == "trace" else r.alphas.flatten().tolist()
    results = spawn_ranks(_dist_worker, tmp_path)  # shards of different sizes on the two ranks
    assert "error" not in results[0] and "error" not in results[1], results
    for analysis in DIST_SETTINGS:
        assert results[0][analysis] == results[1][analysis]
        assert torch.allclose(torch.tensor(results[0][analysis]), torch.tensor(expected[analysis]),
                              rtol=1e-8, atol=1e-10), analysis


def test_peer_backends_refuse_a_budget():
    from hesscli.backends import get_backend
    from hesscli.errors import UnsupportedAnalysis

    with pytest.raises(UnsupportedAnalysis, match="--backend native"):
        get_backend(EngineOptions(backend="pyhessian", max_memory="1GB"))


# ----------------------------------------------------------------------------- scans
SCAN_MODEL_PY = """
from torch import nn

def make():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
"""


def test_scan_with_a_budget_matches_one_without(tmp_path, caplog):
    """Warm starts, shared Lanczos runs and deflated densities with products sized to a budget."""
    from pathlib import Path

    from hesscli.config import Settings
    from hesscli.scan import run_scan

    d = tmp_path / "run"
    d.mkdir()
    (d / "model.py").write_text(SCAN_MODEL_PY)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)
    torch.save({"inputs": x, "targets": y}, d / "data.pt")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
        torch.save({"model_state_dict": model.state_dict(), "step": step}, d / f"ckpt_{step:04d}.pt")

    def scan(out: str, **kw):
        settings = Settings(model=f"{d / 'model.py'}:make", data=str(d / "data.pt"), dtype="float64", top_k=3,
                            analyses=("trace", "eigs", "extremes", "density"), probes=30, iters=20, runs=3,
                            out=tmp_path / out, **kw)
        report = run_scan(d, settings)
        assert all(o.run.status == "ok" for o in report.outcomes), [o.run.error for o in report.outcomes]
        return {(Path(o.run.checkpoint).name, o.run.analysis): o for o in report.outcomes}

    free = scan("free")
    with caplog.at_level(logging.INFO, logger="hesscli.backends.native"):
        tight = scan("tight", max_memory="150KB")
    plans = [r.getMessage() for r in caplog.records if "column(s) per product" in r.getMessage()]
    assert plans and any("chunks of" in p for p in plans), plans
    assert free.keys() == tight.keys()
    for key, a in free.items():
        b = tight[key]
        assert a.run.n_hvp == b.run.n_hvp, key
        if key[1] == "trace":
            assert b.result.estimate == pytest.approx(a.result.estimate, rel=1e-9), key
        elif key[1] == "eigs":
            assert b.result.eigenvalues == pytest.approx(a.result.eigenvalues, rel=1e-8), key
        elif key[1] == "density":
            assert torch.allclose(b.result.alphas, a.result.alphas, rtol=1e-7, atol=1e-9), key
