"""Images to tensors: decode once, cache a little larger than the crop, view per epoch.

    file index -> decode -> resize to the cache size (aspect kept) -> uint8 cache (memory | disk | none)
      train, every epoch: permutation of the WHOLE index -> random-resized-crop / flip / affine /
                          colour jitter from the cached image -> batch -> prefetch
      val / test:         the eval transform of the cached image, in index order -> batch -> prefetch

Cache size (``data.cache_size``): by default the shorter side becomes ``round(1.143 * crop)``
(256 for a 224 crop) with the aspect ratio kept, so a random crop is cut from an image larger than
the crop, as torchvision's RandomResizedCrop cuts from the file, instead of from an image already
squashed to the crop size and scaled back up. ``[H, W]`` caches at exactly that size (squashed).

Eval transform (``data.eval_transform``), the ONE function evaluate, predict and the exported
serving signature use: ``resize_center_crop`` = shorter side to the cache size, centre crop
(torchvision's Resize(256) + CenterCrop(224)); ``squash`` = the cached image resized to
``image_size`` (what the VLG-50 project's Resize((224, 224)) does; cache_size: [224, 224] makes
it exactly that).

Colour jitter has torchvision's ColorJitter semantics: brightness, contrast and saturation are
multiplicative factors drawn from [max(0, 1 - x), 1 + x] (brightness scales pixel values, contrast
blends with the mean grey level, saturation with the greyscale image), hue is a shift drawn from
[-x, x] of the colour circle, and the four are applied in a random order per image.

Map functions use ``tf.*`` (keras.ops break inside tf.data under the JAX backend). A training
view is cut by one of two paths (``data.view_path``, ``graph_views``), which draw the same crop
boxes from the same seeds, bit for bit, and so give the same views: ``python``, one Python call per
view (``tf.numpy_function``: torchvision's crop box, then the copy of only the crop's pixels out of
the cache), the less CPU per view but holding the GIL (one process tops out at a few thousand
images/s: tools/bench.py --only feed); ``graph``, TensorFlow ops alone (the boxes of 64 images at
a time, each crop sliced out of the cache shared with TensorFlow in place: ``ImageCache.tensors``),
which scales with the cores; ``auto`` takes it with more than 8 cores or more than one device on
one pipeline. Every random choice is stateless, from a per-image seed that is a function of
(seed, epoch, position in the epoch), so an epoch is the same in a resumed run. Images leave the
pipeline as float32 0..255: the model does its own preprocessing.

The cache holds every image of the index, flat: one uint8 buffer, an offset and a shape per image
(``ImageCache``). ``memory`` keeps it in RAM; ``disk`` writes it once under
``data.cache_dir`` (default ``$KFINE_CACHE/images``, i.e. ~/.cache/kfine/images/<key>/), keyed by
the file list (content hashes) and the cache size, and maps it back in later runs, tune trials
and comparisons of the same data, so a set larger than RAM trains at cached speed and a second
run decodes nothing. Delete the folder to clear it. ``none`` decodes every file every epoch.

Before decoding, the cache's size (from the header sizes the scan read) is checked against the
memory or the free disk there is (``check_room``): a cache that cannot fit stops the run in one
line, not the OOM killer minutes later. The disk cache's file is allocated up front (a full disk
is an error naming the folder, not a SIGBUS) and published by renaming a finished temporary folder
that holds its own index, which is the only index anyone reads it by (a process that loses the
publish race included). Temporary folders of builds whose process died are removed at the next
build and by ``python -m kfine.data clean-cache``.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import tensorflow as tf

from kfine.log import quiet_stderr
from kfine.sources import DataError, scan_files

CACHE_VERSION = 6            # bump when what the cache holds changes (the resize below)
CROP_RATIO = 3 / 4, 4 / 3    # torchvision RandomResizedCrop's default aspect-ratio range
CROP_ATTEMPTS = 10           # and its number of tries before the centre crop
AUTOTUNE = tf.data.AUTOTUNE
# tf.data map functions here are plain graph code (tf.cond/tf.case, no Python branch on a
# tensor), so AutoGraph's source-to-source conversion is skipped: it took ~1 s of every run's setup.
graph_fn = tf.autograph.experimental.do_not_convert


# ----------------------------------------------------------------------------- single images
def decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 HxWx3 (JPEG incl. CMYK, PNG incl. 16-bit, BMP, GIF first frame, WebP)."""
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def resize(img: tf.Tensor, size) -> tf.Tensor:
    """uint8/float image -> uint8 of ``size``, rounded. Antialiased, by the cheapest filter that
    is: a downscale averages the input area under each output pixel (a box filter, OpenCV's
    INTER_AREA), an upscale is bilinear (antialiasing changes nothing there), and a resize that
    shrinks one side and stretches the other uses TF's antialiased bilinear. The box filter is
    ~3x faster than TF's antialiased bilinear (ScaleAndTranslate) on this CPU and on the photo
    set lands 1.2 grey levels (mean) from PIL's bilinear Resize, TF's own triangle filter 0.9."""
    img = tf.cast(img, tf.float32)
    hw = tf.shape(img)[:2]
    size = tf.convert_to_tensor(size, tf.int32)
    down, up = tf.reduce_all(hw >= size), tf.reduce_all(hw <= size)
    out = tf.case([(down, lambda: tf.image.resize(img, size, method="area")),
                   (up, lambda: tf.image.resize(img, size, method="bilinear"))],
                  default=lambda: tf.image.resize(img, size, antialias=True))
    return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def default_cache_size(image_size) -> int:
    return int(round(1.143 * max(image_size)))


def cache_hw(height, width, cache_size, image_size):
    """The cached (height, width) of an image of (height, width): shorter side to the cache size,
    long side ``int(cache * long / short)`` as torchvision's Resize(int) does; or the fixed size.
    Works on Python ints and on tensors alike."""
    if cache_size is None:
        cache_size = default_cache_size(image_size)
    if isinstance(cache_size, (list, tuple)):
        return int(cache_size[0]), int(cache_size[1])
    if isinstance(height, int):
        short, long = min(height, width), max(height, width)
        other = int(cache_size * long / short)
        return (cache_size, other) if height <= width else (other, cache_size)
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    other = tf.cast(tf.floor(cache_size * long / short), tf.int32)
    c = tf.constant(cache_size, tf.int32)
    return tf.where(h <= w, c, other), tf.where(h <= w, other, c)


def to_cache(img: tf.Tensor, cache_size, image_size) -> tf.Tensor:
    """A decoded image as the cache holds it (uint8, ``cache_hw``)."""
    shape = tf.shape(img)
    return resize(img, tf.stack(cache_hw(shape[0], shape[1], cache_size, image_size)))


JPEG_SCALES = (8, 4, 2)   # libjpeg decodes at 1/8, 1/4 and 1/2 scale in the DCT domain


def decode_to_cache(data: tf.Tensor, cache_size, image_size) -> tf.Tensor:
    """Encoded bytes -> the cached image. A JPEG is decoded at the largest DCT scale (1/2, 1/4,
    1/8) that keeps it at least the cache size: libjpeg's scaled IDCT is both faster (an 800x600
    photo for a 256 cache decodes at 400x300) and a proper low-pass filter, and the antialiased
    resize of what is left (a factor below 2) costs a fraction of one from the full image. The
    cached size is that of the full image either way. Training, evaluation, predict and the
    exported model all decode here."""
    def scaled_jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        hw = cache_hw(shape[0], shape[1], cache_size, image_size)
        fits = [(shape[0] // r >= hw[0]) & (shape[1] // r >= hw[1]) for r in JPEG_SCALES]
        branches = [(ok, lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r)) for ok, r in zip(fits, JPEG_SCALES)]
        img = tf.case(branches, default=lambda: tf.io.decode_jpeg(data, channels=3))
        img.set_shape([None, None, 3])
        return resize(img, tf.stack(hw))

    return tf.cond(tf.io.is_jpeg(data), scaled_jpeg, lambda: to_cache(decode(data), cache_size, image_size))


def center_crop(img: tf.Tensor, size) -> tf.Tensor:
    """torchvision CenterCrop: top = round((H - h) / 2), left = round((W - w) / 2)."""
    shape = tf.shape(img)
    top = tf.cast(tf.round((shape[0] - size[0]) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size[1]) / 2), tf.int32)
    return tf.slice(img, tf.stack([top, left, 0]), [size[0], size[1], 3])


EVAL_TRANSFORMS = {
    "resize_center_crop": lambda img, size: tf.cast(center_crop(img, size), tf.float32),
    "squash": lambda img, size: tf.cast(resize(img, size), tf.float32),
}


def eval_view(cached: tf.Tensor, image_size, eval_transform: str) -> tf.Tensor:
    """The cached image as evaluation, prediction and serving see it: float32 (*image_size, 3)."""
    out = EVAL_TRANSFORMS[eval_transform](cached, tuple(image_size))
    out.set_shape([*image_size, 3])
    return out


def eval_image(data: tf.Tensor, image_size, cache_size, eval_transform: str) -> tf.Tensor:
    """Encoded bytes -> the eval view (what the exported serving signature computes)."""
    return eval_view(decode_to_cache(data, cache_size, image_size), image_size, eval_transform)


# ----------------------------------------------------------------------------- header sizes (serving)
def _u(data, start, n, little=True):
    """Unsigned integer from ``n`` bytes of ``data`` at ``start``."""
    b = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, n), tf.uint8), tf.int64)
    weights = tf.constant([256 ** i for i in (range(n) if little else reversed(range(n)))], tf.int64)
    return tf.reduce_sum(b * weights)


def header_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height from the header of JPEG, PNG, GIF, BMP or WebP bytes, without decoding;
    -1 when the header is unknown or too short (the decoder then decides). Graph-only ops, so the
    exported model refuses a decompression bomb before allocating its pixels."""
    n = tf.strings.length(data)
    head = tf.strings.substr(data, 0, 4)

    def png():
        return _u(data, 16, 4, False) * _u(data, 20, 4, False)

    def gif():
        return _u(data, 6, 2) * _u(data, 8, 2)

    def bmp():
        h = _u(data, 22, 4)
        h = tf.where(h >= 2 ** 31, 2 ** 32 - h, h)   # top-down BMPs store a negative height
        return _u(data, 18, 4) * h

    def webp():
        kind = tf.strings.substr(data, 12, 4)
        vp8 = _u(data, 26, 2) % 2 ** 14 * (_u(data, 28, 2) % 2 ** 14)
        bits = _u(data, 21, 4)
        vp8l = (bits % 2 ** 14 + 1) * (bits // 2 ** 14 % 2 ** 14 + 1)
        vp8x = (_u(data, 24, 3) + 1) * (_u(data, 27, 3) + 1)
        return tf.case([(tf.equal(kind, "VP8 "), lambda: vp8), (tf.equal(kind, "VP8L"), lambda: vp8l),
                        (tf.equal(kind, "VP8X"), lambda: vp8x)], default=lambda: tf.constant(-1, tf.int64))

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    return tf.case([
        (n < 30, lambda: tf.constant(-1, tf.int64)),
        (tf.io.is_jpeg(data), jpeg),
        (tf.equal(head, b"\x89PNG"), png),
        (tf.equal(tf.strings.substr(data, 0, 3), b"GIF"), gif),
        (tf.equal(tf.strings.substr(data, 0, 2), b"BM"), bmp),
        (tf.logical_and(tf.equal(head, b"RIFF"), tf.equal(tf.strings.substr(data, 8, 4), b"WEBP")), webp),
    ], default=lambda: tf.constant(-1, tf.int64))


# ----------------------------------------------------------------------------- augmentation
def _uniform(seed, lo, hi, shape=()):
    return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=tf.float32)


_EXP_TERMS = tuple(1.0 / math.factorial(k) for k in range(13))


def _exp(x):
    """exp(x) for |x| <= 0.3 (CROP_RATIO's log aspect ratios: +-0.288) by its Taylor series in
    Horner form, + and * alone, on a Python float or a float64 tensor: IEEE arithmetic, so both
    get the same bits on every machine, where math.exp and tf.exp differ in the last bit for ~1
    input in 10 (and tf.exp between SIMD widths). Within 1 ulp of math.exp there."""
    y = _EXP_TERMS[-1]
    for c in reversed(_EXP_TERMS[:-1]):
        y = y * x + c
    return y


def crop_box(height: int, width: int, u, scale, ratio=CROP_RATIO, attempts: int = CROP_ATTEMPTS
             ) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, line for line, with its random numbers taken
    from ``u`` (``2 * attempts + 2`` uniforms in [0, 1)): (top, left, h, w) of a crop of area
    fraction in ``scale`` and aspect ratio (w/h) log-uniform in ``ratio``; up to ``attempts``
    tries, then the centre crop with the ratio clamped. ``crop_box_tf`` is the same in
    TensorFlow ops (the graph view path), bit for bit."""
    area = height * width
    log_ratio = math.log(ratio[0]), math.log(ratio[1])
    for k in range(attempts):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u[2 * k]))
        aspect_ratio = _exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u[2 * k + 1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:   # torch.randint(0, H - h + 1), torch.randint(0, W - w + 1)
            i = min(int(float(u[-2]) * (height - h + 1)), height - h)
            j = min(int(float(u[-1]) * (width - w + 1)), width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_box_tf(height, width, u, scale, ratio=CROP_RATIO, attempts: int = CROP_ATTEMPTS):
    """``crop_box`` in TensorFlow ops, every attempt at once, and for a batch at once: ``u``
    (..., 2 * attempts + 2), ``height`` and ``width`` (...) -> int32 (..., 4) boxes (top, left,
    h, w). The same float64 arithmetic in the same order (``_exp`` included; Round is half to
    even, as Python's round), so the same uniforms give the same box, bit for bit."""
    f64 = tf.float64
    hf, wf = tf.cast(height, f64)[..., None], tf.cast(width, f64)[..., None]
    u = tf.cast(u, f64)
    log_ratio = math.log(ratio[0]), math.log(ratio[1])
    target_area = hf * wf * (scale[0] + (scale[1] - scale[0]) * u[..., 0:2 * attempts:2])
    aspect_ratio = _exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[..., 1:2 * attempts:2])
    w = tf.round(tf.sqrt(target_area * aspect_ratio))
    h = tf.round(tf.sqrt(target_area / aspect_ratio))
    fits = (w > 0) & (w <= wf) & (h > 0) & (h <= hf)
    first = tf.reduce_min(tf.where(fits, tf.range(attempts), attempts), axis=-1, keepdims=True)
    pick = tf.equal(tf.range(attempts), first)   # the first attempt that fits (none: all False)
    h, w = (tf.reduce_sum(tf.where(pick, x, 0.0), axis=-1, keepdims=True) for x in (h, w))
    top = tf.minimum(tf.floor(u[..., -2:-1] * (hf - h + 1.0)), hf - h)
    left = tf.minimum(tf.floor(u[..., -1:] * (wf - w + 1.0)), wf - w)
    in_ratio = wf / hf   # the fallback: the centre crop, ratio clamped
    fh = tf.where(in_ratio < min(ratio), tf.round(wf / min(ratio)), hf)
    fw = tf.where(in_ratio > max(ratio), tf.round(hf * max(ratio)), wf)
    box = tf.where(first < attempts, tf.concat([top, left, h, w], -1),
                   tf.concat([tf.floor((hf - fh) / 2.0), tf.floor((wf - fw) / 2.0), fh, fw], -1))
    return tf.cast(box, tf.int32)


def whole_box(height, width):
    return 0, 0, height, width


WHOLE = (whole_box, whole_box)   # a loader's box: (Python, TensorFlow) functions of (height, width, *args)


def crop_loader(img: tf.Tensor, graph: bool = False):
    """``ImageCache.view``'s loader for an image already in a tensor: the box in Python (the
    box's first function, one ``tf.numpy_function``) or in TensorFlow ops (``graph``: its
    second), the region by tf.slice."""
    def load(box, *args):
        shape = tf.shape(img)
        if graph:
            b = tf.stack(box[1](shape[0], shape[1], *args))
        else:
            b = tf.numpy_function(lambda h, w, *a: np.array(box[0](int(h), int(w), *a), np.int32),
                                  [shape[0], shape[1], *args], tf.int32, stateful=False)
            b.set_shape([4])
        return tf.slice(img, tf.stack([b[0], b[1], 0]), tf.stack([b[2], b[3], 3]))
    return load


def crop_uniforms(seed, attempts: int = CROP_ATTEMPTS) -> tf.Tensor:
    """The uniforms ``crop_box`` consumes, drawn statelessly from ``seed`` in one op."""
    return _uniform(seed, 0.0, 1.0, [2 * attempts + 2])


ANTIALIAS_ABOVE = 1.5   # downscales by more than this are antialiased; below, bilinear differs by < 1 grey level


def resize_crop(crop: tf.Tensor, image_size) -> tf.Tensor:
    """A uint8 crop -> float32 ``image_size``. Upscales and mild downscales (every crop of the
    default cache, which is ~1.14x the crop: factors 0.76..1.32) are bilinear; stronger ones are
    antialiased. Antialiasing changes nothing for an upscale, less than one grey level on average
    below 1.5x (measured on the photo set), and costs several times the rest of the pipeline."""
    shape = tf.cast(tf.shape(crop)[:2], tf.float32)
    strong = tf.reduce_any(shape > ANTIALIAS_ABOVE * tf.constant(image_size, tf.float32))
    return tf.cond(strong, lambda: tf.image.resize(tf.cast(crop, tf.float32), image_size, antialias=True),
                   lambda: tf.image.resize(crop, image_size))


def random_resized_crop(img, seed, scale, image_size, ratio=CROP_RATIO, flip_seed=None, box=None) -> tf.Tensor:
    """torchvision's RandomResizedCrop of a uint8 image (a tensor, or an ``ImageCache.view``
    loader that copies only the crop out of the cache) -> float32 ``image_size``; with
    ``flip_seed`` a random horizontal flip too, done on the uint8 crop before resizing (the
    same image as flipping after: the resize kernel is symmetric; a quarter of the bytes).
    ``box``: the crop box, int32 (4,), when it is already drawn from ``seed`` (graph loaders
    only: make_dataset draws them for many images at once)."""
    load = img if callable(img) else crop_loader(img)
    if box is not None:
        crop = load((None, lambda h, w: box))
    else:
        crop = load((functools.partial(crop_box, scale=scale, ratio=ratio),
                     functools.partial(crop_box_tf, scale=scale, ratio=ratio)), crop_uniforms(seed))
    if flip_seed is not None:
        crop = tf.image.stateless_random_flip_left_right(crop, flip_seed)
    return resize_crop(crop, image_size)


def _grey(x):
    return tf.image.rgb_to_grayscale(x)   # 0.2989 R + 0.587 G + 0.114 B, as torchvision


def color_jitter(x, seed, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """torchvision ColorJitter on a float image in 0..1 (see the module docstring)."""
    s = tf.random.experimental.stateless_split(seed, 5)

    def factor(i, v):
        return _uniform(s[i], max(0.0, 1.0 - v), 1.0 + v)

    ops = []
    if brightness:
        f = factor(0, brightness)
        ops.append(lambda x: tf.clip_by_value(x * f, 0.0, 1.0))
    if contrast:
        f = factor(1, contrast)
        ops.append(lambda x: tf.clip_by_value(f * x + (1 - f) * tf.reduce_mean(_grey(x)), 0.0, 1.0))
    if saturation:
        f = factor(2, saturation)
        ops.append(lambda x: tf.clip_by_value(f * x + (1 - f) * _grey(x), 0.0, 1.0))
    if hue:
        d = _uniform(s[3], -min(hue, 0.5), min(hue, 0.5))
        ops.append(lambda x: tf.image.adjust_hue(x, d))
    if not ops:
        return x
    order = tf.argsort(_uniform(s[4], 0.0, 1.0, [len(ops)]))   # a random order per image
    for k in range(len(ops)):
        x = tf.switch_case(order[k], [functools.partial(op, x) for op in ops])
    return x


def _affine(img: tf.Tensor, aug, seed: tf.Tensor) -> tf.Tensor:
    """Random rotation/translation/zoom/shear about the centre as one projective transform."""
    s = tf.random.experimental.stateless_split(seed, 5)
    h, w = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)

    def u(i, lim):
        return _uniform(s[i], -lim, lim) if lim else tf.constant(0.0)

    angle = u(0, aug.rotation * math.pi / 180.0)
    shear = u(1, aug.shear)
    zoom = 1.0 + u(2, aug.zoom)
    tx, ty = u(3, aug.translation) * w, u(4, aug.translation) * h
    # output pixel (x, y) samples input  A @ ((x, y) - c) + c + t,  A = R(angle) @ Shear @ zoom
    c, sn = tf.cos(angle), tf.sin(angle)
    k = tf.tan(shear)
    a00, a01 = c * zoom, (c * k - sn) * zoom
    a10, a11 = sn * zoom, (sn * k + c) * zoom
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a02 = cx + tx - a00 * cx - a01 * cy
    a12 = cy + ty - a10 * cx - a11 * cy
    transform = tf.stack([a00, a01, a02, a10, a11, a12, 0.0, 0.0])[None]
    # Keras' own affine_transform is this same raw op, behind a backend switch tf.data cannot use.
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=img[None], transforms=transform, output_shape=tf.shape(img)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return out[0]


def view_seeds(seed: tf.Tensor) -> tf.Tensor:
    """A training view's seeds (crop, flip, affine, colour) from the image's seed."""
    return tf.random.experimental.stateless_split(seed, 4)


def crop_draws(seed: tf.Tensor) -> tf.Tensor:
    """The uniforms of the crop box of the training view of seed ``seed`` (``crop_box``)."""
    return crop_uniforms(view_seeds(seed)[0])


def train_view(cached, seed: tf.Tensor, aug, image_size, eval_transform: str, box=None) -> tf.Tensor:
    """A cached uint8 image (or its loader: ImageCache.view) -> one augmented
    float32 (*image_size, 3) view in 0..255. Stateless: ``seed`` fixes it. Order as in
    torchvision pipelines: crop, flip, affine, colour. ``box``: the crop box already drawn from
    ``crop_draws(seed)`` (random_resized_crop)."""
    whole = (lambda: cached(WHOLE)) if callable(cached) else (lambda: cached)
    if not aug.enabled:
        return eval_view(whole(), image_size, eval_transform)
    s = view_seeds(seed)
    if aug.random_resized_crop:
        img = random_resized_crop(cached, s[0], tuple(aug.crop_scale), tuple(image_size),
                                  flip_seed=s[1] if aug.flip else None, box=box)
    else:
        img = eval_view(whole(), image_size, eval_transform)
        if aug.flip:
            img = tf.image.stateless_random_flip_left_right(img, s[1])
    if aug.rotation or aug.translation or aug.zoom or aug.shear:
        img = _affine(img, aug, s[2])
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        img = color_jitter(img / 255.0, s[3], aug.brightness, aug.contrast, aug.saturation, aug.hue) * 255.0
    if aug.rotation or aug.translation or aug.zoom or aug.shear or aug.hue:
        img = tf.clip_by_value(img, 0.0, 255.0)   # crop, flip and the clipped jitter stay in range
    img.set_shape([*image_size, 3])
    return img


# ----------------------------------------------------------------------------- the image cache
class ImageCache:
    """Every image of an index at its cache size, flat: ``pixels`` (uint8, in RAM or a read-only
    memory map), and per image ``offsets`` and ``shapes``; ``slot[key]`` is an image's position.
    With ``pixels`` None (data.cache: none) images are decoded from their files on every read."""

    def __init__(self, keys, offsets, shapes, pixels, cache_size, image_size, path=None):
        self.keys = list(keys)
        self.slot = {k: i for i, k in enumerate(self.keys)}
        self.offsets, self.shapes, self.pixels = offsets, shapes, pixels
        self.cache_size, self.image_size, self.path = cache_size, tuple(image_size), path
        self.source = "mapped from the disk cache" if path is not None else "decoded"
        self._tensors = None   # tensors(): made on first use by the graph view path

    def __len__(self):
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.nbytes)

    def get(self, slot: int) -> np.ndarray:
        h, w = self.shapes[slot]
        start = self.offsets[slot]
        return np.asarray(self.pixels[start:start + h * w * 3]).reshape(h, w, 3)

    def crop(self, slot: int, top: int, left: int, h: int, w: int) -> np.ndarray:
        full_h, full_w = self.shapes[slot]
        start = self.offsets[slot]
        image = self.pixels[start:start + full_h * full_w * 3].reshape(full_h, full_w, 3)
        return np.ascontiguousarray(image[top:top + h, left:left + w])

    def view(self, slot: tf.Tensor, graph: bool = False):
        """tf.data op: slot -> a loader ``load(box, *args)`` of one region of the cached image;
        ``box`` is a pair of functions ``(height, width, *args) -> (top, left, h, w)``, in Python
        and in TensorFlow ops (``WHOLE``, ``crop_box``/``crop_box_tf``), of the image's cached
        size. Python path: the box's Python function and the copy of only the region's pixels
        are one Python call (``tf.numpy_function``, under the GIL). ``graph``: the TensorFlow
        box, and the region sliced out of ``tensors()``: no Python at all."""
        if self.pixels is None:
            return crop_loader(self.load(slot), graph)
        if graph:
            pixels, offsets, shapes = self.tensors()
            start, hw = tf.gather(offsets, slot), tf.gather(shapes, slot)

            def load_graph(box, *args):
                top, left, h, w = tf.unstack(tf.stack(box[1](hw[0], hw[1], *args)))
                row = tf.cast(hw[1], tf.int64) * 3
                rows = tf.slice(pixels, tf.reshape(start + tf.cast(top, tf.int64) * row, [1]),
                                tf.reshape(tf.cast(h, tf.int64) * row, [1]))   # the crop's rows, whole
                return tf.slice(tf.reshape(rows, tf.stack([h, hw[1], 3])), tf.stack([0, left, 0]), tf.stack([h, w, 3]))
            return load_graph

        def load(box, *args):
            out = tf.numpy_function(lambda i, *a: self.crop(int(i), *box[0](*map(int, self.shapes[int(i)]), *a)),
                                    [slot, *args], tf.uint8, stateful=False)
            out.set_shape([None, None, 3])
            return out
        return load

    def load(self, slot: tf.Tensor, graph: bool = False) -> tf.Tensor:
        """tf.data op: slot -> cached uint8 image (``graph``: sliced out of ``tensors()``)."""
        if self.pixels is None:
            paths = tf.constant(self.keys)
            img = decode_to_cache(tf.io.read_file(tf.gather(paths, slot)), self.cache_size, self.image_size)
        elif graph:
            img = self.view(slot, graph=True)(WHOLE)
        else:
            img = tf.numpy_function(lambda i: self.get(int(i)), [slot], tf.uint8, stateful=False)
        img.set_shape([None, None, 3])
        return img

    def tensors(self) -> tuple:
        """(pixels, offsets, shapes) for the graph view path, made once: the pixels a uint8
        tf.Variable on the CPU that SHARES the cache's memory (DLPack, no copy; a disk cache's
        memory map stays one, its pages read as crops need them). A variable, not a captured
        constant: tf.data's graph rewrite copies a captured tensor (the whole cache) every time
        an iterator starts, and a GraphDef constant stops at 2 GB. Made outside any distribution
        strategy: under MirroredStrategy a tf.Variable would be a copy on every device."""
        if self._tensors is None:
            from tensorflow.python.ops.resource_variable_ops import ResourceVariable   # no strategy's creator
            pixels = self.pixels
            if isinstance(pixels, np.memmap) and not pixels.flags.writeable:   # DLPack refuses read-only
                pixels = np.memmap(pixels.filename, np.uint8, mode="c", offset=pixels.offset, shape=pixels.shape)
            if pixels.ctypes.data % TENSOR_ALIGN or not pixels.flags.c_contiguous:   # TF needs aligned memory
                pixels = aligned_copy(pixels)
            with tf.init_scope(), tf.device("/device:CPU:0"):
                flat = ResourceVariable(tf.experimental.dlpack.from_dlpack(pixels.__dlpack__()), trainable=False,
                                        name="image_cache")
                self._tensors = (flat, tf.constant(np.asarray(self.offsets, np.int64)),
                                 tf.constant(np.asarray(self.shapes, np.int32).reshape(-1, 2)))
        return self._tensors


TENSOR_ALIGN = 64   # bytes: TensorFlow's (Eigen's) alignment of tensor memory


def aligned_empty(n: int) -> np.ndarray:
    """An uninitialised uint8 array of ``n`` bytes starting at a TENSOR_ALIGN boundary, so that a
    TensorFlow tensor can share it (ImageCache.tensors)."""
    buf = np.empty(n + TENSOR_ALIGN, np.uint8)
    start = -buf.ctypes.data % TENSOR_ALIGN
    return buf[start:start + n]


def aligned_copy(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.size)
    out[:] = a.reshape(-1)
    return out


def cache_key(keys, info, cfg) -> str:
    """What the disk cache is keyed by: every file (its content hash) and how it is resized."""
    files = sorted((k, info[k].sha1 if k in info else "") for k in keys)
    spec = {"v": CACHE_VERSION, "files": files, "cache_size": cfg.cache_size, "image_size": list(cfg.image_size)}
    return hashlib.sha1(json.dumps(spec, default=list).encode()).hexdigest()[:20]


def cache_root(cfg) -> Path:
    """Where decoded images are cached: ``data.cache_dir``, else images/ under kfine's cache home."""
    from kfine.rundir import cache_home
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home() / "images"


def _bad_reason(path: str) -> str:
    """Why ``path`` cannot be decoded (called only for files the parallel pass dropped)."""
    import re
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"
    try:
        with quiet_stderr():
            decode(data)
    except (tf.errors.OpError, ValueError) as e:
        msg = getattr(e, "message", None) or str(e)
        msg = re.sub(r"\s*\[Op:\w+\]", "", re.sub(r"\{\{[^}]*\}\}\s*", "", msg)).strip() or type(e).__name__
        return msg if "Unknown image file format" not in msg else \
            "not an image file (content is not JPEG, PNG, BMP, GIF or WebP)"
    return "could not be decoded"


def _decoded(keys, cfg) -> tf.data.Dataset:
    """(position, cached uint8 image) for every key that decodes, in parallel, errors dropped."""
    ds = tf.data.Dataset.from_tensor_slices(list(keys)).enumerate()
    ds = ds.map(graph_fn(lambda i, k: (i, decode_to_cache(tf.io.read_file(k), cfg.cache_size, cfg.image_size))),
                num_parallel_calls=AUTOTUNE)
    return ds.ignore_errors().prefetch(AUTOTUNE).with_options(one_pass_options())


def build_cache(keys: list[str], cfg, info=None, images=None, progress=None) -> tuple[ImageCache, dict[str, str]]:
    """Decode every key once (the data check's decode pass) into the cache ``cfg.cache`` says.

    Returns (cache, {key: reason} for keys that failed to decode). ``images`` replaces reading
    files: a tf.data.Dataset of decoded uint8 images, or of their encoded bytes (decoded as files
    are), in ``keys`` order (tfds: its keys name the data set and version). ``info`` (path ->
    FileInfo with content hashes) keys the disk cache with the keys; a cache found there, or
    built earlier in this process, is reused. Before decoding, the cache's size (from the header
    sizes in ``info``) is checked against the memory or disk there is (``check_room``), and
    temporary folders that dead builds left under the cache root are removed (``clean_stale``).
    """
    keys, info = list(keys), info or {}
    key = (cache_key(keys, info, cfg), cfg.cache)
    reused = _RECENT.lookup(key)    # tune trials, comparisons: decode once per process
    if reused is not None:
        reused[0].source = "reused from this process"
        return reused
    clean_stale(cache_root(cfg))
    final = cache_root(cfg) / key[0] if cfg.cache == "disk" else None
    return _RECENT.keep(key, _build_cache(keys, cfg, info, images, progress, final))


class RecentCache(OrderedDict):
    """The ``size`` most recently used values of this process, by key: a lookup or a keep makes a
    key the newest, and a keep beyond ``size`` lets the oldest go (decoded images here, backbone
    features in kfine.features: each can be gigabytes)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def lookup(self, key):
        """The value kept under ``key`` (now the newest), or None."""
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def keep(self, key, value):
        """Keep ``value`` under ``key`` as the newest; returns it."""
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_RECENT = RecentCache(2)   # the last caches built in this process, by cache key
BUILT = Counter()   # images decoded into caches in this process (tests assert reuse by it)


def _build_cache(keys, cfg, info, images, progress, final):
    if final is not None and (final / "index.npz").is_file():
        found = _load_published(final, keys, cfg)
        if found is not None:
            return found
    if cfg.cache == "none" and images is None:   # decode to find bad files, keep nothing
        with quiet_stderr():
            ok = {int(i) for i, _ in _decoded(keys, cfg).map(graph_fn(lambda i, img: (i, 0))).as_numpy_iterator()}
        bad = {k: _bad_reason(k) for i, k in enumerate(keys) if i not in ok}
        return ImageCache([k for k in keys if k not in bad], None, None, None, cfg.cache_size, cfg.image_size), bad

    estimate = cache_bytes(keys, info, cfg)
    check_room(estimate, len(keys), cfg)
    buf = _Buffer(max(estimate, 1 << 16), final)
    try:
        offsets, shapes = np.zeros(len(keys), np.int64), np.zeros((len(keys), 2), np.int32)
        done = np.zeros(len(keys), bool)
        source = _decoded(keys, cfg) if images is None else images.enumerate().map(   # images: tfds
            graph_fn(lambda i, img: (i, decode_to_cache(img, cfg.cache_size, cfg.image_size) if img.dtype == tf.string
                                     else to_cache(img, cfg.cache_size, cfg.image_size))), num_parallel_calls=AUTOTUNE)
        with quiet_stderr():   # libjpeg prints to stderr on a broken file; kfine reports it by path
            for i, img in source.as_numpy_iterator():
                offsets[i], shapes[i], done[i] = buf.append(img), img.shape[:2], True
                BUILT["decoded"] += 1
            if progress is not None:
                progress(1)
        bad = {k: (_bad_reason(k) if images is None else "could not be decoded") for k, d in zip(keys, done) if not d}
        good = [i for i in range(len(keys)) if done[i]]
        pixels = buf.finish()
        cache = ImageCache([keys[i] for i in good], offsets[good], shapes[good], pixels,
                           cfg.cache_size, cfg.image_size)
        if final is None:
            return cache, bad
        return _publish(cache, bad, final, buf, keys, cfg)
    finally:   # published, or stopped (an error, Ctrl-C): no temporary folder stays behind
        if buf.tmp is not None:
            shutil.rmtree(buf.tmp, ignore_errors=True)


def _load_published(final: Path, keys, cfg):
    """(cache, bad) from a published disk cache: its own index (keys, offsets, shapes, the files
    it could not decode) maps its pixels; None when that index does not cover ``keys``."""
    with np.load(final / "index.npz", allow_pickle=False) as z:
        saved = dict(zip(z["keys"].tolist(), zip(z["offsets"], z["shapes"])))
        bad = dict(zip(z["bad_keys"].tolist(), z["bad_reasons"].tolist()))
    if not set(keys) <= set(saved) | set(bad):
        return None
    good = [k for k in keys if k in saved]
    pixels = np.memmap(final / "pixels.u8", np.uint8, mode="r")
    return (ImageCache(good, np.array([saved[k][0] for k in good], np.int64),
                       np.array([saved[k][1] for k in good], np.int32).reshape(-1, 2), pixels,
                       cfg.cache_size, cfg.image_size, final),
            {k: bad[k] for k in keys if k in bad})


# ----------------------------------------------------------------------------- room for the cache
MEMORY_SHARE = 0.8   # of the available memory a memory cache may take (the model, TF and tf.data need the rest)
DISK_SHARE = 0.9     # of the free disk space a disk cache may take


def cache_bytes(keys, info, cfg) -> int:
    """The cache's size in bytes, from the header sizes the scan read: every image at its cached
    size (``cache_hw``: aspect kept), uint8 RGB. Images without a known header size count 0."""
    return sum(3 * math.prod(cache_hw(i.height, i.width, cfg.cache_size, cfg.image_size))
               for i in (info.get(k) for k in keys) if i is not None and i.height)


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable (/proc/meminfo), else the free physical
    pages (os.sysconf), at most what a cgroup v2 memory limit (a container) leaves; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return avail


def free_disk(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_room(estimate: int, count: int, cfg) -> None:
    """Stop before decoding (DataError, one line naming the figures and what to set) when the
    cache would not fit: a memory cache in MEMORY_SHARE of the available memory (caches this
    process keeps for reuse are let go first), a disk cache in DISK_SHARE of the free disk."""
    if not estimate or cfg.cache not in ("memory", "disk"):
        return
    size = cfg.cache_size if cfg.cache_size is not None else default_cache_size(cfg.image_size)
    what = f"about {_gb(estimate)} for {count} images at cache size {size} (uint8 RGB)"
    if cfg.cache == "memory":
        avail = available_memory()
        if avail is not None and estimate > MEMORY_SHARE * avail and _RECENT:
            import gc
            _RECENT.clear()
            gc.collect()
            avail = available_memory()
        if avail is not None and estimate > MEMORY_SHARE * avail:
            raise DataError(f"the image cache (data.cache: memory) needs {what}, more than "
                            f"{MEMORY_SHARE:.0%} of the {_gb(max(avail, 0))} of memory available; set data.cache: disk "
                            f"(data.cache_dir: where it is written), a smaller data.cache_size, or fewer images "
                            f"(see docs/troubleshooting.md#out-of-memory)")
    else:
        root = cache_root(cfg)
        free = free_disk(root)
        if estimate > DISK_SHARE * free:
            raise DataError(f"the disk cache (data.cache: disk) needs {what}, but {root} has {_gb(free)} free; "
                            f"set data.cache_dir to a disk with room, a smaller data.cache_size, or data.cache: memory "
                            f"(see docs/troubleshooting.md#out-of-memory)")


# ----------------------------------------------------------------------------- temporary folders
_STARTED = time.time()   # about when this process started (this module is imported early)
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _tmp_prefix(name: str) -> str:
    """A build's temporary folder: ``.<key>.tmp-<host>-<pid>-<random>``, so that a later process
    can tell one whose build died (its PID is gone) from one still being written."""
    return f".{name}.tmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # PermissionError: another user's live process
        return True
    return True


def is_stale(folder: Path) -> bool:
    """A build's temporary folder whose process is gone: its PID (this host's) is dead, or, with
    no PID in its name, nothing in it changed since this process started."""
    m = re.fullmatch(r"\..+\.tmp-(?:([A-Za-z0-9._]+)-(\d+)-)?[^-]*", folder.name)
    if m is None or not folder.is_dir():
        return False
    if m.group(2) is not None:
        return m.group(1) == _HOST and not _alive(int(m.group(2)))
    try:
        newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
    except OSError:
        return False
    return newest < _STARTED


def disk_size(path: Path) -> int:
    """Bytes ``path`` takes on disk (allocated blocks: a sparse file counts what it holds)."""
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(p.stat().st_blocks * 512 for p in files)
    except OSError:
        return 0


def clean_stale(root: Path) -> list[tuple[Path, int]]:
    """Remove the temporary folders that builds killed midway left under the cache root;
    [(folder, bytes)] of those removed."""
    removed = []
    if not Path(root).is_dir():
        return removed
    for folder in sorted(Path(root).glob(".*.tmp-*")):
        if is_stale(folder):
            size = disk_size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append((folder, size))
    return removed


# ----------------------------------------------------------------------------- building
class _Buffer:
    """A growing flat uint8 buffer in RAM, or in a file for the disk cache. The file is
    allocated up front (posix_fallocate), so a full disk is an error here, naming the cache
    folder, and never a SIGBUS on a write through the memory map."""

    def __init__(self, capacity: int, final: Path | None):
        self.size, self.tmp = 0, None
        if final is None:
            self.data = aligned_empty(capacity)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name), dir=final.parent))
            try:
                self._allocate(capacity)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            self.data = np.memmap(self.tmp / "pixels.u8", np.uint8, mode="r+", shape=(capacity,))

    def _allocate(self, capacity: int):
        """Make the pixel file ``capacity`` bytes of real disk blocks (ENOSPC: DataError)."""
        with open(self.tmp / "pixels.u8", "a+b") as f:
            try:
                if hasattr(os, "posix_fallocate"):
                    try:
                        os.posix_fallocate(f.fileno(), 0, capacity)
                        return
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                            raise
                f.truncate(capacity)   # no fallocate here: a sparse file, as before
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DataError(f"the disk cache does not fit: {self.tmp.parent} ran out of space "
                                    f"({_gb(capacity)} needed); free space there, set data.cache_dir to a disk "
                                    f"with room, a smaller data.cache_size, or data.cache: memory") from None
                raise

    def append(self, img: np.ndarray) -> int:
        n = img.size
        if self.size + n > len(self.data):
            self._grow(max(2 * len(self.data), self.size + n))
        start = self.size
        self.data[start:start + n] = img.reshape(-1)
        self.size += n
        return start

    def _grow(self, capacity: int):
        if self.tmp is None:
            new = aligned_empty(capacity)
            new[:self.size] = self.data[:self.size]
            self.data = new
        else:
            self.data.flush()
            del self.data
            self._allocate(capacity)
            self.data = np.memmap(self.tmp / "pixels.u8", np.uint8, mode="r+", shape=(capacity,))

    def finish(self):
        if self.tmp is None:
            return aligned_copy(self.data[:self.size]) if self.size < len(self.data) // 2 else self.data[:self.size]
        self.data.flush()
        del self.data
        with open(self.tmp / "pixels.u8", "r+b") as f:
            f.truncate(max(self.size, 1))
        return None


def _publish(cache: ImageCache, bad: dict, final: Path, buf: _Buffer, keys, cfg) -> tuple[ImageCache, dict]:
    """Write the disk cache's index (keys, offsets, shapes, the files it could not decode) into
    the temporary folder beside its pixels and rename the folder into place: what is published
    is complete and self-describing. A process that loses that race (another published the same
    cache first) drops its own build and maps the winner's pixels by the WINNER's index: its
    offsets would misread them where the two builds kept different files."""
    np.savez(buf.tmp / "index.npz", keys=np.array(cache.keys, dtype=str), offsets=cache.offsets,
             shapes=cache.shapes, bad_keys=np.array(list(bad), dtype=str),
             bad_reasons=np.array(list(bad.values()), dtype=str))
    try:
        os.replace(buf.tmp, final)
        buf.tmp = None
    except OSError as e:
        if not (final / "index.npz").is_file():
            raise DataError(f"could not publish the disk cache at {final}: {e.strerror or e}; "
                            f"check data.cache_dir") from None
        found = _load_published(final, keys, cfg)
        if found is None:
            raise DataError(f"the disk cache at {final} does not hold this data's files; delete the folder") from None
        return found
    cache.pixels, cache.path = np.memmap(final / "pixels.u8", np.uint8, mode="r"), final
    cache.source = "decoded"
    return cache, bad


# ----------------------------------------------------------------------------- datasets
def make_dataset(cache: ImageCache, files: list[tuple[str, int]], cfg, seed: int, train: bool,
                 batch: bool = True, shuffle: bool | None = None, drop_remainder: bool = False,
                 num_classes: int | None = None, mixing=None, shard=None, epoch: int | None = None,
                 steps: int | None = None, mix_until: int | None = None) -> tf.data.Dataset:
    """(float32 image, int32 label) batches of ``files`` (each in the cache).

    train: a permutation of the whole list per epoch (``pass_order``: an exact uniform
    permutation, not a window over class-ordered files), then an augmented view per image
    (crop/flip/affine/jitter, then the recipe's ops: kfine.augment), and per batch MixUp/CutMix
    when configured: labels are then soft, float32 (B, ``num_classes``), while ``mixing`` (a
    boolean tf.Variable) is True and, in the epoch stream, the epoch is below ``mix_until`` (None:
    no limit; kfine.augment.mixing_epochs). Every draw (the order, each image's view, each batch's
    mix) is stateless, from (``seed``, epoch, position): epoch e is the same whichever epoch a
    process started at. ``epoch``: the stream of epochs ``epoch``, ``epoch + 1``, ... of ``steps``
    batches each (``epoch_stream``; what training iterates, also after a resume); None: one
    pass, a new one each time the dataset is iterated. val/test: the eval view, in the order of
    ``files``. ``shuffle=False`` keeps the order of ``files`` for augmented views too.
    ``shard`` (kfine.distribute.Shard): this process's part, taken AFTER the permutation (the same
    in every process: same seed), each image keeping the augmentation seed it has unsharded, and
    batched by the per-process batch."""
    from kfine import augment
    slots = np.array([cache.slot[p] for p, _ in files], np.int64)
    labels = np.array([y for _, y in files], np.int32)
    size, aug = tuple(cfg.image_size), cfg.augment
    batch_size = cfg.batch_size if shard is None else shard.batch
    graph = graph_views(cfg.view_path)
    if not train:
        ds = tf.data.Dataset.from_tensor_slices((slots, labels))
        ds = ds if shard is None else shard.split(ds, len(slots))
        ds = ds.map(graph_fn(lambda s, y: (eval_view(cache.load(s, graph), size, cfg.eval_transform), y)),
                    num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder) if batch else ds
        return ds.prefetch(AUTOTUNE).with_options(one_pass_options())

    recipe = augment.per_image_ops(aug, seed)   # None for the basic recipe
    mix = augment.batch_ops(aug, num_classes, seed, mixing) if batch and num_classes else None
    order = "file" if shuffle is False else ("balanced" if cfg.sampling == "balanced" else "uniform")

    @graph_fn
    def view(sd, p, box=None):   # sd: the image's seed, from its pass and position
        img = train_view(cache.view(tf.gather(slots, p), graph), sd, aug, size, cfg.eval_transform, box)
        if recipe is not None:
            img = recipe(img, tf.random.experimental.stateless_fold_in(sd, 1))
        return img, tf.gather(labels, p)

    # The graph path draws crop boxes BOX_CHUNK images at a time (~150 small ops per box otherwise)
    chunked = graph and aug.enabled and aug.random_resized_crop and cache.pixels is not None
    scale = tuple(aug.crop_scale)

    @graph_fn
    def seeded(i, p, key):   # an image's seed and its crop box's uniforms
        sd = tf.random.experimental.stateless_fold_in(key, i)
        return sd, p, crop_draws(sd)

    @graph_fn
    def boxes(sd, p, u):   # a chunk's boxes
        hw = tf.gather(cache.tensors()[2], tf.gather(slots, p))
        return sd, p, crop_box_tf(hw[:, 0], hw[:, 1], u, scale)

    def one_pass(e, part):
        images, batches = tf.unstack(tf.random.experimental.stateless_split(pass_key(seed, e, part), 2))
        ds = tf.data.Dataset.from_tensor_slices(pass_order(labels, seed, e, part, order)).enumerate()
        if shard is not None:
            ds = shard.split(ds, len(slots))
        if chunked:
            ds = ds.map(lambda i, p: seeded(i, p, images), num_parallel_calls=AUTOTUNE)
            ds = ds.batch(BOX_CHUNK).map(boxes, num_parallel_calls=AUTOTUNE).unbatch()
            ds = ds.map(view, num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda i, p: view(tf.random.experimental.stateless_fold_in(images, i), p),
                        num_parallel_calls=AUTOTUNE)
        if batch:
            ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if mix is not None:   # MixUp / CutMix: soft labels
            on = tf.constant(True) if mix_until is None else e < mix_until
            ds = ds.enumerate().map(graph_fn(lambda j, b: mix(b[0], b[1], tf.random.experimental.stateless_fold_in(
                batches, j), on)), num_parallel_calls=AUTOTUNE)
        return ds

    if epoch is None:   # one pass; iterated again (e.g. .repeat()), a new one from the seed's sequence
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
        ds = draws.flat_map(lambda r: one_pass(tf.math.floormod(r, 2 ** 62), tf.constant(0, tf.int64)))
    else:
        ds = epoch_stream(epoch, steps, one_pass)
    # val/test keep file order (predictions.csv lines up with `files`); train follows the config
    return ds.prefetch(AUTOTUNE).with_options(_options(bool(cfg.deterministic) if shuffle is not False else True))


BOX_CHUNK = 64                # images whose crop boxes the graph path draws at once
GRAPH_VIEWS_ABOVE_CORES = 8   # data.view_path auto: the graph path on more cores than this


def feeding_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def graph_views(view_path: str) -> bool:
    """Whether views are cut in TensorFlow ops alone (``data.view_path``). ``auto``: yes when
    the pipeline feeds more than one local device (kfine.distribute's plan) or runs on more than
    GRAPH_VIEWS_ABOVE_CORES cores: there the Python path's GIL caps one process at a few
    thousand images/s; on fewer cores its one Python call per view costs less CPU, and the two
    paths measure about the same. Both paths cut the same views from the same seeds."""
    if view_path != "auto":
        return view_path == "graph"
    from kfine import distribute
    plan = distribute.active()
    local_devices = plan.replicas // max(plan.processes, 1)
    return local_devices > 1 or feeding_cores() > GRAPH_VIEWS_ABOVE_CORES


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    return options


def one_pass_options(deterministic: bool = True) -> tf.data.Options:
    """Options of a dataset whose iterator is made and dropped at every use: an evaluation, each
    epoch's validation (Keras makes a new iterator per epoch), a feature pass, a serving call.
    TensorFlow's autotuning thread makes dropping an iterator wait for it (0.3 to 10 s measured
    on 2 cores, after the CPU was busy), and its graph rewrite runs at every new iterator (about
    0.1 s of every call of the exported SavedModel's bytes signature: tools/bench.py --only
    serving). Without autotuning a map of ``num_parallel_calls=AUTOTUNE`` runs at
    ``initial_parallelism`` (TensorFlow's default: 16, at most the cores): set to every core this
    process may use, as far as autotuning would have taken it (the data check's decode pass of a
    large folder on a 64-core machine)."""
    options = _options(deterministic)
    options.autotune.enabled = False
    options.autotune.initial_parallelism = feeding_cores()
    options.experimental_optimization.apply_default_optimizations = False
    return options


def pass_key(seed: int, epoch, part) -> tf.Tensor:
    """The stateless seed (int64[2]) of pass ``part`` of epoch ``epoch``; images and batches fold
    in their position."""
    key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch)
    return tf.random.experimental.stateless_fold_in(key, part)


def pass_order(labels: np.ndarray, seed: int, epoch, part, order: str = "uniform") -> tf.Tensor:
    """tf.data op: positions into ``labels`` for pass ``part`` of epoch ``epoch``, a function of
    (seed, epoch, part) only. ``uniform``: a permutation of all; ``balanced``: len(labels) draws
    with every class equally likely, each class through a fresh order of its own images (small
    classes repeat, large ones are sampled); ``file``: the positions in order."""
    labels = np.asarray(labels)

    def draw(e, r):
        if order == "file":
            return np.arange(len(labels), dtype=np.int64)
        rng = np.random.default_rng([seed, int(e), int(r)])
        if order == "uniform":
            return rng.permutation(len(labels)).astype(np.int64)
        classes = np.unique(labels)
        pick = rng.integers(len(classes), size=len(labels))   # the class of each draw
        out = np.empty(len(labels), np.int64)
        for c, members in enumerate(np.flatnonzero(labels == k) for k in classes):
            draws = np.flatnonzero(pick == c)
            out[draws] = rng.permutation(members)[np.arange(len(draws)) % len(members)]
        return out

    out = tf.numpy_function(draw, [epoch, part], tf.int64, stateful=False)
    out.set_shape([len(labels)])
    return out


def epoch_stream(first: int, steps: int | None, one_pass) -> tf.data.Dataset:
    """Epochs ``first``, ``first + 1``, ... of ``steps`` batches each. Epoch e is the passes
    ``one_pass(e, 0)``, ``one_pass(e, 1)``, ... cut at ``steps`` batches (one whole pass when
    ``steps`` is the pass's batch count, or None): a function of e alone, so a run resumed at
    epoch e trains on exactly what the uninterrupted run did from there. (At most ``steps``
    passes: an empty pass ends the epoch short instead of looping.)"""
    def one_epoch(e):
        if steps is None:
            return one_pass(e, tf.constant(0, tf.int64))
        return tf.data.Dataset.range(steps).flat_map(lambda r: one_pass(e, r)).take(steps)
    return tf.data.Dataset.counter(first).flat_map(one_epoch)


# ----------------------------------------------------------------------------- predict
def load_images(paths: list[str], image_size, cache_size=None, eval_transform="resize_center_crop",
                max_pixels=None) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Files -> (uint8 eval views (N, H, W, 3), paths that loaded, [(bad path, reason)]); the same
    transform as evaluation and the exported model. Images above ``max_pixels`` are refused by
    their header, undecoded."""
    scanned = scan_files([str(p) for p in paths], max_pixels)
    arrays, ok, bad = [], [], []
    for p in map(str, paths):
        if isinstance(scanned[p], str):
            bad.append((p, scanned[p]))
            continue
        try:
            img = eval_image(tf.io.read_file(p), image_size, cache_size, eval_transform)
        except (tf.errors.OpError, ValueError):
            bad.append((p, _bad_reason(p)))
            continue
        arrays.append(np.round(img.numpy()).astype(np.uint8))
        ok.append(p)
    h, w = image_size
    return (np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)), ok, bad
