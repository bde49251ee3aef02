"""``hesscli info CKPT``: what was loaded (model, parameters, data, loss, accuracy, gradient norm)."""

from __future__ import annotations

from hesscli.cli import options as o
from hesscli.cli.app import app
from hesscli.cli.common import console, print_json, settings_from


@app.command("info")
def info(
    checkpoint: o.CheckpointArg,
    *,
    data: o.DataOpt = None,
    model: o.ModelOpt = None,
    model_arg: o.ModelArgOpt = None,
    loss: o.LossOpt = None,
    target_key: o.TargetKeyOpt = None,
    forward_arg: o.ForwardArgOpt = None,
    output: o.OutputOpt = None,
    batchnorm: o.BatchnormOpt = None,
    batch_size: o.BatchSizeOpt = None,
    max_samples: o.MaxSamplesOpt = None,
    trust_code: o.TrustCodeOpt = None,
    params: o.ParamsOpt = None,
    device: o.DeviceOpt = None,
    dtype: o.DtypeOpt = None,
    seed: o.SeedOpt = None,
    config: o.ConfigOpt = None,
    debug: o.DebugOpt = None,
    as_json: o.JsonOpt = None,
    quiet: o.QuietOpt = None,
) -> None:
    """Show what was loaded: model, parameter counts, data, loss, accuracy and gradient norm.

    Checks a checkpoint, model factory and dataset before a long analysis.

    [bold]Example:[/bold]

        hesscli info ckpt.pt --model model.py:Net --data data.pt
    """
    settings = settings_from(
        "info", data=data, model=model, model_arg=model_arg, loss=loss, target_key=target_key,
        forward_arg=forward_arg, output=output, batchnorm=batchnorm, batch_size=batch_size,
        max_samples=max_samples, trust_code=trust_code, params=params, device=device, dtype=dtype, seed=seed,
        config=config, debug=debug, json=as_json, quiet=quiet,
    )
    from hesscli.loading import describe, load_problem
    from hesscli.results.info import info_to_dict, render_info

    result = describe(load_problem(checkpoint, settings))
    if settings.json:
        print_json(info_to_dict(result))
    else:
        render_info(result, console())
