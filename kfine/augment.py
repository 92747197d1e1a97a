"""Augmentation recipes: named tf.data ops built from Keras' own preprocessing layers.

    data.augment.recipe: basic | randaugment | augmix     per image, before .batch()
    data.augment.random_erasing: {probability: 0.25}       per image, after the recipe
    data.augment.mixup / cutmix: {alpha, probability}      per batch, after .batch(): soft labels

The pipeline's own random-resized-crop / flip / colour jitter come first (``basic`` adds nothing
to them). Two entry points for the pipeline, each None when there is nothing to do:

    op = per_image_ops(aug, seed)        op(image float32 (H, W, 3) 0..255, seed int64[2]) -> image
    mix = batch_ops(aug, num_classes)    mix(images (B, H, W, 3), labels int (B,), seed int64[2])
                                             -> (images, soft labels float32 (B, C))

Both are ``tf.function``s: inside them Keras' preprocessing layers see a TF graph and switch to
the TensorFlow backend (keras.src.layers.preprocessing.data_layer), so they run in tf.data, and
when called eagerly, under the JAX backend too.

What Keras' layers do that shapes this module (read in Keras 3.15's source, and tested):
- Their randomness comes from their own SeedGenerator (a TF variable), not from a seed
  argument (only ints and SeedGenerators are accepted). MixUp, CutMix and RandomErasing take
  their draws through ``get_random_transformation(seed=...)``: kfine hands them a SeedGenerator
  that derives every seed from the per-image / per-batch stateless seed (``StatelessSeeds``), so
  their draws are a function of (run seed, epoch, position) like kfine's crop/flip/jitter: the
  same run to run and after a resume. RandAugment and AugMix draw inside from their own and
  their sub-layers' generators: which image gets which draw depends on the order parallel map
  workers reach them, so those two recipes are not reproducible run to run (nor across a resume);
  the per-image ``seed`` tensor drives kfine's own choice among them (the AugMix variant).
- RandAugment draws its ops per call, so per image here (on a batch it would give every image
  of the batch the same ops).
- AugMix picks its chains' ops with Python's ``random`` when the graph is traced: in tf.data
  that would fix the ops for the whole run. kfine traces AUGMIX_VARIANTS copies and picks one
  per image with the stateless seed.
- CutMix weights the labels by the continuous box area while it pastes whole pixels (up to
  2.4 points apart at 32 px). kfine passes each image's batch index as a segmentation mask,
  which CutMix moves with the pixels, and weights the labels by the pixels actually pasted
  (timm's ``correct_lam``). MixUp blends pixels and labels with the same weight already.
- Layers are built in float32 whatever the mixed-precision policy (0..255 pixels in float16
  lose blending precision).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from kfine.schema import AugmentConfig

AUGMIX_VARIANTS = 8          # traced AugMix op structures to pick from per image


# ----------------------------------------------------------------------------- per-image ops
class GraphEqualization(keras.layers.Equalization):
    """keras.layers.Equalization with its TensorFlow histogram inside a TF graph.

    Keras 3.15 picks the histogram by the global backend: under JAX, even inside tf.data where
    the layer runs on TensorFlow, it unrolls 256 masked sums per channel (RandAugment's graph:
    23,000 ops instead of 1,600; ~5x slower per image, ~15 s more per iterator)."""

    def _custom_histogram_fixed_width(self, values, value_range, nbins):
        if self.backend.name != "tensorflow":
            return super()._custom_histogram_fixed_width(values, value_range, nbins)
        lo, hi = float(value_range[0]), float(value_range[1])
        scaled = (tf.cast(values, tf.float32) - lo) * (nbins - 1) / (hi - lo)
        index = tf.clip_by_value(tf.cast(scaled, tf.int32), 0, nbins - 1)
        return tf.math.bincount(tf.reshape(index, [-1]), minlength=nbins, maxlength=nbins)


def _with_tf_equalization(layer):
    layer.equalization = GraphEqualization(value_range=layer.value_range, dtype="float32")
    return layer


def _randaugment(aug: AugmentConfig, seed: int):
    c = aug.randaugment
    return _with_tf_equalization(keras.layers.RandAugment(
        value_range=(0, 255), num_ops=c.num_ops, factor=c.magnitude, seed=seed, dtype="float32"))


def _augmix(aug: AugmentConfig, seed: int):
    c = aug.augmix
    return _with_tf_equalization(keras.layers.AugMix(
        value_range=(0, 255), num_chains=c.num_chains, chain_depth=c.chain_depth, factor=c.magnitude,
        alpha=c.alpha, all_ops=c.all_ops, seed=seed, dtype="float32"))


# name -> constructor of the Keras layer applied per image (None: nothing beyond the basic ops)
RECIPES = {
    "basic": lambda aug, seed: None,
    "randaugment": _randaugment,
    "augmix": _augmix,
}


class StatelessSeeds(keras.random.SeedGenerator):
    """A SeedGenerator whose seeds are folded from a stateless int64[2] seed tensor (the Nth
    draw gets fold_in(seed, N)): a Keras preprocessing layer given it as ``seed`` draws the same
    for the same seed tensor, whatever it drew before. Holds no variable."""

    def __init__(self, seed):   # noqa: super().__init__ would create the state variable
        self.seed, self.count = seed, 0

    def next(self, ordered=True):
        self.count += 1
        return tf.random.experimental.stateless_fold_in(self.seed, self.count)


class _Seeded:
    """Mixin for a Keras preprocessing layer: ``seeded(data, seed)`` is ``layer(data)`` with its
    random transformation drawn from ``seed`` (int64[2], ``StatelessSeeds``), not its generator.
    (A seed inside ``data`` would be cast to the layer's float dtype.)"""
    draw_seed = None

    def seeded(self, data, seed):
        self.draw_seed = seed   # read while this call is traced
        try:
            return self(data)
        finally:
            self.draw_seed = None

    def get_random_transformation(self, data, training=True, seed=None):
        return super().get_random_transformation(data, training, StatelessSeeds(self.draw_seed))


class SeededMixUp(_Seeded, keras.layers.MixUp):
    pass


class SeededCutMix(_Seeded, keras.layers.CutMix):
    pass


class SeededRandomErasing(_Seeded, keras.layers.RandomErasing):
    pass


def _random_erasing(aug: AugmentConfig, seed: int):
    c = aug.random_erasing
    p = float(c.probability)
    return SeededRandomErasing(factor=(p, p), scale=tuple(c.scale), fill_value=c.fill,
                               value_range=(0, 255), seed=seed, dtype="float32")


def _apply_recipe(layer, name: str, image, seed):
    if name == "augmix":   # a traced variant per image: see the module docstring
        i = tf.random.stateless_uniform([], seed, 0, AUGMIX_VARIANTS, tf.int32)
        return tf.switch_case(i, [lambda: layer(image) for _ in range(AUGMIX_VARIANTS)])
    return layer(image)


def per_image_ops(aug: AugmentConfig, seed: int = 0):
    """The recipe's per-image op (recipe, then random erasing), or None when there is none.

    The op maps a float32 (H, W, 3) image in 0..255 and an int64[2] stateless seed to a float32
    image of the same shape, clipped to 0..255. The settings are checked with the rest of the
    config (kfine.checks.CHECKS) before any data is read."""
    if not aug.enabled:
        return None
    recipe = RECIPES[aug.recipe](aug, seed)
    erasing = _random_erasing(aug, seed + 1) if aug.random_erasing.probability > 0 else None
    if recipe is None and erasing is None:
        return None

    @tf.function(reduce_retracing=True)
    def op(image, seed):
        shape = image.shape
        x = tf.cast(image, tf.float32)
        if recipe is not None:
            x = _apply_recipe(recipe, aug.recipe, x, seed)
        if erasing is not None:
            x = erasing.seeded(x, tf.random.experimental.stateless_fold_in(seed, 2))
        x = tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 255.0)
        x.set_shape(shape)
        return x

    return op


# ----------------------------------------------------------------------------- batch ops
def _mix_weights(aug: AugmentConfig) -> tuple[float, float]:
    """(probability of MixUp, probability of CutMix) for a batch."""
    pm = aug.mixup.probability if aug.mixup.alpha > 0 else 0.0
    pc = aug.cutmix.probability if aug.cutmix.alpha > 0 else 0.0
    return float(pm), float(pc)


def _mixup(layer, images, labels, seed):
    out = layer.seeded({"images": images, "labels": labels}, seed)
    return out["images"], out["labels"]


def _cutmix(layer, images, labels, seed):
    """CutMix with labels weighted by the pixels pasted (see the module docstring)."""
    b = tf.shape(images)[0]
    index = tf.cast(tf.range(b), tf.float32)[:, None, None, None]
    owner = tf.broadcast_to(index, tf.concat([tf.shape(images)[:3], [1]], 0))
    out = layer.seeded({"images": images, "labels": labels, "segmentation_masks": owner}, seed)
    source = tf.cast(tf.round(out["segmentation_masks"][..., 0]), tf.int32)        # (B, H, W)
    share = tf.reduce_mean(tf.one_hot(source, b, dtype=tf.float32), axis=[1, 2])   # (B, B)
    return out["images"], tf.matmul(share, labels)


def batch_ops(aug: AugmentConfig, num_classes: int, seed: int = 0, active=None):
    """MixUp / CutMix over a batch, or None when both are off (or augmentation is disabled).

    Returns ``mix(images, labels, seed, on=True) -> (images float32, soft labels float32 (B, C))``.
    Per batch, one draw from ``seed`` picks MixUp (probability mixup.probability), CutMix (the next
    cutmix.probability) or neither (one-hot labels). No batch is mixed while ``active`` (an
    optional boolean tf.Variable) is False, nor where ``on`` (a boolean tensor: the training
    stream's ``epoch < mixing_epochs``) is False: the switch-off of the last ``mix_off_epochs``
    epochs."""
    pm, pc = _mix_weights(aug)
    if not aug.enabled or pm + pc == 0:
        return None
    mixup = SeededMixUp(alpha=aug.mixup.alpha, seed=seed + 2, dtype="float32") if pm else None
    a = float(aug.cutmix.alpha)
    cutmix = SeededCutMix(factor=(a, a), seed=seed + 3, dtype="float32") if pc else None

    @tf.function(reduce_retracing=True)
    def mix(images, labels, seed, on=True):
        x = tf.cast(images, tf.float32)
        y = tf.one_hot(tf.reshape(tf.cast(labels, tf.int32), [-1]), num_classes, dtype=tf.float32)
        u = tf.random.stateless_uniform([], seed)
        which = tf.where(u < pm, 1, tf.where(u < pm + pc, 2, 0))
        if active is not None:
            which = tf.where(tf.cast(active, tf.bool), which, 0)
        which = tf.where(tf.cast(on, tf.bool), which, 0)
        draws = tf.random.experimental.stateless_fold_in(seed, 1)   # the layer's own draws
        branches = [lambda: (x, y),
                    (lambda: _mixup(mixup, x, y, draws)) if mixup else (lambda: (x, y)),
                    (lambda: _cutmix(cutmix, x, y, draws)) if cutmix else (lambda: (x, y))]
        out_x, out_y = tf.switch_case(which, branches)
        out_x = tf.ensure_shape(tf.cast(out_x, tf.float32), x.shape)
        return out_x, tf.ensure_shape(tf.cast(out_y, tf.float32), y.shape)

    return mix


def mixing_epochs(aug: AugmentConfig, epochs: int) -> int:
    """Epochs [0, n) mix batches; from epoch n on (the last ``mix_off_epochs``) none do."""
    return max(0, int(epochs) - int(aug.mix_off_epochs))


# ----------------------------------------------------------------------------- checks
def reusable_features(aug: AugmentConfig) -> tuple[bool, str]:
    """Whether a frozen backbone's features of an augmented view can be cached and reused
    across epochs as far as the recipe is concerned, and why not."""
    if not aug.enabled:
        return True, "augmentation is off"
    why = []
    if aug.recipe != "basic":
        why.append(f"recipe {aug.recipe} draws new ops for every image each epoch")
    if aug.random_erasing.probability > 0:
        why.append("random_erasing erases a new patch each epoch")
    pm, pc = _mix_weights(aug)
    if pm:
        why.append("mixup blends different pairs of images each epoch")
    if pc:
        why.append("cutmix pastes different patches each epoch")
    if why:
        return False, "; ".join(why)
    return True, "basic recipe without erasing or mixing"
