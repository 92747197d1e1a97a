"""Config strictness, overrides, and every file in configs/ loads."""
from pathlib import Path

import pytest

from kfine.checks import CHECKS, values_at
from kfine.config import Config, ConfigError, check_config, load_config, replace, save_config, to_dict

REPO = Path(__file__).parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


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
    assert isinstance(cfg, Config) and check_config(cfg) is cfg
    head = path.read_text().splitlines()[0]
    assert head.startswith("#"), f"{path.name} must start with a comment header (command, expected result)"
    assert "kfine." in path.read_text().split("\n\n")[0] or "python -m" in path.read_text()


def test_importing_kfine_does_not_import_tensorflow():
    import subprocess
    import sys
    code = ("import sys, kfine, kfine.config, kfine.cli, kfine.log; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- value checks
# (overrides, the key the message must name, what it must say is allowed). Each would otherwise
# fail deep inside a run (tf.data tracebacks, a TypeError, a blamed weights download) or be
# silently accepted (issue 13).
BAD = [
    (["data.batch_size=0"], "data.batch_size", ">= 1"),
    (["data.val_fraction=1.5"], "data.val_fraction", "in [0.0, 1.0)"),
    (["data.val_fraction=-0.2"], "data.val_fraction", "in [0.0, 1.0)"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], "data.val_fraction", "data.test_fraction < 1"),
    (["data.image_size=[0,0]"], "data.image_size", ">= 32"),
    (["data.image_size=[-32,-32]"], "data.image_size", ">= 32"),
    (["model.backbone=resnet5"], "model.backbone", "'resnet50'"),
    (["train.lr_multipliers.conv9=0.1"], "train.lr_multipliers.conv9", "['conv1', 'conv2', 'conv3', 'conv4', 'conv5']"),
    (["train.schedule.learning_rate=-0.01"], "train.schedule.learning_rate", ">= 0"),
    (["train.label_smoothing=2"], "train.label_smoothing", "in [0.0, 1.0)"),
    (["train.steps_per_epoch=0"], "train.steps_per_epoch", "null or >= 1"),
    (["train.checkpoint.every_epochs=-1"], "train.checkpoint.every_epochs", ">= 0"),
    (["train.phases.0.freeze.strategy=stages", "train.phases.0.freeze.trainable_from=conv7"],
     "train.phases.0.freeze.trainable_from", "conv5"),
    (["model.head.type=mpl"], "model.head.type", "['linear', 'mlp']"),
    (["export.formats=[tflite]"], "export.formats.0", "'saved_model'"),
]


@pytest.mark.parametrize("overrides, key, allowed", BAD, ids=[b[1] + "=" + b[0][-1].split("=")[1] for b in BAD])
def test_a_bad_value_stops_the_run_before_a_run_directory_exists(overrides, key, allowed, tmp_path):
    from kfine.train import run
    runs = tmp_path / "runs"
    cfg = load_config(None, [f"runs_dir={runs}", f"data.root={tmp_path / 'no_data_read'}", "name=t", *overrides])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert msg.startswith(key.split(".conv9")[0]) and f"Received: {key}=" in msg and allowed in msg, msg
    assert "\n" not in msg
    assert not runs.exists()


def test_bad_yaml_is_one_line_with_file_line_and_column(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  epochs: [1, 2\n  phases: []\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:4:9: invalid YAML: ") and "line 3, column 11" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[1': the value is not valid YAML"):
        load_config(None, ["train.epochs=[1"])


def test_every_check_names_a_field_of_the_config():
    """The table of checks stays in step with the dataclasses (a renamed field fails here)."""
    cfg = load_config(None, ["train.lr_multipliers={head: 1.0}", "model.head.units=[8]",
                             "compare.reference={a: {val: 0.5}}"])
    for key in CHECKS:
        assert values_at(cfg, key), key
    with pytest.raises(KeyError):
        values_at(cfg, "data.no_such_field")


def test_menus_are_the_registries_themselves(monkeypatch):
    """A head added to kfine.model.HEADS is accepted with no change to the config code."""
    from kfine import model
    cfg = load_config(None, ["model.head.type=cosine", "data.root=x"])
    with pytest.raises(ConfigError, match=r"model.head.type must be one of \['linear', 'mlp'\]"):
        check_config(cfg)
    monkeypatch.setitem(model.HEADS, "cosine", model.HEADS["linear"])
    assert check_config(cfg) is cfg


def test_cross_key_rules():
    ok = ["data.root=x", "train.epochs=10", "train.phases=[{start_epoch: 0}, {start_epoch: 4}]",
          "train.lr_multipliers={layer4: 0.3, conv4: 0.1, head: 1, backbone: 0.01}"]
    check_config(load_config(None, ok))
    for overrides, words in [
        (["train.phases=[{start_epoch: 1}]"], "train.phases.0.start_epoch must be 0"),
        (["train.phases=[{start_epoch: 0}, {start_epoch: 12}]"], "train.phases.1.start_epoch must be < train.epochs (10)"),
        (["train.phases=[{start_epoch: 0, freeze: {strategy: regex}}]"], "train.phases.0.freeze.pattern must be a regex"),
        (["model.backbone=scratch_cnn", "train.lr_multipliers={conv5: 1}"], "['block1', 'block2', 'block3', 'block4', 'block5']"),
        (["model.backbone=scratch_cnn", "data.image_size=[8, 8]", "data.source=digits"], None),          # no 32 px floor without keras.applications
        (["model.head.activation=relux"], "model.head.activation must be the name of a keras.activations function"),
        (["train.class_weight=balance"], "train.class_weight must be one of [null, 'balanced']"),
        (["name=runs/x"], "name must be a non-empty folder name"),
    ]:
        cfg = load_config(None, overrides)
        if words is None:
            check_config(cfg)
            continue
        with pytest.raises(ConfigError) as e:
            check_config(cfg)
        assert words in str(e.value), str(e.value)


def test_a_run_that_fails_before_training_leaves_no_run_directory(tmp_path):
    """The data check fails after the run directory was made: the directory goes again."""
    from kfine.data import DataError
    from kfine.train import run
    (tmp_path / "empty").mkdir()
    runs = tmp_path / "runs"
    cfg = load_config(None, [f"runs_dir={runs}", f"data.root={tmp_path / 'empty'}", "name=t",
                             "model.backbone=scratch_cnn", "data.image_size=[32, 32]"])
    with pytest.raises(DataError):
        run(cfg)
    assert runs.is_dir() and list(runs.iterdir()) == []


def _bad_run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: r\ndata: {batch_size: 0}\n")
    (run / "class_names.json").write_text('["a", "b"]')
    (run / "model.keras").write_bytes(b"")   # never opened: the config check comes first
    return run


def test_evaluate_predict_and_export_check_the_run_config_first(tmp_path, capsys):
    from kfine import evaluate, export, predict
    run = _bad_run_dir(tmp_path)
    with pytest.raises(ConfigError, match="data.batch_size must be >= 1"):
        export.export_run(run)
    with pytest.raises(ConfigError, match="data.batch_size must be >= 1"):
        evaluate.evaluate_run(run)
    capsys.readouterr()
    for main, args in ((evaluate.main, []), (export.main, []), (predict.main, ["--images", str(tmp_path)])):
        assert main(["--run", str(run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["kfine: error: data.batch_size must be >= 1. Received: data.batch_size=0"], err
    assert not (run / "export").exists() and not (run / "metrics.json").exists()


def _cli(module, args, cwd):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KFINE_DEBUG")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_configs_are_one_line_and_leave_no_directory(tmp_path, monkeypatch, capsys):
    """Exit status 2, exactly one line on stderr, nothing created in the working folder. Through
    a real process for the first (no TensorFlow start-up lines either, though TensorFlow is
    imported), in process (main(argv)) for the others."""
    from kfine import train, tune
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\ndata:\n  batch_size: 8\n   image_size: [32, 32]\n")
    p = _cli("kfine.train", ["--config", str(bad_yaml)], tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kfine: error: ") and f"{bad_yaml}:4:" in lines[0], p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.yaml"]
    monkeypatch.chdir(tmp_path)
    for main, args, words in [
        (train.main, ["data.batch_size=0"], "data.batch_size must be >= 1. Received: data.batch_size=0"),
        (tune.main, ["train.lr_multipliers.conv9=0.1"], "Received: train.lr_multipliers.conv9=0.1"),
    ]:
        assert main(args) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kfine: error: ") and words in lines[0], lines
        assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.yaml"]


def test_an_empty_config_stops_on_data_root_before_any_run_directory(tmp_path, monkeypatch, capsys):
    """Where the data is (data.root, or data.name for tfds) is checked with the values, before
    kfine.train makes runs/<name>: an empty file is one line and no runs/ folder at all."""
    from kfine.train import main
    (tmp_path / "empty.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "empty.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.root must be your dataset folder" in err[0], err
    assert "Received: data.root=null" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]
    with pytest.raises(ConfigError, match=r"data.name must be a tfds data set name"):
        check_config(load_config(None, ["data.source=tfds"]))
    with pytest.raises(ConfigError, match=r"data.cache must be memory or disk"):
        check_config(load_config(None, ["data.source=tfds", "data.name=mnist", "data.cache=none"]))
    check_config(load_config(None, ["data.source=digits"]))              # digits needs neither


def test_lora_stages_are_checked_with_the_config_and_name_the_full_key(tmp_path):
    from kfine.train import run
    runs = tmp_path / "runs"
    phases = "train.phases=[{start_epoch: 0}, {start_epoch: 1, freeze: {strategy: lora, lora_stages: [conv5, conv9]}}]"
    cfg = load_config(None, [f"runs_dir={runs}", f"data.root={tmp_path / 'no_data_read'}", phases])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert msg.startswith("train.phases.1.freeze.lora_stages.1 must be a stage of resnet50") and "conv5" in msg, msg
    assert "Received: train.phases.1.freeze.lora_stages.1='conv9'" in msg and "layer4" in msg, msg
    assert not runs.exists()
    check_config(load_config(None, ["data.root=x", phases.replace(", conv9", ", layer3")]))   # aliases are stages


def test_an_override_key_with_an_empty_part_is_reported_whole():
    for item, key in (("data..batch_size=3", "data..batch_size"), ("data.=3", "data."), (".seed=1", ".seed")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [item])
        assert f"the key {key!r} has an empty part" in str(e.value), str(e.value)


def test_phases_out_of_order_is_a_short_line_naming_the_key_and_the_start_epochs():
    """One home for the phase-list checks: check_config and kfine.fit.phase_spans say the same."""
    from kfine.fit import phase_spans
    phases = ("train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}, {start_epoch: 5, freeze: {strategy: "
              "stages, trainable_from: conv4}}, {start_epoch: 3, freeze: {strategy: regex, pattern: 'conv5_.*'}}]")
    cfg = load_config(None, ["data.root=x", phases])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert msg.startswith("train.phases.2.start_epoch must be > train.phases.1.start_epoch (5)"), msg
    assert "[0, 5, 3]" in msg and "Received: train.phases.2.start_epoch=3" in msg and len(msg) < 200, msg
    with pytest.raises(ConfigError) as e2:
        phase_spans(cfg)
    assert str(e2.value) == msg
    with pytest.raises(ConfigError, match=r"train.phases.1.start_epoch must be < train.epochs \(10\)"):
        phase_spans(load_config(None, ["train.phases=[{start_epoch: 0}, {start_epoch: 10}]"]))
