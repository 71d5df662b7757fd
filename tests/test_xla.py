"""``jit_compile=True``: the training step and sampling compile under XLA and compute the same.

On GPUs XLA fuses the thousands of small ops of an NVAE step; on this CPU it is slower
(docs/design.md#xla), so these checks use the tiny configs. XLA implements TensorFlow's
stateless random ops with its own bit stream: the same seed draws other (equally distributed)
noise with and without XLA, so values are compared where the noise cannot matter (temperature
near 0) or through statistics that the noise barely moves.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import binary_images, colour_config, colour_images, tiny_config

from nvae_tf.inference import sampling
from nvae_tf.layers.cells import _nearest_up
from nvae_tf.model import NVAE
from nvae_tf.training.distribute import make_strategy, make_train_step

pytestmark = pytest.mark.usefixtures("seeded")


def twins(config_for):
    """The same model built twice, without and with ``jit_compile``, sharing weights."""
    models = []
    for jit in (False, True):
        keras.utils.set_random_seed(3)
        model = NVAE(config_for(jit_compile=jit))
        model.compile(steps_per_epoch=10, jit_compile=jit)
        models.append(model)
    return models


def test_nearest_up_repeats_each_pixel_and_sums_its_gradient_over_the_block():
    x = tf.random.normal([2, 3, 5, 4])
    with tf.GradientTape() as tape:
        tape.watch(x)
        up = _nearest_up(x)
        weights = tf.random.normal(up.shape)
        loss = tf.reduce_sum(up * weights)
    expected = np.repeat(np.repeat(x.numpy(), 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(up.numpy(), expected)
    w = weights.numpy().reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), w, rtol=1e-6, atol=1e-6)
    # Unknown spatial sizes (a served model's signature) take the same path.
    traced = tf.function(_nearest_up, input_signature=[tf.TensorSpec([None, None, None, 4])])
    np.testing.assert_array_equal(traced(x).numpy(), expected)


def test_the_training_step_compiles_under_xla_and_gives_the_graphs_loss():
    """Every op of a step (flows, up and down cells, regularizers, Adamax) has an XLA kernel;
    a step at the same weights gives the graph's loss and reconstruction term up to the latent
    noise. (The one-sample KL estimate is left out: other noise moved it by ~20% here.)"""
    graph, xla = twins(colour_config)
    x = colour_images(4)
    for model in (graph, xla):
        model(x[:1], training=False)
    xla.set_weights(graph.get_weights())
    strategy = make_strategy("auto")
    logs = [make_train_step(model, strategy)(x) for model in (graph, xla)]
    assert all(np.isfinite(float(value)) for value in logs[1].values())
    for name in ("loss", "recon"):
        a, b = (float(log[name]) for log in logs)
        assert b == pytest.approx(a, rel=2e-3), name


def test_sampling_under_xla_is_repeatable_and_matches_the_graph_without_noise():
    graph, xla = twins(tiny_config)
    for model in (graph, xla):
        model(binary_images(1), training=False)
    xla.set_weights(graph.get_weights())
    traced = sampling._prior_images_xla.experimental_get_tracing_count()
    first, again = (xla.sample(3, 0.7, seed=5) for _ in range(2))
    assert sampling._prior_images_xla.experimental_get_tracing_count() == traced + 1
    np.testing.assert_array_equal(first, again)
    # At a temperature near 0 the latent noise vanishes: the decoders must agree.
    near_zero = [model.sample(3, 1e-4, seed=5) for model in (graph, xla)]
    np.testing.assert_allclose(near_zero[1], near_zero[0], atol=1e-4)
