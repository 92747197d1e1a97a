"""kfine.tune: the space derived from the config, its errors, a real search and its outputs,
best.yaml training again, resume after SIGKILL, and KerasTuner's chief/worker mode."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import forkserver
from conftest import make_folder
from kfine.config import ConfigError, load_config
from kfine.train import read_history

REPO = Path(__file__).resolve().parent.parent

SPACE = {
    "train.schedule.learning_rate": {"type": "float", "min": 1.0e-3, "max": 1.0e-2, "sampling": "log"},
    "model.scratch.filters": {"type": "choice", "values": [[4, 4, 8, 8, 8], [2, 4, 4, 8, 8]]},
}


def write_config(tmp_path, space=None, max_trials=2, epochs=1, extra=None, per_class=8) -> Path:
    """A tiny search config file (the space's keys hold dots, so it lives in a file)."""
    root = make_folder(tmp_path / "data", "single", per_class=per_class)
    cfg = {
        "name": "t", "seed": 0, "runs_dir": str(tmp_path / "runs"),
        "data": {"source": "folder", "root": str(root), "layout": "single", "image_size": [32, 32],
                 "batch_size": 8, "check": False, "augment": {"enabled": False}},
        "model": {"backbone": "scratch_cnn", "weights": None,
                  "scratch": {"filters": [4, 4, 8, 8, 8], "dense_units": 8, "dropout": 0.1}},
        "train": {"epochs": epochs, "steps_per_epoch": 2, "verbose": 0,
                  "schedule": {"name": "constant", "learning_rate": 0.003}},
        "export": {"enabled": False},
        "search": {"tuner": "random", "max_trials": max_trials, "space": space if space is not None else SPACE},
    }
    for section, values in (extra or {}).items():
        cfg[section].update(values)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def env():
    return {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _trials(text: str, event: str) -> list[str]:
    """Trial ids from kfine's lines `kfine: trial #N (tuner/trial_ID) <event>:`, where N is
    KerasTuner's own number for that trial (`Search: Running Trial #N`): ID + 1."""
    found = re.findall(rf"^kfine: trial #(\d+) \(tuner/trial_(\w+)\) {event}:", text, flags=re.M)
    assert all(int(n) == int(tid) + 1 for n, tid in found), found
    return [tid for _, tid in found]


def finished_trials(text: str) -> list[str]:
    return _trials(text, "finished")


def started_trials(text: str) -> list[str]:
    return _trials(text, "started")


# ----------------------------------------------------------------------------- the space
def test_space_is_derived_from_the_config_without_training(tmp_path):
    import keras_tuner as kt
    from kfine.tune import declare_space, objective_direction, parse_space, trial_config

    space = {
        "train.phases.1.freeze.fraction": {"type": "float", "min": 0.5, "max": 0.9},
        "model.scratch.kernel_size": {"type": "int", "min": 3, "max": 7, "step": 2},
        "model.scratch.filters": {"type": "choice", "values": [[4, 4, 8, 8, 8], [8, 8, 8, 8, 8]]},
        "model.scratch.activation": {"type": "choice", "values": ["relu", "gelu", "silu"]},
        "data.augment.enabled": {"type": "boolean"},
        "data.batch_size": {"type": "choice", "values": [4, 8]},
        "train.schedule.learning_rate": {"type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log"},
    }
    phases = [{"start_epoch": 0, "freeze": {"strategy": "none"}},
              {"start_epoch": 1, "freeze": {"strategy": "fraction", "fraction": 0.6}}]
    cfg = load_config(write_config(tmp_path, space, epochs=2, extra={"train": {"phases": phases}}))
    params = parse_space(cfg)
    assert [p.key for p in params] == list(space)
    hp = kt.HyperParameters()
    declare_space(hp, params)
    by_name = {h.name: h for h in hp.space}
    assert set(by_name) == set(space)
    frac, ks, filters = by_name["train.phases.1.freeze.fraction"], by_name["model.scratch.kernel_size"], \
        by_name["model.scratch.filters"]
    assert isinstance(frac, kt.engine.hyperparameters.Float) and (frac.min_value, frac.max_value) == (0.5, 0.9)
    assert isinstance(ks, kt.engine.hyperparameters.Int) and (ks.min_value, ks.max_value, ks.step) == (3, 7, 2)
    assert isinstance(by_name["data.augment.enabled"], kt.engine.hyperparameters.Boolean)
    assert by_name["train.schedule.learning_rate"].sampling == "log"
    assert by_name["data.batch_size"].values == [4, 8]
    # defaults are the base config's values
    assert hp.values["train.phases.1.freeze.fraction"] == 0.6
    assert hp.values["model.scratch.kernel_size"] == 3
    assert hp.values["model.scratch.activation"] == "relu"
    assert hp.values["data.augment.enabled"] is False
    assert hp.values["data.batch_size"] == 8
    # list values reach KerasTuner as scalars (its Choice takes no lists) and come back as lists
    assert all(isinstance(v, str) for v in filters.values)
    for label, expected in zip(filters.values, [(4, 4, 8, 8, 8), (8, 8, 8, 8, 8)]):
        values = {**hp.values, "model.scratch.filters": label, "train.phases.1.freeze.fraction": 0.75,
                  "model.scratch.kernel_size": 5, "data.augment.enabled": True}
        trial = trial_config(cfg, params, values)
        assert trial.model.scratch.filters == expected
        assert trial.train.phases[1].freeze.fraction == 0.75 and trial.model.scratch.kernel_size == 5
        assert trial.data.augment.enabled is True
        assert trial.train.phases[0].freeze.strategy == "none"        # the rest is the base config
    # direction: inferred from the name unless given
    assert objective_direction(cfg.search) == "max"
    assert objective_direction(load_config(None, ["search.objective=val_loss"]).search) == "min"
    assert objective_direction(load_config(None, ["search.objective=val_auc"]).search) == "max"
    assert objective_direction(load_config(None, ["search.objective=val_loss", "search.direction=max"]).search) == "max"
    # a searched key fixed on the command line leaves the space
    from kfine.tune import pin_overrides
    pinned = pin_overrides(load_config(tmp_path / "search.yaml", ["data.batch_size=4"]), ["data.batch_size=4"])
    assert "data.batch_size" not in pinned.search.space and pinned.data.batch_size == 4
    assert [p.key for p in parse_space(pinned)] == [k for k in space if k != "data.batch_size"]


def test_datasets_are_built_once_per_data_config(tmp_path):
    from kfine.config import replace
    from kfine.tune import trial_datasets
    cfg = load_config(write_config(tmp_path))
    a = trial_datasets(cfg)
    assert trial_datasets(replace(cfg, ["train.schedule.learning_rate=0.1"])) is a   # same data: cached
    b = trial_datasets(replace(cfg, ["data.batch_size=4"]))
    assert b is not a
    assert next(iter(b.train))[0].shape[0] == 4 and next(iter(a.train))[0].shape[0] == 8


@pytest.mark.parametrize("space, message", [
    ({"model.head.nope": {"type": "choice", "values": [1, 2]}}, "search.space.model.head.nope"),
    ({"trian.epochs": {"type": "int", "min": 1, "max": 3}}, "search.space.trian.epochs"),
    ({"train.phases.3.freeze.fraction": {"type": "float", "min": 0.1, "max": 0.9}},
     "search.space.train.phases.3.freeze.fraction"),
    ({"train.precision": {"type": "choice", "values": ["float32", "float8"]}}, "float8"),
    ({"train.epochs": {"type": "uniform", "min": 1, "max": 3}}, "search.space.train.epochs: give a mapping"),
    ({"train.epochs": {"type": "int", "min": 3, "max": 1}}, "min < max"),
    ({"train.epochs": {"type": "int", "min": 1, "max": 3, "stride": 1}}, "unknown field 'stride'"),
    ({"train.schedule.learning_rate": {"type": "float", "min": 0, "max": 1, "sampling": "log"}}, "log"),
    ({"model.scratch.activation": {"type": "choice", "values": []}}, "non-empty"),
    ({"search.max_trials": {"type": "int", "min": 1, "max": 3}}, "cannot be searched"),
])
def test_a_bad_space_is_an_error_naming_the_key_before_any_training(tmp_path, capsys, space, message):
    from kfine.tune import main, parse_space
    path = write_config(tmp_path, space)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_space(load_config(path))
    assert main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()          # nothing was created or trained


def test_an_objective_the_runs_do_not_log_stops_the_search_with_the_choices(tmp_path, capsys):
    from kfine.tune import main
    path = write_config(tmp_path, {"model.scratch.dropout": {"type": "choice", "values": [0.0, 0.5]}},
                        extra={"search": {"objective": "val_f1", "max_trials": 3}})
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'val_f1' is not a metric" in err and "val_accuracy" in err
    assert len(list((tmp_path / "runs" / "t-search" / "tuner").glob("trial_*/history.csv"))) == 1   # stopped at once


def test_a_search_directory_in_use_is_neither_searched_nor_overwritten(tmp_path, capsys):
    """A second search (--resume, or --overwrite) while another process holds the search
    directory stops naming that process, and leaves the directory as it was."""
    from kfine.checkpoint import lock_run_dir
    from kfine.tune import main
    path = write_config(tmp_path)
    sd = tmp_path / "runs" / "t-search"
    (sd / "tuner").mkdir(parents=True)
    (sd / "tuner" / "oracle.json").write_text("{}")
    held = lock_run_dir(sd)                          # another search (its PID: this process)
    try:
        for flag in ("--resume", "--overwrite"):
            assert main(["--config", str(path), flag]) == 2
            err = capsys.readouterr().err
            assert f"in use by another kfine process (PID {os.getpid()})" in err, err
            assert (sd / "tuner" / "oracle.json").read_text() == "{}"
    finally:
        held.release()


# ----------------------------------------------------------------------------- a search
def test_search_writes_its_outputs_and_best_yaml_trains(tmp_path):
    from kfine.train import run
    from kfine.tune import search

    cfg = load_config(write_config(tmp_path, max_trials=2))
    result = search(cfg)
    sd = result.search_dir
    assert sd == tmp_path / "runs" / "t-search"
    assert (sd / "tuner" / "oracle.json").exists() and (sd / "config.yaml").exists()
    trials = sorted((sd / "tuner").glob("trial_*"))
    assert len(trials) == 2
    rows = read_csv(sd / "results.csv")
    assert len(rows) == 2
    assert list(rows[0]) == ["trial_id", "status", "score", "scored_epoch", "scored_as", *SPACE, "seconds_by_stage"]
    from kfine.log import STAGES
    assert all(all(f"{s} " in r["seconds_by_stage"] for s in STAGES) for r in rows)   # where each trial's time went
    for row, tdir in zip(rows, trials):
        assert row["status"] == "COMPLETED" and tdir.name == f"trial_{row['trial_id']}"
        assert json.loads((tdir / "trial.json").read_text())["status"] == "COMPLETED"
        # the trial ran kfine's own training with its values, and is scored at the epoch it ships
        hist = read_history(tdir / "history.csv")
        assert [r["epoch"] for r in hist] == [0]
        assert float(row["score"]) == pytest.approx(hist[-1]["val_accuracy"])
        assert (row["scored_epoch"], row["scored_as"]) == ("0", "best")
        tcfg = load_config(tdir / "config.yaml")
        assert tcfg.train.schedule.learning_rate == pytest.approx(float(row["train.schedule.learning_rate"]))
        assert list(tcfg.model.scratch.filters) == yaml.safe_load(row["model.scratch.filters"])
        assert not (tdir / "checkpoints").exists()   # keep_checkpoints=False
    for name in ["search_scores.png", "search_train_schedule_learning_rate.png", "search_model_scratch_filters.png"]:
        png = (sd / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, name

    # best.yaml: the best trial as a full config that kfine.train accepts
    best_row = max(rows, key=lambda r: float(r["score"]))
    best = load_config(sd / "best.yaml", ["data.check=false"])
    assert best.name == "t-best" and best.search.space == {}
    assert best.train.schedule.learning_rate == pytest.approx(float(best_row["train.schedule.learning_rate"]))
    assert list(best.model.scratch.filters) == yaml.safe_load(best_row["model.scratch.filters"])
    trained = run(best)
    resolved = load_config(trained.run_dir / "config.yaml")
    assert resolved.train.schedule.learning_rate == best.train.schedule.learning_rate
    assert resolved.model.scratch.filters == best.model.scratch.filters
    assert [r["epoch"] for r in read_history(trained.run_dir / "history.csv")] == [0]

    # a finished search is not overwritten: a second one goes to t-search-2
    assert search(load_config(write_config(tmp_path, max_trials=1))).search_dir.name == "t-search-2"
    assert len(read_csv(sd / "results.csv")) == 2


def test_a_trial_is_scored_at_the_epoch_kfine_train_ships(tmp_path):
    """The learning rate under a cosine schedule is highest at epoch 0 and falls: as checkpoint
    monitor and objective (both max) it makes the best epoch known in advance and the final one
    worse. train.restore_best is on (there is a validation split), so kfine.train would ship
    epoch 0: the trial is scored there, and results.csv says so. With restore_best false it
    ships, and is scored at, the final epoch."""
    from kfine.config import replace
    from kfine.rundir import read_json
    from kfine.tune import run_trial_config, search
    extra = {"train": {"epochs": 3, "steps_per_epoch": 2, "verbose": 0,
                       "schedule": {"name": "cosine", "learning_rate": 0.01},
                       "checkpoint": {"monitor": "lr", "mode": "max"}},
             "search": {"objective": "lr", "direction": "max"}}
    space = {"model.scratch.filters": {"type": "choice", "values": [[4, 4, 8, 8, 8]]}}
    result = search(load_config(write_config(tmp_path, space, max_trials=1, extra=extra)))
    (row,) = read_csv(result.search_dir / "results.csv")
    (tdir,) = sorted((result.search_dir / "tuner").glob("trial_*"))
    hist = read_history(tdir / "history.csv")
    assert [r["epoch"] for r in hist] == [0, 1, 2] and hist[0]["lr"] > hist[1]["lr"] > hist[2]["lr"]
    assert float(row["score"]) == pytest.approx(hist[0]["lr"])
    assert (row["scored_epoch"], row["scored_as"]) == ("0", "best")

    final = run_trial_config(replace(load_config(tdir / "config.yaml"), ["train.restore_best=false"]), tmp_path / "f")
    assert final["lr"] == pytest.approx(read_history(tmp_path / "f" / "history.csv")[-1]["lr"])
    score = read_json(tmp_path / "f" / "score.json")
    assert (score["epoch"], score["scored_as"]) == (2, "final")


def test_batch_size_and_epochs_are_tunable_through_the_trial_config(tmp_path):
    from kfine.tune import search
    space = {"data.batch_size": {"type": "choice", "values": [4]}, "train.epochs": {"type": "choice", "values": [2]}}
    result = search(load_config(write_config(tmp_path, space, max_trials=1)))
    (tdir,) = sorted((result.search_dir / "tuner").glob("trial_*"))
    tcfg = load_config(tdir / "config.yaml")
    assert tcfg.data.batch_size == 4 and tcfg.train.epochs == 2
    assert [r["epoch"] for r in read_history(tdir / "history.csv")] == [0, 1]


# ----------------------------------------------------------------------------- resume, distributed
def trial_status(path: Path):
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):     # being written
        return None


def ended_trials(sd: Path) -> set[str]:
    """Trials KerasTuner has ended for good: trial.json says COMPLETED and oracle.json (which
    Oracle.end_trial saves just after the trial's file) no longer holds them as ongoing. A search
    killed between the two writes re-runs the trial on --resume, as KerasTuner resumes ongoing ones."""
    done = {p.parent.name[len("trial_"):] for p in sd.glob("tuner/trial_*/trial.json")
            if trial_status(p) == "COMPLETED"}
    try:
        ongoing = set(json.loads((sd / "tuner" / "oracle.json").read_text())["ongoing_trials"].values())
    except (OSError, ValueError, KeyError):     # being written
        return set()
    return done - ongoing


def test_resume_after_sigkill_skips_finished_trials(tmp_path, capsys):
    path = write_config(tmp_path, max_trials=3, epochs=2)
    sd = tmp_path / "runs" / "t-search"
    cmd = [sys.executable, "-m", "kfine.tune", "--config", str(path)]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        proc = forkserver.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ended_trials(sd):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be killed:\n" + first_log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = first_log.read_text()
    assert finished_trials(first) and len(finished_trials(first)) < 3
    # kfine numbers trials as KerasTuner prints them: its "Running Trial #1" is kfine's "trial #1"
    kt_numbers = re.findall(r"^Search: Running Trial #(\d+)$", first, flags=re.M)
    assert kt_numbers and kt_numbers == [str(int(t) + 1) for t in started_trials(first)], first[-3000:]
    assert not (sd / "results.csv").exists()

    second = forkserver.run([sys.executable, "-m", "kfine.tune", "--resume", str(sd)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    finished = finished_trials(first) + finished_trials(out)
    assert sorted(finished) == ["0", "1", "2"]                  # three trial runs in all, each once
    assert not set(finished_trials(first)) & set(started_trials(out))   # finished ones were not re-run
    rows = read_csv(sd / "results.csv")
    assert [r["trial_id"] for r in rows] == ["0", "1", "2"] and {r["status"] for r in rows} == {"COMPLETED"}
    assert (sd / "best.yaml").exists()
    # a finished search resumed again runs nothing (in process: main(argv))
    from kfine.tune import main
    capsys.readouterr()
    assert main(["--resume", str(sd)]) == 0
    out = capsys.readouterr().out
    assert f"kfine: search directory {sd}" in out and started_trials(out) == [], out[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m kfine.tune` with KerasTuner's chief polling every second, not every 20 s, for the last
# worker to leave once the trials are handed out (keras_tuner's oracle_chief.start_server); all
# else as the command
CHIEF = """
import sys, time, types
import keras_tuner.src.distribute.oracle_chief as chief
chief.time = types.SimpleNamespace(sleep=lambda s: time.sleep(min(s, 1.0)))
from kfine.tune import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow   # ~30 s: a chief and two workers start TensorFlow and share 3 trials
def test_distributed_chief_and_two_workers_share_one_search(tmp_path):
    pytest.importorskip("grpc")
    path = write_config(tmp_path, max_trials=3)
    sd = tmp_path / "runs" / "t-search"
    cmd = [sys.executable, "-m", "kfine.tune", "--config", str(path)]
    base = {**env(), "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}
    procs = {}
    for tid in ("chief", "tuner0", "tuner1"):
        log = open(tmp_path / f"{tid}.log", "w")
        args = [sys.executable, "-c", CHIEF, *cmd[3:]] if tid == "chief" else cmd
        procs[tid] = (forkserver.Popen(args, cwd=REPO, env={**base, "KERASTUNER_TUNER_ID": tid},
                                       stdout=log, stderr=subprocess.STDOUT), log)
    try:
        for tid, (proc, log) in procs.items():
            proc.wait(timeout=240)
            log.close()
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
    logs = {tid: (tmp_path / f"{tid}.log").read_text() for tid in procs}
    for tid, (proc, _) in procs.items():
        assert proc.returncode == 0, f"{tid}:\n{logs[tid][-3000:]}"
    assert started_trials(logs["chief"]) == []                 # the chief only hands out trials
    finished = finished_trials(logs["tuner0"]) + finished_trials(logs["tuner1"])
    assert sorted(finished) == ["0", "1", "2"]                  # each trial run once, by some worker
    rows = read_csv(sd / "results.csv")                         # written by the chief, from the shared dir
    assert len(rows) == 3 and {r["status"] for r in rows} == {"COMPLETED"}
    assert all((sd / "tuner" / f"trial_{r['trial_id']}" / "history.csv").exists() for r in rows)
    assert (sd / "best.yaml").exists()
