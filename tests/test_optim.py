"""Per-variable learning rates, schedules across phases, optimizer state across phases."""
import numpy as np
import pytest

import keras

from kfine.config import FreezeConfig, ModelConfig, OptimizerConfig, ScheduleConfig
from kfine.freeze import apply_freeze
from kfine.model import build_model, get_backbone
from kfine.optim import EpochSchedule, build_optimizer, make_schedule, variable_multipliers


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_effective_step_is_scaled_per_variable(name):
    a = keras.Variable(np.ones((4, 4), "float32"), name="a")
    b = keras.Variable(np.ones((4, 4), "float32"), name="b")
    opt = build_optimizer(OptimizerConfig(name=name, momentum=0.0), 0.01, [a, b], [1.0, 0.1])
    g = np.full((4, 4), 0.5, "float32")
    opt.apply([g, g], [a, b])
    step_a = 1.0 - a.numpy()
    step_b = 1.0 - b.numpy()
    assert np.all(step_a > 0)
    # Adam-type optimizers ignore gradient scale: only a real lr multiplier gives this ratio
    np.testing.assert_allclose(step_b / step_a, 0.1, rtol=1e-3)


def test_gradient_scaling_would_not_do_it_for_adam():
    """The reason for the design: under Adam a 10x smaller gradient gives the same step."""
    a = keras.Variable(np.ones(3, "float32"))
    b = keras.Variable(np.ones(3, "float32"))
    opt = keras.optimizers.Adam(0.01)
    opt.apply([np.full(3, 1.0, "float32"), np.full(3, 0.1, "float32")], [a, b])
    np.testing.assert_allclose(1 - a.numpy(), 1 - b.numpy(), rtol=1e-3)


def test_multipliers_follow_stages():
    model = build_model(ModelConfig(weights=None), 3, (32, 32))
    variables = model.trainable_variables
    mults = variable_multipliers(model, "resnet50", {"layer3": 0.1, "conv5": 0.3, "head": 2.0}, variables)
    by_path = dict(zip([v.path for v in variables], mults))
    assert by_path[model.get_layer("head_logits").kernel.path] == 2.0
    bb = get_backbone(model)
    assert by_path[bb.get_layer("conv4_block1_1_conv").kernel.path] == 0.1
    assert by_path[bb.get_layer("conv5_block3_3_bn").gamma.path] == 0.3
    assert by_path[bb.get_layer("conv2_block1_1_conv").kernel.path] == 1.0
    with pytest.raises(ValueError, match="unknown stage"):
        variable_multipliers(model, "resnet50", {"conv9": 0.1}, variables)


def test_schedules():
    cos = make_schedule(ScheduleConfig("cosine", 0.1), steps_per_epoch=10, total_epochs=4)
    vals = [float(cos(s)) for s in range(41)]
    assert vals[0] == pytest.approx(0.1) and vals[40] == pytest.approx(0.0, abs=1e-7)
    assert vals[20] == pytest.approx(0.05, rel=1e-5)                     # half way
    assert all(x >= y for x, y in zip(vals, vals[1:]))                   # smooth, monotone
    step = make_schedule(ScheduleConfig("step", 1.0, step_epochs=5, gamma=0.1), 10, 20)
    assert float(step(49)) == pytest.approx(1.0) and float(step(50)) == pytest.approx(0.1)
    assert float(step(100)) == pytest.approx(0.01, rel=1e-5)
    warm = make_schedule(ScheduleConfig("constant", 0.2, warmup_epochs=2), 10, 5)
    assert float(warm(0)) == pytest.approx(0.2 / 20) and float(warm(19)) == pytest.approx(0.2)
    assert float(warm(50)) == pytest.approx(0.2)
    # serialisable (saved with the model)
    again = EpochSchedule.from_config(cos.get_config())
    assert float(again(13)) == pytest.approx(vals[13])


def test_optimizer_state_carries_across_phases():
    """One optimizer built over every variable any phase trains: moments and the step counter
    carry over at a phase change, and a newly unfrozen variable is accepted."""
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(weights=None), 3, (32, 32))
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 0])
    apply_freeze(model, "resnet50", FreezeConfig("none"))
    union = list(model.trainable_variables)
    opt = build_optimizer(OptimizerConfig("adam"), 1e-3, union)
    head = model.get_layer("head_logits").kernel
    m_index = opt._get_variable_index(head)

    apply_freeze(model, "resnet50", FreezeConfig("backbone"))
    model.compile(opt, "sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    m_after_phase0 = np.array(opt._momentums[m_index].numpy())
    assert int(opt.iterations.numpy()) == 1 and np.any(m_after_phase0 != 0)
    conv5 = get_backbone(model).get_layer("conv5_block3_3_conv").kernel
    assert not np.any(opt._momentums[opt._get_variable_index(conv5)].numpy())

    apply_freeze(model, "resnet50", FreezeConfig("stages", trainable_from="conv5"))
    model.compile(opt, "sparse_categorical_crossentropy")
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = tf.reduce_mean(loss)
    g2 = tape.gradient(loss, head.value).numpy()
    model.train_on_batch(x, y)
    assert int(opt.iterations.numpy()) == 2
    m_new = opt._momentums[m_index].numpy()
    # beta_1 = 0.9 momentum kept: m2 = 0.9 m1 + 0.1 g2 (a fresh optimizer would give 0.1 g2)
    np.testing.assert_allclose(m_new, 0.9 * m_after_phase0 + 0.1 * g2, rtol=0.05, atol=1e-4)  # fused-kernel round-off
    assert not np.allclose(m_new, 0.1 * g2, rtol=0.05, atol=1e-4)
    assert np.any(opt._momentums[opt._get_variable_index(conv5)].numpy() != 0)


def test_label_smoothing_loss_matches_the_formula():
    from kfine.optim import make_loss
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    y = np.array([0, 1])
    loss = float(make_loss(0.1, 3)(y, p))
    target = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[y]
    expected = float(np.mean(-(target * np.log(p)).sum(axis=1)))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert float(make_loss(0.0, 3)(y, p)) == pytest.approx(float(np.mean(-np.log(p[[0, 1], y]))), rel=1e-5)
