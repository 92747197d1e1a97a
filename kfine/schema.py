"""The run configuration's schema: frozen dataclasses, one per section, and the strict coercion
of plain data (YAML's mappings, lists and scalars) into them.

Every section is a frozen dataclass; ``build(Config, data)`` makes one from a dict strictly: an
unknown key, a wrong type or a value outside a fixed menu (a ``Literal``) is a ``ConfigError``
that names the key and what is allowed. ``to_dict`` turns a config back into YAML-able data.
Reading files and overrides is kfine.config's work; checking values, kfine.checks'.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union


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
