"""Optimizer, schedules and KL balancing against the original's formulas (docs/design.md)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.training.guarded_optimizer import global_norm
from nvae_tf.training.kl_balancing import (
    balance_coefficients,
    balance_gamma,
    balanced_kl,
)
from nvae_tf.training.optimizer import NVAEAdamax
from nvae_tf.training.schedules import (
    NVAELearningRate,
    kl_coefficient,
    regularizer_weight,
)

# ----------------------------------------------------------------------------- references


def numpy_adamax(params, grad_fn, lrs, l2_decay, b1=0.9, b2=0.999, eps=1e-3):
    """The original's Adamax (docs/design.md#optimizer) in float64.

    g += wd*p; m, u = max(b2*u, |g|+eps); p -= lr/(1-b1^t) * m/u.
    """
    params = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    u = [np.zeros_like(p) for p in params]
    for t, lr in enumerate(lrs, start=1):
        grads = grad_fn(t - 1, params)
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + l2_decay * p
            m[i] = b1 * m[i] + (1 - b1) * g
            u[i] = np.maximum(b2 * u[i], np.abs(g) + eps)
            params[i] = p - lr / (1 - b1**t) * m[i] / u[i]
    return params


def original_lr_per_step(lr_max, lr_min, warmup_epochs, epochs, steps_per_epoch):
    """The original's loop: per-iteration warm-up overriding the group lr, and PyTorch's
    recursive CosineAnnealingLR.get_lr applied by scheduler.step() at epochs > warmup_epochs."""
    t_max = float(epochs - warmup_epochs - 1)
    warmup_iters = warmup_epochs * steps_per_epoch
    group_lr, last_epoch, global_step, out = lr_max, 0, 0, []
    for epoch in range(epochs):
        if epoch > warmup_epochs:
            last_epoch += 1
            group_lr = (1 + math.cos(math.pi * last_epoch / t_max)) / (
                1 + math.cos(math.pi * (last_epoch - 1) / t_max)
            ) * (group_lr - lr_min) + lr_min
        for _ in range(steps_per_epoch):
            if global_step < warmup_iters:
                group_lr = lr_max * global_step / warmup_iters
            out.append(group_lr)
            global_step += 1
    return np.array(out)


def random_params_and_grads(seed, scale=1.0, steps=5):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    grads = [
        [(scale * rng.normal(size=p.shape)).astype(np.float32) for p in params]
        for _ in range(steps)
    ]
    return params, grads


def run_keras(optimizer, params, grads):
    variables = [tf.Variable(p) for p in params]
    for step_grads in grads:
        optimizer.apply([tf.constant(g) for g in step_grads], variables)
    return [v.numpy() for v in variables]


# ----------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("l2_decay", [0.0, 0.05])
def test_adamax_matches_numpy_reference(l2_decay):
    params, grads = random_params_and_grads(0)
    lrs = [1e-2] * len(grads)
    got = run_keras(NVAEAdamax(learning_rate=1e-2, l2_decay=l2_decay), params, grads)
    want = numpy_adamax(params, lambda t, p: grads[t], lrs, l2_decay)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert np.abs(got[0] - params[0]).max() > 1e-3  # the variables actually moved


def test_adamax_variable_without_gradient_keeps_value_and_slots():
    # One update covers all variables of a shape; one left out of a step must not move (as in
    # Keras), nor its slots, while its same-shape neighbour's do.
    params, grads = random_params_and_grads(3)
    params.append(params[0] + 1.0)  # same shape as params[0]: the same slot stack
    grads = [[*g, g[0] * 0.5] for g in grads]
    opt = NVAEAdamax(learning_rate=1e-2, l2_decay=0.05)
    variables = [tf.Variable(p) for p in params]

    def slots():
        return [v.numpy() for v in opt.variables if v.name.startswith(("momentum", "norm"))]

    opt.apply([tf.constant(g) for g in grads[0]], variables)
    before = slots()
    opt.apply([tf.constant(grads[1][0]), tf.constant(grads[1][1])], variables[:2])
    after = slots()
    np.testing.assert_array_equal(
        variables[2].numpy(),
        run_keras(NVAEAdamax(1e-2, l2_decay=0.05), params[2:], [grads[0][2:]])[0],
    )
    want = numpy_adamax(params[:1], lambda t, p: [grads[t][0]], [1e-2] * 2, 0.05)
    np.testing.assert_allclose(variables[0].numpy(), want[0], rtol=1e-5, atol=1e-7)
    assert len(before) == 4  # m and u for the two shapes
    for b, a in zip(before, after):
        if b.ndim == 3:  # the (3, 4) stack: [params[0], params[2]]
            np.testing.assert_array_equal(b[1], a[1])
            assert np.abs(b[0] - a[0]).max() > 0
        else:
            assert np.abs(b - a).max() > 0


def test_adamax_differs_from_keras_adamax():
    # eps placement: one large gradient, then tiny ones, so u decays towards eps. NVAE's u is
    # floored at |g| + eps; Keras' u + eps keeps decaying (beta_2 = 0.5 shortens the decay).
    params = [np.zeros((4,), np.float32)]
    grads = [[np.full((4,), 1e-2, np.float32)]] + [[np.full((4,), 1e-5, np.float32)]] * 4
    ours = run_keras(NVAEAdamax(learning_rate=1e-2, beta_2=0.5, l2_decay=0.0), params, grads)
    theirs = run_keras(
        keras.optimizers.Adamax(learning_rate=1e-2, beta_2=0.5, epsilon=1e-3), params, grads
    )
    want = numpy_adamax(params, lambda t, p: grads[t], [1e-2] * len(grads), 0.0, b2=0.5)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
    assert abs(theirs[0][0] - ours[0][0]) > 0.05 * abs(ours[0][0])

    # Weight decay: coupled L2 in the gradient vs Keras' decoupled (AdamW-style) decay.
    params, grads = random_params_and_grads(1)
    ours = run_keras(NVAEAdamax(learning_rate=1e-2, l2_decay=0.5), params, grads)
    theirs = run_keras(
        keras.optimizers.Adamax(learning_rate=1e-2, epsilon=1e-3, weight_decay=0.5), params, grads
    )
    want = numpy_adamax(params, lambda t, p: grads[t], [1e-2] * len(grads), 0.5)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5, atol=1e-7)
    assert np.abs(theirs[0] - ours[0]).max() > 1e-3


def test_adamax_with_schedule_in_tf_function():
    schedule = NVAELearningRate(1e-2, 1e-4, warmup_epochs=1, epochs=4, steps_per_epoch=2)
    params, _ = random_params_and_grads(2)
    curv = [np.linspace(0.5, 2.0, p.size).reshape(p.shape).astype(np.float32) for p in params]
    variables = [tf.Variable(p) for p in params]
    opt = NVAEAdamax(learning_rate=schedule, l2_decay=3e-4)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(0.5 * c * v * v) for c, v in zip(curv, variables))
        opt.apply(tape.gradient(loss, variables), variables)

    steps = 8
    for _ in range(steps):
        train_step()
    lrs = original_lr_per_step(1e-2, 1e-4, 1, 4, 2)
    want = numpy_adamax(params, lambda t, p: [c * q for c, q in zip(curv, p)], lrs, 3e-4)
    assert int(opt.iterations.numpy()) == steps
    for v, w in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-6)


def test_adamax_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    params, grads = random_params_and_grads(3, steps=3)
    with strategy.scope():
        variables = [keras.Variable(p) for p in params]
        opt = NVAEAdamax(learning_rate=1e-2, l2_decay=0.05)
        opt.build(variables)  # build outside tf.function: lazy build in a replica fails

    @tf.function
    def step(t):
        def replica_fn():
            with tf.GradientTape() as tape:
                loss = sum(tf.reduce_sum(v * tf.gather(g, t)) for v, g in zip(variables, stacked))
            opt.apply(tape.gradient(loss, variables), variables)

        strategy.run(replica_fn)

    stacked = [tf.constant(np.stack([g[i] for g in grads])) for i in range(len(params))]
    for t in range(len(grads)):
        step(tf.constant(t))
    want = numpy_adamax(params, lambda t, p: grads[t], [1e-2] * 3, 0.05)
    for v, w in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-7)


def test_adamax_in_loss_scale_optimizer_matches_unscaled():
    x = tf.constant(np.random.default_rng(4).normal(size=(8, 6)), tf.float32)

    def make_layer():
        layer = keras.layers.Dense(
            3, dtype="mixed_float16", kernel_initializer=keras.initializers.Constant(0.1)
        )
        layer.build((None, 6))
        return layer

    def loss_fn(layer):
        return tf.reduce_sum(tf.cast(layer(x), tf.float32) ** 2)

    scaled_layer, plain_layer = make_layer(), make_layer()
    lso = keras.optimizers.LossScaleOptimizer(
        NVAEAdamax(learning_rate=1e-2, l2_decay=0.05), initial_scale=1024.0
    )
    with tf.GradientTape() as tape:
        scaled_loss = lso.scale_loss(loss_fn(scaled_layer))
    lso.apply(
        tape.gradient(scaled_loss, scaled_layer.trainable_variables),
        scaled_layer.trainable_variables,
    )

    plain = NVAEAdamax(learning_rate=1e-2, l2_decay=0.05)
    with tf.GradientTape() as tape:
        loss = loss_fn(plain_layer)
    plain.apply(
        tape.gradient(loss, plain_layer.trainable_variables), plain_layer.trainable_variables
    )

    assert all(v.dtype == "float32" for v in lso.inner_optimizer.variables if v.name != "iteration")
    for a, b in zip(scaled_layer.trainable_variables, plain_layer.trainable_variables):
        assert a.dtype == "float32"
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    # Without unscaling the gradient, eps and the L2 term would make the updates differ.
    assert int(lso.iterations.numpy()) == 1


def test_adamax_global_clipnorm_and_ema():
    params, grads = random_params_and_grads(5, scale=10.0, steps=3)
    clip = 1.0

    def clipped(t, p):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads[t]))
        return [g * min(1.0, clip / norm) for g in grads[t]]

    opt = NVAEAdamax(
        learning_rate=1e-2, l2_decay=0.05, global_clipnorm=clip, use_ema=True, ema_momentum=0.5
    )
    variables = [tf.Variable(p) for p in params]
    history = []
    for step_grads in grads:
        opt.apply([tf.constant(g) for g in step_grads], variables)
        history.append([v.numpy().astype(np.float64) for v in variables])
    want = numpy_adamax(params, clipped, [1e-2] * 3, 0.05)
    for v, w in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-5, atol=1e-7)
    # Keras EMA: first step copies, then ema = 0.5 * ema + 0.5 * var.
    ema = history[0]
    for values in history[1:]:
        ema = [0.5 * e + 0.5 * v for e, v in zip(ema, values)]
    opt.finalize_variable_values(variables)
    for v, e in zip(variables, ema):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-7)


def test_adamax_config_round_trip():
    schedule = NVAELearningRate(8e-3, 1e-4, 5, 200, 100)
    opt = NVAEAdamax(
        learning_rate=schedule,
        epsilon=2e-3,
        l2_decay=1e-3,
        clipnorm=2.0,
        use_ema=True,
        ema_momentum=0.9,
    )
    config = opt.get_config()
    assert "weight_decay" not in config and config["l2_decay"] == 1e-3
    clone = NVAEAdamax.from_config(dict(config))  # from_config edits its argument
    assert clone.get_config() == config
    assert isinstance(clone._learning_rate, NVAELearningRate)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is NVAEAdamax and restored.get_config() == config
    with pytest.raises(ValueError):
        NVAEAdamax(weight_decay=1e-4)


# ----------------------------------------------------------------------------- lr schedule


def test_lr_schedule_hand_values():
    # lr_max 1e-2, lr_min 1e-4, 2 warm-up epochs of 10 steps, 7 epochs: WI = 20, T = 4,
    # lr_0 = 1e-2 * 19 / 20 = 9.5e-3.
    schedule = NVAELearningRate(1e-2, 1e-4, warmup_epochs=2, epochs=7, steps_per_epoch=10)
    expected = {
        0: 0.0,
        10: 5e-3,  # mid warm-up: 1e-2 * 10 / 20
        19: 9.5e-3,  # last warm-up step
        20: 9.5e-3,
        29: 9.5e-3,  # epoch == warmup_epochs keeps the last warm-up value
        30: 8.1234019e-3,  # epoch 3: 1e-4 + 9.4e-3 * (1 + cos(pi/4)) / 2
        39: 8.1234019e-3,
        40: 4.8e-3,  # epoch 4: 1e-4 + 9.4e-3 / 2
        50: 1.4765981e-3,  # epoch 5: 1e-4 + 9.4e-3 * (1 - cos(pi/4)) / 2
        60: 1e-4,
        69: 1e-4,  # last epoch: lr_min
        500: 1e-4,  # past the end
    }
    for step, lr in expected.items():
        np.testing.assert_allclose(
            float(schedule(step)), lr, rtol=1e-6, atol=1e-12, err_msg=f"step {step}"
        )


@pytest.mark.parametrize("warmup_epochs,epochs", [(2, 7), (0, 5), (3, 4), (1, 3)])
def test_lr_schedule_matches_original_loop(warmup_epochs, epochs):
    spe = 3
    schedule = NVAELearningRate(1e-2, 1e-4, warmup_epochs, epochs, spe)
    steps = tf.range(epochs * spe)
    got = tf.function(schedule)(steps).numpy()
    want = original_lr_per_step(1e-2, 1e-4, warmup_epochs, epochs, spe)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    after = got[warmup_epochs * spe :]
    assert np.all(np.diff(after) <= 0)
    if epochs - warmup_epochs - 1 > 0:
        np.testing.assert_allclose(got[-spe:], 1e-4, rtol=1e-6)
    assert np.all(np.isfinite(got))


def test_lr_schedule_config_round_trip():
    schedule = NVAELearningRate(1e-2, 1e-4, 5, 400, 781)
    clone = NVAELearningRate.from_config(schedule.get_config())
    assert clone.get_config() == schedule.get_config()
    assert float(clone(5 * 781 + 3)) == float(schedule(5 * 781 + 3))


# ----------------------------------------------------------------------------- KL warm-up, lambda


def test_kl_coefficient():
    total = 10000  # c = 1, A = 3000
    beta = lambda s: float(kl_coefficient(s, total))
    assert beta(0) == pytest.approx(1e-4) and beta(1) == pytest.approx(1e-4)
    assert beta(1501) == pytest.approx(0.5, rel=1e-6)
    values = np.array([beta(s) for s in range(100, 3000, 100)])
    np.testing.assert_allclose(np.diff(values), 100 / 3000, rtol=1e-4)
    assert beta(2999) < 1.0 and beta(3001) == 1.0 and beta(9999) == 1.0
    step = tf.Variable(1501, dtype=tf.int64)
    assert float(tf.function(lambda: kl_coefficient(step, total))()) == pytest.approx(0.5)
    assert float(kl_coefficient(5, total, anneal_portion=0.0)) == 1.0


def test_regularizer_weight():
    # init 10 (flag default), final 1e-2: geometric midpoint sqrt(10 * 1e-2).
    assert float(regularizer_weight(1e-4, 1e-2, True, 10.0)) == pytest.approx(10.0, rel=1e-3)
    assert float(regularizer_weight(1.0, 1e-2, True, 10.0)) == pytest.approx(1e-2, rel=1e-5)
    assert float(regularizer_weight(0.5, 1e-2, True, 10.0)) == pytest.approx(0.1**0.5, rel=1e-5)
    for beta in (1e-4, 0.3, 1.0):
        assert float(regularizer_weight(beta, 1e-1, False, 10.0)) == pytest.approx(1e-1)


# ----------------------------------------------------------------------------- KL balancing


@pytest.mark.parametrize(
    "dataset,groups,alpha",
    [
        ("mnist", [5, 10], [1, 2]),
        ("celeba64", [5, 10, 20], [1, 2, 4]),
        ("celeba_hq256", [4, 4, 4, 8, 16], [1, 4, 16, 32, 64]),
    ],
)
def test_balance_coefficients_spec_values(dataset, groups, alpha):
    want = np.concatenate([np.full(g, a, np.float32) for g, a in zip(groups, alpha)])
    np.testing.assert_array_equal(balance_coefficients(groups), want)


def make_kl():
    rng = np.random.default_rng(6)
    kl = rng.gamma(2.0, 3.0, size=(4, 6)) * rng.uniform(0.1, 5.0, size=6)
    kl[0, 1] = -2.0  # single-sample KL estimates can be negative; gamma uses |KL|
    return tf.constant(kl, tf.float32), balance_coefficients([2, 4])


def test_balanced_kl_values_and_gradient():
    kl, alpha = make_kl()
    k = np.abs(kl.numpy()).mean(axis=0) + 0.01
    gamma_np = k / alpha
    gamma_np = gamma_np * len(alpha) / gamma_np.sum()
    gamma = balance_gamma(kl, alpha).numpy()
    np.testing.assert_allclose(gamma, gamma_np, rtol=1e-5)
    assert gamma.sum() == pytest.approx(6.0, rel=1e-5)

    beta = 0.3
    with tf.GradientTape() as tape:
        tape.watch(kl)
        out = balanced_kl(kl, beta, alpha)
        total = tf.reduce_sum(out)
    assert out.shape == (4,)
    np.testing.assert_allclose(out.numpy(), beta * kl.numpy() @ gamma_np, rtol=1e-5)
    grad = tape.gradient(total, kl).numpy()
    np.testing.assert_allclose(grad, np.broadcast_to(beta * gamma_np, grad.shape), rtol=1e-5)


def test_balanced_kl_plain_sum_when_beta_one_or_disabled():
    kl, alpha = make_kl()
    plain = kl.numpy().sum(axis=1)
    np.testing.assert_allclose(balanced_kl(kl, 1.0, alpha).numpy(), plain, rtol=1e-6)
    np.testing.assert_allclose(balanced_kl(kl, 0.3, None).numpy(), 0.3 * plain, rtol=1e-6)
    assert not np.allclose(balanced_kl(kl, 0.999, alpha).numpy(), 0.999 * plain, rtol=1e-2)

    beta = tf.Variable(0.5)
    fn = tf.function(lambda: balanced_kl(kl, beta, alpha))
    assert not np.allclose(fn().numpy(), 0.5 * plain, rtol=1e-2)
    beta.assign(1.0)
    np.testing.assert_allclose(fn().numpy(), plain, rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(kl)
        total = tf.reduce_sum(balanced_kl(kl, 1.0, alpha))
    np.testing.assert_allclose(tape.gradient(total, kl).numpy(), 1.0)


def test_global_norm_matches_tensorflow_in_fewer_ops():
    rng = np.random.default_rng(0)
    shapes = [(3,), (3,), (4, 5), (3,), (4, 5), (300, 300), (2, 2, 3, 7), (300, 300)]
    tensors = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes] + [None]
    present = [t for t in tensors if t is not None]
    np.testing.assert_allclose(
        float(global_norm(tensors)), float(tf.linalg.global_norm(present)), rtol=1e-6
    )
    assert float(global_norm([None])) == 0.0

    def ops(norm):
        graph = (
            tf.function(norm)
            .get_concrete_function([tf.TensorSpec(s, tf.float32) for s in shapes])
            .graph
        )
        return sum(op.type == "L2Loss" for op in graph.get_operations())

    # (3,) x3, (4, 5) x2 and (2, 2, 3, 7) stack by shape; each 300x300 (over the limit) keeps its own.
    assert ops(global_norm) == 5
    assert ops(tf.linalg.global_norm) == len(shapes)
