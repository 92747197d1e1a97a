"""LiteRT export: a short scratch_cnn run (with ResNet's and VGG's "caffe" preprocessing in front:
RGB -> BGR, minus the ImageNet mean) exports a float .tflite file while training finishes and an
int8 one through the CLI; both answer the test split, the float one as Keras does (1e-4 on
probabilities), the int8 one within a stated margin of the float file's accuracy; the app-side
helper applies the eval transform to files and refuses malformed arrays."""
from __future__ import annotations

import numpy as np
import pytest

import keras

from conftest import eval_reference, make_folder
from kfine.config import ConfigError, check_config, load_config
from kfine.export import ExportError, LiteRTModel, export_model, litert_predict, main as export_main, transform_of
from kfine.rundir import read_json

# int8 weights and activations: the test accuracy stays within this of the float file's (1 of the
# ~15 test images; with the colour flip quantized as a ReverseV2 the int8 file fell to 67%)
INT8_MARGIN = 0.07


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    from kfine.train import run
    tmp = tmp_path_factory.mktemp("litert")
    root = make_folder(tmp / "data", "single", per_class=16)
    keras.utils.set_random_seed(0)
    cfg = load_config(None, [f"runs_dir={tmp / 'runs'}", f"data.root={root}", "data.image_size=[32,32]",
                             "data.batch_size=8", "data.test_fraction=0.3", "model.weights=null",
                             "model.backbone=scratch_cnn", "model.scratch.filters=[8,16]",
                             "model.scratch.dense_units=16", "model.scratch.dropout=0.0",
                             "train.optimizer.name=adam", "train.schedule.learning_rate=0.01",
                             "train.epochs=6", "train.verbose=0", "data.augment.enabled=false",
                             "export.formats=[litert]", "name=lite"])
    from kfine.registry import BACKBONES
    with pytest.MonkeyPatch.context() as mp:   # the caffe preprocessing, the mode int8 got wrong
        mp.setitem(BACKBONES["scratch_cnn"], "preprocess", "caffe")
        rd = run(cfg).run_dir
    float_metrics = read_json(rd / "metrics.json")
    assert export_main(["--run", str(rd), "--format", "litert", "--quantization", "int8",
                        "--representative-images", "24"]) == 0
    model = keras.saving.load_model(rd / "model.keras", compile=False)
    rows = [line.split(",") for line in (rd / "splits.csv").read_text().splitlines()[1:]]
    test = [str(root / row[0]) for row in rows if row[1] == "test"]   # path (relative to the root), split
    return {"run": rd, "cfg": check_config(cfg), "model": model, "float_metrics": float_metrics,
            "test_files": test}


def _keras(model, x):
    from kfine.model import probabilities
    return keras.ops.convert_to_numpy(probabilities(model, np.asarray(x, np.float32)))


def test_float_file_written_by_training_agrees_with_keras(lite_run):
    rd, model = lite_run["run"], lite_run["model"]
    path = rd / "export" / "model.tflite"
    lite = LiteRTModel(path)
    assert lite.dtype == np.float32 and lite.image_size == (32, 32) and lite.num_classes == 3
    x = np.stack([eval_reference(open(f, "rb").read()) for f in lite_run["test_files"]])
    np.testing.assert_allclose(lite.predict(x), _keras(model, x), atol=1e-4)
    entry = lite_run["float_metrics"]["export"]["litert"]
    assert entry["quantization"] == "none" and entry["file"] == "model.tflite"
    assert entry["split"] == "test" and entry["n"] == len(lite_run["test_files"])
    assert entry["bytes"] > 0 and entry["max_abs_diff"] < 1e-4
    assert entry["accuracy"] == entry["keras_accuracy"] == lite_run["float_metrics"]["test"]["accuracy"]


def test_int8_file_from_the_cli_answers_the_test_split(lite_run):
    rd = lite_run["run"]
    path = rd / "export" / "model_int8.tflite"
    lite = LiteRTModel(path)
    assert lite.dtype == np.uint8 and lite.input_quantization == (1.0, 0)   # uint8 input = the pixel values
    info = read_json(rd / "export" / "litert.json")
    assert info["quantization"] == "int8" and info["input"]["dtype"] == "uint8"
    assert info["bytes"] == path.stat().st_size < (rd / "export" / "model.tflite").stat().st_size
    assert info["keras_accuracy"] >= 0.8                       # the task was learnt
    assert info["accuracy"] >= lite_run["float_metrics"]["export"]["litert"]["accuracy"] - INT8_MARGIN
    assert read_json(rd / "metrics.json")["export"]["litert"]["quantization"] == "int8"
    html = (rd / "report.html").read_text()   # rewritten by the CLI: the Exports table shows the int8 file
    exports = html[html.index("<section id=exports>"):]
    assert "model_int8.tflite" in exports and f"{100 * info['accuracy']:.2f}%" in exports
    probs = litert_predict(path, lite_run["test_files"], transform_of(lite_run["cfg"].data))
    assert probs.shape == (len(lite_run["test_files"]), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.02)


def test_litert_predict_applies_the_eval_transform_to_files(lite_run, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(3)
    files = []
    for i, (h, w) in enumerate([(50, 40), (37, 60)]):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    path = lite_run["run"] / "export" / "model.tflite"
    got = litert_predict(path, files, transform_of(lite_run["cfg"].data))
    want = _keras(lite_run["model"], np.stack([eval_reference(f.read_bytes()) for f in files]))
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("file,images,message", [
    ("model.tflite", np.zeros((32, 32, 3), np.float32), "[N, 32, 32, 3]"),              # no batch axis
    ("model.tflite", np.zeros((1, 40, 40, 3), np.float32), "[N, 32, 32, 3]"),           # not the crop size
    ("model.tflite", np.zeros((1, 32, 32, 4), np.float32), "[N, 32, 32, 3]"),           # RGBA
    ("model.tflite", np.zeros((1, 32, 32, 3), np.int64), "float32"),
    ("model.tflite", np.full((1, 32, 32, 3), 300.0, np.float32), "0..255"),
    ("model_int8.tflite", np.zeros((1, 32, 32, 3), np.float32), "uint8"),
])
def test_malformed_input_is_refused(lite_run, file, images, message):
    with pytest.raises(ExportError, match=message.replace("[", r"\[").replace(".", r"\.")):
        litert_predict(lite_run["run"] / "export" / file, images)


def test_quantization_key_is_checked():
    with pytest.raises(ConfigError, match="export.litert.quantization"):
        check_config(load_config(None, ["export.litert.quantization=int4"]))
    with pytest.raises(ConfigError, match="export.litert.representative_images"):
        check_config(load_config(None, ["export.litert.representative_images=0"]))


@pytest.mark.slow   # a fresh TensorFlow process: ~25 s on 2 busy cores
def test_another_backend_exports_litert_through_the_tensorflow_subprocess(lite_run, tmp_path, monkeypatch):
    """Under JAX the model goes to a TensorFlow subprocess: the quantization and the calibration
    images travel with it (here the backend name is faked; the subprocess is real)."""
    model = lite_run["model"]
    calibration = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    written = export_model(model, ["cat", "dog", "fox"], (32, 32), tmp_path, formats=("litert",),
                           litert={"quantization": "int8"}, calibration=calibration)
    assert written == {"litert": str(tmp_path / "model_int8.tflite")}
    assert LiteRTModel(written["litert"]).dtype == np.uint8
    assert read_json(tmp_path / "litert.json")["quantization"] == "int8"


def test_a_mixed_precision_model_converts_as_float32():
    """float16 ops are not LiteRT builtins: a mixed_float16 model is converted as a float32 copy."""
    from kfine.config import ModelConfig, ScratchConfig
    from kfine.export import litert_bytes
    from kfine.model import build_model
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(ModelConfig(backbone="scratch_cnn", weights=None,
                                        scratch=ScratchConfig(filters=(8,), dense_units=8)), 2, (32, 32))
    finally:
        keras.config.set_dtype_policy(old)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    lite = LiteRTModel(litert_bytes(model, (32, 32)))
    assert lite.dtype == np.float32
    np.testing.assert_allclose(lite.predict(x), _keras(model, x), atol=1e-2)   # float16 round-off
    assert keras.config.dtype_policy().name == old.name
