"""Typed, strict run configuration: YAML file + ``key=value`` overrides -> frozen dataclasses.

Every section is a frozen dataclass. Loading is strict: an unknown key, a wrong type or a value
outside a fixed menu is a ``ConfigError`` that names the key and what is allowed. Overrides use
dotted paths with list indices (``train.phases.1.start_epoch=5``) and are parsed with
``yaml.safe_load`` so ``1e-3``, ``true``, ``[32, 64]`` and ``null`` mean what they mean in YAML.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kfine.rundir import atomic_write_text


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type. The message names the key."""


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class RandAugmentConfig:
    """keras.layers.RandAugment, per image: ``num_ops`` random ops of strength ``magnitude``."""
    num_ops: int = 2
    magnitude: float = 0.5                          # Keras' factor, 0..1 (timm's m9 is about 0.9)


@dataclass(frozen=True)
class AugMixConfig:
    """keras.layers.AugMix, per image."""
    num_chains: int = 3
    chain_depth: int = 3                            # up to this many ops per chain
    magnitude: float = 0.3                          # Keras' factor, 0..1
    alpha: float = 1.0                              # Dirichlet / Beta concentration
    all_ops: bool = True                            # also brightness/colour/contrast/sharpness


@dataclass(frozen=True)
class RandomErasingConfig:
    """keras.layers.RandomErasing, per image, after the recipe (timm's --reprob)."""
    probability: float = 0.0                        # share of images with a patch erased; 0 = off
    scale: tuple[float, float] = (0.02, 0.33)       # Keras' scale: range of each side's squared fraction
    fill: Optional[float] = None                    # null: random noise; a number: that value (0..255)


@dataclass(frozen=True)
class MixConfig:
    """Batch-level MixUp or CutMix (soft labels). A batch gets at most one of the two."""
    alpha: float = 0.0                              # Beta(alpha, alpha) mixing weight; 0 = off
    probability: float = 1.0                        # share of batches mixed (mixup + cutmix <= 1 when both on)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-epoch augmentation of training images (each switchable; 0 / false = off)."""
    enabled: bool = True
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)    # area fraction range of the crop
    flip: bool = True                               # random horizontal flip
    rotation: float = 0.0                           # max degrees either way
    translation: float = 0.0                        # max shift as a fraction of the size
    zoom: float = 0.0                               # affine scale jitter (fraction)
    shear: float = 0.0                              # affine shear (radians)
    brightness: float = 0.0                         # colour jitter strengths
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    # Recipes on top of the above (kfine.augment): per-image ops before .batch(), MixUp/CutMix after.
    recipe: str = "basic"                           # basic | randaugment | augmix (kfine.augment.RECIPES)
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    augmix: AugMixConfig = field(default_factory=AugMixConfig)
    random_erasing: RandomErasingConfig = field(default_factory=RandomErasingConfig)
    mixup: MixConfig = field(default_factory=MixConfig)
    cutmix: MixConfig = field(default_factory=MixConfig)
    mix_off_epochs: int = 0                         # no MixUp/CutMix in the last N epochs (timm's mixup_off_epoch)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["folder", "tfds", "digits"] = "folder"
    root: Optional[str] = None                       # folder: the dataset root
    layout: Literal["auto", "sketch", "inat", "single"] = "auto"
    name: Optional[str] = None                       # tfds: builder name
    data_dir: Optional[str] = None                   # tfds: where the prepared data lives
    train_split: str = "train"                       # tfds split strings
    val_split: Optional[str] = None                  # null: stratified split of train
    test_split: Optional[str] = None
    image_key: str = "image"                         # tfds feature names
    label_key: str = "label"
    download: bool = True                            # tfds: allow download_and_prepare
    val_fraction: float = 0.2                        # stratified validation share of train
    test_fraction: float = 0.1                       # single layout: held-out test share
    image_size: tuple[int, int] = (224, 224)
    batch_size: int = 32
    shuffle_buffer: int = 2048
    cache: bool = True                               # cache decoded+resized images (memory)
    deterministic: bool = False                      # deterministic tf.data (slower)
    on_bad_image: Literal["skip", "stop"] = "skip"
    check: bool = True                               # audit the data before training
    limit_per_class: Optional[int] = None            # cap images per class (quick runs)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class HeadConfig:
    """Classifier on the backbone's pooled features: linear, or Dense/activation/Dropout blocks."""
    type: Literal["linear", "mlp"] = "linear"
    units: tuple[int, ...] = ()                      # mlp hidden sizes, e.g. [512]
    activation: str = "relu"
    dropout: float = 0.0                             # after the pooling (linear) / each block (mlp)
    pooling: Literal["avg", "max"] = "avg"


@dataclass(frozen=True)
class ScratchConfig:
    """The 5-block CNN trained from scratch (backbone: scratch_cnn)."""
    filters: tuple[int, ...] = (32, 64, 128, 128, 256)
    kernel_size: int = 3
    activation: str = "relu"
    batchnorm: bool = False
    dense_units: int = 256
    dropout: float = 0.3


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    weights: Optional[str] = "imagenet"              # imagenet | null | path/to/file.weights.h5
    weights_fallback: Literal["error", "random"] = "error"
    head: HeadConfig = field(default_factory=HeadConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)


@dataclass(frozen=True)
class FreezeConfig:
    """Which layers train. See kfine.freeze.STRATEGIES."""
    strategy: str = "none"
    fraction: float = 0.0                            # fraction: share of weight layers frozen
    trainable_from: Optional[str] = None             # stages: first trainable stage (conv4 | layer3)
    pattern: Optional[str] = None                    # regex: layers whose name matches train
    train_bn: bool = False                           # regex/fraction/lora: also train every BatchNorm
    lora_rank: int = 8                               # lora: rank of the adapters (kfine.lora)
    lora_alpha: Optional[float] = None               # lora: scale alpha/rank; null = rank (scale 1)
    lora_stages: tuple[str, ...] = ()                # lora: stages whose Conv2D/Dense get adapters; () = all


@dataclass(frozen=True)
class PhaseConfig:
    start_epoch: int = 0
    freeze: FreezeConfig = field(default_factory=FreezeConfig)


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step", "exponential"] = "constant"
    learning_rate: float = 1e-3
    warmup_epochs: float = 0.0                       # linear warmup from 0
    min_learning_rate: float = 0.0                   # cosine floor
    step_epochs: float = 5.0                         # step: decay every N epochs
    gamma: float = 0.1                               # step / exponential factor


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    momentum: float = 0.9                            # sgd / rmsprop
    nesterov: bool = False
    weight_decay: float = 0.0                        # decoupled (adamw, sgd, adam via Keras)
    clipnorm: Optional[float] = None


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 15                           # periodic checkpoints (0 = off)
    keep: int = 3                                    # how many periodic ones to keep
    monitor: str = "val_accuracy"                    # for best.keras
    mode: Literal["auto", "min", "max"] = "auto"


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = 0                                # 0 = off
    monitor: str = "val_loss"
    min_delta: float = 0.0


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "kfine"
    entity: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    phases: tuple[PhaseConfig, ...] = (PhaseConfig(),)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # group -> factor
    label_smoothing: float = 0.0
    class_weight: Optional[str] = None               # null | balanced
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    steps_per_epoch: Optional[int] = None            # cap batches per epoch (quick runs)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    verbose: int = 1                                 # Keras fit verbosity (1 = progress bar)


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True
    formats: tuple[str, ...] = ("saved_model",)      # saved_model | onnx | keras


@dataclass(frozen=True)
class SearchConfig:
    """KerasTuner search over config keys (python -m kfine.tune)."""
    tuner: Literal["random", "bayesian", "hyperband", "grid"] = "random"
    objective: str = "val_accuracy"
    direction: Optional[Literal["min", "max"]] = None
    max_trials: int = 10
    executions_per_trial: int = 1
    max_epochs: Optional[int] = None                 # hyperband
    space: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


# ----------------------------------------------------------------------------- building
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({', '.join(f.name for f in dataclasses.fields(tp))})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):   # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def build(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a dict, strictly."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys here: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> Any:
    """Config -> plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def cli_error(err: Exception) -> int:
    """Print ``err`` as one line for a command-line tool and return its exit status, 2.
    KFINE_DEBUG=1 re-raises it instead, with the traceback."""
    import sys
    if os.environ.get("KFINE_DEBUG"):
        raise err
    print(f"kfine: error: {err}", file=sys.stderr)
    return 2


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Load a YAML config (or start from ``base`` / the defaults) and apply ``key=value`` overrides."""
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        with open(p) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    # Start from the full defaults so that overrides can reach keys the file does not mention.
    full = to_dict(Config())
    _merge(full, data)
    for key, value in parse_overrides(overrides or []):
        set_path(full, key, value)
    return build(Config, full)


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in _OPEN_DICTS:
            _merge(dst[k], v)
        else:
            dst[k] = v


# Dicts whose keys are the user's own (not merged with defaults: their keys are free).
_OPEN_DICTS = {"lr_multipliers", "space"}


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
