"""kfine.train end to end: phases, the freezing claims on the trained model, checkpoints,
resume after an interruption, precision, NaN, the CLI and the demo."""
import sys
import time

import numpy as np
import pytest

from conftest import interrupted_after_epoch, make_folder
from kfine.config import ConfigError, load_config
from kfine.rundir import read_json
from kfine.fit import class_weights
from kfine.train import TrainingError, read_history, run



def tiny(tmp_path, *extra, layout="single"):
    root = make_folder(tmp_path / "data", layout, per_class=8)
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", f"data.layout={layout}",
            "data.image_size=[32,32]", "data.batch_size=8", "model.weights=null", "train.verbose=0",
            "data.augment.enabled=false", "export.enabled=false", "name=t", "model.backbone=toy_resnet", *extra]


def kernel(model, layer):
    return np.array(model.get_layer("backbone").get_layer(layer).weights[0].numpy())


def test_two_phases_switch_at_the_right_epoch_and_freeze_what_they_say(tmp_path):
    import keras
    cfg = load_config(None, tiny(tmp_path, "train.epochs=3", "train.checkpoint.every_epochs=2",
                                 "train.schedule.name=cosine", "train.schedule.learning_rate=0.01",
                                 "train.restore_best=false",   # the claims are on the final epoch's model
                                 "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
                                 " {start_epoch: 2, freeze: {strategy: stages, trainable_from: conv5}}]"))
    result = run(cfg)
    rd = result.run_dir
    for f in ("config.yaml", "class_names.json", "history.csv", "phases.json", "model.keras",
              "checkpoints/epoch_0001.keras", "checkpoints/best.keras", "backup/state.json", "data_check.json"):
        assert (rd / f).exists(), f
    hist = read_history(rd / "history.csv")
    assert [r["epoch"] for r in hist] == [0, 1, 2] and [r["phase"] for r in hist] == [0, 0, 1]
    phases = read_json(rd / "phases.json")
    assert [(p["start_epoch"], p["end_epoch"]) for p in phases] == [(0, 2), (2, 3)]
    conv5 = {r["stage"]: r for r in phases[1]["summary"]}
    assert conv5["conv4"]["trainable"] == 0 and conv5["conv5"]["frozen"] == 0
    assert read_json(rd / "class_names.json") == ["cat", "dog", "fox"]
    # the freezing claims, on the trained models themselves: after phase 0 (epoch_0001) vs the end
    after0 = keras.saving.load_model(rd / "checkpoints" / "epoch_0001.keras")
    final = result.model
    for layer in ("conv1_conv", "conv3_block1_2_conv", "conv4_block1_2_conv", "conv4_block1_2_bn"):
        np.testing.assert_array_equal(kernel(after0, layer), kernel(final, layer))
    bn = "conv4_block1_2_bn"
    np.testing.assert_array_equal(after0.get_layer("backbone").get_layer(bn).moving_mean.numpy(),
                                  final.get_layer("backbone").get_layer(bn).moving_mean.numpy())
    assert not np.array_equal(kernel(after0, "conv5_block1_2_conv"), kernel(final, "conv5_block1_2_conv"))
    # one optimizer across phases: its step counter ran on
    steps = 3   # 24 train images after the 70/20/10 split -> 17 or so -> 3 batches of 8
    assert int(final.optimizer.iterations.numpy()) == pytest.approx(len(hist) * steps, abs=len(hist))
    lrs = [r["lr"] for r in hist]
    assert lrs[0] > lrs[1] > lrs[2] >= 0      # cosine runs on across the phase change


def test_a_finished_run_is_not_overwritten(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.epochs=1", "model.backbone=scratch_cnn",
                                 "model.scratch.filters=[4,4,8,8,8]"))
    first = run(cfg).run_dir
    second = run(cfg).run_dir
    assert first.name == "t" and second.name == "t-2" and (first / "model.keras").exists()


def test_checkpoints_at_the_configured_epochs(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.epochs=5", "model.backbone=scratch_cnn",
                                 "model.scratch.filters=[4,4,8,8,8]", "train.checkpoint.every_epochs=2",
                                 "train.checkpoint.keep=1", "train.checkpoint.monitor=val_loss"))
    rd = run(cfg).run_dir
    names = sorted(p.name for p in (rd / "checkpoints").glob("epoch_*.keras"))
    assert names == ["epoch_0003.keras"]          # epochs 1 and 3 written, keep=1
    best = read_json(rd / "checkpoints" / "best.json")
    hist = read_history(rd / "history.csv")
    assert best["val_loss"] == pytest.approx(min(r["val_loss"] for r in hist))
    assert not list(rd.rglob("*.tmp*"))           # atomic writes leave no temporaries


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains(tmp_path, precision):
    import keras
    try:
        cfg = load_config(None, tiny(tmp_path, "train.epochs=1", f"train.precision={precision}",
                                     "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]"))
        result = run(cfg)
        hist = read_history(result.run_dir / "history.csv")
        assert np.isfinite(hist[0]["loss"])
        assert result.model.get_layer("head_logits").compute_dtype == precision.split("_")[1]
        assert result.model.output.dtype == "float32"      # logits/probabilities and loss in float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    import keras
    import kfine.optim
    # a loss that turns NaN, through the real run(): log of a negative number
    monkeypatch.setattr(kfine.optim, "make_loss", lambda *a: (lambda y, p: keras.ops.log(p[:, 0] - 2.0)))
    cfg = load_config(None, tiny(tmp_path, "train.epochs=2", "model.backbone=scratch_cnn"))
    with pytest.raises(TrainingError, match="NaN"):
        run(cfg)
    assert not (tmp_path / "runs" / "t" / "model.keras").exists()


def test_bad_phase_lists(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.epochs=2",
                                 "train.phases=[{start_epoch: 0}, {start_epoch: 5}]"))
    with pytest.raises(ConfigError, match=r"train.phases.1.start_epoch must be < train.epochs \(2\)"):
        run(cfg)
    assert not (tmp_path / "runs").exists()   # checked before a run directory is made


def test_class_weights_balanced():
    cfg = load_config(None, ["train.class_weight=balanced"])
    w = class_weights(cfg, {"train": {"a": 30, "b": 10}}, ["a", "b"])
    assert w[0] == pytest.approx(40 / 60) and w[1] == pytest.approx(40 / 20)


def test_cli_end_to_end(tmp_path, capsys):
    """kfine.train's command line, in process (main(argv))."""
    from kfine.train import main
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {backbone: scratch_cnn, scratch: {filters: [4, 4, 8, 8, 8]}}\n")
    assert main(["--config", str(cfg_file), *tiny(tmp_path, "train.epochs=2", "train.verbose=1",
                                                  "model.backbone=scratch_cnn")]) == 0
    out = capsys.readouterr().out
    rd = tmp_path / "runs" / "t"
    assert str(rd) in out
    # stdout is not a terminal: one plain line per epoch instead of Keras' progress bar
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "phase 0"], ["epoch 2/2", "phase 0"]]
    assert all(" lr " in line and " val_accuracy " in line and line.endswith(" s") for line in lines), lines
    assert "\x1b" not in out and "\u2501" not in out and "kfine: phase 0 (epochs 1..2 of 2)" in out
    assert [r["epoch"] for r in read_history(rd / "history.csv")] == [0, 1]
    assert load_config(rd / "config.yaml").train.epochs == 2
    info = read_json(rd / "run_info.json")   # + the devices (kfine.distribute; tests/test_distribute.py)
    assert info["weights"] == {"requested": None, "used": "random", "note": "scratch_cnn trains from scratch"}
    assert info["model"]["weights"] == "best" and info["model"]["final_epoch"] == 1   # restore_best: auto
    assert (info["strategy"], info["replicas"]) == ("none", 1)
    assert main(["--config", str(cfg_file), "train.epoch=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.epoch" in err and "Traceback" not in err


def test_resume_after_an_interruption_finishes_every_epoch_once(tmp_path, monkeypatch, capsys):
    """A run interrupted after epoch 1's commit (in process; SIGKILL at every moment of a run is
    tests/test_checkpoint.py's kill chain); --resume finishes it with every epoch once, the phases
    as configured and the schedule where it was."""
    from kfine.train import main
    args = tiny(tmp_path, "train.epochs=6", "train.schedule.name=cosine", "model.backbone=scratch_cnn",
                "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
                " {start_epoch: 3, freeze: {strategy: stages, trainable_from: block4}}]",
                "data.augment.enabled=true")
    (tmp_path / "c.yaml").write_text("name: t\n")   # not the demo: a plain config

    with interrupted_after_epoch(monkeypatch, 1):   # epoch 1 is committed
        assert main(["--config", str(tmp_path / "c.yaml"), *args]) == 130
    rd = tmp_path / "runs" / "t"
    assert read_json(rd / "backup" / "state.json")["next_epoch"] == 2 and not (rd / "model.keras").exists()
    capsys.readouterr()
    assert main(["--resume", str(rd)]) == 0
    assert "resuming at epoch 3" in capsys.readouterr().out   # counted from 1
    hist = read_history(rd / "history.csv")
    assert [r["epoch"] for r in hist] == list(range(6))
    assert [r["phase"] for r in hist] == [0, 0, 0, 1, 1, 1]
    assert [p["start_epoch"] for p in read_json(rd / "phases.json")] == [0, 3]   # as configured
    # the schedule position survived: lr per epoch follows one cosine over all 6 epochs
    from kfine.optim import EpochSchedule
    cfg = load_config(rd / "config.yaml")
    n_train = sum(read_json(rd / "data_check.json")["counts"]["train"].values())
    spe = -(-n_train // cfg.data.batch_size)
    sched = EpochSchedule("cosine", cfg.train.schedule.learning_rate, spe, 6)
    expected = [float(sched((r["epoch"] + 1) * spe - 1)) for r in hist]
    assert [r["lr"] for r in hist] == pytest.approx(expected, rel=1e-5), (spe, n_train)


@pytest.mark.slow
def test_demo_without_arguments(tmp_path, monkeypatch, capsys):
    """kfine.train with no config (in process: main(argv)): the demo, with fewer epochs and steps;
    offline, it says so in one line and starts from random initialisation. (Its export: the
    installed wheel's demo run in test_cli.py, and CI's own run of the demo.)"""
    from kfine.train import main
    monkeypatch.setenv("KFINE_OFFLINE", "1")
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "cache"))
    assert main([f"runs_dir={tmp_path / 'runs'}", "train.epochs=2", "train.steps_per_epoch=2",
                 "export.enabled=false"]) == 0
    said = [l for l in capsys.readouterr().out.splitlines() if "random initialisation" in l]
    assert len(said) == 1 and "ImageNet weights for resnet50 could not be downloaded" in said[0], said
    rd = tmp_path / "runs" / "demo"
    hist = read_history(rd / "history.csv")
    assert [r["phase"] for r in hist] == [0, 1]
    assert len(read_json(rd / "class_names.json")) == 10
    for f in ("report.html", "metrics.json", "predictions.csv", "plots/history.png", "checkpoints/best.keras"):
        assert (rd / f).exists(), f


def test_a_run_over_planted_bad_files_completes_and_lists_them(tmp_path):
    args = tiny(tmp_path, "train.epochs=1", "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]")
    root = tmp_path / "data"
    (root / "cat" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "fox" / "notes.txt").write_text("not an image")
    result = run(load_config(None, args))
    listed = (result.run_dir / "skipped_files.txt").read_text()
    assert "truncated.jpg" in listed and "empty.png" in listed and "notes.txt" not in listed
    assert (result.run_dir / "model.keras").exists()
    audit = read_json(result.run_dir / "data_check.json")
    assert any("notes.txt" in str(p) for p in audit["non_images"])


def test_early_stopping_ends_the_run_early(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.epochs=6", "model.backbone=scratch_cnn",
                                 "model.scratch.filters=[4,4,8,8,8]", "train.early_stopping.patience=1",
                                 "train.early_stopping.min_delta=1000"))   # nothing improves by 1000
    rd = run(cfg).run_dir
    assert [r["epoch"] for r in read_history(rd / "history.csv")] == [0, 1]
    assert read_json(rd / "backup" / "state.json")["stopped"]   # the commit records the stop


@pytest.mark.parametrize("scope", ["phase", "run"])
def test_early_stopping_ends_the_phase_and_the_next_phase_trains(tmp_path, scope):
    """Nothing improves by 1000, patience 1: phase 0 (epochs 0..2) stops at epoch 1. With scope
    phase, phase 1 still starts at its configured epoch 3, at the schedule's rate for epoch 3,
    trains what it unfreezes, and stops at epoch 4 in turn; with scope run the run ends at epoch 1."""
    import keras
    cfg = load_config(None, tiny(tmp_path, "train.epochs=6", "model.backbone=scratch_cnn",
                                 "model.scratch.filters=[4,4,8,8,8]", "train.early_stopping.patience=1",
                                 "train.early_stopping.min_delta=1000", f"train.early_stopping.scope={scope}",
                                 "train.schedule={name: cosine, learning_rate: 0.01}", "train.restore_best=false",
                                 "train.checkpoint={every_epochs: 1, keep: 6}",
                                 "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}},"
                                 " {start_epoch: 3, freeze: {strategy: stages, trainable_from: block4}}]"))
    result = run(cfg)
    rd = result.run_dir
    hist = read_history(rd / "history.csv")
    assert [(r["epoch"], r["phase"]) for r in hist] == (
        [(0, 0), (1, 0), (3, 1), (4, 1)] if scope == "phase" else [(0, 0), (1, 0)])
    phases = read_json(rd / "phases.json")
    assert (phases[0]["stopped_early"], phases[0]["stopped_epoch"]) == (True, 1)
    if scope == "run":
        assert len(phases) == 1
        return
    assert (phases[1]["stopped_early"], phases[1]["stopped_epoch"]) == (True, 4)
    after0 = keras.saving.load_model(rd / "checkpoints" / "epoch_0001.keras")
    assert not np.array_equal(kernel(after0, "block4_conv"), kernel(result.model, "block4_conv"))   # phase 1 trained
    np.testing.assert_array_equal(kernel(after0, "block1_conv"), kernel(result.model, "block1_conv"))
    from kfine.optim import EpochSchedule   # the skipped epoch 2 counts for the schedule
    spe = -(-sum(read_json(rd / "data_check.json")["counts"]["train"].values()) // cfg.data.batch_size)
    sched = EpochSchedule("cosine", 0.01, spe, 6)
    assert [r["lr"] for r in hist] == pytest.approx([float(sched((r["epoch"] + 1) * spe - 1)) for r in hist], rel=1e-5)


# ----------------------------------------------------------------------------- train.restore_best
def _weights(path):
    import keras
    import kfine.model  # noqa: F401
    return {v.path: np.array(v.numpy()) for v in keras.saving.load_model(path, compile=False).weights}


def _restore_run(tmp_path, restore):
    """3 epochs whose best epoch is known in advance: the monitor is the learning rate, highest
    at epoch 0 under a cosine schedule (val_accuracy on 6 images would be a coin toss)."""
    return run(load_config(None, tiny(
        tmp_path, "train.epochs=3", "model.backbone=scratch_cnn", "model.scratch.filters=[4,4,8,8,8]",
        "train.schedule={name: cosine, learning_rate: 0.01}", "train.checkpoint={monitor: lr, mode: max, every_epochs: 1}",
        f"train.restore_best={restore}", "train.ema={enabled: true, momentum: 0.5}")))


def test_restore_best_evaluates_and_exports_the_best_epoch(tmp_path):
    from kfine import data as kdata
    from kfine.evaluate import evaluate_model
    result = _restore_run(tmp_path, "null")       # auto: there is a validation split
    rd = result.run_dir
    assert read_json(rd / "checkpoints" / "best.json")["epoch"] == 0
    best, final = _weights(rd / "checkpoints" / "best.keras"), _weights(rd / "model.keras")
    later = _weights(rd / "checkpoints" / "epoch_0001.keras")
    assert final.keys() == best.keys()
    for k in best:
        np.testing.assert_array_equal(final[k], best[k])
    assert any(not np.array_equal(best[k], later[k]) for k in best)   # training went on after epoch 0
    for v in result.model.weights:                                     # the model returned is the restored one
        np.testing.assert_array_equal(np.array(v.numpy()), best[v.path])
    metrics = read_json(rd / "metrics.json")
    assert metrics["model"] == {"epoch": 0, "weights": "best", "final_epoch": 2, "monitor": "lr",
                                "value": read_history(rd / "history.csv")[0]["lr"]}
    # the evaluation is that of best.keras
    import keras
    datasets = kdata.make_datasets(load_config(rd / "config.yaml").data, 0, splits=rd / "splits.csv")
    want, _, _ = evaluate_model(keras.saving.load_model(rd / "checkpoints" / "best.keras", compile=False),
                                datasets.test, datasets.class_names)
    assert metrics["test"]["accuracy"] == want["accuracy"] and metrics["test"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    html = (rd / "report.html").read_text()
    assert "Evaluated: the model's weights of epoch 1, the best by lr" in html


def test_restore_best_false_keeps_the_final_epoch(tmp_path):
    result = _restore_run(tmp_path, "false")
    rd = result.run_dir
    best, final = _weights(rd / "checkpoints" / "best.keras"), _weights(rd / "model.keras")
    assert any(not np.array_equal(best[k], final[k]) for k in best)
    for v in result.model.weights:
        np.testing.assert_array_equal(np.array(v.numpy()), final[v.path])
    assert read_json(rd / "metrics.json")["model"] == {"epoch": 2, "weights": "final", "final_epoch": 2}
    assert "the final epoch (train.restore_best: false)" in (rd / "report.html").read_text()


def test_restore_best_true_needs_a_validation_split(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "train.epochs=1", "model.backbone=scratch_cnn", "data.val_fraction=0",
                                 "train.restore_best=true"))
    with pytest.raises(ConfigError, match="train.restore_best is true but the data has no validation split"):
        run(cfg)
    assert not (tmp_path / "runs" / "t").exists()


def test_drop_remainder_counts_whole_batches_and_yields_only_full_ones(tmp_path):
    """train.drop_remainder=true (what null means under XLA): steps = n // batch and every batch
    is full; false (null on a CPU with TensorFlow): the partial batch is trained as well."""
    import keras
    from kfine.data import make_datasets
    from kfine.fit import drops_remainder, steps_per_epoch
    root = make_folder(tmp_path / "data", "inat", per_class=7)
    base = [f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8", "data.check=false"]
    for drop in (True, False):
        cfg = load_config(None, base + [f"train.drop_remainder={str(drop).lower()}"])
        ds = make_datasets(cfg.data, cfg.seed)
        n = sum(ds.counts["train"].values())
        assert n % 8 and drops_remainder(cfg) is drop
        sizes = [8] * (n // 8) + ([] if drop else [n % 8])
        assert steps_per_epoch(cfg, ds) == len(sizes)
        assert [len(y) for _, y in ds.dataset("train", drop_remainder=drop)] == sizes
    auto = load_config(None, base)
    assert drops_remainder(auto) is (keras.backend.backend() == "jax")   # the CI machine has no GPU


def test_limit_per_class_scans_and_decodes_only_the_capped_images(tmp_path, monkeypatch):
    """data.limit_per_class on the digits demo (1,797 images): the decode pass and the image cache
    hold limit x classes images, not the whole set; the same seed draws the same images."""
    from kfine import sources
    from kfine.config import DataConfig
    from kfine.data import make_datasets
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "cache"))
    scanned = []
    scan = sources.scan_files
    monkeypatch.setattr(sources, "scan_files", lambda paths, *a, **k: scanned.extend(paths) or scan(paths, *a, **k))
    cfg = DataConfig(source="digits", image_size=(32, 32), limit_per_class=5, check=False)
    ds = make_datasets(cfg, seed=0)
    assert len(ds.cache) == 50 and len(scanned) == 50
    assert sum(len(f) for f in ds.files.values()) == 50 and all(sum(c.values()) for c in ds.counts.values())
    assert sorted(ds.counts["train"]) == [str(i) for i in range(10)]
    assert make_datasets(cfg, seed=0).files == ds.files


def test_resume_of_a_finished_run_writes_only_what_is_missing(tmp_path, monkeypatch):
    """--resume of a finished run: with every output there it reads no data and writes nothing
    (every file's mtime unchanged); with the report deleted only the report is written, with an
    export format deleted only that format (and the report, which lists it)."""
    from kfine import data as kdata
    cfg = load_config(None, tiny(tmp_path, "train.epochs=1", "model.backbone=scratch_cnn",
                                 "model.scratch.filters=[4,4,8,8,8]", "export.enabled=true",
                                 "export.formats=[keras]"))
    rd = run(cfg).run_dir
    metrics = read_json(rd / "metrics.json")

    def mtimes():
        return {p.relative_to(rd).as_posix(): p.stat().st_mtime_ns for p in rd.rglob("*")
                if p.is_file() and p.name != ".lock"}   # the lock is each process's, not an output

    before = mtimes()
    assert {"model.keras", "metrics.json", "predictions.csv", "report.html", "plots/history.png",
            "plots/confusion_test.png", "export/model.keras"} <= set(before)
    monkeypatch.setattr(kdata, "make_datasets", lambda *a, **k: pytest.fail("the data was read"))
    time.sleep(0.01)
    again = run(cfg, resume=rd)
    assert mtimes() == before
    assert again.metrics == metrics["test"] and [r["epoch"] for r in again.history] == [0]
    assert [v.path for v in again.model.weights] and again.model.output_shape[-1] == 3

    (rd / "report.html").unlink()
    run(cfg, resume=rd)
    after = mtimes()
    assert {k for k in after if after[k] != before.get(k)} == {"report.html"}

    (rd / "export" / "model.keras").unlink()
    run(cfg, resume=rd)
    changed = {k for k, t in mtimes().items() if t != after.get(k)}
    assert changed == {"export/model.keras", "report.html"}


def test_a_broken_output_module_fails_the_run_and_resume_writes_the_outputs(tmp_path, monkeypatch, capsys):
    """A broken plots import (say matplotlib) fails the run with one clear line naming it, not a
    run "done" without plots; once repaired, --resume writes what is missing."""
    import kfine
    import kfine.plots
    from kfine.train import main
    cfg = load_config(None, tiny(tmp_path, "train.epochs=1", "model.backbone=scratch_cnn",
                                 "model.scratch.filters=[4,4,8,8,8]"))
    with monkeypatch.context() as m:
        m.delattr(kfine, "plots")
        m.setitem(sys.modules, "kfine.plots", None)   # `from kfine import plots` raises ImportError
        with pytest.raises(TrainingError, match=r"kfine\.plots.*--resume"):
            run(cfg)
    rd = tmp_path / "runs" / "t"
    assert (rd / "model.keras").is_file() and not (rd / "report.html").exists()
    assert "kfine: done" not in capsys.readouterr().out
    assert main(["--resume", str(rd)]) == 0
    assert (rd / "plots" / "history.png").is_file() and (rd / "report.html").is_file()
    assert "history plot" in capsys.readouterr().out


def test_restore_best_assigns_the_best_weights_to_the_same_model_in_place(tmp_path, monkeypatch):
    """use_best_epoch reads best.keras's weights into the trained model's own variables: the
    model object the run returns (and evaluates, saves) is the one trained, holding best.keras's
    weights, and no second model is deserialized from the file."""
    import keras
    from kfine import checkpoint
    seen, loads = {}, []
    load_model, use_best = keras.saving.load_model, checkpoint.use_best_epoch

    def spy_use_best(cfg, run_dir, model, *a, **k):
        seen["model"], seen["variables"] = model, [id(v) for v in model.weights]
        monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
        try:
            return use_best(cfg, run_dir, model, *a, **k)
        finally:
            monkeypatch.setattr(keras.saving, "load_model", load_model)
    monkeypatch.setattr(checkpoint, "use_best_epoch", spy_use_best)
    result = _restore_run(tmp_path, "true")
    assert not loads
    assert result.model is seen["model"] and [id(v) for v in result.model.weights] == seen["variables"]
    best = _weights(result.run_dir / "checkpoints" / "best.keras")
    assert read_json(result.run_dir / "checkpoints" / "best.json")["epoch"] == 0   # not the final epoch (2)
    for v in result.model.weights:
        np.testing.assert_array_equal(np.array(v.numpy()), best[v.path])


def test_a_run_ends_with_where_its_time_went(tmp_path, capsys):
    """Every stage's seconds: the last line printed, run_info.json's timings, the report."""
    from kfine.log import STAGES
    result = run(load_config(None, tiny(tmp_path, "train.epochs=2",
                                        "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}}]")))
    out = capsys.readouterr().out
    assert "the head trains on cached backbone features" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("kfine: time ") and all(f" {s} " in last for s in STAGES)
    timings = read_json(result.run_dir / "run_info.json")["timings"]
    assert set(timings) == set(STAGES) | {"total"} and timings == result.timings
    for stage in ("data", "model", "features", "training", "restore", "evaluation", "plots"):
        assert timings[stage] > 0, stage
    assert timings["export"] == 0                      # export.enabled=false
    assert sum(timings[s] for s in STAGES) <= timings["total"] + 1e-6
    html = (result.run_dir / "report.html").read_text()
    assert "<section id=timings>" in html and all(f"<td class=l>{s}</td>" in html for s in STAGES)
