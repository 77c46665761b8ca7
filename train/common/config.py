"""YAML -> typed dataclass configs.

A training config is a tree of dataclasses. :func:`from_dict` builds it from plain data and checks every value against
the field's annotation, so a typo (``stpes: 100``) or a wrong type (``lr: fast``) fails at start-up with the dotted key
in the message instead of deep inside the train loop. :func:`apply_overrides` applies command-line ``a.b=value`` pairs
(values parsed as YAML) before validation, so overrides get exactly the same checks as the file.
"""
from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

import configs

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not match the config schema. The message names the offending key."""


# ----------------------------------------------------------------------------------------------- build + validate
def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and values of the wrong type raise :class:`ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {type(data).__name__}")
    data = _renamed(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in section {prefix.rstrip('.')!r} " if prefix else ""
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} {where}(known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], prefix + name)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key {prefix + missing[0]!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # __post_init__ checks: re-raise with the section for context
        raise ConfigError(f"invalid config {prefix.rstrip('.') or '<root>'}: {err}") from err


def _renamed(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A section's old key names (``cls.RENAMED``: old -> new) are read as the new ones for one release, with a
    one-line deprecation warning naming the new key."""
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"config keys {prefix + old!r} and {prefix + new!r} are one setting: give only "
                                  f"{prefix + new!r}")
            warnings.warn(f"config key {prefix + old!r} is deprecated and will be removed in the next release: use "
                          f"{prefix + new!r}", FutureWarning, stacklevel=4)
            data = {(new if k == old else k): v for k, v in data.items()}
    return data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in the annotated form (tuples, nested dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in (a for a in args if a is not type(None)):
            try:
                return _convert(value, alt, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads a bare `no` (accelerate's word for fp32) as false
        if value not in args:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r} expects {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string and "3" as an int; both are meant as floats here.
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects float, got bool {value!r}")
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, float):
            raise ConfigError(f"config key {key!r} expects float, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():  # 1e6 in YAML is a float
                return int(value)
            raise ConfigError(f"config key {key!r} expects int, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key {key!r} expects null, got {value!r}")
        return None
    raise TypeError(f"unsupported annotation {tp!r} for config key {key!r}")  # a schema bug, not a user error


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------- overrides + files
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=100"`` -> (["train", "steps"], 100). The value is parsed as YAML (``[1,2]``, ``null``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied (missing sections are created)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i + 1])!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = configs.resolve(path)  # a relative configs/... path falls back to the packaged configs
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML), apply ``overrides``, validate into ``cls``. Errors name the file and the key. A config
    class may define ``upgrade(data)`` to read a deprecated setting that is not a plain rename."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        if hasattr(cls, "upgrade"):
            data = cls.upgrade(data)
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# ----------------------------------------------------------------------------------------------- shared sections
@dataclass
class OptimSection:
    """``optim``: AdamW with a linear warmup, then a cosine to ``min_lr_ratio * lr`` at ``train.steps``. Both
    trainers read this section; each sets its own defaults."""
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LoopSection:
    """``train``: the loop and its checkpoints. Both trainers read this section (each adds its own keys)."""
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/train"
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    # auto: bf16 autocast on a GPU, and on a CPU only where bf16 is native and faster (train.common.precision)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "save_every", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")

