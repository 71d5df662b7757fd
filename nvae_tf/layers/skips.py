"""Skip connections of the resolution-changing cells (docs/design.md#cells)."""

import keras
import tensorflow as tf

from nvae_tf.layers.shapes import known_shape
from nvae_tf.layers.tracking import CheckpointListsMixin
from nvae_tf.layers.weight_norm import Conv2D


def doubled_size(x):
    """``2 * (height, width)`` of NHWC ``x``: Python ints when static (no graph ops)."""
    height, width = known_shape(x)[1:3]
    return [2 * height, 2 * width]


@keras.saving.register_keras_serializable(package="nvae_tf")
class FactorizedReduce(CheckpointListsMixin, keras.layers.Layer):
    """Down-cell skip: Swish, then four 1x1 stride-2 convs on shifted views, concatenated.

    The views are unshifted, shifted by one row and column, by one column, and by one row;
    each conv gives ``filters // 4`` channels and the last one takes the remainder.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        quarter = self.filters // 4
        widths = [quarter, quarter, quarter, self.filters - 3 * quarter]
        self.convs = [Conv2D(w, 1, strides=2, name=f"conv_{i}") for i, w in enumerate(widths)]

    def build(self, input_shape):
        for conv in self.convs:  # 1x1 kernels: only the input channels matter
            conv.build(input_shape)

    def call(self, x):
        x = keras.activations.silu(x)
        height, width = x.shape[1], x.shape[2]
        if height is not None and width is not None and height % 2 == 0 and width % 2 == 0:
            # The pixels the four stride-2 convs read are the four phases of each 2x2 block:
            # one space_to_depth and a split instead of shifted slices, whose gradients fill
            # zeros (forward + backward 3x faster on NVAE's shapes, the same values).
            p00, p01, p10, p11 = tf.split(tf.nn.space_to_depth(x, 2), 4, axis=-1)
            views = [p00, p11, p01, p10]
            return tf.concat(
                [conv(v, subsampled=True) for conv, v in zip(self.convs, views)], axis=-1
            )
        views = [x, x[:, 1:, 1:, :], x[:, :, 1:, :], x[:, 1:, :, :]]
        return tf.concat([conv(v) for conv, v in zip(self.convs, views)], axis=-1)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="nvae_tf")
class UpSkip(keras.layers.Layer):
    """Up-cell skip: bilinear x2 up-sampling with align_corners=True, then a 1x1 conv (no bias).

    ``tf.image.resize`` has no align_corners mode, so the raw op is used.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.conv = Conv2D(self.filters, 1, use_bias=False, name="conv")

    def build(self, input_shape):
        self.conv.build(input_shape)  # 1x1 kernel: only the input channels matter

    def call(self, x):
        up = tf.raw_ops.ResizeBilinear(
            images=x, size=doubled_size(x), align_corners=True, half_pixel_centers=False
        )
        return self.conv(tf.cast(up, x.dtype))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}
