"""Typed, strict run configuration: YAML file + ``key=value`` overrides -> frozen dataclasses.

Every section is a frozen dataclass. Loading is strict: an unknown key, a wrong type or a value
outside a fixed menu is a ``ConfigError`` that names the key and what is allowed. Overrides use
dotted paths with list indices (``train.phases.1.start_epoch=5``) and are parsed with
``yaml.safe_load`` so ``1e-3``, ``true``, ``[32, 64]`` and ``null`` mean what they mean in YAML.

``check_config(cfg)`` then checks the values (ranges, menus against kfine's registries, stage
names, sums, image size against the backbone) before anything is created or read; every entry
point calls it. Its table ``CHECKS`` has one line per key: a new field adds its check there.
A YAML syntax error is one line: ``file:line:column: invalid YAML: ...``.
"""
from __future__ import annotations

import dataclasses
import json
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
    """Per-epoch augmentation of training images (each switchable; 0 / false = off).
    torchvision semantics: the crop is cut from the cached image (larger than the crop), colour
    jitter factors are multiplicative (ColorJitter); see kfine.pipeline."""
    enabled: bool = True
    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)    # area fraction range of the crop
    flip: bool = True                               # random horizontal flip
    rotation: float = 0.0                           # max degrees either way
    translation: float = 0.0                        # max shift as a fraction of the size
    zoom: float = 0.0                               # affine scale jitter (fraction)
    shear: float = 0.0                              # affine shear (radians)
    brightness: float = 0.0                         # ColorJitter: factor in [1-x, 1+x]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0                                # hue shift in [-x, x] (x <= 0.5)
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
    splits: Optional[str] = None                     # a splits.csv to use instead of drawing a split
    image_size: tuple[int, int] = (224, 224)         # what the model sees (the crop)
    cache_size: Union[int, tuple[int, int], None] = None  # shorter side (default round(1.143*crop)) or [H, W]
    eval_transform: Literal["resize_center_crop", "squash"] = "resize_center_crop"
    batch_size: int = 32
    cache: Literal["memory", "disk", "none"] = "memory"  # where decoded images are kept
    cache_dir: Optional[str] = None                  # disk cache root (default $KFINE_CACHE/images)
    max_pixels: Optional[int] = 40_000_000           # refuse larger images by their header
    sampling: Literal["uniform", "balanced"] = "uniform"  # balanced: every class equally likely per draw
    deterministic: bool = False                      # deterministic tf.data (slower)
    view_path: Literal["auto", "python", "graph"] = "auto"   # how training views are cut (kfine.pipeline.graph_views)
    on_bad_image: Literal["skip", "stop"] = "skip"
    check: bool = True                               # audit the data before training
    limit_per_class: Optional[int] = None            # cap images per class (quick runs)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class HeadConfig:
    """Classifier on the backbone's pooled features: linear, or Dense/activation/Dropout blocks."""
    type: str = "linear"                             # a key of kfine.model.HEADS
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
    # BatchNorm statistics (kfine.freeze.BN_MODES): train = they move where the strategy trains BN
    # (Keras); stats = they move in every BN layer, frozen ones too (PyTorch model.train());
    # frozen = they never move (every BN in inference mode). gamma/beta follow the strategy.
    bn: Literal["frozen", "stats", "train"] = "train"


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step", "exponential"] = "constant"
    learning_rate: float = 1e-3
    warmup_epochs: float = 0.0                       # linear warmup from 0
    min_learning_rate: float = 0.0                   # cosine floor
    step_epochs: float = 5.0                         # step: decay every N epochs
    gamma: Optional[float] = None                    # step: factor (null = 0.1, StepLR's);
                                                     # exponential: factor per epoch, required


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"                               # a key of kfine.optim.OPTIMIZERS
    momentum: Optional[float] = None                 # sgd / rmsprop only; null = none (0.0)
    nesterov: bool = False                           # sgd with momentum only
    weight_decay: float = 0.0
    weight_decay_mode: Literal["decoupled", "l2"] = "decoupled"   # l2 = PyTorch Adam/SGD(weight_decay)
    no_decay: tuple[str, ...] = ("bn", "bias")       # not decayed: bn (norm gamma/beta), bias
    clipnorm: Optional[float] = None                 # clip each variable's gradient norm
    global_clipnorm: Optional[float] = None          # clip the norm of all gradients (clip_grad_norm_)


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 15                           # periodic checkpoints (0 = off)
    keep: int = 3                                    # how many periodic ones to keep
    monitor: str = "val_accuracy"                    # for best.keras
    mode: Literal["auto", "min", "max"] = "auto"
    save_optimizer: bool = False                     # checkpoints also hold the optimizer state


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = 0                                # 0 = off; counted within a phase, across --resume
    monitor: str = "val_loss"
    min_delta: float = 0.0
    mode: Literal["auto", "min", "max"] = "auto"     # auto: max for accuracy-like monitors
    scope: Literal["phase", "run"] = "phase"         # a stop ends the phase (the next one starts) or the run


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "kfine"
    entity: Optional[str] = None


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the weights (the optimizer's use_ema), used for validation,
    checkpoints, evaluation and export."""
    enabled: bool = False
    momentum: float = 0.99                           # per optimizer update; ~1/(1-momentum) updates


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    phases: tuple[PhaseConfig, ...] = (PhaseConfig(),)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # group -> factor
    layer_decay: Optional[float] = None              # head 1, last stage d, the one before d^2, ...
    ema: EmaConfig = field(default_factory=EmaConfig)
    accumulate_steps: int = 1                        # batches per optimizer update (1 = off)
    label_smoothing: float = 0.0
    class_weight: Optional[str] = None               # null | balanced
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    steps_per_epoch: Optional[int] = None            # cap batches per epoch (quick runs)
    feature_cache: Union[Literal["auto"], bool] = "auto"   # head-only phases on cached backbone features; off: false
    feature_cache_views: int = 2                     # augmented views per image cached (augmentation on)
    steps_per_execution: Union[int, Literal["auto"]] = "auto"   # train steps per compiled call
    jit_compile: Union[bool, Literal["auto"]] = "auto"   # XLA; auto: Keras' own (on for GPU and JAX)
    drop_remainder: Optional[bool] = None            # drop the last partial batch; null: when XLA compiles
    restore_best: Optional[bool] = None              # evaluate/export checkpoints/best.keras, not the
                                                     # final epoch; null = when there is a val split
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    verbose: int = 1                                 # 1: progress bar (a line per epoch when stdout
                                                     # is not a terminal); 2: a line per epoch; 0: quiet
    scale_lr_with_batch: Optional[str] = None        # null | linear: learning rates x data.batch_size
                                                     # / lr_base_batch (Goyal et al.'s rule; said in the log)
    lr_base_batch: int = 256                         # the batch the configured learning rates are for (linear)


@dataclass(frozen=True)
class DistributeConfig:
    """Training on several devices or processes (kfine.distribute): data.batch_size is the global
    batch. The multi-process keys fall back to Keras' environment variables when null."""
    strategy: str = "auto"                           # a key of kfine.distribute.STRATEGIES: auto | none
                                                     # | mirrored (TensorFlow) | data_parallel (JAX)
    coordinator_address: Optional[str] = None        # host:port of process 0 ($KERAS_DISTRIBUTION_JOB_ADDRESSES)
    num_processes: Optional[int] = None              # null: $KERAS_DISTRIBUTION_NUM_PROCESSES, else 1
    process_id: Optional[int] = None                 # this process, 0 = the chief ($KERAS_DISTRIBUTION_PROCESS_ID)


@dataclass(frozen=True)
class LiteRTConfig:
    """The LiteRT (.tflite) file of ``export.formats: [litert]``."""
    quantization: Literal["none", "float16", "dynamic", "int8"] = "none"   # kfine.export.QUANTIZATIONS
    representative_images: int = 100                 # int8: training images (eval transform) that calibrate


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True
    formats: tuple[str, ...] = ("saved_model",)      # kfine.export.FORMATS: saved_model | onnx | keras | litert
    litert: LiteRTConfig = field(default_factory=LiteRTConfig)


@dataclass(frozen=True)
class SearchConfig:
    """KerasTuner search over config keys (python -m kfine.tune)."""
    tuner: str = "random"                            # a key of kfine.tune.TUNERS
    objective: str = "val_accuracy"
    direction: Optional[Literal["min", "max"]] = None
    max_trials: int = 10
    executions_per_trial: int = 1
    max_epochs: Optional[int] = None                 # hyperband
    space: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareConfig:
    """Runs to compare (python -m kfine.compare): named override sets, each a whole run on the
    same data, split and seed; ``--strategies`` on the command line produces such sets."""
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)        # name -> {dotted key: value}
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {val|test: published accuracy}


@dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

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
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed keys here: {names} "
                          f"(see docs/configuration.md#config-reference)")
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


# ----------------------------------------------------------------------------- checking values
# load_config checks keys and types; check_config checks values, before a run directory is made
# or any data is read. Each entry of CHECKS is one line: a dotted key (``*`` = every list item or
# mapping key) and a check, a function value -> None if allowed, else what is allowed. RULES are
# the checks that look at several keys. A new field adds its line here. Menus are the registries
# themselves ("module:NAME"), imported only while checking, so config.py never imports TensorFlow
# and a new registry entry needs no change here.
def at_least(lo):
    return lambda v: None if v >= lo else f">= {lo}"


def above(lo):
    return lambda v: None if v > lo else f"> {lo}"


def in_range(lo, hi, closed: bool = False):
    """lo <= v < hi (``closed``: lo <= v <= hi)."""
    if closed:
        return lambda v: None if lo <= v <= hi else f"in [{lo}, {hi}]"
    return lambda v: None if lo <= v < hi else f"in [{lo}, {hi})"


def one_of(*values):
    return lambda v: None if v in values else f"one of [{', '.join(_show(x) for x in values)}]"


def optional(check):
    """null, or what ``check`` allows."""
    def check_optional(v):
        allowed = None if v is None else check(v)
        return None if allowed is None else f"null or {allowed}"
    return check_optional


def menu(ref: str):
    """A key of the registry ``module:NAME`` (a dict or tuple of names)."""
    def check(v):
        names = registry(ref)
        return None if v in names else f"one of {sorted(names)}"
    return check


def registry(ref: str):
    import importlib
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def activation_name(v):
    import keras
    try:
        keras.activations.get(v)
    except ValueError:
        return "the name of a keras.activations function (relu, gelu, swish, tanh, ...)"
    return None


def run_name(v):
    return None if v and "/" not in v and "\\" not in v and v not in (".", "..") else \
        "a non-empty folder name without path separators"


def host_port(v):
    host, _, port = v.rpartition(":")
    return None if host and port.isdigit() else "host:port (e.g. 10.0.0.1:1234)"


FRACTION = in_range(0.0, 1.0)       # 0 <= v < 1

CHECKS = {
    "name": run_name,
    "seed": at_least(0),
    "data.val_fraction": FRACTION,
    "data.test_fraction": FRACTION,
    "data.batch_size": at_least(1),
    "data.cache_size": optional(lambda v: at_least(1)(min(v) if isinstance(v, tuple) else v)),
    "data.max_pixels": optional(at_least(1)),
    "data.limit_per_class": optional(at_least(1)),
    "data.augment.crop_scale.*": in_range(0.0, 1.0, closed=True),
    "data.augment.rotation": at_least(0.0),
    "data.augment.translation": FRACTION,
    "data.augment.zoom": FRACTION,
    "data.augment.shear": at_least(0.0),
    "data.augment.brightness": at_least(0.0),
    "data.augment.contrast": at_least(0.0),
    "data.augment.saturation": at_least(0.0),
    "data.augment.hue": in_range(0.0, 0.5, closed=True),
    "data.augment.recipe": menu("kfine.augment:RECIPES"),
    "data.augment.randaugment.num_ops": at_least(1),
    "data.augment.randaugment.magnitude": in_range(0.0, 1.0, closed=True),
    "data.augment.augmix.num_chains": at_least(1),
    "data.augment.augmix.chain_depth": at_least(1),
    "data.augment.augmix.magnitude": in_range(0.0, 1.0, closed=True),
    "data.augment.augmix.alpha": above(0.0),
    "data.augment.random_erasing.probability": in_range(0.0, 1.0, closed=True),
    "data.augment.random_erasing.scale.*": lambda v: None if 0 < v <= 1 else "in (0.0, 1.0]",
    "data.augment.random_erasing.fill": optional(in_range(0.0, 255.0, closed=True)),
    "data.augment.mixup.alpha": at_least(0.0),
    "data.augment.cutmix.alpha": in_range(0.0, 1.0, closed=True),   # keras.layers.CutMix's bound
    "data.augment.mixup.probability": in_range(0.0, 1.0, closed=True),
    "data.augment.cutmix.probability": in_range(0.0, 1.0, closed=True),
    "data.augment.mix_off_epochs": at_least(0),
    "model.backbone": menu("kfine.registry:BACKBONES"),
    "model.head.type": menu("kfine.model:HEADS"),
    "model.head.units.*": at_least(1),
    "model.head.activation": activation_name,
    "model.head.dropout": FRACTION,
    "model.scratch.filters.*": at_least(1),
    "model.scratch.kernel_size": at_least(1),
    "model.scratch.activation": activation_name,
    "model.scratch.dense_units": at_least(1),
    "model.scratch.dropout": FRACTION,
    "train.epochs": at_least(1),
    "train.phases.*.start_epoch": at_least(0),
    "train.phases.*.freeze.strategy": menu("kfine.freeze:STRATEGIES"),
    "train.phases.*.freeze.fraction": in_range(0.0, 1.0, closed=True),
    "train.phases.*.freeze.lora_rank": at_least(1),
    "train.phases.*.freeze.lora_alpha": optional(above(0.0)),
    "train.optimizer.name": menu("kfine.optim:OPTIMIZERS"),
    "train.optimizer.momentum": optional(FRACTION),
    "train.optimizer.weight_decay": at_least(0.0),
    "train.optimizer.no_decay.*": menu("kfine.optim:NO_DECAY"),
    "train.optimizer.clipnorm": optional(above(0.0)),
    "train.optimizer.global_clipnorm": optional(above(0.0)),
    "train.schedule.learning_rate": at_least(0.0),
    "train.schedule.warmup_epochs": at_least(0.0),
    "train.schedule.min_learning_rate": at_least(0.0),
    "train.schedule.step_epochs": above(0.0),
    "train.schedule.gamma": optional(above(0.0)),
    "train.lr_multipliers.*": at_least(0.0),
    "train.layer_decay": optional(lambda v: None if 0.0 < v <= 1.0 else "in (0.0, 1.0]"),
    "train.ema.momentum": FRACTION,
    "train.accumulate_steps": at_least(1),
    "train.feature_cache_views": at_least(1),
    "train.steps_per_execution": lambda v: None if v == "auto" or v >= 1 else "'auto' or >= 1",
    "train.label_smoothing": FRACTION,
    "train.class_weight": one_of(None, "balanced"),
    "train.steps_per_epoch": optional(at_least(1)),
    "train.restore_best": one_of(None, True, False),
    "train.checkpoint.every_epochs": at_least(0),
    "train.checkpoint.keep": at_least(1),
    "train.early_stopping.patience": at_least(0),
    "train.early_stopping.min_delta": at_least(0.0),
    "train.verbose": one_of(0, 1, 2),
    "train.scale_lr_with_batch": one_of(None, "linear"),
    "train.lr_base_batch": at_least(1),
    "distribute.strategy": menu("kfine.distribute:STRATEGIES"),
    "distribute.coordinator_address": optional(host_port),
    "distribute.num_processes": optional(at_least(1)),
    "distribute.process_id": optional(at_least(0)),
    "export.formats.*": menu("kfine.export:FORMATS"),
    "export.litert.representative_images": at_least(1),
    "search.tuner": menu("kfine.tune:TUNERS"),
    "search.max_trials": at_least(1),
    "search.executions_per_trial": at_least(1),
    "search.max_epochs": optional(at_least(1)),
    "compare.reference.*.*": in_range(0.0, 1.0, closed=True),
}


def _show(v) -> str:
    """A value as the user wrote it (YAML's null, lists for tuples)."""
    v = to_dict(v)
    return "null" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else repr(v)


def bad_value(key: str, value, allowed: str, subject: str | None = None) -> ConfigError:
    """keras-hub's style: what the key (or ``subject``) must be, then what it received."""
    return ConfigError(f"{subject or key} must be {allowed}. Received: {key}={_show(value)}")


def values_at(obj, key: str):
    """(concrete key, value) for a dotted key with ``*`` wildcards."""
    def walk(node, parts, prefix):
        if not parts:
            yield prefix, node
            return
        head, rest = parts[0], parts[1:]
        if head == "*":
            items = node.items() if isinstance(node, dict) else enumerate(node or ())
            for k, v in items:
                yield from walk(v, rest, f"{prefix}.{k}")
        elif dataclasses.is_dataclass(node) and head in {f.name for f in dataclasses.fields(node)}:
            yield from walk(getattr(node, head), rest, f"{prefix}.{head}" if prefix else head)
        else:
            raise KeyError(f"{key}: no field {head!r} in {prefix or 'the config'}")
    return list(walk(obj, key.split("."), ""))


def check_phases(phases, epochs: int | None) -> None:
    """The phase list runs in order: at least one phase, the first at epoch 0, start epochs
    increasing, the last before ``epochs`` (None: not checked, a hyperband search picks the epochs).
    The one home of these checks: check_config and kfine.train.phase_spans call it."""
    starts = [p.start_epoch for p in phases]
    if not starts:
        raise bad_value("train.phases", [], "a list of at least one phase")
    if starts[0] != 0:
        raise bad_value("train.phases.0.start_epoch", starts[0], "0 (the first phase starts the run)")
    for i, (a, b) in enumerate(zip(starts, starts[1:]), start=1):
        if b <= a:
            raise bad_value(f"train.phases.{i}.start_epoch", b, f"> train.phases.{i - 1}.start_epoch ({a}): "
                            f"phases are listed in the order they run (start epochs {starts})")
    if epochs is not None and starts[-1] >= epochs:
        raise bad_value(f"train.phases.{len(starts) - 1}.start_epoch", starts[-1],
                        f"< train.epochs ({epochs}); raise train.epochs or drop the phase")


def _phases_in_order(cfg: Config) -> None:
    hyperband = cfg.search.tuner == "hyperband" and cfg.search.space   # it picks the epochs itself
    check_phases(cfg.train.phases, None if hyperband else cfg.train.epochs)


def _fractions_sum(cfg: Config) -> None:
    d = cfg.data
    if d.val_fraction + d.test_fraction >= 1:
        raise bad_value("data.val_fraction", d.val_fraction,
                        f"such that data.val_fraction + data.test_fraction < 1 (data.test_fraction is "
                        f"{d.test_fraction}: nothing would be left to train on)")


def _cache_holds_the_crop(cfg: Config) -> None:
    """The cached image must be at least the crop: a centre crop cannot be larger than its image."""
    d = cfg.data
    if isinstance(d.cache_size, int) and d.cache_size < max(d.image_size):
        raise bad_value("data.cache_size", d.cache_size, f">= the larger side of data.image_size "
                        f"({max(d.image_size)}): the shorter side of the cached image is what the crop is cut from")
    if isinstance(d.cache_size, tuple) and (d.cache_size[0] < d.image_size[0] or d.cache_size[1] < d.image_size[1]):
        raise bad_value("data.cache_size", d.cache_size, f"at least data.image_size {list(d.image_size)} in both sides")


def _augment_mixing(cfg: Config) -> None:
    """A batch gets MixUp or CutMix, not both: their probabilities add up to at most 1."""
    a = cfg.data.augment
    pm = a.mixup.probability if a.mixup.alpha > 0 else 0.0
    pc = a.cutmix.probability if a.cutmix.alpha > 0 else 0.0
    if pm + pc > 1 + 1e-9:
        raise bad_value("data.augment.cutmix.probability", a.cutmix.probability,
                        f"<= 1 - data.augment.mixup.probability ({a.mixup.probability}): a batch gets one of "
                        f"the two (timm's default is 0.5 each)")
    low, high = a.random_erasing.scale
    if low > high:
        raise bad_value("data.augment.random_erasing.scale", a.random_erasing.scale, "[low, high] with low <= high")


def _image_size_fits_backbone(cfg: Config) -> None:
    from kfine.registry import min_input_size
    low = min_input_size(cfg.model.backbone)
    if min(cfg.data.image_size) < low:
        raise bad_value("data.image_size", cfg.data.image_size,
                        f"two sizes >= {low} (the smallest input {cfg.model.backbone} accepts)")


def _freeze_specs_complete(cfg: Config) -> None:
    import re
    for i, phase in enumerate(cfg.train.phases):
        f, key = phase.freeze, f"train.phases.{i}.freeze"
        if f.strategy == "stages" and not f.trainable_from:
            raise bad_value(f"{key}.trainable_from", f.trainable_from,
                            "the first stage that trains (e.g. conv4, or layer3) for strategy stages")
        if f.strategy == "regex":
            try:
                re.compile(f.pattern or "")
            except re.error as e:
                raise bad_value(f"{key}.pattern", f.pattern, f"a valid regular expression ({e})") from None
            if not f.pattern:
                raise bad_value(f"{key}.pattern", f.pattern, "a regex of the layer names that train, for strategy regex")


def _stage_names(cfg: Config) -> None:
    """trainable_from, lora_stages and lr_multipliers keys name stages of the configured backbone."""
    named = [(f"train.phases.{i}.freeze.trainable_from", p.freeze.trainable_from, p.freeze.trainable_from, None)
             for i, p in enumerate(cfg.train.phases) if p.freeze.strategy == "stages"]
    named += [(f"train.phases.{i}.freeze.lora_stages.{j}", s, s, None)
              for i, p in enumerate(cfg.train.phases) if p.freeze.strategy == "lora"
              for j, s in enumerate(p.freeze.lora_stages)]
    named += [(f"train.lr_multipliers.{k}", k, v, "train.lr_multipliers keys")
              for k, v in cfg.train.lr_multipliers.items() if k not in ("head", "fc", "backbone")]
    if not named:
        return
    from kfine.registry import resolve_stage, stage_aliases
    stages = backbone_stage_names(cfg.model)
    aliases = stage_aliases(stages)
    for key, name, value, subject in named:
        if resolve_stage(name, stages) is None:
            allowed = f"a stage of {cfg.model.backbone}: one of {stages}" + (f" (aliases: {aliases})" if aliases else "")
            raise bad_value(key, value, allowed + (", head or backbone" if subject else ""), subject)


def backbone_stage_names(model_cfg: ModelConfig) -> list[str]:
    """The backbone's stages in order, from kfine.registry's static table (no model is built)."""
    from kfine.registry import stage_names
    return list(stage_names(model_cfg.backbone, len(model_cfg.scratch.filters)))


def _batchnorm_where_needed(cfg: Config) -> None:
    """A phase that trains or freezes BatchNorm (bn_and_head, train_bn, bn: stats | frozen) needs a
    backbone with BatchNorm layers (ConvNeXt has LayerNorm, VGG no normalisation at all)."""
    from kfine.registry import has_batchnorm, needs_batchnorm, norm_note
    if has_batchnorm(cfg.model.backbone, cfg.model.scratch.batchnorm):
        return
    for i, phase in enumerate(cfg.train.phases):
        needs = needs_batchnorm(phase.freeze.strategy, phase.freeze.train_bn, phase.bn)
        if needs:
            note = " (model.scratch.batchnorm: false)" if cfg.model.backbone == "scratch_cnn" else norm_note(cfg.model.backbone)
            raise ConfigError(f"train.phases.{i}.{needs} needs BatchNorm layers; {cfg.model.backbone} has none{note}. "
                              f"Choose a freeze strategy and bn mode without BatchNorm (backbone, stages, fraction, "
                              f"regex, lora, none; bn: train)")


# Keys a compare set may not change: every run of a comparison has the same data, split and seed,
# and lives in the comparison's directory under the set's name.
COMPARE_FIXED = ("name", "runs_dir", "seed", "data.source", "data.root", "data.layout", "data.name", "data.data_dir",
                 "data.train_split", "data.val_split", "data.test_split", "data.val_fraction", "data.test_fraction",
                 "data.splits", "data.limit_per_class", "compare")


def _compare_sets(cfg: Config) -> None:
    """compare.sets: names usable as run folders, no key that would change the data or the split;
    compare.reference: figures under val or test. (Each set's run config is checked by kfine.compare.)"""
    for name, overrides in cfg.compare.sets.items():
        if run_name(name) is not None or name == "plots":   # plots/ holds the comparison's plot
            raise bad_value(f"compare.sets.{name}", overrides, "a non-empty folder name without path separators, "
                            "other than plots", "compare.sets names")
        for key in overrides:
            if any(key == k or key.startswith(k + ".") for k in COMPARE_FIXED):
                raise bad_value(f"compare.sets.{name}.{key}", overrides[key], "keys that keep the data, split and "
                                f"seed of the comparison (none of {list(COMPARE_FIXED)})", "compare.sets keys")
    for name, figures in cfg.compare.reference.items():
        for split in figures:
            if split not in ("val", "test"):
                raise bad_value(f"compare.reference.{name}.{split}", figures[split], "val or test (the split the "
                                "published accuracy was measured on)", "compare.reference keys")


def _process_id_in_range(cfg: Config) -> None:
    d = cfg.distribute
    if d.process_id is not None and d.num_processes is not None and d.process_id >= d.num_processes:
        raise bad_value("distribute.process_id", d.process_id,
                        f"< distribute.num_processes ({d.num_processes}): processes count from 0")


def _data_source_given(cfg: Config) -> None:
    """Where the data comes from is set (reading it is make_datasets' work, after the checks)."""
    d = cfg.data
    if d.source == "folder" and not d.root:
        raise bad_value("data.root", d.root, "your dataset folder for data.source folder (data.root=path/to/data)")
    if d.source == "tfds" and not d.name:
        raise bad_value("data.name", d.name, "a tfds data set name for data.source tfds (e.g. data.name=tf_flowers)")
    if d.source == "tfds" and d.cache == "none":
        raise bad_value("data.cache", d.cache, "memory or disk for data.source tfds (its examples are not files)")


RULES = [_process_id_in_range, _phases_in_order, _fractions_sum, _cache_holds_the_crop, _augment_mixing,
         _image_size_fits_backbone,
         _freeze_specs_complete, _stage_names, _batchnorm_where_needed, _compare_sets, _data_source_given]


def check_config(cfg: Config) -> Config:
    """Every value of ``cfg`` within what kfine can run, else a ConfigError naming the full key,
    the value and what is allowed. Call before creating a run directory or reading data; it
    imports the registries it checks against (kfine.model, kfine.freeze, ... : Keras)."""
    for key, check in CHECKS.items():
        for where, value in values_at(cfg, key):
            allowed = check(value)
            if allowed is not None:
                raise bad_value(where, value, allowed)
    for rule in RULES:
        rule(cfg)
    return cfg
