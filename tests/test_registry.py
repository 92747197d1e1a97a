"""kfine.registry: every backbone's stages, minimum size and BatchNorm known without building a
model; the config checks use them (and say by key what a family cannot do)."""
import subprocess
import sys
from pathlib import Path

import pytest

from kfine.config import ConfigError, check_config, load_config

REPO = Path(__file__).resolve().parent.parent


def test_registry_imports_no_keras():
    code = "import sys, kfine.registry as r; assert 'keras' not in sys.modules, 'keras'; print(len(r.BACKBONES))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout) >= 40


def test_check_config_builds_no_model(monkeypatch):
    """Stage names (trainable_from, lr_multipliers, lora_stages) are checked against the static
    tables: no keras.applications constructor and no kfine.model.build_model is called."""
    import keras
    import kfine.model
    from kfine.registry import BACKBONES

    def refuse(*a, **k):
        raise AssertionError("check_config built a model")
    monkeypatch.setattr(kfine.model, "build_model", refuse)
    monkeypatch.setattr(kfine.model, "build_backbone", refuse)
    for entry in BACKBONES.values():
        if entry["app"]:
            monkeypatch.setattr(keras.applications, entry["app"], refuse)
    for backbone, stage in [("resnet50", "layer3"), ("convnext_tiny", "stage2"), ("inception_v3", "mixed9"),
                            ("efficientnetv2_s", "block5")]:
        cfg = load_config(None, ["data.root=data", f"model.backbone={backbone}", "data.image_size=[299,299]", "train.epochs=3",
                                 f"train.lr_multipliers={{{stage}: 0.1, head: 1.0}}",
                                 "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
                                 f" {{start_epoch: 1, freeze: {{strategy: stages, trainable_from: {stage}}}}},"
                                 f" {{start_epoch: 2, freeze: {{strategy: lora, lora_stages: [{stage}]}}}}]"])
        check_config(cfg)
    bad = load_config(None, ["data.root=data", "model.backbone=convnext_tiny", "train.lr_multipliers={conv4: 0.1}"])
    with pytest.raises(ConfigError, match=r"train.lr_multipliers keys must be a stage of convnext_tiny: one of "
                                          r"\['stem', 'stage0', 'stage1', 'stage2', 'stage3'\]"):
        check_config(bad)
    bad = load_config(None, ["data.root=data", "train.phases=[{start_epoch: 0, freeze: {strategy: lora, lora_stages: [conv5, conv9]}}]"])
    with pytest.raises(ConfigError, match=r"train.phases.0.freeze.lora_stages.1=.conv9"):
        check_config(bad)


@pytest.mark.parametrize("backbone, phase, key, note", [
    ("convnext_tiny", "{start_epoch: 0, freeze: {strategy: bn_and_head}}", "train.phases.0.freeze.strategy: bn_and_head",
     "convnext_tiny has none (LayerNorm)"),
    ("vgg16", "{start_epoch: 0, freeze: {strategy: fraction, fraction: 0.5, train_bn: true}}",
     "train.phases.0.freeze.train_bn: true", "vgg16 has none"),
    ("convnext_small", "{start_epoch: 0, freeze: {strategy: backbone}, bn: stats}", "train.phases.0.bn: stats",
     "convnext_small has none (LayerNorm)"),
    ("scratch_cnn", "{start_epoch: 0, freeze: {strategy: backbone}, bn: frozen}", "train.phases.0.bn: frozen",
     "scratch_cnn has none (model.scratch.batchnorm: false)"),
])
def test_batchnorm_strategies_refused_where_there_is_no_batchnorm(backbone, phase, key, note):
    cfg = load_config(None, ["data.root=data", f"model.backbone={backbone}", f"train.phases=[{phase}]"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert str(e.value).startswith(f"{key} needs BatchNorm layers; {note}")
    ok = load_config(None, ["data.root=data", "model.backbone=resnet50", f"train.phases=[{phase}]"])
    assert check_config(ok) is ok                                       # BatchNorm there: allowed
    if backbone == "scratch_cnn":
        with_bn = load_config(None, ["data.root=data", f"model.backbone={backbone}", "model.scratch.batchnorm=true",
                                     f"train.phases=[{phase}]"])
        assert check_config(with_bn) is with_bn


def test_bn_and_head_refused_at_apply_time_too():
    from kfine.config import FreezeConfig, ModelConfig
    from kfine.freeze import FreezeError, apply_freeze
    from kfine.model import build_model
    model = build_model(ModelConfig(backbone="vgg16", weights=None), 3, (32, 32))
    with pytest.raises(FreezeError, match="freeze.strategy: bn_and_head needs BatchNorm layers; vgg16 has none"):
        apply_freeze(model, "vgg16", FreezeConfig("bn_and_head"))


@pytest.mark.parametrize("backbone, low", [("inception_v3", 75), ("inception_resnet_v2", 75), ("xception", 71),
                                           ("convnext_tiny", 32)])
def test_image_size_below_the_family_minimum(backbone, low):
    cfg = load_config(None, ["data.root=data", f"model.backbone={backbone}", f"data.image_size=[{low - 1},{low}]"])
    with pytest.raises(ConfigError, match=f"data.image_size must be two sizes >= {low}"):
        check_config(cfg)
    ok = load_config(None, ["data.root=data", f"model.backbone={backbone}", f"data.image_size=[{low},{low}]"])
    assert check_config(ok) is ok


def test_one_epoch_run_on_a_new_family(tmp_path, tiny_overrides):
    """A whole run on MobileNetV3Small (preprocessing inside the backbone, stem..top stages):
    stages from block9 train with a multiplier, the stem stays frozen, the run finishes and saves."""
    import keras
    import numpy as np
    from conftest import make_folder
    from kfine.rundir import read_json
    from kfine.train import run
    root = make_folder(tmp_path / "data", per_class=6)
    cfg = check_config(load_config(None, [*tiny_overrides, f"data.root={root}", "name=m3", "export.enabled=false",
                                          "model.backbone=mobilenet_v3_small", "train.epochs=1",
                                          "train.lr_multipliers={block10: 0.5}",
                                          "train.phases=[{start_epoch: 0, freeze: {strategy: stages, "
                                          "trainable_from: block9}}]"]))
    result = run(cfg)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
    rows = {r["stage"]: r for r in read_json(result.run_dir / "phases.json")[0]["summary"]}
    assert list(rows) == ["stem", *[f"block{i}" for i in range(11)], "top", "head"]
    assert rows["stem"]["trainable"] == 0 and rows["block8"]["trainable"] == 0
    assert rows["block9"]["frozen"] == 0 and rows["top"]["frozen"] == 0 and rows["block10"]["lr_mult"] == 0.5
    saved = keras.saving.load_model(result.run_dir / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(saved.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-5)


def test_toy_resnet_without_imagenet_weights_is_refused_by_the_config_check():
    """model.weights: imagenet on toy_resnet stops at the check (nothing read yet), unless
    weights_fallback: random starts it from random weights."""
    bad = load_config(None, ["data.root=data", "model.backbone=toy_resnet"])
    with pytest.raises(ConfigError, match=r"model.weights must be null or a local .weights.h5 file: toy_resnet "
                                          r"has no ImageNet weights. Received: model.weights='imagenet'"):
        check_config(bad)
    for extra in ("model.weights=null", "model.weights_fallback=random"):
        ok = load_config(None, ["data.root=data", "model.backbone=toy_resnet", extra])
        assert check_config(ok) is ok
