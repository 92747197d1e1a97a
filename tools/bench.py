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
  distribute the same full fine-tune under the backend's own distribution strategy (JAX:
             data_parallel, TensorFlow: mirrored) against distribute.strategy none, on the devices
             there are (one GPU: the strategy's overhead), steady-state images/s.
  command    the whole ``python -m kfine.train`` command (a subprocess) of an 8-epoch head-only run,
             augmentation off, no export, with and without the feature cache: wall times, their ratio,
             each run's seconds per stage (run_info.json's timings), the cached run's fixed cost and
             its test evaluation's cost per image against the feature pass's (the two commands in
             turn --rounds times: each pair's ratio, and the median runs').
  serving    a call of the exported SavedModel (ResNet50 at --image-size, 4 JPEGs of 640x480):
             serving_default as kfine exports it against the same export with tf.data's default
             options (its decode pipeline autotuned and rewritten), and serving_tensor; median
             seconds per call. Needs no --data.

  feed       the training views' CPU cost for both view paths (data.view_path python | graph):
             per-image CPU time of each stage from a single-threaded tf.data run, the share spent
             holding the GIL (the Python callbacks), the images/s Amdahl predicts at 8, 16 and 64
             cores from them, and, measured on 1 and 2 cores (taskset subprocesses) over passes of
             2048 images, the images/s of a whole pass and the wait for a pass's first batch
             (the two paths in turn, --rounds times; the median).
             Needs no --data: a memory cache of random pixels at the cache size.

Every result records the backend and device it ran on and, per section, the accelerator's peak
memory so far in the process (JAX's peak_bytes_in_use; null on a CPU). ``--set key=value``
overrides every training section's config (``train.precision=mixed_bfloat16``,
``model.backbone=scratch_cnn``); ``--markdown`` prints a table of the results for the README;
``--tiny-data N`` writes N tiny random JPEGs per class instead of photos (smoke runs: tools/gpu_check.sh).

Without --data it writes (once) an iNaturalist-12K-shaped set of ~800x600 JPEG photos with
shared/tools/make_photo_dataset.py (needs scikit-image; looked for in the checkout and every
folder above it, e.g. ../shared beside it, or named by $KFINE_PHOTO_MAKER) into
~/.cache/kfine/bench_photos_*.
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
# Where the photo maker may be: $KFINE_PHOTO_MAKER, then shared/tools/make_photo_dataset.py in the
# checkout (what travels to a lent GPU machine) or in any folder above it (../shared beside the
# checkout, ../../shared beside a folder of worktrees).
MAKERS = [Path(p) for p in (os.environ.get("KFINE_PHOTO_MAKER"),) if p] + [
    d / "shared" / "tools" / "make_photo_dataset.py" for d in (REPO, *REPO.parents)]
OVERRIDES: list[str] = []   # --set key=value: every training section's config


def photo_dataset(per_class: int, classes: int) -> Path:
    root = Path(os.environ.get("KFINE_CACHE", Path.home() / ".cache" / "kfine")) / f"bench_photos_{classes}x{per_class}"
    if not (root / "train").is_dir():
        maker = next((m for m in MAKERS if m.is_file()), None)
        if maker is None:
            sys.exit(f"bench: no --data given and no make_photo_dataset.py found (KFINE_PHOTO_MAKER unset or "
                     f"missing; none in shared/tools/ of {REPO} or a folder above it); pass --data DIR "
                     f"(layout ROOT/train/<class>/) or set KFINE_PHOTO_MAKER=/path/to/make_photo_dataset.py")
        subprocess.run([sys.executable, str(maker), str(root), "--per-class", str(per_class),
                        "--classes", str(classes), "--layout", "inat"], check=True)
    return root


def tiny_dataset(per_class: int, classes: int) -> Path:
    """``classes`` x ``per_class`` small JPEGs of random colour blocks (inat layout, 80/20
    train/val): for smoke runs that must go through the same decode path, in seconds."""
    import numpy as np
    from PIL import Image
    root = Path(os.environ.get("KFINE_CACHE", Path.home() / ".cache" / "kfine")) / f"bench_tiny_{classes}x{per_class}"
    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for c in range(classes):
        for i in range(per_class):
            folder = tmp / ("val" if i >= per_class * 0.8 else "train") / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            blocks = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8) // (c + 1)
            image = Image.fromarray(blocks).resize((48 + 8 * (i % 3), 40), Image.NEAREST)
            image.save(folder / f"{i}.jpg", quality=90)
    os.replace(tmp, root)   # whole or not at all (a killed run leaves no half set behind)
    return root


def device_info() -> dict:
    """The backend and the device the model runs on."""
    import keras
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        d = jax.local_devices()[0]
        return {"backend": backend, "platform": d.platform, "device": d.device_kind, "devices": jax.local_device_count()}
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "cpu"
    return {"backend": backend, "platform": "gpu" if gpus else "cpu", "device": name, "devices": max(1, len(gpus))}


def peak_memory_bytes() -> int | None:
    """The accelerator's peak bytes in use so far in this process (JAX cannot reset it, so a
    section's value includes the sections before it); None on a CPU."""
    import keras
    if keras.backend.backend() == "jax":
        import jax
        d = jax.local_devices()[0]
        stats = d.memory_stats() if d.platform != "cpu" else None
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    import tensorflow as tf
    if not tf.config.list_physical_devices("GPU"):
        return None
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])


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
                              "train.verbose=0", "export.enabled=false", "train.checkpoint.every_epochs=0",
                              *OVERRIDES, *extra])


def _fit_seconds(cfg, datasets=None) -> tuple[float, list[dict]]:
    """Wall time of kfine's training loop (build, features where used, every epoch, bookkeeping)."""
    from kfine import checkpoint, data, fit, train
    datasets = datasets or data.make_datasets(cfg.data, cfg.seed)
    t = time.perf_counter()
    fit.setup_backend(cfg)
    model, optimizer, schedule = fit.build_training(cfg, datasets)
    history = train.fit_phases(model, cfg, datasets, checkpoint.prepare_run_dir(cfg), optimizer=optimizer,
                               schedule=schedule)
    return time.perf_counter() - t, history


def bench_head(root: Path, size: int, batch: int, epochs: int, seed: int, head_epochs: int = 10,
               augs: tuple = ("off", "on")) -> dict:
    """A head-only fine-tune (ResNet50, backbone frozen) of ``head_epochs`` epochs, with and
    without the frozen-feature cache, augmentation off and on (K=2 views)."""
    import tempfile
    from kfine import data, features
    head_only = "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]"
    out = {}
    with tempfile.TemporaryDirectory() as runs:
        for aug in augs:
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
    out["ratios"] = {a: out[f"aug_{a}_uncached"] / out[f"aug_{a}_cached"] for a in augs}
    out["epochs"] = head_epochs
    return out


def print_head(r: dict) -> None:
    print("\nhead-only fine-tune: " + ", ".join(
        f"augmentation {a}{' (K=2)' * (a == 'on')} {r[f'aug_{a}_uncached']:.0f} s -> {r[f'aug_{a}_cached']:.0f} s "
        f"(**{q:.1f}x**)" for a, q in r["ratios"].items()))


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


def epoch_timer():
    """A Keras callback that records each epoch's wall time in ``.times``."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t)

    return EpochTimer()


def bench_full(root: Path, size: int, batch: int, epochs: int, seed: int, steps: int = 8, rounds: int = 2) -> dict:
    """A full fine-tune (every layer trains): kfine's loop against a plain model.fit of the same
    model on the same tf.data pipeline; steady-state images/s (the fastest later epoch) and the
    training thread's per-epoch bookkeeping (kfine.checkpoint's commit)."""
    import tempfile
    import keras
    from kfine import checkpoint, data, fit, train
    from kfine.model import build_model
    timings = []
    commit = checkpoint.CheckpointSaver.commit_epoch

    def timed_commit(self, *a, **k):
        t = time.perf_counter()
        commit(self, *a, **k)
        timings.append(time.perf_counter() - t)

    out = {}
    with tempfile.TemporaryDirectory() as runs:
        cfg = _config(root, size, batch, runs, "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]",
                      f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", "train.checkpoint.every_epochs=1")
        datasets = data.make_datasets(cfg.data, cfg.seed)
        for name in ("plain", "kfine") * rounds:   # alternated: both see the machine's drift alike
            timer = epoch_timer()
            if name == "plain":
                fit.setup_backend(cfg)   # the seed and train.precision's dtype policy, as kfine's
                model = build_model(cfg.model, len(datasets.class_names), (size, size))
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                              metrics=["accuracy"])
                model.fit(datasets.train.repeat(), validation_data=datasets.val, epochs=epochs,
                          steps_per_epoch=steps, verbose=0, callbacks=[timer])
            else:
                checkpoint.CheckpointSaver.commit_epoch = timed_commit
                try:
                    fit.setup_backend(cfg)
                    model, optimizer, schedule = fit.build_training(cfg, datasets)
                    train.fit_phases(model, cfg, datasets, checkpoint.prepare_run_dir(cfg), optimizer=optimizer,
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


def bench_distribute(root: Path, size: int, batch: int, epochs: int, seed: int, steps: int = 8) -> dict:
    """The full fine-tune of ``full`` as kfine.train.run sets it up (the plan resolved, the data
    sharded, model, optimizer and fit in the plan's scope) under distribute.strategy none and
    under the backend's own strategy (data_parallel on JAX, mirrored on TensorFlow) over the
    devices there are; steady-state images/s (the fastest later epoch)."""
    import tempfile
    import keras
    from kfine import checkpoint, data, distribute, fit, train
    other = {v: k for k, v in distribute.BACKEND_OF.items()}[keras.backend.backend()]
    out = {"strategies": {}}
    with tempfile.TemporaryDirectory() as runs:
        for strategy in ("none", other):
            cfg = _config(root, size, batch, runs, "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]",
                          f"train.epochs={epochs}", f"train.steps_per_epoch={steps}", f"distribute.strategy={strategy}")
            plan, timer = distribute.make_plan(cfg), epoch_timer()
            with plan.scope():
                fit.setup_backend(cfg)
                datasets = data.make_datasets(cfg.data, cfg.seed, shard=plan.shard)
                model, optimizer, schedule = fit.build_training(cfg, datasets)
                train.fit_phases(model, cfg, datasets, checkpoint.prepare_run_dir(cfg), optimizer=optimizer,
                                 schedule=schedule, callbacks=[timer])
            out[strategy] = timer.times
            out["strategies"][strategy] = {"replicas": plan.replicas, "devices": list(plan.devices)}
            print(f"bench: full fine-tune, distribute.strategy {strategy} on {', '.join(plan.devices)}: "
                  + ", ".join(f"{t:.1f} s" for t in timer.times), flush=True)
    images = steps * batch
    out["images_per_s"] = {k: images / min(out[k][1:]) for k in ("none", other)}
    out["strategy"] = other
    out["ratio"] = min(out["none"][1:]) / min(out[other][1:])   # above 1: the strategy is faster
    return out


def print_distribute(r: dict) -> None:
    s, n = r["strategy"], r["strategies"][r["strategy"]]["replicas"]
    print(f"\nfull fine-tune, steady state: distribute.strategy none {r['images_per_s']['none']:.1f} images/s, "
          f"{s} ({n} replica{'s' * (n > 1)}) {r['images_per_s'][s]:.1f} images/s (**{r['ratio']:.2f}x**)")


def markdown_table(results: dict) -> str:
    """The measured sections as one Markdown table (for the README)."""
    def num(x, digits=1):
        return "" if x is None else f"{x:,.{digits}f}"
    where = (f"{results['device']} ({results['platform']}, {results['backend']} backend), {results['cpus']} CPU cores, "
             f"{results['image_size']} px, batch {results['batch_size']}, {results['precision']}")
    rows = [f"| {where} | reference | kfine | ratio |", "|---|---|---|---|"]
    if "full" in results:
        r = results["full"]["images_per_s"]
        rows.append(f"| full fine-tune, steady state (images/s; reference: plain `model.fit`, same tf.data pipeline) "
                    f"| {num(r['plain'])} | {num(r['kfine'])} | **{results['full']['ratio']:.2f}x** |")
    if "head" in results:
        h = results["head"]
        for a, q in h["ratios"].items():
            rows.append(f"| head-only, {h['epochs']} epochs, augmentation {a}{' (K=2 views)' * (a == 'on')} "
                        f"(s; reference: no feature cache) | {num(h[f'aug_{a}_uncached'])} | {num(h[f'aug_{a}_cached'])} "
                        f"| **{q:.1f}x** |")
    if "distribute" in results:
        d = results["distribute"]
        s = d["strategy"]
        rows.append(f"| full fine-tune, distribute.strategy {s} on {d['strategies'][s]['replicas']} device(s) "
                    f"(images/s; reference: none) | {num(d['images_per_s']['none'])} | {num(d['images_per_s'][s])} "
                    f"| **{d['ratio']:.2f}x** |")
    for name in ("full", "head", "distribute"):
        if name in results:
            peak = results[name]["peak_memory_bytes"]
            rows.append(f"| peak accelerator memory after `{name}` (GiB; the process's peak so far) | | "
                        f"{num(peak / 2**30, 2) if peak is not None else 'n/a (CPU)'} | |")
    return "\n".join(rows)
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


def bench_command(root: Path, size: int, batch: int, epochs: int, seed: int, head_epochs: int = 8,
                  rounds: int = 1) -> dict:
    """The whole command of a short head-only run (``head_epochs`` epochs, augmentation off, no
    export), with and without the frozen-feature cache, in turn ``rounds`` times: wall time and
    where it went (per stage); the cached run's fixed cost (all but features and epochs) and its
    test evaluation's cost per image against the feature pass's. ``uncached`` and ``cached``:
    the run of median wall time (the lower one of an even count); ``ratio``: of those."""
    import statistics
    import tempfile
    out = {"runs": {"uncached": [], "cached": []}}
    with tempfile.TemporaryDirectory() as runs:
        for r in range(rounds):
            for cache in ("false", "auto"):
                key = "cached" if cache == "auto" else "uncached"
                res = _train_command(root, size, batch, runs, f"command_{key}_{r}", cache, head_epochs)
                out["runs"][key].append(res)
                print(f"bench: command, feature cache {cache}: {res['wall_s']:.1f} s", flush=True)
    for key, done in out["runs"].items():
        wall = statistics.median_low([d["wall_s"] for d in done])
        out[key] = next(d for d in done if d["wall_s"] == wall)
    out["ratios"] = [u["wall_s"] / c["wall_s"] for u, c in zip(out["runs"]["uncached"], out["runs"]["cached"])]
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
    if len(r["ratios"]) > 1:
        print("\nwhole command, head-only, each round: " + ", ".join(
            f"{u['wall_s']:.1f} s -> {c['wall_s']:.1f} s ({x:.2f}x)"
            for u, c, x in zip(r["runs"]["uncached"], r["runs"]["cached"], r["ratios"])) + "; the medians:")
    print(f"\nwhole command, head-only: no cache {r['uncached']['wall_s']:.1f} s -> cache {r['cached']['wall_s']:.1f} s "
          f"(**{r['ratio']:.1f}x**); cached run's fixed cost (all but features and epochs) {r['fixed_s']:.1f} s; "
          f"test evaluation {r['evaluation_ms_per_image']:.0f} ms/image = {r['evaluation_vs_features']:.2f}x the "
          f"feature pass's {r['feature_ms_per_image']:.0f} ms/image")
    for key in ("uncached", "cached"):
        print(f"  {key}: {stage_split(r[key]['timings'])} (seconds; total {r[key]['timings']['total']:.1f})")
# ----------------------------------------------------------------------------- serving
def bench_serving(root, size: int, batch: int, epochs: int, seed: int, calls: int = 20, images: int = 4) -> dict:
    """A call of the exported SavedModel's signatures, loaded as a server loads it (ResNet50,
    weights=null, 3 classes, ``size`` px; ``images`` JPEGs of 640x480 per call): serving_default
    (bytes: decode, resize, the model) as kfine exports it and as it would with tf.data's default
    options (autotuning and graph rewrite on), and serving_tensor (decoded images, the model only).
    Median seconds per call over ``calls`` after a first (tracing) call."""
    import io
    import statistics
    import tempfile
    from contextlib import nullcontext
    from unittest import mock
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from kfine import export, pipeline
    from kfine.config import ModelConfig
    from kfine.model import build_model
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), np.uint8)).save(buf, "JPEG")
        jpegs.append(buf.getvalue())
    model = build_model(ModelConfig(backbone="resnet50", weights=None), 3, (size, size))
    x_bytes = tf.constant(jpegs)
    x = tf.constant(rng.uniform(0, 255, (images, size, size, 3)).astype(np.float32))

    def per_call(fn, **inputs):
        fn(**inputs)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn(**inputs)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    out = {"images_per_call": images, "calls": calls}
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("kfine", "tf_data_defaults"):
            with mock.patch.object(pipeline, "one_pass_options", tf.data.Options) if key != "kfine" else nullcontext():
                path = export._write_saved_model(model, ["a", "b", "c"], (size, size), Path(tmp) / key)
            served = tf.saved_model.load(str(path))
            out[f"bytes_{key}_s"] = per_call(served.signatures["serving_default"], image_bytes=x_bytes)
            if key == "kfine":
                out["tensor_s"] = per_call(served.signatures["serving_tensor"], image=x)
    out["ratio"] = out["bytes_tf_data_defaults_s"] / out["bytes_kfine_s"]
    return out


def print_serving(r: dict) -> None:
    print(f"\nSavedModel, {r['images_per_call']} JPEGs a call (median of {r['calls']}): serving_default "
          f"{1000 * r['bytes_tf_data_defaults_s']:.0f} ms with tf.data's default options -> "
          f"{1000 * r['bytes_kfine_s']:.0f} ms as kfine exports it (**{r['ratio']:.1f}x**); "
          f"serving_tensor (decoded images) {1000 * r['tensor_s']:.0f} ms")


# ----------------------------------------------------------------------------- feed
FEED_STAGES = ("order", "box", "crop", "view", "batch")   # each includes the ones before it
FEED_CORES = (8, 16, 64)


def feed_cache(n: int, size: int, seed: int = 0):
    """A memory ImageCache of ``n`` random images at the default cache size of a ``size`` crop,
    half landscape (4:3), half portrait; (cache, files, DataConfig of torchvision's ImageNet recipe)."""
    import numpy as np
    from kfine import pipeline
    from kfine.config import AugmentConfig, DataConfig
    short = pipeline.default_cache_size((size, size))
    shapes = np.array([(short, short * 4 // 3) if i % 2 else (short * 4 // 3, short) for i in range(n)], np.int32)
    sizes = shapes.prod(axis=1) * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    pixels = pipeline.aligned_empty(int(sizes.sum()))
    pixels[:] = np.random.default_rng(seed).integers(0, 256, pixels.size, np.uint8)
    keys = [f"img{i}" for i in range(n)]
    cache = pipeline.ImageCache(keys, offsets, shapes, pixels, None, (size, size))
    cfg = DataConfig(root=".", image_size=(size, size), augment=AugmentConfig(crop_scale=(0.08, 1.0), flip=True))
    return cache, [(k, i % 10) for i, k in enumerate(keys)], cfg


def feed_stage(stage: str, cache, files, cfg, graph: bool, seed: int = 0):
    """The training stream of ``files`` up to ``stage`` (FEED_STAGES), for one view path: the pass
    order and each image's seed; + the crop box; + the crop's pixels; + flip and resize (the whole
    view, unbatched); + batching (kfine.pipeline.make_dataset itself)."""
    import functools
    import numpy as np
    import tensorflow as tf
    from dataclasses import replace
    from kfine import pipeline
    cfg = replace(cfg, view_path="graph" if graph else "python")
    if stage in ("view", "batch"):
        return pipeline.make_dataset(cache, files, cfg, seed, train=True, batch=stage == "batch")
    slots = np.array([cache.slot[p] for p, _ in files], np.int64)
    labels = np.array([y for _, y in files], np.int32)
    scale = tuple(cfg.augment.crop_scale)
    box = (functools.partial(pipeline.crop_box, scale=scale), functools.partial(pipeline.crop_box_tf, scale=scale))

    key = pipeline.pass_key(seed, 0, 0)
    ds = tf.data.Dataset.from_tensor_slices(pipeline.pass_order(labels, seed, 0, 0)).enumerate()
    ds = ds.map(pipeline.graph_fn(lambda i, p: (tf.random.experimental.stateless_fold_in(key, i), p)))
    if stage == "order":
        return ds.prefetch(tf.data.AUTOTUNE)
    if graph:   # as make_dataset: the boxes of BOX_CHUNK images at once, then the crop by slices
        shapes = cache.tensors()[2]
        ds = ds.map(lambda sd, p: (sd, p, pipeline.crop_draws(sd)), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(pipeline.BOX_CHUNK).map(lambda sd, p, u: (sd, p, pipeline.crop_box_tf(
            tf.gather(shapes, tf.gather(slots, p))[:, 0], tf.gather(shapes, tf.gather(slots, p))[:, 1], u, scale)),
            num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        if stage == "crop":
            ds = ds.map(lambda sd, p, b: cache.view(tf.gather(slots, p), True)((None, lambda h, w: b)),
                        num_parallel_calls=tf.data.AUTOTUNE)
    elif stage == "box":
        ds = ds.map(lambda sd, p: tf.numpy_function(
            lambda i, u: np.array(box[0](*map(int, cache.shapes[int(i)]), u), np.int32),
            [tf.gather(slots, p), pipeline.crop_draws(sd)], tf.int32, stateful=False), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda sd, p: cache.view(tf.gather(slots, p))(box, pipeline.crop_draws(sd)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _single_threaded(ds):
    import tensorflow as tf
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def _callback_timer():
    """Patch tf.numpy_function so that every Python callback's time is added up (the GIL is held
    throughout a callback): (counter dict, undo)."""
    import tensorflow as tf
    original, spent = tf.numpy_function, {"s": 0.0, "calls": 0}

    def timed_numpy_function(func, inp, Tout, stateful=True, name=None):
        def timed(*args):
            t = time.perf_counter()
            try:
                return func(*args)
            finally:
                spent["s"] += time.perf_counter() - t
                spent["calls"] += 1
        return original(timed, inp, Tout, stateful=stateful, name=name)

    tf.numpy_function = timed_numpy_function
    return spent, lambda: setattr(tf, "numpy_function", original)


def _cpu_per_item(make, repeats: int = 3) -> float:
    """Process CPU seconds per element of ``make()`` single-threaded (the fastest of ``repeats``
    passes after a warm-up one; elements of a batched dataset count their images). The stream is
    drained by Dataset.reduce: no Python per element, as in training (Keras' iterator)."""
    import tensorflow as tf
    ds = _single_threaded(make())

    def count(n, *x):
        first = x[0][0] if isinstance(x[0], tuple) else x[0]
        return n + (tf.cast(tf.shape(first)[0], tf.int64) if first.shape.rank == 4 else 1)

    best = None
    for r in range(repeats + 1):
        t = time.process_time()
        n = int(ds.reduce(tf.constant(0, tf.int64), count))
        if r:
            best = min(best or 1e9, (time.process_time() - t) / n)
    return best


def numpy_function_overhead(calls: int = 4000) -> float:
    """Seconds a tf.numpy_function call costs beyond its body, per call (single-threaded tf.data:
    an empty callback against tf.identity). PyFunc holds the GIL from before converting its inputs
    to after converting its outputs, so this is GIL-held time (an upper bound: op dispatch counted)."""
    import tensorflow as tf
    base = tf.data.Dataset.range(calls)
    py = _cpu_per_item(lambda: base.map(lambda i: tf.numpy_function(lambda x: x, [i], tf.int64, stateful=False)))
    graph = _cpu_per_item(lambda: base.map(tf.identity))
    return max(py - graph, 0.0)


def amdahl(total: float, serial: float, cores: int) -> float:
    """Images/s on ``cores`` cores when ``serial`` of each image's ``total`` CPU seconds runs one at a time."""
    return 1.0 / (serial + (total - serial) / cores)


def feed_rate(view_path: str, images: int, size: int, batch: int, passes: int = 3) -> tuple:
    """make_dataset's batched training stream with the process's default threading (run in a
    taskset subprocess by bench_feed): (images/s over a whole pass, first batch's wait included,
    the fastest of ``passes`` after a warm-up; seconds to a pass's first batch, the median). A
    training epoch is one pass: the first batch's wait is paid once an epoch (tf.data's parallel
    maps work ahead meanwhile, so the rate after it would flatter the slower start)."""
    import statistics
    from dataclasses import replace
    from kfine import pipeline
    cache, files, cfg = feed_cache(images, size)
    ds = pipeline.make_dataset(cache, files, replace(cfg, batch_size=batch, view_path=view_path), 0, train=True)
    best, firsts = 0.0, []
    for r in range(passes + 1):
        t = time.perf_counter()
        it = iter(ds)
        n = int(next(it)[0].shape[0])
        first = time.perf_counter()
        for x, _ in it:
            n += int(x.shape[0])
        if r:
            best = max(best, n / (time.perf_counter() - t))
            firsts.append(first - t)
    return best, statistics.median(firsts)


def _rate_on(cores: str, view_path: str, images: int, size: int, batch: int) -> tuple:
    """feed_rate in a subprocess on ``cores`` (taskset): (images/s, first batch s), Nones if it failed."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); from bench import feed_rate; "
            f"print('RATE', *feed_rate({view_path!r}, {images}, {size}, {batch}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RATE ")]
    if not line:
        print(f"bench: feed on cores {cores} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return None, None
    return tuple(float(v) for v in line[0].split()[1:])


def bench_feed(root, size: int, batch: int, epochs: int, seed: int, images: int = 512,
               rate_images: int = 2048, rounds: int = 2) -> dict:
    """Both view paths: per-image CPU time per stage (single-threaded, ``images`` images), GIL-held
    time per image (the Python callbacks' time + tf.numpy_function's per-call overhead), Amdahl's
    images/s at FEED_CORES cores, and measured on cores 0 and 0,1 (taskset), passes of
    ``rate_images``: images/s over a pass, and the wait for a pass's first batch; the two paths
    measured in turn ``rounds`` times (python first, then graph first, ...), the median kept."""
    import statistics
    from dataclasses import replace
    from kfine import pipeline
    cache, files, cfg = feed_cache(images, size, seed)
    cfg = replace(cfg, batch_size=batch)
    overhead = numpy_function_overhead()
    out = {"images": images, "rate_images": rate_images, "cores_here": pipeline.feeding_cores(),
           "numpy_function_overhead_us": overhead * 1e6}
    for path in ("python", "graph"):
        graph = path == "graph"
        r = out[path] = {"cpu_us": {}}
        for stage in FEED_STAGES:
            spent, undo = _callback_timer()
            try:
                r["cpu_us"][stage] = _cpu_per_item(lambda: feed_stage(stage, cache, files, cfg, graph, seed)) * 1e6
            finally:
                undo()
        seen = 4 * images   # the batch stage's warm-up and 3 timed passes
        r["callbacks_us"] = spent["s"] / seen * 1e6
        r["calls_per_image"] = spent["calls"] / seen
        total = r["cpu_us"]["batch"]
        r["gil_us"] = r["callbacks_us"] + r["calls_per_image"] * overhead * 1e6
        r["gil_share"] = r["gil_us"] / total
        r["predicted"] = {str(n): amdahl(total, r["gil_us"], n) * 1e6 for n in (1, 2, *FEED_CORES)}
        print(f"bench: feed {path}: " + ", ".join(f"{k} {v:.0f} us" for k, v in r["cpu_us"].items())
              + f"; GIL {r['gil_us']:.1f} us/image", flush=True)
    cores = {"1": "0", "2": "0,1"} if out["cores_here"] >= 2 else {"1": "0"}
    runs = {(p, n): [] for p in ("python", "graph") for n in cores}
    for i in range(rounds):   # in turn, so that a change in the machine's speed hits both paths alike
        for path in ("python", "graph")[::1 if i % 2 == 0 else -1]:
            for n, which in cores.items():
                runs[path, n].append(_rate_on(which, path, rate_images, size, batch))
                print(f"bench: feed {path} on {n} core(s): {runs[path, n][-1][0] or 0:.0f} images/s", flush=True)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    for path in ("python", "graph"):
        r = out[path]
        r["measured"] = {n: median([v[0] for v in runs.get((path, n), [])]) for n in ("1", "2")}
        r["measured_runs"] = {n: [v[0] for v in runs.get((path, n), [])] for n in ("1", "2")}
        r["first_batch_s"] = {n: median([v[1] for v in runs.get((path, n), [])]) for n in ("1", "2")}
    return out


def print_feed(r: dict) -> None:
    print(f"\ntraining views, {r['images']} images, per image (single-threaded CPU; tf.numpy_function call "
          f"overhead {r['numpy_function_overhead_us']:.0f} us)")
    print(f"{'':34}{'python':>10}{'graph':>10}")
    for stage in FEED_STAGES:
        print(f"{'cpu up to ' + stage + ' (us)':34}" + "".join(f"{r[p]['cpu_us'][stage]:10.0f}" for p in ("python", "graph")))
    print(f"{'GIL held (us)':34}" + "".join(f"{r[p]['gil_us']:10.1f}" for p in ("python", "graph")))
    print(f"{'GIL share':34}" + "".join(f"{r[p]['gil_share']:10.1%}" for p in ("python", "graph")))
    for n in ("1", "2", *map(str, FEED_CORES)):
        print(f"{'predicted images/s, ' + n + ' cores':34}" + "".join(f"{r[p]['predicted'][n]:10.0f}" for p in ("python", "graph")))
    print(f"measured on 1 and 2 cores (taskset), passes of {r['rate_images']} images, median of "
          f"{len(r['python']['measured_runs']['1'])} in turn:")
    for n in ("1", "2"):
        print(f"{'images/s, ' + n + ' core(s)':34}" + "".join(
            f"{r[p]['measured'][n] or float('nan'):10.0f}" for p in ("python", "graph")))
        print(f"{'first batch of a pass (ms), ' + n + ' core(s)':34}" + "".join(
            f"{1000 * (r[p]['first_batch_s'][n] or float('nan')):10.0f}" for p in ("python", "graph")))


SECTIONS = {"pipeline": (bench_pipeline, print_pipeline), "head": (bench_head, print_head),
            "search": (bench_search, print_search), "full": (bench_full, print_full),
            "distribute": (bench_distribute, print_distribute),
            "command": (bench_command, print_command),
            "feed": (bench_feed, print_feed), "serving": (bench_serving, print_serving)}
NO_DATA = {"feed", "serving"}   # sections that generate their own input


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
    ap.add_argument("--steps", type=int, default=8, help="full, distribute: training steps an epoch")
    ap.add_argument("--rounds", type=int, default=2, help="full: plain/kfine fits, feed: python/graph rates, command: uncached/cached "
                    "commands, alternated this many times each")
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--head-augment", default="off,on", help="head: augmentation settings to measure (off, on)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every training section (repeatable)")
    ap.add_argument("--tiny-data", type=int, metavar="N", help="N tiny random JPEGs per class instead of photos")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table of the results at the end")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds: at least 1 (received {args.rounds})")
    unknown = [n for n in args.only.split(",") if n not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    OVERRIDES[:] = args.set
    if os.environ.get("KERAS_BACKEND") == "jax":   # TensorFlow feeds tf.data only: the GPU is JAX's
        import tensorflow as tf                     # (as with tensorflow-cpu, which Keras recommends)
        tf.config.set_visible_devices([], "GPU")
    needs_data = set(args.only.split(",")) - NO_DATA
    if args.data:
        root = Path(args.data)
    elif not needs_data:
        root = None
    else:
        root = tiny_dataset(args.tiny_data, args.classes) if args.tiny_data else photo_dataset(args.per_class, args.classes)
    from kfine.config import load_config
    cfg = load_config(None, ["model.weights=null", *args.set])   # a wrong --set fails here, before any work
    info = device_info()
    print(f"bench: {info['backend']} backend, model on {info['platform']} ({info['device']}, {info['devices']} "
          f"device(s)); {os.cpu_count()} CPU cores; precision {cfg.train.precision}; backbone {cfg.model.backbone}",
          flush=True)
    results = {"data": str(root), "image_size": args.image_size, "batch_size": args.batch_size,
               **info, "cpus": os.cpu_count(), "precision": cfg.train.precision, "backbone": cfg.model.backbone,
               "overrides": args.set}
    kwargs = {"full": {"steps": args.steps, "rounds": args.rounds}, "distribute": {"steps": args.steps},
              "feed": {"rounds": args.rounds}, "command": {"rounds": args.rounds},
              "head": {"head_epochs": args.head_epochs, "augs": tuple(args.head_augment.split(","))}}
    for name in args.only.split(","):
        run, show = SECTIONS[name]
        results[name] = run(root, args.image_size, args.batch_size, args.epochs, args.seed, **kwargs.get(name, {}))
        results[name]["peak_memory_bytes"] = peak_memory_bytes()
        show(results[name])
    results["peak_memory_bytes"] = peak_memory_bytes()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out}")
    if args.markdown:
        print("\n" + markdown_table(results))
    return 0


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)   # without Python's seconds-long teardown of TensorFlow's modules
