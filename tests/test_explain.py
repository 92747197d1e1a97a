"""Grad-CAM heatmaps: shape and range; on a task whose class is where a bright square sits, the
heatmap peaks on the square; LoRA layers carry the gradient; the report grid and predict's
--explain overlays are written."""
from __future__ import annotations

import numpy as np
import pytest

import keras

import forkserver
from kfine.config import ModelConfig, ScratchConfig
from kfine.explain import cam_parts, explain_images, gradcam, pick_images
from kfine.model import build_model, probabilities

SIZE = 32


def _squares(n: int, seed: int = 0):
    """Noise images with a bright 10 px square in the top-left (class 0) or bottom-right (class 1)
    quadrant, at a random position inside it."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 90, (n, SIZE, SIZE, 3)).astype(np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        r, c = rng.integers(1, 5, 2)
        if y[i]:
            r, c = r + 16, c + 16
        x[i, r:r + 10, c:c + 10] = 255.0
    return x, y


def _scratch(filters=(8, 16)):
    cfg = ModelConfig(backbone="scratch_cnn", weights=None,
                      scratch=ScratchConfig(filters=filters, dense_units=16, dropout=0.0))
    return build_model(cfg, 2, (SIZE, SIZE))


@pytest.fixture(scope="module")
def square_model():
    keras.utils.set_random_seed(0)
    x, y = _squares(48)
    model = _scratch()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=8, batch_size=8, verbose=0)
    return model


def test_heatmaps_have_the_image_size_and_range_0_1(square_model):
    x, _ = _squares(5, seed=1)
    heat, probs = gradcam(square_model, x)
    assert heat.shape == (5, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.allclose(heat.max(axis=(1, 2)), 1.0) or (heat.max(axis=(1, 2)) == 0).any()
    np.testing.assert_allclose(probs, keras.ops.convert_to_numpy(probabilities(square_model, x)), atol=1e-5)


def test_heatmap_peaks_on_the_square(square_model):
    x, y = _squares(40, seed=2)
    heat, probs = explain_images(square_model, x)
    assert (probs.argmax(axis=1) == y).mean() >= 0.9          # the model learnt the task
    peaks = [np.unravel_index(np.argmax(h), h.shape) for h in heat]
    quadrant = np.array([h.max() > 0 and   # an all-zero map's argmax is (0, 0): it counts as a miss
                         ((r >= SIZE // 2) and (c >= SIZE // 2) if label else (r < SIZE // 2) and (c < SIZE // 2))
                         for (r, c), label, h in zip(peaks, y, heat)])
    assert quadrant.mean() >= 0.7, quadrant.mean()
    for label in (0, 1):   # each class's own evidence, on every image of that class
        assert quadrant[y == label].mean() >= 0.7, (label, quadrant[y == label].mean())


def test_explaining_another_class_moves_the_heatmap(square_model):
    x, y = _squares(20, seed=3)
    own, _ = gradcam(square_model, x, y)
    other, _ = gradcam(square_model, x, 1 - y)
    assert not np.allclose(own, other)


def test_lora_layers_carry_the_gradient():
    from kfine.freeze import lora_targets
    from kfine.lora import enable_lora
    keras.utils.set_random_seed(1)
    x, _ = _squares(4, seed=4)
    model = _scratch()
    plain, plain_probs = gradcam(model, x)
    assert plain.max() > 0
    enable_lora(lora_targets(model, "scratch_cnn"), rank=2)
    conv = model.get_layer("backbone").get_layer("block1_conv")
    conv.lora_kernel_b.assign(np.random.default_rng(0).normal(0, 0.5, conv.lora_kernel_b.shape))
    adapted, probs = gradcam(model, x, plain_probs.argmax(axis=1))
    np.testing.assert_allclose(probs, keras.ops.convert_to_numpy(probabilities(model, x)), atol=1e-5)
    assert not np.allclose(plain, adapted)


@pytest.mark.parametrize("backbone", ["resnet50"])
def test_application_backbones_split_at_their_last_feature_map(backbone):
    """The heatmap model's two halves reproduce the model (cam_parts checks it) at 64 px."""
    model = build_model(ModelConfig(backbone=backbone, weights=None), 3, (64, 64))
    features, classify = cam_parts(model)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    fmap = features(x)
    assert len(fmap.shape) == 4 and fmap.shape[1] == 2     # 64 px / 32
    heat, _ = gradcam(model, x)
    assert heat.shape == (2, 64, 64) and 0 <= heat.min() and heat.max() <= 1


def test_pick_images_takes_the_worst_then_one_correct_per_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.9, .05, .05], [.2, .7, .1], [.1, .8, .1], [.3, .6, .1], [.6, .2, .2], [.1, .1, .8]])
    chosen = pick_images(labels, probs, top_loss=2, per_class_max=12)
    assert chosen[:2] == [1, 4]                 # the two highest losses (p_true .2 and .2, in order)
    assert chosen[2:] == [0, 2, 5]              # the most confident correct image of each class


def test_a_run_reports_heatmaps_and_predict_explain_writes_one_overlay_per_image(tmp_path):
    """A scratch_cnn run with EMA weights and the best epoch restored: plots/heatmaps_test.png in
    the report; predict --explain: one overlay per readable image, beside the CSV."""
    from PIL import Image
    from conftest import make_folder
    from kfine.config import load_config
    from kfine.predict import main as predict_main
    from kfine.train import run
    root = make_folder(tmp_path / "data", "single", per_class=10)
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.image_size=[32,32]",
                             "data.batch_size=8", "model.weights=null", "model.backbone=scratch_cnn",
                             "model.scratch.filters=[8,16]", "model.scratch.dense_units=16", "train.epochs=2",
                             "train.ema.enabled=true", "train.restore_best=true", "train.verbose=0",
                             "data.augment.enabled=false", "export.enabled=false", "name=x"])
    rd = run(cfg).run_dir
    grid = rd / "plots" / "heatmaps_test.png"
    assert grid.is_file() and Image.open(grid).size[0] > 0
    html = (rd / "report.html").read_text()
    assert "<section id=heatmaps>" in html and 'src="plots/heatmaps_test.png"' in html
    assert html.count("heatmaps_test.png") == 1              # not again under "More plots"
    from kfine.explain import main as explain_main
    grid.unlink()
    assert explain_main(["--run", str(rd)]) == 0 and grid.is_file()   # redrawn from model.keras + splits.csv
    assert explain_main(["--run", str(tmp_path / "nothing")]) == 2

    images = tmp_path / "new"
    images.mkdir()
    for name in ("a", "b", "c"):
        (images / f"{name}.png").write_bytes((root / "dog" / f"00{'abc'.index(name)}.png").read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    assert predict_main(["--run", str(rd), "--images", str(images), "--out", str(out), "--explain"]) == 0
    overlays = sorted(p.name for p in (tmp_path / "out" / "preds_heatmaps").iterdir())
    assert overlays == ["a.png", "b.png", "c.png"]
    assert Image.open(tmp_path / "out" / "preds_heatmaps" / "a.png").size == (32, 32)


JAX_CAM = """
import sys, numpy as np, keras, kfine.model
from kfine.explain import gradcam
assert keras.backend.backend() == "jax"
model = keras.saving.load_model(sys.argv[1], compile=False)
heat, probs = gradcam(model, np.load(sys.argv[2]))
np.save(sys.argv[3], heat)
"""


@pytest.mark.slow   # a fresh JAX process: ~20-50 s on 2 busy cores
def test_jax_backend_gives_the_same_heatmaps(square_model, tmp_path):
    """Under JAX the gradient is jax.grad's: the same heatmaps as tf.GradientTape's."""
    import os
    import sys
    from pathlib import Path
    pytest.importorskip("jax")
    x, _ = _squares(4, seed=5)
    np.save(tmp_path / "x.npy", x)
    square_model.save(tmp_path / "m.keras")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = forkserver.run([sys.executable, "-c", JAX_CAM, str(tmp_path / "m.keras"), str(tmp_path / "x.npy"),
                        str(tmp_path / "h.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    heat, _ = gradcam(square_model, x)
    assert heat.max() > 0
    np.testing.assert_allclose(np.load(tmp_path / "h.npy"), heat, atol=1e-4)
