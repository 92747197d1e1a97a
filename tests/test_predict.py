"""Predict on unlabelled folders: correct argmax, unreadable files listed, the CSV columns."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import eval_reference, write_image

from kfine.predict import collect_paths, main, predict_files

NAMES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def tiny_model():
    import keras
    from kfine.config import ModelConfig, ScratchConfig
    from kfine.model import build_model
    keras.utils.set_random_seed(2)
    cfg = ModelConfig(backbone="scratch_cnn", weights=None, scratch=ScratchConfig(filters=(8, 16), dense_units=16))
    return build_model(cfg, 3, (32, 32))


@pytest.fixture
def mixed_folder(tmp_path):
    """5 good 32x32 images (one in a subfolder), a corrupt .jpg, a text file."""
    rng = np.random.default_rng(0)
    d = tmp_path / "unlabelled"
    for i, color in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 240), (5, 5, 5)]):
        write_image(d / ("sub" if i == 4 else "") / f"img{i}.png", rng, size=(32, 32), base_color=color)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(200)))
    (d / "notes.txt").write_text("not an image")
    return d


def expected_probs(model, paths):
    """The model on the eval transform of each file (resize to the cache size, centre crop)."""
    images = np.stack([eval_reference(open(p, "rb").read(), 32) for p in paths])
    import keras
    from kfine.model import probabilities
    return keras.ops.convert_to_numpy(probabilities(model, images))


def test_predict_files_mixed_folder(tiny_model, mixed_folder):
    paths = collect_paths([mixed_folder])
    assert str(mixed_folder / "notes.txt") not in paths          # not an image: not even tried
    assert str(mixed_folder / "corrupt.jpg") in paths
    rows, bad = predict_files(tiny_model, paths, NAMES, (32, 32), batch_size=2, top_k=2, verbose=0)
    good = [p for p in paths if not p.endswith("corrupt.jpg")]
    assert [r["file"] for r in rows] == good
    assert [p for p, _ in bad] == [str(mixed_folder / "corrupt.jpg")] and bad[0][1]
    probs = expected_probs(tiny_model, good)
    assert [r["predicted_class"] for r in rows] == [NAMES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(1), atol=1e-4)
    second = np.argsort(-probs, axis=1)[:, 1]
    assert [r["top2_class"] for r in rows] == [NAMES[i] for i in second]
    assert all(float(r["top1_score"]) >= float(r["top2_score"]) for r in rows)


def test_predict_cli_writes_csv_and_lists_unreadable(tiny_model, mixed_folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    tiny_model.save(run / "model.keras")
    (run / "class_names.json").write_text(json.dumps(NAMES))
    out = tmp_path / "preds.csv"
    # a file named directly is used whatever its extension; one already in the folder counts once
    extra = write_image(tmp_path / "photo.dat", np.random.default_rng(1), size=(32, 32), fmt="PNG")
    rc = main(["--run", str(run), "--images", str(mixed_folder), str(extra), str(mixed_folder / "img0.png"),
               "--out", str(out), "--top-k", "5"])
    assert rc == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "corrupt.jpg" in err
    # stdout is not a terminal here: plain lines, none of Keras' progress bar's terminal codes
    assert "\x1b[" not in captured.out + err and "kfine: predicting 7 images" in captured.out
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # 3 classes: top-k is capped at the number of classes
    assert reader.fieldnames == ["file", "predicted_class", "confidence", "top1_class", "top1_score",
                                 "top2_class", "top2_score", "top3_class", "top3_score", "error"]
    ok = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(ok) == 6 and ok[-1]["file"] == str(extra) and len({r["file"] for r in ok}) == 6
    assert [r["file"] for r in bad] == [str(mixed_folder / "corrupt.jpg")]
    assert bad[0]["predicted_class"] == ""
    probs = expected_probs(tiny_model, [r["file"] for r in ok])
    assert [r["predicted_class"] for r in ok] == [NAMES[i] for i in probs.argmax(1)]


def test_predict_cli_missing_path(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")
    (run / "class_names.json").write_text("[]")
    assert main(["--run", str(run), "--images", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
