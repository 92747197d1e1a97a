"""kfine.cli and kfine.log: reference configs by name (in a checkout and from a wheel), quiet
TensorFlow start-up, progress lines."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfine import cli
from kfine.config import ConfigError, load_config
from kfine.log import progress

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_reference_configs_are_the_checkout_configs_folder():
    assert cli.config_dir() == REPO / "configs"
    assert cli.find_config("vlg50_resnet50") == REPO / "configs" / "vlg50_resnet50.yaml"
    assert cli.find_config("demo.yaml") == REPO / "configs" / "demo.yaml"
    assert load_config(cli.find_config("vlg50_resnet50")).name == "vlg50_resnet50"


def test_a_path_wins_over_a_name_and_an_unknown_name_lists_the_names(tmp_path, monkeypatch):
    (tmp_path / "demo").write_text("name: mine\n")          # a file named like a reference config
    monkeypatch.chdir(tmp_path)
    assert cli.find_config("demo") == Path("demo")
    with pytest.raises(ConfigError) as e:
        cli.find_config("vlg_50")
    assert "config file vlg_50 does not exist" in str(e.value) and "vlg50_resnet50" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        cli.find_config(tmp_path / "missing.yaml")


def test_list_configs_splits_train_and_tune_configs_and_shows_each_header():
    train, tune = dict(cli.list_configs(search=False)), dict(cli.list_configs(search=True))
    assert sorted(train) + sorted(tune) != [] and not set(train) & set(tune)
    assert sorted({**train, **tune}) == [p.stem for p in CONFIGS]
    assert "tune_demo" in tune and "demo" in train and "inaturalist_resnet50_sweep" in tune
    for name, about in {**train, **tune}.items():
        assert about == (REPO / "configs" / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")


def test_list_configs_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "kfine.train", "--list-configs"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    names = [line.split()[0] for line in p.stdout.splitlines()]
    assert names == [n for n, _ in cli.list_configs(search=False)]
    assert any(line.startswith("vlg50_resnet50 ") and "VLG-50" in line for line in p.stdout.splitlines())


TF_NOISE = ("absl::InitializeLog", "oneDNN", "cudart_stub", "cuInit", "cpu_feature_guard", "jpeg_mem.cc")


def test_tensorflow_start_up_and_decoder_lines_are_hidden_unless_kfine_log_debug(tmp_path):
    """Import TensorFlow, touch the devices, decode a truncated JPEG: nothing on stderr from
    TensorFlow by default; with KFINE_LOG=debug its own lines are back."""
    import io
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    code = ("from kfine.log import quiet_tensorflow; quiet_tensorflow(); import tensorflow as tf, keras; "
            "tf.config.list_physical_devices(); "
            "exec('try: tf.io.decode_jpeg(tf.io.read_file(\\'cut.jpg\\'))\\nexcept tf.errors.InvalidArgumentError: print(\\'refused\\')')")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KFINE_LOG")}
    env["PYTHONPATH"] = str(REPO)
    quiet = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == "refused\n", quiet.stderr[-2000:]
    assert quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "KFINE_LOG": "debug"},
                          capture_output=True, text=True, timeout=120)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Premature end of JPEG data" in loud.stderr            # TensorFlow's own decoder warning
    assert any(word in loud.stderr for word in TF_NOISE)


def test_progress_prints_the_step_and_its_time(capsys):
    with progress("exporting saved_model"):
        print("working")
    assert capsys.readouterr().out.splitlines()[0::2] == ["kfine: exporting saved_model ...",
                                                          "kfine: exporting saved_model: done in 0.0 s"]


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_runs_the_demo_from_another_folder(tmp_path):
    """Build the wheel, install it (without dependencies: they are this environment's) into a
    folder of its own, and from a folder outside the checkout list the configs and run the demo."""
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    import shutil
    src = tmp_path / "src"   # a clean copy: an in-tree build/ could hold modules deleted since
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("kfine-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    assert (site / "kfine" / "configs" / "demo.yaml").is_file()
    # PYTHONPATH puts the installed copy first: the editable checkout must not be what runs
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KFINE_LOG")}
    env.update(PYTHONPATH=str(site), KFINE_OFFLINE="1", KFINE_CACHE=str(tmp_path / "cache"))

    def kfine(*args):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
    where = kfine("-c", "import kfine, kfine.cli as c; print(kfine.__file__); print(c.config_dir())")
    assert where.stdout.split() == [str(site / "kfine" / "__init__.py"), str(site / "kfine" / "configs")]
    listed = kfine("-m", "kfine.train", "--list-configs")
    assert "vlg50_resnet50" in listed.stdout and "demo" in listed.stdout, listed.stderr
    p = kfine("-m", "kfine.train", "train.epochs=2", "train.steps_per_epoch=1", "train.verbose=0",
              "model.backbone=scratch_cnn", "model.scratch.filters=[4,4]", "train.lr_multipliers={}",
              "train.phases.1.freeze.strategy=none")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr == ""
    run = work / "runs" / "demo"
    assert (run / "report.html").is_file() and (run / "export" / "saved_model" / "1").is_dir()
    assert load_config(run / "config.yaml").data.source == "digits"


def test_a_folder_given_as_config_is_called_a_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        cli.find_config(tmp_path)
    assert f"--config {tmp_path} is a folder; it expects a YAML config file" in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="is a folder; give a YAML config file"):
        load_config(tmp_path)
