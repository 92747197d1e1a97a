#!/usr/bin/env python3
"""Benchmarks of kfine against plain references measured in the same process.

    python tools/bench.py [--data DIR] [--only pipeline,...] [--image-size 224] [--epochs 3] [--out bench.json]

Sections (``--only``; all by default; the training ones train ResNet50 with weights=None: the
same arithmetic as ImageNet weights, no download):
  pipeline   kfine's input pipeline (scan + decode once into the cache, then crop/flip/jitter
             from the cache every epoch) against a plain tf.data pipeline doing the same work from
             the files every epoch (read, decode, random-resized-crop from the full image and
             flip: torchvision's ImageNet recipe) and against keras.utils.image_dataset_from_directory
             with Keras' augmentation layers (flip, zoom). First epoch (setup and data check included) and
             later epochs, images/s and ratios.
  head       a 10-epoch head-only fine-tune with and without the frozen-feature cache, augmentation
             off and on (2 cached views), wall time of the training loop (first epoch included).
  search     a 6-trial head-only kfine.tune search with and without the cache.
  full       a full fine-tune: kfine's loop against a plain model.fit on the same tf.data pipeline
             (steady-state images/s), and kfine's per-epoch bookkeeping on the training thread.
  command    the whole ``python -m kfine.train`` command (a subprocess) of an 8-epoch head-only run,
             augmentation off, no export, with and without the feature cache: wall times, their ratio,
             each run's seconds per stage (run_info.json's timings), the cached run's fixed cost and
             its test evaluation's cost per image against the feature pass's.

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


# ----------------------------------------------------------------------------- training
def _config(root: Path, size: int, batch: int, runs: str, *extra):
    from kfine.config import load_config
    return load_config(None, [f"runs_dir={runs}", "name=bench", f"data.root={root}", "data.layout=inat",
                              f"data.image_size=[{size},{size}]", f"data.batch_size={batch}", "model.weights=null",
                              "train.verbose=0", "export.enabled=false", "train.checkpoint.every_epochs=0", *extra])


def _fit_seconds(cfg, datasets=None) -> tuple[float, list[dict]]:
    """Wall time of kfine's training loop (build, features where used, every epoch, bookkeeping)."""
    from kfine import data, train
    datasets = datasets or data.make_datasets(cfg.data, cfg.seed)
    t = time.perf_counter()
    train.setup_backend(cfg)
    model, optimizer, schedule = train.build_training(cfg, datasets)
    history = train.fit_phases(model, cfg, datasets, train.prepare_run_dir(cfg), optimizer=optimizer,
                               schedule=schedule)
    return time.perf_counter() - t, history


def bench_head(root: Path, size: int, batch: int, epochs: int, seed: int, head_epochs: int = 10) -> dict:
    """A head-only fine-tune (ResNet50, backbone frozen) of ``head_epochs`` epochs, with and
    without the frozen-feature cache, augmentation off and on (K=2 views)."""
    import tempfile
    from kfine import data, features
    head_only = "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]"
    out = {}
    with tempfile.TemporaryDirectory() as runs:
        for aug in ("off", "on"):
            extra = [head_only, f"train.epochs={head_epochs}", f"data.augment.enabled={aug == 'on'}",
                     "data.augment.crop_scale=[0.08,1.0]"]
            cfg = _config(root, size, batch, runs, *extra)
            datasets = data.make_datasets(cfg.data, cfg.seed)
            for cache in (False, "auto"):
                features._RECENT.clear()
                c = _config(root, size, batch, runs, *extra, f"train.feature_cache={str(cache).lower()}")
                seconds, _ = _fit_seconds(c, datasets)
                out[f"aug_{aug}_{'cached' if cache else 'uncached'}"] = seconds
                print(f"bench: head-only {head_epochs} epochs, augmentation {aug}, "
                      f"{'cached' if cache else 'uncached'}: {seconds:.1f} s", flush=True)
    out["ratios"] = {a: out[f"aug_{a}_uncached"] / out[f"aug_{a}_cached"] for a in ("off", "on")}
    return out


def print_head(r: dict) -> None:
    print(f"\nhead-only fine-tune: augmentation off {r['aug_off_uncached']:.0f} s -> {r['aug_off_cached']:.0f} s "
          f"(**{r['ratios']['off']:.1f}x**), on (K=2) {r['aug_on_uncached']:.0f} s -> {r['aug_on_cached']:.0f} s "
          f"(**{r['ratios']['on']:.1f}x**)")


def bench_search(root: Path, size: int, batch: int, epochs: int, seed: int, trials: int = 6) -> dict:
    """A head-only KerasTuner search of ``trials`` trials over the learning rate and head,
    with and without the feature cache (trials share the features: computed once)."""
    import tempfile
    from kfine import features
    from kfine.tune import search
    out = {}
    with tempfile.TemporaryDirectory() as runs:
        for cache in (False, "auto"):
            features._RECENT.clear()
            cfg = _config(root, size, batch, runs, "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]",
                          f"train.epochs={epochs}", "data.augment.enabled=false", f"train.feature_cache={str(cache).lower()}",
                          f"name=search{'c' if cache else 'u'}", f"search.max_trials={trials}",
                          "search.space={train.schedule.learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, "
                          "sampling: log}, model.head.dropout: {type: choice, values: [0.0, 0.2, 0.5]}}")
            before = features.COMPUTED["features"]
            t = time.perf_counter()
            search(cfg)
            out["cached" if cache else "uncached"] = time.perf_counter() - t
            out[f"feature_sets_{'cached' if cache else 'uncached'}"] = features.COMPUTED["features"] - before
            print(f"bench: {trials}-trial search, {'cached' if cache else 'uncached'}: "
                  f"{out['cached' if cache else 'uncached']:.1f} s", flush=True)
    out["ratio"] = out["uncached"] / out["cached"]
    return out


def print_search(r: dict) -> None:
    print(f"\nhead-only search: {r['uncached']:.0f} s -> {r['cached']:.0f} s (**{r['ratio']:.1f}x**; feature sets "
          f"computed: {r['feature_sets_cached']})")


def bench_full(root: Path, size: int, batch: int, epochs: int, seed: int, steps: int = 8) -> dict:
    """A full fine-tune (every layer trains): kfine's loop against a plain model.fit of the same
    model on the same tf.data pipeline; steady-state images/s (the fastest later epoch) and the
    training thread's per-epoch bookkeeping (kfine.checkpoint's commit)."""
    import tempfile
    import keras
    from kfine import checkpoint, data, train
    from kfine.model import build_model
    timings = []
    commit = checkpoint.CheckpointSaver.commit_epoch

    def timed_commit(self, *a, **k):
        t = time.perf_counter()
        commit(self, *a, **k)
        timings.append(time.perf_counter() - t)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t)

    out = {}
    with tempfile.TemporaryDirectory() as runs:
        cfg = _config(root, size, batch, runs, "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]",
                      f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", "train.checkpoint.every_epochs=1")
        datasets = data.make_datasets(cfg.data, cfg.seed)
        for name in ("plain", "kfine", "plain", "kfine"):
            timer = EpochTimer()
            if name == "plain":
                keras.utils.set_random_seed(seed)
                model = build_model(cfg.model, len(datasets.class_names), (size, size))
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                              metrics=["accuracy"])
                model.fit(datasets.train.repeat(), validation_data=datasets.val, epochs=epochs,
                          steps_per_epoch=steps, verbose=0, callbacks=[timer])
            else:
                checkpoint.CheckpointSaver.commit_epoch = timed_commit
                try:
                    train.setup_backend(cfg)
                    model, optimizer, schedule = train.build_training(cfg, datasets)
                    train.fit_phases(model, cfg, datasets, train.prepare_run_dir(cfg), optimizer=optimizer,
                                     schedule=schedule, callbacks=[timer])
                finally:
                    checkpoint.CheckpointSaver.commit_epoch = commit
            out.setdefault(name, []).append(timer.times)
            print(f"bench: full fine-tune {name}: " + ", ".join(f"{t:.1f} s" for t in timer.times), flush=True)
    steady = {k: min(min(ts[1:]) for ts in v) for k, v in out.items()}
    images = steps * batch
    out["images_per_s"] = {k: images / v for k, v in steady.items()}
    out["ratio"] = steady["plain"] / steady["kfine"]
    out["bookkeeping_s"] = sum(timings) / max(len(timings), 1)
    return out


def print_full(r: dict) -> None:
    print(f"\nfull fine-tune, steady state: plain model.fit {r['images_per_s']['plain']:.1f} images/s, "
          f"kfine {r['images_per_s']['kfine']:.1f} images/s (**{r['ratio']:.2f}x**); kfine's bookkeeping on the "
          f"training thread {r['bookkeeping_s'] * 1000:.0f} ms per epoch")


# ----------------------------------------------------------------------------- command
def _train_command(root: Path, size: int, batch: int, runs: str, name: str, cache: str, epochs: int) -> dict:
    """``python -m kfine.train`` as a user runs it (a subprocess): wall time, run_info.json's timings."""
    from kfine.config import save_config
    head_only = "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]"
    cfg = _config(root, size, batch, runs, head_only, f"train.epochs={epochs}", "data.augment.enabled=false",
                  f"train.feature_cache={cache}", f"name={name}")
    path = Path(runs) / f"{name}.yaml"
    save_config(cfg, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kfine.train", "--config", str(path)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    run_dir = Path(runs) / name
    counts = json.loads((run_dir / "data_check.json").read_text())["counts"]
    n = {s: sum(c.values()) for s, c in counts.items() if isinstance(c, dict)}
    return {"wall_s": wall, "timings": json.loads((run_dir / "run_info.json").read_text())["timings"], "images": n}


def bench_command(root: Path, size: int, batch: int, epochs: int, seed: int, head_epochs: int = 8) -> dict:
    """The whole command of a short head-only run (``head_epochs`` epochs, augmentation off, no
    export), with and without the frozen-feature cache: wall time and where it went (per stage);
    the cached run's fixed cost (all but features and epochs) and its test evaluation's cost per
    image against the feature pass's."""
    import tempfile
    out = {}
    with tempfile.TemporaryDirectory() as runs:
        for cache in ("false", "auto"):
            key = "cached" if cache == "auto" else "uncached"
            out[key] = _train_command(root, size, batch, runs, f"command_{key}", cache, head_epochs)
            print(f"bench: command, feature cache {cache}: {out[key]['wall_s']:.1f} s", flush=True)
    c = out["cached"]
    t, n = c["timings"], c["images"]
    out["ratio"] = out["uncached"]["wall_s"] / c["wall_s"]
    out["fixed_s"] = t["total"] - t["features"] - t["training"]
    feature_images = n.get("train", 0) + n.get("val", 0)
    out["feature_ms_per_image"] = 1000 * t["features"] / max(1, feature_images)
    out["evaluation_ms_per_image"] = 1000 * t["evaluation"] / max(1, n.get("test") or n.get("val") or 1)
    out["evaluation_vs_features"] = out["evaluation_ms_per_image"] / max(1e-9, out["feature_ms_per_image"])
    return out


def print_command(r: dict) -> None:
    from kfine.log import stage_split
    print(f"\nwhole command, head-only: no cache {r['uncached']['wall_s']:.1f} s -> cache {r['cached']['wall_s']:.1f} s "
          f"(**{r['ratio']:.1f}x**); cached run's fixed cost (all but features and epochs) {r['fixed_s']:.1f} s; "
          f"test evaluation {r['evaluation_ms_per_image']:.0f} ms/image = {r['evaluation_vs_features']:.2f}x the "
          f"feature pass's {r['feature_ms_per_image']:.0f} ms/image")
    for key in ("uncached", "cached"):
        print(f"  {key}: {stage_split(r[key]['timings'])} (seconds; total {r[key]['timings']['total']:.1f})")


SECTIONS = {"pipeline": (bench_pipeline, print_pipeline), "head": (bench_head, print_head),
            "search": (bench_search, print_search), "full": (bench_full, print_full),
            "command": (bench_command, print_command)}


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
