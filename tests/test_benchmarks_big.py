"""The big-model and thread-contention benchmark sections: rendering, ``--only``, and the product paths."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import big_models, contention, memory_peaks
from benchmarks import run as bench_run
from benchmarks.report import write_report


def _path(one: float, block: float, grad: float, first: float = 1.0) -> dict:
    return {"status": "ok", "first_s": first, "one_s": one, "block_s": block, "one_x_grad": one / grad,
            "block_x_grad": block / grad, "peak_mb": 100.0}


BIG = {
    "settings": {"device": "cpu", "repeats": 3, "block": 2, "threads": 2},
    "rows": [
        {"model": "resnet18", "what": "ResNet-18", "device": "cpu", "n_params": 11_173_962, "gradient_s": 2.0,
         "torch": "2.x", "paths": {"autograd": _path(5.0, 4.8, 2.0, 12.0), "func": _path(9.0, 7.0, 2.0),
                                   "compiled": _path(3.0, 2.5, 2.0, 120.0)},
         "agreement": {"func_vs_autograd": 1e-7, "autograd_vs_float64": 2e-7}, "peak_rss_mb": 3000.0,
         "foreign_load": 0.05},
        {"model": "gpt2", "what": "GPT-2", "device": "cpu", "n_params": 10_600_000, "gradient_s": 1.0,
         "paths": {"autograd": _path(3.0, 3.0, 1.0), "func": _path(4.0, 3.5, 1.0),
                   "compiled": {"status": "FAIL", "error": "BackendCompilerFailed: boom"}},
         "agreement": {}, "peak_rss_mb": 2000.0, "foreign_load": 0.0},
    ],
    "layout_probe": {"on": {"returncode": -6, "error": "double free or corruption (!prev)"},
                     "off": {"returncode": 0, "rel_diff": 1e-7}},
}

CONTENTION = {
    "cpus": 2, "checkpoint": "ckpt_step000400.pt",
    "rows": [{"busy": n, "setting": s, "status": "ok", "seconds": 7.0 + n, "all_seconds": [7.0 + n, 8.0 + n],
              "decisions": ["passive" if n else "OpenMP default"], "n_hvp": 36, "lambda1": [1.234567],
              "foreign_load": 0.01} for n in (0, 2, 4) for s in contention.SETTINGS],
}


def _results() -> dict:
    return {"generated": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.run",
            "machine": {"cpu": "test CPU", "cores": 2, "ram_gib": 24, "torch_threads": 2},
            "versions": {"torch": torch.__version__}, "settings": {"foreign_load_limit": 0.1, "quick": False},
            "workloads": {}, "wall_seconds": 1.0}


def test_report_renders_the_big_model_and_contention_sections(tmp_path):
    text = write_report({**_results(), "big_models": BIG, "contention": CONTENTION}, tmp_path / "RESULTS.md")
    assert "## Big models" in text and "## Thread contention" in text
    assert "| resnet18 (ResNet-18) | cpu | 11,173,962 | 2.00 s | 12.00 s | 5.00 s (2.50x) |" in text
    assert "| 5% | - |" in text
    assert "3.00 s (1.50x)" in text  # the compiled column of the ResNet
    assert "compiled path failed: `BackendCompilerFailed: boom`" in text
    assert "double free or corruption" in text and "1.1-2.8" in text
    assert "| none added | 7.0 s (7.0, 8.0) OpenMP default |" in text
    assert "| 4 busy | 11.0 s (11.0, 12.0) passive | 11.0 s (11.0, 12.0) | 11.0 s (11.0, 12.0) | 1% |" in text
    assert ", error " not in text.split("## Thread contention")[1].split("## ")[0]  # no reference: no error


def test_contention_rows_carry_their_error_against_the_float64_reference():
    ref = [2.0, 1.0, 0.5]
    rows = [{"busy": 0, "setting": "default", "status": "ok", "seconds": 7.0, "all_seconds": [7.0, 8.0],
             "decisions": ["passive"], "n_hvp": 36, "lambda1": [2.0, 2.0],
             "eigenvalues": [[2.0, 1.0, 0.5], [2.0, 1.001, 0.5]], "foreign_load": 0.0},
            {"busy": 0, "setting": "threads1", "status": "ok", "seconds": 9.0, "all_seconds": [9.0],
             "decisions": ["passive"], "n_hvp": 36, "lambda1": [2.0004], "eigenvalues": [[0.5, 2.0004, 1.0]],
             "foreign_load": 0.0}]
    text = contention.markdown({"cpus": 2, "rows": rows, "reference": ref})
    # the worst run of each setting, its values sorted before scoring
    assert "| none added | 7.0 s (7.0, 8.0) passive, error 1.0e-03 | 9.0 s (9.0), error 2.0e-04 | 0% |" in text
    assert "(float64: 2); the errors are of the top-3." in text
    # older rows kept λ1 alone: scored on λ1
    old = [{k: v for k, v in r.items() if k != "eigenvalues"} for r in rows]
    text = contention.markdown({"cpus": 2, "rows": old, "reference": ref})
    assert "passive, error 0.0e+00 | 9.0 s (9.0), error 2.0e-04 |" in text
    assert "the errors are of λ1 alone (the only value these runs kept)." in text
    assert contention.max_rel_error([1.0, 3.0], [3.0, 2.0]) == pytest.approx(0.5)


MEMORY = {
    "threshold": 65536, "runs": 2,
    "rows": [
        {"workload": "W2", "analysis": "trace", "library": "hesscli", "peak_mb": 60.0, "peaks_mb": [60.0, 58.0]},
        {"workload": "W2", "analysis": "trace", "library": "hesscli-hutchinson", "peak_mb": 44.0, "peaks_mb": [44.0]},
        {"workload": "W2", "analysis": "trace", "library": "pyhessian", "peak_mb": 40.0, "peaks_mb": [40.0, 40.0]},
        {"workload": "W2", "analysis": "density", "library": "hesscli", "peak_mb": None, "error": "MemoryError: x"},
        {"workload": "W2", "analysis": "density", "library": "pyhessian", "peak_mb": 50.0, "peaks_mb": [50.0]},
        {"workload": "W4", "analysis": "density", "library": "hesscli", "skipped": "too slow"},
        {"workload": "W4", "analysis": "density", "library": "pyhessian", "skipped": "too slow"},
    ],
}


def test_report_renders_the_memory_section(tmp_path):
    text = write_report({**_results(), "memory": MEMORY}, tmp_path / "RESULTS.md")
    assert "## Peak memory of trace and density" in text and "MALLOC_MMAP_THRESHOLD_=65536" in text
    assert "| W2 | trace | 60.0 MB (58.0-60.0) | 40.0 MB (40.0-40.0) | **1.50** | 44.0 MB |" in text
    assert "| W2 | density | **FAIL**: MemoryError: x | 50.0 MB | - | - |" in text
    assert "| W4 | density | - | - | too slow | - |" in text
    assert memory_peaks.markdown(MEMORY) in text


def test_memory_rows_are_measured_in_processes_with_the_threshold_fixed(monkeypatch):
    seen = []

    class Done:
        stdout = 'noise\n{"peak_mb": 12.5, "peaks_mb": [12.5], "error": null}\n'
        stderr = ""

    def fake_run(cmd, env, **kwargs):
        seen.append((cmd[cmd.index("--child") + 1:], env["MALLOC_MMAP_THRESHOLD_"]))
        return Done()
    monkeypatch.setattr(memory_peaks.subprocess, "run", fake_run)
    section = memory_peaks.run(["W2", "W4"], runs=2, log=lambda _: None)
    assert all(threshold == "65536" for _, threshold in seen)
    assert [c[:3] for c, _ in seen] == [["W2", "hesscli", "trace"], ["W2", "hesscli-hutchinson", "trace"],
                                        ["W2", "pyhessian", "trace"], ["W2", "hesscli", "density"],
                                        ["W2", "pyhessian", "density"], ["W4", "hesscli", "trace"],
                                        ["W4", "hesscli-hutchinson", "trace"], ["W4", "pyhessian", "trace"]]
    assert [c[-1] for c, _ in seen] == ["2"] * 5 + ["1"] * 3  # W4: one measured call
    assert [r.get("skipped") is not None for r in section["rows"]].count(True) == 2  # W4 density


def test_report_without_the_sections_has_no_headings(tmp_path):
    text = write_report(_results(), tmp_path / "RESULTS.md")
    assert "## Big models" not in text and "## Thread contention" not in text


def test_only_replaces_just_the_named_sections(tmp_path, monkeypatch):
    out_json, out_md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    out_json.write_text(json.dumps({**_results(), "whole_process": [], "contention": {"rows": []}}))
    calls = []

    def fake(name, **kwargs):
        calls.append(name)
        return BIG
    monkeypatch.setattr(bench_run, "run_section", fake)
    assert bench_run.main(["--only", "big_models", "--out", str(out_json), "--report", str(out_md)]) == 0
    assert calls == ["big_models"]
    saved = json.loads(out_json.read_text())
    assert saved["big_models"]["rows"][0]["model"] == "resnet18"
    assert saved["contention"] == {"rows": []} and saved["command"] == "python -m benchmarks.run"
    assert "## Big models" in out_md.read_text()
    with pytest.raises(SystemExit):
        bench_run.main(["--only", "nothing", "--out", str(out_json)])


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", big_models.MODELS)
def test_measuring_function_on_a_tiny_model_paths_agree(name, one_thread):
    row = big_models.measure_model(name, batch=4, seq=8, tiny=True, repeats=1, block=2, compile=False)
    assert row["paths"]["autograd"]["status"] == "ok" and row["paths"]["func"]["status"] == "ok"
    assert row["gradient_s"] > 0 and row["paths"]["autograd"]["one_x_grad"] > 0
    a = row["agreement"]
    assert a["func_vs_autograd"] < 1e-5
    assert a["autograd_vs_float64"] < 1e-5 and a["func_vs_float64"] < 1e-5
    assert big_models.markdown({"rows": [row], "settings": {}}).count(f"| {name} (tiny") == 1


def test_float64_product_matches_a_finite_difference_of_gradients(one_thread):
    from hesscli.operators.empirical import HessianOperator

    problem, _ = big_models.build_problem("resnet18", batch=4, tiny=True, dtype="float64")
    op = HessianOperator(problem, hvp="autograd")
    v = torch.randn(problem.n_params, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = op.matmat(v)[:, 0]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(op.params, op._split(v)):
            p.add_(eps * d[0])
    g_plus = op.loss_and_gradient()[1]
    with torch.no_grad():
        for p, d in zip(op.params, op._split(v)):
            p.sub_(2 * eps * d[0])
    g_minus = op.loss_and_gradient()[1]
    fd = (g_plus - g_minus) / (2 * eps)
    assert float((fd - hv).norm() / hv.norm()) < 1e-6


@pytest.mark.slow
def test_compiled_product_on_a_tiny_model_agrees(one_thread):
    row = big_models.measure_model("gpt2", batch=2, seq=8, tiny=True, repeats=1, block=2, compile=True,
                                   float64_check=False)
    assert row["paths"]["compiled"]["status"] == "ok", row["paths"]["compiled"]
    assert row["agreement"]["compiled_vs_autograd"] < 1e-5
    assert row["paths"]["compiled"]["block_vs_func"] < 1e-5


def _whole_row(workload: str, setting: str | None, seconds: float, n_hvp: int, error: float) -> dict:
    row = {"workload": workload, "library": (setting or "hesscli").split("_")[0], "n_params": 1000,
           "seconds": seconds, "all_seconds": [seconds], "n_hvp": n_hvp, "error": error}
    if setting is not None:
        row["setting"] = setting
    return row


def test_whole_process_speed_ups_at_defaults_and_at_equal_accuracy():
    from benchmarks.whole_process import markdown

    rows = [_whole_row("W2", "hesscli", 4.0, 36, 1e-5), _whole_row("W2", "hesscli_loose", 2.0, 24, 5e-5),
            _whole_row("W2", "pyhessian", 8.0, 120, 4e-3), _whole_row("W2", "pyhessian_tight", 12.0, 270, 2e-5),
            _whole_row("W4", None, 40.0, 36, 6e-6), {**_whole_row("W4", None, 160.0, 123, 2e-3), "library": "pyhessian"}]
    text = markdown(rows)
    assert "| W2 | 2.0× (120 / 36 products) | 4.0× (120 / 24 products) | ≥ 3.0× (270 / 36 products) " \
           "(PyHessian still 2.0x the error) |" in text
    assert "| W4 | 4.0× (123 / 36 products) | - | - |" in text  # rows of an older run: defaults only
    # the figures of the explanation come from the rows: per product on the largest, 5x on the smallest
    assert "(W2, the whole process divided by its products: 0.11 s against 0.07 s;" in text
    assert "5× PyHessian's 8.0 s would leave hesscli 1.6 s" in text
    rows[4]["n_params"] = rows[5]["n_params"] = 2000
    assert "(W4, the whole process divided by its products: 1.11 s against 1.30 s;" in markdown(rows)
    assert "(at defaults not met; at equal accuracy not met; see below)" in text
    rows[5]["seconds"] = 200.0
    rows[3]["seconds"] = 40.0  # 5x at defaults on W4, 10x at hesscli's accuracy on W2
    assert "(at defaults met on W4; at equal accuracy met on W2; see below)" in markdown(rows)
    rows[3]["seconds"], rows[1]["seconds"] = 12.0, 0.5  # 16x on W2 only through the loose run
    rows[1]["error"] = 1e-2  # hesscli looser than PyHessian: said so, not counted as equal accuracy
    text = markdown(rows)
    assert "(hesscli less accurate)" in text
    assert "at equal accuracy not met" in text
    rows[3]["seconds"], rows[3]["error"] = 40.0, 5e-6  # 10x, but PyHessian more accurate: an upper bound
    text = markdown(rows)
    assert "| ≤ 10.0× (270 / 36 products) (hesscli 2.0x the error) |" in text
    assert "at equal accuracy not met" in text


def test_scan_at_a_target_accuracy_quotes_its_ratios_from_the_data():
    from benchmarks.scan_series import markdown_tol

    def rows(trace: int, eigs: int) -> list[dict]:
        return [{"step": 2 * i, "seconds": 1.0, "load": 0.0, "n_hvp": {"trace": trace, "eigs": eigs, "extremes": 0},
                 "trace_rel_stderr": 1e-3, "trace_converged": i != 3} for i in range(5)]

    cfg = {"checkpoints": 5, "tol": 2e-3, "probes": 300, "ref_steps": []}
    text = markdown_tol({"config": cfg, "warm": rows(100, 50), "cold": rows(200, 100)})
    assert "| warm starts (default) | 150 (100 + 50 + 0) | 1.00 | 3/4 |" in text
    assert "cold / warm: **2.00x** (trace 2.00x, eigs + extremes 2.00x; target ≥ 2x: met)" in text
    series = {"warm": [{"n_hvp": {"a": 500}}] * 3, "cold": [{"n_hvp": {"a": 510}}] * 3}
    assert "it is the 1.02x of the section above" in markdown_tol({"config": cfg, "warm": rows(100, 50),
                                                                    "cold": rows(200, 100)}, series)
