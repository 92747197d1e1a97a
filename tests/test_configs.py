"""Every config in configs/ loads and runs end to end at tiny sizes (offline: generated folders,
tfds mock data; weights=null; a ResNet config on toy_resnet, which has ResNet's stage names): a
search runs kfine.tune, a comparison kfine.compare, the rest kfine.train. The demo, which needs
no download (the digits), runs as `python -m kfine.train` with no arguments in test_train.py."""
from pathlib import Path

import pytest

from conftest import make_folder
from kfine.config import load_config
from kfine.rundir import read_json
from kfine.train import read_history

# demo.yaml is what `python -m kfine.train` runs with no arguments: tests/test_train.py's
# test_demo_without_arguments runs it (ResNet50, 2 epochs of 3 steps), so it is not run again here
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if p.stem != "demo")


def tiny_overrides(cfg, tmp_path):
    out = [f"runs_dir={tmp_path / 'runs'}", "data.image_size=[32,32]", "data.batch_size=4",
           "model.weights=null", "train.verbose=0", "train.steps_per_epoch=1", "export.enabled=false",
           f"train.epochs={len(cfg.train.phases)}", "data.limit_per_class=6"]
    out += [f"train.phases.{i}.start_epoch={i}" for i in range(len(cfg.train.phases))]
    if cfg.data.source == "folder":
        layout = "single" if cfg.data.layout == "auto" else cfg.data.layout
        root = make_folder(tmp_path / "data", layout, per_class=6)
        out.append(f"data.root={root}")
    if cfg.model.backbone.startswith("resnet"):
        out.append("model.backbone=toy_resnet")   # ResNet's stage names in a network that trains in ms
    if cfg.train.precision != "float32":
        out.append("train.precision=float32")   # the fp16 path has its own test; keep this fast
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_smoke_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KFINE_CACHE", str(tmp_path / "cache"))
    base = load_config(path)
    overrides = tiny_overrides(base, tmp_path)
    if base.data.source == "tfds":
        import tensorflow_datasets as tfds
        ctx = tfds.testing.mock_data(num_examples=60)
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        if base.search.space:
            from kfine import tune
            overrides += ["search.max_trials=1", "search.executions_per_trial=1"]
            assert tune.main(["--config", str(path), *overrides]) == 0
            best = next((tmp_path / "runs").glob("*-search/best.yaml"))
            assert load_config(best).search.space == {}
        elif base.compare.sets:
            from kfine import compare
            assert compare.main(["--config", str(path), *overrides]) == 0
            import csv
            with open(tmp_path / "runs" / f"{base.name}-compare" / "compare.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            assert [r["set"] for r in rows] == list(base.compare.sets)
            assert all(r["status"] == "done" for r in rows), rows
        else:
            from kfine.train import run
            result = run(load_config(path, overrides))
            hist = read_history(result.run_dir / "history.csv")
            assert [r["phase"] for r in hist] == list(range(len(base.train.phases)))
            assert len(read_json(result.run_dir / "class_names.json")) >= 2
