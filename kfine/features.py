"""Frozen-feature cache: in a phase where the backbone cannot change, train the head on backbone
features computed once instead of running the backbone every epoch.

When no backbone variable trains and every BatchNorm layer runs in inference mode, the pooled
features ``backbone(preprocess(image))`` are a pure function of the image. kfine then computes
them once per run (or finds them computed: in this process, or on disk beside the image cache
with ``data.cache: disk``) and fits ``head_model(model)``: the model's own head layers called on
``keras.Input((feature_dim,))``. Those are the very layer objects of the full model, so the full
model sees the trained head with no copy, the one optimizer keeps its state for the next
(unfreezing) phase, and checkpoints, history, resume and export are those of the full model.

Augmentation: without it the head sees exactly the features the full model would compute
(tested: the same head weights as uncached training). With it, ``train.feature_cache_views``
(K, default 2) augmented views of every image are computed once and epoch e trains on view
e mod K: K backbone passes instead of one per epoch, at the price of the head seeing K distinct
augmentations instead of one per epoch. K = the phase's epochs is uncached training's
distribution at no saving.

The head trains on the examples uncached training would draw: the same permutation of the whole
index per epoch, or with ``data.sampling: balanced`` the image pipeline's own balanced draw
(kfine.pipeline.balanced) over positions in the file list, batched and repeated as kfine.train
batches images (batch size, drop_remainder, steps per epoch); cache_reason refuses what it cannot
draw (MixUp/CutMix blend pairs of images: kfine.augment.reusable_features). With balanced
sampling and augmentation, an image drawn more than once in an epoch (a small class's) is the
same cached view each time, where uncached training augments every draw anew.

The cache is keyed by everything that changes the features: the backbone's weights (a hash of
their values, so random, ImageNet and local weights are told apart), its config (preprocessing,
architecture, pooling, dtype policy; without the layer names Keras generates per process, so the
same backbone built twice, or in another process, gets the same key), the image cache (file list,
content hashes, cache size), the image size and eval transform, the augmentation settings and
seed, K, the train/val file lists and FEATURES_VERSION. Search trials, comparison runs and
notebook reruns with the same key reuse it (``COMPUTED`` counts what was computed, for tests).
"""
from __future__ import annotations

import hashlib
import json
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kfine.pipeline import RecentCache

# Part of every feature key. Bump it when a code change alters the features computed from the same
# images and weights: the crop/flip/affine/jitter or eval-transform code (kfine.pipeline), the
# per-image recipes (kfine.augment), or the feature pass here; disk caches written by older code
# are then recomputed, never reused.
FEATURES_VERSION = 3
SAMPLINGS = ("uniform", "balanced")   # the data.sampling draws feature_datasets makes

COMPUTED = Counter()            # feature sets computed in this process
_PARTS = weakref.WeakKeyDictionary()   # model -> (feature_extractor, head_model): built and traced once
_RECENT = RecentCache(2)        # the last feature sets, by key (bounded: they can be large)


@dataclass
class Features:
    """Pooled backbone features of the train split (K views) and the val split."""
    train: np.ndarray            # (K, N, D) float32, in the order of datasets.files["train"]
    train_labels: np.ndarray     # (N,) int32
    val: np.ndarray | None       # (M, D) eval views
    val_labels: np.ndarray | None
    key: str
    source: str = "computed"     # computed | memory | disk


def cache_reason(model, cfg, phase, epochs: int) -> str | None:
    """None when ``phase`` (already applied with kfine.freeze.apply_freeze), training for
    ``epochs`` epochs, can train on cached features and gains from it; else why not (logged).
    Every data option that changes which examples a batch holds is drawn alike by
    feature_datasets or refused here (tests/test_features.py lists them)."""
    from kfine.augment import reusable_features
    from kfine.distribute import feature_cache_reason
    from kfine.freeze import features_frozen
    distributed = feature_cache_reason()   # a distributed run: the feature pipeline is not sharded
    if distributed:
        return distributed
    if cfg.train.feature_cache is False:   # YAML reads "off" as false
        return "train.feature_cache is off"
    frozen, why = features_frozen(model, phase)
    if not frozen:
        return why
    reusable, why = reusable_features(cfg.data.augment)   # MixUp/CutMix: batches of blended pairs
    if not reusable:
        return why
    if cfg.data.sampling not in SAMPLINGS:
        return f"data.sampling: {cfg.data.sampling} has no draw over cached features ({', '.join(SAMPLINGS)} do)"
    k = views(cfg)
    if k >= epochs:
        return (f"the phase trains {epochs} epoch{'s' if epochs > 1 else ''}: computing {k} cached "
                f"view{'s' if k > 1 else ''} would cost as much as training without them")
    return None


def views(cfg) -> int:
    return cfg.train.feature_cache_views if cfg.data.augment.enabled else 1


def _layer_config(layer) -> str:
    """``layer.get_config()`` as JSON, with the name of every layer of a functional model (and of
    the model itself) replaced by its position: Keras numbers the names it generates per process
    (``input_layer``, ``input_layer_1``, ...), which would give the same backbone built twice
    another key. ``trainable`` flags are left out too: features are only computed where nothing
    in the backbone trains (cache_reason), whichever freeze spec got it there. What a layer
    computes is in the rest of the config and in its weights."""
    config = layer.get_config()
    names = {}

    def collect(x):
        if isinstance(x, dict):
            if isinstance(x.get("layers"), list):
                for sub in x["layers"]:
                    if isinstance(sub, dict) and isinstance(sub.get("name"), str):
                        names.setdefault(sub["name"], f"#{len(names)}")
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    def canon(x):
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items() if k != "trainable"}
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return names.get(x, x) if isinstance(x, str) else x

    collect(config)
    config = canon(config)
    if isinstance(config, dict):
        config.pop("name", None)   # the model's own name
    return json.dumps(config, sort_keys=True, default=str)


def _weights_hash(layers) -> str:
    h = hashlib.sha1()
    for layer in layers:
        h.update(_layer_config(layer).encode())
        for w in layer.weights:
            h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()


def feature_key(model, datasets, cfg) -> str:
    from kfine.schema import to_dict
    from kfine.model import get_backbone
    from kfine.pipeline import cache_key
    d = datasets.config
    spec = {"v": FEATURES_VERSION, "weights": _weights_hash([model.get_layer("preprocess"), get_backbone(model)]),
            "images": cache_key(datasets.cache.keys, datasets.index.info, d), "image_size": list(d.image_size),
            "cache_size": d.cache_size, "eval_transform": d.eval_transform, "views": views(cfg),
            "augment": to_dict(d.augment) if d.augment.enabled else None, "seed": datasets.seed,
            "files": {s: datasets.files.get(s) for s in ("train", "val")}}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:20]


def feature_extractor(model) -> keras.Model:
    """image -> pooled backbone features, sharing the model's preprocessing and backbone."""
    from kfine.model import get_backbone
    inputs = keras.Input(model.input_shape[1:])
    return keras.Model(inputs, get_backbone(model)(model.get_layer("preprocess")(inputs)))


def model_parts(model) -> tuple[keras.Model, keras.Model]:
    """(feature_extractor(model), head_model(model)), built once per model object: the feature
    pass and the evaluation of the same model then share one compiled extractor (Keras traces a
    model's predict function once per input shape). They share the model's layers and variables,
    so weights assigned to the model later (the best epoch's) are theirs too."""
    parts = _PARTS.get(model)
    if parts is None:
        parts = _PARTS[model] = (feature_extractor(model), head_model(model))
    return parts


def extractor_of(model) -> keras.Model | None:
    """The extractor model_parts built for ``model`` in this process (its predict function traced
    by the feature pass), or None."""
    parts = _PARTS.get(model)
    return parts[0] if parts is not None else None


def predict_padded(model, x: np.ndarray, size: int) -> np.ndarray:
    """``model.predict_on_batch(x)`` with a batch of fewer than ``size`` images padded to ``size``
    (copies of its last image) and the padding dropped: a split's last partial batch does not make
    Keras trace the predict function again for its shape (only a Keras model is padded: another
    object with a ``predict_on_batch`` traces nothing). Inference mode: images do not interact."""
    n = len(x)
    if 0 < n < size and isinstance(model, keras.Model):
        x = np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])
    return np.asarray(model.predict_on_batch(x))[:n]


def head_model(model) -> keras.Model:
    """The model's head layers (everything after the backbone, up to the model's output) on a
    features input: the same layer objects, so training it trains the full model's head."""
    from kfine.model import get_backbone
    backbone = get_backbone(model)
    after = model.layers[model.layers.index(backbone) + 1:]
    inputs = keras.Input(backbone.output_shape[1:], name="features")
    x = inputs
    for layer in after:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


def _run(extractor, ds, size: int) -> np.ndarray:
    # predict_on_batch: Keras' compiled predict step (tf.function / jax.jit), 1.7x an eager call
    # of ResNet50 on this CPU (graph mode fuses conv + BN + ReLU); numpy in: jax.jit takes no tf.Tensor;
    # batches padded to ``size`` (the data's batch size): one traced shape for every split
    out = [np.asarray(predict_padded(extractor, x, size), np.float32) for x, _ in ds.as_numpy_iterator()]
    return np.concatenate(out) if out else np.zeros((0, extractor.output_shape[-1]), np.float32)


def get_features(model, datasets, cfg) -> Features:
    """The features of ``datasets`` under ``model``'s backbone: reused when the key matches
    (this process, or the disk cache), else computed (one backbone pass per view) and kept."""
    from kfine.pipeline import cache_root
    key = feature_key(model, datasets, cfg)
    feats = _RECENT.lookup(key)
    if feats is not None:
        feats.source = "memory"
        return feats
    disk = cache_root(datasets.config) / "features" / f"{key}.npz" if datasets.config.cache == "disk" else None
    if disk is not None and disk.is_file():
        with np.load(disk) as z:
            feats = Features(z["train"], z["train_labels"], z["val"] if z["val"].size else None,
                             z["val_labels"] if z["val"].size else None, key, "disk")
    else:
        feats = _compute(model, datasets, cfg, key)
        if disk is not None:
            _save(feats, disk)
    return _RECENT.keep(key, feats)


def _compute(model, datasets, cfg, key: str) -> Features:
    extractor, size = model_parts(model)[0], cfg.data.batch_size
    k = views(cfg)
    train = np.stack([_run(extractor, datasets.dataset("train", train=k > 1 or cfg.data.augment.enabled,
                                                       shuffle=False, seed=datasets.seed + v), size)
                      for v in range(k)])
    labels = np.array([y for _, y in datasets.files["train"]], np.int32)
    val = val_labels = None
    if datasets.val is not None:
        val = _run(extractor, datasets.dataset("val"), size)
        val_labels = np.array([y for _, y in datasets.files["val"]], np.int32)
    COMPUTED["features"] += 1
    return Features(train, labels, val, val_labels, key)


def _save(feats: Features, path: Path) -> None:
    import io
    from kfine.rundir import atomic_write_bytes
    buf = io.BytesIO()
    np.savez(buf, train=feats.train, train_labels=feats.train_labels,
             val=feats.val if feats.val is not None else np.zeros((0,), np.float32),
             val_labels=feats.val_labels if feats.val_labels is not None else np.zeros((0,), np.int32))
    atomic_write_bytes(path, buf.getvalue())


def feature_datasets(feats: Features, batch_size: int, seed: int, start_epoch: int, steps: int,
                     drop_remainder: bool = False, sampling: str = "uniform"):
    """(train, val) tf.data of (features, label) batches. Train: epochs ``start_epoch``,
    ``start_epoch + 1``, ... of ``steps`` batches, each epoch the image pipeline's draw of it
    (kfine.pipeline.pass_order with ``sampling``, data.sampling: a function of the seed and the
    epoch; positions in the file list stand in for cache slots), view ``epoch mod K``."""
    import tensorflow as tf
    from kfine.pipeline import epoch_stream, one_pass_options, pass_order
    k = feats.train.shape[0]
    labels = tf.constant(feats.train_labels)

    def gather(e, idx):
        x = tf.numpy_function(lambda v, i: feats.train[int(v)][i], [e % k, idx], tf.float32, stateful=False)
        x.set_shape([None, feats.train.shape[2]])
        return x, tf.gather(labels, idx)

    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling {sampling!r}: feature_datasets draws {', '.join(SAMPLINGS)}")

    def one_pass(e, part):
        return (tf.data.Dataset.from_tensor_slices(pass_order(feats.train_labels, seed, e, part, sampling))
                .batch(batch_size, drop_remainder=drop_remainder).map(lambda idx: gather(e, idx)))

    train = epoch_stream(start_epoch, steps, one_pass).prefetch(tf.data.AUTOTUNE).with_options(one_pass_options())
    val = None
    if feats.val is not None:
        val = tf.data.Dataset.from_tensor_slices((feats.val, feats.val_labels)).batch(batch_size)
        val = val.with_options(one_pass_options())
    return train, val


def describe(feats: Features, seconds: float) -> str:
    k, n, d = feats.train.shape
    how = {"computed": f"computed in {seconds:.1f} s", "memory": "reused from this process",
           "disk": "read from the disk cache"}[feats.source]
    return (f"the head trains on cached backbone features ({n} images x {k} view{'s' if k > 1 else ''}, "
            f"{d} features each; {how})")


def timed_features(model, datasets, cfg) -> tuple[Features, float]:
    t = time.perf_counter()
    feats = get_features(model, datasets, cfg)
    return feats, time.perf_counter() - t
