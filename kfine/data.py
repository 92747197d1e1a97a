"""Sources (image folders in the reference layouts, tensorflow-datasets, the digits demo) -> tf.data.

The pipeline is a chain of separate steps so that caches plug in later:

    list files -> (path, label) -> decode -> resize -> [cache] -> shuffle -> augment -> batch -> prefetch

Every file is decoded once up front (in a parallel tf.data pass, by the very op the pipeline uses),
so a corrupt image is reported by path before training and never raises inside a tf.data worker;
``ignore_errors()`` after the decode is only the last line of defence. Map functions use ``tf.*``
ops only (keras.ops break inside tf.data under the JAX backend). Images leave the pipeline as
float32 in 0..255: the model does its own preprocessing.

Folder layouts (``data.layout``):
    sketch  ROOT/{train_set,val_set,test_set}/<class>/       (ImageNet-Sketch project)
    inat    ROOT/{train,val}/<class>/  val = held-out TEST; validation = stratified share of train
    single  ROOT/<class>/  split into train/val/test by stratified fractions
    auto    detected from the folder names

Audit:  python -m kfine.data check ROOT_OR_CONFIG [--out DIR] [--samples N] [--class NAME]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from kfine.config import AugmentConfig, DataConfig

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
LAYOUTS = {"sketch": ("train_set", "val_set", "test_set"), "inat": ("train", "val"), "single": ()}
# physical folder -> split it feeds ("inat" val is the held-out test set)
SPLIT_OF = {"train_set": "train", "val_set": "val", "test_set": "test", "train": "train", "val": "test"}
LAYOUT_HELP = ("expected one of: sketch ROOT/{train_set,val_set,test_set}/<class>/, "
               "inat ROOT/{train,val}/<class>/, single ROOT/<class>/")


class DataError(ValueError):
    """Bad input that stops before training; the message names the problem and the fix."""


class BadImageError(DataError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass
class Datasets:
    train: tf.data.Dataset
    val: tf.data.Dataset | None
    test: tf.data.Dataset | None
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- single images
def _decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 HxWx3 (JPEG incl. CMYK, PNG incl. 16-bit, BMP, GIF first frame, WebP)."""
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def _resize(img: tf.Tensor, image_size) -> tf.Tensor:
    """uint8/float image -> uint8 (H, W, 3): antialiased bilinear resize in float32, rounded.
    uint8 is what the cache holds: a quarter of float32's memory (nature_12K at 224 px: 1.5 GB)."""
    out = tf.image.resize(tf.cast(img, tf.float32), image_size, antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _clean_reason(err: Exception) -> str:
    msg = getattr(err, "message", None) or str(err)
    msg = re.sub(r"\{\{[^}]*\}\}\s*", "", msg)
    return re.sub(r"\s*\[Op:\w+\]", "", msg).strip() or type(err).__name__


def _bad_reason(path: str) -> str:
    """Why ``path`` cannot be decoded (called only for files the parallel probe dropped)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"
    try:
        _decode(data)
    except (tf.errors.OpError, ValueError) as e:
        reason = _clean_reason(e)
        return reason if "Unknown image file format" not in reason else \
            "not an image file (content is not JPEG, PNG, BMP, GIF or WebP)"
    return "could not be decoded"


def load_image(path: str, image_size: tuple[int, int]) -> np.ndarray:
    """One image -> uint8 (H, W, 3) RGB resized to ``image_size``; raises BadImageError(path, reason)."""
    try:
        img = _decode(tf.io.read_file(str(path)))
    except (tf.errors.OpError, ValueError):
        raise BadImageError(path, _bad_reason(str(path))) from None
    return _resize(img, image_size).numpy()


def load_images(paths: list[str], image_size) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Batch loader for predict: (uint8 (N, H, W, 3), paths that loaded, [(bad path, reason)])."""
    arrays, ok, bad = [], [], []
    for p in paths:
        try:
            arrays.append(load_image(p, image_size))
            ok.append(str(p))
        except BadImageError as e:
            bad.append((e.path, e.reason))
    h, w = image_size
    stacked = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
    return stacked, ok, bad


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def list_images(root: str) -> list[str]:
    """Every image file under ``root`` (recursive, sorted)."""
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and _is_image(p))


# Probe results by (path, size, mtime): (h, w) for a good image, a reason string for a bad one.
_PROBED: dict[tuple[str, int, float], tuple[int, int] | str] = {}


def _probe_key(path: str):
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime)


def probe_images(paths: list[str]) -> dict[str, tuple[int, int] | str]:
    """Decode every file once (parallel tf.data pass): path -> (height, width) or the reason it is bad."""
    keys = {p: _probe_key(p) for p in paths}
    todo = [p for p in paths if keys[p] not in _PROBED]
    if todo:
        ds = tf.data.Dataset.from_tensor_slices(todo).enumerate()
        ds = ds.map(lambda i, p: (i, tf.shape(_decode(tf.io.read_file(p)))[:2]),
                    num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        good = {int(i): (int(hw[0]), int(hw[1])) for i, hw in ds.as_numpy_iterator()}
        for i, p in enumerate(todo):
            _PROBED[keys[p]] = good[i] if i in good else _bad_reason(p)
    return {p: _PROBED[keys[p]] for p in paths}


# ----------------------------------------------------------------------------- folders
def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def detect_layout(root: Path) -> str:
    names = {d.name for d in _class_dirs(root)}
    if not names:
        raise DataError(f"{root} has no class folders; {LAYOUT_HELP}")
    sketch, inat = names & set(LAYOUTS["sketch"]), names & set(LAYOUTS["inat"])
    split_like = {"train", "val", "test", "train_set", "val_set", "test_set", "valid", "validation"}
    if sketch and not inat and names <= split_like:
        return "sketch"
    if inat and not sketch and names <= split_like - {"test"}:
        return "inat"
    if not names & split_like:
        return "single"
    raise DataError(f"cannot tell the layout of {root}: found folders {sorted(names)}; {LAYOUT_HELP}. "
                    "Set data.layout explicitly or rename the folders.")


def find_folder(root: str | os.PathLike, layout: str = "auto"):
    """Walk a dataset folder: (layout, {folder split: {class: [image paths]}}, [non-image files]).

    Folder split keys are "" for single, else the physical folder names (train_set, val, ...).
    Raises DataError for a missing/empty root, an unknown layout, a missing split, a class folder
    with no images, or class folders that differ between splits.
    """
    if root is None:
        raise DataError("data.root is not set; set it to your dataset folder (data.root=path/to/data)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder; set data.root to your dataset folder")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown data.layout {layout!r}; choose one of {sorted(LAYOUTS) + ['auto']}")
    folders = LAYOUTS[layout] or ("",)
    missing = [f for f in folders if not (root / f).is_dir()]
    if missing:
        found = sorted(d.name for d in _class_dirs(root))
        raise DataError(f"missing split folder(s) {missing} in {root} for layout {layout!r} (found {found}); "
                        f"create {', '.join(str(root / m) for m in missing)} or choose another data.layout")
    tree, non_images = {}, []
    for f in folders:
        classes = _class_dirs(root / f)
        if not classes:
            raise DataError(f"{root / f} has no class folders; put images in {root / f}/<class>/")
        tree[f] = {}
        for d in classes:
            files = sorted(p for p in d.rglob("*") if p.is_file())
            images = [str(p) for p in files if _is_image(p)]
            non_images += [str(p) for p in files if not _is_image(p)]
            if not images:
                raise DataError(f"class folder {d} has no images ({', '.join(IMAGE_EXTS)}); "
                                "add images or remove the folder")
            tree[f][d.name] = images
    all_classes = sorted(set().union(*[set(c) for c in tree.values()]))
    for cls in all_classes:
        lacking = [f for f in folders if cls not in tree[f]]
        if lacking:
            having = [f for f in folders if cls in tree[f]]
            raise DataError(f"class {cls!r} is in split(s) {having} but not in {lacking} under {root}; "
                            f"every split needs the same class folders: add {root}/{lacking[0]}/{cls}/ "
                            "or remove the class everywhere")
    return layout, tree, non_images


def _cap(paths: list[str], limit: int | None, rng: np.random.Generator) -> list[str]:
    if limit is None or len(paths) <= limit:
        return list(paths)
    return sorted(rng.choice(paths, size=limit, replace=False).tolist())


def _split_class(paths: list[str], fractions: dict[str, float], rng: np.random.Generator):
    """Stratified split of one class: {split: paths}; each requested split gets at least one image."""
    order = list(paths)
    rng.shuffle(order)
    out, start = {}, 0
    for split, frac in fractions.items():
        n = max(1, round(len(order) * frac)) if frac > 0 else 0
        out[split], start = sorted(order[start:start + n]), start + n
    out["train"] = sorted(order[start:])
    return out


def split_files(layout: str, tree: dict, cfg: DataConfig, seed: int, strict: bool = True):
    """(class_names, {split: [(path, label)]}, too_few) for the layout; same seed -> same split."""
    rng = np.random.default_rng(seed)
    class_names = sorted(next(iter(tree.values())))
    fractions = {"single": {"val": cfg.val_fraction, "test": cfg.test_fraction},
                 "inat": {"val": cfg.val_fraction}, "sketch": {}}[layout]
    files: dict[str, list[tuple[str, int]]] = defaultdict(list)
    too_few = []
    for label, cls in enumerate(class_names):
        for folder, classes in tree.items():
            paths = _cap(classes.get(cls, []), cfg.limit_per_class, rng)
            if folder not in ("", "train"):   # a ready-made split (sketch, inat's held-out test)
                files[SPLIT_OF[folder]] += [(p, label) for p in paths]
                continue
            need = 1 + sum(1 for f in fractions.values() if f > 0)
            if len(paths) < need:
                where = f"{folder}/{cls}" if folder else cls
                too_few.append({"class": cls, "split": folder or "all", "images": len(paths), "needed": need})
                if strict:
                    raise DataError(
                        f"class {cls!r} has {len(paths)} usable image(s) in {where!r}, too few for the stratified "
                        f"split {dict(fractions)} (needs at least {need}: one per split); add images, "
                        "or set data.val_fraction/data.test_fraction to 0")
                files["train"] += [(p, label) for p in paths]
                continue
            for split, ps in _split_class(paths, fractions, rng).items():
                files[split] += [(p, label) for p in ps]
    return class_names, dict(files), too_few


# ----------------------------------------------------------------------------- pipeline
def _affine(img: tf.Tensor, aug: AugmentConfig, seed: tf.Tensor) -> tf.Tensor:
    """Random rotation/translation/zoom/shear about the centre as one projective transform."""
    s = tf.random.experimental.stateless_split(seed, 5)
    h, w = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)

    def u(i, lim):
        return tf.random.stateless_uniform([], s[i], -lim, lim) if lim else tf.constant(0.0)

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
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=img[None], transforms=transform, output_shape=tf.shape(img)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return out[0]


def augment_image(img: tf.Tensor, seed: tf.Tensor, aug: AugmentConfig, image_size) -> tf.Tensor:
    """uint8/float32 (H, W, 3) 0..255 -> float32 augmented, same shape and range. Stateless: ``seed`` fixes it."""
    s = tf.random.experimental.stateless_split(seed, 8)
    img = tf.cast(img, tf.float32)
    if aug.random_resized_crop:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(img), tf.zeros([1, 0, 4]), seed=s[0], min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=tuple(aug.crop_scale), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        img = tf.image.resize(tf.slice(img, begin, size), image_size, antialias=True)
    if aug.flip:
        img = tf.image.stateless_random_flip_left_right(img, s[1])
    if aug.rotation or aug.translation or aug.zoom or aug.shear:
        img = _affine(img, aug, s[2])
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        x = img / 255.0
        if aug.brightness:
            x = tf.image.stateless_random_brightness(x, aug.brightness, s[3])
        if aug.contrast:
            x = tf.image.stateless_random_contrast(x, 1 - aug.contrast, 1 + aug.contrast, s[4])
        if aug.saturation:
            x = tf.image.stateless_random_saturation(tf.clip_by_value(x, 0, 1), 1 - aug.saturation,
                                                     1 + aug.saturation, s[5])
        if aug.hue:
            x = tf.image.stateless_random_hue(tf.clip_by_value(x, 0, 1), min(aug.hue, 0.5), s[6])
        img = x * 255.0
    img = tf.clip_by_value(img, 0.0, 255.0)
    img.set_shape([*image_size, 3])
    return img


def build_pipeline(ds: tf.data.Dataset, cfg: DataConfig, seed: int, train: bool) -> tf.data.Dataset:
    """(uint8 resized image, int32 label) elements -> [cache] -> shuffle -> augment -> batch ->
    float32 -> prefetch."""
    size = tuple(cfg.image_size)
    if cfg.cache:
        ds = ds.cache()
    if train:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if cfg.augment.enabled:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda xy, sd: (augment_image(xy[0], sd, cfg.augment, size), xy[1]),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(cfg.batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # val/test must keep file order (predictions.csv lines up with `files`); train follows the config
    options.deterministic = bool(cfg.deterministic) if train else True
    return ds.with_options(options)


def files_dataset(files: list[tuple[str, int]], image_size) -> tf.data.Dataset:
    """[(path, label)] -> decoded, resized (uint8 image, int32 label) elements."""
    paths = [p for p, _ in files]
    labels = np.array([y for _, y in files], np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (_resize(_decode(tf.io.read_file(p)), image_size), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors()   # last line of defence: bad files were already dropped up front


def _count(files, class_names) -> dict[str, int]:
    c = Counter(y for _, y in files)
    return {name: c.get(i, 0) for i, name in enumerate(class_names)}


def _folder_root(cfg: DataConfig) -> tuple[str, str]:
    if cfg.source == "digits":
        return ensure_digits(), "single"
    return cfg.root, cfg.layout


def make_datasets(cfg: DataConfig, seed: int = 0) -> Datasets:
    """Train/val/test tf.data pipelines for ``cfg`` (see the module docstring)."""
    if cfg.source == "tfds":
        return _make_tfds(cfg, seed)
    root, layout = _folder_root(cfg)
    layout, tree, _ = find_folder(root, layout)
    paths = [p for classes in tree.values() for ps in classes.values() for p in ps]
    probed = probe_images(paths)
    skipped = [(p, r) for p, r in probed.items() if isinstance(r, str)]
    if skipped and cfg.on_bad_image == "stop":
        listing = "\n".join(f"  {p}: {r}" for p, r in skipped)
        raise DataError(f"{len(skipped)} unreadable image(s) (data.on_bad_image: stop); fix or remove them, "
                        f"or set data.on_bad_image=skip:\n{listing}")
    bad = {p for p, _ in skipped}
    tree = {f: {c: [p for p in ps if p not in bad] for c, ps in classes.items()} for f, classes in tree.items()}
    for f, classes in tree.items():
        for c, ps in classes.items():
            if not ps:
                raise DataError(f"class folder {Path(root) / f / c} has no readable images (every file in it "
                                "failed to decode); add images or remove the folder")
    class_names, files, _ = split_files(layout, tree, cfg, seed, strict=True)
    size = tuple(cfg.image_size)
    sets = {s: build_pipeline(files_dataset(files[s], size), cfg, seed, train=(s == "train"))
            if files.get(s) else None for s in SPLITS}
    return Datasets(train=sets["train"], val=sets["val"], test=sets["test"], class_names=class_names,
                    files={s: files[s] for s in SPLITS if files.get(s)},
                    counts={s: _count(files[s], class_names) for s in SPLITS if files.get(s)}, skipped=skipped)


# ----------------------------------------------------------------------------- tensorflow-datasets
def _tfds_load(cfg: DataConfig, split: str, labels_only: bool = False):
    import tensorflow_datasets as tfds
    decoders = {cfg.image_key: tfds.decode.SkipDecoding()} if labels_only else None
    try:
        return tfds.load(cfg.name, split=split, data_dir=cfg.data_dir, download=cfg.download,
                         shuffle_files=False, with_info=True, decoders=decoders)
    except Exception as e:   # noqa: BLE001 - tfds raises many types; all mean "not available"
        where = cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise DataError(f"tfds dataset {cfg.name!r} (split {split!r}) could not be loaded: {_clean_reason(e)}. "
                        f"Put the prepared dataset under data.data_dir ({where}) or set data.download: true"
                        ) from None


def _tfds_labels(cfg: DataConfig, split: str) -> np.ndarray:
    ds, _ = _tfds_load(cfg, split, labels_only=True)
    return np.fromiter((y for y in ds.map(lambda ex: ex[cfg.label_key]).as_numpy_iterator()), np.int64)


def _tfds_examples(ds: tf.data.Dataset, cfg: DataConfig, channels: int) -> tf.data.Dataset:
    size = tuple(cfg.image_size)

    def convert(ex):
        img = ex[cfg.image_key]
        if channels == 1:
            img = tf.image.grayscale_to_rgb(img)
        elif channels == 4:
            img = img[..., :3]
        return _resize(img, size), tf.cast(ex[cfg.label_key], tf.int32)
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()


def _make_tfds(cfg: DataConfig, seed: int) -> Datasets:
    if not cfg.name:
        raise DataError("data.source is tfds but data.name is not set; set data.name (e.g. tf_flowers)")
    train_raw, info = _tfds_load(cfg, cfg.train_split)
    if cfg.label_key not in info.features or cfg.image_key not in info.features:
        raise DataError(f"tfds {cfg.name!r} has features {sorted(info.features)}; "
                        "set data.image_key / data.label_key to the right ones")
    class_names = list(info.features[cfg.label_key].names)
    channels = info.features[cfg.image_key].shape[-1] or 3
    train_labels = _tfds_labels(cfg, cfg.train_split)
    files, counts, sets = {}, {}, {}
    if cfg.val_split is None and cfg.val_fraction > 0:
        rng = np.random.default_rng(seed)
        is_val = np.zeros(len(train_labels), bool)
        for c in np.unique(train_labels):
            idx = np.flatnonzero(train_labels == c)
            if len(idx) < 2:
                raise DataError(f"class {class_names[c]!r} has {len(idx)} image(s) in {cfg.train_split!r}, "
                                "too few for a stratified validation split; set data.val_split or val_fraction 0")
            is_val[rng.permutation(idx)[:max(1, round(len(idx) * cfg.val_fraction))]] = True
        mask = tf.constant(is_val)
        ids = tf.data.Dataset.range(len(train_labels))
        pick = {"train": False, "val": True}
        for split, want in pick.items():
            ds = tf.data.Dataset.zip((ids, train_raw)).filter(lambda i, ex, w=want: tf.equal(tf.gather(mask, i), w))
            sets[split] = ds.map(lambda i, ex: ex)
            idx = np.flatnonzero(is_val == want)
            files[split] = [(f"tfds:{cfg.train_split}[{i}]", int(train_labels[i])) for i in idx]
    else:
        sets["train"] = train_raw
        files["train"] = [(f"tfds:{cfg.train_split}[{i}]", int(y)) for i, y in enumerate(train_labels)]
        if cfg.val_split:
            sets["val"], _ = _tfds_load(cfg, cfg.val_split)
            files["val"] = [(f"tfds:{cfg.val_split}[{i}]", int(y))
                            for i, y in enumerate(_tfds_labels(cfg, cfg.val_split))]
    if cfg.test_split:
        sets["test"], _ = _tfds_load(cfg, cfg.test_split)
        files["test"] = [(f"tfds:{cfg.test_split}[{i}]", int(y))
                         for i, y in enumerate(_tfds_labels(cfg, cfg.test_split))]
    for split, fl in files.items():
        counts[split] = _count(fl, class_names)
    out = {s: build_pipeline(_tfds_examples(ds, cfg, channels), cfg, seed, train=(s == "train"))
           for s, ds in sets.items()}
    return Datasets(train=out["train"], val=out.get("val"), test=out.get("test"), class_names=class_names,
                    files=files, counts=counts, skipped=[])


# ----------------------------------------------------------------------------- digits demo
def ensure_digits(cache_dir: str | os.PathLike | None = None) -> str:
    """scikit-learn's 1,797 8x8 digits as 32x32 grayscale PNGs in <cache>/digits/<digit>/<i>.png, once."""
    from PIL import Image
    from sklearn.datasets import load_digits

    base = Path(cache_dir or os.environ.get("KFINE_CACHE") or Path.home() / ".cache" / "kfine")
    root = base / "digits"
    if root.is_dir():
        return str(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=base))
    try:
        digits = load_digits()
        for i, (img, y) in enumerate(zip(digits.images, digits.target)):
            arr = np.round(img * 255.0 / 16.0).astype(np.uint8)
            (tmp / str(y)).mkdir(exist_ok=True)
            Image.fromarray(arr, "L").resize((32, 32), Image.BILINEAR).save(tmp / str(y) / f"{i:04d}.png")
        os.rename(tmp, root)   # atomic: a half-written set never appears as the root
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.is_dir():   # another process may have won the race
            raise
    return str(root)


# ----------------------------------------------------------------------------- audit
def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_data(cfg: DataConfig, seed: int = 0, image_size=None) -> dict:
    """Audit a data source before training; a JSON-able report (see ``format_check``)."""
    image_size = tuple(image_size or cfg.image_size)
    if cfg.source == "tfds":
        ds = make_datasets(cfg, seed)
        return {"source": "tfds", "layout": None, "class_names": ds.class_names, "counts": ds.counts,
                "warnings": _imbalance(ds.counts), "unreadable": [], "non_images": [], "duplicates": [],
                "leakage": [], "too_small": [], "too_few": []}
    root, layout = _folder_root(cfg)
    layout, tree, non_images = find_folder(root, layout)
    paths = [p for classes in tree.values() for ps in classes.values() for p in ps]
    probed = probe_images(paths)
    unreadable = [{"path": p, "reason": r} for p, r in probed.items() if isinstance(r, str)]
    good = {f: {c: [p for p in ps if not isinstance(probed[p], str)] for c, ps in classes.items()}
            for f, classes in tree.items()}
    class_names, files, too_few = split_files(layout, good, cfg, seed, strict=False)
    split_of = {p: s for s, fl in files.items() for p, _ in fl}
    by_hash = defaultdict(list)
    for p in sorted(split_of):
        by_hash[_sha1(p)].append(p)
    duplicates, leakage = [], []
    for digest, ps in sorted(by_hash.items()):
        if len(ps) < 2:
            continue
        splits = sorted({split_of[p] for p in ps})
        entry = {"sha1": digest, "paths": ps, "splits": splits}
        (leakage if len(splits) > 1 else duplicates).append(entry)
    too_small = [{"path": p, "size": list(hw)} for p, hw in probed.items()
                 if not isinstance(hw, str) and (hw[0] < image_size[0] or hw[1] < image_size[1])]
    counts = {s: _count(files[s], class_names) for s in SPLITS if files.get(s)}
    warnings = _imbalance(counts)
    if leakage:
        warnings.insert(0, f"LEAKAGE: {len(leakage)} image(s) appear in more than one split")
    return {"source": cfg.source, "root": str(root), "layout": layout, "class_names": class_names,
            "image_size": list(image_size), "counts": counts, "warnings": warnings,
            "unreadable": unreadable, "non_images": non_images, "duplicates": duplicates,
            "leakage": leakage, "too_small": too_small, "too_few": too_few}


def _imbalance(counts: dict) -> list[str]:
    train = counts.get("train") or {}
    if not train or min(train.values()) == 0:
        return []
    ratio = max(train.values()) / min(train.values())
    if ratio > 3:
        return [f"class imbalance: largest/smallest train class = {ratio:.1f} (> 3); "
                "consider train.class_weight: balanced"]
    return []


def format_check(report: dict) -> str:
    """A short human summary of a ``check_data`` report."""
    lines = [f"kfine data check: {report.get('root') or report['source']} (layout {report['layout']}), "
             f"{len(report['class_names'])} classes"]
    for split, c in report["counts"].items():
        lines.append(f"  {split}: {sum(c.values())} images ({min(c.values())}..{max(c.values())} per class)")
    for w in report["warnings"]:
        lines.append(f"  WARNING {w}")
    for e in report["leakage"]:
        lines.append(f"  LEAKAGE ({', '.join(e['splits'])}): " + " == ".join(e["paths"]))
    sections = [("unreadable", "unreadable images", lambda e: f"{e['path']}: {e['reason']}"),
                ("non_images", "files that are not images", str),
                ("duplicates", "duplicate images within a split", lambda e: " == ".join(e["paths"])),
                ("too_small", f"images smaller than {report.get('image_size')}",
                 lambda e: f"{e['path']} {e['size'][0]}x{e['size'][1]}"),
                ("too_few", "classes with too few images for the split",
                 lambda e: f"{e['class']}: {e['images']} (needs {e['needed']})")]
    for key, title, fmt in sections:
        items = report.get(key) or []
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {fmt(e)}" for e in items[:10]]
            if len(items) > 10:
                lines.append(f"    ... and {len(items) - 10} more (see data_check.json)")
    return "\n".join(lines)


def plot_samples(files: list[tuple[str, int]] | list[str], class_name: str, out_path, n: int = 10,
                 seed: int = 0) -> str:
    """A grid of ``n`` random images (paths or (path, label) pairs) titled with the class name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [f[0] if isinstance(f, (tuple, list)) else f for f in files]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(paths), size=min(n, len(paths)), replace=False)) if paths else []
    cols = min(5, max(1, len(pick)))
    rows = max(1, math.ceil(len(pick) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, pick):
        try:
            ax.imshow(load_image(paths[i], (128, 128)))
        except BadImageError:
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(Path(paths[i]).name, fontsize=7)
    fig.suptitle(class_name)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.data", description="Audit an image dataset.")
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="counts, unreadable files, duplicates, leakage, small images")
    chk.add_argument("target", metavar="ROOT_OR_CONFIG", help="a dataset folder (layout auto) or a YAML config")
    chk.add_argument("--out", help="write DIR/data_check.json and DIR/plots/samples_<class>.png")
    chk.add_argument("--samples", type=int, default=10, help="images in the sample grid")
    chk.add_argument("--class", dest="class_name", help="class for the sample grid (default: random)")
    args = ap.parse_args(argv)
    seed = 0
    if Path(args.target).is_file() and args.target.endswith((".yaml", ".yml")):
        from kfine.config import load_config
        full = load_config(args.target)
        cfg, seed = full.data, full.seed
    else:
        cfg = DataConfig(root=args.target)
    try:
        report = check_data(cfg, seed)
    except DataError as e:
        print(f"kfine: {e}", file=sys.stderr)
        return 2
    print(format_check(report))
    if args.out:
        from kfine.rundir import write_json
        write_json(Path(args.out) / "data_check.json", report)
        names = report["class_names"]
        if args.class_name is not None and args.class_name not in names:
            print(f"kfine: --class {args.class_name!r} is not one of {names}", file=sys.stderr)
            return 2
        name = args.class_name or names[int(np.random.default_rng(seed).integers(len(names)))]
        if report["source"] != "tfds":
            root, layout = _folder_root(cfg)
            _, tree, _ = find_folder(root, layout)
            paths = [p for classes in tree.values() for p in classes.get(name, [])]
            out = plot_samples(paths, name, Path(args.out) / "plots" / f"samples_{name}.png", args.samples, seed)
            print(f"kfine: wrote {Path(args.out) / 'data_check.json'} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
