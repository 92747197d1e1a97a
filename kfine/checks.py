"""The config's values checked (``check_config``) before anything is created or read: ranges,
menus against kfine's registries, stage names, sums, image size against the backbone.

Loading (kfine.config) checks keys and types; ``check_config(cfg)`` checks values, and every
entry point calls it. Its table ``CHECKS`` has one line per key: a new field adds its check
there. ``RULES`` are the checks that look at several keys. A failed check is a ``ConfigError``
naming the full key, the value and what is allowed (``bad_value``).
"""
from __future__ import annotations

import dataclasses
import json

from kfine.schema import Config, ConfigError, ModelConfig, to_dict


# ----------------------------------------------------------------------------- checking values
# load_config checks keys and types; check_config checks values, before a run directory is made
# or any data is read. Each entry of CHECKS is one line: a dotted key (``*`` = every list item or
# mapping key) and a check, a function value -> None if allowed, else what is allowed. RULES are
# the checks that look at several keys. A new field adds its line here. Menus are the registries
# themselves ("module:NAME"), imported only while checking, so checks.py never imports TensorFlow
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
    The one home of these checks: check_config and kfine.fit.phase_spans call it."""
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


def _weights_exist(cfg: Config) -> None:
    """toy_resnet has no pretrained weights: model.weights imagenet is refused here, before any
    data is read (unless model.weights_fallback: random, which starts from random weights)."""
    from kfine.registry import BACKBONES
    m = cfg.model
    if (m.backbone != "scratch_cnn" and not BACKBONES[m.backbone]["app"] and m.weights == "imagenet"
            and m.weights_fallback != "random"):
        raise bad_value("model.weights", m.weights, f"null or a local .weights.h5 file: {m.backbone} has no "
                                                    f"ImageNet weights")


RULES = [_process_id_in_range, _phases_in_order, _fractions_sum, _cache_holds_the_crop, _augment_mixing,
         _image_size_fits_backbone,
         _freeze_specs_complete, _stage_names, _batchnorm_where_needed, _compare_sets, _data_source_given,
         _weights_exist]


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
