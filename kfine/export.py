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

    python -m kfine.export --run runs/NAME [--format saved_model|onnx|keras ...] [--out DIR]
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
from kfine.config import check_config, load_config
from kfine.log import progress
from kfine.rundir import atomic_write_bytes, missing_run_file, read_json, write_json

FORMATS = ("saved_model", "onnx", "keras")
SAVED_MODEL_VERSION = "1"
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4


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


# ----------------------------------------------------------------------------- SavedModel
def _serving_fns(model, class_names, image_size, transform=None):
    """The two signature functions: (bytes_fn, tensor_fn)."""
    import tensorflow as tf
    h, w = int(image_size[0]), int(image_size[1])
    names = tf.constant(list(class_names), tf.string)

    def classify(images):
        # An empty batch never reaches the model: grappler's fused BatchNorm fails on zero rows.
        probs = tf.cond(tf.shape(images)[0] > 0,
                        lambda: tf.cast(model(images, training=False), tf.float32),
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
    import keras
    import tensorflow as tf
    tf2onnx, ort = _import_onnx()
    h, w = int(image_size[0]), int(image_size[1])
    spec = [tf.TensorSpec([None, h, w, 3], tf.float32, name="image")]
    # An explicit signature: model.export(format="onnx") named the input "functional_1/Squeeze/input:0".
    fn = tf.function(lambda image: {"probabilities": tf.cast(model(image, training=False), tf.float32)},
                     input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
    data = proto.SerializeToString()

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != ["image"] or outputs != ["probabilities"]:
        raise ExportError(f"ONNX export: expected input ['image'] and output ['probabilities'], "
                          f"got {inputs} and {outputs}; the file was not written")
    x = _check_images(image_size) if check_images is None else np.asarray(check_images, np.float32)
    got = session.run(["probabilities"], {"image": x})[0]
    want = keras.ops.convert_to_numpy(model(x, training=False)).astype(np.float32)
    diff = float(np.max(np.abs(got - want)))
    if not diff < ONNX_TOLERANCE:
        raise ExportError(f"ONNX export: onnxruntime differs from Keras by {diff:.2e} "
                          f"(allowed {ONNX_TOLERANCE}); the file was not written")
    return data


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
                 check_images=None, transform=None) -> dict[str, str]:
    """Write ``model`` in each of ``formats`` under ``out_dir``; returns {format: written path}.

    ``model`` takes float 0..255 RGB at ``image_size`` and returns softmax probabilities
    (kfine.model.build_model). ``check_images`` (float32 [N, H, W, 3]) is what the ONNX export
    is checked on; by default a fixed synthetic batch. ``transform``: the run's eval transform
    (``transform_of(cfg.data)``) that the SavedModel's image-bytes signature applies.
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
    import keras
    if keras.backend.backend() != "tensorflow" and set(formats) - {"keras"}:
        tf_formats = [f for f in formats if f != "keras"]
        with progress(f"exporting {', '.join(tf_formats)} to {out_dir} (in a TensorFlow subprocess)"):
            written = _export_in_tensorflow(model, class_names, image_size, out_dir, tf_formats, check_images,
                                            transform)
        formats = [f for f in formats if f == "keras"]
    for fmt in formats:
        with progress(f"exporting {fmt} to {out_dir}"):
            if fmt == "saved_model":
                written[fmt] = str(_write_saved_model(model, class_names, image_size, out_dir, transform))
            elif fmt == "onnx":
                data = onnx_bytes(model, image_size, check_images)
                atomic_write_bytes(out_dir / "model.onnx", data)
                written[fmt] = str(out_dir / "model.onnx")
            else:
                written[fmt] = str(_write_keras(model, out_dir))
    return written


def missing_formats(out_dir, formats) -> list[str]:
    """The ``formats`` whose export is not in ``out_dir`` (a finished run resumed writes only these)."""
    out_dir = Path(out_dir)
    there = {"saved_model": (out_dir / "saved_model").is_dir() and any((out_dir / "saved_model").iterdir()),
             "onnx": (out_dir / "model.onnx").is_file(), "keras": (out_dir / "model.keras").is_file()}
    return [f for f in dict.fromkeys(formats) if not there.get(f)]


def without_lora(model):
    """The served model has no adapters: LoRA kernels merged into plain ones (kfine.lora)."""
    from kfine.lora import merge_lora
    return merge_lora(model)


def _export_in_tensorflow(model, class_names, image_size, out_dir: Path, formats, check_images, transform=None):
    """export_model in a subprocess on the TensorFlow backend (see the module docstring)."""
    import json
    import subprocess
    with tempfile.TemporaryDirectory(prefix="kfine-export-") as tmp:
        tmp = Path(tmp)
        model.save(tmp / "model.keras")
        spec = {"model": str(tmp / "model.keras"), "class_names": class_names,
                "image_size": [int(v) for v in image_size], "out_dir": str(out_dir), "formats": list(formats),
                "transform": transform}
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
    written = export_model(model, spec["class_names"], spec["image_size"], spec["out_dir"],
                           spec["formats"], check, spec.get("transform"))
    Path(spec_path).with_name("written.json").write_text(json.dumps(written))


def export_run(run_dir, formats=None, out_dir=None) -> dict[str, str]:
    """Export ``run_dir/model.keras``; formats default to the run's ``export.formats``,
    ``out_dir`` to ``run_dir/export``."""
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
    return export_model(model, read_json(names_path), image_size,
                        out_dir if out_dir is not None else run_dir / "export",
                        formats if formats else cfg.export.formats, transform=transform_of(cfg.data))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfine.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory (holds model.keras)")
    parser.add_argument("--format", action="append", choices=FORMATS, dest="formats",
                        help="repeatable; default: the run's export.formats")
    parser.add_argument("--out", help="output directory (default RUN/export)")
    args = parser.parse_args(argv)
    from kfine import cli

    def work():
        for fmt, path in export_run(args.run, args.formats, args.out).items():
            print(f"{fmt}: {path}")
    return cli.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
