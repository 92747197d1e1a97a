"""Evaluation: metrics on hand-made predictions, a real tiny model, a run directory, the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import eval_reference
from kfine.evaluate import compute_metrics, evaluate_model, evaluate_run, prediction_rows

NAMES = ["a", "b", "c", "d", "e", "f"]
# true label, probabilities over 6 classes (argmax = prediction)
CASES = [
    (0, [0.70, 0.10, 0.05, 0.05, 0.05, 0.05]),   # 0 -> 0
    (0, [0.30, 0.40, 0.10, 0.10, 0.05, 0.05]),   # 0 -> 1 wrong
    (1, [0.10, 0.60, 0.10, 0.10, 0.05, 0.05]),   # 1 -> 1
    (1, [0.05, 0.90, 0.02, 0.01, 0.01, 0.01]),   # 1 -> 1
    (2, [0.50, 0.10, 0.20, 0.10, 0.05, 0.05]),   # 2 -> 0 wrong
    (2, [0.10, 0.10, 0.50, 0.10, 0.10, 0.10]),   # 2 -> 2
    (3, [0.10, 0.10, 0.10, 0.60, 0.05, 0.05]),   # 3 -> 3
    (5, [0.20, 0.20, 0.20, 0.10, 0.28, 0.02]),   # 5 -> 4 wrong, true class ranked last (misses top-5)
    (0, [0.20, 0.50, 0.10, 0.10, 0.05, 0.05]),   # 0 -> 1 wrong
]


def known():
    labels = np.array([c[0] for c in CASES])
    probs = np.array([c[1] for c in CASES])
    return labels, probs


def test_compute_metrics_on_known_predictions():
    labels, probs = known()
    files = [f"img{i}.png" for i in range(len(labels))]
    m = compute_metrics(labels, probs, NAMES, files=files)
    assert m["n"] == 9
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["top5_accuracy"] == pytest.approx(8 / 9)
    p_true = [0.7, 0.3, 0.6, 0.9, 0.2, 0.5, 0.6, 0.02, 0.2]
    assert m["loss"] == pytest.approx(np.mean(-np.log(p_true)))

    cm = np.zeros((6, 6), int)
    for (t, _), q in zip(CASES, [0, 1, 1, 1, 0, 2, 3, 4, 1]):
        cm[t, q] += 1
    assert m["confusion_matrix"] == cm.tolist()
    assert m["confusion_matrix"][0] == [1, 2, 0, 0, 0, 0]

    per = {r["class"]: r for r in m["per_class"]}
    assert per["a"]["precision"] == pytest.approx(1 / 2)   # predicted a: #0 right, #4 wrong
    assert per["a"]["recall"] == pytest.approx(1 / 3)      # 3 a's, 1 found
    assert per["a"]["support"] == 3
    assert per["b"]["precision"] == pytest.approx(2 / 4)
    assert per["b"]["recall"] == pytest.approx(1.0)
    assert per["b"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert per["e"] == {"class": "e", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert per["f"]["recall"] == 0.0 and per["f"]["support"] == 1
    assert m["macro"]["recall"] == pytest.approx(np.mean([1 / 3, 1, 1 / 2, 1, 0, 0]))

    top = m["most_confused"]
    assert top[0] == {"true": "a", "predicted": "b", "count": 2, "share_of_true": pytest.approx(2 / 3)}
    assert [(p["true"], p["predicted"], p["count"]) for p in top[1:]] == [("c", "a", 1), ("f", "e", 1)]

    worst = m["highest_loss"]
    assert [w["index"] for w in worst] == [7, 4, 8, 1, 5, 2, 6, 0, 3]
    assert worst[0]["file"] == "img7.png" and worst[0]["true"] == "f" and worst[0]["predicted"] == "e"
    assert worst[0]["loss"] == pytest.approx(-np.log(0.02))
    assert worst[0]["confidence"] == pytest.approx(0.28)
    json.dumps(m)   # JSON-able as is


def test_compute_metrics_small_class_count_has_no_top5():
    m = compute_metrics([0, 1, 2], np.eye(3)[[0, 2, 2]], ["x", "y", "z"])
    assert "top5_accuracy" not in m
    assert "top5_accuracy" not in compute_metrics(range(5), np.eye(5), list("abcde"))   # always 1 with 5
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert "file" not in m["highest_loss"][0]
    with pytest.raises(ValueError, match="shape"):
        compute_metrics([0, 1], np.eye(3), ["x", "y", "z"])


def test_prediction_rows_topk_order():
    labels, probs = known()
    rows = prediction_rows(probs, NAMES, files=[f"f{i}" for i in range(9)], labels=labels, top_k=3)
    assert rows[7]["true_class"] == "f" and rows[7]["predicted_class"] == "e" and rows[7]["correct"] == 0
    assert [rows[7][f"top{r}_class"] for r in (1, 2, 3)] == ["e", "a", "b"]   # ties keep class order
    assert float(rows[3]["confidence"]) == pytest.approx(0.9)
    assert "top4_class" not in rows[0]


# ----------------------------------------------------------------------------- with a real model
@pytest.fixture(scope="module")
def tiny_model():
    from kfine.config import ModelConfig, ScratchConfig
    from kfine.model import build_model
    import keras
    keras.utils.set_random_seed(1)
    cfg = ModelConfig(backbone="scratch_cnn", weights=None, scratch=ScratchConfig(filters=(8, 16), dense_units=16))
    return build_model(cfg, 3, (32, 32))


def _probabilities(model, images):
    import keras
    from kfine.model import probabilities
    return keras.ops.convert_to_numpy(probabilities(model, images))


def _data(n=14, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, 32, 32, 3)).astype(np.float32)
    images[: n // 2] *= 0.2    # two visibly different groups so the predictions are not all one class
    labels = rng.integers(0, 3, n).astype(np.int32)
    return images, labels


def test_evaluate_model_matches_model_predict(tiny_model):
    import tensorflow as tf
    images, labels = _data()
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    files = [(f"x/{i}.png", int(l)) for i, l in enumerate(labels)]
    metrics, probs, got_labels = evaluate_model(tiny_model, ds, ["a", "b", "c"], files=files)
    expect = _probabilities(tiny_model, images)
    np.testing.assert_allclose(probs, expect, atol=1e-5)
    np.testing.assert_array_equal(got_labels, labels)
    assert metrics["accuracy"] == pytest.approx(float((expect.argmax(1) == labels).mean()))
    assert metrics["n"] == 14
    assert sum(map(sum, metrics["confusion_matrix"])) == 14
    assert all(w["file"].startswith("x/") for w in metrics["highest_loss"])
    # a file list that does not line up is dropped, not trusted
    metrics2, _, _ = evaluate_model(tiny_model, ds, ["a", "b", "c"], files=files[:-1])
    assert "file" not in metrics2["highest_loss"][0]


def test_evaluate_run_with_given_model_falls_back_to_val(tiny_model, tmp_path, capsys):
    import tensorflow as tf
    images, labels = _data(n=10)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"train": {"accuracy": 0.5}}))
    (run / "history.csv").write_text("epoch,phase,lr,loss,accuracy,val_loss,val_accuracy\n"
                                     "0,0,0.001,1.0,0.5,1.1,0.4\n1,0,0.001,0.8,0.6,1.0,0.5\n")
    files = [(f"/data/{i}.png", int(l)) for i, l in enumerate(labels)]
    datasets = SimpleNamespace(train=None, test=None, class_names=["a", "b", "c"],
                               val=tf.data.Dataset.from_tensor_slices((images, labels)).batch(3),
                               files={"val": files})
    m = evaluate_run(run, model=tiny_model, datasets=datasets)
    out = capsys.readouterr().out
    assert "no test split" in out and "kfine: evaluating on the val split: done in" in out
    assert f"kfine: wrote {run / 'metrics.json'}, {run / 'predictions.csv'}, plots/confusion_val.png" in out
    assert m["split"] == "val"
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved) == {"train", "val"} and saved["train"] == {"accuracy": 0.5}
    expect = _probabilities(tiny_model, images)
    assert saved["val"]["accuracy"] == pytest.approx(float((expect.argmax(1) == labels).mean()))
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [p for p, _ in files]
    assert [r["predicted_class"] for r in rows] == [["a", "b", "c"][i] for i in expect.argmax(1)]
    assert [r["true_class"] for r in rows] == [["a", "b", "c"][i] for i in labels]
    assert {"confidence", "top3_class", "top3_score", "split"} <= set(rows[0])
    for name in ("confusion_val.png", "per_class_accuracy_val.png", "predictions_val.png", "history.png"):
        assert (run / "plots" / name).stat().st_size > 1000
    assert (run / "report.html").exists()
    # --split val asked for: its own CSV, and the message names the file really written
    evaluate_run(run, model=tiny_model, datasets=datasets, split="val", report=False)
    out = capsys.readouterr().out
    assert f"kfine: wrote {run / 'metrics.json'}, {run / 'predictions_val.csv'}, plots/confusion_val.png" in out
    assert (run / "predictions_val.csv").is_file()


def test_evaluate_cli_end_to_end(tiny_model, tmp_path, capsys):
    """The command line (in process): the run's config points at a folder that has moved; --data finds it."""
    from conftest import make_folder
    from kfine.config import load_config, save_config
    from kfine.evaluate import main
    data_root = make_folder(tmp_path / "data", "single", per_class=10)
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, [f"data.root={tmp_path / 'old_place'}", "data.layout=single",
                             "data.image_size=[32,32]", "data.batch_size=4", "model.backbone=scratch_cnn",
                             "model.weights=null"])
    save_config(cfg, run / "config.yaml")
    tiny_model.save(run / "model.keras")
    (run / "class_names.json").write_text(json.dumps(["cat", "dog", "fox"]))
    assert main(["--run", str(run), "--data", str(data_root)]) == 0
    said = capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == ["test"]
    m = metrics["test"]
    with open(run / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m["n"] > 0
    assert all(r["file"].startswith(str(data_root)) for r in rows)
    assert all(Path(r["file"]).is_file() and Path(r["file"]).parent.name == r["true_class"] for r in rows)
    assert m["accuracy"] == pytest.approx(np.mean([r["true_class"] == r["predicted_class"] for r in rows]))
    assert {w["file"] for w in m["highest_loss"]} <= {r["file"] for r in rows}
    assert (run / "plots" / "confusion_test.png").exists()
    assert "confusion_test.png" in (run / "report.html").read_text()
    assert "test (" in said.out and "accuracy" in said.out
    assert "\x1b[" not in said.out + said.err          # not a terminal: no terminal codes


def test_a_model_saved_with_a_softmax_output_still_gives_its_probabilities(tiny_model, tmp_path):
    """kfine's models end in logits; a model.keras saved when they ended in the float32 softmax
    "probs" loads and gives the same probabilities through evaluate, predict (TTA), Grad-CAM and
    the SavedModel: nothing applies the softmax twice."""
    import keras
    import tensorflow as tf
    from kfine.evaluate import predict_views
    from kfine.explain import gradcam
    from kfine.export import export_model
    from kfine.model import outputs_logits, probabilities
    old = keras.Model(tiny_model.inputs, keras.layers.Activation("softmax", dtype="float32", name="probs")(
        tiny_model.get_layer("head_logits").output))          # the head as kfine built it before
    old.save(tmp_path / "old.keras")
    loaded = keras.saving.load_model(tmp_path / "old.keras", compile=False)
    assert outputs_logits(tiny_model) and not outputs_logits(loaded)
    images, labels = _data()
    logits = keras.ops.convert_to_numpy(tiny_model(images, training=False))
    want = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    assert not np.allclose(want, keras.ops.convert_to_numpy(keras.ops.softmax(want)), atol=1e-3)  # twice differs
    np.testing.assert_allclose(_probabilities(loaded, images), want, atol=1e-6)
    np.testing.assert_allclose(_probabilities(tiny_model, images), want, atol=1e-6)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    _, probs, _ = evaluate_model(loaded, ds, ["a", "b", "c"])
    np.testing.assert_allclose(probs, want, atol=1e-6)
    plain, flipped = predict_views(loaded, images, "flip")
    mirror = keras.ops.convert_to_numpy(keras.ops.softmax(tiny_model(images[:, :, ::-1], training=False)))
    np.testing.assert_allclose(plain, want, atol=1e-6)
    np.testing.assert_allclose(flipped, (want + mirror) / 2, atol=1e-6)   # the mean of probabilities
    np.testing.assert_allclose(predict_views(tiny_model, images, "flip")[1], (want + mirror) / 2, atol=1e-6)
    np.testing.assert_allclose(gradcam(loaded, images[:3])[1], want[:3], atol=1e-5)
    sm = export_model(loaded, ["a", "b", "c"], (32, 32), tmp_path / "export")["saved_model"]
    got = tf.saved_model.load(sm).signatures["serving_tensor"](image=tf.constant(images))["probabilities"]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probabilities(loaded, images)), want, atol=1e-6)


def _count_traces(model) -> list:
    """A list that grows by one each time Keras traces ``model``'s predict function (it calls
    ``predict_step`` only while tracing; the traced function runs without it)."""
    calls, step = [], model.predict_step

    def counted(data):
        calls.append(1)
        return step(data)
    model.predict_step = counted
    return calls


def _new_tiny_model():   # tiny_model is shared: its predict function may be traced already
    from kfine.config import ModelConfig, ScratchConfig
    from kfine.model import build_model
    cfg = ModelConfig(backbone="scratch_cnn", weights=None, scratch=ScratchConfig(filters=(8, 16), dense_units=16))
    return build_model(cfg, 3, (32, 32))


def test_evaluation_traces_the_predict_function_once():
    """14 images in batches of 4: the last batch (2 images) is padded, not traced again."""
    import tensorflow as tf
    tiny_model = _new_tiny_model()
    images, labels = _data()
    traces = _count_traces(tiny_model)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    _, probs, got = evaluate_model(tiny_model, ds, ["a", "b", "c"])
    assert len(traces) == 1
    assert probs.shape == (14, 3)   # the padding dropped
    np.testing.assert_allclose(probs, _probabilities(tiny_model, images), atol=1e-5)
    np.testing.assert_array_equal(got, labels)
    evaluate_model(tiny_model, ds, ["a", "b", "c"])   # a second evaluation of the same model: no trace
    assert len(traces) == 1


def test_evaluation_through_the_feature_extractor_gives_the_full_models_probabilities():
    """Where the feature cache built the model's extractor (kfine.features.model_parts), the
    evaluation runs images through it (traced once, by the feature pass) and the head on the
    features: the full model's probabilities, and the full model itself is never run."""
    import tensorflow as tf
    from kfine import features
    tiny_model = _new_tiny_model()
    images, labels = _data()
    want = _probabilities(tiny_model, images)
    extractor, head = features.model_parts(tiny_model)
    assert features.model_parts(tiny_model) == (extractor, head)   # built once per model
    full, ext = _count_traces(tiny_model), _count_traces(extractor)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    _, probs, _ = evaluate_model(tiny_model, ds, ["a", "b", "c"])
    np.testing.assert_allclose(probs, want, atol=1e-6, rtol=0)
    assert len(ext) == 1 and not full


def test_metrics_json_of_many_classes_is_written_compactly(tmp_path):
    """A confusion matrix of more classes than the report lists goes on one line (indenting it
    costs seconds at 1000 classes); a small one stays indented for reading."""
    from kfine.evaluate import write_metrics
    from kfine.report import MAX_CLASS_ROWS
    rng = np.random.default_rng(0)
    for c, lines in ((MAX_CLASS_ROWS + 1, 1), (6, None)):
        labels = np.arange(2 * c) % c
        probs = rng.dirichlet(np.ones(c), 2 * c)
        m = compute_metrics(labels, probs, [f"c{i}" for i in range(c)])
        write_metrics(tmp_path / "metrics.json", {"test": m})
        text = (tmp_path / "metrics.json").read_text()
        assert json.loads(text)["test"]["confusion_matrix"] == m["confusion_matrix"]
        if lines:
            assert text.count("\n") == lines
        else:
            assert text.count("\n") > c * c


def test_the_train_split_is_evaluated_on_its_eval_views_in_file_order(tiny_model, tmp_path):
    """--split train: the training files through the eval transform, in file order, the same
    probabilities every time (the training pipeline would crop, flip and shuffle them anew)."""
    from conftest import make_folder
    from kfine.config import load_config, save_config
    root = make_folder(tmp_path / "data", "single", per_class=10)
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, [f"data.root={root}", "data.layout=single", "data.image_size=[32,32]",
                                   "data.batch_size=4", "model.backbone=scratch_cnn", "model.weights=null",
                                   "data.augment.enabled=true", "data.augment.crop_scale=[0.08,1.0]",
                                   "data.augment.flip=true"]), run / "config.yaml")
    tiny_model.save(run / "model.keras")
    (run / "class_names.json").write_text(json.dumps(["cat", "dog", "fox"]))
    tables = []
    for _ in range(2):
        evaluate_run(run, split="train", report=False)
        with open(run / "predictions_train.csv") as f:
            tables.append(list(csv.DictReader(f)))
    assert tables[0] == tables[1] and len(tables[0]) > 8
    assert all(Path(r["file"]).parent.name == r["true_class"] for r in tables[0])   # each row its file's
    images = np.stack([eval_reference(Path(r["file"]).read_bytes()) for r in tables[0]]).astype(np.float32)
    expect = _probabilities(tiny_model, images)
    np.testing.assert_allclose([float(r["confidence"]) for r in tables[0]], expect.max(axis=1), atol=1e-4)
    assert [r["predicted_class"] for r in tables[0]] == [["cat", "dog", "fox"][i] for i in expect.argmax(axis=1)]
