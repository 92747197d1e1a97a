"""kfine.distribute: the plan and its checks, each process's shard of the data, chief-only writes,
and training on two devices: TensorFlow's MirroredStrategy over 2 logical CPU devices and JAX's
DataParallel over 2 host devices (each in a subprocess, as devices are fixed at start-up), and two
JAX processes on loopback (gloo collectives). Many-GPU speed is not measured here (no GPUs)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import forkserver
from conftest import XLA_FLAGS, make_folder
from kfine.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def tiny(root, tmp_path, *extra):
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8",
            "model.weights=null", "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]",
            "train.verbose=0", "data.augment.enabled=false", "export.enabled=false", "data.check=false", "name=t",
            *extra]


# ----------------------------------------------------------------------------- the plan
def test_the_plan_checks_the_batch_backend_and_processes(tmp_path, monkeypatch):
    from kfine import distribute
    cfg = load_config(None, ["data.batch_size=6"])
    plan = distribute.make_plan(cfg)                    # auto on a machine without accelerators
    assert (plan.strategy, plan.replicas, plan.chief, plan.shard) == ("none", 1, True, None)

    monkeypatch.setitem(distribute.ENGINES, "mirrored", lambda: (None, ("CPU:0", "CPU:1", "CPU:2", "CPU:3")))
    with pytest.raises(ConfigError, match=r"data.batch_size must be a multiple of the 4 replicas.*Received: "
                                          r"data.batch_size=6"):
        distribute.make_plan(load_config(None, ["data.batch_size=6", "distribute.strategy=mirrored"]))
    plan = distribute.make_plan(load_config(None, ["data.batch_size=8", "distribute.strategy=mirrored"]))
    assert (plan.per_replica_batch, plan.per_process_batch, plan.shard) == (2, 8, None)   # mirrored splits itself
    with pytest.raises(ConfigError, match=r"train.optimizer.global_clipnorm must be null under distribute.strategy "
                                          r"mirrored \(Keras' TensorFlow optimizer clips each replica's share"):
        distribute.make_plan(load_config(None, ["distribute.strategy=mirrored", "train.optimizer.global_clipnorm=1.0"]))
    with pytest.raises(ConfigError, match=r"train.accumulate_steps must be 1 under distribute.strategy mirrored.*"
                                          r"keras-team/keras#20582"):
        distribute.make_plan(load_config(None, ["distribute.strategy=mirrored", "train.accumulate_steps=2"]))
    with pytest.raises(ConfigError, match="KERAS_BACKEND=jax"):
        distribute.make_plan(load_config(None, ["distribute.strategy=data_parallel"]))
    with pytest.raises(ConfigError, match=r"JAX backend.*keras-team/keras#20585"):
        distribute.make_plan(load_config(None, ["distribute.num_processes=2", "distribute.process_id=0",
                                                "distribute.coordinator_address=127.0.0.1:1234"]))
    with pytest.raises(ConfigError, match="coordinator_address"):
        distribute.processes_of(load_config(None, ["distribute.num_processes=2", "distribute.process_id=1"]))
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "10.0.0.1:1234")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "4")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "3")
    assert distribute.processes_of(load_config(None, [])) == ("10.0.0.1:1234", 4, 3)      # the environment
    assert distribute.processes_of(load_config(None, ["distribute.process_id=2"]))[2] == 2   # the config first
    with pytest.raises(ConfigError, match="distribute.strategy must be one of"):
        distribute.make_plan(load_config(None, ["distribute.strategy=horovod"]))


def test_config_checks_of_the_distribute_section():
    from kfine.config import check_config
    for override, message in [("distribute.strategy=horovod", "distribute.strategy must be one of"),
                              ("distribute.coordinator_address=nohost", "host:port"),
                              ("train.scale_lr_with_batch=sqrt", "train.scale_lr_with_batch must be one of"),
                              ("distribute.process_id=2", None)]:
        cfg = load_config(None, [override, "model.backbone=scratch_cnn", "model.weights=null"] +
                          (["distribute.num_processes=2"] if message is None else []))
        with pytest.raises(ConfigError, match=message or r"distribute.process_id must be < distribute.num_processes"):
            check_config(cfg)


def test_the_feature_cache_says_why_it_is_off_in_a_distributed_run():
    from kfine.distribute import Plan, feature_cache_reason
    from kfine.features import cache_reason
    assert feature_cache_reason() is None
    with Plan("mirrored", "tensorflow", ("CPU:0", "CPU:1"), global_batch=8).scope():
        assert "2 replicas" in feature_cache_reason() and cache_reason(None, None, None, 5) == feature_cache_reason()
    assert feature_cache_reason() is None


# ----------------------------------------------------------------------------- the data
def test_each_process_feeds_its_part_of_the_same_permutation(tmp_path):
    """Shard i of an epoch is every 2nd image from i of the one-process epoch, cut to a multiple of
    the replicas: the same permutation in every process, disjoint parts, every image with the
    augmentation it has unsharded; val is split the same way, in file order."""
    import keras
    from kfine.data import make_datasets
    from kfine.distribute import Shard
    root = make_folder(tmp_path / "data", "sketch", per_class=8)
    (root / "train_set" / "cat" / "000.png").unlink()                 # 23 training images: 22 kept
    cfg = load_config(None, [f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8",
                             "data.deterministic=true", "data.augment.flip=true"]).data
    keras.utils.set_random_seed(0)
    whole = make_datasets(cfg, 0)
    assert len(whole.files["train"]) == 23

    def epochs(ds, batches):
        out, it = [], iter(ds.repeat())
        for _ in range(2):
            got = [next(it) for _ in range(batches)]
            out.append((np.concatenate([x.numpy() for x, _ in got]), [len(y) for _, y in got]))
        return out

    one = epochs(whole.train, 3)                                      # 8 + 8 + 7 per epoch
    shards = [epochs(whole.dataset("train", shard=Shard(2, i, 4, 2)), 3) for i in (0, 1)]
    for e in range(2):
        for i in (0, 1):
            images, sizes = shards[i][e]
            assert sizes == [4, 4, 3]                                 # 11 of the 22 kept, per-process batch 4
            np.testing.assert_array_equal(images, one[e][0][:22][i::2])
    assert not np.array_equal(shards[0][0][0], shards[0][1][0])     # a new permutation each epoch
    val = [np.concatenate([x for x, _ in whole.dataset("val", shard=Shard(2, i, 4, 2)).as_numpy_iterator()])
           for i in (0, 1)]
    whole_val = np.concatenate([x for x, _ in whole.val.as_numpy_iterator()])
    np.testing.assert_array_equal(val[0], whole_val[0::2])
    np.testing.assert_array_equal(val[1], whole_val[1::2])


def test_a_process_other_than_the_chief_writes_nothing(tmp_path):
    from kfine.checkpoint import read_history
    from kfine.data import make_datasets
    from kfine.distribute import Plan
    from kfine.fit import build_training, setup_backend
    from kfine.train import fit_phases
    root = make_folder(tmp_path / "data", "sketch", per_class=4)
    cfg = load_config(None, tiny(root, tmp_path, "train.epochs=2", "train.checkpoint.every_epochs=1",
                                 "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}, {start_epoch: 1}]"))
    setup_backend(cfg)
    datasets = make_datasets(cfg.data, cfg.seed)
    for index, run_dir in ((1, tmp_path / "worker"), (0, tmp_path / "chief")):
        run_dir.mkdir()
        with Plan("none", "tensorflow", ("CPU:0",), processes=2, process_index=index, global_batch=8).scope():
            model, optimizer, schedule = build_training(cfg, datasets)
            history = fit_phases(model, cfg, datasets, run_dir, optimizer=optimizer, schedule=schedule)
        assert [r["epoch"] for r in history] == [0, 1]                # it trained both phases
        if index:
            assert list(run_dir.iterdir()) == []                      # no history, backup, checkpoint, log
    assert [r["epoch"] for r in read_history(tmp_path / "chief" / "history.csv")] == [0, 1]
    assert {p.name for p in (tmp_path / "chief").iterdir()} >= {"backup", "checkpoints", "phases.json", "tensorboard"}


def test_run_info_and_the_linear_learning_rate_rule(tmp_path):
    from kfine.rundir import read_json
    from kfine.train import read_history, run
    root = make_folder(tmp_path / "data", "sketch", per_class=4)
    cfg = load_config(None, tiny(root, tmp_path, "train.epochs=1", "train.scale_lr_with_batch=linear",
                                 "train.lr_base_batch=32", "train.schedule.learning_rate=0.01"))
    rd = run(cfg).run_dir
    info = read_json(rd / "run_info.json")
    assert info["weights"]["used"] == "random"                        # what was there stays
    assert {k: info[k] for k in ("backend", "strategy", "processes", "replicas", "global_batch",
                                 "per_replica_batch", "precision")} == {
        "backend": "tensorflow", "strategy": "none", "processes": 1, "replicas": 1, "global_batch": 8,
        "per_replica_batch": 8, "precision": "float32"}
    import keras
    import tensorflow as tf
    assert info["versions"]["keras"] == keras.__version__ and info["versions"]["tensorflow"] == tf.__version__
    assert info["learning_rate"] == pytest.approx(0.01 * 8 / 32)
    assert read_history(rd / "history.csv")[0]["lr"] == pytest.approx(0.0025)   # what the optimizer used


# ----------------------------------------------------------------------------- two devices, one process
# The runs compare one device with two on the same global batch. The batch is the whole training
# set where the backend feeds the replicas from its own iterator (MirroredStrategy starts later in
# the seeded sequence of permutations than one device: Keras opens iterators over the distributed
# dataset before training), so the trajectories can be compared whatever the order.
TWO_DEVICES = r"""
import json, os, sys
from pathlib import Path
backend, root, runs, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if backend == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from kfine import distribute, data as kdata
from kfine.config import load_config
from kfine.rundir import read_json
from kfine.fit import build_training, compile_model, setup_backend
from kfine.train import fit_phases, run
strategy = {"tensorflow": "mirrored", "jax": "data_parallel"}[backend]
base = [f"data.root={root}", "data.image_size=[32,32]", f"data.batch_size={batch}", "model.weights=null",
        "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]", "model.scratch.dropout=0.0",
        "train.verbose=0", "data.augment.enabled=false", "data.check=false", f"runs_dir={runs}",
        "data.deterministic=true"]
# a two-phase fine-tune with per-stage rates and EMA: on one device (training only), then a whole run
two_phases = base + ["train.epochs=2", "train.schedule.learning_rate=0.01", "train.ema.enabled=true",
    "train.lr_multipliers={block1: 0.1, block2: 0.3}",
    "train.phases=[{start_epoch: 0, freeze: {strategy: fraction, fraction: 0.5}}, {start_epoch: 1}]"]
cfg = load_config(None, two_phases + ["distribute.strategy=none"])
setup_backend(cfg)
datasets = kdata.make_datasets(cfg.data, cfg.seed)
model, optimizer, schedule = build_training(cfg, datasets)
Path(runs, "one").mkdir(parents=True)
out = {"none": {"history": fit_phases(model, cfg, datasets, Path(runs, "one"), optimizer=optimizer, schedule=schedule),
                "replicas": distribute.active().replicas}}
cfg = load_config(None, two_phases + [f"distribute.strategy={strategy}", f"name={strategy}",
                                      f"export.enabled={str(backend == 'tensorflow').lower()}"])   # JAX: test_jax.py
result = run(cfg)
out[strategy] = {"history": result.history, "run_info": read_json(result.run_dir / "run_info.json"),
                 "files": sorted(p.name for p in result.run_dir.iterdir()),
                 "metrics": read_json(result.run_dir / "metrics.json")}
# the step each stage takes under the strategy: Adam's first update moves every weight by
# lr * multiplier * g / (|g| + eps'), so its largest move in a layer is lr * multiplier
cfg = load_config(None, base + [f"distribute.strategy={strategy}", "train.schedule.learning_rate=0.01",
                                "train.lr_multipliers={block1: 0.1, block3: 0.5}"])
plan = distribute.make_plan(cfg)
with plan.scope():
    setup_backend(cfg)
    datasets = kdata.make_datasets(cfg.data, cfg.seed, shard=plan.shard)
    model, optimizer, schedule = build_training(cfg, datasets)
    compile_model(model, optimizer, cfg, len(datasets.class_names))
    layers = [model.get_layer("backbone").get_layer(f"block{i}_conv") for i in (1, 3, 5)] + [model.get_layer("head_logits")]
    before = [keras.ops.convert_to_numpy(layer.kernel) for layer in layers]
    model.fit(datasets.train.take(1), epochs=1, steps_per_epoch=1, verbose=0)   # a fixed count: Keras
    after = [keras.ops.convert_to_numpy(layer.kernel) for layer in layers]        # adds no extra iteration
out["steps"] = {"replicas": plan.replicas, "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations)),
                "largest": [float(np.abs(a - b).max()) for a, b in zip(after, before)]}
Path(runs, "out.json").write_text(json.dumps(out))
"""


def _two_devices(tmp_path_factory, backend: str, batch: int) -> dict:
    tmp = tmp_path_factory.mktemp(backend)
    root = make_folder(tmp / "data", "sketch", per_class=8)            # 24 train, 6 val, 6 test images
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{XLA_FLAGS} --xla_force_host_platform_device_count=2", "KFINE_OFFLINE": "1"}
    p = forkserver.run([sys.executable, "-c", TWO_DEVICES, backend, str(root), str(tmp / "runs"), str(batch)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads((tmp / "runs" / "out.json").read_text())


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    pytest.importorskip("tensorflow")
    return _two_devices(tmp_path_factory, "tensorflow", 24)


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    pytest.importorskip("jax")
    return _two_devices(tmp_path_factory, "jax", 8)


def _assert_same_training(out: dict, strategy: str):
    one, two = out["none"], out[strategy]
    info, batch = two["run_info"], {"mirrored": 24, "data_parallel": 8}[strategy]
    assert (info["strategy"], info["replicas"], len(info["devices"]), info["global_batch"],
            info["per_replica_batch"], info["processes"]) == (strategy, 2, 2, batch, batch // 2, 1)
    assert one["replicas"] == 1
    assert [(r["epoch"], r["phase"]) for r in two["history"]] == [(0, 0), (1, 1)]
    for key in ("loss", "val_loss", "val_accuracy", "lr"):   # val: the EMA weights (SwapEMAWeights)
        np.testing.assert_allclose([r[key] for r in two["history"]], [r[key] for r in one["history"]],
                                   rtol=1e-4, atol=1e-6, err_msg=key)
    assert two["history"][0]["loss"] != two["history"][-1]["loss"]   # it trained
    # evaluated on every test image, exported, written like any run
    assert two["metrics"]["test"]["n"] == 6
    assert {"model.keras", "metrics.json", "history.csv", "backup", "splits.csv"} <= set(two["files"])
    assert ("export" in two["files"]) == (strategy == "mirrored")


def _assert_multipliers_scale_the_step(steps: dict):
    assert (steps["replicas"], steps["iterations"]) == (2, 1)
    np.testing.assert_allclose(steps["largest"], [0.001, 0.005, 0.01, 0.01], rtol=2e-3)   # block1, 3, 5, head


def test_mirrored_two_phase_finetune_matches_one_device(mirrored):
    _assert_same_training(mirrored, "mirrored")


def test_mirrored_learning_rate_multipliers_scale_the_step_per_stage(mirrored):
    _assert_multipliers_scale_the_step(mirrored["steps"])


@pytest.mark.slow   # ~40 s: JAX compiles each phase's steps for 1 and 2 devices
def test_data_parallel_two_phase_finetune_matches_one_device(data_parallel):
    _assert_same_training(data_parallel, "data_parallel")


@pytest.mark.slow   # ~40 s: JAX compiles each phase's steps for 1 and 2 devices
def test_data_parallel_learning_rate_multipliers_scale_the_step_per_stage(data_parallel):
    _assert_multipliers_scale_the_step(data_parallel["steps"])


# ----------------------------------------------------------------------------- two processes
MULTI = r"""
import hashlib, json, sys
import numpy as np
from kfine import distribute, data as kdata
from kfine.config import load_config
from kfine.fit import setup_backend, steps_per_epoch
from kfine.train import run
cfg = load_config(sys.argv[1], sys.argv[3:])
plan = distribute.make_plan(cfg)   # joins the other process; run() below finds it joined
setup_backend(cfg)
datasets = kdata.make_datasets(cfg.data, cfg.seed, shard=plan.shard)
digest = lambda x: hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
views = datasets.dataset("train", train=False, batch=False, shuffle=False).as_numpy_iterator()
name = {digest(x): path for (x, _), (path, _) in zip(views, datasets.files["train"])}
batches, steps = iter(datasets.train.repeat()), steps_per_epoch(cfg, datasets)
epochs = []
for _ in range(2):   # what this process's pipeline yields in two epochs
    got = [next(batches) for _ in range(steps)]
    epochs.append({"files": [name[digest(x)] for images, _ in got for x in images.numpy()],
                   "batches": [len(y) for _, y in got]})
with open(sys.argv[2], "w") as f:
    json.dump({"process": plan.process_index, "epochs": epochs, "train": [p for p, _ in datasets.files["train"]]}, f)
run(cfg)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, tmp_path, tag, extra_env=None):
    """The same command in processes 0 and 1 of a loopback cluster (one CPU device each)."""
    port, procs = _free_port(), []
    for i in (0, 1):
        env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
               "KFINE_OFFLINE": "1", "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": str(i), **(extra_env or {})}
        env["XLA_FLAGS"] = XLA_FLAGS   # one device each
        env = {k: v.replace("{i}", str(i)) for k, v in env.items()}
        log = open(tmp_path / f"{tag}{i}.log", "w")
        procs.append(forkserver.Popen([sys.executable, *[a.replace("{i}", str(i)) for a in args]], env=env,
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _logs(tmp_path, tag) -> str:
    return "\n".join(f"--- {tag}{i}\n" + (tmp_path / f"{tag}{i}.log").read_text()[-3000:] for i in (0, 1))


@pytest.mark.slow   # ~1-2 min: two JAX processes start, train, are killed and resume
def test_two_processes_on_loopback_shard_the_data_write_once_and_resume(tmp_path):
    """Two JAX processes (one CPU device each): each feeds its half of the same permutation; only
    process 0 writes, in the run directory it chose (an earlier run of the same name is in its
    runs_dir, so the new run goes to t-2; process 1's own runs_dir is empty, so t-2 can only come
    from the chief); killed in epoch 1 and resumed by two fresh processes."""
    pytest.importorskip("jax")
    from kfine.checkpoint import read_state
    from kfine.train import read_history
    root = make_folder(tmp_path / "data", "sketch", per_class=8)
    (root / "train_set" / "cat" / "000.png").unlink()                 # 23 training images: 22 used per epoch
    earlier = tmp_path / "runs0" / "t"   # an earlier run of the same name: the new one goes to t-2
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "config.yaml").write_text("name: t\n")
    (earlier / "checkpoints" / "best.keras").write_bytes(b"the earlier run's weights")   # not a model
    (earlier / "checkpoints" / "best.json").write_text('{"epoch": 7}')
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    (tmp_path / "c.yaml").write_text("name: t\n")
    overrides = [f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8", "model.weights=null",
                 "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]", "train.verbose=2",
                 "data.augment.enabled=false", "export.enabled=false", "data.check=false", "train.epochs=2",
                 "train.phases=[{start_epoch: 0, freeze: {strategy: fraction, fraction: 0.5}}, {start_epoch: 1}]",
                 "distribute.strategy=data_parallel", f"runs_dir={tmp_path}/runs{{i}}",   # process 1: runs1
                 "train.drop_remainder=false"]   # JAX would drop each shard's partial batch; here every image counts
    pause = {"KFINE_TEST_PAUSE": "epoch@1", "KFINE_TEST_PAUSE_MARKER": str(tmp_path / "paused{i}")}
    procs = _launch(["-c", MULTI, str(tmp_path / "c.yaml"), str(tmp_path / "shard{i}.json"), *overrides],
                    tmp_path, "first", pause)
    rd = tmp_path / "runs0" / "t-2"
    deadline = time.monotonic() + 400
    try:   # both paused in epoch 1, and epoch 0 committed by process 0
        while not ((tmp_path / "paused0").exists() and (tmp_path / "paused1").exists()
                   and (read_state(rd) or {}).get("next_epoch") == 1):
            assert all(p.poll() is None for p in procs), _logs(tmp_path, "first")
            assert time.monotonic() < deadline, _logs(tmp_path, "first")
            time.sleep(1)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    shards = [json.loads((tmp_path / f"shard{i}.json").read_text()) for i in (0, 1)]
    train = set(shards[0]["train"])
    assert len(train) == 23 and shards[1]["train"] == shards[0]["train"]
    for e in range(2):
        parts = [s["epochs"][e]["files"] for s in shards]
        assert [s["epochs"][e]["batches"] for s in shards] == [[4, 4, 3], [4, 4, 3]]   # 8 = 4 + 4 per step
        assert len(set(parts[0])) == len(set(parts[1])) == 11 and not set(parts[0]) & set(parts[1])
        assert set(parts[0]) | set(parts[1]) <= train                   # disjoint halves of 22 of the 23
    assert shards[0]["epochs"][0]["files"] != shards[0]["epochs"][1]["files"]   # reshuffled each epoch
    assert not (tmp_path / "runs1").exists()                           # process 1 wrote nothing
    assert sorted(p.name for p in (tmp_path / "runs0").iterdir()) == ["t", "t-2"]
    firsts = [(tmp_path / f"first{i}.log").read_text() for i in (0, 1)]
    assert f"kfine: run directory {rd} (process 0 of 2" in firsts[0], _logs(tmp_path, "first")
    assert f"process 0 writes the run directory {rd}\n" in firsts[1], _logs(tmp_path, "first")

    procs = _launch(["-m", "kfine.train", "--resume", str(rd)], tmp_path, "resume")
    try:
        for p in procs:
            assert p.wait(timeout=400) == 0, _logs(tmp_path, "resume")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [(tmp_path / f"resume{i}.log").read_text() for i in (0, 1)]
    assert all("resuming at epoch 2" in log for log in logs), _logs(tmp_path, "resume")
    assert "process 1 of 2: process 0 writes the run directory" in logs[1]
    assert [(r["epoch"], r["phase"]) for r in read_history(rd / "history.csv")] == [(0, 0), (1, 1)]
    info = json.loads((rd / "run_info.json").read_text())
    assert (info["processes"], info["replicas"], info["per_process_batch"]) == (2, 2, 4)
    assert (rd / "model.keras").exists() and json.loads((rd / "metrics.json").read_text())["test"]["n"] == 6
    assert not (tmp_path / "runs1").exists()
    best = json.loads((rd / "checkpoints" / "best.json").read_text())["epoch"]   # the new run's best epoch
    assert f"the model now holds epoch {best + 1}'s weights, the best" in logs[1], _logs(tmp_path, "resume")
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before   # untouched


def test_mirrored_keeps_the_partial_batch_as_keras_compiles_it_without_xla(monkeypatch):
    """train.drop_remainder null follows what Keras compiles (jit_compile auto): on a GPU a step
    is XLA-compiled and a partial batch would compile a second program (dropped), but under
    MirroredStrategy Keras turns XLA off, so nothing is dropped. A GPU is faked: Keras and kfine
    both ask tf.config.list_physical_devices."""
    import keras
    if keras.backend.backend() != "tensorflow":
        pytest.skip("mirrored runs on the TensorFlow backend")
    import tensorflow as tf
    from kfine import distribute
    from kfine.fit import drops_remainder
    cfg = load_config(None, ["data.batch_size=8"])
    assert cfg.train.drop_remainder is None and cfg.train.jit_compile == "auto"
    strategy, devices = distribute._mirrored()
    real, gpu = tf.config.list_physical_devices, tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda device_type=None: real(device_type) + ([gpu] if device_type in (None, "GPU") else []))
    for plan in (distribute.Plan("none", "tensorflow", ("GPU:0",), global_batch=8),
                 distribute.Plan("mirrored", "tensorflow", devices, global_batch=8, engine=strategy)):
        with plan.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            model.compile(optimizer="sgd", loss="mse", jit_compile=cfg.train.jit_compile)   # as compile_model does
            assert bool(model.jit_compile) is (plan.strategy == "none"), plan.strategy
            assert drops_remainder(cfg) is bool(model.jit_compile), plan.strategy
