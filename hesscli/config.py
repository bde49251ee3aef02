"""Settings resolved once: built-in defaults < ``hesscli.toml`` < command-line flags.

No other module reads ``hesscli.toml`` or environment variables.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from hesscli.errors import InputError

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as _toml  # type: ignore[no-redef]


@dataclass(frozen=True)
class Settings:
    """Every option of every command, with its default. Field names match the flags
    (``--batch-size`` -> ``batch_size``)."""

    # inputs
    data: str | None = None
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    loss: str = "cross_entropy"
    batch_size: int = 512
    max_samples: int | None = None
    trust_code: bool = False  # --trust-code: whole pickles and TorchScript archives may be loaded
    trust_pickle: bool = False  # older name of trust_code; the two always hold the same value
    target_key: str = "labels"  # dict samples: the key held back as the loss target
    forward_args: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments of forward
    output: str | None = None  # which tensor of a ModelOutput/dict/tuple the loss sees (default: logits)
    batchnorm: str = "running"  # running | batch  (BatchNorm statistics during the analysis)
    # curvature
    curvature: str = "hessian"  # hessian | ggn
    params: tuple[str, ...] = ()
    backend: str = "native"  # native | pyhessian | eigenthings | backpack
    hvp: str = "auto"  # auto | func | autograd  (product path of the native engine)
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    threads: int | None = None  # CPU threads of torch's kernels (None: torch's own choice, one per core)
    # outputs
    out: Path = Path("hesscli-results")
    json: bool = False
    quiet: bool = False
    debug: bool = False
    # trace
    method: str | None = None  # hutchinson | hutch++ | exact; None: the backend's default (native: hutch++)
    probes: int = 100
    tol: float | None = None  # eigs / extremes: relative error bound (default 1e-4 float32, 1e-10 float64)
    trace_tol: float | None = None  # trace: target stderr/|estimate|, probe count planned from a pilot (``trace --tol``)
    # eigs / extremes
    top_k: int = 10
    which: str = "largest"  # largest | smallest | both
    max_iter: int | None = None
    save_vectors: bool = False
    # density
    iters: int = 80
    runs: int = 5
    sigma: float | None = None
    grid: int = 1000
    # scan
    analyses: tuple[str, ...] = ("trace", "eigs", "extremes", "density")
    glob: str = "*"
    resume: bool = True
    shard: str | None = None  # "I/N"

    def __post_init__(self) -> None:
        trust = bool(self.trust_code or self.trust_pickle)
        object.__setattr__(self, "trust_code", trust)
        object.__setattr__(self, "trust_pickle", trust)


# --------------------------------------------------------------------------------------
# Resolution: defaults < hesscli.toml (top level, then the command's table) < CLI flags.
# --------------------------------------------------------------------------------------

CONFIG_NAME = "hesscli.toml"
"""File looked up in the working directory when ``--config`` is not given."""

COMMANDS: tuple[str, ...] = ("info", "trace", "eigs", "extremes", "density", "scan", "plot")
"""Per-command tables allowed in ``hesscli.toml`` (``[trace] probes = 200``)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "curvature": ("hessian", "ggn"),
    "backend": ("native", "pyhessian", "eigenthings", "backpack"),
    "hvp": ("auto", "func", "autograd"),
    "dtype": ("float32", "float64"),
    "method": ("hutchinson", "hutch++", "exact"),
    "which": ("largest", "smallest", "both"),
    "batchnorm": ("running", "batch"),
}
"""Allowed values of the options that take one of a fixed set of words."""

POSITIVE: tuple[str, ...] = ("batch_size", "max_samples", "probes", "top_k", "max_iter", "iters", "runs", "grid",
                            "threads")
"""Integer options that must be >= 1."""

_ALIASES = {"model_arg": "model_args", "forward_arg": "forward_args", "param": "params", "analysis": "analyses",
            "trust_pickle": "trust_code"}
_DICTS = ("model_args", "forward_args")

TRUST_KEYS: tuple[str, ...] = ("trust_code",)
"""Settings that allow running code from the inputs: taken from the command line or from a
config file named with ``--config``, never from a ``hesscli.toml`` found implicitly."""
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_model_args(items: list[str] | tuple[str, ...], *, source: str = "--model-arg") -> dict[str, Any]:
    """Parse ``key=value`` strings into factory keyword arguments.

    Values are read as Python literals (``ast.literal_eval``: numbers, strings, tuples,
    lists, dicts, ``True``/``False``/``None``); anything else is kept as the raw string.

    Args:
        items: strings such as ``["hidden=64", "act=relu", "sizes=(3, 4)"]``.
        source: how the values were given, for error messages.

    Returns:
        ``{"hidden": 64, "act": "relu", "sizes": (3, 4)}``.

    Raises:
        InputError: an item has no ``=`` or an empty key.

    Example:
        >>> parse_model_args(["hidden=64", "act=relu", "p=0.5"])
        {'hidden': 64, 'act': 'relu', 'p': 0.5}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise InputError(
                f"{source} {item!r}: expected KEY=VALUE with KEY a Python identifier, e.g. --model-arg hidden=64"
            )
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key] = raw.strip()
    return out


def _field_types() -> dict[str, tuple[str, bool]]:
    """``field name -> (base type, nullable)`` read from the Settings annotations."""
    kinds: dict[str, tuple[str, bool]] = {}
    for f in dataclasses.fields(Settings):
        ann = str(f.type).replace(" ", "")
        nullable = "|None" in ann or "Optional[" in ann
        ann = ann.replace("|None", "").replace("Optional[", "").rstrip("]") if nullable else ann
        if ann.startswith("tuple"):
            base = "tuple"
        elif ann.startswith("dict"):
            base = "dict"
        elif ann in ("bool", "int", "float", "str", "Path"):
            base = ann
        else:  # pragma: no cover - a new field with an unusual type keeps its value as given
            base = "any"
        kinds[f.name] = (base, nullable)
    return kinds


def _option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _coerce(key: str, value: object, where: str) -> object:
    """Check/convert one value to the type of ``Settings.<key>``."""
    base, nullable = _field_types()[key]
    if value is None:
        if nullable:
            return None
        raise InputError(f"{where} cannot be empty")

    def bad(expected: str) -> InputError:
        return InputError(f"{where} must be {expected}, got {value!r}")

    if base == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base == "Path":
        if not isinstance(value, (str, Path)):
            raise bad("a path")
        return Path(value).expanduser()
    if base == "tuple":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad("a list of strings")
    if base == "dict":
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, (list, tuple)):
            return parse_model_args([str(v) for v in value], source=where)
        raise bad("a table of key = value")
    return value  # pragma: no cover


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _anchor(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _anchor_spec(key: str, spec: str, base: Path) -> str:
    """Make the file part of a ``data``/``model``/``loss`` spec relative to ``base``."""
    if key == "data" and spec.startswith("torchvision:"):
        name, _, query = spec.partition("?")
        pairs = [(k, _anchor(v, base) if k == "root" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        return f"{name}?{urlencode(pairs, safe='/:')}" if pairs else spec
    target, sep, attr = spec.rpartition(":")
    if sep:
        return f"{_anchor(target, base)}:{attr}" if _is_file_target(target) else spec
    if key == "data":  # a plain file
        return _anchor(spec, base)
    return spec  # a loss name such as "mse", or an invalid model spec reported later


def _normalise(raw: Mapping[str, object], where: str, valid: set[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in raw.items():
        key = _ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if key not in valid:
            names = ", ".join(sorted(n.replace("_", "-") for n in valid))
            raise InputError(f"{where}: unknown key {k!r}; valid keys are: {names}")
        out[key] = v
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return _toml.load(fh)
    except _toml.TOMLDecodeError as e:
        raise InputError(f"config {path}: not valid TOML ({e}); fix the file or pass --config FILE") from e
    except OSError as e:
        raise InputError(f"config {path}: cannot be read ({e.strerror}); check the path and permissions") from e


def _validate(key: str, value: object, where: str) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise InputError(f"{where} {value!r} is not one of {'|'.join(CHOICES[key])}")
    if key in POSITIVE and value is not None and int(value) < 1:  # type: ignore[call-overload]
        raise InputError(f"{where} must be at least 1, got {value}")
    if key == "shard" and value is not None:
        m = _SHARD_RE.match(str(value))
        if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
            raise InputError(f"{where} {value!r} must look like I/N with 1 <= I <= N, e.g. --shard 2/4")
    if key == "sigma" and value is not None and float(value) <= 0:  # type: ignore[arg-type]
        raise InputError(f"{where} must be positive, got {value}")
    if key == "tol" and value is not None and float(value) < 0:  # type: ignore[arg-type]
        raise InputError(f"{where} must not be negative, got {value}")


def find_config(config_file: Path | str | None = None) -> Path | None:
    """Return the config file to read: ``config_file`` if given, else ``./hesscli.toml`` if present.

    Raises:
        InputError: ``config_file`` was given but does not exist.
    """
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise InputError(f"--config {config_file}: file not found; check the path or drop --config")
        return path
    default = Path.cwd() / CONFIG_NAME
    return default if default.is_file() else None


def resolve(
    cli_values: Mapping[str, object] | None = None,
    config_file: Path | str | None = None,
    command: str | None = None,
    *,
    ignored: list[str] | None = None,
) -> Settings:
    """Build the frozen :class:`Settings` for one command.

    Precedence, lowest to highest: built-in defaults, the top level of the config file,
    the config file's ``[command]`` table, then the flags the user actually gave. Trust
    (``trust-code``) is read from a config file only when it was named with ``--config``:
    a ``hesscli.toml`` picked up from the working folder cannot switch it on
    (``None`` values in ``cli_values`` mean "not given" and are skipped). Relative
    paths in the config file (``data``, file specs of ``model``/``loss``, ``out``,
    ``torchvision:...?root=``) are taken relative to the file's folder. ``model_args``
    from the file and from ``--model-arg`` are merged, the flags winning per key.

    Args:
        cli_values: flag values keyed by field name (``batch_size``) or option name
            (``batch-size``).
        config_file: ``--config FILE``; when ``None``, ``./hesscli.toml`` is used if present.
        command: the running command (``trace``, ``eigs``, ...), selecting its table.
        ignored: when given, receives one line per config value that was ignored: trust
            (``trust-code``/``trust-pickle``) in a ``hesscli.toml`` found in the working
            folder rather than named with ``--config``.

    Returns:
        The resolved settings.

    Raises:
        InputError: missing or invalid config file, unknown key, wrong type, or a value
            outside its allowed set.
    """
    valid = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, object] = {}
    origin: dict[str, str] = {}

    path = find_config(config_file)
    if path is not None:
        doc = _read_toml(path)
        base = path.resolve().parent
        top = {k: v for k, v in doc.items() if not (k in COMMANDS and isinstance(v, dict))}
        layers: list[tuple[str, Mapping[str, object]]] = [(f"{path.name}", top)]
        for name in COMMANDS:
            table = doc.get(name)
            if isinstance(table, dict) and name == command:
                layers.append((f"{path.name} [{name}]", table))
        for where, layer in layers:
            for key, raw in _normalise(layer, where, valid).items():
                value = _coerce(key, raw, f"{where}: {key.replace('_', '-')}")
                if key in TRUST_KEYS and config_file is None:
                    if value and ignored is not None:
                        ignored.append(
                            f"{path}: {key.replace('_', '-')} is ignored in a config found in the working folder; "
                            f"pass --{key.replace('_', '-')} on the command line (or name the file with --config)"
                        )
                    continue
                if key in ("data", "model", "loss") and isinstance(value, str):
                    value = _anchor_spec(key, value, base)
                elif key == "out" and isinstance(value, Path) and not value.is_absolute():
                    value = base / value
                if key in _DICTS and isinstance(values.get(key), dict):
                    value = {**values[key], **value}  # type: ignore[dict-item]
                values[key] = value
                origin[key] = f"{where}: {key.replace('_', '-')}"

    for k, raw in (cli_values or {}).items():
        key = _ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if key not in valid:
            raise TypeError(f"resolve() got an unknown setting {k!r}")
        if raw is None or (isinstance(raw, (list, tuple, dict)) and not raw and key in ("params", "analyses", *_DICTS)):
            continue
        where = _option_name({"model_args": "model_arg", "forward_args": "forward_arg"}.get(key, key))
        value = _coerce(key, raw, where)
        if key in _DICTS and isinstance(values.get(key), dict):
            value = {**values[key], **value}  # type: ignore[dict-item]
        values[key] = value
        origin[key] = where

    for key, value in values.items():
        _validate(key, value, origin[key])
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except TypeError as e:  # pragma: no cover - guarded by the key checks above
        raise InputError(f"settings: {e}") from e
