"""Loss-landscape rows and figures (needs the ``[plot]`` extra for the figures: matplotlib).

The landscape table has one row per grid point and :data:`LANDSCAPE_COLUMNS`:

- ``run_id``, ``checkpoint``, ``step``: the run and what it analysed (as in the ``runs`` table);
- ``direction_kind`` (``eigs`` | ``random`` | ``given``), ``normalize`` (``filter`` | ``layer`` | ``none``);
- ``direction``: in 1-D the 1-based index of the direction the row walks along (several
  eigenvectors give one line each); null in 2-D;
- ``alpha``; ``beta`` (null in 1-D): the step sizes of the point ``θ + α·d₁ (+ β·d₂)``;
- ``loss``: the mean loss there; ``accuracy``: the fraction correct (null when the loss has no
  classes);
- ``center_loss``: the mean loss at θ, the same on every row of a run;
- ``eigenvalue_1``: the eigenvalue of the row's α direction (1-D: of ``direction``), and
  ``eigenvalue_2`` of the β direction in 2-D; null for random directions.

:func:`plot_landscape_1d` draws loss (and accuracy) against α, with the quadratic model
``L₀ + ½λα²`` dashed where the eigenvalue is known; :func:`plot_landscape_2d` draws one contour
panel per checkpoint. Figures are drawn on the Agg canvas without touching pyplot's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hesscli.errors import InputError
from hesscli.results.plots import _Checkpoints, _import_matplotlib, _new_figure, _save, _subscript

__all__ = ["LANDSCAPE_COLUMNS", "landscape_rows", "plot_landscape_1d", "plot_landscape_2d"]

LANDSCAPE_COLUMNS = ("run_id", "checkpoint", "step", "direction_kind", "normalize", "direction", "alpha", "beta",
                     "loss", "accuracy", "center_loss", "eigenvalue_1", "eigenvalue_2")
"""Columns of the landscape table, in order (see the module docstring)."""

_LOG_RATIO = 30.0  # positive losses spanning more than this get a log scale
_MAX_PANEL_COLS = 3
_KIND_WORDS = {"eigs": "Hessian eigenvector", "random": "random", "given": "given"}
_NORM_WORDS = {"filter": "filter-normalised", "layer": "layer-normalised", "none": "unnormalised"}


def landscape_rows(result: Any, *, run_id: str, checkpoint: str, step: int | None) -> list[dict[str, Any]]:
    """The landscape table rows of one result (one per grid point, :data:`LANDSCAPE_COLUMNS`).

    Args:
        result: a ``LandscapeResult`` from :func:`hesscli.algorithms.landscape.evaluate_grid` (read by
            attribute: this package imports nothing from the engine).
        run_id, checkpoint, step: the run's provenance (as in its ``runs`` row).

    Returns:
        Rows as dicts, 1-D rows direction by direction, 2-D rows α-major.
    """
    eigs = result.eigenvalues
    acc = result.accuracy
    common = {"run_id": run_id, "checkpoint": checkpoint, "step": step, "direction_kind": result.direction_kind,
              "normalize": result.normalize}
    alphas = result.alphas.tolist()
    loss = result.loss.tolist()
    accs = acc.tolist() if acc is not None else None
    rows: list[dict[str, Any]] = []
    if result.betas is None:
        for i, line in enumerate(loss):
            for j, (a, value) in enumerate(zip(alphas, line)):
                rows.append({**common, "direction": i + 1, "alpha": a, "beta": None, "loss": value,
                             "accuracy": accs[i][j] if accs is not None else None,
                             "center_loss": result.center_loss,
                             "eigenvalue_1": eigs[i] if eigs is not None else None, "eigenvalue_2": None})
        return rows
    betas = result.betas.tolist()
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            rows.append({**common, "direction": None, "alpha": a, "beta": b, "loss": loss[i][j],
                         "accuracy": accs[i][j] if accs is not None else None, "center_loss": result.center_loss,
                         "eigenvalue_1": eigs[0] if eigs is not None else None,
                         "eigenvalue_2": eigs[1] if eigs is not None else None})
    return rows


# ----------------------------------------------------------------------------- helpers


def _prepare(df: pd.DataFrame, runs: pd.DataFrame | None, what: str) -> tuple[pd.DataFrame, _Checkpoints]:
    """The rows of the last run of each checkpoint, and the checkpoints' labels and colours."""
    _import_matplotlib()
    missing = [c for c in ("checkpoint", "alpha", "loss") if c not in df.columns]
    if missing:
        raise InputError(f"{what}: the landscape table lacks column(s) {', '.join(missing)}")
    if df.empty:
        raise InputError(f"{what}: the landscape table is empty; nothing to plot")
    df = df.copy()
    if "run_id" in df.columns:  # several runs of one checkpoint: the last one in the table
        last = df.drop_duplicates("checkpoint", keep="last").set_index("checkpoint")["run_id"]
        df = df[df["run_id"] == df["checkpoint"].map(last)]
    if "step" not in df.columns:
        df["step"] = None
    source = runs if runs is not None and {"checkpoint", "step"} <= set(runs.columns) else df
    source = source[source["checkpoint"].isin(set(df["checkpoint"]))]
    if source.empty:
        source = df
    return df, _Checkpoints(source[["checkpoint", "step"]])


def _value(rows: pd.DataFrame, column: str) -> float | None:
    if column not in rows.columns:
        return None
    values = rows[column].dropna()
    return float(values.iloc[0]) if not values.empty else None


def _center(rows: pd.DataFrame) -> float | None:
    """L₀: the ``center_loss`` column, else the loss at α = 0 when it is on the grid."""
    value = _value(rows, "center_loss")
    if value is not None:
        return value
    at0 = rows["alpha"].astype(float) == 0.0
    if "beta" in rows.columns:
        at0 &= rows["beta"].isna() | (rows["beta"].astype(float) == 0.0)
    at0 = rows.loc[at0, "loss"]
    return float(at0.iloc[0]) if not at0.empty else None


def _words(df: pd.DataFrame) -> str:
    kinds = sorted(set(df["direction_kind"].dropna().astype(str))) if "direction_kind" in df.columns else []
    norms = sorted(set(df["normalize"].dropna().astype(str))) if "normalize" in df.columns else []
    parts = []
    if len(kinds) == 1:
        parts.append(f"{_KIND_WORDS.get(kinds[0], kinds[0])} directions")
    if len(norms) == 1 and not (kinds == ["eigs"] and norms == ["none"]):
        parts.append(_NORM_WORDS.get(norms[0], norms[0]))
    return ", ".join(parts)


def _set_loss_scale(ax: Any, values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all() and finite.max() / finite.min() > _LOG_RATIO:
        ax.set_yscale("log")
        return True
    return False


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------- figures


def plot_landscape_1d(df: pd.DataFrame, runs: pd.DataFrame | None, path: Path | str,
                      eigenvalue: float | dict[str, float] | None = None) -> Path:
    """Loss against α, one line per checkpoint (one panel per direction when there are several).

    Where the eigenvalue of a direction is known (column ``eigenvalue_1``, or ``eigenvalue``), the
    quadratic model ``L₀ + ½λα²`` is drawn dashed in the line's colour (``L₀`` from
    ``center_loss``, else the loss at α = 0). When some rows have an accuracy, a second row of
    panels shows it. The y axis is logarithmic when the losses are positive and span more than
    30x; the quadratic model is cut to the range of the measured losses.

    Args:
        df: landscape rows (:data:`LANDSCAPE_COLUMNS`; ``beta`` is ignored).
        runs: the ``runs`` table (``checkpoint``, ``step``) for labels and colours, or ``None`` to
            take them from ``df``.
        path: the PNG to write.
        eigenvalue: λ for every line, or ``{checkpoint: λ}``, when the table has none.

    Returns:
        ``path``.

    Raises:
        InputError: matplotlib is missing, the table is empty or lacks columns, or the file
            cannot be written.
    """
    df, ckpts = _prepare(df, runs, "plot_landscape_1d")
    if "direction" not in df.columns or df["direction"].isna().all():
        df = df.assign(direction=1)
    directions = sorted(int(d) for d in set(df["direction"].dropna()))
    has_acc = "accuracy" in df.columns and df["accuracy"].notna().any()
    n_rows = 2 if has_acc else 1
    n_cols = len(directions)
    fig = _new_figure((4.6 * n_cols + 1.4, 3.6 * n_rows + 0.5))
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True)
    present = [c for c in ckpts.order if c in set(df["checkpoint"])]
    eig_key = "eigenvalue_1" if "eigenvalue_1" in df.columns else "eigenvalue"
    any_quadratic = False
    for col, direction in enumerate(directions):
        ax = axes[0, col]
        sel = df[df["direction"] == direction]
        losses = sel["loss"].to_numpy(float)
        log = _set_loss_scale(ax, losses)
        finite = losses[np.isfinite(losses)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        lams = []
        for ckpt in present:
            rows = sel[sel["checkpoint"] == ckpt].sort_values("alpha")
            if rows.empty:
                continue
            x = rows["alpha"].to_numpy(float)
            color = ckpts.color(ckpt)
            ax.plot(x, rows["loss"].to_numpy(float), color=color, lw=1.6, marker="o", ms=2.5, label=ckpts.label(ckpt))
            lam = _value(rows, eig_key)
            if lam is None and eigenvalue is not None:
                lam = eigenvalue.get(ckpt) if isinstance(eigenvalue, dict) else float(eigenvalue)
            l0 = _center(rows)
            if lam is not None and l0 is not None:
                lams.append(lam)
                xs = np.linspace(float(x.min()), float(x.max()), 201)
                q = l0 + 0.5 * lam * xs**2
                inside = (q >= lo - 0.05 * (hi - lo)) & (q <= hi + 0.05 * (hi - lo))
                q = np.where(inside & np.logical_or(not log, q > 0), q, np.nan)
                ax.plot(xs, q, color=color, lw=1.1, ls="--", label="_nolegend_")
                any_quadratic = True
        if log:
            ax.set_ylim(lo / 1.3, hi * 1.3)
        else:
            pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
            ax.set_ylim(lo - pad, hi + pad)
        ax.axvline(0.0, color="0.5", lw=0.8, ls=":", zorder=0)
        title = f"direction {direction}" if n_cols > 1 else "loss along the direction"
        if len(lams) == 1:
            title += f" (λ = {_fmt(lams[0])})"
        ax.set_title(title)
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if not has_acc:
            ax.set_xlabel("α")
        if has_acc:
            ax2 = axes[1, col]
            for ckpt in present:
                rows = sel[(sel["checkpoint"] == ckpt) & sel["accuracy"].notna()].sort_values("alpha")
                if not rows.empty:
                    ax2.plot(rows["alpha"].to_numpy(float), rows["accuracy"].to_numpy(float), color=ckpts.color(ckpt),
                             lw=1.6, marker="o", ms=2.5)
            ax2.axvline(0.0, color="0.5", lw=0.8, ls=":", zorder=0)
            ax2.set_ylim(-0.03, 1.03)
            ax2.set_xlabel("α")
            ax2.set_ylabel("accuracy")
            ax2.grid(True, alpha=0.3)
    first = axes[0, 0]
    if any_quadratic:
        first.plot([], [], color="0.3", lw=1.1, ls="--", label="L₀ + ½λα²")
    if ckpts.use_colorbar(len(present)):
        ckpts.colorbar(fig, list(axes[:, -1]))
        handles = [h for h, lab in zip(*first.get_legend_handles_labels()) if lab == "L₀ + ½λα²"]
        if handles:
            first.legend(handles=handles, frameon=False, fontsize="small")
    else:
        first.legend(frameon=False, fontsize="small")
    words = _words(df)
    fig.suptitle(f"Loss landscape{' · ' + words if words else ''} · {len(present)} checkpoint"
                 f"{'s' if len(present) != 1 else ''}")
    return _save(fig, Path(path))


def plot_landscape_2d(df: pd.DataFrame, runs: pd.DataFrame | None, path: Path | str) -> Path:
    """Filled contours of the loss over (α, β), one panel per checkpoint, each with its colorbar.

    Levels are log-spaced when the losses are positive and span more than 30x (a landscape's
    walls would otherwise flatten its basin into one colour); the centre θ is marked with ``+``.

    Args:
        df: landscape rows with ``alpha``, ``beta`` and ``loss`` (:data:`LANDSCAPE_COLUMNS`).
        runs: the ``runs`` table (``checkpoint``, ``step``) for labels and order, or ``None``.
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        InputError: matplotlib is missing, the table is empty, lacks columns or has no 2-D rows,
            or the file cannot be written.
    """
    import matplotlib as mpl

    df, ckpts = _prepare(df, runs, "plot_landscape_2d")
    if "beta" not in df.columns or df["beta"].isna().all():
        raise InputError("plot_landscape_2d: the landscape table has no 2-D rows (beta is null); use plot_landscape_1d")
    df = df[df["beta"].notna()]
    present = [c for c in ckpts.order if c in set(df["checkpoint"])]
    n = len(present)
    n_cols = min(n, _MAX_PANEL_COLS)
    n_rows = -(-n // n_cols)
    fig = _new_figure((max(4.4 * n_cols + 0.4, 6.0), 3.8 * n_rows + (0.8 if n_cols == 1 else 0.5)))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, ckpt in zip(axes.flat, present):
        rows = df[df["checkpoint"] == ckpt]
        table = rows.pivot_table(index="beta", columns="alpha", values="loss", aggfunc="last").sort_index()
        table = table.sort_index(axis=1)
        a = table.columns.to_numpy(float)
        b = table.index.to_numpy(float)
        z = table.to_numpy(float)
        finite = z[np.isfinite(z)]
        if finite.size == 0:
            ax.text(0.5, 0.5, "no finite loss", ha="center", va="center", transform=ax.transAxes)
        else:
            lo, hi = float(finite.min()), float(finite.max())
            if lo > 0 and hi / lo > _LOG_RATIO:
                levels = np.geomspace(lo, hi, 22)
                norm: Any = mpl.colors.LogNorm(vmin=lo, vmax=hi)
            else:
                levels = np.linspace(lo, hi if hi > lo else lo + 1e-12, 22)
                norm = mpl.colors.Normalize(vmin=levels[0], vmax=levels[-1])
            zc = np.where(np.isfinite(z), np.clip(z, levels[0], levels[-1]), np.nan)
            filled = ax.contourf(a, b, zc, levels=levels, norm=norm, cmap="viridis")
            ax.contour(a, b, zc, levels=levels[::3], norm=norm, colors="white", linewidths=0.5, alpha=0.6)
            bar = fig.colorbar(filled, ax=ax, label="loss", pad=0.02)
            if isinstance(norm, mpl.colors.LogNorm):
                bar.ax.set_yscale("log")
        ax.plot([0.0], [0.0], marker="+", color="white", ms=10, mew=2.0)
        ax.plot([0.0], [0.0], marker="+", color="black", ms=8, mew=1.0)
        ax.set_xlabel("α")
        ax.set_ylabel("β")
        ax.set_aspect("equal", adjustable="box")
        ax.locator_params(nbins=5)
        title = ckpts.label(ckpt)
        l1, l2 = _value(rows, "eigenvalue_1"), _value(rows, "eigenvalue_2")
        if l1 is not None and l2 is not None:
            title += f"\nλ{_subscript(1)} = {_fmt(l1)}, λ{_subscript(2)} = {_fmt(l2)}"
        l0 = _center(rows)
        if l0 is not None:
            title += f" · L₀ = {_fmt(l0)}"
        ax.set_title(title, fontsize="medium")
    words = _words(df)
    sep = "\n" if n_cols == 1 else " · "
    fig.suptitle(f"Loss landscape{sep + words if words else ''} · {n} checkpoint{'s' if n != 1 else ''}")
    return _save(fig, Path(path))
