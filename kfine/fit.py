"""What each Keras fit of a run is given, and the phases' epoch spans.

    phase_spans, phase_at      the epochs of each phase; where a run goes on after early
    epoch_after_stop           stopping (the next phase, or the end) and how a phase ended
    phase_end
    build_training             model, optimizer (built once over every variable any phase
                               trains: trainable_union) and learning-rate schedule
    setup_backend              the seed and train.precision's dtype policy
    compile_model              a phase's compile (Keras reads ``trainable`` at compile); its
    execution_steps            train steps per compiled call
    steps_per_epoch            batches per epoch; whether the last partial batch is dropped
    drops_remainder
    class_weights              train.class_weight: balanced

kfine.train.fit_phases runs the phases in order with these; kfine.tune and kfine.lr_find build
and compile their models with them too.
"""
from __future__ import annotations

import math

from kfine.checks import check_phases
from kfine.distribute import active, scaled_schedule
from kfine.schema import Config, ConfigError


# ----------------------------------------------------------------------------- phases
def phase_spans(cfg: Config) -> list[tuple[int, int]]:
    """(first epoch, end epoch exclusive) of each phase; checks the phase list."""
    check_phases(cfg.train.phases, cfg.train.epochs)
    starts, epochs = [p.start_epoch for p in cfg.train.phases], cfg.train.epochs
    ends = starts[1:] + [epochs]
    return list(zip(starts, ends))


def phase_at(spans: list[tuple[int, int]], epoch: int) -> int:
    for i, (a, b) in enumerate(spans):
        if a <= epoch < b:
            return i
    return len(spans) - 1


def epoch_after_stop(cfg: Config, spans: list[tuple[int, int]], epoch: int) -> int:
    """Where a run goes on after early stopping at ``epoch``: the next phase's first epoch
    (``train.early_stopping.scope: phase``), or ``train.epochs``, i.e. the run is over (scope
    ``run``, or the stop was in the last phase)."""
    i = phase_at(spans, epoch)
    if cfg.train.early_stopping.scope == "phase" and i + 1 < len(spans):
        return spans[i + 1][0]
    return cfg.train.epochs


def phase_end(history: list[dict], index: int, end: int) -> dict:
    """How phase ``index`` (configured to end before epoch ``end``) ended, read from the history:
    phases.json's "stopped_early" and "stopped_epoch" (its last epoch when early stopping cut it
    short, else null)."""
    last = max((r["epoch"] for r in history if r["phase"] == index), default=None)
    stopped = last is not None and last < end - 1
    return {"stopped_early": stopped, "stopped_epoch": last if stopped else None}


# ----------------------------------------------------------------------------- model, optimizer, compile
def setup_backend(cfg: Config) -> None:
    import keras
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(cfg.train.precision)


def build_training(cfg: Config, datasets):
    """Model, optimizer (built over every variable any phase trains) and LR schedule."""
    from kfine.model import build_model
    from kfine.optim import (build_optimizer, check_train, decay_flags, make_schedule,
                             variable_multipliers)
    t = cfg.train
    check_train(t)
    model = build_model(cfg.model, len(datasets.class_names), cfg.data.image_size)
    schedule = make_schedule(scaled_schedule(cfg), steps_per_epoch(cfg, datasets), t.epochs, t.accumulate_steps)
    variables = trainable_union(model, cfg.model.backbone, cfg)
    mults = variable_multipliers(model, cfg.model.backbone, t.lr_multipliers, variables, t.layer_decay)
    decay = decay_flags(model, t.optimizer.no_decay, variables)
    optimizer = build_optimizer(t.optimizer, schedule, variables, mults, decay, t.ema, t.accumulate_steps)
    if t.precision == "mixed_float16":
        optimizer = loss_scale_optimizer(optimizer, variables)
    return model, optimizer, schedule


def loss_scale_optimizer(optimizer, variables):
    """mixed_float16: one LossScaleOptimizer for the whole run. Keras' compile() wraps the
    optimizer in a fresh one (scale back to 2**15) unless it is one already; built once, its
    dynamic scale carries across phases and is in the resume backup."""
    import keras
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


def trainable_union(model, backbone_name: str, cfg: Config) -> list:
    """Every variable that some phase trains, in model order (what the optimizer is built over)."""
    from kfine.freeze import apply_freeze
    ids = set()
    for phase in cfg.train.phases:
        apply_freeze(model, backbone_name, phase.freeze, phase.bn)
        ids |= {id(v) for v in model.trainable_variables}
    apply_freeze(model, backbone_name, cfg.train.phases[0].freeze, cfg.train.phases[0].bn)
    return [v for v in model.weights if id(v) in ids]


def compile_model(model, optimizer, cfg: Config, num_classes: int, steps: int | None = None) -> None:
    """Compile for this phase (Keras reads ``trainable`` at compile); ``steps``: the epoch's steps,
    from which ``train.steps_per_execution: auto`` is chosen."""
    from kfine.model import outputs_logits
    from kfine.optim import make_loss, make_metrics
    metrics = make_metrics(num_classes)   # sparse or soft (MixUp/CutMix) labels; logits or probabilities
    inner = getattr(optimizer, "inner_optimizer", optimizer)   # under a LossScaleOptimizer
    if hasattr(inner, "set_active_variables"):   # one optimizer, this phase's variables (JAX)
        inner.set_active_variables(model.trainable_variables)
    model.compile(optimizer=optimizer, loss=make_loss(cfg.train.label_smoothing, num_classes, outputs_logits(model)),
                  metrics=metrics, jit_compile=cfg.train.jit_compile,
                  steps_per_execution=execution_steps(cfg, steps) if steps else 1)


def execution_steps(cfg: Config, steps: int, cap: int = 32) -> int:
    """Train steps per compiled call: ``train.steps_per_execution``, or (auto) the largest divisor
    of the epoch's steps up to ``cap``, so that an epoch ends on a call's end (Keras runs every
    call to its full length, which would take steps from the next epoch) and kfine's callbacks,
    which act at epoch ends only, see every epoch. Fewer host round trips per epoch: what matters
    when a step is short (the head on cached features, a GPU)."""
    from kfine.callbacks import PauseForTest
    if cfg.train.steps_per_execution != "auto":
        return int(cfg.train.steps_per_execution)
    if PauseForTest.wanted():   # the kill tests pause mid-epoch, in a batch callback
        return 1
    return max(d for d in range(1, min(cap, steps) + 1) if steps % d == 0)


def drops_remainder(cfg: Config) -> bool:
    """train.drop_remainder, or (null) whether training steps are XLA-compiled (JAX, or the
    TensorFlow backend on a GPU outside distribute.strategy mirrored, where Keras' jit_compile
    "auto" turns XLA off): a last partial batch would compile a second program there. On a
    CPU every image is seen every epoch, as PyTorch's DataLoader does by default."""
    import keras
    if cfg.train.drop_remainder is not None:
        return cfg.train.drop_remainder
    if cfg.train.jit_compile != "auto":
        return bool(cfg.train.jit_compile)
    if keras.backend.backend() == "jax":
        return True
    if active().strategy == "mirrored":   # Keras: no XLA under a tf.distribute strategy (Trainer._resolve_auto_jit_compile)
        return False
    import tensorflow as tf
    return any(d.device_type != "CPU" for d in tf.config.list_physical_devices())


def steps_per_epoch(cfg: Config, datasets) -> int:
    """Batches per epoch, rounded up to whole optimizer updates (train.accumulate_steps)."""
    n = sum(datasets.counts.get("train", {}).values())
    shard = getattr(datasets, "shard", None)
    n = shard.kept(n) if shard is not None else n   # kfine.distribute: a multiple of the replicas
    if not n:   # unknown size (a tfds split without metadata): count batches once
        steps = max(1, sum(1 for _ in datasets.train))
    else:
        steps = n // cfg.data.batch_size if drops_remainder(cfg) else math.ceil(n / cfg.data.batch_size)
        if steps < 1:
            raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) is larger than the training set ({n} "
                              f"images) and train.drop_remainder drops the partial batch: lower the batch size")
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    a = cfg.train.accumulate_steps
    return -(-steps // a) * a


def class_weights(cfg: Config, counts: dict, class_names: list[str]):
    if cfg.train.class_weight is None:
        return None
    if cfg.train.class_weight != "balanced":
        raise ConfigError(f"train.class_weight: {cfg.train.class_weight!r} is not allowed; use null or balanced")
    n = [counts.get("train", {}).get(c, 0) for c in class_names]
    total = sum(n)
    return {i: (total / (len(n) * k) if k else 0.0) for i, k in enumerate(n)}
