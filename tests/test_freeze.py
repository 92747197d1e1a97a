"""Freezing strategies, checked on a real ResNet50 after a real train step."""
import numpy as np
import pytest

import keras

from kfine.config import FreezeConfig, ModelConfig
from kfine.freeze import STRATEGIES, FreezeError, apply_freeze, backbone_frozen, trainable_summary
from kfine.model import build_model, get_backbone, stage_of


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_model(ModelConfig(weights=None), 3, (32, 32))


SPECS = {
    "none": FreezeConfig("none"),
    "backbone": FreezeConfig("backbone"),
    "fraction": FreezeConfig("fraction", fraction=0.8),
    "bn_and_head": FreezeConfig("bn_and_head"),
    "stages": FreezeConfig("stages", trainable_from="layer4"),   # PyTorch alias of conv5
    "regex": FreezeConfig("regex", pattern=r"^conv5_block3_"),
}


def expected_trainable(model, name, layer_index, layer):
    """Which backbone layers each strategy should train (written independently of freeze.py)."""
    is_bn = isinstance(layer, keras.layers.BatchNormalization)
    return {
        "none": True,
        "backbone": False,
        "fraction": layer_index >= round(0.8 * 106),
        "bn_and_head": is_bn,
        "stages": layer.name.startswith("conv5_"),
        "regex": layer.name.startswith("conv5_block3_"),
    }[name]


def test_every_strategy_is_covered():
    # lora adds variables to the model it is applied to: tested on its own model in test_lora.py
    assert sorted([*SPECS, "lora"]) == sorted(STRATEGIES)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_train_step_changes_exactly_the_trainable_weights(model, name):
    apply_freeze(model, "resnet50", SPECS[name])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    weight_layers = [l for l in get_backbone(model).layers if l.weights]
    assert len(weight_layers) == 106           # 53 conv + 53 BN: what "fraction" counts
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
    apply_freeze(model, "resnet50", FreezeConfig("stages", trainable_from="conv4"))
    rows = {r["stage"]: r for r in trainable_summary(model, "resnet50")}
    assert [s for s in rows] == ["conv1", "conv2", "conv3", "conv4", "conv5", "head"]
    for s in ("conv1", "conv2", "conv3"):
        assert rows[s]["trainable"] == 0 and rows[s]["frozen"] > 0
    for s in ("conv4", "conv5", "head"):
        assert rows[s]["frozen"] == 0 and rows[s]["trainable"] > 0
    assert rows["head"]["trainable"] == 2048 * 3 + 3
    total = sum(r["trainable"] + r["frozen"] for r in rows.values())
    moving = sum(int(np.prod(w.shape)) for w in model.weights if w.name.startswith("moving_"))
    assert total == model.count_params() - moving
    apply_freeze(model, "resnet50", FreezeConfig("bn_and_head"))
    rows = {r["stage"]: r for r in trainable_summary(model, "resnet50")}
    assert rows["conv1"]["bn_training"] == 1 and rows["conv2"]["bn_training"] == 10


def test_backbone_frozen_is_queryable(model):
    apply_freeze(model, "resnet50", FreezeConfig("backbone"))
    assert backbone_frozen(model)
    apply_freeze(model, "resnet50", FreezeConfig("bn_and_head"))
    assert not backbone_frozen(model)


@pytest.mark.parametrize("spec, words", [
    (FreezeConfig("sideways"), ["unknown freeze strategy", "bn_and_head", "stages"]),
    (FreezeConfig("stages", trainable_from="conv9"), ["unknown stage", "conv5", "layer4"]),
    (FreezeConfig("stages"), ["trainable_from is required"]),
    (FreezeConfig("regex", pattern="("), ["not a valid regex"]),
    (FreezeConfig("fraction", fraction=1.5), ["[0, 1]"]),
])
def test_bad_specs_name_the_problem(model, spec, words):
    with pytest.raises(FreezeError) as e:
        apply_freeze(model, "resnet50", spec)
    for w in words:
        assert w in str(e.value)


def test_stage_names():
    assert stage_of("resnet50", "pool1_pool") == "conv1"
    assert stage_of("resnet50", "conv4_block6_3_bn") == "conv4"
    assert stage_of("efficientnetb0", "block6a_expand_conv") == "block6"
    assert stage_of("mobilenetv2", "block_13_expand") == "block13"
