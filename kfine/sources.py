"""Where images come from, and which split each one belongs to: the file index.

    folder (three layouts) | tensorflow-datasets | the digits demo
      -> file index: one entry per image (path, label, split) plus what a scan of the file gave
         (bytes, content hash, header size), saved in a run as splits.csv

Folder layouts (``data.layout``):
    sketch  ROOT/{train_set,val_set,test_set}/<class>/       (ImageNet-Sketch project)
    inat    ROOT/{train,val}/<class>/  val = held-out TEST; validation = stratified share of train
    single  ROOT/<class>/  split into train/val/test by stratified fractions
    auto    detected from the folder names

The scan reads every file once, in threads: its SHA1 (duplicates, leakage, splits.csv) and its
image header (height and width, without decoding), so an image above ``data.max_pixels`` is
refused by path before anything decodes it (a 1 MB PNG can claim 100000x100000 pixels). Symlinks
that do not resolve, and symlink loops, are bad files named by path, not silently skipped.

splits.csv (one row per image: path relative to the data root, split, label, bytes, sha1, height,
width) is what evaluate, --resume, tune trials and best.yaml runs read instead of re-deriving a
split from the seed: a file added to a class later never moves a trained image into the test set.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
LAYOUTS = {"sketch": ("train_set", "val_set", "test_set"), "inat": ("train", "val"), "single": ()}
# physical folder -> split it feeds ("inat" val is the held-out test set)
SPLIT_OF = {"train_set": "train", "val_set": "val", "test_set": "test", "train": "train", "val": "test"}
LAYOUT_HELP = ("expected one of: sketch ROOT/{train_set,val_set,test_set}/<class>/, "
               "inat ROOT/{train,val}/<class>/, single ROOT/<class>/")
SPLITS_COLUMNS = ("path", "split", "label", "bytes", "sha1", "height", "width")


class DataError(ValueError):
    """Bad input that stops before training; the message names the problem and the fix."""


class BadImageError(DataError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class FileInfo:
    """What the scan learnt about one file without decoding it."""
    bytes: int
    sha1: str
    height: int
    width: int


@dataclass
class FileIndex:
    """Every image of a data source, its split and label, and what the scan found.

    ``files[split]`` lists (path, label) in a fixed order (class by class; the pipeline permutes
    the whole training list every epoch). ``info`` has a FileInfo per scanned path, ``bad`` the
    files refused before decoding (path -> reason), ``notes`` what changed since a saved split."""
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]
    root: str | None = None
    layout: str | None = None
    info: dict[str, FileInfo] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    non_images: list[str] = field(default_factory=list)
    too_few: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [p for s in SPLITS for p, _ in self.files.get(s, [])]

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: count_labels(self.files[s], self.class_names) for s in SPLITS if self.files.get(s)}


def count_labels(files, class_names) -> dict[str, int]:
    c = Counter(y for _, y in files)
    return {name: c.get(i, 0) for i, name in enumerate(class_names)}


# ----------------------------------------------------------------------------- listing
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _broken_link(path: Path) -> str | None:
    """Why a symlink cannot be followed (dangling or a loop), or None for anything else."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "symlink loop"
    except OSError:
        return f"dangling symlink (points to {os.readlink(path)}, which does not exist)"
    return None


def _walk(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """(files under ``folder``, sorted; {path: reason} for symlinks that do not resolve)."""
    files, broken = [], {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            p = Path(dirpath) / name
            why = _broken_link(p)
            if why:
                broken[str(p)] = why
            elif p.is_file():
                files.append(p)
    return sorted(files), broken


def list_images(root) -> list[str]:
    """Every image file under ``root`` (recursive, sorted)."""
    files, _ = _walk(Path(root))
    return [str(p) for p in files if _is_image(p)]


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


def find_folder(root, layout: str = "auto"):
    """Walk a dataset folder: (layout, {folder split: {class: [image paths]}}, [non-image files],
    {broken symlink: reason}).

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
    tree, non_images, broken = {}, [], {}
    for f in folders:
        classes = _class_dirs(root / f)
        if not classes:
            raise DataError(f"{root / f} has no class folders; put images in {root / f}/<class>/ "
                            "(see docs/troubleshooting.md#data-folder-errors)")
        tree[f] = {}
        for d in classes:
            files, links = _walk(d)
            broken.update(links)
            images = [str(p) for p in files if _is_image(p)] + sorted(p for p in links if _is_image(Path(p)))
            non_images += [str(p) for p in files if not _is_image(p)]
            if not images:
                raise DataError(f"class folder {d} has no images ({', '.join(IMAGE_EXTS)}); "
                                "add images or remove the folder (see docs/troubleshooting.md#data-folder-errors)")
            tree[f][d.name] = sorted(images)
    all_classes = sorted(set().union(*[set(c) for c in tree.values()]))
    if len(all_classes) < 2:
        raise DataError(f"{root} has one class folder ({', '.join(all_classes)}); a classifier needs at least 2: "
                        f"put each class's images in its own folder, {root}/<class>/ "
                        "(see docs/troubleshooting.md#data-folder-errors)")
    for cls in all_classes:
        lacking = [f for f in folders if cls not in tree[f]]
        if lacking:
            having = [f for f in folders if cls in tree[f]]
            raise DataError(f"class {cls!r} is in split(s) {having} but not in {lacking} under {root}; "
                            f"every split needs the same class folders: add {root}/{lacking[0]}/{cls}/ "
                            "or remove the class everywhere")
    return layout, tree, non_images, broken


# ----------------------------------------------------------------------------- scanning
def _header_size(data: bytes) -> tuple[int, int] | str | None:
    """(height, width) from the image header alone; None if PIL does not know the format; a
    reason string for an image past PIL's own decompression-bomb limit (~179 megapixels)."""
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # kfine has its own limit
            with Image.open(io.BytesIO(data)) as im:   # reads the header only; no pixel is decoded
                w, h = im.size
                return int(h), int(w)
    except Image.DecompressionBombError as e:
        return f"too large: {e}; it was not decoded"
    except Exception:  # noqa: BLE001 - PIL raises many types for "not an image I know"
        return None


# Scan results by (path, size, mtime): FileInfo, or a reason string for a file refused unread.
_SCANNED: dict[tuple, FileInfo | str] = {}


def _scan_one(path: str, max_pixels: int | None) -> FileInfo | str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return _broken_link(Path(path)) or f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"
    hw = _header_size(data)
    if isinstance(hw, str):
        return hw
    if hw and max_pixels and hw[0] * hw[1] > max_pixels:
        return (f"too large: {hw[1]}x{hw[0]} = {hw[0] * hw[1] / 1e6:.0f} megapixels, above "
                f"data.max_pixels ({max_pixels / 1e6:g} megapixels); it was not decoded")
    h, w = hw or (0, 0)   # 0: header unknown to PIL; the decoder decides
    return FileInfo(len(data), hashlib.sha1(data).hexdigest(), h, w)


def scan_files(paths: list[str], max_pixels: int | None = None, workers: int | None = None
               ) -> dict[str, FileInfo | str]:
    """path -> FileInfo, or the reason the file is refused before decoding (unreadable, empty,
    a broken symlink, above ``max_pixels``). Threads: reading and hashing release the GIL."""
    def key(p):
        try:
            st = os.stat(p)
        except OSError:   # broken link, vanished file: scanned each time (and reported)
            return (p, None)
        return (p, st.st_size, st.st_mtime_ns, max_pixels)

    keys = {p: key(p) for p in paths}
    todo = [p for p in paths if keys[p][1] is None or keys[p] not in _SCANNED]
    if todo:
        with ThreadPoolExecutor(workers or min(16, 2 * (os.cpu_count() or 2))) as pool:
            for p, res in zip(todo, pool.map(lambda q: _scan_one(q, max_pixels), todo)):
                _SCANNED[keys[p]] = res
    return {p: _SCANNED[keys[p]] for p in paths}


# ----------------------------------------------------------------------------- splitting
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


def split_files(layout: str, tree: dict, cfg, seed: int, strict: bool = True):
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


def folder_root(cfg) -> tuple[str, str]:
    """(root, layout) of a folder-like source (the digits demo is a single-layout folder)."""
    if cfg.source == "digits":
        return ensure_digits(), "single"
    return cfg.root, cfg.layout


def index_folder(cfg, seed: int, strict: bool = True, saved=None, decode=None) -> FileIndex:
    """The file index of a folder source: list, scan (hash + header), decode, split.

    ``decode(paths, info) -> {path: reason}`` is the decode pass (kfine.pipeline.build_cache: it
    fills the image cache as it goes); files it or the scan refuse are in ``bad`` and in no split,
    and the split is drawn over the good ones. With ``saved`` (a splits.csv) the split comes from
    that file (``read_splits``)."""
    root, layout = folder_root(cfg)
    if saved is not None:
        index = read_splits(saved, root, cfg)
        if decode is not None:
            index.bad.update(decode([p for p in index.paths() if p not in index.bad], index.info))
            index.files = {s: [(p, y) for p, y in fl if p not in index.bad] for s, fl in index.files.items()}
        return index
    layout, tree, non_images, broken = find_folder(root, layout)
    if cfg.limit_per_class is not None:   # capped first: a quick run scans and decodes only what it uses
        rng = np.random.default_rng(seed)
        capped = {f: {c: _cap(ps, cfg.limit_per_class, rng) for c, ps in classes.items()} for f, classes in tree.items()}
        left_out = {p for f, classes in tree.items() for c, ps in classes.items() for p in set(ps) - set(capped[f][c])}
        tree, broken = capped, {p: r for p, r in broken.items() if p not in left_out}
    paths = [p for classes in tree.values() for ps in classes.values() for p in ps]
    scanned = scan_files(paths, cfg.max_pixels)
    info = {p: r for p, r in scanned.items() if isinstance(r, FileInfo)}
    bad = {p: r for p, r in scanned.items() if isinstance(r, str)}
    for p, r in broken.items():   # links without an image suffix were not scanned
        bad.setdefault(p, r)
    if decode is not None:
        bad.update(decode([p for p in paths if p not in bad], info))
    good = {f: {c: [p for p in ps if p not in bad] for c, ps in classes.items()} for f, classes in tree.items()}
    if strict:
        for f, classes in good.items():
            for c, ps in classes.items():
                if not ps:
                    raise DataError(f"class folder {Path(root) / f / c} has no readable images (every file in it "
                                    "failed to decode); add images or remove the folder")
    class_names, files, too_few = split_files(layout, good, cfg, seed, strict=strict)
    return FileIndex(class_names, files, str(root), layout, info, bad, non_images, too_few)


# ----------------------------------------------------------------------------- splits.csv
def write_splits(index: FileIndex, path) -> None:
    """splits.csv: one row per image of the index (paths relative to the data root)."""
    from kfine.rundir import atomic_write_text
    root = Path(index.root) if index.root else None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SPLITS_COLUMNS)
    for split in SPLITS:
        for p, label in index.files.get(split, []):
            info = index.info.get(p)
            rel = os.path.relpath(p, root) if root and not p.startswith("tfds:") else p
            w.writerow([Path(rel).as_posix(), split, index.class_names[label],
                        *((info.bytes, info.sha1, info.height, info.width) if info else ("", "", "", ""))])
    atomic_write_text(path, buf.getvalue())


def read_splits(path, root, cfg) -> FileIndex:
    """The file index saved in ``path`` (splits.csv), checked against the folder as it is now.

    Files that no longer exist are dropped, modified ones (other bytes) are used and named,
    files added since are not used: each is said in ``notes`` (the caller prints them).
    Class names are the saved ones, in their saved order (class_names.json beside the file)."""
    from kfine.rundir import read_json
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; it holds the split of a run (data.splits)")
    names_file = path.with_name("class_names.json")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(SPLITS_COLUMNS) - set(rows[0]):
        raise DataError(f"{path} is not a kfine splits.csv (columns {list(SPLITS_COLUMNS)})")
    class_names = read_json(names_file) if names_file.is_file() else sorted({r["label"] for r in rows})
    label_of = {c: i for i, c in enumerate(class_names)}
    root = Path(root) if root else None
    files: dict[str, list[tuple[str, int]]] = defaultdict(list)
    saved_info: dict[str, FileInfo] = {}
    for r in rows:
        p = r["path"] if r["path"].startswith("tfds:") or root is None else str(root / r["path"])
        if r["label"] not in label_of:
            raise DataError(f"{path}: label {r['label']!r} is not one of the run's classes {class_names}")
        files[r["split"]].append((p, label_of[r["label"]]))
        if r["sha1"]:
            saved_info[p] = FileInfo(int(r["bytes"]), r["sha1"], int(r["height"]), int(r["width"]))
    index = FileIndex(class_names, dict(files), str(root) if root else None, "saved")
    if root is None:
        return index
    listed = [p for fl in files.values() for p, _ in fl]
    exists = [p for p in listed if os.path.exists(p)]
    gone = sorted(set(listed) - set(exists))
    scanned = scan_files(exists, cfg.max_pixels)
    index.info = {p: r for p, r in scanned.items() if isinstance(r, FileInfo)}
    index.bad = {p: r for p, r in scanned.items() if isinstance(r, str)}
    changed = sorted(p for p, i in index.info.items() if p in saved_info and i.sha1 != saved_info[p].sha1)
    drop = set(gone) | set(index.bad)
    index.files = {s: [(p, y) for p, y in fl if p not in drop] for s, fl in files.items()}
    added = sorted(set(list_images(root)) - set(listed)) if root.is_dir() else []

    def some(ps):
        return ", ".join(ps[:3]) + (f" and {len(ps) - 3} more" if len(ps) > 3 else "")
    if gone:
        index.notes.append(f"{len(gone)} file(s) of the saved split no longer exist and are left out: {some(gone)}")
    if changed:
        index.notes.append(f"{len(changed)} file(s) changed since the split was saved (used as they are now): "
                           f"{some(changed)}")
    if added:
        index.notes.append(f"{len(added)} image(s) added to {root} since the split was saved are not used "
                           f"(start a new run to include them): {some(added)}")
    return index


# ----------------------------------------------------------------------------- digits demo
def ensure_digits(cache_dir=None) -> str:
    """scikit-learn's 1,797 8x8 digits as 32x32 grayscale PNGs in <cache>/digits/<digit>/<i>.png, once."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from kfine.rundir import cache_home
    base = Path(cache_dir) if cache_dir else cache_home()
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
