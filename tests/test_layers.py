"""Cells, WN conv, BN, SE and skips against the original's rules (docs/design.md#architecture)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import depends_on, tiny_config

from nvae_tf.layers.cells import DecoderCell, EncoderCell
from nvae_tf.layers.combiners import DecoderCombiner, EncoderCombiner
from nvae_tf.layers.depthwise import depthwise_conv2d_same
from nvae_tf.layers.latent_group import LatentGroup
from nvae_tf.layers.linear_ops import Pointwise
from nvae_tf.layers.normalization import BatchNorm, BNSwish, fused_batch_norm_train
from nvae_tf.layers.recompute import run_cells
from nvae_tf.layers.shapes import known_shape
from nvae_tf.layers.skips import FactorizedReduce, UpSkip
from nvae_tf.layers.squeeze_excitation import SqueezeExcitation
from nvae_tf.layers.weight_norm import Conv2D, torch_uniform
from nvae_tf.model import NVAE

pytestmark = pytest.mark.usefixtures("seeded")

RNG = np.random.default_rng(1234)


def randn(*shape):
    return tf.constant(RNG.standard_normal(shape).astype("float32"))


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def torch_layout(kernel, depthwise=False):
    """TF kernel (kh, kw, Cin, Cout) / depthwise (kh, kw, C, 1) -> PyTorch (Cout, Cin/g, kh, kw)."""
    kernel = np.asarray(kernel)
    if depthwise:
        return np.transpose(kernel, (2, 3, 0, 1))
    return np.transpose(kernel, (3, 2, 0, 1))


# ---------------------------------------------------------------------------- get_config round trip


def fixed(*shape):
    """The same pseudo-random tensor for the same shape (inputs must repeat across calls)."""
    return tf.constant(np.random.default_rng(sum(shape)).standard_normal(shape).astype("float32"))


def _seed():
    return tf.constant([3, 4], tf.int32)


def _group_call(group, s, feature):
    s = run_cells(group.cells, s, training=False)
    return group(s, feature, _seed(), training=False)[0]


LAYER_CASES = {
    "conv_wn_stride2": (lambda: Conv2D(8, 3, strides=2, name="c"), lambda l: l(fixed(2, 8, 8, 4))),
    "conv_depthwise_plain": (
        lambda: Conv2D(6, 5, use_bias=False, weight_norm=False, depthwise=True),
        lambda l: l(fixed(2, 8, 8, 6)),
    ),
    "conv_log_g_offset": (
        lambda: Conv2D(4, 1, log_g_offset=-math.log(10.0)),
        lambda l: l(fixed(2, 4, 4, 3)),
    ),
    "batchnorm": (lambda: BatchNorm(), lambda l: l(fixed(2, 4, 4, 5), training=False)),
    "bn_swish": (lambda: BNSwish(), lambda l: l(fixed(2, 4, 4, 5), training=False)),
    "squeeze_excitation": (lambda: SqueezeExcitation(), lambda l: l(fixed(2, 4, 4, 80))),
    "factorized_reduce": (lambda: FactorizedReduce(10), lambda l: l(fixed(2, 8, 8, 5))),
    "up_skip": (lambda: UpSkip(4), lambda l: l(fixed(2, 4, 4, 8))),
    "encoder_cell": (lambda: EncoderCell(), lambda l: l(fixed(2, 8, 8, 4), training=False)),
    "encoder_cell_down": (
        lambda: EncoderCell(downsample=True, use_se=False),
        lambda l: l(fixed(2, 8, 8, 4), training=False),
    ),
    "decoder_cell": (lambda: DecoderCell(3), lambda l: l(fixed(2, 4, 4, 8), training=False)),
    "decoder_cell_up": (
        lambda: DecoderCell(6, upsample=True),
        lambda l: l(fixed(2, 4, 4, 8), training=False),
    ),
    "encoder_combiner": (
        lambda: EncoderCombiner(6),
        lambda l: l(fixed(2, 4, 4, 6), fixed(2, 4, 4, 8)),
    ),
    "decoder_combiner": (
        lambda: DecoderCombiner(8),
        lambda l: l(fixed(2, 4, 4, 8), fixed(2, 4, 4, 20)),
    ),
    "latent_group_top": (
        lambda: LatentGroup(0, False, 0, 8, 8, latent_channels=5),
        lambda l: _group_call(l, fixed(2, 4, 4, 8), fixed(2, 4, 4, 8)),
    ),
    "latent_group_up_flow": (
        lambda: LatentGroup(
            1, True, 1, 8, 6, latent_channels=5, num_flows=1, residual_posterior=True
        ),
        lambda l: _group_call(l, fixed(2, 4, 4, 16), fixed(2, 8, 8, 6)),
    ),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_get_config_from_config_round_trip(case):
    make, call = LAYER_CASES[case]
    layer = make()
    expected = call(layer)
    config = layer.get_config()

    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    call(clone)  # builds the same variables
    assert [tuple(v.shape) for v in clone.weights] == [tuple(v.shape) for v in layer.weights]
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(call(clone), expected, rtol=1e-6, atol=1e-6)

    # Registered for Keras serialization (package nvae_tf), so saved models reload them.
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer) and revived.get_config() == config


def test_model_get_config_from_config_round_trip(bernoulli_model):
    model = bernoulli_model
    config = model.get_config()
    clone = NVAE.from_config(dict(config))
    assert clone.config == model.config
    assert clone.get_config()["config"] == config["config"]
    assert [tuple(v.shape) for v in clone.weights] == [tuple(v.shape) for v in model.weights]
    clone.set_weights(model.get_weights())
    x = tf.zeros((2, 32, 32, 1))
    a = model(x, training=False, seed=[5, 6])
    b = clone(x, training=False, seed=[5, 6])
    np.testing.assert_allclose(a.kl, b.kl, rtol=1e-6)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(revived, NVAE) and revived.config == model.config


# ------------------------------------------------ weight norm (docs/design.md#weight-normalization)


@pytest.mark.parametrize("depthwise", [False, True])
def test_weight_norm_effective_kernel_starts_at_raw_kernel(depthwise):
    conv = Conv2D(6, 3 if not depthwise else 5, depthwise=depthwise)
    conv(randn(1, 6, 6, 6))
    v = torch_layout(conv.kernel.numpy(), depthwise)
    w = torch_layout(conv.effective_kernel().numpy(), depthwise)
    norm = np.sqrt((v**2).sum(axis=(1, 2, 3), keepdims=True))
    # log_g = log(||v|| + 0.01): effective = v * (||v|| + 0.01) / (||v|| + 1e-5).
    np.testing.assert_allclose(np.exp(conv.log_g.numpy()), norm.ravel() + 0.01, rtol=1e-5)
    np.testing.assert_allclose(w, v * (norm + 0.01) / (norm + 1e-5), rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(w - v) <= 0.03 * np.abs(v) + 1e-7)
    # PyTorch default init: U(+-1/sqrt(fan_in)) for kernel and bias.
    fan_in = v[0].size
    assert np.abs(v).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(conv.bias.numpy()).max() <= 1 / math.sqrt(fan_in)


def test_torch_uniform_init_is_uniform_seeded_and_serializable():
    init = torch_uniform(16)
    keras.utils.set_random_seed(5)
    a = init((64, 64), "float32")
    keras.utils.set_random_seed(5)
    b = init((64, 64), "float32")
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and np.abs(a).max() <= 0.25
    # Uniform on (-0.25, 0.25): mean 0, variance 0.25^2 / 3.
    assert abs(a.mean()) < 0.01 and a.var() == pytest.approx(0.25**2 / 3, rel=0.05)
    assert init((3,), "bfloat16").dtype == "bfloat16"
    restored = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(restored, type(init)) and restored.bound == init.bound


@pytest.mark.parametrize("depthwise", [False, True])
def test_weight_norm_per_output_channel_norm_is_exp_log_g(depthwise):
    conv = Conv2D(6, 3, depthwise=depthwise)
    conv(randn(1, 6, 6, 6))
    conv.kernel.assign(randn(*conv.kernel.shape) * 3.0)
    log_g = RNG.uniform(-2, 2, 6).astype("float32")
    conv.log_g.assign(log_g)
    v = torch_layout(conv.kernel.numpy(), depthwise)
    w = torch_layout(conv.effective_kernel().numpy(), depthwise)
    v_norm = np.sqrt((v**2).sum(axis=(1, 2, 3)))
    w_norm = np.sqrt((w**2).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(w_norm, np.exp(log_g) * v_norm / (v_norm + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(w_norm, np.exp(log_g), rtol=1e-4)
    # Direction unchanged: w is a positive multiple of v per output channel.
    np.testing.assert_allclose(
        w / w_norm[:, None, None, None], v / v_norm[:, None, None, None], rtol=1e-4, atol=1e-6
    )


def test_plain_conv_uses_raw_kernel():
    conv = Conv2D(4, 1, use_bias=False, weight_norm=False)
    conv(randn(1, 4, 4, 3))
    assert [w.name for w in conv.weights] == ["kernel"]
    np.testing.assert_array_equal(conv.effective_kernel(), conv.kernel.numpy())


def test_kernel_matrix_is_torch_flattening():
    conv = Conv2D(5, 3)
    conv(randn(1, 6, 6, 4))
    expected = torch_layout(conv.effective_kernel().numpy()).reshape(5, -1)
    # Rows per output channel; the same singular values whatever the column order.
    got = conv.kernel_matrix().numpy().T
    assert got.shape == (5, 4 * 9)
    np.testing.assert_allclose(
        np.linalg.svd(got, compute_uv=False), np.linalg.svd(expected, compute_uv=False), rtol=1e-5
    )
    dw = Conv2D(6, 5, depthwise=True, use_bias=False, weight_norm=False)
    dw(randn(1, 6, 6, 6))
    assert dw.kernel_matrix().shape == (25, 6)


def test_conv_argument_errors():
    with pytest.raises(ValueError, match="odd"):
        Conv2D(4, 2)
    with pytest.raises(ValueError, match="strides"):
        Conv2D(4, 3, strides=3)
    with pytest.raises(ValueError, match="depthwise"):
        Conv2D(4, 3, depthwise=True)(randn(1, 4, 4, 3))


# -------------------------------------------------- padding (docs/design.md#padding-and-resampling)


@pytest.mark.parametrize("size", [8, 7])
def test_stride2_conv_pads_symmetrically_like_pytorch(size):
    conv = Conv2D(5, 3, strides=2)
    x = randn(2, size, size, 3)
    y = conv(x).numpy()
    padded = np.pad(x.numpy(), ((0, 0), (1, 1), (1, 1), (0, 0)))
    reference = tf.nn.conv2d(padded, conv.effective_kernel(), 2, "VALID").numpy()
    reference += conv.bias.numpy()
    expected_size = (size + 2 - 3) // 2 + 1  # PyTorch's output size
    assert y.shape == (2, expected_size, expected_size, 5)
    assert conv.compute_output_shape((2, size, size, 3)) == (2, expected_size, expected_size, 5)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
    same = tf.nn.conv2d(x, conv.effective_kernel(), 2, "SAME").numpy() + conv.bias.numpy()
    if size % 2 == 0:  # TF 'SAME' pads bottom/right only on even inputs: another grid
        assert np.abs(same - y).max() > 1e-2
    else:
        np.testing.assert_allclose(same, y, rtol=1e-5, atol=1e-5)


def test_depthwise_5x5_pads_two_each_side():
    conv = Conv2D(6, 5, use_bias=False, weight_norm=False, depthwise=True)
    x = randn(2, 6, 6, 6)
    y = conv(x)
    padded = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)))
    reference = tf.nn.depthwise_conv2d(padded, conv.effective_kernel(), (1, 1, 1, 1), "VALID")
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)


def test_depthwise_cpu_kernel_gradient_equals_tensorflows():
    x, kernel = randn(3, 7, 6, 5), randn(5, 5, 5, 1)

    def grads(conv):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            loss = tf.reduce_sum(tf.sin(conv(x, kernel)))
        return tape.gradient(loss, [x, kernel])

    native = grads(lambda a, k: tf.nn.depthwise_conv2d(a, k, (1, 1, 1, 1), "SAME"))
    ours = grads(depthwise_conv2d_same)
    # Unknown batch size, as in exported signatures.
    traced = tf.function(
        lambda a, k: grads(depthwise_conv2d_same),
        input_signature=[tf.TensorSpec((None, 7, 6, 5)), tf.TensorSpec((5, 5, 5, 1))],
    )(x, kernel)
    for a, b, c in zip(native, ours, traced):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["depthwise", "bn_swish", "bn_swish_conv"])
def test_backward_recomputation_waits_for_the_upstream_gradient(kind):
    """What a hand-written gradient recomputes from forward tensors (the depthwise kernel
    gradient's transposed input, BN-Swish's activation) must not run in the forward pass: the
    executor runs any op whose inputs are ready, and would keep the result until the backward
    pass, an activation-sized tensor per layer (MNIST's step: ~430 MB at its peak)."""
    shape = (2, 6, 6, 4)

    @tf.function(input_signature=[tf.TensorSpec(shape)] * 2)
    def backward(x, d_out):
        kernel, gamma, beta = tf.ones((5, 5, 4, 1)), tf.ones(4), tf.zeros(4)
        with tf.GradientTape() as tape:
            tape.watch(x)
            if kind == "depthwise":
                y = depthwise_conv2d_same(x, kernel)
            else:
                then = (Pointwise, tf.ones((1, 1, 4, 4))) if kind == "bn_swish_conv" else None
                y = fused_batch_norm_train(x, gamma, beta, 1e-5, swish=True, then=then)[0]
        return tape.gradient(y, x, output_gradients=d_out)

    graph = backward.get_concrete_function().graph
    d_out = graph.inputs[1].op
    ops = graph.get_operations()
    if kind == "depthwise":
        recomputed = [op for op in ops if op.type == "Transpose"]
    else:  # the XLA-compiled Swish and its gradient, from the BN input
        recomputed = [op for op in ops if op.type.endswith("PartitionedCall")]
        assert len(recomputed) == (2 if kind == "bn_swish_conv" else 1)
    assert recomputed
    assert all(depends_on(op, d_out) for op in recomputed)


def test_known_shape_adds_no_op_when_static_and_reads_unknown_dims_at_run_time():
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, (2, 7, 6, 5))
        assert known_shape(x) == [2, 7, 6, 5]
    assert [op.type for op in graph.get_operations()] == ["Placeholder"]
    dynamic = tf.function(
        lambda a: tf.stack(known_shape(a)), input_signature=[tf.TensorSpec((None, 7, None, 5))]
    )
    np.testing.assert_array_equal(dynamic(tf.zeros((3, 7, 4, 5))), [3, 7, 4, 5])


# ----------------------------------------------------------------------------- SE (paper §3.1.1)


@pytest.mark.parametrize(
    "channels, hidden", [(4, 4), (8, 4), (64, 4), (80, 5), (128, 8), (256, 16), (960, 60)]
)
def test_se_hidden_width(channels, hidden):
    se = SqueezeExcitation()
    se.build((None, 2, 2, channels))
    assert tuple(se.squeeze.kernel.shape) == (channels, hidden)
    assert tuple(se.excite.kernel.shape) == (hidden, channels)
    assert se.squeeze.use_bias and se.excite.use_bias


def test_se_is_gap_relu_sigmoid_gate():
    se = SqueezeExcitation()
    x = randn(2, 3, 3, 32)
    y = se(x).numpy()
    pooled = x.numpy().mean(axis=(1, 2))
    hidden = np.maximum(pooled @ se.squeeze.kernel.numpy() + se.squeeze.bias.numpy(), 0)
    gate = sigmoid(hidden @ se.excite.kernel.numpy() + se.excite.bias.numpy())
    np.testing.assert_allclose(y, x.numpy() * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- cells (docs/design.md#cells)


def test_encoder_cells_shapes_and_ops():
    x = randn(2, 8, 8, 4)
    normal, down = EncoderCell(), EncoderCell(downsample=True)
    assert normal(x, training=False).shape == (2, 8, 8, 4)
    assert down(x, training=False).shape == (2, 4, 4, 8)  # doubles C, halves H, W
    assert (down.conv_1.strides, down.conv_2.strides) == (2, 1)
    assert tuple(down.conv_1.kernel.shape) == (3, 3, 4, 8)
    assert tuple(down.conv_2.kernel.shape) == (3, 3, 8, 8)
    for conv in (down.conv_1, down.conv_2):
        assert conv.weight_norm and conv.use_bias
    bns = [l for l in down._flatten_layers() if isinstance(l, BatchNorm)]
    assert len(bns) == 2  # two (fused) BNs per encoder cell (docs/design.md#batch-normalization)
    assert isinstance(down.reduce, FactorizedReduce) and normal.reduce is None


@pytest.mark.parametrize("expansion", [6, 3])
def test_decoder_cells_shapes_and_expansion_from_input_width(expansion):
    x = randn(2, 4, 4, 8)
    normal, up = DecoderCell(expansion), DecoderCell(expansion, upsample=True)
    assert normal(x, training=False).shape == (2, 4, 4, 8)
    assert up(x, training=False).shape == (2, 8, 8, 4)  # halves C, doubles H, W
    for cell, cout in ((normal, 8), (up, 4)):
        hidden = 8 * expansion  # from the INPUT width, also for the up cell (docs/design.md#cells)
        assert tuple(cell.expand.kernel.shape) == (1, 1, 8, hidden)
        assert tuple(cell.depthwise.kernel.shape) == (5, 5, hidden, 1)
        assert tuple(cell.project.kernel.shape) == (1, 1, hidden, cout)
        for conv in (cell.expand, cell.depthwise, cell.project):
            assert not conv.weight_norm and not conv.use_bias
        bns = [l for l in cell._flatten_layers() if isinstance(l, BatchNorm)]
        assert len(bns) == 4  # plain, fused, fused, plain (docs/design.md#cells)
        assert tuple(cell.bn_in.gamma.shape) == (8,) and tuple(cell.bn_out.gamma.shape) == (cout,)
    assert isinstance(up.up_skip, UpSkip) and normal.up_skip is None


@pytest.mark.parametrize(
    "make, fused_convs",
    [
        (lambda: DecoderCell(6), ("depthwise", "project")),
        (lambda: DecoderCell(6, upsample=True), ("depthwise", "project")),
        (lambda: EncoderCell(), ("conv_1", "conv_2")),
        (lambda: EncoderCell(downsample=True), ("conv_2",)),  # conv_1 has stride 2
    ],
)
def test_cell_training_gradients_equal_the_unfused_layers(make, fused_convs, monkeypatch):
    """In training, a BN-Swish runs with the conv after it as one op whose gradient recomputes
    the Swish output (layers/linear_ops.py): same output, same gradients for the input and
    every variable as the layers one after the other, inside tf.function."""
    cell = make()
    x = randn(2, 4, 4, 8)
    weights = randn(*cell(x, training=False).shape)

    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = cell(x, training=True, update_stats=False)
            loss = tf.reduce_sum(tf.sin(y) * weights)
        return [y, *tape.gradient(loss, [x, *cell.trainable_variables])]

    taken, as_linear_op = [], Conv2D.as_linear_op

    def recording(conv):
        op = as_linear_op(conv)
        taken.extend([conv.name] if op else [])
        return op

    monkeypatch.setattr(Conv2D, "as_linear_op", recording)
    fused = tf.function(step)()
    assert tuple(taken) == fused_convs
    monkeypatch.setattr(Conv2D, "as_linear_op", lambda self: None)
    plain = tf.function(step)()
    assert len(fused) == len(plain) == 2 + len(cell.trainable_variables)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cell_op_order_follows_spec():
    """Compose the sub-layers by hand in the order of docs/design.md#cells (SE off)."""
    x = randn(2, 4, 4, 8)
    enc = EncoderCell(use_se=False)
    got = enc(x, training=False)
    y = enc.conv_1(silu(enc.bn_swish_1.bn(x, training=False).numpy()))
    y = enc.conv_2(silu(enc.bn_swish_2.bn(y, training=False).numpy()))
    np.testing.assert_allclose(got, x + 0.1 * y.numpy(), rtol=1e-5, atol=1e-5)

    up = DecoderCell(6, upsample=True, use_se=False)
    up(x, training=False)  # build
    # Non-trivial statistics and affine weights: inference folds every BN into a conv.
    for bn in [l for l in up._flatten_layers() if isinstance(l, BatchNorm)]:
        c = bn.gamma.shape[0]
        bn.gamma.assign(RNG.uniform(0.5, 1.5, c).astype("float32"))
        bn.beta.assign(RNG.uniform(-0.5, 0.5, c).astype("float32"))
        bn.moving_mean.assign(RNG.uniform(-1.0, 1.0, c).astype("float32"))
        bn.moving_variance.assign(RNG.uniform(0.2, 3.0, c).astype("float32"))
    got = up(x, training=False)
    # Nearest x2 up-sampling FIRST, then BN, 1x1, BN-Swish, dw 5x5, BN-Swish, 1x1, BN.
    y = np.repeat(np.repeat(x.numpy(), 2, axis=1), 2, axis=2)
    y = up.expand(up.bn_in(y, training=False))
    y = up.depthwise(silu(up.bn_swish_1.bn(y, training=False).numpy()))
    y = up.project(silu(up.bn_swish_2.bn(y, training=False).numpy()))
    y = up.bn_out(y, training=False)
    np.testing.assert_allclose(got, up.up_skip(x) + 0.1 * y, rtol=1e-5, atol=1e-5)


def test_residual_branch_is_scaled_by_one_tenth():
    x = randn(2, 8, 8, 4)
    # Encoder cell: branch ends with a WN conv; g -> 0 makes it output its bias (= 1).
    cell = EncoderCell(use_se=False)
    cell(x, training=False)
    cell.conv_2.log_g.assign(tf.fill(cell.conv_2.log_g.shape, -100.0))
    cell.conv_2.bias.assign(tf.ones_like(cell.conv_2.bias))
    np.testing.assert_allclose(cell(x, training=False) - x, 0.1, rtol=1e-5)
    # Decoder cell: branch ends with a BN; gamma 0, beta 1 makes it output 1 (inference mode).
    dec = DecoderCell(6, use_se=False)
    dec(x, training=False)
    dec.bn_out.gamma.assign(tf.zeros_like(dec.bn_out.gamma))
    dec.bn_out.beta.assign(tf.ones_like(dec.bn_out.beta))
    np.testing.assert_allclose(dec(x, training=False) - x, 0.1, rtol=1e-5)
    # With SE the constant branch is gated: 0.1 * sigmoid(...) per channel.
    se_cell = DecoderCell(6, use_se=True)
    se_cell(x, training=False)
    se_cell.bn_out.gamma.assign(tf.zeros_like(se_cell.bn_out.gamma))
    se_cell.bn_out.beta.assign(tf.ones_like(se_cell.bn_out.beta))
    gate = se_cell.se(tf.ones((1, 1, 1, 4))).numpy().ravel()
    np.testing.assert_allclose(
        se_cell(x, training=False) - x, 0.1 * np.broadcast_to(gate, x.shape), rtol=1e-5, atol=1e-7
    )
    # Down cell: skip is FactorizedReduce.
    down = EncoderCell(downsample=True, use_se=False)
    down(x, training=False)
    down.conv_2.log_g.assign(tf.fill(down.conv_2.log_g.shape, -100.0))
    down.conv_2.bias.assign(tf.ones_like(down.conv_2.bias))
    np.testing.assert_allclose(down(x, training=False) - down.reduce(x), 0.1, rtol=1e-5)


# --------------------------------------------------------------------- skips (docs/design.md#cells)


def test_factorized_reduce_channel_split_and_shifted_views():
    fr = FactorizedReduce(10)
    x = randn(2, 8, 8, 5)
    y = fr(x).numpy()
    assert [c.filters for c in fr.convs] == [2, 2, 2, 4]
    assert y.shape == (2, 4, 4, 10)
    s = silu(x.numpy())
    # Views: unshifted, one row and column, one column, one row (PyTorch x[:, :, 1:, 1:] etc).
    offsets = [(0, 0), (1, 1), (0, 1), (1, 0)]
    parts = []
    for conv, (dr, dc) in zip(fr.convs, offsets):
        assert conv.weight_norm and conv.use_bias and conv.kernel_size == 1 and conv.strides == 2
        k = conv.effective_kernel().numpy()[0, 0]
        parts.append(s[:, dr::2, dc::2, :] @ k + conv.bias.numpy())
    np.testing.assert_allclose(y, np.concatenate(parts, axis=-1), rtol=1e-5, atol=1e-5)
    assert [c.filters for c in FactorizedReduce(8).convs] == [2, 2, 2, 2]
    assert [c.filters for c in FactorizedReduce(60).convs] == [15, 15, 15, 15]


def test_factorized_reduce_phases_match_shifted_views_with_gradients():
    """Static even sizes take the space_to_depth path; unknown sizes the shifted slices: the
    same output and, to rounding, the same gradients."""
    fr = FactorizedReduce(10)
    x = randn(2, 8, 8, 5)
    fr(x)

    def loss_and_grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fr(x)
            loss = tf.reduce_sum(y * tf.sin(y))
        return y, tape.gradient(loss, [x, *fr.trainable_variables])

    static = tf.function(loss_and_grads)
    dynamic = tf.function(loss_and_grads, input_signature=[tf.TensorSpec((2, None, None, 5))])
    assert "SpaceToDepth" in {
        op.type for op in static.get_concrete_function(x).graph.get_operations()
    }
    assert "SpaceToDepth" not in {
        op.type for op in dynamic.get_concrete_function().graph.get_operations()
    }
    (y_a, grads_a), (y_b, grads_b) = static(x), dynamic(x)
    np.testing.assert_allclose(y_a, y_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def bilinear_align_corners(x, out_h, out_w):
    """NumPy bilinear resize with align_corners=True (PyTorch/TF1 semantics), NHWC."""
    _, h, w, _ = x.shape
    ys = np.arange(out_h) * ((h - 1) / (out_h - 1))
    xs = np.arange(out_w) * ((w - 1) / (out_w - 1))
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bottom = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def test_up_skip_is_bilinear_align_corners_then_1x1_without_bias():
    skip = UpSkip(3)
    x = randn(2, 4, 5, 6)
    y = skip(x).numpy()
    assert y.shape == (2, 8, 10, 3)
    assert not skip.conv.use_bias and skip.conv.weight_norm
    up = bilinear_align_corners(x.numpy(), 8, 10)
    k = skip.conv.effective_kernel().numpy()[0, 0]
    np.testing.assert_allclose(y, up @ k, rtol=1e-5, atol=1e-5)
    # Corners are copied exactly (align_corners) ...
    np.testing.assert_allclose(up[:, [0, -1]][:, :, [0, -1]], x.numpy()[:, [0, -1]][:, :, [0, -1]])
    # ... which the half-pixel tf.image.resize does not do.
    half_pixel = tf.image.resize(x, (8, 10), "bilinear").numpy() @ k
    assert np.abs(half_pixel - y).max() > 1e-2


# -------------------------------------------------- batch norm (docs/design.md#batch-normalization)


def test_batchnorm_constants_everywhere(bernoulli_model):
    bns = bernoulli_model.batchnorm_layers()
    assert bns
    for bn in bns:
        assert bn.momentum == pytest.approx(0.95)
        assert bn.epsilon == pytest.approx(1e-5)
        assert bn.synchronized
        assert bn.center and bn.scale


def test_batchnorm_update_matches_pytorch_momentum_and_epsilon():
    bn = BatchNorm()
    rng = np.random.default_rng(0)
    x = np.stack(
        [
            rng.normal(3.0, 2.0, (4, 5, 5)),  # channel 0: mean 3, std 2
            rng.normal(-1.0, 0.01, (4, 5, 5)),
        ],
        axis=-1,
    ).astype("float32")  # tiny variance
    y = bn(x, training=True).numpy()
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean, 0.05 * mean, rtol=1e-5, atol=1e-6)
    # The moving variance takes the unbiased batch variance, as PyTorch's BN: 100 values.
    np.testing.assert_allclose(bn.moving_variance, 0.95 + 0.05 * var * 100 / 99, rtol=1e-5)
    # Inference mode uses the moving statistics.
    z = bn(x, training=False).numpy()
    expected = (x - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-5)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("synchronized", [True, False])
def test_unfused_batchnorm_matches_pytorch_statistics(synchronized):
    # 2-D input takes the op-by-op path (the fused kernel wants NHWC); same formulas.
    x = np.random.default_rng(1).normal(2.0, 3.0, (10, 4)).astype("float32")
    bn = BatchNorm(synchronized=synchronized)
    assert not bn._fusable(x)
    y = bn(x, training=True).numpy()
    mean, var = x.mean(axis=0), x.var(axis=0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean, 0.05 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, 0.95 + 0.05 * x.var(axis=0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize("swish", [False, True])
def test_fused_single_replica_batchnorm_is_exact(swish):
    """One replica uses the fused kernel and its hand-written gradient (BN, or BN + Swish
    with the Swish input recomputed): output, gradients and stats match a float64 reference."""
    x = randn(4, 5, 5, 3) + 100.0  # |mean| / std = 100: one-pass moments lose digits here
    bn = BatchNorm()
    bn.build(x.shape)
    bn.gamma.assign([0.5, 1.0, 2.0])
    bn.beta.assign([0.1, -0.3, 0.2])
    assert bn._fusable(x)

    def reference(x, gamma, beta):  # float64, centred before the moments
        x = tf.cast(x, tf.float64) - 100.0
        mean, var = tf.nn.moments(x, [0, 1, 2])
        y = tf.nn.batch_normalization(
            x, mean, var, tf.cast(beta, tf.float64), tf.cast(gamma, tf.float64), 1e-5
        )
        return (y * tf.sigmoid(y) if swish else y), var

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = bn(x, training=True, swish=swish)
        y_ref, var = reference(x, bn.gamma, bn.beta)
        losses = [tf.reduce_sum(tf.sin(y)), tf.reduce_sum(tf.sin(y_ref))]
    got, want = (tape.gradient(loss, [x, bn.gamma, bn.beta]) for loss in losses)
    np.testing.assert_allclose(y, y_ref, atol=1e-4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    # Unbiased, as PyTorch's BN: 4 * 5 * 5 = 100 values per channel.
    np.testing.assert_allclose(bn.moving_variance, 0.95 + 0.05 * var * 100 / 99, rtol=1e-6)


def test_fused_bn_swish_gradient_matches_autodiff_in_a_graph():
    """The hand-written BN + Swish gradient equals autodiff of fused BN then Keras' silu, to
    rounding, inside tf.function (where the step runs) and with a non-trivial upstream."""
    x = randn(8, 6, 6, 5) * 2.0 + 0.5
    gamma, beta = tf.constant(RNG.uniform(0.5, 1.5, 5).astype("float32")), randn(5)

    @tf.function
    def grads(custom):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            if custom:
                y = fused_batch_norm_train(x, gamma, beta, 1e-5, swish=True)[0]
            else:
                y = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-5)[0]
                y = keras.activations.silu(y)
            loss = tf.reduce_sum(tf.cos(y) * x)
        return tape.gradient(loss, [x, gamma, beta])

    for a, b in zip(grads(True), grads(False)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("swish", [False, True])
def test_bfloat16_batchnorm_feeds_the_fused_kernels_without_casts(swish):
    """Under mixed_bfloat16 the training BN hands its bfloat16 input to the fused kernels as
    it is (they keep the statistics in float32): no activation-sized cast either way, and
    output, gradients and statistics agree with the float32 layer to bfloat16 rounding."""
    rng = np.random.default_rng(5)
    x16 = tf.cast(rng.normal(0.5, 2.0, (4, 6, 6, 8)), tf.bfloat16)
    gamma = rng.uniform(0.5, 1.5, 8).astype("float32")
    layers = {}
    for dtype in ("float32", "mixed_bfloat16"):
        layers[dtype] = BatchNorm(dtype=dtype)
        layers[dtype].build(x16.shape)
        layers[dtype].gamma.assign(gamma)

    @tf.function
    def run(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, swish=swish)
            loss = tf.reduce_sum(tf.cos(tf.cast(y, tf.float32)))
        return y, tape.gradient(loss, [x, layer.gamma, layer.beta])

    graph = run.get_concrete_function(layers["mixed_bfloat16"], x16).graph
    name = layers["mixed_bfloat16"].name
    assert not [op for op in graph.get_operations() if op.type == "Cast" and name in op.name]
    y16, grads16 = run(layers["mixed_bfloat16"], x16)
    y32, grads32 = run(layers["float32"], tf.cast(x16, tf.float32))  # the same input values
    assert y16.dtype == tf.bfloat16 and grads16[0].dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(y16, tf.float32), y32, rtol=1e-2, atol=1e-2)
    # d_gamma and d_beta are sums over 144 upstream values, each rounded to bfloat16 (2^-8).
    for a, b, atol in zip(grads16, grads32, (2e-2, 0.1, 0.1)):
        np.testing.assert_allclose(tf.cast(a, tf.float32), b, rtol=2e-2, atol=atol)
    for stat in ("moving_mean", "moving_variance"):
        a, b = (getattr(layers[d], stat).numpy() for d in ("mixed_bfloat16", "float32"))
        np.testing.assert_allclose(a, b, rtol=1e-6)
    infer = tf.function(lambda layer, x: layer(x, training=False))
    graph = infer.get_concrete_function(layers["mixed_bfloat16"], x16).graph
    assert not [op for op in graph.get_operations() if op.type == "Cast"]
    np.testing.assert_allclose(
        tf.cast(infer(layers["mixed_bfloat16"], x16), tf.float32),
        infer(layers["float32"], tf.cast(x16, tf.float32)),
        rtol=1e-2,
        atol=1e-2,
    )


@pytest.mark.parametrize("layer_type", [BatchNorm, BNSwish])
def test_update_stats_false_uses_batch_stats_without_moving_them(layer_type):
    layer = layer_type()
    x = randn(4, 3, 3, 6) * 2.0 + 1.0
    layer(x, training=False)  # build
    bn = layer if isinstance(layer, BatchNorm) else layer.bn
    bn.gamma.assign(RNG.uniform(0.5, 1.5, 6).astype("float32"))
    bn.beta.assign(RNG.uniform(-0.5, 0.5, 6).astype("float32"))
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    y_frozen = layer(x, training=True, update_stats=False).numpy()
    np.testing.assert_array_equal(bn.moving_mean, before[0])
    np.testing.assert_array_equal(bn.moving_variance, before[1])
    y_train = layer(x, training=True).numpy()  # the normal training call, for comparison
    np.testing.assert_allclose(y_frozen, y_train, rtol=1e-5, atol=1e-5)
    assert not np.allclose(bn.moving_mean, before[0])  # the normal call did move them
    xn = x.numpy()
    ref = (xn - xn.mean(axis=(0, 1, 2))) / np.sqrt(
        xn.var(axis=(0, 1, 2)) + 1e-5
    ) * bn.gamma.numpy() + bn.beta.numpy()
    if layer_type is BNSwish:
        ref = silu(ref)
    np.testing.assert_allclose(y_frozen, ref, rtol=1e-4, atol=1e-4)


def test_update_stats_flag_reaches_every_bn_of_a_cell():
    for cell in (EncoderCell(downsample=True), DecoderCell(6, upsample=True)):
        x = randn(4, 8, 8, 8)
        cell(x, training=False)
        bns = [l for l in cell._flatten_layers() if isinstance(l, BatchNorm)]
        before = [bn.moving_mean.numpy().copy() for bn in bns]
        cell(x, training=True, update_stats=False)
        for bn, b in zip(bns, before):
            np.testing.assert_array_equal(bn.moving_mean, b)
        cell(x, training=True)
        assert all(not np.array_equal(bn.moving_mean, b) for bn, b in zip(bns, before))


def test_tiny_config_is_what_the_layer_tests_assume():
    c = tiny_config()
    assert c.groups_per_scale == [1, 2] and c.channels_per_scale == [16, 8]


@pytest.mark.parametrize("stacked", [False, True])  # one kernel; two, normalized together
@pytest.mark.parametrize("dense", [True, False])  # dense, depthwise
def test_weight_normalize_gradient_matches_autodiff(dense, stacked):
    from nvae_tf.layers.weight_norm import weight_normalize

    rng = np.random.default_rng(4)
    lead = (2,) if stacked else ()
    axes = tuple(a + len(lead) for a in ((0, 1, 2) if dense else (0, 1, 3)))
    v = tf.constant(rng.normal(size=(*lead, 3, 3, 5, 6)), tf.float32)
    channels = 6 if dense else 5
    log_g = tf.constant(rng.normal(size=(*lead, channels)), tf.float32)
    upstream = tf.constant(rng.normal(size=v.shape), tf.float32)

    def by_formula(v, log_g):
        shape = (*lead, 1, 1, 1, -1) if dense else (*lead, 1, 1, -1, 1)
        norm = tf.sqrt(tf.reduce_sum(tf.square(v), axis=axes, keepdims=True))
        return tf.reshape(tf.exp(log_g), shape) * v / (norm + 1e-5)

    results = []
    for fn in (weight_normalize, by_formula):
        with tf.GradientTape() as tape:
            tape.watch([v, log_g])
            w = fn(v, log_g, axes) if fn is weight_normalize else fn(v, log_g)
            loss = tf.reduce_sum(w * upstream)
        results.append([w, *tape.gradient(loss, [v, log_g])])
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)


def test_lean_custom_gradient_builds_no_dead_zeros_and_the_same_gradients():
    from nvae_tf.layers import lean_gradient

    def scaled(x, g):
        def grad(dy):
            return dy * g, tf.reduce_sum(dy * x)

        return x * g, grad

    x, g = tf.random.stateless_normal((3, 4), seed=[1, 2]), tf.constant(1.5)
    results, sizes = [], []

    def gradients(f):
        @tf.function(autograph=False)
        def step(x, g):
            with tf.GradientTape() as tape:
                tape.watch([x, g])
                loss = tf.reduce_sum(tf.square(f(x, g)))
            return tape.gradient(loss, [x, g])

        return step

    for decorate in (tf.custom_gradient, lean_gradient.custom_gradient):
        step = gradients(decorate(scaled))
        graph = step.get_concrete_function(x, g).graph
        sizes.append(len(graph.get_operations()))
        results.append(step(x, g))
    for a, b in zip(*results):
        np.testing.assert_array_equal(b, a)
    assert sizes[1] < sizes[0]  # no zeros for the two inputs
    with pytest.raises(ValueError, match="at most 4 inputs"):
        lean_gradient.custom_gradient(lambda *a: (a[0], lambda d: a))(*[x] * 5)
