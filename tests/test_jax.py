"""The JAX backend (what the GPU machine runs): a two-phase fine-tune with per-stage learning
rates trains the right weights, and the export (done by a TensorFlow subprocess) serves the same
probabilities as the JAX-trained Keras model. toy_resnet: ResNet50's layer names and stages in
small. One JAX process trains (kfine.train's command-line entry point) and then loads the saved
model.keras afresh to predict. Skipped where jax is not installed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import forkserver
from conftest import make_folder
from kfine.train import read_history

pytest.importorskip("jax")
REPO = Path(__file__).resolve().parent.parent

# argv: model.keras x.npy p.npy, then kfine.train's arguments: train as `python -m kfine.train`
# does, then load the model it saved and write its probabilities for x
TRAIN_THEN_PREDICT = """
import sys, numpy as np, keras, kfine.model
from kfine.train import main
assert keras.backend.backend() == "jax"
assert main(sys.argv[4:]) == 0, "kfine.train failed"
model = keras.saving.load_model(sys.argv[1], compile=False)
x = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(kfine.model.probabilities(model, x)))
"""


def _jax(args, **kw):
    env = {**os.environ, "KERAS_BACKEND": "jax", "KFINE_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "JAX_PLATFORMS": "cpu"}
    p = forkserver.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_two_phase_finetune_and_export_on_jax(tmp_path):
    import keras
    import tensorflow as tf
    from kfine.config import ModelConfig
    from kfine.model import build_model, get_backbone

    keras.utils.set_random_seed(0)
    start = get_backbone(build_model(ModelConfig(backbone="toy_resnet", weights=None), 3, (32, 32)))
    weights = tmp_path / "start.weights.h5"
    start.save_weights(weights)
    root = make_folder(tmp_path / "data", "single", per_class=8)
    (tmp_path / "c.yaml").write_text("name: j\n")
    rd = tmp_path / "runs" / "j"
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _jax(["-c", TRAIN_THEN_PREDICT, str(rd / "model.keras"), str(tmp_path / "x.npy"), str(tmp_path / "p.npy"),
          "--config", str(tmp_path / "c.yaml"), f"runs_dir={tmp_path / 'runs'}",
          f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8", "model.backbone=toy_resnet",
          f"model.weights={weights}", "train.verbose=0", "train.epochs=2", "train.optimizer.name=adam",
          "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
          " {start_epoch: 1, freeze: {strategy: stages, trainable_from: conv5}}]",
          "train.lr_multipliers={conv5: 0.5}", "export.formats=[saved_model]",
          "train.restore_best=false"])   # conv5 trained: the final epoch's model
    assert [(r["epoch"], r["phase"]) for r in read_history(rd / "history.csv")] == [(0, 0), (1, 1)]

    trained = get_backbone(keras.saving.load_model(rd / "model.keras", compile=False))
    def kernel(model, name):
        return model.get_layer(name).kernel.numpy()
    for frozen in ("conv1_conv", "conv4_block1_2_conv"):       # frozen in both phases
        np.testing.assert_array_equal(kernel(trained, frozen), kernel(start, frozen))
    assert not np.array_equal(kernel(trained, "conv5_block1_2_conv"), kernel(start, "conv5_block1_2_conv"))
    bn = "conv4_block1_2_bn"                                   # frozen BN: statistics untouched
    np.testing.assert_array_equal(trained.get_layer(bn).moving_mean.numpy(), start.get_layer(bn).moving_mean.numpy())
    assert not np.array_equal(trained.get_layer("conv5_block1_2_bn").moving_mean.numpy(),
                              start.get_layer("conv5_block1_2_bn").moving_mean.numpy())   # trained BN: moved

    served = tf.saved_model.load(str(rd / "export" / "saved_model" / "1"))
    got = served.signatures["serving_tensor"](image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, np.load(tmp_path / "p.npy"), atol=1e-5)
