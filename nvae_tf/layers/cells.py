"""The residual cells of NVAE (paper §3.1, Fig. 3): ``skip(x) + 0.1 * SE(branch(x))``.

``EncoderCell`` (pre-process and encoder tower) has a BN-Swish-Conv3x3 branch applied twice;
``DecoderCell`` (decoder tower and post-process) is an inverted residual with a depthwise 5x5.
Down cells double the channels, up cells halve them. See docs/design.md#cells.
"""

import keras
import tensorflow as tf

from nvae_tf.layers.linear_ops import pointwise_conv2d
from nvae_tf.layers.normalization import BatchNorm, BNSwish
from nvae_tf.layers.shapes import known_shape
from nvae_tf.layers.skips import FactorizedReduce, UpSkip
from nvae_tf.layers.squeeze_excitation import SqueezeExcitation
from nvae_tf.layers.weight_norm import Conv2D

RESIDUAL_SCALE = 0.1  # fixed, not learned (docs/design.md#cells)
CHANNEL_MULT = 2


class _ResidualCell(keras.layers.Layer):
    """Shared wiring: output = skip(x) + 0.1 * SE(branch(x))."""

    def __init__(self, use_se=True, **kwargs):
        super().__init__(**kwargs)
        self.use_se = bool(use_se)
        self.se = SqueezeExcitation(name="se") if self.use_se else None

    def branch(self, x, training, update_stats):
        raise NotImplementedError

    def skip(self, x):
        raise NotImplementedError

    def call(self, x, training=None, update_stats=True):
        y = self.branch(x, training, update_stats)
        if self.se is not None:
            y = self.se(y)
        return self.skip(x) + RESIDUAL_SCALE * y

    def get_config(self):
        return {**super().get_config(), "use_se": self.use_se}


@keras.saving.register_keras_serializable(package="nvae_tf")
class EncoderCell(_ResidualCell):
    """BN-Swish-Conv3x3, twice, + SE; ``downsample`` halves H, W and doubles the channels."""

    def __init__(self, downsample=False, use_se=True, **kwargs):
        super().__init__(use_se=use_se, **kwargs)
        self.downsample = bool(downsample)

    def build(self, input_shape):
        cin = int(input_shape[-1])
        cout = cin * CHANNEL_MULT if self.downsample else cin
        self.bn_swish_1 = BNSwish(name="bn_swish_1")
        self.conv_1 = Conv2D(cout, 3, strides=2 if self.downsample else 1, name="conv_1")
        self.bn_swish_2 = BNSwish(name="bn_swish_2")
        self.conv_2 = Conv2D(cout, 3, name="conv_2")
        self.reduce = FactorizedReduce(cout, name="reduce") if self.downsample else None

    def branch(self, x, training, update_stats):
        # conv(BN-Swish(x)), the Swish output recomputed for the conv's kernel gradient.
        y = self.bn_swish_1(x, training=training, update_stats=update_stats, then=self.conv_1)
        return self.bn_swish_2(y, training=training, update_stats=update_stats, then=self.conv_2)

    def skip(self, x):
        return self.reduce(x) if self.downsample else x

    def get_config(self):
        return {**super().get_config(), "downsample": self.downsample}


@keras.saving.register_keras_serializable(package="nvae_tf")
class DecoderCell(_ResidualCell):
    """Inverted residual: BN, 1x1 expand xE, BN-Swish, depthwise 5x5, BN-Swish, 1x1, BN, + SE.

    ``upsample`` first doubles H, W (nearest) and halves the channels; its expansion is
    computed from the wider input (docs/design.md#cells). The inner convs have no bias and no
    weight norm.
    """

    def __init__(self, expansion=6, upsample=False, use_se=True, **kwargs):
        super().__init__(use_se=use_se, **kwargs)
        self.expansion = int(expansion)
        self.upsample = bool(upsample)

    def build(self, input_shape):
        cin = int(input_shape[-1])
        cout = cin // CHANNEL_MULT if self.upsample else cin
        hidden = round(cin * self.expansion)
        self.bn_in = BatchNorm(name="bn_in")
        self.expand = Conv2D(hidden, 1, use_bias=False, weight_norm=False, name="expand")
        self.bn_swish_1 = BNSwish(name="bn_swish_1")
        self.depthwise = Conv2D(
            hidden, 5, use_bias=False, weight_norm=False, depthwise=True, name="depthwise"
        )
        self.bn_swish_2 = BNSwish(name="bn_swish_2")
        self.project = Conv2D(cout, 1, use_bias=False, weight_norm=False, name="project")
        self.bn_out = BatchNorm(name="bn_out")
        self.up_skip = UpSkip(cout, name="up_skip") if self.upsample else None
        # Built here: the inference branch reads their weights without calling them.
        b, h, w = input_shape[:3]
        size = [None if d is None else 2 * d for d in (h, w)] if self.upsample else [h, w]
        for layer, channels in (
            (self.bn_in, cin),
            (self.expand, cin),
            (self.bn_swish_1, hidden),
            (self.depthwise, hidden),
            (self.bn_swish_2, hidden),
            (self.project, hidden),
            (self.bn_out, cout),
        ):
            layer.build((b, *size, channels))

    def branch(self, x, training, update_stats):
        if self.upsample:
            x = _nearest_up(x)
        if not (training and self.trainable):
            return self._folded_branch(x)
        y = self.expand(self.bn_in(x, training=training, update_stats=update_stats))
        # conv(BN-Swish(y)), the Swish output recomputed for the conv's kernel gradient.
        y = self.bn_swish_1(y, training=training, update_stats=update_stats, then=self.depthwise)
        y = self.bn_swish_2(y, training=training, update_stats=update_stats, then=self.project)
        return self.bn_out(y, training=training, update_stats=update_stats)

    def _folded_branch(self, x):
        """The inference branch with every BN folded into its neighbouring conv: three
        conv + bias (+ Swish) kernels instead of seven passes; same value up to rounding.

        ``bn_in`` folds into the 1x1 ``expand`` from its input side (exact: a 1x1 conv has no
        padding), the other three into the conv before them. On CPU: IW evaluation 5-15%
        faster, MNIST sampling 2-5% (docs/design.md#speed).
        """
        dtype = x.dtype
        scale_in, shift_in = self.bn_in.affine()
        scale_1, shift_1 = self.bn_swish_1.bn.affine()
        scale_2, shift_2 = self.bn_swish_2.bn.affine()
        scale_out, shift_out = self.bn_out.affine()
        expand = self.expand.effective_kernel()[0, 0]  # (C, hidden)
        expand_bias = tf.linalg.matvec(expand, shift_in, transpose_a=True) * scale_1 + shift_1
        expand = expand * (scale_in[:, None] * scale_1)  # one pass over the kernel
        depthwise = self.depthwise.effective_kernel() * scale_2[:, None]
        project = self.project.effective_kernel() * scale_out

        def swish(y):
            return y * tf.sigmoid(y)  # written out for Grappler's remapper (see BNSwish)

        def cast(t):
            return tf.cast(t, dtype)

        y = swish(pointwise_conv2d(x, cast(expand), cast(expand_bias)))
        y = tf.nn.depthwise_conv2d(y, cast(depthwise), (1, 1, 1, 1), "SAME")
        y = swish(tf.nn.bias_add(y, cast(shift_2)))
        return pointwise_conv2d(y, cast(project), cast(shift_out))

    def skip(self, x):
        return self.up_skip(x) if self.upsample else x

    def get_config(self):
        return {**super().get_config(), "expansion": self.expansion, "upsample": self.upsample}


def _nearest_up(x):
    """Nearest-neighbour x2 up-sampling: each pixel repeated 2x2 (exact).

    A broadcast against a (2, 2) block of ones and a reshape: a few graph ops with the
    gradient (``tf.repeat`` twice built ~90), and XLA has no kernel for the resize op's
    gradient (``ResizeNearestNeighborGrad``), which ``jit_compile`` needs.
    """
    _, h, w, c = known_shape(x)
    blocks = tf.reshape(x, [-1, h, 1, w, 1, c]) * tf.ones([1, 1, 2, 1, 2, 1], x.dtype)
    return tf.reshape(blocks, [-1, 2 * h, 2 * w, c])
