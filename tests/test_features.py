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


@pytest.fixture
def no_outputs(monkeypatch):
    """Runs without the evaluation, plots and report (kfine.train.finish_run), for tests that
    compare what training did and printed."""
    monkeypatch.setattr("kfine.train.finish_run", lambda *a, **k: None)


def head_kernels(model):
    return [np.array(w) for layer in model.layers if layer.name.startswith("head_") for w in layer.get_weights()]


def test_cached_and_uncached_head_training_give_the_same_head(tmp_path, folder, capsys, monkeypatch):
    common = overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "train.epochs=2", "data.augment.enabled=false",
                       "train.optimizer.name=sgd", "train.optimizer.momentum=0.9", "train.schedule.learning_rate=0.05")
    features._RECENT.clear()   # an earlier test may have left the same features in memory
    before = features.COMPUTED["features"]
    cached = run(load_config(None, common + ["name=cached"]))
    assert features.COMPUTED["features"] == before + 1
    assert "the head trains on cached backbone features" in capsys.readouterr().out
    plain = run(load_config(None, common + ["name=plain", "train.feature_cache=off"]))
    assert "no feature cache: train.feature_cache is off" in capsys.readouterr().out
    a, b = head_kernels(cached.model), head_kernels(plain.model)
    with monkeypatch.context() as m:   # the head after one epoch (training went on in the second)
        m.setattr("kfine.train.finish_run", lambda *a, **k: None)
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
def test_no_cache_where_features_could_change(tmp_path, folder, capsys, no_outputs, extra, why):
    before = features.COMPUTED["features"]
    run(load_config(None, overrides(tmp_path, folder, *SCRATCH, "train.epochs=1", *extra)))
    assert features.COMPUTED["features"] == before
    assert why in capsys.readouterr().out


def test_a_search_computes_the_features_once_for_all_its_trials(tmp_path, folder):
    from kfine.tune import search
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "train.epochs=2",
                                      "data.augment.enabled=false",
                                      "search.max_trials=2", "search.tuner=grid",
                                      "search.space={train.schedule.learning_rate: {type: choice, values: [0.1, 0.01]}}"))
    features._RECENT.clear()
    before = features.COMPUTED["features"]
    result = search(cfg)
    assert len([r for r in result.rows if r["score"] != ""]) == 2
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


def test_steps_per_execution_gives_the_same_history(tmp_path, folder, no_outputs):
    from kfine.fit import execution_steps
    common = overrides(tmp_path, folder, *SCRATCH, "train.epochs=2", "data.augment.enabled=false",
                       "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]")
    cfg = load_config(None, common)
    assert execution_steps(cfg, 4) == 4 and execution_steps(cfg, 35) == 7 and execution_steps(cfg, 37) == 1
    one = run(load_config(None, common + ["name=one", "train.steps_per_execution=1"])).history
    auto = run(load_config(None, common + ["name=auto"])).history
    for a, b in zip(one, auto):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- the draw: which examples a batch holds
def fit_labels(monkeypatch) -> list:
    """Per fit of a run: (the label batches it trained on, in order, steps per epoch, epochs).
    Recorded as fit draws them: a seeded tf.data pipeline iterated again draws anew."""
    import keras
    import tensorflow as tf
    seen, fit = [], keras.Model.fit

    def spy(self, x=None, *args, **kwargs):
        batches = []

        def record(y):
            batches.append(y.numpy())
            return y

        def recorded(a, y):
            out = tf.py_function(record, [y], y.dtype)
            out.set_shape(y.shape)
            return a, out
        x = x.map(recorded)
        seen.append((batches, kwargs["steps_per_epoch"], kwargs["epochs"] - kwargs.get("initial_epoch", 0)))
        return fit(self, x, *args, **kwargs)
    monkeypatch.setattr(keras.Model, "fit", spy)
    return seen


def test_balanced_sampling_draws_the_same_minority_share_with_and_without_the_cache(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "d", "single", classes=("big", "small"), per_class=27)
    for p in sorted((root / "small").iterdir())[3:]:
        p.unlink()                                                 # 27 vs 3 images: 9:1
    common = overrides(tmp_path, root, *SCRATCH, HEAD_ONLY, "train.epochs=3", "data.augment.enabled=false",
                       "data.sampling=balanced", "data.check=false")
    shares = {}
    for name, extra in (("cached", []), ("plain", ["train.feature_cache=off"])):
        with monkeypatch.context() as m:
            seen = fit_labels(m)
            m.setattr("kfine.train.finish_run", lambda *a: None)   # training is what is compared
            run(load_config(None, common + [f"name={name}", *extra]))
        (labels, steps, epochs), = seen
        shares[name] = [np.mean(np.concatenate(labels[e * steps:(e + 1) * steps]) == 1) for e in range(epochs)]
    out = capsys.readouterr().out
    assert "the head trains on cached backbone features" in out and "train.feature_cache is off" in out
    assert np.mean(shares["plain"]) > 0.3                          # balanced: not the 1/10 of the files
    np.testing.assert_allclose(shares["cached"], shares["plain"], atol=0.05)


def image_draw(cfg, ds, batches: int) -> list[np.ndarray]:
    """Positions in ds.files["train"] of the images in the first ``batches`` batches of the
    uncached training pipeline, built as kfine.train builds it (augmentation off: each image is
    its eval view, found again by its pixels)."""
    from kfine.fit import drops_remainder, steps_per_epoch
    pipe = ds.dataset("train", drop_remainder=drops_remainder(cfg), epoch=0, steps=steps_per_epoch(cfg, ds))
    ref = np.stack([x.numpy().ravel() for x, _ in ds.dataset("train", train=False, batch=False)])
    out = []
    for x, _ in pipe.take(batches):
        x = x.numpy().reshape(len(x), 1, -1)
        out.append(np.abs(x - ref[None]).sum(-1).argmin(1))
    return out


def feature_draw(cfg, ds, batches: int) -> list[np.ndarray]:
    """The same for the cached-feature pipeline: feature i of image i is i."""
    from kfine.fit import drops_remainder, steps_per_epoch
    n = len(ds.files["train"])
    feats = features.Features(np.arange(n, dtype=np.float32).reshape(1, n, 1),
                              np.array([y for _, y in ds.files["train"]], np.int32), None, None, "draw")
    train, _ = features.feature_datasets(feats, cfg.data.batch_size, ds.seed, 0, steps_per_epoch(cfg, ds),
                                         drops_remainder(cfg), sampling=cfg.data.sampling)
    return [x.numpy()[:, 0].astype(int) for x, _ in train.take(batches)]


# Every data.* and train.* key (and the augment keys that mix examples), by what it does to which
# examples a training batch holds. DRAW: the keys that change them, each with overrides that
# exercise it: the cached-feature pipeline must draw the same examples as the image pipeline, or
# cache_reason must refuse (the expected reason). A new key goes in one of the two lists.
DRAW = {
    "data.sampling": (["data.sampling=balanced"], None),
    "data.batch_size": (["data.batch_size=5", "data.sampling=balanced"], None),
    "data.limit_per_class": (["data.limit_per_class=9"], None),
    "data.val_fraction": (["data.val_fraction=0.4"], None),
    "train.steps_per_epoch": (["train.steps_per_epoch=2", "data.sampling=balanced"], None),
    "train.drop_remainder": (["train.drop_remainder=true", "data.batch_size=5"], None),
    "train.jit_compile": (["train.jit_compile=true", "data.batch_size=5"], None),   # drop_remainder: null follows it
    "train.accumulate_steps": (["train.accumulate_steps=3"], None),
    "seed": (["seed=3", "data.sampling=balanced"], None),
    "data.augment.mixup": (["data.augment.enabled=true", "data.augment.mixup.alpha=0.4"], "mixup blends"),
    "data.augment.cutmix": (["data.augment.enabled=true", "data.augment.cutmix.alpha=1.0"], "cutmix pastes"),
}
NOT_DRAW = {   # key: why it leaves the draw alone (or where it is handled)
    **{f"data.{k}": "picks the file list, which both pipelines draw from (and the feature key holds)" for k in (
        "source", "root", "layout", "name", "data_dir", "train_split", "val_split", "test_split", "image_key",
        "label_key", "download", "test_fraction", "splits", "max_pixels", "on_bad_image")},
    **{f"data.{k}": "how each image looks, not which: in the feature key" for k in (
        "image_size", "cache_size", "eval_transform", "cache", "cache_dir")},
    "data.check": "the audit only",
    "data.view_path": "both view paths cut the same views from the same seeds (tests/test_pipeline.py)",
    "data.deterministic": "the cache draws what deterministic tf.data draws; off only lets neighbouring images swap",
    "data.augment": "per-image views: kfine.augment.reusable_features and the feature key; mixing keys are in DRAW",
    "data.augment.mix_off_epochs": "only with mixup/cutmix, which are refused",
    "train.class_weight": "weights each example's loss (fit gets it on both paths), draws nothing",
    "train.phases": "which epochs a fit covers; the draw of each epoch follows the per-epoch seeding (resume)",
    **{f"train.{k}": "how the model trains, not on which examples" for k in (
        "epochs", "optimizer", "schedule", "lr_multipliers", "layer_decay", "ema", "label_smoothing",
        "precision", "feature_cache", "feature_cache_views", "steps_per_execution", "restore_best", "checkpoint",
        "early_stopping", "wandb", "verbose", "scale_lr_with_batch", "lr_base_batch")},
}


def test_every_data_and_train_key_is_classified_for_the_feature_cache():
    import dataclasses
    from kfine.config import DataConfig, TrainConfig
    keys = ({f"data.{f.name}" for f in dataclasses.fields(DataConfig)}
            | {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
            | {f"data.augment.{k}" for k in ("mixup", "cutmix", "mix_off_epochs")})
    unclassified = keys - set(DRAW) - set(NOT_DRAW)
    assert not unclassified, f"classify in DRAW or NOT_DRAW (tests/test_features.py): {sorted(unclassified)}"


@pytest.mark.parametrize("key", sorted(DRAW))
def test_the_cache_draws_what_uncached_training_draws_or_is_refused(tmp_path, folder, key):
    from kfine import data
    from kfine.freeze import apply_freeze
    from kfine.model import build_model
    from kfine.fit import steps_per_epoch
    extra, refused = DRAW[key]
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "train.epochs=3",
                                      "data.augment.enabled=false", *extra))
    ds = data.make_datasets(cfg.data, cfg.seed)
    model = build_model(cfg.model, len(ds.class_names), cfg.data.image_size)
    phase = cfg.train.phases[0]
    apply_freeze(model, cfg.model.backbone, phase.freeze, phase.bn)
    reason = features.cache_reason(model, cfg, phase, cfg.train.epochs)
    if refused:
        assert reason is not None and refused in reason
        return
    assert reason is None
    batches = cfg.train.epochs * steps_per_epoch(cfg, ds)
    cached, plain = feature_draw(cfg, ds, batches), image_draw(cfg, ds, batches)
    assert [b.tolist() for b in cached] == [b.tolist() for b in plain]


# ----------------------------------------------------------------------------- the feature key
def test_the_same_backbone_built_again_or_in_a_fresh_process_reuses_its_features(tmp_path, folder):
    from kfine import data
    from kfine.config import FreezeConfig
    from kfine.freeze import apply_freeze
    from kfine.model import build_model
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, "data.augment.enabled=false",
                                      "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"))
    ds = data.make_datasets(cfg.data, cfg.seed)
    first = build_model(cfg.model, 3, (32, 32))

    def again():   # the same backbone: another build (other generated layer names), the same weights
        model = build_model(cfg.model, 3, (32, 32))
        model.set_weights(first.get_weights())
        return model
    features._RECENT.clear()
    before = features.COMPUTED["features"]
    assert features.get_features(first, ds, cfg).source == "computed"
    assert features.get_features(again(), ds, cfg).source == "memory"
    other_freeze = again()   # another head-only freeze spec: only layers without variables train
    apply_freeze(other_freeze, cfg.model.backbone, FreezeConfig(strategy="regex", pattern="_act$"))
    assert features.get_features(other_freeze, ds, cfg).source == "memory"
    features._RECENT.clear()   # a fresh process: nothing in memory, the disk cache of the first
    assert features.get_features(again(), data.make_datasets(cfg.data, cfg.seed), cfg).source == "disk"
    assert features.COMPUTED["features"] == before + 1


KEY_FIELDS = {   # field: overrides (a model with the base backbone's weights unless "weights")
    "weights": [],
    "backbone config": ["model.scratch.activation=gelu"],
    "image size": ["data.image_size=[24,24]"],
    "eval transform": ["data.eval_transform=squash"],
    "cache size": ["data.cache_size=44"],
    "augmentation settings": ["data.augment.brightness=0.3"],
    "augmentation off": ["data.augment.enabled=false"],
    "views K": ["train.feature_cache_views=3"],
    "file list": ["data.limit_per_class=10"],
    "seed": ["seed=1"],
    "code version": [],
}


@pytest.fixture(scope="module")
def base_key(folder, tmp_path_factory):
    from kfine import data
    from kfine.model import build_model
    cfg = load_config(None, overrides(tmp_path_factory.mktemp("key"), folder, *SCRATCH, HEAD_ONLY))
    model = build_model(cfg.model, 3, cfg.data.image_size)
    return model, features.feature_key(model, data.make_datasets(cfg.data, cfg.seed), cfg)


@pytest.mark.parametrize("field", list(KEY_FIELDS))
def test_a_change_of_any_key_field_is_another_key(tmp_path, folder, base_key, monkeypatch, field):
    from kfine import data
    from kfine.model import build_model, get_backbone
    base_model, base = base_key
    cfg = load_config(None, overrides(tmp_path, folder, *SCRATCH, HEAD_ONLY, *KEY_FIELDS[field]))
    ds = data.make_datasets(cfg.data, cfg.seed)
    model = build_model(cfg.model, 3, cfg.data.image_size)
    get_backbone(model).set_weights(get_backbone(base_model).get_weights())
    if field == "code version":
        assert features.feature_key(model, ds, cfg) == base   # the same build, the same key ...
        monkeypatch.setattr(features, "FEATURES_VERSION", features.FEATURES_VERSION + 1)
    if field == "weights":
        assert features.feature_key(model, ds, cfg) == base
        conv = get_backbone(model).get_layer("block1_conv")
        conv.kernel.assign(conv.kernel * 2)
    assert features.feature_key(model, ds, cfg) != base      # ... one field changed: another key
