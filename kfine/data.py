"""Data: a config's data section -> train/val/test tf.data pipelines, and the data audit CLI.

    source (kfine.sources: folder layouts, tensorflow-datasets, digits)
      -> file index (path, label, split, bytes, hash, header size; saved as run_dir/splits.csv)
      -> decode each image ONCE, resized to the cache size, into the image cache (kfine.pipeline)
      -> per epoch: permutation of the whole training index -> crop/flip/jitter -> batch -> prefetch
      -> val/test: the eval transform (the one the exported model uses) -> batch -> prefetch

The decode pass is also the data check's: a corrupt image is reported by path before training
and never raises inside a tf.data worker, and a run decodes each file once in total (a second run
with ``data.cache: disk`` decodes nothing). Images leave the pipeline as float32 in 0..255: the
model does its own preprocessing.

    python -m kfine.data check ROOT_OR_CONFIG [--out DIR] [--samples N] [--class NAME]
    python -m kfine.data clean-cache [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kfine import audit, sources
from kfine.schema import DataConfig
from kfine.sources import SPLITS, DataError, FileIndex


@dataclass
class Datasets:
    """The pipelines of one data section, and what they were built from. ``train`` is built on
    first use: a run whose head trains on cached features (kfine.features) never needs it."""
    val: object | None
    test: object | None
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    index: FileIndex | None = None
    cache: object = None          # kfine.pipeline.ImageCache
    config: DataConfig | None = None
    seed: int = 0
    mixing: object = None         # tf.Variable: MixUp/CutMix on (False in the last mix_off_epochs)
    shard: object = None          # kfine.distribute.Shard that ``train`` and ``val`` were built with
    _train: object = field(default=None, repr=False)

    @property
    def train(self):
        """The training pipeline (one pass per iteration, this process's shard), built once."""
        if self._train is None:
            self._train = self.dataset("train", shard=self.shard)
        return self._train

    @train.setter
    def train(self, value) -> None:
        self._train = value

    def dataset(self, split: str, train: bool | None = None, batch: bool = True, shuffle: bool | None = None,
                seed: int | None = None, drop_remainder: bool = False, shard=None, epoch: int | None = None,
                steps: int | None = None, mix_until: int | None = None):
        """A fresh pipeline over ``split``: augmented training views (``train``, default for the
        train split) or eval views; unbatched with ``batch=False``; in file order with
        ``shuffle=False``; ``seed`` other than the run's draws other augmentations; only this
        process's part with ``shard`` (kfine.distribute); with ``epoch``, training's endless
        stream of epochs from that one on, ``steps`` batches each, MixUp/CutMix in epochs below
        ``mix_until`` (kfine.pipeline.make_dataset)."""
        from kfine.pipeline import make_dataset
        train = split == "train" if train is None else train
        return make_dataset(self.cache, self.files[split], self.config, self.seed if seed is None else seed,
                            train, batch, shuffle, drop_remainder, len(self.class_names), self.mixing, shard,
                            epoch, steps, mix_until)


def make_datasets(cfg: DataConfig, seed: int = 0, splits=None, verbose: bool = False, shard=None) -> Datasets:
    """Train/val/test pipelines for ``cfg`` (see the module docstring). ``splits``: a splits.csv
    whose split is used instead of drawing one (``cfg.splits`` does the same from the config).
    ``shard`` (kfine.distribute.Shard): train and val are this process's part of each epoch."""
    splits = splits or cfg.splits
    if cfg.source == "tfds":
        index, cache = _index_tfds(cfg, seed, verbose)
    else:
        holder = {}
        index = sources.index_folder(cfg, seed, strict=True, saved=splits,
                                     decode=lambda paths, info: _fill(holder, paths, info, cfg, verbose))
        cache = holder["cache"]
    for note in index.notes:
        print(f"kfine: {note}", flush=True)
    skipped = sorted(index.bad.items())
    if skipped and cfg.on_bad_image == "stop":
        listing = "\n".join(f"  {p}: {r}" for p, r in skipped)
        raise DataError(f"{len(skipped)} unreadable image(s) (data.on_bad_image: stop); fix or remove them, "
                        f"or set data.on_bad_image=skip:\n{listing}")
    if not index.files.get("train"):
        raise DataError("the data has no training images (no train split); check data.root / data.train_split")
    import tensorflow as tf
    ds = Datasets(None, None, index.class_names, files={s: index.files[s] for s in SPLITS if index.files.get(s)},
                  counts=index.counts(), skipped=skipped, index=index, cache=cache, config=cfg, seed=seed,
                  mixing=tf.Variable(True, trainable=False, name="mixing"), shard=shard)
    ds.val, ds.test = (ds.dataset(s, shard=shard if s != "test" else None) if s in ds.files else None
                       for s in ("val", "test"))
    return ds


def _fill(holder: dict, paths, info, cfg: DataConfig, verbose: bool) -> dict[str, str]:
    """The decode pass: build the image cache over ``paths``; {path: reason} for bad ones."""
    from kfine.pipeline import build_cache
    t = time.perf_counter()
    holder["cache"], bad = build_cache(paths, cfg, info, progress=_Progress(len(paths)) if verbose else None)
    if verbose:
        print(f"kfine: {_cache_summary(holder['cache'], time.perf_counter() - t)}", flush=True)
    return bad


def _cache_summary(cache, seconds: float) -> str:
    where = f"on disk at {cache.path}" if cache.path else ("in memory" if cache.pixels is not None else "not kept")
    return (f"{len(cache)} images {cache.source} in {seconds:.1f} s (the data check's decode pass); "
            f"cache {cache.nbytes / 1e6:.0f} MB {where}")


class _Progress:
    """Counts decoded images and prints a line at every 10% (one line each: fine in a log file),
    from 2,000 images on (a smaller set decodes in seconds)."""

    def __init__(self, total: int):
        self.total, self.done, self.next, self.t = total, 0, 0.1, time.perf_counter()
        if total >= 2000:
            print(f"kfine: decoding {total} images into the cache ...", flush=True)

    def __call__(self, n: int = 1):
        self.done += n
        if self.total >= 2000 and self.done >= self.next * self.total:
            rate = self.done / max(time.perf_counter() - self.t, 1e-9)
            print(f"kfine:   {self.done}/{self.total} images ({rate:.0f}/s)", flush=True)
            self.next += 0.1


# ----------------------------------------------------------------------------- tensorflow-datasets
def _tfds_load(cfg: DataConfig, split: str, labels_only: bool = False):
    import tensorflow_datasets as tfds
    decoders = {cfg.image_key: tfds.decode.SkipDecoding()} if labels_only else None
    try:
        return tfds.load(cfg.name, split=split, data_dir=cfg.data_dir, download=cfg.download,
                         shuffle_files=False, with_info=True, decoders=decoders)
    except Exception as e:   # noqa: BLE001 - tfds raises many types; all mean "not available"
        where = cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise DataError(f"tfds dataset {cfg.name!r} (split {split!r}) could not be loaded: "
                        f"{str(e).splitlines()[0][:300]}. Put the prepared dataset under data.data_dir "
                        f"({where}) or set data.download: true") from None


def _index_tfds(cfg: DataConfig, seed: int, verbose: bool):
    """A tfds source as a file index (keys ``tfds:<name>/<version>/<split>[<i>]``: the disk and
    feature caches are keyed by them, so two data sets with equal splits never share one) and
    its image cache, each split read once. Images tfds stores as JPEG/PNG bytes are decoded by
    kfine, as files are (``_tfds_encoded``). A validation share of train is drawn stratified, as
    for folders."""
    import tensorflow as tf
    from kfine.pipeline import build_cache
    if not cfg.name:
        raise DataError("data.source is tfds but data.name is not set; set data.name (e.g. tf_flowers)")
    if cfg.cache == "none":
        raise DataError("data.cache: none is not possible with a tfds source (its examples are not files); "
                        "use memory or disk")
    _, info = _tfds_load(cfg, cfg.train_split, labels_only=True)
    if cfg.label_key not in info.features or cfg.image_key not in info.features:
        raise DataError(f"tfds {cfg.name!r} has features {sorted(info.features)}; "
                        "set data.image_key / data.label_key to the right ones")
    class_names = list(info.features[cfg.label_key].names)
    channels = info.features[cfg.image_key].shape[-1] or 3
    encoded = _tfds_encoded(info.features[cfg.image_key])
    if not encoded:
        print(f"kfine: tfds {cfg.name!r} stores {cfg.image_key!r} as arrays, not JPEG/PNG bytes: evaluation resizes "
              f"those arrays; the exported model sees the same pixels only from a PNG of them (a JPEG is lossy)",
              flush=True)
    wanted = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    files: dict[str, list[tuple[str, int]]] = {}
    keys, images = [], None
    for split, name in wanted.items():
        if not name:
            continue
        raw, _ = _tfds_load(cfg, name, labels_only=True)
        labels = np.fromiter(raw.map(lambda ex: ex[cfg.label_key]).as_numpy_iterator(), np.int64)
        files[split] = [(f"tfds:{info.full_name}/{name}[{i}]", int(y)) for i, y in enumerate(labels)]
        keys += [k for k, _ in files[split]]
        if encoded:   # the stored JPEG/PNG bytes, decoded as a file's (and as the exported model's input)
            part = raw.map(lambda ex: ex[cfg.image_key])
            images = part if images is None else images.concatenate(part)
            continue
        full, _ = _tfds_load(cfg, name)

        def rgb(ex):
            img = ex[cfg.image_key]
            img = tf.image.grayscale_to_rgb(img) if channels == 1 else img[..., :3]
            img.set_shape([None, None, 3])
            return tf.cast(img, tf.uint8)
        part = full.map(rgb, num_parallel_calls=tf.data.AUTOTUNE)
        images = part if images is None else images.concatenate(part)
    if cfg.val_split is None and cfg.val_fraction > 0:
        rng = np.random.default_rng(seed)
        train = files["train"]
        labels = np.array([y for _, y in train])
        is_val = np.zeros(len(train), bool)
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) < 2:
                raise DataError(f"class {class_names[c]!r} has {len(idx)} image(s) in {cfg.train_split!r}, "
                                "too few for a stratified validation split; set data.val_split or val_fraction 0")
            is_val[rng.permutation(idx)[:max(1, round(len(idx) * cfg.val_fraction))]] = True
        files["val"] = [f for f, v in zip(train, is_val) if v]
        files["train"] = [f for f, v in zip(train, is_val) if not v]
    t = time.perf_counter()
    cache, bad = build_cache(keys, cfg, images=images, progress=_Progress(len(keys)) if verbose else None)
    if verbose:
        print(f"kfine: {_cache_summary(cache, time.perf_counter() - t)}", flush=True)
    files = {s: [(k, y) for k, y in fl if k not in bad] for s, fl in files.items()}
    return FileIndex(class_names, files, None, None, bad=bad), cache


def _tfds_encoded(feature) -> bool:
    """Whether tfds stores this image feature as JPEG/PNG bytes (``tfds.features.Image`` of uint8
    or uint16; float images are bitcast into PNGs): kfine then decodes them itself, as it decodes
    files (a JPEG at its DCT scale, a 16-bit PNG scaled to 8 bits), so that evaluation sees what
    the exported model computes from the same bytes."""
    import tensorflow_datasets as tfds
    return isinstance(feature, tfds.features.Image) and np.dtype(feature.np_dtype) in (np.uint8, np.uint16)


# ----------------------------------------------------------------------------- audit
def check_data(cfg: DataConfig, seed: int = 0, image_size=None, datasets: Datasets | None = None) -> dict:
    """Audit a data source (kfine.audit). With ``datasets`` (what a run built) nothing is read
    again; otherwise the files are listed, scanned and decoded once (nothing is kept)."""
    image_size = tuple(image_size or cfg.image_size)
    source = "tfds" if cfg.source == "tfds" else cfg.source
    if datasets is None:
        if cfg.source == "tfds":
            datasets = make_datasets(cfg, seed)
        else:
            from kfine.pipeline import build_cache
            probe = replace(cfg, cache="none")
            index = sources.index_folder(probe, seed, strict=False,
                                         decode=lambda paths, info: build_cache(paths, probe, info)[1])
            return audit.audit(index, image_size, source)
    return audit.audit(datasets.index, image_size, source)


def main(argv: list[str] | None = None) -> int:
    from kfine import cli
    ap = argparse.ArgumentParser(prog="python -m kfine.data", description="Audit an image dataset.")
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="counts, unreadable files, duplicates, leakage, small images")
    chk.add_argument("target", metavar="ROOT_OR_CONFIG",
                     help="a dataset folder (layout auto), a YAML config, or a reference config's name")
    chk.add_argument("--out", help="write DIR/data_check.json and DIR/plots/samples_<class>.png")
    chk.add_argument("--samples", type=int, default=10, help="images in the sample grid")
    chk.add_argument("--class", dest="class_name", help="class for the sample grid (default: random)")
    cln = sub.add_parser("clean-cache", help="remove what killed cache builds left behind; list the image caches")
    cln.add_argument("--cache-dir", help="the image cache root (default: data.cache_dir's default, "
                                         "$KFINE_CACHE/images or ~/.cache/kfine/images)")
    args = ap.parse_args(argv)
    if args.command == "clean-cache":
        return cli.run_command(lambda: _clean_command(args))
    return cli.run_command(lambda: _check_command(args))


def _clean_command(args) -> int:
    """``clean-cache``: the temporary folders of builds whose process is gone are removed; each
    published cache is listed with its size (delete a folder to clear that cache)."""
    from kfine.pipeline import cache_root, clean_stale, disk_size
    root = cache_root(DataConfig(cache_dir=args.cache_dir))
    removed = clean_stale(root)
    mb = lambda n: f"{n / 1e6:,.0f} MB"   # noqa: E731
    print(f"kfine: removed {len(removed)} temporary folder(s) left by stopped cache builds "
          f"({mb(sum(n for _, n in removed))})")
    for folder, n in removed:
        print(f"  {folder.name}  {mb(n)}")
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    caches = [(p, disk_size(p)) for p in folders if not p.name.startswith(".")]
    building = [p for p in folders if p.name.startswith(".")]
    print(f"kfine: {len(caches)} image cache(s) in {root}: {mb(sum(n for _, n in caches))}"
          + (" (delete a folder to clear that cache)" if caches else ""))
    for folder, n in caches:
        print(f"  {folder.name}  {mb(n)}")
    if building:
        print(f"kfine: {len(building)} folder(s) still being built by a live process, kept: "
              + ", ".join(p.name for p in building))
    return 0


def _check_command(args) -> int:
    from kfine.checks import check_config
    from kfine.config import load_config
    seed = 0
    if Path(args.target).is_dir():
        cfg = DataConfig(root=args.target)
    else:   # a config file or a reference config's name: checked like any run's
        from kfine.cli import find_config
        full = check_config(load_config(find_config(args.target)))
        cfg, seed = full.data, full.seed
    report = check_data(cfg, seed)
    if not report["counts"].get("train"):
        raise DataError(f"{args.target}: no training images (no train split)")
    print(audit.format_check(report))
    if args.out:
        from kfine.plots import plot_samples
        from kfine.rundir import write_json
        write_json(Path(args.out) / "data_check.json", report)
        names = report["class_names"]
        if args.class_name is not None and args.class_name not in names:
            raise DataError(f"--class {args.class_name!r} is not one of {names}")
        name = args.class_name or names[int(np.random.default_rng(seed).integers(len(names)))]
        if report["source"] != "tfds":
            root, layout = sources.folder_root(cfg)
            _, tree, _, _ = sources.find_folder(root, layout)
            paths = [p for classes in tree.values() for p in classes.get(name, [])]
            out = plot_samples(paths, name, Path(args.out) / "plots" / f"samples_{name}.png", args.samples, seed)
            print(f"kfine: wrote {Path(args.out) / 'data_check.json'} and {out}")
    return 0


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
