"""Predict classes of unlabelled images with a trained run.

    python -m kfine.predict --run runs/NAME --images DIR_OR_FILES... [--out predictions.csv]
                            [--batch-size 32] [--top-k 5] [--tta flip|flip+crops] [--explain]

Folders are searched for image files (kfine.data.list_images); files named on the command line
are used as given. The CSV (the VLG-50 submission file) has: file, predicted_class, confidence,
top1_class, top1_score, ..., topK_class, topK_score, error. An image that cannot be decoded is
not fatal: it is reported on stderr and gets a row with only file and error. ``--tta`` averages
the probabilities over views of each image (kfine.evaluate.TTA_MODES: the image and its mirror, or
also its four corner crops: 10 views). ``--explain`` also writes a Grad-CAM overlay (kfine.explain)
of each readable image for its predicted class into ``<out stem>_heatmaps/`` beside the CSV.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from kfine.evaluate import TTA_MODES, predict_views, prediction_rows
from kfine.rundir import missing_run_file, read_json, write_csv


def predict_files(model, paths, class_names, image_size, batch_size: int = 32, top_k: int = 5,
                  verbose: int = 1, transform: dict | None = None, tta: str | None = None):
    """Classify image files in batches (probabilities averaged over the ``tta`` views, when
    given). Returns (rows, bad).

    rows: one dict per readable image, in the order given (file, predicted_class, confidence,
    top1_class, top1_score, ...); bad: [(path, reason)] for images that could not be decoded or
    are above the pixel limit. ``transform``: the run's eval transform (``run_transform``), the
    one evaluation and the exported model use.
    """
    import time

    import keras

    from kfine.callbacks import fit_verbosity
    from kfine.pipeline import load_images

    paths = [str(p) for p in paths]
    rows, bad = [], []
    # Keras' bar (it writes terminal codes) on a terminal only; into a pipe or a file, plain lines
    bar = keras.utils.Progbar(len(paths), unit_name="image") if fit_verbosity(verbose) and paths else None
    plain = bool(verbose and paths and bar is None)
    if plain:
        print(f"kfine: predicting {len(paths)} images ...", flush=True)
    t = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images, ok_paths, chunk_bad = load_images(chunk, tuple(image_size), **(transform or {}))
        bad.extend(chunk_bad)
        if len(ok_paths):
            plain_probs, averaged = predict_views(model, np.asarray(images, dtype=np.float32), tta)
            probs = plain_probs if averaged is None else averaged
            rows.extend(prediction_rows(probs, class_names, files=[str(p) for p in ok_paths], top_k=top_k))
        if bar is not None:
            bar.update(start + len(chunk))
    if plain:
        print(f"kfine: predicted {len(paths)} images in {time.perf_counter() - t:.1f} s", flush=True)
    return rows, [(str(p), str(why)) for p, why in bad]


def collect_paths(items) -> list[str]:
    """Folders -> their image files (sorted); files -> themselves, whatever their extension;
    missing -> FileNotFoundError. Duplicates are dropped."""
    from kfine.sources import list_images

    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(str(f) for f in list_images(p))
        elif p.exists():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p} does not exist (give image files or folders of images)")
    return list(dict.fromkeys(out))   # a file named twice (or inside a named folder) is predicted once


def csv_columns(top_k: int, num_classes: int) -> list[str]:
    k = min(top_k, num_classes)
    cols = ["file", "predicted_class", "confidence"]
    for r in range(1, k + 1):
        cols += [f"top{r}_class", f"top{r}_score"]
    return cols + ["error"]


def load_run_model(run_dir):
    """(model, class_names, image_size) of a finished run."""
    import keras

    import kfine.model  # noqa: F401  (registers the custom layers)

    run_dir = Path(run_dir)
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    class_names = read_json(run_dir / "class_names.json")
    shape = model.input_shape
    if shape[1] is not None and shape[2] is not None:
        image_size = (int(shape[1]), int(shape[2]))
    else:
        from kfine.config import load_config
        image_size = tuple(load_config(run_dir / "config.yaml").data.image_size)
    return model, class_names, image_size


def run_transform(run_dir) -> dict:
    """The eval transform of a run (cache size, eval transform, pixel limit) from its config."""
    from kfine.config import load_config
    from kfine.export import transform_of
    return transform_of(load_config(Path(run_dir) / "config.yaml").data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.predict", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run directory (model.keras, class_names.json)")
    ap.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    ap.add_argument("--out", default="predictions.csv", help="CSV to write (default: ./predictions.csv)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--tta", choices=sorted(TTA_MODES), default=None,
                    help="average over flip (2 views) or flip+crops (10 views)")
    ap.add_argument("--explain", action="store_true",
                    help="also write a Grad-CAM heatmap overlay per image into <out stem>_heatmaps/")
    args = ap.parse_args(argv)
    from kfine import cli
    return cli.run_command(lambda: _main(args))


def _main(args) -> None:
    run = Path(args.run)
    missing = missing_run_file(run, ("model.keras", "class_names.json"))
    if missing:
        raise FileNotFoundError(missing)
    if args.batch_size < 1 or args.top_k < 1:
        raise ValueError(f"--batch-size and --top-k must be >= 1. Received: --batch-size {args.batch_size} "
                         f"--top-k {args.top_k}")
    if (run / "config.yaml").is_file():   # the run's config, checked as every entry point does
        from kfine.checks import check_config
        from kfine.config import load_config
        check_config(load_config(run / "config.yaml"))
    paths = collect_paths(args.images)
    if not paths:
        raise FileNotFoundError(f"no image files found in {args.images}")
    model, class_names, image_size = load_run_model(run)
    rows, bad = predict_files(model, paths, class_names, image_size, args.batch_size, args.top_k,
                              transform=run_transform(run) if (run / "config.yaml").exists() else None, tta=args.tta)
    for p, why in bad:
        print(f"kfine.predict: unreadable image {p}: {why}", file=sys.stderr)
    rows = rows + [{"file": p, "error": why} for p, why in bad]
    write_csv(args.out, rows, csv_columns(args.top_k, len(class_names)))
    print(f"kfine: wrote {len(rows) - len(bad)} predictions to {args.out}"
          + (f" ({len(bad)} unreadable images listed with an error)" if bad else ""), flush=True)
    if args.explain:
        write_explanations(model, paths, image_size, run, Path(args.out))


def write_explanations(model, paths, image_size, run: Path, out_csv: Path) -> None:
    """--explain: Grad-CAM overlays (kfine.explain) of the predicted class, one PNG per readable
    image, in a folder beside the CSV named after it (predictions.csv -> predictions_heatmaps/)."""
    from kfine.explain import explain_files
    folder = out_csv.with_name(f"{out_csv.stem}_heatmaps")
    written = explain_files(model, paths, image_size, folder,
                            transform=run_transform(run) if (run / "config.yaml").exists() else None)
    print(f"kfine: wrote {len(written)} heatmap overlays to {folder}/", flush=True)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
