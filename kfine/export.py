"""Export a trained model for serving: SavedModel (TF Serving), ONNX, .keras.

    export/
      saved_model/1/   SavedModel in a version folder, as TF Serving expects; a re-export writes the
                       next number (2, 3, ...: TF Serving serves the highest). tf.saved_model.load
                       takes the version folder: export/saved_model/1
      model.onnx       tensor input only (optional extra: pip install kfine[onnx])
      model.keras      the Keras model (reload with keras.saving.load_model after `import kfine.model`)

SavedModel signatures (class names are stored in the graph as a constant):

    serving_default  image_bytes: string [N]  (encoded JPEG / PNG / GIF / BMP / WebP, any size)
      -> probabilities float32 [N, C], class_index int64 [N], class_name string [N], valid bool [N]
      Each image goes through the run's eval transform (kfine.pipeline.eval_image: decode with 3
      channels, first GIF frame; resize to the cache size; centre crop or squash to the training
      size), the same function evaluation and prediction use. An image that fails to decode (empty,
      truncated, corrupt, not an image) or whose header claims more than data.max_pixels does not
      fail the batch: it gets valid=False, probabilities all 0, class_index -1 and class_name "".
      An empty batch gets empty outputs.
    serving_tensor   image: float32 [N, H, W, 3], RGB 0..255 at the training size
      -> probabilities, class_index, class_name

SavedModel and ONNX are TensorFlow graphs. Under another Keras backend (JAX on a GPU machine) the
model is saved as .keras and exported by a TensorFlow-backend subprocess, so the served graph is
plain TensorFlow ops on every backend (jax2tf would embed StableHLO compiled for the exporting
platform, and cannot carry the string decoding of serving_default).

Every artifact is written beside its final place and renamed over it, so a reader (or a TF
Serving instance polling the directory) never sees half an export.

LiteRT (``litert``): export/model.tflite (model_float16 / model_dynamic / model_int8.tflite by
export.litert.quantization) takes decoded images, not bytes: see LiteRTModel and litert_predict.
export/litert.json describes its input and records its accuracy next to the Keras model's.

    python -m kfine.export --run runs/NAME [--format saved_model|onnx|keras|litert ...] [--out DIR]
                           [--quantization none|float16|dynamic|int8] [--representative-images N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

# TensorFlow and Keras are imported inside the functions that use them, so that the CLI can
# report a wrong run directory in one line (TensorFlow's import prints its own log lines).
from kfine.checks import check_config
from kfine.config import load_config
from kfine.log import progress
from kfine.rundir import atomic_write_bytes, missing_run_file, read_json, write_json

FORMATS = ("saved_model", "onnx", "keras", "litert")
SAVED_MODEL_VERSION = "1"
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
LITERT_TOLERANCE = 1e-4   # the float LiteRT file against Keras (probabilities)
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
LITERT_FILES = {"none": "model.tflite", "float16": "model_float16.tflite",
                "dynamic": "model_dynamic.tflite", "int8": "model_int8.tflite"}


class ExportError(ValueError):
    """An export that cannot be done or did not check out; the message says why and what to do."""


# ----------------------------------------------------------------------------- image decoding
def serving_image(data, image_size, transform: dict | None = None):
    """Encoded image bytes -> float32 [H, W, 3] RGB 0..255 at ``image_size``: kfine.pipeline's
    eval transform (decode, resize to the cache size, centre crop or squash), the very function
    evaluation and prediction use, so serving sees the pixels evaluation saw. An image whose
    header claims more than ``max_pixels`` fails before it is decoded (a decompression bomb).
    ``transform``: {"cache_size", "eval_transform", "max_pixels"} of the run's data section."""
    import tensorflow as tf
    from kfine.pipeline import eval_image, header_pixels
    t = {"cache_size": None, "eval_transform": "resize_center_crop", "max_pixels": None, **(transform or {})}
    checks = []
    if t["max_pixels"]:
        checks.append(tf.debugging.assert_less_equal(header_pixels(data), tf.constant(int(t["max_pixels"]), tf.int64),
                                                     message="image larger than max_pixels"))
    with tf.control_dependencies(checks):
        data = tf.identity(data)
    return eval_image(data, image_size, t["cache_size"], t["eval_transform"])


def transform_of(data_cfg) -> dict:
    """The serving transform of a run's data section (what ``serving_image`` takes)."""
    size = data_cfg.cache_size
    return {"cache_size": list(size) if isinstance(size, (list, tuple)) else size,
            "eval_transform": data_cfg.eval_transform, "max_pixels": data_cfg.max_pixels}


def _probabilities(model, x):
    """Every format's output: the model's probabilities (kfine.model.probabilities)."""
    from kfine.model import probabilities
    return probabilities(model, x)


# ----------------------------------------------------------------------------- SavedModel
def _serving_fns(model, class_names, image_size, transform=None):
    """The two signature functions: (bytes_fn, tensor_fn). Both call one tf.function of the
    model, traced once: the export traces each signature twice (Keras' ExportArchive lists the
    variables, then tf.saved_model.save), and tracing ResNet50 costs about a second each time."""
    import tensorflow as tf
    from kfine.pipeline import one_pass_options
    h, w = int(image_size[0]), int(image_size[1])
    names = tf.constant(list(class_names), tf.string)
    model_fn = tf.function(lambda images: _probabilities(model, images), autograph=False,
                           input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32)])

    def classify(images):
        # An empty batch never reaches the model: grappler's fused BatchNorm fails on zero rows.
        probs = tf.cond(tf.shape(images)[0] > 0,
                        lambda: model_fn(images),
                        lambda: tf.zeros([0, len(class_names)], tf.float32))
        index = tf.argmax(probs, axis=-1)
        return {"probabilities": probs, "class_index": index, "class_name": tf.gather(names, index)}

    def tensor_fn(image):
        return classify(image)

    def bytes_fn(image_bytes):
        # Decode in a tf.data pipeline so that ignore_errors() drops an image that fails to
        # decode (empty, truncated, not an image) instead of failing the whole batch: the graph
        # equivalent of a per-image try/except. Survivors are scattered back to their positions;
        # the others stay black and are masked out below.
        n = tf.shape(image_bytes)[0]
        ds = tf.data.Dataset.from_tensor_slices((tf.range(n), image_bytes))
        ds = ds.map(lambda i, data: (i, serving_image(data, (h, w), transform))).ignore_errors()
        ds = ds.batch(tf.cast(tf.maximum(n, 1), tf.int64))   # one batch, or none if all failed
        ds = ds.with_options(one_pass_options())   # no graph rewrite at every call (~0.1 s each)
        empty = (tf.zeros([0], tf.int32), tf.zeros([0, h, w, 3], tf.float32))
        index, decoded = ds.reduce(empty, lambda _, batch: batch)
        images = tf.scatter_nd(index[:, None], decoded, [n, h, w, 3])
        valid = tf.scatter_nd(index[:, None], tf.ones_like(index), [n]) > 0
        out = classify(images)
        return {
            "probabilities": out["probabilities"] * tf.cast(valid, tf.float32)[:, None],
            "class_index": tf.where(valid, out["class_index"], tf.constant(-1, tf.int64)),
            "class_name": tf.where(valid, out["class_name"], tf.constant("")),
            "valid": valid,
        }

    return bytes_fn, tensor_fn


def _write_saved_model(model, class_names, image_size, out_dir: Path, transform=None) -> Path:
    import keras
    import tensorflow as tf
    h, w = int(image_size[0]), int(image_size[1])
    bytes_fn, tensor_fn = _serving_fns(model, class_names, image_size, transform)
    archive = keras.export.ExportArchive()
    # No archive.track(model): add_endpoint already tracks every variable the endpoints use (as
    # tf.Variables), and track() would add the Keras variables too, so the SavedModel stored each
    # weight twice (189 MB instead of 94 MB for ResNet50). The model holds no lookup tables.
    endpoints = {
        "serving_default": archive.add_endpoint(
            "serving_default", bytes_fn, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]),
        "serving_tensor": archive.add_endpoint(
            "serving_tensor", tensor_fn, input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="image")]),
    }
    base = out_dir / "saved_model"
    final = base / next_version(base)
    base.mkdir(parents=True, exist_ok=True)
    # TF Serving only loads numeric directories, so it ignores the temporary one.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        archive.write_out(str(tmp / "sm"), verbose=False)
        _replace_dir(tmp / "sm", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out_dir / "signatures.json", describe_signatures(endpoints))
    print(f"kfine: SavedModel version {final.name} in {final} (load it with tf.saved_model.load(\"{final}\"); "
          f"TF Serving serves the highest version in {base})", flush=True)
    return final


def next_version(base: Path) -> str:
    """The version folder a new SavedModel export gets: 1, or one more than the highest there
    (TF Serving reads each numbered folder as a version of the model and serves the highest)."""
    taken = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return str(max(taken, default=int(SAVED_MODEL_VERSION) - 1) + 1)


def describe_signatures(endpoints: dict) -> dict:
    """{signature: {"inputs": {name: {dtype, shape}}, "outputs": {...}}} of the exported
    functions, read from their traced graphs: what the report and a client can rely on."""
    def spec(t):
        return {"dtype": t.dtype.name, "shape": [None if d is None else int(d) for d in t.shape.as_list()]}
    out = {}
    for name, fn in endpoints.items():
        concrete = fn.get_concrete_function()
        args = concrete.structured_input_signature[0]
        out[name] = {"inputs": {a.name: spec(a) for a in args},
                     "outputs": {k: spec(v) for k, v in sorted(concrete.structured_outputs.items())}}
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` (rename, then delete the old)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- ONNX
def _import_onnx():
    try:
        import tf2onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"ONNX export needs tf2onnx and onnxruntime ({e}); "
                          "install them with: pip install kfine[onnx]") from None
    return tf2onnx, onnxruntime


def _check_images(image_size, n: int = 4) -> np.ndarray:
    """A fixed batch for the ONNX check: random pixels, smooth gradients and flat colours."""
    h, w = int(image_size[0]), int(image_size[1])
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 255, (2, h, w, 3))
    ramp = np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3))
    flat = np.full((h, w, 3), (200.0, 40.0, 90.0))
    return np.concatenate([noise, ramp[None], flat[None]])[:n].astype(np.float32)


def onnx_bytes(model, image_size, check_images=None) -> bytes:
    """Convert the tensor path (float32 [N, H, W, 3] 0..255 -> probabilities) to ONNX, checked.

    The ONNX graph has one input named ``image`` and one output named ``probabilities``.
    Raises ExportError unless onnxruntime reproduces the Keras outputs (max abs diff < 1e-4).
    """
    import tensorflow as tf
    tf2onnx, ort = _import_onnx()
    h, w = int(image_size[0]), int(image_size[1])
    spec = [tf.TensorSpec([None, h, w, 3], tf.float32, name="image")]
    # An explicit signature: model.export(format="onnx") named the input "functional_1/Squeeze/input:0".
    fn = tf.function(lambda image: {"probabilities": _probabilities(model, image)},
                     input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
    data = proto.SerializeToString()

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != ["image"] or outputs != ["probabilities"]:
        raise ExportError(f"ONNX export: expected input ['image'] and output ['probabilities'], "
                          f"got {inputs} and {outputs}; the file was not written")
    _check_parity("ONNX export: onnxruntime", lambda x: session.run(["probabilities"], {"image": x})[0],
                  model, image_size, check_images, ONNX_TOLERANCE)
    return data


def _check_parity(what: str, predict, model, image_size, check_images, tolerance: float) -> None:
    """The exported file's probabilities (``predict``) against Keras' on the check images; an
    ExportError (the file is not written) when they differ by ``tolerance`` or more."""
    import keras
    x = _check_images(image_size) if check_images is None else np.asarray(check_images, np.float32)
    diff = float(np.max(np.abs(predict(x) - keras.ops.convert_to_numpy(_probabilities(model, x)))))
    if not diff < tolerance:
        raise ExportError(f"{what} differs from Keras by {diff:.2e} (allowed {tolerance}); "
                          f"the file was not written")


# ----------------------------------------------------------------------------- LiteRT
# LiteRT (TensorFlow Lite) has no JPEG decoder among its builtin ops, so the .tflite file takes
# decoded pixels at the training size: the eval transform happens on the app side (LiteRTModel /
# litert_predict below, or the app's own resize-shorter-side + centre crop).
#   none / float16 / dynamic: input "image" float32 [N, H, W, 3], RGB 0..255
#   int8 (full integer):      input "image" uint8   [N, H, W, 3], RGB 0..255 (scale 1, zero point 0)
#   output: probabilities float32 [N, C] (dequantized for int8)
def _litert_settings(litert) -> dict:
    """export.litert (a LiteRTConfig, a dict or None) as {quantization, representative_images}."""
    if litert is None:
        out = {}
    elif isinstance(litert, dict):
        out = dict(litert)
    else:
        out = {"quantization": litert.quantization, "representative_images": litert.representative_images}
    out = {"quantization": "none", "representative_images": 100, **out}
    if out["quantization"] not in QUANTIZATIONS:
        raise ExportError(f"export.litert.quantization must be one of {list(QUANTIZATIONS)}. "
                          f"Received: {out['quantization']!r}")
    return out


def representative_images(datasets, n: int) -> np.ndarray:
    """The first ``n`` training images (in file order) through the eval transform, float32
    [n, H, W, 3] 0..255: what int8 quantization calibrates its ranges on."""
    if datasets is None or not getattr(datasets, "files", {}).get("train"):
        raise ExportError("export.litert.quantization: int8 calibrates on training images; export "
                          "from a run directory (python -m kfine.export --run RUN) whose data is readable")
    images = []
    for batch in datasets.dataset("train", train=False, shuffle=False):
        images.append(np.asarray(batch[0], np.float32))
        if sum(len(b) for b in images) >= n:
            break
    return np.concatenate(images)[:n]


def _calibration_batches(images):
    """The converter's representative_dataset: one image per step, led by a black and a white
    image, so that the input's observed range is exactly 0..255 (uint8 input = the pixel values)."""
    h, w = images.shape[1:3]
    lead = np.stack([np.zeros((h, w, 3), np.float32), np.full((h, w, 3), 255.0, np.float32)])

    def gen():
        for x in np.concatenate([lead, np.asarray(images, np.float32)]):
            yield [x[None]]
    return gen


def litert_bytes(model, image_size, quantization: str = "none", calibration=None, check_images=None) -> bytes:
    """Convert the tensor path (image -> probabilities) to a LiteRT flatbuffer, checked.

    Through a SavedModel with one signature (Keras' own LiteRT route) and TensorFlow's
    converter, builtin ops only (a phone's runtime has no TensorFlow ops): float16 stores float16
    weights, dynamic int8 weights with float activations, int8 everything in int8 (uint8 input,
    float32 probabilities out) calibrated on ``calibration`` (float32 [N, H, W, 3] 0..255).
    An unquantized file must reproduce Keras within LITERT_TOLERANCE, else ExportError.
    """
    import keras
    import tensorflow as tf
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"unknown LiteRT quantization {quantization!r}; choose from {list(QUANTIZATIONS)}")
    model = _float32_copy(model)
    h, w = int(image_size[0]), int(image_size[1])
    spec = [tf.TensorSpec([None, h, w, 3], tf.float32, name="image")]
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default",
                         lambda image: {"probabilities": _probabilities(model, image)},
                         input_signature=spec)
    with tempfile.TemporaryDirectory(prefix="kfine-litert-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            if calibration is None or len(calibration) == 0:
                raise ExportError("int8 LiteRT export needs calibration images (export.litert.representative_images)")
            converter.representative_dataset = _calibration_batches(np.asarray(calibration, np.float32))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.float32
        data = converter.convert()
    lite = LiteRTModel(data)
    if quantization == "int8" and lite.input_quantization != (1.0, 0):
        raise ExportError(f"int8 LiteRT export: the uint8 input has scale/zero point {lite.input_quantization}, "
                          f"not (1.0, 0); the file was not written")
    if quantization == "none":
        _check_parity("LiteRT export: the interpreter", lite.predict, model, image_size, check_images,
                      LITERT_TOLERANCE)
    return data


def _float32_copy(model):
    """``model`` itself when it computes in float32, else a float32 copy with its weights: a
    mixed-precision model's float16 ops are not LiteRT builtins (float16 weights are the
    converter's business: quantization float16)."""
    import keras
    if all(getattr(layer, "compute_dtype", "float32") == "float32" for layer in _all_layers(model)):
        return model

    def as_float32(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and str(node.get("config", {}).get("name", "")).startswith("mixed_"):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: as_float32(v) for k, v in node.items()}
        if isinstance(node, list):
            return [as_float32(v) for v in node]
        return node
    import kfine.model  # noqa: F401  (registers kfine>Preprocess)
    config = as_float32(keras.saving.serialize_keras_object(model))
    with _float32_policy():
        copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


class _float32_policy:
    """The global dtype policy set to float32 for the duration of a ``with``."""
    def __enter__(self):
        import keras
        self.old = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")

    def __exit__(self, *exc):
        import keras
        keras.config.set_dtype_policy(self.old)


def _interpreter_class():
    """ai-edge-litert's Interpreter when installed (pip install kfine[litert]), else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    return Interpreter


class LiteRTModel:
    """A kfine LiteRT file, ready to classify decoded images (the app side).

    ``predict(images)``: images [N, H, W, 3] RGB 0..255 at the file's size, already through the
    run's eval transform (``litert_predict`` applies it to image files): float32 (or uint8) for a
    float file, uint8 for an int8 file. Returns probabilities float32 [N, C]. Anything else (a
    wrong rank, size, channel count or dtype, values outside 0..255) is refused with ExportError.
    """

    def __init__(self, model):
        """``model``: a .tflite path or its bytes."""
        import warnings
        Interpreter = _interpreter_class()
        if not isinstance(model, (bytes, bytearray)) and not Path(model).is_file():
            raise ExportError(f"{model} does not exist (export it with: python -m kfine.export "
                              f"--run RUN --format litert)")
        with warnings.catch_warnings():   # tf.lite.Interpreter's deprecation notice (ai-edge-litert replaces it)
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            self.interpreter = (Interpreter(model_content=bytes(model)) if isinstance(model, (bytes, bytearray))
                                else Interpreter(model_path=str(model)))
        detail = self.interpreter.get_input_details()[0]
        self._input = detail["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self.dtype = np.dtype(detail["dtype"])
        self.image_size = (int(detail["shape"][1]), int(detail["shape"][2]))
        scale, zero = detail["quantization"]
        self.input_quantization = (float(scale), int(zero)) if scale else None

    def check(self, images) -> np.ndarray:
        """``images`` as the file's input dtype, or ExportError saying what is wrong."""
        x = np.asarray(images)
        h, w = self.image_size
        if x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise ExportError(f"LiteRT input must be a batch of RGB images [N, {h}, {w}, 3] (resize the shorter "
                              f"side, centre crop to {h}x{w}: the run's eval transform); got shape {list(x.shape)}")
        if self.dtype == np.uint8 and x.dtype != np.uint8:
            raise ExportError(f"this int8 LiteRT file takes uint8 pixels 0..255; got {x.dtype} "
                              f"(round and cast with np.clip(x, 0, 255).round().astype(np.uint8))")
        if self.dtype != np.uint8 and not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
            raise ExportError(f"this LiteRT file takes float32 pixels 0..255 (or uint8); got {x.dtype}")
        if x.dtype != np.uint8 and x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 255):
            raise ExportError(f"LiteRT input pixels must be RGB values in 0..255; got values in "
                              f"[{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
        return x.astype(self.dtype)

    def predict(self, images, batch_size: int = 32) -> np.ndarray:
        x = self.check(images)
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            self.interpreter.resize_tensor_input(self._input, list(chunk.shape))
            self.interpreter.allocate_tensors()
            self.interpreter.set_tensor(self._input, chunk)
            self.interpreter.invoke()
            out.append(np.array(self.interpreter.get_tensor(self._output), np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    @property
    def num_classes(self) -> int:
        return int(self.interpreter.get_output_details()[0]["shape"][-1])


def litert_predict(model, images, transform: dict | None = None, batch_size: int = 32) -> np.ndarray:
    """Probabilities [N, C] of a LiteRT file (path, bytes or LiteRTModel) for ``images``: an
    array [N, H, W, 3] already through the eval transform (see LiteRTModel), or a list of image
    files, which get the run's eval transform (``transform``: ``transform_of(cfg.data)``; decoding
    uses TensorFlow) and must all be readable."""
    lite = model if isinstance(model, LiteRTModel) else LiteRTModel(model)
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
        from kfine.pipeline import load_images
        images, _, bad = load_images([str(p) for p in images], lite.image_size, **(transform or {}))
        if bad:
            raise ExportError(f"unreadable image {bad[0][0]}: {bad[0][1]}")
    return lite.predict(images, batch_size)


def record_litert(path, model, class_names, quantization: str, datasets=None, transform=None, run_dir=None) -> dict:
    """export/litert.json: the file, its input, quantization and size, and (with ``datasets``) its
    accuracy on the test split (val when there is none) next to the Keras model's on the same
    images; merged into ``run_dir/metrics.json`` as metrics["export"]["litert"]."""
    import keras
    path = Path(path)
    lite = LiteRTModel(path)
    h, w = lite.image_size
    info = {"file": path.name, "quantization": quantization, "bytes": path.stat().st_size,
            "input": {"name": "image", "dtype": lite.dtype.name, "shape": [None, h, w, 3], "range": [0, 255]},
            "output": {"name": "probabilities", "dtype": "float32", "shape": [None, len(class_names)]},
            "class_names": list(class_names), "transform": transform}
    split = next((s for s in ("test", "val") if getattr(datasets, s, None) is not None), None)
    if split is not None:
        with progress(f"measuring the LiteRT file on the {split} split"):
            labels, lite_pred, keras_pred, diff = [], [], [], 0.0
            for batch in getattr(datasets, split):
                x = np.asarray(batch[0], np.float32)
                want = np.asarray(keras.ops.convert_to_numpy(_probabilities(model, x)), np.float32)
                got = lite.predict(np.clip(x, 0, 255).round().astype(np.uint8) if lite.dtype == np.uint8 else x)
                diff = max(diff, float(np.max(np.abs(got - want)))) if len(x) else diff
                labels.append(np.asarray(batch[1]).reshape(-1))
                lite_pred.append(got.argmax(-1))
                keras_pred.append(want.argmax(-1))
        labels, lite_pred, keras_pred = map(np.concatenate, (labels, lite_pred, keras_pred))
        info.update({"split": split, "n": int(len(labels)),
                     "accuracy": float((lite_pred == labels).mean()) if len(labels) else None,
                     "keras_accuracy": float((keras_pred == labels).mean()) if len(labels) else None,
                     "agreement": float((lite_pred == keras_pred).mean()) if len(labels) else None,
                     "max_abs_diff": diff})
    write_json(path.with_name("litert.json"), info)
    if run_dir is not None and split is not None:
        metrics_path = Path(run_dir) / "metrics.json"
        metrics = read_json(metrics_path, {})
        summary = {k: info[k] for k in ("file", "quantization", "bytes", "split", "n", "accuracy",
                                        "keras_accuracy", "agreement", "max_abs_diff")}
        write_json(metrics_path, {**metrics, "export": {**metrics.get("export", {}), "litert": summary}})
    return info


# ----------------------------------------------------------------------------- .keras
def _write_keras(model, out_dir: Path) -> Path:
    final = out_dir / "model.keras"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.tmp{os.getpid()}.keras"   # keras wants the .keras suffix
    try:
        model.save(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# ----------------------------------------------------------------------------- public API
def export_model(model, class_names, image_size, out_dir, formats=("saved_model",),
                 check_images=None, transform=None, litert=None, datasets=None, run_dir=None,
                 calibration=None) -> dict[str, str]:
    """Write ``model`` in each of ``formats`` under ``out_dir``; returns {format: written path}.

    ``model`` takes float 0..255 RGB at ``image_size`` and returns logits (kfine.model.build_model;
    or, saved by an older kfine, probabilities): every format outputs probabilities.
    ``check_images`` (float32 [N, H, W, 3]) is what the ONNX export is checked on; by default a
    fixed synthetic batch. ``transform``: the run's eval transform
    (``transform_of(cfg.data)``) that the SavedModel's image-bytes signature applies.
    ``litert`` (export.litert: {quantization, representative_images}) and ``datasets``
    (kfine.data.Datasets): the LiteRT file's quantization, its int8 calibration images (training
    images through the eval transform) and the split its accuracy is measured on (test, else val;
    ``export/litert.json``, and ``run_dir/metrics.json``'s "export" entry when ``run_dir`` is given).
    ``calibration`` (float32 [N, H, W, 3]) replaces the calibration images drawn from ``datasets``.
    """
    formats = tuple(dict.fromkeys(formats))   # unique, in order
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format {unknown[0]!r}; choose from {sorted(FORMATS)}")
    class_names = [str(c) for c in class_names]
    n_out = model.output_shape[-1]
    if n_out != len(class_names):
        raise ExportError(f"the model has {n_out} outputs but there are {len(class_names)} class names")
    out_dir = Path(out_dir)
    written = {}
    model = without_lora(model)
    lite = _litert_settings(litert)
    if calibration is None and "litert" in formats and lite["quantization"] == "int8":
        calibration = representative_images(datasets, lite["representative_images"])
    import keras
    if keras.backend.backend() != "tensorflow" and set(formats) - {"keras"}:
        tf_formats = [f for f in formats if f != "keras"]
        with progress(f"exporting {', '.join(tf_formats)} to {out_dir} (in a TensorFlow subprocess)"):
            written = _export_in_tensorflow(model, class_names, image_size, out_dir, tf_formats, check_images,
                                            transform, lite, calibration)
        formats = [f for f in formats if f == "keras"]
    for fmt in formats:
        with progress(f"exporting {fmt} to {out_dir}"):
            if fmt == "saved_model":
                written[fmt] = str(_write_saved_model(model, class_names, image_size, out_dir, transform))
            elif fmt == "onnx":
                data = onnx_bytes(model, image_size, check_images)
                atomic_write_bytes(out_dir / "model.onnx", data)
                written[fmt] = str(out_dir / "model.onnx")
            elif fmt == "litert":
                data = litert_bytes(model, image_size, lite["quantization"], calibration, check_images)
                atomic_write_bytes(out_dir / LITERT_FILES[lite["quantization"]], data)
                written[fmt] = str(out_dir / LITERT_FILES[lite["quantization"]])
            else:
                written[fmt] = str(_write_keras(model, out_dir))
    if "litert" in written:   # measured here, on the calling backend's model (also after a subprocess)
        record_litert(written["litert"], model, class_names, lite["quantization"], datasets, transform, run_dir)
    return written


def missing_formats(out_dir, formats) -> list[str]:
    """The ``formats`` whose export is not in ``out_dir`` (a finished run resumed writes only these)."""
    out_dir = Path(out_dir)
    there = {"saved_model": (out_dir / "saved_model").is_dir() and any((out_dir / "saved_model").iterdir()),
             "onnx": (out_dir / "model.onnx").is_file(), "keras": (out_dir / "model.keras").is_file(),
             "litert": any(out_dir.glob("model*.tflite"))}
    return [f for f in dict.fromkeys(formats) if not there.get(f)]


def without_lora(model):
    """The served model has no adapters: LoRA kernels merged into plain ones (kfine.lora)."""
    from kfine.lora import merge_lora
    return merge_lora(model)


def _export_in_tensorflow(model, class_names, image_size, out_dir: Path, formats, check_images, transform=None,
                          litert=None, calibration=None):
    """export_model in a subprocess on the TensorFlow backend (see the module docstring)."""
    import json
    import subprocess
    with tempfile.TemporaryDirectory(prefix="kfine-export-") as tmp:
        tmp = Path(tmp)
        model.save(tmp / "model.keras")
        spec = {"model": str(tmp / "model.keras"), "class_names": class_names,
                "image_size": [int(v) for v in image_size], "out_dir": str(out_dir), "formats": list(formats),
                "transform": transform, "litert": litert}
        if calibration is not None:
            np.save(tmp / "calibration.npy", np.asarray(calibration, np.float32))
            spec["calibration"] = str(tmp / "calibration.npy")
        if check_images is not None:
            np.save(tmp / "check.npy", np.asarray(check_images, np.float32))
            spec["check_images"] = str(tmp / "check.npy")
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        proc = subprocess.run([sys.executable, "-c", "import sys, kfine.export as e; e._export_child(sys.argv[1])",
                               str(tmp / "spec.json")], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ExportError(f"the TensorFlow export subprocess failed:\n{proc.stderr[-3000:]}")
        return json.loads((tmp / "written.json").read_text())


def _export_child(spec_path: str) -> None:
    import json
    import keras
    import kfine.model  # noqa: F401  (registers kfine>Preprocess)
    spec = json.loads(Path(spec_path).read_text())
    model = keras.saving.load_model(spec["model"], compile=False, safe_mode=True)
    check = np.load(spec["check_images"]) if "check_images" in spec else None
    calibration = np.load(spec["calibration"]) if "calibration" in spec else None
    written = export_model(model, spec["class_names"], spec["image_size"], spec["out_dir"],
                           spec["formats"], check, spec.get("transform"), litert=spec.get("litert"),
                           calibration=calibration)
    Path(spec_path).with_name("written.json").write_text(json.dumps(written))


def export_run(run_dir, formats=None, out_dir=None, quantization=None,
               representative_images=None) -> dict[str, str]:
    """Export ``run_dir/model.keras``; formats default to the run's ``export.formats``,
    ``out_dir`` to ``run_dir/export``; ``quantization`` / ``representative_images`` override
    the run's export.litert. A LiteRT export reads the run's data (splits.csv) for its int8
    calibration images and its test accuracy (metrics.json's "export" entry)."""
    run_dir = Path(run_dir)
    model_path, names_path, config_path = (run_dir / "model.keras", run_dir / "class_names.json",
                                           run_dir / "config.yaml")
    missing = missing_run_file(run_dir, ("model.keras", "class_names.json", "config.yaml"))
    if missing:
        raise ExportError(missing)
    cfg = check_config(load_config(config_path))
    import keras
    import kfine.model  # noqa: F401  (registers kfine>Preprocess, needed to load model.keras)
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    image_size = tuple(cfg.data.image_size)
    if tuple(model.input_shape[1:3]) != image_size:
        raise ExportError(f"{config_path} says data.image_size={list(image_size)} but the model "
                          f"takes {list(model.input_shape[1:3])}")
    formats = formats if formats else cfg.export.formats
    litert = _litert_settings(cfg.export.litert)
    litert.update({k: v for k, v in (("quantization", quantization),
                                     ("representative_images", representative_images)) if v is not None})
    datasets = None
    if "litert" in formats:   # the run's own split: calibration from train, accuracy on test
        from kfine import data as kdata
        saved = run_dir / "splits.csv"
        datasets = kdata.make_datasets(cfg.data, cfg.seed, splits=saved if saved.exists() else None)
    written = export_model(model, read_json(names_path), image_size,
                           out_dir if out_dir is not None else run_dir / "export",
                           formats, transform=transform_of(cfg.data), litert=litert, datasets=datasets,
                           run_dir=run_dir if datasets is not None else None)
    if datasets is not None and (run_dir / "report.html").exists():   # its Exports table from metrics.json
        from kfine.report import write_report
        write_report(run_dir)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfine.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory (holds model.keras)")
    parser.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                        help="repeatable; default: the run's export.formats")
    parser.add_argument("--out", help="output directory (default RUN/export)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="LiteRT quantization (default: the run's export.litert.quantization)")
    parser.add_argument("--representative-images", type=int, metavar="N",
                        help="int8: training images to calibrate on (default: export.litert.representative_images)")
    args = parser.parse_args(argv)
    if args.representative_images is not None and args.representative_images < 1:
        parser.error("--representative-images must be >= 1")
    from kfine import cli

    def work():
        for fmt, path in export_run(args.run, args.formats, args.out, args.quantization,
                                    args.representative_images).items():
            print(f"{fmt}: {path}")
    return cli.run_command(work)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
