"""Nothing written is lost or counted twice: crashes between any two file operations, concurrent
scans into one ``--out``, duplicate and looping inputs, odd file names, unwritable or drifting
results folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from hesscli.cli import main
from hesscli.config import Settings
from hesscli.results.claims import claim_path
from hesscli.results.fileops import owner_record, path_text
from hesscli.results.parquet import JOURNAL
from hesscli.scan import run_scan

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "COLUMNS": "160", "NO_COLOR": "1"}

MODEL_PY = textwrap.dedent(
    """
    from torch import nn

    def make():
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    """
)


@dataclass
class Run:
    folder: Path
    model: str
    data: str

    def scan_args(self, out: str, *extra: str, analyses: str = "trace,extremes") -> list[str]:
        return ["scan", str(self.folder), "--model", self.model, "--data", self.data, "--analyses", analyses,
                "--probes", "4", "--method", "hutchinson", "--max-iter", "30", "--out", out, "--quiet", *extra]


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """A training run of ``n`` tiny checkpoints (``ckpt_000000.pt`` ...), its factory and data outside it."""
    folder = tmp_path / "run"
    folder.mkdir()
    (tmp_path / "model.py").write_text(MODEL_PY)
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(30, 4, generator=g), "targets": torch.randint(0, 3, (30,), generator=g)},
               tmp_path / "data.pt")
    for i in range(2):
        torch.save({"model_state_dict": _net(i).state_dict(), "step": 100 * i}, folder / f"ckpt_{100 * i:06d}.pt")
    return Run(folder, f"{tmp_path / 'model.py'}:make", str(tmp_path / "data.pt"))


def _forked(job: dict, tmp_path: Path) -> list[dict]:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "forked_cli.py"), str(spec)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _keys(runs: pd.DataFrame) -> list[tuple[str, str, str]]:
    if runs.empty:
        return []
    ok = runs[runs.status == "ok"]
    return sorted(zip(ok.checkpoint_sha256, ok.analysis, ok.options))


def _complete_after_crash(crashed: Path) -> list[tuple[str, str, str]]:
    """Runs that were complete when the process died: visible ``runs`` rows, plus the rows of a
    committed transaction whose parts were not all renamed yet."""
    frames = [pd.read_parquet(crashed / "runs")] if (crashed / "runs").is_dir() else []
    for entry in (crashed / JOURNAL).glob("*.commit") if (crashed / JOURNAL).is_dir() else []:
        hidden = crashed / "runs" / f".part-{entry.name[:-len('.commit')]}.parquet.tmp"
        if hidden.exists():
            frames.append(pq.read_table(hidden).to_pandas())
    return _keys(pd.concat(frames)) if frames else []


def _assert_consistent(out: Path, expected_keys: int, tables: tuple[str, ...] = ("trace", "extremes")) -> pd.DataFrame:
    runs = pd.read_parquet(out / "runs")
    keys = _keys(runs)
    assert len(keys) == expected_keys and len(set(keys)) == len(keys), "a result is missing or stored twice"
    ok = runs[runs.status == "ok"]
    for table in tables:
        df = pd.read_parquet(out / table)
        assert set(df.run_id) == set(ok[ok.analysis == table].run_id), f"orphan or missing {table} rows"
    left = [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".") and p.name != ".lock"]
    assert not left, left
    return runs


def test_crash_between_every_two_file_operations_then_rerun(run, tmp_path):
    base = tmp_path / "crash"
    base.mkdir()
    args = run.scan_args("{out}", "--json", analyses="trace")
    args.remove("--quiet")
    warmup = [a.replace("{out}", str(tmp_path / "warm")) for a in args]
    results = _forked({"mode": "crash-loop", "args": args, "base": str(base), "max_faults": 60, "warmup": warmup},
                      tmp_path)
    assert results[-1]["crash"] == 0, results  # past its last file operation the run completes
    crashes = results[:-1]
    # 2 checkpoints x (claim, journal entry, 2 hidden parts, commit, 2 renames, done, release); --out is
    # created by the run, so there is nothing to probe first
    assert len(crashes) == 18, results
    expected = 2  # 2 checkpoints x trace
    for r in crashes:
        n = r["n"]
        assert r["crash"] == 86 and r["rerun"] == 0, r
        crashed = base / f"n{n}-crashed"
        for table in ("runs", "trace"):  # what the crash left reads with pandas, without duplicates
            if (crashed / table).is_dir():
                df = pd.read_parquet(crashed / table)
                assert not df.duplicated(subset=["run_id", "param_group"] if table == "trace" else ["run_id"]).any()
        complete = _complete_after_crash(crashed) if crashed.is_dir() else []
        _assert_consistent(base / f"n{n}", expected, tables=("trace",))
        rerun = json.loads((base / f"n{n}.json").read_text())
        computed = sorted((o["run"]["checkpoint_sha256"], o["run"]["analysis"], o["run"]["options"])
                          for o in rerun["outcomes"])
        assert not set(computed) & set(complete), f"fault {n}: a complete result was computed again"
        assert len(computed) + len(complete) == expected, f"fault {n}: {computed} + {complete}"


def test_two_identical_scans_split_the_work(run, tmp_path):
    for i in range(2, 4):
        torch.save({"model_state_dict": _net(i).state_dict(), "step": 100 * i}, run.folder / f"ckpt_{100 * i:06d}.pt")
    out = tmp_path / "out"
    args = run.scan_args(str(out), "--json")
    args.remove("--quiet")
    runs = [{"args": args, "stdout": str(tmp_path / f"s{k}.json")} for k in range(2)]  # started at the same time
    status = _forked({"mode": "parallel", "runs": runs, "warmup": run.scan_args(str(tmp_path / "warm"))}, tmp_path)
    assert [s["status"] for s in status] == [0, 0]
    table = _assert_consistent(out, 4 * 2)
    reports = [json.loads((tmp_path / f"s{k}.json").read_text()) for k in range(2)]
    computed = [len(r["outcomes"]) for r in reports]
    assert sum(computed) == len(table) == 8, computed  # each result computed and stored once


def test_stale_claim_is_taken_over_and_a_live_one_is_respected(run, tmp_path):
    out = tmp_path / "out"
    settings = Settings(model=run.model, data=run.data, analyses=("trace",), probes=4, method="hutchinson", out=out)
    from hesscli.api import options_key
    from hesscli.results.parquet import write_outcomes
    from hesscli.scan import sha256_of

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = options_key("trace", settings)
    first, second = sorted(run.folder.iterdir())
    for path, pid in ((first, dead.pid), (second, os.getppid())):  # a finished process; a live one
        claim = claim_path(out, (sha256_of(path), "trace", key))
        claim.parent.mkdir(parents=True, exist_ok=True)
        claim.write_text(json.dumps({**owner_record(), "pid": pid}))
    report = run_scan(run.folder, settings, write=lambda o: write_outcomes(out, o))
    assert [Path(o.run.checkpoint).name for o in report.outcomes] == [first.name]
    assert [Path(c).name for c, _ in report.claimed] == [second.name]
    assert claim_path(out, (sha256_of(second), "trace", key)).exists()  # the live claim is left alone
    assert not claim_path(out, (sha256_of(first), "trace", key)).exists()  # released after writing


def test_link_loop_and_same_content_are_analysed_once(run, tmp_path, capsys):
    nested = run.folder / "sub"
    nested.mkdir()
    (nested / "loop").symlink_to(run.folder, target_is_directory=True)  # run/sub/loop -> run
    (run.folder / "last.ckpt").write_bytes((run.folder / "ckpt_000100.pt").read_bytes())
    (nested / "epoch=0-step=100.ckpt").write_bytes((run.folder / "ckpt_000100.pt").read_bytes())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ei:
        main(["scan", f"{run.folder}/**/*.*t", "--model", run.model, "--data", run.data, "--analyses", "trace",
              "--probes", "4", "--out", str(out), "--json"])
    assert ei.value.code == 0
    report = json.loads(capsys.readouterr().out)
    names = sorted(Path(o["run"]["checkpoint"]).name for o in report["outcomes"])
    assert names == ["ckpt_000000.pt", "ckpt_000100.pt"]  # of the same bytes: a name with a step, the shortest
    dups = {Path(d["checkpoint"]).name: Path(d["same_content_as"]).name for d in report["duplicates"]}
    assert dups == {"epoch=0-step=100.ckpt": "ckpt_000100.pt", "last.ckpt": "ckpt_000100.pt"}
    assert len(pd.read_parquet(out / "runs")) == 2


def test_non_utf8_names_are_stored_and_the_run_goes_on(run, tmp_path):
    raw = os.fsencode(run.folder) + b"/ckpt_\xff\xfe_000300.pt"
    with open(raw, "wb") as fh:
        torch.save({"model_state_dict": _net(3).state_dict()}, fh)
    weird = os.fsdecode(raw)
    out = tmp_path / "out"
    # a single command, as a process: the result is written and printed
    proc = subprocess.run([sys.executable, "-m", "hesscli", "trace", raw, "--model", run.model, "--data", run.data,
                           "--probes", "4", "--out", str(out)], env=ENV, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr
    stored = pd.read_parquet(out / "runs").checkpoint.tolist()
    assert stored == [path_text(weird)] and stored[0].endswith("ckpt_\\xff\\xfe_000300.pt")
    assert stored[0].encode("utf-8")  # valid text; the original bytes are recoverable from the escapes
    assert stored[0].encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").endswith(
        b"ckpt_\xff\xfe_000300.pt")
    # a scan of the folder holding it
    with pytest.raises(SystemExit) as ei:
        main(run.scan_args(str(tmp_path / "scan"), analyses="trace"))
    assert ei.value.code == 0
    names = pd.read_parquet(tmp_path / "scan" / "runs").checkpoint.map(lambda p: p.rsplit("/", 1)[-1])
    assert sorted(names) == ["ckpt_000000.pt", "ckpt_000100.pt", "ckpt_\\xff\\xfe_000300.pt"]


def test_unwritable_out_is_refused_before_any_work(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ckpt = str(run.folder / "ckpt_000000.pt")
    # as a process: exit 2, one line, and the (also broken) --model is never reached
    proc = subprocess.run([sys.executable, "-m", "hesscli", "trace", ckpt, "--model", str(tmp_path / "missing.py:make"),
                           "--data", run.data, "--out", str(blocker)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: --out") and "is a file" in proc.stderr
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    cases = [(blocker / "sub", "is a file")]
    if not os.access(readonly, os.W_OK):  # (root writes anywhere)
        cases.append((readonly, "not writable"))
    try:
        for out, why in cases:
            with pytest.raises(SystemExit) as ei:
                main(run.scan_args(str(out)))
            err = capsys.readouterr().err.strip().splitlines()
            assert ei.value.code == 2 and len(err) == 1 and why in err[0], err
    finally:
        readonly.chmod(0o755)


def test_disk_full_while_writing_keeps_the_result(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("HESSCLI_FAULT_AT", "3:enospc")  # probe, journal entry, then the trace part: full
    with pytest.raises(SystemExit) as ei:
        main(["trace", str(run.folder / "ckpt_000000.pt"), "--model", run.model, "--data", run.data,
              "--probes", "4", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert ei.value.code == 1
    kept = json.loads(captured.out)
    assert kept["run"]["analysis"] == "trace" and isinstance(kept["result"]["estimate"], float)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left" in lines[0]
    assert "not saved" in lines[0] and "stdout" in lines[0]
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing half-written


def test_schema_drift_names_the_part_file(run, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ei:
        main(run.scan_args(str(out), analyses="trace"))
    assert ei.value.code == 0
    capsys.readouterr()
    part = next((out / "trace").glob("part-*.parquet"))
    df = pq.read_table(part).to_pandas()
    df["step"] = [f"step-{s}" for s in df["step"]]  # a part written by another tool, `step` as text
    drifted = out / "trace" / "part-zzz-other-tool.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), drifted)
    with pytest.raises(pa.ArrowInvalid):  # pandas refuses such a dataset
        pd.read_parquet(out / "trace")
    with pytest.raises(SystemExit) as ei:  # and hesscli says which file to move away (not silently cast)
        main(["plot", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and "part-zzz-other-tool.parquet" in err[0], err
    torch.save({"model_state_dict": _net(7).state_dict()}, run.folder / "ckpt_000700.pt")
    with pytest.raises(SystemExit) as ei:
        main(run.scan_args(str(out), analyses="trace"))
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1, err
    assert "part-zzz-other-tool.parquet" in err[0] and "'step'" in err[0] and "move this part file" in err[0]
    assert len(pd.read_parquet(out / "runs")) == 2  # refused before any work
