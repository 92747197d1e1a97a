"""Models: a keras.applications backbone (or the 5-block CNN) + the backbone's own preprocessing
+ a configurable head, as one functional ``keras.Model`` that takes raw RGB in 0..255.

    image (H, W, 3) float 0..255
      -> preprocess (layer "preprocess": the backbone's own normalisation, in float32)
      -> backbone   (nested model "backbone": pooled features)
      -> head       (layers "head_*": Dropout / Dense / activation blocks)
      -> logits     (float32, even under mixed precision): the model's output

The model ends in logits and the training loss takes logits (``from_logits=True``: the softmax
and the log are computed together, which is stable in float16). Probabilities are made at the
edge, by ``probabilities`` / ``as_probabilities``: evaluate, predict, export, explain and the report
call them, and they also read a model saved by an older kfine, whose last layer is the float32
softmax "probs", without applying the softmax twice.

Model code uses keras.ops only, so it runs on the TensorFlow and the JAX backend.

``python -m kfine.model layers`` (the stages, layers and parameters of a model, and what a freeze
spec trains) is kfine.layers, which sits above this module and kfine.freeze.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from kfine import lora as _lora  # noqa: F401  (registers kfine>LoRAConv2D / LoRADense: model.keras of a LoRA run)
from kfine.registry import BACKBONES, STAGE_ALIASES, describe_backbone, min_input_size, stage_of  # noqa: F401
from kfine.schema import HeadConfig, ModelConfig, ScratchConfig


class ModelError(ValueError):
    """A model setting that cannot work; the message names it and the fix."""


# ----------------------------------------------------------------------------- preprocessing
_CAFFE_MEAN = (103.939, 116.779, 123.68)  # BGR means of keras.applications' "caffe" mode
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="kfine")
class Preprocess(layers.Layer):
    """The backbone's ``preprocess_input`` as a layer, so the saved model takes raw 0..255 RGB.

    modes (as in keras.applications.imagenet_utils): caffe = RGB->BGR minus the ImageNet mean
    (ResNet, VGG); torch = /255 then ImageNet mean/std (DenseNet); tf = scale to -1..1
    (MobileNet, MobileNetV2, ResNetV2, Xception, Inception, NASNet); unit = /255 (the CNN from
    scratch); none = identity (EfficientNet(V2), MobileNetV3 and ConvNeXt normalise inside the
    backbone). Each backbone's mode is in kfine.registry.BACKBONES.
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        kwargs.setdefault("dtype", "float32")   # normalisation in float32 under mixed precision
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch", "tf", "unit", "none"):
            raise ModelError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.mode == "caffe":
            # RGB -> BGR as a gather, not ops.flip: LiteRT's int8 converter gives flip's ReverseV2
            # an output scale of its own that the kernel (a plain copy) ignores, so every pixel
            # reached the backbone shifted (a ResNet50 lost 31 points); a gather keeps the scale.
            return ops.take(x, [2, 1, 0], axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN, "float32")
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, "float32")
            std = ops.convert_to_tensor(_TORCH_STD, "float32")
            return (x / 255.0 - mean) / std
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# ----------------------------------------------------------------------------- backbones
# The table of backbones (constructor, preprocessing, minimum size, stages) is kfine.registry's;
# BACKBONES, STAGE_ALIASES, min_input_size and stage_of stay importable from here.
def layer_stages(backbone: keras.Model, backbone_name: str) -> dict[str, str]:
    """Layer name -> stage for every layer of ``backbone``. A layer whose name names no stage
    belongs to the stage of the layer before it (in the model's topological order), leading ones
    to the first named stage; for a backbone whose registry entry says ``unnamed: next``
    (InceptionV3, InceptionResNetV2: auto-named branches, each block ending in a named layer) to
    the stage of the next layer that names one. So ResNet50V2's post_bn (after conv5) is in conv5,
    the input in conv1."""
    named = [(layer.name, stage_of(backbone_name, layer.name)) for layer in backbone.layers]
    backwards = BACKBONES[backbone_name]["unnamed"] == "next"
    if backwards:
        named.reverse()
    current = next((s for _, s in named if s is not None), "backbone")
    stages = {}
    for name, stage in named:
        current = stage or current
        stages[name] = current
    return dict(reversed(stages.items())) if backwards else stages


def build_scratch_cnn(cfg: ScratchConfig, input_shape) -> keras.Model:
    """The iNaturalist project's CNN: 5 x (conv -> [BN] -> activation -> maxpool), flattened."""
    inputs = keras.Input(input_shape)
    x = inputs
    if len(cfg.filters) < 1:
        raise ModelError("model.scratch.filters: give at least one filter count, e.g. [32, 64, 128, 128, 256]")
    for i, f in enumerate(cfg.filters, start=1):
        x = layers.Conv2D(f, cfg.kernel_size, padding="same", name=f"block{i}_conv")(x)
        if cfg.batchnorm:
            x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.Activation(cfg.activation, name=f"block{i}_act")(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, x, name="backbone")


def build_toy_resnet(weights=None, include_top=False, input_shape=(32, 32, 3), pooling="avg",
                     filters=(8, 8, 16, 32, 64)) -> keras.Model:
    """A ResNet-shaped backbone that trains in milliseconds (backbone: toy_resnet), for trying a
    config's freezing, learning rates and LoRA quickly, and for kfine's own tests: ResNet50's layer
    names and stages (a conv1 stem with BatchNorm and max pooling, then one residual block per stage
    conv2..conv5, strides as ResNet's), under 100,000 parameters, no pretrained weights. Called like
    a keras.applications constructor."""
    if weights is not None or include_top:
        raise ValueError("toy_resnet has no pretrained weights and no top")
    inputs = keras.Input(input_shape)
    x = layers.ZeroPadding2D(1, name="conv1_pad")(inputs)
    x = layers.Conv2D(filters[0], 3, strides=2, name="conv1_conv")(x)
    x = layers.BatchNormalization(name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, f in enumerate(filters[1:], start=2):
        name, stride = f"conv{stage}_block1", 1 if stage == 2 else 2
        shortcut = layers.Conv2D(f, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(name=f"{name}_0_bn")(shortcut)
        x = layers.Conv2D(f, 3, strides=stride, padding="same", name=f"{name}_1_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_1_bn")(x)
        x = layers.Activation("relu", name=f"{name}_1_relu")(x)
        x = layers.Conv2D(f, 3, padding="same", name=f"{name}_2_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_2_bn")(x)
        x = layers.Add(name=f"{name}_add")([shortcut, x])
        x = layers.Activation("relu", name=f"{name}_out")(x)
    if pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.Model(inputs, x, name="toy_resnet")


def _mark(backbone: keras.Model, used: str, note: str = "") -> keras.Model:
    """Record on the backbone which weights it really starts from (see ``weights_info``)."""
    backbone.weights_used, backbone.weights_note = used, note
    return backbone


def weights_info(model: keras.Model) -> dict:
    """{"used": "imagenet" | "random" | a weights file, "note": why} for a model built by
    build_model: what the run's report states (a failed download falls back to random)."""
    backbone = get_backbone(model)
    return {"used": getattr(backbone, "weights_used", "unknown"), "note": getattr(backbone, "weights_note", "")}


# keras.applications name -> why its ImageNet weights could not be had: one try per process
# (a comparison or a search builds the backbone many times; offline, each try fails the same way)
_FAILED_DOWNLOADS: dict[str, str] = {}


def _first_line(e: Exception) -> str:
    """The error's first line, whole."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] if lines else type(e).__name__


def _quiet_download(build):
    """``build()`` with Keras' own "Downloading data from ..." line and download bar held back:
    shown (the download line) only when the weights did load, so a failed try prints nothing of
    Keras' and kfine's one line says what happened."""
    import contextlib
    import io
    import sys
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model = build()
    said = [l for l in out.getvalue().splitlines() if l.startswith("Downloading data from")]
    if said:
        print("\n".join(said), file=sys.stdout, flush=True)
    return model


def _build_application(cfg: ModelConfig, input_shape, pooling: str) -> keras.Model:
    entry = BACKBONES[cfg.backbone]
    ctor = getattr(keras.applications, entry["app"]) if entry["app"] else build_toy_resnet
    kwargs = dict(include_top=False, input_shape=input_shape, pooling=pooling)
    weights = cfg.weights
    if weights in (None, "none", "null", "random"):
        return _mark(ctor(weights=None, **kwargs), "random", "model.weights is null" if weights is None else f"model.weights: {weights}")
    if weights == "imagenet" and not entry["app"]:
        if cfg.weights_fallback != "random":
            raise ModelError(f"model.weights: {cfg.backbone} has no ImageNet weights; set model.weights: null "
                             f"(or a local .weights.h5 saved from it)")
        print(f"kfine: {cfg.backbone} has no ImageNet weights; starting from random initialisation "
              f"(weights_fallback: random)", flush=True)
        return _mark(ctor(weights=None, **kwargs), "random", f"{cfg.backbone} has no ImageNet weights")
    if weights == "imagenet":
        why = _FAILED_DOWNLOADS.get(entry["app"])
        if why is None:
            try:
                if os.environ.get("KFINE_OFFLINE"):   # air-gapped machines: do not even try
                    raise RuntimeError("KFINE_OFFLINE is set")
                return _mark(_quiet_download(lambda: ctor(weights="imagenet", **kwargs)), "imagenet")
            except Exception as e:  # offline, proxy, corrupt cache: keras raises plain Exception
                why = _FAILED_DOWNLOADS[entry["app"]] = _first_line(e)
        else:
            why += " (tried once in this process)"
        where = f"~/.keras/models/ (the file keras.applications.{entry['app']} downloads)"
        if cfg.weights_fallback == "random":
            print(f"kfine: ImageNet weights for {cfg.backbone} could not be downloaded ({why}); continuing "
                  f"from random initialisation (weights_fallback: random)", flush=True)
            return _mark(ctor(weights=None, **kwargs), "random",
                         f"ImageNet weights could not be loaded ({why}); weights_fallback: random")
        raise ModelError(
            f"could not download ImageNet weights for {cfg.backbone}: {why}. "
            f"Put the weights file in {where}, or set model.weights to a local "
            f".weights.h5 / .h5 file, or set model.weights_fallback: random "
            f"(see docs/troubleshooting.md#no-weights-offline)")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"model.weights: {path} does not exist. Give a local weights file "
                         f"(.weights.h5 saved from this backbone, or the keras.applications "
                         f"'notop' .h5), 'imagenet' or null (see docs/troubleshooting.md#no-weights-offline)")
    model = ctor(weights=None, **kwargs)
    try:
        with warnings.catch_warnings():   # Keras only warns when it skips layers: a partial load is an error
            warnings.simplefilter("error", UserWarning)
            model.load_weights(str(path))
    except Exception as e:
        raise ModelError(f"model.weights: {path} does not fit backbone {cfg.backbone} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return _mark(model, str(path))


def build_backbone(cfg: ModelConfig, input_shape) -> keras.Model:
    if cfg.backbone not in BACKBONES:
        raise ModelError(f"unknown backbone {cfg.backbone!r}; choose one of {sorted(BACKBONES)}")
    if cfg.backbone == "scratch_cnn":
        return _mark(build_scratch_cnn(cfg.scratch, input_shape), "random", "scratch_cnn trains from scratch")
    backbone = _build_application(cfg, input_shape, cfg.head.pooling)
    backbone.name = "backbone"
    return backbone


# ----------------------------------------------------------------------------- heads
def _linear_head(x, cfg: HeadConfig, num_classes: int):
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name="head_dropout")(x)
    return layers.Dense(num_classes, name="head_logits")(x)


def _mlp_head(x, cfg: HeadConfig, num_classes: int):
    for i, units in enumerate(cfg.units):
        x = layers.Dense(units, name=f"head_dense{i}")(x)
        x = layers.Activation(cfg.activation, name=f"head_act{i}")(x)
        if cfg.dropout > 0:
            x = layers.Dropout(cfg.dropout, name=f"head_dropout{i}")(x)
    return layers.Dense(num_classes, name="head_logits")(x)


HEADS = {"linear": _linear_head, "mlp": _mlp_head}


def build_model(cfg: ModelConfig, num_classes: int, image_size=(224, 224)) -> keras.Model:
    """The full classifier: raw 0..255 RGB in, class logits (float32) out; ``probabilities``
    turns them into class probabilities."""
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes, got {num_classes}")
    if cfg.head.type not in HEADS:
        raise ModelError(f"unknown head {cfg.head.type!r}; choose one of {sorted(HEADS)}")
    input_shape = (int(image_size[0]), int(image_size[1]), 3)
    backbone = build_backbone(cfg, input_shape)
    inputs = keras.Input(input_shape, name="image")
    x = Preprocess(BACKBONES[cfg.backbone]["preprocess"], name="preprocess")(inputs)
    x = backbone(x)
    if cfg.backbone == "scratch_cnn":   # the reference CNN: dense -> dropout -> classes
        s = cfg.scratch
        head_cfg = HeadConfig(type="mlp", units=(s.dense_units,), activation=s.activation, dropout=s.dropout)
    else:
        head_cfg = cfg.head
    logits = HEADS[head_cfg.type](x, head_cfg, num_classes)
    logits = layers.Activation("linear", dtype="float32", name="logits")(logits)   # float32 under mixed precision
    return keras.Model(inputs, logits, name=f"kfine_{cfg.backbone}")


def outputs_logits(model) -> bool:
    """Whether ``model`` ends in logits (kfine's models) rather than a softmax (a model saved by
    an older kfine ends in the float32 softmax layer "probs"; any model whose last layer has a
    softmax activation counts as one that outputs probabilities)."""
    last = model.layers[-1]
    return last.name != "probs" and getattr(last, "activation", None) is not keras.activations.softmax


def as_probabilities(model, outputs):
    """``model``'s outputs (logits or, for an older model, probabilities) as float32 probabilities:
    numpy in, numpy out; a tensor in, a tensor out."""
    if isinstance(outputs, np.ndarray):
        outputs = outputs.astype(np.float32)
        if not outputs_logits(model):
            return outputs
        e = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    outputs = ops.cast(outputs, "float32")
    return ops.softmax(outputs, axis=-1) if outputs_logits(model) else outputs


def probabilities(model, x):
    """Class probabilities (float32) of images ``x`` under ``model`` (inference mode)."""
    return as_probabilities(model, model(x, training=False))


def get_backbone(model: keras.Model) -> keras.Model:
    return model.get_layer("backbone")


def head_layers(model: keras.Model) -> list:
    """Every layer that is not the backbone or the preprocessing: the new, task-specific part."""
    return [l for l in model.layers if l.name.startswith("head_")]


# ----------------------------------------------------------------------------- sizes
def param_count(w) -> int:
    """The number of values in a weight (the product of its shape)."""
    n = 1
    for d in w.shape:
        n *= int(d)
    return n


if __name__ == "__main__":   # python -m kfine.model layers: the CLI is kfine.layers
    import runpy
    runpy.run_module("kfine.layers", run_name="__main__", alter_sys=True)
