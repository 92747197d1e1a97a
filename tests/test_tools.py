"""tools/: the GPU check runs end to end here (at toy sizes), so that time on a GPU machine is
spent measuring, not debugging."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import XLA_FLAGS

REPO = Path(__file__).resolve().parent.parent


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_figure(tmp_path):
    """tools/gpu_check.sh --smoke: every section runs (full fine-tune kfine vs plain model.fit,
    head-only with and without the feature cache, data_parallel vs none), in mixed_bfloat16 on
    the JAX backend where jax is installed; the JSON holds a positive number for every figure and
    the backend/device it ran on; peak memory is null on a CPU; the Markdown table is printed."""
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(PYTHON=sys.executable, KFINE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS)
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--smoke", "--out", str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    jax = importlib.util.find_spec("jax") is not None
    assert r["backend"] == ("jax" if jax else "tensorflow")
    assert r["platform"] == "cpu" and r["device"] and r["devices"] == 1
    assert r["precision"] == "mixed_bfloat16" and r["image_size"] == 32
    assert f"KERAS_BACKEND={r['backend']}" in done.stdout
    full, head, dist = r["full"], r["head"], r["distribute"]
    assert all(_number(full["images_per_s"][k]) for k in ("plain", "kfine")) and _number(full["ratio"])
    assert head["epochs"] == 3
    for aug in ("off", "on"):
        assert _number(head[f"aug_{aug}_cached"]) and _number(head[f"aug_{aug}_uncached"])
        assert _number(head["ratios"][aug])
    assert dist["strategy"] == ("data_parallel" if jax else "mirrored")
    assert dist["strategies"][dist["strategy"]]["replicas"] == 1
    assert all(_number(dist["images_per_s"][k]) for k in ("none", dist["strategy"])) and _number(dist["ratio"])
    for section in (r, full, head, dist):   # on a CPU there is no accelerator memory to count
        assert "peak_memory_bytes" in section and section["peak_memory_bytes"] is None
    # the cached runs trained the head on cached features (one view; K=2 views with augmentation)
    assert done.stdout.count("the head trains on cached backbone features") == 2
    assert "x 2 views" in done.stdout and done.stdout.count("train.feature_cache is off") == 2
    table = done.stdout[done.stdout.index("| cpu"):]
    assert "full fine-tune, steady state" in table and "head-only, 3 epochs, augmentation on" in table
    assert f"distribute.strategy {dist['strategy']}" in table


def test_gpu_check_without_tensorflow_says_what_to_install(tmp_path):
    """A Python without TensorFlow/Keras and no carried wheels: one line naming the fix, exit 2,
    before any work (set -euo pipefail elsewhere)."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nfor a; do case \"$a\" in *tensorflow*) exit 1;; esac; done\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "KFINE_SITE": str(tmp_path / "site"), "KFINE_WHEELS": str(tmp_path)}
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--smoke"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot import tensorflow and keras" in done.stderr and f"wheels in {tmp_path}/" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
