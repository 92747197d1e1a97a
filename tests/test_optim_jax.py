"""The same optimizer and BatchNorm claims on the JAX backend, where Keras' trainer calls the
optimizer's ``stateless_apply`` with only the phase's trainable variables (kfine's subset path):
BN modes after a real fit step, 4 accumulated batches of 8 == one batch of 32 with per-stage
multipliers, l2 decay, a frozen stage and EMA on, and the EMA of a frozen variable holding its
value. One subprocess (KERAS_BACKEND is fixed at import). Skipped where jax is not installed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import forkserver

pytest.importorskip("jax")
REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, numpy as np, keras
assert keras.backend.backend() == "jax"
from kfine.config import EmaConfig, FreezeConfig, ModelConfig, OptimizerConfig, ScratchConfig
from kfine.freeze import apply_freeze
from kfine.model import build_model, get_backbone
from kfine.optim import apply_ema_weights, build_optimizer, decay_flags, variable_multipliers

def cnn(seed, bn):
    keras.utils.set_random_seed(seed)
    s = ScratchConfig(filters=(4, 8), kernel_size=3, dense_units=8, dropout=0.0, batchnorm=bn)
    return build_model(ModelConfig(backbone="scratch_cnn", weights=None, scratch=s), 3, (16, 16))

rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (32, 16, 16, 3)).astype("float32")
y = rng.integers(0, 3, 32)
out = {}

# BatchNorm modes: block1 frozen, block2 trained, one fit step of 32
for mode in ("train", "stats", "frozen"):
    model = cnn(0, True)
    apply_freeze(model, "scratch_cnn", FreezeConfig("regex", pattern="^block2_"), mode)
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy())
    bb = get_backbone(model)
    f, t = bb.get_layer("block1_bn"), bb.get_layer("block2_bn")
    before = {id(w): np.array(w.numpy()) for w in model.weights}
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    moved = lambda w: bool(not np.array_equal(before[id(w)], w.numpy()))
    out[mode] = [moved(f.moving_mean), moved(f.gamma), moved(t.moving_mean), moved(t.gamma),
                 moved(bb.get_layer("block1_conv").kernel)]

# accumulation through fit (stateless_apply on the phase's subset), EMA on
cfg = OptimizerConfig(name="sgd", momentum=0.9, weight_decay=0.01, weight_decay_mode="l2")
res = {}
for acc in (1, 4):
    model = cnn(1, False)
    union = model.trainable_variables
    mults = variable_multipliers(model, "scratch_cnn", {"block2": 0.5, "head": 2.0}, union)
    opt = build_optimizer(cfg, 0.05, union, mults, decay_flags(model, ("bias",), union),
                          ema=EmaConfig(True, 0.5), accumulate_steps=acc)
    apply_freeze(model, "scratch_cnn", FreezeConfig("regex", pattern="^block2_"))
    opt.set_active_variables(model.trainable_variables)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy())
    frozen = get_backbone(model).get_layer("block1_conv").kernel
    start = np.array(frozen.numpy())
    model.fit(np.concatenate([x, x]), np.concatenate([y, y]), batch_size=32 // acc, epochs=1,
              verbose=0, shuffle=False)                          # two optimizer updates
    raw = [np.array(v.numpy()) for v in model.weights]
    avg = {id(v): np.array(a.numpy()) for v, a in opt.ema_pairs()}
    res[acc] = dict(raw=raw, avg=[avg[id(v)] for v in model.weights if id(v) in avg],
                    updates=int(keras.ops.convert_to_numpy(opt.iterations)),
                    frozen_same=bool(np.array_equal(frozen.numpy(), start)),
                    frozen_avg_same=bool(np.array_equal(avg[id(frozen)], start)))
    apply_ema_weights(opt)
    res[acc]["applied"] = bool(all(np.array_equal(v.numpy(), avg[id(v)]) for v in model.weights if id(v) in avg))
    res[acc]["raw_is_not_avg"] = bool(not np.allclose(raw[-2], avg[id(model.weights[-2])]))
out["acc_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(res[1]["raw"], res[4]["raw"]))
out["ema_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(res[1]["avg"], res[4]["avg"]))
for k in ("updates", "frozen_same", "frozen_avg_same", "applied", "raw_is_not_avg"):
    out[k] = [res[1][k], res[4][k]]
print("RESULT" + json.dumps(out))
"""


def test_optimizer_and_bn_modes_on_jax():
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = forkserver.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT", 1)[1])
    # [frozen BN stats moved, frozen gamma moved, trained BN stats moved, trained gamma moved, frozen kernel moved]
    assert out["train"] == [False, False, True, True, False]
    assert out["stats"] == [True, False, True, True, False]
    assert out["frozen"] == [False, False, False, True, False]
    assert out["updates"] == [2, 2]
    assert out["acc_max_diff"] < 1e-4 and out["ema_max_diff"] < 1e-4
    assert out["frozen_same"] == [True, True] and out["frozen_avg_same"] == [True, True]
    assert out["applied"] == [True, True] and out["raw_is_not_avg"] == [True, True]
