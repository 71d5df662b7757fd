"""The cells' stride-1 convolutions as linear maps with hand-written gradients.

``BatchNorm(..., then=conv)`` runs a training BN-Swish and the conv after it as one op whose
gradient recomputes the Swish output (from the BN input, which BN's own gradient keeps) for
the conv's kernel gradient instead of keeping it: one activation-sized tensor less per
BN-Swish, among them the largest of a decoder cell (6x the channels). ``forward(s, kernel)``
is the conv without its bias; ``backward(s, kernel, d_out)`` returns its input and kernel
gradients. ``pointwise_conv2d`` is also what ``Conv2D`` and the folded inference branch use
for 1x1 convs.
"""

import tensorflow as tf

from nvae_tf.layers.depthwise import depthwise_gradients
from nvae_tf.layers.shapes import known_shape


def pointwise_conv2d(x, kernel, bias=None):
    """A 1x1, stride-1 convolution (+ ``bias``) as one matrix product over the flattened
    pixels: the same sums, mostly 1.0-1.2x faster forward + backward than oneDNN's 1x1 conv
    on NVAE's CPU shapes (``benchmarks/pointwise_conv.py``). The bias is added before the
    reshape, where Grappler fuses it."""
    cin, cout = kernel.shape[-2], kernel.shape[-1]
    y = tf.matmul(tf.reshape(x, [-1, cin]), tf.reshape(kernel, [cin, cout]))
    if bias is not None:
        y = tf.nn.bias_add(y, bias)
    return tf.reshape(y, [*known_shape(x)[:3], cout])


class Pointwise:
    """A 1x1 stride-1 conv without bias, as one matrix product over the pixels."""

    forward = staticmethod(pointwise_conv2d)

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
        return depthwise_gradients(s, kernel, d_out)


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
