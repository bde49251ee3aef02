"""Figures from the result tables: written only with data, valid PNGs, clear errors."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hesscli.errors import InputError
from hesscli.results.parquet import write_outcomes
from hesscli.results.plots import make_plots
from hesscli.results.records import (
    DensityResult,
    EigsResult,
    ExtremesResult,
    GroupTrace,
    Outcome,
    RunInfo,
    TraceResult,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = (0, 500, 1000, 2000, 4000, 8000)


def _run(ckpt: str, step: int | None, analysis: str, run_id: str, **kw: object) -> RunInfo:
    base = RunInfo(
        run_id=run_id, checkpoint=ckpt, checkpoint_sha256="0" * 64, step=step, analysis=analysis,
        backend="native", method={"trace": "hutch++", "density": "slq"}.get(analysis, "lanczos"),
        curvature="hessian", device="cpu", dtype="float64", seed=0, n_params=160, n_samples=512,
        loss_value=0.5, n_hvp=100, seconds=0.5, hesscli_version="0.1.0", torch_version=torch.__version__,
        started_at="2025-01-01T00:00:00.000000Z",
    )
    return replace(base, **kw)


def _spectrum(i: int, rng: np.random.Generator) -> np.ndarray:
    """Marchenko–Pastur bulk (160 params) plus outliers that sharpen and negatives that fade with training."""
    n = 160
    x = rng.standard_normal((n, 2 * n))
    bulk = np.linalg.eigvalsh(x @ x.T / (2 * n)) * (0.05 + 0.02 * i)
    outliers = np.array([4.0, 7.0, 12.0]) * (1.0 + 0.9 * i)
    negatives = -np.array([1.5, 0.6, 0.3]) * 0.6**i
    return np.sort(np.concatenate([bulk[: n - 6], outliers, negatives]))


def scan_outcomes(steps: tuple[int, ...] = STEPS, seed: int = 0) -> list[Outcome]:
    """A realistic scan: trace, eigs (both ends), extremes and density for every step."""
    rng = np.random.default_rng(seed)
    outcomes: list[Outcome] = []
    grid = np.linspace(-3.0, 110.0, 1000)
    sigma = 0.25
    for i, step in enumerate(steps):
        ckpt = f"runs/exp1/ckpt_{step:06d}.pt"
        lam = _spectrum(i, rng)
        tr, se = float(lam.sum()), 0.02 * abs(float(lam.sum())) + 0.5
        groups = (
            GroupTrace("fc1.weight", 0.7 * tr, 0.7 * se, 0.7 * (tr - 1.96 * se), 0.7 * (tr + 1.96 * se)),
            GroupTrace("fc2.weight", 0.25 * tr, 0.25 * se, 0.25 * (tr - 1.96 * se), 0.25 * (tr + 1.96 * se)),
            GroupTrace("fc1.bias", 0.05 * tr, 0.05 * se, 0.05 * (tr - 1.96 * se), 0.05 * (tr + 1.96 * se)),
        )
        trace = TraceResult(tr, se, tr - 1.96 * se, tr + 1.96 * se, 50, "hutch++", 150, groups)
        k = 8
        top, bottom = lam[::-1][:k], lam[:3]
        eigs = EigsResult(
            eigenvalues=tuple(float(v) for v in (*top, *bottom)),
            residuals=tuple([1e-7] * (k + 3)),
            converged=tuple([True] * (k - 1) + [i != 2] + [True] * 3),
            which=tuple(["largest"] * k + ["smallest"] * 3),
            rank=tuple([*range(1, k + 1), *range(1, 4)]),
            n_hvp=120,
            n_iter=40,
        )
        ext = ExtremesResult(
            float(lam[-1]), float(lam[0]), float(abs(lam[-1] / lam[0])), float(abs(lam[0]) / lam[-1]),
            1e-8, 1e-7, True, 90,
        )
        dens = (np.exp(-((grid[:, None] - lam[None, :]) ** 2) / (2 * sigma**2)).sum(1)
                / (len(lam) * sigma * np.sqrt(2 * np.pi)))
        runs_, iters = 3, 20
        idx = np.sort(rng.choice(len(lam), size=(runs_, iters), replace=True), axis=1)
        weights = rng.dirichlet(np.ones(iters), size=runs_)
        density = DensityResult(
            grid=torch.tensor(grid), density=torch.tensor(dens), nodes=torch.tensor(lam[idx]),
            weights=torch.tensor(weights), alphas=torch.tensor(lam[idx]),
            betas=torch.rand(runs_, iters - 1, dtype=torch.float64), sigma=sigma, n_hvp=60,
        )
        for analysis, result in (("trace", trace), ("eigs", eigs), ("extremes", ext), ("density", density)):
            run = _run(ckpt, step, analysis, f"{analysis}-{step}")
            outcomes.append(Outcome(run, result))
    return outcomes


def _assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


def test_full_scan_writes_three_valid_pngs(tmp_path: Path) -> None:
    out = tmp_path / "res"
    write_outcomes(out, scan_outcomes())
    paths = make_plots(out)
    assert sorted(p.name for p in paths) == ["curvature_vs_step.png", "density.png", "eigenvalues.png"]
    for p in paths:
        assert p.parent == out / "plots"
        _assert_png(p)


def test_custom_target_folder(tmp_path: Path) -> None:
    out = tmp_path / "res"
    write_outcomes(out, [o for o in scan_outcomes(steps=(0, 10)) if o.run.analysis == "extremes"])
    paths = make_plots(out, to=tmp_path / "figs" / "nested")
    assert paths == [tmp_path / "figs" / "nested" / "curvature_vs_step.png"]
    _assert_png(paths[0])
    assert not (out / "plots").exists()


def test_only_plots_for_tables_with_data(tmp_path: Path) -> None:
    out = tmp_path / "res"
    only_density = [o for o in scan_outcomes(steps=(0, 1, 2)) if o.run.analysis == "density"]
    write_outcomes(out, only_density)
    assert [p.name for p in make_plots(out)] == ["density.png"]

    out2 = tmp_path / "res2"
    only_trace = [o for o in scan_outcomes(steps=(0, 1, 2)) if o.run.analysis == "trace"]
    write_outcomes(out2, only_trace)
    paths = make_plots(out2)
    assert [p.name for p in paths] == ["curvature_vs_step.png"]
    _assert_png(paths[0])


def test_single_checkpoint_without_step(tmp_path: Path) -> None:
    out = tmp_path / "res"
    outcomes = [Outcome(replace(o.run, step=None, checkpoint="model.pt"), o.result) for o in scan_outcomes(steps=(0,))]
    write_outcomes(out, outcomes)
    paths = make_plots(out)
    assert len(paths) == 3
    for p in paths:
        _assert_png(p)


def test_rerun_uses_latest_ok_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hesscli.results import plots

    out = tmp_path / "res"
    first = [o for o in scan_outcomes(steps=(0, 1)) if o.run.analysis == "extremes"]
    newer = [
        Outcome(replace(o.run, run_id=o.run.run_id + "-new", started_at="2025-02-01T00:00:00.000000Z"),
                replace(o.result, lambda_max=1234.0))  # type: ignore[type-var]
        for o in first
    ]
    newest_failed = [
        Outcome(replace(o.run, run_id=o.run.run_id + "-bad", started_at="2025-03-01T00:00:00.000000Z",
                        status="failed", error="NaN in loss"), None)
        for o in first
    ]
    write_outcomes(out, first)
    write_outcomes(out, newer + newest_failed)

    seen: dict[str, dict[str, float]] = {}

    def spy(trace, lmax, lmin, ok, ckpts, path):  # type: ignore[no-untyped-def]
        seen["lmax"], seen["lmin"] = dict(lmax), dict(lmin)
        return path

    monkeypatch.setattr(plots, "_plot_curvature", spy)
    assert [p.name for p in make_plots(out)] == ["curvature_vs_step.png"]
    assert seen["lmax"] == {o.run.checkpoint: 1234.0 for o in first}
    assert seen["lmin"] == {o.run.checkpoint: o.result.lambda_min for o in first}  # type: ignore[union-attr]


def test_missing_directory_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such results directory"):
        make_plots(tmp_path / "nope")


def test_empty_or_failed_only_results_are_input_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nothing to plot.*no runs table"):
        make_plots(tmp_path / "empty")

    out = tmp_path / "failed"
    run = _run("a.pt", 3, "eigs", "r1", status="failed", error="loss is NaN")
    write_outcomes(out, [Outcome(run, None)])
    with pytest.raises(InputError, match=r"nothing to plot \(1 runs, 1 failed"):
        make_plots(out)
    assert not (out / "plots").exists()


def test_missing_matplotlib_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "res"
    write_outcomes(out, scan_outcomes(steps=(0,)))
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match=r"plotting needs matplotlib: pip install 'hesscli\[plot\]'"):
        make_plots(out)


def test_degenerate_density_still_plots(tmp_path: Path) -> None:
    outcome = next(o for o in scan_outcomes(steps=(0,)) if o.run.analysis == "density")
    flat = replace(outcome.result, density=torch.zeros(1000, dtype=torch.float64))  # type: ignore[type-var]
    write_outcomes(tmp_path, [Outcome(outcome.run, flat)])
    paths = make_plots(tmp_path)
    assert [p.name for p in paths] == ["density.png"]
    assert paths[0].read_bytes()[:8] == PNG_SIGNATURE
