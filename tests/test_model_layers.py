"""python -m kfine.model layers and python -m kfine.train --dry-run: the counts add up to the
model's, the freeze spec's trainable parameters are the real ones, and nothing is trained or written."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import keras

import forkserver
from kfine.config import FreezeConfig, ModelConfig, ScratchConfig, load_config
from kfine.freeze import apply_freeze
from kfine.layers import describe_model, layer_table
from kfine.model import build_model, get_backbone

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cfg", [ModelConfig(weights=None),
                                 ModelConfig(backbone="scratch_cnn", weights=None,
                                             scratch=ScratchConfig(filters=(8, 16), dense_units=16))],
                         ids=["resnet50", "scratch_cnn"])
def test_layer_table_adds_up_to_the_model(cfg):
    model = build_model(cfg, 7, (32, 32))
    rows = layer_table(model, cfg.backbone)
    assert sum(r["params"] for r in rows) == model.count_params()
    assert sum(r["layers"] for r in rows) == len(get_backbone(model).layers) + len(model.layers) - 2  # - input, backbone
    by_stage = {r["stage"]: r for r in rows}
    if cfg.backbone == "resnet50":
        assert [s for s in by_stage if s.startswith("conv")] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
        assert sum(by_stage[f"conv{i}"]["weight_layers"] for i in range(1, 6)) == 106
        assert by_stage["head"]["params"] == 2048 * 7 + 7
        conv5 = sum(sum(int(keras.ops.size(w)) for w in l.weights)
                    for l in get_backbone(model).layers if l.name.startswith("conv5_"))
        assert by_stage["conv5"]["params"] == conv5


def test_describe_a_freeze_spec_reports_the_real_trainable_count():
    spec = FreezeConfig("stages", trainable_from="conv5")
    text = describe_model(ModelConfig(), 10, (32, 32), [("spec", spec)])
    model = build_model(ModelConfig(weights=None), 10, (32, 32))
    apply_freeze(model, "resnet50", spec)
    trainable = sum(int(keras.ops.size(v)) for v in model.trainable_weights)
    total_line = [l for l in text.splitlines() if l.startswith("total")][-1]
    assert f"{trainable:,}" in total_line
    assert f"{model.count_params():,}" in text.split("\n\n")[0]


def test_dry_run_trains_nothing_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import kfine.train as train
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("the dry run started a run"))
    runs = tmp_path / "runs"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: d\ndata: {source: digits, image_size: [32, 32]}\nmodel: {weights: null}\n"
                   "train:\n  epochs: 3\n  phases:\n    - {start_epoch: 0, freeze: {strategy: backbone}}\n"
                   "    - {start_epoch: 2, freeze: {strategy: lora, lora_rank: 4}}\n")
    assert train.main(["--dry-run", "--config", str(cfg), f"runs_dir={runs}"]) == 0
    out = capsys.readouterr().out
    assert not runs.exists()
    assert "phase 0 (epochs 1..2 of 3): freeze backbone" in out and "phase 1 (epochs 3..3 of 3): freeze lora" in out
    assert "head for 10 classes" in out
    tables = out.split("\n\n")
    assert f"{build_model(ModelConfig(weights=None), 10, (32, 32)).count_params():,}" in tables[0]
    head_only = tables[1].splitlines()[-1].split()
    assert head_only[1] == f"{2048 * 10 + 10:,}"          # phase 0 trains the head only
    lora = int(tables[2].splitlines()[-1].split()[1].replace(",", ""))
    assert 2048 * 10 + 10 < lora < 1_000_000                # phase 1: head + rank-4 adapters


def test_cli_layers_with_a_strategy(capsys):
    from kfine.layers import main
    assert main(["layers", "--backbone", "resnet50", "--image-size", "32", "--strategy", "stages",
                 "--trainable-from", "layer4", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    model = build_model(ModelConfig(weights=None), 3, (32, 32))
    assert f"{model.count_params():,}" in out
    rows = {l.split()[0]: l.split() for l in out.split("\n\n")[1].splitlines()[1:]}
    assert rows["conv4"][1] == "0" and rows["conv5"][2] == "0"     # conv4 frozen, conv5 trains
    # python -m kfine.model layers is kfine.layers' command line (one real process: a usage error)
    bad = forkserver.run([sys.executable, "-m", "kfine.model", "layers", "--strategy", "nope", "--image-size", "32"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_cli_layers_documents_a_family(capsys):
    """layers --backbone NAME: the family's constructor, preprocessing, minimum size, normalisation
    and stage names, and the stage table of what a spec trains (VGG16: block1..block5, no BatchNorm)."""
    from kfine.layers import main
    assert main(["layers", "--backbone", "vgg16", "--image-size", "32", "--strategy", "stages",
                 "--trainable-from", "block5", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "keras.applications.VGG16; preprocessing caffe" in out and "minimum input 32 px; no BatchNorm" in out
    assert "stages: block1, block2, block3, block4, block5" in out
    rows = {l.split()[0]: l.split() for l in out.split("\n\n")[1].splitlines()[2:]}   # past title, header
    assert list(rows) == ["block1", "block2", "block3", "block4", "block5", "head", "total"]
    assert rows["block4"][1] == "0" and rows["block5"][2] == "0"
    assert main(["layers", "--backbone", "vgg16", "--image-size", "32", "--strategy", "bn_and_head"]) == 2
    assert "bn_and_head needs BatchNorm layers; vgg16 has none" in capsys.readouterr().err
