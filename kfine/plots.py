"""Plots of a run, written as PNG files into run_dir/plots/.

Every ``plot_*`` function builds a matplotlib Figure (no pyplot global state, Agg backend),
writes it atomically (render into memory, then ``atomic_write_bytes``) and returns its path.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import numpy as np  # noqa: E402

from kfine.rundir import atomic_write_bytes, atomic_write_png  # noqa: E402

RIGHT, WRONG = "#1a7f37", "#cf222e"    # green / red


def save_figure(fig: Figure, out_path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    # zlib level 1: about half the time of the default (6) for a predictions grid of photos, ~20% larger files
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pil_kwargs={"compress_level": 1})
    atomic_write_bytes(out_path, buf.getvalue())
    return Path(out_path)


# ----------------------------------------------------------------------------- training curves
def read_history_csv(path) -> list[dict]:
    """history.csv -> list of {column: float}; empty or unparsable cells are left out."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    pass
            if "epoch" in row:
                rows.append(row)
    return rows


def phase_label(phase: dict) -> str:
    """'phase 1: stages from conv5' from a phases.json entry."""
    spec = phase.get("freeze") or {}
    strategy = spec.get("strategy", "?")
    detail = {"stages": f" from {spec.get('trainable_from')}", "fraction": f" {spec.get('fraction')}",
              "regex": f" /{spec.get('pattern')}/"}.get(strategy, "")
    return f"phase {phase.get('index', '?')}: {strategy}{detail}"


def history_figure(rows: list[dict], phases: list[dict] | None = None) -> Figure:
    """Accuracy and loss per epoch (train and validation), phase starts as dashed lines."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        drawn = False
        for key, style in ((metric, "-o"), (f"val_{metric}", "-s")):
            pts = [(r["epoch"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label="validation" if key.startswith("val_") else "train")
                drawn = True
        if metric == "accuracy":
            for key in ("top5", "top5_accuracy", "val_top5", "val_top5_accuracy"):
                pts = [(r["epoch"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), ":", label=key.replace("_accuracy", ""))
                    drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", transform=ax.transAxes)
        for p in phases or []:
            start = p.get("start_epoch")
            if start is None:
                continue
            x = start - 0.5
            ax.axvline(x, color="grey", ls="--", lw=1, gid="phase_boundary")
            ax.text(x, 1.0, " " + phase_label(p), transform=ax.get_xaxis_transform(), rotation=90,
                    va="top", ha="left", fontsize=7, color="dimgrey", gid="phase_label")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="lower right" if metric == "accuracy" else "upper right")
        if epochs:
            ax.set_xlim(min(epochs) - 0.7, max(epochs) + 0.7)
    fig.tight_layout()
    return fig


def plot_history(history_csv, out_path, phases=None) -> Path:
    """Training and validation accuracy and loss per epoch, with phase boundaries marked."""
    return save_figure(history_figure(read_history_csv(history_csv), phases), out_path)


# ----------------------------------------------------------------------------- confusion
def normalize_rows(cm) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


LABELLED_MAX = 60   # more classes than this: no tick labels (unreadable, and seconds per label)


def plot_confusion(cm, class_names, out_path, annotate_max: int = 15) -> Path:
    """Row-normalised confusion matrix (rows: true class). Scales with the number of classes;
    cell values are written only up to ``annotate_max`` classes, class names up to LABELLED_MAX
    (past that the axes count class indices, in class_names.json order)."""
    return save_figure(confusion_figure(cm, class_names, annotate_max), out_path)


def confusion_figure(cm, class_names, annotate_max: int = 15) -> Figure:
    norm = normalize_rows(cm)
    n = len(class_names)
    side = max(5.0, min(0.32 * n + 3, 24.0))
    fontsize = 9 if n <= 15 else max(5, 9 - (n - 15) // 8)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= LABELLED_MAX:
        ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), [str(c) for c in class_names], fontsize=fontsize)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:
        ax.set_xlabel("predicted (class index, as in class_names.json)")
        ax.set_ylabel("true (class index)")
    ax.set_title(f"confusion matrix (row-normalised, {n} classes)")
    if n <= annotate_max:
        for i in range(n):
            for j in range(n):
                if norm[i, j] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(accuracies, class_names, out_path, support=None) -> Path:
    """Horizontal bars: accuracy (recall) of each class, with the mean (of all classes) as a
    line. Past LABELLED_MAX classes only the LABELLED_MAX lowest are drawn, lowest first (the full
    table is metrics.json's per_class)."""
    return save_figure(per_class_figure(accuracies, class_names, support), out_path)


def per_class_figure(accuracies, class_names, support=None) -> Figure:
    acc = np.asarray(accuracies, dtype=np.float64)
    labels = [f"{c} (n={s})" for c, s in zip(class_names, support)] if support is not None else list(class_names)
    mean, title = (acc.mean() if len(acc) else 0.0), "per-class accuracy"
    if len(acc) > LABELLED_MAX:
        keep = np.argsort(acc, kind="stable")[:LABELLED_MAX]
        title = f"per-class accuracy: the {LABELLED_MAX} lowest of {len(acc)} classes"
        acc, labels = acc[keep], [labels[i] for i in keep]
    n = len(acc)
    fig = Figure(figsize=(7, max(3.0, 0.25 * n + 1.2)))
    ax = fig.subplots()
    y = np.arange(n)
    ax.barh(y, acc, color=[RIGHT if a >= mean else "#d4a72c" for a in acc])
    ax.set_yticks(y, labels, fontsize=9 if n <= 25 else 6)
    ax.invert_yaxis()
    ax.axvline(mean, color="grey", ls="--", lw=1, label=f"mean {mean:.3f}")
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("accuracy (recall)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- predictions grid
def plot_predictions_grid(images_uint8, true, pred, class_names, out_path, n: int = 30, seed: int = 0,
                          cols: int = 6, cell: int = 192) -> Path:
    """Up to ``n`` random images titled 'predicted / true'; wrong predictions in red with a red frame.
    Drawn with PIL (as kfine.explain's heatmap grid): milliseconds, where a matplotlib figure of
    30 images took seconds."""
    from PIL import Image, ImageDraw, ImageFont
    images = np.asarray(images_uint8)
    true, pred = np.asarray(true).reshape(-1), np.asarray(pred).reshape(-1)
    count = len(images)
    pick = np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False)) if count else []
    rows = max(1, math.ceil(len(pick) / cols))
    font, big = ImageFont.load_default(size=13), ImageFont.load_default(size=16)
    pad, caption, header = 10, 36, 34
    sheet = Image.new("RGB", (pad + cols * (cell + pad), header + rows * (caption + cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    n_right = 0
    for k, i in enumerate(pick):
        r, c = divmod(k, cols)
        x0, y0 = pad + c * (cell + pad), header + r * (caption + cell + pad)
        ok = int(true[i]) == int(pred[i])
        n_right += ok
        color = RIGHT if ok else WRONG
        for line, text in enumerate((f"pred: {class_names[int(pred[i])]}", f"true: {class_names[int(true[i])]}")):
            draw.text((x0 + cell // 2, y0 + 2 + 16 * line), _fit(draw, text, font, cell), fill=color, font=font,
                      anchor="ma")
        tile = Image.fromarray(np.clip(images[i], 0, 255).astype(np.uint8))
        scale = cell / max(tile.size)   # the image's own aspect ratio, centred in its cell
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.BILINEAR)
        sheet.paste(tile, (x0 + (cell - tile.width) // 2, y0 + caption + (cell - tile.height) // 2))
        width = 1 if ok else 3
        draw.rectangle((x0 - width, y0 + caption - width, x0 + cell + width - 1, y0 + caption + cell + width - 1),
                       outline=color, width=width)
    draw.text((sheet.width // 2, 8), f"{n_right} of {len(pick)} correct (wrong ones in red)", fill="black",
              font=big, anchor="ma")
    return atomic_write_png(sheet, out_path, compress_level=1)


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with ...) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# ----------------------------------------------------------------------------- data samples
def plot_samples(files, class_name: str, out_path, n: int = 10, seed: int = 0) -> Path:
    """A grid of ``n`` random images (paths or (path, label) pairs) titled with the class name."""
    from kfine.pipeline import load_images
    paths = [f[0] if isinstance(f, (tuple, list)) else f for f in files]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(paths), size=min(n, len(paths)), replace=False)) if paths else []
    cols = min(5, max(1, len(pick)))
    rows = max(1, math.ceil(len(pick) / cols))
    fig = Figure(figsize=(2 * cols, 2 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    images, ok, _ = load_images([paths[i] for i in pick], (128, 128), cache_size=128)
    shown = dict(zip(ok, images))
    for ax, i in zip(axes.flat, pick):
        if paths[i] in shown:
            ax.imshow(shown[paths[i]])
        else:
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(Path(paths[i]).name, fontsize=7)
    fig.suptitle(class_name)
    return save_figure(fig, out_path, dpi=80)


# ----------------------------------------------------------------------------- learning-rate range test
def plot_lr_find(lrs, losses, smoothed, suggestion: float, out_path) -> Path:
    """kfine.lr_find: loss against learning rate (log scale), raw and smoothed, the suggestion marked."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lrs, losses, color="#bbbbbb", linewidth=0.8, label="loss per step")
    ax.plot(lrs, smoothed, color="#0969da", linewidth=1.6, label="smoothed")
    ax.axvline(suggestion, color=WRONG, linestyle="--", linewidth=1.2, label=f"suggested {suggestion:.2g}")
    ax.set_xscale("log")
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:   # the divergence at the end would squash the interesting part
        low, high = min(finite), max(finite[: max(1, len(finite) // 2)] + [finite[0]])
        ax.set_ylim(low - 0.1 * (high - low + 1e-8), high + 0.3 * (high - low + 1e-8))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    return save_figure(fig, out_path)


# ----------------------------------------------------------------------------- comparison
def compare_figure(curves: dict[str, list[dict]], published: dict[str, float] | None = None) -> Figure:
    """Validation accuracy and loss per epoch, one line per compared run; a run's published
    validation accuracy (``published``: name -> accuracy) as a dotted line in its colour."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("val_accuracy", "val_loss")):
        drawn = False
        for name, rows in curves.items():
            pts = [(r["epoch"], r[metric]) for r in rows if metric in r]
            if not pts:
                continue
            line, = ax.plot(*zip(*pts), "-o", ms=3, label=name)
            drawn = True
            if metric == "val_accuracy" and (published or {}).get(name) is not None:
                ax.axhline(published[name], color=line.get_color(), ls=":", lw=1.2, gid="published")
        if not drawn:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric.replace("_", " ") + (" (dotted: published)" if metric == "val_accuracy" and published else ""))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="lower right" if metric == "val_accuracy" else "upper right")
    fig.tight_layout()
    return fig


def plot_compare(curves: dict[str, list[dict]], out_path, published: dict[str, float] | None = None) -> Path:
    """The validation curves of a comparison (kfine.compare) in one figure: ``curves`` maps a run's
    name to its history rows (read_history_csv)."""
    return save_figure(compare_figure(curves, published), out_path)
