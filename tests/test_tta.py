"""Test-time augmentation in evaluate and predict: equal to the plain figure on a model that
cannot tell an image from its mirror, the extra views really evaluated, metrics.json and report."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

import keras

from kfine.evaluate import evaluate_model, evaluate_run, predict_views, tta_views

NAMES = ["a", "b", "c"]


def _model(symmetric: bool):
    """symmetric: global average pooling first, so a mirror image gives the same output."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if not symmetric:
        x = keras.layers.Conv2D(4, 5, strides=2, activation="relu")(x)
        x = keras.layers.Flatten()(x)
    else:
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 1, activation="relu")(x))
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


class Counting:
    """A model stand-in that counts the images it is asked about."""

    def __init__(self, model):
        self.model, self.images, self.layers = model, 0, model.layers

    def predict_on_batch(self, x):
        self.images += len(x)
        return self.model.predict_on_batch(x)


def _data(n=12):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)
    images[:, :, :16] *= 0.3          # left half dark: a mirror image is a different image
    labels = rng.integers(0, 3, n).astype(np.int32)
    return images, labels


def test_views_are_the_image_its_mirror_and_corner_crops():
    x = np.broadcast_to(np.arange(32, dtype=np.float32)[None, None, :, None], (2, 32, 32, 3)).copy()
    flip = tta_views(x, "flip")
    assert len(flip) == 2 and np.array_equal(flip[0], x) and np.array_equal(flip[1], x[:, :, ::-1])
    views = tta_views(x, "flip+crops")
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    left, right = views[2], views[4]                   # top-left and top-right crops (x = column)
    assert left.max() <= 27 + 1e-4 and right.min() >= 4 - 1e-4  # a 28-px window, scaled back up
    assert np.array_equal(views[3], left[:, :, ::-1])
    with pytest.raises(ValueError, match="flip"):
        tta_views(x, "rotate")


def test_flip_tta_equals_plain_on_a_flip_symmetric_model():
    model = _model(symmetric=True)
    images, labels = _data()
    plain, averaged = predict_views(model, images, "flip")
    np.testing.assert_allclose(averaged, plain, atol=1e-6)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)
    m, probs, _ = evaluate_model(model, ds, NAMES, tta="flip")
    assert m["tta"]["mode"] == "flip" and m["tta"]["views"] == 2
    assert m["tta"]["accuracy"] == m["accuracy"]
    assert m["tta"]["loss"] == pytest.approx(m["loss"], abs=1e-6)


@pytest.mark.parametrize("mode, views", [("flip", 2), ("flip+crops", 10)])
def test_tta_evaluates_every_view(mode, views):
    model = _model(symmetric=False)
    images, labels = _data()
    counting = Counting(model)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(5)
    m, probs, _ = evaluate_model(counting, ds, NAMES, tta=mode)
    assert counting.images == views * len(images)
    assert m["tta"]["views"] == views
    np.testing.assert_allclose(probs, model.predict(images, verbose=0), atol=1e-5)   # plain stays plain
    want = np.mean([model.predict(v, verbose=0) for v in tta_views(images, mode)], axis=0)
    acc = float((want.argmax(1) == labels).mean())
    assert m["tta"]["accuracy"] == pytest.approx(acc)
    loss = float(np.mean(-np.log(np.clip(want[np.arange(len(labels)), labels], 1e-7, 1))))
    assert m["tta"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert m["tta"]["loss"] != pytest.approx(m["loss"], abs=1e-6)   # the views changed something


def test_evaluate_run_writes_tta_beside_the_plain_figures(tmp_path):
    model = _model(symmetric=False)
    images, labels = _data()
    run = tmp_path / "run"
    run.mkdir()
    datasets = SimpleNamespace(train=None, val=None, class_names=NAMES, files={},
                               test=tf.data.Dataset.from_tensor_slices((images, labels)).batch(4))
    m = evaluate_run(run, model=model, datasets=datasets, tta="flip+crops")
    saved = json.loads((run / "metrics.json").read_text())["test"]
    assert saved["tta"] == m["tta"] and set(saved["tta"]) >= {"mode", "views", "accuracy", "loss"}
    assert saved["accuracy"] == pytest.approx(float((model.predict(images, verbose=0).argmax(1) == labels).mean()))
    html = (run / "report.html").read_text()
    assert "test-time augmentation (flip+crops, 10 views" in html and "accuracy with TTA" in html


def test_predict_files_with_tta_averages_the_views(tmp_path):
    from PIL import Image
    from kfine.predict import predict_files
    model = _model(symmetric=False)
    images, _ = _data(4)
    paths = []
    for i, img in enumerate(images.astype(np.uint8)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    rows, bad = predict_files(model, paths, NAMES, (32, 32), batch_size=3, verbose=0, tta="flip")
    assert not bad
    from conftest import eval_reference
    x = np.stack([eval_reference(p.read_bytes(), 32) for p in paths])   # what predict sees: the eval transform
    want = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2
    got = np.array([[float(r[f"top{k}_score"]) for k in (1, 2, 3)] for r in rows])
    np.testing.assert_allclose(got, -np.sort(-want, axis=1), rtol=1e-4)
