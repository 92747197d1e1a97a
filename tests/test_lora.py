"""freeze.strategy: lora on toy_resnet (ResNet50's layer names and stages in small, 32 px): after a
train step the original kernels are bit-identical and the adapters changed; merging gives the
adapted model's outputs; save and load keep the adapters. The parameter count and BatchNorm policy
on a real ResNet50 (every one of its Conv2D layers adapted). Marked slow, through kfine.train.run
(one shared two-phase run on toy_resnet):
the same claims on the run's model, the export is a plain model with the adapted outputs, and
resume restores the adapters."""
from __future__ import annotations

import json

import numpy as np
import pytest

import keras

from conftest import make_folder
from kfine.config import FreezeConfig, ModelConfig, load_config
from kfine.freeze import apply_freeze, trainable_summary
from kfine.lora import LoRAError, has_lora, merge_lora
from kfine.model import build_model, get_backbone, probabilities

TWO_PHASES = ("train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
              " {start_epoch: 1, freeze: {strategy: lora, lora_rank: 4, lora_alpha: 8, lora_stages: [conv1, conv5]}}]")


TOY = ModelConfig(backbone="toy_resnet", weights=None)


def _var(layer, name):
    return next(v for v in layer.weights if v.name == name)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A two-phase run (head only, then lora) from a saved starting point, exported."""
    from kfine.train import run
    tmp = tmp_path_factory.mktemp("lora")
    keras.utils.set_random_seed(0)
    start = get_backbone(build_model(TOY, 3, (32, 32)))
    weights = tmp / "start.weights.h5"
    start.save_weights(weights)
    root = make_folder(tmp / "data", "single", per_class=8)
    cfg = load_config(None, [f"runs_dir={tmp / 'runs'}", f"data.root={root}", "data.image_size=[32,32]",
                             "data.batch_size=8", "model.backbone=toy_resnet", f"model.weights={weights}", "train.verbose=0",
                             "data.augment.enabled=false", "train.epochs=2", "name=l",
                             "train.optimizer.name=adam", "train.schedule.learning_rate=0.01",
                             "export.formats=[saved_model, keras]", "train.restore_best=false", TWO_PHASES])
    result = run(cfg)
    return {"start": start, "result": result, "cfg": cfg, "run_dir": result.run_dir}


@pytest.mark.slow   # the shared two-phase run
def test_original_kernels_bit_identical_and_adapters_trained(lora_run):
    start, trained = lora_run["start"], get_backbone(lora_run["result"].model)
    convs = [l for l in trained.layers if isinstance(l, keras.layers.Conv2D)]
    adapted = [l for l in convs if l.lora_enabled]
    assert [l.name for l in adapted] == [l.name for l in convs if l.name.startswith(("conv1_", "conv5_"))]
    assert all(l.lora_rank == 4 for l in adapted)
    for layer in convs:                                         # no kernel or bias moved
        ref = start.get_layer(layer.name)
        np.testing.assert_array_equal(_var(layer, "kernel").numpy(), ref.kernel.numpy())
        np.testing.assert_array_equal(_var(layer, "bias").numpy(), ref.bias.numpy())
    for layer in adapted:                                       # every adapter trained (B starts at 0)
        assert not np.all(_var(layer, "lora_kernel_b").numpy() == 0), layer.name
    for bn in ("conv1_bn", "conv5_block1_2_bn"):                # BN frozen (train_bn: false)
        np.testing.assert_array_equal(trained.get_layer(bn).moving_mean.numpy(), start.get_layer(bn).moving_mean.numpy())
    # the adapted kernel really is what the layer computes with: kernel + (alpha / rank) A @ B
    layer = trained.get_layer("conv5_block1_2_conv")
    a, b = _var(layer, "lora_kernel_a").numpy(), _var(layer, "lora_kernel_b").numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel),
                               _var(layer, "kernel").numpy() + 2.0 * np.matmul(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # the shared two-phase run
def test_phases_log_what_lora_trains(lora_run):
    phases = json.loads((lora_run["run_dir"] / "phases.json").read_text())
    rows = {r["stage"]: r for r in phases[1]["summary"]}
    kh, kw, cin, cout = get_backbone(lora_run["result"].model).get_layer("conv1_conv").kernel.shape
    conv1 = kh * kw * cin * 4 + 4 * cout                        # A (kh, kw, cin, 4) + B (4, cout)
    assert rows["conv1"]["trainable"] == conv1
    assert phases[0]["summary"][0]["trainable"] == 0            # head-only phase: adapters frozen


@pytest.mark.slow   # the shared two-phase run
def test_export_is_a_plain_model_with_the_adapted_outputs(lora_run):
    import tensorflow as tf
    model = lora_run["result"].model
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(probabilities(model, x))
    export = lora_run["run_dir"] / "export"
    served = tf.saved_model.load(str(export / "saved_model" / "1"))
    got = served.signatures["serving_tensor"](image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not [v.name for v in served.variables if "lora" in v.name]
    import kfine.model  # noqa: F401
    reloaded = keras.saving.load_model(export / "model.keras", compile=False)
    assert not has_lora(reloaded) and not [v.path for v in reloaded.weights if "lora" in v.path]
    assert "lora_rank" not in json.dumps(reloaded.get_config())
    assert reloaded.count_params() == build_model(TOY, 3, (32, 32)).count_params()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probabilities(reloaded, x)), want, atol=1e-5)


def test_one_train_step_moves_the_adapters_only():
    keras.utils.set_random_seed(4)
    model = build_model(TOY, 3, (32, 32))
    apply_freeze(model, "toy_resnet", FreezeConfig("lora", lora_rank=2, lora_stages=("conv5",)))
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    x = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.train_on_batch(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    moved = {v.path for v in model.weights if not np.array_equal(before[v.path], v.numpy())}
    lora_b = {p for p in before if p.endswith("lora_kernel_b")}
    assert lora_b and lora_b <= moved                           # every B left zero
    assert all(p.startswith("conv5_") for p in lora_b)
    assert {p for p in moved if not p.startswith("head_")} <= {p for p in before if "lora_kernel" in p}


def test_merge_lora_merges_exactly_and_leaves_the_model_alone():
    keras.utils.set_random_seed(2)
    model = build_model(TOY, 3, (32, 32))
    apply_freeze(model, "toy_resnet", FreezeConfig("lora", lora_rank=2, lora_stages=("layer4",)))
    adapted = [l for l in get_backbone(model).layers if getattr(l, "lora_enabled", False)]
    assert adapted and all(l.name.startswith("conv5_") for l in adapted)    # only the chosen stage
    for layer in adapted:                                       # non-zero adapters
        b = _var(layer, "lora_kernel_b")
        b.assign(np.random.default_rng(0).normal(0, 0.05, b.shape).astype("float32"))
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(model(x))
    plain = merge_lora(model)
    assert not has_lora(plain) and has_lora(model)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(x)), want, rtol=1e-5, atol=1e-6)
    layer = adapted[0]
    a, b = _var(layer, "lora_kernel_a").numpy(), _var(layer, "lora_kernel_b").numpy()
    merged = get_backbone(plain).get_layer(layer.name).kernel.numpy()
    np.testing.assert_allclose(merged, _var(layer, "kernel").numpy() + np.matmul(a, b), rtol=1e-6, atol=1e-7)
    assert merge_lora(plain) is plain                           # nothing to merge: the same model


def test_trainable_parameters_and_bn_policy():
    """On a real ResNet50: every one of its 53 Conv2D layers adapted, its 53 BatchNorm layers train."""
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(weights=None), 3, (32, 32))
    apply_freeze(model, "resnet50", FreezeConfig("lora", lora_rank=4, train_bn=True))
    want = 0
    for layer in get_backbone(model).layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            want += kh * kw * cin * 4 + 4 * cout
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.trainable
            want += 2 * layer.gamma.shape[0]
    rows = trainable_summary(model, "resnet50")
    assert sum(r["trainable"] for r in rows if r["stage"] != "head") == want
    assert sum(r["bn_training"] for r in rows) == 53


def test_a_second_rank_for_adapted_layers_is_refused():
    model = build_model(TOY, 3, (32, 32))
    apply_freeze(model, "toy_resnet", FreezeConfig("lora", lora_rank=4))
    with pytest.raises(LoRAError, match="lora_rank"):
        apply_freeze(model, "toy_resnet", FreezeConfig("lora", lora_rank=8))
    with pytest.raises(ValueError, match="unknown stage .head"):
        apply_freeze(build_model(TOY, 3, (32, 32)), "toy_resnet",
                     FreezeConfig("lora", lora_stages=("head",)))


@pytest.mark.slow   # the shared two-phase run
def test_resume_backup_restores_the_adapters(lora_run, tmp_path):
    """The adapters exist before the optimizer is built, so a backup written with them loads
    into a freshly built model and optimizer."""
    from kfine.data import make_datasets
    from kfine.checkpoint import CheckpointSaver, load_backup
    from kfine.fit import build_training
    cfg = lora_run["cfg"]
    trained = lora_run["result"].model
    # the run finished (its backup arrays are gone: model.keras holds the weights), so
    # commit the trained model's state as an epoch's backup, then load it into a fresh model
    rd = tmp_path / "run"
    saver = CheckpointSaver(rd, cfg.train.checkpoint, cfg.train.epochs)
    saver.commit_epoch(trained, 1, 1, {"epoch": 1, "phase": 1, "loss": 0.0})
    saver.close()
    fresh, opt, _ = build_training(cfg, make_datasets(cfg.data, cfg.seed))
    assert has_lora(fresh) and any("lora_kernel" in v.path for v in opt.variables)
    assert load_backup(rd, fresh, opt)["next_epoch"] == 2
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_model_keras_keeps_the_adapters_apart_and_export_merges_them(tmp_path):
    """Saved and loaded through kfine.checkpoint (model.keras, checkpoints): the adapted layers come
    back adapted, with their own kernels and adapters (Keras' Conv2D would save the merged kernel
    and load zero adapters), and compute what the trained model did; merge_lora of the loaded
    model is plain and gives the same outputs."""
    from kfine import checkpoint
    keras.utils.set_random_seed(5)
    model = build_model(TOY, 3, (32, 32))
    apply_freeze(model, "toy_resnet", FreezeConfig("lora", lora_rank=2, lora_alpha=4, lora_stages=("conv5",)))
    adapted = [l for l in get_backbone(model).layers if getattr(l, "lora_enabled", False)]
    for layer in adapted:                                       # trained adapters: B non-zero
        b = _var(layer, "lora_kernel_b")
        b.assign(np.random.default_rng(0).normal(0, 0.05, b.shape).astype("float32"))
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(model(x, training=False))
    checkpoint.save_model(model, tmp_path / "model.keras")
    loaded = checkpoint.load_model(tmp_path / "model.keras")
    for layer in adapted:
        back = get_backbone(loaded).get_layer(layer.name)
        assert back.lora_enabled and (back.lora_rank, back.lora_alpha) == (2, 4), layer.name
        for name in ("kernel", "lora_kernel_a", "lora_kernel_b"):
            np.testing.assert_array_equal(_var(back, name).numpy(), _var(layer, name).numpy())
    assert [l.name for l in get_backbone(loaded).layers if getattr(l, "lora_enabled", False)] == \
        [l.name for l in adapted]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)), want, rtol=1e-5, atol=1e-6)
    plain = merge_lora(loaded)
    assert not has_lora(plain) and "lora" not in json.dumps(plain.get_config()).lower()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain(x, training=False)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # the shared two-phase run
def test_a_lora_runs_model_keras_holds_the_adapters_and_the_export_the_same_outputs(lora_run):
    import tensorflow as tf
    from kfine import checkpoint
    start, trained = lora_run["start"], lora_run["result"].model
    loaded = checkpoint.load_model(lora_run["run_dir"] / "model.keras")
    adapted = [l for l in get_backbone(trained).layers if getattr(l, "lora_enabled", False)]
    for layer in adapted:
        back = get_backbone(loaded).get_layer(layer.name)
        assert back.lora_enabled, layer.name
        np.testing.assert_array_equal(_var(back, "lora_kernel_b").numpy(), _var(layer, "lora_kernel_b").numpy())
        np.testing.assert_array_equal(_var(back, "kernel").numpy(), start.get_layer(layer.name).kernel.numpy())
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(trained(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)), want, atol=1e-6)
    served = tf.saved_model.load(str(lora_run["run_dir"] / "export" / "saved_model" / "1"))
    got = served.signatures["serving_tensor"](image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(probabilities(trained, x)), atol=1e-5)
