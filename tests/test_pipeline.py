"""kfine.pipeline: the image cache, the whole-index shuffle, crops cut from the larger cached image,
torchvision's crop / centre-crop / ColorJitter semantics, the one eval transform, the disk cache,
header sizes. Data tests here use more images than any buffer or cache they pass through."""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import forkserver
from kfine import data, pipeline, sources
from kfine.config import AugmentConfig, DataConfig

NO_AUG = AugmentConfig(enabled=False)


def cfg_for(root, **kw) -> DataConfig:
    kw.setdefault("augment", NO_AUG)
    kw.setdefault("image_size", (32, 32))
    kw.setdefault("batch_size", 4)
    return DataConfig(root=str(root), **kw)


# ----------------------------------------------------------------------------- the whole-index shuffle
@pytest.fixture(scope="module")
def ordered_folder(tmp_path_factory):
    """20 classes x 400 tiny images, class by class on disk (8,000: nearly 4x the old 2,048
    shuffle buffer). Each image is one flat colour that encodes its own number."""
    root = tmp_path_factory.mktemp("ordered")
    for c in range(20):
        (root / f"c{c:02d}").mkdir()
        for i in range(400):
            n = c * 400 + i
            Image.fromarray(np.full((8, 8, 3), (n // 256, n % 256, 7), np.uint8)).save(root / f"c{c:02d}" / f"{i:03d}.png")
    return root


def _numbers(x):
    x = np.asarray(x)
    return (x[:, 4, 4, 0].round().astype(int) * 256 + x[:, 4, 4, 1].round().astype(int)).tolist()


def test_every_epoch_is_a_permutation_of_the_whole_training_set(ordered_folder):
    cfg = cfg_for(ordered_folder, image_size=(8, 8), batch_size=64, val_fraction=0.0, test_fraction=0.0)
    ds = data.make_datasets(cfg, seed=0)
    assert sum(ds.counts["train"].values()) == 8000
    epochs = []
    for _ in range(2):
        seen, labels = [], []
        for x, y in ds.train:
            seen += _numbers(x)
            labels.append(y.numpy())
        epochs.append(seen)
        first = labels[0]
        assert len(set(first.tolist())) >= 12, f"first batch holds classes {sorted(set(first.tolist()))}"
        assert sorted(seen) == list(range(8000))                      # each image exactly once
        assert [n // 400 for n in seen] == np.concatenate(labels).tolist()   # labels travel with images
    assert epochs[0] != epochs[1]                                      # reshuffled every epoch
    # the whole order, not a window: images from the last class show up in the first batches
    assert min(epochs[0][:640]) < 400 and max(epochs[0][:640]) >= 7600


# ----------------------------------------------------------------------------- crops from the cache
def _stripes(h=400, w=600, period=4) -> np.ndarray:
    cols = (np.arange(w) // (period // 2)) % 2 * 255
    return np.repeat(np.broadcast_to(cols[None, :, None], (h, w, 1)), 3, axis=2).astype(np.uint8)


def test_small_crops_are_cut_from_the_larger_cached_image(tmp_path):
    """A 600x400 file of 2-pixel stripes. Cached at its own size (shorter side 400), a small random
    crop keeps the stripes; cut from the image squashed to the crop size first (what kfine did
    before, data.cache_size: [32, 32] now), they are long gone."""
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_stripes()).save(tmp_path / "d" / c / f"{i}.png")
    aug = AugmentConfig(crop_scale=(0.004, 0.004), flip=False)
    stds = {}
    for name, size in (("cache", 400), ("squashed", [32, 32])):
        ds = data.make_datasets(cfg_for(tmp_path / "d", cache_size=size, augment=aug, val_fraction=0.0,
                                        test_fraction=0.0), seed=0)
        x = np.concatenate([b.numpy() for b, _ in ds.train])
        stds[name] = float(x.std(axis=2).mean())   # contrast across each row: the stripes
    assert stds["cache"] > 60 and stds["squashed"] < 5, stds


def test_default_cache_size_keeps_the_aspect_ratio_like_torchvision_resize(tmp_path):
    assert pipeline.cache_hw(600, 800, None, (224, 224)) == (256, 341)     # int(256 * 800 / 600)
    assert pipeline.cache_hw(800, 600, None, (224, 224)) == (341, 256)
    assert pipeline.cache_hw(600, 800, [240, 300], (224, 224)) == (240, 300)
    h, w = pipeline.cache_hw(tf.constant(600), tf.constant(800), None, (224, 224))
    assert (int(h), int(w)) == (256, 341)
    img = pipeline.to_cache(tf.zeros([600, 800, 3], tf.uint8), None, (224, 224))
    assert img.shape == (256, 341, 3) and img.dtype == tf.uint8


def test_random_resized_crop_box_follows_torchvision():
    """Area fraction in `scale`, aspect ratio in [3/4, 4/3], inside the image; the fallback is
    the centre crop with the ratio clamped (torchvision RandomResizedCrop.get_params)."""
    boxes = np.array([pipeline.crop_box(256, 341, pipeline.crop_uniforms(tf.constant([s, 1])).numpy(), (0.08, 1.0))
                      for s in range(400)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 341).all()
    area = h * w / (256 * 341)
    assert area.min() >= 0.075 and area.max() <= 1.0 and area.min() < 0.15 and area.max() > 0.8
    ratio = w / h
    assert ratio.min() >= 0.74 and ratio.max() <= 1.35 and ratio.min() < 0.8 and ratio.max() > 1.25
    assert len({(t, l) for t, l in zip(top, left)}) > 300          # positions vary
    # nothing with area >= 0.9 and ratio <= 4/3 fits a 10x200 strip: centre crop 10 x round(10 * 4/3)
    fallback = pipeline.crop_box(10, 200, pipeline.crop_uniforms(tf.constant([0, 1])).numpy(), (0.9, 1.0))
    assert fallback == (0, (200 - 13) // 2, 10, 13)


def test_crop_box_takes_the_first_attempt_that_fits_and_places_it_as_torch_randint():
    """get_params line by line: attempt k uses uniforms 2k (area) and 2k+1 (log-ratio); the first
    box inside the image wins; top/left are randint(0, H - h + 1) from the last two uniforms."""
    u = np.zeros(22)
    u[0], u[1] = 0.999, 0.999        # area ~ all of it at ratio ~4/3: 115 px wide, does not fit
    u[2], u[3] = 0.0, 0.5            # area 0.5 at ratio 1: 71 x 71
    u[20], u[21] = 0.5, 0.999        # top int(0.5 * 30), left int(0.999 * 30)
    assert pipeline.crop_box(100, 100, u, (0.5, 1.0)) == (15, 29, 71, 71)
    # a whole training view draws its box from the image's seed: same seed, same crop
    img = tf.constant(np.random.default_rng(0).integers(0, 256, (60, 80, 3)), tf.uint8)
    a, b, c = (pipeline.random_resized_crop(img, tf.constant(s), (0.08, 1.0), (32, 32)).numpy()
               for s in ([3, 4], [3, 4], [5, 4]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_center_crop_offsets_round_like_torchvision():
    img = tf.reshape(tf.range(37 * 40 * 3), [37, 40, 3])
    out = pipeline.center_crop(img, (32, 32)).numpy()
    top, left = round((37 - 32) / 2), round((40 - 32) / 2)          # Python's round, as torchvision
    np.testing.assert_array_equal(out, img.numpy()[top:top + 32, left:left + 32])


def test_color_jitter_has_torchvision_semantics():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0.1, 0.6, (16, 16, 3)), tf.float32)    # no clipping at 1.5x
    grey = tf.image.rgb_to_grayscale(x).numpy()
    for seed in range(5):
        s = tf.constant([seed, 3])
        b = pipeline.color_jitter(x, s, brightness=0.5).numpy()
        f = b / x.numpy()                                             # multiplicative, one factor
        assert np.allclose(f, f.flat[0], atol=1e-5) and 0.5 <= f.flat[0] <= 1.5
        c = pipeline.color_jitter(x, s, contrast=0.5).numpy()
        mean = grey.mean()
        f = (c - mean) / (x.numpy() - mean)                           # blend with the mean grey level
        assert np.allclose(f, np.median(f), atol=1e-3) and 0.5 <= np.median(f) <= 1.5
        sat = pipeline.color_jitter(x, s, saturation=0.5).numpy()
        f = (sat - grey) / (x.numpy() - grey + 1e-12)                  # blend with the greyscale image
        ok = np.abs(x.numpy() - grey) > 1e-2
        assert np.allclose(f[ok], np.median(f[ok]), atol=1e-2) and 0.5 <= np.median(f[ok]) <= 1.5
    # the four are applied in a random order per image: brightness then contrast differs from
    # contrast then brightness, and both orders occur
    both = {tuple(np.round(pipeline.color_jitter(x, tf.constant([s, 9]), brightness=0.5, contrast=0.5)
                           .numpy()[0, 0], 4)) for s in range(2)}
    assert len(both) == 2


def test_crops_are_antialiased_where_it_matters():
    """Upscales: bilinear is antialiased bilinear. Strong downscales (> 1.5x): antialiased. Mild
    ones (every crop of the default cache is within 0.76..1.32x) are bilinear."""
    rng = np.random.default_rng(0)
    up = tf.constant(rng.integers(0, 256, (100, 120, 3)), tf.uint8)
    np.testing.assert_allclose(pipeline.resize_crop(up, (224, 224)).numpy(),
                               tf.image.resize(tf.cast(up, tf.float32), (224, 224), antialias=True).numpy(), atol=1e-3)
    big = tf.constant(rng.integers(0, 256, (400, 380, 3)), tf.uint8)
    np.testing.assert_array_equal(pipeline.resize_crop(big, (224, 224)).numpy(),
                                  tf.image.resize(tf.cast(big, tf.float32), (224, 224), antialias=True).numpy())
    mild = tf.constant(rng.integers(0, 256, (290, 260, 3)), tf.uint8)
    np.testing.assert_array_equal(pipeline.resize_crop(mild, (224, 224)).numpy(),
                                  tf.image.resize(mild, (224, 224)).numpy())


def test_cache_resize_is_antialiased_by_the_area_filter_and_bilinear_upwards():
    """A downscale to the cache averages the area under each output pixel: one-pixel stripes
    come out near mid-grey instead of aliasing to black and white as plain bilinear sampling
    does. An upscale is bilinear (= antialiased bilinear there)."""
    stripes = tf.constant(np.tile(np.array([0, 255], np.uint8)[None, :, None], (64, 45, 3)))   # 64 x 90
    out = pipeline.resize(stripes, (46, 65)).numpy().astype(int)
    np.testing.assert_array_equal(out, tf.cast(tf.round(tf.image.resize(stripes, (46, 65), method="area")),
                                                tf.int32).numpy())
    assert 60 <= out.min() and out.max() <= 195
    sampled = tf.image.resize(stripes, (46, 65)).numpy()
    assert sampled.min() < 40 and sampled.max() > 215                # what the box filter avoids
    rng = np.random.default_rng(0)
    small = tf.constant(rng.integers(0, 256, (20, 30, 3)), tf.uint8)
    up = pipeline.resize(small, (37, 55)).numpy().astype(int)
    ref = np.round(tf.image.resize(tf.cast(small, tf.float32), (37, 55), antialias=True).numpy())
    assert np.abs(up - ref).max() <= 1 and (up != ref).mean() < 0.01          # float ties apart, equal


# ----------------------------------------------------------------------------- one eval transform
def test_evaluate_predict_and_serving_see_the_same_pixels(tmp_path):
    from kfine.export import serving_image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i, (h, w) in enumerate([(45, 37), (60, 90), (32, 32)]):
            p = tmp_path / "d" / c / f"{i}.{'jpg' if i == 1 else 'png'}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    for transform, size in (("resize_center_crop", None), ("squash", None), ("resize_center_crop", [40, 50])):
        cfg = cfg_for(tmp_path / "d", val_fraction=0.0, test_fraction=0.0, eval_transform=transform, cache_size=size)
        ds = data.make_datasets(cfg, seed=0)
        files = ds.files["train"]
        evaluated = np.concatenate([x.numpy() for x, _ in ds.dataset("train", train=False)])
        predicted, ok, bad = pipeline.load_images([p for p, _ in files], (32, 32), size, transform)
        served = np.stack([serving_image(tf.io.read_file(p), (32, 32), {"cache_size": size, "eval_transform": transform})
                           .numpy() for p, _ in files])
        assert not bad and ok == [p for p, _ in files]
        np.testing.assert_array_equal(evaluated, predicted.astype(np.float32))
        np.testing.assert_array_equal(evaluated, served)
        # and training without augmentation sees exactly that too
        np.testing.assert_array_equal(np.sort(np.concatenate([x.numpy() for x, _ in ds.train]), axis=0),
                                      np.sort(evaluated, axis=0))


def test_one_pass_datasets_run_untuned_and_training_stays_tuned(tmp_path):
    """Evaluation (and every epoch's validation: Keras makes a new iterator per epoch) and the
    cached features' datasets run without TensorFlow's autotuning thread and graph rewrite, which
    made dropping each iterator wait (0.3 to 10 s measured) and rewrote the graph at each new one;
    a training stream (one iterator per phase) keeps its autotuning."""
    from kfine import features
    for c in ("a", "b"):
        for i in range(3):
            p = tmp_path / "d" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(p)
    ds = data.make_datasets(cfg_for(tmp_path / "d", val_fraction=0.0, test_fraction=0.0), seed=0)
    feats = features.Features(np.zeros((1, 6, 2), np.float32), np.arange(6, dtype=np.int32) % 2,
                              np.zeros((2, 2), np.float32), np.zeros(2, np.int32), "key")
    untuned = [ds.dataset("train", train=False), *features.feature_datasets(feats, 2, 0, 0, 3)]
    for d in untuned:
        assert d.options().autotune.enabled is False
        assert d.options().experimental_optimization.apply_default_optimizations is False
        assert d.options().autotune.initial_parallelism == pipeline.feeding_cores()   # not TF's 16
    assert ds.dataset("train").options().autotune.enabled is not False


# ----------------------------------------------------------------------------- disk cache
def test_disk_cache_is_reused_by_a_second_run_and_equals_memory(tmp_path, monkeypatch):
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=12)
    cfg = cfg_for(root, cache="disk", cache_dir=str(tmp_path / "cache"), deterministic=True)
    before = pipeline.BUILT["decoded"]
    first = data.make_datasets(cfg, seed=0)
    assert pipeline.BUILT["decoded"] - before == 36
    assert first.cache.path.parent == tmp_path / "cache" and (first.cache.path / "pixels.u8").is_file()
    pipeline._RECENT.clear()                      # a new process: only the disk holds the cache
    monkeypatch.setattr(pipeline, "decode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    second = data.make_datasets(cfg, seed=0)
    assert pipeline.BUILT["decoded"] - before == 36 and isinstance(second.cache.pixels, np.memmap)
    monkeypatch.undo()
    memory = data.make_datasets(replace(cfg, cache="memory"), seed=0)
    for split in ("train", "val", "test"):
        a = [x.numpy() for x, _ in getattr(second, split)]
        b = [x.numpy() for x, _ in getattr(memory, split)]
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert list((tmp_path / "cache").iterdir()) == [first.cache.path]   # no temporary folder left


def test_cache_none_decodes_every_epoch_and_gives_the_same_images(tmp_path):
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=6)
    a = data.make_datasets(cfg_for(root, cache="none"), seed=0)
    b = data.make_datasets(cfg_for(root), seed=0)
    assert a.cache.pixels is None
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in a.val]),
                                  np.concatenate([x.numpy() for x, _ in b.val]))


# ----------------------------------------------------------------------------- room for the cache
def _paths_info(root):
    paths = sorted(str(p) for p in Path(root).rglob("*.png"))
    return paths, sources.scan_files(paths)


def test_the_cache_size_estimate_from_headers_is_what_the_cache_holds(tmp_path):
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=6)   # 40x48 images -> 37x44 at a 32 px crop
    paths, info = _paths_info(root)
    cache, _ = pipeline.build_cache(paths, cfg_for(root), info)
    assert pipeline.cache_bytes(paths, info, cfg_for(root)) == cache.nbytes == 18 * 37 * 44 * 3


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_cache_larger_than_the_memory_or_disk_there_is_stops_the_run_before_decoding(tmp_path, monkeypatch, kind):
    """24 images need 117 kB at the cache size; with 100 kB of memory (or disk) the run stops
    before the decode pass, with one line naming the figure and what to set, and leaves no run
    directory and no cache folder behind. With room, the same data builds."""
    from conftest import make_folder
    from kfine.config import load_config
    from kfine.train import run
    root = make_folder(tmp_path / "d", "single", per_class=8)
    monkeypatch.setattr(pipeline, "available_memory", lambda: 100_000)
    monkeypatch.setattr(pipeline, "free_disk", lambda path: 100_000)
    cache_dir = tmp_path / "cache"
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.layout=single",
                             "data.image_size=[32,32]", "data.batch_size=8", "model.weights=null", "train.verbose=0",
                             "data.augment.enabled=false", "export.enabled=false", "name=t", "train.epochs=1",
                             f"data.cache={kind}", f"data.cache_dir={cache_dir}"])
    before = pipeline.BUILT["decoded"]
    with pytest.raises(sources.DataError) as err:
        run(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "0.1 MB for 24 images at cache size 37" in msg
    wanted = ["data.cache: disk", "data.cache_size", "data.cache_dir"] if kind == "memory" else \
        [str(cache_dir), "data.cache_dir", "data.cache_size"]
    assert all(w in msg for w in wanted), msg
    assert pipeline.BUILT["decoded"] == before                      # nothing was decoded
    assert not (tmp_path / "runs" / "t").exists()                   # and no run directory is left
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    monkeypatch.setattr(pipeline, "available_memory", lambda: 10_000_000)
    monkeypatch.setattr(pipeline, "free_disk", lambda path: 10_000_000)
    pipeline._RECENT.clear()
    assert len(data.make_datasets(cfg.data, seed=0).cache) == 24


@pytest.mark.parametrize("when", ["up front", "midway"])
def test_a_full_disk_while_building_is_a_clean_error_naming_the_cache_dir(tmp_path, monkeypatch, when):
    """The disk cache's file is allocated (posix_fallocate) before it is written through the
    memory map: ENOSPC is then an error naming the cache folder, not a SIGBUS. "midway": the
    estimate is too small, the file grows during the pass and the disk is full then."""
    import errno
    import os
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=8)
    calls, real = [], os.posix_fallocate

    def allocate(fd, offset, length):
        calls.append(length)
        if when == "up front" or len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", allocate)
    if when == "midway":
        monkeypatch.setattr(pipeline, "cache_bytes", lambda *a: 0)   # 64 kB to start; the images need 117 kB
    cache_dir = tmp_path / "cache"
    before = pipeline.BUILT["decoded"]
    with pytest.raises(sources.DataError) as err:
        data.make_datasets(cfg_for(root, cache="disk", cache_dir=str(cache_dir)), seed=0)
    msg = str(err.value)
    assert "\n" not in msg and str(cache_dir) in msg and "ran out of space" in msg and "data.cache_dir" in msg
    assert list(cache_dir.iterdir()) == []                          # no temporary folder left
    assert (pipeline.BUILT["decoded"] > before) == (when == "midway") and len(calls) == (1 if when == "up front" else 2)


def _dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_build(folder: Path, nbytes: int, mtime: float | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "pixels.u8").write_bytes(b"\1" * nbytes)
    if mtime is not None:
        import os
        for p in (folder / "pixels.u8", folder):
            os.utime(p, (mtime, mtime))
    return folder


def stale_and_live_builds(cache: Path) -> tuple[list[Path], list[Path]]:
    """Temporary folders of cache builds: (those of dead processes, those that may be live)."""
    import os
    import time
    host, dead = pipeline._HOST, _dead_pid()
    stale = [_fake_build(cache / f".k1.tmp-{host}-{dead}-ab_1", 3_000_000),
             _fake_build(cache / ".k2.tmp-ab_2", 1000, mtime=time.time() - 3600)]   # no PID, older than us
    live = [_fake_build(cache / f".k3.tmp-{host}-{os.getpid()}-ab_3", 1000),
            _fake_build(cache / f".k4.tmp-elsewhere-{dead}-ab_4", 1000),            # another host's PID
            _fake_build(cache / ".k5.tmp-ab_5", 1000)]                               # no PID, written now
    return stale, live


def test_temporary_folders_of_dead_builds_are_removed_at_start(tmp_path):
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=6)
    stale, live = stale_and_live_builds(tmp_path / "cache")
    ds = data.make_datasets(cfg_for(root, cache="disk", cache_dir=str(tmp_path / "cache")), seed=0)
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in live)
    assert sorted((tmp_path / "cache").iterdir()) == sorted(live + [ds.cache.path])


def _memory_pixels(paths, info, cfg):
    cache, _ = pipeline.build_cache(paths, replace(cfg, cache="memory"), info)
    return {k: cache.get(cache.slot[k]) for k in cache.keys}


@pytest.mark.parametrize("who_skips", ["loser", "winner"])
def test_a_build_that_loses_the_publish_race_reads_the_winners_index(tmp_path, monkeypatch, who_skips):
    """Two builds of one disk cache, one of which could not read the second file (a transient
    error): the one that publishes second finds the first's folder in place and reads ITS
    pixels by ITS index, so every image it keeps is the right one."""
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=8)
    paths, info = _paths_info(root)
    cfg = cfg_for(root, cache="disk", cache_dir=str(tmp_path / "cache"))
    want = _memory_pixels(paths, info, cfg)
    real_publish, real_decoded = pipeline._publish, pipeline._decoded

    def skipping(keys, c):   # the second file fails to read
        return real_decoded(keys, c).filter(lambda i, img: tf.not_equal(i, 1))

    def winner_publishes_first(*args):
        monkeypatch.setattr(pipeline, "_publish", real_publish)
        monkeypatch.setattr(pipeline, "_decoded", skipping if who_skips == "winner" else real_decoded)
        pipeline._RECENT.clear()
        winners.append(pipeline.build_cache(paths, cfg, info)[0])
        return real_publish(*args)

    winners = []
    monkeypatch.setattr(pipeline, "_publish", winner_publishes_first)
    monkeypatch.setattr(pipeline, "_decoded", skipping if who_skips == "loser" else real_decoded)
    pipeline._RECENT.clear()
    loser, bad = pipeline.build_cache(paths, cfg, info)
    winner = winners[0]
    assert loser.keys == winner.keys and loser.path == winner.path
    assert (paths[1] in bad) == (who_skips == "winner") and len(loser) == len(paths) - len(bad)
    for k in loser.keys:
        np.testing.assert_array_equal(loser.get(loser.slot[k]), want[k])
        np.testing.assert_array_equal(winner.get(winner.slot[k]), want[k])
    assert list((tmp_path / "cache").iterdir()) == [loser.path]     # the loser's build is gone


RACE_SCRIPT = """
import sys, time
from pathlib import Path
import numpy as np
import tensorflow as tf
from kfine import pipeline, sources
from kfine.config import AugmentConfig, DataConfig
root, cache_dir, me, other, skip, out = sys.argv[1:]
paths = sorted(str(p) for p in Path(root).rglob("*.png"))
info = sources.scan_files(paths)
cfg = DataConfig(root=root, image_size=(32, 32), cache="disk", cache_dir=cache_dir,
                 augment=AugmentConfig(enabled=False))
real_decoded, real_publish = pipeline._decoded, pipeline._publish
if skip != "-":   # a transient read error on one file
    j = paths.index(skip)
    pipeline._decoded = lambda keys, c: real_decoded(keys, c).filter(lambda i, img: tf.not_equal(i, j))
def publish(*args):   # both builds are done before either publishes
    Path(me).touch()
    while not Path(other).exists():
        time.sleep(0.02)
    return real_publish(*args)
pipeline._publish = publish
cache, bad = pipeline.build_cache(paths, cfg, info)
np.savez(out, keys=np.array(cache.keys), bad=np.array(list(bad), dtype=str),
         **{f"i{n}": cache.get(n) for n in range(len(cache))})
"""


@pytest.mark.slow
def test_two_processes_building_one_disk_cache_read_the_same_right_pixels(tmp_path):
    """Two real processes build the same disk cache at once, one unable to read the second
    file: whichever loses the publish race maps the winner's pixels by the winner's index, so
    both keep the same files and read the right pixels for each."""
    import os
    import sys
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=8)
    paths, info = _paths_info(root)
    cache_dir = tmp_path / "cache"
    want = _memory_pixels(paths, info, cfg_for(root))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [forkserver.Popen([sys.executable, "-c", RACE_SCRIPT, str(root), str(cache_dir), str(me), str(other),
                               skip, str(tmp_path / f"{me.name}.npz")], env=env)
             for me, other, skip in ((a, b, "-"), (b, a, paths[1]))]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = [np.load(tmp_path / f"{n}.npz") for n in "ab"]
    assert got[0]["keys"].tolist() == got[1]["keys"].tolist() and got[0]["bad"].tolist() == got[1]["bad"].tolist()
    assert len(got[0]["keys"]) >= len(paths) - 1
    for g in got:
        for n, k in enumerate(g["keys"].tolist()):
            np.testing.assert_array_equal(g[f"i{n}"], want[k])
    assert len(list(cache_dir.iterdir())) == 1                      # one published cache, no temporary folder


# ----------------------------------------------------------------------------- header sizes
def _png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h, and one tiny IDAT: kilobytes for gigapixels."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_header_pixels_reads_every_format(fmt):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(buf, format=fmt)
    assert int(pipeline.header_pixels(tf.constant(buf.getvalue()))) == 37 * 53
    assert int(pipeline.header_pixels(tf.constant(_png_header_only(100000, 100000)))) == 10 ** 10
    assert int(pipeline.header_pixels(tf.constant(b"not an image at all, but long enough"))) == -1


def test_decompression_bomb_is_refused_by_its_header_in_training_and_serving(tmp_path):
    from conftest import make_folder
    from kfine.export import serving_image
    root = make_folder(tmp_path / "d", "single", per_class=4)
    bomb = root / "cat" / "bomb.png"
    bomb.write_bytes(_png_header_only(100000, 100000))
    ds = data.make_datasets(cfg_for(root, val_fraction=0.25, test_fraction=0.0), seed=0)
    reasons = dict(ds.skipped)
    assert list(reasons) == [str(bomb)] and "too large" in reasons[str(bomb)]
    big = root / "dog" / "big.png"                            # past data.max_pixels, under PIL's limit
    big.write_bytes(_png_header_only(8000, 6000))
    arr, ok, bad = pipeline.load_images([str(bomb), str(big)], (32, 32), max_pixels=40_000_000)
    assert "max_pixels" in bad[1][1] and bad[1][0] == str(big)
    assert ok == [] and "too large" in bad[0][1]
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_pixels"):
        serving_image(tf.constant(bomb.read_bytes()), (32, 32), {"max_pixels": 40_000_000})


def test_broken_symlinks_and_loops_are_bad_files_named_by_path(tmp_path):
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=4)
    dangling, loop_a, loop_b = root / "cat" / "gone.png", root / "dog" / "a.png", root / "dog" / "b.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    (root / "fox" / "dirloop").symlink_to(root / "fox")          # a folder that contains itself
    ds = data.make_datasets(cfg_for(root, val_fraction=0.25, test_fraction=0.0), seed=0)
    reasons = dict(ds.skipped)
    assert "dangling symlink" in reasons[str(dangling)] and str(tmp_path / "nowhere.png") in reasons[str(dangling)]
    assert "symlink loop" in reasons[str(loop_a)] and "symlink loop" in reasons[str(loop_b)]
    assert sum(sum(c.values()) for c in ds.counts.values()) == 12
    report = data.check_data(cfg_for(root, val_fraction=0.25, test_fraction=0.0))
    assert {u["path"] for u in report["unreadable"]} >= {str(dangling), str(loop_a), str(loop_b)}


# ----------------------------------------------------------------------------- splits.csv
def test_saved_split_survives_files_added_removed_and_changed(tmp_path, capsys):
    from conftest import make_folder, write_image
    root = make_folder(tmp_path / "d", "single", per_class=10)
    cfg = cfg_for(root)
    first = data.make_datasets(cfg, seed=0)
    from kfine.rundir import write_json
    write_json(tmp_path / "run" / "class_names.json", first.class_names)
    sources.write_splits(first.index, tmp_path / "run" / "splits.csv")
    index = sources.read_splits(tmp_path / "run" / "splits.csv", root, cfg)        # round trip
    assert index.files == first.files and index.class_names == first.class_names
    assert {p: i.sha1 for p, i in index.info.items()} == {p: i.sha1 for p, i in first.index.info.items()}
    # one more image per class: a freshly drawn split moves trained images into test ...
    rng = np.random.default_rng(5)
    for c in ("cat", "dog", "fox"):
        write_image(root / c / "new.png", rng)
    redrawn = data.make_datasets(cfg, seed=0)
    trained = {p for p, _ in first.files["train"]}
    assert trained & {p for p, _ in redrawn.files["test"] + redrawn.files["val"]}
    # ... the saved one does not, and says what changed
    gone = first.files["val"][0][0]
    Path(gone).unlink()
    changed = first.files["train"][0][0]
    write_image(Path(changed), rng)
    again = data.make_datasets(cfg, seed=0, splits=tmp_path / "run" / "splits.csv")
    out = capsys.readouterr().out
    assert again.files["train"] == first.files["train"] and again.files["test"] == first.files["test"]
    assert again.files["val"] == first.files["val"][1:]
    assert "3 image(s) added" in out and "1 file(s) of the saved split no longer exist" in out and gone in out
    assert "1 file(s) changed" in out and changed in out


def test_balanced_sampling_draws_every_class_equally_often(tmp_path):
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", classes=("big", "small"), per_class=40)
    for p in sorted((root / "small").iterdir())[8:]:
        p.unlink()                                               # 40 vs 8 images
    cfg = cfg_for(root, val_fraction=0.0, test_fraction=0.0, sampling="balanced", batch_size=16)
    ds = data.make_datasets(cfg, seed=0)
    epochs = [np.concatenate([y.numpy() for _, y in ds.train]) for _ in range(5)]
    assert all(len(e) == 48 for e in epochs)                     # an epoch is still len(train) images
    small = np.mean([np.mean(e == 1) for e in epochs])
    assert 0.4 < small < 0.6                                      # not 8/48 = 0.17
    plain = data.make_datasets(replace(cfg, sampling="uniform"), seed=0)
    assert np.mean(np.concatenate([y.numpy() for _, y in plain.train]) == 1) == pytest.approx(8 / 48)
    assert "data.sampling: balanced" in data.check_data(replace(cfg, sampling="uniform"))["warnings"][0]


def test_large_jpegs_decode_at_a_dct_scale_to_the_same_cached_image(tmp_path):
    """An 800x600 photo-like JPEG for a 37 px cache decodes at 1/8 scale (100x75) in the DCT
    domain, then resizes: the same cached shape, and within a grey level or two of decoding at
    full size and resizing that."""
    yy, xx = np.mgrid[0:600, 0:800]
    img = np.stack([128 + 100 * np.sin(xx / 40.0), 128 + 100 * np.cos(yy / 30.0), (xx + yy) % 256 * 0 + 90], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=95)
    data = tf.constant(buf.getvalue())
    fast = pipeline.decode_to_cache(data, None, (32, 32)).numpy()
    full = pipeline.to_cache(pipeline.decode(data), None, (32, 32)).numpy()
    assert fast.shape == full.shape == (37, 49, 3)
    assert np.abs(fast.astype(float) - full).mean() < 2.0


def test_recent_cache_keeps_the_most_recently_used():
    """The bounded reuse of decoded images and backbone features: a lookup refreshes a key, a keep
    beyond the size lets the least recently used go."""
    from kfine import features
    from kfine.pipeline import RecentCache
    recent = RecentCache(2)
    assert recent.keep("a", 1) == 1 and recent.keep("b", 2) == 2
    assert recent.lookup("a") == 1            # "a" is now the newest: "b" goes next
    recent.keep("c", 3)
    assert list(recent) == ["a", "c"] and recent.lookup("b") is None
    assert isinstance(features._RECENT, RecentCache) and isinstance(pipeline._RECENT, RecentCache)


# ----------------------------------------------------------------------------- the graph view path
def test_graph_crop_box_is_the_python_crop_box_bit_for_bit():
    """crop_box_tf (TensorFlow ops, inside tf.data as the pipeline runs it, one image or a chunk
    at once) gives torchvision's box exactly as crop_box does from the same uniforms: many seeds,
    landscape, portrait, square, tiny and strip images (the centre-crop fallback), several scales."""
    shapes = [(256, 341), (341, 256), (37, 49), (32, 32), (10, 200), (200, 10), (1, 1), (3, 500), (57, 43)]
    scales = [(0.08, 1.0), (0.5, 1.0), (0.9, 1.0), (0.004, 0.004)]
    seeds = np.random.default_rng(0).integers(0, 2 ** 31, (150, 2))
    hs, ws = (np.repeat([s[i] for s in shapes], len(seeds)) for i in (0, 1))   # every shape x every seed
    rows = tf.data.Dataset.from_tensor_slices((hs, ws, np.tile(seeds, (len(shapes), 1))))
    rows = rows.map(lambda h, w, seed: (h, w, pipeline.crop_uniforms(seed)))
    u = np.stack([x for _, _, x in rows.as_numpy_iterator()])
    for scale in scales:
        one = np.stack(list(rows.map(lambda h, w, x: pipeline.crop_box_tf(h, w, x, scale)).as_numpy_iterator()))
        chunk = rows.batch(64).map(lambda h, w, x: pipeline.crop_box_tf(h, w, x, scale))
        chunk = np.concatenate(list(chunk.as_numpy_iterator()))
        want = np.array([pipeline.crop_box(int(h), int(w), x, scale) for h, w, x in zip(hs, ws, u)])
        for name, got in (("one", one), ("chunk", chunk)):
            bad = np.flatnonzero((got != want).any(axis=1))
            assert not len(bad), (name, scale, [(hs[i], ws[i]) for i in bad[:3]], got[bad[:3]], want[bad[:3]])
        fallback = (hs == 10) & (ws == 200)   # nothing fits: the centre-crop fallback, compared too
        if scale == (0.9, 1.0):
            assert (want[fallback] == (0, 93, 10, 13)).all()
    # the aspect ratio's exp is computed from + and * alone, the same bits in Python and TensorFlow
    x = np.linspace(np.log(3 / 4), np.log(4 / 3), 10001)
    py = np.array([pipeline._exp(float(v)) for v in x])
    np.testing.assert_array_equal(pipeline._exp(tf.constant(x, tf.float64)).numpy(), py)
    assert np.max(np.abs(py - np.exp(x)) / np.spacing(np.exp(x))) <= 2


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_graph_and_python_view_paths_give_the_same_views(tmp_path, cache):
    """data.view_path graph (no Python per view) and python cut the same training views (crop,
    flip, jitter) and eval views from the same seeds: results do not depend on the machine's
    choice of path. 24 images through batches of 4, two epochs of the epoch stream."""
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=8)
    aug = AugmentConfig(crop_scale=(0.08, 1.0), flip=True, brightness=0.2)
    out = {}
    for path in ("python", "graph"):
        pipeline._RECENT.clear()
        cfg = cfg_for(root, cache=cache, cache_dir=str(tmp_path / "cache"), augment=aug, view_path=path,
                      test_fraction=0.0)
        ds = data.make_datasets(cfg, seed=5)
        stream = ds.dataset("train", epoch=3, steps=4)
        out[path] = ([np.concatenate([x.numpy() for x, _ in stream.take(8)])]
                     + [np.concatenate([x.numpy() for x, _ in ds.train]) for _ in range(2)]
                     + [np.concatenate([x.numpy() for x, _ in ds.val])])
    for a, b in zip(out["python"], out["graph"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(out["graph"][1], out["graph"][2])   # views differ pass to pass


def test_the_graph_path_reads_the_cache_in_place(tmp_path):
    """ImageCache.tensors() shares the memory cache's pixels (no second copy of a cache that may
    take most of the memory) and maps a disk cache's file; both are plain CPU variables."""
    from conftest import make_folder
    root = make_folder(tmp_path / "d", "single", per_class=6)
    cache = data.make_datasets(cfg_for(root), seed=0).cache
    pixels, offsets, shapes = cache.tensors()
    assert cache.tensors()[0] is pixels and pixels.shape == cache.pixels.shape and "CPU" in pixels.device
    before = int(cache.pixels[7])
    cache.pixels[7] = before ^ 0xFF
    try:
        assert int(pixels[7]) == before ^ 0xFF          # the same memory
    finally:
        cache.pixels[7] = before
    pipeline._RECENT.clear()
    disk = data.make_datasets(cfg_for(root, cache="disk", cache_dir=str(tmp_path / "c")), seed=0).cache
    np.testing.assert_array_equal(disk.tensors()[0].numpy(), np.asarray(disk.pixels))


def test_view_path_auto_picks_the_graph_path_for_many_cores_or_devices(monkeypatch):
    from kfine import distribute
    from kfine.config import ConfigError, load_config
    monkeypatch.setattr(pipeline, "feeding_cores", lambda: pipeline.GRAPH_VIEWS_ABOVE_CORES)
    assert not pipeline.graph_views("auto") and pipeline.graph_views("graph") and not pipeline.graph_views("python")
    monkeypatch.setattr(pipeline, "feeding_cores", lambda: pipeline.GRAPH_VIEWS_ABOVE_CORES + 1)
    assert pipeline.graph_views("auto") and not pipeline.graph_views("python")
    monkeypatch.setattr(pipeline, "feeding_cores", lambda: 2)
    monkeypatch.setattr(distribute, "active", lambda: distribute.Plan("mirrored", devices=("GPU:0", "GPU:1")))
    assert pipeline.graph_views("auto")               # one pipeline feeds two devices
    monkeypatch.setattr(distribute, "active", lambda: distribute.Plan("data_parallel", devices=("a", "b"), processes=2))
    assert not pipeline.graph_views("auto")           # one device per process
    assert load_config(None, ["data.view_path=graph"]).data.view_path == "graph"
    with pytest.raises(ConfigError, match="data.view_path"):
        load_config(None, ["data.view_path=fast"])
