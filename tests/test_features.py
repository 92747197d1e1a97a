"""kfine.features: head-only phases train on backbone features computed once, and give the model
what uncached training gives; the cache is used only where features cannot change, is reused
across search trials, and views cycle by epoch. Also steps_per_execution (kfine.train)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_folder
from kfine import features
from kfine.config import load_config
from kfine.train import run

SCRATCH = ["model.backbone=scratch_cnn", "model.scratch.filters=[4,8,8]", "model.scratch.dense_units=16",
           "model.scratch.dropout=0.0"]
HEAD_ONLY = "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("feat") / "d", "single", per_class=14)


def overrides(tmp_path, folder, *extra):
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={folder}", "data.image_size=[32,32]", "data.batch_size=8",
            "model.weights=null", "train.verbose=0", "export.enabled=false", "data.deterministic=true",
            "train.checkpoint.every_epochs=0", "name=t", *extra]


def head_kernels(model):
    return [np.array(w) for layer in model.layers if layer.name.startswith("head_") for w in layer.get_weights()]


def test_cached_and_uncached_head_training_give_the_same_head(tmp_path, folder, capsys):
    common = overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "train.epochs=3", "data.augment.enabled=false",
                       "train.optimizer.name=sgd", "train.optimizer.momentum=0.9", "train.schedule.learning_rate=0.05")
    features._RECENT.clear()   # an earlier test may have left the same features in memory
    before = features.COMPUTED["features"]
    cached = run(load_config(None, common + ["name=cached"]))
    assert features.COMPUTED["features"] == before + 1
    assert "the head trains on cached backbone features" in capsys.readouterr().out
    plain = run(load_config(None, common + ["name=plain", "train.feature_cache=off"]))
    assert "no feature cache: train.feature_cache is off" in capsys.readouterr().out
    a, b = head_kernels(cached.model), head_kernels(plain.model)
    assert not np.allclose(a[0], head_kernels(run(load_config(None, common + ["name=e0", "train.epochs=1"])).model)[0])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    for r1, r2 in zip(cached.history, plain.history):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-4)
    # the backbone did not move, and the checkpoints/metrics are those of the full model
    assert cached.metrics["accuracy"] == pytest.approx(plain.metrics["accuracy"])


def test_after_a_cached_phase_the_next_phase_trains_the_full_model_from_the_cached_head(tmp_path, folder, capsys):
    import keras
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, "train.epochs=3", "train.checkpoint.every_epochs=1",
                                      "data.augment.enabled=false",
                                      "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
                                      " {start_epoch: 2, freeze: {strategy: none}}]"))
    result = run(cfg)
    out = capsys.readouterr().out
    assert "phase 0: the head trains on cached backbone features" in out
    assert "phase 1: no feature cache:" in out and "backbone variables train" in out
    after0 = keras.saving.load_model(result.run_dir / "checkpoints" / "epoch_0001.keras")
    start = keras.saving.load_model(result.run_dir / "checkpoints" / "epoch_0000.keras")
    # phase 0 trained the head and nothing else ...
    assert not np.array_equal(head_kernels(start)[0], head_kernels(after0)[0])
    conv = "block1_conv"
    np.testing.assert_array_equal(start.get_layer("backbone").get_layer(conv).kernel.numpy(),
                                  after0.get_layer("backbone").get_layer(conv).kernel.numpy())
    # ... and phase 1 went on from that head (one optimizer: its step counter ran on) and trained the backbone
    assert not np.array_equal(after0.get_layer("backbone").get_layer(conv).kernel.numpy(),
                              result.model.get_layer("backbone").get_layer(conv).kernel.numpy())
    n_train = sum(1 for line in open(result.run_dir / "splits.csv") if ",train," in line)
    assert int(result.model.optimizer.iterations.numpy()) == 3 * -(-n_train // 8)


@pytest.mark.parametrize("extra, why", [
    (["train.phases=[{start_epoch: 0, freeze: {strategy: stages, trainable_from: block3}}]"], "backbone variables train"),
    (["model.scratch.batchnorm=true", "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}, bn: stats}]"],
     "BatchNorm statistics follow the batches"),
    ([HEAD_ONLY, "train.feature_cache=off"], "train.feature_cache is off"),
    ([HEAD_ONLY, "data.augment.mixup.alpha=0.4"], "mixup blends different pairs"),
    ([HEAD_ONLY], "the phase trains 1 epoch: computing 2 cached views would cost as much"),
])
def test_no_cache_where_features_could_change(tmp_path, folder, capsys, extra, why):
    before = features.COMPUTED["features"]
    run(load_config(None, overrides(tmp_path, folder, *SCRATCH, "train.epochs=1", *extra)))
    assert features.COMPUTED["features"] == before
    assert why in capsys.readouterr().out


def test_a_search_computes_the_features_once_for_all_its_trials(tmp_path, folder):
    from kfine.tune import search
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "train.epochs=2",
                                      "data.augment.enabled=false",
                                      "search.max_trials=3", "search.tuner=grid",
                                      "search.space={train.schedule.learning_rate: {type: choice, values: [0.1, 0.01, 0.001]}}"))
    features._RECENT.clear()
    before = features.COMPUTED["features"]
    result = search(cfg)
    assert len([r for r in result.rows if r["score"] != ""]) == 3
    assert features.COMPUTED["features"] == before + 1


def test_views_cycle_by_epoch_from_the_start_epoch():
    import tensorflow as tf
    k, n, d = 3, 5, 2
    train = np.stack([np.full((n, d), v, np.float32) for v in range(k)])   # view v: every feature == v
    feats = features.Features(train, np.arange(n, dtype=np.int32), None, None, "key")
    for start in (0, 4):
        ds, _ = features.feature_datasets(feats, batch_size=2, seed=0, start_epoch=start, steps=3)
        views = [float(x.numpy()[0, 0]) for x, _ in ds.take(3 * 4)]   # 4 epochs of 3 steps
        assert views == [float((start + e) % k) for e in range(4) for _ in range(3)]
        labels = [y.numpy() for _, y in ds.take(3)]
        assert sorted(np.concatenate(labels).tolist()) == list(range(n))   # a whole permutation per epoch


def test_augmented_views_are_computed_per_view(tmp_path, folder):
    from kfine import data
    from kfine.model import build_model
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "train.feature_cache_views=2"))
    ds = data.make_datasets(cfg.data, cfg.seed)
    model = build_model(cfg.model, 3, (32, 32))
    feats = features.get_features(model, ds, cfg)
    assert feats.train.shape[:2] == (2, sum(ds.counts["train"].values()))
    assert not np.allclose(feats.train[0], feats.train[1])            # two different augmentations
    assert features.get_features(model, ds, cfg).source == "memory"  # the same key: reused
    model.get_layer("backbone").get_layer("block1_conv").kernel.assign(
        model.get_layer("backbone").get_layer("block1_conv").kernel * 2)
    assert features.get_features(model, ds, cfg).source == "computed"  # other backbone weights: other key


def test_steps_per_execution_gives_the_same_history(tmp_path, folder):
    from kfine.train import execution_steps
    common = overrides(tmp_path, folder, *SCRATCH, "train.epochs=2", "data.augment.enabled=false",
                       "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]")
    cfg = load_config(None, common)
    assert execution_steps(cfg, 4) == 4 and execution_steps(cfg, 35) == 7 and execution_steps(cfg, 37) == 1
    one = run(load_config(None, common + ["name=one", "train.steps_per_execution=1"])).history
    auto = run(load_config(None, common + ["name=auto"])).history
    for a, b in zip(one, auto):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
