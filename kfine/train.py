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

``run`` is the story of a run, ``fit_phases`` its phases in order; beside them: kfine.fit (the
model, optimizer and schedule, each phase's compile, the steps per epoch, the phases' spans),
kfine.callbacks.make_callbacks (a phase's callbacks) and kfine.checkpoint (the run directory,
each epoch's commit, the weights a run ships).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kfine import checkpoint, cli, fit
from kfine.checkpoint import TrainingError, read_history  # noqa: F401  (kfine.train's API too)
from kfine.checks import check_config
from kfine.config import load_config, replace, save_config
from kfine.distribute import active
from kfine.log import current_timings, timed
from kfine.rundir import atomic_write_text, read_json, write_json
from kfine.schema import Config, to_dict

DEMO_CONFIG = "demo"          # a reference config (kfine.cli.find_config): configs/demo.yaml


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    metrics: dict = field(default_factory=dict)
    model: object = None
    timings: dict = field(default_factory=dict)   # seconds per stage (kfine.log.STAGES) and "total"


# ----------------------------------------------------------------------------- the phases, in order
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
    from kfine import callbacks as kc, features
    from kfine.augment import mixing_epochs
    from kfine.callbacks import EarlyStop, EpochSeeds, MixingSwitch, fit_verbosity
    from kfine.checkpoint import monitor_mode
    from kfine.freeze import apply_freeze, format_summary, trainable_summary
    from kfine.optim import stage_multipliers

    spans = fit.phase_spans(cfg)
    num_classes = len(datasets.class_names)
    phases_log = read_json(run_dir / "phases.json", [])
    cw = fit.class_weights(cfg, datasets.counts, datasets.class_names)
    # A fixed number of steps over a repeated dataset: Keras counts an extra optimizer iteration per
    # epoch on a dataset of unknown size (ours: ignore_errors), which would shift the LR schedule.
    steps = fit.steps_per_epoch(cfg, datasets)
    # epochs first, first + 1, ... (each fit iterates its dataset afresh): each epoch's order,
    # augmentations and mixing are drawn from (seed, epoch), so a resumed run trains on what the
    # uninterrupted one did (kfine.pipeline.make_dataset)
    def train_ds(first):
        return datasets.dataset("train", drop_remainder=fit.drops_remainder(cfg), shard=datasets.shard,
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
            p.update(fit.phase_end(saver.history, p["index"], p["end_epoch"]))
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
                                                           steps, fit.drops_remainder(cfg), sampling=cfg.data.sampling)
        else:   # the image pipeline is built only for a phase that trains on images
            fit_train = train_ds(first)
            print(f"kfine: phase {i}: no feature cache: {reason}", flush=True)
        fit.compile_model(model, optimizer, cfg, num_classes, steps)   # the full model: what is committed
        if fit_model is not model:
            fit.compile_model(fit_model, optimizer, cfg, num_classes, steps)
        if es.patience:
            early = EarlyStop([r for r in saver.history if r["phase"] == i and r["epoch"] < first],
                              monitor=es.monitor, patience=es.patience, min_delta=es.min_delta,
                              mode=monitor_mode(es))
        phase_callbacks = kc.make_callbacks(cfg, run_dir, saver, i, schedule, early, model) + list(callbacks)
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
        phases_log[-1].update(fit.phase_end(saver.history, i, end))
        if active().chief:
            write_json(run_dir / "phases.json", phases_log)
        if early is not None and early.stopped_epoch > 0:
            after = fit.epoch_after_stop(cfg, spans, early.stopped_epoch)
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


# ----------------------------------------------------------------------------- the run
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
    from kfine import distribute
    from kfine.optim import check_train

    with timed("startup"):
        plan = distribute.make_plan(cfg)   # first: several processes join before anything uses JAX
        check_config(cfg)          # every value checked before a run directory exists
        check_train(cfg.train)
        spans = fit.phase_spans(cfg)
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
                run_dir = checkpoint.prepare_run_dir(cfg, overwrite)
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
    from kfine import distribute

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
            checkpoint.use_best_epoch(cfg, run_dir, model, history, restore, writes=plan.chief)
        if not plan.chief:
            return result
        checkpoint.save_shipped_model(cfg, run_dir, model)   # for inference: no optimizer state
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
            fit.setup_backend(cfg)
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
        restore = checkpoint.restore_best(cfg, datasets)
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


def _prepare(cfg: Config, run_dir: Path, state: dict | None, spans, resume: bool = False, plan=None):
    """Everything before the first epoch: the data (its split saved in splits.csv, or read back
    from it: a resumed run trains on exactly the images it started with) and its audit, model,
    optimizer, and the state of the last commit (``state``, None for a run from epoch 0).
    Under a distribution plan (kfine.distribute) only its chief writes, each process's train and
    val pipelines are its shard, and run_info.json records the devices."""
    from kfine import distribute

    plan = plan or active()
    chief = plan.chief
    info = distribute.run_info(plan, cfg)
    print(distribute.format_info(info), flush=True)
    fit.setup_backend(cfg)
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
    from kfine.model import weights_info
    chief = plan.chief
    # on resume the weights come from the backup: no download
    model, optimizer, schedule = fit.build_training(replace(cfg, ["model.weights=null"]) if state else cfg, datasets)
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
            start_epoch = fit.epoch_after_stop(cfg, spans, start_epoch - 1)
        if state["finished"] or start_epoch >= cfg.train.epochs:
            print(f"kfine: {run_dir} already finished training ({len(history)} epochs); finishing outputs",
                  flush=True)
            start_epoch = cfg.train.epochs
        else:
            print(f"kfine: resuming at epoch {start_epoch + 1} (phase {fit.phase_at(spans, start_epoch)})", flush=True)
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


# ----------------------------------------------------------------------------- its outputs
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
    saved = read_json(run_dir / "metrics.json", {})
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
            used = read_json(run_dir / "run_info.json", {}).get("model")
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
