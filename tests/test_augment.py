"""Augmentation recipes (kfine.augment): every per-image op eagerly and inside tf.data, under the
TensorFlow and (in a subprocess) the JAX backend; MixUp/CutMix soft labels that match the pixels;
the soft-label loss and metrics in a real fit."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import keras

import forkserver
from kfine import augment
from kfine.config import AugmentConfig, ConfigError, MixConfig, load_config

REPO = Path(__file__).resolve().parent.parent
OPS = {   # op name -> overrides that switch on exactly that per-image op (augmix: its own test)
    "randaugment": ["data.augment.recipe=randaugment"],
    "random_erasing": ["data.augment.random_erasing.probability=1.0"],
}


def _aug(overrides) -> AugmentConfig:
    return load_config(None, list(overrides)).data.augment


def _image(seed=0, size=32):
    rng = np.random.default_rng(seed)   # smooth gradient + noise: every op has something to change
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    img = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                    np.full((size, size), 128.0, np.float32)], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.float32)


def _seeds(n):
    return tf.data.Dataset.random(seed=1).batch(2).take(n)


def _check_image(out, img):
    out = np.asarray(out)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0


# ----------------------------------------------------------------------------- per-image ops
def test_basic_recipe_adds_no_op_and_mixing_off_adds_no_batch_op():
    assert augment.per_image_ops(AugmentConfig()) is None
    assert augment.batch_ops(AugmentConfig(), 3) is None
    off = _aug(["data.augment.enabled=false", "data.augment.recipe=randaugment", "data.augment.mixup.alpha=0.2"])
    assert augment.per_image_ops(off) is None and augment.batch_ops(off, 3) is None


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_eagerly(name):
    op = augment.per_image_ops(_aug(OPS[name]), seed=0)
    img = _image()
    outs = [op(tf.constant(img), tf.constant([i, 7], tf.int64)) for i in range(6)]
    for out in outs:
        _check_image(out, img)
    changed = [not np.allclose(np.asarray(o), img) for o in outs]
    assert any(changed), f"{name} never changed the image"
    assert len({np.asarray(o).tobytes() for o in outs}) > 1, f"{name} gave every call the same output"


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_inside_tf_data_differs_per_image_and_per_epoch(name):
    op = augment.per_image_ops(_aug(OPS[name]), seed=0)
    img = _image()
    _check_in_tf_data(op, img)


def _check_in_tf_data(op, img):
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensors(img).repeat(6),
                             tf.data.Dataset.random(seed=1, rerandomize_each_iteration=True).batch(2))
    ds = ds.map(op, num_parallel_calls=2)
    assert ds.element_spec.shape == (32, 32, 3) and ds.element_spec.dtype == tf.float32
    epoch1 = [np.asarray(x) for x in ds]
    epoch2 = [np.asarray(x) for x in ds]
    for out in epoch1:
        _check_image(out, img)
    assert len({o.tobytes() for o in epoch1}) > 1              # a new draw per image ...
    assert any(not np.array_equal(a, b) for a, b in zip(epoch1, epoch2))   # ... and per epoch


def test_random_erasing_erases_one_box_with_the_fill_value():
    op = augment.per_image_ops(_aug(["data.augment.random_erasing.probability=1.0",
                                     "data.augment.random_erasing.fill=0"]), seed=3)
    img = np.full((32, 32, 3), 200.0, np.float32)
    out = np.asarray(op(tf.constant(img), tf.constant([1, 2], tf.int64)))
    erased = (out == 0).all(-1)
    assert erased.any() and set(np.unique(out)) <= {0.0, 200.0}
    rows, cols = np.where(erased)                              # the erased pixels form a box
    assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_augmix_eagerly_and_in_tf_data_with_chain_ops_per_image(monkeypatch):
    """Keras' AugMix draws its chains' ops with Python's random at trace time; kfine traces
    AUGMIX_VARIANTS structures and picks one per image."""
    import keras.src.layers.preprocessing.image_preprocessing.aug_mix as aug_mix
    drawn = []
    choice = aug_mix.py_random.choice
    monkeypatch.setattr(aug_mix.py_random, "choice", lambda seq: drawn.append(choice(seq)) or drawn[-1])
    cfg = _aug(["data.augment.recipe=augmix"])
    op = augment.per_image_ops(cfg, seed=0)
    img = _image()
    _check_in_tf_data(op, img)
    per_trace = cfg.augmix.num_chains * cfg.augmix.chain_depth
    assert len(drawn) == augment.AUGMIX_VARIANTS * per_trace    # traced once for the pipeline
    structures = {tuple(drawn[i:i + per_trace]) for i in range(0, len(drawn), per_trace)}
    assert len(structures) > 1
    outs = [np.asarray(op(tf.constant(img), tf.constant([i, 3], tf.int64))) for i in range(3)]
    for out in outs:
        _check_image(out, img)
    assert len({o.tobytes() for o in outs}) > 1


def test_tf_equalization_matches_keras():
    """kfine's Equalization (bincount in a TF graph) gives Keras' own result."""
    img = _image(5)
    ours = tf.function(lambda x: augment.GraphEqualization(value_range=(0, 255))(x))(tf.constant(img))
    theirs = tf.function(lambda x: keras.layers.Equalization(value_range=(0, 255))(x))(tf.constant(img))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.allclose(np.asarray(ours), img)


# ----------------------------------------------------------------------------- MixUp / CutMix
def _constant_batch(n=8, size=32):
    values = np.arange(n, dtype=np.float32) * 30.0 + 10.0        # image i is the constant values[i]
    images = np.broadcast_to(values[:, None, None, None], (n, size, size, 3)).copy()
    return images, np.arange(n, dtype=np.int32), values


def _mixed(kind, alpha, seed):
    aug = replace(AugmentConfig(), **{kind: MixConfig(alpha=alpha, probability=1.0)})
    mix = augment.batch_ops(aug, 8, seed=seed)
    images, labels, values = _constant_batch()
    x, y = mix(tf.constant(images), tf.constant(labels), tf.constant([seed, 0], tf.int64))
    return np.asarray(x), np.asarray(y), values, images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_pixels_blend_with_the_label_weights(seed):
    x, y, values, images = _mixed("mixup", 0.4, seed)
    assert y.shape == (8, 8) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-6)
    assert (y > 0).sum(1).max() <= 2                            # each image mixes (at most) two
    # a blend of constant images is the constant sum_j y_ij * value_j
    np.testing.assert_allclose(x, np.broadcast_to((y @ values)[:, None, None, None], x.shape), atol=1e-3)
    assert not np.allclose(x, images)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cutmix_label_weights_are_the_pasted_pixel_shares(seed):
    x, y, values, images = _mixed("cutmix", 1.0, seed)
    np.testing.assert_allclose(y.sum(1), 1.0, atol=1e-6)
    assert not np.array_equal(x, images)
    for i in range(8):
        plane = x[i, :, :, 0]
        assert set(np.unique(plane)) <= set(values)             # pasted, not blended
        for j in range(8):
            share = (plane == values[j]).mean()
            assert share == pytest.approx(y[i, j], abs=1e-6), (i, j)
        pasted = plane != values[i]
        if pasted.any():                                        # one box
            r, c = np.where(pasted)
            assert pasted[r.min():r.max() + 1, c.min():c.max() + 1].all()


def _kind(x, images, values):
    if np.array_equal(x, images):
        return "none"
    return "cutmix" if set(np.unique(x)) <= set(values) else "mixup"


def test_batch_probabilities_pick_one_op_per_batch():
    aug = _aug(["data.augment.mixup.alpha=0.4", "data.augment.mixup.probability=0.3",
                "data.augment.cutmix.alpha=1.0", "data.augment.cutmix.probability=0.3"])
    mix = augment.batch_ops(aug, 8)
    images, labels, values = _constant_batch()
    kinds = []
    for s in range(120):
        x, y = mix(tf.constant(images), tf.constant(labels), tf.constant([s, 5], tf.int64))
        kinds.append(_kind(np.asarray(x), images, values))
        if kinds[-1] == "none":
            np.testing.assert_array_equal(np.asarray(y), np.eye(8, dtype=np.float32))
    share = {k: kinds.count(k) / len(kinds) for k in ("none", "mixup", "cutmix")}
    assert 0.2 < share["mixup"] < 0.42 and 0.2 < share["cutmix"] < 0.42 and 0.28 < share["none"] < 0.52


def test_switch_off_variable_stops_mixing_inside_tf_data():
    aug = _aug(["data.augment.mixup.alpha=0.4", "data.augment.mix_off_epochs=2"])
    assert augment.mixing_epochs(aug, 10) == 8
    active = tf.Variable(True)
    mix = augment.batch_ops(aug, 8, active=active)
    images, labels, values = _constant_batch()
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(3)
    ds = tf.data.Dataset.zip(ds, _seeds(3)).map(lambda xy, s: mix(xy[0], xy[1], s))
    assert {_kind(np.asarray(x), images, values) for x, _ in ds} == {"mixup"}
    active.assign(False)
    for x, y in ds:
        assert _kind(np.asarray(x), images, values) == "none"
        np.testing.assert_array_equal(np.asarray(y), np.eye(8, dtype=np.float32))


def test_mixing_in_tf_data_after_batch_keeps_shapes():
    aug = _aug(["data.augment.cutmix.alpha=1.0"])
    mix = augment.batch_ops(aug, 4)
    imgs = np.stack([_image(i) for i in range(10)])
    ds = tf.data.Dataset.from_tensor_slices((imgs, np.arange(10, dtype=np.int32) % 4)).batch(4)
    ds = tf.data.Dataset.zip(ds, _seeds(3)).map(lambda xy, s: mix(xy[0], xy[1], s))
    assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    assert ds.element_spec[1].shape.as_list() == [None, 4]
    sizes = [int(y.shape[0]) for _, y in ds]
    assert sizes == [4, 4, 2]                                   # the short last batch mixes too


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize("overrides, reusable, word", [
    ([], True, "basic"),
    (["data.augment.enabled=false", "data.augment.recipe=augmix"], True, "off"),
    (["data.augment.recipe=randaugment"], False, "randaugment"),
    (["data.augment.recipe=augmix"], False, "augmix"),
    (["data.augment.random_erasing.probability=0.25"], False, "random_erasing"),
    (["data.augment.mixup.alpha=0.2"], False, "mixup"),
    (["data.augment.cutmix.alpha=1.0"], False, "cutmix"),
])
def test_reusable_features(overrides, reusable, word):
    ok, why = augment.reusable_features(_aug(overrides))
    assert ok is reusable and word in why


@pytest.mark.parametrize("overrides, key", [
    (["data.augment.recipe=autoaugment"], "data.augment.recipe"),
    (["data.augment.cutmix.alpha=2.0"], "data.augment.cutmix.alpha"),
    (["data.augment.mixup.alpha=0.2", "data.augment.cutmix.alpha=1.0"], "probability"),
    (["data.augment.random_erasing.probability=1.5"], "data.augment.random_erasing.probability"),
    (["data.augment.randaugment.magnitude=3"], "data.augment.randaugment.magnitude"),
])
def test_bad_settings_name_the_key(overrides, key):
    from kfine.config import check_config
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(load_config(None, overrides))


# ----------------------------------------------------------------------------- soft labels in training
def test_soft_label_loss_composes_with_label_smoothing():
    from kfine.optim import make_loss
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    soft = np.array([[0.6, 0.4, 0.0], [0.0, 0.25, 0.75]], np.float32)
    s = 0.1
    target = soft * (1 - s) + s / 3
    want = np.mean(-(target * np.log(p)).sum(1))
    logits = np.log(p) + 1.0                                     # the loss takes logits: softmax(logits) == p
    assert float(make_loss(s, 3)(soft, logits)) == pytest.approx(want, rel=1e-5)
    sparse = np.array([0, 2], np.int32)                          # sparse == its one-hot
    assert float(make_loss(s, 3)(sparse, logits)) == pytest.approx(float(make_loss(s, 3)(np.eye(3)[sparse], logits)), rel=1e-6)


def test_fit_with_soft_training_labels_and_sparse_validation_labels():
    """One fit: MixUp batches (soft labels) for training, sparse labels for validation."""
    from kfine.optim import make_loss, make_metrics
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(6)(x))   # logits; 6 classes: top-5 is logged
    model.compile(keras.optimizers.SGD(0.5), loss=make_loss(0.1, 6), metrics=make_metrics(6))
    imgs = np.stack([_image(i) for i in range(16)])
    labels = (np.arange(16) % 6).astype(np.int32)
    mix = augment.batch_ops(_aug(["data.augment.mixup.alpha=0.4"]), 6)
    train = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices((imgs, labels)).batch(8),
                                _seeds(2)).map(lambda xy, s: mix(xy[0], xy[1], s))
    val = tf.data.Dataset.from_tensor_slices((imgs, labels)).batch(8)
    before = [w.copy() for w in model.get_weights()]
    hist = model.fit(train, validation_data=val, epochs=2, verbose=0).history
    assert all(np.isfinite(hist[k]).all() for k in ("loss", "accuracy", "top5", "val_loss", "val_accuracy"))
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # the metric takes the soft label's largest class as the truth
    from kfine.optim import TopKAccuracy
    m = TopKAccuracy(1, 3)
    m.update_state(np.array([[0.7, 0.3, 0.0], [0.4, 0.6, 0.0]], np.float32),
                   np.array([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1]], np.float32))
    assert float(m.result()) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- JAX backend
JAX_SCRIPT = r"""
import numpy as np, tensorflow as tf, keras
from kfine import augment
from kfine.config import load_config
assert keras.backend.backend() == "jax"
img = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype("float32")
for name, over in [("randaugment", ["data.augment.recipe=randaugment"]),
                   ("augmix", ["data.augment.recipe=augmix", "data.augment.random_erasing.probability=0.5"])]:
    op = augment.per_image_ops(load_config(None, over).data.augment, seed=0)
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensors(img).repeat(6),
                             tf.data.Dataset.random(seed=0).batch(2)).map(op, num_parallel_calls=2)
    outs = [np.asarray(x) for x in ds]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.float32 for o in outs), name
    assert len({o.tobytes() for o in outs}) > 1, name
    if name == "randaugment":                                          # eagerly too
        eager = op(tf.constant(img), tf.constant([1, 2], tf.int64))
        assert isinstance(eager, tf.Tensor) and eager.shape == (32, 32, 3), name
    print(name, "ok")
fn = augment.per_image_ops(load_config(None, ["data.augment.recipe=randaugment"]).data.augment)
graph = fn.get_concrete_function(tf.TensorSpec((32, 32, 3)), tf.TensorSpec((2,), tf.int64)).graph
print("randaugment graph ops", len(graph.get_operations()))
assert len(graph.get_operations()) < 5000          # Keras' JAX histogram would unroll ~23,000
aug = load_config(None, ["data.augment.mixup.alpha=0.4", "data.augment.mixup.probability=0.5",
                         "data.augment.cutmix.alpha=1.0", "data.augment.cutmix.probability=0.5"]).data.augment
mix = augment.batch_ops(aug, 4)
values = np.array([0.0, 40.0, 80.0, 120.0], np.float32)
imgs = np.broadcast_to(values[:, None, None, None], (4, 32, 32, 3)).copy()
ds = tf.data.Dataset.from_tensors((imgs, np.arange(4, dtype=np.int32))).repeat(6)
ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=0).batch(2)).map(lambda xy, s: mix(xy[0], xy[1], s))
for x, y in ds:
    x, y = np.asarray(x), np.asarray(y)
    assert y.shape == (4, 4) and np.allclose(y.sum(1), 1.0)
    assert np.allclose(x.mean((1, 2, 3)), y @ values, atol=1e-2)     # pixels mixed as the labels say
print("mix ok")
"""


@pytest.mark.slow   # ~40 s: a JAX-backend process tracing RandAugment and AugMix
def test_ops_inside_tf_data_under_the_jax_backend():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    p = forkserver.run([sys.executable, "-c", JAX_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "randaugment ok" in p.stdout and "augmix ok" in p.stdout and "mix ok" in p.stdout


# ----------------------------------------------------------------------------- in kfine's pipeline
def test_recipes_and_mixing_run_in_the_training_pipeline_and_switch_off(tmp_path):
    """RandAugment per image and MixUp per batch inside make_datasets' training pipeline: soft
    labels that sum to 1 while mixing is on, one-hot after the switch (mix_off_epochs), and
    validation batches stay sparse."""
    from conftest import make_folder
    from kfine import data
    from kfine.callbacks import MixingSwitch
    root = make_folder(tmp_path / "d", "single", per_class=10)
    cfg = load_config(None, [f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=6",
                             "data.augment.recipe=randaugment", "data.augment.mixup.alpha=0.8",
                             "data.augment.mix_off_epochs=1"]).data
    ds = data.make_datasets(cfg, seed=0)
    batches = list(ds.train.take(3))
    x, y = batches[0]
    assert x.shape == (6, 32, 32, 3) and y.shape == (6, 3) and y.dtype.name == "float32"
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, atol=1e-5)
    # mixed: some labels are soft (one batch can stay one-hot: MixUp pairs each image with one of its class)
    assert any((y.numpy().max(1) < 1.0 - 1e-6).any() for _, y in batches)
    switch = MixingSwitch(ds.mixing, until=1)
    switch.on_epoch_begin(1)
    _, y = next(iter(ds.dataset("train")))                         # a fresh iterator after the switch
    assert set(np.unique(y.numpy())) <= {0.0, 1.0}                 # one-hot: no mixing any more
    _, yv = next(iter(ds.val))
    assert yv.dtype.name == "int32" and yv.shape == (yv.shape[0],)
