"""The path a GPU takes by default, run on the CPU: XLA-compiled steps (`train.jit_compile: true`,
which XLA also compiles on a CPU), partial batches dropped (`drop_remainder` auto follows XLA),
several steps per compiled call, float32 / mixed_float16 / mixed_bfloat16, over a two-phase run
whose first phase trains the head on cached features, interrupted after an epoch's commit, resumed,
evaluated and exported; the same on the JAX backend. Mixed precision is checked for what matters:
the dynamic loss scale falls on an overflow (and the step is skipped), grows back after its
period, is one object across phases and comes back from the backup; float16 and bfloat16 follow
float32's loss trajectory within a stated tolerance."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import forkserver
from conftest import make_folder
from kfine.config import load_config
from kfine.rundir import read_json
from kfine.train import read_history

REPO = Path(__file__).resolve().parent.parent
# phase 0: head only on cached backbone features (bn: frozen keeps every BN in inference mode);
# phase 1 (epoch 2): everything trains
PHASES = ("train.phases=[{start_epoch: 0, freeze: {strategy: backbone}, bn: frozen},"
          " {start_epoch: 2, freeze: {strategy: none}}]")
STEPS = 4   # train.steps_per_epoch: steps_per_execution auto then runs all 4 in one compiled call


def gpu_like(tmp_path, *extra):
    """A tiny run configured as a GPU user's: XLA on, drop_remainder and steps_per_execution auto."""
    root = tmp_path / "data"
    if not root.exists():
        make_folder(root, "single", per_class=12)
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.layout=single", "name=g",
            "data.image_size=[32,32]", "data.batch_size=4", "model.weights=null", "train.verbose=0",
            "data.augment.enabled=false", "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]",
            "model.scratch.batchnorm=true", "model.scratch.dense_units=16", "train.optimizer.name=adam",
            "train.epochs=3", PHASES, f"train.steps_per_epoch={STEPS}", "train.jit_compile=true",
            "train.checkpoint.every_epochs=1", "data.val_fraction=0.25", "data.test_fraction=0.2",
            "export.formats=[saved_model]", *extra]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("precision", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_xla_two_phase_run_with_feature_cache_resume_and_export(tmp_path, monkeypatch, precision):
    import keras
    import tensorflow as tf
    from kfine import callbacks, fit, train
    seen = {"optimizers": [], "scale_at_commit": {}}
    compile_model, commit = fit.compile_model, callbacks.EpochCommit.on_epoch_end

    def recording_compile(model, optimizer, *a, **kw):
        seen["optimizers"].append(optimizer)
        return compile_model(model, optimizer, *a, **kw)

    def commit_then_die(self, epoch, logs=None):
        commit(self, epoch, logs)
        opt = self.model.optimizer
        if hasattr(opt, "dynamic_scale"):
            seen["scale_at_commit"][epoch] = float(keras.ops.convert_to_numpy(opt.dynamic_scale))
        if epoch == 1:
            raise Interrupted("killed after epoch 1's commit")

    cfg = load_config(None, gpu_like(tmp_path, f"train.precision={precision}"))
    try:
        monkeypatch.setattr(fit, "compile_model", recording_compile)
        monkeypatch.setattr(callbacks.EpochCommit, "on_epoch_end", commit_then_die)
        with pytest.raises(Interrupted):
            train.run(cfg)
        rd = tmp_path / "runs" / "g"
        first = read_history(rd / "history.csv")
        assert [(r["epoch"], r["phase"]) for r in first] == [(0, 0), (1, 0)]
        opts = seen["optimizers"]
        assert len(opts) == 2 and opts[0] is opts[1]   # phase 0: the full model and the head on features
        if precision == "mixed_float16":
            assert isinstance(opts[0], keras.optimizers.LossScaleOptimizer)

        monkeypatch.setattr(callbacks.EpochCommit, "on_epoch_end", commit)
        seen["optimizers"].clear()
        result = train.run(cfg, resume=rd)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    hist = read_history(rd / "history.csv")
    assert [(r["epoch"], r["phase"]) for r in hist] == [(0, 0), (1, 0), (2, 1)]
    assert all(np.isfinite(r["loss"]) for r in hist)
    model = result.model
    assert model.jit_compile is True                     # XLA: what train.jit_compile asked for
    assert model.steps_per_execution == STEPS            # auto: the epoch's 4 steps in one call
    assert fit.drops_remainder(cfg)                      # auto follows XLA: no second program
    assert model.get_layer("head_logits").compute_dtype == precision.split("_")[-1]
    phases = read_json(rd / "phases.json")
    assert [p["index"] for p in phases] == [0, 1]
    if precision == "mixed_float16":                     # the scale went on from the backup
        (resumed,) = seen["optimizers"]
        assert isinstance(resumed, keras.optimizers.LossScaleOptimizer)

    # the export serves what the Keras model computes, at the precision's tolerance
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(keras.ops.cast(model(x, training=False), "float32"))
    if not np.allclose(want.sum(1), 1, atol=1e-3):       # logits out of the model: softmax at the edge
        want = keras.ops.convert_to_numpy(keras.ops.softmax(want))
    served = tf.saved_model.load(str(rd / "export" / "saved_model" / "1"))
    got = served.signatures["serving_tensor"](image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5 if precision == "float32" else 2e-2)
    assert (rd / "metrics.json").exists()


def _fit_steps(model, x, y, steps):
    for _ in range(steps):
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)


def test_the_loss_scale_falls_on_overflow_and_grows_back(tmp_path):
    """mixed_float16 through kfine's optimizer and an XLA train step: a scale that overflows the
    float16 gradients is halved and the step leaves every weight as it was; after
    ``dynamic_growth_steps`` finite steps the scale doubles."""
    import keras
    from kfine.data import make_datasets
    from kfine.fit import build_training, compile_model
    cfg = load_config(None, gpu_like(tmp_path, "train.precision=mixed_float16", "train.phases=[{start_epoch: 0}]",
                                     "train.steps_per_epoch=1", "train.optimizer.name=sgd"))
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        ds = make_datasets(cfg.data, cfg.seed)
        model, opt, _ = build_training(cfg, ds)
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
        opt.dynamic_growth_steps = 2
        compile_model(model, opt, cfg, len(ds.class_names), 1)
        x, y = next(iter(ds.train))
        x, y = x.numpy()[:4], y.numpy()[:4]
        before = [w.numpy().copy() for w in model.trainable_weights]
        opt.dynamic_scale.assign(2.0 ** 60)                 # any float16 gradient overflows
        _fit_steps(model, x, y, 1)
        assert float(opt.dynamic_scale.numpy()) == 2.0 ** 59
        for b, w in zip(before, model.trainable_weights):   # the overflowing step was skipped
            np.testing.assert_array_equal(b, w.numpy())
        opt.dynamic_scale.assign(2.0 ** 4)
        _fit_steps(model, x, y, 1)
        assert float(opt.dynamic_scale.numpy()) == 2.0 ** 4  # one finite step: not yet
        assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))
        _fit_steps(model, x, y, 1)
        assert float(opt.dynamic_scale.numpy()) == 2.0 ** 5  # two finite steps: doubled
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_follows_the_float32_trajectory(tmp_path):
    """The same start, data and steps under each policy: per-step losses within 2% (float16, 10
    significant bits) and 6% (bfloat16, 7 bits) of float32's, relative."""
    import keras
    from kfine.data import make_datasets
    from kfine.fit import build_training, compile_model
    losses, start = {}, None
    for precision in ("float32", "mixed_float16", "mixed_bfloat16"):
        cfg = load_config(None, gpu_like(tmp_path, f"train.precision={precision}", "train.phases=[{start_epoch: 0}]",
                                         "train.optimizer.name=sgd", "train.schedule.learning_rate=0.01",
                                         "train.jit_compile=false", "model.scratch.dropout=0",
                                         "model.head.dropout=0"))   # no dropout draws to differ
        try:
            keras.mixed_precision.set_global_policy(precision)
            ds = make_datasets(cfg.data, cfg.seed)
            model, opt, _ = build_training(cfg, ds)
            if start is None:
                start = {w.path: w.numpy() for w in model.weights}
            else:
                for w in model.weights:
                    w.assign(start[w.path])
            compile_model(model, opt, cfg, len(ds.class_names), 1)
            x, y = next(iter(ds.train))
            x, y = x.numpy()[:4], y.numpy()[:4]
            out = []
            for _ in range(5):
                out.append(model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False).history["loss"][0])
            losses[precision] = np.array(out)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    ref = losses["float32"]
    assert ref[-1] < ref[0]                              # it trains
    np.testing.assert_allclose(losses["mixed_float16"], ref, rtol=0.02)
    np.testing.assert_allclose(losses["mixed_bfloat16"], ref, rtol=0.06)


def test_private_keras_attributes_kfine_relies_on():
    """Every private Keras attribute kfine touches, so that a Keras release that renames one fails
    here, by name, rather than deep inside a run."""
    import keras
    from keras.src.layers.preprocessing.image_preprocessing.equalization import Equalization
    from keras.src.utils import file_utils
    opt = keras.optimizers.Adam(use_ema=True)
    v = keras.Variable(np.zeros(3, np.float32))
    opt.build([v])
    assert opt._trainable_variables == [v]                                 # kfine.optim._built_variables
    assert opt._get_variable_index(v) == 0                                 # kfine.optim._variable_index
    assert len(opt._model_variables_moving_average) == 1                   # kfine.optim._ema_averages
    assert int(opt._iterations.numpy()) == 0                               # kfine.optim._batches_seen
    assert callable(opt._update_model_variables_moving_average)            # overridden by kfine.optim._Kfine
    es = keras.callbacks.EarlyStopping(monitor="val_loss", mode="min")
    es._set_monitor_op()                                                   # kfine.callbacks.EarlyStop
    assert es._is_improvement(0.5, 1.0) and not es._is_improvement(1.0, 0.5)
    assert callable(Equalization._custom_histogram_fixed_width)            # kfine.augment
    assert callable(file_utils.get_file)                                   # what keras.applications downloads with


JAX_ENV = {"KERAS_BACKEND": "jax", "KFINE_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}


# argv: run dir, x.npy, p.npy, then kfine.train's arguments. One JAX process: the run as `python -m
# kfine.train` starts it, interrupted right after epoch 1's commit (exit 130, as after Ctrl-C; a
# SIGKILL of JAX processes: test_distribute's loopback test), resumed with --resume, then the
# model.keras it saved loaded afresh and its output for x written
INTERRUPT_RESUME_PREDICT = """
import sys, numpy as np, keras
from kfine import callbacks
from kfine.train import main
assert keras.backend.backend() == "jax"
class Interrupt(keras.callbacks.Callback):   # after kfine's callbacks: epoch 1 is committed
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt
make = callbacks.make_callbacks
callbacks.make_callbacks = lambda *a, **k: make(*a, **k) + [Interrupt()]
assert main(sys.argv[4:]) == 130, "the run was not interrupted"
callbacks.make_callbacks = make
assert main(["--resume", sys.argv[1]]) == 0, "the resumed run failed"
m = keras.saving.load_model(sys.argv[1] + "/model.keras", compile=False)
np.save(sys.argv[3], keras.ops.convert_to_numpy(keras.ops.cast(m(np.load(sys.argv[2])), "float32")))
"""


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_bfloat16"])   # float32 on JAX: tests/test_jax.py
def test_jax_two_phase_run_interrupted_resumed_and_exported(tmp_path, precision):
    """On JAX (XLA always): the same run, interrupted after epoch 1's commit, resumed, exported by
    kfine's TensorFlow subprocess; the export serves the JAX model's output."""
    pytest.importorskip("jax")
    import tensorflow as tf
    (tmp_path / "c.yaml").write_text("name: g\n")
    rd = tmp_path / "runs" / "g"
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ["--config", str(tmp_path / "c.yaml"), *gpu_like(tmp_path, f"train.precision={precision}",
                                                           "train.jit_compile=auto")]
    p = forkserver.run([sys.executable, "-c", INTERRUPT_RESUME_PREDICT, str(rd), str(tmp_path / "x.npy"),
                        str(tmp_path / "p.npy"), *args], cwd=REPO, env={**os.environ, **JAX_ENV},
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resuming at epoch 3 (phase 1)" in p.stdout
    hist = read_history(rd / "history.csv")
    assert [(r["epoch"], r["phase"]) for r in hist] == [(0, 0), (1, 0), (2, 1)]
    assert all(np.isfinite(r["loss"]) for r in hist)
    want = np.load(tmp_path / "p.npy")
    if not np.allclose(want.sum(1), 1, atol=1e-3):      # logits out of the model: softmax at the edge
        e = np.exp(want - want.max(1, keepdims=True))
        want = e / e.sum(1, keepdims=True)
    served = tf.saved_model.load(str(rd / "export" / "saved_model" / "1"))
    got = served.signatures["serving_tensor"](image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5 if precision == "float32" else 2e-2)
