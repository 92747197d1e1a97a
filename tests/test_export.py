"""Export: the SavedModel, ONNX file and .keras copy give the Keras model's outputs.

One toy_resnet at 32x32 (ResNet50's layers in small: caffe preprocessing, convolutions, BatchNorm
with statistics set from data, residual adds; weights=None) is exported once by the CLI (module
fixture); a fresh Python process that never imports kfine loads the SavedModel and the ONNX file and runs them on PNG
and JPEG bytes, a tensor batch, and a batch mixing good and malformed bytes. The parent compares
with the Keras model fed the same decoded + resized pixels.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras

from kfine.config import ModelConfig, load_config, save_config
from kfine.export import ExportError, export_model, export_run, onnx_bytes
from kfine.model import build_model
from kfine.rundir import write_json
from test_pipeline import _png_header_only
import forkserver
from conftest import eval_reference

SIZE = (32, 32)
CLASSES = ["cat", "dog", "fox"]
# The SavedModel runs as an optimised graph (grappler fuses conv + BatchNorm) and the Keras model
# eagerly: float32 round-off through 50 layers reaches ~1e-5 on a probability. A wrong resize,
# channel order or preprocessing gives differences of 1e-2 and more.
ATOL = 5e-5
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnxruntime"))   # kfine[onnx]
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs the onnx extra: pip install kfine[onnx]")


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


CACHE = round(1.143 * 32)   # the default cache size: shorter side 37 for a 32 px crop


def _reference_pixels(data: bytes) -> np.ndarray:
    return eval_reference(data, 32)


def _predict(model, x) -> np.ndarray:
    from kfine.model import probabilities
    return keras.ops.convert_to_numpy(probabilities(model, np.asarray(x, np.float32)))


def _calibrate(model, x):
    """Give the untrained model non-trivial BatchNorm statistics (those of ``x``, via one
    training-mode forward pass with momentum 0) and a head scaled so that its probabilities are
    not saturated at 0/1: comparisons of probabilities then mean something."""
    bns = [l for l in model.get_layer("backbone").layers if isinstance(l, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    model(x, training=True)
    for layer in bns:
        layer.momentum = 0.99
    logits = keras.Model(model.input, model.get_layer("head_logits").output)(x)
    head = model.get_layer("head_logits")
    head.kernel.assign(head.kernel / (2 * float(np.std(keras.ops.convert_to_numpy(logits)))))


def _cli(*args, cwd):
    return forkserver.run([sys.executable, "-m", "kfine.export", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


CHILD = textwrap.dedent(r"""
    import json, sys
    from pathlib import Path
    import numpy as np
    import tensorflow as tf

    work, export = Path(sys.argv[1]), Path(sys.argv[2])
    assert not any(m == "kfine" or m.startswith("kfine.") for m in sys.modules), "kfine was imported"


    def plain(result):
        return {k: [x.decode() if isinstance(x, bytes) else x for x in v.numpy().tolist()]
                for k, v in result.items()}

    out = {}
    loaded = tf.saved_model.load(str(export / "saved_model" / "1"))
    out["signatures"] = sorted(loaded.signatures)
    default, tensor = loaded.signatures["serving_default"], loaded.signatures["serving_tensor"]
    out["default_inputs"] = sorted(default.structured_input_signature[1])
    out["default_outputs"] = {k: v.dtype.name for k, v in default.structured_outputs.items()}
    out["tensor_inputs"] = sorted(tensor.structured_input_signature[1])
    for name in ("good", "mixed"):
        blobs = [p.read_bytes() for p in sorted((work / name).iterdir())]
        out[name] = plain(default(image_bytes=tf.constant(blobs)))
    out["empty"] = plain(default(image_bytes=tf.constant([], tf.string)))
    out["tensor"] = plain(tensor(image=tf.constant(np.load(work / "tensor.npy"))))
    out["kfine_imported"] = any(m == "kfine" or m.startswith("kfine.") for m in sys.modules)
    if not (export / "model.onnx").exists():
        (work / "out.json").write_text(json.dumps(out))
        sys.exit(0)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    out["onnx_inputs"] = [i.name for i in sess.get_inputs()]
    out["onnx"] = sess.run(None, {"image": np.load(work / "tensor.npy")})[0].tolist()
    (work / "out.json").write_text(json.dumps(out))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run dir exported in all three formats by the CLI; the outputs of a fresh process (no
    kfine) for a set of test images; and what the parent needs to compute the references."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone="toy_resnet", weights=None), num_classes=3, image_size=SIZE)
    _calibrate(model, np.random.default_rng(1).uniform(0, 255, (32, 32, 32, 3)).astype("float32"))
    rng = np.random.default_rng(0)
    model.save(run / "model.keras")
    write_json(run / "class_names.json", CLASSES)
    save_config(load_config(None, ["data.root=data", "data.image_size=[32,32]", "model.weights=null", "model.backbone=toy_resnet",
                                   f"export.formats=[saved_model,{'onnx,' if HAVE_ONNX else ''}keras]"]),
                run / "config.yaml")

    # The CLI with its defaults: formats from the run's config.yaml, output in RUN/export.
    proc = _cli("--run", str(run), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = dict(line.split(": ", 1) for line in proc.stdout.splitlines()
                   if line.split(":")[0] in ("saved_model", "onnx", "keras"))

    # Images: PNG at the training size (lossless: the pixels are exactly `arr`), PNG and JPEG of
    # other sizes, a grayscale PNG; and a batch mixing them with bytes that cannot be decoded.
    work = root / "work"
    arrays = {"a_png37": rng.integers(0, 256, (CACHE, CACHE, 3), dtype=np.uint8),
              "b_png45x37": rng.integers(0, 256, (45, 37, 3), dtype=np.uint8),
              "c_jpeg50x40": rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)}
    blobs = {"a_png37": _encode(arrays["a_png37"], "PNG"),
             "b_png45x37": _encode(arrays["b_png45x37"], "PNG"),
             "c_jpeg50x40": _encode(arrays["c_jpeg50x40"], "JPEG"),
             "d_gray_png": _encode(rng.integers(0, 256, (20, 30), dtype=np.uint8), "PNG")}
    mixed = {"0_good": blobs["a_png37"], "1_empty": b"", "2_text": b"this is not an image",
             "3_truncated_jpeg": blobs["c_jpeg50x40"][:200], "4_truncated_png": blobs["b_png45x37"][:60],
             "5_good": blobs["c_jpeg50x40"], "6_jpeg_magic_only": b"\xff\xd8\xff",
             "7_bomb_100000x100000": _png_header_only(100000, 100000)}
    for folder, items in (("good", blobs), ("mixed", mixed)):
        (work / folder).mkdir(parents=True)
        for name, data in items.items():
            (work / folder / name).write_bytes(data)
    tensor = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8).astype(np.float32)
    np.save(work / "tensor.npy", tensor)
    (work / "child.py").write_text(CHILD)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = forkserver.run([sys.executable, str(work / "child.py"), str(work), str(run / "export")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads((work / "out.json").read_text())

    ref_pixels = {name: _reference_pixels(data) for name, data in blobs.items()}
    return {"run": run, "work": work, "model": model, "written": written, "child": child, "arrays": arrays,
            "blobs": blobs, "ref_pixels": ref_pixels, "tensor": tensor}


def test_layout_and_signatures(exported):
    export = exported["run"] / "export"
    want = {"saved_model": "saved_model/1", "onnx": "model.onnx", "keras": "model.keras"}
    if not HAVE_ONNX:
        del want["onnx"]
    assert exported["written"] == {k: str(export / v) for k, v in want.items()}
    assert (export / "saved_model" / "1" / "saved_model.pb").is_file()
    assert sorted(p.name for p in export.iterdir()) == sorted([Path(v).parts[0] for v in want.values()]
                                                              + ["signatures.json"])
    assert [p.name for p in (export / "saved_model").iterdir()] == ["1"]   # no temp dirs left
    child = exported["child"]
    assert child["kfine_imported"] is False
    assert child["signatures"] == ["serving_default", "serving_tensor"]
    assert child["default_inputs"] == ["image_bytes"] and child["tensor_inputs"] == ["image"]
    assert child["default_outputs"] == {"probabilities": "float32", "class_index": "int64",
                                        "class_name": "string", "valid": "bool"}
    # signatures.json (what report.html shows) says what the SavedModel, loaded without kfine, has
    sigs = json.loads((export / "signatures.json").read_text())
    assert sorted(sigs) == child["signatures"]
    assert list(sigs["serving_default"]["inputs"]) == child["default_inputs"]
    assert list(sigs["serving_tensor"]["inputs"]) == child["tensor_inputs"]
    assert {k: v["dtype"] for k, v in sigs["serving_default"]["outputs"].items()} == child["default_outputs"]
    assert sigs["serving_default"]["inputs"]["image_bytes"] == {"dtype": "string", "shape": [None]}
    assert sigs["serving_tensor"]["inputs"]["image"] == {"dtype": "float32", "shape": [None, *SIZE, 3]}


def test_the_bytes_signature_decodes_without_a_graph_rewrite_per_call(exported):
    """Its tf.data decode pipeline carries options that switch off autotuning and the default
    graph rewrite, which TensorFlow otherwise ran at every call (about 0.1 s of each call on 2
    cores: tools/bench.py --only serving)."""
    import tensorflow as tf
    from tensorflow.core.framework import dataset_options_pb2
    served = tf.saved_model.load(str(exported["run"] / "export" / "saved_model" / "1"))
    graph = served.signatures["serving_default"].graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    options = [dataset_options_pb2.Options.FromString(n.attr["serialized_options"].s)
               for n in nodes if n.op == "OptionsDataset"]
    assert len(options) == 1 and "ReduceDataset" in {n.op for n in nodes}
    assert options[0].autotune_options.enabled is False
    assert options[0].optimization_options.apply_default_optimizations is False


def test_png_at_the_cache_size_matches_keras_on_its_raw_centre_crop(exported):
    got = np.array(exported["child"]["good"]["probabilities"])[0]
    top = round((CACHE - 32) / 2)
    raw = exported["arrays"]["a_png37"][top:top + 32, top:top + 32]
    want = _predict(exported["model"], raw[None].astype(np.float32))[0]
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_bytes_signature_decodes_and_resizes_like_training(exported):
    out = exported["child"]["good"]
    names = sorted(exported["blobs"])   # the child read the folder sorted by name
    want = _predict(exported["model"], np.stack([exported["ref_pixels"][n] for n in names]))
    got = np.array(out["probabilities"], np.float32)
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert out["valid"] == [True] * len(names)
    assert out["class_index"] == want.argmax(1).tolist()
    assert out["class_name"] == [CLASSES[i] for i in want.argmax(1)]
    assert np.abs(want[0] - want[1]).max() > 1e-3   # the images give different outputs


def test_bytes_signature_agrees_with_evaluation_and_predict(exported):
    """The images as kfine's evaluation and predict load them (the eval transform of the run's
    config) give the same outputs through the Keras model as their bytes through the SavedModel."""
    from kfine.pipeline import load_images

    files = [str(p) for p in sorted((exported["work"] / "good").iterdir())]
    images, ok, bad = load_images(files, SIZE)
    assert ok == files and not bad
    want = _predict(exported["model"], images)
    np.testing.assert_allclose(np.array(exported["child"]["good"]["probabilities"]), want, atol=ATOL)


def test_class_names_stored_in_the_saved_model_equal_class_names_json(exported):
    out = exported["child"]["good"]
    saved = json.loads((exported["run"] / "class_names.json").read_text())
    assert out["class_name"] == [saved[i] for i in out["class_index"]]


def test_tensor_signature_takes_float_0_255(exported):
    out = exported["child"]["tensor"]
    want = _predict(exported["model"], exported["tensor"])
    np.testing.assert_allclose(np.array(out["probabilities"]), want, atol=ATOL)
    assert out["class_index"] == want.argmax(1).tolist()
    assert out["class_name"] == [CLASSES[i] for i in want.argmax(1)]


def test_malformed_bytes_in_a_batch_do_not_fail_it(exported):
    out = exported["child"]["mixed"]
    # order: 0_good, 1_empty, 2_text, 3_truncated_jpeg, 4_truncated_png, 5_good, 6_jpeg_magic_only,
    # 7_bomb (a header claiming 10^10 pixels: refused before decoding, like the other bad ones)
    assert out["valid"] == [True, False, False, False, False, True, False, False]
    probs = np.array(out["probabilities"])
    want = _predict(exported["model"], np.stack([exported["ref_pixels"]["a_png37"],
                                                 exported["ref_pixels"]["c_jpeg50x40"]]))
    np.testing.assert_allclose(probs[[0, 5]], want, atol=ATOL)
    bad = [1, 2, 3, 4, 6, 7]
    assert np.all(probs[bad] == 0)
    assert [out["class_index"][i] for i in bad] == [-1] * len(bad)
    assert [out["class_name"][i] for i in bad] == [""] * len(bad)
    assert out["class_name"][0] == CLASSES[int(want[0].argmax())]


def test_an_empty_batch_gets_empty_outputs(exported):
    out = exported["child"]["empty"]
    assert out["valid"] == [] and out["class_index"] == [] and out["class_name"] == []
    assert np.array(out["probabilities"]).reshape(-1, 3).shape == (0, 3)


@needs_onnx
def test_onnx_matches_keras(exported):
    child = exported["child"]
    assert child["onnx_inputs"] == ["image"]
    want = _predict(exported["model"], exported["tensor"])
    np.testing.assert_allclose(np.array(child["onnx"]), want, atol=ATOL)


def test_keras_copy_reloads_with_safe_mode(exported):
    reloaded = keras.saving.load_model(exported["written"]["keras"], safe_mode=True)
    x = exported["tensor"]
    np.testing.assert_array_equal(_predict(reloaded, x), _predict(exported["model"], x))


@needs_onnx
def test_onnx_is_not_written_when_onnxruntime_disagrees(exported, tmp_path, monkeypatch):
    """A converter whose output does not match the Keras model: ExportError, no file."""
    import onnx
    import kfine.export as ex

    real_proto = onnx.load(exported["written"]["onnx"])

    class FakeConvert:
        @staticmethod
        def from_function(*args, **kwargs):
            return real_proto, None

    import onnxruntime
    monkeypatch.setattr(ex, "_import_onnx", lambda: (type("T", (), {"convert": FakeConvert}), onnxruntime))
    other = build_model(ModelConfig(backbone="toy_resnet", weights=None), num_classes=3, image_size=SIZE)
    with pytest.raises(ExportError, match="differs from Keras"):
        export_model(other, CLASSES, SIZE, tmp_path / "export", formats=("onnx",))
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_missing_onnx_extra_is_a_clear_error(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)   # makes `import tf2onnx` raise ImportError
    with pytest.raises(ExportError, match=r"pip install kfine\[onnx\]"):
        onnx_bytes(exported["model"], SIZE)


def test_unknown_format_is_an_error(exported, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(exported["model"], CLASSES, SIZE, tmp_path, formats=("tflite",))


def test_cli_run_without_model_exits_2_with_one_line(tmp_path, capsys):
    """In process (main(argv)); the module fixture runs the command as a real process."""
    from kfine.export import main
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "class_names.json", CLASSES)
    assert main(["--run", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kfine: error:"), lines
    assert str(run / "model.keras") in lines[0]
    assert not (run / "export").exists()


def test_cli_unknown_format_is_a_usage_error(tmp_path, capsys):
    from kfine.export import main
    with pytest.raises(SystemExit) as e:   # argparse's usage error
        main(["--run", str(tmp_path), "--format", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_export_run_formats_and_out_dir(exported, tmp_path):
    written = export_run(exported["run"], formats=["keras"], out_dir=tmp_path / "out")
    assert written == {"keras": str(tmp_path / "out" / "model.keras")}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.keras"]


def test_a_re_export_writes_the_next_version_and_names_the_folder_to_load(tmp_path, capsys):
    """TF Serving reads each numbered folder as a version of the model and serves the highest: a
    second export is version 2 beside 1 (not a silent replacement), and the log names the exact
    folder tf.saved_model.load takes."""
    import tensorflow as tf
    from kfine.config import ScratchConfig
    from kfine.export import export_model
    model = build_model(ModelConfig(backbone="scratch_cnn", weights=None, scratch=ScratchConfig(filters=(4,), dense_units=8)),
                        3, (32, 32))
    out = tmp_path / "export"
    first = export_model(model, CLASSES, (32, 32), out)["saved_model"]
    log1 = capsys.readouterr().out
    second = export_model(model, CLASSES, (32, 32), out)["saved_model"]
    log2 = capsys.readouterr().out
    assert (first, second) == (str(out / "saved_model" / "1"), str(out / "saved_model" / "2"))
    assert sorted(p.name for p in (out / "saved_model").iterdir()) == ["1", "2"]
    assert f"SavedModel version 1 in {first}" in log1 and f'tf.saved_model.load("{second}")' in log2
    x = np.zeros((1, 32, 32, 3), np.float32)
    got = tf.saved_model.load(second).signatures["serving_tensor"](image=tf.constant(x))["probabilities"]
    np.testing.assert_allclose(got.numpy(), _predict(model, x), atol=1e-6)
