"""Train: config -> data -> model -> phases of (freeze, compile, fit) -> evaluate / plots / export.

    python -m kfine.train                                  # the demo (configs/demo.yaml)
    python -m kfine.train --config FILE [key=value ...]    # e.g. train.epochs=5 data.batch_size=32
    python -m kfine.train --config vlg50_resnet50          # a reference config by name
    python -m kfine.train --list-configs                   # the reference configs
    python -m kfine.train --resume RUN_DIR                 # continue a killed run where it stopped
    python -m kfine.train --dry-run [--config FILE] [--num-classes N]   # stages and what each phase trains; no training

A phase is a span of epochs with one freeze spec: ``train.phases[i].start_epoch`` is the 0-based
index of its first epoch; it runs until the next phase's start (or ``train.epochs``). Files hold
0-based epoch indices, as Keras' callbacks do (history.csv's ``epoch`` column, checkpoints, backups,
best.json, run_info.json's and metrics.json's ``model.epoch``); what kfine prints and the reports
show counts epochs from 1, as Keras' progress line does ("epoch 1/6" is index 0).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kfine import cli
from kfine.checkpoint import TrainingError, read_history  # noqa: F401  (kfine.train's API too)
from kfine.config import Config, ConfigError, check_config, load_config, replace, save_config, to_dict
from kfine.distribute import active
from kfine.log import current_timings, timed
from kfine.rundir import atomic_write_text, read_json, write_json

DEMO_CONFIG = "demo"          # a reference config (kfine.cli.find_config): configs/demo.yaml


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    metrics: dict = field(default_factory=dict)
    model: object = None
    timings: dict = field(default_factory=dict)   # seconds per stage (kfine.log.STAGES) and "total"


# ----------------------------------------------------------------------------- phases
def phase_spans(cfg: Config) -> list[tuple[int, int]]:
    """(first epoch, end epoch exclusive) of each phase; checks the phase list."""
    from kfine.config import check_phases
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


# ----------------------------------------------------------------------------- run directory
def prepare_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """runs/<name>; if it exists, runs/<name>-2, -3, ... (a finished run is never overwritten)."""
    base = cfg.run_dir
    if overwrite and base.exists():
        from kfine.checkpoint import lock_run_dir
        lock_run_dir(base).release()   # never remove a directory another process trains in
        shutil.rmtree(base)
    run_dir, i = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        i += 1
        run_dir = base.with_name(f"{base.name}-{i}")
    if run_dir != base:
        print(f"kfine: {base} already holds a run, so this one goes to {run_dir} (--overwrite replaces "
              f"{base}; --resume {base} continues it; see docs/run-directory.md#resume)", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------- callbacks
def make_callbacks(cfg: Config, run_dir: Path, saver, phase: int, schedule, early=None, model=None) -> list:
    """One phase's callbacks, in the order they run at an epoch's end: the NaN check first (nothing
    of a NaN epoch is saved), early stopping before the commit (the commit records the stop), the
    commit (history, backup, checkpoints: kfine.checkpoint), the progress line, TensorBoard, wandb."""
    import keras
    from kfine import callbacks as kc
    cbs = [kc.StopOnNaN(phase)] + ([early] if early is not None else [])
    cbs.append(kc.EpochCommit(saver, phase, schedule, model))
    if kc.fit_verbosity(cfg.train.verbose):
        cbs.append(kc.PhaseProgbar(cfg.train.epochs))
    elif cfg.train.verbose:   # stdout is a file (CI, nohup, a cluster job) or verbose: 2
        cbs.append(kc.EpochLog(cfg.train.epochs, phase, schedule))
    chief = active().chief   # kfine.distribute: only process 0 writes
    if chief:
        cbs.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False))
    if cfg.train.wandb.enabled and chief:
        cbs.append(_wandb_callback(cfg, run_dir))
    if kc.PauseForTest.wanted():
        cbs.append(kc.PauseForTest())
    return cbs


def _wandb_callback(cfg: Config, run_dir: Path):
    import keras
    from kfine.callbacks import WandbLog
    try:
        import wandb
    except ImportError:
        print("kfine: train.wandb.enabled is set but wandb is not installed (pip install wandb); "
              "logging to TensorBoard and CSV only.", flush=True)
        return keras.callbacks.Callback()
    if wandb.run is None:
        wandb.init(project=cfg.train.wandb.project, entity=cfg.train.wandb.entity, name=run_dir.name,
                   config=to_dict(cfg), dir=str(run_dir))
    return WandbLog(wandb)


# ----------------------------------------------------------------------------- training
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


def trainable_union(model, backbone_name: str, cfg: Config) -> list:
    """Every variable that some phase trains, in model order (what the optimizer is built over)."""
    from kfine.freeze import apply_freeze
    ids = set()
    for phase in cfg.train.phases:
        apply_freeze(model, backbone_name, phase.freeze, phase.bn)
        ids |= {id(v) for v in model.trainable_variables}
    apply_freeze(model, backbone_name, cfg.train.phases[0].freeze, cfg.train.phases[0].bn)
    return [v for v in model.weights if id(v) in ids]


def class_weights(cfg: Config, counts: dict, class_names: list[str]):
    if cfg.train.class_weight is None:
        return None
    if cfg.train.class_weight != "balanced":
        raise ConfigError(f"train.class_weight: {cfg.train.class_weight!r} is not allowed; use null or balanced")
    n = [counts.get("train", {}).get(c, 0) for c in class_names]
    total = sum(n)
    return {i: (total / (len(n) * k) if k else 0.0) for i, k in enumerate(n)}


def fit_phases(model, cfg: Config, datasets, run_dir: Path, start_epoch: int = 0,
               history: list[dict] | None = None, optimizer=None, schedule=None,
               callbacks=(), keep_checkpoints: bool = True) -> list[dict]:
    """Run every phase from ``start_epoch`` on: apply the freeze spec, log the trainable summary,
    compile (Keras reads ``trainable`` only at compile), fit the phase's epochs.

    Each epoch's end commits its history row, the resume backup and the checkpoints due
    (kfine.checkpoint); a run resumed at ``start_epoch`` first writes what its last commit left
    unwritten. ``callbacks`` are added to every phase's fit (the tuner's);
    ``keep_checkpoints=False`` skips checkpoints and resume backups (a tuner trial is resumed by
    the tuner, not by epoch). Returns the history, one row per epoch."""
    from kfine.checkpoint import CheckpointSaver
    saver = CheckpointSaver(run_dir, cfg.train.checkpoint, cfg.train.epochs, history, keep_checkpoints,
                            writes=active().chief)
    try:
        saver.catch_up(model, optimizer)
        _fit_phases(model, cfg, datasets, run_dir, start_epoch, saver, optimizer, schedule, callbacks)
    finally:
        saver.close()   # waits for the last epoch's writes
    return saver.history


def _fit_phases(model, cfg: Config, datasets, run_dir: Path, start_epoch: int, saver, optimizer,
                schedule, callbacks) -> None:
    import keras
    from kfine import features
    from kfine.augment import mixing_epochs
    from kfine.callbacks import EarlyStop, EpochSeeds, MixingSwitch, fit_verbosity
    from kfine.checkpoint import monitor_mode
    from kfine.freeze import apply_freeze, format_summary, trainable_summary
    from kfine.optim import stage_multipliers

    spans = phase_spans(cfg)
    num_classes = len(datasets.class_names)
    phases_log = read_json(run_dir / "phases.json") if (run_dir / "phases.json").exists() else []
    cw = class_weights(cfg, datasets.counts, datasets.class_names)
    # A fixed number of steps over a repeated dataset: Keras counts an extra optimizer iteration per
    # epoch on a dataset of unknown size (ours: ignore_errors), which would shift the LR schedule.
    steps = steps_per_epoch(cfg, datasets)
    # epochs first, first + 1, ... (each fit iterates its dataset afresh): each epoch's order,
    # augmentations and mixing are drawn from (seed, epoch), so a resumed run trains on what the
    # uninterrupted one did (kfine.pipeline.make_dataset)
    def train_ds(first):
        return datasets.dataset("train", drop_remainder=drops_remainder(cfg), shard=datasets.shard,
                                epoch=first, steps=steps,
                                mix_until=mixing_epochs(cfg.data.augment, cfg.train.epochs))
    early, es = None, cfg.train.early_stopping
    for i, (phase, (first, end)) in enumerate(zip(cfg.train.phases, spans)):
        if end <= start_epoch:
            continue
        first = max(first, start_epoch)
        apply_freeze(model, cfg.model.backbone, phase.freeze, phase.bn)
        mults = stage_multipliers(model, cfg.model.backbone, cfg.train.lr_multipliers, cfg.train.layer_decay)
        rows = trainable_summary(model, cfg.model.backbone, mults)
        print(f"\nkfine: phase {i} (epochs {first + 1}..{end} of {cfg.train.epochs}): freeze {phase.freeze.strategy}"
              f"{_freeze_detail(phase.freeze)}, bn: {phase.bn}\n{format_summary(rows)}", flush=True)
        phases_log = [p for p in phases_log if p["index"] < i] + [   # the configured start, also on resume
            {"index": i, "start_epoch": phase.start_epoch, "end_epoch": end, "freeze": to_dict(phase.freeze),
             "bn": phase.bn, "summary": rows}]
        for p in phases_log[:-1]:   # the phases before: where each ended (also after a kill and --resume)
            p.update(phase_end(saver.history, p["index"], p["end_epoch"]))
        if active().chief:
            write_json(run_dir / "phases.json", phases_log)
        skipped = first - (saver.history[-1]["epoch"] + 1 if saver.history else 0)
        if skipped > 0 and optimizer is not None:   # after an early-stopped phase
            _skip_epochs(optimizer, skipped, steps)
        fit_model, fit_val = model, datasets.val
        reason = features.cache_reason(model, cfg, phase, end - first)
        if reason is None:   # the head trains on backbone features computed once (kfine.features)
            with timed("features"):
                feats, seconds = features.timed_features(model, datasets, cfg)
            print(f"kfine: phase {i}: {features.describe(feats, seconds)}", flush=True)
            fit_model = features.model_parts(model)[1]   # the head the evaluation reuses
            fit_train, fit_val = features.feature_datasets(feats, cfg.data.batch_size, datasets.seed, first,
                                                           steps, drops_remainder(cfg), sampling=cfg.data.sampling)
        else:   # the image pipeline is built only for a phase that trains on images
            fit_train = train_ds(first)
            print(f"kfine: phase {i}: no feature cache: {reason}", flush=True)
        compile_model(model, optimizer, cfg, num_classes, steps)   # the full model: what is committed
        if fit_model is not model:
            compile_model(fit_model, optimizer, cfg, num_classes, steps)
        if es.patience:
            early = EarlyStop([r for r in saver.history if r["phase"] == i and r["epoch"] < first],
                              monitor=es.monitor, patience=es.patience, min_delta=es.min_delta,
                              mode=monitor_mode(es))
        phase_callbacks = make_callbacks(cfg, run_dir, saver, i, schedule, early, model) + list(callbacks)
        if cfg.train.ema.enabled:   # validate on the EMA weights, train on the raw ones
            phase_callbacks.append(keras.callbacks.SwapEMAWeights())
        phase_callbacks.append(EpochSeeds(model, cfg.seed))   # dropout: a function of the epoch too
        if datasets.mixing is not None and cfg.data.augment.mix_off_epochs:
            phase_callbacks.append(MixingSwitch(datasets.mixing, mixing_epochs(cfg.data.augment, cfg.train.epochs)))
        with warnings.catch_warnings():   # the val set has no known size: Keras warns at its end
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            fit_model.fit(fit_train, validation_data=fit_val, initial_epoch=first, epochs=end,
                          steps_per_epoch=steps, class_weight=cw, shuffle=False,   # tf.data shuffles
                          callbacks=phase_callbacks, verbose=fit_verbosity(cfg.train.verbose))
        phases_log[-1].update(phase_end(saver.history, i, end))
        if active().chief:
            write_json(run_dir / "phases.json", phases_log)
        if early is not None and early.stopped_epoch > 0:
            after = epoch_after_stop(cfg, spans, early.stopped_epoch)
            print(f"kfine: early stopping after epoch {early.stopped_epoch + 1} "
                  f"({cfg.train.early_stopping.monitor} stopped improving): "
                  + (f"phase {i} ends, phase {i + 1} starts at epoch {after + 1}" if after < cfg.train.epochs
                     else "the run ends" + (" (train.early_stopping.scope: run)" if i + 1 < len(spans) else "")),
                  flush=True)
            if after >= cfg.train.epochs:
                break


def _skip_epochs(optimizer, epochs: int, steps: int) -> None:
    """The epochs an early-stopped phase left out count as run for the optimizer's step counter:
    the learning-rate schedule, a function of that counter, is then where the plan puts the next
    phase's first epoch (a phase's start and its learning rate stay as configured). Nothing else
    changes: weights, moments and EMA averages go on from the stopped epoch."""
    from kfine.optim import _batches_seen, inner_optimizer
    _batches_seen(inner_optimizer(optimizer)).assign_add(epochs * steps)   # batches (updates x accumulation)


def _freeze_detail(spec) -> str:
    return {"fraction": f" (fraction {spec.fraction})", "stages": f" (trainable from {spec.trainable_from})",
            "regex": f" (pattern {spec.pattern!r})",
            "lora": f" (rank {spec.lora_rank}, alpha {spec.lora_alpha or spec.lora_rank}, "
                    f"stages {list(spec.lora_stages) or 'all'})"}.get(spec.strategy, "")


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


def setup_backend(cfg: Config) -> None:
    import keras
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(cfg.train.precision)


def build_training(cfg: Config, datasets):
    """Model, optimizer (built over every variable any phase trains) and LR schedule."""
    from kfine.distribute import scaled_schedule
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


def run(cfg: Config, resume: Path | None = None, overwrite: bool = False) -> RunResult:
    """One whole run: everything lands in the run directory, which this process locks while it
    works in it (a second process on it stops with a message naming this one's PID). Its last
    line says where the time went (kfine.log.format_timings; run_info.json "timings")."""
    from kfine.checkpoint import read_state
    from kfine.log import format_timings, run_timings
    finished = resume is not None and bool((read_state(resume) or {}).get("finished"))
    with run_timings() as seconds:
        result = _run(cfg, resume, overwrite)
    result.timings = seconds
    info_path = result.run_dir / "run_info.json"
    if active().chief and info_path.exists() and not finished:   # a finished run keeps its training run's
        write_json(info_path, {**read_json(info_path), "timings": seconds})
    print(format_timings(seconds), flush=True)
    return result


def _run(cfg: Config, resume: Path | None, overwrite: bool) -> RunResult:
    from kfine import checkpoint, distribute
    from kfine.optim import check_train

    with timed("startup"):
        plan = distribute.make_plan(cfg)   # first: several processes join before anything uses JAX
        check_config(cfg)          # every value checked before a run directory exists
        check_train(cfg.train)
        spans = phase_spans(cfg)
    if not plan.chief:   # it reads the run directory (--resume) and writes nothing
        run_dir = Path(resume) if resume is not None else distribute.share_path(plan, None)   # the chief's
        if run_dir is None:
            raise TrainingError("process 0 could not prepare the run directory (its error says why)")
        return _run_locked(cfg, run_dir, resume is not None, spans, plan)
    if resume is not None:
        run_dir = Path(resume)
    else:
        try:
            with timed("startup"):
                run_dir = prepare_run_dir(cfg, overwrite)
        except BaseException:
            distribute.share_path(plan, None)   # the others stop instead of waiting
            raise
        distribute.share_path(plan, run_dir)   # every process uses the directory the chief chose
    lock = checkpoint.lock_run_dir(run_dir)
    try:
        return _run_locked(cfg, run_dir, resume is not None, spans, plan)
    finally:
        lock.release()


def _run_locked(cfg: Config, run_dir: Path, resume: bool, spans, plan) -> RunResult:
    from kfine import checkpoint, distribute

    state = None   # the last commit (kfine.checkpoint): None = train from epoch 0
    if resume:
        if plan.chief:
            checkpoint.clean_temp_files(run_dir)   # what writes cut short by a kill left behind
        state = checkpoint.read_state(run_dir)
        if state is None:
            print(f"kfine: {run_dir} has no finished epoch (it was stopped before epoch 1 ended); "
                  f"starting it over in place", flush=True)
            if plan.chief:
                checkpoint.reset_run_dir(run_dir)
    elif plan.chief:
        save_config(cfg, run_dir / "config.yaml")
    who = f" (process 0 of {plan.processes}, the chief: the only one that writes)" if plan.processes > 1 else ""
    print(f"kfine: run directory {run_dir}{who}" if plan.chief else
          f"kfine: process {plan.process_index} of {plan.processes}: process 0 writes the run directory {run_dir}",
          flush=True)
    finished = bool(state and state.get("finished"))   # model.keras is final: it is what the model loads
    if finished:
        return _finish_finished(cfg, run_dir, state, plan)
    with plan.scope():   # model, optimizer, every compile and fit on the plan's devices (kfine.distribute)
        datasets, model, history, restore = _train(cfg, run_dir, resume, state, spans, plan)
    result = RunResult(run_dir=run_dir, history=history, model=model)
    distribute.barrier(plan, "kfine: trained")   # the chief's last checkpoint is written
    with timed("restore"):
        if not finished:   # every process: assigning to variables placed across processes is collective
            use_best_epoch(cfg, run_dir, model, history, restore, writes=plan.chief)
        if not plan.chief:
            return result
        save_shipped_model(cfg, run_dir, model)   # for inference: no optimizer state
        checkpoint.finish_backup(run_dir)   # model.keras has the weights; the optimizer state is spent
    if plan.strategy != "none":   # evaluate and export what was saved: on one device, every image
        model = result.model = checkpoint.load_model(run_dir / "model.keras")
        datasets.val = datasets.dataset("val") if datasets.val is not None else None
    finish_run(cfg, run_dir, model, datasets, result)
    print(f"kfine: done. Outputs in {run_dir}/ (model.keras, history.csv, plots/, metrics.json, "
          f"report.html{', export/' if cfg.export.enabled else ''})", flush=True)
    return result


def _finish_finished(cfg: Config, run_dir: Path, state: dict, plan) -> RunResult:
    """--resume of a finished run: model.keras holds its weights (the backup's arrays are gone);
    only the outputs it lacks are written (missing_outputs), and the data is read only when the
    evaluation is among them."""
    from kfine import checkpoint
    todo = missing_outputs(cfg, run_dir)
    history = state["history"]
    print(f"kfine: {run_dir} already finished training ({len(history)} epochs); " +
          (f"writing what is missing: {', '.join(todo)}" if todo else
           "it has all its outputs (delete one to have it written again)"), flush=True)
    result = RunResult(run_dir=run_dir, history=history, metrics=_saved_metrics(run_dir),
                       model=checkpoint.load_model(run_dir / "model.keras"))
    if todo and plan.chief:
        datasets = None
        if {"evaluation", "export litert"} & set(todo):   # the run's own split (splits.csv), as kfine.evaluate reads it
            from kfine import data as kdata
            setup_backend(cfg)
            saved = run_dir / "splits.csv"
            datasets = kdata.make_datasets(cfg.data, cfg.seed, splits=saved if saved.exists() else None)
        finish_run(cfg, run_dir, result.model, datasets, result, todo)
        print(f"kfine: done. Outputs in {run_dir}/", flush=True)
    return result


def _train(cfg: Config, run_dir: Path, resume: bool, state: dict | None, spans, plan):
    """Prepare and fit, inside the plan's scope: (datasets, model, history, restore_best). A new
    run that fails before its first epoch leaves no run directory behind."""
    from kfine.optim import apply_ema_weights
    try:
        datasets, model, optimizer, schedule, start_epoch, history = _prepare(cfg, run_dir, state, spans, resume, plan)
        restore = restore_best(cfg, datasets)
    except BaseException:
        if not resume and plan.chief:
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"kfine: removed {run_dir} (the run stopped before training)", file=sys.stderr, flush=True)
        raise
    # a finished run resumed to redo its outputs holds model.keras (averaged already); any other,
    # also one resumed after its last commit (nothing left to train), holds the raw weights
    trained = not (state and state.get("finished"))
    with timed("training"):
        history = fit_phases(model, cfg, datasets, run_dir, start_epoch, history, optimizer, schedule)
    if trained and apply_ema_weights(optimizer):   # train.ema: model.keras, evaluation, export use the averages
        print("kfine: the model now holds the EMA weights (train.ema)", flush=True)
    return datasets, model, history, restore


def restore_best(cfg: Config, datasets) -> bool:
    """``train.restore_best`` resolved: null means true when the data has a validation split."""
    wanted, monitor = cfg.train.restore_best, cfg.train.checkpoint.monitor
    if wanted is None:
        return datasets.val is not None
    if wanted and datasets.val is None and monitor.startswith("val_"):
        raise ConfigError(f"train.restore_best is true but the data has no validation split, so "
                          f"train.checkpoint.monitor ({monitor}) is never logged and there is no best epoch; "
                          f"set data.val_fraction > 0, train.restore_best=false, or a training metric as monitor")
    return wanted


def shipped_epoch(cfg: Config, history: list[dict], restore: bool) -> tuple[dict | None, str]:
    """The history row of the epoch a run ships (what use_best_epoch loads: model.keras, the
    evaluation, the export) and how it was chosen: "best", the best epoch by
    train.checkpoint.monitor (checkpoints/best.keras), where ``restore`` (restore_best) holds and
    the monitor was logged; else "final", the last epoch. kfine.tune scores a trial on this row."""
    from kfine.checkpoint import best_epoch, monitor_mode
    best = best_epoch(history, cfg.train.checkpoint.monitor, monitor_mode(cfg.train.checkpoint)) if restore else None
    if best is not None:
        return next(r for r in history if r["epoch"] == best), "best"
    return (history[-1] if history else None), "final"


def use_best_epoch(cfg: Config, run_dir: Path, model, history: list[dict], restore: bool,
                   writes: bool = True) -> dict:
    """The weights model.keras, the evaluation and the export get: with ``restore`` those of
    checkpoints/best.keras (the best epoch by train.checkpoint.monitor; with train.ema its averaged
    weights, as the model holds after training) loaded into ``model``, else the final epoch's as
    trained. The final epoch's weights are not kept beside them (a lean run directory): a run that
    needs them sets train.restore_best=false. Records which epoch it is as run_info.json's "model"
    (finish_run copies it into metrics.json; the report shows it)."""
    from kfine import checkpoint
    best, monitor = run_dir / checkpoint.CHECKPOINTS / "best.keras", cfg.train.checkpoint.monitor
    final = history[-1]["epoch"] if history else None
    used = {"epoch": final, "weights": "final", "final_epoch": final}
    if restore and best.exists():
        meta = read_json(best.with_name("best.json"))
        if meta["epoch"] != final:   # the final epoch's weights are best.keras's already (EMA: both averaged)
            checkpoint.load_weights(best, model)
        used = {"epoch": meta["epoch"], "weights": "best", "final_epoch": final,
                "monitor": monitor, "value": meta.get(monitor)}
        print(f"kfine: the model now holds epoch {meta['epoch'] + 1}'s weights, the best by {monitor} "
              f"(train.restore_best; checkpoints/best.keras)", flush=True)
    elif restore:
        print(f"kfine: train.restore_best: there is no checkpoints/best.keras ({monitor} was never logged); "
              f"the model holds the final epoch's weights", flush=True)
    info_path = run_dir / "run_info.json"
    if writes:
        info = read_json(info_path) if info_path.exists() else {}
        write_json(info_path, {**info, "model": used})
    return used


def save_shipped_model(cfg: Config, run_dir: Path, model) -> None:
    """model.keras: where the model holds checkpoints/best.keras's weights (use_best_epoch) and that
    file has no optimizer state, a link to it (the same bytes: no second write of the model),
    else the model saved for inference."""
    from kfine import checkpoint
    info = read_json(run_dir / "run_info.json") if (run_dir / "run_info.json").exists() else {}
    best = run_dir / checkpoint.CHECKPOINTS / "best.keras"
    if (info.get("model") or {}).get("weights") == "best" and best.exists() and not cfg.train.checkpoint.save_optimizer:
        checkpoint.link_model(best, run_dir / "model.keras")
    else:
        checkpoint.save_model(model, run_dir / "model.keras")


def _prepare(cfg: Config, run_dir: Path, state: dict | None, spans, resume: bool = False, plan=None):
    """Everything before the first epoch: the data (its split saved in splits.csv, or read back
    from it: a resumed run trains on exactly the images it started with) and its audit, model,
    optimizer, and the state of the last commit (``state``, None for a run from epoch 0).
    Under a distribution plan (kfine.distribute) only its chief writes, each process's train and
    val pipelines are its shard, and run_info.json records the devices."""
    from kfine import checkpoint, distribute

    plan = plan or active()
    chief = plan.chief
    info = distribute.run_info(plan, cfg)
    print(distribute.format_info(info), flush=True)
    setup_backend(cfg)
    checkpoint.pause_for_test("data_check")
    saved = run_dir / "splits.csv"
    splits = saved if (resume or chief) and saved.exists() else None   # a new run's other processes draw it
    with timed("data"):
        datasets = _prepare_data(cfg, run_dir, state, saved, splits, plan)
    with timed("model"):
        return _prepare_model(cfg, run_dir, state, spans, datasets, info, plan)


def _prepare_data(cfg: Config, run_dir: Path, state, saved: Path, splits, plan):
    """The datasets, their split saved (splits.csv) and audited (data_check.json)."""
    from kfine import data as kdata, distribute
    from kfine.audit import format_check
    from kfine.sources import write_splits
    chief = plan.chief
    datasets = kdata.make_datasets(cfg.data, cfg.seed, splits=splits, verbose=True, shard=plan.shard)
    distribute.check_same_files(plan, datasets.files)
    _say_shard(datasets)
    if chief:
        write_json(run_dir / "class_names.json", datasets.class_names)
    if chief and not saved.exists():
        write_splits(datasets.index, saved)
    if cfg.data.check and state is None and chief:
        report = kdata.check_data(cfg.data, cfg.seed, datasets=datasets)
        write_json(run_dir / "data_check.json", report)
        print(format_check(report), flush=True)
    if datasets.skipped and chief:
        atomic_write_text(run_dir / "skipped_files.txt",
                          "".join(f"{p}\t{why}\n" for p, why in datasets.skipped))
        print(f"kfine: skipped {len(datasets.skipped)} unreadable images "
              f"(listed in {run_dir / 'skipped_files.txt'})", flush=True)
    return datasets


def _prepare_model(cfg: Config, run_dir: Path, state, spans, datasets, info: dict, plan):
    """Model, optimizer and schedule, and the last commit's weights and state on resume."""
    from kfine import checkpoint
    from kfine.model import weights_info
    chief = plan.chief
    # on resume the weights come from the backup: no download
    model, optimizer, schedule = build_training(replace(cfg, ["model.weights=null"]) if state else cfg, datasets)
    if state is None and chief:   # what the backbone really started from (the report shows it)
        write_json(run_dir / "run_info.json", {"weights": {"requested": cfg.model.weights, **weights_info(model)},
                                               **info})
    elif chief and (run_dir / "run_info.json").exists():   # resumed: the devices it goes on with
        write_json(run_dir / "run_info.json", {**read_json(run_dir / "run_info.json"), **info})

    start_epoch, history = 0, []
    if state is not None:
        state = checkpoint.load_backup(run_dir, model, optimizer)
        start_epoch, history = state["next_epoch"], state["history"]
        if state["stopped"]:   # early stopping ended its last epoch's phase: the next one's start, or the end
            start_epoch = epoch_after_stop(cfg, spans, start_epoch - 1)
        if state["finished"] or start_epoch >= cfg.train.epochs:
            print(f"kfine: {run_dir} already finished training ({len(history)} epochs); finishing outputs",
                  flush=True)
            start_epoch = cfg.train.epochs
        else:
            print(f"kfine: resuming at epoch {start_epoch + 1} (phase {phase_at(spans, start_epoch)})", flush=True)
    return datasets, model, optimizer, schedule, start_epoch, history


def _say_shard(datasets) -> None:
    """Under data_parallel: what each epoch leaves out so that every batch splits evenly."""
    shard = datasets.shard
    if shard is None:
        return
    for split in ("train", "val"):
        n = len(datasets.files.get(split, ()))
        if shard.kept(n) < n:
            print(f"kfine: {split}: each epoch uses {shard.kept(n)} of {n} images (a multiple of the "
                  f"{shard.multiple} replicas: JAX splits every batch evenly); the final evaluation uses all",
                  flush=True)
    if shard.count > 1:
        print(f"kfine: process {shard.index} of {shard.count} feeds its part of each epoch, "
              f"{shard.batch} images per batch", flush=True)


def missing_outputs(cfg: Config, run_dir: Path) -> list[str]:
    """What finish_run would write that ``run_dir`` lacks (a finished run resumed writes only
    these): "history plot", "evaluation" (metrics.json, predictions.csv, its plots), "export
    FORMAT", and "report" when it is missing or anything before it is rewritten."""
    from kfine.export import missing_formats
    todo = [] if (run_dir / "plots" / "history.png").exists() else ["history plot"]
    split = _saved_metrics(run_dir).get("split")
    if split is None or not (run_dir / "predictions.csv").exists() or \
            not (run_dir / "plots" / f"confusion_{split}.png").exists():
        todo.append("evaluation")
    if cfg.export.enabled:
        todo += [f"export {f}" for f in missing_formats(run_dir / "export", cfg.export.formats)]
    if todo or not (run_dir / "report.html").exists():
        todo.append("report")
    return todo


def _saved_metrics(run_dir: Path) -> dict:
    """The main evaluation's figures in metrics.json (test, else val; as finish_run sets
    RunResult.metrics), {} when there are none."""
    saved = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    return next((saved[s] for s in ("test", "val") if isinstance(saved.get(s), dict)), {})


def finish_run(cfg: Config, run_dir: Path, model, datasets, result: RunResult, todo: list[str] | None = None) -> None:
    """Evaluation, plots, report and export. Each is kfine's own module: one that fails to import
    (a broken matplotlib, say) fails the run with its error, never a run "done" without its outputs.
    ``todo``: only these outputs (missing_outputs' names; a finished run resumed), else all;
    ``datasets`` may then be None when the evaluation is not among them."""
    try:
        from kfine import evaluate, export, plots, report
    except ImportError as e:
        raise TrainingError(f"the run's plots, evaluation, export and report cannot be written: {e}; the trained "
                            f"model is saved in {run_dir / 'model.keras'}: repair the install, then "
                            f"`python -m kfine.train --resume {run_dir}` writes them") from e

    def wanted(step: str) -> bool:
        return todo is None or step in todo

    if wanted("history plot"):
        with timed("plots"):
            plots.plot_history(run_dir / "history.csv", run_dir / "plots" / "history.png",
                               phases=read_json(run_dir / "phases.json"))
    if wanted("evaluation") and datasets is not None:
        split = "test" if datasets.test is not None else "val"
        if getattr(datasets, split) is not None:
            predicted: dict = {}   # the evaluation's probabilities: the heatmaps pick images by them
            used = read_json(run_dir / "run_info.json").get("model") if (run_dir / "run_info.json").exists() else None
            with timed("evaluation"):   # which epoch's weights were evaluated (train.restore_best) goes in too
                result.metrics = evaluate.evaluate_run(run_dir, model=model, datasets=datasets, split=split,
                                                       report=False, predicted=predicted,
                                                       extra={"model": used} if used else None)
            with timed("plots"):
                write_heatmaps(run_dir, model, datasets, result.metrics.get("split", split), predicted)
    formats = [f for f in cfg.export.formats if wanted(f"export {f}")]
    if cfg.export.enabled and formats:
        class_names = datasets.class_names if datasets is not None else read_json(run_dir / "class_names.json")
        with timed("export"):
            export.export_model(model, class_names, cfg.data.image_size, run_dir / "export",
                                formats=formats, transform=export.transform_of(cfg.data),
                                litert=cfg.export.litert, datasets=datasets, run_dir=run_dir)
    seconds = current_timings()   # the report shows where the time went (all but its own writing)
    if todo is None and seconds is not None and active().chief and (run_dir / "run_info.json").exists():
        write_json(run_dir / "run_info.json", {**read_json(run_dir / "run_info.json"), "timings": seconds})
    if wanted("report"):
        with timed("plots"):
            report.write_report(run_dir)


def write_heatmaps(run_dir: Path, model, datasets, split: str, predicted: dict | None = None) -> None:
    """plots/heatmaps_<split>.png for the report (kfine.explain: Grad-CAM); a model it cannot
    explain gets a note, not a failed run. ``predicted``: the evaluation's {"probs", "labels"} of
    the split (then the model does not run over the split again)."""
    from kfine import explain
    try:
        explain.write_heatmap_grid(run_dir, model, getattr(datasets, split), datasets.class_names, split,
                                   **(predicted or {}))
    except explain.ExplainError as e:
        print(f"kfine: no heatmaps: {e}", flush=True)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(ap, default=DEMO_CONFIG)
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last finished epoch")
    ap.add_argument("--overwrite", action="store_true", help="replace runs/<name> instead of runs/<name>-2")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the model's stages and what each phase trains; train nothing, write nothing")
    ap.add_argument("--num-classes", type=int, metavar="N",
                    help="with --dry-run: the head's classes (default: the data folder's class folders)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=5 data.batch_size=32")
    args = ap.parse_args(argv)
    if args.num_classes is not None and (not args.dry_run or args.num_classes < 2):
        ap.error("--num-classes goes with --dry-run and is at least 2 (a run's classes are its data's)")
    if args.list_configs:
        print(cli.format_config_list(search=False))
        return 0
    return cli.run_command(lambda: _main(args), TrainingError)


def _main(args) -> int:
    if args.dry_run:   # what each phase trains, without training or a run directory
        from kfine.layers import class_count, describe_config
        path = Path(args.resume) / "config.yaml" if args.resume else cli.find_config(args.config or DEMO_CONFIG)
        cfg = check_config(load_config(path, args.overrides))
        names = Path(args.resume) / "class_names.json" if args.resume else None
        n, where = args.num_classes, "--num-classes"
        if n is None and names is not None and names.exists():
            n, where = len(read_json(names)), str(names)
        if n is None:
            n = class_count(cfg.data)
            where = ("the digits demo" if cfg.data.source == "digits" else
                     f"the class folders in {cfg.data.root}" if n else
                     "the data is not read by a dry run: give --num-classes N")
        print(f"kfine: dry run: head for {n or 2} classes ({where})")
        print(describe_config(cfg, n or 2))
        return 0
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise TrainingError(f"{run_dir} is not a kfine run directory (no config.yaml) "
                                f"(see docs/run-directory.md#resume)")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        run(cfg, resume=run_dir)
    else:
        cfg = load_config(cli.find_config(args.config or DEMO_CONFIG), args.overrides)
        run(cfg, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
