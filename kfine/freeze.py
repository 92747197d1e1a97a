"""Freezing strategies: which layers train in a phase.

A strategy is a function ``(model, backbone_name, spec) -> None`` that sets ``layer.trainable``
on the backbone's layers. The head (layers ``head_*``) always trains: it is new and random.
Keras honours a change of ``trainable`` only at the next ``compile()``, so a change of strategy is
a new phase (kfine.train.fit_phases), never a flag flipped inside ``fit``.

BatchNorm: Keras 3 normalises with batch statistics and updates the moving mean/variance only when
``training and layer.trainable``. A frozen BN layer therefore runs in inference mode (its moving
statistics stay put: no "drift while frozen"); a trainable one (``bn_and_head``) learns gamma/beta
and updates its statistics.

What a "layer" is for ``fraction``: a backbone layer that carries weights (for ResNet50: 53 Conv2D +
53 BatchNormalization = 106 layers), counted in the backbone's topological order; the first
``round(fraction * n)`` are frozen. Weight-less layers (activations, pooling, add) have nothing to
freeze and are not counted.
"""
from __future__ import annotations

import re

import keras

from kfine.config import FreezeConfig
from kfine.model import BACKBONES, STAGE_ALIASES, get_backbone, head_layers, stage_of


class FreezeError(ValueError):
    """A freeze spec that cannot be applied; the message names it and the choices."""


def _is_bn(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _weight_layers(backbone) -> list:
    return [l for l in backbone.layers if l.weights]


def backbone_stages(model: keras.Model, backbone_name: str) -> list[str]:
    """The backbone's stages in order of appearance (e.g. conv1..conv5 for ResNet)."""
    seen: list[str] = []
    for layer in _weight_layers(get_backbone(model)):
        s = stage_of(backbone_name, layer.name)
        if s not in seen:
            seen.append(s)
    return seen


def resolve_stage(name: str, stages: list[str]) -> str:
    s = STAGE_ALIASES.get(name, name) if name not in stages else name
    if s not in stages:
        raise FreezeError(f"unknown stage {name!r}; this backbone has stages {stages} "
                          f"(aliases: {sorted(k for k, v in STAGE_ALIASES.items() if v in stages)})")
    return s


def _none(model, backbone_name, spec):
    for layer in get_backbone(model).layers:
        layer.trainable = True


def _backbone(model, backbone_name, spec):
    for layer in get_backbone(model).layers:
        layer.trainable = False


def _fraction(model, backbone_name, spec):
    if not 0.0 <= spec.fraction <= 1.0:
        raise FreezeError(f"freeze.fraction must be in [0, 1], got {spec.fraction}")
    layers = _weight_layers(get_backbone(model))
    k = round(spec.fraction * len(layers))
    frozen = {id(l) for l in layers[:k]}
    for layer in get_backbone(model).layers:
        layer.trainable = id(layer) not in frozen or (spec.train_bn and _is_bn(layer))


def _bn_and_head(model, backbone_name, spec):
    for layer in get_backbone(model).layers:
        layer.trainable = _is_bn(layer)


def _stages(model, backbone_name, spec):
    if not spec.trainable_from:
        raise FreezeError("freeze.trainable_from is required for strategy 'stages' (e.g. conv4 or layer3)")
    stages = backbone_stages(model, backbone_name)
    first = stages.index(resolve_stage(spec.trainable_from, stages))
    trainable = set(stages[first:])
    for layer in get_backbone(model).layers:
        layer.trainable = stage_of(backbone_name, layer.name) in trainable


def _regex(model, backbone_name, spec):
    if not spec.pattern:
        raise FreezeError("freeze.pattern is required for strategy 'regex' (e.g. 'conv5_|_bn$')")
    try:
        rx = re.compile(spec.pattern)
    except re.error as e:
        raise FreezeError(f"freeze.pattern {spec.pattern!r} is not a valid regex: {e}") from e
    for layer in get_backbone(model).layers:
        layer.trainable = bool(rx.search(layer.name)) or (spec.train_bn and _is_bn(layer))


def _lora(model, backbone_name, spec):
    from kfine.lora import enable_lora, train_adapters_only
    targets = {id(l) for l in enable_lora(model, backbone_name, spec.lora_rank, spec.lora_alpha, spec.lora_stages)}
    for layer in get_backbone(model).layers:
        if id(layer) in targets:
            train_adapters_only(layer)
        else:
            layer.trainable = spec.train_bn and _is_bn(layer)


STRATEGIES = {
    "none": _none,                # everything trains
    "backbone": _backbone,        # head only (freeze_last)
    "fraction": _fraction,        # first k of the backbone's weight layers frozen (freeze_k_percent)
    "bn_and_head": _bn_and_head,  # only BatchNorm + head train (freeze_except_bn_and_fc)
    "stages": _stages,            # stages from trainable_from on train (freeze up to a block)
    "regex": _regex,              # backbone layers whose name matches pattern train
    "lora": _lora,                # low-rank adapters on Conv2D/Dense kernels train (kfine.lora)
}


def apply_freeze(model: keras.Model, backbone_name: str, spec: FreezeConfig) -> None:
    """Set ``trainable`` on every layer for ``spec``. Takes effect at the next ``compile()``."""
    if spec.strategy not in STRATEGIES:
        raise FreezeError(f"unknown freeze strategy {spec.strategy!r}; choose one of {sorted(STRATEGIES)}")
    if backbone_name not in BACKBONES:
        raise FreezeError(f"unknown backbone {backbone_name!r}")
    backbone = get_backbone(model)
    backbone.trainable = True       # reset the container, then decide layer by layer
    STRATEGIES[spec.strategy](model, backbone_name, spec)
    for layer in head_layers(model):
        layer.trainable = True


def backbone_frozen(model: keras.Model) -> bool:
    """True when no backbone weight trains: its features can then be computed once and cached."""
    return not any(l.trainable for l in _weight_layers(get_backbone(model)))


def _size(w) -> int:
    n = 1
    for d in w.shape:
        n *= int(d)
    return n


def trainable_summary(model: keras.Model, backbone_name: str) -> list[dict]:
    """Per stage (and the head): trainable and frozen parameter counts, and BN layers training."""
    rows: dict[str, dict] = {}

    def add(stage, layer):
        r = rows.setdefault(stage, {"stage": stage, "trainable": 0, "frozen": 0, "bn_training": 0})
        n = sum(_size(w) for w in layer.trainable_weights)
        # Keras sets variable.trainable from the layer, so count parameters by name: BN moving
        # statistics are state, not parameters.
        total = sum(_size(w) for w in layer.weights if not w.name.startswith("moving_"))
        r["trainable"] += n
        r["frozen"] += total - n
        r["bn_training"] += int(_is_bn(layer) and layer.trainable)

    for layer in _weight_layers(get_backbone(model)):
        add(stage_of(backbone_name, layer.name), layer)
    for layer in head_layers(model):
        if layer.weights:
            add("head", layer)
    return list(rows.values())


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<10}{'trainable':>12}{'frozen':>12}  BN training"]
    for r in rows:
        lines.append(f"{r['stage']:<10}{r['trainable']:>12,}{r['frozen']:>12,}  {r['bn_training']}")
    t = sum(r["trainable"] for r in rows)
    f = sum(r["frozen"] for r in rows)
    lines.append(f"{'total':<10}{t:>12,}{f:>12,}")
    return "\n".join(lines)
