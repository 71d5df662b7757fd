"""training.regularizers: spectral regularizer and BN penalty (docs/design.md#objective)."""

import contextlib
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import depends_on

from nvae_tf.layers.flows import MaskedConv2D
from nvae_tf.layers.weight_norm import Conv2D, normalized_together
from nvae_tf.training.deferred_gradient import add_deferred
from nvae_tf.training.regularizers import (
    SpectralRegularizer,
    batchnorm_penalty,
    padding_buckets,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_convs(seed=0):
    """Built convs covering dense, depthwise, plain 1x1 and masked kernels; two share a shape."""
    convs = [
        Conv2D(6, 3),
        Conv2D(6, 3),
        Conv2D(4, 5, depthwise=True),
        Conv2D(8, 1, use_bias=False, weight_norm=False),
        MaskedConv2D(8, 3, zero_diag=True),
    ]
    rng = np.random.default_rng(seed)
    for conv in convs:
        conv.build((None, 4, 4, 4))
        for w in conv.weights:
            w.assign(rng.normal(scale=0.5, size=w.shape).astype(np.float32))
    return convs


def top_singular_values(convs):
    return np.array(
        [np.linalg.svd(c.kernel_matrix().numpy().T, compute_uv=False)[0] for c in convs]
    )


def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-3)


def np_power_iteration(w, u, iters):
    for _ in range(iters):
        v = np_normalize(np.einsum("nr,nrc->nc", u, w))
        u = np_normalize(np.einsum("nrc,nc->nr", w, v))
    return u, v


def stacked_matrices(sr, convs):
    return [np.stack([convs[i].kernel_matrix().numpy().T for i in idx]) for idx in sr._groups]


def test_groups_by_shape():
    convs = make_convs()
    sr = SpectralRegularizer()
    sr.build_for(convs)
    assert sr._groups == ((0, 1), (2,), (3,), (4,))
    assert [tuple(u.shape) for u in sr.u_vars] == [(2, 6), (1, 4), (1, 8), (1, 8)]
    assert [tuple(v.shape) for v in sr.v_vars] == [(2, 36), (1, 25), (1, 4), (1, 36)]
    # Small groups share one zero-padded bucket, so the tests below run the padded path.
    assert sr._buckets == ((0, 1, 2, 3),)


def test_padding_buckets_merge_small_groups_and_leave_large_ones_alone():
    shapes = [(4, 8, 9), (2, 256, 2304), (3, 16, 9), (1, 8, 16), (5, 256, 2304), (1, 512, 512)]
    buckets = padding_buckets(shapes, overhead=2**18)
    assert sorted(g for b in buckets for g in b) == list(range(len(shapes)))
    assert (0, 2, 3) in buckets  # ~1k elements each: one bucket
    assert (1, 4) in buckets  # same shape: no padding, one bucket
    assert (5,) in buckets  # padding it to 256x2304 would cost more than a bucket
    assert padding_buckets(shapes, overhead=2**40) == (tuple(range(6)),)


def test_matches_largest_singular_values():
    convs = make_convs()
    sr = SpectralRegularizer()
    sr.build_for(convs)
    for _ in range(6):
        total = sr()
    expected = top_singular_values(convs)
    assert total.dtype == tf.float32
    np.testing.assert_allclose(float(total), expected.sum(), rtol=1e-4)
    per_layer = {}
    for idx, u, v, w in zip(sr._groups, sr.u_vars, sr.v_vars, stacked_matrices(sr, convs)):
        sig = np.einsum("nr,nrc,nc->n", u.numpy(), w, v.numpy())
        per_layer.update(zip(idx, sig))
    np.testing.assert_allclose([per_layer[i] for i in range(len(convs))], expected, rtol=1e-4)


def test_power_iteration_counts():
    """10 * num_power_iter iterations on the first call, num_power_iter afterwards."""
    convs = make_convs(seed=1)
    sr = SpectralRegularizer(num_power_iter=1)
    sr.build_for(convs)
    u0 = [u.numpy() for u in sr.u_vars]
    ws = stacked_matrices(sr, convs)
    sr()
    assert bool(sr.initialized.numpy())
    for u_var, v_var, u_init, w in zip(sr.u_vars, sr.v_vars, u0, ws):
        u, v = np_power_iteration(w, u_init, 10)
        np.testing.assert_allclose(u_var.numpy(), u, atol=1e-5)
        np.testing.assert_allclose(v_var.numpy(), v, atol=1e-5)
    u10 = [u.numpy() for u in sr.u_vars]
    total = sr()
    expected = 0.0
    for u_var, u_init, w in zip(sr.u_vars, u10, ws):
        u, v = np_power_iteration(w, u_init, 1)
        np.testing.assert_allclose(u_var.numpy(), u, atol=1e-5)
        expected += np.einsum("nr,nrc,nc->", u, w, v)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert max(np.abs(a - b.numpy()).max() for a, b in zip(u10, sr.u_vars)) > 1e-5


def test_gradient_reaches_kernels_not_vectors():
    convs = make_convs()
    sr = SpectralRegularizer()
    sr.build_for(convs)
    sr()
    watched = [u.value for u in sr.u_vars] + [v.value for v in sr.v_vars]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        total = sr()
    kernels = [c.kernel for c in convs]
    grads = tape.gradient(total, kernels + watched)
    for g in grads[: len(kernels)]:
        assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0.0
    assert all(g is None for g in grads[len(kernels) :])


def _loss_and_gradients(convs, sr, variables, x, together=False):
    def step():
        with tf.GradientTape() as tape:
            with normalized_together(convs) if together else contextlib.nullcontext():
                forward = tf.add_n([tf.reduce_sum(c(x) ** 2) for c in convs])
            total = forward + sr()
        return total, tape.gradient(total, variables)

    return step


def test_reusing_the_forward_kernels_changes_nothing_but_the_graph():
    # In a traced step, the regularizer may take each conv's weight-normalized kernel from its
    # forward call: same value, same gradients, fewer ops. Never a stale kernel from elsewhere.
    x = tf.random.stateless_normal((2, 4, 4, 4), seed=[3, 4])
    # With the forward pass's kernels normalized together, a shape group's matrices are one
    # reshape of the forward's stack.
    results, sizes = [], []
    for reuse, together in ((False, False), (True, False), (True, True)):
        convs = make_convs()
        keras.utils.set_random_seed(0)  # the same initial u, v for all
        sr = SpectralRegularizer(reuse_forward_kernels=reuse)
        sr.build_for(convs)
        variables = [w for c in convs for w in c.trainable_weights]

        step = tf.function(_loss_and_gradients(convs, sr, variables, x, together))
        sizes.append(len(step.get_concrete_function().graph.get_operations()))
        total, grads = step()
        results.append([total, *grads])
    for without, *with_reuse in zip(*results):
        for value in with_reuse:
            # Only the summation order of the gradient paths differs.
            np.testing.assert_allclose(value.numpy(), without.numpy(), rtol=2e-5, atol=1e-5)
    assert sizes[2] < sizes[1] < sizes[0]
    # A kernel traced in another graph is never taken (TensorFlow would refuse the tensor).
    convs = make_convs()
    sr = SpectralRegularizer(reuse_forward_kernels=True)
    sr.build_for(convs)
    tf.function(lambda: [c(x) for c in convs])()
    assert np.isfinite(float(tf.function(sr.__call__)()))


def test_state_is_non_trainable_and_not_duplicated_in_a_model():
    convs = make_convs()
    sr = SpectralRegularizer()
    sr.build_for(convs)
    assert sr.trainable_variables == []
    names = sorted(v.path.split("/")[-1] for v in sr.non_trainable_variables)
    assert names == sorted(
        ["initialized"] + [f"{p}_{s}" for p in "uv" for s in ("6x36", "4x25", "8x4", "8x36")]
    )

    class Holder(keras.Model):
        def __init__(self, layers):
            super().__init__()
            self.convs = layers
            self.sr = SpectralRegularizer()

        def call(self, x):
            return x

    model = Holder(convs)
    model.sr.build_for(convs)
    assert len(model.trainable_variables) == sum(len(c.trainable_variables) for c in convs)
    assert len(model.non_trainable_variables) == 9


def test_tf_function_matches_eager():
    convs = make_convs()
    sr = SpectralRegularizer()
    sr.build_for(convs)
    compiled = tf.function(sr.__call__)
    first = compiled()  # traced before initialization: the 40-iteration branch
    assert bool(sr.initialized.numpy())
    for _ in range(5):
        compiled()
    np.testing.assert_allclose(float(first), top_singular_values(convs).sum(), rtol=1e-2)
    np.testing.assert_allclose(float(compiled()), float(sr()), rtol=1e-5)


def test_reads_float32_kernels_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        conv = Conv2D(6, 3)
        conv.build((None, 4, 4, 4))
        conv.kernel.assign(np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype("float32"))
        sr = SpectralRegularizer()
        sr.build_for([conv])

        class Outer(keras.layers.Layer):  # calls the SR inside a float16 autocast scope
            def call(self, x):
                return sr()

        for _ in range(5):
            inside = Outer()(tf.zeros((1,)))
        outside = sr()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert inside.dtype == tf.float32
    # Both converge to the float32 kernel's top singular value (not a float16 copy's).
    sigma = top_singular_values([conv])[0]
    np.testing.assert_allclose([float(inside), float(outside)], [sigma, sigma], rtol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    convs = make_convs()
    sr = SpectralRegularizer()
    sr.build_for(convs)
    sr()
    sr()
    path = tf.train.Checkpoint(sr=sr).write(str(tmp_path / "sr"))
    fresh = SpectralRegularizer()
    fresh.build_for(convs)
    tf.train.Checkpoint(sr=fresh).read(path).assert_consumed()
    assert bool(fresh.initialized.numpy())
    for a, b in zip(sr.u_vars + sr.v_vars, fresh.u_vars + fresh.v_vars):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_build_for_checks():
    with pytest.raises(ValueError):
        SpectralRegularizer().build_for([Conv2D(4, 3)])  # unbuilt layer
    with pytest.raises(ValueError):
        SpectralRegularizer(num_power_iter=0)
    with pytest.raises(ValueError):
        SpectralRegularizer()()  # not built
    sr = SpectralRegularizer(num_power_iter=2)
    sr.build_for(make_convs())
    with pytest.raises(ValueError):
        sr.build_for(make_convs())
    assert SpectralRegularizer.from_config(sr.get_config()).num_power_iter == 2


MIRRORED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from nvae_tf.layers.flows import MaskedConv2D
    from nvae_tf.training.regularizers import SpectralRegularizer
    from nvae_tf.layers.weight_norm import Conv2D, normalized_together

    def make_convs():
        convs = [Conv2D(6, 3), Conv2D(6, 3), Conv2D(4, 5, depthwise=True),
                 MaskedConv2D(8, 3, zero_diag=True)]
        for c in convs:
            c.build((None, 4, 4, 4))
        return convs

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        convs = make_convs()
        sr = SpectralRegularizer()
        sr.build_for(convs)
        weights = [w for c in convs for w in c.trainable_variables if "bias" not in w.path]
        opt = keras.optimizers.SGD(0.05)
        opt.build(weights)

    def normalize(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-3)

    def local(var):  # per-replica copies of a Keras variable's distributed tf.Variable
        return [t.numpy() for t in strategy.experimental_local_results(var.value)]

    @tf.function
    def train_step():
        def replica_fn():
            with tf.GradientTape() as tape:
                loss = sr()
            opt.apply_gradients(zip(tape.gradient(loss, weights), weights))
            return loss
        return strategy.run(replica_fn)

    expected = sum(np.linalg.svd(c.kernel_matrix().numpy().T, compute_uv=False)[0] for c in convs)
    kernels_before = [w.numpy() for w in weights]
    losses = [l.numpy() for l in strategy.experimental_local_results(train_step())]
    assert losses[0] == losses[1], losses
    assert abs(losses[0] - expected) / expected < 1e-2, (losses, expected)
    assert not np.allclose(kernels_before[0], weights[0].numpy()), "no update"
    for _ in range(3):
        train_step()
    for var in sr.u_vars + sr.v_vars + [sr.initialized]:
        copies = local(var)
        assert len(copies) == 2 and np.array_equal(copies[0], copies[1]), var.path
        assert np.array_equal(var.numpy(), copies[0]), var.path  # cross-replica read
    for w in weights:
        copies = local(w)
        assert np.array_equal(copies[0], copies[1]), w.path

    # One more call, checked against a numpy power iteration from replica 0's state.
    u_before = [u.numpy() for u in sr.u_vars]
    ws = [np.stack([convs[i].kernel_matrix().numpy().T for i in idx]) for idx in sr._groups]
    value = tf.function(lambda: strategy.run(sr))()
    values = [v.numpy() for v in strategy.experimental_local_results(value)]
    assert values[0] == values[1], values
    expected = 0.0
    for u_var, u, w in zip(sr.u_vars, u_before, ws):
        for _ in range(4):
            v = normalize(np.einsum("nr,nrc->nc", u, w))
            u = normalize(np.einsum("nrc,nc->nr", w, v))
        expected += np.einsum("nr,nrc,nc->", u, w, v)
        for copy in local(u_var):
            assert np.allclose(copy, u, atol=1e-5), u_var.path
    assert abs(values[0] - expected) < 1e-5 * expected, (values, expected)

    path = tf.train.Checkpoint(sr=sr).write(os.path.join(os.environ["CKPT_DIR"], "sr"))
    fresh = SpectralRegularizer()
    fresh.build_for(make_convs())
    tf.train.Checkpoint(sr=fresh).read(path).assert_consumed()
    for a, b in zip(sr.u_vars + sr.v_vars, fresh.u_vars + fresh.v_vars):
        assert np.array_equal(a.numpy(), b.numpy())
    print("MIRRORED_OK")
""")


def test_under_mirrored_strategy_on_two_cpus(tmp_path):
    # Logical devices must be configured before TF runs any op: use a fresh interpreter.
    env = {
        **os.environ,
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CKPT_DIR": str(tmp_path),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "MIRRORED_OK" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )


# ----------------------------------------------------------------------------- BN penalty


def test_batchnorm_penalty():
    rng = np.random.default_rng(0)
    layers = [
        keras.layers.BatchNormalization(),
        keras.layers.BatchNormalization(),
        keras.layers.BatchNormalization(scale=False),
    ]
    expected = 0.0
    for bn, channels in zip(layers, (3, 5, 4)):
        bn.build((None, 2, 2, channels))
        if bn.scale:
            gamma = rng.normal(size=channels).astype(np.float32)
            gamma[0] = -3.0 - abs(gamma).max()  # the largest magnitude is negative
            bn.gamma.assign(gamma)
            expected += np.abs(gamma).max()
    penalty = batchnorm_penalty(layers)
    assert penalty.dtype == tf.float32
    np.testing.assert_allclose(float(penalty), expected, rtol=1e-6)
    assert float(batchnorm_penalty([])) == 0.0


def test_batchnorm_penalty_gradient_matches_per_layer_maxima():
    """The one-segment-max form has the per-layer form's gradient: the sign at each layer's
    largest |gamma|, split evenly between ties, zero elsewhere."""
    layers = [keras.layers.BatchNormalization() for _ in range(3)]
    for bn, gamma in zip(layers, ([0.5, -2.0, 1.0], [1.5, 1.5, -0.2, 0.1], [0.3])):
        bn.build((None, 2, 2, len(gamma)))
        bn.gamma.assign(gamma)
    variables = [bn.gamma for bn in layers]
    with tf.GradientTape(persistent=True) as tape:
        batched = batchnorm_penalty(layers)
        per_layer = tf.add_n([tf.reduce_max(tf.abs(v)) for v in variables])
    np.testing.assert_allclose(float(batched), float(per_layer), rtol=1e-7)
    for got, want in zip(tape.gradient(batched, variables), tape.gradient(per_layer, variables)):
        np.testing.assert_allclose(got, want, rtol=1e-7)
    np.testing.assert_allclose(tape.gradient(batched, variables)[1], [0.5, 0.5, 0.0, 0.0])


def test_add_deferred_gives_the_sum_and_computes_its_term_after_the_others():
    """The deferred term's gradient (the spectral regularizer's in the step) must wait for
    every other gradient: computed early, it would be held through the backward pass."""
    a, b = tf.constant([0.3, -1.2, 2.0]), tf.constant([1.5, 0.5, -0.7])

    def grads(deferred):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([a, b])
            main = tf.reduce_sum(tf.sin(a) * b)
            late = tf.reduce_sum(tf.square(a))
            total = main + late
        if not deferred:
            return tape.gradient(total, [a, b])
        return add_deferred(tape, late, tape.gradient(main, [a, b]), [a, b])

    for ours, reference in zip(grads(True), grads(False)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6)

    graph = tf.function(lambda: grads(True)).get_concrete_function().graph
    ops = graph.get_operations()
    ready = next(i for i, op in enumerate(ops) if op.type == "NoOp")
    later = [op for op in ops[ready + 1 :] if op.name.startswith("gradient_tape/")]
    assert later
    assert all(depends_on(op, ops[ready]) for op in later)
