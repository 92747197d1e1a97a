"""kfine.compare: a comparison of strategies on one split and one decoded cache, its table, plot
and report, --resume after an interruption, and the checks before anything runs."""
import re
from pathlib import Path

import pytest

from conftest import make_folder
from kfine import compare
from kfine.config import ConfigError, load_config
from kfine.rundir import read_json
from kfine.train import read_history

SCRATCH = "model.scratch={filters: [4, 4, 8, 8, 8], batchnorm: true, dense_units: 8, dropout: 0.0}"


def tiny(tmp_path, root):
    return [f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=8",
            "model.weights=null", "model.backbone=scratch_cnn", SCRATCH, "train.verbose=0",
            "data.augment.enabled=false", "export.enabled=false", "train.epochs=2"]


def read_csv(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def trainable_params(spec: dict) -> int:
    """What kfine.freeze says the strategy trains, on a freshly built model."""
    from kfine.config import FreezeConfig, ModelConfig, ScratchConfig
    from kfine.freeze import apply_freeze, trainable_summary
    from kfine.model import build_model
    cfg = ModelConfig(backbone="scratch_cnn", weights=None, scratch=ScratchConfig(
        filters=(4, 4, 8, 8, 8), batchnorm=True, dense_units=8, dropout=0.0))
    model = build_model(cfg, 3, (32, 32))
    apply_freeze(model, "scratch_cnn", FreezeConfig(**spec))
    return sum(r["trainable"] for r in trainable_summary(model, "scratch_cnn"))


def test_a_comparison_shares_split_and_cache_and_resumes_after_an_interruption(tmp_path, monkeypatch, capsys):
    import kfine.callbacks
    from kfine import pipeline
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", "single", per_class=8)       # 24 images
    (tmp_path / "c.yaml").write_text("name: cmp\ncompare:\n  reference:\n    backbone: {val: 0.755, test: 0.5}\n")
    args = ["--config", str(tmp_path / "c.yaml"), "--strategies", "backbone,bn_and_head,stages:block4",
            *tiny(tmp_path, root)]
    decoded = pipeline.BUILT["decoded"]
    # Ctrl-C in the second run, after its first epoch was committed
    seen = []

    def interrupt(point):
        seen.append(point)
        if seen.count("epoch@1") == 2:
            raise KeyboardInterrupt
    monkeypatch.setenv("KFINE_TEST_PAUSE", "epoch@1")
    monkeypatch.setattr(kfine.callbacks, "pause_for_test", interrupt)
    assert compare.main(args) == 130
    cdir = tmp_path / "runs" / "cmp-compare"
    progress = read_json(cdir / "progress.json")
    assert progress["backbone"]["status"] == "done" and progress["bn_and_head"]["status"] == "running"
    assert read_json(cdir / "bn_and_head" / "backup" / "state.json")["next_epoch"] == 1
    assert not (cdir / "stages-block4").exists()
    kept = (cdir / "backbone" / "model.keras").stat()

    monkeypatch.delenv("KFINE_TEST_PAUSE")
    capsys.readouterr()
    assert compare.main(["--resume", str(cdir)]) == 0
    out = capsys.readouterr().out
    assert "backbone finished before; kept" in out and "resuming at epoch 2" in out
    assert (cdir / "backbone" / "model.keras").stat().st_mtime_ns == kept.st_mtime_ns
    # each image decoded once for the whole comparison (both invocations, this process)
    assert pipeline.BUILT["decoded"] - decoded == 24

    rows = read_csv(cdir / "compare.csv")
    assert [r["set"] for r in rows] == ["backbone", "bn_and_head", "stages-block4"]
    specs = [{"strategy": "backbone"}, {"strategy": "bn_and_head"}, {"strategy": "stages", "trainable_from": "block4"}]
    expected = [trainable_params(s) for s in specs]
    assert [int(r["trainable_params"]) for r in rows] == expected and len(set(expected)) == 3
    split = (cdir / "splits.csv").read_text()
    for r in rows:
        rd = cdir / r["set"]
        hist = read_history(rd / "history.csv")
        assert [h["epoch"] for h in hist] == [0, 1] and r["status"] == "done" and int(r["epochs"]) == 2
        assert (rd / "splits.csv").read_text() == split                   # one split for all
        best = max(hist, key=lambda h: (h["val_accuracy"], h["epoch"]))
        assert float(r["best_val_accuracy"]) == pytest.approx(best["val_accuracy"])
        assert int(r["best_epoch"]) == best["epoch"] == int(r["epoch_used"])   # restore_best: auto
        assert float(r["test_accuracy"]) == pytest.approx(read_json(rd / "metrics.json")["test"]["accuracy"])
        assert float(r["wall_s"]) > 0
        from kfine.log import STAGES, stage_split   # where each run's time went, from its run_info.json
        timings = read_json(rd / "run_info.json")["timings"]
        assert set(STAGES) <= set(timings) and r["seconds_by_stage"] == stage_split(timings)
    assert (rows[0]["published_val"], rows[0]["published_test"]) == ("0.755", "0.5")
    assert rows[1]["published_val"] == rows[2]["published_val"] == ""
    md = (cdir / "compare.md").read_text().splitlines()
    assert len(md) == 2 + 3 and "75.50%" in md[2]
    for r, line in zip(rows, md[2:]):   # compare.csv: history.csv's 0-based index; compare.md counts from 1
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5].endswith(f"({int(r['best_epoch']) + 1})") and cells[6] == str(int(r["epoch_used"]) + 1)
    assert (cdir / "plots" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (cdir / "report.html").read_text()
    assert "<section id=compare>" in html and 'href="stages-block4/report.html"' in html
    assert 'src="plots/compare.png"' in html
    # the re-run command re-runs the comparison (its config.yaml holds the sets), not one base run
    assert f"python -m kfine.compare --config {cdir / 'config.yaml'}" in html
    assert "python -m kfine.train --config" not in html
    best_cell = re.search(r"<td>[\d.]+%</td><td>(\d+)</td><td>(\d+)</td>", html)
    assert best_cell.groups() == (str(int(rows[0]["best_epoch"]) + 1), str(int(rows[0]["epoch_used"]) + 1))
    saved = load_config(cdir / "config.yaml")                              # --resume needs nothing else
    assert list(saved.compare.sets) == ["backbone", "bn_and_head", "stages-block4"]


def test_the_comparison_plot_draws_one_curve_per_run_and_the_published_figure():
    from kfine.plots import compare_figure
    curves = {"a": [{"epoch": 0.0, "val_accuracy": 0.5, "val_loss": 1.0}, {"epoch": 1.0, "val_accuracy": 0.6, "val_loss": 0.9}],
              "b": [{"epoch": 0.0, "val_accuracy": 0.4, "val_loss": 1.2}]}
    fig = compare_figure(curves, {"b": 0.7})
    acc, loss = fig.axes
    lines = [l for l in acc.get_lines() if l.get_gid() != "published"]
    assert [l.get_label() for l in lines] == ["a", "b"] and list(lines[0].get_ydata()) == [0.5, 0.6]
    published = [l for l in acc.get_lines() if l.get_gid() == "published"]
    assert len(published) == 1 and list(published[0].get_ydata()) == [0.7, 0.7]
    assert published[0].get_color() == lines[1].get_color()
    assert len(loss.get_lines()) == 2


def test_strategies_shorthand_makes_one_phase_per_set():
    sets = compare.strategy_sets("backbone, stages:conv4,fraction:0.7,regex:conv5_.*", bn="stats")
    assert list(sets) == ["backbone", "stages-conv4", "fraction-0.7", "regex-conv5_.*"]
    assert sets["fraction-0.7"] == {"train.phases": [{"start_epoch": 0, "freeze": {"strategy": "fraction", "fraction": 0.7},
                                                      "bn": "stats"}]}
    assert sets["stages-conv4"]["train.phases"][0]["freeze"] == {"strategy": "stages", "trainable_from": "conv4"}
    assert sets["regex-conv5_.*"]["train.phases"][0]["freeze"]["pattern"] == "conv5_.*"
    with pytest.raises(ConfigError, match="only .* take an argument"):
        compare.strategy_sets("backbone:3")
    cfg = compare.with_strategies(load_config(None, ["train.epochs=3", "data.root=x"]), "bn_and_head")
    sub = compare.set_config(cfg, "bn_and_head", Path("runs/x-compare"))
    assert sub.train.phases[0].freeze.strategy == "bn_and_head" and sub.train.epochs == 3
    assert sub.run_dir == Path("runs/x-compare/bn_and_head") and sub.data.splits == "runs/x-compare/splits.csv"
    assert sub.compare.sets == {}


@pytest.mark.parametrize("sets, message", [
    ({"a": {"seed": 3}}, "compare.sets keys must be keys that keep the data, split and seed"),
    ({"a": {"data.root": "elsewhere"}}, "Received: compare.sets.a.data.root="),
    ({"a/b": {"train.epochs": 2}}, "compare.sets names must be a non-empty folder name"),
    ({"plots": {}}, "compare.sets names must be .* other than plots"),
])
def test_a_set_may_not_change_the_data_split_or_seed(sets, message):
    from kfine.config import Config, CompareConfig, check_config
    import dataclasses
    cfg = dataclasses.replace(Config(), compare=CompareConfig(sets=sets))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_config(cfg)


def test_reference_figures_are_fractions_of_val_or_test():
    from kfine.config import check_config
    with pytest.raises(ConfigError, match="compare.reference keys must be val or test"):
        check_config(load_config(None, ["compare.reference={a: {train: 0.5}}"]))
    with pytest.raises(ConfigError, match=r"Received: compare.reference.a.val=75.5"):
        check_config(load_config(None, ["compare.reference={a: {val: 75.5}}"]))


def test_a_bad_set_stops_before_anything_runs_and_leaves_no_directory(tmp_path, capsys):
    root = make_folder(tmp_path / "data", "single", per_class=4)
    (tmp_path / "c.yaml").write_text("name: cmp\ncompare:\n  sets:\n    ok: {train.epochs: 1}\n"
                                     "    bad: {train.phases.0.freeze: {strategy: fraction, fraction: 2.0}}\n")
    assert compare.main(["--config", str(tmp_path / "c.yaml"), *tiny(tmp_path, root)]) == 2
    err = capsys.readouterr().err
    assert "compare.sets.bad: train.phases.0.freeze.fraction must be in [0.0, 1.0]" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # nothing to compare, and --strategies on a resume, are one-line errors too
    (tmp_path / "n.yaml").write_text("name: n\n")
    assert compare.main(["--config", str(tmp_path / "n.yaml"), *tiny(tmp_path, root)]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("name: old\n")
    assert compare.main(["--resume", str(tmp_path / "old"), "--strategies", "backbone"]) == 2
    assert "--strategies cannot change the runs of a comparison being resumed" in capsys.readouterr().err
