"""Config strictness, overrides, and every file in configs/ loads."""
from pathlib import Path

import pytest

from kfine.config import Config, ConfigError, load_config, replace, save_config, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.epochs=5", "data.batch_size=64", "train.schedule.learning_rate=1e-4",
                             "model.head.units=[512]", "model.weights=null", "data.image_size=[32, 48]"])
    assert cfg.train.epochs == 5 and cfg.data.batch_size == 64
    assert cfg.train.schedule.learning_rate == pytest.approx(1e-4)
    assert cfg.model.head.units == (512,) and cfg.model.weights is None
    assert cfg.data.image_size == (32, 48)


def test_list_index_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 40\n  phases:\n    - {start_epoch: 0, freeze: {strategy: backbone}}\n"
                 "    - {start_epoch: 15, freeze: {strategy: stages, trainable_from: conv5}}\n")
    cfg = load_config(p, ["train.phases.1.start_epoch=5", "train.phases.1.freeze.trainable_from=conv4"])
    assert cfg.train.phases[1].start_epoch == 5
    assert cfg.train.phases[1].freeze.trainable_from == "conv4"
    assert cfg.train.phases[0].freeze.strategy == "backbone"
    with pytest.raises(ConfigError, match="out of range"):
        load_config(p, ["train.phases.2.start_epoch=5"])


@pytest.mark.parametrize("override, words", [
    (["train.epoch=3"], ["unknown key train.epoch", "epochs"]),
    (["data.batch_size=big"], ["data.batch_size", "int"]),
    (["train.precision=fp16"], ["train.precision", "mixed_float16"]),
    (["data.layout=weird"], ["data.layout", "sketch", "inat", "single"]),
    (["model.head.dropout=[1]"], ["model.head.dropout", "float"]),
    (["data.augment.flip=3"], ["data.augment.flip", "bool"]),
    (["nonsense"], ["key=value"]),
])
def test_errors_name_the_key_and_the_choices(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: resnet50\n  hed: {type: mlp}\n")
    with pytest.raises(ConfigError, match=r"unknown key model\.hed.*'head'"):
        load_config(p)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr_multipliers={conv4: 0.1, head: 1.0}", "name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert replace(cfg, ["seed=3"]).seed == 3 and to_dict(cfg)["train"]["lr_multipliers"] == {"conv4": 0.1, "head": 1.0}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_has_a_header(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    head = path.read_text().splitlines()[0]
    assert head.startswith("#"), f"{path.name} must start with a comment header (command, expected result)"
    assert "kfine." in path.read_text().split("\n\n")[0] or "python -m" in path.read_text()


def test_importing_kfine_does_not_import_tensorflow():
    import subprocess
    import sys
    code = "import sys, kfine, kfine.config; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
