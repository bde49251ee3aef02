"""The analysis registry: everything generated from one declaration per option and per analysis."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

import hesscli
from hesscli import config
from hesscli.analyses import REGISTRY
from hesscli.cli import app
from hesscli.config import Settings, resolve
from hesscli.options import EngineOptions, ProblemSpec, RunOptions, declared

runner = CliRunner()


def _click_command(name: str):
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _flags(command) -> set[str]:
    return {flag for p in command.params for flag in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_analysis_gets_a_command_a_config_table_a_scan_choice_a_function_and_tables(name, tmp_path):
    a = REGISTRY[name]
    flags = _flags(_click_command(name))
    for key, f, meta in declared(a.Options):
        assert f"--{f.name.replace('_', '-')}" in flags and f"--{key.replace('_', '-')}" in flags
        if a.in_scan:
            assert f"--{key.replace('_', '-')}" in _flags(_click_command("scan"))
    if a.in_scan:
        assert resolve({"analyses": name}, None, command="scan").analyses == (name,)
    # its own [name] table accepts its options under their own names
    first = next(f for f in dataclasses.fields(a.Options) if str(f.type).startswith("int"))
    value = (first.default or 6) + 1  # not the default
    (tmp_path / "h.toml").write_text(f"[{name}]\n{first.name} = {json.dumps(value)}\n")
    assert getattr(resolve({}, tmp_path / "h.toml", command=name).options(name), first.name) == value
    assert callable(getattr(hesscli, name)) and a.summary.split()[0] in getattr(hesscli, name).__doc__
    from hesscli.results.tables import TABLES

    assert all(t in TABLES for t in a.tables)


def test_defaults_are_declared_once_and_every_layer_sees_the_same():
    s = Settings()
    for cls in (ProblemSpec, EngineOptions, RunOptions):
        for key, f, _ in declared(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert getattr(s, key) == default, key
    assert s.problem == ProblemSpec() and s.engine == EngineOptions() and s.run == RunOptions()
    for name, a in REGISTRY.items():
        assert s.options(name) == a.Options(), name
    # every Settings field comes from a declaration (plus the older name of trust_code)
    assert {f.name for f in dataclasses.fields(Settings)} == set(config.DECLARED) | {"trust_pickle"}


def test_a_key_declared_twice_with_different_defaults_is_refused(monkeypatch):
    from hesscli.options import option

    @dataclasses.dataclass(frozen=True)
    class Clashing:
        tol: float | None = option(0.5, help="something else")  # eigs/extremes already own `tol`

    class Fake(REGISTRY["trace"].__class__):
        name = "fake"
        Options = Clashing

    monkeypatch.setitem(REGISTRY, "fake", Fake())
    with pytest.raises(TypeError, match="'tol' is declared twice"):
        config._declarations()


def test_tol_means_one_thing_per_analysis_and_old_spellings_still_work(tmp_path):
    trace_flags = _flags(_click_command("trace"))
    assert {"--tol", "--trace-tol"} <= trace_flags  # `trace --tol`, and the scan spelling
    scan_flags = _flags(_click_command("scan"))
    assert {"--tol", "--trace-tol"} <= scan_flags  # --tol: eigs/extremes; --trace-tol: trace
    assert resolve({"trace_tol": 0.1}, None, command="trace").options("trace").tol == 0.1
    (tmp_path / "h.toml").write_text("tol = 1e-6\n[trace]\ntol = 0.05\n")
    s = resolve({}, tmp_path / "h.toml", command="trace")
    assert (s.trace_tol, s.tol) == (0.05, 1e-6)  # [trace] tol is trace's; the top-level tol is eigs/extremes'
    assert s.options("trace").tol == 0.05 and s.options("eigs").tol == 1e-6


def test_trace_tol_spellings_agree_on_the_command_line(tiny):
    def run(*extra):
        result = runner.invoke(app, ["trace", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data,
                                     "--method", "hutchinson", "--probes", "40", "--dtype", "float64",
                                     "--out", str(tiny.folder / "out"), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["result"]

    a, b = run("--tol", "0.5"), run("--trace-tol", "0.5")
    assert a["estimate"] == b["estimate"] and a["n_probes"] == b["n_probes"] < 40


def test_trace_tol_applies_to_the_default_method(tiny):
    # Hutch++ (the default) plans its residual probes from the tolerance; it was once ignored there
    def run(*extra):
        result = runner.invoke(app, ["trace", str(tiny.ckpt), "--model", tiny.spec, "--data", tiny.data,
                                     "--probes", "300", "--dtype", "float64", "--out", str(tiny.folder / "out"),
                                     "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["result"]

    full, loose = run(), run("--trace-tol", "0.5")
    assert full["method"] == loose["method"] == "hutch++"
    assert full["n_probes"] == 300 and loose["converged"] and loose["n_probes"] < 300
    assert loose["stderr"] <= 0.75 * abs(loose["estimate"])


def test_python_trace_takes_tol_as_its_own_option():
    # `hesscli.trace(..., tol=)` is trace's tolerance, as `hesscli trace --tol` is; it used to be
    # taken as the eigenvalue tolerance and ignored
    import torch

    from hesscli.errors import InputError

    torch.manual_seed(0)
    X, y = torch.randn(128, 6, dtype=torch.float64), torch.randn(128, 1, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    a = hesscli.trace(net, "mse", (X, y), tol=0.05, probes=300, dtype="float64")
    b = hesscli.trace(net, "mse", (X, y), trace_tol=0.05, probes=300, dtype="float64")
    assert a.estimate == b.estimate and a.n_probes == b.n_probes < 300 and a.converged
    with pytest.raises(InputError, match="same option of trace"):
        hesscli.trace(net, "mse", (X, y), tol=0.05, trace_tol=0.1)
    e = hesscli.eigs(net, "mse", (X, y), tol=1e-3, top_k=2, dtype="float64")  # eigs' own tol is `tol`
    assert all(e.converged)


def test_backends_get_only_their_engine_options_and_the_analysis_options():
    from hesscli.backends import get_backend

    backend = get_backend(EngineOptions(curvature="ggn", hvp="autograd"))
    assert backend.engine == EngineOptions(curvature="ggn", hvp="autograd")
    s = Settings(top_k=3, which="both", tol=1e-6)
    assert s.options("eigs") == REGISTRY["eigs"].Options(top_k=3, which="both", tol=1e-6)
