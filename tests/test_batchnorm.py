"""BatchNorm: a warning when running statistics are far off, and --batchnorm batch against a dense Hessian."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from hesscli.cli import app

runner = CliRunner()

FACTORY = '''
import torch
def net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
'''


@pytest.fixture
def stale(tmp_path):
    """A BatchNorm net whose running averages were never updated to its data (as after a few steps)."""
    (tmp_path / "bn.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        net[0].bias.add_(4.0)  # activations far from the running mean 0 / variance 1
        net[0].weight.mul_(3.0)
        net[3].weight.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g)
    y = (x[:, 0] > 0).long()
    torch.save(net.state_dict(), tmp_path / "bn.pt")
    torch.save((x, y), tmp_path / "data.pt")
    return tmp_path, net, x, y


def _run(folder, *args):
    return runner.invoke(app, [*args, str(folder / "bn.pt"), "--model", f"{folder / 'bn.py'}:net", "--data",
                               str(folder / "data.pt"), "--dtype", "float64", "--device", "cpu",
                               "--out", str(folder / "out"), "--json"])


def test_far_off_running_statistics_are_reported_in_one_line(stale, capsys):
    from hesscli.cli import main

    folder = stale[0]
    with pytest.raises(SystemExit) as ei:
        main(["info", str(folder / "bn.pt"), "--model", f"{folder / 'bn.py'}:net", "--data", str(folder / "data.pt")])
    err = capsys.readouterr().err
    text = " ".join(err.split())  # one message (Rich may wrap it on a narrow terminal)
    assert ei.value.code == 0 and err.count("WARNING") == 1 and "BatchNorm running statistics" in text, err
    assert "--batchnorm batch" in text
    with pytest.raises(SystemExit):
        main(["info", str(folder / "bn.pt"), "--model", f"{folder / 'bn.py'}:net", "--data", str(folder / "data.pt"),
              "--batchnorm", "batch"])
    assert "WARNING" not in capsys.readouterr().err


def _reference(net, x, y, batch_size):
    """Dense Hessian of sum_b n_b/N * CE(f_b) where each batch is normalised with its own (biased) statistics."""
    net = net.double()
    parts = [p.detach().reshape(-1) for p in net.parameters()]
    shapes = [p.shape for p in net.parameters()]
    eps = net[1].eps

    def f(theta):
        w1, b1, g, b, w2, b2 = (t.reshape(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))
        total = 0.0
        for xb, yb in zip(x.double().split(batch_size), y.split(batch_size)):
            h = xb @ w1.T + b1
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + eps) * g + b
            total = total + len(xb) / len(x) * F.cross_entropy(torch.tanh(h) @ w2.T + b2, yb)
        return total

    return torch.autograd.functional.hessian(f, torch.cat(parts))


def test_batch_statistics_match_a_dense_hessian_and_leave_running_averages_alone(stale):
    folder, net, x, y = stale
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for batch_size in (7, 4):  # one batch; 4 + 3 (statistics of each batch)
        H = _reference(net, x, y, batch_size)
        lam = torch.linalg.eigvalsh(H)
        result = _run(folder, "trace", "--method", "exact", "--batchnorm", "batch", "--batch-size", str(batch_size))
        assert result.exit_code == 0, result.output
        est = json.loads(result.stdout)["result"]["estimate"]
        assert abs(est - float(torch.trace(H))) <= 1e-8 * float(H.diagonal().abs().sum())
        result = _run(folder, "eigs", "--top-k", "2", "--batchnorm", "batch", "--batch-size", str(batch_size))
        got = json.loads(result.stdout)["result"]["eigenvalues"]
        assert max(abs(a - float(b)) for a, b in zip(got, lam.flip(0)[:2])) <= 1e-8 * float(lam.abs().max())
    # the file was not changed, and the default still analyses the running statistics (a different function)
    saved = torch.load(folder / "bn.pt")
    assert all(torch.equal(saved[k], v) for k, v in before.items())
    running = json.loads(_run(folder, "trace", "--method", "exact").stdout)["result"]["estimate"]
    assert abs(running - float(torch.trace(_reference(net, x, y, 7)))) > 1e-3


def test_batch_statistics_in_python_never_update_the_running_averages(stale):
    from hesscli.config import Settings
    from hesscli.loading import problem_from_python
    from hesscli.operators.empirical import HessianOperator

    _, net, x, y = stale
    net = net.double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    problem = problem_from_python(net, "cross_entropy", (x, y), Settings(dtype="float64", batchnorm="batch",
                                                                          batch_size=4))
    v = torch.randn(problem.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = HessianOperator(problem, hvp="func").matvec(v)
    second = HessianOperator(problem, hvp="autograd").matvec(v)
    torch.testing.assert_close(first, second, rtol=1e-10, atol=1e-12)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # num_batches_tracked included


def test_python_api_puts_batchnorm_back(stale):
    import hesscli

    _, net, x, y = stale
    net = net.double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hesscli.trace(net, "cross_entropy", (x, y), method="exact", dtype="float64", batchnorm="batch")
    assert net[1].track_running_stats and net[1].training == net.training
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
