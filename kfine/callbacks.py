"""The Keras callbacks of a kfine run; make_callbacks puts them in order.

    StopOnNaN     a non-finite value in the epoch's logs -> TrainingError, before anything of
                  that epoch is saved
    EpochCommit   the epoch's history row, resume backup and checkpoints (kfine.checkpoint)
    EpochLog      one line per epoch: epoch k/N, phase, lr, metrics, seconds (for logs that go to
                  a file: stdout not a terminal, or train.verbose: 2)
    PhaseProgbar  Keras' progress bar, its "Epoch k/N" counted over the whole run
    WandbLog      the epoch's logs to Weights & Biases
    EarlyStop     Keras' EarlyStopping, its patience counted on across a --resume
    EpochSeeds    the model's dropout (SeedGenerator) state drawn from (seed, epoch) at each epoch

Keras' own are used where they fit (EarlyStopping, TensorBoard). TerminateOnNaN is not: it reads
the loss after every batch, a host sync per training step; StopOnNaN reads the epoch's logs, so a
NaN is caught at the end of the epoch in which it appears. Keras' CSVLogger, ModelCheckpoint and
BackupAndRestore are not either: kfine's epoch has one commit point for all three
(kfine.checkpoint), which is what makes a resume exact.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import keras

from kfine.checkpoint import TrainingError, pause_for_test
from kfine.distribute import active
from kfine.schema import Config, to_dict


def current_lr(optimizer, schedule) -> float:
    """The learning rate of the optimizer's last update (``iterations`` counts updates, also under
    gradient accumulation; kfine.optim.EpochSchedule.at_update takes an update number)."""
    update = max(int(keras.ops.convert_to_numpy(optimizer.iterations)) - 1, 0)
    at = getattr(schedule, "at_update", schedule)
    return float(keras.ops.convert_to_numpy(at(update)))


def fit_verbosity(verbose: int) -> int:
    """Keras' ``verbose`` for fit: its progress bar only for train.verbose 1 on a terminal."""
    return 1 if verbose == 1 and sys.stdout.isatty() else 0


class StopOnNaN(keras.callbacks.Callback):
    def __init__(self, phase: int):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        bad = {}
        for k, v in (logs or {}).items():
            try:
                if not math.isfinite(float(v)):
                    bad[k] = float(v)
            except (TypeError, ValueError):
                pass
        if bad:
            self.model.stop_training = True
            raise TrainingError(f"loss became NaN/inf in epoch {epoch + 1} (phase {self.phase}): {bad}; "
                                f"nothing of that epoch was saved. Lower train.schedule.learning_rate "
                                f"or set train.optimizer.clipnorm (see docs/troubleshooting.md#nan-loss)")


class EarlyStop(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping whose count survives ``--resume``: at the start of a phase's fit
    (where Keras resets it) it replays ``earlier``, the history rows of this phase's epochs
    before the resume, so patience runs over the phase's epochs however often it was resumed.
    A new phase starts its count afresh: what trains has changed."""

    def __init__(self, earlier: list[dict], **kwargs):
        super().__init__(restore_best_weights=False, **kwargs)
        self.earlier = earlier

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.monitor_op is None:
            self._set_monitor_op()   # min or max: kfine always passes the mode
        for row in self.earlier:
            if row.get(self.monitor) is not None:
                self.wait += 1
                if self._is_improvement(row[self.monitor], self.best):
                    self.best, self.best_epoch, self.wait = row[self.monitor], row["epoch"], 0


class EpochCommit(keras.callbacks.Callback):
    """The history row (epoch, phase, lr, the epoch's logs) and its commit by ``saver``
    (kfine.checkpoint.CheckpointSaver). Runs after EarlyStopping, so the commit records a stop."""

    def __init__(self, saver, phase: int, schedule, model=None):
        super().__init__()
        self.saver, self.phase, self.schedule = saver, phase, schedule
        self.full = model   # the model to commit when fit() trains another (the head on cached features)

    def on_epoch_end(self, epoch, logs=None):
        full = self.full or self.model
        row = {"epoch": epoch, "phase": self.phase, "lr": current_lr(self.model.optimizer, self.schedule),
               **{k: float(v) for k, v in (logs or {}).items()}}
        self.saver.commit_epoch(full, epoch, self.phase, row, stopped=bool(self.model.stop_training),
                                defer_best=full is not self.model)   # the head on cached features

    def on_train_end(self, logs=None):
        self.saver.end_phase(self.full or self.model)


class MixingSwitch(keras.callbacks.Callback):
    """data.augment.mix_off_epochs: MixUp/CutMix on for epochs [0, ``until``), off after (timm's
    mixup_off_epoch), through the pipeline's boolean tf.Variable. Batches already prefetched when
    it flips keep the old setting (a few at most)."""

    def __init__(self, variable, until: int):
        super().__init__()
        self.variable, self.until = variable, until

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch < self.until)


class EpochSeeds(keras.callbacks.Callback):
    """The model's own random state (the SeedGenerators of its Dropout and any other random
    layer) set at each epoch's start from (run seed, epoch, the generator's place in the model):
    dropout masks are a function of the epoch, like the data pipeline's draws, so a resumed run
    draws what the uninterrupted one did (the resume backup holds weights, not generator state)."""

    def __init__(self, model, seed: int):
        super().__init__()
        weights = {id(v) for v in model.weights}
        self.states = [v for v in model.variables if id(v) not in weights]   # SeedGenerator states
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        import zlib
        for j, v in enumerate(self.states):
            start = zlib.crc32(f"{self.seed}/{epoch}/{j}".encode()) & 0x7FFFFFFF
            v.assign(keras.ops.convert_to_tensor([start, 0], dtype=v.dtype))


class EpochLog(keras.callbacks.Callback):
    """One line per epoch, e.g. ``epoch 3/8  phase 1  lr 0.00091  loss 0.4213  accuracy 0.8750
    val_loss 0.3980  val_accuracy 0.8906  12.4 s``."""

    def __init__(self, total_epochs: int, phase: int, schedule):
        super().__init__()
        self.total, self.phase, self.schedule = total_epochs, phase, schedule
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        parts = [f"epoch {epoch + 1}/{self.total}", f"phase {self.phase}",
                 f"lr {current_lr(self.model.optimizer, self.schedule):.3g}"]
        parts += [f"{k} {float(v):.4f}" for k, v in (logs or {}).items()]
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        print("  ".join(parts), flush=True)


class PhaseProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar with "Epoch k/N" over the whole run: each phase is its own fit(), whose
    ``epochs`` is the phase's end, and Keras prints no such line for a one-epoch fit."""

    def __init__(self, total_epochs: int):
        super().__init__()
        self.total = total_epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total


class WandbLog(keras.callbacks.Callback):
    def __init__(self, wandb):
        super().__init__()
        self.wandb = wandb

    def on_epoch_end(self, epoch, logs=None):
        self.wandb.log({"epoch": epoch, **(logs or {})})


class PauseForTest(keras.callbacks.Callback):
    """Test hook, only with KFINE_TEST_PAUSE=epoch@E: pause after the first batch of epoch E
    (kfine.checkpoint.pause_for_test)."""

    def __init__(self):
        super().__init__()
        self._epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch is not None:
            epoch, self._epoch = self._epoch, None
            pause_for_test(f"epoch@{epoch}")

    @staticmethod
    def wanted() -> bool:
        return os.environ.get("KFINE_TEST_PAUSE", "").startswith("epoch@")


# ----------------------------------------------------------------------------- a phase's callbacks
def make_callbacks(cfg: Config, run_dir: Path, saver, phase: int, schedule, early=None, model=None) -> list:
    """One phase's callbacks, in the order they run at an epoch's end: the NaN check first (nothing
    of a NaN epoch is saved), early stopping before the commit (the commit records the stop), the
    commit (history, backup, checkpoints: kfine.checkpoint), the progress line, TensorBoard, wandb."""
    cbs = [StopOnNaN(phase)] + ([early] if early is not None else [])
    cbs.append(EpochCommit(saver, phase, schedule, model))
    if fit_verbosity(cfg.train.verbose):
        cbs.append(PhaseProgbar(cfg.train.epochs))
    elif cfg.train.verbose:   # stdout is a file (CI, nohup, a cluster job) or verbose: 2
        cbs.append(EpochLog(cfg.train.epochs, phase, schedule))
    chief = active().chief   # kfine.distribute: only process 0 writes
    if chief:
        cbs.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False))
    if cfg.train.wandb.enabled and chief:
        cbs.append(_wandb_callback(cfg, run_dir))
    if PauseForTest.wanted():
        cbs.append(PauseForTest())
    return cbs


def _wandb_callback(cfg: Config, run_dir: Path):
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
