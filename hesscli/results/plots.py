"""Figures from the tables under ``--out`` (needs the ``[plot]`` extra: matplotlib).

Three PNGs, each written only when its tables hold data:

- ``density.png``: spectral density per checkpoint on a log y axis, coloured by step;
- ``eigenvalues.png``: top (and/or bottom) eigenvalues against rank per checkpoint and,
  for a scan, against training step (one line per rank);
- ``curvature_vs_step.png``: trace with its 95% CI band and ±stderr bars, λ_max and
  λ_min against training step (λ_min in its own panel, with the zero line).

When a checkpoint was analysed several times, the newest ok run of each analysis is used.
matplotlib is imported only when plotting, and figures are drawn on the Agg canvas
without touching pyplot's global state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hesscli.errors import InputError
from hesscli.results.parquet import read_table
from hesscli.results.tables import TOTAL_GROUP, latest_ok_runs

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["make_plots", "PLOT_FILES"]

logger = logging.getLogger(__name__)

#: The files :func:`make_plots` can write.
PLOT_FILES = ("density.png", "eigenvalues.png", "curvature_vs_step.png", "landscape_1d.png", "landscape_2d.png")

_DPI = 150
_CMAP = "viridis"
_MAX_RANK_LINES = 10
_MAX_DISCRETE = 16  # up to this many checkpoints get one distinct colour each
_DENSITY_FLOOR = 1e-6  # y axis spans this fraction of the peak density and up


def _import_matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as e:
        raise InputError("plotting needs matplotlib: pip install 'hesscli[plot]'") from e
    return matplotlib


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=_DPI, facecolor="white")
    except OSError as e:
        raise InputError(f"{path}: cannot write the figure ({e.strerror or e}); choose a writable folder") from e
    logger.debug("wrote %s", path)
    return path


# ----------------------------------------------------------------------------- data selection


class _Checkpoints:
    """Steps, labels and colours of the selected checkpoints (one place, every figure)."""

    def __init__(self, runs: pd.DataFrame) -> None:
        import matplotlib as mpl

        table = runs[["checkpoint", "step"]].drop_duplicates("checkpoint")
        table = table.sort_values(["step", "checkpoint"], na_position="last", kind="stable")
        self.order: list[str] = [str(c) for c in table["checkpoint"]]
        steps = [None if pd.isna(s) else int(s) for s in table["step"]]
        self.step: dict[str, int | None] = dict(zip(self.order, steps))
        self.has_steps = bool(self.order) and all(s is not None for s in steps)
        self.position: dict[str, float] = {
            c: float(self.step[c]) if self.has_steps else float(i)  # type: ignore[arg-type]
            for i, c in enumerate(self.order)
        }
        names = [PurePath(c).name or c for c in self.order]
        self.name = dict(zip(self.order, names))
        self.index = {c: i for i, c in enumerate(self.order)}
        # Few checkpoints: one evenly spaced colour each (uneven step spacing such as
        # 0, 500, 1000, 8000 stays distinguishable); many: colour by step value.
        self.discrete = len(self.order) <= _MAX_DISCRETE
        lo = min(self.position.values(), default=0.0)
        hi = max(self.position.values(), default=1.0)
        self.norm = mpl.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        self.cmap = mpl.colormaps[_CMAP]

    def label(self, ckpt: str) -> str:
        step = self.step.get(ckpt)
        return f"step {step}" if step is not None else self.name[ckpt]

    def color(self, ckpt: str) -> Any:
        n = len(self.order)
        if n == 1:
            return "C0"
        # Stop short of viridis' pale yellow end, which vanishes on white.
        if self.discrete:
            return self.cmap(0.9 * self.index[ckpt] / (n - 1))
        return self.cmap(0.9 * self.norm(self.position[ckpt]))

    def use_colorbar(self, n_lines: int) -> bool:
        return self.has_steps and n_lines > 1

    def colorbar(self, fig: Figure, ax: Axes | Sequence[Axes]) -> None:
        import matplotlib as mpl

        n = len(self.order)
        if self.discrete:
            colors = [self.color(c) for c in self.order]
            cmap = mpl.colors.ListedColormap(colors)
            norm = mpl.colors.BoundaryNorm(np.arange(n + 1) - 0.5, n)
            bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step",
                               pad=0.02, ticks=np.arange(n))
            bar.ax.set_yticklabels([str(self.step[c]) for c in self.order])
            bar.ax.tick_params(length=0)
            bar.ax.minorticks_off()
            return
        cmap = mpl.colors.ListedColormap(self.cmap(np.linspace(0.0, 0.9, 256)))
        fig.colorbar(mpl.cm.ScalarMappable(norm=self.norm, cmap=cmap), ax=ax, label="training step", pad=0.02)

    def x_axis(self, ax: Axes) -> None:
        """Label a training-step axis (checkpoint names when steps are unknown)."""
        if self.has_steps:
            ax.set_xlabel("training step")
            return
        ax.set_xlabel("checkpoint")
        ax.set_xticks([self.position[c] for c in self.order])
        ax.set_xticklabels([self.name[c] for c in self.order], rotation=30, ha="right")


def _rows_of(df: pd.DataFrame, ok: pd.DataFrame, analysis: str) -> pd.DataFrame:
    """Rows of ``df`` that belong to the chosen ok run of each checkpoint for ``analysis``."""
    ids = ok.loc[ok["analysis"] == analysis, "run_id"]
    if df.empty or ids.empty:
        return df.iloc[0:0]
    return df[df["run_id"].isin(set(ids))]


def _latest_landscape(rows: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of the newest ok landscape run of each checkpoint (lines and planes are chosen apart,
    so a 1-D and a 2-D run of one checkpoint are both drawn)."""
    if rows.empty:
        return rows
    ok = runs[(runs["status"] == "ok") & (runs["analysis"] == "landscape")]
    latest = latest_ok_runs(ok[ok["run_id"].isin(set(rows["run_id"]))])
    return rows[rows["run_id"].isin(set(latest["run_id"]))]


def _curvature_word(ok: pd.DataFrame, analysis: str) -> str:
    kinds = set(ok.loc[ok["analysis"] == analysis, "curvature"].dropna().astype(str))
    if kinds == {"ggn"}:
        return "GGN"
    return "Hessian" if kinds <= {"hessian"} else "curvature"


def _subtitle(ok: pd.DataFrame, analysis: str) -> str:
    n = int((ok["analysis"] == analysis).sum())
    return f"{n} checkpoint{'s' if n != 1 else ''}"


# ----------------------------------------------------------------------------- figures


def _plot_density(density: pd.DataFrame, ok: pd.DataFrame, ckpts: _Checkpoints, path: Path) -> Path:
    fig = _new_figure((7.0, 4.4))
    ax = fig.add_subplot()
    lines = [c for c in ckpts.order if c in set(density["checkpoint"])]
    peak = float(density["density"].max())
    sigmas = sorted(set(np.round(density["sigma"].dropna().astype(float), 12)))
    for ckpt in lines:
        d = density[density["checkpoint"] == ckpt].sort_values("grid")
        y = d["density"].to_numpy(float)
        if peak > 0:
            y = np.clip(y, peak * _DENSITY_FLOOR * 1e-3, None)
        ax.plot(d["grid"].to_numpy(float), y, color=ckpts.color(ckpt), lw=1.3, label=ckpts.label(ckpt))
    if np.isfinite(peak) and peak > 0:
        ax.set_yscale("log")
        ax.set_ylim(peak * _DENSITY_FLOOR, peak * 3.0)
        # Show the part of the grid where some curve is above the floor of the y axis.
        visible = density.loc[density["density"] >= peak * _DENSITY_FLOOR, "grid"]
    else:  # an all-zero (degenerate) density has no log scale
        visible = density["grid"]
    lo, hi = float(visible.min()), float(visible.max())
    pad = 0.03 * (hi - lo) if hi > lo else 1.0
    lo = max(lo - pad, float(density["grid"].min()))
    hi = min(hi + pad, float(density["grid"].max()))
    ax.set_xlim(lo, hi)
    if lo < 0 < hi:
        ax.axvline(0.0, color="0.5", lw=0.8, ls=":", zorder=0)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    word = _curvature_word(ok, "density")
    sigma = f", σ = {sigmas[0]:.3g}" if len(sigmas) == 1 else ""
    ax.set_title(f"{word} spectral density (SLQ{sigma}) · {_subtitle(ok, 'density')}")
    ax.grid(True, which="major", alpha=0.3)
    if ckpts.use_colorbar(len(lines)):
        ckpts.colorbar(fig, ax)
    else:
        ax.legend(frameon=False, fontsize="small")
    return _save(fig, path)


def _symlog_if_wide(ax: Axes, values: Sequence[float] | np.ndarray) -> None:
    """Symmetric-log y axis when some values are negative and magnitudes span more than three decades."""
    v = np.asarray(values, dtype=float)
    v = np.abs(v[np.isfinite(v) & (v != 0.0)])
    if v.size and (np.asarray(values, dtype=float) < 0).any() and v.max() / v.min() > 1e3:
        # A power of ten keeps the ticks at the linear/log seams on round numbers.
        ax.set_yscale("symlog", linthresh=float(10.0 ** np.floor(np.log10(v.max() * 1e-3))))


def _eig_scale(ax: Axes, values: np.ndarray) -> None:
    """Log y axis for positive values spanning > 30x; symlog for wide values of both signs."""
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all() and finite.max() / finite.min() > 30:
        ax.set_yscale("log")
    else:
        _symlog_if_wide(ax, finite)


def _plot_eigs(eigs: pd.DataFrame, ok: pd.DataFrame, ckpts: _Checkpoints, path: Path) -> Path:
    whiches = [w for w in ("largest", "smallest") if w in set(eigs["which"])]
    with_steps = len(set(eigs["checkpoint"])) > 1
    n_cols = 2 if with_steps else 1
    fig = _new_figure((5.2 * n_cols + 0.8, 3.8 * len(whiches)))
    axes = np.atleast_2d(fig.subplots(len(whiches), n_cols, squeeze=False))
    word = _curvature_word(ok, "eigs")
    present = [c for c in ckpts.order if c in set(eigs["checkpoint"])]
    for row, which in enumerate(whiches):
        sel = eigs[eigs["which"] == which]
        end = "top" if which == "largest" else "bottom"
        ax = axes[row, 0]
        for ckpt in present:
            d = sel[sel["checkpoint"] == ckpt].sort_values("rank")
            if d.empty:
                continue
            ax.plot(d["rank"].to_numpy(int), d["eigenvalue"].to_numpy(float), marker="o", ms=3.5, lw=1.2,
                    color=ckpts.color(ckpt), label=ckpts.label(ckpt))
            bad = d[~d["converged"].astype(bool)]
            if not bad.empty:
                ax.plot(bad["rank"].to_numpy(int), bad["eigenvalue"].to_numpy(float), ls="none", marker="x",
                        ms=6, color="crimson", label="_nolegend_")
        _eig_scale(ax, sel["eigenvalue"].to_numpy(float))
        ax.set_xlabel(f"rank ({'1 = largest' if which == 'largest' else '1 = smallest'})")
        ax.set_ylabel("eigenvalue λ")
        ax.set_title(f"{end}-{int(sel['rank'].max())} {word} eigenvalues")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        if (~sel["converged"].astype(bool)).any():
            ax.plot([], [], ls="none", marker="x", color="crimson", label="not converged")
        if not ckpts.use_colorbar(len(present)):
            ax.legend(frameon=False, fontsize="small", ncol=2 if len(present) > 6 else 1)
        elif (~sel["converged"].astype(bool)).any():
            handles = [h for h, lab in zip(*ax.get_legend_handles_labels()) if lab == "not converged"]
            ax.legend(handles=handles, frameon=False, fontsize="small")
        if with_steps:
            ax2 = axes[row, 1]
            ranks = sorted(set(sel["rank"].astype(int)))[:_MAX_RANK_LINES]
            colors = _rank_colors(len(ranks))
            for color, rank in zip(colors, ranks):
                d = sel[sel["rank"] == rank]
                d = d.assign(_x=d["checkpoint"].map(ckpts.position)).sort_values("_x")
                ax2.plot(d["_x"].to_numpy(float), d["eigenvalue"].to_numpy(float), marker="o", ms=3, lw=1.2,
                         color=color, label=f"λ{_subscript(rank)}")
            _eig_scale(ax2, sel["eigenvalue"].to_numpy(float))
            ckpts.x_axis(ax2)
            ax2.set_ylabel("eigenvalue λ")
            ax2.set_title(f"{end} eigenvalues over training")
            ax2.grid(True, alpha=0.3)
            ax2.legend(frameon=False, fontsize="small", ncol=2 if len(ranks) > 5 else 1, title="rank",
                       title_fontsize="small")
    if with_steps and ckpts.use_colorbar(len(present)):
        ckpts.colorbar(fig, list(axes[:, 0]))
    return _save(fig, path)


def _rank_colors(n: int) -> list[Any]:
    import matplotlib as mpl

    cmap = mpl.colormaps["plasma"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _subscript(n: int) -> str:
    return str(n).translate(str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉"))


def _extreme_series(
    extremes: pd.DataFrame, eigs: pd.DataFrame, ok: pd.DataFrame
) -> tuple[dict[str, float], dict[str, float]]:
    """checkpoint -> λ_max and -> λ_min; ``extremes`` wins over rank-1 ``eigs`` rows."""
    lmax: dict[str, float] = {}
    lmin: dict[str, float] = {}
    e = _rows_of(eigs, ok, "eigs")
    for which, target in (("largest", lmax), ("smallest", lmin)):
        rows = e[(e["which"] == which) & (e["rank"] == 1)]
        target.update(zip(rows["checkpoint"].astype(str), rows["eigenvalue"].astype(float)))
    x = _rows_of(extremes, ok, "extremes")
    lmax.update(zip(x["checkpoint"].astype(str), x["lambda_max"].astype(float)))
    lmin.update(zip(x["checkpoint"].astype(str), x["lambda_min"].astype(float)))
    return lmax, lmin


def _plot_curvature(
    trace: pd.DataFrame,
    lmax: dict[str, float],
    lmin: dict[str, float],
    ok: pd.DataFrame,
    ckpts: _Checkpoints,
    path: Path,
) -> Path:
    panels = [name for name, has in (("trace", not trace.empty), ("max", bool(lmax)), ("min", bool(lmin))) if has]
    fig = _new_figure((7.0, 2.5 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    word = _curvature_word(ok, "trace" if "trace" in panels else "extremes")
    for ax, panel in zip(axes, panels):
        if panel == "trace":
            d = trace.assign(_x=trace["checkpoint"].map(ckpts.position)).sort_values("_x")
            x = d["_x"].to_numpy(float)
            est = d["estimate"].to_numpy(float)
            lo, hi = d["ci_low"].to_numpy(float), d["ci_high"].to_numpy(float)
            err = d["stderr"].fillna(0.0).to_numpy(float)
            methods = sorted(set(d["method"].dropna().astype(str)))
            if len(x) > 1:
                ax.fill_between(x, lo, hi, color="C0", alpha=0.2, lw=0, label="95% CI")
            else:  # a band needs two points: show the interval as a wide bar
                ax.errorbar(x, est, yerr=[est - lo, hi - est], color="C0", alpha=0.25, lw=10, fmt="none",
                            label="95% CI")
            ax.errorbar(x, est, yerr=err, color="C0", marker="o", ms=4, lw=1.5, capsize=3,
                        label=f"estimate ± stderr ({', '.join(methods)})")
            ax.set_ylabel("trace")
            ax.set_title(f"{word} trace")
        elif panel == "max":
            cks = [c for c in ckpts.order if c in lmax]
            ax.plot([ckpts.position[c] for c in cks], [lmax[c] for c in cks], color="C3", marker="o", ms=4,
                    lw=1.5, label="λ_max")
            ax.set_ylabel("λ_max")
            ax.set_title("largest eigenvalue λ_max (sharpness)")
        else:
            cks = [c for c in ckpts.order if c in lmin]
            values = [lmin[c] for c in cks]
            ax.plot([ckpts.position[c] for c in cks], values, color="C2", marker="o", ms=4, lw=1.5,
                    label="λ_min")
            ax.axhline(0.0, color="0.4", lw=0.8, ls="--", zorder=0)
            ax.set_ylabel("λ_min")
            ax.set_title("smallest eigenvalue λ_min (negative: non-convex directions)")
        ax.grid(True, alpha=0.3)
        if panel == "trace":
            ax.legend(frameon=False, fontsize="small", loc="best")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    ckpts.x_axis(axes[-1])
    if ckpts.has_steps and len(ckpts.order) == 1:
        axes[-1].set_xticks([ckpts.position[c] for c in ckpts.order])
    fig.suptitle(f"Curvature over training · {len(ckpts.order)} checkpoint{'s' if len(ckpts.order) != 1 else ''}")
    return _save(fig, path)


# ----------------------------------------------------------------------------- entry point


def make_plots(out: Path, to: Path | None = None) -> list[Path]:
    """Draw the figures for the results under ``out``.

    Args:
        out: a results directory written by hesscli (``--out``).
        to: folder for the PNGs; default ``out / "plots"`` (created when missing).

    Returns:
        The PNG files written (only figures whose tables hold data).

    Raises:
        InputError: matplotlib is missing, ``out`` does not exist, there is nothing to
            plot, or the figures cannot be written.
    """
    _import_matplotlib()
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out}: no such results directory; pass the --out folder of an earlier hesscli run")
    runs = read_table(out, "runs")
    ok = latest_ok_runs(runs)
    density = _rows_of(read_table(out, "density"), ok, "density")
    eigs_all = read_table(out, "eigs")
    eigs = _rows_of(eigs_all, ok, "eigs")
    trace_all = _rows_of(read_table(out, "trace"), ok, "trace")
    trace = trace_all[trace_all["param_group"] == TOTAL_GROUP]
    lmax, lmin = _extreme_series(read_table(out, "extremes"), eigs_all, ok)
    landscape = read_table(out, "landscape")
    lines, planes = (_latest_landscape(landscape[mask], runs) for mask in (landscape["beta"].isna(),
                                                                           landscape["beta"].notna()))

    if density.empty and eigs.empty and trace.empty and not lmax and not lmin and lines.empty and planes.empty:
        n_failed = int((runs["status"] != "ok").sum()) if not runs.empty else 0
        found = f"{len(runs)} runs, {n_failed} failed" if not runs.empty else "no runs table"
        raise InputError(
            f"{out}: nothing to plot ({found}; no ok trace, eigs, extremes, density or landscape results); "
            f"run e.g. `hesscli scan CHECKPOINT_DIR --out {out}` first"
        )

    target = Path(to) if to is not None else out / "plots"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{target}: cannot create the plot folder ({e.strerror or e}); pass a writable --to") from e

    ckpts = _Checkpoints(ok)
    written: list[Path] = []
    if not density.empty:
        written.append(_plot_density(density, ok, ckpts, target / "density.png"))
    if not eigs.empty:
        written.append(_plot_eigs(eigs, ok, ckpts, target / "eigenvalues.png"))
    if not trace.empty or lmax or lmin:
        written.append(_plot_curvature(trace, lmax, lmin, ok, ckpts, target / "curvature_vs_step.png"))
    if not lines.empty or not planes.empty:
        from hesscli.results.landscape_plots import plot_landscape_1d, plot_landscape_2d

        if not lines.empty:
            written.append(plot_landscape_1d(lines, ok, target / "landscape_1d.png"))
        if not planes.empty:
            written.append(plot_landscape_2d(planes, ok, target / "landscape_2d.png"))
    return written
