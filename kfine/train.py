"""Train: config -> data -> model -> phases of (freeze, compile, fit) -> evaluate / plots / export.

    python -m kfine.train                                  # the demo (configs/demo.yaml)
    python -m kfine.train --config FILE [key=value ...]    # e.g. train.epochs=5 data.batch_size=32
    python -m kfine.train --resume RUN_DIR                 # continue a killed run where it stopped
    python -m kfine.train --dry-run [--config FILE]        # stages and what each phase trains; no training

A phase is a span of epochs with one freeze spec: ``train.phases[i].start_epoch`` is the 0-based
index of its first epoch; it runs until the next phase's start (or ``train.epochs``). Epoch
numbers everywhere (history.csv, checkpoints, backups) are 0-based epoch indices, as in Keras.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kfine.config import Config, ConfigError, cli_error, load_config, replace, save_config, to_dict
from kfine.rundir import atomic_write_text, read_json, write_json

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, nothing to resume); the message says why."""


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    metrics: dict = field(default_factory=dict)
    model: object = None


# ----------------------------------------------------------------------------- phases
def phase_spans(cfg: Config) -> list[tuple[int, int]]:
    """(first epoch, end epoch exclusive) of each phase; checks the phase list."""
    phases, epochs = cfg.train.phases, cfg.train.epochs
    if not phases:
        raise ConfigError("train.phases: give at least one phase")
    starts = [p.start_epoch for p in phases]
    if starts[0] != 0:
        raise ConfigError(f"train.phases.0.start_epoch must be 0, got {starts[0]}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"train.phases: start_epoch values must increase, got {starts}")
    if starts[-1] >= epochs:
        raise ConfigError(f"train.phases: the last phase starts at epoch {starts[-1]} but "
                          f"train.epochs is {epochs}; raise train.epochs or drop the phase")
    ends = starts[1:] + [epochs]
    return list(zip(starts, ends))


def phase_at(spans: list[tuple[int, int]], epoch: int) -> int:
    for i, (a, b) in enumerate(spans):
        if a <= epoch < b:
            return i
    return len(spans) - 1


# ----------------------------------------------------------------------------- run directory
def prepare_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """runs/<name>; if it exists, runs/<name>-2, -3, ... (a finished run is never overwritten)."""
    base = cfg.run_dir
    if overwrite and base.exists():
        shutil.rmtree(base)
    run_dir, i = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        i += 1
        run_dir = base.with_name(f"{base.name}-{i}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in ("epoch", "phase") else float(v)) for k, v in r.items() if v != ""}
            for r in rows]


def write_history(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = [",".join(keys)] + [",".join(_fmt(r.get(k, "")) for k in keys) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- callbacks
def make_callbacks(cfg: Config, run_dir: Path, history: list[dict], phase: int, schedule,
                   keep_checkpoints: bool = True):
    """The per-epoch bookkeeping: history.csv, backups for resume, checkpoints, logs."""
    import keras
    import numpy as np

    class EpochRecorder(keras.callbacks.Callback):
        """Appends to history.csv and writes the resume backup at the end of every epoch."""

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            if any(not np.isfinite(v) for v in logs.values() if isinstance(v, float)):
                self.model.stop_training = True
                raise TrainingError(f"loss became NaN/inf at epoch {epoch} ({logs}); lower "
                                    f"train.schedule.learning_rate or set train.optimizer.clipnorm")
            opt = self.model.optimizer
            lr = float(keras.ops.convert_to_numpy(schedule(max(int(opt.iterations.numpy()) - 1, 0))))
            row = {"epoch": epoch, "phase": phase, "lr": lr, **{k: float(v) for k, v in logs.items()}}
            history[:] = [r for r in history if r["epoch"] < epoch] + [row]
            write_history(run_dir / "history.csv", history)
            if keep_checkpoints:
                save_checkpoints(cfg, run_dir, self.model, epoch, history)
                save_backup(run_dir, self.model, epoch + 1)

    class NaNGuard(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.model.stop_training = True
                raise TrainingError(f"loss became NaN/inf in phase {phase}, batch {batch}; lower "
                                    f"train.schedule.learning_rate or set train.optimizer.clipnorm")

    cbs = [NaNGuard(), EpochRecorder(),
           keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False)]
    if cfg.train.wandb.enabled:
        cbs.append(_wandb_callback(cfg, run_dir))
    return cbs


def _wandb_callback(cfg: Config, run_dir: Path):
    import keras
    try:
        import wandb
    except ImportError:
        print("kfine: train.wandb.enabled is set but wandb is not installed (pip install wandb); "
              "logging to TensorBoard and CSV only.", flush=True)
        return keras.callbacks.Callback()
    if wandb.run is None:
        wandb.init(project=cfg.train.wandb.project, entity=cfg.train.wandb.entity, name=run_dir.name,
                   config=to_dict(cfg), dir=str(run_dir))

    class WandbLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            wandb.log({"epoch": epoch, **(logs or {})})

    return WandbLogger()


def _monitor_mode(cfg: Config) -> str:
    c = cfg.train.checkpoint
    if c.mode != "auto":
        return c.mode
    return "max" if any(s in c.monitor for s in ("acc", "auc", "precision", "recall", "f1")) else "min"


def save_checkpoints(cfg: Config, run_dir: Path, model, epoch: int, history: list[dict]) -> None:
    """best.keras when the monitored metric improves, epoch_XXXX.keras every ``every_epochs``
    epochs (keeping the newest ``keep``). Each write is atomic. The last epoch's state is the
    resume backup (backup/, written every epoch) and, at the end, model.keras."""
    c = cfg.train.checkpoint
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    values = [r[c.monitor] for r in history if c.monitor in r]
    if values:
        best = max(values) if _monitor_mode(cfg) == "max" else min(values)
        if values[-1] == best and history[-1].get(c.monitor) == best:
            _save_model_atomic(model, ckpt / "best.keras")
            write_json(ckpt / "best.json", {"epoch": epoch, c.monitor: best})
    if c.every_epochs and (epoch + 1) % c.every_epochs == 0:
        _save_model_atomic(model, ckpt / f"epoch_{epoch:04d}.keras")
        periodic = sorted(ckpt.glob("epoch_*.keras"))
        for old in periodic[: max(0, len(periodic) - max(c.keep, 1))]:
            old.unlink()


def _save_model_atomic(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def save_backup(run_dir: Path, model, next_epoch: int) -> None:
    """Everything --resume needs: weights, optimizer variables, the next epoch. state.json is
    written last and names the files, so a kill at any moment leaves a consistent backup."""
    import numpy as np
    backup = run_dir / "backup"
    backup.mkdir(exist_ok=True)
    # Plain arrays in model.weights / optimizer.variables order (the resumed run builds the same
    # model from the same config): ~7x faster than save_weights, which also writes the optimizer.
    weights = backup / f"epoch_{next_epoch:04d}.weights.npz"
    opt_file = backup / f"epoch_{next_epoch:04d}.optimizer.npz"
    for path, variables in ((weights, model.weights), (opt_file, _inner(model.optimizer).variables)):
        with open(path, "wb") as f:
            np.savez(f, *[np.asarray(v.numpy()) for v in variables])
    write_json(backup / "state.json", {"next_epoch": next_epoch, "weights": weights.name,
                                       "optimizer": opt_file.name})
    for old in backup.glob("epoch_*"):
        if old.name not in (weights.name, opt_file.name):
            old.unlink()


def _inner(optimizer):
    """The optimizer that holds the state (unwraps Keras' LossScaleOptimizer)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def load_backup(run_dir: Path, model, optimizer) -> int:
    import numpy as np
    state_file = run_dir / "backup" / "state.json"
    if not state_file.exists():
        raise TrainingError(f"{run_dir} has no backup/state.json: nothing to resume (it was "
                            f"killed before its first epoch ended); start it again instead")
    state = read_json(state_file)
    for key, variables in (("weights", model.weights), ("optimizer", optimizer.variables)):
        with np.load(run_dir / "backup" / state[key]) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
        if [tuple(v.shape) for v in variables] != [a.shape for a in values]:
            raise TrainingError(f"the {key} backup in {run_dir / 'backup'} does not match the model and "
                                f"optimizer built from {run_dir / 'config.yaml'}")
        for v, val in zip(variables, values):
            v.assign(val)
    return int(state["next_epoch"])


# ----------------------------------------------------------------------------- training
def compile_model(model, optimizer, cfg: Config, num_classes: int) -> None:
    from kfine.optim import make_loss, make_metrics
    metrics = make_metrics(num_classes)   # sparse or soft (MixUp/CutMix) labels
    if hasattr(optimizer, "set_active_variables"):   # one optimizer, this phase's variables (JAX)
        optimizer.set_active_variables(model.trainable_variables)
    model.compile(optimizer=optimizer, loss=make_loss(cfg.train.label_smoothing, num_classes),
                  metrics=metrics)


def trainable_union(model, backbone_name: str, cfg: Config) -> list:
    """Every variable that some phase trains, in model order (what the optimizer is built over)."""
    from kfine.freeze import apply_freeze
    ids = set()
    for phase in cfg.train.phases:
        apply_freeze(model, backbone_name, phase.freeze)
        ids |= {id(v) for v in model.trainable_variables}
    apply_freeze(model, backbone_name, cfg.train.phases[0].freeze)
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

    ``callbacks`` are added to every phase's fit (the tuner's); ``keep_checkpoints=False`` skips
    checkpoints and resume backups (a tuner trial is resumed by the tuner, not by epoch)."""
    import keras
    from kfine.freeze import apply_freeze, format_summary, trainable_summary

    spans = phase_spans(cfg)
    history = history if history is not None else []
    num_classes = len(datasets.class_names)
    phases_log = read_json(run_dir / "phases.json") if (run_dir / "phases.json").exists() else []
    cw = class_weights(cfg, datasets.counts, datasets.class_names)
    # A fixed number of steps over a repeated dataset: Keras counts an extra optimizer iteration per
    # epoch on a dataset of unknown size (ours: ignore_errors), which would shift the LR schedule.
    train_ds, steps = datasets.train.repeat(), steps_per_epoch(cfg, datasets)
    early = None
    for i, (phase, (first, end)) in enumerate(zip(cfg.train.phases, spans)):
        if end <= start_epoch:
            continue
        first = max(first, start_epoch)
        apply_freeze(model, cfg.model.backbone, phase.freeze)
        rows = trainable_summary(model, cfg.model.backbone)
        print(f"\nkfine: phase {i} (epochs {first}..{end - 1}): freeze {phase.freeze.strategy}"
              f"{_freeze_detail(phase.freeze)}\n{format_summary(rows)}", flush=True)
        phases_log = [p for p in phases_log if p["index"] < i] + [
            {"index": i, "start_epoch": first, "end_epoch": end, "freeze": to_dict(phase.freeze), "summary": rows}]
        write_json(run_dir / "phases.json", phases_log)
        compile_model(model, optimizer, cfg, num_classes)
        phase_callbacks = make_callbacks(cfg, run_dir, history, i, schedule, keep_checkpoints) + list(callbacks)
        if cfg.train.early_stopping.patience:
            early = early or keras.callbacks.EarlyStopping(
                monitor=cfg.train.early_stopping.monitor, patience=cfg.train.early_stopping.patience,
                min_delta=cfg.train.early_stopping.min_delta, restore_best_weights=False)
            phase_callbacks.append(early)
        with warnings.catch_warnings():   # the val set has no known size: Keras warns at its end
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(train_ds, validation_data=datasets.val, initial_epoch=first, epochs=end,
                      steps_per_epoch=steps, class_weight=cw, shuffle=False,   # tf.data shuffles
                      callbacks=phase_callbacks, verbose=cfg.train.verbose)
        if early is not None and early.stopped_epoch > 0:
            print(f"kfine: early stopping at epoch {early.stopped_epoch} "
                  f"({cfg.train.early_stopping.monitor} stopped improving)", flush=True)
            break
    return history


def _freeze_detail(spec) -> str:
    return {"fraction": f" (fraction {spec.fraction})", "stages": f" (trainable from {spec.trainable_from})",
            "regex": f" (pattern {spec.pattern!r})",
            "lora": f" (rank {spec.lora_rank}, alpha {spec.lora_alpha or spec.lora_rank}, "
                    f"stages {list(spec.lora_stages) or 'all'})"}.get(spec.strategy, "")


def steps_per_epoch(cfg: Config, datasets) -> int:
    n = sum(datasets.counts.get("train", {}).values())
    if not n:   # unknown size (a tfds split without metadata): count batches once
        return max(1, sum(1 for _ in datasets.train))
    steps = math.ceil(n / cfg.data.batch_size)
    return min(steps, cfg.train.steps_per_epoch) if cfg.train.steps_per_epoch else steps


def setup_backend(cfg: Config) -> None:
    import keras
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(cfg.train.precision)


def build_training(cfg: Config, datasets):
    """Model, optimizer (built over every variable any phase trains) and LR schedule."""
    from kfine.model import build_model
    from kfine.optim import build_optimizer, make_schedule, variable_multipliers
    model = build_model(cfg.model, len(datasets.class_names), cfg.data.image_size)
    schedule = make_schedule(cfg.train.schedule, steps_per_epoch(cfg, datasets), cfg.train.epochs)
    variables = trainable_union(model, cfg.model.backbone, cfg)
    mults = variable_multipliers(model, cfg.model.backbone, cfg.train.lr_multipliers, variables)
    optimizer = build_optimizer(cfg.train.optimizer, schedule, variables, mults)
    return model, optimizer, schedule


def run(cfg: Config, resume: Path | None = None, overwrite: bool = False) -> RunResult:
    """One whole run: everything lands in the run directory."""
    from kfine import data as kdata

    spans = phase_spans(cfg)   # check the phase list before spending time on data
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = prepare_run_dir(cfg, overwrite)
        save_config(cfg, run_dir / "config.yaml")
    print(f"kfine: run directory {run_dir}", flush=True)
    setup_backend(cfg)

    if cfg.data.check and resume is None:
        report = kdata.check_data(cfg.data, cfg.seed, image_size=cfg.data.image_size)
        write_json(run_dir / "data_check.json", report)
        print(kdata.format_check(report), flush=True)
    datasets = kdata.make_datasets(cfg.data, cfg.seed)
    write_json(run_dir / "class_names.json", datasets.class_names)
    if datasets.skipped:
        atomic_write_text(run_dir / "skipped_files.txt",
                          "".join(f"{p}\t{why}\n" for p, why in datasets.skipped))
        print(f"kfine: skipped {len(datasets.skipped)} unreadable images "
              f"(listed in {run_dir / 'skipped_files.txt'})", flush=True)

    # on resume the weights come from the backup: no download
    model, optimizer, schedule = build_training(replace(cfg, ["model.weights=null"]) if resume else cfg, datasets)

    start_epoch, history = 0, []
    if resume is not None:
        start_epoch = load_backup(run_dir, model, optimizer)
        history = [r for r in read_history(run_dir / "history.csv") if r["epoch"] < start_epoch]
        if start_epoch >= cfg.train.epochs:
            print(f"kfine: {run_dir} already finished its {cfg.train.epochs} epochs; finishing outputs", flush=True)
        else:
            print(f"kfine: resuming at epoch {start_epoch} (phase {phase_at(spans, start_epoch)})", flush=True)

    history = fit_phases(model, cfg, datasets, run_dir, start_epoch, history, optimizer, schedule)
    _save_model_atomic(model, run_dir / "model.keras")
    result = RunResult(run_dir=run_dir, history=history, model=model)
    finish_run(cfg, run_dir, model, datasets, result)
    print(f"kfine: done. Outputs in {run_dir}/ (model.keras, history.csv, plots/, metrics.json, "
          f"report.html{', export/' if cfg.export.enabled else ''})", flush=True)
    return result


def finish_run(cfg: Config, run_dir: Path, model, datasets, result: RunResult) -> None:
    """Evaluation, plots, report and export: each optional module is used when present."""
    try:
        from kfine import plots
        plots.plot_history(run_dir / "history.csv", run_dir / "plots" / "history.png",
                           phases=read_json(run_dir / "phases.json"))
    except ImportError:
        pass
    try:
        from kfine import evaluate
    except ImportError:
        evaluate = None
    if evaluate is not None:
        split = "test" if datasets.test is not None else "val"
        if getattr(datasets, split) is not None:
            result.metrics = evaluate.evaluate_run(run_dir, model=model, datasets=datasets, split=split)
    if cfg.export.enabled:
        try:
            from kfine import export
        except ImportError:
            export = None
        if export is not None:
            export.export_model(model, datasets.class_names, cfg.data.image_size, run_dir / "export",
                                formats=cfg.export.formats)
    try:
        from kfine import report
        report.write_report(run_dir)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (default: the demo, configs/demo.yaml)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last finished epoch")
    ap.add_argument("--overwrite", action="store_true", help="replace runs/<name> instead of runs/<name>-2")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the model's stages and what each phase trains; train nothing, write nothing")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=5 data.batch_size=32")
    args = ap.parse_args(argv)
    try:
        if args.dry_run:
            from kfine.model import describe_config
            path = Path(args.resume) / "config.yaml" if args.resume else (args.config or DEMO_CONFIG)
            cfg = load_config(path, args.overrides)
            phase_spans(cfg)
            print(describe_config(cfg))
            return 0
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").exists():
                raise TrainingError(f"{run_dir} is not a kfine run directory (no config.yaml)")
            cfg = load_config(run_dir / "config.yaml", args.overrides)
            run(cfg, resume=run_dir)
        else:
            cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
            run(cfg, overwrite=args.overwrite)
    except (ConfigError, TrainingError, ValueError, FileNotFoundError) as e:
        return cli_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
