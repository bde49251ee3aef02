"""Data parallelism with torch.distributed on CPU (gloo): 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from hesscli.api import analyse
from hesscli.config import Settings
from hesscli.distributed import DistContext
from hesscli.loading.problem import Dataset
from tests.cases import cnn_bn_ce, mlp_ce
from tests.gloo import spawn_ranks

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"

SETTINGS = {
    "trace": Settings(method="hutchinson", probes=12, dtype="float64", seed=3),
    "eigs": Settings(top_k=3, which="both", dtype="float64", seed=3),
    "density": Settings(iters=12, runs=3, dtype="float64", seed=3),
}


def _shard(problem, rank: int, world: int):
    """Rank ``rank``'s contiguous share of the samples, batched, with the global sample count."""
    x = torch.cat([b[0] for b in problem.data.batches])
    y = torch.cat([b[1] for b in problem.data.batches])
    n = len(x)
    bounds = [n * r // world for r in range(world + 1)]
    xs, ys = x[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]]
    batches = [(xs[i : i + 4], ys[i : i + 4]) for i in range(0, len(xs), 4)]
    problem.data = Dataset(batches=batches, n_samples=len(xs), n_total=n)
    return problem


def _numbers(result) -> torch.Tensor:
    if hasattr(result, "eigenvalues"):
        return torch.tensor(result.eigenvalues + result.residuals, dtype=torch.float64)
    if hasattr(result, "nodes"):
        return torch.cat([result.nodes.flatten(), result.weights.flatten(), result.density.flatten()])
    return torch.tensor([result.estimate, result.stderr] + [g.estimate for g in result.groups], dtype=torch.float64)


def _worker(rank: int, world: int, init: str, case: str, queue) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world)
        problem = _shard({"mlp": mlp_ce, "cnn": cnn_bn_ce}[case](), rank, world)
        out = {}
        for analysis, settings in SETTINGS.items():
            outcome = analyse(problem, analysis, settings, reduce=ctx.all_reduce_sum)
            out[analysis] = (_numbers(outcome.result).tolist(), outcome.run.loss_value)  # plain lists: no shared memory
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_two_gloo_processes_equal_one(case, tmp_path):
    single_problem = {"mlp": mlp_ce, "cnn": cnn_bn_ce}[case]()
    expected = {a: (_numbers(analyse(single_problem, a, s).result), None) for a, s in SETTINGS.items()}
    results = spawn_ranks(_worker, tmp_path, case)
    for rank in (0, 1):
        for analysis, (numbers, loss) in results[rank].items():
            numbers = torch.tensor(numbers, dtype=torch.float64)
            assert torch.allclose(numbers, expected[analysis][0], rtol=1e-8, atol=1e-10), (rank, analysis)
    # identical state on every rank
    for analysis in SETTINGS:
        assert results[0][analysis][0] == results[1][analysis][0]


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def _cli(args: list[str], cwd: Path, nproc: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "hesscli", *args]
    else:
        cmd = [sys.executable, "-m", "hesscli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_cli_matches_single_process_and_writes_once(tmp_path):
    assert TORCHRUN is not None, "torchrun ships with torch"
    ckpt = "ckpt_step000400.pt"
    args = ["eigs", ckpt, "--top-k", "3", "--dtype", "float64", "--max-samples", "300", "--json"]
    one = _cli(args + ["--out", str(tmp_path / "one")], SAMPLES, None)
    assert one.returncode == 0, one.stderr
    two = _cli(args + ["--out", str(tmp_path / "two")], SAMPLES, 2)
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert len(two.stdout.strip().splitlines()) == 1  # only rank 0 prints
    ea = [r["eigenvalue"] for r in a["rows"]] if "rows" in a else a["result"]["eigenvalues"]
    eb = [r["eigenvalue"] for r in b["rows"]] if "rows" in b else b["result"]["eigenvalues"]
    assert torch.allclose(torch.tensor(ea), torch.tensor(eb), rtol=1e-8)
    runs = pd.read_parquet(tmp_path / "two" / "runs")
    assert len(runs) == 1 and runs["n_samples"].iloc[0] == 300
    assert len(pd.read_parquet(tmp_path / "two" / "eigs")) == 3


def test_error_on_one_rank_ends_the_job_with_its_message(tmp_path):
    """Rank 1 fails while loading; torchrun stops rank 0 (which would wait in a collective)."""
    (tmp_path / "data.py").write_text(
        "import os, torch\n"
        "def make():\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('shard on rank 1 is unreadable')\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g)\n"
    )
    args = ["trace", "ckpt_step000400.pt", "--data", f"{tmp_path / 'data.py'}:make", "--out", str(tmp_path / "o")]
    result = _cli(args, SAMPLES, 2)
    assert result.returncode != 0
    assert "shard on rank 1 is unreadable" in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "shard on rank 1 is unreadable" in ours[0]  # one line from the failing rank
    assert not (tmp_path / "o" / "runs").exists()
