"""Nothing runs that the user did not ask for: trust only from the command line (or a named
``--config``), TorchScript only with ``--trust-code``, one-line usage errors and warnings,
dtypes checked against the model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hesscli.cli import main
from hesscli.config import resolve
from hesscli.loading import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "COLUMNS": "160", "NO_COLOR": "1"}


def _hesscli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hesscli", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


class _Hostile:
    """Unpickling this creates a marker file (standing in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_implicit_config_cannot_switch_on_trust(tiny):
    folder, marker = tiny.folder, tiny.folder / "PWNED"
    torch.save({"model": _Hostile(marker), "state_dict": tiny.model.state_dict()}, folder / "hostile.pt")
    (folder / "hesscli.toml").write_text(f'trust-pickle = true\ntrust-code = true\ndata = "data.pt"\n'
                                         f'model = "{tiny.spec}"\n')
    # the weights next to the hostile object load; the object is never unpickled
    proc = _hesscli(["info", "hostile.pt"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists() and "not unpickled" in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"config: {folder / 'hesscli.toml'} (found in the working folder)"
    assert sum("trust-code is ignored in a config found in the working folder" in ln for ln in lines) == 1
    # a file that is nothing but the hostile object is refused
    torch.save(_Hostile(marker), folder / "hostile_only.pt")
    proc = _hesscli(["info", "hostile_only.pt"], cwd=folder)
    assert proc.returncode == 2, proc.stderr
    assert not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--trust-code" in lines[-1] and "Traceback" not in proc.stderr
    # the same file named with --config is the user's choice: its trust applies (and the pickle is hostile)
    settings = resolve({}, folder / "hesscli.toml")
    assert settings.trust_code
    load_checkpoint(folder / "hostile.pt", settings)
    assert marker.exists()


def _hostile_torchscript(folder: Path, marker: Path) -> Path:
    source = folder / "scripted.py"
    source.write_text(textwrap.dedent(f'''
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = torch.nn.Linear(4, 3)

            def forward(self, x):
                t = torch.from_file({str(marker)!r}, shared=True, size=8)  # writes a file of its choice
                return self.fc1(x) + 0 * t.sum()
        '''))
    spec = importlib.util.spec_from_file_location("_scripted_hostile", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = folder / "scripted.pt"
    torch.jit.save(torch.jit.script(module.Net()), str(path))
    return path


def test_torchscript_is_code_and_needs_trust_code(tiny, capsys):
    marker = tiny.folder / "OVERWRITTEN"
    path = _hostile_torchscript(tiny.folder, marker)
    proc = _hesscli(["info", str(path), "--data", tiny.data], cwd=tiny.folder)
    assert proc.returncode == 2 and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TorchScript archive, which is code" in lines[0]
    assert "--trust-code" in lines[0]
    # as --data too (torch.load would hand it to torch.jit.load)
    with pytest.raises(SystemExit) as ei:
        main(["info", str(tiny.ckpt), "--model", tiny.spec, "--data", str(path)])
    assert ei.value.code == 2 and "TorchScript" in capsys.readouterr().err and not marker.exists()
    # with the flag (or its older name) it is loaded and run: the marker shows the file really is hostile
    with pytest.raises(SystemExit) as ei:
        main(["info", str(path), "--data", tiny.data, "--trust-pickle", "--json"])
    assert ei.value.code == 0 and marker.exists()


def test_config_file_and_code_it_names_are_announced(tiny, monkeypatch, capsys):
    folder = tiny.folder
    (folder / "hesscli.toml").write_text('model = "nets.py:TinyMLP"\ndata = "data.pt"\n')
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as ei:
        main(["info", "ckpt.pt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 0
    assert err == [f"config: {folder / 'hesscli.toml'} (found in the working folder)",
                   f"--model {folder / 'nets.py'}:TinyMLP: importing (running) {folder / 'nets.py'} "
                   f"(named in {folder / 'hesscli.toml'})"]
    # --quiet: nothing on stderr (a fresh file, so that it is imported again)
    (folder / "nets2.py").write_text((folder / "nets.py").read_text())
    (folder / "other.toml").write_text('model = "nets2.py:TinyMLP"\ndata = "data.pt"\n')
    with pytest.raises(SystemExit) as ei:
        main(["info", "ckpt.pt", "--config", "other.toml", "--quiet"])
    assert ei.value.code == 0 and capsys.readouterr().err == ""
    # a --model given on the command line is the user's own choice: no notice
    with pytest.raises(SystemExit):
        main(["info", "ckpt.pt", "--model", f"{folder / 'nets.py'}:make", "--config", "other.toml"])
    assert "importing" not in capsys.readouterr().err


@pytest.mark.parametrize("args", [["trace", "x.pt", "--probes", "0"], ["eigs", "x.pt", "--top-k", "-2"],
                                  ["density", "x.pt", "--iters", "0"], ["trace", "x.pt", "--no-such-flag"],
                                  ["eigs"]])
def test_usage_errors_are_one_line(args, capsys):
    with pytest.raises(SystemExit) as ei:
        main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert ei.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "╭" not in captured.err and captured.out == ""


def test_usage_error_and_warnings_as_a_process(tiny):
    proc = _hesscli(["trace", "x.pt", "--probes", "0"], cwd=tiny.folder)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "--probes" in proc.stderr
    # a scan whose Lanczos runs stop early (a ConvergenceWarning each), next to a TorchScript file
    scan = tiny.folder / "run"
    scan.mkdir()
    torch.save(tiny.model.state_dict(), scan / "a.pt")
    torch.jit.save(torch.jit.script(tiny.model), str(scan / "b.pt"))
    proc = _hesscli(["scan", str(scan), "--model", tiny.spec, "--data", tiny.data, "--analyses", "eigs",
                     "--top-k", "3", "--max-iter", "3", "--quiet", "--out", str(tiny.folder / "out")], cwd=tiny.folder)
    assert proc.returncode == 1, proc.stderr  # b.pt is refused (no --trust-code); a.pt is analysed
    lines = proc.stderr.strip().splitlines()
    warnings = [ln for ln in lines if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "Lanczos" in warnings[0], proc.stderr
    assert all(ln.startswith(("warning: ", "error: ")) for ln in lines), proc.stderr  # no source lines
    assert "dispatching" not in proc.stderr and "torch.jit.load" not in proc.stderr


def test_dtype_kind_mismatch_is_named(tiny, capsys):
    model_py = tiny.folder / "bn.py"
    model_py.write_text(textwrap.dedent('''
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = torch.nn.Linear(4, 3)
                self.bn = torch.nn.BatchNorm1d(3)

            def forward(self, x):
                return self.bn(self.fc1(x))
        '''))
    torch.manual_seed(0)
    ref = {"fc1.weight": torch.randn(3, 4), "fc1.bias": torch.randn(3), "bn.weight": torch.ones(3),
           "bn.bias": torch.zeros(3), "bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    good = {**ref, "bn.num_batches_tracked": torch.tensor(7)}
    bad = {**ref, "bn.num_batches_tracked": torch.tensor(7.0, dtype=torch.float64)}  # an int64 buffer as float64
    save_file(good, str(tiny.folder / "good.safetensors"))
    save_file(bad, str(tiny.folder / "bad.safetensors"))
    base = ["info", "--model", f"{model_py}:Net", "--data", tiny.data, "--json"]
    with pytest.raises(SystemExit) as ei:
        main([base[0], str(tiny.folder / "good.safetensors"), *base[1:]])
    assert ei.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main([base[0], str(tiny.folder / "bad.safetensors"), *base[1:]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(lines) == 1
    assert "dtype mismatch: bn.num_batches_tracked checkpoint float64 vs model int64" in lines[0]
