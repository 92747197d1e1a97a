#!/usr/bin/env python3
"""Benchmarks of kfine against plain references measured in the same process.

    python tools/bench.py [--data DIR] [--only pipeline,...] [--image-size 224] [--epochs 3] [--out bench.json]

Sections (``--only``; all by default):
  pipeline   kfine's input pipeline (scan + decode once into the cache, then crop/flip/jitter
             from the cache every epoch) against a plain tf.data pipeline doing the same work from
             the files every epoch (read, decode, random-resized-crop from the full image and
             flip: torchvision's ImageNet recipe) and against keras.utils.image_dataset_from_directory
             with Keras' augmentation layers (flip, zoom). First epoch (setup and data check included) and
             later epochs, images/s and ratios.

Without --data it writes (once) an iNaturalist-12K-shaped set of ~800x600 JPEG photos with
../shared/tools/make_photo_dataset.py (needs scikit-image) into ~/.cache/kfine/bench_photos_*.
Ratios are reference time / kfine time: above 1, kfine is faster. The machine is whatever runs
this: report the CPU count with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
MAKER = REPO.parent / "shared" / "tools" / "make_photo_dataset.py"


def photo_dataset(per_class: int, classes: int) -> Path:
    root = Path(os.environ.get("KFINE_CACHE", Path.home() / ".cache" / "kfine")) / f"bench_photos_{classes}x{per_class}"
    if not (root / "train").is_dir():
        if not MAKER.is_file():
            sys.exit(f"bench: no --data given and {MAKER} is missing; pass --data DIR (layout ROOT/train/<class>/)")
        subprocess.run([sys.executable, str(MAKER), str(root), "--per-class", str(per_class),
                        "--classes", str(classes), "--layout", "inat"], check=True)
    return root


def timed_passes(make, epochs: int) -> list[float]:
    """Seconds of the first pass (``make()`` included: setup) and of each later pass."""
    t = time.perf_counter()
    ds = make()
    out = []
    for _ in range(epochs):
        for _ in ds:
            pass
        out.append(time.perf_counter() - t)
        t = time.perf_counter()
    return out


# ----------------------------------------------------------------------------- pipeline
def bench_pipeline(root: Path, size: int, batch: int, epochs: int, seed: int) -> dict:
    import keras
    import tensorflow as tf
    from kfine import data, pipeline, sources
    from kfine.config import AugmentConfig, DataConfig

    # torchvision's ImageNet training recipe: RandomResizedCrop(0.08..1) + horizontal flip
    aug = AugmentConfig(crop_scale=(0.08, 1.0), flip=True)
    cfg = DataConfig(root=str(root), layout="inat", image_size=(size, size), batch_size=batch,
                     val_fraction=0.0, augment=aug)
    files = [p for p in sources.list_images(root / "train")]
    n = len(files)

    def kfine():
        pipeline._RECENT.clear()
        sources._SCANNED.clear()
        return data.make_datasets(cfg, seed).train

    def plain():   # the same work from the files every epoch: torchvision's recipe on the original
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(n, seed=seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda p, s: pipeline.train_view(pipeline.decode(tf.io.read_file(p)), s, aug, (size, size), "squash"),
            num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch).prefetch(tf.data.AUTOTUNE)

    def keras_way():   # the hand-written Keras tutorial: decode + resize every epoch, augmentation layers
        ds = keras.utils.image_dataset_from_directory(root / "train", image_size=(size, size), batch_size=batch,
                                                      seed=seed, verbose=False)
        layers = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomZoom((-0.5, 0.0))])
        return ds.map(lambda x, y: layers(x, training=True), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
            tf.data.AUTOTUNE)

    out = {"images": n}
    for name, make in (("plain", plain), ("keras", keras_way), ("kfine", kfine)):
        out[name] = timed_passes(make, epochs)
        print(f"bench: pipeline {name}: " + ", ".join(f"{t:.1f} s" for t in out[name]), flush=True)
    later = {k: min(out[k][1:]) for k in ("plain", "keras", "kfine")}
    out["ratios"] = {"later_vs_plain": later["plain"] / later["kfine"],
                     "later_vs_keras": later["keras"] / later["kfine"],
                     "first_vs_plain": out["plain"][0] / out["kfine"][0],
                     "first_vs_keras": out["keras"][0] / out["kfine"][0]}
    out["images_per_s"] = {k: n / v for k, v in later.items()}
    return out


def print_pipeline(r: dict) -> None:
    n = r["images"]
    print(f"\n{'input pipeline':34}{'plain':>10}{'keras':>10}{'kfine':>10}")
    print(f"{'first epoch incl. setup+check (s)':34}" + "".join(f"{r[k][0]:10.1f}" for k in ("plain", "keras", "kfine")))
    print(f"{'later epoch (s)':34}" + "".join(f"{min(r[k][1:]):10.2f}" for k in ("plain", "keras", "kfine")))
    print(f"{'later epoch (images/s)':34}" + "".join(f"{n / min(r[k][1:]):10.0f}" for k in ("plain", "keras", "kfine")))
    q = r["ratios"]
    print(f"kfine vs plain: later epochs {q['later_vs_plain']:.2f}x, first epoch {q['first_vs_plain']:.2f}x; "
          f"vs keras: later {q['later_vs_keras']:.2f}x, first {q['first_vs_keras']:.2f}x (above 1: kfine faster)")


SECTIONS = {"pipeline": (bench_pipeline, print_pipeline)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="inat-layout folder (ROOT/train/<class>/); default: generated photos")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args(argv)
    root = Path(args.data) if args.data else photo_dataset(args.per_class, args.classes)
    import keras
    results = {"data": str(root), "image_size": args.image_size, "batch_size": args.batch_size,
               "backend": keras.backend.backend(), "cpus": os.cpu_count()}
    for name in args.only.split(","):
        run, show = SECTIONS[name]
        results[name] = run(root, args.image_size, args.batch_size, args.epochs, args.seed)
        show(results[name])
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
