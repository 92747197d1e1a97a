"""Freezing strategies: which layers train in a phase.

A strategy is a function ``(model, backbone_name, spec) -> None`` that sets ``layer.trainable``
on the backbone's layers. The head (layers ``head_*``) always trains: it is new and random.
Keras honours a change of ``trainable`` only at the next ``compile()``, so a change of strategy is
a new phase (kfine.train.fit_phases), never a flag flipped inside ``fit``.

BatchNorm has two parts that a phase controls separately. gamma/beta are weights: they train
where the strategy trains the layer. The moving statistics follow ``phase.bn`` (``BN_MODES``):

    train   statistics move where the strategy trains the BN layer, stay put where it freezes it
            (Keras' own semantics; the default)
    stats   statistics move in every BN layer, frozen ones too, while frozen gamma/beta stay fixed
            (PyTorch's ``model.train()`` over layers with ``requires_grad=False``)
    frozen  statistics never move: every BN layer runs in inference mode, also where gamma/beta
            train (Keras' fine-tuning guide: call the base model with ``training=False``)

Keras 3 normalises with batch statistics and updates the moving mean/variance only when
``training and layer.trainable``, and an optimizer trains the variables whose own ``trainable``
flag is set (``model.trainable_variables`` filters variables, not layers). So ``stats`` makes a
frozen BN layer trainable with ``gamma.trainable = beta.trainable = False``, and ``frozen`` makes
a trained BN layer non-trainable with ``gamma.trainable = beta.trainable = True``. Both are
public Keras attributes; setting ``layer.trainable`` resets its variables' flags, so the BN mode is
applied last, after the strategy (``apply_freeze`` does both).

What a "layer" is for ``fraction``: a backbone layer that carries weights (for ResNet50: 53 Conv2D +
53 BatchNormalization = 106 layers), counted in the backbone's topological order; the first
``round(fraction * n)`` are frozen. Weight-less layers (activations, pooling, add) have nothing to
freeze and are not counted.
"""
from __future__ import annotations

import re

import keras

from kfine.model import get_backbone, head_layers, layer_stages
from kfine.registry import BACKBONES, needs_batchnorm, norm_note, stage_aliases, stage_names
from kfine.registry import resolve_stage as _alias_of
from kfine.schema import FreezeConfig


class FreezeError(ValueError):
    """A freeze spec that cannot be applied; the message names it and the choices."""


def _is_bn(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def _weight_layers(backbone) -> list:
    return [l for l in backbone.layers if l.weights]


def backbone_stages(model: keras.Model, backbone_name: str) -> list[str]:
    """The backbone's stages in order (e.g. conv1..conv5 for ResNet): kfine.registry's static
    table (for scratch_cnn, one stage per conv block of ``model``)."""
    if BACKBONES[backbone_name]["stages"] is not None:
        return list(BACKBONES[backbone_name]["stages"])
    return list(stage_names(backbone_name, sum(isinstance(l, keras.layers.Conv2D) for l in get_backbone(model).layers)))


def resolve_stage(name: str, stages: list[str]) -> str:
    s = _alias_of(name, stages)
    if s is None:
        raise FreezeError(f"unknown stage {name!r}; this backbone has stages {stages} "
                          f"(aliases: {stage_aliases(stages)})")
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
    stage = layer_stages(get_backbone(model), backbone_name)
    for layer in get_backbone(model).layers:
        layer.trainable = stage[layer.name] in trainable


def _regex(model, backbone_name, spec):
    if not spec.pattern:
        raise FreezeError("freeze.pattern is required for strategy 'regex' (e.g. 'conv5_|_bn$')")
    try:
        rx = re.compile(spec.pattern)
    except re.error as e:
        raise FreezeError(f"freeze.pattern {spec.pattern!r} is not a valid regex: {e}") from e
    for layer in get_backbone(model).layers:
        layer.trainable = bool(rx.search(layer.name)) or (spec.train_bn and _is_bn(layer))


def lora_targets(model, backbone_name: str, stages=()) -> list:
    """The backbone's Conv2D / Dense layers in ``stages`` (every stage when empty)."""
    from kfine.lora import ADAPTED
    backbone = get_backbone(model)
    if stages:
        known = backbone_stages(model, backbone_name)
        wanted = {resolve_stage(s, known) for s in stages}
    stage = layer_stages(backbone, backbone_name)
    layers = [l for l in backbone.layers if isinstance(l, ADAPTED)]
    return [l for l in layers if not stages or stage[l.name] in wanted]


def _lora(model, backbone_name, spec):
    from kfine.lora import enable_lora, train_adapters_only
    targets = {id(l) for l in enable_lora(lora_targets(model, backbone_name, spec.lora_stages), spec.lora_rank,
                                          spec.lora_alpha, spec.lora_stages)}
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


def _bn_train(bn_layers):
    pass                        # the strategy decided: statistics move where the layer trains


def _bn_stats(bn_layers):
    for layer in bn_layers:
        if not layer.trainable:
            layer.trainable = True              # batch statistics, moving ones updated ...
            for w in _affine(layer):
                w.trainable = False             # ... while gamma/beta stay fixed


def _bn_frozen(bn_layers):
    for layer in bn_layers:
        if layer.trainable:
            layer.trainable = False             # inference mode: statistics fixed ...
            for w in _affine(layer):
                w.trainable = True              # ... while gamma/beta train as the strategy says


def _affine(layer) -> list:
    return [w for w in (layer.gamma, layer.beta) if w is not None]


BN_MODES = {"train": _bn_train, "stats": _bn_stats, "frozen": _bn_frozen}


def apply_freeze(model: keras.Model, backbone_name: str, spec: FreezeConfig, bn: str = "train") -> None:
    """Set ``trainable`` on every layer for ``spec``, then the BatchNorm mode ``bn`` (BN_MODES).
    Takes effect at the next ``compile()``."""
    if spec.strategy not in STRATEGIES:
        raise FreezeError(f"unknown freeze strategy {spec.strategy!r}; choose one of {sorted(STRATEGIES)}")
    if bn not in BN_MODES:
        raise FreezeError(f"unknown BatchNorm mode bn: {bn!r}; choose one of {sorted(BN_MODES)}")
    if backbone_name not in BACKBONES:
        raise FreezeError(f"unknown backbone {backbone_name!r}")
    backbone = get_backbone(model)
    needs = needs_batchnorm(spec.strategy, spec.train_bn, bn)
    if needs and not any(_is_bn(l) for l in backbone.layers):
        raise FreezeError(f"{needs} needs BatchNorm layers; {backbone_name} has none{norm_note(backbone_name)}: "
                          f"choose a strategy without BatchNorm (backbone, stages, fraction, regex, lora, none), bn: train")
    backbone.trainable = True       # reset the container, then decide layer by layer
    STRATEGIES[spec.strategy](model, backbone_name, spec)
    for layer in head_layers(model):
        layer.trainable = True
    bn_layers = [l for l in backbone.layers if _is_bn(l)]
    for layer in bn_layers:
        # gamma/beta back in step with their layer: on TensorFlow `layer.trainable = x` is skipped
        # when it already is x (KerasAutoTrackable), so a previous phase's BN mode would linger
        for w in _affine(layer):
            w.trainable = layer.trainable
    BN_MODES[bn](bn_layers)


_STOCHASTIC = (keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
               keras.layers.GaussianDropout, keras.layers.AlphaDropout)


def features_frozen(model: keras.Model, phase) -> tuple[bool, str]:
    """Whether the backbone's output in training is a pure function of the image in ``phase``
    (a kfine.schema.PhaseConfig already applied with ``apply_freeze``), so its features can be
    computed once and cached; and why (not). True only when no backbone variable trains, every
    BatchNorm runs in inference mode (never under ``bn: stats``) and no Dropout-like layer inside
    the backbone is active in training (EfficientNet's stochastic depth)."""
    backbone = get_backbone(model)
    ids = {id(w) for w in backbone.weights}
    training = [v.path for v in model.trainable_variables if id(v) in ids]
    if training:
        return False, f"{len(training)} backbone variables train in this phase (e.g. {training[0]})"
    moving = [l.name for l in backbone.layers if _is_bn(l) and l.trainable]
    if moving:
        why = " (bn: stats)" if getattr(phase, "bn", None) == "stats" else ""
        return False, f"BatchNorm statistics follow the batches in {len(moving)} layers{why}"
    noisy = [l.name for l in backbone.layers if isinstance(l, _STOCHASTIC) and getattr(l, "rate", 1.0) > 0]
    if noisy:
        return False, f"{len(noisy)} Dropout-like backbone layers are active in training (e.g. {noisy[0]})"
    return True, "no backbone variable trains and every BatchNorm runs in inference mode"


def trainable_summary(model: keras.Model, backbone_name: str, lr_multipliers: dict | None = None) -> list[dict]:
    """Per stage (and the head): trainable and frozen parameter counts, BN layers in training mode
    (their statistics follow the batches), and with ``lr_multipliers`` (stage -> factor, as from
    kfine.optim.stage_multipliers) each stage's learning-rate factor."""
    from kfine.model import param_count
    rows: dict[str, dict] = {}
    trains = {id(v) for v in model.trainable_variables}

    def add(stage, layer):
        r = rows.setdefault(stage, {"stage": stage, "trainable": 0, "frozen": 0, "bn_training": 0})
        # BN moving statistics are state, not parameters: counted in neither column
        params = [w for w in layer.weights if not (_is_bn(layer) and w.name.startswith("moving_"))]
        n = sum(param_count(w) for w in params if id(w) in trains)
        r["trainable"] += n
        r["frozen"] += sum(param_count(w) for w in params) - n
        r["bn_training"] += int(_is_bn(layer) and layer.trainable)
        if lr_multipliers is not None:
            r["lr_mult"] = lr_multipliers.get(stage, 1.0)

    stages = layer_stages(get_backbone(model), backbone_name)
    for layer in _weight_layers(get_backbone(model)):
        add(stages[layer.name], layer)
    for layer in head_layers(model):
        if layer.weights:
            add("head", layer)
    return list(rows.values())


def format_summary(rows: list[dict]) -> str:
    mult = any("lr_mult" in r for r in rows)
    lines = [f"{'stage':<10}{'trainable':>12}{'frozen':>12}  BN training" + ("  lr x" if mult else "")]
    for r in rows:
        extra = f"  {r['lr_mult']:g}" if "lr_mult" in r else ""
        lines.append(f"{r['stage']:<10}{r['trainable']:>12,}{r['frozen']:>12,}  {r['bn_training']:>11}{extra}")
    t = sum(r["trainable"] for r in rows)
    f = sum(r["frozen"] for r in rows)
    lines.append(f"{'total':<10}{t:>12,}{f:>12,}")
    return "\n".join(lines)
