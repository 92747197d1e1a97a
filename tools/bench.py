#!/usr/bin/env python3
"""Benchmark: kfine's input pipeline and training loop against the hand-written Keras way.

The reference is what a fine-tuning notebook does in Keras: ``keras.utils.image_dataset_from_directory``
(decode + resize every file every epoch), augmentation layers mapped over the batches, prefetch,
``model.fit``. kfine is ``kfine.data.make_datasets`` (every file decoded once up front by the data
check, resized images cached as uint8, stateless augmentation, prefetch) and ``kfine.train``'s own
loop (``build_training`` + ``fit_phases``: history, per-epoch resume backups, checkpoints); the
data audit that ``train.run`` does first is not timed.
Both train the same model (ResNet50 + linear head, backbone frozen: the head-only phase that every
fine-tune starts with, and the one a feature cache would speed up further) on the same files, in
the same process, one after the other; the figures are ratios against that reference.

    python tools/bench.py [--data DIR] [--image-size 128] [--epochs 3] [--repeat 2] [--out bench.json]

Without --data it writes (once) an iNaturalist-12K-shaped set of ~800x600 JPEG photos with
../shared/tools/make_photo_dataset.py (needs scikit-image) into ~/.cache/kfine/bench_photos.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

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


class EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch (validation included)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def pass_times(ds, epochs: int) -> list[float]:
    """Seconds per full pass over ``ds`` without a model: the input pipeline alone."""
    out = []
    for _ in range(epochs):
        t = time.perf_counter()
        for _ in ds:
            pass
        out.append(time.perf_counter() - t)
    return out


def reference(train_dir: Path, size, batch_size: int, seed: int):
    import tensorflow as tf
    train, val = keras.utils.image_dataset_from_directory(
        train_dir, validation_split=0.2, subset="both", seed=seed, image_size=size,
        batch_size=batch_size, label_mode="int")
    num_classes = len(train.class_names)
    aug = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(10 / 360)])
    train = train.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE), num_classes


def kfine_config(root: Path, size, batch_size: int, epochs: int, seed: int, runs_dir: str):
    from kfine.config import Config, replace
    return replace(Config(), [
        f"runs_dir={runs_dir}", "name=bench", f"seed={seed}", f"data.root={root}", "data.layout=inat",
        f"data.image_size=[{size[0]},{size[1]}]", f"data.batch_size={batch_size}",
        "data.augment.random_resized_crop=false", "data.augment.flip=true", "data.augment.rotation=10",
        "model.weights=null", f"train.epochs={epochs}", "train.verbose=0", "train.optimizer.name=adam",
        "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="inat-layout folder (ROOT/train/<class>/); default: generated photos")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="training runs of each (alternating)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args(argv)
    root = Path(args.data) if args.data else photo_dataset(args.per_class, args.classes)
    size = (args.image_size, args.image_size)

    from kfine import train as ktrain
    from kfine.data import make_datasets
    from kfine.model import build_model
    from kfine.freeze import apply_freeze
    from kfine.config import FreezeConfig

    results = {"data": str(root), "image_size": args.image_size, "batch_size": args.batch_size,
               "epochs": args.epochs, "backend": keras.backend.backend(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as runs:
        cfg = kfine_config(root, size, args.batch_size, args.epochs, args.seed, runs)

        # --- input pipeline alone
        t = time.perf_counter()
        ref_train, ref_val, num_classes = reference(root / "train", size, args.batch_size, args.seed)
        ref_setup = time.perf_counter() - t
        t = time.perf_counter()
        ds = make_datasets(cfg.data, cfg.seed)
        kf_setup = time.perf_counter() - t
        n_train = sum(ds.counts["train"].values())
        results["pipeline"] = {"train_images": n_train,
                               "reference": {"setup_s": ref_setup, "pass_s": pass_times(ref_train, args.epochs)},
                               "kfine": {"setup_s": kf_setup, "pass_s": pass_times(ds.train, args.epochs)}}

        # --- head-only training, same model, validation every epoch. Runs alternate
        # reference, kfine, kfine, reference, ... so neither always goes first; the figures are
        # each one's best run (the least disturbed by the machine).
        def train_reference():
            keras.utils.set_random_seed(args.seed)
            model = build_model(cfg.model, num_classes, size)
            apply_freeze(model, "resnet50", FreezeConfig(strategy="backbone"))
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            timer = EpochTimer()
            t = time.perf_counter()
            train_ds, val_ds, _ = reference(root / "train", size, args.batch_size, args.seed)
            setup = time.perf_counter() - t
            model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=0, callbacks=[timer])
            return {"setup_s": setup, "epoch_s": timer.times}

        def train_kfine():   # kfine.train's own loop; the timer runs after its checkpoint/backup writes
            t = time.perf_counter()
            ds = make_datasets(cfg.data, cfg.seed)
            setup = time.perf_counter() - t
            model, optimizer, schedule = ktrain.build_training(cfg, ds)
            timer = EpochTimer()
            ktrain.fit_phases(model, cfg, ds, ktrain.prepare_run_dir(cfg), optimizer=optimizer,
                              schedule=schedule, callbacks=[timer])
            return {"setup_s": setup, "epoch_s": timer.times}

        runs_of = {"reference": [], "kfine": []}
        for i in range(args.repeat):
            for name in (("reference", "kfine") if i % 2 == 0 else ("kfine", "reference")):
                runs_of[name].append(train_reference() if name == "reference" else train_kfine())
        total = lambda r: r["setup_s"] + sum(r["epoch_s"])   # noqa: E731
        results["train_head_only"] = {name: {**min(rs, key=total), "runs": rs} for name, rs in runs_of.items()}
        for name, rs in runs_of.items():   # the fastest later epoch of all runs
            results["train_head_only"][name]["steady_epoch_s"] = min(min(r["epoch_s"][1:] or r["epoch_s"]) for r in rs)

    p, tr = results["pipeline"], results["train_head_only"]
    # Steady state: the fastest epoch after the first (the least disturbed by other work on the
    # machine; the first pays for tracing, and kfine's for filling its cache).
    steady = lambda xs: min(xs[1:]) if len(xs) > 1 else xs[0]   # noqa: E731
    results["ratios"] = {
        "pipeline_steady_speedup": steady(p["reference"]["pass_s"]) / steady(p["kfine"]["pass_s"]),
        "pipeline_total_speedup": (p["reference"]["setup_s"] + sum(p["reference"]["pass_s"]))
        / (p["kfine"]["setup_s"] + sum(p["kfine"]["pass_s"])),
        "train_steady_epoch_speedup": tr["reference"]["steady_epoch_s"] / tr["kfine"]["steady_epoch_s"],
        "train_total_speedup": total(tr["reference"]) / total(tr["kfine"]),
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nbench: {n_train} train images ({root}), {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, {results['backend']} backend, {results['cpus']} CPUs")
    print(f"{'':34}{'reference':>12}{'kfine':>12}{'speed-up':>10}")
    rows = [("input pass, first incl. setup (s)", p["reference"]["setup_s"] + p["reference"]["pass_s"][0],
             p["kfine"]["setup_s"] + p["kfine"]["pass_s"][0], None),
            ("input pass, later epochs (s)", steady(p["reference"]["pass_s"]), steady(p["kfine"]["pass_s"]),
             results["ratios"]["pipeline_steady_speedup"]),
            ("train epoch, first incl. setup (s)", tr["reference"]["setup_s"] + tr["reference"]["epoch_s"][0],
             tr["kfine"]["setup_s"] + tr["kfine"]["epoch_s"][0], None),
            ("train epoch, later (s)", tr["reference"]["steady_epoch_s"], tr["kfine"]["steady_epoch_s"],
             results["ratios"]["train_steady_epoch_speedup"]),
            ("train, all epochs incl. setup (s)", total(tr["reference"]), total(tr["kfine"]),
             results["ratios"]["train_total_speedup"]),
            ("input, later epochs (images/s)", n_train / steady(p["reference"]["pass_s"]),
             n_train / steady(p["kfine"]["pass_s"]), None),
            ("train, later epochs (images/s)", n_train / tr["reference"]["steady_epoch_s"],
             n_train / tr["kfine"]["steady_epoch_s"], None)]
    for name, a, b, r in rows:
        print(f"{name:34}{a:12.2f}{b:12.2f}{(f'{r:9.2f}x' if r else ''):>10}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
