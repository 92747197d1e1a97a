"""report.html: sections for what exists, only links to existing files, escaped text, renders in Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from kfine import plots
from kfine.evaluate import compute_metrics
from kfine.report import render_report, write_report

NAMES = ["cat", "dog", "<b>fox&co</b>"]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href"):
                self.links.append(v)
            if k == "id":
                self.ids.append(v)


def parse(html: str) -> Links:
    p = Links()
    p.feed(html)
    return p


def make_full_run(run: Path) -> Path:
    """A run directory with every output a finished run has (fake numbers, real files)."""
    from kfine.config import load_config, save_config
    run.mkdir(parents=True)
    save_config(load_config(None, ["name=<script>alert(1)</script>", "data.root=/data/pets"]), run / "config.yaml")
    (run / "class_names.json").write_text(json.dumps(NAMES))
    hist = ["epoch,phase,lr,loss,accuracy,val_loss,val_accuracy"]
    hist += [f"{e},{e // 3},0.001,{1.2 - 0.15 * e},{0.4 + 0.08 * e},{1.3 - 0.12 * e},{0.35 + 0.07 * e}" for e in range(6)]
    (run / "history.csv").write_text("\n".join(hist) + "\n")
    phases = [{"index": 0, "start_epoch": 0, "end_epoch": 3,
               "freeze": {"strategy": "backbone", "fraction": 0.0, "trainable_from": None, "pattern": None,
                          "train_bn": False},
               "summary": [{"stage": "conv1", "trainable": 0, "frozen": 9472, "bn_training": False},
                           {"stage": "head", "trainable": 6147, "frozen": 0, "bn_training": False}]},
              {"index": 1, "start_epoch": 3, "end_epoch": 6,
               "freeze": {"strategy": "stages", "trainable_from": "conv5"},
               "summary": [{"stage": "conv5", "trainable": 14964736, "frozen": 0, "bn_training": True},
                           {"stage": "head", "trainable": 6147, "frozen": 0, "bn_training": False}]}]
    (run / "phases.json").write_text(json.dumps(phases))
    (run / "data_check.json").write_text(json.dumps({
        "source": "folder", "root": "/data/pets", "layout": "single", "class_names": NAMES,
        "counts": {"train": {"cat": 40, "dog": 38, NAMES[2]: 9}, "val": {"cat": 10, "dog": 9, NAMES[2]: 3}},
        "warnings": ["class imbalance: largest/smallest train class = 4.4 (> 3)"],
        "unreadable": [{"path": "/data/pets/cat/broken.jpg", "reason": "not an image file"}],
        "non_images": ["/data/pets/notes.txt"], "duplicates": [], "leakage": []}))
    (run / "skipped_files.txt").write_text("/data/pets/cat/broken.jpg\tnot an image file\n")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    probs = rng.dirichlet(np.ones(3), 30)
    probs[np.arange(30), labels] += 1.0
    probs /= probs.sum(1, keepdims=True)
    m = compute_metrics(labels, probs, NAMES, files=[f"/data/pets/x{i}.jpg" for i in range(30)])
    m["split"] = "test"
    (run / "metrics.json").write_text(json.dumps({"test": m}))
    pd = run / "plots"
    plots.plot_history(run / "history.csv", pd / "history.png", phases=phases)
    plots.plot_confusion(np.array(m["confusion_matrix"]), NAMES, pd / "confusion_test.png")
    plots.plot_per_class_accuracy([r["recall"] for r in m["per_class"]], NAMES, pd / "per_class_accuracy_test.png")
    imgs = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    plots.plot_predictions_grid(imgs, labels, probs.argmax(1), NAMES, pd / "predictions_test.png")
    Image.fromarray(imgs[0]).resize((64, 64)).save(pd / "search.png")          # someone else's plot
    sm = run / "export" / "saved_model" / "1"
    (sm / "variables").mkdir(parents=True)
    (sm / "saved_model.pb").write_bytes(b"x" * 2048)
    (sm / "variables" / "variables.index").write_bytes(b"y" * 10)
    (run / "model.keras").write_bytes(b"z" * 4096)
    return run


def test_full_report_sections_links_and_escaping(tmp_path):
    run = make_full_run(tmp_path / "my run")          # a space: links must be URL-quoted
    out = write_report(run)
    assert out == run / "report.html"
    html = out.read_text()
    p = parse(html)
    assert {"summary", "config", "data", "phases", "curves", "metrics", "plots", "export"} <= set(p.ids)
    assert "script" not in p.tags and "<b>fox" not in html       # file text never becomes markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;fox&amp;co&lt;/b&gt;" in html
    srcs = [l for l in p.links if not l.startswith("#")]
    assert srcs, "no images linked"
    for link in srcs:
        assert not link.startswith(("/", "http", "file:")), link    # relative: the folder can move
        assert (run / unquote(link)).is_file(), link
    assert {unquote(l) for l in srcs} == {"plots/history.png", "plots/confusion_test.png", "plots/search.png",
                                         "plots/per_class_accuracy_test.png", "plots/predictions_test.png"}
    assert all(f"#{i}" in p.links for i in ("config", "metrics"))
    # content, not just headings
    m = json.loads((run / "metrics.json").read_text())["test"]
    assert f"{100 * m['accuracy']:.2f}%" in html
    assert "Phase 0: epochs 1..3" in html and "Phase 1: epochs 4..6" in html and "trainable_from=conv5" in html and "14,964,736" in html
    assert "class imbalance" in html and "broken.jpg" in html and "1 unreadable image(s) skipped" in html
    assert "export/saved_model/1/saved_model.pb" in html and "2.0 KB" in html
    assert html.count("<table>") >= 6


def test_report_states_the_weights_used_and_the_signatures_as_exported(tmp_path):
    run = make_full_run(tmp_path / "r")
    (run / "run_info.json").write_text(json.dumps({"weights": {
        "requested": "imagenet", "used": "random",
        "note": "ImageNet weights could not be loaded (offline); weights_fallback: random"}}))
    (run / "export" / "signatures.json").write_text(json.dumps({
        "serving_default": {"inputs": {"image_bytes": {"dtype": "string", "shape": [None]}},
                            "outputs": {"probabilities": {"dtype": "float32", "shape": [None, 3]}}},
        "serving_tensor": {"inputs": {"image": {"dtype": "float32", "shape": [None, 32, 32, 3]}},
                           "outputs": {"probabilities": {"dtype": "float32", "shape": [None, 3]}}}}))
    html = render_report(run)
    assert "backbone weights</span><b class=warn>random</b>" in html           # the fallback, flagged
    assert "ImageNet weights could not be loaded (offline); weights_fallback: random" in html
    assert "raw RGB images (0..255, float)" not in html and "takes encoded images" in html
    assert "<td class=l>serving_default</td><td class=l>inputs</td><td class=l>image_bytes</td>" \
           "<td class=l>string</td><td class=l>[N]</td>" in html
    assert "<td class=l>[N, 32, 32, 3]</td>" in html
    (run / "run_info.json").write_text(json.dumps({"weights": {"requested": "imagenet", "used": "imagenet",
                                                               "note": ""}}))
    assert "backbone weights</span><b>imagenet</b>" in render_report(run)


def test_report_counts_epochs_from_1_as_the_training_log_does(tmp_path):
    """history.csv and metrics.json hold 0-based indices; the page counts from 1, like the
    "epoch 6/6" line of the log: the best of 6 epochs, index 4, is epoch 5 of epochs 1..6."""
    run = make_full_run(tmp_path / "r")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["model"] = {"epoch": 4, "weights": "best", "final_epoch": 5, "monitor": "val_accuracy", "value": 0.63}
    (run / "metrics.json").write_text(json.dumps(metrics))
    html = render_report(run)
    assert "model weights of</span><b>epoch 5</b>" in html
    assert "Evaluated: the model's weights of epoch 5, the best by val_accuracy (0.6300) of epochs 1..6" in html
    assert "epochs 0.." not in html and "epoch 4" not in html


def test_report_shows_only_what_exists(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    html = render_report(run)
    assert "no outputs yet" in html and "<img" not in html and "<section" not in html
    (run / "metrics.json").write_text(json.dumps({"val": compute_metrics([0, 1], np.eye(2), ["a", "b"])}))
    (run / "phases.json").write_text("{ not json")
    html = render_report(run)
    ids = parse(html).ids
    assert "metrics" in ids and "curves" not in ids and "config" not in ids
    assert "could not show this section" in html          # a broken file costs one section, not the report
    assert "<img" not in html                              # no plots on disk, no image links


def test_report_cli(tmp_path):
    from kfine.report import main
    run = make_full_run(tmp_path / "r")
    assert main([str(run)]) == 0
    assert (run / "report.html").stat().st_size > 3000
    assert main([str(tmp_path / "missing")]) == 2


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_full_run(tmp_path / "shot")
    report = write_report(run)
    shot = tmp_path / "report.png"
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2000", report.resolve().as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert shot.exists(), proc.stderr[-2000:]
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert arr.shape[:2] == (2000, 1200)
    assert arr.std() > 20                         # text, tables and plots, not an empty page
    # the training-curve plot (matplotlib's default blue line, #1f77b4) is on screen, so images load
    blue = (abs(arr[..., 0] - 0x1f) < 30) & (abs(arr[..., 1] - 0x77) < 30) & (abs(arr[..., 2] - 0xb4) < 30)
    assert blue.sum() > 100
    keep = Path("/tmp/kfine_report_screenshot.png")
    shutil.copy(shot, keep)                      # for a human look after the run


def _tables(html: str) -> list[list[list[str]]]:
    """Every <table> of the page as rows of cell texts."""
    import re
    from html import unescape
    return [[[unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr)] for tr in re.findall(r"<tr>(.*?)</tr>", t)]
            for t in re.findall(r"<table>(.*?)</table>", html)]


def test_natural_sort_for_display_only(tmp_path):
    from kfine.report import natural_sorted
    assert natural_sorted(["class_10", "class_2", "Class_1", "b", "a10b", "a2b"]) == \
        ["a2b", "a10b", "b", "Class_1", "class_2", "class_10"]
    names = sorted(f"class_{i}" for i in range(12))          # label order, as kfine.sources sorts the folders
    run = tmp_path / "r"
    run.mkdir()
    (run / "class_names.json").write_text(json.dumps(names))
    labels = np.arange(24) % 12
    m = compute_metrics(labels, np.eye(12)[labels], names)
    (run / "metrics.json").write_text(json.dumps({"test": m}))
    (run / "data_check.json").write_text(json.dumps({"counts": {"train": {c: 3 for c in names}}}))
    tables = _tables(render_report(run))
    per = next(t for t in tables if t[0][:3] == ["class", "precision", "recall"])
    counts = next(t for t in tables if t[0] == ["class", "train"])
    natural = [f"class_{i}" for i in range(12)]
    assert [r[0] for r in per[1:]] == natural and [r[0] for r in counts[1:-1]] == natural
    assert names[:3] == ["class_0", "class_1", "class_10"]           # the labels keep their order
    assert [r["class"] for r in m["per_class"]] == names


def test_report_of_a_1000_class_run_shows_the_extremes_and_links_every_class(tmp_path, capsys):
    """A real 1,000-class run (8 px, 1 epoch, 2 steps): no table of the report is long, the
    linked CSVs hold every class, and the lowest classes shown are the lowest of the CSV."""
    import csv
    from PIL import Image
    from kfine import train
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    n_train = {f"class_{i}": 2 + (i == 7) for i in range(1000)}       # class_7 has 3 training images
    for split, n in (("train_set", None), ("val_set", 1), ("test_set", 1)):
        for c, k in n_train.items():
            (root / split / c).mkdir(parents=True)
            for j in range(n or k):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{j}.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: big\nmodel: {backbone: scratch_cnn, weights: null, scratch: {filters: [4], dense_units: 8, "
                   "dropout: 0.0}}\n")
    assert train.main(["--config", str(cfg), f"runs_dir={tmp_path / 'runs'}", f"data.root={root}",
                       "data.image_size=[8,8]", "data.batch_size=256", "train.epochs=1", "train.steps_per_epoch=2",
                       "train.verbose=0", "export.enabled=false", "data.augment.enabled=false",
                       "train.phases=[{start_epoch: 0, freeze: {strategy: none}}]"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "big"
    html = (run / "report.html").read_text()
    tables = _tables(html)
    assert max(len(t) for t in tables) <= 61                              # was two 1,000-row tables
    names = json.loads((run / "class_names.json").read_text())
    with open(run / "per_class_test.csv", newline="") as f:
        per = list(csv.DictReader(f))
    assert [r["class"] for r in per] == names and [int(r["label"]) for r in per] == list(range(1000))
    with open(run / "images_per_class.csv", newline="") as f:
        counts = list(csv.DictReader(f))
    assert len(counts) == 1000 and {r["class"]: int(r["train"]) for r in counts} == n_train
    assert {r["class"]: int(r["label"]) for r in counts} == {c: i for i, c in enumerate(names)}
    assert 'href="per_class_test.csv"' in html and 'href="images_per_class.csv"' in html
    # the lowest shown are the lowest of the CSV (recall, then F1, then the class number)
    expected = sorted(per, key=lambda r: (float(r["recall"]), float(r["f1"]), int(r["class"].split("_")[1])))
    lowest = next(t for t in tables if t[0][:3] == ["class", "precision", "recall"])
    assert [r[0] for r in lowest[1:]] == [r["class"] for r in expected[:15]]
    highest = [t for t in tables if t[0][:3] == ["class", "precision", "recall"]][1]
    assert highest[1][0] == max(per, key=lambda r: (float(r["recall"]), float(r["f1"])))["class"] or \
        float(highest[1][2]) == max(float(r["recall"]) for r in per)
    zero = sum(float(r["recall"]) == 0 for r in per)
    assert f"1,000 classes: {zero:,} at 0% recall" in html
    fewest = next(t for t in tables if t[0][:2] == ["class", "train"])
    assert [r[0] for r in fewest[1:]] == [f"class_{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15)]
    assert [t for t in tables if t[0][:2] == ["class", "train"]][1][1][0] == "class_7"   # the most
    # kfine.evaluate's console summary: the summary line and the extremes, not 1,000 lines
    assert f"1,000 classes: {zero:,} at 0% recall" in out and "lowest recall: " in out
    assert sum(line.count("class_") for line in out.splitlines()) < 100


def test_a_split_read_from_splits_csv_is_named_so(tmp_path):
    """kfine.sources.read_splits marks its index's layout "saved": the audit line and the report
    say where the split came from instead of naming a layout that does not exist."""
    from kfine.audit import format_check
    check = {"source": "folder", "root": "/data/pets", "layout": "saved", "class_names": ["a", "b"],
             "counts": {"train": {"a": 3, "b": 4}}, "warnings": [], "leakage": []}
    line = format_check(check).splitlines()[0]
    assert "(split from splits.csv)" in line and "saved" not in line
    run = tmp_path / "r"
    run.mkdir()
    (run / "data_check.json").write_text(json.dumps(check))
    html = render_report(run)
    assert "<td class=l>split</td><td class=l>from splits.csv</td>" in html and ">saved<" not in html


def test_the_log_and_the_report_count_epochs_alike(tmp_path, capsys):
    """One numbering a person reads: the log's "epoch 3/3" lines, the phase headers, "the model
    now holds epoch K's weights" and the report all count from 1; history.csv and best.json keep
    Keras' 0-based index (K - 1)."""
    from conftest import make_folder
    from kfine import train
    root = make_folder(tmp_path / "data", "single", per_class=6)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: e\nmodel: {backbone: scratch_cnn, weights: null, scratch: {filters: [4], dense_units: 8}}\n"
                   "train:\n  epochs: 3\n  phases:\n    - {start_epoch: 0, freeze: {strategy: none}}\n"
                   "    - {start_epoch: 2, freeze: {strategy: backbone}}\n")
    assert train.main(["--config", str(cfg), f"runs_dir={tmp_path / 'runs'}", f"data.root={root}",
                       "data.image_size=[16,16]", "data.batch_size=4", "train.steps_per_epoch=1", "train.verbose=2",
                       "export.enabled=false", "data.augment.enabled=false", "train.restore_best=true"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "e"
    best = json.loads((run / "checkpoints" / "best.json").read_text())["epoch"]      # 0-based index
    assert [line.split("  ")[0] for line in out.splitlines() if line.startswith("epoch ")] == \
        ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "kfine: phase 0 (epochs 1..2 of 3)" in out and "kfine: phase 1 (epochs 3..3 of 3)" in out
    assert f"the model now holds epoch {best + 1}'s weights" in out
    html = (run / "report.html").read_text()
    assert f"model weights of</span><b>epoch {best + 1}</b>" in html and "of epochs 1..3 (train.restore_best)" in html
    assert "Phase 0: epochs 1..2" in html and "Phase 1: epochs 3..3" in html
    assert json.loads((run / "metrics.json").read_text())["model"]["epoch"] == best
