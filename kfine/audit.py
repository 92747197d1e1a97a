"""The data audit: what is wrong with a dataset, from its file index, before anything trains.

Images per class per split (with an imbalance warning), files that could not be read or decoded,
files that are not images, exact duplicates by content hash and, above all, duplicates across
train/val/test (leakage), images smaller than the model input, classes too small for the split.
Everything comes from the index the run builds anyway (kfine.sources: scan + decode pass), so
the audit costs no extra pass over the files. ``python -m kfine.data check`` prints it;
``kfine.train`` writes it to data_check.json.
"""
from __future__ import annotations

from collections import defaultdict

from kfine.sources import SPLITS, FileIndex


def audit(index: FileIndex, image_size, source: str = "folder") -> dict:
    """A JSON-able report of ``index`` (see ``format_check``)."""
    split_of = {p: s for s in SPLITS for p, _ in index.files.get(s, [])}
    by_hash = defaultdict(list)
    for p in sorted(split_of):
        if p in index.info:
            by_hash[index.info[p].sha1].append(p)
    duplicates, leakage = [], []
    for digest, ps in sorted(by_hash.items()):
        if len(ps) < 2:
            continue
        splits = sorted({split_of[p] for p in ps})
        entry = {"sha1": digest, "paths": ps, "splits": splits}
        (leakage if len(splits) > 1 else duplicates).append(entry)
    h, w = image_size
    too_small = [{"path": p, "size": [i.height, i.width]} for p, i in sorted(index.info.items())
                 if p in split_of and i.height and (i.height < h or i.width < w)]
    counts = index.counts()
    warnings = imbalance_warnings(counts)
    if leakage:
        warnings.insert(0, f"LEAKAGE: {len(leakage)} image(s) appear in more than one split")
    warnings += index.notes
    return {"source": source, "root": index.root, "layout": index.layout, "class_names": index.class_names,
            "image_size": list(image_size), "counts": counts, "warnings": warnings,
            "unreadable": [{"path": p, "reason": r} for p, r in sorted(index.bad.items())],
            "non_images": index.non_images, "duplicates": duplicates, "leakage": leakage,
            "too_small": too_small, "too_few": index.too_few}


def imbalance_warnings(counts: dict) -> list[str]:
    train = counts.get("train") or {}
    if not train or min(train.values()) == 0:
        return []
    ratio = max(train.values()) / min(train.values())
    if ratio > 3:
        return [f"class imbalance: largest/smallest train class = {ratio:.1f} (> 3); use "
                "data.sampling: balanced (every class equally often in the batches; best when the "
                "smallest classes have a few dozen images or more) or train.class_weight: balanced "
                "(every image once per epoch, rare classes' losses weighted up; best when they are tiny)"]
    return []


def describe_layout(layout) -> str:
    """How the split was made, in words: ``layout single`` etc., or, for an index read back from a
    splits.csv (kfine.sources.read_splits: a resumed run, a comparison, data.splits), that."""
    return "split from splits.csv" if layout == "saved" else f"layout {layout}"


def format_check(report: dict) -> str:
    """A short human summary of an audit report."""
    lines = [f"kfine data check: {report.get('root') or report['source']} ({describe_layout(report['layout'])}), "
             f"{len(report['class_names'])} classes"]
    for split, c in report["counts"].items():
        lines.append(f"  {split}: {sum(c.values())} images ({min(c.values())}..{max(c.values())} per class)")
    for w in report["warnings"]:
        lines.append(f"  WARNING {w}")
    for e in report["leakage"]:
        lines.append(f"  LEAKAGE ({', '.join(e['splits'])}): " + " == ".join(e["paths"]))
    sections = [("unreadable", "unreadable images", lambda e: f"{e['path']}: {e['reason']}"),
                ("non_images", "files that are not images", str),
                ("duplicates", "duplicate images within a split", lambda e: " == ".join(e["paths"])),
                ("too_small", f"images smaller than {report.get('image_size')}",
                 lambda e: f"{e['path']} {e['size'][0]}x{e['size'][1]}"),
                ("too_few", "classes with too few images for the split",
                 lambda e: f"{e['class']}: {e['images']} (needs {e['needed']})")]
    for key, title, fmt in sections:
        items = report.get(key) or []
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {fmt(e)}" for e in items[:10]]
            if len(items) > 10:
                lines.append(f"    ... and {len(items) - 10} more (see data_check.json)")
    return "\n".join(lines)
