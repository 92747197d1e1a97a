"""Typed, strict run configuration: YAML file + ``key=value`` overrides -> frozen dataclasses.

The dataclasses and their strict coercion are kfine.schema's: loading is strict, an unknown key,
a wrong type or a value outside a fixed menu is a ``ConfigError`` that names the key and what is
allowed. Overrides use dotted paths with list indices (``train.phases.1.start_epoch=5``) and are
parsed with ``yaml.safe_load`` so ``1e-3``, ``true``, ``[32, 64]`` and ``null`` mean what they
mean in YAML. A YAML syntax error is one line: ``file:line:column: invalid YAML: ...``.

``check_config(cfg)`` (kfine.checks) then checks the values (ranges, menus against kfine's
registries, stage names, sums, image size against the backbone) before anything is created or
read; every entry point calls it. This module is the Python API's one import for all of it:
``from kfine.config import load_config, check_config, Config, ConfigError``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from kfine.checks import check_config
from kfine.rundir import atomic_write_text
from kfine.schema import (AugmentConfig, AugMixConfig, CheckpointConfig, CompareConfig, Config, ConfigError,
                          DataConfig, DistributeConfig, EarlyStoppingConfig, EmaConfig, ExportConfig, FreezeConfig,
                          HeadConfig, LiteRTConfig, MixConfig, ModelConfig, OptimizerConfig, PhaseConfig,
                          RandAugmentConfig, RandomErasingConfig, ScheduleConfig, ScratchConfig, SearchConfig,
                          TrainConfig, WandbConfig, build, to_dict)

__all__ = [  # the Python API: loading here, the schema (kfine.schema) and the value checks (kfine.checks)
    "load_config", "parse_overrides", "replace", "save_config", "set_path", "check_config",
    "AugmentConfig", "AugMixConfig", "CheckpointConfig", "CompareConfig", "Config", "ConfigError", "DataConfig",
    "DistributeConfig", "EarlyStoppingConfig", "EmaConfig", "ExportConfig", "FreezeConfig", "HeadConfig",
    "LiteRTConfig", "MixConfig", "ModelConfig", "OptimizerConfig", "PhaseConfig", "RandAugmentConfig",
    "RandomErasingConfig", "ScheduleConfig", "ScratchConfig", "SearchConfig", "TrainConfig", "WandbConfig",
    "build", "to_dict"]


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists, creating dicts (not list items) on the way."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: list index out of range (the list has {len(node)} items)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"{where}: cannot set a key inside {node!r}")


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        if "" in key.strip().split("."):
            raise ConfigError(f"override {item!r}: the key {key.strip()!r} has an empty part (a dot at an end "
                              f"or two dots in a row); write section.key=value (e.g. data.batch_size=32)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Load a YAML config (or start from ``base`` / the defaults) and apply ``key=value`` overrides."""
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder; give a YAML config file")
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = _read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    # Start from the full defaults so that overrides can reach keys the file does not mention.
    full = to_dict(Config())
    _merge(full, data)
    for key, value in parse_overrides(overrides or []):
        set_path(full, key, value)
    return build(Config, full)


def _read_yaml(path: Path) -> Any:
    """The file's YAML; a syntax error is one line: file:line:column, the problem, its context."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = ""
        if e.context and e.context_mark:
            context = f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise ConfigError(f"{where}: invalid YAML: {e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in _OPEN_DICTS:
            _merge(dst[k], v)
        else:
            dst[k] = v


# Dicts whose keys are the user's own (not merged with defaults: their keys are free).
_OPEN_DICTS = {"lr_multipliers", "space", "sets", "reference"}


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied (same strictness as loading)."""
    data = to_dict(cfg)
    for key, value in parse_overrides(overrides):
        set_path(data, key, value)
    return build(Config, data)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)
