"""Shared fixtures: offline guard, small generated image folders, tiny configs."""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")  # never reach for GCS from a test
# XLA (the JAX backend, TensorFlow's jit_compile) compiles without LLVM's optimisations: the
# suite's programs are tiny and run for a few steps, where compiling at LLVM's -O3 took most of
# their time (a toy_resnet run on JAX: model 10.4 -> 3.2 s, training 9.3 -> 5.0 s). XLA's own
# graph passes and numerics are unchanged. Tests that add flags (a device count) append them.
XLA_FLAGS = "--xla_backend_optimization_level=0"
if XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


# CI runs the suite on two xdist workers a file at a time (--dist loadfile). The files that take
# longest start first, so that the workers finish together instead of one running a long file
# alone at the end (xdist would order the files by their number of tests). By each file's
# measured test time, longest first; the files not listed follow in their usual order.
SLOWEST_FIRST = ("test_train.py", "test_checkpoint.py", "test_distribute.py", "test_configs.py",
                 "test_gpu_path.py", "test_model.py", "test_tune.py", "test_tools.py", "test_augment.py",
                 "test_pipeline.py", "test_features.py", "test_data.py", "test_cli.py", "test_jax.py",
                 "test_lora.py", "test_freeze.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):   # pytest-xdist: keep the order below
        config.option.loadscopereorder = False
    # The suite's JAX processes (tests and the runs they start) share XLA's compiled programs
    # through JAX's persistent cache, for this test run only: a toy_resnet built on JAX compiles
    # one program per initialiser and shape (10 s at LLVM -O3 on this CPU, 3 s at -O0), the same
    # programs wherever the same model is built. Set
    # in the controller before xdist starts its workers, which inherit it; the size limit turns
    # on the cache's file lock (two workers read and write it at once).
    if not hasattr(config, "workerinput") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        config._kfine_jax_cache = tempfile.mkdtemp(prefix="kfine-tests-jax-cache-")
        os.environ.update(JAX_COMPILATION_CACHE_DIR=config._kfine_jax_cache,
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                          JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30))


def pytest_unconfigure(config):
    if getattr(config, "_kfine_jax_cache", None):
        shutil.rmtree(config._kfine_jax_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: a file's tests keep their order


def pytest_collection_finish(session):
    # Every collection of Python's garbage (Keras' clear_session runs one in every kfine run)
    # walks all tracked objects: after collecting, TensorFlow, Keras, JAX and the test modules
    # are 430,000 of them, 0.25 s a collection. Frozen, they are no longer walked.
    gc.freeze()


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to download (keras.applications weights, datasets) fails loudly."""
    import keras.src.utils.file_utils as fu

    def refuse(*args, **kwargs):
        raise RuntimeError(f"test tried to download: {args[:2]} {kwargs.get('origin', '')}")

    # keras.applications calls it as file_utils.get_file, so patching the module attribute is enough
    monkeypatch.setattr(fu, "get_file", refuse)
    yield


def write_image(path: Path, rng: np.random.Generator, size=(40, 48), mode="RGB", fmt=None,
                base_color=None) -> Path:
    """A small image whose colour depends on ``base_color`` (so classes are learnable)."""
    h, w = size
    base = np.array(base_color if base_color is not None else rng.integers(0, 256, 3), np.float32)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


CLASS_COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (220, 220, 40), (200, 40, 200)]


def make_folder(root: Path, layout: str = "single", classes=("cat", "dog", "fox"), per_class=10,
                seed: int = 0) -> Path:
    """Write a tiny image folder in one of the reference layouts.

    single: root/<class>/; inat: root/{train,val}/<class>/; sketch: root/{train_set,val_set,test_set}/<class>/
    """
    rng = np.random.default_rng(seed)
    splits = {"single": [""], "inat": ["train", "val"], "sketch": ["train_set", "val_set", "test_set"]}[layout]
    for split in splits:
        n = per_class if split in ("", "train", "train_set") else max(2, per_class // 3)
        for ci, cls in enumerate(classes):
            for i in range(n):
                write_image(root / split / cls / f"{i:03d}.png", rng, base_color=CLASS_COLORS[ci % 5])
    return root


@contextlib.contextmanager
def interrupted_after_epoch(monkeypatch, epoch: int):
    """Inside: a run stops with KeyboardInterrupt (as after Ctrl-C) at the end of epoch ``epoch``,
    after kfine's callbacks (the epoch is committed; early stopping has had its say)."""
    import keras
    from kfine import callbacks

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, e, logs=None):
            if e == epoch:
                raise KeyboardInterrupt

    make = callbacks.make_callbacks
    monkeypatch.setattr(callbacks, "make_callbacks", lambda *a, **k: make(*a, **k) + [Interrupt()])
    try:
        yield
    finally:
        monkeypatch.setattr(callbacks, "make_callbacks", make)


@pytest.fixture
def image_folder(tmp_path):
    return make_folder(tmp_path / "data", "single")


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any config run in seconds on the CPU, offline."""
    return [f"runs_dir={tmp_path / 'runs'}", "data.image_size=[32,32]", "data.batch_size=8",
            "model.weights=null", "train.verbose=0", "data.augment.enabled=false"]


def eval_reference(data: bytes, size: int = 32) -> np.ndarray:
    """torchvision's eval transform written out independently of kfine: decode; shorter side to
    round(1.143 * size) (the other side int(cache * long / short)), antialiased (a downscale
    averages the area under each output pixel, an upscale is bilinear), clipped and rounded;
    centre crop at round((H - size) / 2). What evaluation, predict and serving see."""
    import tensorflow as tf
    cache = round(1.143 * size)
    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    h, w = image.shape[:2]
    hw = (cache, int(cache * w / h)) if h <= w else (int(cache * h / w), cache)
    method = "area" if h >= hw[0] and w >= hw[1] else "bilinear" if h <= hw[0] and w <= hw[1] else None
    resized = (tf.image.resize(image.astype(np.float32), hw, method=method) if method else
               tf.image.resize(image.astype(np.float32), hw, antialias=True))
    resized = tf.round(tf.clip_by_value(resized, 0, 255)).numpy()
    top, left = round((hw[0] - size) / 2), round((hw[1] - size) / 2)
    return resized[top:top + size, left:left + size]
