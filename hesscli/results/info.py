"""What ``hesscli info`` reports: the :class:`InfoResult` dataclass, its Rich view and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

__all__ = ["ParamInfo", "InfoResult", "render_info", "info_to_dict", "info_to_json"]


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor of the model."""

    name: str
    shape: tuple[int, ...]
    numel: int
    trainable: bool
    selected: bool


@dataclass(frozen=True)
class InfoResult:
    """Everything ``hesscli info`` shows about a loaded problem.

    Attributes:
        checkpoint, checkpoint_sha256, format, step, epoch: where the model came from.
        model_class: the network's class name.
        n_params_total, n_trainable, n_frozen, n_selected: scalar parameter counts.
        parameters: one entry per parameter tensor, in model order.
        data_source, n_samples, n_total, n_batches, batch_size: the selected data.
        input_shape, target_shape, target_dtype: shape of one sample and its target.
        loss, loss_value, accuracy: the mean loss over the data and, for classification
            losses, the accuracy (``None`` otherwise).
        grad_norm: Euclidean norm of the mean-loss gradient over the selected parameters.
        device, dtype, torch_version: where and how it ran.
    """

    checkpoint: str
    checkpoint_sha256: str
    format: str
    step: int | None
    epoch: int | None
    model_class: str
    n_params_total: int
    n_trainable: int
    n_frozen: int
    n_selected: int
    parameters: tuple[ParamInfo, ...]
    data_source: str
    n_samples: int
    n_total: int
    n_batches: int
    batch_size: int
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    target_dtype: str
    loss: str
    loss_value: float
    accuracy: float | None
    grad_norm: float
    device: str
    dtype: str
    torch_version: str


def info_to_dict(result: InfoResult) -> dict[str, Any]:
    """Plain JSON-ready dict (tuples become lists; non-finite floats become strings)."""
    d = asdict(result)

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(d)  # type: ignore[no-any-return]


def info_to_json(result: InfoResult, *, indent: int | None = 2) -> str:
    """The result as JSON text (what ``hesscli info --json`` prints)."""
    return json.dumps(info_to_dict(result), indent=indent)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _count(n: int) -> str:
    return f"{n:,}"


def render_info(result: InfoResult, console: Console, *, max_rows: int = 60) -> None:
    """Print the result as Rich panels and a per-parameter table.

    Args:
        result: what to show.
        console: where to print (stdout in the CLI).
        max_rows: parameter tensors shown before the table is cut (with a count of the rest).
    """
    r = result
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    step = "-" if r.step is None else str(r.step)
    epoch = "" if r.epoch is None else f" (epoch {r.epoch})"
    summary.add_row("checkpoint", f"{r.checkpoint} [dim]({r.format}, sha256 {r.checkpoint_sha256[:12]})[/dim]")
    summary.add_row("step", step + epoch)
    summary.add_row("model", r.model_class)
    summary.add_row(
        "parameters",
        f"{_count(r.n_params_total)} total, {_count(r.n_trainable)} trainable, {_count(r.n_frozen)} frozen, "
        f"[bold]{_count(r.n_selected)} selected[/bold]",
    )
    shard = "" if r.n_total == r.n_samples else f" ({_count(r.n_samples)} on this process)"
    summary.add_row(
        "data",
        f"{r.data_source}: {_count(r.n_total)} samples{shard}, {r.n_batches} batch(es) of up to {r.batch_size}",
    )
    summary.add_row("shapes", f"input {_fmt_shape(r.input_shape)}, target {_fmt_shape(r.target_shape)} {r.target_dtype}")
    acc = "" if r.accuracy is None else f", accuracy [bold]{r.accuracy:.2%}[/bold]"
    summary.add_row("loss", f"{r.loss} = [bold]{r.loss_value:.6g}[/bold]{acc}")
    summary.add_row("gradient norm", f"{r.grad_norm:.6g}")
    summary.add_row("run on", f"{r.device}, {r.dtype} (torch {r.torch_version})")

    table = Table(title="parameter tensors", title_justify="left", show_lines=False)
    table.add_column("name", overflow="fold")
    table.add_column("shape")
    table.add_column("numel", justify="right")
    table.add_column("trainable", justify="center")
    table.add_column("selected", justify="center")
    for p in r.parameters[:max_rows]:
        table.add_row(p.name, _fmt_shape(p.shape), _count(p.numel), "yes" if p.trainable else "no",
                      "[green]yes[/green]" if p.selected else "no")
    if len(r.parameters) > max_rows:
        table.add_row(f"... {len(r.parameters) - max_rows} more", "", "", "", "")
    console.print(Panel(Group(summary), title="hesscli info", title_align="left", expand=False))
    console.print(table)
