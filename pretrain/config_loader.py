"""Typed loading of run configs: YAML files, model presets, ``a.b=value`` overrides.

Every value is checked against the dataclass annotations and range metadata of
``pretrain.config``; a mistake raises one ``ConfigError`` naming the key (and the closest
valid key for a typo). A saved config reloads to an equal object.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from data.config import bound_violation

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_PRESETS_DIR = CONFIGS_DIR / "models"

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-fixable config mistake; the message names the key and the fix."""


# ----------------------------------------------------------------------------- YAML


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory: give a run config YAML (see configs/runs/)")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist ({p.absolute()}): check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def list_model_presets() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml"))


def model_preset_path(name: str) -> Path:
    """A preset name (``mamba2-125m``) or a path to a model YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = MODEL_PRESETS_DIR / f"{name}.yaml"
    if not candidate.is_file():
        close = difflib.get_close_matches(name, list_model_presets(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"model.preset: unknown preset {name!r}{hint}; presets live in {MODEL_PRESETS_DIR}"
        )
    return candidate


def _resolve_model_preset(raw: dict[str, Any]) -> dict[str, Any]:
    model = raw.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return raw
    model = dict(model)
    preset = model.pop("preset")
    if not isinstance(preset, str):
        raise ConfigError(f"model.preset: expected a preset name, got {preset!r}")
    base = read_yaml(model_preset_path(preset))
    return {**raw, "model": deep_merge(base, model)}


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = deep_merge({}, raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            else:
                nxt = node[part] = dict(nxt)
            node = nxt
        node[path[-1]] = value
    return out


# ----------------------------------------------------------------------------- typed build


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists to tuples...)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if (value is None or value == "None") and type(None) in args:  # key=None reads as the text "None"
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key!r}: must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a section (mapping), got {value!r}")
        return build_dataclass(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1.0e6 in YAML is a float
        if isinstance(value, str):  # PyYAML reads 5e7 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    problem = bound_violation(value, meta)
    if problem is not None:
        raise ConfigError(f"config key {key!r}: {problem}")


def build_dataclass(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Construct ``cls`` from a mapping, checking keys, types and ranges recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            if ":" in str(k) and v is None:  # {path:/x} is one key in YAML; {path: /x} a key and a value
                hint = f" (YAML needs a space after ':': {str(k).split(':', 1)[0]}: {str(k).split(':', 1)[1]})"
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys here: {valid}")
        value = _coerce(v, hints[k], key)
        _check_range(value, fields[k].metadata, key)
        kwargs[k] = value
    try:
        obj = cls(**kwargs)
    except ValueError as e:  # a field's own normalisation (``__post_init__``) raises "key: message"
        raise ConfigError(f"config key {prefix + '.' if prefix else ''}{e}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as e:  # cross-field checks raise ValueError("key: message")
            raise ConfigError(f"config key {prefix + '.' if prefix else ''}{e}") from None
    return obj


# ----------------------------------------------------------------------------- public


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[T] | None = None) -> T:
    """Load a run config from YAML (or defaults when ``path`` is None) plus overrides."""
    if cls is None:
        from .config import RunConfig

        cls = RunConfig  # type: ignore[assignment]
    raw = read_yaml(path) if path is not None else {}
    if cls.__name__ == "RunConfig" and "vocab_size" in raw and "model" not in raw:  # a model preset file
        raise ConfigError(f"{str(path)!r} is a model preset, not a run config: name it in a run config as "
                          f"`model: {{preset: {Path(str(path)).stem}}}` (see configs/runs/)")
    raw = apply_overrides(raw, overrides or [])
    raw = _resolve_model_preset(raw)
    return build_dataclass(cls, raw)  # type: ignore[arg-type]


def load_model_config(name_or_path: str, overrides: list[str] | None = None):
    """A ``ModelConfig`` from a preset name or a model YAML file, plus overrides."""
    from .model_config import ModelConfig

    raw = apply_overrides(read_yaml(model_preset_path(name_or_path)), overrides or [])
    return build_dataclass(ModelConfig, raw, prefix="model")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(p)
