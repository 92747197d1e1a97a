"""One self-contained HTML page per run: run_dir/report.html.

    python -m kfine.report runs/NAME

Inline CSS, no scripts, images linked by relative paths (plots/*.png) so the page works offline
and moves with the run directory. Every section is optional: only what the run has is shown.
A comparison's directory (kfine.compare) gets the same page with its comparison section first.
All text from files is HTML-escaped.
"""
from __future__ import annotations

import datetime
import json
import re
import statistics
import sys
from html import escape
from pathlib import Path
from urllib.parse import quote

from kfine.rundir import atomic_write_text, read_json, write_csv

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:26px;margin:16px 0 4px} h2{font-size:20px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin:18px 0 6px} h4{font-size:14px;margin:12px 0 4px} .muted{color:#656d76;font-size:13px}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:4px 16px 14px;margin:16px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
th{background:#f6f8fa} td.l,th.l{text-align:left}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:10px;overflow:auto;font-size:12px;max-height:300px}
img{max-width:100%;border:1px solid #d0d7de;margin:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px} .card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:22px} .warn{color:#9a6700} .bad{color:#cf222e}
nav a{margin-right:12px;font-size:13px}
"""


# Above this many classes a per-class table shows what a person looks for (the lowest and highest
# classes, a summary line) and links the whole table as a CSV in the run directory.
MAX_CLASS_ROWS = 60
LOWEST, HIGHEST = 15, 5


# ----------------------------------------------------------------------------- small helpers
def natural_key(name) -> tuple:
    """Sort key that orders class names as people do: class_2 before class_10, case aside. For
    display only: label indices stay those of class_names.json."""
    parts = re.split(r"(\d+)", str(name))
    return [int(t) if i % 2 else t.casefold() for i, t in enumerate(parts)], str(name)


def natural_sorted(names) -> list:
    return sorted(names, key=natural_key)


def per_class_csv(split: str) -> str:
    return f"per_class_{split}.csv"


COUNTS_CSV = "images_per_class.csv"


def _class_order(run_dir: Path) -> list:
    names = read_json(run_dir / "class_names.json", None)
    return names if isinstance(names, list) else []


def write_class_tables(run_dir) -> list[Path]:
    """The whole per-class tables as CSVs in the run directory, for a run with more than
    MAX_CLASS_ROWS classes (the report shows their extremes and links these): per_class_<split>.csv
    for each evaluated split (class, label, precision, recall, f1, support; label order) and
    images_per_class.csv (class, label, images per split, total). Returns the files written."""
    run_dir = Path(run_dir)
    order = {c: i for i, c in enumerate(_class_order(run_dir))}
    written = []
    metrics = read_json(run_dir / "metrics.json", None)
    for split, m in (metrics.items() if isinstance(metrics, dict) else []):
        per = m.get("per_class") if isinstance(m, dict) else None
        if isinstance(per, list) and len(per) > MAX_CLASS_ROWS:
            rows = [{"class": r.get("class"), "label": order.get(r.get("class"), i), **{
                k: r.get(k) for k in ("precision", "recall", "f1", "support")}} for i, r in enumerate(per)]
            write_csv(run_dir / per_class_csv(split), rows, ["class", "label", "precision", "recall", "f1", "support"])
            written.append(run_dir / per_class_csv(split))
    counts = (read_json(run_dir / "data_check.json", None) or {}).get("counts")
    rows = _count_rows(counts) if isinstance(counts, dict) else []
    if len(rows) > MAX_CLASS_ROWS:
        splits = [s for s, c in counts.items() if isinstance(c, dict)]
        write_csv(run_dir / COUNTS_CSV, [{"class": c, "label": order.get(c, ""), **dict(zip(splits, n)),
                                         "total": sum(n)} for c, *n in rows], ["class", "label", *splits, "total"])
        written.append(run_dir / COUNTS_CSV)
    return written


def _count_rows(counts: dict) -> list[list]:
    """{split: {class: n}} -> [class, n per split...] in natural class order."""
    splits = [s for s, c in counts.items() if isinstance(c, dict)]
    classes: list[str] = []
    for s in splits:
        classes += [c for c in counts[s] if c not in classes]
    return [[c] + [counts[s].get(c, 0) for s in splits] for c in natural_sorted(classes)]


def _link(run_dir: Path, rel: str) -> str:
    if not (run_dir / rel).is_file():
        return f"<code>{escape(rel)}</code> (not written: <code>python -m kfine.report {escape(str(run_dir))}</code> writes it)"
    return f'<a href="{escape(quote(rel))}">{escape(rel)}</a>'


def _pct(v) -> str:
    return f"{100 * v:.1f}%"


def per_class_summary(per: list[dict]) -> str:
    """One line: classes at 0% recall, recall and F1 median and quartiles."""
    def quart(key):
        vals = [float(r.get(key) or 0.0) for r in per]
        q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else vals * 3
        return f"median {_pct(q[1])} (quartiles {_pct(q[0])}..{_pct(q[2])})"
    zero = sum(1 for r in per if not r.get("recall"))
    return f"{len(per):,} classes: {zero:,} at 0% recall; recall {quart('recall')}; F1 {quart('f1')}"


def lowest_classes(per: list[dict], n: int = LOWEST) -> list[dict]:
    """The classes with the lowest recall (then F1; ties in natural name order)."""
    return sorted(per, key=lambda r: (r.get("recall") or 0.0, r.get("f1") or 0.0, natural_key(r.get("class"))))[:n]


def highest_classes(per: list[dict], n: int = HIGHEST) -> list[dict]:
    return sorted(per, key=lambda r: (-(r.get("recall") or 0.0), -(r.get("f1") or 0.0), natural_key(r.get("class"))))[:n]


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table(header: list, rows: list[list], left: int | set = 1) -> str:
    """An HTML table; the first ``left`` columns (or those whose index is in ``left``) are
    left-aligned (names, paths), the rest right-aligned (numbers)."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)

    def cells(tag, values):
        return "".join(f"<{tag}{' class=l' if i in lefts else ''}>{escape(_fmt(v))}</{tag}>"
                       for i, v in enumerate(values))
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def image(run_dir: Path, rel: str, alt: str) -> str:
    """<img> for run_dir/rel if that file exists, else ''."""
    if not (run_dir / rel).is_file():
        return ""
    return f'<img src="{escape(quote(rel))}" alt="{escape(alt)}">'


def _describe(entry) -> str:
    """One audit entry (a path, or a dict with path/paths/class) as short text."""
    if isinstance(entry, dict):
        if "path" in entry:
            return f"{entry['path']} ({entry.get('reason') or entry.get('size') or ''})".replace(" ()", "")
        if "paths" in entry:
            return " == ".join(map(str, entry["paths"]))
        return ", ".join(f"{k}={v}" for k, v in entry.items())
    return str(entry)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


# ----------------------------------------------------------------------------- sections
def section_summary(run_dir: Path, shown: set) -> str:
    metrics = read_json(run_dir / "metrics.json", None) or {}
    cards = []
    for split, m in metrics.items():
        if not isinstance(m, dict) or "accuracy" not in m:
            continue
        cards.append(f'<div class=card><span class=muted>{escape(split)} accuracy</span>'
                     f'<b>{100 * m["accuracy"]:.2f}%</b><span class=muted>{escape(str(m.get("n", "")))} images'
                     f'{", top-5 %.2f%%" % (100 * m["top5_accuracy"]) if "top5_accuracy" in m else ""}</span></div>')
        if isinstance(m.get("tta"), dict) and "accuracy" in m["tta"]:
            cards.append(f'<div class=card><span class=muted>{escape(split)} accuracy with TTA</span>'
                         f'<b>{100 * m["tta"]["accuracy"]:.2f}%</b><span class=muted>'
                         f'{escape(str(m["tta"].get("mode", "")))}, {escape(str(m["tta"].get("views", "")))} views</span></div>')
    weights = (read_json(run_dir / "run_info.json", None) or {}).get("weights")
    if isinstance(weights, dict) and weights.get("used"):
        fell_back = weights.get("requested") not in (None, weights["used"]) and weights["used"] == "random"
        cards.append(f'<div class=card><span class=muted>backbone weights</span><b{" class=warn" if fell_back else ""}>'
                     f'{escape(Path(str(weights["used"])).name)}</b><span class=muted>'
                     f'{escape(weights.get("note") or "")}</span></div>')
    used = model_epoch(run_dir)
    if used:
        cards.append(f'<div class=card><span class=muted>model weights of</span><b>epoch {used[0]}</b>'
                     f'<span class=muted>{escape(used[1])}</span></div>')
    hist = run_dir / "history.csv"
    if hist.exists():
        from kfine.plots import read_history_csv
        rows = read_history_csv(hist)
        vals = [r["val_accuracy"] for r in rows if "val_accuracy" in r]
        if rows:
            cards.append(f'<div class=card><span class=muted>epochs</span><b>{len(rows)}</b>'
                         f'<span class=muted>best val acc {max(vals) * 100:.2f}%</span></div>' if vals else
                         f'<div class=card><span class=muted>epochs</span><b>{len(rows)}</b></div>')
    if not cards:
        return ""
    return f"<section id=summary><h2>Summary</h2><div class=cards>{''.join(cards)}</div></section>"


def model_epoch(run_dir: Path) -> tuple[int, str] | None:
    """(epoch, why) of the weights model.keras holds, evaluation and export used (train.restore_best),
    from metrics.json or run_info.json; None for a run that does not say. The files hold 0-based
    epoch indices (as history.csv); the epoch returned counts from 1, as the training log does."""
    used = ((read_json(run_dir / "metrics.json", None) or {}).get("model")
            or (read_json(run_dir / "run_info.json", None) or {}).get("model"))
    if not isinstance(used, dict) or used.get("epoch") is None:
        return None
    if used.get("weights") == "best":
        value = used.get("value")
        why = (f"the best by {used.get('monitor')}" + (f" ({value:.4f})" if isinstance(value, (int, float)) else "")
               + f" of epochs 1..{_human_epoch(used.get('final_epoch'))} (train.restore_best)")
    else:
        why = "the final epoch" + (" (train.restore_best: false)" if "final_epoch" in used else "")
    return _human_epoch(used["epoch"]), why


def _human_epoch(index):
    """A 0-based epoch index from a file (history.csv, metrics.json) as people count it: from 1."""
    try:
        return int(index) + 1
    except (TypeError, ValueError):
        return index if index is not None else "?"


def section_config(run_dir: Path, shown: set) -> str:
    p = run_dir / "config.yaml"
    if not p.exists():
        return ""
    if (run_dir / "compare.csv").exists():   # a comparison: its config.yaml holds the sets (--strategies too)
        how = (f"re-run the comparison with <code>python -m kfine.compare --config {escape(str(p))}</code>; "
               f"continue it with <code>python -m kfine.compare --resume {escape(str(run_dir))}</code>")
    else:
        how = f"re-run with <code>python -m kfine.train --config {escape(str(p))}</code>"
    return (f"<section id=config><h2>Config</h2><p class=muted>config.yaml ({how})</p>"
            f"<pre>{escape(p.read_text(errors='replace'))}</pre></section>")


def _counts_table(counts: dict, run_dir: Path | None = None) -> str:
    """{split: {class: n}} -> classes as rows (natural order), splits as columns, totals last.
    Above MAX_CLASS_ROWS classes: a summary line, the classes with the fewest training images and
    the largest, and a link to images_per_class.csv."""
    splits = [s for s, c in counts.items() if isinstance(c, dict)]
    if not splits:
        return ""
    rows = _count_rows(counts)
    total = ["total"] + [sum(v for v in counts[s].values() if isinstance(v, (int, float))) for s in splits]
    if len(rows) <= MAX_CLASS_ROWS:
        return table(["class"] + splits, rows + [total])
    col = splits.index("train") + 1 if "train" in splits else 1
    fewest = sorted(rows, key=lambda r: (r[col], natural_key(r[0])))
    largest = sorted(rows, key=lambda r: (-r[col], natural_key(r[0])))[:HIGHEST]
    n = [r[col] for r in rows]
    line = (f"{len(rows):,} classes; {escape(splits[col - 1])}: {min(n):,}..{max(n):,} images per class, median "
            f"{statistics.median(n):g}; in all " + ", ".join(f"{escape(s)} {t:,}" for s, t in zip(splits, total[1:]))
            + f". Every class: {_link(run_dir, COUNTS_CSV) if run_dir else escape(COUNTS_CSV)}.")
    return (f"<p>{line}</p><h4>Fewest {escape(splits[col - 1])} images</h4>"
            + table(["class"] + splits, fewest[:LOWEST]) + f"<h4>Most {escape(splits[col - 1])} images</h4>"
            + table(["class"] + splits, largest))


def section_data(run_dir: Path, shown: set) -> str:
    check = read_json(run_dir / "data_check.json", None)
    skipped_file = run_dir / "skipped_files.txt"
    samples = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "plots").glob("sample*.png")) \
        if (run_dir / "plots").is_dir() else []
    if check is None and not skipped_file.exists() and not samples:
        return ""
    parts = ["<section id=data><h2>Data</h2>"]
    if isinstance(check, dict):
        counts = check.get("counts")
        if isinstance(counts, dict):
            parts.append("<h3>Images per class and split</h3>" + _counts_table(counts, run_dir))
        warnings = check.get("warnings") or []
        if isinstance(warnings, str):
            warnings = [warnings]
        if warnings:
            parts.append("<h3>Audit warnings</h3><ul>" + "".join(
                f"<li class=warn>{escape(w if isinstance(w, str) else json.dumps(w))}</li>" for w in warnings) + "</ul>")
        elif "warnings" in check:
            parts.append("<p>The data audit found no problems.</p>")
        problems, facts = [], []
        for key, v in check.items():
            if key in ("counts", "warnings", "class_names", "image_size"):
                continue
            if isinstance(v, (list, dict)):
                if v:
                    items = list(v.values()) if isinstance(v, dict) else v
                    problems.append([key.replace("_", " "), len(v), "; ".join(_describe(e) for e in items[:3])
                                     + (" ..." if len(items) > 3 else "")])
            elif key == "layout" and v == "saved":   # an index read back from a splits.csv
                facts.append(["split", "from splits.csv"])
            elif v is not None:
                facts.append([key, v])
        if facts:
            parts.append(table(["audit", "value"], facts, left=2))
        if problems:
            parts.append("<h3>Audit findings</h3>" + table(["finding", "count", "examples"], problems, left={0, 2}))
    if skipped_file.exists():
        lines = [l for l in skipped_file.read_text(errors="replace").splitlines() if l.strip()]
        parts.append(f"<p class=warn>{len(lines)} unreadable image(s) skipped (listed in skipped_files.txt)</p>"
                     + (f"<pre>{escape(chr(10).join(lines[:20]))}{chr(10) + '...' if len(lines) > 20 else ''}</pre>" if lines else ""))
    for rel in samples:
        shown.add(rel)
        parts.append(image(run_dir, rel, rel))
    return "".join(parts) + "</section>"


def section_phases(run_dir: Path, shown: set) -> str:
    phases = read_json(run_dir / "phases.json", None)
    if not isinstance(phases, list) or not phases:
        return ""
    parts = ["<section id=phases><h2>Training phases</h2>"]
    for p in phases:
        spec = p.get("freeze") or {}
        spec_text = ", ".join(f"{k}={v}" for k, v in spec.items() if v not in (None, "", False, 0, 0.0)
                              or k == "strategy")
        end = p.get("end_epoch")
        parts.append(f"<h3>Phase {escape(str(p.get('index', '?')))}: epochs {escape(str(_human_epoch(p.get('start_epoch'))))}"
                     f"..{escape(str(end if isinstance(end, int) else '?'))}</h3>"
                     f"<p class=muted>freeze: {escape(spec_text)}</p>")
        rows = p.get("summary") or []
        if rows and isinstance(rows, list):
            keys = [k for k in ("stage", "trainable", "frozen", "bn_training") if any(k in r for r in rows)]
            keys += [k for r in rows for k in r if k not in keys]
            keys = list(dict.fromkeys(keys))
            parts.append(table(keys, [[r.get(k, "") for k in keys] for r in rows]))
    return "".join(parts) + "</section>"


def section_curves(run_dir: Path, shown: set) -> str:
    img = image(run_dir, "plots/history.png", "training curves")
    if not img:
        return ""
    shown.add("plots/history.png")
    return f"<section id=curves><h2>Training curves</h2>{img}</section>"


def section_metrics(run_dir: Path, shown: set) -> str:
    metrics = read_json(run_dir / "metrics.json", None)
    if not isinstance(metrics, dict) or not metrics:
        return ""
    parts = ["<section id=metrics><h2>Evaluation</h2>"]
    used = model_epoch(run_dir)
    if used:
        parts.append(f"<p>Evaluated: the model's weights of epoch {used[0]}, {escape(used[1])}.</p>")
    for split, m in metrics.items():
        if not isinstance(m, dict) or split == "model":
            continue
        parts.append(f"<h3>{escape(split)} split ({escape(str(m.get('n', '?')))} images)</h3>")
        head = [(k, m[k]) for k in ("accuracy", "loss", "top5_accuracy") if k in m]
        head += [(f"{avg} {k}", m[avg][k]) for avg in ("macro",) if isinstance(m.get(avg), dict)
                 for k in ("precision", "recall", "f1") if k in m[avg]]
        if head:
            parts.append(table([k for k, _ in head], [[v for _, v in head]], left=0))
        tta = m.get("tta")
        if isinstance(tta, dict):   # test-time augmentation, beside the plain figures
            keys = [k for k in ("accuracy", "loss", "top5_accuracy", "macro_f1") if k in tta]
            parts.append(f"<h3>With test-time augmentation ({escape(str(tta.get('mode')))}, "
                         f"{escape(str(tta.get('views')))} views per image)</h3>"
                         + table(keys, [[tta[k] for k in keys]], left=0))
        per = m.get("per_class") or []
        if per:
            parts.append("<h3>Per class</h3>" + _per_class_tables(run_dir, split, per))
        for rel, title in ((f"plots/confusion_{split}.png", "Confusion matrix"),
                           (f"plots/per_class_accuracy_{split}.png", "Per-class accuracy"),
                           (f"plots/predictions_{split}.png", "Predictions on random images")):
            img = image(run_dir, rel, f"{title} ({split})")
            if img:
                shown.add(rel)
                parts.append(f"<h3>{escape(title)}</h3>{img}")
        conf = m.get("most_confused") or []
        if conf:
            parts.append("<h3>Most confused classes</h3>" + table(
                ["true", "predicted as", "count"], [[c.get("true"), c.get("predicted"), c.get("count")] for c in conf], left=2))
        worst = m.get("highest_loss") or []
        if worst:
            parts.append("<h3>Highest-loss images</h3>" + table(
                ["image", "true", "predicted", "confidence", "loss"],
                [[w.get("file", f"#{w.get('index')}"), w.get("true"), w.get("predicted"), w.get("confidence"),
                  w.get("loss")] for w in worst[:10]], left=3))
    return "".join(parts) + "</section>"


def _per_class_tables(run_dir: Path, split: str, per: list[dict]) -> str:
    """Every class (natural order) up to MAX_CLASS_ROWS; above, the summary line, the lowest and
    highest classes by recall, and a link to the whole table (per_class_<split>.csv)."""
    head = ["class", "precision", "recall", "f1", "support"]

    def rows(items):
        return [[r.get("class", ""), r.get("precision", ""), r.get("recall", ""), r.get("f1", ""),
                 r.get("support", "")] for r in items]
    if len(per) <= MAX_CLASS_ROWS:
        return table(head, rows(sorted(per, key=lambda r: natural_key(r.get("class", "")))))
    return (f"<p>{escape(per_class_summary(per))}. Every class: {_link(run_dir, per_class_csv(split))}.</p>"
            f"<h4>Lowest {LOWEST} by recall (then F1)</h4>" + table(head, rows(lowest_classes(per)))
            + f"<h4>Highest {HIGHEST} by recall</h4>" + table(head, rows(highest_classes(per))))


def section_other_plots(run_dir: Path, shown: set) -> str:
    d = run_dir / "plots"
    rest = sorted(p.relative_to(run_dir).as_posix() for p in d.glob("*.png")) if d.is_dir() else []
    rest = [r for r in rest if r not in shown]
    if not rest:
        return ""
    return ("<section id=plots><h2>More plots</h2>"
            + "".join(f"<h3>{escape(Path(r).stem)}</h3>{image(run_dir, r, Path(r).stem)}" for r in rest) + "</section>")


def section_export(run_dir: Path, shown: set) -> str:
    items = []
    if (run_dir / "model.keras").is_file():
        items.append(("model.keras", (run_dir / "model.keras").stat().st_size))
    export = run_dir / "export"
    if export.is_dir():
        files = sorted(p for p in export.rglob("*") if p.is_file())
        items += [(p.relative_to(run_dir).as_posix(), p.stat().st_size) for p in files[:50]]
    if not items:
        return ""
    note = ""
    if (export / "saved_model").is_dir():
        versions = sorted((int(p.name) for p in (export / "saved_model").iterdir() if p.is_dir() and p.name.isdigit()))
        latest = f"export/saved_model/{versions[-1]}" if versions else "export/saved_model/1"
        note = ("<p>Serve the SavedModel in <code>export/saved_model/</code> (TensorFlow Serving serves its "
                f"highest version folder); without kfine, <code>tf.saved_model.load</code> takes the version "
                f"folder, <code>{escape(latest)}</code>. Its "
                "<code>serving_default</code> signature takes encoded images (JPEG, PNG, GIF or BMP files' "
                "bytes, any size) and decodes and resizes them itself; <code>serving_tensor</code> takes "
                "decoded RGB images at the training size. Probabilities are in class_names.json order.</p>"
                + _signatures_table(export / "signatures.json"))
    return ("<section id=export><h2>Model files</h2>" + note
            + table(["file", "size"], [[f, _size(s)] for f, s in items]) + "</section>")


def section_heatmaps(run_dir: Path, shown: set) -> str:
    """Grad-CAM heatmaps (kfine.explain): where the evidence lies on hard and on correct images."""
    parts = []
    for split in ("test", "val"):
        rel = f"plots/heatmaps_{split}.png"
        img = image(run_dir, rel, f"Grad-CAM heatmaps ({split})")
        if img:
            shown.add(rel)
            parts.append(f"<h3>{split}</h3>{img}")
    if not parts:
        return ""
    return ("<section id=heatmaps><h2>Why: class-activation heatmaps</h2><p class=muted>Grad-CAM on the "
            "backbone's last feature map for the predicted class: the highest-loss images, then one correct "
            "image per class; each image beside its heatmap (red: most evidence), true class, predicted class "
            "and its probability. A heatmap is as coarse as the feature map (image size / 32 for ResNet50).</p>"
            + "".join(parts) + "</section>")


def section_exports(run_dir: Path, shown: set) -> str:
    """Exported files measured against the Keras model (metrics.json "export": the LiteRT file)."""
    entries = (read_json(run_dir / "metrics.json", None) or {}).get("export") or {}
    if not entries:
        return ""

    def pct(v):
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else ""
    rows = [[fmt, e.get("file"), e.get("quantization"), _size(e["bytes"]) if e.get("bytes") else "",
             e.get("split"), e.get("n"), pct(e.get("accuracy")), pct(e.get("keras_accuracy")),
             pct(e.get("agreement"))] for fmt, e in sorted(entries.items())]
    lite = read_json(run_dir / "export" / "litert.json", None) or {}
    note = ""
    if lite.get("input"):
        i = lite["input"]
        note = (f"<p>The LiteRT file takes decoded images, input <code>{escape(i['name'])}</code> "
                f"{escape(i['dtype'])} [N, {i['shape'][1]}, {i['shape'][2]}, 3], RGB 0..255, after the run's "
                f"eval transform (resize the shorter side, centre crop); it returns probabilities in "
                f"class_names.json order.</p>")
    return ("<section id=exports><h2>Exports</h2>" + note
            + table(["format", "file", "quantization", "size", "split", "images", "accuracy", "Keras accuracy",
                     "same prediction"], rows, left=3) + "</section>")


def _signatures_table(path: Path) -> str:
    """The exported signatures (export/signatures.json, written from the traced functions)."""
    sigs = read_json(path, None)
    if not isinstance(sigs, dict):
        return ""
    def shape(spec):
        return "[" + ", ".join("N" if d is None else str(d) for d in spec.get("shape", [])) + "]"
    rows = [[name, kind, arg, spec.get("dtype", ""), shape(spec)]
            for name, sig in sigs.items() for kind in ("inputs", "outputs")
            for arg, spec in (sig.get(kind) or {}).items()]
    return "<h3>Signatures as exported</h3>" + table(["signature", "", "name", "dtype", "shape"], rows, left=5)


def section_compare(run_dir: Path, shown: set) -> str:
    """A comparison's directory (kfine.compare): its table, validation curves and runs."""
    path = run_dir / "compare.csv"
    if not path.exists():
        return ""
    import csv
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def pct(v):
        return f"{100 * float(v):.2f}%" if v not in (None, "") else ""
    head = ["set", "phases", "trainable params", "epochs", "wall time", "best val acc", "best epoch",
            "epoch used", "test acc", "published val", "published test", "status", "seconds by stage"]
    body = [[r["set"], r["phases"], int(r["trainable_params"]) if r["trainable_params"] else "", r["epochs"],
             f"{float(r['wall_s']):.1f} s", pct(r["best_val_accuracy"]), _human_epoch(r["best_epoch"] or None),
             _human_epoch(r["epoch_used"] or None) if r["epoch_used"] else "",
             pct(r["test_accuracy"]), pct(r["published_val"]), pct(r["published_test"]), r["status"],
             r.get("seconds_by_stage") or ""] for r in rows]
    shown.add("plots/compare.png")
    links = "".join(f'<li><a href="{escape(quote(r["set"]))}/report.html">{escape(r["set"])}</a></li>'
                    for r in rows if (run_dir / r["set"] / "report.html").is_file())
    return ("<section id=compare><h2>Comparison</h2><p class=muted>The same data, split, seed and evaluation "
            "for every run (compare.csv, compare.md). Trainable parameters are those of the last phase; "
            "test accuracy is that of the weights of the epoch used. Epochs count from 1, as in the "
            "training log (compare.csv holds history.csv's 0-based indices).</p>"
            + table(head, body, left={0, 1, 11, 12}) + image(run_dir, "plots/compare.png", "validation curves")
            + (f"<h3>Each run's report</h3><ul>{links}</ul>" if links else "") + "</section>")


def section_timings(run_dir: Path, shown: set) -> str:
    """Where the run's time went: run_info.json's timings (kfine.log.STAGES), seconds and shares."""
    from kfine.log import STAGE_HELP, STAGES
    timings = (read_json(run_dir / "run_info.json", None) or {}).get("timings")
    if not isinstance(timings, dict):
        return ""
    total = float(timings.get("total") or sum(float(timings.get(s, 0.0)) for s in STAGES)) or 1.0
    rows = [[s, STAGE_HELP.get(s, ""), f"{float(timings.get(s, 0.0)):.1f} s",
             f"{100 * float(timings.get(s, 0.0)) / total:.0f}%"] for s in STAGES]
    rows.append(["total", "the whole run (untimed steps included)", f"{total:.1f} s", ""])
    return ("<section id=timings><h2>Time</h2><p class=muted>Where this run's time went (run_info.json's "
            "timings; startup includes the process start). The report's own writing is not in it: the "
            "line kfine printed last and run_info.json have the final figures.</p>"
            + table(["stage", "what", "seconds", "share"], rows, left=2) + "</section>")


# results first, then how they were made
SECTIONS = [section_compare, section_summary, section_curves, section_metrics, section_heatmaps, section_phases,
            section_data, section_config, section_other_plots, section_export, section_exports, section_timings]


def render_report(run_dir) -> str:
    run_dir = Path(run_dir)
    shown: set = set()
    body = []
    for fn in SECTIONS:
        try:
            html = fn(run_dir, shown)
        except Exception as e:   # one unreadable file must not cost the whole report
            name = fn.__name__.replace("section_", "")
            html = (f"<section><h2>{escape(name)}</h2><p class=bad>could not show this section: "
                    f"{escape(type(e).__name__)}: {escape(str(e))}</p></section>")
        if html:
            body.append(html)
    nav = "".join(f'<a href="#{i}">{escape(i)}</a>' for i in
                  ("compare", "summary", "curves", "metrics", "heatmaps", "phases", "data", "config", "plots", "export",
                   "exports", "timings")
                  if f"<section id={i}>" in "".join(body))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    kind = "comparison" if (run_dir / "compare.csv").exists() else "run"
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>kfine {kind} {escape(run_dir.name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>kfine {kind}: {escape(run_dir.name)}</h1><p class=muted>{escape(str(run_dir.resolve()))} "
            f"&middot; report written {when}</p><nav>{nav}</nav>"
            + ("".join(body) or "<p>This run directory has no outputs yet.</p>")
            + "</main></body></html>\n")


def write_report(run_dir) -> Path:
    """Write run_dir/report.html (atomically) and return its path."""
    out = Path(run_dir) / "report.html"
    write_class_tables(run_dir)   # the whole per-class tables the report links above MAX_CLASS_ROWS classes
    atomic_write_text(out, render_report(run_dir))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m kfine.report RUN_DIR", file=sys.stderr)
        return 2
    run = Path(argv[0])
    if not run.is_dir():
        print(f"kfine.report: {run} is not a directory", file=sys.stderr)
        return 2
    print(f"kfine: wrote {write_report(run)}")
    return 0


if __name__ == "__main__":
    from kfine.cli import exit_main
    exit_main(main)
