"""Scanning a training run: ordering, failure isolation, resume, shards, interruption, monitor parity."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from hesscli.cli import app
from hesscli.config import Settings
from hesscli.monitor import CurvatureMonitor
from hesscli.results.parquet import write_outcomes
from hesscli.scan import find_checkpoints, order_checkpoints, run_scan, take_shard

runner = CliRunner()

MODEL_PY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    """
)

NAMES = {  # file name -> (how it is saved, expected step)
    "ckpt_000500.pt": ("nested", 500),
    "epoch=3-step=200.ckpt": ("nested", 200),
    "model_step50.pt": ("bare", 50),
    "weights.pt": ("meta", 1000),
    "final.pt": ("bare", None),
}


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "model.py").write_text(MODEL_PY)
    x, y = _data()
    torch.save({"inputs": x, "targets": y}, d / "data.pt")
    for i, (name, (kind, step)) in enumerate(NAMES.items()):
        torch.manual_seed(i)
        sd = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).state_dict()
        if kind == "nested":
            obj = {"model_state_dict": sd, "epoch": 1}
        elif kind == "meta":
            obj = {"model_state_dict": sd, "global_step": step}
        else:
            obj = sd
        torch.save(obj, d / name)
    return d


def _settings(run_dir: Path, out: Path, **kw) -> Settings:
    base = dict(model=f"{run_dir / 'model.py'}:make", data=str(run_dir / "data.pt"), dtype="float64",
                probes=12, top_k=2, iters=10, runs=2, out=out)
    base.update(kw)
    return Settings(**base)


def test_order_across_naming_styles(run_dir):
    entries = order_checkpoints(find_checkpoints(run_dir, exclude=[run_dir / "data.pt"]))
    assert [e.path.name for e in entries] == ["model_step50.pt", "epoch=3-step=200.ckpt", "ckpt_000500.pt",
                                              "weights.pt", "final.pt"]
    assert [e.step for e in entries] == [50, 200, 500, 1000, None]


def test_shards_partition_the_folder(run_dir):
    entries = order_checkpoints(find_checkpoints(run_dir, exclude=[run_dir / "data.pt"]))
    parts = [take_shard(entries, f"{i}/3") for i in (1, 2, 3)]
    names = [e.path.name for p in parts for e in p]
    assert sorted(names) == sorted(e.path.name for e in entries)
    assert len(names) == len(set(names))


def _scan_cli(run_dir: Path, out: Path, *extra: str):
    return runner.invoke(app, ["scan", str(run_dir), "--model", f"{run_dir / 'model.py'}:make", "--data",
                               str(run_dir / "data.pt"), "--analyses", "trace,extremes", "--probes", "12",
                               "--dtype", "float64", "--out", str(out), *extra])


def test_corrupt_checkpoint_is_a_failed_row_and_the_rest_complete(run_dir, tmp_path):
    (run_dir / "ckpt_000300.pt").write_bytes(b"not a checkpoint at all" * 10)
    out = tmp_path / "out"
    result = _scan_cli(run_dir, out)
    assert result.exit_code == 1, result.output
    assert "ckpt_000300.pt" in result.output
    runs = pd.read_parquet(out / "runs")
    failed = runs[runs.status == "failed"]
    assert set(failed.checkpoint.map(lambda p: Path(p).name)) == {"ckpt_000300.pt"}
    assert failed.error.str.len().min() > 10
    ok = runs[runs.status == "ok"]
    assert len(ok) == 2 * len(NAMES)
    trace = pd.read_parquet(out / "trace")
    assert set(trace[trace.param_group == "all"].run_id) == set(ok[ok.analysis == "trace"].run_id)


def test_resume_computes_nothing_twice(run_dir, tmp_path):
    out = tmp_path / "out"
    assert _scan_cli(run_dir, out).exit_code == 0
    first = pd.read_parquet(out / "runs")
    second = _scan_cli(run_dir, out)
    assert second.exit_code == 0, second.output
    assert len(pd.read_parquet(out / "runs")) == len(first)
    # a changed option is a different analysis: it runs
    assert _scan_cli(run_dir, out, "--probes", "13").exit_code == 0
    assert len(pd.read_parquet(out / "runs")) == len(first) + len(NAMES)
    # --no-resume recomputes
    assert _scan_cli(run_dir, out, "--no-resume").exit_code == 0
    assert len(pd.read_parquet(out / "runs")) == 2 * len(first) + len(NAMES)


def test_shards_write_to_one_out_and_cover_everything(run_dir, tmp_path):
    out = tmp_path / "out"
    for i in (1, 2):
        assert _scan_cli(run_dir, out, "--shard", f"{i}/2").exit_code == 0
    runs = pd.read_parquet(out / "runs")
    assert sorted(runs.checkpoint.map(lambda p: Path(p).name)) == sorted(n for n in NAMES for _ in range(2))


def test_interrupted_scan_leaves_readable_tables_and_resumes(run_dir, tmp_path):
    out = tmp_path / "out"
    settings = _settings(run_dir, out, analyses=("trace", "eigs"))
    calls = {"n": 0}

    def write(outcomes):
        write_outcomes(out, outcomes)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scan(run_dir, settings, write=write)
    runs = pd.read_parquet(out / "runs")
    assert len(runs) == 4 and (runs.status == "ok").all()
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".parquet")]
    report = run_scan(run_dir, settings, write=lambda o: write_outcomes(out, o))
    assert len(report.skipped) == 4 and len(report.outcomes) == 2 * (len(NAMES) - 2)
    assert len(pd.read_parquet(out / "runs")) == 2 * len(NAMES)


def test_common_random_numbers_across_checkpoints(run_dir, tmp_path):
    """Same seed => same probes for every checkpoint: identical checkpoints give identical estimates."""
    # the same weights saved again with other metadata (a byte-identical copy would be analysed once)
    torch.save({**torch.load(run_dir / "ckpt_000500.pt"), "note": "copy"}, run_dir / "ckpt_000600.pt")
    report = run_scan(run_dir, _settings(run_dir, tmp_path / "o", analyses=("trace",), method="hutchinson"))
    by_name = {Path(o.run.checkpoint).name: o.result.estimate for o in report.outcomes}
    assert by_name["ckpt_000500.pt"] == by_name["ckpt_000600.pt"]


def test_monitor_writes_the_same_rows_as_a_scan(tmp_path):
    x, y = _data()
    x, y = x.double(), y
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.py").write_text(MODEL_PY)
    torch.save({"inputs": x, "targets": y}, run / "data.pt")
    opts = dict(dtype="float64", probes=12, top_k=2, seed=5)
    monitor = CurvatureMonitor("cross_entropy", (x, y), analyses=("trace", "eigs"), every=3,
                               out=tmp_path / "live", **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for step in range(7):
        monitor.step(model, step)
        assert model.training
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # the same steps, saved as checkpoints the way a loop saves them, then scanned
    torch.manual_seed(0)
    model2 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    for step in range(7):
        if step % 3 == 0:
            torch.save({"model_state_dict": model2.state_dict(), "step": step}, run / f"ckpt_{step:06d}.pt")
        opt2.zero_grad()
        torch.nn.functional.cross_entropy(model2(x), y).backward()
        opt2.step()
    run_scan(run, Settings(model=f"{run / 'model.py'}:make", data=str(run / "data.pt"), out=tmp_path / "scan",
                           analyses=("trace", "eigs"), **opts),
             write=lambda o: write_outcomes(tmp_path / "scan", o))
    for table, cols in (("trace", ["estimate", "stderr"]), ("eigs", ["eigenvalue", "residual"])):
        live = pd.read_parquet(tmp_path / "live" / table).sort_values(["step", *cols[:1]]).reset_index(drop=True)
        scan = pd.read_parquet(tmp_path / "scan" / table).sort_values(["step", *cols[:1]]).reset_index(drop=True)
        assert list(live.columns) == list(scan.columns)
        assert list(live.step) == list(scan.step) and sorted(set(live.step)) == [0, 3, 6]
        pd.testing.assert_frame_equal(live[cols], scan[cols], rtol=1e-9)


def test_scan_serves_extremes_and_a_deflated_density_from_the_eigs_run(run_dir, tmp_path):
    # one value at each end: one run serves eigs and extremes, and its converged pairs are deflated from the density
    settings = _settings(run_dir, tmp_path / "o", analyses=("eigs", "extremes", "density"), iters=6, runs=2,
                         max_iter=40, top_k=1)
    report = run_scan(run_dir, settings)
    by = {}
    for o in report.outcomes:
        assert o.run.status == "ok", o.run.error
        by.setdefault(o.run.checkpoint, {})[o.run.analysis] = o
    assert len(by) == 5
    for outs in by.values():
        assert outs["extremes"].run.n_hvp == 0  # from the eigs run
        assert outs["density"].run.n_hvp == 12  # both SLQ runs, of the deflated operator
        dens = outs["density"].result
        assert 1 <= dens.deflated <= 2 and dens.nodes.shape == (2, 6 + dens.deflated)
