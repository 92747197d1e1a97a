"""Hyperparameter search: KerasTuner over config keys, each trial a kfine.train run.

    python -m kfine.tune                                   # small demo search (configs/tune_demo.yaml)
    python -m kfine.tune --list-configs                    # the reference configs with a search section
    python -m kfine.tune --config FILE [key=value ...]     # search declared in FILE's `search` section
    python -m kfine.tune --resume SEARCH_DIR               # go on with an interrupted search
    python -m kfine.tune --config FILE --resume            # the same, for runs/<name>-search
    python -m kfine.tune --config FILE --overwrite         # start runs/<name>-search over

The `search.space` section maps ANY config key (dotted, list indices allowed) to a spec:

    search:
      tuner: random                 # random | bayesian | hyperband | grid
      objective: val_accuracy       # any history.csv metric; direction inferred (acc/auc/... -> max)
      max_trials: 10
      space:
        train.schedule.learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, sampling: log}
        train.phases.0.freeze.fraction: {type: choice, values: [0.7, 0.8, 0.9]}
        model.scratch.filters: {type: choice, values: [[32, 64, 128, 128, 256], [16, 32, 64, 128, 256]]}
        model.scratch.kernel_size: {type: int, min: 3, max: 5, step: 2}
        data.augment.enabled: {type: boolean}

A trial's config is ``replace(base, ["key=<yaml value>", ...])``; it is trained by the same code
as ``python -m kfine.train`` (``build_training`` + ``fit_phases``) and scored by the objective's
value at the epoch kfine.train ships from that config (``kfine.checkpoint.shipped_epoch``): the best
epoch by train.checkpoint.monitor where train.restore_best applies (by default whenever there is
a validation split), else the final epoch. The trial's score.json and results.csv say which.

Search directory (runs/<name>-search, or -2, -3 ... if it exists and is not resumed):
    config.yaml               the base config (with its search section); --resume reads it
    tuner/                    KerasTuner state: oracle.json, trial_<id>/trial.json
    tuner/trial_<id>/         that trial's config.yaml, history.csv, phases.json, tensorboard/
    results.csv               one row per trial: trial_id, status, score, scored_epoch, scored_as,
                              each searched key, seconds_by_stage (where the trial's time went)
                              (best | final: which epoch the score is from), each searched key
    plots/search_scores.png   score per trial; plots/search_<key>.png: score against each key
    best.yaml                 the best trial as a full config (search.space emptied, name <name>-best):
                              python -m kfine.train --config runs/<name>-search/best.yaml

Distributed (KerasTuner's chief/worker mode): run the same command on every machine with
KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT set, KERASTUNER_TUNER_ID=chief on one (it only
hands out trials and writes results.csv / best.yaml at the end) and tuner0, tuner1, ... on the
workers. All of them must see the same runs_dir (a shared filesystem): the search directory is
then runs/<name>-search exactly (never -2), reloaded if present; --overwrite on the chief clears it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kfine import cli
from kfine.checkpoint import monitor_direction
from kfine.checks import check_config
from kfine.config import load_config, replace
from kfine.rundir import atomic_write_bytes, atomic_write_text, write_csv
from kfine.schema import Config, ConfigError, to_dict

DEMO_CONFIG = "tune_demo"     # a reference config (kfine.cli.find_config): configs/tune_demo.yaml

SPEC_FIELDS = {            # spec type -> the fields it takes (besides `type`)
    "choice": {"values"},
    "int": {"min", "max", "step"},
    "float": {"min", "max", "step", "sampling"},
    "boolean": set(),
}
_NOT_SEARCHABLE = ("search", "name", "runs_dir")


class SearchError(RuntimeError):
    """The search cannot start or go on; the message says why."""


# ----------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Param:
    """One searched config key. ``name`` (KerasTuner's) is the dotted key itself.

    KerasTuner's Choice takes scalars of one type only, so a choice whose values are lists,
    mappings, null or mixed types is handed to KerasTuner as the values' YAML text
    ("[16, 32, 64]") and decoded back by position (``encoded``)."""
    key: str
    type: str
    values: tuple = ()
    min: Any = None
    max: Any = None
    step: Any = None
    sampling: str = "linear"
    default: Any = None            # the base config's value, where it lies in the space
    has_default: bool = False      # (a choice may hold null: default None is not "no default")
    encoded: bool = False

    @property
    def labels(self) -> tuple:
        """What KerasTuner sees for a choice (the values, or their YAML text)."""
        return tuple(yaml_value(v) for v in self.values) if self.encoded else self.values

    def declare(self, hp):
        """Register this key with KerasTuner's HyperParameters; returns its current value."""
        if self.type == "choice":
            default = self.labels[self.values.index(self.default)] if self.has_default else None
            return hp.Choice(self.key, list(self.labels), default=default,
                             ordered=False if self.encoded else None)
        if self.type == "int":
            return hp.Int(self.key, self.min, self.max, step=self.step or 1, default=self.default)
        if self.type == "float":
            return hp.Float(self.key, self.min, self.max, step=self.step, sampling=self.sampling,
                            default=self.default)
        return hp.Boolean(self.key, default=bool(self.default))

    def decode(self, value):
        """KerasTuner's value -> the config value."""
        if self.type == "choice" and self.encoded:
            return self.values[list(self.labels).index(value)]
        if self.type == "int":
            return int(value)
        if self.type == "float":
            return float(value)
        return value


def trial_number(trial_id: str) -> str:
    """KerasTuner's number of a trial, as it prints it (``Search: Running Trial #1`` for id "0":
    ids are the 0-based count of trials, zero-padded)."""
    return f"#{int(trial_id) + 1}" if str(trial_id).isdigit() else str(trial_id)


def trial_label(trial_id: str) -> str:
    """A trial in kfine's messages: its number and its directory, e.g. ``#1 (tuner/trial_0)``."""
    return f"{trial_number(trial_id)} (tuner/trial_{trial_id})"


def yaml_value(value) -> str:
    """A value as one line of YAML (what ``key=value`` overrides parse back)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def get_path(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _num(spec: dict, field: str, key: str, kind):
    v = spec.get(field)
    if kind is float and isinstance(v, str):   # PyYAML reads 1e-4 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok:
        raise ConfigError(f"search.space.{key}: `{field}` must be {'an integer' if kind is int else 'a number'}, "
                          f"got {v!r}")
    return kind(v)


def parse_space(cfg: Config) -> list[Param]:
    """The declared space, checked against the config before any training: every spec is
    well formed and every value it can take gives a valid config (the error names the key)."""
    params, base = [], to_dict(cfg)
    for key, spec in cfg.search.space.items():
        where = f"search.space.{key}"
        if key.split(".")[0] in _NOT_SEARCHABLE:
            raise ConfigError(f"{where}: {key.split('.')[0]!r} cannot be searched")
        if not isinstance(spec, dict) or spec.get("type") not in SPEC_FIELDS:
            raise ConfigError(f"{where}: give a mapping with `type` one of {sorted(SPEC_FIELDS)}, "
                              f"got {spec!r}")
        kind = spec["type"]
        extra = sorted(set(spec) - SPEC_FIELDS[kind] - {"type"})
        if extra:
            raise ConfigError(f"{where}: unknown field {extra[0]!r} for type {kind}; "
                              f"allowed: {sorted(SPEC_FIELDS[kind] | {'type'})}")
        current = get_path(base, key)
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: `values` must be a non-empty list, got {values!r}")
            types = {type(v) for v in values}
            encoded = not (len(types) == 1 and types <= {int, float, str, bool})
            if types == {int, float}:                      # [0.5, 1]: numbers, as floats
                values, encoded = [float(v) for v in values], False
            if len({yaml_value(v) for v in values}) != len(values):
                raise ConfigError(f"{where}: `values` has duplicates: {values!r}")
            if isinstance(current, list):
                current = list(current)
            p = Param(key, kind, values=tuple(values), encoded=encoded,
                      default=current if current in values else None, has_default=current in values)
            candidates = list(values)
        elif kind in ("int", "float"):
            t = int if kind == "int" else float
            lo, hi = _num(spec, "min", key, t), _num(spec, "max", key, t)
            if not lo < hi:
                raise ConfigError(f"{where}: need min < max, got min={lo} max={hi}")
            step = _num(spec, "step", key, t) if spec.get("step") is not None else None
            if step is not None and step <= 0:
                raise ConfigError(f"{where}: `step` must be positive, got {step}")
            sampling = spec.get("sampling", "linear")
            if sampling not in ("linear", "log"):
                raise ConfigError(f"{where}: `sampling` must be linear or log, got {sampling!r}")
            if sampling == "log" and lo <= 0:
                raise ConfigError(f"{where}: log sampling needs min > 0, got {lo}")
            ok = (isinstance(current, (int, float)) and not isinstance(current, bool) and lo <= current <= hi
                  and (kind == "float" or step is None or (current - lo) % step == 0))
            p = Param(key, kind, min=lo, max=hi, step=step, sampling=sampling,
                      default=t(current) if ok else None, has_default=ok)
            candidates = [lo, hi]
        else:
            p = Param(key, kind, default=current if isinstance(current, bool) else None,
                      has_default=isinstance(current, bool))
            candidates = [False, True]
        for v in candidates:   # every value must make a valid config
            try:
                check_config(replace(cfg, [f"{key}={yaml_value(v)}"]))
            except ConfigError as e:
                raise ConfigError(f"{where}: {yaml_value(v)} is not a valid value for this key: {e}") from None
        params.append(p)
    if cfg.search.tuner == "hyperband" and any(p.key == "train.epochs" for p in params):
        raise ConfigError("search.space.train.epochs: hyperband chooses the epochs itself "
                          "(search.max_epochs); drop train.epochs from the space or use another tuner")
    return params


def declare_space(hp, params: list[Param]) -> dict:
    """Register every searched key (also those only used at fit time) and return their values."""
    return {p.key: p.declare(hp) for p in params}


def trial_overrides(params: list[Param], values: dict) -> list[str]:
    """KerasTuner values -> ``key=value`` overrides (config values as YAML)."""
    return [f"{p.key}={yaml_value(p.decode(values[p.key]))}" for p in params if p.key in values]


def trial_config(cfg: Config, params: list[Param], values: dict) -> Config:
    """The full config of one trial. Hyperband's `tuner/epochs` becomes train.epochs (phases that
    would start at or after it are dropped; each trial trains from scratch for that many epochs)."""
    overrides = trial_overrides(params, values)
    trial = replace(cfg, overrides)
    if "tuner/epochs" in values:
        epochs = int(values["tuner/epochs"])
        phases = [to_dict(ph) for ph in trial.train.phases if ph.start_epoch < epochs]
        trial = replace(trial, [f"train.epochs={epochs}", f"train.phases={yaml_value(phases)}"])
    return trial


def objective_direction(search) -> str:
    return monitor_direction(search.objective, search.direction)


# ----------------------------------------------------------------------------- data per trial
_DATA_CACHE: dict[str, Any] = {}
_DATA_CACHE_SIZE = 4


def trial_datasets(cfg: Config):
    """The datasets of one trial, built once per distinct (data section, seed) and cached: trials
    that differ in data.batch_size or data.image_size get their own, the rest share one. (Trials
    that train only the head reuse the backbone's features through kfine.features.)"""
    from kfine import data as kdata
    key = yaml_value([to_dict(cfg.data), cfg.seed])
    if key not in _DATA_CACHE:
        # One image cache at a time (each can be gigabytes): data sets over another cache are let
        # go BEFORE decoding, those that share this one (they differ in batch size, augmentation
        # ...) are kept.
        for k in [k for k, d in _DATA_CACHE.items() if _image_part(d.config) != _image_part(cfg.data)]:
            del _DATA_CACHE[k]
        while len(_DATA_CACHE) >= _DATA_CACHE_SIZE:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        new = _DATA_CACHE[key] = kdata.make_datasets(cfg.data, cfg.seed)
        for k in [k for k, d in _DATA_CACHE.items() if d.cache is not new.cache]:
            del _DATA_CACHE[k]
    return _DATA_CACHE[key]


# data keys that change how images are viewed, not which images the cache holds nor at what size
_VIEW_KEYS = dict(batch_size=0, augment=None, sampling="uniform", eval_transform="resize_center_crop",
                  deterministic=False, check=True, val_fraction=0.0, test_fraction=0.0, on_bad_image="skip",
                  download=True)


def _image_part(data_cfg):
    """The part of a data section that decides its image cache."""
    from dataclasses import replace as dc_replace
    return dc_replace(data_cfg, **_VIEW_KEYS)


def pin_split(cfg: Config, search_dir: Path) -> Config:
    """Draw the split once for the whole search (search_dir/splits.csv, as a run's) and point
    ``data.splits`` at it: every trial, and best.yaml trained later, use exactly that split even
    if the folder changes. Every process of a distributed search draws the same split (same
    seed) and writes the same file atomically."""
    from kfine.rundir import write_json
    from kfine.sources import write_splits
    if cfg.data.splits is not None:
        return cfg
    path = search_dir / "splits.csv"
    if not path.exists():
        datasets = trial_datasets(cfg)
        write_json(search_dir / "class_names.json", datasets.class_names)
        write_splits(datasets.index, path)
    return replace(cfg, [f"data.splits={path.resolve()}"])


# ----------------------------------------------------------------------------- KerasTuner glue
def _hypermodel_class():
    import keras_tuner as kt

    class ConfigHyperModel(kt.HyperModel):
        """build(hp) registers the whole space and returns no model: the model needs the trial's
        datasets (class count, image size, steps per epoch), so fit() builds it with
        kfine.fit.build_training and trains it with kfine.train.fit_phases."""

        def __init__(self, cfg: Config, params: list[Param]):
            super().__init__(name="kfine")
            self.cfg, self.params = cfg, params

        def build(self, hp):
            declare_space(hp, self.params)
            return None

        def fit(self, hp, model, trial_dir=None, execution=0, **kwargs):
            return run_trial_config(trial_config(self.cfg, self.params, hp.values), Path(trial_dir), execution)

    return ConfigHyperModel


def run_trial_config(cfg: Config, trial_dir: Path, execution: int = 0) -> dict:
    """Train one trial config exactly as kfine.train does (no checkpoints) and return the
    metrics of the epoch kfine.train would ship (``shipped_epoch``: the best by
    train.checkpoint.monitor under train.restore_best, else the final one), which KerasTuner reads
    the objective from; trial_dir/score.json records that epoch and how it was chosen, and
    where the trial's time went ("timings", also printed: kfine.log.format_timings)."""
    from kfine.log import format_timings, run_timings
    from kfine.rundir import read_json, write_json
    with run_timings() as seconds:
        metrics = _run_trial_config(cfg, trial_dir, execution)
    print(format_timings(seconds).replace("kfine: ", f"kfine: trial {trial_dir.name}: ", 1), flush=True)
    score = trial_dir / "score.json"
    write_json(score, {**read_json(score), "timings": seconds})
    return metrics


def _run_trial_config(cfg: Config, trial_dir: Path, execution: int = 0) -> dict:
    import gc
    import keras
    import keras_tuner as kt
    from kfine.config import save_config
    from kfine.log import timed
    from kfine.rundir import write_json
    from kfine.checkpoint import restore_best, shipped_epoch
    from kfine.fit import build_training, setup_backend
    from kfine.train import fit_phases

    keras.backend.clear_session()
    gc.collect()
    trial_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, trial_dir / "config.yaml")
    setup_backend(cfg)
    if execution:     # another initialisation for another execution (same data split)
        keras.utils.set_random_seed(cfg.seed + execution)
    with timed("data"):
        datasets = trial_datasets(cfg)
    restore = restore_best(cfg, datasets)   # checked before training, as kfine.train does
    with timed("model"):
        model, optimizer, schedule = build_training(cfg, datasets)
    with timed("training"):   # the feature pass inside it counts as "features"
        history = fit_phases(model, cfg, datasets, trial_dir, optimizer=optimizer, schedule=schedule,
                             keep_checkpoints=False)
    if not history:
        raise kt.errors.FailedTrialError("the trial finished no epoch")
    row, scored_as = shipped_epoch(cfg, history, restore)
    metrics = {k: float(v) for k, v in row.items() if k not in ("epoch", "phase")}
    if cfg.search.objective not in metrics:
        raise kt.errors.FatalError(f"search.objective: {cfg.search.objective!r} is not a metric of "
                                   f"this run; choose one of {sorted(metrics)}")
    write_json(trial_dir / "score.json", {"epoch": row["epoch"], "scored_as": scored_as,
                                          "monitor": cfg.train.checkpoint.monitor,
                                          cfg.search.objective: metrics[cfg.search.objective]})
    return metrics


def scored_epochs(trial_dir: Path) -> dict:
    """results.csv's scored_epoch and scored_as of one trial, from its score.json (one per
    execution: then space-separated, in execution order)."""
    from kfine.rundir import read_json
    trial_dir = Path(trial_dir)
    runs = sorted(trial_dir.glob("execution_*/score.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    found = [read_json(p) for p in [trial_dir / "score.json", *runs] if p.exists()]
    return {"scored_epoch": " ".join(str(s["epoch"]) for s in found),
            "scored_as": " ".join(dict.fromkeys(s["scored_as"] for s in found))}


def trial_timings(trial_dir: Path) -> str:
    """results.csv's seconds_by_stage of one trial: where its time went (kfine.log.stage_split),
    from its score.json (one per execution: then separated by " | ", in execution order)."""
    from kfine.log import stage_split
    from kfine.rundir import read_json
    trial_dir = Path(trial_dir)
    runs = sorted(trial_dir.glob("execution_*/score.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    found = [read_json(p) for p in [trial_dir / "score.json", *runs] if p.exists()]
    return " | ".join(stage_split(s["timings"]) for s in found if s.get("timings"))


def _tuner_class():
    import keras_tuner as kt

    class ConfigTuner(kt.Tuner):
        """kt.Tuner with run_trial = for each execution: build (register hps) + fit (kfine
        training). No per-epoch weight saving: best.yaml is retrained, never reloaded."""

        def run_trial(self, trial, *args, **kwargs):
            hp = trial.hyperparameters
            shown = " ".join(trial_overrides(self.hypermodel.params, hp.values))
            print(f"kfine: trial {trial_label(trial.trial_id)} started: {shown}", flush=True)
            results = []
            for execution in range(self.executions_per_trial):
                trial_dir = Path(self.get_trial_dir(trial.trial_id))
                if self.executions_per_trial > 1:
                    trial_dir = trial_dir / f"execution_{execution}"
                self.hypermodel.build(hp)
                try:
                    results.append(self.hypermodel.fit(hp, None, trial_dir=trial_dir, execution=execution))
                except Exception as e:
                    print(f"kfine: trial {trial_label(trial.trial_id)} failed: {type(e).__name__}: {e}", flush=True)
                    raise
            obj = self.oracle.objective.name
            score = sum(r[obj] for r in results) / len(results)
            scored = scored_epochs(self.get_trial_dir(trial.trial_id))
            print(f"kfine: trial {trial_label(trial.trial_id)} finished: {obj}={score:.4f} "
                  f"(epoch {scored['scored_epoch']}, {scored['scored_as']})", flush=True)
            return results

        def load_model(self, trial):
            raise NotImplementedError("kfine trials keep no weights; train best.yaml with kfine.train")

    return ConfigTuner


def _random_oracle(cfg, objective, seed):
    import keras_tuner as kt
    return kt.oracles.RandomSearchOracle(objective=objective, max_trials=cfg.search.max_trials, seed=seed)


def _bayesian_oracle(cfg, objective, seed):
    import keras_tuner as kt
    return kt.oracles.BayesianOptimizationOracle(objective=objective, max_trials=cfg.search.max_trials, seed=seed)


def _hyperband_oracle(cfg, objective, seed):
    import keras_tuner as kt
    return kt.oracles.HyperbandOracle(objective=objective, max_epochs=cfg.search.max_epochs or cfg.train.epochs,
                                      seed=seed)


def _grid_oracle(cfg, objective, seed):
    import keras_tuner as kt
    return kt.oracles.GridSearchOracle(objective=objective, max_trials=cfg.search.max_trials, seed=seed)


TUNERS = {"random": _random_oracle, "bayesian": _bayesian_oracle, "hyperband": _hyperband_oracle,
          "grid": _grid_oracle}


def make_tuner(cfg: Config, params: list[Param], search_dir: Path, overwrite: bool = False):
    """The KerasTuner tuner over ``params``; its state lives in search_dir/tuner (reloaded
    unless ``overwrite``). KerasTuner reads seed 0 as 'no seed', so the oracle gets seed + 1."""
    import keras_tuner as kt
    if cfg.search.tuner not in TUNERS:
        raise ConfigError(f"search.tuner: {cfg.search.tuner!r}; choose one of {sorted(TUNERS)}")
    objective = kt.Objective(cfg.search.objective, direction=objective_direction(cfg.search))
    oracle = TUNERS[cfg.search.tuner](cfg, objective, cfg.seed + 1)
    return _tuner_class()(oracle, hypermodel=_hypermodel_class()(cfg, params), directory=str(search_dir),
                          project_name="tuner", overwrite=overwrite,
                          executions_per_trial=cfg.search.executions_per_trial)


# ----------------------------------------------------------------------------- outputs
def results_rows(tuner, params: list[Param]) -> list[dict]:
    """One row per trial (in trial-id order): trial_id, status, score, the epoch scored and how it
    was chosen (scored_epoch, scored_as: best | final; see run_trial_config), each searched key."""
    rows = []
    for tid in sorted(tuner.oracle.trials):
        t = tuner.oracle.trials[tid]
        values = t.hyperparameters.values
        row = {"trial_id": tid, "status": str(t.status),
               "score": "" if t.score is None or (isinstance(t.score, float) and math.isnan(t.score)) else t.score,
               **scored_epochs(tuner.get_trial_dir(tid))}
        if "tuner/epochs" in values:
            row["tuner/epochs"] = values["tuner/epochs"]
        for p in params:
            row[p.key] = values.get(p.key, "")
        row["seconds_by_stage"] = trial_timings(tuner.get_trial_dir(tid))
        rows.append(row)
    return rows


_RESULT_FIELDS = ("trial_id", "status", "score", "scored_epoch", "scored_as")   # results.csv before the keys


def write_results(rows: list[dict], path: Path) -> None:
    write_csv(path, rows, None if rows else list(_RESULT_FIELDS))


def format_results(rows: list[dict], objective: str, direction: str) -> str:
    done = [r for r in rows if r["score"] != ""]
    done.sort(key=lambda r: r["score"], reverse=direction == "max")
    rest = [r for r in rows if r["score"] == ""]
    keys = [k for k in (rows[0] if rows else {}) if k not in _RESULT_FIELDS]
    header = ["trial", "status", objective, "epoch"] + keys
    table = [header] + [[trial_number(r["trial_id"]), r["status"], f"{r['score']:.4f}" if r["score"] != "" else "-",
                         f"{r['scored_epoch']} ({r['scored_as']})" if r.get("scored_epoch", "") != "" else "-"]
                        + [str(r.get(k, "")) for k in keys] for r in done + rest]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def plot_search(results_csv, out_dir, objective: str = "score", direction: str | None = None) -> list[Path]:
    """search_scores.png (score per trial, the best ringed) and search_<key>.png (score against
    each searched key: numeric keys on a numeric axis, others as categories) in ``out_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in (rows[0] if rows else {}) if k not in _RESULT_FIELDS]
    scored = [r for r in rows if r["score"] != ""]
    out_dir = Path(out_dir)
    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows) + 2), 3.5))
    xs = [trial_number(r["trial_id"]) for r in scored]
    ys = [float(r["score"]) for r in scored]
    direction = monitor_direction(objective, direction)
    ax.plot(range(len(xs)), ys, "o-", color="tab:blue", label=objective)
    if ys:
        pick = max if direction == "max" else min
        ax.step(range(len(xs)), [pick(ys[: i + 1]) for i in range(len(ys))], where="post", color="tab:gray",
                ls="--", label="best so far")
        best = ys.index(pick(ys))
        ax.plot([best], [ys[best]], "o", ms=14, mfc="none", mec="tab:red", label=f"best: trial {xs[best]}")
        ax.legend(loc="best")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} per trial ({len(scored)} of {len(rows)} scored)")
    save(fig, "search_scores.png")

    for key in keys:
        vals = [r[key] for r in scored]
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        try:
            xv = [float(v) for v in vals]
            ax.plot(xv, ys, "o", color="tab:blue")
            if "learning_rate" in key and xv and min(xv) > 0:
                ax.set_xscale("log")
        except ValueError:         # categories (strings, booleans, lists)
            cats = sorted(set(vals), key=str)
            ax.plot([cats.index(v) for v in vals], ys, "o", color="tab:blue")
            ax.set_xticks(range(len(cats)), [c if len(c) <= 24 else c[:21] + "..." for c in cats],
                          rotation=20 if len(cats) > 2 else 0, ha="right" if len(cats) > 2 else "center")
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.set_title(f"{objective} vs {key}", fontsize=9)
        save(fig, f"search_{_slug(key)}.png")
    return written


def write_best(cfg: Config, params: list[Param], trial, search_dir: Path) -> tuple[Path, Config]:
    """best.yaml: the best trial's full config, search.space emptied, named <name>-best."""
    best = trial_config(cfg, params, trial.hyperparameters.values)
    best = replace(best, ["search.space={}", f"name={cfg.name}-best"])
    path = search_dir / "best.yaml"
    chosen = "".join(f"#   {o}\n" for o in trial_overrides(params, trial.hyperparameters.values))
    header = (f"# Best trial {trial_label(trial.trial_id)} of the search in {search_dir} "
              f"({cfg.search.objective} = {trial.score:.4f}). A full kfine.train config:\n"
              f"#   python -m kfine.train --config {path}\n"
              f"# Its searched values:\n{chosen}")
    atomic_write_text(path, header + yaml.safe_dump(to_dict(best), sort_keys=False))
    return path, best


# ----------------------------------------------------------------------------- the search
@dataclass
class SearchResult:
    search_dir: Path
    rows: list
    best_config: Config | None = None
    best_path: Path | None = None
    tuner: object = None


def is_distributed() -> bool:
    return "KERASTUNER_ORACLE_IP" in os.environ


def is_chief() -> bool:
    return is_distributed() and "chief" in os.environ.get("KERASTUNER_TUNER_ID", "")


def search_dir_for(cfg: Config) -> Path:
    return Path(cfg.runs_dir) / f"{cfg.name}-search"


def search(cfg: Config, search_dir: Path | None = None, resume: bool = False,
           overwrite: bool = False) -> SearchResult:
    """Run (or go on with) the search declared in cfg.search; everything lands in the search dir,
    which the process that writes it (a lone search, or the chief) locks as a run's (.lock)."""
    from kfine import checkpoint
    from kfine.checkpoint import prepare_run_dir
    from kfine.fit import phase_spans

    check_config(cfg)                                # every value, before the search directory exists
    params = parse_space(cfg)                        # bad keys fail here, before any training
    if cfg.search.tuner != "hyperband":
        phase_spans(cfg)
    if search_dir is not None:
        search_dir = Path(search_dir)
    elif is_distributed() or resume:
        search_dir = search_dir_for(cfg)             # one fixed directory every process agrees on
    else:
        try:   # --overwrite never removes a search directory in use
            search_dir = prepare_run_dir(dataclasses.replace(cfg, name=f"{cfg.name}-search"), overwrite)
        except checkpoint.TrainingError as e:
            raise SearchError(str(e)) from None
    if resume and not (search_dir / "tuner" / "oracle.json").exists():
        raise SearchError(f"{search_dir} has no tuner/oracle.json: nothing to resume; start the search "
                          f"without --resume")
    reload = resume or is_distributed()
    if not reload and (search_dir / "tuner").exists() and not overwrite:
        raise SearchError(f"{search_dir} already holds a search; pass --resume to go on or --overwrite")
    search_dir.mkdir(parents=True, exist_ok=True)
    writer = not is_distributed() or is_chief()   # a worker shares the chief's directory
    try:
        lock = checkpoint.lock_run_dir(search_dir) if writer else None
    except checkpoint.TrainingError as e:   # a second search (or --resume) in the same directory
        raise SearchError(str(e)) from None
    try:
        return _search(cfg, params, search_dir, overwrite, writer)
    finally:
        if lock is not None:
            lock.release()


def _search(cfg: Config, params: list[Param], search_dir: Path, overwrite: bool, writer: bool) -> SearchResult:
    from kfine.config import save_config
    if overwrite and writer and (search_dir / "tuner").exists():
        import shutil
        shutil.rmtree(search_dir / "tuner")
    if writer:
        save_config(cfg, search_dir / "config.yaml")
    cfg = pin_split(cfg, search_dir)
    direction = objective_direction(cfg.search)
    role = f" as {os.environ.get('KERASTUNER_TUNER_ID')}" if is_distributed() else ""
    print(f"kfine: search directory {search_dir}{role}: {cfg.search.tuner} search over "
          f"{[p.key for p in params]}, objective {cfg.search.objective} ({direction}), each trial scored "
          f"at the epoch kfine.train ships: the best by train.checkpoint.monitor "
          f"({cfg.train.checkpoint.monitor}) under train.restore_best, else the final one", flush=True)

    import keras_tuner as kt
    tuner = make_tuner(cfg, params, search_dir, overwrite=False)
    try:
        tuner.search(verbose=1)
    except kt.errors.FatalError as e:           # e.g. an objective the runs do not log
        raise SearchError(str(e)) from e
    except RuntimeError as e:                   # KerasTuner: too many consecutive failed trials
        if "consecutive failures" not in str(e):
            raise
        raise SearchError(f"the search stopped: {str(e).splitlines()[0]} (the failed trials' messages "
                          f"are above and in {search_dir / 'tuner'}/trial_*/trial.json); resume with "
                          f"--resume after fixing the cause") from e
    result = SearchResult(search_dir=search_dir, rows=[], tuner=tuner)
    if is_distributed() and not is_chief():
        print(f"kfine: worker {tuner.tuner_id} done; the chief writes results.csv and best.yaml "
              f"in {search_dir}", flush=True)
        return result

    result.rows = results_rows(tuner, params)
    write_results(result.rows, search_dir / "results.csv")
    plot_search(search_dir / "results.csv", search_dir / "plots", cfg.search.objective, direction)
    print("\n" + format_results(result.rows, cfg.search.objective, direction), flush=True)
    best = tuner.oracle.get_best_trials(1)
    if best and best[0].score is not None:
        result.best_path, result.best_config = write_best(cfg, params, best[0], search_dir)
        print(f"\nkfine: best trial {trial_label(best[0].trial_id)}: {cfg.search.objective} = {best[0].score:.4f}. "
              f"Its config: {result.best_path}\n  train it: python -m kfine.train --config "
              f"{result.best_path}", flush=True)
    else:
        print("kfine: no trial finished with a score; see the trial messages above", flush=True)
    return result


# ----------------------------------------------------------------------------- CLI
def pin_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A searched key also given as a command-line override is fixed to that value: it leaves
    the space (``train.epochs=1`` on the command line means one epoch for every trial)."""
    from kfine.config import parse_overrides
    pinned = [k for k, _ in parse_overrides(overrides) if k in cfg.search.space]
    if not pinned:
        return cfg
    print(f"kfine: not searched (fixed on the command line): {', '.join(pinned)}", flush=True)
    space = {k: v for k, v in cfg.search.space.items() if k not in pinned}
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, space=space))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(ap, default=DEMO_CONFIG)
    ap.add_argument("--resume", nargs="?", const=True, default=None, metavar="SEARCH_DIR",
                    help="go on with an interrupted search (its directory, or runs/<name>-search of --config)")
    ap.add_argument("--overwrite", action="store_true", help="start the search directory over")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. search.max_trials=5 train.epochs=3")
    args = ap.parse_args(argv)
    if args.list_configs:
        print(cli.format_config_list(search=True))
        return 0
    overrides = list(args.overrides)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).is_dir():
        overrides.insert(0, args.resume)             # `--resume key=value`: a flag, then an override
        args.resume = True
    return cli.run_command(lambda: _main(args, overrides), SearchError)


def _main(args, overrides: list[str]) -> None:
    if isinstance(args.resume, str):
        search_dir = Path(args.resume)
        if not (search_dir / "config.yaml").exists():
            raise SearchError(f"{search_dir} is not a kfine search directory (no config.yaml)")
        cfg = pin_overrides(load_config(search_dir / "config.yaml", overrides), overrides)
        search(cfg, search_dir=search_dir, resume=True)
    else:
        cfg = pin_overrides(load_config(cli.find_config(args.config or DEMO_CONFIG), overrides), overrides)
        search(cfg, resume=bool(args.resume), overwrite=args.overwrite)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
