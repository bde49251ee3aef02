"""Options shared by every command, written once as ``Annotated`` aliases.

Every option defaults to ``None`` ("not given"), so ``hesscli.toml`` values and the
built-in defaults apply unless the user passes the flag (see :func:`hesscli.config.resolve`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = [
    "CheckpointArg",
    "DataOpt",
    "ModelOpt",
    "ModelArgOpt",
    "LossOpt",
    "TargetKeyOpt",
    "ForwardArgOpt",
    "OutputOpt",
    "BatchnormOpt",
    "BatchSizeOpt",
    "MaxSamplesOpt",
    "CurvatureOpt",
    "ParamsOpt",
    "BackendOpt",
    "DeviceOpt",
    "DtypeOpt",
    "SeedOpt",
    "ThreadsOpt",
    "OutOpt",
    "ConfigOpt",
    "TrustCodeOpt",
    "TrustPickleOpt",
    "JsonOpt",
    "QuietOpt",
    "DebugOpt",
]

INPUTS = "Inputs"
CURVATURE = "Curvature"
RUNTIME = "Runtime"
OUTPUT = "Output"

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint file: state_dict (.pt/.pth/.ckpt) or .safetensors with --model; a TorchScript archive "
        "or a pickled module with --trust-code; or a Hugging Face model folder (config.json + weights).",
        show_default=False,
    ),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        help="Data: a .pt file with (inputs, targets), a dict inputs/targets (x/y, X/y) or a TensorDataset; "
        "an .npz file; pkg.module:callable or file.py:callable; torchvision:NAME?root=DIR&train=false.",
        metavar="SPEC",
        rich_help_panel=INPUTS,
        show_default=False,
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Model factory for state_dict/safetensors checkpoints: pkg.module:callable or path/to/file.py:callable.",
        metavar="SPEC",
        rich_help_panel=INPUTS,
        show_default=False,
    ),
]
ModelArgOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--model-arg",
        help="Keyword argument of the model factory, KEY=VALUE (value read as a Python literal); repeatable.",
        metavar="KEY=VALUE",
        rich_help_panel=INPUTS,
        show_default=False,
    ),
]
LossOpt = Annotated[
    Optional[str],
    typer.Option(
        "--loss",
        help="cross_entropy (default) | mse | bce_with_logits | nll | huber | causal_lm | token_cross_entropy | "
        "pkg.module:callable | "
        "file.py:callable taking (outputs, targets).",
        metavar="NAME|SPEC",
        rich_help_panel=INPUTS,
        show_default=False,
    ),
]
TargetKeyOpt = Annotated[
    Optional[str],
    typer.Option("--target-key", help="Dict samples: the key held back as the loss target; the rest are passed "
                 "as model(**inputs). Default labels.", metavar="KEY", rich_help_panel=INPUTS, show_default=False),
]
ForwardArgOpt = Annotated[
    Optional[list[str]],
    typer.Option("--forward-arg", help="Fixed keyword argument of the model's forward, KEY=VALUE (value read as a "
                 "Python literal); repeatable.", metavar="KEY=VALUE", rich_help_panel=INPUTS, show_default=False),
]
OutputOpt = Annotated[
    Optional[str],
    typer.Option("--output", help="Which output the loss sees when the model returns a ModelOutput/dict (a key) "
                 "or tuple (an index). Default logits (first element of a tuple).", metavar="KEY",
                 rich_help_panel=INPUTS, show_default=False),
]
BatchnormOpt = Annotated[
    Optional[str],
    typer.Option("--batchnorm", help="BatchNorm statistics: running (default, eval mode) | batch (each batch's own "
                 "statistics; running averages are never updated).", metavar="running|batch",
                 rich_help_panel=INPUTS, show_default=False),
]
BatchSizeOpt = Annotated[
    Optional[int],
    typer.Option("--batch-size", help="Samples per chunk (memory only; the loss is always the mean over all "
                 "selected samples). Default 512.", metavar="B", rich_help_panel=INPUTS, show_default=False),
]
MaxSamplesOpt = Annotated[
    Optional[int],
    typer.Option("--max-samples", help="Use a seeded random subset of N samples. Default: all.", metavar="N",
                 rich_help_panel=INPUTS, show_default=False),
]
TrustCodeOpt = Annotated[
    Optional[bool],
    typer.Option("--trust-code", "--trust-pickle",
                 help="Load inputs that are code: whole pickled modules/objects (full unpickling) and TorchScript "
                 "archives. Only for files you trust: both can run arbitrary code. --trust-pickle is the older name. "
                 "Taken from the command line or --config FILE only, never from an implicit hesscli.toml.",
                 rich_help_panel=INPUTS, show_default=False),
]
TrustPickleOpt = TrustCodeOpt  # the older name
CurvatureOpt = Annotated[
    Optional[str],
    typer.Option("--curvature", help="hessian (default) | ggn (generalized Gauss-Newton).", metavar="hessian|ggn",
                 rich_help_panel=CURVATURE, show_default=False),
]
ParamsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--params", help="Only parameters whose names match this glob (e.g. 'fc*.weight'); repeatable. "
                 "Default: all trainable.", metavar="GLOB", rich_help_panel=CURVATURE, show_default=False),
]
BackendOpt = Annotated[
    Optional[str],
    typer.Option("--backend", help="native (default) | pyhessian | eigenthings | backpack.", metavar="NAME",
                 rich_help_panel=CURVATURE, show_default=False),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="auto (CUDA when available, default) | cpu | cuda | cuda:N.", metavar="DEVICE",
                 rich_help_panel=RUNTIME, show_default=False),
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option("--dtype", help="float32 (default) | float64.", metavar="float32|float64", rich_help_panel=RUNTIME,
                 show_default=False),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", help="Seed for the sample subset and the random probes. Default 0.", metavar="N",
                 rich_help_panel=RUNTIME, show_default=False),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for the products. Default: one per core; on a machine busy at "
                 "start waiting threads sleep (OMP_WAIT_POLICY=PASSIVE unless set), so a run slows only to its fair share.",
                 metavar="N", rich_help_panel=RUNTIME, show_default=False),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="Settings file (TOML). Default: ./hesscli.toml when present (which cannot switch on --trust-code).", metavar="FILE",
                 rich_help_panel=RUNTIME, show_default=False),
]
DebugOpt = Annotated[
    Optional[bool],
    typer.Option("--debug", help="Show full tracebacks instead of one-line errors.", rich_help_panel=RUNTIME,
                 show_default=False),
]
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", help="Results folder (Parquet tables). Default ./hesscli-results.", metavar="DIR",
                 rich_help_panel=OUTPUT, show_default=False),
]
JsonOpt = Annotated[
    Optional[bool],
    typer.Option("--json", help="Print machine-readable JSON on stdout (and nothing else).", rich_help_panel=OUTPUT,
                 show_default=False),
]
QuietOpt = Annotated[
    Optional[bool],
    typer.Option("--quiet", "-q", help="No progress or notes on stderr.", rich_help_panel=OUTPUT, show_default=False),
]
