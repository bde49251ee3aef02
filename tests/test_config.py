"""Settings resolution: defaults < hesscli.toml < [command] table < flags the user gave."""

from __future__ import annotations

from pathlib import Path

import pytest

from hesscli.config import Settings, parse_model_args, resolve
from hesscli.errors import InputError


def _write(folder: Path, text: str, name: str = "hesscli.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(InputError) as ei:
        resolve(*args, **kwargs)
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_defaults_without_any_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve({}, None) == Settings()


def test_precedence_defaults_file_table_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, 'batch-size = 128\nprobes = 50\nseed = 3\n[trace]\nprobes = 200\n[eigs]\ntop_k = 4\n')
    trace = resolve({"probes": None, "seed": 9, "top_k": None}, None, command="trace")
    assert (trace.batch_size, trace.probes, trace.seed, trace.top_k) == (128, 200, 9, Settings().top_k)
    eigs = resolve({"top-k": 7}, None, command="eigs")
    assert (eigs.probes, eigs.top_k) == (50, 7)
    assert resolve({}, None, command="eigs").top_k == 4
    assert resolve({"batch_size": 16}, None).batch_size == 16


def test_unset_flags_do_not_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, 'trust_pickle = true\nparams = ["fc*"]\nloss = "mse"\n')
    # trust is read from a config named with --config only (an implicit one is tested in test_security.py)
    s = resolve({"trust_pickle": None, "params": [], "loss": None, "json": None}, tmp_path / "hesscli.toml")
    assert (s.trust_pickle, s.params, s.loss, s.json) == (True, ("fc*",), "mse", False)
    assert resolve({"params": ["head.*", "fc2.*"]}, None).params == ("head.*", "fc2.*")


def test_relative_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    _write(project, '\n'.join([
        'data = "data/train.pt"',
        'model = "models/net.py:Net"',
        'loss = "losses.py:my_loss"',
        'out = "results"',
    ]) + "\n", name="settings.toml")
    monkeypatch.chdir(tmp_path)
    s = resolve({}, project / "settings.toml")
    assert s.data == str(project / "data/train.pt")
    assert s.model == str(project / "models/net.py") + ":Net"
    assert s.loss == str(project / "losses.py") + ":my_loss"
    assert s.out == project / "results"


def test_module_specs_names_and_absolute_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "cfg", 'model = "torchvision.models:resnet18"\nloss = "huber"\ndata = "/abs/d.npz"\n'
                              'out = "/abs/out"\n')
    s = resolve({}, tmp_path / "cfg" / "hesscli.toml")
    assert (s.model, s.loss, s.data, s.out) == ("torchvision.models:resnet18", "huber", "/abs/d.npz", Path("/abs/out"))


def test_torchvision_root_is_anchored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "cfg", 'data = "torchvision:MNIST?root=datasets&train=false"\n')
    s = resolve({}, tmp_path / "cfg" / "hesscli.toml")
    assert s.data == f"torchvision:MNIST?root={tmp_path / 'cfg' / 'datasets'}&train=false"


def test_cli_paths_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "cfg", 'data = "d.pt"\n')
    s = resolve({"data": "other.pt", "out": "res"}, tmp_path / "cfg" / "hesscli.toml")
    assert (s.data, s.out) == ("other.pt", Path("res"))


def test_working_directory_file_is_found(tmp_path, monkeypatch):
    _write(tmp_path, 'dtype = "float64"\ndata = "d.pt"\n')
    monkeypatch.chdir(tmp_path)
    s = resolve({}, None)
    assert s.dtype == "float64" and s.data == str(tmp_path.resolve() / "d.pt")


def test_model_args_merge_file_and_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, '[model_args]\nhidden = 64\nact = "relu"\n')
    assert resolve({}, None).model_args == {"hidden": 64, "act": "relu"}
    assert resolve({"model_args": {"hidden": 8}}, None).model_args == {"hidden": 8, "act": "relu"}
    _write(tmp_path, 'model-arg = ["hidden=32", "sizes=(1, 2)"]\n')
    assert resolve({}, None).model_args == {"hidden": 32, "sizes": (1, 2)}


def test_lists_accept_comma_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, '[scan]\nanalyses = "trace, eigs"\n')
    assert resolve({}, None, command="scan").analyses == ("trace", "eigs")
    assert resolve({"analyses": "density"}, None, command="scan").analyses == ("density",)


def test_unknown_key_names_key_and_valid_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, 'batch_sise = 3\n')
    message = _error({}, None)
    assert "'batch_sise'" in message and "batch-size" in message and "max-samples" in message
    _write(tmp_path, '[trace]\nprobez = 3\n')
    message = _error({}, None, command="trace")
    assert "[trace]" in message and "'probez'" in message


def test_unknown_table_is_an_unknown_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, '[traec]\nprobes = 3\n')
    assert "'traec'" in _error({}, None, command="trace")


def test_wrong_types_and_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, 'batch-size = "big"\n')
    assert "batch-size must be an integer, got 'big'" in _error({}, None)
    _write(tmp_path, 'trust-pickle = "yes"\n')
    assert "true or false" in _error({}, None)
    _write(tmp_path, 'curvature = "fisher"\n')
    assert "'fisher' is not one of hessian|ggn" in _error({}, None)
    _write(tmp_path, "")
    assert "--batch-size" in _error({"batch_size": 0}, None)
    assert "--dtype" in _error({"dtype": "float16"}, None)
    assert "--shard" in _error({"shard": "3/2"}, None)
    assert resolve({"shard": "2/4"}, None).shard == "2/4"


def test_config_file_problems(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--config" in _error({}, tmp_path / "missing.toml")
    bad = _write(tmp_path, 'batch-size = \n', name="bad.toml")
    assert "not valid TOML" in _error({}, bad)


def test_unknown_cli_key_is_a_programming_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError):
        resolve({"no_such_option": 1}, None)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["hidden=64"], {"hidden": 64}),
        (["act=relu"], {"act": "relu"}),
        (["p=0.5", "flag=True", "none=None"], {"p": 0.5, "flag": True, "none": None}),
        (["sizes=(3, 4)", "name='x=y'"], {"sizes": (3, 4), "name": "x=y"}),
        (["path=/tmp/a b"], {"path": "/tmp/a b"}),
    ],
)
def test_parse_model_args(items, expected):
    assert parse_model_args(items) == expected


@pytest.mark.parametrize("item", ["hidden", "=3", "2x=1"])
def test_parse_model_args_errors(item):
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_model_args([item])
