"""layers.flows (docs/design.md#flows): masks, autoregressive Jacobians, bijector, serialization."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from nvae_tf.layers.flows import (
    AutoregressiveShift,
    MaskedConv2D,
    PosteriorFlow,
    conv_mask,
    shift_iaf,
)


def randomize(layer, seed):
    """Non-trivial weights: kernels, biases and log-norms drawn at random."""
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        scale = 0.3 if "log_g" in w.path else 0.5
        w.assign(rng.normal(scale=scale, size=w.shape).astype(np.float32))


def jacobian(fn, z):
    """d fn(z) / d z as a (N, N) matrix, N = H*W*C flattened in NHWC (raster, then channel)."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = fn(z)
    jac = tape.jacobian(y, z)
    n = int(np.prod(z.shape))
    return jac.numpy().reshape(n, n)


def mirrored_order(h, w, c):
    """Index permutation listing (h, w, c) elements in reversed raster order, channels kept."""
    return np.array(
        [
            (hh * w + ww) * c + cc
            for hh in reversed(range(h))
            for ww in reversed(range(w))
            for cc in range(c)
        ]
    )


def is_unit_lower_triangular(jac, atol=1e-6):
    return np.allclose(np.diag(jac), 1.0, atol=atol) and np.abs(np.triu(jac, k=1)).max() <= atol


# ----------------------------------------------------------------------------- masks


def centre(mask):
    m = (mask.shape[0] - 1) // 2
    return mask[m, m]


def test_spatial_mask_k3_and_k5():
    mask3 = conv_mask(3, 1, 1, zero_diag=False, mirror=False)[:, :, 0, 0]
    np.testing.assert_array_equal(mask3, [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    mask5 = conv_mask(5, 1, 1, zero_diag=True, mirror=False)[:, :, 0, 0]
    np.testing.assert_array_equal(
        mask5, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    )


def test_mask_cout_ge_cin():
    # Cin=2, Cout=4 (ratio 2): output block i = outputs {2i, 2i+1}; TF layout [cin, cout].
    mask = conv_mask(3, 2, 4, zero_diag=False, mirror=False)
    assert mask.shape == (3, 3, 2, 4)
    np.testing.assert_array_equal(centre(mask), [[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(mask[0], np.ones((3, 2, 4)))  # row above: all open
    np.testing.assert_array_equal(mask[1, 0], np.ones((2, 4)))  # left of centre: all open
    np.testing.assert_array_equal(mask[1, 2], np.zeros((2, 4)))
    np.testing.assert_array_equal(mask[2], np.zeros((3, 2, 4)))
    mask_zd = conv_mask(3, 2, 4, zero_diag=True, mirror=False)
    np.testing.assert_array_equal(centre(mask_zd), [[0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(
        np.delete(mask_zd.reshape(9, 2, 4), 4, axis=0), np.delete(mask.reshape(9, 2, 4), 4, axis=0)
    )


def test_mask_cout_lt_cin():
    # Cin=4, Cout=2 (ratio 2): output i sees input blocks {0..i} (< i with zero_diag).
    mask = conv_mask(1, 4, 2, zero_diag=False, mirror=False)
    assert mask.shape == (1, 1, 4, 2)
    np.testing.assert_array_equal(mask[0, 0].T, [[1, 1, 0, 0], [1, 1, 1, 1]])
    mask_zd = conv_mask(1, 4, 2, zero_diag=True, mirror=False)
    np.testing.assert_array_equal(mask_zd[0, 0].T, [[0, 0, 0, 0], [1, 1, 0, 0]])


def test_mask_depthwise():
    mask = conv_mask(3, 2, 2, zero_diag=False, mirror=False, depthwise=True)
    assert mask.shape == (3, 3, 2, 1)
    expected = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], np.float32)
    for c in range(2):
        np.testing.assert_array_equal(mask[:, :, c, 0], expected)
    mask_zd = conv_mask(3, 2, 2, zero_diag=True, mirror=False, depthwise=True)
    np.testing.assert_array_equal(centre(mask_zd), [[0], [0]])


def test_mirrored_mask_flips_space_not_channels():
    mask = conv_mask(3, 2, 4, zero_diag=True, mirror=True)
    np.testing.assert_array_equal(mask[:, :, 0, 3], [[0, 0, 0], [0, 1, 1], [1, 1, 1]])
    # The centre tap keeps the unmirrored channel order.
    np.testing.assert_array_equal(centre(mask), [[0, 0, 1, 1], [0, 0, 0, 0]])
    dw = conv_mask(3, 2, 2, zero_diag=False, mirror=True, depthwise=True)
    np.testing.assert_array_equal(dw[:, :, 1, 0], [[0, 0, 0], [0, 1, 1], [1, 1, 1]])


def test_mask_rejects_incompatible_channels():
    with pytest.raises(ValueError):
        conv_mask(3, 3, 4, zero_diag=False, mirror=False)


def test_masked_conv_applies_mask_before_weight_norm():
    conv = MaskedConv2D(
        4, 3, zero_diag=True, mirror=True, use_bias=False, log_g_offset=-math.log(10.0)
    )
    conv.build((None, 4, 4, 2))
    mask = conv_mask(3, 2, 4, zero_diag=True, mirror=True)
    kernel = conv.effective_kernel().numpy()
    assert np.all(kernel[mask == 0] == 0.0)
    assert np.all(kernel[mask == 1] != 0.0)
    # Initial log-norm: log(||masked v|| + 0.01) - log(10) per channel (docs/design.md#flows).
    v = conv.kernel.numpy() * mask
    expected = np.log(np.sqrt((v**2).sum(axis=(0, 1, 2))) + 0.01) - math.log(10.0)
    np.testing.assert_allclose(conv.log_g.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.sqrt((kernel**2).sum(axis=(0, 1, 2))), np.exp(expected), rtol=1e-4
    )


# ----------------------------------------------------------------------------- IAF cells


def test_cell_architecture():
    cell = AutoregressiveShift(channels=20, expansion=6)
    cell.build((None, 4, 4, 20))
    assert cell.conv_in.kernel.shape == (3, 3, 20, 120) and not cell.conv_in.use_bias
    assert cell.conv_in.zero_diag
    assert cell.conv_dw.kernel.shape == (5, 5, 120, 1) and not cell.conv_dw.use_bias
    assert not cell.conv_dw.zero_diag
    assert cell.conv_mu.kernel.shape == (1, 1, 120, 20) and cell.conv_mu.use_bias
    assert not cell.conv_mu.zero_diag
    assert cell.conv_mu.log_g_offset == pytest.approx(-math.log(10.0))
    assert all(c.weight_norm for c in (cell.conv_in, cell.conv_dw, cell.conv_mu))


def test_cell_uses_double_elu():
    # mu = conv_mu(elu(elu(conv_dw(elu(conv_in(z)))))): the original's double ELU (issue #25).
    cell = AutoregressiveShift(channels=2, expansion=2)
    z = tf.random.stateless_normal((1, 3, 3, 2), seed=(1, 2))
    cell(z)
    randomize(cell, 0)
    pre = cell.conv_dw(tf.nn.elu(cell.conv_in(z)))
    np.testing.assert_allclose(cell.shift(z), cell.conv_mu(tf.nn.elu(tf.nn.elu(pre))), atol=1e-6)
    assert float(tf.reduce_max(tf.abs(cell.shift(z) - cell.conv_mu(tf.nn.elu(pre))))) > 1e-4
    np.testing.assert_allclose(cell(z), z - cell.shift(z), atol=1e-6)


@pytest.mark.parametrize("mirror", [False, True])
def test_cell_jacobian_is_unit_triangular_in_its_order(mirror):
    h, w, c = 4, 4, 3
    cell = AutoregressiveShift(channels=c, expansion=2, mirror=mirror)
    z = tf.random.stateless_normal((1, h, w, c), seed=(3, 4))
    cell(z)
    randomize(cell, 1)
    jac = jacobian(cell, z)
    mirrored = mirrored_order(h, w, c)
    jac_mirrored = jac[np.ix_(mirrored, mirrored)]
    own, other = (jac_mirrored, jac) if mirror else (jac, jac_mirrored)
    assert is_unit_lower_triangular(own)
    assert not is_unit_lower_triangular(other)
    # It is a real autoregression: many strictly-lower entries are non-zero.
    assert (np.abs(np.tril(own, k=-1)) > 1e-6).sum() > 0.3 * (h * w * c) ** 2 / 2


def test_cell_dependency_pattern():
    """mu at (h, w, c) sees channels < c at its own pixel, earlier pixels, nothing later."""
    h, w, c = 5, 5, 3
    cell = AutoregressiveShift(channels=c, expansion=2)
    z = tf.random.stateless_normal((1, h, w, c), seed=(5, 6))
    cell(z)
    randomize(cell, 2)
    jac = jacobian(cell, z).reshape(h, w, c, h, w, c)
    dep = np.abs(jac[2, 1]) > 1e-7  # output pixel (2, 1): (c, h', w', c')
    for co in range(c):
        # Same pixel: exactly the channels below co (plus the identity on the diagonal).
        np.testing.assert_array_equal(dep[co, 2, 1], np.arange(c) <= co)
        assert dep[co, 2, 0].all() and dep[co, 1, 1].all()  # left and upper neighbours
        assert not dep[co, 2, 2:].any() and not dep[co, 3:].any()  # later pixels
        # (-1, +2): only through the depthwise tap with the conv_in centre tap -> c' < co.
        np.testing.assert_array_equal(dep[co, 1, 3], np.arange(c) < co)
        assert not dep[co, 1, 4].any()  # (-1, +3) is outside the receptive field


def test_pair_is_volume_preserving():
    h, w, c = 3, 3, 2
    flow = PosteriorFlow(num_pairs=1, channels=c, expansion=2)
    z = tf.random.stateless_normal((1, h, w, c), seed=(7, 8))
    flow(z)  # builds the layer
    randomize(flow, 3)
    _, log_det = flow(z)
    np.testing.assert_array_equal(log_det.numpy(), np.zeros(1))
    assert log_det.dtype == tf.float32
    jac = jacobian(lambda t: flow(t)[0], z)
    sign, logabsdet = np.linalg.slogdet(jac.astype(np.float64))
    assert sign == 1.0 and abs(logabsdet) < 1e-4
    mirrored = mirrored_order(h, w, c)
    assert not is_unit_lower_triangular(jac)  # the composition is not triangular in either order
    assert not is_unit_lower_triangular(jac[np.ix_(mirrored, mirrored)])


def test_posterior_flow_cells_alternate_mirror():
    flow = PosteriorFlow(num_pairs=2, channels=2, expansion=2)
    assert [cell.mirror for cell in flow.cells] == [False, True, False, True]
    flow(tf.zeros((2, 3, 3, 2)))
    assert len(flow.trainable_weights) == 4 * 7  # 3 kernels + 3 log_g + 1 bias per cell


# ----------------------------------------------------------------------------- bijector


def built_flow(num_pairs=2, seed=4):
    flow = PosteriorFlow(num_pairs=num_pairs, channels=2, expansion=3)
    flow(tf.zeros((1, 3, 3, 2)))
    randomize(flow, seed)
    return flow


def test_bijector_matches_layer_and_round_trips():
    flow = built_flow()
    bij = flow.bijector()
    z = tf.random.stateless_normal((2, 3, 3, 2), seed=(9, 10))
    y = bij.forward(z)
    np.testing.assert_allclose(y, flow(z)[0], atol=1e-6)
    assert float(tf.reduce_max(tf.abs(y - z))) > 1e-2
    np.testing.assert_allclose(bij.inverse(y), z, atol=1e-5)
    inverse = tf.function(bij.inverse)
    np.testing.assert_allclose(inverse(y), z, atol=1e-5)


def test_bijector_log_det_is_zero_and_event_ndims_3():
    bij = built_flow(num_pairs=1).bijector()
    z = tf.random.stateless_normal((4, 2, 3, 3, 2), seed=(11, 12))  # extra sample dim
    assert bij.forward(z).shape == z.shape
    assert bij.forward_min_event_ndims == 3
    assert float(tf.reduce_max(tf.abs(bij.forward_log_det_jacobian(z, event_ndims=3)))) == 0.0
    assert float(tf.reduce_max(tf.abs(bij.inverse_log_det_jacobian(z, event_ndims=3)))) == 0.0


def test_single_shift_iaf_inverse_builds_the_cell():
    cell = AutoregressiveShift(channels=2, expansion=2, mirror=True)
    bij = shift_iaf(cell)  # unbuilt: it must be built before TFP's inversion loop
    y = tf.random.stateless_normal((1, 3, 3, 2), seed=(13, 14))
    x = bij.inverse(y)
    assert cell.built
    assert float(tf.reduce_max(tf.abs(x - y))) > 1e-3
    np.testing.assert_allclose(cell(x), y, atol=1e-5)


def test_chain_applies_cells_in_order():
    flow = built_flow()
    z = tf.random.stateless_normal((1, 3, 3, 2), seed=(15, 16))
    expected = z
    for cell in flow.cells:
        expected = cell(expected)
    np.testing.assert_allclose(flow.bijector().forward(z), expected, atol=1e-6)
    reversed_cells = z
    for cell in reversed(flow.cells):
        reversed_cells = cell(reversed_cells)
    assert float(tf.reduce_max(tf.abs(reversed_cells - expected))) > 1e-4


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize(
    "layer",
    [
        MaskedConv2D(6, 3, zero_diag=True, mirror=True, use_bias=False),
        MaskedConv2D(4, 5, depthwise=True, log_g_offset=-1.0),
        AutoregressiveShift(channels=4, expansion=3, mirror=True),
        PosteriorFlow(num_pairs=2, channels=4, expansion=3),
    ],
)
def test_config_round_trip(layer):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()


def test_checkpoint_round_trip_restores_all_cells(tmp_path):
    flow = built_flow()
    path = tf.train.Checkpoint(flow=flow).write(str(tmp_path / "flow"))
    fresh = PosteriorFlow(num_pairs=2, channels=2, expansion=3)
    fresh(tf.zeros((1, 3, 3, 2)))
    tf.train.Checkpoint(flow=fresh).read(path).assert_consumed()
    assert len(fresh.weights) == len(flow.weights)
    for a, b in zip(flow.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
