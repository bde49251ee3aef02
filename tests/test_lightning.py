"""Lightning: .ckpt files with objects in hyper_parameters (read without running code), a real training run
scanned end to end, and the CurvatureCallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from hesscli.cli import app, main
from hesscli.config import Settings
from hesscli.loading import load_checkpoint, step_from
from hesscli.loading.safepickle import Placeholder

pl = pytest.importorskip("pytorch_lightning")

runner = CliRunner()

LIT = '''
import dataclasses
import torch
import pytorch_lightning as pl


@dataclasses.dataclass
class TrainConfig:
    lr: float = 0.1
    note: str = "an object in hyper_parameters"


class LitNet(pl.LightningModule):
    def __init__(self, hidden: int = 3, cfg: TrainConfig = TrainConfig()):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.cfg.lr)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
'''


def _module(folder: Path):
    import importlib.util
    import sys

    (folder / "lit.py").write_text(LIT)
    spec = importlib.util.spec_from_file_location("lit", folder / "lit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lit"] = mod  # pickled objects name their class lit.TrainConfig, as in a user's project
    spec.loader.exec_module(mod)
    return mod


def _trainer(folder: Path, callbacks, max_steps: int):
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(folder))


class Hostile:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_objects_in_hyper_parameters_are_never_executed(tiny, tmp_path):
    marker = tmp_path / "marker"
    state = {"state_dict": {f"model.{k}": v for k, v in tiny.model.state_dict().items()},
             "hyper_parameters": {"hidden": 5, "callback": Hostile(marker)}, "global_step": 40, "epoch": 2,
             "loops": {"fit": Hostile(marker)}}
    ckpt = tmp_path / "epoch=2-val_loss=0.32.ckpt"
    torch.save(state, ckpt)
    loaded = load_checkpoint(ckpt, Settings(model=tiny.spec))
    assert not marker.exists()
    assert loaded.format == "state_dict" and loaded.step == 40
    for name, p in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p)
    # a whole pickled object where the weights should be is still refused, and still never run
    torch.save({"state_dict": Hostile(marker)}, tmp_path / "bad.ckpt")
    with pytest.raises(Exception, match="--trust-pickle"):
        load_checkpoint(tmp_path / "bad.ckpt", Settings(model=tiny.spec))
    assert not marker.exists()


def test_a_metric_in_a_file_name_is_never_a_step():
    assert step_from("val_loss=0.32.ckpt", None) is None
    assert step_from("acc=97.ckpt", None) is None
    assert step_from("epoch=0-step=100-val_loss=0.32.ckpt", None) == 100
    assert step_from("epoch=3-val_loss=0.32.ckpt", None) == 3  # the epoch, as the only count in the name


def test_hyper_parameters_build_the_module_and_a_required_object_is_named(tmp_path, capsys):
    mod = _module(tmp_path)
    net = mod.LitNet(hidden=6)
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams), "global_step": 3},
               tmp_path / "a.ckpt")
    loaded = load_checkpoint(tmp_path / "a.ckpt", Settings(model=f"{tmp_path / 'lit.py'}:LitNet"))
    assert loaded.model.net[0].out_features == 6  # hidden=6 came from the checkpoint
    cfg = loaded.model.hparams.cfg  # the placeholder was left out: LitNet's own default is used
    assert type(cfg).__name__ == "TrainConfig" and not isinstance(cfg, Placeholder) and cfg.lr == 0.1
    capsys.readouterr()  # notes of the load above (logging as the previous command left it)
    (tmp_path / "req.py").write_text(LIT.replace("hidden: int = 3, cfg: TrainConfig = TrainConfig()",
                                                      "cfg: TrainConfig, hidden: int = 3"))
    with pytest.raises(SystemExit) as ei:
        main(["info", str(tmp_path / "a.ckpt"), "--model", f"{tmp_path / 'req.py'}:LitNet", "--data",
              f"{tmp_path / 'lit.py'}:data", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert ei.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert "cfg (lit.TrainConfig)" in err and "--model-arg" in err


def test_a_lightning_run_is_scanned_with_only_data(tmp_path, monkeypatch):
    """LightningModule + ModelCheckpoint (metric in the names, save_last=True), objects in hyper_parameters;
    the model comes from hesscli.toml, the only flag is --data."""
    mod = _module(tmp_path)
    x, y = mod.data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    ckpts = tmp_path / "ckpts"
    cb = pl.callbacks.ModelCheckpoint(dirpath=ckpts, filename="{epoch}-{step}-{train_loss:.2f}",
                                      every_n_train_steps=2, save_top_k=-1, save_last=True)
    torch.manual_seed(0)
    _trainer(tmp_path, [cb], max_steps=6).fit(mod.LitNet(), loader)
    names = sorted(p.name for p in ckpts.iterdir())
    assert "last.ckpt" in names and any("train_loss=" in n for n in names)
    torch.save(mod.data(), tmp_path / "data.pt")
    (tmp_path / "hesscli.toml").write_text('model = "lit.py:LitNet"\nprobes = 12\ntop-k = 2\niters = 10\nruns = 1\n')
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["scan", "ckpts", "--data", "data.pt"])
    assert result.exit_code == 0, result.output
    runs = pd.read_parquet(tmp_path / "hesscli-results" / "runs")
    assert runs["status"].eq("ok").all(), runs["error"].dropna().tolist()
    by_ckpt = runs.groupby("checkpoint")["step"].first()
    # no metric value taken as a step; last.ckpt holds the step-6 bytes, so it is analysed once
    assert sorted(by_ckpt.tolist()) == [2, 4, 6]
    assert any("step=6" in c for c in by_ckpt.index) and not any(c.endswith("last.ckpt") for c in by_ckpt.index)
    assert "last.ckpt" in result.output  # listed as a copy
    assert set(runs["analysis"]) == {"trace", "eigs", "extremes", "density"}


def test_curvature_callback_logs_during_training(tmp_path):
    from hesscli import api
    from hesscli.lightning import CurvatureCallback
    mod = _module(tmp_path)
    x, y = mod.data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = CurvatureCallback("cross_entropy", (x, y), analyses=("trace",), every=2, out=tmp_path / "res",
                                 method="exact")
    torch.manual_seed(0)
    model = mod.LitNet()
    _trainer(tmp_path, [callback], max_steps=5).fit(model, loader)
    runs = pd.read_parquet(tmp_path / "res" / "runs").sort_values("step")
    assert runs["step"].tolist() == [2, 4, 5]  # every 2 steps, and at the end
    assert runs["checkpoint"].tolist() == ["train@step=2", "train@step=4", "train@step=5"]
    expected = api.trace(model, "cross_entropy", (x, y), method="exact")
    assert callback.history[-1].result.estimate == pytest.approx(expected.estimate, rel=1e-6)
    assert json.dumps(runs["status"].tolist()) == '["ok", "ok", "ok"]'
