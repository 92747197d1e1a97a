"""Optimizers, learning-rate schedules, per-stage learning rates, weight decay, EMA, accumulation.

One optimizer for the whole run. kfine builds it once over every variable that any phase trains
(``build_optimizer(..., variables=union)``) before the first compile and reuses it in every phase:
Adam/AdamW moments and momentum buffers of a variable that stays trainable carry over from one
phase to the next, as in the PyTorch reference projects (one optimizer over all parameter
groups); a variable unfrozen in a later phase starts with zero moments; the step counter carries
on, so a schedule on the global step runs on smoothly across phases.

Semantics, each chosen to say what its name says (docs/optimizers.md, "Optimizer semantics"):

- Per-variable learning rate: ``update_step`` multiplies the rate by the variable's stage factor
  (``lr_multipliers`` or ``layer_decay``). Scaling gradients would not do it: Adam is invariant
  to gradient scale. The effective step is scaled for SGD, Adam, AdamW and RMSprop alike.
- Weight decay is applied by kfine inside ``update_step`` with the variable's own (multiplied)
  learning rate, in one of two modes. ``decoupled``: ``w -= lr * wd * w`` before the update
  (Keras' weight_decay, PyTorch AdamW). ``l2``: ``g += wd * w`` before the update, after clipping
  (PyTorch Adam/SGD(weight_decay)). In both modes a stage at 0.1x decays at 0.1x (as a PyTorch
  param group's lr scales its decay); a stage at 0 neither moves nor decays. ``no_decay`` skips
  norm gamma/beta and biases (timm's default). The Keras optimizer itself gets no weight_decay.
- ``clipnorm`` clips each variable's gradient, ``global_clipnorm`` all of them together
  (PyTorch's clip_grad_norm_); after accumulation, before decay (Keras' order).
- Momentum exists for sgd and rmsprop only; null means none (both Keras' and PyTorch's default).
- Gradient accumulation is Keras' ``gradient_accumulation_steps``: the update uses the mean of
  ``accumulate_steps`` batch gradients. kfine rounds an epoch up to whole updates
  (train.steps_per_epoch), and the schedule counts updates (``EpochSchedule``).
- EMA is Keras' ``use_ema``: the averages are optimizer variables (so the resume backup, which
  saves ``optimizer.variables``, keeps them). kfine averages a variable in the steps in which it
  trains; a frozen variable's average holds its value (every average starts at the variable's
  value when the optimizer is built). Keras' fit() writes the averages into the model at the end
  of every fit(); kfine calls fit() once per phase, so that is switched off
  (``finalize_variable_values``) and training goes on from the raw weights; validation runs on
  the averages (``keras.callbacks.SwapEMAWeights``), checkpoints are saved with them
  (``ema_weights``), and after the last phase they are written into the model
  (``apply_ema_weights``), which is then evaluated, saved and exported. Under accumulation Keras
  would move the averages every batch; kfine's moves them once per optimizer update. BatchNorm moving statistics are not
  averaged (they are no optimizer variables): the EMA model uses the statistics as training left
  them, which are themselves a moving average over the last ~1/(1 - BN momentum) batches.

Keras internals used (all in the "Keras internals" block below, pinned by the keras version range
in setup.cfg and tested in tests/test_optim.py): the variable list and index an optimizer was
built with, its EMA variables and its batch counter, which Keras exposes to subclasses only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import keras
from keras import ops

from kfine.schema import ConfigError, EmaConfig, OptimizerConfig, ScheduleConfig, TrainConfig


# ----------------------------------------------------------------------------- schedules
@keras.saving.register_keras_serializable(package="kfine")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then constant | cosine | step | exponential decay, by (fractional) epoch.

    Keras calls a schedule with the number of batches the optimizer has seen, which under gradient
    accumulation is ``accumulate_steps`` times the number of updates. The schedule counts updates:
    update ``u`` (the ``u``-th, from 0) gets ``at_update(u)`` whatever ``accumulate_steps`` is.
    ``steps_per_epoch`` is in batches (a multiple of ``accumulate_steps``).
    """

    def __init__(self, kind="constant", learning_rate=1e-3, steps_per_epoch=1, total_epochs=1,
                 warmup_epochs=0.0, min_learning_rate=0.0, step_epochs=5.0, gamma=0.1,
                 accumulate_steps=1):
        self.kind = kind
        self.learning_rate = float(learning_rate)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_epochs = max(1, int(total_epochs))
        self.warmup_epochs = float(warmup_epochs)
        self.min_learning_rate = float(min_learning_rate)
        self.step_epochs = float(step_epochs)
        self.gamma = float(gamma)
        self.accumulate_steps = max(1, int(accumulate_steps))

    def __call__(self, step):
        update = ops.floor_divide(ops.cast(step, "float32"), float(self.accumulate_steps))
        return self.at_update(update)

    def at_update(self, update):
        """The learning rate of optimizer update number ``update`` (0-based)."""
        per_epoch = self.steps_per_epoch / self.accumulate_steps          # updates per epoch
        epoch = ops.cast(update, "float32") / per_epoch                   # fractional epoch
        base, warm = self.learning_rate, self.warmup_epochs
        if self.kind == "cosine":
            span = max(self.total_epochs - warm, 1e-8)
            t = ops.clip((epoch - warm) / span, 0.0, 1.0)
            lr = self.min_learning_rate + 0.5 * (base - self.min_learning_rate) * (1.0 + ops.cos(math.pi * t))
        elif self.kind == "step":   # PyTorch StepLR: x gamma every step_epochs whole epochs
            lr = base * ops.power(self.gamma, ops.floor(ops.floor(epoch + 1e-6) / self.step_epochs))
        elif self.kind == "exponential":   # PyTorch ExponentialLR: x gamma per epoch
            lr = base * ops.power(self.gamma, epoch)
        else:
            lr = base * ops.ones_like(epoch)
        if warm > 0:
            lr = lr * ops.minimum(1.0, (epoch + 1.0 / per_epoch) / warm)
        return lr

    def get_config(self):
        return dict(kind=self.kind, learning_rate=self.learning_rate, steps_per_epoch=self.steps_per_epoch,
                    total_epochs=self.total_epochs, warmup_epochs=self.warmup_epochs,
                    min_learning_rate=self.min_learning_rate, step_epochs=self.step_epochs, gamma=self.gamma,
                    accumulate_steps=self.accumulate_steps)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "name" in config:          # model.keras files saved before the attribute was renamed
            config["kind"] = config.pop("name")
        return cls(**config)


def make_schedule(cfg: ScheduleConfig, steps_per_epoch: int, total_epochs: int,
                  accumulate_steps: int = 1) -> EpochSchedule:
    """``steps_per_epoch`` in batches; the schedule counts updates of ``accumulate_steps`` batches."""
    return EpochSchedule(cfg.name, cfg.learning_rate, steps_per_epoch, total_epochs, cfg.warmup_epochs,
                         cfg.min_learning_rate, cfg.step_epochs, schedule_gamma(cfg), accumulate_steps)


def schedule_gamma(cfg: ScheduleConfig) -> float:
    """``gamma`` as the schedule means it: step defaults to 0.1 (StepLR's); exponential has no
    default (ExponentialLR's neither): 0.1 there would divide the rate by 10 every epoch."""
    if cfg.gamma is not None:
        if cfg.gamma <= 0:
            raise ConfigError(f"train.schedule.gamma must be > 0, got {cfg.gamma}")
        return cfg.gamma
    if cfg.name == "exponential":
        raise ConfigError("train.schedule.gamma is required for the exponential schedule: the factor "
                          "per epoch (e.g. 0.9 = the rate x0.9 every epoch)")
    return 0.1


# ----------------------------------------------------------------------------- Keras internals
# Keras gives an optimizer subclass the variables it was built with, their index and its EMA
# variables only through these attributes (the subclassing example in keras' base_optimizer.py
# uses _get_variable_index too). Everything kfine reads from Keras' private API is here; the one
# private hook it overrides is _Kfine._update_model_variables_moving_average (Keras' EMA step).
def _built_variables(opt) -> list:
    return opt._trainable_variables


def _variable_index(opt, variable) -> int:
    """Index of ``variable`` (a Keras variable, or on TensorFlow the backend variable that
    ``update_step`` receives) in ``_built_variables(opt)``."""
    return opt._get_variable_index(variable)


def _ema_averages(opt) -> list:
    return opt._model_variables_moving_average


def _batches_seen(opt):
    """Batches applied so far (``opt.iterations`` counts updates under gradient accumulation)."""
    return opt._iterations


# ----------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class _Variables:
    """A plain holder: the optimizer's attribute tracker would adopt a bare list of model
    variables as optimizer state."""
    items: tuple


class _Kfine:
    """Mixin over a Keras optimizer: per-variable learning-rate factors, kfine's weight decay, a
    phase's subset of the built variables (JAX), EMA over the variables a phase trains."""

    _lr_mults: tuple | None = None
    _decay: tuple | None = None
    _active: _Variables | None = None

    def __init__(self, *args, weight_decay=None, weight_decay_mode="decoupled", **kwargs):
        super().__init__(*args, **kwargs)          # Keras applies no weight decay itself
        if weight_decay_mode not in ("decoupled", "l2"):
            raise ValueError(f"weight_decay_mode must be decoupled or l2, got {weight_decay_mode!r}")
        self.decay_rate = float(weight_decay or 0.0)
        self.weight_decay_mode = weight_decay_mode

    def set_variable_options(self, lr_multipliers=None, decay=None) -> None:
        """Per built variable, in build order: a learning-rate factor and whether it decays."""
        n = len(_built_variables(self))
        for what, values in (("learning-rate multiplier", lr_multipliers), ("decay flag", decay)):
            if values is not None and len(values) != n:
                raise ValueError(f"one {what} per built variable is needed ({len(values)} for {n})")
        self._lr_mults = None if lr_multipliers is None else tuple(float(m) for m in lr_multipliers)
        self._decay = None if decay is None else tuple(bool(d) for d in decay)

    def set_active_variables(self, variables) -> None:
        """The variables the next compiled train step updates: a subset of those built over (the
        phase's trainable ones). JAX's trainer hands ``stateless_apply`` only these; the EMA
        moves only for these."""
        self._active = _Variables(tuple(variables))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        built = _built_variables(self)
        active = list(self._active.items) if self._active is not None else built
        if len(active) == len(built):
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        if len(trainable_variables) != len(active):
            raise ValueError(f"{len(trainable_variables)} variables given, {len(active)} active: "
                             "call set_active_variables after changing what is trainable")
        mapping = list(zip(active, trainable_variables)) + list(zip(self.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.apply(grads, active)
        return ([scope.get_current_value(v) for v in active],
                [scope.get_current_value(v) for v in self.variables])

    def update_step(self, gradient, variable, learning_rate):
        i = _variable_index(self, variable)
        if self._lr_mults is not None and self._lr_mults[i] != 1.0:
            learning_rate = ops.multiply(learning_rate, self._lr_mults[i])
        if self.decay_rate and (self._decay is None or self._decay[i]):
            wd = ops.cast(self.decay_rate, variable.dtype)
            if self.weight_decay_mode == "l2":          # decay as part of the gradient
                gradient = ops.add(ops.cast(gradient, variable.dtype), ops.multiply(variable, wd))
            else:                                       # decoupled: shrink, then the update
                lr = ops.cast(learning_rate, variable.dtype)
                self.assign_sub(variable, ops.multiply(variable, ops.multiply(wd, lr)))
        return super().update_step(gradient, variable, learning_rate)

    # --- EMA
    def ema_pairs(self) -> list:
        """(model variable, its average) for every built variable; [] without EMA."""
        if not self.use_ema:
            return []
        return [(v, a) for v, a in zip(_built_variables(self), _ema_averages(self)) if a is not None]

    def reset_ema(self) -> None:
        """Every average := its variable's current value (a copy: on JAX an assigned array is
        shared, and the trainer cannot donate one buffer twice)."""
        for v, a in self.ema_pairs():
            a.assign(ops.copy(v))

    def _update_model_variables_moving_average(self, trainable_variables):
        # Keras' EMA update (first step: the average takes the value), over the variables this
        # phase trains only (the others are constant here, and on JAX not even readable in a
        # step), and under accumulation on update steps only (Keras calls it every batch).
        active = None if self._active is None else {id(v) for v in self._active.items}
        first = ops.equal(self.iterations, 0)
        momentum = ops.where(first, 0.0, self.ema_momentum)
        if self.gradient_accumulation_steps:
            update = ops.equal((_batches_seen(self) + 1) % self.gradient_accumulation_steps, 0)
            momentum = ops.where(ops.logical_or(first, update), momentum, 1.0)
        for var, average in self.ema_pairs():
            if active is None or id(var) in active:
                m = ops.cast(momentum, var.dtype)
                average.assign(ops.add(ops.multiply(m, average), ops.multiply(1 - m, var)))

    def finalize_variable_values(self, var_list):
        """Called by Keras at the end of every fit(), i.e. every kfine phase: kfine keeps training
        the raw weights across phases and writes the averages in once (``apply_ema_weights``)."""

    def apply_ema_weights(self) -> None:
        """Write the averages into the model variables (copies, see ``reset_ema``)."""
        for v, a in self.ema_pairs():
            v.assign(ops.copy(a))

    def get_config(self):
        return {**super().get_config(), "weight_decay": self.decay_rate or None,
                "weight_decay_mode": self.weight_decay_mode}


def _register(base, name=None):
    cls = type(name or base.__name__, (_Kfine, base), {"__module__": __name__})
    return keras.saving.register_keras_serializable(package="kfine")(cls)


OPTIMIZERS = {
    "sgd": _register(keras.optimizers.SGD),
    "adam": _register(keras.optimizers.Adam),
    "adamw": _register(keras.optimizers.Adam, "AdamW"),   # Adam + kfine's decoupled decay
    "rmsprop": _register(keras.optimizers.RMSprop),
}
_MOMENTUM = {"sgd", "rmsprop"}


def check_optimizer(cfg: OptimizerConfig) -> None:
    """Settings that cannot mean what they say for ``cfg.name``; the message names the key."""
    if cfg.momentum is not None and cfg.name not in _MOMENTUM:
        raise ConfigError(f"train.optimizer.momentum: {cfg.name} has no momentum (only "
                          f"{sorted(_MOMENTUM)} do); remove it")
    if cfg.momentum is not None and not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"train.optimizer.momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.nesterov and (cfg.name != "sgd" or not cfg.momentum):
        raise ConfigError("train.optimizer.nesterov needs name: sgd and a momentum > 0")
    if cfg.name == "adamw" and cfg.weight_decay_mode != "decoupled":
        raise ConfigError("train.optimizer.weight_decay_mode: adamw is Adam with decoupled decay; for "
                          "PyTorch's Adam(weight_decay) use name: adam, weight_decay_mode: l2")
    if cfg.weight_decay < 0:
        raise ConfigError(f"train.optimizer.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.clipnorm is not None and cfg.global_clipnorm is not None:
        raise ConfigError("train.optimizer: give clipnorm (per variable) or global_clipnorm (all "
                          "gradients together, PyTorch's clip_grad_norm_), not both")


def check_train(cfg: TrainConfig) -> None:
    """The optimizer-side checks of a train section (before any data is read)."""
    check_optimizer(cfg.optimizer)
    schedule_gamma(cfg.schedule)
    if cfg.layer_decay is not None and cfg.lr_multipliers:   # single values: kfine.checks.CHECKS
        raise ConfigError("train.layer_decay and train.lr_multipliers both set: layer_decay is the "
                          "shorthand for a full lr_multipliers table; give one of them")


def build_optimizer(cfg: OptimizerConfig, learning_rate, variables=None, multipliers=None, decay=None,
                    ema: EmaConfig | None = None, accumulate_steps: int = 1):
    """The configured optimizer, built over ``variables`` (every variable any phase trains), with
    a learning-rate factor and a decay flag per variable (``None``: 1.0 / decay all)."""
    check_optimizer(cfg)
    kwargs = dict(learning_rate=learning_rate, clipnorm=cfg.clipnorm, global_clipnorm=cfg.global_clipnorm,
                  weight_decay=cfg.weight_decay or None, weight_decay_mode=cfg.weight_decay_mode)
    if cfg.name in _MOMENTUM:
        kwargs["momentum"] = cfg.momentum or 0.0
    if cfg.name == "sgd":
        kwargs["nesterov"] = cfg.nesterov
    if accumulate_steps > 1:
        kwargs["gradient_accumulation_steps"] = int(accumulate_steps)
    if ema is not None and ema.enabled:
        kwargs.update(use_ema=True, ema_momentum=ema.momentum)
    opt = OPTIMIZERS[cfg.name](name=cfg.name, **kwargs)   # a fixed name: stable variable paths
    if variables is not None:
        opt.build(variables)
        opt.set_variable_options(multipliers, decay)
        opt.reset_ema()
    return opt


def inner_optimizer(optimizer):
    """The optimizer that holds the state (unwraps Keras' LossScaleOptimizer)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


@contextlib.contextmanager
def ema_weights(model, optimizer=None):
    """Inside the block the model holds its EMA weights (e.g. to save a checkpoint), after it the
    raw ones again. Does nothing when the model's optimizer (or ``optimizer``, for a model not
    compiled yet) has no EMA. Host copies both ways:
    in a run of several processes only the chief saves, and a host value needs no computation
    on the others (kfine.distribute)."""
    opt = inner_optimizer(optimizer if optimizer is not None else getattr(model, "optimizer", None))
    pairs = opt.ema_pairs() if hasattr(opt, "ema_pairs") else []
    raw = [ops.convert_to_numpy(v) for v, _ in pairs]
    for v, a in pairs:
        v.assign(ops.convert_to_numpy(a))
    try:
        yield
    finally:
        for (v, _), value in zip(pairs, raw):
            v.assign(value)


def apply_ema_weights(optimizer) -> bool:
    """Write the EMA weights into the model variables for good (after the last phase); True if
    ``optimizer`` keeps an EMA."""
    opt = inner_optimizer(optimizer)
    if not getattr(opt, "use_ema", False) or not hasattr(opt, "apply_ema_weights"):
        return False
    opt.apply_ema_weights()
    return True


# ----------------------------------------------------------------------------- per-variable options
def stage_multipliers(model, backbone_name: str, lr_multipliers: dict[str, float],
                      layer_decay: float | None = None) -> dict[str, float]:
    """The learning-rate factor of every backbone stage and of ``head``.

    ``lr_multipliers`` keys are stage names (conv2..conv5, layer1..layer4, block3, ...), ``head``
    (or ``fc``), or ``backbone`` (every stage not named on its own); unnamed stages get 1.0.
    ``layer_decay`` d instead gives the head 1, the last stage d, the one before d**2, ... (timm's
    --layer-decay, by stage); giving both is an error (check_train).
    """
    from kfine.freeze import backbone_stages, resolve_stage

    stages = backbone_stages(model, backbone_name)
    if layer_decay is not None:
        if lr_multipliers:
            raise ConfigError("train.layer_decay and train.lr_multipliers both set; give one of them")
        return {**{s: float(layer_decay) ** (len(stages) - i) for i, s in enumerate(stages)}, "head": 1.0}
    table = {s: float(lr_multipliers.get("backbone", 1.0)) for s in stages}
    table["head"] = 1.0
    for key, value in lr_multipliers.items():
        if value < 0:
            raise ConfigError(f"train.lr_multipliers.{key} must be >= 0, got {value}")
        if key in ("head", "fc"):
            table["head"] = float(value)
        elif key != "backbone":
            table[resolve_stage(key, stages)] = float(value)
    return table


def variable_multipliers(model, backbone_name: str, lr_multipliers: dict[str, float], variables,
                         layer_decay: float | None = None) -> list[float]:
    """The learning-rate factor of each variable: its stage's (see ``stage_multipliers``)."""
    from kfine.model import get_backbone, layer_stages

    if not lr_multipliers and layer_decay is None:
        return [1.0] * len(variables)
    table = stage_multipliers(model, backbone_name, lr_multipliers, layer_decay)
    backbone = get_backbone(model)
    stage = layer_stages(backbone, backbone_name)
    owner = {id(w): table[stage[layer.name]] for layer in backbone.layers for w in layer.weights}
    return [owner.get(id(v), table["head"]) for v in variables]


_NORMS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization)

# no_decay entries: which (layer, variable) pairs a name excludes from weight decay
NO_DECAY = {
    "bn": lambda layer, v: isinstance(layer, _NORMS) and v.name in ("gamma", "beta"),
    "bias": lambda layer, v: v.name == "bias",
}


def _owners(model) -> dict:
    """id(variable) -> the innermost layer (not a nested model) that holds it."""
    owner = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            owner.update(_owners(layer))
        else:
            owner.update({id(w): layer for w in layer.weights})
    return owner


def decay_flags(model, no_decay, variables) -> list[bool]:
    """Whether each variable decays: not when a ``no_decay`` entry (NO_DECAY) matches it."""
    unknown = sorted(set(no_decay) - set(NO_DECAY))
    if unknown:
        raise ConfigError(f"train.optimizer.no_decay: unknown {unknown[0]!r}; choose from {sorted(NO_DECAY)}")
    owner = _owners(model)
    return [not any(NO_DECAY[k](owner.get(id(v)), v) for k in no_decay) for v in variables]


# ----------------------------------------------------------------------------- loss and metrics
# Labels come in two kinds: sparse class indices (B,) or (B, 1) from every split, and soft labels
# (B, C) from MixUp/CutMix (kfine.augment.batch_ops) on training batches only. The loss and the
# accuracy metrics decide by the labels' static shape when the step is traced: rank 2 with C
# columns is soft, anything else sparse. Keras traces the train and the test step separately, so
# soft training batches and sparse validation batches meet in one fit.
def _soft(y_true, num_classes: int) -> bool:
    return len(y_true.shape) == 2 and y_true.shape[-1] == num_classes and num_classes > 1


def _as_probabilities(y_true, num_classes: int):
    if _soft(y_true, num_classes):
        return ops.cast(y_true, "float32")
    return ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), num_classes)


@keras.saving.register_keras_serializable(package="kfine")
class SmoothedSparseCE(keras.losses.Loss):
    """Cross-entropy of predicted logits (``from_logits``; probabilities for a model saved by an
    older kfine, whose compiled loss has no ``from_logits``) against sparse or soft labels, with
    label smoothing: the target is (1 - s) * y + s / C, so smoothing composes with MixUp/CutMix."""

    def __init__(self, label_smoothing=0.0, num_classes=2, from_logits=False, name="smoothed_sparse_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing, self.num_classes = float(label_smoothing), int(num_classes)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        y = _as_probabilities(y_true, self.num_classes)
        return keras.losses.categorical_crossentropy(y, y_pred, from_logits=self.from_logits,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {"label_smoothing": self.label_smoothing, "num_classes": self.num_classes,
                "from_logits": self.from_logits, "name": self.name}


def make_loss(label_smoothing: float, num_classes: int, from_logits: bool = True):
    """The training loss: sparse or soft labels (see above), optional label smoothing, on the
    model's logits (``from_logits=False`` for a model that ends in a softmax: ``outputs_logits``)."""
    return SmoothedSparseCE(label_smoothing, num_classes, from_logits)


@keras.saving.register_keras_serializable(package="kfine")
class TopKAccuracy(keras.metrics.MeanMetricWrapper):
    """Top-k accuracy against sparse or soft labels (the soft label's largest class counts)."""

    def __init__(self, k=1, num_classes=2, name="accuracy", dtype=None):
        super().__init__(self._hits, name=name, dtype=dtype)
        self.k, self.num_classes = int(k), int(num_classes)

    def _hits(self, y_true, y_pred):
        if _soft(y_true, self.num_classes):
            y_true = ops.argmax(y_true, axis=-1)
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        if self.k == 1:
            return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)
        return keras.metrics.sparse_top_k_categorical_accuracy(y_true, y_pred, k=self.k)

    def get_config(self):
        return {"k": self.k, "num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}


def make_metrics(num_classes: int) -> list:
    """accuracy, and top5 with more than 5 classes (with 5 or fewer it is always 1); both take
    sparse or soft labels."""
    metrics = [TopKAccuracy(1, num_classes, name="accuracy")]
    if num_classes > 5:
        metrics.append(TopKAccuracy(5, num_classes, name="top5"))
    return metrics
