"""Freezing strategies, checked after a real train step on toy_resnet (ResNet50's layer names and
stages in small: the same stage table and code paths), on MobileNetV3, InceptionV3 and ConvNeXt at
their smallest input; ResNet50's own stage table by layer name."""
import numpy as np
import pytest

import keras

import typing

from kfine.config import FreezeConfig, ModelConfig, PhaseConfig
from kfine.freeze import (BN_MODES, STRATEGIES, FreezeError, apply_freeze, features_frozen,
                          trainable_summary)
from kfine.model import build_model, get_backbone, stage_of


_INITIAL = {}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = build_model(ModelConfig(backbone="toy_resnet", weights=None), 3, (32, 32))
    _INITIAL["weights"] = [np.array(w.numpy()) for w in m.weights]
    return m


@pytest.fixture
def pristine(model):
    """The fixture model's initial weights (other tests train it, with SGD 0.1 up to NaN)."""
    return _INITIAL["weights"]


SPECS = {
    "none": FreezeConfig("none"),
    "backbone": FreezeConfig("backbone"),
    "fraction": FreezeConfig("fraction", fraction=0.8),
    "bn_and_head": FreezeConfig("bn_and_head"),
    "stages": FreezeConfig("stages", trainable_from="layer4"),   # PyTorch alias of conv5
    "regex": FreezeConfig("regex", pattern=r"^conv5_block1_[12]_"),   # not the shortcut (_0_)
}


def expected_trainable(model, name, layer_index, layer):
    """Which backbone layers each strategy should train (written independently of freeze.py)."""
    is_bn = isinstance(layer, keras.layers.BatchNormalization)
    return {
        "none": True,
        "backbone": False,
        "fraction": layer_index >= round(0.8 * 26),                     # 21 of 26 frozen
        "bn_and_head": is_bn,
        "stages": layer.name.startswith("conv5_"),
        "regex": layer.name.startswith(("conv5_block1_1_", "conv5_block1_2_")),
    }[name]


def test_every_strategy_is_covered():
    # lora adds variables to the model it is applied to: tested on its own model in test_lora.py
    assert sorted([*SPECS, "lora"]) == sorted(STRATEGIES)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_train_step_changes_exactly_the_trainable_weights(model, name):
    apply_freeze(model, "toy_resnet", SPECS[name])
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weight_layers = [l for l in get_backbone(model).layers if l.weights]
    assert len(weight_layers) == 26            # 13 conv + 13 BN (conv1, 4 stages x 3): what "fraction" counts
    before = {id(w): np.array(w.numpy()) for w in model.weights}
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.train_on_batch(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    for i, layer in enumerate(weight_layers):
        train = expected_trainable(model, name, i, layer)
        kernel = layer.weights[0]               # conv kernel / BN gamma
        changed = not np.array_equal(before[id(kernel)], kernel.numpy())
        assert changed == train, f"{name}: {layer.name} changed={changed}, expected {train}"
        if isinstance(layer, keras.layers.BatchNormalization):
            mean = layer.moving_mean
            moved = not np.array_equal(before[id(mean)], mean.numpy())
            assert moved == train, f"{name}: BN {layer.name} statistics moved={moved}, expected {train}"
    head = model.get_layer("head_logits").kernel
    assert not np.array_equal(before[id(head)], head.numpy()), "the head always trains"


def test_trainable_summary_per_stage(model):
    apply_freeze(model, "toy_resnet", FreezeConfig("stages", trainable_from="conv4"))
    rows = {r["stage"]: r for r in trainable_summary(model, "toy_resnet")}
    assert [s for s in rows] == ["conv1", "conv2", "conv3", "conv4", "conv5", "head"]
    for s in ("conv1", "conv2", "conv3"):
        assert rows[s]["trainable"] == 0 and rows[s]["frozen"] > 0
    for s in ("conv4", "conv5", "head"):
        assert rows[s]["frozen"] == 0 and rows[s]["trainable"] > 0
    assert rows["head"]["trainable"] == 64 * 3 + 3                  # toy_resnet: 64 features
    total = sum(r["trainable"] + r["frozen"] for r in rows.values())
    moving = sum(int(np.prod(w.shape)) for w in model.weights if w.name.startswith("moving_"))
    assert total == model.count_params() - moving
    apply_freeze(model, "toy_resnet", FreezeConfig("bn_and_head"))
    rows = {r["stage"]: r for r in trainable_summary(model, "toy_resnet")}
    assert rows["conv1"]["bn_training"] == 1 and rows["conv2"]["bn_training"] == 3    # _0_bn, _1_bn, _2_bn


# ----------------------------------------------------------------------------- BatchNorm modes
def _one_step(model, pristine):
    """One real train step from the initial weights; returns ``moved(variable)``."""
    model.set_weights(pristine)
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = {id(w): np.array(w.numpy()) for w in model.weights}
    x = np.random.default_rng(2).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.train_on_batch(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    return lambda w: not np.array_equal(before[id(w)], w.numpy())


# what moves after one step, with conv1..conv4 frozen and conv5 trained (stages from conv5):
# (frozen BN statistics, frozen gamma/beta, trained BN statistics, trained gamma/beta)
BN_EXPECTED = {
    "train": (False, False, True, True),     # Keras: a frozen BN layer runs in inference mode
    "stats": (True, False, True, True),      # PyTorch model.train(): statistics move everywhere
    "frozen": (False, False, False, True),   # every BN in inference mode; gamma/beta still train
}


def test_bn_modes_are_the_config_menu():
    hints = typing.get_type_hints(PhaseConfig)
    assert sorted(typing.get_args(hints["bn"])) == sorted(BN_MODES) == sorted(BN_EXPECTED)
    assert PhaseConfig().bn == "train"


@pytest.mark.parametrize("mode", sorted(BN_EXPECTED))
def test_bn_mode_after_a_real_train_step(model, pristine, mode):
    apply_freeze(model, "toy_resnet", FreezeConfig("stages", trainable_from="conv5"), mode)
    moved = _one_step(model, pristine)
    bb = get_backbone(model)
    frozen_bn, trained_bn = bb.get_layer("conv4_block1_2_bn"), bb.get_layer("conv5_block1_2_bn")
    assert any(w is frozen_bn.moving_mean for w in model.weights)       # state the resume backup saves
    got = (moved(frozen_bn.moving_mean) and moved(frozen_bn.moving_variance),
           moved(frozen_bn.gamma) or moved(frozen_bn.beta),
           moved(trained_bn.moving_mean) and moved(trained_bn.moving_variance),
           moved(trained_bn.gamma) and moved(trained_bn.beta))
    assert got == BN_EXPECTED[mode]
    for layer in ("conv1_conv", "conv4_block1_2_conv"):                  # frozen kernels: bit-identical
        assert not moved(bb.get_layer(layer).kernel)
    assert moved(bb.get_layer("conv5_block1_2_conv").kernel)
    # every frozen BN layer agrees (not just the one looked at)
    frozen_layers = [l for l in bb.layers if isinstance(l, keras.layers.BatchNormalization)
                     and not l.name.startswith("conv5_")]
    assert all(moved(l.moving_mean) == BN_EXPECTED[mode][0] and not moved(l.gamma) for l in frozen_layers)


def test_bn_and_head_with_frozen_statistics_trains_only_gamma_beta(model, pristine):
    apply_freeze(model, "toy_resnet", FreezeConfig("bn_and_head"), "frozen")
    rows = {r["stage"]: r for r in trainable_summary(model, "toy_resnet")}
    assert rows["conv2"]["bn_training"] == 0 and rows["conv2"]["trainable"] > 0
    moved = _one_step(model, pristine)
    bn = get_backbone(model).get_layer("conv3_block1_1_bn")
    assert moved(bn.gamma) and not moved(bn.moving_mean) and not moved(bn.moving_variance)


def test_features_frozen_only_when_the_backbone_is_a_pure_function(model):
    cases = [("backbone", "train", True), ("backbone", "frozen", True), ("backbone", "stats", False),
             ("bn_and_head", "train", False), ("stages", "frozen", False)]
    for strategy, bn, expected in cases:
        phase = PhaseConfig(freeze=FreezeConfig(strategy, trainable_from="conv5"), bn=bn)
        apply_freeze(model, "toy_resnet", phase.freeze, phase.bn)
        ok, why = features_frozen(model, phase)
        assert ok == expected, (strategy, bn, why)
        if bn == "stats":
            assert "bn: stats" in why
    # a backbone with an active Dropout (EfficientNet's stochastic depth) is no pure function either
    inp = keras.Input((4,))
    backbone = keras.Model(inp, keras.layers.Dropout(0.2)(keras.layers.Dense(3)(inp)), name="backbone")
    x = keras.Input((4,))
    toy = keras.Model(x, keras.layers.Dense(2, name="head_logits")(backbone(x)))
    backbone.trainable = False
    ok, why = features_frozen(toy, PhaseConfig())
    assert not ok and "Dropout" in why


@pytest.mark.parametrize("spec, words", [
    (FreezeConfig("sideways"), ["unknown freeze strategy", "bn_and_head", "stages"]),
    (FreezeConfig("stages", trainable_from="conv9"), ["unknown stage", "conv5", "layer4"]),
    (FreezeConfig("stages"), ["trainable_from is required"]),
    (FreezeConfig("regex", pattern="("), ["not a valid regex"]),
    (FreezeConfig("fraction", fraction=1.5), ["[0, 1]"]),
    ((FreezeConfig("backbone"), "moving"), ["bn: 'moving'", "stats"]),
])
def test_bad_specs_name_the_problem(model, spec, words):
    spec, bn = spec if isinstance(spec, tuple) else (spec, "train")
    with pytest.raises(FreezeError) as e:
        apply_freeze(model, "toy_resnet", spec, bn)
    for w in words:
        assert w in str(e.value)


def test_stage_names():
    assert stage_of("resnet50", "pool1_pool") == "conv1"
    assert stage_of("resnet50", "conv4_block6_3_bn") == "conv4"
    assert stage_of("toy_resnet", "conv4_block1_2_bn") == "conv4" and stage_of("toy_resnet", "pool1_pool") == "conv1"
    assert stage_of("efficientnetb0", "block6a_expand_conv") == "block6"
    assert stage_of("mobilenetv2", "block_13_expand") == "block13"
    assert stage_of("convnext_tiny", "convnext_tiny_downsampling_block_2") == "stage3"
    assert stage_of("inception_v3", "mixed9") == "mixed9" and stage_of("inception_v3", "mixed9_0") is None
    assert stage_of("nasnet_mobile", "separable_conv_1_bn_normal_left1_5") == "stage2"


# ----------------------------------------------------------------------------- other families
# stages: the layers from the first trainable stage on, found by layer index (independent of
# kfine.registry): MobileNetV3's block9 begins with its expand conv; InceptionV3's mixed9 is every
# layer after the mixed8 concatenation (Keras' fine-tuning guide: "freeze the first 249").
FAMILY_CASES = {
    "mobilenet_v3_small": ("block9", lambda names: names.index("expanded_conv_9_expand")),
    "inception_v3": ("mixed9", lambda names: names.index("mixed8") + 1),
}


@pytest.mark.parametrize("backbone", sorted(FAMILY_CASES))
def test_stages_on_other_families_after_a_real_train_step(backbone):
    from kfine.registry import min_input_size
    keras.utils.set_random_seed(0)
    size = min_input_size(backbone)
    model = build_model(ModelConfig(backbone=backbone, weights=None), 3, (size, size))
    stage, first_trainable = FAMILY_CASES[backbone]
    bb = get_backbone(model)
    names = [l.name for l in bb.layers]
    first = first_trainable(names)
    if backbone == "inception_v3":
        assert first == 249
    apply_freeze(model, backbone, FreezeConfig("stages", trainable_from=stage))
    model.compile(keras.optimizers.Adam(1e-2, epsilon=1e-12), "sparse_categorical_crossentropy", run_eagerly=True)
    before = {id(w): np.array(w.numpy()) for w in model.weights}
    x = np.random.default_rng(1).uniform(0, 255, (4, size, size, 3)).astype("float32")
    model.train_on_batch(x, np.array([0, 1, 2, 0]))
    checked = 0
    for i, layer in enumerate(bb.layers):
        for w in layer.trainable_weights + layer.non_trainable_weights:
            if w.name.startswith("moving_variance") or not w.trainable and not w.name.startswith("moving_mean"):
                continue                                   # (one statistic per BN layer is enough)
            changed = not np.array_equal(before[id(w)], w.numpy())
            assert changed == (i >= first), f"{backbone}: {layer.name}/{w.name} changed={changed}, index {i} vs {first}"
            checked += 1
    assert checked > 20
    head = model.get_layer("head_logits").kernel
    assert not np.array_equal(before[id(head)], head.numpy())


def test_lora_on_convnext_adapts_its_pointwise_dense_layers():
    """ConvNeXt's 1x1 convolutions are Dense layers and its depthwise 7x7 a grouped Conv2D: LoRA
    adapts them, and only the adapters train; a stage with no Conv2D or Dense at the top level (the
    stem is one nested block) says so."""
    from kfine.lora import LoRAError
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone="convnext_tiny", weights=None), 3, (32, 32))
    apply_freeze(model, "convnext_tiny", FreezeConfig("lora", lora_rank=2, lora_stages=("stage3",)))
    bb = get_backbone(model)
    adapted = [l for l in bb.layers if getattr(l, "lora_enabled", False)]
    assert len(adapted) == 9 and all(l.name.startswith("convnext_tiny_stage_3_") for l in adapted)  # 3 blocks x (grouped 7x7 Conv2D + 2 Dense)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", run_eagerly=True)
    before = {id(w): np.array(w.numpy()) for w in model.weights}
    model.train_on_batch(np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32"),
                         np.array([0, 1, 2, 0]))
    moved = [w.path for w in bb.weights if not np.array_equal(before[id(w)], w.numpy())]
    assert moved and all("lora_kernel_" in p for p in moved), moved[:5]
    with pytest.raises(LoRAError, match=r"lora_stages \['stem'\] holds no Conv2D or Dense layer"):
        apply_freeze(model, "convnext_tiny", FreezeConfig("lora", lora_rank=2, lora_stages=("stem",)))
