"""Plots: every function writes a valid non-empty PNG; phase boundaries drawn; big matrices readable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kfine import plots

PHASES = [{"index": 0, "start_epoch": 0, "end_epoch": 3, "freeze": {"strategy": "backbone"}},
          {"index": 1, "start_epoch": 3, "end_epoch": 6, "freeze": {"strategy": "stages", "trainable_from": "conv5"}}]


def check_png(path, min_size=(100, 100)):
    assert path.stat().st_size > 1000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        arr = np.asarray(img.convert("L"))
    assert arr.std() > 1          # not a blank canvas
    assert not list(path.parent.glob(".*tmp*"))   # atomic write left no temporary file


def write_history(path, with_val=True):
    cols = "epoch,phase,lr,loss,accuracy" + (",val_loss,val_accuracy,top5" if with_val else "")
    lines = [cols]
    for e in range(6):
        row = f"{e},{e // 3},0.001,{1.5 - 0.2 * e},{0.3 + 0.1 * e}"
        if with_val:
            row += f",{1.6 - 0.15 * e},{0.25 + 0.1 * e}," + ("" if e == 2 else f"{0.8 + 0.02 * e}")
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_history_marks_phase_boundaries(tmp_path):
    hist = write_history(tmp_path / "history.csv")
    out = plots.plot_history(hist, tmp_path / "plots" / "history.png", phases=PHASES)
    assert out == tmp_path / "plots" / "history.png"
    check_png(out, (600, 200))
    fig = plots.history_figure(plots.read_history_csv(hist), PHASES)
    for ax in fig.axes:
        lines = [l for l in ax.get_lines() if l.get_gid() == "phase_boundary"]
        assert sorted(l.get_xdata()[0] for l in lines) == [-0.5, 2.5]     # between epochs 2 and 3
        labels = [t.get_text().strip() for t in ax.texts if t.get_gid() == "phase_label"]
        assert labels == ["phase 0: backbone", "phase 1: stages from conv5"]
        curves = [l for l in ax.get_lines() if l.get_gid() != "phase_boundary"]
        assert {l.get_label() for l in curves} >= {"train", "validation"}
    acc = fig.axes[0]
    train_line = next(l for l in acc.get_lines() if l.get_label() == "train")
    np.testing.assert_allclose(train_line.get_ydata(), [0.3 + 0.1 * e for e in range(6)])
    top5 = next(l for l in acc.get_lines() if l.get_label() == "top5")
    assert len(top5.get_xdata()) == 5          # the empty cell is skipped, not plotted as 0


def test_plot_history_without_validation_or_phases(tmp_path):
    hist = write_history(tmp_path / "history.csv", with_val=False)
    check_png(plots.plot_history(hist, tmp_path / "h.png"))
    fig = plots.history_figure(plots.read_history_csv(hist))
    assert not [l for ax in fig.axes for l in ax.get_lines() if l.get_gid() == "phase_boundary"]
    assert [l.get_label() for l in fig.axes[0].get_lines()] == ["train"]


def test_plot_confusion_small_and_50_classes(tmp_path):
    cm = np.array([[5, 1, 0], [0, 3, 3], [0, 0, 0]])
    check_png(plots.plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm3.png"))
    fig = plots.confusion_figure(cm, ["a", "b", "c"])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["0.17", "0.50", "0.50", "0.83"]             # row-normalised; the empty row stays 0
    np.testing.assert_allclose(plots.normalize_rows(cm)[1], [0, 0.5, 0.5])

    rng = np.random.default_rng(0)
    big = rng.integers(0, 5, (50, 50)) + np.eye(50, dtype=int) * 20
    names = [f"class_{i:02d}" for i in range(50)]
    out = plots.plot_confusion(big, names, tmp_path / "cm50.png")
    check_png(out, (1000, 1000))                                  # figure grows with the classes
    fig = plots.confusion_figure(big, names)
    assert not fig.axes[0].texts                                  # no cell annotations past 15 classes
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names


def test_plot_per_class_accuracy(tmp_path):
    out = plots.plot_per_class_accuracy([1.0, 0.5, 0.0], ["a", "b", "c"], tmp_path / "pc.png", support=[3, 4, 1])
    check_png(out)


@pytest.mark.parametrize("count", [30, 7])
def test_plot_predictions_grid(tmp_path, count):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 24, 24, 3), dtype=np.uint8)
    true = rng.integers(0, 3, count)
    pred = true.copy()
    pred[::4] = (pred[::4] + 1) % 3
    out = plots.plot_predictions_grid(images, true, pred, ["cat", "dog", "fox"], tmp_path / f"grid{count}.png")
    check_png(out, (600, 200))
    # wrong ones are red: the picture has strongly red pixels (titles and frames)
    arr = np.asarray(Image.open(out).convert("RGB")).astype(int)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 80) & (arr[..., 2] < 80)
    assert red.sum() > 50


def test_a_thousand_classes_plot_without_names_and_the_lowest_classes(tmp_path):
    rng = np.random.default_rng(1)
    n = 1000
    names = [f"n{i:08d}" for i in range(n)]
    fig = plots.confusion_figure(np.eye(n, dtype=int) * 3 + rng.integers(0, 2, (n, n)), names)
    assert not fig.axes[0].get_yticklabels() or names[0] not in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    acc = rng.random(n)
    fig = plots.per_class_figure(acc, names, support=[5] * n)
    shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    lowest = np.argsort(acc)[:plots.LABELLED_MAX]
    assert shown == [f"{names[i]} (n=5)" for i in lowest]             # the lowest, lowest first
    assert f"mean {acc.mean():.3f}" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    check_png(plots.plot_per_class_accuracy(acc, names, tmp_path / "pc.png"))
