"""Evaluate a trained model on a labelled split: metrics.json, predictions.csv, plots, report.

    python -m kfine.evaluate --run runs/NAME [--split test] [--data ROOT] [--tta flip|flip+crops]

``compute_metrics`` is the one place where numbers are computed (from labels and probabilities),
``evaluate_model`` runs a model over a dataset (no files written), ``evaluate_run`` does the whole
step for a run directory. The loss is the plain cross-entropy of the predicted probabilities
(no label smoothing, no class weights, probabilities clipped at 1e-7 so one image adds at most
16.1), so it is comparable across runs; Keras's val_loss, computed from the logits, can be
larger for a model that is confidently wrong.

Test-time augmentation (``--tta``): the model's probabilities are averaged over views of each
image, ``flip`` (the image and its mirror) or ``flip+crops`` (the image and its four corner crops
of 7/8 the side, scaled back up, each with its mirror: 10 views). The TTA figures are written
beside the plain ones (metrics.json: ``<split>.tta``); predictions.csv keeps the plain predictions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from kfine.rundir import missing_run_file, read_json, write_csv, write_json

EPS = 1e-7
GRID_SIZE = 30          # images in the predictions grid


# ----------------------------------------------------------------------------- metrics
def compute_metrics(labels, probs, class_names, files=None, top_k: int = 5,
                    n_confused: int = 10, n_worst: int = 20) -> dict:
    """All evaluation numbers from true labels (N,) and predicted probabilities (N, C).

    Returns a JSON-able dict: n, accuracy, loss, top5_accuracy (only with more than 5 classes:
    with 5 or fewer it is always 1),
    macro / weighted precision-recall-F1, per_class (one dict per class), confusion_matrix
    (rows = true, columns = predicted), most_confused (off-diagonal pairs, most frequent first)
    and highest_loss (the worst images, with their file when ``files`` is given).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    names = [str(c) for c in class_names]
    c = len(names)
    if probs.ndim != 2 or probs.shape != (labels.shape[0], c):
        raise ValueError(f"probs must have shape (N={labels.shape[0]}, classes={c}), got {probs.shape}")
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("nothing to evaluate: the split is empty")
    pred = probs.argmax(axis=1)
    p_true = np.clip(probs[np.arange(n), labels], EPS, 1.0)
    losses = -np.log(p_true)
    out: dict = {"n": n, "num_classes": c,
                 "accuracy": float((pred == labels).mean()),
                 "loss": float(losses.mean())}
    if c > top_k:
        topk = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        out[f"top{top_k}_accuracy"] = float((topk == labels[:, None]).any(axis=1).mean())

    idx = list(range(c))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=idx, zero_division=0)
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(labels, pred, labels=idx, average=avg, zero_division=0)
        out[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    out["per_class"] = [{"class": names[i], "precision": float(p[i]), "recall": float(r[i]),
                         "f1": float(f[i]), "support": int(s[i])} for i in idx]
    cm = confusion_matrix(labels, pred, labels=idx)
    out["confusion_matrix"] = cm.tolist()

    pairs = [(int(cm[t, q]), t, q) for t in idx for q in idx if t != q and cm[t, q] > 0]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    out["most_confused"] = [{"true": names[t], "predicted": names[q], "count": k,
                             "share_of_true": k / max(1, int(cm[t].sum()))}
                            for k, t, q in pairs[:n_confused]]

    worst = np.argsort(-losses, kind="stable")[:n_worst]
    out["highest_loss"] = []
    for i in worst:
        row = {"index": int(i), "true": names[labels[i]], "predicted": names[pred[i]],
               "confidence": float(probs[i, pred[i]]), "loss": float(losses[i])}
        if files is not None:
            row["file"] = str(files[i])
        out["highest_loss"].append(row)
    return out


# ----------------------------------------------------------------------------- test-time augmentation
TTA_CROP = 0.875        # corner crops keep this fraction of each side


def _flip(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _corner_crops(x: np.ndarray) -> list[np.ndarray]:
    """The four corner crops of a batch (N, H, W, C), scaled back to (H, W) (bilinear)."""
    import keras
    h, w = x.shape[1], x.shape[2]
    ch, cw = max(1, round(h * TTA_CROP)), max(1, round(w * TTA_CROP))
    crops = [x[:, :ch, :cw], x[:, :ch, w - cw:], x[:, h - ch:, :cw], x[:, h - ch:, w - cw:]]
    return [np.asarray(keras.ops.convert_to_numpy(keras.ops.image.resize(c, (h, w), interpolation="bilinear")),
                       dtype=x.dtype) for c in crops]


# mode -> the views of a batch; the first view is always the batch itself (the plain prediction)
TTA_MODES = {
    "flip": lambda x: [x, _flip(x)],
    "flip+crops": lambda x: [v for c in [x] + _corner_crops(x) for v in (c, _flip(c))],
}


def tta_views(images, mode: str) -> list[np.ndarray]:
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {sorted(TTA_MODES)}")
    return TTA_MODES[mode](np.asarray(images))


def predict_views(model, images, mode: str | None = None, predict=None):
    """(plain probabilities, probabilities averaged over the ``mode`` views or None). ``predict``:
    batch -> the model's outputs (batch_predictor), by default ``model.predict_on_batch``; the
    softmax of each view's logits first (``as_probabilities``), then the mean of probabilities."""
    from kfine.model import as_probabilities
    predict = predict or model.predict_on_batch

    def probs(x):
        return np.asarray(as_probabilities(model, np.asarray(predict(np.asarray(x)))), dtype=np.float32)
    if mode is None:
        return probs(images), None
    per_view = [probs(v) for v in tta_views(images, mode)]
    return per_view[0], np.mean(per_view, axis=0)


def batch_predictor(model, size: int):
    """batch -> ``model``'s outputs, every batch run at ``size`` images (a last partial batch
    padded, the padding dropped: Keras traces the predict function once). Where the feature cache
    built ``model``'s extractor in this process (kfine.features.model_parts), the batch runs through
    that extractor, whose predict function the feature pass traced already, and the head on its
    features: the same layers and weights as ``model`` in inference mode, so the same outputs."""
    from kfine.features import extractor_of, model_parts, predict_padded
    if extractor_of(model) is None:
        return lambda x: predict_padded(model, x, size)
    extractor, head = model_parts(model)
    return lambda x: predict_padded(head, predict_padded(extractor, x, size), size)


# ----------------------------------------------------------------------------- running a model
def predict_dataset(model, dataset, keep: int = 0, seed: int = 0, tta: str | None = None):
    """Run ``model`` over batches of (images, labels).

    Returns probs (N, C), labels (N,), a uniform random sample of up to ``keep`` images
    (reservoir sampling, so memory stays small) as (indices, uint8 images), and the probabilities
    averaged over the ``tta`` views (N, C) (None without ``tta``).
    """
    rng = np.random.default_rng(seed)
    all_probs, all_labels, all_tta = [], [], []
    sample_idx: list[int] = []
    sample_img: list[np.ndarray] = []
    seen, predict = 0, None
    for batch in dataset:
        x, y = batch[0], batch[1]
        x = np.asarray(x)
        predict = predict or batch_predictor(model, len(x))   # the first batch's size: the dataset's
        probs, tta_probs = predict_views(model, x, tta, predict)
        all_probs.append(probs)
        if tta_probs is not None:
            all_tta.append(tta_probs)
        all_labels.append(np.asarray(y).reshape(-1).astype(np.int64))
        for j in range(x.shape[0] if keep else 0):
            if len(sample_idx) < keep:
                sample_idx.append(seen + j)
                sample_img.append(np.clip(x[j], 0, 255).astype(np.uint8))
            else:
                k = int(rng.integers(0, seen + j + 1))
                if k < keep:
                    sample_idx[k] = seen + j
                    sample_img[k] = np.clip(x[j], 0, 255).astype(np.uint8)
        seen += x.shape[0]
    if not all_probs:
        raise ValueError("nothing to evaluate: the dataset yielded no batches")
    order = np.argsort(sample_idx) if sample_idx else np.zeros(0, int)
    images = np.stack([sample_img[i] for i in order]) if sample_idx else np.zeros((0, 1, 1, 3), np.uint8)
    return (np.concatenate(all_probs), np.concatenate(all_labels),
            (np.asarray(sample_idx, dtype=np.int64)[order], images),
            np.concatenate(all_tta) if all_tta else None)


def _check_files(files, labels):
    """The file list if it lines up with the labels, else None (with a note)."""
    if not files:
        return None
    paths = [f[0] if isinstance(f, (tuple, list)) else f for f in files]
    if len(paths) != len(labels):
        print(f"kfine: {len(paths)} files listed but {len(labels)} images evaluated; "
              f"reporting images by index", file=sys.stderr)
        return None
    if all(isinstance(f, (tuple, list)) for f in files):
        file_labels = np.asarray([f[1] for f in files])
        if not np.array_equal(file_labels, labels):
            print("kfine: the file list's labels do not match the evaluated labels; "
                  "reporting images by index", file=sys.stderr)
            return None
    return [str(p) for p in paths]


def evaluate_model(model, dataset, class_names, files=None, tta: str | None = None):
    """Metrics of ``model`` on a labelled dataset. Pure: writes nothing.

    Returns (metrics, probs (N, C), labels (N,)). ``files``: [(path, label)] or [path] in the
    order the dataset yields its images (then the worst images are named by path). With ``tta``
    the metrics carry a "tta" entry (tta_metrics).
    """
    probs, labels, _, tta_probs = predict_dataset(model, dataset, tta=tta)
    files = _check_files(files, labels)
    metrics = compute_metrics(labels, probs, class_names, files=files)
    if tta:
        metrics["tta"] = tta_metrics(labels, tta_probs, class_names, tta)
    return metrics, probs, labels


def tta_metrics(labels, tta_probs, class_names, mode: str) -> dict:
    """The headline figures of the TTA predictions, for beside the plain ones."""
    m = compute_metrics(labels, tta_probs, class_names)
    views = len(tta_views(np.zeros((1, 2, 2, 3), np.float32), mode))   # how many views the mode has
    return {"mode": mode, "views": views, **{k: m[k] for k in ("accuracy", "loss", "top5_accuracy") if k in m},
            "macro_f1": m["macro"]["f1"]}


# ----------------------------------------------------------------------------- outputs
def prediction_rows(probs, class_names, files=None, labels=None, top_k: int = 5) -> list[dict]:
    """One dict per image: file, [true_class, correct], predicted_class, confidence, top-k."""
    probs = np.asarray(probs)
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for i in range(probs.shape[0]):
        row = {"file": files[i] if files is not None else ""}
        if labels is not None:
            row["true_class"] = class_names[int(labels[i])]
        row["predicted_class"] = class_names[int(top[i, 0])]
        row["confidence"] = f"{probs[i, top[i, 0]]:.6g}"
        if labels is not None:
            row["correct"] = int(top[i, 0] == int(labels[i]))
        for r in range(k):
            row[f"top{r + 1}_class"] = class_names[int(top[i, r])]
            row[f"top{r + 1}_score"] = f"{probs[i, top[i, r]]:.6g}"
        rows.append(row)
    return rows


def write_plots(run_dir: Path, split: str, metrics: dict, class_names, labels, probs, sample) -> list[Path]:
    """Confusion matrix, per-class accuracy and the predictions grid for one split."""
    from kfine import plots
    out_dir = run_dir / "plots"
    cm = np.asarray(metrics["confusion_matrix"])
    paths = [plots.plot_confusion(cm, class_names, out_dir / f"confusion_{split}.png"),
             plots.plot_per_class_accuracy([r["recall"] for r in metrics["per_class"]], class_names,
                                           out_dir / f"per_class_accuracy_{split}.png",
                                           support=[r["support"] for r in metrics["per_class"]])]
    idx, images = sample
    if len(idx):
        pred = np.asarray(probs)[idx].argmax(axis=1)
        paths.append(plots.plot_predictions_grid(images, np.asarray(labels)[idx], pred, class_names,
                                                 out_dir / f"predictions_{split}.png", n=len(idx)))
    hist = run_dir / "history.csv"
    if hist.exists() and not (out_dir / "history.png").exists():
        phases = read_json(run_dir / "phases.json", None)
        paths.append(plots.plot_history(hist, out_dir / "history.png", phases=phases))
    return paths


def eval_views(datasets, split: str):
    """``split``'s eval views in file order (None where the data has no such split): the train
    split's own pipeline draws augmented views in a shuffled order."""
    if split == "train":
        return datasets.dataset("train", train=False, shuffle=False) if datasets.files.get("train") else None
    return getattr(datasets, split, None)


def evaluate_run(run_dir, model=None, datasets=None, split: str = "test", data_root: str | None = None,
                 report: bool = True, tta: str | None = None, predicted: dict | None = None,
                 extra: dict | None = None) -> dict:
    """Evaluate a run on one split; writes metrics.json (merged), predictions.csv, plots, report.
    ``tta`` (flip | flip+crops) adds the test-time-augmented figures as metrics[split]["tta"].
    ``predicted``: a dict that gets the split's "probs" (N, C) and "labels" (N,), for the caller's
    later steps (the heatmaps); ``extra``: top-level entries written into metrics.json with it.

    Loads what it is not given: the model from model.keras, the data from the run's config.yaml
    (``data_root`` overrides data.root). Without a test split it evaluates val, and says so.
    Returns the split's metrics (with a "split" key naming the split evaluated).
    """
    run_dir = Path(run_dir)
    cfg = None
    if datasets is None or model is None:
        from kfine.checks import check_config
        from kfine.config import load_config, replace
        cfg = load_config(run_dir / "config.yaml")
        if data_root is not None:
            cfg = replace(cfg, [f"data.root={data_root}"])
        check_config(cfg)
    if datasets is None:   # the run's own split (splits.csv), not one re-drawn from the seed
        from kfine import data as kdata
        saved = run_dir / "splits.csv"
        datasets = kdata.make_datasets(cfg.data, cfg.seed, splits=saved if saved.exists() else None)
    if model is None:
        import keras
        import kfine.model  # noqa: F401  (registers the custom layers)
        model = keras.saving.load_model(run_dir / "model.keras", compile=False)

    requested = split
    class_names = list(datasets.class_names)
    names_file = run_dir / "class_names.json"
    if names_file.exists() and read_json(names_file) != class_names:
        raise ValueError(f"the data's classes {class_names} differ from the run's {names_file} "
                         f"{read_json(names_file)}: evaluate on data with the same class folders")
    dataset = eval_views(datasets, split)
    if dataset is None and split == "test" and getattr(datasets, "val", None) is not None:
        print("kfine: no test split; evaluating on the validation split instead (its numbers "
              "are optimistic: it was used to pick checkpoints and settings)", flush=True)
        split, dataset = "val", datasets.val
    if dataset is None:
        raise ValueError(f"no {split!r} split in this data to evaluate on")

    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose one of {sorted(TTA_MODES)}")
    from kfine.log import progress
    with progress(f"evaluating on the {split} split" + (f" (+ TTA {tta})" if tta else "")):
        probs, labels, sample, tta_probs = predict_dataset(model, dataset, keep=GRID_SIZE, seed=0, tta=tta)
    if predicted is not None:
        predicted.update(probs=probs, labels=labels)
    files = _check_files((getattr(datasets, "files", None) or {}).get(split), labels)
    metrics = compute_metrics(labels, probs, class_names, files=files)
    metrics["split"] = split
    if tta:
        metrics["tta"] = tta_metrics(labels, tta_probs, class_names, tta)

    all_metrics = read_json(run_dir / "metrics.json", {})
    all_metrics.update({split: metrics, **(extra or {})})
    write_metrics(run_dir / "metrics.json", all_metrics)
    rows = prediction_rows(probs, class_names, files=files, labels=labels)
    for r in rows:
        r["split"] = split
    # predictions.csv is the main evaluation's (test, or val standing in for it); an explicitly
    # requested other split gets its own file so it does not overwrite the test predictions
    csv_name = "predictions.csv" if requested == "test" else f"predictions_{split}.csv"
    write_csv(run_dir / csv_name, rows)
    from kfine.log import timed
    with timed("plots"):
        plots = write_plots(run_dir, split, metrics, class_names, labels, probs, sample)
    from kfine.report import write_class_tables
    write_class_tables(run_dir)   # many classes: the whole per-class table as per_class_<split>.csv
    print(format_metrics(metrics), flush=True)
    print(f"kfine: wrote {run_dir / 'metrics.json'}, {run_dir / csv_name}, "
          f"{', '.join(str(p.relative_to(run_dir)) for p in plots)}", flush=True)
    if report:
        from kfine.report import write_report
        write_report(run_dir)
    return metrics


def write_metrics(path: Path, metrics: dict) -> None:
    """metrics.json: indented for reading, but on one line where a split has more classes than
    the report lists (a 1000-class confusion matrix indented is ~10^6 lines, and Python's JSON
    encoder indents in pure Python: seconds; on one line its C encoder writes it at once)."""
    from kfine.report import MAX_CLASS_ROWS
    big = any(isinstance(m, dict) and m.get("num_classes", 0) > MAX_CLASS_ROWS for m in metrics.values())
    write_json(path, metrics, indent=None if big else 2)


def format_metrics(m: dict) -> str:
    lines = [f"kfine: {m.get('split', 'eval')} ({m['n']} images): accuracy {m['accuracy']:.4f}, "
             f"loss {m['loss']:.4f}" + (f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else "")]
    if isinstance(m.get("tta"), dict):
        t = m["tta"]
        lines.append(f"  with TTA ({t['mode']}, {t['views']} views): accuracy {t['accuracy']:.4f}, loss {t['loss']:.4f}"
                     + (f", top-5 {t['top5_accuracy']:.4f}" if "top5_accuracy" in t else ""))
    per = m.get("per_class") or []
    from kfine.report import MAX_CLASS_ROWS, highest_classes, lowest_classes, per_class_csv, per_class_summary
    if len(per) > MAX_CLASS_ROWS:   # what to look at among many classes; every class in the CSV
        lines.append(f"  {per_class_summary(per)} (every class: {per_class_csv(m.get('split', 'eval'))})")
        for title, rows in (("lowest", lowest_classes(per, 5)), ("highest", highest_classes(per, 3))):
            lines.append(f"  {title} recall: " + ", ".join(f"{r['class']} {100 * r['recall']:.1f}%" for r in rows))
    for p in m.get("most_confused", [])[:5]:
        lines.append(f"  confused: {p['true']} -> {p['predicted']} ({p['count']}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kfine.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the run directory (config.yaml, model.keras)")
    ap.add_argument("--split", default="test", choices=["test", "val", "train"])
    ap.add_argument("--data", default=None, help="dataset root (overrides data.root of the run's config)")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite report.html")
    ap.add_argument("--tta", choices=sorted(TTA_MODES), default=None,
                    help="also report test-time augmentation: flip (2 views) or flip+crops (10 views)")
    args = ap.parse_args(argv)
    from kfine import cli
    return cli.run_command(lambda: _main(args))


def _main(args) -> None:
    run = Path(args.run)
    missing = missing_run_file(run, ("config.yaml", "model.keras"))
    if missing:
        raise FileNotFoundError(missing)
    evaluate_run(run, split=args.split, data_root=args.data, report=not args.no_report, tta=args.tta)


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
