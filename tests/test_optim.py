"""Optimizer semantics measured step by step: per-variable learning rates, weight decay (l2 vs
decoupled, no_decay), clipping, momentum, schedules under accumulation, EMA, layer decay, and the
optimizer state across phases."""
import numpy as np
import pytest

import keras

from kfine.config import (ConfigError, EmaConfig, FreezeConfig, ModelConfig, OptimizerConfig, ScheduleConfig,
                          TrainConfig)
from kfine.freeze import apply_freeze, format_summary, trainable_summary
from kfine.model import build_model, get_backbone, probabilities
from kfine.optim import (EpochSchedule, apply_ema_weights, build_optimizer, check_train, decay_flags, ema_weights,
                         make_schedule, stage_multipliers, variable_multipliers)


def variables(*values):
    return [keras.Variable(np.array(v, "float32"), name=f"v{i}") for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def resnet():
    """toy_resnet: ResNet50's layer names and stages in small (the same stage table)."""
    keras.utils.set_random_seed(0)
    return build_model(ModelConfig(backbone="toy_resnet", weights=None), 3, (32, 32))


# ----------------------------------------------------------------------------- learning rates
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_effective_step_is_scaled_per_variable(name):
    a, b = variables(np.ones((4, 4)), np.ones((4, 4)))
    opt = build_optimizer(OptimizerConfig(name=name), 0.01, [a, b], [1.0, 0.1])
    g = np.full((4, 4), 0.5, "float32")
    opt.apply([g, g], [a, b])
    step_a = 1.0 - a.numpy()
    step_b = 1.0 - b.numpy()
    assert np.all(step_a > 0)
    # Adam-type optimizers ignore gradient scale: only a real lr multiplier gives this ratio
    np.testing.assert_allclose(step_b / step_a, 0.1, rtol=1e-3)


def test_gradient_scaling_would_not_do_it_for_adam():
    """The reason for the design: under Adam a 10x smaller gradient gives the same step."""
    a, b = variables(np.ones(3), np.ones(3))
    opt = keras.optimizers.Adam(0.01)
    opt.apply([np.full(3, 1.0, "float32"), np.full(3, 0.1, "float32")], [a, b])
    np.testing.assert_allclose(1 - a.numpy(), 1 - b.numpy(), rtol=1e-3)


def test_multipliers_follow_stages(resnet):
    model = resnet
    apply_freeze(model, "toy_resnet", FreezeConfig("none"))
    variables_ = model.trainable_variables
    mults = variable_multipliers(model, "toy_resnet", {"layer3": 0.1, "conv5": 0.3, "head": 2.0}, variables_)
    by_path = dict(zip([v.path for v in variables_], mults))
    assert by_path[model.get_layer("head_logits").kernel.path] == 2.0
    bb = get_backbone(model)
    assert by_path[bb.get_layer("conv4_block1_1_conv").kernel.path] == 0.1
    assert by_path[bb.get_layer("conv5_block1_2_bn").gamma.path] == 0.3
    assert by_path[bb.get_layer("conv2_block1_1_conv").kernel.path] == 1.0
    with pytest.raises(ValueError, match="unknown stage"):
        variable_multipliers(model, "toy_resnet", {"conv9": 0.1}, variables_)


def test_layer_decay_gives_the_documented_multipliers_and_prints_them(resnet):
    model = resnet
    table = stage_multipliers(model, "toy_resnet", {}, layer_decay=0.5)
    assert table == {"head": 1.0, "conv5": 0.5, "conv4": 0.25, "conv3": 0.125, "conv2": 0.0625, "conv1": 0.03125}
    apply_freeze(model, "toy_resnet", FreezeConfig("none"))
    vs = model.trainable_variables
    by_path = dict(zip([v.path for v in vs], variable_multipliers(model, "toy_resnet", {}, vs, layer_decay=0.5)))
    bb = get_backbone(model)
    assert by_path[bb.get_layer("conv4_block1_2_conv").kernel.path] == 0.25
    assert by_path[bb.get_layer("conv1_conv").kernel.path] == 0.03125
    assert by_path[model.get_layer("head_logits").bias.path] == 1.0
    rows = trainable_summary(model, "toy_resnet", table)
    assert {r["stage"]: r["lr_mult"] for r in rows} == table
    text = format_summary(rows)
    assert "lr x" in text and any(line.startswith("conv4") and line.endswith("0.25") for line in text.splitlines())
    # explicit multipliers and the shorthand together: an error that names both keys
    with pytest.raises(ConfigError, match="layer_decay.*lr_multipliers"):
        check_train(TrainConfig(layer_decay=0.5, lr_multipliers={"head": 2.0}))
    from kfine.config import check_config, load_config
    with pytest.raises(ConfigError, match="layer_decay"):
        check_config(load_config(None, ["train.layer_decay=1.5"]))


# ----------------------------------------------------------------------------- weight decay
def _hand_steps(name, mode, w, grads, lr, wd, decays, mu=0.9, b1=0.9, b2=0.999, eps=1e-7):
    """The reference arithmetic (float64): Keras' SGD (m = mu m - lr g; w += m) and Adam, with
    l2 (g += wd w) or decoupled (w -= lr wd w first) decay."""
    w = np.array(w, "float64")
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = np.array(g, "float64")
        if decays and mode == "l2":
            g = g + wd * w
        if decays and mode == "decoupled":
            w = w - lr * wd * w
        if name == "sgd":
            m = mu * m - lr * g
            w = w + m
        else:
            m = m + (g - m) * (1 - b1)
            v = v + (g * g - v) * (1 - b2)
            alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            w = w - m * alpha / (np.sqrt(v) + eps)
    return w


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_weight_decay_step_matches_the_hand_computed_one(name, mode):
    """Two steps; variable 0 at multiplier 0.5 and decayed, variable 1 excluded (no_decay)."""
    w0, grads = np.array([2.0, -1.0, 0.5]), [np.array([0.5, 0.2, -0.3]), np.array([-0.1, 0.4, 0.2])]
    lr, wd = 0.1, 0.05
    a, b = variables(w0, w0)
    cfg = OptimizerConfig(name=name, momentum=0.9 if name == "sgd" else None, weight_decay=wd,
                          weight_decay_mode=mode)
    opt = build_optimizer(cfg, lr, [a, b], multipliers=[0.5, 1.0], decay=[True, False])
    for g in grads:
        opt.apply([g.astype("float32")] * 2, [a, b])
    np.testing.assert_allclose(a.numpy(), _hand_steps(name, mode, w0, grads, 0.5 * lr, wd, True), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), _hand_steps(name, mode, w0, grads, lr, wd, False), rtol=1e-5)
    # and the two modes really differ for these optimizers (so the test can tell them apart)
    other = "decoupled" if mode == "l2" else "l2"
    assert not np.allclose(_hand_steps(name, mode, w0, grads, 0.5 * lr, wd, True),
                           _hand_steps(name, other, w0, grads, 0.5 * lr, wd, True), rtol=1e-4)


def test_no_decay_defaults_to_norm_and_bias(resnet):
    model = resnet
    apply_freeze(model, "toy_resnet", FreezeConfig("none"))
    vs = model.trainable_variables
    flags = dict(zip([v.path for v in vs], decay_flags(model, ("bn", "bias"), vs)))
    bb = get_backbone(model)
    conv, bn, head = bb.get_layer("conv3_block1_2_conv"), bb.get_layer("conv3_block1_2_bn"), model.get_layer("head_logits")
    assert flags[conv.kernel.path] and flags[head.kernel.path]
    assert not flags[conv.bias.path] and not flags[head.bias.path]
    assert not flags[bn.gamma.path] and not flags[bn.beta.path]
    assert all(decay_flags(model, (), vs))                      # no_decay: [] decays everything
    with pytest.raises(ConfigError, match="no_decay"):
        decay_flags(model, ("norm",), vs)


# ----------------------------------------------------------------------------- clipping, momentum
def test_global_clipnorm_clips_all_gradients_together():
    g = [np.array([3.0, 0.0], "float32"), np.array([0.0, 4.0], "float32")]   # norms 3 and 4, global 5
    steps = {}
    for key in ("clipnorm", "global_clipnorm"):
        a, b = variables([0.0, 0.0], [0.0, 0.0])
        opt = build_optimizer(OptimizerConfig(name="sgd", **{key: 1.0}), 1.0, [a, b])
        opt.apply(g, [a, b])
        steps[key] = (np.linalg.norm(a.numpy()), np.linalg.norm(b.numpy()))
    np.testing.assert_allclose(steps["clipnorm"], (1.0, 1.0), rtol=1e-6)         # each to norm 1
    np.testing.assert_allclose(steps["global_clipnorm"], (0.6, 0.8), rtol=1e-6)  # scaled by 1/5


def test_momentum_only_where_the_optimizer_has_it():
    a, = variables([1.0])
    assert build_optimizer(OptimizerConfig(name="rmsprop"), 0.1, [a]).momentum == 0.0
    assert build_optimizer(OptimizerConfig(name="sgd"), 0.1, [a]).momentum == 0.0
    assert build_optimizer(OptimizerConfig(name="sgd", momentum=0.9), 0.1, [a]).momentum == 0.9
    bad = [
        (OptimizerConfig(name="adam", momentum=0.9), "adam has no momentum"),
        (OptimizerConfig(name="sgd", nesterov=True), "nesterov"),
        (OptimizerConfig(name="adamw", weight_decay=0.01, weight_decay_mode="l2"), "Adam.weight_decay"),
        (OptimizerConfig(clipnorm=1.0, global_clipnorm=1.0), "not both"),
    ]
    for cfg, words in bad:
        with pytest.raises(ConfigError, match=words):
            build_optimizer(cfg, 0.1, [a])


def test_optimizer_and_schedule_survive_serialisation():
    """model.keras stores the optimizer by its config: kfine's decay and the schedule come back."""
    sched = make_schedule(ScheduleConfig("cosine", 0.1), 10, 4, accumulate_steps=2)
    a, = variables([1.0])
    opt = build_optimizer(OptimizerConfig(name="adamw", weight_decay=0.01), sched, [a], accumulate_steps=2)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again).__name__ == "AdamW" and again.name == "adamw"
    assert (again.decay_rate, again.weight_decay_mode, again.weight_decay) == (0.01, "decoupled", None)
    assert again.gradient_accumulation_steps == 2
    assert isinstance(again._learning_rate, EpochSchedule) and again._learning_rate.get_config() == sched.get_config()


# ----------------------------------------------------------------------------- schedules
def test_schedules():
    cos = make_schedule(ScheduleConfig("cosine", 0.1), steps_per_epoch=10, total_epochs=4)
    vals = [float(cos(s)) for s in range(41)]
    assert vals[0] == pytest.approx(0.1) and vals[40] == pytest.approx(0.0, abs=1e-7)
    assert vals[20] == pytest.approx(0.05, rel=1e-5)                     # half way
    assert all(x >= y for x, y in zip(vals, vals[1:]))                   # smooth, monotone
    step = make_schedule(ScheduleConfig("step", 1.0, step_epochs=5), 10, 20)   # gamma: StepLR's 0.1
    assert float(step(49)) == pytest.approx(1.0) and float(step(50)) == pytest.approx(0.1)
    assert float(step(100)) == pytest.approx(0.01, rel=1e-5)
    warm = make_schedule(ScheduleConfig("constant", 0.2, warmup_epochs=2), 10, 5)
    assert float(warm(0)) == pytest.approx(0.2 / 20) and float(warm(19)) == pytest.approx(0.2)
    assert float(warm(50)) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="gamma is required for the exponential"):
        make_schedule(ScheduleConfig("exponential", 0.1), 10, 5)
    exp = make_schedule(ScheduleConfig("exponential", 0.1, gamma=0.9), 10, 5)
    assert float(exp(20)) == pytest.approx(0.1 * 0.81, rel=1e-5)
    # serialisable (saved with the model); the kind is not Keras' object name
    assert cos.get_config()["kind"] == "cosine" and "name" not in cos.get_config()
    again = EpochSchedule.from_config(cos.get_config())
    assert float(again(13)) == pytest.approx(vals[13])
    old = {**cos.get_config(), "name": "cosine"}
    del old["kind"]
    assert float(EpochSchedule.from_config(old)(13)) == pytest.approx(vals[13])   # older model.keras


def test_schedule_counts_optimizer_updates_under_accumulation():
    """4 batches per update, 8 batches per epoch = 2 updates per epoch: update k gets the rate
    the same schedule gives update k without accumulation (2 batches per epoch), measured as the
    step an SGD optimizer takes on a constant gradient of 1."""
    cfg = ScheduleConfig("cosine", 0.1, warmup_epochs=1)
    acc = make_schedule(cfg, steps_per_epoch=8, total_epochs=4, accumulate_steps=4)
    plain = make_schedule(cfg, steps_per_epoch=2, total_epochs=4)
    w, = variables([0.0])
    opt = build_optimizer(OptimizerConfig(name="sgd"), acc, [w], accumulate_steps=4)
    steps = []
    for k in range(8):
        before = float(w.numpy()[0])
        for _ in range(4):
            opt.apply([np.ones(1, "float32")], [w])
        steps.append(before - float(w.numpy()[0]))
        assert int(keras.ops.convert_to_numpy(opt.iterations)) == k + 1
    np.testing.assert_allclose(steps, [float(plain(k)) for k in range(8)], rtol=1e-5)
    np.testing.assert_allclose(steps, [float(acc.at_update(k)) for k in range(8)], rtol=1e-5)
    assert steps[0] == pytest.approx(0.05, rel=1e-4)          # warmup: half way after one of 2 updates


# ----------------------------------------------------------------------------- EMA
def test_ema_equals_the_hand_computed_average_after_3_steps():
    a, b, frozen = variables([1.0, 2.0], [0.5], [3.0])
    opt = build_optimizer(OptimizerConfig(name="sgd", momentum=0.5), 0.1, [a, b, frozen],
                          ema=EmaConfig(enabled=True, momentum=0.8))
    opt.set_active_variables([a, b])                  # `frozen` is not trained in this phase
    seen = []
    for g in ([1.0, -1.0], [0.5, 2.0], [-1.0, 0.3]):
        opt.apply([np.array(g, "float32"), np.array([g[0]], "float32")], [a, b])
        seen.append((a.numpy().copy(), b.numpy().copy()))
    avg = [seen[0][0], seen[0][1]]                    # Keras: the first step takes the value
    for va, vb in seen[1:]:
        avg = [0.8 * avg[0] + 0.2 * va, 0.8 * avg[1] + 0.2 * vb]
    pairs = dict((id(v), ave) for v, ave in opt.ema_pairs())
    np.testing.assert_allclose(pairs[id(a)].numpy(), avg[0], rtol=1e-6)
    np.testing.assert_allclose(pairs[id(b)].numpy(), avg[1], rtol=1e-6)
    np.testing.assert_array_equal(pairs[id(frozen)].numpy(), [3.0])        # holds its value
    assert not np.allclose(avg[0], a.numpy())                                # a real average
    # resume keeps it: the averages are optimizer variables (what the backup saves)
    assert all(any(ave is o for o in opt.variables) for ave in pairs.values())
    # fit()'s finalize at a phase end changes nothing; apply_ema_weights writes the averages in
    raw = a.numpy().copy()
    opt.finalize_variable_values([a, b])
    np.testing.assert_array_equal(a.numpy(), raw)
    assert apply_ema_weights(opt)
    np.testing.assert_allclose(a.numpy(), avg[0], rtol=1e-6)
    np.testing.assert_array_equal(frozen.numpy(), [3.0])


def test_ema_moves_once_per_update_under_accumulation():
    w, = variables([1.0])
    opt = build_optimizer(OptimizerConfig(name="sgd"), 0.1, [w], ema=EmaConfig(enabled=True, momentum=0.5),
                          accumulate_steps=3)
    values = []
    for g in (1.0, 2.0, -4.0):                        # three updates of three batches each
        for _ in range(3):
            opt.apply([np.array([g], "float32")], [w])
        values.append(float(w.numpy()[0]))
    expected = values[0]
    for v in values[1:]:
        expected = 0.5 * expected + 0.5 * v
    assert float(opt.ema_pairs()[0][1].numpy()[0]) == pytest.approx(expected, rel=1e-5)


def test_ema_weights_swaps_in_and_out():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = build_optimizer(OptimizerConfig(name="sgd"), 0.5, model.trainable_variables, ema=EmaConfig(True, 0.9))
    model.compile(opt, "mse")
    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    raw = [v.numpy().copy() for v in model.weights]
    averages = [a.numpy().copy() for _, a in opt.ema_pairs()]
    assert not np.allclose(raw[0], averages[0])
    with ema_weights(model):
        for v, a in zip(model.weights, averages):
            np.testing.assert_array_equal(v.numpy(), a)
    for v, r in zip(model.weights, raw):
        np.testing.assert_array_equal(v.numpy(), r)


# ----------------------------------------------------------------------------- accumulation
def _tiny_cnn(seed):
    keras.utils.set_random_seed(seed)
    from kfine.config import ScratchConfig
    cfg = ModelConfig(backbone="scratch_cnn", weights=None,
                      scratch=ScratchConfig(filters=(4, 8), kernel_size=3, dense_units=8, dropout=0.0))
    return build_model(cfg, 3, (16, 16))


def test_four_accumulated_batches_of_8_equal_one_batch_of_32():
    """SGD with momentum, per-stage multipliers, l2 decay and a frozen stage (the per-variable
    mixin on a subset of the built variables): 4 x 8 accumulated == 1 x 32."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, 32)
    cfg = OptimizerConfig(name="sgd", momentum=0.9, weight_decay=0.01, weight_decay_mode="l2")
    result = {}
    for acc in (1, 4):
        model = _tiny_cnn(1)
        union = model.trainable_variables
        mults = variable_multipliers(model, "scratch_cnn", {"block2": 0.5, "head": 2.0}, union)
        opt = build_optimizer(cfg, 0.05, union, mults, decay_flags(model, ("bias",), union), accumulate_steps=acc)
        apply_freeze(model, "scratch_cnn", FreezeConfig("regex", pattern="^block2_"))   # block1 frozen
        opt.set_active_variables(model.trainable_variables)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy())
        before = [v.numpy().copy() for v in model.weights]
        for _ in range(2):                           # two updates
            for i in range(0, 32, 32 // acc):
                model.train_on_batch(x[i:i + 32 // acc], y[i:i + 32 // acc])
        assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2
        result[acc] = [v.numpy() for v in model.weights]
        frozen = get_backbone(model).get_layer("block1_conv").kernel
        np.testing.assert_array_equal(frozen.numpy(), before[[id(v) for v in model.weights].index(id(frozen))])
    for one, four in zip(result[1], result[4]):
        np.testing.assert_allclose(four, one, rtol=1e-4, atol=1e-6)
    assert not np.allclose(result[1][-2], before[-2])   # the head did train


# ----------------------------------------------------------------------------- across phases
def test_optimizer_state_carries_across_phases(resnet):
    """One optimizer built over every variable any phase trains: moments and the step counter
    carry over at a phase change, and a newly unfrozen variable is accepted."""
    model = resnet
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 0])
    apply_freeze(model, "toy_resnet", FreezeConfig("none"))
    union = list(model.trainable_variables)
    opt = build_optimizer(OptimizerConfig("adam"), 1e-3, union)
    head = model.get_layer("head_logits").kernel
    m_index = opt._get_variable_index(head)

    apply_freeze(model, "toy_resnet", FreezeConfig("backbone"))
    opt.set_active_variables(model.trainable_variables)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))   # kfine models end in logits
    model.train_on_batch(x, y)
    m_after_phase0 = np.array(opt._momentums[m_index].numpy())
    assert int(opt.iterations.numpy()) == 1 and np.any(m_after_phase0 != 0)
    conv5 = get_backbone(model).get_layer("conv5_block1_2_conv").kernel
    assert not np.any(opt._momentums[opt._get_variable_index(conv5)].numpy())

    apply_freeze(model, "toy_resnet", FreezeConfig("stages", trainable_from="conv5"))
    opt.set_active_variables(model.trainable_variables)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))   # kfine models end in logits
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True), from_logits=True)
        loss = tf.reduce_mean(loss)
    g2 = tape.gradient(loss, head.value).numpy()
    model.train_on_batch(x, y)
    assert int(opt.iterations.numpy()) == 2
    m_new = opt._momentums[m_index].numpy()
    # beta_1 = 0.9 momentum kept: m2 = 0.9 m1 + 0.1 g2 (a fresh optimizer would give 0.1 g2)
    np.testing.assert_allclose(m_new, 0.9 * m_after_phase0 + 0.1 * g2, rtol=0.05, atol=1e-4)  # fused-kernel round-off
    assert not np.allclose(m_new, 0.1 * g2, rtol=0.05, atol=1e-4)
    assert np.any(opt._momentums[opt._get_variable_index(conv5)].numpy() != 0)


def test_the_keras_internals_kfine_reads():
    """kfine.optim reads three private Keras attributes (its "Keras internals" block); pin what it
    assumes, so a Keras upgrade that changes them fails here first."""
    from kfine.optim import _batches_seen, _built_variables, _ema_averages, _variable_index
    a, b = variables([1.0], [2.0, 3.0])
    opt = build_optimizer(OptimizerConfig(name="adam"), 0.1, [a, b], ema=EmaConfig(True), accumulate_steps=2)
    assert _built_variables(opt) == [a, b]
    assert _variable_index(opt, b) == 1 and _variable_index(opt, b.value) == 1   # backend variable too
    avgs = _ema_averages(opt)
    assert len(avgs) == 2 and tuple(avgs[1].shape) == (2,)
    assert all(any(x is o for o in opt.variables) for x in avgs)
    for _ in range(3):
        opt.apply([np.ones(1, "float32"), np.ones(2, "float32")], [a, b])
    assert int(keras.ops.convert_to_numpy(_batches_seen(opt))) == 3
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 1


def test_label_smoothing_loss_matches_the_formula():
    """The loss takes the model's logits; ``from_logits=False`` (a model saved by an older kfine,
    ending in a softmax) takes probabilities: the same numbers."""
    from kfine.optim import make_loss
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    logits = (np.log(p) + np.array([[2.0], [-1.0]])).astype("float32")   # softmax(logits) == p
    y = np.array([0, 1])
    loss = float(make_loss(0.1, 3)(y, logits))
    target = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[y]
    expected = float(np.mean(-(target * np.log(p)).sum(axis=1)))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert float(make_loss(0.1, 3, from_logits=False)(y, p)) == pytest.approx(expected, rel=1e-5)
    assert float(make_loss(0.0, 3)(y, logits)) == pytest.approx(float(np.mean(-np.log(p[[0, 1], y]))), rel=1e-5)


def test_loss_on_float16_logits_stays_exact_where_float16_probabilities_saturate():
    """Mixed precision: a confident wrong logit. From logits the loss is exact (log-softmax in one
    step); the float16 softmax rounds the true class's probability to 0 and only a clip is left."""
    from kfine.optim import make_loss
    logits = np.array([[-12.0, 12.0, 0.0]], "float16")
    want = float(-(logits[0, 0] - np.log(np.exp(logits[0].astype(np.float64)).sum())))   # 24.0000...
    assert float(make_loss(0.0, 3)(np.array([0]), logits)) == pytest.approx(want, rel=1e-3)
    probs16 = keras.ops.softmax(keras.ops.convert_to_tensor(logits), axis=-1)
    assert float(make_loss(0.0, 3, from_logits=False)(np.array([0]), probs16)) < 0.8 * want


# ----------------------------------------------------------------------------- a whole run
def test_a_run_with_ema_accumulation_layer_decay_and_bn_stats(tmp_path):
    """train.run end to end: the history's lr counts optimizer updates (accumulation), phases.json
    records the BN mode and the lr multipliers, the final model, model.keras, the last periodic
    checkpoint and the exported SavedModel all hold the EMA weights."""
    import tensorflow as tf
    from conftest import make_folder
    from kfine.config import load_config
    from kfine.optim import inner_optimizer
    from kfine.rundir import read_json
    from kfine.train import read_history, run

    root = make_folder(tmp_path / "data", "single", per_class=8)
    cfg = load_config(None, [
        f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.image_size=[32,32]", "data.batch_size=4",
        "model.weights=null", "train.verbose=0", "data.augment.enabled=false", "name=t", "model.backbone=scratch_cnn",
        "model.scratch={filters: [4, 4, 8, 8, 8], batchnorm: true, dense_units: 8, dropout: 0.0}",
        "train.epochs=2", "train.accumulate_steps=2", "train.ema={enabled: true, momentum: 0.5}",
        "train.layer_decay=0.5", "train.schedule={name: cosine, learning_rate: 0.01}",
        "train.optimizer={name: sgd, momentum: 0.9, weight_decay: 0.001, weight_decay_mode: l2}",
        "train.phases=[{start_epoch: 0, freeze: {strategy: backbone}, bn: stats},"
        " {start_epoch: 1, freeze: {strategy: stages, trainable_from: block4}}]",
        "train.checkpoint.every_epochs=1", "export.formats=[saved_model]",
        # the lr falls under cosine, so the best epoch by it is the last: best.keras is the final epoch's
        "train.checkpoint.monitor=lr", "train.checkpoint.mode=min",
        "train.restore_best=false"])   # the claims are on the final epoch's (averaged) model
    result = run(cfg)
    rd = result.run_dir
    # the schedule counts updates: 2 batches per update, epochs rounded up to whole updates
    n_train = sum(read_json(rd / "data_check.json")["counts"]["train"].values())
    spe = -(-(-(-n_train // 4)) // 2) * 2
    opt = inner_optimizer(result.model.optimizer)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 2 * spe // 2
    sched = make_schedule(cfg.train.schedule, spe, 2, accumulate_steps=2)
    hist = read_history(rd / "history.csv")
    assert [r["lr"] for r in hist] == pytest.approx([float(sched.at_update((e + 1) * spe // 2 - 1)) for e in (0, 1)])
    phases = read_json(rd / "phases.json")
    assert [p["bn"] for p in phases] == ["stats", "train"]
    rows = {r["stage"]: r for r in phases[0]["summary"]}
    assert rows["block5"]["lr_mult"] == 0.5 and rows["block1"]["lr_mult"] == 0.5 ** 5
    assert rows["block1"]["bn_training"] == 1 and rows["block1"]["trainable"] == 0    # bn: stats
    # the model holds the averages, and so do model.keras, the last checkpoint and the export
    final = [np.array(v.numpy()) for v in result.model.weights]
    averages = {id(v): a.numpy() for v, a in opt.ema_pairs()}
    assert len(averages) > 0
    for v in result.model.weights:
        if id(v) in averages:
            np.testing.assert_array_equal(v.numpy(), averages[id(v)])
    assert read_json(rd / "checkpoints" / "best.json")["epoch"] == 1
    for path in (rd / "model.keras", rd / "checkpoints" / "best.keras"):
        saved = keras.saving.load_model(path, compile=False)
        for a, b in zip(saved.weights, final):
            np.testing.assert_array_equal(a.numpy(), b)
    # per-epoch validation ran on the averages too (SwapEMAWeights): the last epoch's val_loss is
    # the final (EMA) model's loss on the validation split
    from kfine import data as kdata
    val = kdata.make_datasets(cfg.data, cfg.seed).val
    assert result.model.evaluate(val, verbose=0, return_dict=True)["loss"] == pytest.approx(hist[-1]["val_loss"], rel=1e-4)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    served = tf.saved_model.load(str(rd / "export" / "saved_model" / "1"))
    got = served.signatures["serving_tensor"](image=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(probabilities(result.model, x)), atol=1e-5)
