"""``hesscli info`` through CliRunner and as a real process, on the sample run and on tiny files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from hesscli.cli import app
from hesscli.cli.app import version_string

REPO = Path(__file__).resolve().parents[1]

runner = CliRunner()


def _reference(samples_dir, ckpt: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a sample checkpoint, computed without hesscli."""
    spec = importlib.util.spec_from_file_location("_ref_digits_model", samples_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.DigitsCNN()
    net.load_state_dict(torch.load(samples_dir / ckpt, weights_only=True)["model_state_dict"])
    net.eval()
    data = torch.load(samples_dir / "digits.pt", weights_only=True)
    with torch.no_grad():
        out = net(data["inputs"])
    return F.cross_entropy(out, data["targets"]).item(), (out.argmax(1) == data["targets"]).double().mean().item()


def test_info_on_sample_run_with_no_flags(samples_dir, monkeypatch):
    monkeypatch.chdir(samples_dir)
    result = runner.invoke(app, ["info", "ckpt_step000400.pt"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("DigitsCNN", "9,850 total", "1,797 samples", "400 (epoch 26)", "accuracy", "head.1.weight",
                 "[32, 256]", "state_dict"):
        assert text in out, text


def test_info_json_matches_an_independent_computation(samples_dir, monkeypatch):
    monkeypatch.chdir(samples_dir)
    result = runner.invoke(app, ["info", "ckpt_step000050.pt", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # stdout is JSON and nothing else
    loss, acc = _reference(samples_dir, "ckpt_step000050.pt")
    assert info["loss_value"] == pytest.approx(loss, rel=1e-4)
    assert info["accuracy"] == pytest.approx(acc)
    assert (info["model_class"], info["format"], info["step"], info["n_total"]) == ("DigitsCNN", "state_dict", 50, 1797)
    assert info["n_params_total"] == info["n_selected"] == 9850
    assert [p["name"] for p in info["parameters"]][:2] == ["features.0.weight", "features.0.bias"]
    assert info["input_shape"] == [1, 8, 8] and info["target_dtype"] == "int64" and info["grad_norm"] > 0


def test_info_flags_override_and_select(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [
        "info", str(tiny.ckpt), "--model", tiny.factory("make"), "--model-arg", "hidden=5", "--data", tiny.data,
        "--params", "fc2.*", "--max-samples", "25", "--batch-size", "10", "--dtype", "float64", "--device", "cpu",
        "--json",
    ])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["n_selected"], info["n_params_total"], info["n_total"], info["n_batches"]) == (18, 43, 25, 3)
    assert info["dtype"] == "float64" and info["device"] == "cpu"
    assert [p["name"] for p in info["parameters"] if p["selected"]] == ["fc2.weight", "fc2.bias"]


def test_info_config_from_another_folder(samples_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["info", str(samples_dir / "ckpt_step000000.pt"), "--config",
                                 str(samples_dir / "hesscli.toml"), "--max-samples", "100", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["step"] == 0 and info["n_total"] == 100


def test_info_torchscript_needs_no_model(tiny):
    torch.jit.save(torch.jit.script(tiny.model), str(tiny.folder / "ts.pt"))
    result = runner.invoke(app, ["info", str(tiny.folder / "ts.pt"), "--data", tiny.data, "--json", "--trust-code"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "torchscript"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag):
    for args in ([flag], ["info", flag]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.stdout
    assert "--trust-pickle" in runner.invoke(app, ["info", flag]).stdout
    assert "--trust-code" in runner.invoke(app, ["info", flag]).stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == version_string() and version_string().startswith("hesscli ")


def test_python_m_hesscli_info_on_sample_checkpoint(samples_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "hesscli", "info", "ckpt_step000400.pt", "--json"], cwd=samples_dir,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["step"] == 400 and info["accuracy"] > 0.9 and info["model_class"] == "DigitsCNN"
