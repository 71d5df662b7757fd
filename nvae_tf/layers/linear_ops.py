"""The cells' stride-1 convolutions as linear maps with hand-written gradients.

``BatchNorm(..., then=conv)`` runs a training BN-Swish and the conv after it as one op whose
gradient recomputes the Swish output (from the BN input, which BN's own gradient keeps) for
the conv's kernel gradient instead of keeping it: one activation-sized tensor less per
BN-Swish, among them the largest of a decoder cell (6x the channels). ``forward(s, kernel)``
is the conv without its bias; ``backward(s, kernel, d_out)`` returns its input and kernel
gradients.
"""

import tensorflow as tf

from nvae_tf.layers.depthwise import depthwise_kernel_gradient
from nvae_tf.layers.shapes import known_shape


class Pointwise:
    """A 1x1 stride-1 conv without bias, as one matrix product over the pixels."""

    @staticmethod
    def forward(s, kernel):
        cin, cout = kernel.shape[-2], kernel.shape[-1]
        y = tf.matmul(tf.reshape(s, [-1, cin]), tf.reshape(kernel, [cin, cout]))
        return tf.reshape(y, [*known_shape(s)[:3], cout])

    @staticmethod
    def backward(s, kernel, d_out):
        cin, cout = kernel.shape[-2], kernel.shape[-1]
        d_out_2d, k = tf.reshape(d_out, [-1, cout]), tf.reshape(kernel, [cin, cout])
        d_s = tf.matmul(d_out_2d, k, transpose_b=True)
        d_kernel = tf.matmul(tf.reshape(s, [-1, cin]), d_out_2d, transpose_a=True)
        return tf.reshape(d_s, known_shape(s)), tf.reshape(d_kernel, kernel.shape)


class DepthwiseSame:
    """A stride-1 depthwise conv with symmetric "SAME" padding (odd square kernel)."""

    @staticmethod
    def forward(s, kernel):
        return tf.nn.depthwise_conv2d(s, kernel, (1, 1, 1, 1), "SAME")

    @staticmethod
    def backward(s, kernel, d_out):
        d_s = tf.nn.depthwise_conv2d_backprop_input(
            known_shape(s), kernel, d_out, (1, 1, 1, 1), "SAME"
        )
        return d_s, depthwise_kernel_gradient(s, d_out, kernel)


class DenseSame:
    """A stride-1 dense conv with symmetric "SAME" padding (odd square kernel)."""

    @staticmethod
    def forward(s, kernel):
        return tf.nn.conv2d(s, kernel, 1, "SAME")

    @staticmethod
    def backward(s, kernel, d_out):
        strides = (1, 1, 1, 1)
        d_s = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.stack(known_shape(s)), filter=kernel, out_backprop=d_out,
            strides=strides, padding="SAME",
        )  # fmt: skip
        d_kernel = tf.raw_ops.Conv2DBackpropFilter(
            input=s, filter_sizes=tf.constant(kernel.shape.as_list()), out_backprop=d_out,
            strides=strides, padding="SAME",
        )  # fmt: skip
        return d_s, d_kernel
