"""``hesscli.cli.main``: bad input -> exit 2 with one line, crashes -> exit 1, --debug -> traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hesscli.loading
from hesscli.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    captured = capsys.readouterr()
    return ei.value.code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def bad_inputs(tiny):
    """``name -> (argv, text expected in the error line)`` for the bad inputs of the contract."""
    f = tiny.folder
    (f / "rand.pt").write_bytes(os.urandom(2048))
    data = tiny.ckpt.read_bytes()
    (f / "trunc.pt").write_bytes(data[: len(data) // 3])
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3)), f / "whole.pt")
    sd = dict(tiny.model.state_dict())
    del sd["fc1.bias"]
    torch.save(sd, f / "missing_key.pt")
    torch.save((tiny.inputs, tiny.targets[:10]), f / "short.pt")
    torch.save((tiny.inputs[:0], tiny.targets[:0]), f / "empty.pt")
    torch.save((torch.randn(40, 7), tiny.targets), f / "wide.pt")
    torch.save((tiny.inputs, tiny.inputs), f / "float_targets.pt")
    nan = dict(tiny.model.state_dict())
    nan["fc1.weight"] = torch.full_like(nan["fc1.weight"], float("nan"))
    torch.save(nan, f / "nan.pt")
    ck, m, d = str(tiny.ckpt), tiny.spec, tiny.data
    return {
        "missing file": (["info", str(f / "nope.pt"), "--model", m, "--data", d], "not found"),
        "corrupt": (["info", str(f / "trunc.pt"), "--model", m, "--data", d], "truncated or corrupt"),
        "random bytes": (["info", str(f / "rand.pt"), "--model", m, "--data", d], "corrupt"),
        "pickle": (["info", str(f / "whole.pt"), "--data", d], "--trust-pickle"),
        "no model": (["info", ck, "--data", d], "--model"),
        "missing keys": (["info", str(f / "missing_key.pt"), "--model", m, "--data", d], "missing keys: fc1.bias"),
        "shape": (["info", ck, "--model", tiny.factory("make"), "--model-arg", "hidden=9", "--data", d],
                  "vs model [9, 4]"),
        "factory missing": (["info", ck, "--model", f"{f}/nets.py:Nope", "--data", d], "no attribute 'Nope'"),
        "factory raising": (["info", ck, "--model", tiny.factory("broken"), "--data", d], "factory exploded"),
        "length mismatch": (["info", ck, "--model", m, "--data", str(f / "short.pt")], "40 inputs but 10 targets"),
        "empty data": (["info", ck, "--model", m, "--data", str(f / "empty.pt")], "no samples"),
        "no data": (["info", ck, "--model", m], "no data"),
        "inputs vs model": (["info", ck, "--model", m, "--data", str(f / "wide.pt")], "do not fit TinyMLP"),
        "unknown loss": (["info", ck, "--model", m, "--data", d, "--loss", "hinge"], "unknown loss"),
        "targets vs loss": (["info", ck, "--model", m, "--data", str(f / "float_targets.pt")], "--loss cross_entropy"),
        "nan weights": (["info", str(f / "nan.pt"), "--model", m, "--data", d], "fc1.weight contains NaN"),
        "params glob": (["info", ck, "--model", m, "--data", d, "--params", "conv*"], "matches no trainable"),
        "device": (["info", ck, "--model", m, "--data", d, "--device", "cuda:99"], "--device cuda:99"),
        "dtype": (["info", ck, "--model", m, "--data", d, "--dtype", "float16"], "--dtype"),
        "model arg": (["info", ck, "--model", m, "--data", d, "--model-arg", "hidden"], "KEY=VALUE"),
        "config": (["info", ck, "--config", str(f / "none.toml")], "--config"),
    }


CASES = [
    "missing file", "corrupt", "random bytes", "pickle", "no model", "missing keys", "shape", "factory missing",
    "factory raising", "length mismatch", "empty data", "no data", "inputs vs model", "unknown loss",
    "targets vs loss", "nan weights", "params glob", "device", "dtype", "model arg", "config",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_exit_2_and_one_line(case, bad_inputs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no hesscli.toml here
    argv, expected = bad_inputs[case]
    code, out, err = _run(argv, capsys)
    assert code == 2, err
    assert expected in _one_error_line(err)
    assert out == ""


def test_bad_config_key_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hesscli.toml").write_text("batch-sise = 3\n")
    code, _, err = _run(["info", "x.pt"], capsys)
    assert code == 2 and "unknown key 'batch-sise'" in _one_error_line(err)


def test_usage_errors_are_exit_2(capsys):
    assert _run(["info"], capsys)[0] == 2
    assert _run(["info", "x.pt", "--batch-size", "many"], capsys)[0] == 2
    assert _run(["no-such-command"], capsys)[0] == 2
    assert _run(["info", "x.pt", "--no-such-flag"], capsys)[0] == 2


def test_success_and_help_are_exit_0(samples_dir, monkeypatch, capsys):
    monkeypatch.chdir(samples_dir)
    assert _run(["info", "ckpt_step000025.pt", "--max-samples", "64", "--json"], capsys)[0] == 0
    assert _run(["--help"], capsys)[0] == 0
    assert _run(["--version"], capsys)[0] == 0


def _boom(*args, **kwargs):
    raise ZeroDivisionError("division by zero somewhere deep")


def test_unexpected_error_is_exit_1_with_debug_hint(tiny, monkeypatch, capsys):
    monkeypatch.setattr(hesscli.loading, "load_problem", _boom)
    code, _, err = _run(["info", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data], capsys)
    assert code == 1
    line = _one_error_line(err)
    assert "ZeroDivisionError: division by zero somewhere deep" in line and "--debug" in line


@pytest.mark.parametrize("position", ["root", "command"])
def test_debug_reraises_with_traceback(tiny, monkeypatch, position):
    monkeypatch.setattr(hesscli.loading, "load_problem", _boom)
    argv = ["info", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data]
    argv = ["--debug", *argv] if position == "root" else [*argv, "--debug"]
    with pytest.raises(ZeroDivisionError):
        main(argv)


def test_debug_reraises_input_errors(tiny):
    from hesscli.errors import InputError

    with pytest.raises(InputError, match="not found"):
        main(["info", str(tiny.folder / "nope.pt"), "--model", tiny.spec, "--data", tiny.data, "--debug"])


def test_keyboard_interrupt_is_exit_130(tiny, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hesscli.loading, "load_problem", interrupted)
    code, _, _ = _run(["info", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data], capsys)
    assert code == 130


@pytest.mark.slow  # a fresh interpreter importing torch; the same mapping is tested in-process above
def test_real_process_bad_input(tiny):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "hesscli", "info", str(tiny.folder / "missing.pt"), "--data",
                           tiny.data], cwd=tiny.folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "not found" in _one_error_line(proc.stderr) and proc.stdout == ""
