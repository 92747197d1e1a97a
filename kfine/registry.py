"""Backbones by name: what kfine knows about each one without building it.

``BACKBONES[name]`` holds the keras.applications constructor, the preprocessing mode of its
``preprocess_input`` (kfine.model.Preprocess: caffe | torch | tf | none, unit for the CNN from
scratch), the smallest input side keras accepts, whether it has BatchNorm layers, how layer names
map to stages (``stage_of``) and the backbone's stages in order (``stages``, a static tuple that
tests/test_registry.py checks against the built models). checks.py checks stage names against
these tuples, so checking a config builds no model. No Keras import here.

Stages by layer name. A stage function returns the stage a layer's name says, or None where the
name says nothing (the input, keras' auto-named layers such as ``conv2d_12`` or ``activation_3``,
the pooling). ``unnamed`` says where such a layer goes: "previous" = the stage of the layer before
it in the model's topological order (leading ones: the first stage); "next" = the stage of the
next layer that names one (InceptionV3 / InceptionResNetV2, whose branch convolutions are
auto-named and whose blocks end in a named concatenation), trailing ones the last stage.

    family             stages (in order)
    resnet, resnetv2   conv1 (stem) .. conv5                    (PyTorch's stem, layer1..layer4)
    densenet           conv1 .. conv5 (a transition poolN_* is in convN)
    vgg                block1 .. block5                          (no BatchNorm)
    xception           block1 .. block14
    inception_v3       mixed0 (stem + first block) .. mixed10
    inception_resnet   stem, block35, mixed_6a, block17, mixed_7a, block8, conv_7b
    mobilenet          stem, block1 .. block13
    mobilenetv2        stem, block0 .. block16, top
    mobilenet_v3       stem, block0 .. block10 (small) / block14 (large), top
    efficientnet(v2)   stem, block1 .. block7 (v2 b0-b3, s: block1 .. block6), top
    nasnet             stem, stage1, stage2, stage3 (normal cells between the reductions)
    convnext           stem, stage0 .. stage3                    (LayerNorm, no BatchNorm)
    scratch_cnn        block1 .. blockN (N = len(model.scratch.filters))
    toy_resnet         conv1 .. conv5 (ResNet50's names, one small block per stage, no weights)
"""
from __future__ import annotations

import re


# ----------------------------------------------------------------------------- stage functions
def _resnet_stage(name: str) -> str | None:
    m = re.match(r"(conv[1-5]|pool1)_", name)
    return ("conv1" if m.group(1) == "pool1" else m.group(1)) if m else None


def _densenet_stage(name: str) -> str | None:
    m = re.match(r"(conv|pool)([1-5])(_|$)", name)     # poolN_*: the transition after dense block N
    return f"conv{m.group(2)}" if m else None


def _efficientnet_stage(name: str) -> str | None:
    m = re.match(r"block(\d)", name)
    if m:
        return f"block{m.group(1)}"
    if name.startswith("top"):
        return "top"
    return "stem" if name.startswith("stem") else None


def _mobilenet_stage(name: str) -> str | None:
    m = re.match(r"conv_(?:dw|pw|pad)_(\d+)(_|$)", name)
    if m:
        return f"block{int(m.group(1))}"
    return "stem" if re.match(r"conv1(_|$)", name) else None


def _mobilenetv2_stage(name: str) -> str | None:
    m = re.match(r"block_(\d+)_", name)
    if m:
        return f"block{int(m.group(1))}"
    if name.startswith("expanded_conv"):
        return "block0"
    if name.startswith(("Conv_1", "out_relu")):
        return "top"
    return "stem" if name.startswith(("Conv1", "bn_Conv1")) else None


def _mobilenetv3_stage(name: str) -> str | None:
    m = re.match(r"expanded_conv(?:_(\d+))?_", name)
    if m:
        return f"block{int(m.group(1) or 0)}"
    if re.match(r"conv_1(_bn)?$", name):
        return "top"
    return "stem" if re.match(r"conv(_bn)?$", name) else None


def _vgg_stage(name: str) -> str | None:
    m = re.match(r"block(\d)_", name)
    return f"block{m.group(1)}" if m else None


def _xception_stage(name: str) -> str | None:
    m = re.match(r"block(\d+)_", name)
    return f"block{int(m.group(1))}" if m else None


def _inception_v3_stage(name: str) -> str | None:
    m = re.match(r"mixed(\d+)$", name)      # the concatenation that ends block N (not mixed9_0 ...)
    return f"mixed{m.group(1)}" if m else None


def _inception_resnet_v2_stage(name: str) -> str | None:
    m = re.match(r"(block35|block17|block8)_\d+(_|$)", name)
    if m:
        return m.group(1)
    if name in ("mixed_6a", "mixed_7a"):
        return name
    if name == "mixed_5b":
        return "stem"
    return "conv_7b" if name.startswith("conv_7b") else None


def _nasnet_stage(num_blocks: int):
    """NASNet cells by block id: stem_1/stem_2 reductions, normal cells 0..N-1, reduce_N, normal
    cells N+1..2N, reduce_2N, normal cells 2N+1..3N. Only weight-carrying layer names are matched:
    the cells overlap in topological order, their adds and activations do not."""
    weighted = re.compile(r"(?:(?:reduction|normal)_(?:conv|bn)_1|separable_conv_[12]_(?:bn_)?(?:normal|reduction)_"
                          r"(?:left|right)\d|adjust_(?:conv_[12]|conv_projection|bn))_(stem_[12]|reduce_\d+|\d+)$")

    def stage(name: str) -> str | None:
        if re.match(r"stem_(conv|bn)1$", name):
            return "stem"
        m = weighted.match(name)
        if not m:
            return None
        block = m.group(1)
        if block.startswith("stem"):
            return "stem"
        if block.startswith("reduce_"):
            return f"stage{1 + int(block[7:]) // num_blocks}"
        return f"stage{1 + max(int(block) - 1, 0) // num_blocks}"
    return stage


def _convnext_stage(name: str) -> str | None:
    m = re.match(r"convnext_[a-z]+_(stem$|stage_(\d)_|downsampling_block_(\d)$)", name)
    if not m:
        return None
    if m.group(2) is not None:
        return f"stage{m.group(2)}"
    return f"stage{int(m.group(3)) + 1}" if m.group(3) is not None else "stem"


def _scratch_stage(name: str) -> str | None:
    m = re.match(r"(block\d+)_", name)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- the table
_CONV = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _blocks(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"block{i}" for i in range(first, last + 1))


def _application(app: str, preprocess: str, stage_of, stages, min_size: int = 32, norm: str = "batchnorm",
                 unnamed: str = "previous") -> dict:
    """A BACKBONES entry for ``keras.applications.<app>``; ``norm``: batchnorm | layernorm | none."""
    return {"app": app, "preprocess": preprocess, "min_size": min_size, "stage_of": stage_of,
            "stages": tuple(stages), "norm": norm, "has_batchnorm": norm == "batchnorm", "unnamed": unnamed}


_EFFNET = ("stem", *_blocks(1, 7), "top")
_EFFNETV2_SMALL = ("stem", *_blocks(1, 6), "top")
_CONVNEXT = ("stem", "stage0", "stage1", "stage2", "stage3")
_NASNET = ("stem", "stage1", "stage2", "stage3")

# name (the YAML value of model.backbone) -> what kfine needs to know about the backbone
BACKBONES = {
    "convnext_tiny": _application("ConvNeXtTiny", "none", _convnext_stage, _CONVNEXT, norm="layernorm"),
    "convnext_small": _application("ConvNeXtSmall", "none", _convnext_stage, _CONVNEXT, norm="layernorm"),
    "convnext_base": _application("ConvNeXtBase", "none", _convnext_stage, _CONVNEXT, norm="layernorm"),
    "convnext_large": _application("ConvNeXtLarge", "none", _convnext_stage, _CONVNEXT, norm="layernorm"),
    "convnext_xlarge": _application("ConvNeXtXLarge", "none", _convnext_stage, _CONVNEXT, norm="layernorm"),
    "densenet121": _application("DenseNet121", "torch", _densenet_stage, _CONV),
    "densenet169": _application("DenseNet169", "torch", _densenet_stage, _CONV),
    "densenet201": _application("DenseNet201", "torch", _densenet_stage, _CONV),
    **{f"efficientnetb{i}": _application(f"EfficientNetB{i}", "none", _efficientnet_stage, _EFFNET) for i in range(8)},
    **{f"efficientnetv2_b{i}": _application(f"EfficientNetV2B{i}", "none", _efficientnet_stage, _EFFNETV2_SMALL)
       for i in range(4)},
    "efficientnetv2_s": _application("EfficientNetV2S", "none", _efficientnet_stage, _EFFNETV2_SMALL),
    "efficientnetv2_m": _application("EfficientNetV2M", "none", _efficientnet_stage, _EFFNET),
    "efficientnetv2_l": _application("EfficientNetV2L", "none", _efficientnet_stage, _EFFNET),
    "inception_resnet_v2": _application("InceptionResNetV2", "tf", _inception_resnet_v2_stage,
                                        ("stem", "block35", "mixed_6a", "block17", "mixed_7a", "block8", "conv_7b"),
                                        min_size=75, unnamed="next"),
    "inception_v3": _application("InceptionV3", "tf", _inception_v3_stage, tuple(f"mixed{i}" for i in range(11)),
                                 min_size=75, unnamed="next"),
    "mobilenet": _application("MobileNet", "tf", _mobilenet_stage, ("stem", *_blocks(1, 13))),
    "mobilenetv2": _application("MobileNetV2", "tf", _mobilenetv2_stage, ("stem", *_blocks(0, 16), "top")),
    "mobilenet_v3_small": _application("MobileNetV3Small", "none", _mobilenetv3_stage, ("stem", *_blocks(0, 10), "top")),
    "mobilenet_v3_large": _application("MobileNetV3Large", "none", _mobilenetv3_stage, ("stem", *_blocks(0, 14), "top")),
    "nasnet_mobile": _application("NASNetMobile", "tf", _nasnet_stage(4), _NASNET),
    "nasnet_large": _application("NASNetLarge", "tf", _nasnet_stage(6), _NASNET),
    "resnet50": _application("ResNet50", "caffe", _resnet_stage, _CONV),
    "resnet101": _application("ResNet101", "caffe", _resnet_stage, _CONV),
    "resnet152": _application("ResNet152", "caffe", _resnet_stage, _CONV),
    "resnet50v2": _application("ResNet50V2", "tf", _resnet_stage, _CONV),
    "resnet101v2": _application("ResNet101V2", "tf", _resnet_stage, _CONV),
    "resnet152v2": _application("ResNet152V2", "tf", _resnet_stage, _CONV),
    "vgg16": _application("VGG16", "caffe", _vgg_stage, _blocks(1, 5), norm="none"),
    "vgg19": _application("VGG19", "caffe", _vgg_stage, _blocks(1, 5), norm="none"),
    "xception": _application("Xception", "tf", _xception_stage, _blocks(1, 14), min_size=71),
    # the 5-block CNN trained from scratch: stages block1..blockN follow model.scratch.filters,
    # BatchNorm follows model.scratch.batchnorm (see stage_names / has_batchnorm)
    "scratch_cnn": {"app": None, "preprocess": "unit", "min_size": 1, "stage_of": _scratch_stage, "stages": None,
                    "norm": "batchnorm", "has_batchnorm": None, "unnamed": "previous"},
    # a ResNet-shaped network of under 100,000 parameters (kfine.model.build_toy_resnet): ResNet50's
    # stages and layer names, for trying a config's freezing and learning rates in seconds, and tests
    "toy_resnet": _application(None, "caffe", _resnet_stage, _CONV),
}

# PyTorch's ResNet names for the same stages (the reference projects use them).
STAGE_ALIASES = {"layer1": "conv2", "layer2": "conv3", "layer3": "conv4", "layer4": "conv5",
                 "stem": "conv1", "fc": "head"}


def min_input_size(backbone_name: str) -> int:
    """The smallest image side the backbone accepts (keras.applications refuses smaller inputs)."""
    return BACKBONES[backbone_name]["min_size"]


def stage_of(backbone_name: str, layer_name: str) -> str | None:
    """The stage a layer's name says, or None (kfine.model.layer_stages gives every layer's stage)."""
    return BACKBONES[backbone_name]["stage_of"](layer_name)


def stage_names(backbone_name: str, scratch_blocks: int = 5) -> tuple[str, ...]:
    """The backbone's stages in order; for scratch_cnn block1..block<scratch_blocks>
    (``len(model.scratch.filters)``)."""
    stages = BACKBONES[backbone_name]["stages"]
    return stages if stages is not None else tuple(f"block{i}" for i in range(1, scratch_blocks + 1))


def has_batchnorm(backbone_name: str, scratch_batchnorm: bool = False) -> bool:
    """Whether the backbone has BatchNorm layers (scratch_cnn: ``model.scratch.batchnorm``)."""
    bn = BACKBONES[backbone_name]["has_batchnorm"]
    return scratch_batchnorm if bn is None else bn


def resolve_stage(name: str, stages) -> str | None:
    """``name`` or the stage its alias stands for, when it is one of ``stages``; else None."""
    if name in stages:
        return name
    return STAGE_ALIASES[name] if STAGE_ALIASES.get(name) in stages else None


def stage_aliases(stages) -> list[str]:
    """The aliases that name one of ``stages`` (``fc`` = head is not a stage)."""
    return sorted(k for k, v in STAGE_ALIASES.items() if v in stages and k != "fc")


def needs_batchnorm(strategy: str, train_bn: bool = False, bn: str = "train") -> str | None:
    """What in a phase only means something with BatchNorm layers (as "KEY: VALUE", the key
    relative to the phase), or None: strategy bn_and_head, train_bn with fraction / regex / lora,
    a bn mode other than train (kfine.freeze.BN_MODES)."""
    if strategy == "bn_and_head":
        return "freeze.strategy: bn_and_head"
    if train_bn and strategy in ("fraction", "regex", "lora"):
        return "freeze.train_bn: true"
    return f"bn: {bn}" if bn != "train" else None


def norm_note(backbone_name: str) -> str:
    """' (LayerNorm)' where the backbone normalises otherwise, for messages."""
    return {"layernorm": " (LayerNorm)"}.get(BACKBONES[backbone_name]["norm"], "")


_PREPROCESS_WORDS = {"caffe": "caffe (RGB->BGR minus the ImageNet mean)", "torch": "torch (/255, ImageNet mean/std)",
                     "tf": "tf (scaled to -1..1)", "unit": "unit (/255)", "none": "none (the backbone normalises itself)"}


def describe_backbone(backbone_name: str, scratch_blocks: int = 5, scratch_batchnorm: bool = False) -> str:
    """Two lines on a backbone for ``python -m kfine.model layers``: constructor, preprocessing,
    minimum size, normalisation; its stages in order and their aliases."""
    e = BACKBONES[backbone_name]
    stages = stage_names(backbone_name, scratch_blocks)
    what = (f"keras.applications.{e['app']}" if e["app"] else "the CNN from scratch" if backbone_name == "scratch_cnn"
            else "a small ResNet-shaped network without pretrained weights")
    norm = ("BatchNorm" if has_batchnorm(backbone_name, scratch_batchnorm) else
            "no BatchNorm" + norm_note(backbone_name) + ": bn_and_head, train_bn and bn: stats | frozen do not apply")
    aliases = stage_aliases(stages)
    return (f"{what}; preprocessing {_PREPROCESS_WORDS[e['preprocess']]}; minimum input {e['min_size']} px; {norm}\n"
            f"stages: {', '.join(stages)}" + (f" (aliases: {', '.join(aliases)})" if aliases else ""))
