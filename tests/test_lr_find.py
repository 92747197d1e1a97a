"""kfine.lr_find: an exponential ramp inside the range, a suggestion inside it, the model passed
in left bit-identical, and the CLI's override line (tiny scratch CNN)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

import keras

from conftest import make_folder
from kfine.config import load_config
from kfine.lr_find import find_lr, smooth



def tiny(tmp_path):
    root = make_folder(tmp_path / "data", "single", per_class=10)
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8",
            "model.backbone=scratch_cnn", "model.scratch.filters=[8,8,16]", "model.scratch.dense_units=16",
            "model.weights=null", "train.verbose=0", "data.augment.enabled=false", "name=lr",
            "train.optimizer.name=sgd", "train.epochs=3",
            "train.phases=[{start_epoch: 0, freeze: {strategy: none}}, {start_epoch: 1, freeze: {strategy: backbone}}]"]


def test_ramp_suggestion_and_the_model_passed_in_is_unchanged(tmp_path):
    from kfine.data import make_datasets
    from kfine.fit import build_training
    cfg = load_config(None, tiny(tmp_path))
    datasets = make_datasets(cfg.data, cfg.seed)
    model, _, _ = build_training(cfg, datasets)
    head = model.get_layer("head_logits")
    head.kernel.assign(np.zeros(head.kernel.shape, "float32"))   # uniform predictions: loss log(3)
    head.bias.assign(np.zeros(head.bias.shape, "float32"))
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
    flags = [l.trainable for l in model.get_layer("backbone").layers]

    result = find_lr(cfg, datasets, model=model, start_lr=1e-4, end_lr=1e4, steps=60)   # diverges near lr 100, step ~44

    for a, v in zip(before, model.weights):                     # bit-identical
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(v))
    assert flags == [l.trainable for l in model.get_layer("backbone").layers]
    assert result.losses[0] == pytest.approx(math.log(3), rel=1e-5)   # it started from those weights
    lrs = np.array(result.lrs)
    assert lrs[0] == pytest.approx(1e-4)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e4 / 1e-4) ** (1 / 59), rtol=1e-4)   # exponential
    assert lrs[-1] <= 1e4 * (1 + 1e-5)
    assert result.smoothed == pytest.approx(smooth(result.losses))
    assert lrs[0] <= result.suggestion <= lrs[-1]
    best = lrs[int(np.nanargmin(result.smoothed))]
    assert result.suggestion == pytest.approx(max(best / 10, lrs[0]))
    assert result.diverged_at is not None and len(lrs) == result.diverged_at + 1 < 60   # SGD at lr ~100 diverges, well before the ramp's end
    assert not (tmp_path / "runs").exists()                     # nothing written


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])


def test_cli_prints_the_override_line(tmp_path, capsys):
    """kfine.lr_find's command line, in process (main(argv))."""
    from kfine.lr_find import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: lr\n")
    assert main(["--config", str(cfg), "--steps", "30", "--start-lr", "1e-5", "--end-lr", "10", *tiny(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"train\.schedule\.learning_rate=([0-9.]+e[+-][0-9]+)", last)
    assert m, last
    assert 1e-5 <= float(m.group(1)) <= 10
    out = tmp_path / "runs" / "lr_find"
    assert (out / "lr.png").stat().st_size > 1000 and (out / "lr.csv").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lr_find"]   # no run directory
    cfg2 = load_config(cfg, tiny(tmp_path) + [last])             # the line is a valid override
    assert cfg2.train.schedule.learning_rate == pytest.approx(float(m.group(1)))


@pytest.mark.parametrize("flags, words", [(["--start-lr", "1", "--end-lr", "0.1"], "0 < start_lr < end_lr"),
                                          (["--steps", "1"], "steps must be >= 2")])
def test_cli_bad_range_is_one_line_and_exit_status_2(tmp_path, capsys, flags, words):
    from kfine.lr_find import main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: lr\n")
    assert main(["--config", str(cfg), *flags, *tiny(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kfine: error: lr_find: ") and words in err[0], err
    assert not (tmp_path / "runs").exists()
