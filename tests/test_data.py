"""kfine.data (+ kfine.sources, kfine.audit): folder layouts, stratified splits, formats, bad input,
tfds (mocked), audit, digits, CLI. The pipeline itself is tested in test_pipeline.py."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_folder, write_image
from kfine import audit, data, pipeline, sources
from kfine.config import AugmentConfig, DataConfig, load_config

REPO = Path(__file__).resolve().parents[1]
NO_AUG = AugmentConfig(enabled=False)


def cfg_for(root, **kw) -> DataConfig:
    kw.setdefault("augment", NO_AUG)
    return DataConfig(root=str(root), image_size=(32, 32), batch_size=4, **kw)


def labels_of(ds) -> list[int]:
    return [int(y) for _, ys in ds for y in ys.numpy()]


# ----------------------------------------------------------------------------- layouts and splits
@pytest.mark.parametrize("layout, expected", [
    ("single", {"train": 7, "val": 2, "test": 1}),    # 10 per class: 20% val, 10% test
    ("inat", {"train": 8, "val": 2, "test": 3}),      # val = 20% of train; inat's val/ is the test set
    ("sketch", {"train": 10, "val": 3, "test": 3}),
])
def test_layouts_give_classes_counts_and_stratified_splits(tmp_path, layout, expected):
    root = make_folder(tmp_path / layout, layout, per_class=10)
    for lay in ("auto", layout):
        ds = data.make_datasets(cfg_for(root, layout=lay), seed=0)
        assert ds.class_names == ["cat", "dog", "fox"]
        assert ds.counts == {s: {c: n for c in ds.class_names} for s, n in expected.items()}
        for split, files in ds.files.items():
            for path, label in files:   # label = index of the class folder name
                assert Path(path).parent.name == ds.class_names[label]
            got = labels_of(getattr(ds, split))
            if split == "train":   # shuffled
                assert sorted(got) == sorted(y for _, y in files)
            else:                  # val/test keep the order of `files`
                assert got == [y for _, y in files]
        all_files = [p for fl in ds.files.values() for p, _ in fl]
        assert len(all_files) == len(set(all_files))   # no image in two splits
    if layout == "inat":   # the held-out test set is exactly ROOT/val
        assert all("/val/" in p for p, _ in ds.files["test"])
        assert not any("/val/" in p for p, _ in ds.files["train"] + ds.files["val"])


def test_batches_are_float_0_255_of_image_size(image_folder):
    ds = data.make_datasets(cfg_for(image_folder, augment=AugmentConfig(
        rotation=15, translation=0.1, zoom=0.1, shear=0.1, brightness=0.2, contrast=0.2,
        saturation=0.2, hue=0.05)), seed=0)
    for split in (ds.train, ds.val, ds.test):
        x, y = next(iter(split))
        assert x.dtype.name == "float32" and y.dtype.name == "int32"
        assert x.shape[1:] == (32, 32, 3) and x.shape[0] == y.shape[0] <= 4
        assert 0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 255
    assert len(labels_of(ds.train)) == 21   # one pass = one epoch, no repeat


def test_cache_holds_uint8_and_unaugmented_batches_are_its_whole_values(image_folder):
    """What is cached is uint8 (a quarter of float32's memory); without augmentation the float
    batches are exactly those whole values, as the exported model's decoding gives them."""
    cfg = cfg_for(image_folder, augment=AugmentConfig(enabled=False))
    ds = data.make_datasets(cfg, seed=0)
    files = ds.files["val"]
    assert ds.cache.pixels.dtype == np.uint8
    want = np.stack([pipeline.center_crop(ds.cache.get(ds.cache.slot[p]), (32, 32)).numpy() for p, _ in files])
    got = np.concatenate([x.numpy() for x, _ in ds.val])
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_same_seed_same_split_different_seed_different(tmp_path):
    root = make_folder(tmp_path / "d", "single", per_class=20)
    a = data.make_datasets(cfg_for(root), seed=1).files
    b = data.make_datasets(cfg_for(root), seed=1).files
    c = data.make_datasets(cfg_for(root), seed=2).files
    assert a == b
    assert a["val"] != c["val"]
    assert Counter(y for _, y in c["val"]) == Counter({0: 4, 1: 4, 2: 4})   # still stratified


def test_same_seed_same_first_epoch_order_and_augmentation(image_folder):
    aug = AugmentConfig(rotation=10, brightness=0.2)
    cfg = cfg_for(image_folder, deterministic=True, augment=aug)
    x1 = np.concatenate([x.numpy() for x, _ in data.make_datasets(cfg, seed=3).train])
    x2 = np.concatenate([x.numpy() for x, _ in data.make_datasets(cfg, seed=3).train])
    np.testing.assert_array_equal(x1, x2)
    ds = data.make_datasets(cfg, seed=4)
    assert not np.array_equal(x1, np.concatenate([x.numpy() for x, _ in ds.train]))
    # a second epoch is reshuffled and re-augmented
    epoch2 = np.concatenate([x.numpy() for x, _ in ds.train])
    epoch1 = np.concatenate([x.numpy() for x, _ in ds.train])
    assert not np.array_equal(epoch1, epoch2)
    plain = data.make_datasets(replace(cfg, augment=NO_AUG), seed=3)
    y_aug = labels_of(data.make_datasets(cfg, seed=3).train)
    assert sorted(labels_of(plain.train)) == sorted(y_aug)


def test_limit_per_class_caps_images(tmp_path):
    root = make_folder(tmp_path / "d", "single", per_class=20)
    ds = data.make_datasets(cfg_for(root, limit_per_class=10), seed=0)
    assert ds.counts["train"] == {"cat": 7, "dog": 7, "fox": 7}
    assert data.make_datasets(cfg_for(root, limit_per_class=10), seed=0).files == ds.files


# ----------------------------------------------------------------------------- formats
def _write_formats(folder: Path) -> dict[str, tuple]:
    """name -> expected mean colour of the decoded image (None: only check shape)."""
    folder.mkdir(parents=True)
    red = np.zeros((40, 48, 3), np.uint8)
    red[..., 0] = 200
    img = Image.fromarray(red)
    img.save(folder / "a.jpg")
    img.save(folder / "a.png")
    img.save(folder / "a.bmp")
    img.convert("L").save(folder / "gray.png")
    img.convert("RGBA").save(folder / "rgba.png")
    img.convert("P").save(folder / "palette.png")
    img.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 48), 40000, np.uint16)).save(folder / "deep16.png")
    frames = [Image.fromarray(np.full((40, 48, 3), v, np.uint8)) for v in (10, 220)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    gray = float(np.asarray(img.convert("L")).mean())
    return {"a.jpg": (200, 0, 0), "a.png": (200, 0, 0), "a.bmp": (200, 0, 0), "gray.png": (gray,) * 3,
            "rgba.png": (200, 0, 0), "palette.png": None, "cmyk.jpg": (200, 0, 0),
            "deep16.png": (40000 / 257,) * 3, "anim.gif": (10, 10, 10)}


def test_formats_decode_to_rgb_uint8_of_the_right_size(tmp_path):
    expected = _write_formats(tmp_path / "f")
    for name, colour in expected.items():
        arr, _, bad = pipeline.load_images([str(tmp_path / "f" / name)], (32, 32))
        assert not bad and len(arr) == 1, name
        arr = arr[0]
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, name
        if colour is not None:
            np.testing.assert_allclose(arr.reshape(-1, 3).mean(0), colour, atol=4, err_msg=name)
    # the same files go through a whole pipeline without a skip
    for cls in ("x", "y"):
        shutil.copytree(tmp_path / "f", tmp_path / "set" / "train_set" / cls)
        for s in ("val_set", "test_set"):
            write_image(tmp_path / "set" / s / cls / "0.png", np.random.default_rng(0))
    ds = data.make_datasets(cfg_for(tmp_path / "set"), seed=0)
    assert ds.skipped == [] and ds.counts["train"] == {"x": 9, "y": 9}
    assert len(labels_of(ds.train)) == 18


def test_load_images_and_list_images(tmp_path):
    _write_formats(tmp_path / "f" / "sub")
    (tmp_path / "f" / "notes.txt").write_text("hi")
    (tmp_path / "f" / "bad.jpg").write_bytes(b"not a jpeg")
    paths = sources.list_images(str(tmp_path / "f"))
    assert paths == sorted(paths) and len(paths) == 10 and not any(p.endswith(".txt") for p in paths)
    arr, ok, bad = pipeline.load_images(paths, (16, 16))
    assert arr.shape == (9, 16, 16, 3) and arr.dtype == np.uint8
    assert bad == [(str(tmp_path / "f" / "bad.jpg"), bad[0][1])] and "not an image" in bad[0][1]
    assert len(ok) == 9 and str(tmp_path / "f" / "bad.jpg") not in ok


# ----------------------------------------------------------------------------- bad images
def _plant_bad(root: Path) -> list[str]:
    corrupt = root / "cat" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 garbage that is not a jpeg")
    empty = root / "dog" / "empty.png"
    empty.write_bytes(b"")
    good = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    good.save(root / "fox" / "full.jpg")
    truncated = root / "fox" / "truncated.jpg"
    truncated.write_bytes((root / "fox" / "full.jpg").read_bytes()[:200])
    return sorted(str(p) for p in (corrupt, empty, truncated))


def test_bad_images_are_skipped_and_listed(image_folder):
    bad = _plant_bad(image_folder)
    ds = data.make_datasets(cfg_for(image_folder, on_bad_image="skip"), seed=0)
    assert sorted(p for p, _ in ds.skipped) == bad
    reasons = dict(ds.skipped)
    assert "0 bytes" in reasons[str(image_folder / "dog" / "empty.png")]
    assert all(reasons.values())
    listed = {p for fl in ds.files.values() for p, _ in fl}
    assert not listed & set(bad) and len(listed) == 31   # 30 good + full.jpg
    n = sum(len(labels_of(getattr(ds, s))) for s in ("train", "val", "test"))
    assert n == 31   # iterating never raises


def test_bad_images_stop_names_the_paths(image_folder):
    bad = _plant_bad(image_folder)
    with pytest.raises(data.DataError) as e:
        data.make_datasets(cfg_for(image_folder, on_bad_image="stop"), seed=0)
    for p in bad:
        assert p in str(e.value)
    assert "on_bad_image" in str(e.value)


# ----------------------------------------------------------------------------- bad input
def test_missing_root(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.make_datasets(cfg_for(tmp_path / "nope"))
    with pytest.raises(data.DataError, match="data.root is not set"):
        data.make_datasets(DataConfig())


def test_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no class folders") as e:
        data.make_datasets(cfg_for(tmp_path / "empty"))
    assert "single ROOT/<class>/" in str(e.value)


def test_empty_class_folder(image_folder):
    (image_folder / "owl").mkdir()
    (image_folder / "owl" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match=r"class folder .*owl has no images"):
        data.make_datasets(cfg_for(image_folder))


def test_class_only_in_some_splits(tmp_path):
    root = make_folder(tmp_path / "d", "inat")
    shutil.rmtree(root / "val" / "fox")
    with pytest.raises(data.DataError) as e:
        data.make_datasets(cfg_for(root))
    msg = str(e.value)
    assert "'fox'" in msg and "['train']" in msg and "['val']" in msg


def test_missing_split(tmp_path):
    root = make_folder(tmp_path / "d", "sketch")
    shutil.rmtree(root / "test_set")
    with pytest.raises(data.DataError, match=r"missing split folder\(s\) \['test_set'\]"):
        data.make_datasets(cfg_for(root, layout="sketch"))
    with pytest.raises(data.DataError, match="missing split"):
        data.make_datasets(cfg_for(root))   # auto still says sketch, and what is missing


def test_ambiguous_layout(tmp_path):
    root = make_folder(tmp_path / "d", "single", classes=("train", "cat"), per_class=3)
    with pytest.raises(data.DataError) as e:
        data.make_datasets(cfg_for(root))
    assert "cannot tell the layout" in str(e.value) and "['cat', 'train']" in str(e.value)
    assert "sketch" in str(e.value) and "inat" in str(e.value)


def test_too_few_images_for_stratified_split(tmp_path):
    root = make_folder(tmp_path / "d", "single", per_class=2)
    with pytest.raises(data.DataError) as e:
        data.make_datasets(cfg_for(root))
    assert "'cat' has 2 usable image(s)" in str(e.value) and "needs at least 3" in str(e.value)
    ds = data.make_datasets(cfg_for(root, test_fraction=0.0), seed=0)   # 2 = 1 train + 1 val
    assert ds.test is None and ds.counts["val"] == {"cat": 1, "dog": 1, "fox": 1}


# ----------------------------------------------------------------------------- tfds
def test_tfds_mock_gives_batches_and_builder_classes():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=24):
        cfg = DataConfig(source="tfds", name="beans", image_size=(32, 32), batch_size=5,
                         download=False, test_split="test", augment=AugmentConfig(rotation=10))
        ds = data.make_datasets(cfg, seed=0)
        assert ds.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
        assert sum(ds.counts["train"].values()) + sum(ds.counts["val"].values()) == 24
        assert sum(ds.counts["test"].values()) == 24
        for split, n in (("train", sum(ds.counts["train"].values())), ("test", 24)):
            batches = list(getattr(ds, split))
            assert [int(y.shape[0]) for _, y in batches][0] == 5
            assert sum(int(y.shape[0]) for _, y in batches) == n
            x, y = batches[0]
            assert x.dtype.name == "float32" and x.shape[1:] == (32, 32, 3) and y.dtype.name == "int32"
        assert labels_of(ds.val) == [y for _, y in ds.files["val"]]


def test_tfds_caches_are_keyed_by_the_data_set_and_reused_within_a_process(tmp_path, monkeypatch):
    """Two tfds data sets with the same split sizes never share a disk cache (cifar10 and
    cifar100 both have 50,000 + 10,000 images); the same one built again in this process (tune
    trials, compare runs) is not decoded again."""
    import tensorflow_datasets as tfds
    from kfine import pipeline
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "cache"))
    pipeline._RECENT.clear()

    def build(name):
        cfg = DataConfig(source="tfds", name=name, image_size=(32, 32), batch_size=4, download=False,
                         val_fraction=0.0, test_split=None, cache="disk")
        return data.make_datasets(cfg, seed=0)

    with tfds.testing.mock_data(num_examples=12):
        before = pipeline.BUILT["decoded"]
        beans = build("beans")
        decoded = pipeline.BUILT["decoded"]
        again = build("beans")
        after_again = pipeline.BUILT["decoded"]
        flowers = build("tf_flowers")
    assert beans.files["train"][0][0].startswith("tfds:beans/") and decoded == before + 12
    assert again.cache.source == "reused from this process" and after_again == decoded
    assert flowers.cache.path != beans.cache.path and pipeline.BUILT["decoded"] == decoded + 12
    assert len(list((tmp_path / "cache" / "images").iterdir())) == 2


def test_tfds_missing_without_download_says_where(tmp_path):
    cfg = DataConfig(source="tfds", name="beans", download=False, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(data.DataError) as e:
        data.make_datasets(cfg)
    assert str(tmp_path / "tfds") in str(e.value) and "download: true" in str(e.value)


# ----------------------------------------------------------------------------- audit
def _audit_folder(tmp_path) -> tuple[Path, dict]:
    root = make_folder(tmp_path / "d", "sketch", per_class=6)
    shutil.copy(root / "train_set" / "cat" / "000.png", root / "train_set" / "cat" / "dup.png")
    shutil.copy(root / "train_set" / "dog" / "001.png", root / "test_set" / "dog" / "leak.png")
    (root / "train_set" / "fox" / "notes.txt").write_text("not an image")
    (root / "val_set" / "dog" / "broken.jpg").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_image(root / "train_set" / "fox" / "small.png", np.random.default_rng(1), size=(10, 12))
    planted = {"dup": [str(root / "train_set" / "cat" / n) for n in ("000.png", "dup.png")],
               "leak": sorted([str(root / "test_set" / "dog" / "leak.png"), str(root / "train_set" / "dog" / "001.png")]),
               "non_image": [str(root / "train_set" / "fox" / "notes.txt")],
               "broken": str(root / "val_set" / "dog" / "broken.jpg"),
               "small": str(root / "train_set" / "fox" / "small.png")}
    return root, planted


def test_check_data_finds_exactly_the_planted_problems(tmp_path):
    root, planted = _audit_folder(tmp_path)
    report = data.check_data(cfg_for(root), image_size=(32, 32))
    json.dumps(report)   # JSON-able
    assert report["layout"] == "sketch" and report["class_names"] == ["cat", "dog", "fox"]
    assert report["counts"]["train"] == {"cat": 7, "dog": 6, "fox": 7}
    assert [d["paths"] for d in report["duplicates"]] == [planted["dup"]]
    assert [sorted(d["paths"]) for d in report["leakage"]] == [planted["leak"]]
    assert report["leakage"][0]["splits"] == ["test", "train"]
    assert report["non_images"] == planted["non_image"]
    assert [u["path"] for u in report["unreadable"]] == [planted["broken"]]
    assert report["too_small"] == [{"path": planted["small"], "size": [10, 12]}]
    assert report["too_few"] == []
    text = audit.format_check(report)
    assert "LEAKAGE" in text and planted["leak"][0] in text and planted["broken"] in text


def test_check_data_imbalance_and_too_few(tmp_path):
    root = make_folder(tmp_path / "d", "single", classes=("a", "b"), per_class=20)
    for p in sorted((root / "b").iterdir())[2:]:
        p.unlink()
    report = data.check_data(cfg_for(root))
    assert report["too_few"] == [{"class": "b", "split": "all", "images": 2, "needed": 3}]
    assert any("imbalance" in w for w in report["warnings"])


def test_plot_samples_writes_a_png(image_folder, tmp_path):
    files = [(str(p), 0) for p in sorted((image_folder / "cat").iterdir())]
    from kfine.plots import plot_samples
    out = plot_samples(files, "cat", tmp_path / "plots" / "samples_cat.png", n=4, seed=0)
    raw = Path(out).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1000
    with Image.open(out) as im:
        assert im.size[0] > 100


# ----------------------------------------------------------------------------- digits
def test_digits_written_once_and_used_as_single_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "cache"))
    root = Path(sources.ensure_digits())
    assert root == tmp_path / "cache" / "digits"
    assert sorted(d.name for d in root.iterdir()) == [str(i) for i in range(10)]
    files = list(root.rglob("*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    mtime = files[0].stat().st_mtime_ns
    assert sources.ensure_digits() == str(root) and files[0].stat().st_mtime_ns == mtime   # idempotent
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".digits-")]      # no temp left
    ds = data.make_datasets(DataConfig(source="digits", image_size=(16, 16), augment=NO_AUG), seed=0)
    assert ds.class_names == [str(i) for i in range(10)]
    assert sum(sum(c.values()) for c in ds.counts.values()) == 1797


# ----------------------------------------------------------------------------- CLI and configs
def test_cli_check_reports_leakage(tmp_path, capsys):
    root, planted = _audit_folder(tmp_path)
    out = tmp_path / "audit"
    assert data.main(["check", str(root), "--out", str(out), "--samples", "4", "--class", "dog"]) == 0
    stdout = capsys.readouterr().out
    assert "LEAKAGE" in stdout and planted["leak"][0] in stdout
    report = json.loads((out / "data_check.json").read_text())
    assert len(report["leakage"]) == 1
    assert (out / "plots" / "samples_dog.png").stat().st_size > 1000


def test_cli_bad_root_exits_2_with_the_message(tmp_path, capsys):
    assert data.main(["check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tf_flowers", "imagenet_sketch"])
def test_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.data.source == "tfds" and cfg.data.name == name
    assert (REPO / "configs" / f"{name}.yaml").read_text().startswith("#")
    assert f"python -m kfine.train --config configs/{name}.yaml" in (REPO / "configs" / f"{name}.yaml").read_text()


def test_class_with_only_unreadable_images(image_folder):
    owl = image_folder / "owl"
    owl.mkdir()
    (owl / "a.jpg").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"owl has no readable images"):
        data.make_datasets(cfg_for(image_folder), seed=0)


def test_huge_image_decodes_and_resizes(tmp_path):
    """A 6000x4000 photo-sized image goes through the same decode+resize as any other."""
    from PIL import Image
    from kfine.pipeline import load_images
    arr = np.zeros((4000, 6000, 3), np.uint8)
    arr[:, 3000:] = 255
    p = tmp_path / "huge.jpg"
    Image.fromarray(arr).save(p, quality=80)
    images, _, bad = load_images([str(p)], (32, 48))
    img = images[0]
    assert not bad and img.shape == (32, 48, 3) and img.dtype == np.uint8
    assert img[:, :20].mean() < 10 and img[:, 28:].mean() > 245   # left dark, right bright


# ----------------------------------------------------------------------------- cache housekeeping
def test_clean_cache_removes_dead_builds_and_reports_what_the_caches_take(tmp_path, monkeypatch, capsys):
    """``python -m kfine.data clean-cache``: the temporary folders of builds whose process died
    go (with their size), live ones stay, and each cache under the root is listed with its size."""
    from test_pipeline import _fake_build, stale_and_live_builds
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "kf"))   # the default root: $KFINE_CACHE/images
    root = tmp_path / "kf" / "images"
    stale, live = stale_and_live_builds(root)
    cache = _fake_build(root / "0123456789abcdef0123", 2_000_000)
    assert data.main(["clean-cache"]) == 0
    out = capsys.readouterr().out
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in live) and cache.exists()
    assert "removed 2 temporary folder(s) left by stopped cache builds (3 MB)" in out
    assert f"{stale[0].name}  3 MB" in out and f"1 image cache(s) in {root}: 2 MB" in out
    assert f"{cache.name}  2 MB" in out and all(p.name in out for p in live)
    assert data.main(["clean-cache", "--cache-dir", str(tmp_path / "none")]) == 0   # no root yet: nothing to do
    assert "removed 0 temporary folder(s)" in capsys.readouterr().out


def test_a_search_holds_one_image_cache_at_a_time(tmp_path, monkeypatch):
    """kfine.tune's data sets: those over the same image cache (other batch size, augmentation)
    are kept together; one over another cache (another image size) replaces them, and they are
    let go BEFORE it decodes."""
    from kfine import tune
    root = make_folder(tmp_path / "d", "single", per_class=6)
    cfg = load_config(None, [f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8",
                             "data.augment.enabled=false"])
    held_at_build = []
    real = data.make_datasets

    def make_datasets(*args, **kwargs):
        held_at_build.append(len(tune._DATA_CACHE))   # data sets still held when this one decodes
        return real(*args, **kwargs)
    monkeypatch.setattr(data, "make_datasets", make_datasets)
    monkeypatch.setattr(tune, "_DATA_CACHE", {})
    a = tune.trial_datasets(cfg)
    b = tune.trial_datasets(replace_cfg(cfg, "data.batch_size=4"))
    assert b is not a and b.cache is a.cache and list(tune._DATA_CACHE.values()) == [a, b]
    c = tune.trial_datasets(replace_cfg(cfg, "data.image_size=[24,24]"))
    assert c.cache is not a.cache and list(tune._DATA_CACHE.values()) == [c]
    assert held_at_build == [0, 1, 0]
    assert tune.trial_datasets(replace_cfg(cfg, "data.image_size=[24,24]")) is c


def replace_cfg(cfg, override):
    from kfine.config import replace as config_replace
    return config_replace(cfg, [override])


def test_tfds_jpeg_images_are_decoded_as_the_exported_model_decodes_them(tmp_path):
    """tfds stores dmlab's images as 360x480 JPEG bytes: kfine decodes those bytes itself (at
    libjpeg's DCT scale, as for files), so evaluation's pixels and probabilities for a test
    image equal the exported SavedModel's serving_default on that image's bytes."""
    import keras
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from kfine.evaluate import evaluate_model
    from kfine.export import export_model, transform_of
    from kfine.pipeline import eval_image
    cfg = DataConfig(source="tfds", name="dmlab", image_size=(32, 32), batch_size=4, download=False,
                     val_fraction=0.0, test_split="test")
    with tfds.testing.mock_data(num_examples=6):
        ds = data.make_datasets(cfg, seed=0)
        stored, _ = tfds.load("dmlab", split="test", decoders={"image": tfds.decode.SkipDecoding()}, with_info=True)
        blobs = [ex["image"] for ex in stored.as_numpy_iterator()]
    assert [k for k, _ in ds.files["test"]] == [f"tfds:dmlab/2.0.1/test[{i}]" for i in range(6)]
    assert all(b[:2] == b"\xff\xd8" for b in blobs)                      # JPEG bytes
    seen = np.stack([x for x, _ in ds.dataset("test", batch=False).as_numpy_iterator()])
    served = np.stack([eval_image(tf.constant(b), cfg.image_size, cfg.cache_size, cfg.eval_transform).numpy()
                       for b in blobs])
    np.testing.assert_array_equal(seen, served)                           # the very pixels
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0), keras.layers.Flatten(),
                              keras.layers.Dense(6, kernel_initializer=keras.initializers.RandomNormal(0, 0.05)),
                              keras.layers.Softmax()])
    _, probs, labels = evaluate_model(model, ds.test, ds.class_names)
    assert labels.tolist() == [y for _, y in ds.files["test"]] and probs.std(axis=1).min() > 1e-3   # not uniform
    export_model(model, ds.class_names, cfg.image_size, tmp_path / "export", transform=transform_of(cfg))
    serve = tf.saved_model.load(str(tmp_path / "export" / "saved_model" / "1")).signatures["serving_default"]
    out = serve(image_bytes=tf.constant(blobs))
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, rtol=0, atol=1e-6)


def test_tfds_images_are_decoded_by_kfine_only_where_tfds_stores_bytes():
    import tensorflow_datasets as tfds
    f = tfds.features
    assert data._tfds_encoded(f.Image()) and data._tfds_encoded(f.Image(encoding_format="jpeg"))
    assert not data._tfds_encoded(f.Image(shape=(None, None, 1), dtype=np.float32))   # bitcast floats
    assert data._tfds_encoded(f.Image(shape=(None, None, 1), dtype=np.uint16))        # 16-bit PNG bytes
    assert not data._tfds_encoded(f.Tensor(shape=(8, 8, 3), dtype=np.uint8))          # a raw array
