"""The run directory contract: where every output of a run lives, written atomically.

    runs/<name>/
      config.yaml          the resolved config (kfine.train --config accepts it)
      class_names.json     label index -> class name
      history.csv          one row per finished epoch (epoch, phase, lr, metrics)
      phases.json          per phase: start epoch, freeze spec, trainable summary
      data_check.json      the data audit (counts, bad files, duplicates, leakage)
      skipped_files.txt    images that could not be decoded and were skipped
      checkpoints/         epoch_XXXX.keras every N epochs, best.keras (+ best.json)
      backup/              state for --resume (model, optimizer, epoch)
      tensorboard/         TensorBoard logs
      plots/*.png          curves, confusion matrix, samples, predictions grid
      metrics.json         evaluation of the final model
      predictions.csv      per test image: file, true, predicted, confidence, top-k
      report.html          everything above on one page
      model.keras          the final model
      export/              SavedModel (and optional ONNX / .keras) for serving
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def missing_run_file(run_dir: str | os.PathLike, names) -> str | None:
    """The CLI message for the first of ``names`` missing from ``run_dir``, or None if all are there."""
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            return f"{path} not found: is {run_dir} a finished kfine run directory?"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
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
