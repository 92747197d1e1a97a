"""kfine.checkpoint: the per-epoch commit and what it writes, backups keyed by variable path, the
loss scale across phases and resumes, the run-directory lock, temporaries of killed writes, lean
checkpoints and SavedModel, and SIGKILL at every moment of a run followed by --resume."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import forkserver
from conftest import interrupted_after_epoch, make_folder
from kfine import checkpoint
from kfine.checkpoint import CheckpointSaver, TrainingError, keyed_variables, load_backup, read_history
from kfine.config import load_config
from kfine.rundir import read_json, write_json

REPO = Path(__file__).resolve().parent.parent
TWO_PHASES = "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}, {start_epoch: 2, freeze: {strategy: none}}]"


def tiny(tmp_path, *extra):
    root = tmp_path / "data"
    if not root.exists():
        make_folder(root, "single", per_class=8)
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.layout=single",
            "data.image_size=[32,32]", "data.batch_size=8", "model.weights=null", "train.verbose=0",
            "data.augment.enabled=false", "export.enabled=false", "name=t", "model.backbone=scratch_cnn",
            "model.scratch.filters=[4,4,8,8,8]", "model.scratch.batchnorm=true", "model.scratch.dense_units=16",
            "train.optimizer.name=adam", *extra]


def numpy_of(keyed):
    import keras
    return {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in keyed.items()}


def weights_of(path):
    import keras
    import kfine.model  # noqa: F401
    model = keras.saving.load_model(path, compile=False)
    return model, {v.path: np.array(v.numpy()) for v in model.weights}


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """Two epochs of phase 0 (backbone frozen) committed by a CheckpointSaver, with host copies of
    every variable taken at each commit while training went on in between."""
    import keras
    from kfine.data import make_datasets
    from kfine.freeze import apply_freeze
    from kfine.fit import build_training, compile_model
    tmp = tmp_path_factory.mktemp("committed")
    cfg = load_config(None, tiny(tmp, "train.epochs=4", TWO_PHASES, "train.checkpoint.every_epochs=1",
                                 "train.checkpoint.keep=5"))
    ds = make_datasets(cfg.data, cfg.seed)
    keras.utils.set_random_seed(0)
    model, opt, _ = build_training(cfg, ds)
    apply_freeze(model, cfg.model.backbone, cfg.train.phases[0].freeze)
    compile_model(model, opt, cfg, len(ds.class_names))
    saver = CheckpointSaver(tmp / "run", cfg.train.checkpoint, cfg.train.epochs)
    copies = []
    for epoch, val in ((0, 0.5), (1, 0.25)):
        model.fit(ds.train, epochs=1, verbose=0)
        saver.commit_epoch(model, epoch, 0, {"epoch": epoch, "phase": 0, "lr": 1e-3, "val_accuracy": val})
        copies.append(numpy_of(keyed_variables(model, opt)))
        model.fit(ds.train, epochs=1, verbose=0)   # training goes on while the commit is written
    saver.close()
    return dict(cfg=cfg, ds=ds, model=model, opt=opt, run=tmp / "run", copies=copies)


def test_a_commit_writes_frozen_variables_once_per_phase_and_the_rest_every_epoch(committed):
    backup = committed["run"] / "backup"
    state = read_json(backup / "state.json")
    assert state["next_epoch"] == 2 and [r["epoch"] for r in state["history"]] == [0, 1]
    assert state["files"] == ["frozen_p00_e0000.npz", "epoch_0001.npz"]
    assert sorted(p.name for p in backup.iterdir()) == ["epoch_0001.npz", "frozen_p00_e0000.npz", "state.json"]
    with np.load(backup / "frozen_p00_e0000.npz") as f, np.load(backup / "epoch_0001.npz") as e:
        frozen, changing = set(f.files), set(e.files)
    assert not frozen & changing
    assert {"model/block1_conv/kernel", "model/block1_bn/moving_mean",          # a frozen layer's weights,
            "optimizer/block1_conv_kernel_momentum"} <= frozen                   # its Adam slots
    assert {"model/head_logits/kernel", "model/head_dense0/kernel", "optimizer/iteration"} <= changing
    assert frozen | changing == set(keyed_variables(committed["model"], committed["opt"]))


def test_the_backup_restores_the_committed_epoch_exactly(committed):
    """Into a freshly built model and optimizer, by key: the values of epoch 1's end, not the
    values training moved on to."""
    import keras
    from kfine.fit import build_training
    keras.utils.set_random_seed(1)
    fresh, fresh_opt, _ = build_training(committed["cfg"], committed["ds"])
    state = load_backup(committed["run"], fresh, fresh_opt)
    assert state["next_epoch"] == 2
    got, want = numpy_of(keyed_variables(fresh, fresh_opt)), committed["copies"][1]
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    now = numpy_of(keyed_variables(committed["model"], committed["opt"]))
    assert not np.array_equal(now["model/head_logits/kernel"], want["model/head_logits/kernel"])
    assert int(fresh_opt.iterations.numpy()) == int(want["optimizer/iteration"]) > 0


def test_checkpoints_hold_the_epochs_weights_for_inference(committed):
    """Written on the writer thread from the epoch's host copy while the model trained on: each
    checkpoint has exactly that epoch's weights, and no optimizer state."""
    ckpt = committed["run"] / "checkpoints"
    assert read_json(ckpt / "best.json") == {"epoch": 0, "val_accuracy": 0.5}
    for name, epoch in (("epoch_0000.keras", 0), ("epoch_0001.keras", 1), ("best.keras", 0)):
        model, weights = weights_of(ckpt / name)
        assert getattr(model, "optimizer", None) is None, name
        want = committed["copies"][epoch]
        assert weights.keys() == {k[len("model/"):] for k in want if k.startswith("model/")}
        for path, value in weights.items():
            np.testing.assert_array_equal(value, want[f"model/{path}"], err_msg=f"{name} {path}")
    assert not [p for p in committed["run"].rglob(".*") if ".tmp" in p.name]


def test_a_frozen_variable_that_changed_during_its_phase_is_an_error(committed, tmp_path):
    """The backup writes frozen variables once per phase; if one changed after all (a layer that
    updates its variables while trainable is False), the phase's end says so instead of leaving a
    backup that would resume wrongly."""
    model, opt = committed["model"], committed["opt"]
    saver = CheckpointSaver(tmp_path / "run", committed["cfg"].train.checkpoint, 4)
    saver.commit_epoch(model, 0, 0, {"epoch": 0, "phase": 0, "lr": 1e-3})
    saver.end_phase(model)                                      # nothing moved
    kernel = model.get_layer("backbone").get_layer("block1_conv").kernel
    before = kernel.numpy()
    kernel.assign(before + 1.0)
    try:
        with pytest.raises(TrainingError, match="model/block1_conv/kernel"):
            saver.end_phase(model)
    finally:
        kernel.assign(before)
        saver.close()


def test_a_backup_refuses_a_model_with_another_variable_and_names_it(committed):
    import keras
    from kfine.fit import build_training
    fresh, fresh_opt, _ = build_training(committed["cfg"], committed["ds"])
    fresh.get_layer("head_dense0").enable_lora(2)        # the model gained two variables
    before = np.array(fresh.get_layer("head_logits").kernel.numpy())
    with pytest.raises(TrainingError, match="model/head_dense0/lora_kernel_a"):
        load_backup(committed["run"], fresh, fresh_opt)
    np.testing.assert_array_equal(fresh.get_layer("head_logits").kernel.numpy(), before)  # nothing assigned
    other_cfg = load_config(None, tiny(committed["run"].parent, "model.scratch.filters=[4,4,8,8,16]", TWO_PHASES,
                                       "train.epochs=4"))
    other, other_opt, _ = build_training(other_cfg, committed["ds"])
    with pytest.raises(TrainingError, match=r"saved shape != built shape: model/block5_conv/kernel"):
        load_backup(committed["run"], other, other_opt)
    keras.utils.set_random_seed(0)


def test_the_loss_scale_is_kept_across_phases_and_in_the_backup(tmp_path):
    """mixed_float16: one LossScaleOptimizer for the run; a recompile at a phase change used to wrap
    a fresh one (scale back to 2**15), and the backup did not hold the scale."""
    import keras
    from kfine.data import make_datasets
    from kfine.freeze import apply_freeze
    from kfine.fit import build_training, compile_model
    try:
        cfg = load_config(None, tiny(tmp_path, "train.epochs=4", TWO_PHASES, "train.precision=mixed_float16",
                                     "train.checkpoint.every_epochs=0"))
        keras.mixed_precision.set_global_policy("mixed_float16")
        ds = make_datasets(cfg.data, cfg.seed)
        model, opt, _ = build_training(cfg, ds)
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
        opt.dynamic_scale.assign(64.0)
        compile_model(model, opt, cfg, 3)
        model.fit(ds.train, epochs=1, verbose=0)
        scale0 = float(opt.dynamic_scale.numpy())
        apply_freeze(model, cfg.model.backbone, cfg.train.phases[1].freeze)
        compile_model(model, opt, cfg, 3)                  # the phase change
        assert model.optimizer is opt and float(model.optimizer.dynamic_scale.numpy()) == scale0
        model.fit(ds.train, epochs=1, verbose=0)
        scale1 = float(opt.dynamic_scale.numpy())
        assert scale1 in (scale0, scale0 / 2, scale0 / 4) and scale1 <= 64.0
        saver = CheckpointSaver(tmp_path / "run", cfg.train.checkpoint, 4)
        saver.commit_epoch(model, 2, 1, {"epoch": 2, "phase": 1, "lr": 1e-3})
        saver.close()
        fresh, fresh_opt, _ = build_training(cfg, ds)
        assert float(fresh_opt.dynamic_scale.numpy()) == 2.0 ** 15
        load_backup(tmp_path / "run", fresh, fresh_opt)
        assert float(fresh_opt.dynamic_scale.numpy()) == scale1
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_the_run_directory_lock(tmp_path, capsys):
    first = checkpoint.lock_run_dir(tmp_path)
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(TrainingError, match=f"in use by another kfine process \\(PID {os.getpid()}\\)"):
        checkpoint.lock_run_dir(tmp_path)
    first.release()
    checkpoint.lock_run_dir(tmp_path).release()
    assert "took over" not in capsys.readouterr().out      # a released lock is not a stale one
    (tmp_path / ".lock").write_text("4194000\n")           # left by a killed process: nobody holds it
    lock = checkpoint.lock_run_dir(tmp_path)
    assert "took over" in capsys.readouterr().out and "4194000" not in (tmp_path / ".lock").read_text()
    lock.release()


def test_temporaries_of_interrupted_writes_are_found_and_removed(tmp_path):
    temps = [tmp_path / "checkpoints" / ".best.tmp1234.keras", tmp_path / "checkpoints" / ".e0003.tmp99.keras",
             tmp_path / ".history.csv.tmp77", tmp_path / "backup" / ".epoch_0002.tmp5.npz",
             tmp_path / "export" / "saved_model" / ".tmp-abc_12" / "sm" / "saved_model.pb",
             tmp_path / "export" / "saved_model" / ".1.old42" / "saved_model.pb"]
    keep = [tmp_path / ".lock", tmp_path / "history.csv", tmp_path / "checkpoints" / "best.keras",
            tmp_path / "export" / "saved_model" / "1" / "saved_model.pb"]
    for p in temps + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    removed = checkpoint.clean_temp_files(tmp_path)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in temps) and len(removed) == 6
    assert not (tmp_path / "export" / "saved_model" / ".tmp-abc_12").exists()


def test_saved_model_holds_each_variable_once_and_answers_like_keras(tmp_path):
    """keras' ExportArchive.track(model) stored every variable twice (189 MB for a 94 MB ResNet50)."""
    import keras
    import tensorflow as tf
    from kfine.config import ModelConfig, ScratchConfig
    from kfine.export import export_model
    from kfine.model import build_model, probabilities
    cfg = ModelConfig(backbone="scratch_cnn", weights=None,
                      scratch=ScratchConfig(filters=(32,), dense_units=256, dropout=0.0))
    model = build_model(cfg, 3, (32, 32))       # 16*16*32 -> 256: 2.1M parameters, 8.4 MB
    nbytes = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    export_model(model, ["a", "b", "c"], (32, 32), tmp_path / "export")
    sm = tmp_path / "export" / "saved_model" / "1"
    data = sum(p.stat().st_size for p in (sm / "variables").glob("variables.data-*"))
    assert nbytes < data < 1.05 * nbytes, (data, nbytes)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    got = tf.saved_model.load(str(sm)).signatures["serving_tensor"](image=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(got.numpy(), keras.ops.convert_to_numpy(probabilities(model, x)), atol=1e-6)


def test_a_finished_run_keeps_no_optimizer_state_and_resume_redoes_missing_outputs(tmp_path):
    import keras
    from kfine.train import run
    cfg = load_config(None, tiny(tmp_path, "train.epochs=2", "export.enabled=true",
                                 "train.checkpoint.every_epochs=1"))
    result = run(cfg)
    rd = result.run_dir
    state = read_json(rd / "backup" / "state.json")
    assert state["finished"] and state["files"] == [] and not list((rd / "backup").glob("*.npz"))
    model, weights = weights_of(rd / "model.keras")
    assert getattr(model, "optimizer", None) is None
    for v in result.model.weights:
        np.testing.assert_array_equal(weights[v.path], keras.ops.convert_to_numpy(v))
    assert sorted(p.name for p in (rd / "checkpoints").glob("*.keras")) == ["best.keras", "epoch_0000.keras"]
    shutil.rmtree(rd / "export")
    (rd / "metrics.json").unlink()
    again = run(cfg, resume=rd)
    assert (rd / "export" / "saved_model" / "1" / "saved_model.pb").exists() and (rd / "metrics.json").exists()
    assert [r["epoch"] for r in read_history(rd / "history.csv")] == [0, 1]
    for v, w in zip(result.model.weights, again.model.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), keras.ops.convert_to_numpy(w))


def test_resume_after_the_last_commit_writes_the_ema_weights(tmp_path):
    """train.ema: killed after the last epoch's commit, before its checkpoint and model.keras,
    --resume writes best.keras and model.keras with the averaged weights, as the uninterrupted
    run does (the resumed model is not compiled when it catches up: the averages are in the
    run's optimizer, restored from the backup, not in model.optimizer)."""
    import keras
    from kfine.data import make_datasets
    from kfine.fit import build_training, compile_model
    from kfine.train import run
    cfg = load_config(None, tiny(tmp_path, "train.epochs=1", "train.restore_best=false",
                                 "train.ema={enabled: true, momentum: 0.5}"))
    ds = make_datasets(cfg.data, cfg.seed)
    rd = tmp_path / "run"
    model, opt, _ = build_training(cfg, ds)
    compile_model(model, opt, cfg, len(ds.class_names))
    model.fit(ds.train, epochs=1, verbose=0)
    saver = CheckpointSaver(rd, cfg.train.checkpoint, cfg.train.epochs)
    saver.commit_epoch(model, 0, 0, {"epoch": 0, "phase": 0, "lr": 1e-3, "val_accuracy": 0.5})
    saver.close()
    averages = {v.path: keras.ops.convert_to_numpy(a) for v, a in opt.ema_pairs()}
    assert any(not np.array_equal(averages[v.path], keras.ops.convert_to_numpy(v)) for v, _ in opt.ema_pairs())
    uninterrupted = weights_of(rd / "checkpoints" / "best.keras")[1]
    for path, average in averages.items():   # what the commit wrote: the averages, not the raw weights
        np.testing.assert_array_equal(uninterrupted[path], average)

    shutil.rmtree(rd / "checkpoints")   # the kill: after the commit, before its checkpoint
    (rd / "history.csv").unlink()
    write_json(rd / "phases.json", [{"index": 0, "start_epoch": 0, "end_epoch": 1}])   # a run's phase 0
    run(cfg, resume=rd)
    assert [r["epoch"] for r in read_history(rd / "history.csv")] == [0]
    for name in ("checkpoints/best.keras", "model.keras"):
        written = weights_of(rd / name)[1]
        assert written.keys() == uninterrupted.keys()
        for path, w in uninterrupted.items():
            np.testing.assert_array_equal(written[path], w, err_msg=f"{name}: {path}")


def test_a_checkpoint_keeps_the_optimizer_when_asked(tmp_path):
    from kfine.train import run
    cfg = load_config(None, tiny(tmp_path, "train.epochs=2", "train.checkpoint.save_optimizer=true",
                                 "train.checkpoint.monitor=val_loss"))
    rd = run(cfg).run_dir
    import keras
    import kfine.optim  # noqa: F401  (registers kfine's optimizers)
    model = keras.saving.load_model(rd / "checkpoints" / "best.keras")
    assert int(model.optimizer.iterations.numpy()) > 0
    assert any("velocity" in v.path for v in model.optimizer.variables)


def test_a_phase_on_cached_features_writes_best_keras_once_and_a_kill_before_loses_nothing(tmp_path, monkeypatch):
    """A head-only phase on cached features: the monitor (the learning rate, falling under cosine)
    improves at every epoch, yet best.keras is written once, at the phase's end, holding the best
    epoch's weights (those of its periodic checkpoint). Until then the commit keeps the best
    epoch's arrays: the best is epoch 0 (mode max), the run is stopped after epoch 1's commit
    (Ctrl-C: best.keras is written on the way out) and left as a SIGKILL there leaves it (no
    best.keras); --resume writes best.keras from the kept arrays."""
    from kfine.train import main, run
    published = []
    publish = CheckpointSaver._publish
    monkeypatch.setattr(CheckpointSaver, "_publish",
                        lambda self, tmp, names, epoch, h: published.append((tuple(names), epoch)) or publish(self, tmp, names, epoch, h))
    head = ["train.epochs=3", "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]",
            "train.schedule={name: cosine, learning_rate: 0.01}", "train.checkpoint.every_epochs=1",
            "train.checkpoint.keep=3"]
    rd = run(load_config(None, tiny(tmp_path, *head, "train.checkpoint.monitor=lr", "train.checkpoint.mode=min", "name=every"))).run_dir
    assert [n for n in published if "best.keras" in n[0]] == [(("best.keras",), 2)]   # once, the phase's end
    assert read_json(rd / "checkpoints" / "best.json")["epoch"] == 2

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: t\n")
    args = ["--config", str(cfg_file), *tiny(tmp_path, *head, "train.checkpoint.monitor=lr", "train.checkpoint.mode=max")]
    with interrupted_after_epoch(monkeypatch, 1):
        assert main(args) == 130
    rd, ckpt = tmp_path / "runs" / "t", tmp_path / "runs" / "t" / "checkpoints"
    state = read_json(rd / "backup" / "state.json")
    assert state["best_pending"] == {"epoch": 0, "files": [state["files"][0], "epoch_0000.npz"]}
    assert sorted(p.name for p in (rd / "backup").glob("epoch_*.npz")) == ["epoch_0000.npz", "epoch_0001.npz"]
    epoch0 = weights_of(ckpt / "epoch_0000.keras")[1]
    for path, w in weights_of(ckpt / "best.keras")[1].items():   # written on the way out of Ctrl-C
        np.testing.assert_array_equal(w, epoch0[path], err_msg=path)
    for name in ("best.keras", "best.json"):   # what a SIGKILL after the commit leaves
        (ckpt / name).unlink()
    assert main(["--resume", str(rd)]) == 0
    assert read_json(ckpt / "best.json")["epoch"] == 0
    best = weights_of(ckpt / "best.keras")[1]
    assert any(not np.array_equal(w, epoch0[p]) for p, w in weights_of(ckpt / "epoch_0001.keras")[1].items())
    for path, w in best.items():
        np.testing.assert_array_equal(w, epoch0[path], err_msg=path)
    assert not list((rd / "backup").glob("*.npz"))   # finished: the kept arrays are gone too


def test_a_run_interrupted_after_an_epoch_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Stopped right after epoch 1's commit and resumed at epoch 2: the same final weights as the
    run that was never interrupted. Epoch e's order, crops, flips, erasing, MixUp/CutMix draws
    (off from epoch 4: mix_off_epochs) and dropout masks come from (seed, e), not from how many
    epochs the process has run (the resumed process used to replay epoch 0's order and
    augmentations at epoch 2)."""
    import keras
    from kfine import train
    over = tiny(tmp_path, "train.epochs=5", "train.restore_best=false", "export.enabled=false",
                "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]", "train.steps_per_epoch=2",
                "data.augment.enabled=true", "data.augment.random_resized_crop=true", "data.augment.flip=true",
                "data.augment.random_erasing.probability=0.5", "data.augment.mixup.alpha=0.4",
                "data.augment.mixup.probability=0.5", "data.augment.cutmix.alpha=1.0",
                "data.augment.cutmix.probability=0.5", "data.augment.mix_off_epochs=1", "data.deterministic=true")
    whole = train.run(load_config(None, over + ["name=whole"]))

    cfg = load_config(None, over + ["name=cut"])
    with interrupted_after_epoch(monkeypatch, 1), pytest.raises(KeyboardInterrupt):   # epoch 1 is committed
        train.run(cfg)
    assert read_json(tmp_path / "runs" / "cut" / "backup" / "state.json")["next_epoch"] == 2
    resumed = train.run(cfg, resume=tmp_path / "runs" / "cut")
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3, 4]
    for a, b in zip(whole.model.weights, resumed.model.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a), atol=1e-6,
                                   err_msg=a.path)


def test_phase_progress_bar_counts_epochs_over_the_run(capsys):
    """Each phase is its own fit(); Keras printed no "Epoch 1/N" line for a one-epoch first phase."""
    import keras
    from kfine.callbacks import PhaseProgbar
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32)
    model.fit(x, y, epochs=1, verbose=1, callbacks=[PhaseProgbar(8)])
    model.fit(x, y, initial_epoch=1, epochs=3, verbose=1, callbacks=[PhaseProgbar(8)])
    out = capsys.readouterr().out
    assert "Epoch 1/8" in out and "Epoch 2/8" in out and "Epoch 3/8" in out and "Epoch 2/3" not in out


# ----------------------------------------------------------------------------- kills
def _env(**extra):
    env = {**os.environ, "KFINE_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    for k in ("KFINE_TEST_PAUSE", "KFINE_TEST_PAUSE_MARKER"):
        if k not in extra:
            env.pop(k, None)
    return env


def _start(args, env, log):
    return forkserver.Popen([sys.executable, "-m", "kfine.train", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"never reached {what} (exit {proc.returncode})")
        time.sleep(0.01)


def _resume(rd):
    return forkserver.run([sys.executable, "-m", "kfine.train", "--resume", str(rd)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _temporaries(rd):
    return [p for p in rd.rglob(".*") if checkpoint._TEMP_NAME.match(p.name)]


def _interrupt_and_resume(tmp_path, monkeypatch, capsys, epoch, epochs, extra=()):
    """Run (no export) in process, interrupted right after epoch ``epoch``'s commit (a callback
    after kfine's raises), left as a SIGKILL right after that commit leaves it (history.csv and
    the epoch's checkpoints not yet written: in process, the writer finished them on the way
    out), then --resume it in process; returns (run dir, the resume's stdout)."""
    from kfine.train import main
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: t\n")
    args = ["--config", str(cfg_file), *tiny(tmp_path, f"train.epochs={epochs}", "train.checkpoint.every_epochs=1",
                                             TWO_PHASES, *extra)]
    with interrupted_after_epoch(monkeypatch, epoch):
        assert main(args) == 130   # "kfine: interrupted", as after Ctrl-C
    rd = tmp_path / "runs" / "t"
    assert read_json(rd / "backup" / "state.json")["next_epoch"] == epoch + 1
    checkpoint.write_history(rd / "history.csv", read_history(rd / "history.csv")[:epoch])
    (rd / "checkpoints" / f"epoch_{epoch:04d}.keras").unlink()
    if read_json(rd / "checkpoints" / "best.json")["epoch"] == epoch:
        for name in ("best.keras", "best.json"):
            (rd / "checkpoints" / name).unlink()
    capsys.readouterr()
    assert main(["--resume", str(rd)]) == 0
    return rd, capsys.readouterr().out


def _assert_complete(rd, resumed, epochs=3):
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    hist = read_history(rd / "history.csv")
    assert [r["epoch"] for r in hist] == list(range(epochs))                 # every epoch once
    assert [r["phase"] for r in hist] == [0, 0, 1][:epochs]
    for f in ("model.keras", "metrics.json", "report.html", "export/saved_model/1/saved_model.pb",
              "checkpoints/best.keras", "checkpoints/epoch_0000.keras", "checkpoints/epoch_0001.keras"):
        assert (rd / f).exists(), f
    assert not _temporaries(rd), _temporaries(rd)
    assert read_json(rd / "backup" / "state.json")["finished"] and not list((rd / "backup").glob("*.npz"))
    assert [p["start_epoch"] for p in read_json(rd / "phases.json")] == [0, 2]
    best = read_json(rd / "checkpoints" / "best.json")
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in hist)


def test_early_stopping_patience_counts_on_across_a_resume(tmp_path, monkeypatch, capsys):
    """Nothing improves by 1000 after epoch 0, patience 2: the run stops at epoch 2. Interrupted
    after epoch 1's commit, the resumed run still stops at epoch 2 (Keras alone would count afresh
    from the resume and stop at epoch 4). (A SIGKILL at that moment: the kill chain below.)"""
    rd, out = _interrupt_and_resume(tmp_path, monkeypatch, capsys, 1, epochs=6, extra=(
        "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]", "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=1000"))
    assert "resuming at epoch 3 (phase 0)" in out   # printed epochs count from 1
    assert "early stopping after epoch 3" in out
    assert (rd / "checkpoints" / "epoch_0001.keras").exists()   # caught up from the commit
    assert [r["epoch"] for r in read_history(rd / "history.csv")] == [0, 1, 2]


def test_a_resume_after_an_early_stopped_phase_goes_on_with_the_next_phase(tmp_path, monkeypatch, capsys):
    """Phase 0 (epochs 0..2) stops early at epoch 1 (nothing improves by 1000, patience 1); the
    run is interrupted right after that commit. --resume neither redoes phase 0 nor ends the run:
    it starts phase 1 at epoch 3, which runs to its end."""
    rd, out = _interrupt_and_resume(tmp_path, monkeypatch, capsys, 1, epochs=5, extra=(
        "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}, {start_epoch: 3, freeze: {strategy: none}}]",
        "train.early_stopping.patience=1", "train.early_stopping.min_delta=1000"))
    assert "resuming at epoch 4 (phase 1)" in out, out[-3000:]
    hist = read_history(rd / "history.csv")
    assert [(r["epoch"], r["phase"]) for r in hist] == [(0, 0), (1, 0), (3, 1), (4, 1)]
    phases = read_json(rd / "phases.json")
    assert [(p["index"], p["stopped_early"], p["stopped_epoch"]) for p in phases] == [(0, True, 1), (1, False, None)]
    assert read_json(rd / "backup" / "state.json")["finished"] and (rd / "model.keras").exists()


# The moments a run is killed at, in the order one run passes them, each with what the --resume
# after a kill there must print (the run's first process has no resume before it).
CHAIN = [("data_check", None), ("epoch@0", "starting it over in place"),
         ("before_commit@0", "starting it over in place"), ("after_commit@0", "starting it over in place"),
         ("epoch@1", "resuming at epoch 2 (phase 0)"), ("after_commit@1", "resuming at epoch 2 (phase 0)"),
         ("export", "resuming at epoch 3 (phase 1)")]


def test_resume_after_sigkill_at_every_moment_and_the_run_directory_lock(tmp_path):
    """One run SIGKILLed at each moment in turn: in its data check, after epoch 0's first batch,
    before and after epoch 0's commit, after epoch 1's first batch, after epoch 1's commit (phase
    0's last epoch; before history.csv and its checkpoints are written), and while the SavedModel
    is written. Each --resume after a kill is a fresh process, itself paused (KFINE_TEST_PAUSE) and
    killed at the next moment, and says what a resume after the previous kill must: nothing
    committed, "starting it over in place"; epoch 0 committed, "resuming at epoch 2 (phase 0)";
    epoch 1 committed, "resuming at epoch 3 (phase 1)". The --resume after the kill in the export
    finds training finished and writes the outputs; the run then has every epoch once (history.csv
    and checkpoints written from the commits), all its outputs, no temporaries, and a backup with
    no arrays (_assert_complete).

    The lock: a --resume while the first process is alive (paused in its data check) stops with
    the lock message naming it; after its SIGKILL, the next --resume takes the stale lock over and
    starts the run over in place, in the same run directory."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: t\n")
    rd = tmp_path / "runs" / "t"
    args = ["--config", str(cfg_file), *tiny(tmp_path, "train.epochs=3", "export.enabled=true",
                                             "train.checkpoint.every_epochs=1", TWO_PHASES)]
    first_pid = None
    for i, (point, said) in enumerate(CHAIN):
        marker = tmp_path / f"paused{i}"
        env = _env() if point == "export" else _env(KFINE_TEST_PAUSE=point, KFINE_TEST_PAUSE_MARKER=str(marker))
        log_path = tmp_path / f"{i}.log"
        with open(log_path, "w") as log:
            proc = _start(args if i == 0 else ["--resume", str(rd)], env, log)
            if point == "export":
                _wait_for(lambda: list((rd / "export" / "saved_model").glob(".tmp-*/sm/variables")), proc, point)
            else:
                _wait_for(marker.exists, proc, point)
            if i == 0:   # a second process while the first is alive
                first_pid = proc.pid
                second = _resume(rd)
                assert second.returncode == 2 and f"PID {proc.pid}" in second.stderr, second.stderr[-3000:]
                assert "Traceback" not in second.stderr
                assert proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        out = log_path.read_text()
        assert said is None or said in out, f"the --resume killed at {point}:\n{out[-3000:]}"
        if i == 1:
            assert f"took over {rd / '.lock'} from process {first_pid}" in out, out[-3000:]
        assert not (rd / "export" / "saved_model" / "1").exists()   # killed before the end
    resumed = _resume(rd)
    assert "already finished training (3 epochs)" in resumed.stdout
    _assert_complete(rd, resumed)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["t"]


@pytest.mark.parametrize("name, want", [("val_accuracy", "max"), ("val_AUC", "max"), ("val_top5", "min"),
                                        ("val_loss", "min"), ("F1", "max")])
def test_one_monitor_direction_for_checkpoints_early_stopping_and_the_tuner(name, want):
    """Upward or downward: one rule (any case) for train.checkpoint, train.early_stopping and
    search.objective; an explicit mode / direction wins."""
    from kfine.checkpoint import monitor_mode
    from kfine.config import CheckpointConfig, EarlyStoppingConfig
    from kfine.tune import objective_direction
    cfg = load_config(None, [f"search.objective={name}"])
    assert monitor_mode(CheckpointConfig(monitor=name)) == monitor_mode(EarlyStoppingConfig(monitor=name)) == want
    assert objective_direction(cfg.search) == want
    other = {"min": "max", "max": "min"}[want]
    assert monitor_mode(CheckpointConfig(monitor=name, mode=other)) == other
    assert objective_direction(load_config(None, [f"search.objective={name}", f"search.direction={other}"]).search) == other
