"""What a run keeps of each epoch, written so that a kill at any moment loses at most the epoch
in progress: history, checkpoints, the resume backup, and the run directory's lock.

    runs/<name>/
      history.csv                  one row per committed epoch
      checkpoints/best.keras       the best epoch so far by train.checkpoint.monitor (+ best.json)
      checkpoints/epoch_EEEE.keras every train.checkpoint.every_epochs epochs (newest `keep`;
                                   the last epoch's is model.keras)
      backup/state.json            THE commit: next epoch, the history, the array files below
      backup/frozen_pPP_eEEEE.npz  variables that cannot change in phase PP (frozen layers and
                                   their optimizer slots): written once per phase
      backup/epoch_EEEE.npz        every other variable (model, optimizer, loss scale) after EEEE
      .lock                        the PID of the process that trains in the directory

One commit point per epoch. At the end of epoch E the training thread only copies the values
that changed to host memory; a background thread then writes, in this order:
  1. the arrays (backup/*.npz, each atomically),
  2. backup/state.json naming them, with next_epoch = E + 1 and the history: the commit,
  3. the checkpoints due at E (from the host copy, through an inference clone of the model, to
     ``checkpoints/.e0003.tmpPID.keras`` and renamed into place), best.json, history.csv; older
     backup files removed.
Training goes on meanwhile; the next epoch's end waits for this one's writes (one in flight).
Killed before 2, ``--resume`` repeats epoch E (or, with no commit at all, starts the run over in
place); killed after it, ``--resume`` restores epoch E's state and first writes what 3 did not
(history.csv from state.json, epoch E's checkpoints from the restored model): an epoch is either
committed, with everything that follows from it, or repeated.

In a phase whose head trains on cached features (kfine.features) an epoch takes milliseconds and
writing the whole model as best.keras each time the monitor improves would be most of the phase.
There best.keras is written once, at the phase's end (or when training stops), from the host copy
of the best epoch: until then the commit keeps that epoch's arrays (state.json's
``best_pending``), so a kill in between loses nothing: ``--resume`` writes best.keras from them.

Checkpoints and model.keras are for inference: the model without optimizer state, unless
``train.checkpoint.save_optimizer`` (then a checkpoint is the model itself with its optimizer,
saved on the training thread). The backup holds the only copy of the optimizer state. When
the run has finished (model.keras written) the backup's arrays are deleted and state.json says
``finished``: model.keras holds the same weights and nothing trains on; ``--resume`` of a finished
run loads model.keras and redoes the outputs (evaluation, plots, report, export).

Arrays are keyed by name, never by position: ``model/<variable.path>``, ``optimizer/<variable.name>``
and ``loss_scale/<name>`` (mixed_float16's dynamic loss scale, kept across phases and resumes), so
a backup loaded into a model that gained or lost a variable (LoRA, EMA) fails naming it.
"""
from __future__ import annotations

import concurrent.futures
import csv
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from kfine.rundir import atomic_path, read_json, write_csv, write_json
from kfine.schema import Config, ConfigError

BACKUP, CHECKPOINTS, STATE, LOCK = "backup", "checkpoints", "state.json", ".lock"

# Optimizer slots that change only when their own variable trains (the update_step state of SGD,
# Adam, AdamW and RMSprop, named "<variable path with _>_<slot>" by Keras). Everything else an
# optimizer holds (step counter, EMA averages, gradient accumulators) counts as changing.
PER_VARIABLE_SLOTS = ("momentum", "velocity", "velocity_hat", "average_gradient")

# What an interrupted write leaves: .NAME.tmpPID[.ext] (kfine.rundir.atomic_path and checkpoint
# temporaries), export/saved_model/.tmp-*/ and .1.oldPID/ (kfine.export).
_TEMP_NAME = re.compile(r"^\.(.+\.tmp\d+(\..*)?|tmp-.*|.+\.old\d+)$")


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a busy or unusable run directory); the message says why."""


# ----------------------------------------------------------------------------- history
def read_history(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in ("epoch", "phase") else float(v)) for k, v in r.items() if v != ""}
            for r in rows]


def write_history(path: Path, rows: list[dict]) -> None:
    write_csv(path, rows)


def best_epoch(history: list[dict], monitor: str, mode: str) -> int | None:
    """The epoch with the best ``monitor`` value (a later epoch wins a tie), None if never logged."""
    rows = [r for r in history if monitor in r]
    if not rows:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(rows, key=lambda r: (sign * r[monitor], r["epoch"]))["epoch"]


MAX_METRICS = ("acc", "auc", "precision", "recall", "f1")   # a metric name holding one of these: higher is better


def monitor_direction(name: str, mode: str | None = None) -> str:
    """Whether a logged metric improves upward ("max") or downward ("min"): ``mode`` when it is
    min or max, else (auto, None) max for accuracy-like names (MAX_METRICS, any case), min for the
    rest. The one rule for checkpoints, early stopping and the tuner's objective."""
    if mode in ("min", "max"):
        return mode
    return "max" if any(s in name.lower() for s in MAX_METRICS) else "min"


def monitor_mode(cfg) -> str:
    """``train.checkpoint.mode`` / ``train.early_stopping.mode`` with its monitor (monitor_direction)."""
    return monitor_direction(cfg.monitor, cfg.mode)


# ----------------------------------------------------------------------------- variables by name
def keyed_variables(model, optimizer=None) -> dict:
    """Every variable a backup holds, by a name stable across processes: ``model/<path>``,
    ``optimizer/<name>``, ``loss_scale/<name>``. A name used twice gets ``#2``, ``#3``, ..."""
    out: dict = {}

    def add(key, v):
        k, n = key, 2
        while k in out:
            k, n = f"{key}#{n}", n + 1
        out[k] = v

    for v in model.weights:
        add(f"model/{v.path}", v)
    if optimizer is not None:
        inner = getattr(optimizer, "inner_optimizer", None)
        inner_ids = {id(v) for v in inner.variables} if inner is not None else None
        for v in optimizer.variables:
            owner = "optimizer" if inner_ids is None or id(v) in inner_ids else "loss_scale"
            add(f"{owner}/{v.name}", v)
    return out


def frozen_keys(model, keyed: dict) -> set[str]:
    """Keys of the variables that cannot change while ``model`` trains with its current trainable
    flags: weights of frozen layers (a frozen BatchNorm runs in inference mode, so its statistics
    stay) and their per-variable optimizer slots. A trainable layer's statistics change."""
    changing = {id(v) for v in model.trainable_variables}
    for layer in _leaf_layers(model):
        if layer.trainable:
            changing |= {id(v) for v in layer.weights}
    frozen = [v for v in model.weights if id(v) not in changing]
    ids = {id(v) for v in frozen}
    slots = {f"optimizer/{v.path.replace('/', '_')}_{s}" for v in frozen for s in PER_VARIABLE_SLOTS}
    return {k for k, v in keyed.items() if id(v) in ids or k in slots}


def _leaf_layers(layer):
    children = getattr(layer, "layers", None)
    if children:
        for child in children:
            yield from _leaf_layers(child)
    else:
        yield layer


def assign_by_key(keyed: dict, arrays: dict, where: str) -> None:
    """Assign ``arrays[key]`` to each variable of ``keyed``: every key must be in both, with the
    same shape, or nothing is assigned and the error names the keys."""
    missing, extra = sorted(set(keyed) - set(arrays)), sorted(set(arrays) - set(keyed))
    if missing or extra:
        parts = ([f"not in it: {_few(missing)}"] if missing else []) + (
            [f"not in the model or optimizer: {_few(extra)}"] if extra else [])
        raise TrainingError(f"{where} does not match the model and optimizer built from the run's "
                            f"config ({'; '.join(parts)})")
    bad = [f"{k} {tuple(arrays[k].shape)} != {tuple(v.shape)}" for k, v in keyed.items()
           if tuple(arrays[k].shape) != tuple(v.shape)]
    if bad:
        raise TrainingError(f"{where} does not match the model and optimizer built from the run's "
                            f"config (saved shape != built shape: {_few(bad)})")
    for k, v in keyed.items():
        v.assign(arrays[k])


def _few(items, n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _to_numpy(v) -> np.ndarray:
    """A host copy of ``v`` that training cannot change (it goes on while the copy is written)."""
    import keras
    a = keras.ops.convert_to_numpy(v)
    return a if a.flags.owndata else np.array(a)


# ----------------------------------------------------------------------------- the saver
class _Frozen:
    """One phase's frozen variables: their file, keys and host copies (taken once per phase)."""

    def __init__(self, phase: int, name: str, arrays: dict):
        self.phase, self.name, self.arrays, self.written = phase, name, arrays, False


class CheckpointSaver:
    """The per-epoch bookkeeping of one run, as the module docstring describes: call
    ``commit_epoch`` at each epoch's end, ``close`` at the end (waits for the writes).
    ``keep_files=False`` writes history.csv only (a tuner trial: no backup, no checkpoints);
    ``writes=False`` nothing at all (a process other than the chief of a distributed run: it
    keeps the history in memory only).

    On the training thread only the host copy of what changed; on the writer thread the files,
    and the checkpoints through a shadow: a clone of the model for inference, built once, whose
    variables are set from the copy, so ``model`` can train on while its checkpoint is written.
    With ``checkpoint.save_optimizer`` a checkpoint is the model itself, saved on the training
    thread (the optimizer's state is part of it)."""

    def __init__(self, run_dir: Path, cfg, epochs: int, history: list[dict] | None = None,
                 keep_files: bool = True, writes: bool = True):
        self.run_dir, self.cfg, self.epochs = Path(run_dir), cfg, epochs
        self.history = list(history or [])
        self.keep_files, self.writes = keep_files and writes, writes
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "kfine-checkpoint") if self.keep_files else None
        self._pending = None
        self._frozen: _Frozen | None = None
        self._view = None     # the model for inference (inference_view)
        self._shadow = None   # its clone and the clone's variables by key, for checkpoints
        self._best = None     # best.keras not written yet (a phase on cached features): its epoch, files, arrays

    # -- at each epoch's end, on the training thread
    def commit_epoch(self, model, epoch: int, phase: int, row: dict, stopped: bool = False,
                     defer_best: bool = False) -> None:
        """``defer_best``: the phase trains on cached features; best.keras waits for its end."""
        self.history = [r for r in self.history if r["epoch"] < epoch] + [row]
        if not self.keep_files:
            if self.writes:
                write_history(self.run_dir / "history.csv", self.history)
            return
        keyed = keyed_variables(model, model.optimizer)
        if self._frozen is None or self._frozen.phase != phase:
            self._frozen = _Frozen(phase, f"frozen_p{phase:02d}_e{epoch:04d}.npz",
                                   {k: _to_numpy(keyed[k]) for k in frozen_keys(model, keyed)})
        changed = {k: _to_numpy(v) for k, v in keyed.items() if k not in self._frozen.arrays}
        names, tmp = self.due(epoch), None
        files = [self._frozen.name, f"epoch_{epoch:04d}.npz"]
        # train.ema: checkpoints hold the averaged weights (the backup keeps the raw ones)
        ema = {f"model/{v.path}": _to_numpy(a) for v, a in ema_pairs(model)} if names else {}
        if "best.keras" in names and defer_best and not self.cfg.save_optimizer and not ema:
            names.remove("best.keras")
            self._best = (epoch, files, {**self._frozen.arrays, **changed})
        if names and self.cfg.save_optimizer:
            tmp = self._save_temporary(model, epoch)
        elif (names or self._best) and self._view is None:
            self._view = inference_view(model)
        state = {"next_epoch": epoch + 1, "files": files, "stopped": bool(stopped), "finished": False,
                 "history": self.history}
        if self._best is not None:
            state["best_pending"] = {"epoch": self._best[0], "files": self._best[1]}
        self._wait()   # the previous epoch's writes: one epoch in flight at most
        self._pending = self._pool.submit(self._write_commit, state, self._frozen, changed, names, tmp, ema)

    def flush_best(self) -> None:
        """Write the best.keras a phase on cached features deferred (on the writer thread)."""
        if self._best is None:
            return
        (epoch, _, arrays), history = self._best, self.history
        self._best = None
        self._wait()
        self._pending = self._pool.submit(self._write_best, arrays, epoch, history)

    def end_phase(self, model) -> None:
        """At a phase's end: check that what was written once for the phase did not change. A
        layer that updated its variables while ``trainable`` was False would make a resume
        silently wrong; this makes it loud (one host copy of the frozen variables per phase)."""
        if not self.keep_files or self._frozen is None:
            return
        self.flush_best()
        keyed = keyed_variables(model, model.optimizer)
        moved = [k for k, a in self._frozen.arrays.items()
                 if not np.array_equal(_to_numpy(keyed[k]), a, equal_nan=True)]
        if moved:
            raise TrainingError(f"variables of layers frozen in phase {self._frozen.phase} changed during "
                                f"it: {_few(moved)}; kfine.checkpoint.frozen_keys must count them as changing")

    def close(self) -> None:
        """Wait for the last writes (raising their error, if any) and stop the writer thread; a
        best.keras still deferred (training stopped inside a phase, e.g. by Ctrl-C) is written."""
        if self._pool is None:
            return
        try:
            self.flush_best()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        job, self._pending = self._pending, None
        if job is not None:
            job.result()

    # -- on the writer thread
    def _write_commit(self, state: dict, frozen: _Frozen, changed: dict, names: list, tmp, ema: dict) -> None:
        backup, epoch = self.run_dir / BACKUP, state["next_epoch"] - 1
        if not frozen.written:
            _write_npz(backup / frozen.name, frozen.arrays)
            frozen.written = True
        _write_npz(backup / state["files"][1], changed)
        pause_for_test(f"before_commit@{epoch}")
        write_json(backup / STATE, state)                       # the commit
        pause_for_test(f"after_commit@{epoch}")
        if names and tmp is None:
            tmp = self._save_shadow({**frozen.arrays, **changed, **ema}, epoch)
        self._publish(tmp, names, epoch, state["history"])
        write_history(self.run_dir / "history.csv", state["history"])
        keep = set(state["files"]) | set(state.get("best_pending", {}).get("files", ()))
        for old in backup.glob("*.npz"):
            if old.name not in keep:
                old.unlink()

    def _write_best(self, arrays: dict, epoch: int, history: list[dict]) -> None:
        self._publish(self._save_shadow(arrays, epoch), ["best.keras"], epoch, history)

    def _save_shadow(self, arrays: dict, epoch: int) -> Path:
        """The checkpoint of epoch ``epoch`` from its host copy, through a clone of the model for
        inference (built once, here), so that the model trains on meanwhile."""
        if self._shadow is None:
            import keras
            shadow = keras.models.clone_model(self._view)
            keyed = keyed_variables(shadow)
            missing = sorted(set(keyed) - set(arrays))
            if missing:   # a layer that does not clone by name: never save a checkpoint that is not the model
                raise TrainingError(f"cannot write checkpoints of this model: its clone has {_few(missing)}")
            self._shadow = shadow, keyed
        shadow, keyed = self._shadow
        for k, v in keyed.items():
            v.assign(arrays[k])
        return self._save_temporary(shadow, epoch, view=False)

    # -- checkpoints
    def due(self, epoch: int) -> list[str]:
        """The checkpoint files epoch ``epoch`` should have, given the history so far."""
        c, names = self.cfg, []
        if best_epoch(self.history, c.monitor, monitor_mode(c)) == epoch:
            names.append("best.keras")
        if c.every_epochs and (epoch + 1) % c.every_epochs == 0 and epoch + 1 < self.epochs:
            names.append(f"epoch_{epoch:04d}.keras")
        return names

    def _save_temporary(self, model, epoch: int, view: bool = True, optimizer=None) -> Path:
        from kfine.optim import ema_weights
        tmp = self.run_dir / CHECKPOINTS / f".e{epoch:04d}.tmp{os.getpid()}.keras"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with ema_weights(model, optimizer):   # train.ema: the averaged weights (a no-op otherwise)
            (inference_view(model) if view and not self.cfg.save_optimizer else model).save(tmp)
        return tmp

    def _publish(self, tmp: Path | None, names: list, epoch: int, history: list[dict]) -> None:
        """Rename a checkpoint temporary into its places (hard links: one write for best and
        periodic), best.json, and keep the newest ``keep`` periodic ones."""
        if tmp is None:
            return
        ckpt = self.run_dir / CHECKPOINTS
        for name in names:
            with atomic_path(ckpt / name, ".keras") as t:
                _link_or_copy(tmp, t)
        tmp.unlink(missing_ok=True)
        if "best.keras" in names:
            row = next(r for r in history if r["epoch"] == epoch)
            write_json(ckpt / "best.json", {"epoch": epoch, self.cfg.monitor: row[self.cfg.monitor]})
        periodic = sorted(ckpt.glob("epoch_*.keras"))
        for old in periodic[: max(0, len(periodic) - max(self.cfg.keep, 1))]:
            old.unlink()

    # -- --resume
    def catch_up(self, model, optimizer=None) -> None:
        """--resume: write what the last commit promised but a kill may have cut short, from the
        restored state (``model`` holds the history's last epoch): history.csv and that epoch's
        checkpoints. ``optimizer``: the run's, restored with the model; ``model`` is not compiled
        yet, so with train.ema the averages the checkpoints hold (as commit_epoch's do) are its.
        A finished run's model holds model.keras, whose optimizer state is spent: no averages."""
        if not self.keep_files or not self.history:
            return
        write_history(self.run_dir / "history.csv", self.history)
        epoch, ckpt = self.history[-1]["epoch"], self.run_dir / CHECKPOINTS
        state = read_state(self.run_dir) or {}
        pending = state.get("best_pending")
        if pending and read_json(ckpt / "best.json", {}).get("epoch") != pending["epoch"]:
            self._view = self._view or inference_view(model)   # best.keras a cached phase deferred
            self._write_best(_read_arrays(self.run_dir, pending["files"]), pending["epoch"], self.history)
        best = read_json(ckpt / "best.json", {})
        have = {"best.keras": best.get("epoch") == epoch and (ckpt / "best.keras").exists()}
        missing = [n for n in self.due(epoch) if not have.get(n, (ckpt / n).exists())]
        if missing:
            tmp = self._save_temporary(model, epoch, optimizer=None if state.get("finished") else optimizer)
            self._publish(tmp, missing, epoch, self.history)


def ema_pairs(model) -> list:
    """(model variable, its EMA average) when the model's optimizer keeps an EMA (train.ema)."""
    from kfine.optim import inner_optimizer
    opt = inner_optimizer(getattr(model, "optimizer", None))
    return opt.ema_pairs() if hasattr(opt, "ema_pairs") else []


def inference_view(model):
    """A functional model over the same layers and variables as ``model`` that was never compiled:
    saved, it holds the weights and no optimizer state (Keras 3 ignores include_optimizer)."""
    import keras
    return keras.Model(model.inputs, model.outputs, name=model.name)


def save_model(model, path: Path) -> None:
    """``model`` for inference (no optimizer state) as a .keras file, atomically."""
    with atomic_path(path, ".keras") as tmp:
        inference_view(model).save(tmp)


def link_model(src: Path, path: Path) -> None:
    """``path`` as a hard link to (or copy of) the .keras file ``src``, atomically."""
    with atomic_path(path, ".keras") as tmp:
        _link_or_copy(src, tmp)


def _write_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:   # a file system without hard links
        shutil.copyfile(src, dst)


# ----------------------------------------------------------------------------- resume
def read_state(run_dir: Path) -> dict | None:
    """The last commit of ``run_dir`` (backup/state.json), or None if no epoch was committed."""
    return read_json(Path(run_dir) / BACKUP / STATE, None)


def load_backup(run_dir: Path, model, optimizer) -> dict:
    """Assign the last commit's arrays to ``model`` and ``optimizer``; returns the state
    (next_epoch, history, ...). A finished run's weights come from model.keras instead."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    if state is None:
        raise TrainingError(f"{run_dir} has no {BACKUP}/{STATE}: no epoch of it was committed")
    if "files" not in state:
        raise TrainingError(f"{run_dir / BACKUP} was written by an older kfine (arrays by position, "
                            f"not by name) and cannot be resumed; start the run again")
    if state.get("finished"):
        load_weights(run_dir / "model.keras", model)
        return state
    assign_by_key(keyed_variables(model, optimizer), _read_arrays(run_dir, state["files"]),
                  f"the backup in {run_dir / BACKUP}")
    return state


def _read_arrays(run_dir: Path, files: list) -> dict:
    arrays = {}
    for name in files:
        with np.load(Path(run_dir) / BACKUP / name) as data:
            arrays.update({k: data[k] for k in data.files})
    return arrays


def load_model(path: Path):
    """The .keras model at ``path`` (kfine's layers registered), not compiled: for inference."""
    import keras
    import kfine.model  # noqa: F401  (registers kfine>Preprocess)
    return keras.saving.load_model(path, compile=False)


def load_weights(path: Path, model) -> None:
    """The weights of the .keras file ``path`` (a model of ``model``'s architecture, as kfine saves
    it: inference_view or its clone) assigned to ``model``'s own variables in place: read from the
    file's weights, no second model deserialized and built. A file of another architecture fails
    loudly (Keras: a layer or variable it does not have)."""
    import tempfile
    import zipfile
    with zipfile.ZipFile(path) as z, tempfile.TemporaryDirectory() as tmp:
        # Keras reads a .keras file's weights by seeking inside the zip (a CRC per read: ~3x
        # load_model's time for ResNet50); the weights file taken out first reads at disk speed
        weights = Path(tmp) / "model.weights.h5"
        weights.write_bytes(z.read("model.weights.h5"))
        try:
            inference_view(model).load_weights(weights)   # the same layers and variables as ``model``
        except ValueError as e:
            raise TrainingError(f"{path} does not hold weights of this model's architecture: {e}") from None


def finish_backup(run_dir: Path) -> None:
    """Once model.keras is written: mark the last commit finished and delete the backup's
    arrays (model.keras holds the weights; the optimizer state has nothing left to train)."""
    state = read_state(run_dir)
    if state is None:
        return
    state = {k: v for k, v in state.items() if k != "best_pending"}   # best.keras is written by now
    write_json(Path(run_dir) / BACKUP / STATE, {**state, "finished": True, "files": []})
    for old in (Path(run_dir) / BACKUP).glob("*.npz"):
        old.unlink()


def prepare_run_dir(cfg: Config, overwrite: bool = False) -> Path:
    """runs/<name>; if it exists, runs/<name>-2, -3, ... (a finished run is never overwritten)."""
    base = cfg.run_dir
    if overwrite and base.exists():
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


def reset_run_dir(run_dir: Path) -> None:
    """Remove what a run killed before its first commit wrote of its training (history,
    phases, checkpoints, backup), so that it starts over in place."""
    run_dir = Path(run_dir)
    for name in ("history.csv", "phases.json"):
        (run_dir / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, BACKUP):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def clean_temp_files(run_dir: Path) -> list[Path]:
    """Remove what writes interrupted by a kill left behind (see _TEMP_NAME); call it only while
    holding the run directory's lock, so that no live writer's temporaries are removed."""
    removed = []
    for p in sorted(Path(run_dir).rglob(".*"), reverse=True):
        if _TEMP_NAME.match(p.name) and p.exists():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- the weights a run ships
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
    best, monitor = run_dir / CHECKPOINTS / "best.keras", cfg.train.checkpoint.monitor
    final = history[-1]["epoch"] if history else None
    used = {"epoch": final, "weights": "final", "final_epoch": final}
    if restore and best.exists():
        meta = read_json(best.with_name("best.json"))
        if meta["epoch"] != final:   # the final epoch's weights are best.keras's already (EMA: both averaged)
            load_weights(best, model)
        used = {"epoch": meta["epoch"], "weights": "best", "final_epoch": final,
                "monitor": monitor, "value": meta.get(monitor)}
        print(f"kfine: the model now holds epoch {meta['epoch'] + 1}'s weights, the best by {monitor} "
              f"(train.restore_best; checkpoints/best.keras)", flush=True)
    elif restore:
        print(f"kfine: train.restore_best: there is no checkpoints/best.keras ({monitor} was never logged); "
              f"the model holds the final epoch's weights", flush=True)
    info_path = run_dir / "run_info.json"
    if writes:
        info = read_json(info_path, {})
        write_json(info_path, {**info, "model": used})
    return used


def save_shipped_model(cfg: Config, run_dir: Path, model) -> None:
    """model.keras: where the model holds checkpoints/best.keras's weights (use_best_epoch) and that
    file has no optimizer state, a link to it (the same bytes: no second write of the model),
    else the model saved for inference."""
    info = read_json(run_dir / "run_info.json", {})
    best = run_dir / CHECKPOINTS / "best.keras"
    if (info.get("model") or {}).get("weights") == "best" and best.exists() and not cfg.train.checkpoint.save_optimizer:
        link_model(best, run_dir / "model.keras")
    else:
        save_model(model, run_dir / "model.keras")


# ----------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive flock on ``run_dir/.lock``, which holds the owner's PID. The kernel drops the
    lock when its process dies, so a lock left by a killed process is simply taken over."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def lock_run_dir(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process, or raise TrainingError naming the PID that holds it."""
    import fcntl
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_pid(fd, wait=1.0)
        os.close(fd)
        raise TrainingError(f"{run_dir} is in use by another kfine process (PID {holder or '?'}), which "
                            f"holds {path}; wait for it to end, or stop it and then --resume "
                            f"(see docs/troubleshooting.md#a-locked-run-directory)") from None
    previous = _lock_pid(fd)
    if previous and previous != os.getpid():
        print(f"kfine: took over {path} from process {previous}, which is no longer running", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(fd, path)


def _lock_pid(fd: int, wait: float = 0.0) -> int | None:
    """The PID written in a lock file (the holder writes it just after locking: wait a moment)."""
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit() or time.monotonic() >= deadline:
            return int(text) if text.isdigit() else None
        time.sleep(0.05)


# ----------------------------------------------------------------------------- test hook
def pause_for_test(point: str) -> None:
    """Test hook: with KFINE_TEST_PAUSE=<point>, write the file KFINE_TEST_PAUSE_MARKER and sleep
    here, so that a test can SIGKILL the process at exactly this point. Points: data_check,
    epoch@E (after the first batch of epoch E), before_commit@E, after_commit@E."""
    if os.environ.get("KFINE_TEST_PAUSE") != point:
        return
    Path(os.environ["KFINE_TEST_PAUSE_MARKER"]).write_text(f"{os.getpid()}\n")
    time.sleep(3600)
