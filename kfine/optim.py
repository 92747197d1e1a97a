"""Optimizers, learning-rate schedules and per-stage learning-rate multipliers.

Schedules are functions of the optimizer's global step (``optimizer.iterations``), so a schedule
runs on smoothly across phases: the step counter is never reset.

Optimizer state across phases: kfine builds ONE optimizer over every variable that any phase
trains (``build_optimizer(..., variables=union)``) before the first compile and reuses it in every
phase. Adam/AdamW moments and momentum buffers of a variable that stays trainable carry over from
one phase to the next, as in the PyTorch reference projects (one optimizer over all parameter
groups); a variable unfrozen in a later phase starts with zero moments; ``iterations`` carries on.

Per-stage learning rates: Adam is invariant to the scale of the gradient, so scaling gradients is
not a learning rate. kfine multiplies the learning rate inside ``update_step`` for each variable,
which scales the effective step for SGD, Adam, AdamW and RMSprop alike. This leans on one Keras
internal (``optimizer._get_variable_index``), kept here and pinned by the keras version range in
setup.cfg, and tested by measuring the step. Decoupled weight decay is applied by Keras with the
base learning rate (not multiplied).
"""
from __future__ import annotations

import math

import keras
from keras import ops

from kfine.config import OptimizerConfig, ScheduleConfig


# ----------------------------------------------------------------------------- schedules
@keras.saving.register_keras_serializable(package="kfine")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then constant | cosine | step | exponential decay, on the global step."""

    def __init__(self, name="constant", learning_rate=1e-3, steps_per_epoch=1, total_epochs=1,
                 warmup_epochs=0.0, min_learning_rate=0.0, step_epochs=5.0, gamma=0.1):
        self.name = name
        self.learning_rate = float(learning_rate)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_epochs = max(1, int(total_epochs))
        self.warmup_epochs = float(warmup_epochs)
        self.min_learning_rate = float(min_learning_rate)
        self.step_epochs = float(step_epochs)
        self.gamma = float(gamma)

    def __call__(self, step):
        epoch = ops.cast(step, "float32") / float(self.steps_per_epoch)   # fractional epoch
        base, warm = self.learning_rate, self.warmup_epochs
        if self.name == "cosine":
            span = max(self.total_epochs - warm, 1e-8)
            t = ops.clip((epoch - warm) / span, 0.0, 1.0)
            lr = self.min_learning_rate + 0.5 * (base - self.min_learning_rate) * (1.0 + ops.cos(math.pi * t))
        elif self.name == "step":   # PyTorch StepLR: x gamma every step_epochs whole epochs
            lr = base * ops.power(self.gamma, ops.floor(ops.floor(epoch + 1e-6) / self.step_epochs))
        elif self.name == "exponential":
            lr = base * ops.power(self.gamma, epoch)
        else:
            lr = base * ops.ones_like(epoch)
        if warm > 0:
            lr = lr * ops.minimum(1.0, (epoch + 1.0 / self.steps_per_epoch) / warm)
        return lr

    def get_config(self):
        return dict(name=self.name, learning_rate=self.learning_rate, steps_per_epoch=self.steps_per_epoch,
                    total_epochs=self.total_epochs, warmup_epochs=self.warmup_epochs,
                    min_learning_rate=self.min_learning_rate, step_epochs=self.step_epochs, gamma=self.gamma)


def make_schedule(cfg: ScheduleConfig, steps_per_epoch: int, total_epochs: int) -> EpochSchedule:
    return EpochSchedule(cfg.name, cfg.learning_rate, steps_per_epoch, total_epochs, cfg.warmup_epochs,
                         cfg.min_learning_rate, cfg.step_epochs, cfg.gamma)


# ----------------------------------------------------------------------------- optimizers
class _LRMultipliers:
    """Mixin: ``update_step`` with the learning rate multiplied per variable."""

    _lr_mults: list | None = None
    _active: list | None = None

    def set_lr_multipliers(self, multipliers: list[float]) -> None:
        """One factor per variable, in the order the optimizer was built with."""
        if len(multipliers) != len(self._trainable_variables):
            raise ValueError("one multiplier per built variable is needed")
        self._lr_mults = [float(m) for m in multipliers]

    def set_active_variables(self, variables) -> None:
        """The variables the next compiled train step updates: a subset of those built over
        (the phase's trainable ones). Needed by JAX, whose trainer hands ``stateless_apply`` the
        model's current trainable variables only."""
        # plain attribute: Keras would otherwise track the model's variables as optimizer variables
        object.__setattr__(self, "_active", list(variables))

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        active = self._active
        if active is None or len(active) == len(self._trainable_variables):
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
        if self._lr_mults is not None:
            m = self._lr_mults[self._get_variable_index(variable)]
            if m != 1.0:
                learning_rate = ops.multiply(learning_rate, m)
        return super().update_step(gradient, variable, learning_rate)


def _register(base):
    cls = type(base.__name__, (_LRMultipliers, base), {"__module__": __name__})
    return keras.saving.register_keras_serializable(package="kfine")(cls)


OPTIMIZERS = {
    "sgd": _register(keras.optimizers.SGD),
    "adam": _register(keras.optimizers.Adam),
    "adamw": _register(keras.optimizers.AdamW),
    "rmsprop": _register(keras.optimizers.RMSprop),
}


def build_optimizer(cfg: OptimizerConfig, learning_rate, variables=None, multipliers=None):
    """The configured optimizer, built over ``variables`` (every variable any phase trains)."""
    kwargs = dict(learning_rate=learning_rate, clipnorm=cfg.clipnorm)
    if cfg.name == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        kwargs.update(momentum=cfg.momentum)
    if cfg.weight_decay or cfg.name == "adamw":
        kwargs.update(weight_decay=cfg.weight_decay)
    opt = OPTIMIZERS[cfg.name](**kwargs)
    if variables is not None:
        opt.build(variables)
        if multipliers is not None:
            opt.set_lr_multipliers(multipliers)
    return opt


def variable_multipliers(model, backbone_name: str, lr_multipliers: dict[str, float], variables) -> list[float]:
    """The learning-rate factor of each variable: its stage's entry in ``lr_multipliers``.

    Keys are stage names (conv2..conv5, layer1..layer4, block3, ...), ``head``, or ``backbone``
    (every backbone stage not named on its own). Unnamed stages get 1.0.
    """
    from kfine.freeze import backbone_stages, resolve_stage
    from kfine.model import get_backbone, stage_of

    if not lr_multipliers:
        return [1.0] * len(variables)
    stages = backbone_stages(model, backbone_name)
    table = {}
    for key, value in lr_multipliers.items():
        if value < 0:
            raise ValueError(f"train.lr_multipliers.{key} must be >= 0, got {value}")
        if key in ("head", "fc"):
            table["head"] = value
        elif key != "backbone":
            table[resolve_stage(key, stages)] = value
    default_backbone = lr_multipliers.get("backbone", 1.0)
    owner = {}
    for layer in get_backbone(model).layers:
        for w in layer.weights:
            owner[id(w)] = table.get(stage_of(backbone_name, layer.name), default_backbone)
    return [owner.get(id(v), table.get("head", 1.0)) for v in variables]


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
    """Cross-entropy of predicted probabilities against sparse or soft labels, with label
    smoothing: the target is (1 - s) * y + s / C, so smoothing composes with MixUp/CutMix."""

    def __init__(self, label_smoothing=0.0, num_classes=2, name="smoothed_sparse_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing, self.num_classes = float(label_smoothing), int(num_classes)

    def call(self, y_true, y_pred):
        y = _as_probabilities(y_true, self.num_classes)
        return keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {"label_smoothing": self.label_smoothing, "num_classes": self.num_classes, "name": self.name}


def make_loss(label_smoothing: float, num_classes: int):
    """The training loss: sparse or soft labels (see above), optional label smoothing."""
    return SmoothedSparseCE(label_smoothing, num_classes)


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
    """accuracy, and top5 with at least 5 classes; both take sparse or soft labels."""
    metrics = [TopKAccuracy(1, num_classes, name="accuracy")]
    if num_classes >= 5:
        metrics.append(TopKAccuracy(5, num_classes, name="top5"))
    return metrics
