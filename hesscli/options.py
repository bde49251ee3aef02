"""Options declared once: each field's default, help, bounds and flag spellings live in its dataclass.

Four groups, one per layer that needs them:

* :class:`ProblemSpec` -- what is analysed: checkpoint inputs, data, loss, parameters,
  device, dtype, seed, batch size (read by :mod:`hesscli.loading`);
* :class:`EngineOptions` -- how products are computed: backend, curvature, product path
  (given to a backend when it is built);
* each analysis's own options (:mod:`hesscli.analyses`), the only thing a backend's
  analysis method receives besides the problem and a seeded generator;
* :class:`RunOptions` -- where results go and how a run behaves (out, json, quiet,
  threads, scan's folder pattern, resume and shard).

The CLI options, the ``hesscli.toml`` keys and their validation, and the flat
:class:`hesscli.config.Settings` are all generated from these declarations. Importing this
module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OptionInfo", "option", "info", "declared", "ProblemSpec", "EngineOptions", "RunOptions", "project",
           "INPUTS", "CURVATURE", "RUNTIME", "OUTPUT", "SCAN"]

INPUTS = "Inputs"
CURVATURE = "Curvature"
RUNTIME = "Runtime"
OUTPUT = "Output"
SCAN = "Scan"
ANALYSIS = "Analysis"


@dataclass(frozen=True)
class OptionInfo:
    """How one option is spelled, checked and explained.

    Attributes:
        help: the ``--help`` text (the default is stated there, in words).
        key: the name in :class:`~hesscli.config.Settings`, in ``hesscli.toml`` and on
            ``hesscli scan`` (``None``: the field name). Options of different analyses that
            mean the same thing share a key (``tol`` of eigs and extremes); an option whose
            name means something else elsewhere gets its own (trace's ``tol`` is ``trace_tol``).
        flags: extra command-line spellings (``-k``); ``--<field name>`` and ``--<key>`` always work.
        choices: the allowed words, when the option takes one of a fixed set.
        minimum: the smallest allowed number (``None``: no bound).
        positive: a number that must be > 0 (``minimum`` is inclusive).
        metavar: the value's placeholder in ``--help``.
        panel: the ``--help`` panel.
        resume: part of what makes two runs the same (scan ``--resume`` key).
        negatable: a switch with a ``--no-`` form (``--save-vectors/--no-save-vectors``).
        cli: offered on the command line (``False``: Python API and config only).
    """

    help: str
    key: str | None = None
    flags: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    positive: bool = False
    metavar: str | None = None
    panel: str | None = None
    resume: bool = True
    negatable: bool = False
    cli: bool = True


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field carrying its :class:`OptionInfo` (``help=`` is required)."""
    kwargs: dict[str, Any] = {"metadata": {"hesscli": OptionInfo(**meta)}}
    if factory is not dataclasses.MISSING:
        kwargs["default_factory"] = factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def info(f: dataclasses.Field[Any]) -> OptionInfo:
    """The :class:`OptionInfo` of a declared field."""
    return f.metadata["hesscli"]  # type: ignore[no-any-return]


def declared(cls: type) -> list[tuple[str, dataclasses.Field[Any], OptionInfo]]:
    """``(key, field, info)`` of every option of an options dataclass, in declaration order."""
    return [(info(f).key or f.name, f, info(f)) for f in dataclasses.fields(cls)]


def project(cls: type, values: Any) -> Any:
    """Build options ``cls`` from an object holding every key (a ``Settings``): the layer's view."""
    return cls(**{f.name: getattr(values, key) for key, f, _ in declared(cls)})


# ------------------------------------------------------------------------------------ problem
@dataclass(frozen=True)
class ProblemSpec:
    """What is analysed: a checkpoint's model, the data, the loss and the parameters."""

    data: str | None = option(None, metavar="SPEC", panel=INPUTS, help=(
        "Data: a .pt file with (inputs, targets), a dict inputs/targets (x/y, X/y) or a TensorDataset; "
        "an .npz file; pkg.module:callable or file.py:callable; torchvision:NAME?root=DIR&train=false."))
    model: str | None = option(None, metavar="SPEC", panel=INPUTS, help=(
        "Model factory for state_dict/safetensors checkpoints: pkg.module:callable or path/to/file.py:callable."))
    model_args: dict[str, Any] = option(factory=dict, key="model_args", flags=("--model-arg",), metavar="KEY=VALUE",
                                        panel=INPUTS, help=(
        "Keyword argument of the model factory, KEY=VALUE (value read as a Python literal); repeatable."))
    loss: str = option("cross_entropy", metavar="NAME|SPEC", panel=INPUTS, help=(
        "cross_entropy (default) | mse | bce_with_logits | nll | huber | causal_lm | token_cross_entropy | "
        "pkg.module:callable | file.py:callable taking (outputs, targets)."))
    target_key: str = option("labels", metavar="KEY", panel=INPUTS, help=(
        "Dict samples: the key held back as the loss target; the rest are passed as model(**inputs). Default labels."))
    forward_args: dict[str, Any] = option(factory=dict, flags=("--forward-arg",), metavar="KEY=VALUE", panel=INPUTS,
                                          help=("Fixed keyword argument of the model's forward, KEY=VALUE (value read "
                                                "as a Python literal); repeatable."))
    output: str | None = option(None, metavar="KEY", panel=INPUTS, help=(
        "Which output the loss sees when the model returns a ModelOutput/dict (a key) or tuple (an index). "
        "Default logits (first element of a tuple)."))
    batchnorm: str = option("running", choices=("running", "batch"), metavar="running|batch", panel=INPUTS, help=(
        "BatchNorm statistics: running (default, eval mode) | batch (each batch's own statistics; running "
        "averages are never updated)."))
    batch_size: int = option(512, minimum=1, metavar="B", panel=INPUTS, help=(
        "Samples per chunk (memory only; the loss is always the mean over all selected samples). Default 512."))
    max_samples: int | None = option(None, minimum=1, metavar="N", panel=INPUTS,
                                     help="Use a seeded random subset of N samples. Default: all.")
    trust_code: bool = option(False, flags=("--trust-pickle",), panel=INPUTS, help=(
        "Load inputs that are code: whole pickled modules/objects (full unpickling) and TorchScript archives. "
        "Only for files you trust: both can run arbitrary code. --trust-pickle is the older name. Taken from the "
        "command line or --config FILE only, never from an implicit hesscli.toml."))
    params: tuple[str, ...] = option((), metavar="GLOB", panel=CURVATURE, help=(
        "Only parameters whose names match this glob (e.g. 'fc*.weight'); repeatable. Default: all trainable."))
    device: str = option("auto", metavar="DEVICE", panel=RUNTIME,
                         help="auto (CUDA when available, default) | cpu | cuda | cuda:N.")
    dtype: str = option("float32", choices=("float32", "float64"), metavar="float32|float64", panel=RUNTIME,
                        help="float32 (default) | float64.")
    seed: int = option(0, metavar="N", panel=RUNTIME,
                       help="Seed for the sample subset and the random probes. Default 0.")


# ------------------------------------------------------------------------------------ engine
@dataclass(frozen=True)
class EngineOptions:
    """How curvature products are computed."""

    backend: str = option("native", choices=("native", "pyhessian", "eigenthings", "backpack"), metavar="NAME",
                          panel=CURVATURE, help="native (default) | pyhessian | eigenthings | backpack.")
    curvature: str = option("hessian", choices=("hessian", "ggn"), metavar="hessian|ggn", panel=CURVATURE,
                            help="hessian (default) | ggn (generalized Gauss-Newton).")
    hvp: str = option("auto", choices=("auto", "func", "autograd"), metavar="auto|func|autograd", panel=CURVATURE,
                      resume=False, help="Native product path: auto (default) | func | autograd.")
    max_memory: str | None = option(None, metavar="SIZE", panel=RUNTIME, resume=False, help=(
        "Memory budget of the native products: model, data, the algorithm's vectors and the activations, e.g. "
        "2GB, 500MiB, 1.5G (K/M/G/T and KiB/MiB/GiB: powers of 1024; KB/MB/GB: of 1000) or bytes. Sets the "
        "probe columns per product (and the data chunk when one column on a batch does not fit); never changes "
        "the probes. Default: no budget (blocks of 16)."))


# ------------------------------------------------------------------------------------ run
@dataclass(frozen=True)
class RunOptions:
    """Where results go and how a run behaves; never changes a number beyond its stated error (a scan's
    warm start changes where Lanczos and Hutch++ start, not what they guarantee)."""

    out: Path = option(Path("hesscli-results"), metavar="DIR", panel=OUTPUT,
                       help="Results folder (Parquet tables). Default ./hesscli-results.")
    json: bool = option(False, panel=OUTPUT, help="Print machine-readable JSON on stdout (and nothing else).")
    quiet: bool = option(False, flags=("-q",), panel=OUTPUT, help="No progress or notes on stderr.")
    debug: bool = option(False, panel=RUNTIME, help="Show full tracebacks instead of one-line errors.")
    threads: int | None = option(None, minimum=1, metavar="N", panel=RUNTIME, help=(
        "CPU threads for the products. Default: one per core; on a machine busy at start waiting threads sleep "
        "(OMP_WAIT_POLICY=PASSIVE unless set), so a run slows only to its fair share."))
    # scan
    analyses: tuple[str, ...] = option(("trace", "eigs", "extremes", "density"), cli=False, panel=SCAN,
                                       help="Analyses of a scan (comma-separated).")
    warm_start: bool = option(True, negatable=True, resume=False, panel=SCAN, help=(
        "Start each checkpoint's Lanczos run from the previous checkpoint's Ritz vectors and its Hutch++ sketch "
        "from the previous products (default on); bounds and flags are measured on each checkpoint as cold."))
    glob: str = option("*", metavar="PATTERN", panel=SCAN, help="File pattern inside the folder, e.g. 'ckpt_*.pt'.")
    resume: bool = option(True, negatable=True, panel=SCAN,
                          help="Skip (checkpoint content, analysis, options) already done (default on).")
    shard: str | None = option(None, metavar="I/N", panel=SCAN, help=(
        "I/N: take part I (1-based) of N disjoint parts, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT "
        "with --array=1-N."))
