"""``hesscli landscape`` through the registry: the Python function, the command, scan and plot,
against exact answers (the algorithms themselves: tests/test_landscape_core.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import hesscli
from hesscli.cli import app, main
from tests.cases import mlp_ce
from tests.gloo import spawn_ranks

runner = CliRunner()


def _regression(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=g,
                                                                                          dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    return model, X, y


def _exact_top2(X: torch.Tensor) -> torch.Tensor:
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    return torch.linalg.eigvalsh(2 * A.T @ A / len(X)).flip(0)[:2]  # mean MSE of a linear model


def test_eigen_directions_give_the_exact_quadratic(tmp_path):
    model, X, y = _regression()
    r = hesscli.landscape(model, "mse", (X, y), directions="eigs", dims=2, steps=7, span=0.8, dtype="float64")
    lam = _exact_top2(X)
    assert torch.allclose(torch.tensor(r.eigenvalues, dtype=torch.float64), lam, rtol=1e-8)
    a, b = torch.meshgrid(r.alphas, r.betas, indexing="ij")
    a, b, loss = a.reshape(-1), b.reshape(-1), r.loss.reshape(-1)
    design = torch.stack([torch.ones_like(a), a, b, a * a / 2, b * b / 2, a * b], 1)
    coef = torch.linalg.lstsq(design, loss.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(coef[3:5], lam, rtol=1e-8)  # fitted curvatures are λ1, λ2
    assert abs(float(coef[5])) < 1e-8 * float(lam[0])  # no αβ term
    with torch.no_grad():
        center = float(((model(X) - y) ** 2).mean())
    assert abs(float(coef[0]) - center) < 1e-10 and abs(r.center_loss - center) < 1e-12
    assert r.n_hvp > 0 and r.n_forward == 7 * 7 + 1 and r.accuracy is None


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))\n")
    g = torch.Generator().manual_seed(1)
    torch.save({"inputs": torch.randn(48, 4, generator=g), "targets": torch.randint(0, 3, (48,), generator=g)},
               tmp_path / "data.pt")
    run = tmp_path / "run"
    run.mkdir()
    for step in (100, 200):
        torch.manual_seed(step)
        torch.save(_net().state_dict(), run / f"ckpt_{step:06d}.pt")
    return {"model": f"{tmp_path / 'nets.py'}:make", "data": str(tmp_path / "data.pt"), "run": str(run)}


def test_command_writes_the_table_and_the_plots(tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    ckpt = str(Path(f["run"]) / "ckpt_000100.pt")
    base = ["landscape", ckpt, "--model", f["model"], "--data", f["data"], "--out", str(out), "--dtype", "float64"]
    one = runner.invoke(app, [*base, "--steps", "5", "--json"])
    assert one.exit_code == 0, one.output
    doc = json.loads(one.stdout)
    assert doc["run"]["analysis"] == "landscape" and doc["run"]["method"] == "grid-random"
    two = runner.invoke(app, [*base, "--dims", "2", "--steps", "4", "--directions", "eigs", "--quiet"])
    assert two.exit_code == 0, two.output
    table = pd.read_parquet(out / "landscape")
    lines, planes = table[table["beta"].isna()], table[table["beta"].notna()]
    assert len(lines) == 5 and len(planes) == 16
    assert set(lines["direction_kind"]) == {"random"} and set(planes["direction_kind"]) == {"eigs"}
    assert planes["eigenvalue_1"].iloc[0] >= planes["eigenvalue_2"].iloc[0]
    assert lines["accuracy"].between(0, 1).all() and (lines["n_forward"] == 6).all()
    centre = lines[lines["alpha"].abs() < 1e-12]["loss"].iloc[0]
    runs = pd.read_parquet(out / "runs")
    assert abs(centre - runs[runs.analysis == "landscape"]["loss_value"].iloc[0]) < 1e-12
    plot = runner.invoke(app, ["plot", str(out)])
    assert plot.exit_code == 0, plot.output
    assert (out / "plots" / "landscape_1d.png").stat().st_size > 0
    assert (out / "plots" / "landscape_2d.png").stat().st_size > 0


def test_saved_eigenvectors_are_read_back_and_random_directions_repeat_across_checkpoints(tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    ckpt = str(Path(f["run"]) / "ckpt_000100.pt")
    common = [ckpt, "--model", f["model"], "--data", f["data"], "--out", str(out), "--dtype", "float64", "--json"]
    eigs = runner.invoke(app, ["eigs", *common, "--top-k", "2", "--save-vectors"])
    assert eigs.exit_code == 0, eigs.output
    saved = json.loads(eigs.stdout)["eigenvectors_path"]
    fresh = json.loads(runner.invoke(app, ["landscape", *common, "--directions", "eigs", "--steps", "5"]).stdout)
    read = json.loads(runner.invoke(app, ["landscape", *common, "--directions", "eigs", "--steps", "5",
                                          "--vectors", saved]).stdout)
    assert read["result"]["n_hvp"] == 1 and fresh["result"]["n_hvp"] > 1  # vᵀHv at this checkpoint: one product
    assert read["result"]["eigenvalues"] == pytest.approx(fresh["result"]["eigenvalues"][:1], rel=1e-8)
    got, want = read["result"]["loss"][0], fresh["result"]["loss"][0]  # an eigenvector's sign is arbitrary
    assert got == pytest.approx(want, rel=1e-6) or got == pytest.approx(want[::-1], rel=1e-6)

    # a scan: the same raw random directions on every checkpoint (common random numbers), resumable
    scan = ["scan", f["run"], "--model", f["model"], "--data", f["data"], "--out", str(tmp_path / "s"),
            "--analyses", "landscape", "--normalize", "none", "--steps", "3", "--save-vectors", "--quiet"]
    assert runner.invoke(app, scan).exit_code == 0
    files = sorted((tmp_path / "s" / "vectors").glob("*.pt"))
    assert len(files) == 2
    d0, d1 = (torch.load(p, weights_only=True)["directions"] for p in files)
    assert torch.equal(d0, d1)
    again = runner.invoke(app, [*scan[:-1], "--json"])
    assert json.loads(again.stdout)["outcomes"] == [] and len(json.loads(again.stdout)["skipped"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--dims", "3"], "--dims 3 is not one of 1|2"),
    (["--vectors", "x.pt"], "--vectors reads eigenvectors"),
    (["--normalize", "rows"], "is not one of filter|layer|none"),
    (["--directions", "eigs", "--normalize", "layer"], "--normalize and --ignore rescale random directions"),
    (["--directions", "eigs", "--ignore", "bias-bn"], "--normalize and --ignore rescale random directions"),
])
def test_bad_landscape_options_are_one_line_exit_2(tmp_path, capsys, args, message):
    f = _files(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["landscape", str(Path(f["run"]) / "ckpt_000100.pt"), "--model", f["model"], "--data", f["data"],
              "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def _gloo_worker(rank: int, world: int, init: str, queue) -> None:
    import torch.distributed as dist

    from hesscli.api import analyse
    from hesscli.config import Settings
    from hesscli.distributed import DistContext
    from tests.test_distributed import _shard

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        problem = _shard(mlp_ce(), rank, world)
        out = {}
        for kind in ("eigs", "random"):
            s = Settings(directions=kind, dims=2, steps=4, span=0.5, dtype="float64", seed=3)
            r = analyse(problem, "landscape", s, reduce=DistContext(rank, world).all_reduce_sum).result
            out[kind] = (r.loss.tolist(), r.accuracy.tolist(), r.center_loss)
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_grid(tmp_path):
    from hesscli.api import analyse
    from hesscli.config import Settings

    problem = mlp_ce()
    expected = {}
    for kind in ("eigs", "random"):
        r = analyse(problem, "landscape", Settings(directions=kind, dims=2, steps=4, span=0.5, dtype="float64",
                                                   seed=3)).result
        expected[kind] = (r.loss, r.accuracy, r.center_loss)
    results = spawn_ranks(_gloo_worker, tmp_path)
    for rank in (0, 1):
        for kind, (loss, acc, center) in results[rank].items():
            want_loss, want_acc, want_center = expected[kind]
            assert torch.allclose(torch.tensor(loss, dtype=torch.float64), want_loss, rtol=1e-8, atol=1e-12), kind
            assert torch.allclose(torch.tensor(acc, dtype=torch.float64), want_acc, atol=1e-12), kind
            assert abs(center - want_center) < 1e-12
    assert results[0] == results[1]  # identical on every rank


def test_json_output_leaves_the_directions_to_the_vectors_file(tmp_path):
    f = _files(tmp_path)
    result = runner.invoke(app, ["landscape", str(Path(f["run"]) / "ckpt_000100.pt"), "--model", f["model"],
                                 "--data", f["data"], "--out", str(tmp_path / "out"), "--steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["result"]
    assert "directions" not in doc and len(doc["loss"][0]) == 3 and doc["n_forward"] == 4


def test_vectors_from_another_checkpoint_get_this_checkpoints_curvature(tmp_path):
    f = _files(tmp_path)
    out = tmp_path / "out"
    first, second = (str(Path(f["run"]) / f"ckpt_{s:06d}.pt") for s in (100, 200))
    common = ["--model", f["model"], "--data", f["data"], "--out", str(out), "--dtype", "float64", "--json"]
    low = runner.invoke(app, ["eigs", first, *common, "--top-k", "2", "--which", "smallest", "--save-vectors"])
    refused = runner.invoke(app, ["landscape", second, *common, "--directions", "eigs", "--steps", "3",
                                  "--vectors", json.loads(low.stdout)["eigenvectors_path"]])
    assert isinstance(refused.exception, hesscli.InputError)  # main() maps it to exit 2
    assert "eigenvectors of the largest eigenvalues" in str(refused.exception)
    top = json.loads(runner.invoke(app, ["eigs", first, *common, "--top-k", "1", "--save-vectors"]).stdout)
    here = json.loads(runner.invoke(app, ["eigs", second, *common, "--top-k", "1"]).stdout)["result"]
    doc = json.loads(runner.invoke(app, ["landscape", second, *common, "--directions", "eigs", "--steps", "3",
                                         "--vectors", top["eigenvectors_path"]]).stdout)["result"]
    # the first checkpoint's top eigenvector, its curvature measured on the second checkpoint: a Rayleigh
    # quotient there (at most that checkpoint's λ_max), not the first checkpoint's eigenvalue
    assert doc["eigenvalues"][0] != pytest.approx(top["result"]["eigenvalues"][0], rel=1e-6)
    assert doc["eigenvalues"][0] <= here["eigenvalues"][0] * (1 + 1e-9)
