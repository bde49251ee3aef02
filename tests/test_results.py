"""Table layer: schemas, rows, atomic append-only Parquet datasets, JSON and Rich rendering."""

from __future__ import annotations

import dataclasses
import doctest
import io
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

import hesscli.results as results_pkg
from hesscli.errors import InputError
from hesscli.results import parquet, plots, render, tables
from hesscli.results.parquet import part_files, read_table, write_outcomes
from hesscli.results.records import (
    LandscapeResult,
    DensityResult,
    EigsResult,
    ExtremesResult,
    GroupTrace,
    Outcome,
    RunInfo,
    TraceResult,
)
from hesscli.results.render import outcome_to_json, render_json, render_outcome, render_scan_summary, sparkline
from hesscli.results.tables import (
    TABLES,
    latest_ok_runs,
    outcome_rows,
    outcomes_to_frames,
    save_eigenvectors,
)

REPO = Path(__file__).resolve().parents[1]
KEY = ["run_id", "checkpoint", "step"]

# ----------------------------------------------------------------------------- builders


def make_run(analysis: str, run_id: str, *, step: int | None = 100, checkpoint: str = "exp/ckpt_000100.pt",
             **kw: object) -> RunInfo:
    run = RunInfo(
        run_id=run_id, checkpoint=checkpoint, checkpoint_sha256="ab" * 32, step=step, analysis=analysis,
        backend="native", method="lanczos", curvature="hessian", device="cpu", dtype="float64", seed=7,
        n_params=1234, n_samples=256, loss_value=0.4321, n_hvp=42, seconds=1.5, hesscli_version="0.1.0",
        torch_version="2.13.0", started_at="2025-05-01T12:00:00.000000Z", options='{"top_k": 3}',
    )
    return replace(run, **kw)


def make_trace() -> TraceResult:
    groups = (
        GroupTrace("fc1.weight", 80.0, 2.0, 76.08, 83.92),
        GroupTrace("fc2.weight", 40.5, 1.0, 38.54, 42.46),
        GroupTrace("fc1.bias", -0.25, 0.1, -0.446, -0.054),
    )
    return TraceResult(120.25, 3.5, 113.39, 127.11, 64, "hutch++", 192, groups, converged=True)


def make_eigs(with_vectors: bool = False) -> EigsResult:
    return EigsResult(
        eigenvalues=(31.5, 12.25, -2.125),
        residuals=(1e-9, 2e-7, 3e-3),
        converged=(True, True, False),
        which=("largest", "largest", "smallest"),
        rank=(1, 2, 1),
        n_hvp=90,
        n_iter=30,
        eigenvectors=torch.eye(5, 3, dtype=torch.float64) if with_vectors else None,
    )


def make_extremes() -> ExtremesResult:
    return ExtremesResult(31.5, -2.125, 31.5 / 2.125, 2.125 / 31.5, 1e-9, 3e-3, False, 80)


def make_density(runs: int = 2, iters: int = 4, grid: int = 50) -> DensityResult:
    g = torch.linspace(-3.0, 35.0, grid, dtype=torch.float64)
    d = torch.exp(-0.5 * g**2) / (2 * torch.pi) ** 0.5
    nodes = torch.arange(runs * iters, dtype=torch.float64).reshape(runs, iters)
    weights = torch.full((runs, iters), 1.0 / iters, dtype=torch.float64)
    alphas = nodes + 0.5
    betas = torch.arange(runs * (iters - 1), dtype=torch.float64).reshape(runs, iters - 1) + 100.0
    return DensityResult(g, d, nodes, weights, alphas, betas, sigma=0.125, n_hvp=runs * iters)


def all_outcomes(prefix: str = "r", step: int | None = 100, checkpoint: str = "exp/ckpt_000100.pt") -> list[Outcome]:
    kw = {"step": step, "checkpoint": checkpoint}
    return [
        Outcome(make_run("trace", f"{prefix}-trace", method="hutch++", **kw), make_trace()),
        Outcome(make_run("eigs", f"{prefix}-eigs", **kw), make_eigs()),
        Outcome(make_run("extremes", f"{prefix}-extremes", **kw), make_extremes()),
        Outcome(make_run("density", f"{prefix}-density", method="slq", **kw), make_density()),
        Outcome(make_run("landscape", f"{prefix}-landscape", method="grid-random", **kw), make_landscape()),
    ]


def make_landscape() -> LandscapeResult:
    alphas = torch.linspace(-1, 1, 3, dtype=torch.float64)
    return LandscapeResult(alphas, None, torch.tensor([[1.5, 0.25, 2.0]], dtype=torch.float64),
                           torch.tensor([[0.5, 1.0, 0.75]], dtype=torch.float64), "random", "filter", None,
                           torch.zeros(1, 1234, dtype=torch.float64), 4, 0.25, 1.0)


def failed_outcome(run_id: str = "bad-1", analysis: str = "eigs") -> Outcome:
    run = make_run(analysis, run_id, status="failed", error="loss is NaN at batch 3; check the data", n_hvp=0)
    return Outcome(run, None)


# ----------------------------------------------------------------------------- schemas and rows


def test_table_columns_match_the_contract() -> None:
    assert list(TABLES) == ["runs", "trace", "eigs", "extremes", "density", "ritz", "landscape"]
    assert TABLES["runs"].names == [f.name for f in dataclasses.fields(RunInfo)]
    expected = {
        "trace": ["param_group", "estimate", "stderr", "ci_low", "ci_high", "n_probes", "method", "converged"],
        "eigs": ["rank", "which", "eigenvalue", "residual", "converged", "error_bound", "at_floor"],
        "extremes": ["lambda_max", "lambda_min", "condition_number", "negative_ratio", "residual_max",
                     "residual_min", "converged"],
        "density": ["grid", "density", "sigma"],
        "ritz": ["run", "index", "node", "weight", "alpha", "beta"],
        "landscape": ["direction_kind", "normalize", "direction", "alpha", "beta", "loss", "accuracy",
                      "center_loss", "eigenvalue_1", "eigenvalue_2", "n_forward"],
    }
    for name, cols in expected.items():
        assert TABLES[name].names == KEY + cols, name
    for name, schema in TABLES.items():
        assert schema.field("step").type == pa.int64() and schema.field("step").nullable, name
        assert not any(pa.types.is_null(f.type) for f in schema), name


def test_trace_rows_hold_total_then_groups() -> None:
    rows = outcome_rows(all_outcomes()[0])
    assert set(rows) == {"trace", "runs"}
    trace = rows["trace"]
    assert [r["param_group"] for r in trace] == ["all", "fc1.weight", "fc2.weight", "fc1.bias"]
    assert trace[0]["estimate"] == 120.25 and trace[0]["ci_low"] == 113.39 and trace[0]["n_probes"] == 64
    assert trace[3]["estimate"] == -0.25 and trace[3]["stderr"] == 0.1
    assert all(r["method"] == "hutch++" and r["converged"] is True and r["step"] == 100 for r in trace)


def test_eigs_and_extremes_rows() -> None:
    eigs = outcome_rows(all_outcomes()[1])["eigs"]
    assert [(r["rank"], r["which"], r["eigenvalue"], r["converged"]) for r in eigs] == [
        (1, "largest", 31.5, True), (2, "largest", 12.25, True), (1, "smallest", -2.125, False)]
    assert eigs[2]["residual"] == 3e-3
    ext = outcome_rows(all_outcomes()[2])["extremes"]
    assert len(ext) == 1 and ext[0]["lambda_min"] == -2.125 and ext[0]["converged"] is False


def test_density_and_ritz_rows() -> None:
    rows = outcome_rows(all_outcomes()[3])
    assert set(rows) == {"density", "ritz", "runs"}
    assert len(rows["density"]) == 50 and all(r["sigma"] == 0.125 for r in rows["density"])
    assert rows["density"][0]["grid"] == -3.0 and rows["density"][-1]["grid"] == 35.0
    ritz = rows["ritz"]
    assert len(ritz) == 2 * 4
    assert [(r["run"], r["index"]) for r in ritz] == [(r, i) for r in range(2) for i in range(4)]
    assert [r["node"] for r in ritz] == [float(v) for v in range(8)]
    assert [r["alpha"] for r in ritz] == [v + 0.5 for v in range(8)]
    # beta couples index i and i+1, so each run's last index has none
    assert [r["beta"] for r in ritz] == [100.0, 101.0, 102.0, None, 103.0, 104.0, 105.0, None]


def test_failed_outcome_has_only_a_runs_row() -> None:
    rows = outcome_rows(failed_outcome())
    assert list(rows) == ["runs"]
    assert rows["runs"][0]["status"] == "failed" and "loss is NaN" in rows["runs"][0]["error"]


# ----------------------------------------------------------------------------- Parquet round trip


def test_round_trip_every_table_through_pandas(tmp_path: Path) -> None:
    out = tmp_path / "res"
    written = write_outcomes(out, all_outcomes())
    assert [p.parent.name for p in written] == ["trace", "eigs", "extremes", "density", "ritz", "landscape", "runs"]
    for p in written:
        assert p.name.startswith("part-") and p.suffix == ".parquet"
        assert pq.read_schema(p).remove_metadata() == TABLES[p.parent.name]

    for name, schema in TABLES.items():
        df = pd.read_parquet(out / name)
        assert list(df.columns) == schema.names, name
        assert set(df["run_id"]) <= {o.run.run_id for o in all_outcomes()}
        assert (df["step"] == 100).all() and (df["checkpoint"] == "exp/ckpt_000100.pt").all()

    runs = pd.read_parquet(out / "runs")
    assert runs["analysis"].tolist() == ["trace", "eigs", "extremes", "density", "landscape"]
    first = runs.iloc[0]
    expected = dataclasses.asdict(all_outcomes()[0].run)
    for col, value in expected.items():
        if value is None:
            assert pd.isna(first[col]), col
        else:
            assert first[col] == value, col

    eigs = pd.read_parquet(out / "eigs")
    assert eigs["eigenvalue"].tolist() == [31.5, 12.25, -2.125]
    assert eigs["converged"].tolist() == [True, True, False]
    trace = pd.read_parquet(out / "trace")
    assert trace.loc[trace["param_group"] == "all", "estimate"].item() == 120.25
    ext = pd.read_parquet(out / "extremes")
    assert ext["condition_number"].item() == pytest.approx(31.5 / 2.125)
    density = pd.read_parquet(out / "density")
    assert density["density"].tolist() == pytest.approx(make_density().density.tolist())
    ritz = pd.read_parquet(out / "ritz")
    assert ritz["beta"].isna().tolist() == [False, False, False, True] * 2


def test_read_table_matches_in_memory_frames(tmp_path: Path) -> None:
    outcomes = all_outcomes() + [failed_outcome()]
    write_outcomes(tmp_path, outcomes)
    frames = outcomes_to_frames(outcomes)
    for name in TABLES:
        pd.testing.assert_frame_equal(read_table(tmp_path, name), frames[name], check_like=False)


def test_read_table_absent_and_unknown(tmp_path: Path) -> None:
    for name, schema in TABLES.items():
        df = read_table(tmp_path / "missing", name)
        assert df.empty and list(df.columns) == schema.names
    assert str(read_table(tmp_path, "eigs")["step"].dtype) == "Int64"
    with pytest.raises(InputError, match="table 'eig': unknown table; choose one of runs, trace"):
        read_table(tmp_path, "eig")
    (tmp_path / "eigs").write_text("not a folder")
    with pytest.raises(InputError, match="expected a Parquet dataset directory, found a file"):
        read_table(tmp_path, "eigs")


def test_several_calls_append_part_files(tmp_path: Path) -> None:
    for i in range(3):
        write_outcomes(tmp_path, all_outcomes(prefix=f"call{i}"))
    for name in TABLES:
        assert len(part_files(tmp_path, name)) == 3, name
    runs = pd.read_parquet(tmp_path / "runs")
    assert len(runs) == 15 and runs["run_id"].nunique() == 15
    assert len(pd.read_parquet(tmp_path / "eigs")) == 9
    assert len(pd.read_parquet(tmp_path / "density")) == 150
    assert len(read_table(tmp_path, "ritz")) == 24
    # Parts come back in write order.
    assert read_table(tmp_path, "runs")["run_id"].str[:5].tolist() == ["call0"] * 5 + ["call1"] * 5 + ["call2"] * 5


def test_one_call_with_many_outcomes_writes_one_part_per_table(tmp_path: Path) -> None:
    written = write_outcomes(tmp_path, all_outcomes("a") + all_outcomes("b", step=200))
    assert len(written) == 7
    assert sorted(read_table(tmp_path, "extremes")["step"].tolist()) == [100, 200]


def test_failed_outcome_writes_only_runs(tmp_path: Path) -> None:
    written = write_outcomes(tmp_path, [failed_outcome()])
    assert [p.parent.name for p in written] == ["runs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    runs = pd.read_parquet(tmp_path / "runs")
    assert runs["status"].tolist() == ["failed"]
    assert runs["error"].item() == "loss is NaN at batch 3; check the data"
    assert read_table(tmp_path, "eigs").empty


def test_nothing_to_write(tmp_path: Path) -> None:
    assert write_outcomes(tmp_path / "res", []) == []
    assert not (tmp_path / "res").exists()


def test_null_step_keeps_a_stable_int_schema(tmp_path: Path) -> None:
    write_outcomes(tmp_path, all_outcomes("nostep", step=None))  # first part: every step null
    write_outcomes(tmp_path, all_outcomes("withstep", step=1500))
    for name in TABLES:
        for p in part_files(tmp_path, name):
            assert pq.read_schema(p).field("step").type == pa.int64()
    extremes = pd.read_parquet(tmp_path / "extremes")  # plain pandas reads both parts
    assert extremes["step"].isna().tolist() == [True, False]
    ours = read_table(tmp_path, "extremes")
    assert str(ours["step"].dtype) == "Int64" and ours["step"].iloc[1] == 1500
    empty_error = read_table(tmp_path, "runs")["error"]
    assert empty_error.isna().all()


def test_runs_is_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        order.append(Path(dst).parent.name)
        real(src, dst)

    monkeypatch.setattr(parquet.os, "replace", spy)
    write_outcomes(tmp_path, all_outcomes())
    assert order[-1] == "runs" and sorted(order[:-1]) == ["density", "eigs", "extremes", "landscape", "ritz", "trace"]


# ----------------------------------------------------------------------------- atomicity


_CRASH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_results import all_outcomes
    from hesscli.results.parquet import write_outcomes
    real, calls = os.replace, []
    def crash(src, dst):
        calls.append(dst)
        if len(calls) > {renames_before_crash}:
            os._exit(17)  # the process dies between writing a part and renaming it
        real(src, dst)
    os.replace = crash
    write_outcomes(Path({out!r}), all_outcomes("crashed"))
    """
)


def _crash_writer(out: Path, renames_before_crash: int) -> None:
    code = _CRASH.format(tests=str(REPO / "tests"), out=str(out), renames_before_crash=renames_before_crash)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr


def test_crash_before_rename_leaves_readers_unaffected(tmp_path: Path) -> None:
    write_outcomes(tmp_path, all_outcomes("before"))
    _crash_writer(tmp_path, renames_before_crash=0)

    leftovers = [p for p in (tmp_path / "trace").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the unrenamed temp file is there
    for name in TABLES:
        for df in (pd.read_parquet(tmp_path / name), pads.dataset(tmp_path / name).to_table().to_pandas(),
                   read_table(tmp_path, name)):
            assert set(df["run_id"].str[:6]) == {"before"}, name


def test_crash_before_runs_rename_records_no_run(tmp_path: Path) -> None:
    _crash_writer(tmp_path, renames_before_crash=5)  # all five analysis tables renamed, then death
    assert set(read_table(tmp_path, "eigs")["run_id"]) == {"crashed-eigs"}
    assert read_table(tmp_path, "runs").empty  # no ok runs row without its analysis rows
    assert [p.name.startswith(".") for p in (tmp_path / "runs").iterdir()] == [True]


def test_partial_temp_file_is_ignored_by_readers(tmp_path: Path) -> None:
    write_outcomes(tmp_path, all_outcomes("good"))
    (tmp_path / "eigs" / ".part-20990101T000000000000Z-deadbeef.parquet.tmp").write_bytes(b"PAR1\x00garbage")
    (tmp_path / "eigs" / "_part-torn.parquet").write_bytes(b"PAR1\x00garbage")
    assert len(pd.read_parquet(tmp_path / "eigs")) == 3
    assert len(read_table(tmp_path, "eigs")) == 3


def test_failed_write_removes_its_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_outcomes(tmp_path, all_outcomes("good"))

    def disk_full(table: pa.Table, where: io.BufferedWriter) -> None:
        where.write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parquet.pq, "write_table", disk_full)
    with pytest.raises(InputError, match=r"cannot write the trace table \(No space left on device.*--out"):
        write_outcomes(tmp_path, all_outcomes("bad"))
    for name in TABLES:
        assert all(not p.name.startswith(".") for p in (tmp_path / name).iterdir()), name
        assert len(part_files(tmp_path, name)) == 1


def test_unwritable_out_is_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=r"--out .*file: cannot write the trace table"):
        write_outcomes(blocker, all_outcomes())


def _shard_worker(out: str, shard: int, n_calls: int) -> None:
    for call in range(n_calls):
        outcomes = all_outcomes(prefix=f"s{shard}c{call}", step=shard * 100 + call)
        outcomes.append(failed_outcome(run_id=f"s{shard}c{call}-failed"))
        write_outcomes(Path(out), outcomes)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    n_shards, n_calls = 2, 6
    procs = [ctx.Process(target=_shard_worker, args=(str(tmp_path), s, n_calls)) for s in range(n_shards)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    runs = read_table(tmp_path, "runs")
    assert len(runs) == n_shards * n_calls * 6 and runs["run_id"].is_unique
    assert (runs["status"] == "failed").sum() == n_shards * n_calls
    assert len(pd.read_parquet(tmp_path / "eigs")) == n_shards * n_calls * 3
    assert len(pd.read_parquet(tmp_path / "density")) == n_shards * n_calls * 50
    for name in TABLES:
        assert len(part_files(tmp_path, name)) == n_shards * n_calls, name
        assert not [p for p in (tmp_path / name).iterdir() if p.name.startswith(".")], name


# ----------------------------------------------------------------------------- selection, vectors


def test_latest_ok_runs_prefers_newest_success() -> None:
    runs = outcomes_to_frames([
        Outcome(make_run("eigs", "old", started_at="2025-01-01T00:00:00Z"), make_eigs()),
        Outcome(make_run("eigs", "new", started_at="2025-02-01T00:00:00Z"), make_eigs()),
        Outcome(make_run("eigs", "newest-failed", started_at="2025-03-01T00:00:00Z", status="failed"), None),
        Outcome(make_run("trace", "t", started_at="2025-01-05T00:00:00Z"), make_trace()),
        Outcome(make_run("eigs", "other-ckpt", checkpoint="b.pt", step=None), make_eigs()),
        Outcome(make_run("eigs", "early", checkpoint="a.pt", step=5), make_eigs()),
    ])["runs"]
    picked = latest_ok_runs(runs)
    assert picked["run_id"].tolist() == ["early", "new", "t", "other-ckpt"]


def test_save_eigenvectors_round_trip(tmp_path: Path) -> None:
    outcome = Outcome(make_run("eigs", "with-vecs"), make_eigs(with_vectors=True))
    path = save_eigenvectors(tmp_path, outcome)
    assert path == tmp_path / "vectors" / "with-vecs.pt"
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["eigenvectors"], torch.eye(5, 3, dtype=torch.float64))
    assert saved["eigenvalues"].tolist() == [31.5, 12.25, -2.125]
    assert saved["which"] == ["largest", "largest", "smallest"] and saved["step"] == 100
    assert [p.name for p in (tmp_path / "vectors").iterdir()] == ["with-vecs.pt"]
    with pytest.raises(InputError, match="no eigenvectors to save.*--save-vectors"):
        save_eigenvectors(tmp_path, Outcome(make_run("eigs", "no-vecs"), make_eigs()))
    with pytest.raises(InputError, match="no eigenvectors to save"):
        save_eigenvectors(tmp_path, all_outcomes()[0])


# ----------------------------------------------------------------------------- JSON


def test_outcome_to_json_is_strict_json() -> None:
    outcomes = all_outcomes() + [failed_outcome(), Outcome(make_run("eigs", "v"), make_eigs(with_vectors=True),
                                                             extra={"accuracy": torch.tensor(0.75), "p": Path("x")})]
    inf = Outcome(make_run("extremes", "inf"), replace(make_extremes(), condition_number=float("inf"),
                                                       residual_min=float("nan")))
    for o in [*outcomes, inf]:
        d = outcome_to_json(o)
        text = json.dumps(d, allow_nan=False)
        assert json.loads(text) == d
        assert d["run"]["run_id"] == o.run.run_id
    assert outcome_to_json(failed_outcome())["result"] is None
    eigs = outcome_to_json(outcomes[-1])
    assert "eigenvectors" not in eigs["result"] and eigs["result"]["eigenvalues"] == [31.5, 12.25, -2.125]
    assert eigs["extra"] == {"accuracy": 0.75, "p": "x"}
    density = outcome_to_json(outcomes[3])["result"]
    assert len(density["grid"]) == 50 and density["nodes"][1] == [4.0, 5.0, 6.0, 7.0]
    trace = outcome_to_json(outcomes[0])["result"]
    assert trace["groups"][0] == {"name": "fc1.weight", "estimate": 80.0, "stderr": 2.0, "ci_low": 76.08,
                                  "ci_high": 83.92}
    ext = outcome_to_json(inf)["result"]
    assert ext["condition_number"] is None and ext["residual_min"] is None and ext["lambda_min"] == -2.125


def test_render_json_writes_one_array() -> None:
    buf = io.StringIO()
    render_json(all_outcomes()[:2], buf)
    parsed = json.loads(buf.getvalue())
    assert [d["run"]["analysis"] for d in parsed] == ["trace", "eigs"]
    buf = io.StringIO()
    render_json([failed_outcome()], buf)
    assert json.loads(buf.getvalue())[0]["run"]["status"] == "failed"


# ----------------------------------------------------------------------------- Rich


def _text(render_fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    console = Console(record=True, width=120, force_terminal=False, color_system=None)
    render_fn(*args, console, **kw)
    return console.export_text()


def test_render_trace() -> None:
    text = _text(render_outcome, all_outcomes()[0])
    for needle in ("120.25 ± 3.5", "[113.39, 127.11]", "hutch++", "64 probes", "192 HVPs", "fc1.weight", "80",
                   "66.5%", "step 100", "exp/ckpt_000100.pt", "1,234 params", "256 samples", "loss 0.4321",
                   "42 HVPs", "float64"):
        assert needle in text, needle
    # groups ordered by |trace|: fc1.weight, fc2.weight, fc1.bias
    assert text.index("fc1.weight") < text.index("fc2.weight") < text.index("fc1.bias")


def test_render_trace_truncates_many_groups() -> None:
    groups = tuple(GroupTrace(f"layer{i}.weight", float(i), 0.1, i - 0.2, i + 0.2) for i in range(12))
    result = replace(make_trace(), groups=groups)
    text = _text(render_outcome, Outcome(make_run("trace", "t"), result))
    assert "layer11.weight" in text and "layer4.weight" in text and "layer3.weight" not in text
    assert "… and 4 more parameter tensors" in text


def test_render_eigs_extremes_density() -> None:
    eigs = _text(render_outcome, all_outcomes()[1])
    for needle in ("31.5", "12.25", "-2.125", "3.00e-03", "smallest", "✓", "✗", "2/3 converged", "30 iterations"):
        assert needle in eigs, needle
    ext = _text(render_outcome, all_outcomes()[2])
    for needle in ("λ_max", "31.5", "λ_min", "-2.125", "condition number", "14.824", "negative ratio", "0.06746"):
        assert needle in ext, needle
    dens = _text(render_outcome, all_outcomes()[3])
    for needle in ("σ", "0.125", "2 runs × 4 iters", "[-3, 35]", "log density"):
        assert needle in dens, needle
    assert any(c in dens for c in "▁▂▃▄▅▆▇█")


def test_render_failed_outcome() -> None:
    text = _text(render_outcome, failed_outcome())
    assert "eigs failed on exp/ckpt_000100.pt (step 100): loss is NaN at batch 3; check the data" in text
    assert "╭" not in text


def test_render_markup_in_names_is_literal() -> None:
    run = make_run("eigs", "m", checkpoint="runs/[bold]odd[/bold].pt")
    text = _text(render_outcome, Outcome(run, make_eigs()))
    assert "[bold]odd[/bold].pt" in text


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([3, None, float("nan"), 3]) == "▄  ▄"
    assert sparkline([1e-6, 1e-3, 1.0], log=True) == "▁▅█"
    assert sparkline([0.0, 1.0], log=True) == " ▄"
    assert sparkline([]) == ""


def test_render_scan_summary(tmp_path: Path) -> None:
    outcomes: list[Outcome] = []
    for i, step in enumerate((0, 1000, 2000)):
        ckpt = f"exp/ckpt_{step:06d}.pt"
        tr = replace(make_trace(), estimate=100.0 * (i + 1), stderr=1.5)
        ex = replace(make_extremes(), lambda_max=10.0 * (i + 1), lambda_min=-1.0 / (i + 1))
        outcomes.append(Outcome(make_run("trace", f"t{i}", step=step, checkpoint=ckpt), tr))
        if i != 1:
            outcomes.append(Outcome(make_run("extremes", f"x{i}", step=step, checkpoint=ckpt), ex))
        else:
            outcomes.append(Outcome(make_run("extremes", f"x{i}", step=step, checkpoint=ckpt, status="failed",
                                             error="Lanczos breakdown: zero starting vector"), None))
    write_outcomes(tmp_path, outcomes)
    write_outcomes(tmp_path, [Outcome(make_run("trace", "other-scan", step=5, checkpoint="elsewhere.pt"), make_trace())])
    frames = {name: read_table(tmp_path, name) for name in ("trace", "eigs", "extremes")}
    text = _text(render_scan_summary, read_table(tmp_path, "runs"), run_ids={o.run.run_id for o in outcomes},
                 **frames)
    for needle in ("ckpt_000000.pt", "100 ± 1.5", "200 ± 1.5", "300 ± 1.5", "10", "30", "-0.33333",
                   "failed: extremes", "3 checkpoints", "1 with failures",
                   "exp/ckpt_001000.pt (step 1000) · extremes: Lanczos breakdown: zero starting vector",
                   "trend"):
        assert needle in text, needle
    assert "elsewhere" not in text
    assert "▁▅█" in text  # trace trend 100, 200, 300 (the middle lands on the upper half-level)
    assert text.index("ckpt_000000.pt") < text.index("ckpt_001000.pt") < text.index("ckpt_002000.pt")


def test_render_scan_summary_accepts_a_mapping_and_checkpoint_filter() -> None:
    frames = outcomes_to_frames(all_outcomes("a", step=10, checkpoint="a.pt") + all_outcomes("b", step=20, checkpoint="b.pt"))
    text = _text(render_scan_summary, frames, checkpoints={"b.pt"})
    assert "b.pt" in text and "a.pt" not in text
    assert "120.25 ± 3.5" in text and "31.5" in text and "-2.125" in text and "1 checkpoint · 5 runs" in text


def test_render_scan_summary_falls_back_to_eigs_and_handles_empty() -> None:
    frames = outcomes_to_frames([Outcome(make_run("eigs", "e", checkpoint="one.pt"), make_eigs())])
    text = _text(render_scan_summary, frames["runs"], eigs=frames["eigs"])
    assert "31.5" in text and "-2.125" in text and "one.pt" in text
    empty = _text(render_scan_summary, frames["runs"], run_ids=[])
    assert "no runs to summarise" in empty


# ----------------------------------------------------------------------------- package surface


def test_package_reexports_lazily() -> None:
    for name in results_pkg.__all__:
        assert getattr(results_pkg, name) is not None, name
    assert results_pkg.write_outcomes is write_outcomes and results_pkg.make_plots is plots.make_plots
    with pytest.raises(AttributeError):
        results_pkg.no_such_name  # noqa: B018


def test_results_package_imports_nothing_from_the_engine() -> None:
    import ast

    folder = REPO / "hesscli" / "results"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name == "hesscli" or name.startswith("hesscli."):
                    assert name == "hesscli.errors" or name.startswith("hesscli.results"), f"{path.name}: {name}"


def test_importing_a_record_loads_no_heavy_dependency() -> None:
    # A bare parent package, so only hesscli.results (and what it imports) is loaded.
    code = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("hesscli")
        pkg.__path__ = [{str(REPO / "hesscli")!r}]
        sys.modules["hesscli"] = pkg
        from hesscli.results import TraceResult, Outcome
        print(sorted(m for m in ("pandas", "pyarrow", "rich", "matplotlib") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("module", [tables, parquet, render], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.failed == 0
