"""The run directory contract: where every output of a run lives, written atomically.

    runs/<name>/
      config.yaml          the resolved config (kfine.train --config accepts it)
      class_names.json     label index -> class name
      history.csv          one row per finished epoch (epoch, phase, lr, metrics)
      phases.json          per phase: start epoch, freeze spec, trainable summary
      data_check.json      the data audit (counts, bad files, duplicates, leakage)
      skipped_files.txt    images that could not be decoded and were skipped
      checkpoints/         best.keras (+ best.json), epoch_XXXX.keras every N epochs (for inference)
      backup/              state for --resume (weights, optimizer, history: kfine.checkpoint)
      tensorboard/         TensorBoard logs
      plots/*.png          curves, confusion matrix, samples, predictions grid
      metrics.json         evaluation of model.keras (and, as "model", which epoch's weights it holds)
      predictions.csv      per test image: file, true, predicted, confidence, top-k
      report.html          everything above on one page
      model.keras          the trained model: the best epoch's weights (train.restore_best) or the last's
      export/              SavedModel (and optional ONNX / .keras) for serving
      .lock                held by the process that trains in the directory (kfine.checkpoint)

Every file is written beside its final place under a hidden temporary name that carries the
writer's PID (``.NAME.tmpPID``, see ``atomic_path``) and renamed over it, so a reader never sees
half a file; a process killed mid-write leaves only such a temporary, which ``--resume`` removes.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator


def missing_run_file(run_dir: str | os.PathLike, names) -> str | None:
    """The CLI message for the first of ``names`` missing from ``run_dir``, or None if all are there."""
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            return f"{path} not found: is {run_dir} a finished kfine run directory?"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error, removed when it raises. ``suffix`` keeps an extension a writer insists on
    (``.keras``): ``.best.tmp123.keras``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    stem = p.name[: -len(suffix)] if suffix and p.name.endswith(suffix) else p.name
    tmp = p.with_name(f".{stem}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_png(image, path: str | os.PathLike, compress_level: int | None = None) -> Path:
    """A PIL image (or a uint8 array) as a PNG file, written atomically; ``compress_level``: zlib's
    (None: PIL's default; 1 takes about half the time for photos, files ~20% larger)."""
    from PIL import Image
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({} if compress_level is None else {"compress_level": compress_level}))
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows of dicts -> CSV, atomically. Columns: ``columns`` or the union of the rows' keys in
    order; a missing cell is empty. Floats are written with repr, so they read back exactly."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_jsonable) + "\n")


_REQUIRED = object()


def read_json(path: str | os.PathLike, default: Any = _REQUIRED) -> Any:
    """The JSON file at ``path``; ``default`` (when given) where there is no such file."""
    if default is not _REQUIRED and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):          # numpy scalars and arrays
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cache_home() -> Path:
    """The root of kfine's caches, outside any run directory: $KFINE_CACHE, else ~/.cache/kfine
    (decoded images under images/, the digits demo under digits/)."""
    return Path(os.environ.get("KFINE_CACHE") or Path.home() / ".cache" / "kfine")
