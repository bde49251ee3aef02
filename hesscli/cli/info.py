"""``hesscli info CKPT``: what was loaded (model, parameters, data, loss, accuracy, gradient norm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hesscli.cli import options as o
from hesscli.cli.app import app
from hesscli.cli.common import console, print_json, settings_from


def _info(checkpoint: Path, *, values: dict[str, Any]) -> None:
    settings = settings_from("info", **values)
    from hesscli.loading import describe, load_problem
    from hesscli.results.info import info_to_dict, render_info

    result = describe(load_problem(checkpoint, settings.problem))
    if settings.json:
        print_json(info_to_dict(result))
    else:
        render_info(result, console())


app.command("info")(o.make_command(
    _info, [*o.problem_options(), *o.run_options(("debug", "json", "quiet"))], name="info",
    arguments=[o.checkpoint_argument()],
    doc="Show what was loaded: model, parameter counts, data, loss, accuracy and gradient norm.\n\n"
        "Checks a checkpoint, model factory and dataset before a long analysis.\n\n"
        "[bold]Example:[/bold]\n\n    hesscli info ckpt.pt --model model.py:Net --data data.pt"))
