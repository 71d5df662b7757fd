"""Gradient checkpointing (config.recompute): same gradients, BN statistics updated once."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import binary_images, tiny_config

from nvae_tf.layers.cells import DecoderCell, EncoderCell
from nvae_tf.layers.recompute import recompute_cells, run_cells
from nvae_tf.model import NVAE

pytestmark = pytest.mark.usefixtures("seeded")

MODES = ("none", "cell", "group")
SEED = [4, 2]


def _loss(model, x):
    out = model(x, training=True, seed=SEED)
    return tf.reduce_mean(-out.output_distribution.log_prob(x) + tf.reduce_sum(out.kl, axis=1))


def _grads(model, x):
    with tf.GradientTape() as tape:
        loss = _loss(model, x)
    return loss, tape.gradient(loss, model.trainable_variables)


def _moving_stats(model):
    return [
        v.numpy() for bn in model.batchnorm_layers() for v in (bn.moving_mean, bn.moving_variance)
    ]


def _models(**overrides):
    models = {mode: NVAE(tiny_config(recompute=mode, **overrides)) for mode in MODES}
    weights = models["none"].get_weights()
    for mode in MODES[1:]:
        models[mode].set_weights(weights)
    return models


def _assert_close_grads(got, expected, rtol=1e-5):
    """Per variable within ``rtol`` of its own scale, up to float32 noise of the whole gradient.

    Conv biases right before a batch norm have a true gradient of zero; what autodiff gives
    them is rounding noise (~1e-9 of the global gradient norm), different in any other
    evaluation order, so an absolute floor relative to the global norm is needed.
    """
    got = [tf.convert_to_tensor(g).numpy() for g in got]
    expected = [tf.convert_to_tensor(e).numpy() for e in expected]
    norm = np.sqrt(sum(np.sum(e.astype(np.float64) ** 2) for e in expected))
    diff = np.sqrt(sum(np.sum((g.astype(np.float64) - e) ** 2) for g, e in zip(got, expected)))
    assert diff <= rtol * 0.1 * norm, (diff, norm)
    for g, e in zip(got, expected):
        err = np.abs(g - e).max()
        assert err <= rtol * np.abs(e).max() + 1e-8 * norm, (err, np.abs(e).max(), norm)


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(11)
    return _models()


def test_recompute_is_off_outside_training(models):
    x = binary_images(2)
    outs = {m: models[m](x, training=False, seed=SEED).logits.numpy() for m in MODES}
    for mode in MODES[1:]:
        np.testing.assert_array_equal(outs[mode], outs["none"])


def test_recompute_gives_the_same_gradients_and_updates_bn_once(models):
    x = binary_images(4)
    initial = _moving_stats(models["none"])
    results = {mode: _grads(model, x) for mode, model in models.items()}
    loss_none, grads_none = results["none"]
    # Nearly every variable gets a gradient (an SE whose ReLUs are all off gets none).
    nonzero = [np.any(tf.convert_to_tensor(g).numpy() != 0) for g in grads_none]
    assert np.mean(nonzero) > 0.9
    stats_none = _moving_stats(models["none"])
    # The step did move the statistics (else the check below would be vacuous) ...
    assert any(not np.allclose(a, b) for a, b in zip(stats_none, initial))
    for mode in MODES[1:]:
        loss, grads = results[mode]
        np.testing.assert_allclose(loss, loss_none, rtol=1e-6)
        assert len(grads) == len(grads_none)
        _assert_close_grads(grads, grads_none)
        # ... exactly once: the recompute pass runs BN on batch statistics without updating.
        for a, b in zip(_moving_stats(models[mode]), stats_none):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_recompute_cells_input_gradient_and_variables():
    """The custom gradient w.r.t. the stack input and every variable, on a mixed stack."""
    cells = [
        EncoderCell(),
        EncoderCell(downsample=True),
        DecoderCell(6, upsample=True),
        DecoderCell(3),
    ]
    x = tf.random.normal((3, 8, 8, 4), seed=1)
    run_cells(cells, x, training=False)  # build
    variables = [v for c in cells for v in c.trainable_variables]
    target = tf.random.normal((3, 8, 8, 4), seed=2)

    def grads(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(cells, x, training=True) * target)
        return tape.gradient(loss, [x] + variables)

    stats = lambda: [v.numpy() for c in cells for v in c.non_trainable_variables]
    before = stats()
    plain = grads(run_cells)
    after_plain = stats()
    for v, b in zip([v for c in cells for v in c.non_trainable_variables], before):
        v.assign(b)  # rewind the moving statistics
    recomputed = grads(recompute_cells)
    _assert_close_grads(recomputed, plain)
    for a, b in zip(stats(), after_plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_recompute_in_a_tf_function_matches():
    """Graph mode (as in fit): the custom gradient collects the variables there too."""
    models = {m: NVAE(tiny_config(recompute=m)) for m in ("none", "group")}
    models["group"].set_weights(models["none"].get_weights())
    x = binary_images(4)
    results = {}
    for mode, model in models.items():
        step = tf.function(lambda x, model=model: _grads(model, x))
        results[mode] = step(x)
    np.testing.assert_allclose(results["group"][0], results["none"][0], rtol=1e-6)
    _assert_close_grads(results["group"][1], results["none"][1])
    for a, b in zip(_moving_stats(models["group"]), _moving_stats(models["none"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _ancestors(tensor):
    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        if op.name not in seen:
            seen.add(op.name)
            todo.extend(t.op for t in op.inputs)
            todo.extend(op.control_inputs)
    return seen


def test_recompute_waits_for_the_upstream_gradient_in_a_graph():
    """In a graph the recompute convs must depend on the upstream gradient; otherwise they
    run during the forward pass and hold their activations as long as without recompute."""
    cells = [EncoderCell(), EncoderCell()]
    x = tf.random.normal((2, 6, 6, 4), seed=1)
    run_cells(cells, x, training=False)  # build

    @tf.function
    def input_grad(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(recompute_cells(cells, x, training=True) * upstream)
        return tape.gradient(loss, x)

    graph = input_grad.get_concrete_function(x, tf.ones_like(x)).graph
    upstream = graph.inputs[1].op.name
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    waiting = [op for op in convs if upstream in _ancestors(op.outputs[0])]
    assert len(convs) == 8  # 4 convs, forward and recompute
    assert len(waiting) == 4
