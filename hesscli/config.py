"""Settings resolved once: built-in defaults < ``hesscli.toml`` < command-line flags.

No other module reads ``hesscli.toml`` or environment variables.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from hesscli.errors import InputError
from hesscli.memory import parse_size
from hesscli.options import EngineOptions, OptionInfo, ProblemSpec, RunOptions, declared, project

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as _toml  # type: ignore[no-redef]


class _SettingsBase:
    """Views of the flat settings for each layer (see :mod:`hesscli.options`)."""

    if TYPE_CHECKING:  # the fields are generated from the option declarations
        def __init__(self, **values: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

    def __post_init__(self) -> None:
        trust = bool(self.trust_code or self.trust_pickle)
        object.__setattr__(self, "trust_code", trust)
        object.__setattr__(self, "trust_pickle", trust)

    @property
    def problem(self) -> ProblemSpec:
        """What is analysed (read by :mod:`hesscli.loading`)."""
        return project(ProblemSpec, self)  # type: ignore[no-any-return]

    @property
    def engine(self) -> EngineOptions:
        """How products are computed (given to the backend)."""
        return project(EngineOptions, self)  # type: ignore[no-any-return]

    @property
    def run(self) -> RunOptions:
        """Where results go and how the run behaves."""
        return project(RunOptions, self)  # type: ignore[no-any-return]

    def options(self, analysis: str) -> Any:
        """The options of ``analysis`` (its own dataclass)."""
        from hesscli.analyses import get

        return get(analysis).options(self)


def _declarations() -> dict[str, tuple[dataclasses.Field[Any], OptionInfo]]:
    """Every option key with its field and info; keys shared by several analyses must agree."""
    from hesscli.analyses import REGISTRY

    groups: list[type] = [ProblemSpec, EngineOptions, RunOptions, *(a.Options for a in REGISTRY.values())]
    out: dict[str, tuple[dataclasses.Field[Any], OptionInfo]] = {}
    for cls in groups:
        for key, f, meta in declared(cls):
            if key in out:
                prev, prev_meta = out[key]
                if (prev.default, prev.type, prev_meta.help) != (f.default, f.type, meta.help):
                    raise TypeError(f"option {key!r} is declared twice with different defaults, types or help "
                                    f"({cls.__name__}); give one of them its own key")
                continue
            out[key] = (f, meta)
    return out


DECLARED = _declarations()
"""Option key -> (dataclass field, :class:`OptionInfo`), for every option of every layer."""


def _make_settings() -> type:
    fields: list[tuple[str, Any, Any]] = []
    for key, (f, _meta) in DECLARED.items():
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        else:
            kwargs["default"] = f.default
        fields.append((key, f.type, dataclasses.field(**kwargs)))
    # the older name of trust_code; the two always hold the same value
    fields.append(("trust_pickle", "bool", dataclasses.field(default=False)))
    cls = dataclasses.make_dataclass("Settings", fields, bases=(_SettingsBase,), frozen=True,
                                     namespace={"__module__": __name__, "__doc__": (
                                         "Every option of every command, with its default, generated from the "
                                         "declarations in :mod:`hesscli.options` and :mod:`hesscli.analyses`. "
                                         "Field names match the flags (``--batch-size`` -> ``batch_size``).")})
    return cls


if TYPE_CHECKING:
    class Settings(_SettingsBase):
        """Every option of every command (fields generated from the declarations)."""
else:
    Settings = _make_settings()


# --------------------------------------------------------------------------------------
# Resolution: defaults < hesscli.toml (top level, then the command's table) < CLI flags.
# --------------------------------------------------------------------------------------

CONFIG_NAME = "hesscli.toml"
"""File looked up in the working directory when ``--config`` is not given."""


def _commands() -> tuple[str, ...]:
    from hesscli.analyses import NAMES

    return ("info", *NAMES, "scan", "plot")


COMMANDS: tuple[str, ...] = _commands()
"""Per-command tables allowed in ``hesscli.toml`` (``[trace] probes = 200``)."""

CHOICES: dict[str, tuple[Any, ...]] = {k: m.choices for k, (_, m) in DECLARED.items() if m.choices}
"""Allowed values of the options that take one of a fixed set of words."""

MINIMUM: dict[str, float] = {k: m.minimum for k, (_, m) in DECLARED.items() if m.minimum is not None}
"""Smallest allowed value of the numeric options that have one."""

POSITIVE: tuple[str, ...] = tuple(k for k, v in MINIMUM.items() if v >= 1)
"""Integer options that must be >= 1."""


def _aliases() -> dict[str, str]:
    out = {"param": "params", "analysis": "analyses", "trust_pickle": "trust_code"}
    for key, (_f, meta) in DECLARED.items():
        for flag in meta.flags:
            if flag.startswith("--"):
                out.setdefault(flag[2:].replace("-", "_"), key)
    return out


_ALIASES = _aliases()
_DICTS = ("model_args", "forward_args")

TRUST_KEYS: tuple[str, ...] = ("trust_code",)
"""Settings that allow running code from the inputs: taken from the command line or from a
config file named with ``--config``, never from a ``hesscli.toml`` found implicitly."""
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def command_keys(command: str | None) -> dict[str, str]:
    """Names an analysis's own ``[command]`` table (and its command line) may use -> option keys
    (``[trace] tol`` is ``trace_tol``)."""
    from hesscli.analyses import REGISTRY

    if command not in REGISTRY:
        return {}
    return {f.name: key for key, f, _ in declared(REGISTRY[command].Options) if f.name != key}

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
    for f in dataclasses.fields(Settings):  # type: ignore[arg-type]
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
    if key == "max_memory" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # bytes, checked in _validate
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


def _normalise(raw: Mapping[str, object], where: str, valid: set[str],
               local: Mapping[str, str] | None = None) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in raw.items():
        name = k.replace("-", "_")
        key = (local or {}).get(name) or _ALIASES.get(name, name)
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
    if value is None:
        return
    if key in CHOICES and value not in CHOICES[key]:
        raise InputError(f"{where} {value!r} is not one of {'|'.join(map(str, CHOICES[key]))}")
    if key == "analyses":
        from hesscli.analyses import REGISTRY

        for name in value:  # type: ignore[attr-defined]
            if name not in REGISTRY:
                raise InputError(f"{where}: unknown analysis {name!r}; choose from {', '.join(REGISTRY)}")
    meta = DECLARED[key][1] if key in DECLARED else None
    if meta is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.positive and value <= 0:
            raise InputError(f"{where} must be positive, got {value}")
        if meta.minimum is not None and value < meta.minimum:
            if meta.minimum == 0:
                raise InputError(f"{where} must not be negative, got {value}")
            raise InputError(f"{where} must be at least {meta.minimum:g}, got {value}")
    if key == "max_memory":
        parse_size(value, where)
    if key == "shard":
        m = _SHARD_RE.match(str(value))
        if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
            raise InputError(f"{where} {value!r} must look like I/N with 1 <= I <= N, e.g. --shard 2/4")


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
    valid = {f.name for f in dataclasses.fields(Settings)}  # type: ignore[arg-type]
    values: dict[str, object] = {}
    origin: dict[str, str] = {}

    path = find_config(config_file)
    if path is not None:
        doc = _read_toml(path)
        base = path.resolve().parent
        top = {k: v for k, v in doc.items() if not (k in COMMANDS and isinstance(v, dict))}
        layers: list[tuple[str, Mapping[str, object], Mapping[str, str]]] = [(f"{path.name}", top, {})]
        for name in COMMANDS:
            table = doc.get(name)
            if isinstance(table, dict) and name == command:
                layers.append((f"{path.name} [{name}]", table, command_keys(name)))
        for where, layer, local in layers:
            for key, raw in _normalise(layer, where, valid, local).items():
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
        if key == "trust_pickle":
            key = "trust_code"
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
